//! Loading several adapters and checking that they can be merged.

use std::collections::{BTreeMap, BTreeSet};

use rayon::prelude::*;
use serde::Serialize;

use super::config::TargetModules;
use super::format::{self, Format};
use super::{diffusers, kohya, peft, sdnames};
use super::{Adapter, LoraModule, ModuleKind, PeftConfig};
use crate::error::{Error, Result};
use crate::source::{self, Resolved};
use crate::tensors::safetensors::SafetensorsFile;
use crate::tensors::{DType, FileRecord};

/// How many items an error message lists before it says "and N more".
const LIST_LIMIT: usize = 5;

/// Resolve, read, hash and validate one adapter, in the layout its keys
/// say (or `format` when given).
pub fn load_adapter(given: &str) -> Result<Adapter> {
    load_adapter_as(given, None)
}

/// [`load_adapter`] with the layout forced.
pub fn load_adapter_as(given: &str, format: Option<Format>) -> Result<Adapter> {
    let resolved = source::resolve(given)?;
    let weights = SafetensorsFile::open(resolved.weights())?;
    let format = match format {
        Some(f) => {
            format::refuse_foreign(&weights)?;
            f
        }
        None => format::detect(&weights)?,
    };
    let (config, modules, mut files) = match format {
        Format::Peft => {
            let Some(config_path) = resolved.config() else {
                return Err(Error::invalid(
                    resolved.dir(),
                    format!(
                        "{} is a PEFT adapter file but there is no {} beside it: PEFT adapters \
                         need it for rank, alpha and target modules",
                        resolved.weights().display(),
                        crate::layout::ADAPTER_CONFIG
                    ),
                ));
            };
            let (config, config_record) = PeftConfig::read(config_path)?;
            let modules = peft::build_modules(&weights, &config, config_path)?;
            (config, modules, vec![config_record])
        }
        Format::Kohya => {
            let modules = kohya::build_modules(&weights)?;
            (synthesised_config(&modules), modules, Vec::new())
        }
        Format::Diffusers => {
            let modules = diffusers::build_modules(&weights)?;
            (synthesised_config(&modules), modules, Vec::new())
        }
    };
    // Hashed later (AdapterSet::hash_inputs), once the set is known to fit
    // together: a refused merge should not have read gigabytes first.
    let (record, pending) = weights.record_later();
    files.push(record);
    Ok(Adapter {
        pending_hash: Some(pending),
        given: given.to_string(),
        resolved,
        files,
        config,
        format,
        metadata: weights.metadata.clone(),
        modules,
    })
}

/// A PEFT-shaped summary of a file that has no config: the most common rank
/// and alpha (ties: the smaller). Only reports read it; every module keeps
/// its own rank and scale.
fn synthesised_config(modules: &BTreeMap<String, LoraModule>) -> PeftConfig {
    fn most_common<T: Ord + Copy>(it: impl Iterator<Item = T>) -> Option<T> {
        let mut counts: BTreeMap<T, usize> = BTreeMap::new();
        for x in it {
            *counts.entry(x).or_default() += 1;
        }
        counts
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            .map(|(x, _)| *x)
    }
    let r = most_common(modules.values().map(|m| m.rank)).unwrap_or(1);
    // Alphas compared by their bits: they come from files, not arithmetic.
    let alpha_bits = most_common(
        modules
            .values()
            .filter(|m| m.rank == r)
            .map(|m| m.alpha.to_bits()),
    );
    let mut config = PeftConfig::default();
    config.peft_type = Some("LORA".into());
    config.r = r;
    config.lora_alpha = alpha_bits.map_or(r as f64, f64::from_bits);
    config
}

/// N validated adapters, in the order given.
#[derive(Debug)]
pub struct AdapterSet {
    pub adapters: Vec<Adapter>,
}

/// The shape of one module of one adapter, as compared across adapters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModuleShape {
    pub fan_out: usize,
    pub fan_in: usize,
    pub kind: ModuleKind,
}

