//! diffusers' layout (`pytorch_lora_weights.safetensors`): from key names,
//! shapes and metadata to [`LoraModule`]s.
//!
//! Keys are PEFT's, prefixed by the pipeline component instead of
//! `base_model.model.`: `unet.<path>.lora_A.weight` / `.lora_B.weight`
//! (also the older `unet.<path>.lora.down.weight` / `.lora.up.weight`).
//! The optional `lora_adapter_metadata` metadata entry is a JSON object of
//! each component's LoRA config with keys prefixed by the component
//! (`"unet.r"`, `"unet.lora_alpha"`, `"unet.rank_pattern"`, ...), as
//! diffusers' `_save_lora_weights` packs it. Without it, diffusers takes
//! each module's rank from its shapes and alpha = rank (scale 1).

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::config::PeftConfig;
use super::format::DIFFUSERS_METADATA_KEY;
use super::peft::pair_shape;
use super::sdnames::{self, Component};
use super::LoraModule;
use crate::error::{Error, Result};
use crate::tensors::safetensors::SafetensorsFile;
use crate::tensors::TensorRef;

/// The per-component configs of `lora_adapter_metadata`, by component name.
fn component_configs(file: &SafetensorsFile) -> Result<BTreeMap<&'static str, PeftConfig>> {
    let Some(text) = file.metadata.get(DIFFUSERS_METADATA_KEY) else {
        return Ok(BTreeMap::new());
    };
    let invalid = |msg: String| Error::invalid(&file.path, msg);
    let v: Value = serde_json::from_str(text)
        .map_err(|e| invalid(format!("{DIFFUSERS_METADATA_KEY} is not valid JSON: {e}")))?;
    let Value::Object(map) = v else {
        return Err(invalid(format!(
            "{DIFFUSERS_METADATA_KEY} is not a JSON object"
        )));
    };
    let mut grouped: BTreeMap<&'static str, Map<String, Value>> = BTreeMap::new();
    for (k, v) in map {
        // Longest component name first: `text_encoder_2.r` is not
        // `text_encoder` + `_2.r`, and split_diffusers splits at the dot.
        let Some((c, field)) = sdnames::split_diffusers(&k) else {
            return Err(invalid(format!(
                "{DIFFUSERS_METADATA_KEY} key {k:?} names no known component (unet, \
                 text_encoder, text_encoder_2)"
            )));
        };
        grouped
            .entry(c.diffusers)
            .or_default()
            .insert(field.to_string(), v);
    }
    let mut out = BTreeMap::new();
    for (c, mut fields) in grouped {
        // diffusers builds a LoraConfig from these fields, which is a LoRA
        // config whatever peft_type says (it may be absent).
        fields.insert("peft_type".into(), Value::String("LORA".into()));
        let bytes = serde_json::to_vec(&fields).map_err(|e| Error::Internal(e.to_string()))?;
        let cfg = PeftConfig::parse(&file.path, &bytes)
            .map_err(|e| invalid(format!("{DIFFUSERS_METADATA_KEY} for component {c}: {e}")))?;
        out.insert(c, cfg);
    }
    Ok(out)
}

#[derive(Default)]
struct Pair<'a> {
    a: Option<&'a TensorRef>,
    b: Option<&'a TensorRef>,
}

