//! `uniform`: merge with fixed weights. The same path `fit` will take once it
//! has learned its weights: load -> check -> merge -> write.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use serde_json::{json, Value};

use crate::adapter::{sdnames, AdapterSet, CompatReport, DType, Format};
use crate::cli::{DTypeArg, MethodArg, OutputFormatArg, UniformArgs};
use crate::compose::merge::{self, MergedModule, Method, Weights};
use crate::output::atomic::{self, Staging, WrittenFile};
use crate::output::card::{Card, CardInput};
use crate::output::manifest::{self, Manifest, ModuleRecord, Tool};
use crate::output::{diffusers, kohya, peft, safetensors};
use crate::{Error, Result};

/// Everything `write_merge` needs to describe a merge.
pub struct MergeRecord<'a> {
    pub set: &'a AdapterSet,
    pub report: &'a CompatReport,
    pub weights: &'a Weights,
    pub method: Method,
    pub dtype: DType,
    pub modules: &'a [MergedModule],
    pub timings: Value,
    /// The layout to write.
    pub format: Format,
    /// What `fit` adds: its record in the manifest (`fit`), a card section,
    /// and files (heatmap, head), all hashed into the manifest like the rest.
    pub fit: Option<FitExtras>,
}

pub struct FitExtras {
    /// References that are not adapters (the base model) with their pinned
    /// form, for the card's reproducing command.
    pub pins: Vec<(String, String)>,
    pub manifest: Value,
    pub card_section: String,
    pub files: Vec<(String, Vec<u8>)>,
}

/// The materializer the flags ask for. Shared by `uniform` and `fit`.
pub fn parse_method(
    method: MethodArg,
    rank: Option<usize>,
    conv_rank: Option<usize>,
) -> Result<Method> {
    let m = match (method, rank) {
        (MethodArg::Exact, None) => Method::Exact,
        (MethodArg::Linear, None) => Method::Linear,
        (MethodArg::Svd, Some(0)) => return Err(Error::Usage("--rank must be at least 1".into())),
        (MethodArg::Svd, Some(_)) if conv_rank == Some(0) => {
            return Err(Error::Usage("--conv-rank must be at least 1".into()))
        }
        (MethodArg::Svd, Some(rank)) => Method::Svd { rank, conv_rank },
        (MethodArg::Svd, None) => {
            return Err(Error::Usage(
                "--method svd needs --rank N (the output rank per module)".into(),
            ))
        }
        (m, Some(_)) => {
            return Err(Error::Usage(format!(
                "--rank only applies to --method svd (got --method {})",
                if m == MethodArg::Exact {
                    "exact"
                } else {
                    "linear"
                }
            )))
        }
    };
    if conv_rank.is_some() && method != MethodArg::Svd {
        return Err(Error::Usage(
            "--conv-rank only applies to --method svd".into(),
        ));
    }
    Ok(m)
}