impl std::fmt::Display for ModuleShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            ModuleKind::Linear => write!(f, "linear {}x{}", self.fan_out, self.fan_in),
            ModuleKind::Embedding => write!(f, "embedding {}x{}", self.fan_out, self.fan_in),
            ModuleKind::Conv { kernel } => {
                write!(
                    f,
                    "conv {}x{} (kernel {kernel:?})",
                    self.fan_out, self.fan_in
                )
            }
        }
    }
}

/// Two adapters disagree on the shape of a module.
#[derive(Debug, Clone, Serialize)]
pub struct ShapeConflict {
    pub module: String,
    pub adapter_i: usize,
    pub adapter_j: usize,
    pub shape_i: ModuleShape,
    pub shape_j: ModuleShape,
}

/// One distinct base model named by the adapters' configs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BaseModelRef {
    pub name: Option<String>,
    pub revision: Option<String>,
    /// Indices of the adapters that name it.
    pub adapters: Vec<usize>,
}

/// How the adapters of a set line up, module by module.
#[derive(Debug, Clone, Serialize)]
pub struct CompatReport {
    /// The adapters as given, by index.
    pub adapters: Vec<String>,
    /// Union of module names, sorted.
    pub modules: Vec<String>,
    /// For each module, the indices of the adapters that have it.
    pub coverage: BTreeMap<String, Vec<usize>>,
    /// Modules some adapters lack, with the indices of those adapters.
    pub partial_modules: BTreeMap<String, Vec<usize>>,
    pub shape_conflicts: Vec<ShapeConflict>,
    pub base_models: Vec<BaseModelRef>,
    /// `fan_in_fan_out` of each adapter.
    pub fan_in_fan_out: Vec<bool>,
    pub fan_in_fan_out_disagree: bool,
}

impl CompatReport {
    pub fn base_mismatch(&self) -> bool {
        let names: BTreeSet<&str> = self
            .base_models
            .iter()
            .filter_map(|b| b.name.as_deref())
            .collect();
        if names.len() > 1 {
            return true;
        }
        // Same name, different pinned revisions.
        let revisions: BTreeSet<&str> = self
            .base_models
            .iter()
            .filter(|b| b.name.is_some())
            .filter_map(|b| b.revision.as_deref())
            .collect();
        revisions.len() > 1
    }
}

fn list_some<T: std::fmt::Display>(items: impl ExactSizeIterator<Item = T>) -> String {
    let n = items.len();
    let mut s: Vec<String> = items.take(LIST_LIMIT).map(|i| i.to_string()).collect();
    if n > LIST_LIMIT {
        s.push(format!("and {} more", n - LIST_LIMIT));
    }
    s.join(", ")
}

impl AdapterSet {
    /// Load every reference in parallel. The order of `refs` is kept, and an
    /// error reported is the first failing reference in that order, so runs
    /// are reproducible whatever the thread timing.
    pub fn load(refs: &[String]) -> Result<AdapterSet> {
        AdapterSet::load_as(refs, None)
    }

    /// [`AdapterSet::load`] with every adapter's layout forced (`None`:
    /// each detected from its own keys).
    pub fn load_as(refs: &[String], format: Option<Format>) -> Result<AdapterSet> {
        let results: Vec<Result<Adapter>> = refs
            .par_iter()
            .map(|r| load_adapter_as(r, format))
            .collect();
        let adapters = results.into_iter().collect::<Result<Vec<_>>>()?;
        Ok(AdapterSet { adapters })
    }

    /// Every module name of the set, sorted, once.
    pub fn module_names(&self) -> Vec<&str> {
        let names: BTreeSet<&str> = self
            .adapters
            .iter()
            .flat_map(|a| a.modules.keys().map(String::as_str))
            .collect();
        names.into_iter().collect()
    }