/// Build the modules of one diffusers file.
pub fn build_modules(file: &SafetensorsFile) -> Result<BTreeMap<String, LoraModule>> {
    let invalid = |msg: String| Error::invalid(&file.path, msg);
    let configs = component_configs(file)?;
    let mut pairs: BTreeMap<(String, String), (Component, Pair)> = BTreeMap::new();
    for (key, tensor) in &file.tensors {
        let (module, is_a) = if let Some(m) = key
            .strip_suffix(".lora_A.weight")
            .or_else(|| key.strip_suffix(".lora.down.weight"))
        {
            (m, true)
        } else if let Some(m) = key
            .strip_suffix(".lora_B.weight")
            .or_else(|| key.strip_suffix(".lora.up.weight"))
        {
            (m, false)
        } else {
            return Err(invalid(format!(
                "tensor {key} is not a diffusers LoRA factor (expected .lora_A.weight / \
                 .lora_B.weight, or .lora.down.weight / .lora.up.weight)"
            )));
        };
        let Some((component, path)) = sdnames::split_diffusers(module) else {
            return Err(invalid(format!(
                "tensor {key}: unknown component (only unet, text_encoder and text_encoder_2 \
                 are supported)"
            )));
        };
        if path.is_empty() {
            return Err(invalid(format!("tensor {key} names no module")));
        }
        let entry = pairs
            .entry((component.diffusers.to_string(), path.to_string()))
            .or_insert_with(|| (component, Pair::default()));
        let slot = if is_a { &mut entry.1.a } else { &mut entry.1.b };
        if let Some(prev) = slot.replace(tensor) {
            return Err(invalid(format!(
                "tensors {} and {key} are the same factor of module {module}",
                prev.name
            )));
        }
    }

    let mut modules = BTreeMap::new();
    for ((_, path), (component, pair)) in pairs {
        let dotted = format!("{}.{path}", component.diffusers);
        let pair = crate::adapter::pair_factors(pair.a, pair.b, "A factor", "B factor")
            .map_err(&invalid)?;
        let (a, b) = match pair {
            Some(ab) => ab,
            None => continue,
        };
        let (rank, rank_b, fan_in, fan_out, kind) =
            pair_shape(&dotted, a, b, false).map_err(&invalid)?;
        let config = configs.get(component.diffusers);
        let want = config.map_or(rank, |c| c.rank_for(&path));
        if rank != rank_b || rank != want || rank == 0 {
            return Err(invalid(format!(
                "rank mismatch in module {dotted}: {} {:?} and {} {:?}{}",
                a.name,
                a.shape,
                b.name,
                b.shape,
                if config.is_some() {
                    format!(", but {DIFFUSERS_METADATA_KEY} sets rank {want}")
                } else {
                    String::new()
                }
            )));
        }
        let (alpha, scale) = match config {
            Some(c) => (c.alpha_for(&path), c.scale_for(&path)),
            None => (rank as f64, 1.0),
        };
        let name = sdnames::key(component, &path);
        if modules.contains_key(&name) {
            return Err(invalid(format!(
                "module {dotted} appears twice once '.' and '_' are treated alike"
            )));
        }
        modules.insert(
            name.clone(),
            LoraModule {
                name,
                kind,
                rank,
                alpha,
                scale,
                fan_in,
                fan_out,
                a: a.clone(),
                b: b.clone(),
                path: Some(dotted),
                sgm_name: None,
            },
        );
    }
    if modules.is_empty() {
        return Err(invalid(
            "no LoRA tensors (lora_A/lora_B) found: nothing to merge".into(),
        ));
    }
    Ok(modules)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::testutil::{write_safetensors_with_metadata, TestTensor};
    use crate::tensors::DType;

    fn build(tensors: &[TestTensor], meta: Option<Value>) -> Result<BTreeMap<String, LoraModule>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pytorch_lora_weights.safetensors");
        let mut md = serde_json::json!({"format": "pt"});
        if let Some(m) = meta {
            md[DIFFUSERS_METADATA_KEY] = Value::String(m.to_string());
        }
        write_safetensors_with_metadata(&path, tensors, md);
        let file = SafetensorsFile::open(&path).unwrap();
        build_modules(&file)
    }

    fn t(name: &str, shape: &[usize]) -> TestTensor {
        TestTensor::ramp(name, DType::F32, shape)
    }

    #[test]
    fn with_and_without_metadata() {
        let p = "down_blocks.0.attentions.0.proj_in";
        let tensors = [
            t(&format!("unet.{p}.lora_A.weight"), &[4, 6]),
            t(&format!("unet.{p}.lora_B.weight"), &[5, 4]),
            t("text_encoder.text_model.x.q_proj.lora.down.weight", &[2, 3]),
            t("text_encoder.text_model.x.q_proj.lora.up.weight", &[3, 2]),
        ];
        let m = build(&tensors, None).unwrap();
        let k = "lora_unet_down_blocks_0_attentions_0_proj_in";
        assert_eq!(m[k].scale, 1.0);
        assert_eq!(m[k].path.as_deref(), Some(&*format!("unet.{p}")));
        assert!(m.contains_key("lora_te1_text_model_x_q_proj"));

        let meta = serde_json::json!({
            "unet.r": 4, "unet.lora_alpha": 8,
            "text_encoder.r": 2, "text_encoder.lora_alpha": 2,
            "text_encoder.alpha_pattern": {"q_proj": 1},
        });
        let m = build(&tensors, Some(meta)).unwrap();
        assert_eq!(m[k].scale, 2.0);
        assert_eq!(m["lora_te1_text_model_x_q_proj"].scale, 0.5);

        let bad = serde_json::json!({"unet.r": 8});
        let e = build(&tensors, Some(bad)).unwrap_err().to_string();
        assert!(e.contains("sets rank 8"), "{e}");
        let e = build(&tensors, Some(serde_json::json!({"vae.r": 8})))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no known component"), "{e}");
    }
}
