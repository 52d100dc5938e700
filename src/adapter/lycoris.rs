//! LyCORIS LoHa and LoKr modules in kohya-style files, read as exact LoRA
//! factors.
//!
//! Both are low-rank products in disguise, so each becomes one ordinary
//! `delta = scale * B @ A` at load, and every method and output layout then
//! treats it like any LoRA module:
//!
//! - LoHa (`hada_w1_a` `[out, r1]`, `hada_w1_b` `[r1, in]`, `hada_w2_a`
//!   `[out, r2]`, `hada_w2_b` `[r2, in]`): `delta = scale * (W1a W1b) ⊙
//!   (W2a W2b)`, an elementwise product. Entry `(i, j)` is
//!   `sum_{s,t} W1a[i,s] W2a[i,t] W1b[s,j] W2b[t,j]`, so the delta is the
//!   rank `r1 * r2` LoRA with `B[i, s*r2 + t] = W1a[i,s] W2a[i,t]` (the rows
//!   of B are Kronecker products of rows: the face-splitting product) and
//!   `A[s*r2 + t, j] = W1b[s,j] W2b[t,j]` (columns of A are Kronecker
//!   products of columns: the Khatri-Rao product). `scale = alpha / r1`,
//!   with a missing or zero alpha meaning `alpha = r1`, as LyCORIS does.
//! - LoKr (`lokr_w1` `[a, c]` or `lokr_w1_a` `[a, p]` with `lokr_w1_b`
//!   `[p, c]`; `lokr_w2` `[b, d, *k]` or `lokr_w2_a` `[b, q]` with
//!   `lokr_w2_b` `[q, d*K]` or `[q, d, *k]`): `delta = scale * kron(W1, W2)`,
//!   `W2` flattened to `[b, d*K]`, which is the convolution's flattened
//!   `[a*b, c*d*K]` delta. With `W1 = B1 A1` and `W2 = B2 A2`,
//!   `kron(W1, W2) = kron(B1, B2) kron(A1, A2)`: a LoRA of rank `p * q`. A
//!   full half is factored exactly as `W = I W` or `W = W I`, whichever
//!   identity is smaller. LyCORIS' scale: 1 when both halves are full, else
//!   `alpha / rank` with the rank of the factored half (a missing or zero
//!   alpha meaning scale 1).
//!
//! A LoRA form whose rank would exceed `min(out, in)` (a LoHa of rank
//! `r1 * r2` on a small layer) is replaced by an equally exact one of rank
//! `min(out, in)`: the dense delta times an identity. So the factors never
//! hold much more than the dense delta would, and [`MAX_FACTOR_VALUES`]
//! refuses anything larger still.
//!
//! The factors are computed once, in f32 (the product of two f16 or bf16
//! values is exact in f32; of two f32 values, one rounding), and owned by
//! the module rather than mapped from the file: a module of rank `R` as a
//! LoRA holds `R * (out + in)` values in memory from load to the end of the
//! run, which for a LoHa (`R = r1 * r2`) is up to `r1 * r2 / (r1 + r2)`
//! times what the file holds for it.
//!
//! LyCORIS stores a convolution's LoHa factors (and a LoKr's factored
//! `lokr_w2_b`) flattened to `[rank, in * kh * kw]`, so nothing in the file
//! says the kernel. It comes from the tensors where they show it (a LoKr
//! `lokr_w2` `[b, d, kh, kw]`), else from the layer's name for the Stable
//! Diffusion UNet convolutions whose kernel is fixed
//! ([`sdnames::unet_conv_kernel`]); any other module is read as linear.

use std::collections::BTreeMap;

use super::{sdnames, ModuleKind};
use crate::tensors::TensorRef;

/// The LoHa and LoKr tensors read, by the key suffix after the module name.
pub const PARTS: &[&str] = &[
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
];

/// The most values (B and A together) the LoRA form of one module may hold:
/// 2^28 f32, 1 GiB. The largest linear layers of today's diffusion models
/// (3072 x 12288) need at most 1/7 of it, even as a dense delta.
pub const MAX_FACTOR_VALUES: usize = 1 << 28;

/// The module name and part of a LoHa/LoKr key (`<stem>.hada_w1_a`).
pub fn split_key(key: &str) -> Option<(&str, &'static str)> {
    let (stem, last) = key.rsplit_once('.')?;
    PARTS.iter().find(|p| **p == last).map(|p| (stem, *p))
}