    /// Hash every input's weights file (in parallel) for the manifest and
    /// `inspect`. Done after the checks that need only the headers.
    pub fn hash_inputs(&mut self) {
        self.adapters.par_iter_mut().for_each(|a| {
            if let Some(pending) = a.pending_hash.take() {
                let sha256 = pending.finish();
                if let Some(rec) = a.files.iter_mut().rfind(|f| f.sha256.is_empty()) {
                    rec.sha256 = sha256;
                }
            }
        });
    }

    /// The element type every input tensor shares, else f32: the default
    /// type of a merge's output.
    pub fn common_dtype(&self) -> DType {
        let mut all: Vec<DType> = self.adapters.iter().flat_map(|a| a.dtypes()).collect();
        all.sort();
        all.dedup();
        match all.as_slice() {
            [one] => *one,
            _ => DType::F32,
        }
    }

    /// The layouts of the inputs, sorted, without repeats.
    pub fn formats(&self) -> Vec<Format> {
        let mut f: Vec<Format> = self.adapters.iter().map(|a| a.format).collect();
        f.sort();
        f.dedup();
        f
    }

    /// Does any adapter use a Stable Diffusion layout (kohya or diffusers)?
    pub fn has_sd_layout(&self) -> bool {
        self.adapters.iter().any(|a| a.format != Format::Peft)
    }

    /// Re-key PEFT adapters' modules by their Stable Diffusion alignment key
    /// (see [`sdnames`]), so that they line up with kohya and diffusers
    /// inputs, or can be written in those layouts. A PEFT adapter names no
    /// pipeline component unless its paths start with one (`unet.`): paths
    /// starting with `text_model.` are taken as the first text encoder,
    /// everything else as the UNet. The dotted path is kept for writing.
    pub fn align_sd_names(&mut self) -> Result<()> {
        for a in self
            .adapters
            .iter_mut()
            .filter(|a| a.format == Format::Peft)
        {
            let old = std::mem::take(&mut a.modules);
            for (path, mut m) in old {
                if sdnames::is_key(&path) {
                    a.modules.insert(path, m);
                    continue;
                }
                let (c, inner) = sdnames::split_peft_path(&path);
                let key = sdnames::key(c, inner);
                m.path = Some(format!("{}.{inner}", c.diffusers));
                m.name = key.clone();
                if a.modules.insert(key.clone(), m).is_some() {
                    return Err(Error::Incompatible(format!(
                        "{}: two modules become {key} once '.' and '_' are treated alike, so \
                         they cannot be lined up with kohya names",
                        a.given
                    )));
                }
            }
        }
        Ok(())
    }

    /// Compare the adapters. Shape conflicts and `fan_in_fan_out`
    /// disagreements are always errors; modules missing from some adapters
    /// are errors with `strict`; different base models are errors unless
    /// `allow_base_mismatch`.
    pub fn check(&self, strict: bool, allow_base_mismatch: bool) -> Result<CompatReport> {
        let report = self.report();
        let given = |i: usize| self.adapters.get(i).map_or("?", |a| a.given.as_str());
        if let Some(c) = report.shape_conflicts.first() {
            return Err(Error::Incompatible(format!(
                "module {} has different shapes: {} in {} but {} in {}{}",
                c.module,
                c.shape_i,
                given(c.adapter_i),
                c.shape_j,
                given(c.adapter_j),
                if report.shape_conflicts.len() > 1 {
                    format!(
                        " ({} conflicts in all; are these adapters for the same base model?)",
                        report.shape_conflicts.len()
                    )
                } else {
                    String::new()
                }
            )));
        }
        if report.fan_in_fan_out_disagree {
            let pairs = report
                .fan_in_fan_out
                .iter()
                .enumerate()
                .map(|(i, f)| format!("{}: {f}", given(i)));
            return Err(Error::Incompatible(format!(
                "the adapters disagree on fan_in_fan_out ({}): they cannot have been trained \
                 on the same layers",
                pairs.collect::<Vec<_>>().join(", ")
            )));
        }
        if strict && !report.partial_modules.is_empty() {
            let items = report.partial_modules.iter().map(|(m, missing)| {
                let names: Vec<&str> = missing.iter().map(|&i| given(i)).collect();
                format!("{m} (missing from {})", names.join(", "))
            });
            return Err(Error::Incompatible(format!(
                "{} modules are not in every adapter (--strict): {}",
                report.partial_modules.len(),
                list_some(items)
            )));
        }
        if !allow_base_mismatch && report.base_mismatch() {
            let items = report.base_models.iter().map(|b| {
                let name = b.name.as_deref().unwrap_or("(not recorded)");
                let rev = b
                    .revision
                    .as_deref()
                    .map(|r| format!("@{r}"))
                    .unwrap_or_default();
                let who: Vec<&str> = b.adapters.iter().map(|&i| given(i)).collect();
                format!("{name}{rev} ({})", who.join(", "))
            });
            return Err(Error::Incompatible(format!(
                "the adapters were trained on different base models: {}; pass \
                 --allow-base-mismatch if they are the same model under different names",
                list_some(items)
            )));
        }
        Ok(report)
    }

