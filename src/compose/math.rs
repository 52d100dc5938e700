//! The materializers' arithmetic on one module: turn
//! `sum_i w_i * s_i * B_i A_i` into a single pair of factors, or (TIES,
//! DARE, magnitude pruning) prune the dense deltas `s_i B_i A_i`, merge
//! them, and factor the result.
//!
//! Everything here is pure Rust on row-major `f32` slices, computed in `f64`.
//! Shapes follow PEFT: `A_i` is `rank_i x n` (fan_in), `B_i` is `m x rank_i`
//! (fan_out). The result always has scale 1: `delta = b @ a`, which is what
//! the writer's `r = lora_alpha = rank` config means.
//!
//! Dense linear algebra runs with `faer` in sequential mode ([`Par::Seq`]):
//! callers already spread modules over rayon's pool, the factored SVD of one
//! module is a few milliseconds, and a sequential run gives the same bits on
//! every run on the same machine, which byte-identical outputs rely on.

use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::householder::{
    apply_block_householder_sequence_on_the_left_in_place_scratch,
    apply_block_householder_sequence_on_the_left_in_place_with_conj,
};
use faer::linalg::matmul::matmul;
use faer::linalg::qr::no_pivoting::factor::{
    qr_in_place, qr_in_place_scratch, recommended_block_size,
};
use faer::linalg::svd::{svd as faer_svd, svd_scratch, ComputeSvdVectors};
use faer::{Accum, Conj, Mat, MatMut, MatRef, Par};
use serde::Serialize;

mod subspace;

/// One adapter's contribution to a module: `weight * scale * b @ a`.
#[derive(Debug, Clone, Copy)]
pub struct Term<'a> {
    /// The merge weight (uniform 1/N, user-given, or learned).
    pub weight: f64,
    /// The adapter's own scale for this module: `alpha / r`, or
    /// `alpha / sqrt(r)` with rsLoRA.
    pub scale: f64,
    pub rank: usize,
    /// `rank x n`, row-major.
    pub a: &'a [f32],
    /// `m x rank`, row-major.
    pub b: &'a [f32],
}

/// Merged factors with scale 1: `delta = b @ a`.
#[derive(Debug, Clone, PartialEq)]
pub struct Factored {
    pub rank: usize,
    /// `rank x n`, row-major.
    pub a: Vec<f32>,
    /// `m x rank`, row-major.
    pub b: Vec<f32>,
    /// `||exact - b @ a||_F / ||exact||_F`, where `exact` is the true
    /// weighted sum of the terms' deltas.
    pub rel_error: f64,
    /// Fraction of the exact delta's squared Frobenius norm (the sum of its
    /// squared singular values) that the result keeps.
    pub energy: f64,
}

impl Factored {
    fn empty(rel_error: f64, energy: f64) -> Self {
        Factored {
            rank: 0,
            a: Vec::new(),
            b: Vec::new(),
            rel_error,
            energy,
        }
    }
}

/// Stacks the factors: `A'` is the rows of `w_i s_i A_i`, `B'` the columns of
/// `B_i`, so `B' A' = sum_i w_i s_i B_i A_i` with rank `sum_i rank_i`.
///
/// Lossless up to one `f32` rounding of each `w_i s_i A_i` entry (relative
/// 2^-24), so `rel_error` is 0 and `energy` is 1. The weight goes on `A` so
/// that `B` stays the adapter's bytes untouched.
///
/// # Panics
/// If a term's slices do not have the lengths its rank implies (the adapter
/// loader validates shapes before math sees them).
pub fn exact(m: usize, n: usize, terms: &[Term]) -> Factored {
    let k = check_terms(m, n, terms);
    let mut a = Vec::with_capacity(k * n);
    let mut b = vec![0.0f32; m * k];
    let mut offset = 0;
    for t in terms {
        let ws = t.weight * t.scale;
        a.extend(t.a.iter().map(|&x| (f64::from(x) * ws) as f32));
        for row in 0..m {
            b[row * k + offset..row * k + offset + t.rank]
                .copy_from_slice(&t.b[row * t.rank..(row + 1) * t.rank]);
        }
        offset += t.rank;
    }
    Factored {
        rank: k,
        a,
        b,
        rel_error: 0.0,
        energy: 1.0,
    }
}

/// The best rank-`rank` approximation (Eckart–Young, Frobenius norm) of the
/// exact sum `B' A'` (see [`exact`]), computed from the factors.
///
/// With `k = sum_i rank_i < min(m, n)`: thin QR `B' = Qb Rb` and
/// `A'^T = Qa Ra`, SVD of the `k x k` core `Rb Ra^T = U S V^T`, so
/// `B' A' = (Qb U) S (Qa V)^T` and the `m x n` matrix is never built. When
/// `k >= min(m, n)` the dense delta is no larger than the factors, and its SVD
/// is taken directly.
///
/// When `k` is large (hundreds, near the layer width) and a cost rule finds
/// it at least twice as cheap, a randomized subspace iteration on the
/// factors' Gram matrices takes the place of both (module `subspace`): no
/// `k x k` or dense SVD, an error within 0.1% of the optimum (not exactly
/// optimal), `rel_error` and `energy` those of the output. It hands back to
/// the routes above when it cannot vouch for its result.
///
/// Output rank is `min(rank, k, min(m, n))`: the exact sum has no more
/// singular values than that, so a larger request is lossless and no
/// zero-padding is added. Singular values that are zero inside that range
/// are kept (as zero columns/rows) so the rank is predictable.
///
/// `S` is split evenly: `b = Qb U_R sqrt(S_R)`, `a = sqrt(S_R) (Qa V_R)^T`,
/// so `b^T b = a a^T = S_R`. Balanced factors keep both tensors at the same
/// magnitude, which matters once they are stored in f16/bf16 or trained
/// further. (PEFT's `svd` combination puts all of `S` on `B`.)
///
/// `rel_error` is `sqrt(sum of discarded s^2 / sum of all s^2)` and `energy`
/// the kept share of `sum s^2`; a zero delta has `rel_error` 0 and `energy` 1.
/// Singular values at or below `eps * max(m, n, k) * ||B'||_F ||A'||_F` are
/// rounding noise of the factorization, not part of the delta, and count as
/// zero: without that, a delta that cancels (an adapter at weight `w` and
/// `-w`) would report its noise as a large relative error.
///
/// Errors on non-finite values in the inputs or if the SVD does not converge.
///
/// # Panics
/// As [`exact`], on slices that do not match their ranks.
pub fn svd(m: usize, n: usize, terms: &[Term], rank: usize) -> Result<Factored, String> {
    let k = check_terms(m, n, terms);
    check_finite(terms)?;
    if k == 0 || m == 0 || n == 0 {
        return Ok(Factored::empty(0.0, 1.0));
    }
    if subspace::is_cheaper(m, n, k, rank) {
        if let Some(f) = subspace::svd(m, n, terms, rank)? {
            return Ok(f);
        }
    }
    let bp = stacked_b(m, terms);
    let apt = stacked_at(n, terms);
    let noise = noise_floor(bp.as_ref(), apt.as_ref());
    exact_svd(bp, apt, rank, noise)
}

/// The exact routes of [`svd`] for `B' A'` (`bp` is `m x k`, `apt` is
/// `n x k`): with `k` below both sides, QR of both factors and an SVD of the
/// `k x k` core; else an SVD of the dense `m x n` delta.
fn exact_svd(bp: Mat<f64>, apt: Mat<f64>, rank: usize, noise: f64) -> Result<Factored, String> {
    let k = bp.ncols();
    if k < bp.nrows().min(apt.nrows()) {
        let qrb = householder_qr(bp);
        let qra = householder_qr(apt);
        let core = mul(qrb.r.as_ref(), qra.r.as_ref().transpose());
        let core_svd = thin_svd(core.as_ref())?;
        Ok(truncate(Some(&qrb), Some(&qra), core_svd, rank, noise))
    } else {
        let dense = mul(bp.as_ref(), apt.as_ref().transpose());
        let dense_svd = thin_svd(dense.as_ref())?;
        Ok(truncate(None, None, dense_svd, rank, noise))
    }
}

