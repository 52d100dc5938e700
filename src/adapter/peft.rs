//! PEFT's tensor layout: from key names and shapes to [`LoraModule`]s.
//!
//! Key forms (the adapter-name segment such as `default` is optional, PEFT
//! strips it when saving but older tools did not):
//!
//! - `base_model.model.<module>.lora_A[.<name>].weight`, likewise `lora_B`
//! - `base_model.model.<module>.lora_embedding_A[.<name>]`, likewise `_B`
//!
//! Anything else is a tensor a merged LoRA adapter cannot carry, and is
//! refused by name rather than silently dropped.

use std::collections::BTreeMap;
use std::path::Path;

use super::config::PeftConfig;
use super::{LoraModule, ModuleKind};
use crate::error::{Error, Result};
use crate::tensors::safetensors::SafetensorsFile;
use crate::tensors::TensorRef;

/// Prefix PEFT puts before every module path when saving.
pub const KEY_PREFIX: &str = "base_model.model.";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Factor {
    A,
    B,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Weight,
    Embedding,
}

/// What a tensor key says about itself.
#[derive(Debug, PartialEq, Eq)]
enum KeyKind<'a> {
    Lora {
        module: &'a str,
        factor: Factor,
        family: Family,
    },
    Dora,
    LoraBias,
    Other,
}

fn classify(key: &str) -> KeyKind<'_> {
    let segs: Vec<&str> = key.split('.').collect();
    if segs.iter().any(|s| s.starts_with("lora_magnitude_vector")) {
        return KeyKind::Dora;
    }
    // The LoRA segment is at most two from the end: `.lora_A.weight`,
    // `.lora_A.default.weight`, `.lora_embedding_A`, `.lora_embedding_A.default`.
    let n = segs.len();
    for back in 1..=3usize.min(n) {
        let i = n - back;
        let Some(seg) = segs.get(i) else { continue };
        let (factor, family) = match *seg {
            "lora_A" => (Factor::A, Family::Weight),
            "lora_B" => (Factor::B, Family::Weight),
            "lora_embedding_A" => (Factor::A, Family::Embedding),
            "lora_embedding_B" => (Factor::B, Family::Embedding),
            _ => continue,
        };
        let tail = segs.get(i + 1..).unwrap_or(&[]);
        let ok = match family {
            Family::Weight => matches!(tail, ["weight"] | [_, "weight"]),
            Family::Embedding => tail.len() <= 1,
        };
        if !ok {
            if family == Family::Weight && matches!(tail.last(), Some(&"bias")) {
                return KeyKind::LoraBias;
            }
            return KeyKind::Other;
        }
        // Byte length of the segments before the LoRA one, without the
        // joining dot; the split above guarantees this is a char boundary.
        let module_len = segs[..i].iter().map(|s| s.len() + 1).sum::<usize>();
        let module = key.get(..module_len.saturating_sub(1)).unwrap_or("");
        if module.is_empty() {
            return KeyKind::Other;
        }
        return KeyKind::Lora {
            module,
            factor,
            family,
        };
    }
    KeyKind::Other
}

#[derive(Default)]
struct Pair<'a> {
    a: Option<&'a TensorRef>,
    b: Option<&'a TensorRef>,
    family: Option<Family>,
}

