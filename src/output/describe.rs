//! How a merge describes itself: its PEFT config facts, kohya metadata,
//! card and manifest, from the adapters, weights and method. `uniform` and
//! `fit` both write through this, so a learned merge reads exactly like a
//! uniform one plus `fit`'s own section.

use std::path::Path;

use serde_json::Value;

use super::card::{Card, CardInput};
use super::manifest::{BaseModelRecord, InputRecord, Manifest, MethodRecord, ModuleRecord};
use super::writer::Contents;
use super::{kohya, peft};
use crate::adapter::{sdnames, AdapterSet, CompatReport, Format};
use crate::compose::merge::{MergedModule, Method, Weights};
use crate::tensors::DType;
use crate::{Error, Result};

/// A merge, as `uniform` and `fit` produce it.
pub struct Merge<'a> {
    pub set: &'a AdapterSet,
    pub report: &'a CompatReport,
    pub weights: &'a Weights,
    pub method: Method,
    pub modules: &'a [MergedModule],
    pub format: Format,
    pub dtype: DType,
}

fn same<T: PartialEq + Clone>(mut it: impl Iterator<Item = T>) -> Option<T> {
    let first = it.next()?;
    it.all(|x| x == first).then_some(first)
}

/// What every merge writes: the adapter, its config, card and manifest.
pub fn merge_contents<'a>(m: &Merge<'a>) -> Result<Contents<'a>> {
    let set = m.set;
    let n = set.adapters.len();
    if m.format != Format::Kohya {
        if let Some(module) = m
            .modules
            .iter()
            .find(|x| sdnames::is_unmapped_sgm_key(&x.name))
        {
            return Err(Error::Usage(format!(
                "module {} is named after the original SGM UNet but is not a layer lora-merge \
                 can map to diffusers' UNet, so it has no {} name; write --output-format kohya",
                module.name,
                m.format.name()
            )));
        }
    }
    let all_modules_everywhere = m.modules.iter().all(|x| x.sources.len() == n);
    let base_model = same(
        set.adapters
            .iter()
            .map(|a| a.config.base_model_name_or_path.clone()),
    )
    .flatten()
    .or_else(|| {
        set.adapters
            .iter()
            .find_map(|a| a.config.base_model_name_or_path.clone())
    });
    let revision = same(set.adapters.iter().map(|a| a.config.revision.clone())).flatten();
    let config = peft::ConfigFacts {
        base_model: base_model.clone(),
        revision: revision.clone(),
        task_type: same(set.adapters.iter().map(|a| a.config.task_type.clone())).flatten(),
        fan_in_fan_out: set.adapters.iter().any(|a| a.config.fan_in_fan_out),
        shared_target_modules: if all_modules_everywhere {
            same(
                set.adapters
                    .iter()
                    .map(|a| serde_json::to_value(&a.config.target_modules).unwrap_or(Value::Null)),
            )
            .filter(|v| !v.is_null())
        } else {
            None
        },
    };
    let kohya = (m.format == Format::Kohya)
        .then(|| -> Result<kohya::MergeFacts<'a>> {
            Ok(kohya::MergeFacts {
                kohya_inputs: set
                    .adapters
                    .iter()
                    .filter(|a| a.format == Format::Kohya)
                    .map(|a| &a.metadata)
                    .collect(),
                merged_from: set
                    .adapters
                    .iter()
                    .map(|a| {
                        a.resolved
                            .weights()
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_else(|| a.given.clone())
                    })
                    .collect(),
                method: m.method.name(),
                weights: serde_json::to_string(&m.weights.global)
                    .map_err(|e| Error::Internal(e.to_string()))?,
            })
        })
        .transpose()?;

    let pins: Vec<(String, String)> = set
        .adapters
        .iter()
        .filter_map(|a| {
            a.resolved
                .pinned()
                .map(|p| (a.given.clone(), p.to_string()))
        })
        .collect();
    let licenses = set
        .adapters
        .iter()
        .map(|a| card_license(a.resolved.dir()))
        .collect::<Result<Vec<_>>>()?;
    let card = Card {
        title: "Merged LoRA adapter".into(),
        summary: format!(
            "A merge of {} LoRA adapters{} made with lora-merge {} (method `{}`, {} modules). {}",
            n,
            base_model
                .as_deref()
                .map(|b| format!(" for `{}`", super::card::code_span(b)))
                .unwrap_or_default(),
            env!("CARGO_PKG_VERSION"),
            m.method.name(),
            m.modules.len(),
            match m.method {
                Method::Exact => "Exact: the factors are stacked, so the adapter's delta is exactly the weighted sum of the inputs' deltas.",
                Method::Svd { .. } => "SVD: the best low-rank approximation of the exact weighted sum; per-module error in the manifest.",
                Method::Linear => "Linear: A and B averaged separately as PEFT's `linear` does; approximate (cross terms), error per module in the manifest.",
                Method::Ties { .. } => "TIES as PEFT's `ties_svd`: each input's delta pruned to its largest entries, a sign elected per entry, the agreeing entries averaged, then the best low-rank approximation; per-module error of that approximation in the manifest.",
                Method::DareLinear { .. } => "DARE as PEFT's `dare_linear_svd`: entries of each input's delta dropped at random (seeded) and the rest rescaled, the weighted sum, then the best low-rank approximation; per-module error of that approximation in the manifest.",
                Method::DareTies { .. } => "DARE-TIES as PEFT's `dare_ties_svd`: entries dropped at random (seeded) and rescaled, a sign elected per entry, the agreeing entries averaged, then the best low-rank approximation; per-module error of that approximation in the manifest.",
                Method::MagnitudePrune { .. } => "Magnitude pruning as PEFT's `magnitude_prune_svd`: each input's delta pruned to its largest entries, the weighted sum, then the best low-rank approximation; per-module error of that approximation in the manifest.",
            }
        ),
        base_model: base_model.clone(),
        license: same(licenses.into_iter()).flatten(),
        format: m.format.name(),
        tags: vec!["merge"],
        method: Some(m.method.describe()),
        inputs: set
            .adapters
            .iter()
            .zip(&m.weights.global)
            .map(|(a, w)| CardInput {
                given: a.given.clone(),
                commit: a.resolved.commit().map(str::to_string),
                weight: *w,
                rank: a.config.r.to_string(),
                alpha: a.config.lora_alpha.to_string(),
                rslora: a.config.use_rslora,
                weights_sha256: a
                    .files
                    .iter()
                    .find(|f| f.path.extension().is_some_and(|e| e == "safetensors"))
                    .map(|f| f.sha256.clone())
                    .unwrap_or_default(),
            })
            .collect(),
        ..Card::default()
    };

    let mut manifest = Manifest::new(
        MethodRecord {
            name: m.method.name(),
            rank: m
                .method
                .output_rank()
                .map(|(rank, _)| rank)
                .filter(|&r| r != usize::MAX),
            conv_rank: m.method.output_rank().and_then(|(_, conv_rank)| conv_rank),
            rank_target: m.method.target(),
            output_format: m.format,
            dtype: m.dtype,
            approximate: m.method != Method::Exact,
            svd_factor_split: if matches!(m.method, Method::Svd { .. }) {
                Some("balanced: B = Q_B U sqrt(S), A = sqrt(S) V^T Q_A^T")
            } else if m.method.task().is_some() {
                Some("balanced: B = U sqrt(S), A = sqrt(S) V^T")
            } else {
                None
            },
            density: m.method.task().map(|t| t.density),
            majority_sign: m.method.task().and_then(|t| t.elect).map(|s| s.name()),
            seed: m.method.seed(),
            rel_error_of: m.method.task().is_some().then_some(
                "the method's own dense merge of the pruned deltas (what --rank loses), \
                 not the weighted sum of the inputs",
            ),
        },
        BaseModelRecord {
            name: base_model,
            revision,
            ..BaseModelRecord::default()
        },
    );
    manifest.weights = Some(m.weights.clone());
    if let Some(a) = set
        .adapters
        .iter()
        .find(|a| a.files.iter().any(|f| f.sha256.is_empty()))
    {
        return Err(Error::Internal(format!(
            "the inputs of {} were not hashed before the manifest was written",
            a.given
        )));
    }
    manifest.inputs = set
        .adapters
        .iter()
        .enumerate()
        .map(|(i, a)| InputRecord {
            given: a.given.clone(),
            format: a.format,
            resolved: a.resolved.clone(),
            files: a.files.clone(),
            rank: a.config.r,
            lora_alpha: a.config.lora_alpha,
            use_rslora: a.config.use_rslora,
            rank_pattern: a.config.rank_pattern.clone(),
            alpha_pattern: a.config.alpha_pattern.clone(),
            base_model: a.config.base_model_name_or_path.clone(),
            base_model_revision: a.config.revision.clone(),
            modules: a.modules.len(),
            weight: m.weights.global.get(i).copied(),
        })
        .collect();
    manifest.compatibility = Some(m.report.clone());
    manifest.modules = m
        .modules
        .iter()
        .map(|x| {
            (
                x.name.clone(),
                ModuleRecord {
                    rank: x.factored.rank,
                    rel_error: x.factored.rel_error,
                    energy: x.factored.energy,
                    adapters: x.sources.clone(),
                    weights: {
                        let w = m.weights.for_module(&x.name);
                        x.sources
                            .iter()
                            .filter_map(|&i| w.get(i).copied())
                            .collect()
                    },
                },
            )
        })
        .collect();
    Ok(Contents {
        modules: m.modules,
        format: m.format,
        dtype: m.dtype,
        config,
        kohya,
        card,
        pins,
        manifest,
        files: Vec::new(),
    })
}

