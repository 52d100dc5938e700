//! The merged adapter in diffusers' layout: `pytorch_lora_weights.safetensors`
//! with component-prefixed PEFT keys and a `lora_adapter_metadata` entry.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use super::safetensors::OutTensor;
use crate::adapter::format::DIFFUSERS_METADATA_KEY;
use crate::adapter::sdnames;
use crate::compose::merge::MergedModule;
use crate::tensors::DType;

pub use crate::layout::DIFFUSERS_WEIGHTS as FILE_NAME;

/// Dotted path with component of every module: the inputs' path when known,
/// else rebuilt from the alignment key; plain PEFT names (never aligned)
/// are taken as UNet paths.
fn dotted_paths(modules: &[MergedModule]) -> Vec<String> {
    modules
        .iter()
        .map(|m| {
            m.path
                .clone()
                .or_else(|| sdnames::dotted_from_key(&m.name))
                .unwrap_or_else(|| format!("{}.{}", sdnames::UNET.diffusers, m.name))
        })
        .collect()
}

pub fn tensors(modules: &[MergedModule], dtype: DType) -> BTreeMap<String, OutTensor<'_>> {
    let mut out = BTreeMap::new();
    for (m, path) in modules.iter().zip(dotted_paths(modules)) {
        let (a_shape, b_shape) = super::factor_shapes(m);
        out.insert(
            format!("{path}.lora_A.weight"),
            OutTensor {
                dtype,
                shape: a_shape,
                values: m.a_values(),
            },
        );
        out.insert(
            format!("{path}.lora_B.weight"),
            OutTensor {
                dtype,
                shape: b_shape,
                values: m.b_values(),
            },
        );
    }
    out
}

/// The name a module has in `lora_adapter_metadata` (`target_modules`,
/// `rank_pattern`, `alpha_pattern`): its path inside the component, less a
/// leading `text_model.` on a text encoder. PEFT matches these names as
/// dotted suffixes, so `encoder.layers.0.mlp.fc1` still names only that
/// module in transformers 4's CLIPTextModel (`text_model.encoder...`) and
/// also matches the flattened one of transformers >= 5 (`encoder...`), for
/// which diffusers strips `text_model.` from the tensor keys but not from
/// the metadata: a full path there makes it fail with "Target modules ...
/// not found".
fn metadata_name<'a>(component: &str, path: &'a str) -> &'a str {
    if component == sdnames::UNET.diffusers {
        path
    } else {
        path.strip_prefix("text_model.").unwrap_or(path)
    }
}

/// `{"format": "pt", "lora_adapter_metadata": ...}`: per component, `r` and
/// `lora_alpha` equal to its most common rank (ties: the smaller), and
/// `rank_pattern`/`alpha_pattern` entries (full paths, see [`metadata_name`],
/// which only match their own module) where a module's rank differs, so that
/// diffusers rebuilds every module with scale 1. Serialised with sorted keys
/// and 2-space indentation, as diffusers writes it.
pub fn metadata(modules: &[MergedModule]) -> BTreeMap<String, String> {
    let mut by_component: BTreeMap<String, Vec<(String, usize)>> = BTreeMap::new();
    for (m, path) in modules.iter().zip(dotted_paths(modules)) {
        let (c, p) = path.split_once('.').unwrap_or(("unet", path.as_str()));
        by_component
            .entry(c.to_string())
            .or_default()
            .push((metadata_name(c, p).to_string(), m.factored.rank));
    }
    let mut meta: BTreeMap<String, Value> = BTreeMap::new();
    for (c, mods) in by_component {
        let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
        for (_, r) in &mods {
            *counts.entry(*r).or_default() += 1;
        }
        let r = counts
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            .map_or(0, |(r, _)| *r);
        let mut rank_pattern = Map::new();
        for (p, rank) in mods.iter().filter(|(_, rank)| *rank != r) {
            rank_pattern.insert(p.clone(), json!(rank));
        }
        let targets: Vec<Value> = mods.iter().map(|(p, _)| json!(p)).collect();
        meta.insert(format!("{c}.r"), json!(r));
        meta.insert(format!("{c}.lora_alpha"), json!(r));
        meta.insert(
            format!("{c}.alpha_pattern"),
            Value::Object(rank_pattern.clone()),
        );
        meta.insert(format!("{c}.rank_pattern"), Value::Object(rank_pattern));
        meta.insert(format!("{c}.target_modules"), Value::Array(targets));
        meta.insert(format!("{c}.use_rslora"), json!(false));
        meta.insert(format!("{c}.use_dora"), json!(false));
    }
    let text = serde_json::to_string_pretty(&super::peft::sort_keys(json!(meta)))
        .unwrap_or_else(|_| "{}".into());
    BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        (DIFFUSERS_METADATA_KEY.to_string(), text),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::ModuleKind;
    use crate::compose::math::Factored;

    fn module(path: &str, rank: usize) -> MergedModule {
        let (c, p) = path.split_once('.').unwrap();
        let comp = sdnames::COMPONENTS
            .into_iter()
            .find(|x| x.diffusers == c)
            .unwrap();
        MergedModule {
            name: sdnames::key(comp, p),
            path: Some(path.to_string()),
            sgm_name: None,
            kind: ModuleKind::Linear,
            fan_out: 3,
            fan_in: 2,
            sources: vec![0],
            factored: Factored {
                rank,
                a: vec![0.0; rank * 2],
                b: vec![0.0; 3 * rank],
                rel_error: 0.0,
                energy: 1.0,
            },
            spilled: None,
        }
    }

    /// diffusers with transformers >= 5 (flattened CLIPTextModel) strips
    /// `text_model.` from text-encoder keys but not from the metadata, so
    /// the metadata names text-encoder modules without it; the tensor keys
    /// keep it, which both transformers generations accept.
    #[test]
    fn text_encoder_metadata_names_drop_text_model() {
        let mods = [
            module("unet.down_blocks.0.attentions.0.proj_in", 4),
            module("text_encoder.text_model.encoder.layers.0.mlp.fc1", 4),
            module(
                "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
                2,
            ),
            module(
                "text_encoder.text_model.encoder.layers.0.self_attn.out_proj",
                4,
            ),
            module("text_encoder_2.text_model.encoder.layers.0.mlp.fc2", 4),
        ];
        let md = metadata(&mods);
        let v: Value = serde_json::from_str(&md[DIFFUSERS_METADATA_KEY]).unwrap();
        assert_eq!(
            v["unet.target_modules"],
            json!(["down_blocks.0.attentions.0.proj_in"])
        );
        assert_eq!(
            v["text_encoder.target_modules"],
            json!([
                "encoder.layers.0.mlp.fc1",
                "encoder.layers.0.self_attn.q_proj",
                "encoder.layers.0.self_attn.out_proj"
            ])
        );
        assert_eq!(
            v["text_encoder.rank_pattern"],
            json!({"encoder.layers.0.self_attn.q_proj": 2})
        );
        assert_eq!(
            v["text_encoder.alpha_pattern"],
            json!({"encoder.layers.0.self_attn.q_proj": 2})
        );
        assert_eq!(v["text_encoder.r"], json!(4));
        assert_eq!(
            v["text_encoder_2.target_modules"],
            json!(["encoder.layers.0.mlp.fc2"])
        );
        let keys: Vec<String> = tensors(&mods, crate::tensors::DType::F32)
            .into_keys()
            .collect();
        assert!(keys.contains(
            &"text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight".to_string()
        ));
    }
}