/// PEFT's `add_weighted_adapter(combination_type="linear")`, as done by
/// `LoraModel._generalized_task_arithmetic_weighted_adapter` with
/// `task_arithmetic`: with `ws_i = weight_i * scale_i`, A gets the
/// coefficient `sign(ws_i) * sqrt(|ws_i|)` and B gets `sqrt(|ws_i|)` (the
/// sign goes on one side only, so a negative weight flips the term), then
/// `a = sum_i cA_i A_i`, `b = sum_i cB_i B_i`. PEFT gives the new adapter
/// `r = lora_alpha = rank` (scale 1, which is also what [`Factored`] means;
/// note PEFT copies the remaining config, including `use_rslora`, from the
/// first adapter).
///
/// This is not the weighted sum of deltas: `b a` has the cross terms
/// `cB_i cA_j B_i A_j`. `rel_error` says how far it is from the exact sum,
/// computed from the factors (see [`frob_norm_factored`]), never the `m x n`
/// delta; when the exact sum is zero (to rounding) it is 0 if `b a` is zero
/// too, else infinite. `energy` has no meaning here and is set to 1; read
/// `rel_error`.
///
/// Errors, as PEFT does, when the ranks differ.
///
/// # Panics
/// As [`exact`], on slices that do not match their ranks.
pub fn linear(m: usize, n: usize, terms: &[Term]) -> Result<Factored, String> {
    let k = check_terms(m, n, terms);
    let Some(first) = terms.first() else {
        return Ok(Factored::empty(0.0, 1.0));
    };
    let r = first.rank;
    if let Some(t) = terms.iter().find(|t| t.rank != r) {
        return Err(format!(
            "the linear combination needs adapters of equal rank, got rank {r} and rank {}; \
             use the exact or svd method for mixed ranks",
            t.rank
        ));
    }
    let mut a = vec![0.0f64; r * n];
    let mut b = vec![0.0f64; m * r];
    for (i, t) in terms.iter().enumerate() {
        let ws = t.weight * t.scale;
        if !ws.is_finite() {
            return Err(format!(
                "term {i} has a non-finite weight * scale ({} * {})",
                t.weight, t.scale
            ));
        }
        let cb = ws.abs().sqrt();
        let ca = if ws < 0.0 { -cb } else { cb };
        for (dst, &x) in a.iter_mut().zip(t.a) {
            *dst += ca * f64::from(x);
        }
        for (dst, &x) in b.iter_mut().zip(t.b) {
            *dst += cb * f64::from(x);
        }
    }
    let a: Vec<f32> = a.into_iter().map(|x| x as f32).collect();
    let b: Vec<f32> = b.into_iter().map(|x| x as f32).collect();

    // The difference as one factored product: [b | B'] [a ; -A'].
    let bp = stacked_b(m, terms);
    let apt = stacked_at(n, terms);
    let diff_b = Mat::from_fn(m, r + k, |i, j| {
        if j < r {
            f64::from(b[i * r + j])
        } else {
            bp[(i, j - r)]
        }
    });
    let diff_at = Mat::from_fn(n, r + k, |i, j| {
        if j < r {
            f64::from(a[j * n + i])
        } else {
            -apt[(i, j - r)]
        }
    });
    let exact_norm = frob_norm_cols(bp.as_ref(), apt.as_ref());
    let diff_norm = frob_norm_cols(diff_b.as_ref(), diff_at.as_ref());
    let rel_error = if exact_norm > noise_floor(bp.as_ref(), apt.as_ref()) {
        diff_norm / exact_norm
    } else if diff_norm > noise_floor(diff_b.as_ref(), diff_at.as_ref()) {
        f64::INFINITY
    } else {
        0.0
    };
    Ok(Factored {
        rank: r,
        a,
        b,
        rel_error,
        energy: 1.0,
    })
}

/// The dense `m x n` (row-major) exact sum `sum_i w_i s_i B_i A_i`, straight
/// from the definition. A reference for tests and small checks; the
/// materializers never need it.
pub fn dense(m: usize, n: usize, terms: &[Term]) -> Vec<f64> {
    check_terms(m, n, terms);
    let mut out = vec![0.0f64; m * n];
    for t in terms {
        let ws = t.weight * t.scale;
        for i in 0..m {
            let row = &mut out[i * n..(i + 1) * n];
            for p in 0..t.rank {
                let c = ws * f64::from(t.b[i * t.rank + p]);
                for (dst, &x) in row.iter_mut().zip(&t.a[p * n..(p + 1) * n]) {
                    *dst += c * f64::from(x);
                }
            }
        }
    }
    out
}

/// How TIES and DARE-TIES elect the sign of each entry (PEFT's
/// `majority_sign_method`). Only the pruned deltas vote, before the merge
/// weights are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MajoritySign {
    /// The sign of the sum of the pruned deltas (PEFT's default).
    Total,
    /// The sign most pruned deltas have; an even vote counts as positive.
    Frequency,
}

impl MajoritySign {
    pub fn name(self) -> &'static str {
        match self {
            MajoritySign::Total => "total",
            MajoritySign::Frequency => "frequency",
        }
    }
}

/// How each adapter's dense delta is sparsified before the merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prune {
    /// Keep the `floor(density * m * n)` entries of largest magnitude (TIES,
    /// magnitude pruning). Among equal magnitudes at the threshold the
    /// earlier entries in row-major order are kept.
    Magnitude,
    /// Keep each entry with probability `density` and divide the survivors
    /// by `density`, so the expected delta is unchanged (DARE).
    Random,
}

/// A task-vector merge of dense deltas, as PEFT's `merge_utils` defines
/// them: `ties`, `dare_ties` (with `elect`), `magnitude_prune`,
/// `dare_linear` (without).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TaskMerge {
    pub prune: Prune,
    /// Fraction of each delta's entries kept, in (0, 1]; 1 keeps them all.
    pub density: f64,
    /// None: the weighted sum of the pruned deltas. Some: TIES' sign
    /// election and disjoint merge.
    pub elect: Option<MajoritySign>,
}

