//! The one merge path: an AdapterSet, one weight per (module, adapter), and a
//! method. `uniform` and `fit` differ only in where the weights come from.

use std::borrow::Cow;
use std::collections::BTreeMap;

use rayon::prelude::*;
use serde::Serialize;

use super::math::{self, Factored, Term};
use super::spill::{Spill, Spilled, Values};
use crate::adapter::{AdapterSet, ModuleKind};
use crate::{Error, Result};

/// How the weighted sum becomes one adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "name", rename_all = "lowercase")]
pub enum Method {
    Exact,
    /// `rank` for every module but convolutions with a spatial kernel
    /// (3x3 and the like), which get `conv_rank` when given (as
    /// sd-scripts' `--new_conv_rank`); 1x1 convolutions count as linear.
    Svd {
        rank: usize,
        #[serde(skip_serializing_if = "Option::is_none")]
        conv_rank: Option<usize>,
    },
    Linear,
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
        }
    }
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
        if n == 0 {
            return Err(Error::Usage(
                "no adapters given; pass --adapters or --adapters-file".into(),
            ));
        }
        let global = if given.is_empty() {
            vec![1.0 / n as f64; n]
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
/// the figure is the threads times the largest module's need. Disk: the
/// output tensors in `dtype`, plus the f32 factors spilled while merging
/// (see [`merge`]). An upper bound: svd's rank is taken as the larger of
/// --rank and --conv-rank.
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
    let mut elements = 0u64;
    let mut largest = 0u64;
    for &(fan_in, fan_out, sum, max) in shapes.values() {
        let r = match method {
            Method::Exact => sum,
            Method::Svd { rank, conv_rank } => sum.min(rank.max(conv_rank.unwrap_or(rank)) as u64),
            Method::Linear => max,
        };
        elements = elements.saturating_add((fan_in + fan_out).saturating_mul(r));
        // Decoded inputs, two working copies of the stacked factors and
        // the result, all at most (fan_in + fan_out) x sum(ranks), in f32.
        largest = largest.max((fan_in + fan_out).saturating_mul(sum).saturating_mul(16));
    }
    let out = elements.saturating_mul(dtype.size() as u64);
    let threads = rayon::current_num_threads().max(1) as u64;
    let memory = largest.saturating_mul(threads).saturating_add(64 << 20);
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
    let factored = match method {
        Method::Exact => math::exact(m, n, &terms),
        Method::Svd { rank, conv_rank } => math::svd(
            m,
            n,
            &terms,
            Method::svd_rank_for(rank, conv_rank, &first.kind),
        )
        .map_err(|why| Error::Invalid {
            file: set.adapters[sources[0]]
                .files
                .last()
                .map(|f| f.path.clone())
                .unwrap_or_default(),
            msg: format!("module {name}: {why}"),
        })?,
        Method::Linear => math::linear(m, n, &terms).map_err(|why| {
            Error::Incompatible(format!("--method linear cannot merge module {name}: {why}"))
        })?,
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