/// The `license:` an adapter's own model card (README.md beside it)
/// declares in its front matter, if any. The card is optional, but one that
/// is there and is not a regular file of sensible size (a pipe, a link to a
/// device, gigabytes) is refused rather than waited on or read whole.
fn card_license(dir: &Path) -> Result<Option<String>> {
    let path = dir.join(crate::layout::CARD);
    let text = match crate::layout::read_capped(&path, crate::layout::CARD_CAP) {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(_) => return Ok(None),
        },
        Err(Error::Io { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(license_in(&text))
}

/// The `license:` in a card's front matter.
fn license_in(text: &str) -> Option<String> {
    let front = text.strip_prefix("---")?;
    let end = front.find("\n---")?;
    front[..end].lines().find_map(|l| {
        let v = l
            .strip_prefix("license:")?
            .trim()
            .trim_matches(|c| c == '"' || c == '\'');
        (!v.is_empty() && v.len() <= 64 && !v.contains(['\n', '`', '|'])).then(|| v.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn license_from_an_adapters_own_card() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        assert_eq!(card_license(d).unwrap(), None);
        std::fs::write(
            d.join("README.md"),
            "---\nbase_model: x\nlicense: 'mit'\ntags:\n- lora\n---\n# hi\nlicense: no\n",
        )
        .unwrap();
        assert_eq!(card_license(d).unwrap().as_deref(), Some("mit"));
        std::fs::write(d.join("README.md"), "# no front matter\nlicense: mit\n").unwrap();
        assert_eq!(card_license(d).unwrap(), None);
        std::fs::write(d.join("README.md"), "---\ntags: []\n---\nlicense: mit\n").unwrap();
        assert_eq!(card_license(d).unwrap(), None);
    }
}