/// The dense `m x n` (row-major) result of `how` on the terms' deltas
/// `dW_i = s_i B_i A_i`, as PEFT's `merge_utils` computes it on a list of
/// task tensors with weights `w_i`:
///
/// 1. prune each `dW_i` to `P_i` ([`Prune`]; `density` 1 keeps everything);
/// 2. without `elect`: `sum_i w_i P_i`;
/// 3. with `elect`: per entry, the majority sign `g` of the unweighted
///    `P_i` (`total`: sign of `sum_i P_i`; `frequency`: sign of
///    `sum_i sign(P_i)`; zero counts as positive), then the mean over the
///    adapters whose `P_i` has sign `g` of `w_i P_i` (`disjoint_merge`:
///    their weighted sum divided by their number, at least 1).
///
/// `seeds` gives every term's random stream for [`Prune::Random`] (one per
/// term, in order; ignored by [`Prune::Magnitude`]): the kept entries of
/// term `i` depend on `seeds[i]`, `density` and the shape only, never on
/// the values or on other terms, and are drawn in row-major order.
///
/// One delta is built at a time and folded into running sums, so the
/// working memory is a few `m x n` buffers however many terms there are
/// ([`task_merge_bytes`]). Computed in `f64`.
///
/// Errors on non-finite inputs and on a density outside (0, 1].
///
/// # Panics
/// As [`exact`], on slices that do not match their ranks, and when
/// `Prune::Random` gets fewer seeds than terms.
pub fn task_merge_dense(
    m: usize,
    n: usize,
    terms: &[Term],
    how: &TaskMerge,
    seeds: &[u64],
) -> Result<Vec<f64>, String> {
    check_terms(m, n, terms);
    check_finite(terms)?;
    let density = how.density;
    if !(density > 0.0 && density <= 1.0) {
        return Err(format!("the density must be in (0, 1], got {density}"));
    }
    if how.prune == Prune::Random {
        assert!(seeds.len() >= terms.len(), "one seed per term");
    }
    let len = m * n;
    let mut delta = vec![0.0f64; len];
    let mut scratch = Vec::new();
    // Without elect: `sum` is the weighted sum. With it: `sum` is the
    // weighted sum of the positive entries, `neg` of the negative ones,
    // `pos_n`/`neg_n` their counts, `vote` the election (total: sum of
    // entries; frequency: sum of signs).
    let mut sum = vec![0.0f64; len];
    let (mut neg, mut pos_n, mut neg_n) = match how.elect {
        Some(_) => (vec![0.0f64; len], vec![0u32; len], vec![0u32; len]),
        None => (Vec::new(), Vec::new(), Vec::new()),
    };
    let mut vote_total = match how.elect {
        Some(MajoritySign::Total) => vec![0.0f64; len],
        _ => Vec::new(),
    };
    let mut vote_count = match how.elect {
        Some(MajoritySign::Frequency) => vec![0i32; len],
        _ => Vec::new(),
    };
    for (i, t) in terms.iter().enumerate() {
        delta_into(m, n, t, &mut delta);
        if density < 1.0 {
            match how.prune {
                Prune::Magnitude => prune_magnitude(&mut delta, density, &mut scratch),
                Prune::Random => prune_random(&mut delta, density, seeds[i]),
            }
        }
        let w = t.weight;
        match how.elect {
            None => {
                for (acc, &p) in sum.iter_mut().zip(&delta) {
                    *acc += w * p;
                }
            }
            Some(elect) => {
                for (e, &p) in delta.iter().enumerate() {
                    match elect {
                        MajoritySign::Total => vote_total[e] += p,
                        MajoritySign::Frequency => {
                            vote_count[e] += i32::from(p > 0.0) - i32::from(p < 0.0)
                        }
                    }
                    if p > 0.0 {
                        sum[e] += w * p;
                        pos_n[e] += 1;
                    } else if p < 0.0 {
                        neg[e] += w * p;
                        neg_n[e] += 1;
                    }
                }
            }
        }
    }
    drop((delta, scratch));
    if let Some(elect) = how.elect {
        for e in 0..len {
            let positive = match elect {
                MajoritySign::Total => vote_total[e] >= 0.0,
                MajoritySign::Frequency => vote_count[e] >= 0,
            };
            sum[e] = if positive {
                sum[e] / f64::from(pos_n[e].max(1))
            } else {
                neg[e] / f64::from(neg_n[e].max(1))
            };
        }
    }
    Ok(sum)
}

/// [`task_merge_dense`], then its best rank-`rank` approximation
/// (Eckart–Young) through a dense SVD, split evenly between the factors as
/// [`svd`] does. The result of pruning is dense and of full rank in
/// general, so the factors of the inputs cannot be used; the output rank
/// is `min(rank, m, n)`.
///
/// `rel_error` and `energy` are measured against the method's own dense
/// result (what `rank` loses), as [`svd`] measures against the exact sum:
/// a `rank` of at least `min(m, n)` gives `rel_error` 0. Singular values
/// at or below `eps * max(m, n) * ||result||_F` count as zero.
pub fn task_merge(
    m: usize,
    n: usize,
    terms: &[Term],
    how: &TaskMerge,
    seeds: &[u64],
    rank: usize,
) -> Result<Factored, String> {
    let result = task_merge_dense(m, n, terms, how, seeds)?;
    if terms.is_empty() || m == 0 || n == 0 {
        return Ok(Factored::empty(0.0, 1.0));
    }
    let mat = MatRef::from_row_major_slice(&result, m, n);
    let noise = f64::EPSILON * m.max(n) as f64 * mat.norm_l2();
    let dense_svd = thin_svd(mat)?;
    drop(result);
    Ok(truncate(None, None, dense_svd, rank, noise))
}

/// The bytes [`task_merge`] holds at its peak for one `m x n` module with
/// output rank `rank`: the delta being built, the pruning scratch and the
/// running sums, or later the result with its SVD (factors and faer's
/// workspace), whichever is more.
pub fn task_merge_bytes(m: usize, n: usize, how: &TaskMerge, rank: usize) -> u64 {
    let len = (m as u64).saturating_mul(n as u64);
    let per_entry: u64 = 8 // the delta
        + if how.prune == Prune::Magnitude { 8 } else { 0 }
        + 8 // the (positive) weighted sum
        + match how.elect {
            None => 0,
            Some(MajoritySign::Total) => 8 + 4 + 4 + 8,
            Some(MajoritySign::Frequency) => 8 + 4 + 4 + 4,
        };
    let building = len.saturating_mul(per_entry);
    let size = m.min(n) as u64;
    let scratch = svd_scratch::<f64>(
        m,
        n,
        ComputeSvdVectors::Thin,
        ComputeSvdVectors::Thin,
        Par::Seq,
        Default::default(),
    )
    .size_bytes() as u64;
    let factors = (m as u64 + n as u64).saturating_mul(size).saturating_mul(8);
    let out = (m as u64 + n as u64).saturating_mul(rank.min(m.min(n)) as u64) * 8;
    let decomposing = len
        .saturating_mul(8)
        .saturating_add(scratch)
        .saturating_add(factors)
        .saturating_add(out);
    building.max(decomposing)
}

/// `s B A` of one term (its weight left out), `m x n` row-major, into `out`.
fn delta_into(m: usize, n: usize, t: &Term, out: &mut [f64]) {
    let b = Mat::from_fn(m, t.rank, |i, p| f64::from(t.b[i * t.rank + p]));
    let a = Mat::from_fn(t.rank, n, |p, j| f64::from(t.a[p * n + j]));
    let dst = MatMut::from_row_major_slice_mut(out, m, n);
    matmul(
        dst,
        Accum::Replace,
        b.as_ref(),
        a.as_ref(),
        t.scale,
        Par::Seq,
    );
}

/// Zero all but the `floor(density * len)` entries of largest magnitude
/// (PEFT's `magnitude_based_pruning`); at the threshold, earlier entries
/// win. `scratch` is reused between calls.
fn prune_magnitude(x: &mut [f64], density: f64, scratch: &mut Vec<f64>) {
    let keep = ((density * x.len() as f64) as usize).min(x.len());
    if keep == 0 {
        x.fill(0.0);
        return;
    }
    scratch.clear();
    scratch.extend(x.iter().map(|v| v.abs()));
    let at = x.len() - keep;
    let (_, &mut threshold, _) = scratch.select_nth_unstable_by(at, f64::total_cmp);
    let above = x.iter().filter(|v| v.abs() > threshold).count();
    let mut level = keep - above;
    for v in x.iter_mut() {
        let mag = v.abs();
        if mag > threshold {
            continue;
        }
        if mag == threshold && level > 0 {
            level -= 1;
        } else {
            *v = 0.0;
        }
    }
}

/// Keep each entry with probability `density`, scaled by `1 / density`
/// (PEFT's `random_pruning` with `rescale`): one draw per entry in order,
/// kept when a uniform `u` in [0, 1) (53 bits) is below `density`.
fn prune_random(x: &mut [f64], density: f64, seed: u64) {
    let mut rng = crate::rng::Rng(seed);
    for v in x.iter_mut() {
        if rng.unit() < density {
            *v /= density;
        } else {
            *v = 0.0;
        }
    }
}

/// `||b @ a||_F` for `b` (`m x k`) and `a` (`k x n`), row-major, without
/// building `b @ a`: with `b = Qb Xb` and `a^T = Qa Xa` (thin QR where that
/// shrinks a side, else the factor itself), `||b a||_F = ||Xb Xa^T||_F`. Costs
/// `O((m + n) k^2)`; accurate to about `eps * ||b||_F ||a||_F`, so unlike the
/// Gram-matrix trace it also resolves norms that cancel far below the
/// factors' own scale.
///
/// # Panics
/// If `b.len() != m * k` or `a.len() != k * n`.
pub fn frob_norm_factored(b: &[f32], a: &[f32], m: usize, k: usize, n: usize) -> f64 {
    assert_eq!(b.len(), m * k, "b is not {m} x {k}");
    assert_eq!(a.len(), k * n, "a is not {k} x {n}");
    let bm = Mat::from_fn(m, k, |i, j| f64::from(b[i * k + j]));
    let at = Mat::from_fn(n, k, |i, j| f64::from(a[j * n + i]));
    frob_norm_cols(bm.as_ref(), at.as_ref())
}