/// Build the modules of one adapter. `config_path` is named in errors that
/// involve the config's rank.
pub fn build_modules(
    file: &SafetensorsFile,
    config: &PeftConfig,
    config_path: &Path,
) -> Result<BTreeMap<String, LoraModule>> {
    let path = &file.path;
    let invalid = |msg: String| Error::invalid(path, msg);
    let mut pairs: BTreeMap<String, Pair> = BTreeMap::new();

    for (key, tensor) in &file.tensors {
        let (module, factor, family) = match classify(key) {
            KeyKind::Lora {
                module,
                factor,
                family,
            } => (module, factor, family),
            KeyKind::Dora => {
                return Err(invalid(format!(
                    "tensor {key} is a DoRA magnitude vector: DoRA needs the base weights, \
                     so a DoRA adapter cannot be merged from its files alone"
                )))
            }
            KeyKind::LoraBias => {
                return Err(invalid(format!(
                    "tensor {key} is a lora_B bias (lora_bias=True), which a merged \
                     low-rank adapter cannot represent"
                )))
            }
            KeyKind::Other => {
                return Err(invalid(format!(
                    "modules_to_save tensors (e.g. a classifier head) cannot be merged from \
                     adapter files: {key} is not a LoRA factor (only lora_A/lora_B and \
                     lora_embedding_A/lora_embedding_B tensors are supported)"
                )))
            }
        };
        let Some(module) = module.strip_prefix(KEY_PREFIX) else {
            return Err(invalid(format!(
                "tensor {key} does not start with PEFT's {KEY_PREFIX:?}: this is not a PEFT \
                 adapter file (pass --format kohya or --format diffusers for those layouts)"
            )));
        };
        let pair = pairs.entry(module.to_string()).or_default();
        if pair.family.is_some_and(|f| f != family) {
            return Err(invalid(format!(
                "module {module} has both lora_A/lora_B and lora_embedding_A/lora_embedding_B \
                 tensors (at {key})"
            )));
        }
        pair.family = Some(family);
        let slot = match factor {
            Factor::A => &mut pair.a,
            Factor::B => &mut pair.b,
        };
        if let Some(prev) = slot.replace(tensor) {
            return Err(invalid(format!(
                "tensors {} and {key} are the same factor of module {module} (a file with \
                 several adapter names?)",
                prev.name
            )));
        }
    }

    let mut modules = BTreeMap::new();
    for (name, pair) in pairs {
        let factors =
            crate::adapter::pair_factors(pair.a, pair.b, "lora_A", "lora_B").map_err(&invalid)?;
        let (a, b) = match factors {
            Some(ab) => ab,
            None => continue,
        };
        let family = pair.family.unwrap_or(Family::Weight);
        let module = build_one(&name, a, b, family, config, config_path).map_err(&invalid)?;
        modules.insert(name, module);
    }
    if modules.is_empty() {
        return Err(invalid(
            "no LoRA tensors (lora_A/lora_B) found: nothing to merge".into(),
        ));
    }
    Ok(modules)
}

fn shape_str(t: &TensorRef) -> String {
    format!("{} {:?}", t.name, t.shape)
}

/// Shapes of one A/B pair, checked against each other and the config.
fn build_one(
    name: &str,
    a: &TensorRef,
    b: &TensorRef,
    family: Family,
    config: &PeftConfig,
    config_path: &Path,
) -> Result<LoraModule, String> {
    let (rank_a, rank_b, fan_in, fan_out, kind) =
        pair_shape(name, a, b, family == Family::Embedding)?;
    let both = || format!("{} and {}", shape_str(a), shape_str(b));
    let rank = config.rank_for(name);
    if rank_a != rank_b || rank_a != rank {
        return Err(format!(
            "rank mismatch in module {name}: {}, but {} sets rank {rank} for this module",
            both(),
            config_path.display()
        ));
    }
    Ok(LoraModule {
        name: name.to_string(),
        kind,
        rank,
        alpha: config.alpha_for(name),
        scale: config.scale_for(name),
        fan_in,
        fan_out,
        a: a.clone(),
        b: b.clone(),
        path: None,
        sgm_name: None,
    })
}

