//! The one merge path: an AdapterSet, one weight per (module, adapter), and a
//! method. `uniform` and `fit` differ only in where the weights come from.

use std::borrow::Cow;
use std::collections::BTreeMap;

use rayon::prelude::*;
use serde::Serialize;

pub use super::math::MajoritySign;
use super::math::{self, Factored, Prune, TaskMerge, Term};
use super::spill::{Spill, Spilled, Values};
use crate::adapter::{AdapterSet, ModuleKind};
use crate::{Error, Result};

/// How the weighted sum becomes one adapter.
///
/// `ties`, `dare-linear`, `dare-ties` and `magnitude-prune` are PEFT's
/// `merge_utils` task-vector merges applied to each module's dense deltas
/// `s_i B_i A_i` (PEFT's `*_svd` combinations, which unlike the plain ones
/// accept any ranks), followed by the best rank-`rank` approximation of
/// the dense result; see [`math::task_merge`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum Method {
    Exact,
    /// `rank` for every module but convolutions with a spatial kernel
    /// (3x3 and the like), which get `conv_rank` when given (as
    /// sd-scripts' `--new_conv_rank`); 1x1 convolutions count as linear.
    Svd {
        rank: usize,
        #[serde(skip_serializing_if = "Option::is_none")]
        conv_rank: Option<usize>,
        /// `--rank auto`: each module's rank is the smallest that meets
        /// this target, at most `rank` (`--max-rank`).
        #[serde(skip_serializing_if = "Option::is_none")]
        target: Option<Target>,
    },
    Linear,
    /// Magnitude pruning, sign election, disjoint mean.
    Ties {
        rank: usize,
        #[serde(skip_serializing_if = "Option::is_none")]
        conv_rank: Option<usize>,
        /// `--rank auto`: each module's rank is the smallest that meets
        /// this target, at most `rank` (`--max-rank`).
        #[serde(skip_serializing_if = "Option::is_none")]
        target: Option<Target>,
        density: f64,
        majority_sign: MajoritySign,
    },
    /// Random pruning with rescaling, weighted sum.
    DareLinear {
        rank: usize,
        #[serde(skip_serializing_if = "Option::is_none")]
        conv_rank: Option<usize>,
        /// `--rank auto`: each module's rank is the smallest that meets
        /// this target, at most `rank` (`--max-rank`).
        #[serde(skip_serializing_if = "Option::is_none")]
        target: Option<Target>,
        density: f64,
        seed: u64,
    },
    /// Random pruning with rescaling, sign election, disjoint mean.
    DareTies {
        rank: usize,
        #[serde(skip_serializing_if = "Option::is_none")]
        conv_rank: Option<usize>,
        /// `--rank auto`: each module's rank is the smallest that meets
        /// this target, at most `rank` (`--max-rank`).
        #[serde(skip_serializing_if = "Option::is_none")]
        target: Option<Target>,
        density: f64,
        majority_sign: MajoritySign,
        seed: u64,
    },
    /// Magnitude pruning, weighted sum.
    MagnitudePrune {
        rank: usize,
        #[serde(skip_serializing_if = "Option::is_none")]
        conv_rank: Option<usize>,
        /// `--rank auto`: each module's rank is the smallest that meets
        /// this target, at most `rank` (`--max-rank`).
        #[serde(skip_serializing_if = "Option::is_none")]
        target: Option<Target>,
        density: f64,
    },
}

/// The seed DARE uses when none is given.
pub const DEFAULT_SEED: u64 = 0;

/// What `--rank auto` asks of each module's rank.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// The smallest rank keeping at least this share of the squared
    /// Frobenius norm (`--energy`).
    Energy(f64),
    /// The smallest rank whose relative Frobenius error is at most this
    /// (`--tolerance`).
    Tolerance(f64),
}

impl Target {
    /// The smallest `r` (at most `s.len()`) that meets the target, given
    /// the singular values `s` (descending) of the best approximation so
    /// far and the squared norm `total` of the whole delta.
    pub fn rank(&self, s: &[f64], total: f64) -> usize {
        if total <= 0.0 {
            return 0;
        }
        let need = match *self {
            Target::Energy(e) => e * total,
            Target::Tolerance(t) => (1.0 - t * t) * total,
        };
        let mut kept = 0.0;
        for (i, x) in s.iter().enumerate() {
            if kept >= need * (1.0 - 1e-12) {
                return i;
            }
            kept += x * x;
        }
        s.len()
    }
}