/// `||b a||_F` where `b` is `m x k` and `at = a^T` is `n x k`.
fn frob_norm_cols(b: MatRef<f64>, at: MatRef<f64>) -> f64 {
    if b.ncols() == 0 {
        return 0.0;
    }
    let xb = shrink(b);
    let xa = shrink(at);
    mul(xb.as_ref(), xa.as_ref().transpose()).norm_l2()
}

/// `y` with `x = Q y` for some `Q` with orthonormal columns and at most
/// `x.ncols()` rows: the `R` of a tall `x`, else `x` itself.
fn shrink(x: MatRef<f64>) -> Mat<f64> {
    if x.nrows() > x.ncols() {
        householder_qr(x.to_owned()).r
    } else {
        x.to_owned()
    }
}

/// The size below which singular values of `b a^T` (`b` is `m x k`, `at` is
/// `n x k`) are indistinguishable from the rounding of computing them.
fn noise_floor(b: MatRef<f64>, at: MatRef<f64>) -> f64 {
    noise_floor_of(
        (b.nrows(), at.nrows(), b.ncols()),
        b.norm_l2(),
        at.norm_l2(),
    )
}

/// [`noise_floor`] from the sizes `(m, n, k)` and the Frobenius norms of
/// `b` and `at`, for a caller that has the norms without the matrices.
fn noise_floor_of((m, n, k): (usize, usize, usize), nb: f64, na: f64) -> f64 {
    f64::EPSILON * m.max(n).max(k) as f64 * nb * na
}

/// Checks every term against `m x n` and returns `k = sum of ranks`.
fn check_terms(m: usize, n: usize, terms: &[Term]) -> usize {
    for (i, t) in terms.iter().enumerate() {
        assert_eq!(
            t.a.len(),
            t.rank * n,
            "term {i}: A has {} values, expected {} x {n}",
            t.a.len(),
            t.rank
        );
        assert_eq!(
            t.b.len(),
            m * t.rank,
            "term {i}: B has {} values, expected {m} x {}",
            t.b.len(),
            t.rank
        );
    }
    terms.iter().map(|t| t.rank).sum()
}

fn check_finite(terms: &[Term]) -> Result<(), String> {
    for (i, t) in terms.iter().enumerate() {
        if !(t.weight * t.scale).is_finite() {
            return Err(format!(
                "term {i}: weight {} * scale {} is not finite",
                t.weight, t.scale
            ));
        }
        if !all_finite(t.a) {
            return Err(format!("term {i}: A contains NaN or infinity"));
        }
        if !all_finite(t.b) {
            return Err(format!("term {i}: B contains NaN or infinity"));
        }
    }
    Ok(())
}

/// Whether no value is NaN or infinite. Blocks without an early exit inside,
/// so the test runs in vector lanes (value by value with `any`, it was a
/// visible share of a large merge).
fn all_finite(x: &[f32]) -> bool {
    x.chunks(1024)
        .all(|c| c.iter().fold(true, |ok, v| ok & v.is_finite()))
}

/// `B'`: the columns of every `B_i`, `m x k`.
fn stacked_b(m: usize, terms: &[Term]) -> Mat<f64> {
    let k: usize = terms.iter().map(|t| t.rank).sum();
    let mut out = Mat::zeros(m, k);
    let mut offset = 0;
    for t in terms {
        for p in 0..t.rank {
            let col = out.col_as_slice_mut(offset + p);
            for (dst, row) in col.iter_mut().zip(t.b.chunks_exact(t.rank)) {
                *dst = f64::from(row[p]);
            }
        }
        offset += t.rank;
    }
    out
}

/// `A'^T`: the rows of every `w_i s_i A_i` as columns, `n x k`.
fn stacked_at(n: usize, terms: &[Term]) -> Mat<f64> {
    let k: usize = terms.iter().map(|t| t.rank).sum();
    let mut out = Mat::zeros(n, k);
    let mut offset = 0;
    for t in terms {
        let ws = t.weight * t.scale;
        for p in 0..t.rank {
            let col = out.col_as_slice_mut(offset + p);
            for (dst, &x) in col.iter_mut().zip(&t.a[p * n..(p + 1) * n]) {
                *dst = ws * f64::from(x);
            }
        }
        offset += t.rank;
    }
    out
}

fn mul(lhs: MatRef<f64>, rhs: MatRef<f64>) -> Mat<f64> {
    let mut out = Mat::zeros(lhs.nrows(), rhs.ncols());
    matmul(out.as_mut(), Accum::Replace, lhs, rhs, 1.0, Par::Seq);
    out
}

/// Householder QR of a tall matrix (`rows >= cols >= 1`), Q kept implicit.
struct HouseholderQr {
    /// Unit lower-trapezoidal Householder vectors, `rows x cols`.
    basis: Mat<f64>,
    /// Block reflector coefficients.
    coeff: Mat<f64>,
    /// Upper triangular, `cols x cols`.
    r: Mat<f64>,
}

fn householder_qr(mut qr: Mat<f64>) -> HouseholderQr {
    let (rows, cols) = qr.shape();
    debug_assert!(rows >= cols && cols >= 1);
    let block = recommended_block_size::<f64>(rows, cols);
    let mut coeff = Mat::zeros(block, cols);
    qr_in_place(
        qr.as_mut(),
        coeff.as_mut(),
        Par::Seq,
        MemStack::new(&mut MemBuffer::new(qr_in_place_scratch::<f64>(
            rows,
            cols,
            block,
            Par::Seq,
            Default::default(),
        ))),
        Default::default(),
    );
    let mut r = Mat::zeros(cols, cols);
    r.as_mut()
        .copy_from_triangular_upper(qr.as_ref().subrows(0, cols));
    // faer leaves the vectors' unit leading entries implicit and R on top;
    // make the basis explicit.
    let mut basis = Mat::zeros(rows, cols);
    basis
        .as_mut()
        .copy_from_strict_triangular_lower(qr.as_ref());
    basis.as_mut().diagonal_mut().fill(1.0);
    HouseholderQr { basis, coeff, r }
}

/// `Q @ small` for the thin `Q` (`rows x cols`) of `qr`, with `small`
/// `cols x r`. The reflectors are applied to `[small; 0]` rather than
/// forming `Q`: about `4 rows cols r` flops instead of `4 rows cols^2` plus
/// a product, which matters when `r` (the output rank) is well below `cols`
/// (the summed input rank).
fn apply_q(qr: &HouseholderQr, small: MatRef<f64>) -> Mat<f64> {
    let (rows, cols) = qr.basis.shape();
    let r = small.ncols();
    let mut out = Mat::zeros(rows, r);
    out.as_mut().subrows_mut(0, cols).copy_from(small);
    apply_block_householder_sequence_on_the_left_in_place_with_conj(
        qr.basis.as_ref(),
        qr.coeff.as_ref(),
        Conj::No,
        out.as_mut(),
        Par::Seq,
        MemStack::new(&mut MemBuffer::new(
            apply_block_householder_sequence_on_the_left_in_place_scratch::<f64>(
                rows,
                qr.coeff.nrows(),
                r,
            ),
        )),
    );
    out
}

/// `U diag(s) V^T`, singular values non-increasing.
struct ThinSvd {
    u: Mat<f64>,
    s: Vec<f64>,
    v: Mat<f64>,
}

fn thin_svd(mat: MatRef<f64>) -> Result<ThinSvd, String> {
    let (rows, cols) = mat.shape();
    let size = rows.min(cols);
    let mut u = Mat::zeros(rows, size);
    let mut v = Mat::zeros(cols, size);
    let mut s = Diag::zeros(size);
    faer_svd(
        mat,
        s.as_mut(),
        Some(u.as_mut()),
        Some(v.as_mut()),
        Par::Seq,
        MemStack::new(&mut MemBuffer::new(svd_scratch::<f64>(
            rows,
            cols,
            ComputeSvdVectors::Thin,
            ComputeSvdVectors::Thin,
            Par::Seq,
            Default::default(),
        ))),
        Default::default(),
    )
    .map_err(|e| format!("the SVD of a {rows} x {cols} matrix failed: {e:?}"))?;
    let s = s.column_vector().iter().copied().collect();
    Ok(ThinSvd { u, s, v })
}

