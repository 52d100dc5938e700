//! The merged adapter in diffusers' layout: `pytorch_lora_weights.safetensors`
//! with component-prefixed PEFT keys and a `lora_adapter_metadata` entry.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use super::safetensors::OutTensor;
use crate::adapter::format::DIFFUSERS_METADATA_KEY;
use crate::adapter::{sdnames, DType};
use crate::compose::merge::MergedModule;

pub use crate::adapter::source::DIFFUSERS_WEIGHTS_FILE as FILE_NAME;

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
                values: Cow::Borrowed(&m.factored.a),
            },
        );
        out.insert(
            format!("{path}.lora_B.weight"),
            OutTensor {
                dtype,
                shape: b_shape,
                values: Cow::Borrowed(&m.factored.b),
            },
        );
    }
    out
}

/// `{"format": "pt", "lora_adapter_metadata": ...}`: per component, `r` and
/// `lora_alpha` equal to its most common rank (ties: the smaller), and
/// `rank_pattern`/`alpha_pattern` entries (full paths, which only match
/// their own module) where a module's rank differs, so that diffusers
/// rebuilds every module with scale 1. Serialised with sorted keys and
/// 2-space indentation, as diffusers writes it.
pub fn metadata(modules: &[MergedModule]) -> BTreeMap<String, String> {
    let mut by_component: BTreeMap<String, Vec<(String, usize)>> = BTreeMap::new();
    for (m, path) in modules.iter().zip(dotted_paths(modules)) {
        let (c, p) = path.split_once('.').unwrap_or(("unet", path.as_str()));
        by_component
            .entry(c.to_string())
            .or_default()
            .push((p.to_string(), m.factored.rank));
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