impl Method {
    /// The output rank `svd` gives a module of this kind.
    pub fn svd_rank_for(rank: usize, conv_rank: Option<usize>, kind: &ModuleKind) -> usize {
        match (kind, conv_rank) {
            (ModuleKind::Conv { kernel }, Some(c)) if kernel.iter().skip(1).any(|&d| d != 1) => c,
            _ => rank,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Method::Exact => "exact",
            Method::Svd { .. } => "svd",
            Method::Linear => "linear",
            Method::Ties { .. } => "ties",
            Method::DareLinear { .. } => "dare-linear",
            Method::DareTies { .. } => "dare-ties",
            Method::MagnitudePrune { .. } => "magnitude-prune",
        }
    }

    /// `--rank auto`'s target, for the methods that truncate to a rank.
    pub fn target(&self) -> Option<Target> {
        match *self {
            Method::Exact | Method::Linear => None,
            Method::Svd { target, .. }
            | Method::Ties { target, .. }
            | Method::DareLinear { target, .. }
            | Method::DareTies { target, .. }
            | Method::MagnitudePrune { target, .. } => target,
        }
    }

    /// `--rank` (with `--rank auto`, the cap: `--max-rank`, or unbounded)
    /// and `--conv-rank`, for the methods that truncate to a rank.
    pub fn output_rank(&self) -> Option<(usize, Option<usize>)> {
        match *self {
            Method::Exact | Method::Linear => None,
            Method::Svd {
                rank, conv_rank, ..
            }
            | Method::Ties {
                rank, conv_rank, ..
            }
            | Method::DareLinear {
                rank, conv_rank, ..
            }
            | Method::DareTies {
                rank, conv_rank, ..
            }
            | Method::MagnitudePrune {
                rank, conv_rank, ..
            } => Some((rank, conv_rank)),
        }
    }

    /// The dense task-vector merge this method is, if it is one.
    pub fn task(&self) -> Option<TaskMerge> {
        let (prune, density, elect) = match *self {
            Method::Exact | Method::Svd { .. } | Method::Linear => return None,
            Method::Ties {
                density,
                majority_sign,
                ..
            } => (Prune::Magnitude, density, Some(majority_sign)),
            Method::DareLinear { density, .. } => (Prune::Random, density, None),
            Method::DareTies {
                density,
                majority_sign,
                ..
            } => (Prune::Random, density, Some(majority_sign)),
            Method::MagnitudePrune { density, .. } => (Prune::Magnitude, density, None),
        };
        Some(TaskMerge {
            prune,
            density,
            elect,
        })
    }

    /// DARE's seed.
    pub fn seed(&self) -> Option<u64> {
        match *self {
            Method::DareLinear { seed, .. } | Method::DareTies { seed, .. } => Some(seed),
            _ => None,
        }
    }

    /// The weight of each of `n` adapters when none are given: 1/N, so that
    /// the merge is the mean; 1 for the methods that elect a sign, whose
    /// disjoint merge already divides by the number of agreeing adapters
    /// (there 1/N would shrink the mean N times).
    pub fn default_weight(&self, n: usize) -> f64 {
        match self.task() {
            Some(TaskMerge { elect: Some(_), .. }) => 1.0,
            _ => 1.0 / n as f64,
        }
    }

    /// The name with its parameters, for the model card: `ties (density
    /// 0.2, majority sign total, rank 16)`. The methods without parameters
    /// beyond the rank read as their name.
    pub fn describe(&self) -> String {
        let Some(how) = self.task() else {
            return match self.target() {
                Some(_) => format!("{} ({})", self.name(), self.describe_rank().join(", ")),
                None => self.name().to_string(),
            };
        };
        let mut parts = vec![format!("density {}", how.density)];
        if let Some(sign) = how.elect {
            parts.push(format!("majority sign {}", sign.name()));
        }
        if let Some(seed) = self.seed() {
            parts.push(format!("seed {seed}"));
        }
        parts.extend(self.describe_rank());
        format!("{} ({})", self.name(), parts.join(", "))
    }