    /// The comparison itself, without deciding what is an error.
    pub fn report(&self) -> CompatReport {
        let n = self.adapters.len();
        let mut coverage: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, a) in self.adapters.iter().enumerate() {
            for name in a.modules.keys() {
                coverage.entry(name.clone()).or_default().push(i);
            }
        }
        let mut partial_modules = BTreeMap::new();
        let mut shape_conflicts = Vec::new();
        for (name, have) in &coverage {
            if have.len() < n {
                let missing: Vec<usize> = (0..n).filter(|i| !have.contains(i)).collect();
                partial_modules.insert(name.clone(), missing);
            }
            let shape = |i: usize| {
                self.adapters[i].modules.get(name).map(|m| ModuleShape {
                    fan_out: m.fan_out,
                    fan_in: m.fan_in,
                    kind: m.kind.clone(),
                })
            };
            let Some((&first, rest)) = have.split_first() else {
                continue;
            };
            let Some(s0) = shape(first) else { continue };
            for &j in rest {
                if let Some(sj) = shape(j) {
                    if sj != s0 {
                        shape_conflicts.push(ShapeConflict {
                            module: name.clone(),
                            adapter_i: first,
                            adapter_j: j,
                            shape_i: s0.clone(),
                            shape_j: sj,
                        });
                    }
                }
            }
        }

        let mut base_models: Vec<BaseModelRef> = Vec::new();
        for (i, a) in self.adapters.iter().enumerate() {
            let name = a.config.base_model_name_or_path.clone();
            let revision = a.config.revision.clone();
            match base_models
                .iter_mut()
                .find(|b| b.name == name && b.revision == revision)
            {
                Some(b) => b.adapters.push(i),
                None => base_models.push(BaseModelRef {
                    name,
                    revision,
                    adapters: vec![i],
                }),
            }
        }
        let fan_in_fan_out: Vec<bool> = self
            .adapters
            .iter()
            .map(|a| a.config.fan_in_fan_out)
            .collect();
        let fan_in_fan_out_disagree = fan_in_fan_out.windows(2).any(|w| w[0] != w[1]);

        CompatReport {
            adapters: self.adapters.iter().map(|a| a.given.clone()).collect(),
            modules: coverage.keys().cloned().collect(),
            coverage,
            partial_modules,
            shape_conflicts,
            base_models,
            fan_in_fan_out,
            fan_in_fan_out_disagree,
        }
    }
}

/// What `inspect` shows about one adapter.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterSummary {
    pub given: String,
    pub format: Format,
    pub resolved: Resolved,
    pub files: Vec<FileRecord>,
    pub base_model: Option<String>,
    pub revision: Option<String>,
    pub task_type: Option<String>,
    /// The config's `r`.
    pub rank: usize,
    /// Modules whose rank differs from `rank`.
    pub module_ranks: BTreeMap<String, usize>,
    /// The config's `lora_alpha`.
    pub alpha: f64,
    /// Modules whose alpha differs from `alpha`.
    pub module_alphas: BTreeMap<String, f64>,
    pub use_rslora: bool,
    pub target_modules: Option<TargetModules>,
    pub module_count: usize,
    pub parameter_count: usize,
    pub dtypes: Vec<DType>,
}