/// A LoHa or LoKr module as a LoRA: `delta = scale * b @ a`.
#[derive(Debug)]
pub(crate) struct Lora {
    pub kind: ModuleKind,
    pub rank: usize,
    /// The alpha of the equivalent LoRA: `scale * rank`.
    pub alpha: f64,
    pub scale: f64,
    pub fan_in: usize,
    pub fan_out: usize,
    pub a: TensorRef,
    pub b: TensorRef,
}

/// A row-major matrix of f32.
#[derive(Debug, Clone, PartialEq)]
struct Mat {
    rows: usize,
    cols: usize,
    v: Vec<f32>,
}

impl Mat {
    /// A tensor as a matrix: the first dimension, then all the others.
    fn of(t: &TensorRef) -> Mat {
        let rows = t.shape.first().copied().unwrap_or(1);
        Mat {
            rows,
            cols: t.shape.iter().skip(1).product(),
            v: t.to_f32(),
        }
    }

    fn identity(n: usize) -> Mat {
        let mut v = vec![0f32; n * n];
        for i in 0..n {
            v[i * n + i] = 1.0;
        }
        Mat {
            rows: n,
            cols: n,
            v,
        }
    }

    fn at(&self, i: usize, j: usize) -> f32 {
        self.v[i * self.cols + j]
    }

    /// Row `i` of the result is `kron(x[i, :], y[i, :])`.
    fn face_split(x: &Mat, y: &Mat) -> Mat {
        debug_assert_eq!(x.rows, y.rows);
        let cols = x.cols * y.cols;
        let mut v = Vec::with_capacity(x.rows * cols);
        for i in 0..x.rows {
            let yr = &y.v[i * y.cols..(i + 1) * y.cols];
            for s in 0..x.cols {
                let xs = x.at(i, s);
                v.extend(yr.iter().map(|&t| xs * t));
            }
        }
        Mat {
            rows: x.rows,
            cols,
            v,
        }
    }

    /// Column `j` of the result is `kron(x[:, j], y[:, j])`.
    fn khatri_rao(x: &Mat, y: &Mat) -> Mat {
        debug_assert_eq!(x.cols, y.cols);
        let n = x.cols;
        let mut v = Vec::with_capacity(x.rows * y.rows * n);
        for s in 0..x.rows {
            let xs = &x.v[s * n..(s + 1) * n];
            for t in 0..y.rows {
                let yt = &y.v[t * n..(t + 1) * n];
                v.extend(xs.iter().zip(yt).map(|(&p, &q)| p * q));
            }
        }
        Mat {
            rows: x.rows * y.rows,
            cols: n,
            v,
        }
    }

    /// The Kronecker product: entry `(i*y.rows + k, j*y.cols + l)` is
    /// `x[i,j] * y[k,l]`.
    fn kron(x: &Mat, y: &Mat) -> Mat {
        let cols = x.cols * y.cols;
        let mut v = Vec::with_capacity(x.rows * y.rows * cols);
        for i in 0..x.rows {
            for k in 0..y.rows {
                let yk = &y.v[k * y.cols..(k + 1) * y.cols];
                for j in 0..x.cols {
                    let xij = x.at(i, j);
                    v.extend(yk.iter().map(|&t| xij * t));
                }
            }
        }
        Mat {
            rows: x.rows * y.rows,
            cols,
            v,
        }
    }

    /// `self @ other` in f64.
    fn product_f64(&self, other: &Mat) -> Vec<f64> {
        debug_assert_eq!(self.cols, other.rows);
        let (m, k, n) = (self.rows, self.cols, other.cols);
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            let row = &mut out[i * n..(i + 1) * n];
            for s in 0..k {
                let x = f64::from(self.at(i, s));
                if x == 0.0 {
                    continue;
                }
                for (o, &y) in row.iter_mut().zip(&other.v[s * n..(s + 1) * n]) {
                    *o += x * f64::from(y);
                }
            }
        }
        out
    }
}

/// One half of a LoKr: a full matrix, or `b @ a`.
enum Half {
    Full(Mat),
    Low { b: Mat, a: Mat },
}

impl Half {
    fn rows(&self) -> usize {
        match self {
            Half::Full(w) => w.rows,
            Half::Low { b, .. } => b.rows,
        }
    }

    fn cols(&self) -> usize {
        match self {
            Half::Full(w) => w.cols,
            Half::Low { a, .. } => a.cols,
        }
    }