    /// How the output rank is chosen, for the card: `rank 16`, `rank auto
    /// (energy 0.9, at most 64)`, with the conv rank if any.
    fn describe_rank(&self) -> Vec<String> {
        let mut parts = Vec::new();
        if let Some((rank, conv_rank)) = self.output_rank() {
            match self.target() {
                None => parts.push(format!("rank {rank}")),
                Some(t) => {
                    let t = match t {
                        Target::Energy(e) => format!("energy {e}"),
                        Target::Tolerance(x) => format!("tolerance {x}"),
                    };
                    if rank == usize::MAX {
                        parts.push(format!("rank auto ({t})"));
                    } else {
                        parts.push(format!("rank auto ({t}, at most {rank})"));
                    }
                }
            }
            if let Some(c) = conv_rank {
                parts.push(format!("conv rank {c}"));
            }
        }
        parts
    }
}

/// DARE's random stream for one adapter in one module: a function of the
/// seed, the module's name and the adapter's position among the inputs
/// only, so the dropped entries do not depend on which thread merges
/// which module, in which order, or on the other adapters.
pub fn dare_seed(seed: u64, module: &str, adapter: usize) -> u64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"lora-merge dare\0");
    h.update(seed.to_le_bytes());
    h.update((adapter as u64).to_le_bytes());
    h.update(module.as_bytes());
    let d = h.finalize();
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

/// One number per (module, adapter). A global vector applies to every
/// module; per-module rows (from `fit`) override it.
#[derive(Debug, Clone, Serialize)]
pub struct Weights {
    pub global: Vec<f64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub per_module: BTreeMap<String, Vec<f64>>,
}

impl Weights {
    /// 1/N each, or the user's weights (checked against N).
    pub fn uniform(n: usize, given: &[f64]) -> Result<Weights> {
        Weights::with_default(n, given, |n| 1.0 / n as f64)
    }

    /// The user's weights (checked against N), or `method`'s default
    /// ([`Method::default_weight`]).
    pub fn for_method(n: usize, given: &[f64], method: &Method) -> Result<Weights> {
        Weights::with_default(n, given, |n| method.default_weight(n))
    }

    fn with_default(n: usize, given: &[f64], default: impl Fn(usize) -> f64) -> Result<Weights> {
        if n == 0 {
            return Err(Error::Usage(
                "no adapters given; pass --adapters or --adapters-file".into(),
            ));
        }
        let global = if given.is_empty() {
            vec![default(n); n]
        } else if given.len() != n {
            return Err(Error::Usage(format!(
                "--weights has {} values but {} adapters were given; pass one weight per adapter, in order",
                given.len(),
                n
            )));
        } else {
            if let Some(w) = given.iter().find(|w| !w.is_finite()) {
                return Err(Error::Usage(format!(
                    "--weights: {w} is not a finite number"
                )));
            }
            given.to_vec()
        };
        Ok(Weights {
            global,
            per_module: BTreeMap::new(),
        })
    }

    pub fn for_module(&self, module: &str) -> &[f64] {
        self.per_module
            .get(module)
            .map(Vec::as_slice)
            .unwrap_or(&self.global)
    }
}

/// One module of the merged adapter, with scale 1 (delta = b @ a).
#[derive(Debug)]
pub struct MergedModule {
    pub name: String,
    /// The inputs' dotted path for this module when its name is an
    /// alignment key (carried through untouched for the writers).
    pub path: Option<String>,
    /// The kohya name an input gave this module after the original SGM UNet
    /// (the first such input's), if any did.
    pub sgm_name: Option<String>,
    pub kind: ModuleKind,
    pub fan_out: usize,
    pub fan_in: usize,
    /// Indices of the adapters that adapt this module.
    pub sources: Vec<usize>,
    /// The factors, and their rank and errors. Once spilled (see
    /// [`spill`](super::spill)), `a` and `b` here are empty and `spilled`
    /// holds them.
    pub factored: Factored,
    /// (A, B) when the factors were moved out of memory.
    pub spilled: Option<(Spilled, Spilled)>,
}