/// Ranks, fan-in, fan-out and kind of an A/B pair from its shapes alone:
/// linear `[r, in]`/`[out, r]`, conv `[r, in, kh, kw]`/`[out, r, 1, 1]`
/// (1-3 spatial dims), embedding `[r, num]`/`[dim, r]`. Shared by every
/// layout; the caller checks the two ranks against each other and its config.
pub(crate) fn pair_shape(
    name: &str,
    a: &TensorRef,
    b: &TensorRef,
    embedding: bool,
) -> Result<(usize, usize, usize, usize, ModuleKind), String> {
    let both = || format!("{} and {}", shape_str(a), shape_str(b));
    Ok(match (embedding, &a.shape[..], &b.shape[..]) {
        (false, [ra, inp], [out, rb]) => (*ra, *rb, *inp, *out, ModuleKind::Linear),
        (false, [ra, kernel @ ..], [out, rb, ones @ ..])
            if (2..=4).contains(&kernel.len()) && ones.len() + 1 == kernel.len() =>
        {
            if ones.iter().any(|&d| d != 1) {
                return Err(format!(
                    "module {name} is a convolution but lora_B's kernel is not all 1: {}",
                    both()
                ));
            }
            let fan_in = kernel
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| format!("module {name}: kernel too large: {}", both()))?;
            let kind = ModuleKind::Conv {
                kernel: kernel.to_vec(),
            };
            (*ra, *rb, fan_in, *out, kind)
        }
        (true, [ra, num], [dim, rb]) => (*ra, *rb, *num, *dim, ModuleKind::Embedding),
        _ => {
            return Err(format!(
                "module {name} has factor shapes that are not a LoRA pair: {}",
                both()
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::testutil::{config_json, write_safetensors, TestTensor};
    use crate::tensors::DType;
    use std::path::PathBuf;

    fn cfg(json: serde_json::Value) -> PeftConfig {
        PeftConfig::parse(
            Path::new("adapter_config.json"),
            json.to_string().as_bytes(),
        )
        .unwrap()
    }

    fn build(tensors: &[TestTensor], config: &PeftConfig) -> Result<BTreeMap<String, LoraModule>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adapter_model.safetensors");
        write_safetensors(&path, tensors);
        let file = SafetensorsFile::open(&path).unwrap();
        build_modules(&file, config, &PathBuf::from("adapter_config.json"))
    }

    fn t(name: &str, shape: &[usize]) -> TestTensor {
        TestTensor::ramp(name, DType::F32, shape)
    }

    #[test]
    fn classify_keys() {
        let m = "base_model.model.model.layers.0.q_proj";
        assert_eq!(
            classify("base_model.model.model.layers.0.q_proj.lora_A.weight"),
            KeyKind::Lora {
                module: m,
                factor: Factor::A,
                family: Family::Weight
            }
        );
        assert_eq!(
            classify("base_model.model.model.layers.0.q_proj.lora_B.default.weight"),
            KeyKind::Lora {
                module: m,
                factor: Factor::B,
                family: Family::Weight
            }
        );
        assert_eq!(
            classify("base_model.model.emb.lora_embedding_A.default"),
            KeyKind::Lora {
                module: "base_model.model.emb",
                factor: Factor::A,
                family: Family::Embedding
            }
        );
        assert_eq!(
            classify("base_model.model.x.lora_magnitude_vector"),
            KeyKind::Dora
        );
        assert_eq!(
            classify("base_model.model.x.lora_B.bias"),
            KeyKind::LoraBias
        );
        assert_eq!(classify("base_model.model.score.weight"), KeyKind::Other);
        assert_eq!(classify("lora_A.weight"), KeyKind::Other);
        assert_eq!(classify(""), KeyKind::Other);
    }

    #[test]
    fn linear_conv_embedding_modules() {
        let config = cfg(config_json(4, 12.0, &[("conv", 2)], &[("emb", 3.0)]));
        let p = "base_model.model.";
        let tensors = [
            t(&format!("{p}layers.0.q_proj.lora_A.weight"), &[4, 6]),
            t(&format!("{p}layers.0.q_proj.lora_B.weight"), &[5, 4]),
            t(&format!("{p}conv.lora_A.default.weight"), &[2, 3, 3, 3]),
            t(&format!("{p}conv.lora_B.default.weight"), &[7, 2, 1, 1]),
            t(&format!("{p}emb.lora_embedding_A"), &[4, 10]),
            t(&format!("{p}emb.lora_embedding_B"), &[8, 4]),
        ];
        let m = build(&tensors, &config).unwrap();
        assert_eq!(
            m.keys().collect::<Vec<_>>(),
            ["conv", "emb", "layers.0.q_proj"]
        );
        let q = &m["layers.0.q_proj"];
        assert_eq!((q.rank, q.fan_in, q.fan_out), (4, 6, 5));
        assert_eq!(q.kind, ModuleKind::Linear);
        assert_eq!((q.alpha, q.scale), (12.0, 3.0));
        // The ramp helper fills 0.5, 1.0, 1.5, ...
        assert_eq!(q.a.to_f32()[..3], [0.5, 1.0, 1.5]);
        let c = &m["conv"];
        assert_eq!(
            c.kind,
            ModuleKind::Conv {
                kernel: vec![3, 3, 3]
            }
        );
        assert_eq!((c.rank, c.fan_in, c.fan_out, c.scale), (2, 27, 7, 6.0));
        let e = &m["emb"];
        assert_eq!(e.kind, ModuleKind::Embedding);
        assert_eq!((e.fan_in, e.fan_out, e.alpha, e.scale), (10, 8, 3.0, 0.75));
    }

    fn msg(r: Result<BTreeMap<String, LoraModule>>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn missing_partner_is_named() {
        let config = cfg(config_json(4, 8.0, &[], &[]));
        let e = msg(build(
            &[t("base_model.model.q.lora_A.weight", &[4, 6])],
            &config,
        ));
        assert!(
            e.contains("base_model.model.q.lora_A.weight has no matching lora_B"),
            "{e}"
        );
        let e = msg(build(
            &[t("base_model.model.q.lora_B.weight", &[6, 4])],
            &config,
        ));
        assert!(e.contains("no matching lora_A"), "{e}");
    }

    #[test]
    fn rank_mismatch_names_both_shapes() {
        let config = cfg(config_json(4, 8.0, &[], &[]));
        let e = msg(build(
            &[
                t("base_model.model.q.lora_A.weight", &[2, 6]),
                t("base_model.model.q.lora_B.weight", &[5, 2]),
            ],
            &config,
        ));
        assert!(e.contains("[2, 6]") && e.contains("[5, 2]"), "{e}");
        assert!(e.contains("sets rank 4"), "{e}");
        let e = msg(build(
            &[
                t("base_model.model.q.lora_A.weight", &[4, 6]),
                t("base_model.model.q.lora_B.weight", &[5, 3]),
            ],
            &config,
        ));
        assert!(e.contains("rank mismatch in module q"), "{e}");
    }

    #[test]
    fn conv_b_must_be_pointwise() {
        let config = cfg(config_json(2, 8.0, &[], &[]));
        let e = msg(build(
            &[
                t("base_model.model.c.lora_A.weight", &[2, 3, 3, 3]),
                t("base_model.model.c.lora_B.weight", &[4, 2, 3, 3]),
            ],
            &config,
        ));
        assert!(e.contains("not all 1"), "{e}");
    }

    #[test]
    fn refusals() {
        let config = cfg(config_json(4, 8.0, &[], &[]));
        let a = t("base_model.model.q.lora_A.weight", &[4, 6]);
        let b = t("base_model.model.q.lora_B.weight", &[5, 4]);
        let e = msg(build(
            &[
                a.clone(),
                b.clone(),
                t("base_model.model.score.weight", &[2, 5]),
            ],
            &config,
        ));
        assert!(e.contains("modules_to_save tensors"), "{e}");
        assert!(e.contains("base_model.model.score.weight"), "{e}");
        let e = msg(build(
            &[
                a.clone(),
                b.clone(),
                t("base_model.model.q.lora_magnitude_vector", &[5]),
            ],
            &config,
        ));
        assert!(e.contains("DoRA"), "{e}");
        let e = msg(build(
            &[
                a.clone(),
                b.clone(),
                t("base_model.model.q.lora_B.bias", &[5]),
            ],
            &config,
        ));
        assert!(e.contains("lora_bias"), "{e}");
        let e = msg(build(
            &[
                t("model.q.lora_A.weight", &[4, 6]),
                t("model.q.lora_B.weight", &[5, 4]),
            ],
            &config,
        ));
        assert!(e.contains("not a PEFT adapter file"), "{e}");
        let e = msg(build(
            &[
                a.clone(),
                b,
                t("base_model.model.q.lora_A.other.weight", &[4, 6]),
            ],
            &config,
        ));
        assert!(e.contains("same factor of module q"), "{e}");
        let e = msg(build(&[], &config));
        assert!(e.contains("nothing to merge"), "{e}");
    }
}