impl Adapter {
    pub fn summary(&self) -> AdapterSummary {
        let c = &self.config;
        AdapterSummary {
            given: self.given.clone(),
            format: self.format,
            resolved: self.resolved.clone(),
            files: self.files.clone(),
            base_model: c.base_model_name_or_path.clone(),
            revision: c.revision.clone(),
            task_type: c.task_type.clone(),
            rank: c.r,
            module_ranks: self
                .modules
                .values()
                .filter(|m| m.rank != c.r)
                .map(|m| (m.name.clone(), m.rank))
                .collect(),
            alpha: c.lora_alpha,
            module_alphas: self
                .modules
                .values()
                .filter(|m| m.alpha != c.lora_alpha)
                .map(|m| (m.name.clone(), m.alpha))
                .collect(),
            use_rslora: c.use_rslora,
            target_modules: c.target_modules.clone(),
            module_count: self.modules.len(),
            parameter_count: self.parameter_count(),
            dtypes: self.dtypes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::testutil::{config_json, write_peft_dir, LinearSpec};
    use crate::hash::sha256_hex;
    use std::path::Path;

    fn dir_str(p: &Path) -> String {
        p.to_str().unwrap().to_string()
    }

    #[test]
    fn load_one_adapter() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("a");
        let config = config_json(4, 16.0, &[("k_proj", 2)], &[]);
        write_peft_dir(
            &d,
            &config,
            &[("l.0.q_proj", 4, 6, 5), ("l.0.k_proj", 2, 6, 3)],
        );
        let a = load_adapter(&dir_str(&d)).unwrap();
        assert_eq!(a.modules.len(), 2);
        assert_eq!(a.modules["l.0.q_proj"].scale, 4.0);
        assert_eq!(a.modules["l.0.k_proj"].scale, 8.0);
        assert_eq!(a.files.len(), 2);
        // The weights are hashed only when the set asks for it (after the
        // checks that read headers only).
        assert_eq!(a.files[1].sha256, "");
        let mut set = AdapterSet { adapters: vec![a] };
        set.hash_inputs();
        let a = set.adapters.pop().unwrap();
        assert!(a.pending_hash.is_none());
        let bytes = std::fs::read(d.join("adapter_model.safetensors")).unwrap();
        assert_eq!(a.files[1].sha256, sha256_hex(&bytes));
        assert_eq!(a.files[1].size, bytes.len() as u64);
        let cfg_bytes = std::fs::read(d.join("adapter_config.json")).unwrap();
        assert_eq!(a.files[0].sha256, sha256_hex(&cfg_bytes));

        let s = a.summary();
        assert_eq!(s.rank, 4);
        assert_eq!(s.module_ranks, BTreeMap::from([("l.0.k_proj".into(), 2)]));
        assert!(s.module_alphas.is_empty());
        assert_eq!(s.alpha, 16.0);
        assert_eq!(s.module_count, 2);
        assert_eq!(s.parameter_count, 4 * 6 + 5 * 4 + 2 * 6 + 3 * 2);
        assert_eq!(s.dtypes, vec![DType::F32]);
        assert_eq!(s.base_model.as_deref(), Some("org/base"));
        serde_json::to_string(&s).unwrap();
    }

    fn set_of(tmp: &Path, specs: &[(&str, serde_json::Value, Vec<LinearSpec>)]) -> AdapterSet {
        let refs: Vec<String> = specs
            .iter()
            .map(|(name, cfg, mods)| {
                let d = tmp.join(name);
                write_peft_dir(&d, cfg, mods);
                dir_str(&d)
            })
            .collect();
        AdapterSet::load(&refs).unwrap()
    }

    #[test]
    fn load_keeps_order_and_reports_first_error() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config_json(2, 3.0, &[], &[]);
        let set = set_of(
            tmp.path(),
            &[
                ("x", cfg.clone(), vec![("q", 2, 4, 4)]),
                ("y", cfg.clone(), vec![("q", 2, 4, 4)]),
            ],
        );
        assert!(set.adapters[0].given.ends_with("x"));
        assert!(set.adapters[1].given.ends_with("y"));
        let refs = vec![
            dir_str(&tmp.path().join("x")),
            dir_str(&tmp.path().join("missing1")),
            dir_str(&tmp.path().join("missing2")),
        ];
        let e = AdapterSet::load(&refs).unwrap_err().to_string();
        assert!(e.contains("missing1"), "{e}");
    }

