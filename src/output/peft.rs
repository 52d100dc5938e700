//! The merged adapter in PEFT's layout: `adapter_model.safetensors` and
//! `adapter_config.json`. This is the only place that spells PEFT key names
//! for output.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use super::safetensors::OutTensor;
use crate::adapter::{sdnames, ModuleKind};
use crate::compose::merge::MergedModule;
use crate::tensors::DType;

const PREFIX: &str = "base_model.model.";

/// The tensors of the merged adapter, keyed by PEFT name, shapes restored
/// (conv kernels, embedding naming).
pub fn tensors(modules: &[MergedModule], dtype: DType) -> BTreeMap<String, OutTensor<'_>> {
    let mut out = BTreeMap::new();
    for (m, path) in modules.iter().zip(module_paths(modules)) {
        let (a_shape, b_shape) = super::factor_shapes(m);
        let (a_key, b_key) = match &m.kind {
            ModuleKind::Embedding => ("lora_embedding_A", "lora_embedding_B"),
            ModuleKind::Linear | ModuleKind::Conv { .. } => ("lora_A.weight", "lora_B.weight"),
        };
        out.insert(
            format!("{PREFIX}{path}.{a_key}"),
            OutTensor {
                dtype,
                shape: a_shape,
                values: m.a_values(),
            },
        );
        out.insert(
            format!("{PREFIX}{path}.{b_key}"),
            OutTensor {
                dtype,
                shape: b_shape,
                values: m.b_values(),
            },
        );
    }
    out
}

/// The module path each merged module gets in a PEFT adapter. Plain PEFT
/// modules keep their name. Stable Diffusion modules (named by alignment
/// key) get their dotted path; when they all belong to one pipeline
/// component, the component is dropped, since a PEFT adapter wraps that one
/// model (`unet.down_blocks.0...` becomes `down_blocks.0...`, which is what
/// PEFT on a diffusers UNet saves).
pub fn module_paths(modules: &[MergedModule]) -> Vec<String> {
    let dotted: Vec<Option<String>> = modules
        .iter()
        .map(|m| {
            sdnames::is_key(&m.name).then(|| {
                m.path
                    .clone()
                    .or_else(|| sdnames::dotted_from_key(&m.name))
                    .unwrap_or_else(|| m.name.clone())
            })
        })
        .collect();
    let components: std::collections::BTreeSet<&str> = dotted
        .iter()
        .flatten()
        .filter_map(|d| d.split_once('.').map(|(c, _)| c))
        .collect();
    let single = (components.len() == 1 && dotted.iter().all(Option::is_some))
        .then(|| components.into_iter().next())
        .flatten();
    modules
        .iter()
        .zip(&dotted)
        .map(|(m, d)| match (d, single) {
            (Some(d), Some(c)) => d
                .strip_prefix(c)
                .and_then(|r| r.strip_prefix('.'))
                .unwrap_or(d)
                .to_string(),
            (Some(d), None) => d.clone(),
            (None, _) => m.name.clone(),
        })
        .collect()
}

/// What the merged config copies from the inputs when they agree.
pub struct ConfigFacts {
    pub base_model: Option<String>,
    pub revision: Option<String>,
    pub task_type: Option<String>,
    pub fan_in_fan_out: bool,
    /// The inputs' own target_modules, when every input has the same value
    /// and every input adapts exactly the merged module set.
    pub shared_target_modules: Option<Value>,
}

/// The most common module rank becomes `r` (ties: the smaller); every other
/// module gets a rank_pattern entry. lora_alpha always equals the rank, so
/// each module's scale is exactly 1 and the factors carry the whole delta.
pub fn config(modules: &[MergedModule], facts: &ConfigFacts) -> Value {
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for m in modules {
        *counts.entry(m.factored.rank).or_default() += 1;
    }
    let r = counts
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
        .map(|(r, _)| *r)
        .unwrap_or(0);
    let paths = module_paths(modules);
    let mut rank_pattern = Map::new();
    let mut alpha_pattern = Map::new();
    for (m, path) in modules.iter().zip(&paths) {
        if m.factored.rank == r {
            continue;
        }
        // Full module paths: PEFT matches a pattern key as `(.*\.)?KEY$`, so
        // a full path can only match its own module.
        rank_pattern.insert(path.clone(), json!(m.factored.rank));
        alpha_pattern.insert(path.clone(), json!(m.factored.rank));
    }
    let target_modules = facts.shared_target_modules.clone().unwrap_or_else(|| {
        // Exact module paths: a list entry matches a module whose name equals
        // it or ends with ".entry", so this adapts exactly what we wrote.
        Value::Array(paths.iter().map(|p| Value::String(p.clone())).collect())
    });
    let v = json!({
        "alpha_pattern": alpha_pattern,
        "base_model_name_or_path": facts.base_model,
        "bias": "none",
        "fan_in_fan_out": facts.fan_in_fan_out,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": r,
        "lora_dropout": 0.0,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": rank_pattern,
        "revision": facts.revision,
        "target_modules": target_modules,
        "task_type": facts.task_type,
        "use_dora": false,
        "use_rslora": false,
    });
    sort_keys(v)
}

/// Recursively sort object keys, as PEFT writes its configs.
pub fn sort_keys(v: Value) -> Value {
    match v {
        Value::Object(map) => {
            let sorted: BTreeMap<String, Value> =
                map.into_iter().map(|(k, v)| (k, sort_keys(v))).collect();
            Value::Object(sorted.into_iter().collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sort_keys).collect()),
        other => other,
    }
}