    /// The rank of the factors [`Half::factors`] gives.
    fn rank(&self) -> usize {
        match self {
            Half::Full(w) => w.rows.min(w.cols),
            Half::Low { a, .. } => a.rows,
        }
    }

    /// `(B, A)` with `B @ A` exactly this half: a full matrix gets the
    /// smaller identity.
    fn factors(self) -> (Mat, Mat) {
        match self {
            Half::Full(w) if w.rows <= w.cols => (Mat::identity(w.rows), w),
            Half::Full(w) => {
                let i = Mat::identity(w.cols);
                (w, i)
            }
            Half::Low { b, a } => (b, a),
        }
    }

    fn dense(&self) -> Vec<f64> {
        match self {
            Half::Full(w) => w.v.iter().map(|&x| f64::from(x)).collect(),
            Half::Low { b, a } => b.product_f64(a),
        }
    }
}

/// The shape of one tensor, for messages.
fn shape_of(t: &TensorRef) -> String {
    format!("{} {:?}", t.name, t.shape)
}

/// Build the LoRA form of the LoHa or LoKr module `stem` (whose alignment
/// key is `key`) from its `parts` and its `.alpha` (`None` when absent).
pub(crate) fn build(
    key: &str,
    stem: &str,
    parts: &BTreeMap<&'static str, &TensorRef>,
    alpha: Option<f64>,
) -> Result<Lora, String> {
    let loha = parts.keys().any(|p| p.starts_with("hada_"));
    let lokr = parts.keys().any(|p| p.starts_with("lokr_"));
    match (loha, lokr) {
        (true, true) => Err(format!(
            "module {stem} mixes LyCORIS LoHa (hada_*) and LoKr (lokr_*) tensors"
        )),
        (true, false) => build_loha(key, stem, parts, alpha),
        _ => build_lokr(key, stem, parts, alpha),
    }
}

/// A part that must be present and a matrix.
fn matrix<'t>(
    stem: &str,
    parts: &BTreeMap<&'static str, &'t TensorRef>,
    what: &str,
    part: &str,
) -> Result<&'t TensorRef, String> {
    let t = parts.get(part).ok_or_else(|| {
        format!("module {stem}: {what} needs {stem}.{part}, which the file lacks")
    })?;
    if t.shape.len() != 2 {
        return Err(format!(
            "module {stem}: {what} tensor {} should be a matrix",
            shape_of(t)
        ));
    }
    Ok(t)
}

/// The scale LyCORIS applies: `alpha / rank`, a missing or zero alpha
/// meaning 1.
fn scale_of(alpha: Option<f64>, rank: usize) -> f64 {
    match alpha {
        None | Some(0.0) => 1.0,
        Some(a) => a / rank as f64,
    }
}

/// The kind of a module whose flattened fan-in is `fan_in`: a convolution
/// when its name says so (checking that the kernel divides `width`, the
/// flattened width of the factor that carries it), else linear.
fn kind_by_name(key: &str, stem: &str, fan_in: usize, width: usize) -> Result<ModuleKind, String> {
    let Some(k) = sdnames::unet_conv_kernel(key) else {
        return Ok(ModuleKind::Linear);
    };
    let size: usize = k.iter().product();
    if !width.is_multiple_of(size) {
        return Err(format!(
            "module {stem} is a {}x{} convolution of the Stable Diffusion UNet, but its \
             flattened LyCORIS factors are {width} wide, not a multiple of {size}",
            k[0], k[1]
        ));
    }
    Ok(ModuleKind::Conv {
        kernel: vec![fan_in / size, k[0], k[1]],
    })
}