    #[test]
    fn check_compatible_and_partial() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config_json(2, 3.0, &[], &[]);
        let set = set_of(
            tmp.path(),
            &[
                ("x", cfg.clone(), vec![("q", 2, 4, 4), ("v", 2, 4, 4)]),
                ("y", cfg.clone(), vec![("q", 2, 4, 4)]),
            ],
        );
        let r = set.check(false, false).unwrap();
        assert_eq!(r.modules, vec!["q", "v"]);
        assert_eq!(r.coverage["q"], vec![0, 1]);
        assert_eq!(r.partial_modules, BTreeMap::from([("v".into(), vec![1])]));
        assert!(r.shape_conflicts.is_empty());
        assert_eq!(r.base_models.len(), 1);
        let e = set.check(true, false).unwrap_err();
        assert!(matches!(e, Error::Incompatible(_)));
        let e = e.to_string();
        assert!(e.contains("1 modules are not in every adapter"), "{e}");
        assert!(e.contains("v (missing from"), "{e}");
    }

    #[test]
    fn shape_conflict_names_both() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config_json(2, 3.0, &[], &[]);
        let set = set_of(
            tmp.path(),
            &[
                ("x", cfg.clone(), vec![("q", 2, 4, 4)]),
                ("y", cfg.clone(), vec![("q", 2, 4, 6)]),
            ],
        );
        let r = set.report();
        assert_eq!(r.shape_conflicts.len(), 1);
        assert_eq!(r.shape_conflicts[0].shape_j.fan_out, 6);
        let e = set.check(false, true).unwrap_err().to_string();
        assert!(e.contains("module q"), "{e}");
        assert!(e.contains("linear 4x4") && e.contains("linear 6x4"), "{e}");
        assert!(e.contains(&set.adapters[0].given) && e.contains(&set.adapters[1].given));
    }

    #[test]
    fn base_mismatch() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config_json(2, 3.0, &[], &[]);
        let mut other = cfg.clone();
        other["base_model_name_or_path"] = "org/other".into();
        let set = set_of(
            tmp.path(),
            &[
                ("x", cfg.clone(), vec![("q", 2, 4, 4)]),
                ("y", other, vec![("q", 2, 4, 4)]),
            ],
        );
        let e = set.check(false, false).unwrap_err().to_string();
        assert!(e.contains("org/base") && e.contains("org/other"), "{e}");
        assert!(e.contains("--allow-base-mismatch"), "{e}");
        let r = set.check(false, true).unwrap();
        assert_eq!(r.base_models.len(), 2);
        assert_eq!(r.base_models[1].adapters, vec![1]);
    }

    #[test]
    fn fan_in_fan_out_disagreement() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config_json(2, 3.0, &[], &[]);
        let mut other = cfg.clone();
        other["fan_in_fan_out"] = true.into();
        let set = set_of(
            tmp.path(),
            &[
                ("x", cfg, vec![("q", 2, 4, 4)]),
                ("y", other, vec![("q", 2, 4, 4)]),
            ],
        );
        assert!(set.report().fan_in_fan_out_disagree);
        let e = set.check(false, true).unwrap_err().to_string();
        assert!(e.contains("fan_in_fan_out"), "{e}");
    }
}