impl MergedModule {
    /// A's values (`rank x fan_in`, row-major), wherever they are.
    pub fn a_values(&self) -> Values<'_> {
        match &self.spilled {
            Some((a, _)) => Values::Spilled(a),
            None => Values::Memory(Cow::Borrowed(&self.factored.a)),
        }
    }

    /// B's values (`fan_out x rank`, row-major), wherever they are.
    pub fn b_values(&self) -> Values<'_> {
        match &self.spilled {
            Some((_, b)) => Values::Spilled(b),
            None => Values::Memory(Cow::Borrowed(&self.factored.b)),
        }
    }

    /// Move the factors out of memory into `spill`.
    fn spill_to(&mut self, spill: &Spill) -> Result<()> {
        let a = spill.put(&self.factored.a)?;
        let b = spill.put(&self.factored.b)?;
        self.factored.a = Vec::new();
        self.factored.b = Vec::new();
        self.spilled = Some((a, b));
        Ok(())
    }
}

/// The bytes of memory and disk a merge of `set` by `method` will need,
/// written in `dtype`. Memory: each merge thread works on one module at a
/// time, holding its inputs' decoded factors, its working copies (stacked
/// factors, and for svd the QR factors of both sides) and its result, so
/// the figure is the threads times the largest module's need; the methods
/// that prune dense deltas hold each running module's dense work instead
/// when larger ([`math::task_merge_bytes`]). Disk: the output tensors in
/// `dtype`, plus the f32 factors spilled while merging (see [`merge`]). An
/// upper bound: svd's rank is taken as the larger of --rank and --conv-rank.
pub fn estimate(set: &AdapterSet, method: Method, dtype: crate::tensors::DType) -> (u64, u64) {
    let mut shapes: std::collections::BTreeMap<&str, (u64, u64, u64, u64)> = Default::default();
    for a in &set.adapters {
        for (name, m) in &a.modules {
            let e =
                shapes
                    .entry(name.as_str())
                    .or_insert((m.fan_in as u64, m.fan_out as u64, 0, 0));
            e.2 += m.rank as u64;
            e.3 = e.3.max(m.rank as u64);
        }
    }
    let task = method.task();
    let threads = rayon::current_num_threads().max(1);
    let mut elements = 0u64;
    let mut largest = Vec::with_capacity(shapes.len());
    for &(fan_in, fan_out, sum, max) in shapes.values() {
        let r = match (method, method.output_rank()) {
            (Method::Exact, _) => sum,
            (Method::Linear, _) => max,
            (_, Some((rank, conv_rank))) => {
                let rank = rank.max(conv_rank.unwrap_or(rank)) as u64;
                if task.is_some() {
                    // Pruning makes the delta dense: its rank is not
                    // bounded by the inputs'.
                    rank.min(fan_in.min(fan_out))
                } else {
                    sum.min(rank)
                }
            }
            (_, None) => sum,
        };
        elements = elements.saturating_add((fan_in + fan_out).saturating_mul(r));
        // Decoded inputs, two working copies of the stacked factors and
        // the result, all at most (fan_in + fan_out) x sum(ranks), in f32.
        let mut need = (fan_in + fan_out)
            .saturating_mul(sum.max(r))
            .saturating_mul(16);
        if let (Some(how), Some((rank, conv_rank))) = (&task, method.output_rank()) {
            let rank = rank.max(conv_rank.unwrap_or(rank));
            need = need.max(math::task_merge_bytes(
                fan_out as usize,
                fan_in as usize,
                how,
                rank,
            ));
        }
        largest.push(need);
    }
    largest.sort_unstable_by(|a, b| b.cmp(a));
    let running = largest
        .iter()
        .take(threads)
        .fold(0u64, |acc, &x| acc.saturating_add(x));
    let out = elements.saturating_mul(dtype.size() as u64);
    let memory = running.saturating_add(64 << 20);
    let disk = out.saturating_add(elements.saturating_mul(4));
    (memory, disk)
}