/// Keeps the top `rank` singular triplets of `(left u) diag(s) (right v)^T`
/// and splits `s` evenly between the factors. Singular values at or below
/// `noise` count as zero.
fn truncate(
    left: Option<&HouseholderQr>,
    right: Option<&HouseholderQr>,
    ThinSvd { u, s, v }: ThinSvd,
    rank: usize,
    noise: f64,
) -> Factored {
    let s: Vec<f64> = s
        .into_iter()
        .map(|x| if x > noise { x } else { 0.0 })
        .collect();
    let r = rank.min(s.len());
    let kept: f64 = s[..r].iter().map(|x| x * x).sum();
    // Summed from the tail, not as total - kept, so a small error is not lost
    // to cancellation. Folded from +0 (an empty `sum` is -0, which would be
    // recorded as a relative error of -0).
    let discarded: f64 = s[r..].iter().fold(0.0, |acc, x| acc + x * x);
    let total = kept + discarded;
    let (rel_error, energy) = if total > 0.0 {
        ((discarded / total).sqrt(), kept / total)
    } else {
        (0.0, 1.0)
    };
    let root: Vec<f64> = s[..r].iter().map(|x| x.sqrt()).collect();
    let us = Mat::from_fn(u.nrows(), r, |i, j| u[(i, j)] * root[j]);
    let vs = Mat::from_fn(v.nrows(), r, |i, j| v[(i, j)] * root[j]);
    let bm = match left {
        Some(qr) => apply_q(qr, us.as_ref()),
        None => us,
    };
    let at = match right {
        Some(qr) => apply_q(qr, vs.as_ref()),
        None => vs,
    };
    let (m, n) = (bm.nrows(), at.nrows());
    let mut b = vec![0.0f32; m * r];
    for j in 0..r {
        for (i, &x) in bm.col_as_slice(j).iter().enumerate() {
            b[i * r + j] = x as f32;
        }
    }
    let mut a = Vec::with_capacity(r * n);
    for j in 0..r {
        a.extend(at.col_as_slice(j).iter().map(|&x| x as f32));
    }
    Factored {
        rank: r,
        a,
        b,
        rel_error,
        energy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::rng::Rng;

    /// One adapter's factors; `scale` is alpha / rank with alpha != rank.
    struct Adapter {
        rank: usize,
        scale: f64,
        a: Vec<f32>,
        b: Vec<f32>,
    }

    fn adapter(rng: &mut Rng, m: usize, n: usize, rank: usize, alpha: f64) -> Adapter {
        Adapter {
            rank,
            scale: alpha / rank as f64,
            a: rng.symmetric_vec(rank * n),
            b: rng.symmetric_vec(m * rank),
        }
    }

    fn terms<'a>(adapters: &'a [Adapter], weights: &[f64]) -> Vec<Term<'a>> {
        adapters
            .iter()
            .zip(weights)
            .map(|(ad, &weight)| Term {
                weight,
                scale: ad.scale,
                rank: ad.rank,
                a: &ad.a,
                b: &ad.b,
            })
            .collect()
    }

    /// `b @ a` in f64 from the f32 factors, `m x n` row-major.
    pub(super) fn product(f: &Factored, m: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for p in 0..f.rank {
                let c = f64::from(f.b[i * f.rank + p]);
                for j in 0..n {
                    out[i * n + j] += c * f64::from(f.a[p * n + j]);
                }
            }
        }
        out
    }

    fn norm(x: &[f64]) -> f64 {
        x.iter().map(|v| v * v).sum::<f64>().sqrt()
    }

    fn rel_diff(x: &[f64], reference: &[f64]) -> f64 {
        let diff: Vec<f64> = x.iter().zip(reference).map(|(a, b)| a - b).collect();
        norm(&diff) / norm(reference)
    }

    /// Singular values of a dense row-major matrix, through faer's dense SVD
    /// (not the factored path under test).
    fn dense_singular_values(d: &[f64], m: usize, n: usize) -> Vec<f64> {
        let mat = Mat::from_fn(m, n, |i, j| d[i * n + j]);
        thin_svd(mat.as_ref()).unwrap().s
    }

    /// Eckart–Young: the optimal relative error of a rank-`r` approximation.
    fn optimal_rel_error(s: &[f64], r: usize) -> f64 {
        let total: f64 = s.iter().map(|x| x * x).sum();
        let tail: f64 = s[r.min(s.len())..].iter().map(|x| x * x).sum();
        (tail / total).sqrt()
    }

    /// Three adapters of ranks 2, 3, 4 (k = 9), alpha != rank, one negative
    /// weight.
    fn three(rng: &mut Rng, m: usize, n: usize) -> Vec<Adapter> {
        vec![
            adapter(rng, m, n, 2, 16.0),
            adapter(rng, m, n, 3, 5.0),
            adapter(rng, m, n, 4, 32.0),
        ]
    }
    const WEIGHTS: [f64; 3] = [0.3, -0.7, 1.2];

    // Every output factor is rounded to f32 once (relative 2^-24 ~ 6e-8);
    // products of k <= 9 such terms with mild cancellation stay within a few
    // 1e-7 of the f64 reference, so 1e-6 leaves a safe margin while still
    // catching any real mistake (a wrong scale is off by O(1)).
    const F32_TOL: f64 = 1e-6;
    // Quantities computed entirely in f64 from the same inputs agree to
    // roundoff (~1e-14 here); 1e-9 is loose for that and far below anything
    // meaningful.
    const F64_TOL: f64 = 1e-9;

    #[test]
    fn exact_matches_dense_reference() {
        let (m, n) = (7, 5);
        let mut rng = Rng(1);
        let ads = three(&mut rng, m, n);
        let ts = terms(&ads, &WEIGHTS);
        let f = exact(m, n, &ts);
        assert_eq!(f.rank, 9);
        assert_eq!((f.a.len(), f.b.len()), (9 * n, m * 9));
        assert_eq!((f.rel_error, f.energy), (0.0, 1.0));
        let reference = dense(m, n, &ts);
        assert!(rel_diff(&product(&f, m, n), &reference) < F32_TOL);
        // Lossless, entry by entry too (relative to the largest entry, since
        // single entries may cancel to near zero).
        let max = reference.iter().fold(0.0f64, |acc, x| acc.max(x.abs()));
        for (x, r) in product(&f, m, n).iter().zip(&reference) {
            assert!((x - r).abs() / max < F32_TOL);
        }
    }

    #[test]
    fn dense_matches_hand_computed_value() {
        // 1x1 with rank 2: delta = w * s * (b0 a0 + b1 a1).
        let a = [2.0f32, 3.0];
        let b = [5.0f32, 7.0];
        let t = Term {
            weight: 0.5,
            scale: 4.0 / 2.0,
            rank: 2,
            a: &a,
            b: &b,
        };
        assert_eq!(dense(1, 1, &[t]), vec![0.5 * 2.0 * (10.0 + 21.0)]);
    }

    #[test]
    fn weight_and_scale_are_applied_once() {
        let (m, n) = (6, 4);
        let mut rng = Rng(2);
        let ads = vec![adapter(&mut rng, m, n, 3, 12.0)]; // scale 4
        let ts = terms(&ads, &[0.25]); // weight * scale = 1
        let plain: Vec<f64> = {
            let t = Term {
                weight: 1.0,
                scale: 1.0,
                ..ts[0]
            };
            dense(m, n, &[t])
        };
        // exact puts w s on A, leaves B as it is.
        let f = exact(m, n, &ts);
        assert_eq!(f.b, ads[0].b);
        assert_eq!(f.a, ads[0].a);
        // With w s = 3 it is visible in A only.
        let ts3 = terms(&ads, &[0.75]);
        let f3 = exact(m, n, &ts3);
        assert_eq!(f3.b, ads[0].b);
        for (x, y) in f3.a.iter().zip(&ads[0].a) {
            assert_eq!(*x, (f64::from(*y) * 3.0) as f32);
        }
        let tripled: Vec<f64> = plain.iter().map(|x| 3.0 * x).collect();
        assert!(rel_diff(&product(&f3, m, n), &tripled) < F32_TOL);
        let s = svd(m, n, &ts3, 3).unwrap();
        assert!(rel_diff(&product(&s, m, n), &tripled) < F32_TOL);
        let l = linear(m, n, &ts3).unwrap();
        assert!(rel_diff(&product(&l, m, n), &tripled) < F32_TOL);
        assert!(l.rel_error < F32_TOL);
    }

    /// Checks an svd result against the dense optimum for every rank.
    fn check_svd_against_dense(m: usize, n: usize, ts: &[Term]) {
        let reference = dense(m, n, ts);
        let sv = dense_singular_values(&reference, m, n);
        let k: usize = ts.iter().map(|t| t.rank).sum();
        let attainable = k.min(m).min(n);
        for r in 1..=attainable + 2 {
            let f = svd(m, n, ts, r).unwrap();
            assert_eq!(f.rank, r.min(attainable), "rank {r}");
            assert_eq!((f.a.len(), f.b.len()), (f.rank * n, m * f.rank));
            let optimal = optimal_rel_error(&sv, r);
            assert!(
                (f.rel_error - optimal).abs() < F64_TOL,
                "rank {r}: rel_error {} vs optimum {optimal}",
                f.rel_error
            );
            assert!((f.energy - (1.0 - optimal * optimal)).abs() < F64_TOL);
            // The factors really achieve the reported (optimal) error.
            let achieved = rel_diff(&product(&f, m, n), &reference);
            assert!(
                (achieved - f.rel_error).abs() < F32_TOL,
                "rank {r}: achieved {achieved} vs reported {}",
                f.rel_error
            );
            // Balanced split: column j of b and row j of a both have squared
            // norm s_j.
            for j in 0..f.rank {
                let bj: f64 = (0..m).map(|i| f64::from(f.b[i * f.rank + j]).powi(2)).sum();
                let aj: f64 = f.a[j * n..(j + 1) * n]
                    .iter()
                    .map(|&x| f64::from(x).powi(2))
                    .sum();
                assert!((bj - sv[j]).abs() / sv[0] < F32_TOL, "b col {j}");
                assert!((aj - sv[j]).abs() / sv[0] < F32_TOL, "a row {j}");
            }
        }
    }

    #[test]
    fn svd_factored_branch_is_optimal() {
        // k = 9 < min(40, 30): QR + core SVD.
        let (m, n) = (40, 30);
        let mut rng = Rng(3);
        let ads = three(&mut rng, m, n);
        check_svd_against_dense(m, n, &terms(&ads, &WEIGHTS));
    }

    #[test]
    fn svd_dense_branch_is_optimal() {
        // k = 9 >= min(6, 20): dense SVD. Both orientations.
        let mut rng = Rng(4);
        let ads = three(&mut rng, 6, 20);
        check_svd_against_dense(6, 20, &terms(&ads, &WEIGHTS));
        let ads = three(&mut rng, 20, 6);
        check_svd_against_dense(20, 6, &terms(&ads, &WEIGHTS));
        // k == min(m, n) exactly.
        let ads = three(&mut rng, 9, 12);
        check_svd_against_dense(9, 12, &terms(&ads, &WEIGHTS));
    }

    #[test]
    fn svd_branches_agree() {
        // Same delta just below and at the branch point: the top singular
        // triplets agree, so the rank-4 products agree.
        let (m, n) = (10, 40);
        let mut rng = Rng(5);
        let ads = three(&mut rng, m, n); // k = 9 < 10: factored
        let ts = terms(&ads, &WEIGHTS);
        let factored = svd(m, n, &ts, 4).unwrap();
        // Same delta with an all-zero extra term pushes k to 10: dense.
        let zero_a = vec![0.0f32; n];
        let zero_b = vec![0.0f32; m];
        let mut ts_dense = ts.clone();
        ts_dense.push(Term {
            weight: 1.0,
            scale: 2.0,
            rank: 1,
            a: &zero_a,
            b: &zero_b,
        });
        let dense_path = svd(m, n, &ts_dense, 4).unwrap();
        assert!((factored.rel_error - dense_path.rel_error).abs() < F64_TOL);
        let pf = product(&factored, m, n);
        assert!(rel_diff(&product(&dense_path, m, n), &pf) < F32_TOL);
    }

    #[test]
    fn svd_with_full_rank_is_lossless() {
        let (m, n) = (40, 30);
        let mut rng = Rng(6);
        let ads = three(&mut rng, m, n);
        let ts = terms(&ads, &WEIGHTS);
        let reference = dense(m, n, &ts);
        for r in [9, 10, 100] {
            let f = svd(m, n, &ts, r).unwrap();
            assert_eq!(f.rank, 9);
            assert_eq!((f.rel_error, f.energy), (0.0, 1.0));
            assert!(rel_diff(&product(&f, m, n), &reference) < F32_TOL);
        }
    }

    /// PEFT's linear combination written out on dense matrices, as a check
    /// on the factored version: A = sum sign(ws) sqrt(|ws|) A_i,
    /// B = sum sqrt(|ws|) B_i, delta = B A (scale 1).
    fn peft_linear_dense(m: usize, n: usize, ts: &[Term]) -> Vec<f64> {
        let r = ts[0].rank;
        let mut a = vec![0.0f64; r * n];
        let mut b = vec![0.0f64; m * r];
        for t in ts {
            let ws = t.weight * t.scale;
            let c = ws.abs().sqrt();
            for (i, x) in t.a.iter().enumerate() {
                a[i] += c * ws.signum() * f64::from(*x);
            }
            for (i, x) in t.b.iter().enumerate() {
                b[i] += c * f64::from(*x);
            }
        }
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for p in 0..r {
                for j in 0..n {
                    out[i * n + j] += b[i * r + p] * a[p * n + j];
                }
            }
        }
        out
    }

    #[test]
    fn linear_matches_peft_formula() {
        let (m, n) = (12, 9);
        let mut rng = Rng(7);
        let ads = vec![
            adapter(&mut rng, m, n, 4, 8.0),
            adapter(&mut rng, m, n, 4, 3.0),
            adapter(&mut rng, m, n, 4, 16.0),
        ];
        let ts = terms(&ads, &[0.5, 0.2, 0.3]);
        let f = linear(m, n, &ts).unwrap();
        assert_eq!(f.rank, 4);
        assert_eq!(f.energy, 1.0);
        let expected = peft_linear_dense(m, n, &ts);
        assert!(rel_diff(&product(&f, m, n), &expected) < F32_TOL);
        // rel_error is the distance to the exact sum, and it is not small:
        // the cross terms are what separates linear from exact.
        let exact_sum = dense(m, n, &ts);
        let direct = rel_diff(&expected, &exact_sum);
        assert!(direct > 0.1, "{direct}");
        assert!(
            (f.rel_error - direct).abs() < F32_TOL,
            "{} vs {direct}",
            f.rel_error
        );
    }

    #[test]
    fn linear_rejects_unequal_ranks() {
        let mut rng = Rng(8);
        let ads = vec![
            adapter(&mut rng, 5, 4, 2, 8.0),
            adapter(&mut rng, 5, 4, 3, 8.0),
        ];
        let err = linear(5, 4, &terms(&ads, &[0.5, 0.5])).unwrap_err();
        assert!(err.contains("rank 2 and rank 3"), "{err}");
    }

    #[test]
    fn linear_negative_weight_flips_the_term_like_peft() {
        let (m, n) = (7, 5);
        let mut rng = Rng(9);
        let ads = vec![
            adapter(&mut rng, m, n, 2, 8.0),
            adapter(&mut rng, m, n, 2, 3.0),
        ];
        let ts = terms(&ads, &[0.5, -0.75]);
        let f = linear(m, n, &ts).unwrap();
        assert!(rel_diff(&product(&f, m, n), &peft_linear_dense(m, n, &ts)) < F32_TOL);
        // One adapter alone with a negative weight is exactly its negated delta.
        let one = terms(&ads[1..], &[-0.75]);
        let f = linear(m, n, &one).unwrap();
        assert!(rel_diff(&product(&f, m, n), &dense(m, n, &one)) < F32_TOL);
        assert!(f.rel_error < F32_TOL, "{}", f.rel_error);
    }

    #[test]
    fn negative_weights_cancel_exactly() {
        // The same adapter added and subtracted: the exact delta is zero.
        let (m, n) = (30, 20);
        let mut rng = Rng(10);
        let ads = vec![adapter(&mut rng, m, n, 3, 7.0)];
        let t = terms(&ads, &[0.8])[0];
        let ts = [t, Term { weight: -0.8, ..t }];
        let e = exact(m, n, &ts);
        assert!(product(&e, m, n).iter().all(|&x| x.abs() < 1e-12));
        for r in [1, 3, 6] {
            let f = svd(m, n, &ts, r).unwrap();
            assert!(product(&f, m, n).iter().all(|&x| x.abs() < 1e-12));
            // Zero delta: nothing to lose.
            assert!(
                f.rel_error < F64_TOL && (f.energy - 1.0).abs() < F64_TOL,
                "{f:?}"
            );
        }
        // A negative weight with no cancellation: svd matches the optimum.
        let ads = three(&mut rng, m, n);
        check_svd_against_dense(m, n, &terms(&ads, &[-0.5, -1.0, 0.25]));
    }

    #[test]
    fn zero_adapter() {
        // PEFT initialises B to zero: a freshly created adapter is a zero
        // delta.
        let (m, n) = (16, 12);
        let mut rng = Rng(11);
        let mut ads = vec![
            adapter(&mut rng, m, n, 4, 8.0),
            adapter(&mut rng, m, n, 4, 8.0),
        ];
        ads.iter_mut().for_each(|ad| ad.b.fill(0.0));
        let ts = terms(&ads, &[0.5, 0.5]);
        let e = exact(m, n, &ts);
        assert!(product(&e, m, n).iter().all(|&x| x == 0.0));
        let s = svd(m, n, &ts, 4).unwrap();
        assert_eq!(s.rank, 4);
        assert!(s.b.iter().chain(&s.a).all(|&x| x == 0.0));
        assert_eq!((s.rel_error, s.energy), (0.0, 1.0));
        let l = linear(m, n, &ts).unwrap();
        assert!(product(&l, m, n).iter().all(|&x| x == 0.0));
        assert_eq!(l.rel_error, 0.0);
        // One zero adapter next to a real one changes nothing.
        let real = adapter(&mut rng, m, n, 4, 8.0);
        let ts = [ts[0], terms(std::slice::from_ref(&real), &[0.5])[0]];
        let reference = dense(m, n, &ts);
        let s = svd(m, n, &ts, 4).unwrap();
        assert!(s.rel_error < F64_TOL);
        assert!(rel_diff(&product(&s, m, n), &reference) < F32_TOL);
    }

    #[test]
    fn no_terms() {
        assert_eq!(exact(4, 3, &[]).rank, 0);
        assert_eq!(svd(4, 3, &[], 2).unwrap().rank, 0);
        assert_eq!(linear(4, 3, &[]).unwrap().rank, 0);
    }

    #[test]
    fn svd_rejects_non_finite_input() {
        let mut rng = Rng(12);
        let mut ads = vec![adapter(&mut rng, 8, 6, 2, 8.0)];
        ads[0].a[3] = f32::NAN;
        let err = svd(8, 6, &terms(&ads, &[1.0]), 2).unwrap_err();
        assert!(err.contains("term 0: A"), "{err}");
    }

    /// Every position of a bad value is found: in the first block, after
    /// it, in the last partial block, and alone.
    #[test]
    fn all_finite_finds_a_bad_value_anywhere() {
        for len in [1, 7, 1024, 1025, 3000] {
            let clean = vec![1.5f32; len];
            assert!(all_finite(&clean));
            for at in [0, len / 2, len - 1] {
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    let mut x = clean.clone();
                    x[at] = bad;
                    assert!(!all_finite(&x), "{bad} at {at} of {len}");
                }
            }
            let mut big = clean.clone();
            big[len - 1] = f32::MAX;
            assert!(all_finite(&big));
        }
        assert!(all_finite(&[]));
    }

    /// The eight running sums give the plain sum's value, whole blocks or
    /// not.
    #[test]
    fn sum_of_squares_matches_the_plain_sum() {
        let mut rng = Rng(31);
        for len in [0, 1, 7, 8, 9, 1000, 1003] {
            let x = rng.symmetric_vec(len);
            let plain: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
            let fast = subspace::sum_of_squares(&x);
            assert!(
                (fast - plain).abs() <= 1e-12 * plain,
                "{len}: {fast} vs {plain}"
            );
        }
        assert_eq!(subspace::sum_of_squares(&[3.0, 4.0]), 25.0);
    }

    #[test]
    fn frob_norm_factored_matches_dense() {
        let (m, k, n) = (11, 5, 7);
        let mut rng = Rng(13);
        let b = rng.symmetric_vec(m * k);
        let a = rng.symmetric_vec(k * n);
        let t = Term {
            weight: 1.0,
            scale: 1.0,
            rank: k,
            a: &a,
            b: &b,
        };
        let expected = norm(&dense(m, n, &[t]));
        assert!((frob_norm_factored(&b, &a, m, k, n) - expected).abs() / expected < F64_TOL);
    }

    /// Rank-1 terms on a 1 x n module with b = [1] and scale 1: the delta
    /// is the row `a` itself, so pruning and election can be worked out by
    /// hand.
    fn row_terms<'a>(rows: &'a [Vec<f32>], weights: &[f64], one: &'a [f32]) -> Vec<Term<'a>> {
        rows.iter()
            .zip(weights)
            .map(|(a, &weight)| Term {
                weight,
                scale: 1.0,
                rank: 1,
                a,
                b: one,
            })
            .collect()
    }

    fn rows() -> Vec<Vec<f32>> {
        vec![
            vec![3.0, -1.0, 2.0, 0.5],
            vec![-2.0, -4.0, 1.0, 0.25],
            vec![1.0, 2.0, -5.0, 0.125],
        ]
    }

    const TIES: TaskMerge = TaskMerge {
        prune: Prune::Magnitude,
        density: 0.5,
        elect: Some(MajoritySign::Total),
    };

    #[test]
    fn ties_matches_a_hand_computed_merge() {
        // density 0.5 keeps 2 of 4 entries: [3, 0, 2, 0], [-2, -4, 0, 0],
        // [0, 2, -5, 0]. Sum [1, -2, -3, 0] elects [+, -, -, +]; each
        // entry is the mean of the agreeing weighted entries.
        let rows = rows();
        let one = [1.0f32];
        let got = task_merge_dense(1, 4, &row_terms(&rows, &[1.0; 3], &one), &TIES, &[]).unwrap();
        assert_eq!(got, vec![3.0, -4.0, -5.0, 0.0]);
        // The sign is elected before the weights: weight 2 on the first
        // adapter doubles its entries, it does not outvote.
        let got =
            task_merge_dense(1, 4, &row_terms(&rows, &[2.0, 1.0, 1.0], &one), &TIES, &[]).unwrap();
        assert_eq!(got, vec![6.0, -4.0, -5.0, 0.0]);
        // frequency: signs [+,-,0], [0,-,+], [+,0,-], [0,0,0] sum to 0 each
        // way, and an even vote is positive.
        let freq = TaskMerge {
            elect: Some(MajoritySign::Frequency),
            ..TIES
        };
        let got = task_merge_dense(1, 4, &row_terms(&rows, &[1.0; 3], &one), &freq, &[]).unwrap();
        assert_eq!(got, vec![3.0, 2.0, 2.0, 0.0]);
        // Two positive entries that agree are averaged.
        let agree = vec![vec![4.0f32, 0.0], vec![2.0, 0.0]];
        let full = TaskMerge {
            density: 1.0,
            ..TIES
        };
        let got =
            task_merge_dense(1, 2, &row_terms(&agree, &[1.0, 0.5], &one), &full, &[]).unwrap();
        assert_eq!(got, vec![2.5, 0.0]);
    }

    #[test]
    fn magnitude_prune_is_the_weighted_sum_of_pruned_deltas() {
        let rows = rows();
        let one = [1.0f32];
        let how = TaskMerge {
            elect: None,
            ..TIES
        };
        let got =
            task_merge_dense(1, 4, &row_terms(&rows, &[1.0, 0.5, 2.0], &one), &how, &[]).unwrap();
        assert_eq!(got, vec![3.0 - 1.0, -2.0 + 4.0, 2.0 - 10.0, 0.0]);
        // Equal magnitudes at the threshold: the earlier entries are kept.
        let tied = vec![vec![1.0f32, -1.0, 1.0, 2.0]];
        let got = task_merge_dense(1, 4, &row_terms(&tied, &[1.0], &one), &how, &[]).unwrap();
        assert_eq!(got, vec![1.0, 0.0, 0.0, 2.0]);
        // floor(0.2 * 4) = 0 entries kept.
        let sparse = TaskMerge {
            density: 0.2,
            ..how
        };
        let got = task_merge_dense(1, 4, &row_terms(&tied, &[1.0], &one), &sparse, &[]).unwrap();
        assert_eq!(got, vec![0.0; 4]);
    }

    #[test]
    fn density_one_is_the_weighted_sum() {
        let (m, n) = (9, 7);
        let mut rng = Rng(20);
        let ads = three(&mut rng, m, n);
        let ts = terms(&ads, &WEIGHTS);
        let reference = dense(m, n, &ts);
        for prune in [Prune::Magnitude, Prune::Random] {
            let how = TaskMerge {
                prune,
                density: 1.0,
                elect: None,
            };
            let got = task_merge_dense(m, n, &ts, &how, &[1, 2, 3]).unwrap();
            assert!(rel_diff(&got, &reference) < F64_TOL);
        }
    }

    #[test]
    fn dare_keeps_about_density_rescaled_and_is_reproducible() {
        let (m, n) = (120, 100);
        let mut rng = Rng(21);
        let ads = vec![adapter(&mut rng, m, n, 3, 6.0)];
        let ts = terms(&ads, &[1.0]);
        let full = dense(m, n, &ts);
        let density = 0.3;
        let how = TaskMerge {
            prune: Prune::Random,
            density,
            elect: None,
        };
        let got = task_merge_dense(m, n, &ts, &how, &[42]).unwrap();
        let mut kept = 0;
        for (g, f) in got.iter().zip(&full) {
            if *g != 0.0 {
                kept += 1;
                assert!((g - f / density).abs() <= 1e-12 * f.abs().max(1.0));
            }
        }
        let frac = kept as f64 / (m * n) as f64;
        let sigma = (density * (1.0 - density) / (m * n) as f64).sqrt();
        assert!((frac - density).abs() < 4.0 * sigma, "{frac}");
        assert_eq!(task_merge_dense(m, n, &ts, &how, &[42]).unwrap(), got);
        assert_ne!(task_merge_dense(m, n, &ts, &how, &[43]).unwrap(), got);
    }

    #[test]
    fn task_merge_truncates_optimally() {
        let (m, n) = (24, 18);
        let mut rng = Rng(22);
        let ads = three(&mut rng, m, n);
        let ts = terms(&ads, &WEIGHTS);
        let reference = task_merge_dense(m, n, &ts, &TIES, &[]).unwrap();
        let sv = dense_singular_values(&reference, m, n);
        for r in [1, 5, 18, 40] {
            let f = task_merge(m, n, &ts, &TIES, &[], r).unwrap();
            assert_eq!(f.rank, r.min(18));
            let optimal = optimal_rel_error(&sv, r);
            assert!((f.rel_error - optimal).abs() < F64_TOL, "rank {r}");
            assert!((f.energy - (1.0 - optimal * optimal)).abs() < F64_TOL);
            let achieved = rel_diff(&product(&f, m, n), &reference);
            assert!((achieved - optimal).abs() < F32_TOL, "rank {r}: {achieved}");
        }
        // Full rank: lossless, and recorded as exactly 0 (not -0).
        let f = task_merge(m, n, &ts, &TIES, &[], 18).unwrap();
        assert!(f.rel_error == 0.0 && f.rel_error.is_sign_positive());
    }

    #[test]
    fn task_merge_refuses_bad_density_and_non_finite_input() {
        let rows = rows();
        let one = [1.0f32];
        for density in [0.0, -0.5, 1.5, f64::NAN] {
            let how = TaskMerge { density, ..TIES };
            let e =
                task_merge_dense(1, 4, &row_terms(&rows, &[1.0; 3], &one), &how, &[]).unwrap_err();
            assert!(e.contains("density"), "{e}");
        }
        let bad = vec![vec![1.0f32, f32::INFINITY, 0.0, 0.0]];
        let e = task_merge(1, 4, &row_terms(&bad, &[1.0], &one), &TIES, &[], 1).unwrap_err();
        assert!(e.contains("term 0: A"), "{e}");
        assert_eq!(task_merge(4, 3, &[], &TIES, &[], 2).unwrap().rank, 0);
    }

    #[test]
    fn task_merge_bytes_counts_the_dense_work() {
        let (m, n) = (4096, 4096);
        let len = (m * n) as u64;
        let ties = task_merge_bytes(m, n, &TIES, 16);
        // At least the delta, the pruning scratch and four running sums.
        assert!(ties >= len * 40, "{ties}");
        let dare_linear = TaskMerge {
            prune: Prune::Random,
            density: 0.5,
            elect: None,
        };
        let lin = task_merge_bytes(m, n, &dare_linear, 16);
        // The SVD of the m x n result (its input, U, V and faer's
        // workspace) needs more than the delta and one sum.
        assert!(lin >= len * 40 && lin <= ties, "{lin} vs {ties}");
    }

    /// `cargo test --release --no-default-features --lib task_merge_timing -- --ignored --nocapture`:
    /// time and peak memory of one large module, against the estimate.
    #[test]
    #[ignore]
    fn task_merge_timing() {
        let (m, n) = (4096, 4096);
        let mut rng = Rng(23);
        let ads: Vec<Adapter> = (0..4).map(|_| adapter(&mut rng, m, n, 16, 32.0)).collect();
        let ts = terms(&ads, &[1.0; 4]);
        let how = TaskMerge {
            density: 0.2,
            ..TIES
        };
        let start = std::time::Instant::now();
        let f = task_merge(m, n, &ts, &how, &[], 16).unwrap();
        let elapsed = start.elapsed();
        let peak = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .unwrap_or(0)
            * 1024;
        crate::ui::note(&format!(
            "ties {m}x{n}, 4 adapters -> rank 16: {elapsed:?} (rel_error {:.4}); peak RSS {} MB, estimate {} MB",
            f.rel_error,
            peak >> 20,
            task_merge_bytes(m, n, &how, 16) >> 20
        ));
    }

    /// `cargo test --release --no-default-features --lib svd_timing -- --ignored --nocapture`
    /// (an unoptimised build is ~15x slower: faer's generics are instantiated here).
    #[test]
    #[ignore]
    fn svd_timing() {
        let (m, n) = (4096, 4096);
        let mut rng = Rng(14);
        let ads: Vec<Adapter> = (0..4).map(|_| adapter(&mut rng, m, n, 16, 32.0)).collect();
        let ts = terms(&ads, &[0.25; 4]);
        let start = std::time::Instant::now();
        let f = svd(m, n, &ts, 16).unwrap();
        let elapsed = start.elapsed();
        crate::ui::note(&format!(
            "svd {m}x{n}, k=64 -> rank 16: {elapsed:?} (rel_error {:.4})",
            f.rel_error
        ));
        assert!(elapsed.as_secs_f64() < 1.0);
    }
}