fn build_loha(
    key: &str,
    stem: &str,
    parts: &BTreeMap<&'static str, &TensorRef>,
    alpha: Option<f64>,
) -> Result<Lora, String> {
    const WHAT: &str = "LyCORIS LoHa";
    let w1a = matrix(stem, parts, WHAT, "hada_w1_a")?;
    let w1b = matrix(stem, parts, WHAT, "hada_w1_b")?;
    let w2a = matrix(stem, parts, WHAT, "hada_w2_a")?;
    let w2b = matrix(stem, parts, WHAT, "hada_w2_b")?;
    let (out, r1, r1b, fan_in) = (w1a.shape[0], w1a.shape[1], w1b.shape[0], w1b.shape[1]);
    let (r2, r2b) = (w2a.shape[1], w2b.shape[0]);
    let all = || {
        [w1a, w1b, w2a, w2b]
            .iter()
            .map(|t| shape_of(t))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if r1 != r1b || r2 != r2b || w2a.shape[0] != out || w2b.shape[1] != fan_in {
        return Err(format!(
            "module {stem}: {WHAT} factor shapes do not fit together: {}",
            all()
        ));
    }
    if r1 == 0 || r2 == 0 || out == 0 || fan_in == 0 {
        return Err(format!(
            "module {stem}: {WHAT} has an empty factor: {}",
            all()
        ));
    }
    let kind = kind_by_name(key, stem, fan_in, fan_in)?;
    let scale = scale_of(alpha, r1);
    let rank = r1
        .checked_mul(r2)
        .ok_or_else(|| format!("module {stem}: {WHAT} rank too large: {}", all()))?;
    let (w1a, w1b, w2a, w2b) = (Mat::of(w1a), Mat::of(w1b), Mat::of(w2a), Mat::of(w2b));
    let (b, a) = if factored(stem, WHAT, out, fan_in, rank)? {
        (Mat::face_split(&w1a, &w2a), Mat::khatri_rao(&w1b, &w2b))
    } else {
        let mut d = w1a.product_f64(&w1b);
        let h2 = w2a.product_f64(&w2b);
        d.iter_mut().zip(&h2).for_each(|(x, y)| *x *= y);
        drop(h2);
        dense_form(out, fan_in, d)
    };
    finish(stem, WHAT, kind, scale, b, a)
}

fn build_lokr(
    key: &str,
    stem: &str,
    parts: &BTreeMap<&'static str, &TensorRef>,
    alpha: Option<f64>,
) -> Result<Lora, String> {
    const WHAT: &str = "LyCORIS LoKr";
    let half = |n: u8| -> Result<(Half, Vec<usize>), String> {
        let full = parts.get(format!("lokr_w{n}").as_str()).copied();
        let a = parts.get(format!("lokr_w{n}_a").as_str()).copied();
        let b = parts.get(format!("lokr_w{n}_b").as_str()).copied();
        match (full, a, b) {
            (Some(w), None, None) => {
                // w1 is a matrix; w2 may keep a conv kernel's axes.
                let max_dims = if n == 1 { 2 } else { 5 };
                if !(2..=max_dims).contains(&w.shape.len()) {
                    return Err(format!(
                        "module {stem}: {WHAT} tensor {} has an unexpected shape",
                        shape_of(w)
                    ));
                }
                Ok((Half::Full(Mat::of(w)), w.shape[2..].to_vec()))
            }
            (None, Some(_), Some(_)) => {
                let up = matrix(stem, parts, WHAT, &format!("lokr_w{n}_a"))?;
                let down = parts[format!("lokr_w{n}_b").as_str()];
                let max_dims = if n == 1 { 2 } else { 5 };
                if !(2..=max_dims).contains(&down.shape.len()) || down.shape[0] != up.shape[1] {
                    return Err(format!(
                        "module {stem}: {WHAT} factors {} and {} do not fit together",
                        shape_of(up),
                        shape_of(down)
                    ));
                }
                Ok((
                    Half::Low {
                        b: Mat::of(up),
                        a: Mat::of(down),
                    },
                    down.shape[2..].to_vec(),
                ))
            }
            (None, None, None) => Err(format!(
                "module {stem}: {WHAT} needs {stem}.lokr_w{n} or {stem}.lokr_w{n}_a with \
                 {stem}.lokr_w{n}_b, which the file lacks"
            )),
            (Some(_), _, _) => Err(format!(
                "module {stem}: {WHAT} has both {stem}.lokr_w{n} and its factors \
                 lokr_w{n}_a/lokr_w{n}_b"
            )),
            (None, Some(_), None) | (None, None, Some(_)) => Err(format!(
                "module {stem}: {WHAT} needs both {stem}.lokr_w{n}_a and {stem}.lokr_w{n}_b"
            )),
        }
    };
    let (w1, _) = half(1)?;
    let (w2, spatial) = half(2)?;
    let dims = [
        w1.rows(),
        w1.cols(),
        w2.rows(),
        w2.cols(),
        w1.rank(),
        w2.rank(),
    ];
    if dims.contains(&0) {
        return Err(format!("module {stem}: {WHAT} has an empty factor"));
    }
    let too_large = || format!("module {stem}: {WHAT} is too large");
    let out = w1.rows().checked_mul(w2.rows()).ok_or_else(too_large)?;
    let fan_in = w1.cols().checked_mul(w2.cols()).ok_or_else(too_large)?;
    let kind = if spatial.is_empty() {
        kind_by_name(key, stem, fan_in, w2.cols())?
    } else {
        let size: usize = spatial.iter().product();
        let mut kernel = vec![fan_in / size];
        kernel.extend(&spatial);
        ModuleKind::Conv { kernel }
    };
    // LyCORIS: scale 1 when both halves are full; else alpha over the rank
    // of the factored half (LyCORIS factors both with one rank).
    let scale = match (&w1, &w2) {
        (Half::Full(_), Half::Full(_)) => 1.0,
        (Half::Low { a: a1, .. }, Half::Low { a: a2, .. }) if a1.rows != a2.rows => {
            return Err(format!(
                "module {stem}: {WHAT} factors lokr_w1 with rank {} but lokr_w2 with rank {}; \
                 its scale alpha/rank is then ambiguous",
                a1.rows, a2.rows
            ))
        }
        (Half::Low { a, .. }, _) | (_, Half::Low { a, .. }) => scale_of(alpha, a.rows),
    };
    let rank = w1.rank().checked_mul(w2.rank()).ok_or_else(too_large)?;
    let (b, a) = if factored(stem, WHAT, out, fan_in, rank)? {
        let ((b1, a1), (b2, a2)) = (w1.factors(), w2.factors());
        (Mat::kron(&b1, &b2), Mat::kron(&a1, &a2))
    } else {
        let (d1, d2) = (w1.dense(), w2.dense());
        let (c1, c2, r2) = (w1.cols(), w2.cols(), w2.rows());
        let mut d = vec![0f64; out * fan_in];
        for (i, row) in d.chunks_exact_mut(fan_in).enumerate() {
            let (i1, i2) = (i / r2, i % r2);
            for (j, x) in row.iter_mut().enumerate() {
                *x = d1[i1 * c1 + j / c2] * d2[i2 * c2 + j % c2];
            }
        }
        dense_form(out, fan_in, d)
    };
    finish(stem, WHAT, kind, scale, b, a)
}

/// Whether the `out x fan_in` module keeps its rank-`rank` factors (`true`)
/// or becomes its dense delta times an identity (`false`, when the rank
/// exceeds `min(out, fan_in)`); either way within [`MAX_FACTOR_VALUES`].
fn factored(
    stem: &str,
    what: &str,
    out: usize,
    fan_in: usize,
    rank: usize,
) -> Result<bool, String> {
    let small = out.min(fan_in);
    let keep = rank <= small;
    let values = if keep {
        out.checked_add(fan_in).and_then(|n| n.checked_mul(rank))
    } else {
        out.checked_mul(fan_in)
            .and_then(|d| d.checked_add(small * small))
    };
    match values {
        Some(v) if v <= MAX_FACTOR_VALUES => Ok(keep),
        _ => Err(format!(
            "module {stem}: the {what} module ({out} x {fan_in}, rank {rank} as a LoRA) would              need more than {MAX_FACTOR_VALUES} values as LoRA factors"
        )),
    }
}

/// The exact LoRA form of a dense `out x fan_in` delta `d` (f64, rounded
/// once to f32): `I @ D` or `D @ I`, whichever identity is smaller.
fn dense_form(out: usize, fan_in: usize, d: Vec<f64>) -> (Mat, Mat) {
    let d = Mat {
        rows: out,
        cols: fan_in,
        v: d.into_iter().map(|x| x as f32).collect(),
    };
    if out <= fan_in {
        (Mat::identity(out), d)
    } else {
        (d, Mat::identity(fan_in))
    }
}

/// The module from its computed factors, refusing values that overflowed
/// f32 in the products.
fn finish(
    stem: &str,
    what: &str,
    kind: ModuleKind,
    scale: f64,
    b: Mat,
    a: Mat,
) -> Result<Lora, String> {
    debug_assert_eq!(b.cols, a.rows);
    if b.v.iter().chain(&a.v).any(|x| !x.is_finite()) {
        return Err(format!(
            "module {stem}: the {what} factors overflow f32 when multiplied out"
        ));
    }
    let rank = a.rows;
    Ok(Lora {
        kind,
        rank,
        alpha: scale * rank as f64,
        scale,
        fan_in: a.cols,
        fan_out: b.rows,
        a: TensorRef::owned(
            format!("{stem}.lora_down ({what})"),
            vec![a.rows, a.cols],
            a.v,
        ),
        b: TensorRef::owned(
            format!("{stem}.lora_up ({what})"),
            vec![b.rows, b.cols],
            b.v,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn t(name: &str, shape: &[usize], rng: &mut Rng) -> TensorRef {
        let n = shape.iter().product();
        TensorRef::owned(name.into(), shape.to_vec(), rng.symmetric_vec(n))
    }

    fn parts<'a>(ts: &'a [(&'static str, TensorRef)]) -> BTreeMap<&'static str, &'a TensorRef> {
        ts.iter().map(|(p, t)| (*p, t)).collect()
    }

    /// `scale * B @ A` of a built module, in f64.
    fn delta(l: &Lora) -> Vec<f64> {
        let b = Mat::of(&l.b);
        let a = Mat::of(&l.a);
        assert_eq!(
            (b.rows, b.cols, a.rows, a.cols),
            (l.fan_out, l.rank, l.rank, l.fan_in)
        );
        b.product_f64(&a).into_iter().map(|x| x * l.scale).collect()
    }

    fn dense(t: &TensorRef) -> Vec<f64> {
        t.to_f32().into_iter().map(f64::from).collect()
    }

    /// `x @ y` for row-major `m x k` and `k x n`.
    fn matmul(x: &[f64], y: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|s| x[i * k + s] * y[s * n + j]).sum();
            }
        }
        out
    }

    /// The Kronecker product, entry by entry from its definition.
    fn kron(x: &[f64], xr: usize, xc: usize, y: &[f64], yr: usize, yc: usize) -> Vec<f64> {
        let mut out = vec![0.0; xr * yr * xc * yc];
        for i in 0..xr * yr {
            for j in 0..xc * yc {
                out[i * xc * yc + j] = x[(i / yr) * xc + j / yc] * y[(i % yr) * yc + j % yc];
            }
        }
        out
    }

    fn assert_close(got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        let err: f64 = got.iter().zip(want).map(|(g, w)| (g - w).powi(2)).sum();
        let norm: f64 = want.iter().map(|w| w * w).sum();
        assert!(norm > 0.0);
        assert!(
            (err / norm).sqrt() < 1e-6,
            "relative error {}",
            (err / norm).sqrt()
        );
    }

    fn loha(out: usize, fan_in: usize, r1: usize, r2: usize) -> Vec<(&'static str, TensorRef)> {
        let mut rng = Rng(7);
        vec![
            ("hada_w1_a", t("m.hada_w1_a", &[out, r1], &mut rng)),
            ("hada_w1_b", t("m.hada_w1_b", &[r1, fan_in], &mut rng)),
            ("hada_w2_a", t("m.hada_w2_a", &[out, r2], &mut rng)),
            ("hada_w2_b", t("m.hada_w2_b", &[r2, fan_in], &mut rng)),
        ]
    }

    fn loha_dense(ts: &[(&'static str, TensorRef)], out: usize, fan_in: usize) -> Vec<f64> {
        let (r1, r2) = (ts[0].1.shape[1], ts[2].1.shape[1]);
        let w1 = matmul(&dense(&ts[0].1), &dense(&ts[1].1), out, r1, fan_in);
        let w2 = matmul(&dense(&ts[2].1), &dense(&ts[3].1), out, r2, fan_in);
        w1.iter().zip(&w2).map(|(x, y)| x * y).collect()
    }

    #[test]
    fn loha_is_the_face_splitting_and_khatri_rao_lora() {
        let (out, fan_in) = (9, 11);
        let ts = loha(out, fan_in, 2, 3);
        let l = build("lora_unet_x", "lora_unet_x", &parts(&ts), Some(4.0)).unwrap();
        assert_eq!((l.rank, l.fan_out, l.fan_in), (6, out, fan_in));
        assert_eq!(l.kind, ModuleKind::Linear);
        assert_eq!(l.scale, 2.0, "alpha / r1");
        assert_eq!(l.alpha, 12.0, "the equivalent LoRA's alpha: scale * rank");
        assert!(l.a.is_owned() && l.b.is_owned());
        let want: Vec<f64> = loha_dense(&ts, out, fan_in)
            .iter()
            .map(|x| x * 2.0)
            .collect();
        assert_close(&delta(&l), &want);
        // A missing or zero alpha means alpha = r1: scale 1.
        for alpha in [None, Some(0.0)] {
            let l = build("lora_unet_x", "lora_unet_x", &parts(&ts), alpha).unwrap();
            assert_eq!(l.scale, 1.0);
        }
    }

    #[test]
    fn loha_above_full_rank_becomes_dense_times_identity() {
        for (out, fan_in) in [(4, 5), (5, 4)] {
            let ts = loha(out, fan_in, 3, 2);
            let l = build("lora_unet_x", "lora_unet_x", &parts(&ts), Some(3.0)).unwrap();
            assert_eq!(l.rank, 4, "min(out, in), not 3 * 2");
            assert_close(&delta(&l), &loha_dense(&ts, out, fan_in));
        }
    }

    #[test]
    fn loha_conv_kernel_comes_from_the_unet_name() {
        let ts = loha(4, 6 * 9, 2, 2);
        let key = "lora_unet_down_blocks_0_resnets_0_conv1";
        let l = build(key, key, &parts(&ts), None).unwrap();
        assert_eq!(
            l.kind,
            ModuleKind::Conv {
                kernel: vec![6, 3, 3]
            }
        );
        assert_eq!(l.fan_in, 54);
        let ts = loha(4, 10, 2, 2);
        let e = build(key, key, &parts(&ts), None).unwrap_err();
        assert!(
            e.contains("3x3 convolution") && e.contains("not a multiple of 9"),
            "{e}"
        );
    }

    /// A LoKr test case: its name, parts, dense W1 and W2 (empty: from the
    /// parts) and scale.
    type Case = (
        &'static str,
        Vec<(&'static str, TensorRef)>,
        Vec<f64>,
        Vec<f64>,
        f64,
    );

    /// Every LoKr layout: full or factored halves, linear and conv.
    #[test]
    fn lokr_is_the_kronecker_lora() {
        let mut rng = Rng(11);
        let (a, c, b, d, p, q) = (3, 4, 5, 2, 2, 3);
        let w1 = t("m.lokr_w1", &[a, c], &mut rng);
        let w1a = t("m.lokr_w1_a", &[a, p], &mut rng);
        let w1b = t("m.lokr_w1_b", &[p, c], &mut rng);
        let w2 = t("m.lokr_w2", &[b, d], &mut rng);
        let w2a = t("m.lokr_w2_a", &[b, q], &mut rng);
        let w2b = t("m.lokr_w2_b", &[q, d], &mut rng);
        let w1d = matmul(&dense(&w1a), &dense(&w1b), a, p, c);
        let w2d = matmul(&dense(&w2a), &dense(&w2b), b, q, d);
        let cases: [Case; 4] = [
            (
                "full/full",
                vec![("lokr_w1", w1.clone()), ("lokr_w2", w2.clone())],
                dense(&w1),
                dense(&w2),
                1.0,
            ),
            (
                "full/factored",
                vec![
                    ("lokr_w1", w1.clone()),
                    ("lokr_w2_a", w2a.clone()),
                    ("lokr_w2_b", w2b.clone()),
                ],
                dense(&w1),
                w2d.clone(),
                6.0 / q as f64,
            ),
            (
                "factored/full",
                vec![
                    ("lokr_w1_a", w1a.clone()),
                    ("lokr_w1_b", w1b.clone()),
                    ("lokr_w2", w2.clone()),
                ],
                w1d.clone(),
                dense(&w2),
                6.0 / p as f64,
            ),
            (
                "factored/factored",
                vec![
                    ("lokr_w1_a", w1a.clone()),
                    ("lokr_w1_b", w1b.clone()),
                    ("lokr_w2_a", t("m.lokr_w2_a", &[b, p], &mut Rng(3))),
                    ("lokr_w2_b", t("m.lokr_w2_b", &[p, d], &mut Rng(4))),
                ],
                w1d.clone(),
                vec![],
                6.0 / p as f64,
            ),
        ];
        for (what, ts, d1, mut d2, scale) in cases {
            if d2.is_empty() {
                d2 = matmul(&dense(&ts[2].1), &dense(&ts[3].1), b, p, d);
            }
            let l = build("lora_unet_x", "lora_unet_x", &parts(&ts), Some(6.0)).unwrap();
            assert_eq!((l.fan_out, l.fan_in), (a * b, c * d), "{what}");
            assert_eq!(l.scale, scale, "{what}");
            let want: Vec<f64> = kron(&d1, a, c, &d2, b, d)
                .iter()
                .map(|x| x * scale)
                .collect();
            assert_close(&delta(&l), &want);
        }
        // The full halves' identities are the smaller side: rank 3 * 2.
        let ts = [("lokr_w1", w1.clone()), ("lokr_w2", w2.clone())];
        assert_eq!(
            build("lora_unet_x", "m", &parts(&ts), None).unwrap().rank,
            6
        );
        // LyCORIS factors both halves with one rank; two ranks make alpha/rank ambiguous.
        let ts = [
            ("lokr_w1_a", w1a.clone()),
            ("lokr_w1_b", w1b.clone()),
            ("lokr_w2_a", w2a.clone()),
            ("lokr_w2_b", w2b.clone()),
        ];
        let e = build("lora_unet_x", "m", &parts(&ts), Some(1.0)).unwrap_err();
        assert!(e.contains("ambiguous"), "{e}");
    }

    #[test]
    fn lokr_conv_kernels_from_shapes_or_name() {
        let mut rng = Rng(5);
        let (a, c, b, d) = (2, 3, 4, 5);
        // Full w2 with the kernel's axes: [b, d, 3, 3].
        let w1 = t("m.lokr_w1", &[a, c], &mut rng);
        let w2 = t("m.lokr_w2", &[b, d, 3, 3], &mut rng);
        let ts = [("lokr_w1", w1.clone()), ("lokr_w2", w2.clone())];
        let l = build("lora_unet_x", "m", &parts(&ts), None).unwrap();
        assert_eq!(
            l.kind,
            ModuleKind::Conv {
                kernel: vec![c * d, 3, 3]
            }
        );
        let want = kron(&dense(&w1), a, c, &dense(&w2), b, d * 9);
        assert_close(&delta(&l), &want);
        // Factored w2 flattened to [q, d * 9]: the name says 3x3.
        let w2a = t("m.lokr_w2_a", &[b, 2], &mut rng);
        let w2b = t("m.lokr_w2_b", &[2, d * 9], &mut rng);
        let ts = [
            ("lokr_w1", w1.clone()),
            ("lokr_w2_a", w2a.clone()),
            ("lokr_w2_b", w2b.clone()),
        ];
        let key = "lora_unet_up_blocks_0_upsamplers_0_conv";
        let l = build(key, key, &parts(&ts), Some(1.0)).unwrap();
        assert_eq!(
            l.kind,
            ModuleKind::Conv {
                kernel: vec![c * d, 3, 3]
            }
        );
        let w2d = matmul(&dense(&w2a), &dense(&w2b), b, 2, d * 9);
        let want: Vec<f64> = kron(&dense(&w1), a, c, &w2d, b, d * 9)
            .iter()
            .map(|x| x * 0.5)
            .collect();
        assert_close(&delta(&l), &want);
    }

    #[test]
    fn malformed_modules_are_refused() {
        let mut ts = loha(4, 5, 2, 2);
        ts.pop();
        let e = build("k", "m", &parts(&ts), None).unwrap_err();
        assert!(e.contains("m.hada_w2_b") && e.contains("lacks"), "{e}");
        let mut ts = loha(4, 5, 2, 2);
        ts[3].1 = t("m.hada_w2_b", &[3, 5], &mut Rng(1));
        let e = build("k", "m", &parts(&ts), None).unwrap_err();
        assert!(e.contains("do not fit"), "{e}");
        let mut ts = loha(4, 5, 2, 2);
        ts.push(("lokr_w1", t("m.lokr_w1", &[2, 2], &mut Rng(1))));
        let e = build("k", "m", &parts(&ts), None).unwrap_err();
        assert!(e.contains("mixes"), "{e}");
        let ts = [("lokr_w1", t("m.lokr_w1", &[2, 2], &mut Rng(1)))];
        let e = build("k", "m", &parts(&ts), None).unwrap_err();
        assert!(e.contains("lokr_w2"), "{e}");
        let ts = [
            ("lokr_w1", t("m.lokr_w1", &[2, 2], &mut Rng(1))),
            ("lokr_w2_a", t("m.lokr_w2_a", &[2, 2], &mut Rng(1))),
        ];
        let e = build("k", "m", &parts(&ts), None).unwrap_err();
        assert!(e.contains("both"), "{e}");
    }

    #[test]
    fn huge_products_are_refused_before_allocating() {
        // A rank-1 LoHa of 2^15 x 2^15: 2^16 factor values as read, but its
        // delta is 2^30 values, and rank 1 * 1 keeps the factored form.
        assert!(factored("m", "x", 1 << 15, 1 << 15, 1).unwrap());
        let e = factored("m", "LyCORIS LoHa", 1 << 15, 1 << 15, 1 << 16).unwrap_err();
        assert!(e.contains("more than"), "{e}");
        assert!(factored("m", "x", usize::MAX, 2, 3).is_err());
    }
}