/// Merge every module of the set. Modules are independent, so they run in
/// parallel; each decodes its factors from the memory maps only when it runs.
/// With `spill`, each module's factors go to that file as soon as the module
/// is done, so that memory holds only the modules being merged; without it
/// (small merges, tests) they stay in memory.
pub fn merge(
    set: &AdapterSet,
    weights: &Weights,
    method: Method,
    spill: Option<&Spill>,
    on_module_done: &(dyn Fn() + Sync),
) -> Result<Vec<MergedModule>> {
    let names: Vec<&String> = set
        .adapters
        .iter()
        .flat_map(|a| a.modules.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    names
        .par_iter()
        .map(|name| {
            let mut out = merge_module(set, weights, method, name)?;
            if let Some(spill) = spill {
                out.spill_to(spill)?;
            }
            on_module_done();
            Ok(out)
        })
        .collect()
}

fn merge_module(
    set: &AdapterSet,
    weights: &Weights,
    method: Method,
    name: &str,
) -> Result<MergedModule> {
    let w = weights.for_module(name);
    let mut sources = Vec::new();
    let mut decoded = Vec::new();
    let mut first = None;
    let mut path = None;
    let mut sgm_name = None;
    for (i, adapter) in set.adapters.iter().enumerate() {
        if let Some(m) = adapter.modules.get(name) {
            first.get_or_insert(m);
            if path.is_none() {
                path.clone_from(&m.path);
            }
            if sgm_name.is_none() {
                sgm_name.clone_from(&m.sgm_name);
            }
            sources.push(i);
            decoded.push((w[i], m.scale, m.rank, m.a.f32_view(), m.b.f32_view(), m));
        }
    }
    let first = first.ok_or_else(|| Error::Internal(format!("module {name} has no adapter")))?;
    let (m, n) = (first.fan_out, first.fan_in);
    let terms: Vec<Term> = decoded
        .iter()
        .map(|(weight, scale, rank, a, b, _)| Term {
            weight: *weight,
            scale: *scale,
            rank: *rank,
            a,
            b,
        })
        .collect();
    let invalid = |why: String| Error::Invalid {
        file: set.adapters[sources[0]]
            .files
            .last()
            .map(|f| f.path.clone())
            .unwrap_or_default(),
        msg: format!("module {name}: {why}"),
    };
    let factored = match (method, method.task(), method.output_rank()) {
        (Method::Exact, ..) => math::exact(m, n, &terms),
        (
            Method::Svd {
                rank, conv_rank, ..
            },
            ..,
        ) => math::svd(
            m,
            n,
            &terms,
            Method::svd_rank_for(rank, conv_rank, &first.kind).min(m.min(n)),
        )
        .map_err(invalid)?,
        (Method::Linear, ..) => math::linear(m, n, &terms).map_err(|why| {
            Error::Incompatible(format!("--method linear cannot merge module {name}: {why}"))
        })?,
        (_, Some(how), Some((rank, conv_rank))) => {
            let seeds: Vec<u64> = match method.seed() {
                Some(seed) => sources.iter().map(|&i| dare_seed(seed, name, i)).collect(),
                None => Vec::new(),
            };
            math::task_merge(
                m,
                n,
                &terms,
                &how,
                &seeds,
                Method::svd_rank_for(rank, conv_rank, &first.kind).min(m.min(n)),
            )
            .map_err(invalid)?
        }
        (other, ..) => {
            return Err(Error::Internal(format!(
                "method {} has no rule to merge by",
                other.name()
            )))
        }
    };
    let factored = match method.target() {
        Some(target) => adapt_rank(factored, m, n, target),
        None => factored,
    };
    // Done with this module's inputs: let their pages go (see TensorRef::release).
    drop(terms);
    for (.., module) in decoded.drain(..) {
        module.a.release();
        module.b.release();
    }
    Ok(MergedModule {
        name: name.to_string(),
        path,
        sgm_name,
        kind: first.kind.clone(),
        fan_out: m,
        fan_in: n,
        sources,
        factored,
        spilled: None,
    })
}

/// `--rank auto`: keep the leading `r` singular directions of the best
/// approximation `f` (rank at most the cap), `r` the smallest that meets
/// `target`. The truncating methods write `f` as singular directions in
/// descending order (`b`'s columns and `a`'s rows orthogonal, their norms'
/// product the singular value), so its leading `r` are the best rank-`r`
/// approximation (Eckart–Young) and nothing is recomputed. The squared
/// norm of the whole delta is what `f` keeps over its `energy`; the error
/// and energy recorded are those of the rank kept.
fn adapt_rank(f: Factored, m: usize, n: usize, target: Target) -> Factored {
    let r0 = f.rank;
    if r0 == 0 || f.energy <= 0.0 {
        return f;
    }
    let s: Vec<f64> = (0..r0)
        .map(|i| {
            let a2: f64 = f.a[i * n..(i + 1) * n]
                .iter()
                .map(|&x| f64::from(x) * f64::from(x))
                .sum();
            let b2: f64 = (0..m).map(|row| f64::from(f.b[row * r0 + i]).powi(2)).sum();
            (a2 * b2).sqrt()
        })
        .collect();
    let kept0: f64 = s.iter().map(|x| x * x).sum();
    let total = kept0 / f.energy;
    let r = target.rank(&s, total).min(r0);
    if r == r0 {
        return f;
    }
    let kept: f64 = s[..r].iter().map(|x| x * x).sum();
    let energy = (kept / total).clamp(0.0, 1.0);
    let a = f.a[..r * n].to_vec();
    let b = (0..m)
        .flat_map(|row| f.b[row * r0..row * r0 + r].iter().copied())
        .collect();
    Factored {
        rank: r,
        a,
        b,
        rel_error: (1.0 - energy).max(0.0).sqrt(),
        energy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::testutil::{config_json, write_peft_dir};

    fn set(tmp: &std::path::Path) -> AdapterSet {
        let refs: Vec<String> = [
            ("x", 2, vec![("l.0.q", 2, 12, 10), ("l.1.q", 2, 12, 10)]),
            ("y", 3, vec![("l.0.q", 3, 12, 10), ("l.1.q", 3, 12, 10)]),
        ]
        .into_iter()
        .map(|(name, r, mods)| {
            let d = tmp.join(name);
            write_peft_dir(&d, &config_json(r, 4.0, &[], &[]), &mods);
            d.to_str().unwrap().to_string()
        })
        .collect();
        AdapterSet::load(&refs).unwrap()
    }

    const DARE_TIES: Method = Method::DareTies {
        rank: 4,
        target: None,
        conv_rank: None,
        density: 0.5,
        majority_sign: MajoritySign::Total,
        seed: 3,
    };

    #[test]
    fn rank_auto_keeps_the_leading_directions_that_meet_the_target() {
        // Random factors: a spectrum with no structure. Both routes of the
        // svd (QR of the factors when k < min(m, n), else the dense delta).
        for (m, n, ranks) in [(20, 16, vec![3, 4, 5]), (9, 7, vec![4, 5])] {
            let mut rng = crate::rng::Rng(11);
            let fac: Vec<(usize, Vec<f32>, Vec<f32>)> = ranks
                .iter()
                .map(|&r| (r, rng.symmetric_vec(r * n), rng.symmetric_vec(m * r)))
                .collect();
            let terms: Vec<Term> = fac
                .iter()
                .map(|(r, a, b)| Term {
                    weight: 0.7,
                    scale: 1.5,
                    rank: *r,
                    a,
                    b,
                })
                .collect();
            let k: usize = ranks.iter().sum::<usize>().min(m.min(n));
            let svd = |rank: usize| math::svd(m, n, &terms, rank).unwrap();
            let auto = |rank: usize, t: Target| adapt_rank(svd(rank), m, n, t);
            assert_eq!(auto(k, Target::Energy(1.0)).rank, k, "the full spectrum");
            for target in [0.3, 0.5, 0.8, 0.95, 0.999] {
                let got = auto(k, Target::Energy(target));
                let r = got.rank;
                assert!(got.energy >= target - 1e-6, "{target}: {got:?}");
                // The smallest such rank: one less falls short.
                assert!(r >= 1 && svd(r - 1).energy < target, "{target}: rank {r}");
                // The same factors as asking for rank r directly, and the
                // same error and energy.
                let fixed = svd(r);
                assert_eq!(got.a, fixed.a);
                assert_eq!(got.b, fixed.b);
                assert!(
                    (got.rel_error - fixed.rel_error).abs() < 1e-5,
                    "{got:?} {fixed:?}"
                );
                assert!((got.energy - fixed.energy).abs() < 1e-5);
                // A tolerance is the same rule on the error.
                let tol = (1.0 - target).sqrt();
                let by_tol = auto(k, Target::Tolerance(tol));
                assert_eq!(by_tol.rank, r, "tolerance {tol}");
                // And the cap wins.
                assert_eq!(auto(2, Target::Energy(target)).rank, r.min(2));
            }
        }
        assert_eq!(Target::Energy(0.5).rank(&[3.0, 2.0, 1.0], 0.0), 0);
        assert_eq!(Target::Energy(0.5).rank(&[3.0, 2.0, 1.0], 14.0), 1);
        assert_eq!(Target::Tolerance(0.0).rank(&[3.0, 2.0, 1.0], 14.0), 3);
    }

    #[test]
    fn dare_seed_depends_on_seed_module_and_adapter_only() {
        // Pinned: a seed must give the same drops in every version.
        // The first 8 bytes, little-endian, of sha256(b"lora-merge dare\0" ||
        // le64(seed) || le64(adapter) || module).
        assert_eq!(dare_seed(0, "l.0.q", 0), 0x6891_5bec_9a29_5132);
        let all = [
            dare_seed(0, "l.0.q", 0),
            dare_seed(1, "l.0.q", 0),
            dare_seed(0, "l.1.q", 0),
            dare_seed(0, "l.0.q", 1),
        ];
        let distinct: std::collections::BTreeSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), all.len());
    }

    #[test]
    fn dare_merges_do_not_depend_on_thread_scheduling() {
        let tmp = tempfile::tempdir().unwrap();
        let set = set(tmp.path());
        let weights = Weights::for_method(2, &[], &DARE_TIES).unwrap();
        assert_eq!(weights.global, vec![1.0, 1.0]);
        let run = |threads: usize, method: Method| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| merge(&set, &weights, method, None, &|| {}).unwrap())
                .into_iter()
                .map(|m| (m.name, m.factored))
                .collect::<Vec<_>>()
        };
        let one = run(1, DARE_TIES);
        assert_eq!(one, run(3, DARE_TIES));
        let other = Method::DareTies {
            rank: 4,
            target: None,
            conv_rank: None,
            density: 0.5,
            majority_sign: MajoritySign::Total,
            seed: 4,
        };
        assert_ne!(one, run(1, other));
        // The two modules have equal factors but their own streams.
        assert_ne!(one[0].1, one[1].1);
    }

    #[test]
    fn dense_methods_are_recorded_with_their_parameters() {
        let json = serde_json::to_value(DARE_TIES).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"name": "dare-ties", "rank": 4, "density": 0.5,
                "majority_sign": "total", "seed": 3})
        );
        assert_eq!(
            DARE_TIES.describe(),
            "dare-ties (density 0.5, majority sign total, seed 3, rank 4)"
        );
        let mp = Method::MagnitudePrune {
            rank: 8,
            target: None,
            conv_rank: Some(2),
            density: 0.2,
        };
        assert_eq!(
            mp.describe(),
            "magnitude-prune (density 0.2, rank 8, conv rank 2)"
        );
        assert_eq!(
            Method::Svd {
                rank: 4,
                target: None,
                conv_rank: None
            }
            .describe(),
            "svd"
        );
        assert_eq!(
            Weights::for_method(4, &[], &mp).unwrap().global,
            vec![0.25; 4]
        );
    }

    #[test]
    fn the_estimate_holds_the_dense_work_of_the_running_modules() {
        let tmp = tempfile::tempdir().unwrap();
        let set = set(tmp.path());
        let dtype = crate::tensors::DType::F32;
        let svd = estimate(
            &set,
            Method::Svd {
                rank: 4,
                target: None,
                conv_rank: None,
            },
            dtype,
        );
        let dense = estimate(&set, DARE_TIES, dtype);
        assert_eq!(svd.1, dense.1);
        let one = math::task_merge_bytes(10, 12, &DARE_TIES.task().unwrap(), 4);
        let running = rayon::current_num_threads().clamp(1, 2) as u64;
        // Each running module holds at least its dense work.
        assert!(dense.0 >= (64 << 20) + running * one, "{dense:?}");
        assert!(dense.0 > svd.0);
    }
}