pub fn run(args: &UniformArgs) -> Result<()> {
    let t0 = Instant::now();
    let refs = super::adapter_refs(&args.inputs.adapters, args.inputs.adapters_file.as_deref())?;
    let method = parse_method(args.method, args.rank, args.conv_rank)?;
    let weights = Weights::uniform(refs.len(), &args.weights)?;
    let in_format = super::input_format(&args.input_format);

    // Refuse a bad output before reading anything large.
    let given_paths: Vec<PathBuf> = refs.iter().map(PathBuf::from).collect();
    atomic::preflight(&args.output, args.force, &given_paths)?;

    let mut set = AdapterSet::load_as(&refs, in_format)?;
    let out_format = match args.output_format {
        Some(OutputFormatArg::Peft) => Format::Peft,
        Some(OutputFormatArg::Kohya) => Format::Kohya,
        Some(OutputFormatArg::Diffusers) => Format::Diffusers,
        None => match set.formats().as_slice() {
            [one] => *one,
            many => {
                let names: Vec<String> = set
                    .adapters
                    .iter()
                    .map(|a| format!("{} ({})", a.given, a.format.name()))
                    .collect();
                return Err(Error::Usage(format!(
                    "the adapters are in different layouts ({}): {}; pass --output-format \
                     peft, kohya or diffusers to choose the layout of the merge",
                    many.iter().map(|f| f.name()).collect::<Vec<_>>().join(", "),
                    names.join(", ")
                )));
            }
        },
    };
    if set.has_sd_layout() || out_format != Format::Peft {
        set.align_sd_names()?;
    }
    let input_files: Vec<PathBuf> = set
        .adapters
        .iter()
        .flat_map(|a| a.files.iter().map(|f| f.path.clone()))
        .collect();
    atomic::preflight(&args.output, args.force, &input_files)?;
    let report = set.check(args.strict, args.allow_base_mismatch)?;
    let load_s = t0.elapsed().as_secs_f64();

    let dtype = match args.dtype {
        Some(DTypeArg::F32) => DType::F32,
        Some(DTypeArg::F16) => DType::F16,
        Some(DTypeArg::Bf16) => DType::BF16,
        None => set.common_dtype(),
    };

    let n_modules = set
        .adapters
        .iter()
        .flat_map(|a| a.modules.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let bar = super::progress(n_modules as u64, "merging");
    let t1 = Instant::now();
    let modules = merge::merge(&set, &weights, method, &|| bar.inc(1))?;
    bar.finish_and_clear();
    let merge_s = t1.elapsed().as_secs_f64();

    let record = MergeRecord {
        set: &set,
        report: &report,
        weights: &weights,
        method,
        dtype,
        modules: &modules,
        timings: json!({"load_s": load_s, "merge_s": merge_s}),
        format: out_format,
        fit: None,
    };
    let t2 = Instant::now();
    let (out_dir, written) = write_merge(&args.output, &record)?;
    let write_s = t2.elapsed().as_secs_f64();
    let total_s = t0.elapsed().as_secs_f64();

    let partial = modules
        .iter()
        .filter(|m| m.sources.len() < set.adapters.len())
        .count();
    let max_err = modules
        .iter()
        .map(|m| m.factored.rel_error)
        .fold(0.0f64, f64::max);
    let ranks = modules.iter().map(|m| m.factored.rank);
    let (rmin, rmax) = (ranks.clone().min().unwrap_or(0), ranks.max().unwrap_or(0));
    if args.json {
        super::print_json(&json!({
            "output": out_dir,
            "method": method,
            "output_format": out_format,
            "dtype": dtype,
            "adapters": set.adapters.len(),
            "weights": weights.global,
            "modules": modules.len(),
            "partial_modules": partial,
            "rank_min": rmin,
            "rank_max": rmax,
            "max_rel_error": max_err,
            "files": written,
            "timings": {"load_s": load_s, "merge_s": merge_s, "write_s": write_s, "total_s": total_s},
        }))?;
    } else {
        eprintln!(
            "loaded {} adapters in {:.2} s; merged {} modules ({}, output rank {}{}, max relative error {:.2e}) in {:.2} s",
            set.adapters.len(),
            load_s,
            modules.len(),
            method.name(),
            rmin,
            if rmax != rmin { format!("..{rmax}") } else { String::new() },
            max_err,
            merge_s
        );
        if partial > 0 {
            eprintln!(
                "note: {partial} modules are adapted by only some adapters and were merged from those (see merge_manifest.json; --strict refuses this)"
            );
        }
        if method == Method::Linear {
            eprintln!("note: --method linear is PEFT-compatible averaging, not the weighted sum of deltas; its error is recorded per module");
        }
        let size: u64 = written.values().map(|w| w.size).sum();
        eprintln!(
            "wrote {} ({} files, {})",
            out_dir.display(),
            written.len() + 1,
            super::human_bytes(size)
        );
    }
    Ok(())
}

fn same<T: PartialEq + Clone>(mut it: impl Iterator<Item = T>) -> Option<T> {
    let first = it.next()?;
    it.all(|x| x == first).then_some(first)
}

/// Write adapter, card and manifest atomically into `out`. Shared by every
/// command that produces a merged adapter.
pub fn write_merge(
    out: &std::path::Path,
    rec: &MergeRecord,
) -> Result<(PathBuf, BTreeMap<String, WrittenFile>)> {
    let set = rec.set;
    let n = set.adapters.len();
    let all_modules_everywhere = rec.modules.iter().all(|m| m.sources.len() == n);
    let facts = peft::ConfigFacts {
        base_model: same(
            set.adapters
                .iter()
                .map(|a| a.config.base_model_name_or_path.clone()),
        )
        .flatten()
        .or_else(|| {
            set.adapters
                .iter()
                .find_map(|a| a.config.base_model_name_or_path.clone())
        }),
        revision: same(set.adapters.iter().map(|a| a.config.revision.clone())).flatten(),
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

    if rec.format != Format::Kohya {
        if let Some(m) = rec
            .modules
            .iter()
            .find(|m| sdnames::is_unmapped_sgm_key(&m.name))
        {
            return Err(Error::Usage(format!(
                "module {} is named after the original SGM UNet but is not a layer lora-merge \
                 can map to diffusers' UNet, so it has no {} name; write --output-format kohya",
                m.name,
                rec.format.name()
            )));
        }
    }

    let staging = Staging::new(out)?;
    let mut written = BTreeMap::new();

    let weights_file = match rec.format {
        Format::Peft => "adapter_model.safetensors",
        Format::Kohya => kohya::FILE_NAME,
        Format::Diffusers => diffusers::FILE_NAME,
    };
    let (tensors, metadata) = match rec.format {
        Format::Peft => (
            peft::tensors(rec.modules, rec.dtype),
            BTreeMap::from([("format".to_string(), "pt".to_string())]),
        ),
        Format::Kohya => {
            let facts = kohya::MergeFacts {
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
                method: rec.method.name(),
                weights: serde_json::to_string(&rec.weights.global)
                    .map_err(|e| Error::Internal(e.to_string()))?,
            };
            (
                kohya::tensors(rec.modules, rec.dtype),
                kohya::metadata(rec.modules, &facts),
            )
        }
        Format::Diffusers => (
            diffusers::tensors(rec.modules, rec.dtype),
            diffusers::metadata(rec.modules),
        ),
    };
    let adapter =
        staging.write_with(weights_file, |w| safetensors::write(w, &tensors, &metadata))?;
    drop(tensors);
    written.insert(weights_file.to_string(), adapter.clone());

    if rec.format == Format::Peft {
        let config = peft::config(rec.modules, &facts);
        let config_text = serde_json::to_string_pretty(&config)
            .map_err(|e| Error::Internal(e.to_string()))?
            + "\n";
        written.insert(
            "adapter_config.json".into(),
            staging.write("adapter_config.json", config_text.as_bytes())?,
        );
    }

    // argv[0] is wherever the binary happened to be; the card shows the command.
    let argv = super::command_line();
    let command = argv
        .iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ");
    // Hub references pinned to the commits merged, so the card's command
    // gives these bytes again whatever the branches do later.
    let pins: Vec<(String, String)> = set
        .adapters
        .iter()
        .filter_map(|a| {
            a.resolved
                .pinned()
                .map(|p| (a.given.clone(), p.to_string()))
        })
        .chain(rec.fit.iter().flat_map(|f| f.pins.iter().cloned()))
        .collect();
    let reproduce = argv
        .iter()
        .map(|a| {
            let pinned = pins.iter().find(|(g, _)| g == a).map(|(_, p)| p.as_str());
            shell_quote(pinned.unwrap_or(a))
        })
        .collect::<Vec<_>>()
        .join(" ");
    let license = same(set.adapters.iter().map(|a| card_license(a.resolved.dir()))).flatten();
    let card = Card {
        base_model: facts.base_model.as_deref(),
        method: rec.method.name(),
        method_note: match rec.method {
            Method::Exact => "Exact: the factors are stacked, so the adapter's delta is exactly the weighted sum of the inputs' deltas.",
            Method::Svd { .. } => "SVD: the best low-rank approximation of the exact weighted sum; per-module error in the manifest.",
            Method::Linear => "Linear: A and B averaged separately as PEFT's `linear` does; approximate (cross terms), error per module in the manifest.",
        },
        inputs: set
            .adapters
            .iter()
            .zip(&rec.weights.global)
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
        modules: rec.modules.len(),
        command: &command,
        reproduce: &reproduce,
        license: license.as_deref(),
        adapter_sha256: &adapter.sha256,
        format: rec.format.name(),
        weights_file,
        extra_section: rec.fit.as_ref().map(|f| f.card_section.as_str()),
    };
    for (name, bytes) in rec.fit.iter().flat_map(|f| f.files.iter()) {
        written.insert(name.clone(), staging.write(name, bytes)?);
    }
    written.insert(
        "README.md".into(),
        staging.write("README.md", card.render().as_bytes())?,
    );

    let inputs: Vec<Value> = set
        .adapters
        .iter()
        .enumerate()
        .map(|(i, a)| {
            json!({
                "given": a.given,
                "format": a.format,
                "resolved": a.resolved,
                "files": a.files,
                "rank": a.config.r,
                "lora_alpha": a.config.lora_alpha,
                "use_rslora": a.config.use_rslora,
                "rank_pattern": a.config.rank_pattern,
                "alpha_pattern": a.config.alpha_pattern,
                "base_model": a.config.base_model_name_or_path,
                "base_model_revision": a.config.revision,
                "modules": a.modules.len(),
                "weight": rec.weights.global.get(i),
            })
        })
        .collect();
    let manifest = Manifest {
        tool: Tool::this(),
        created: manifest::timestamp(),
        command_line: argv,
        method: json!({
            "name": rec.method.name(),
            "rank": match rec.method { Method::Svd { rank, .. } => Some(rank), _ => None },
            "conv_rank": match rec.method { Method::Svd { conv_rank, .. } => conv_rank, _ => None },
            "output_format": rec.format,
            "dtype": rec.dtype,
            "approximate": rec.method != Method::Exact,
            "svd_factor_split": matches!(rec.method, Method::Svd { .. }).then_some("balanced: B = Q_B U sqrt(S), A = sqrt(S) V^T Q_A^T"),
        }),
        weights: serde_json::to_value(rec.weights).map_err(|e| Error::Internal(e.to_string()))?,
        inputs,
        base_model: json!({"name": facts.base_model, "revision": facts.revision}),
        compatibility: serde_json::to_value(rec.report)
            .map_err(|e| Error::Internal(e.to_string()))?,
        modules: rec
            .modules
            .iter()
            .map(|m| {
                (
                    m.name.clone(),
                    ModuleRecord {
                        rank: m.factored.rank,
                        rel_error: m.factored.rel_error,
                        energy: m.factored.energy,
                        adapters: m.sources.clone(),
                    },
                )
            })
            .collect(),
        timings: rec.timings.clone(),
        fit: rec.fit.as_ref().map(|f| f.manifest.clone()),
        training: None,
        outputs: written.clone(),
    };
    let manifest_text =
        serde_json::to_string_pretty(&manifest).map_err(|e| Error::Internal(e.to_string()))? + "\n";
    staging.write(manifest::FILE_NAME, manifest_text.as_bytes())?;
    let dir = staging.commit()?;
    Ok((dir, written))
}

/// The `license:` an adapter's own model card (README.md beside it)
/// declares in its front matter, if any.
fn card_license(dir: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("README.md")).ok()?;
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

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@+,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn license_from_an_adapters_own_card() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        assert_eq!(card_license(d), None);
        std::fs::write(
            d.join("README.md"),
            "---\nbase_model: x\nlicense: 'mit'\ntags:\n- lora\n---\n# hi\nlicense: no\n",
        )
        .unwrap();
        assert_eq!(card_license(d).as_deref(), Some("mit"));
        std::fs::write(d.join("README.md"), "# no front matter\nlicense: mit\n").unwrap();
        assert_eq!(card_license(d), None);
        std::fs::write(d.join("README.md"), "---\ntags: []\n---\nlicense: mit\n").unwrap();
        assert_eq!(card_license(d), None);
    }
}
