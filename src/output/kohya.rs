//! The merged adapter in kohya/sd-scripts' layout: one safetensors file with
//! `lora_down`/`lora_up` factors, an `.alpha` scalar per module and the
//! `ss_*`/`modelspec.*` metadata that still describes the result.

use std::borrow::Cow;
use std::collections::BTreeMap;

use super::safetensors::OutTensor;
use crate::adapter::{sdnames, DType};
use crate::compose::merge::MergedModule;

pub const FILE_NAME: &str = "lora.safetensors";

/// Metadata keys that describe the base model and the network type, not the
/// training run, so they still hold for a merge of files that agree on them.
/// Everything else (dataset, steps, learning rate, hashes of the file,
/// title, dims) describes one input and is dropped.
const CARRIED: &[&str] = &[
    "ss_base_model_version",
    "ss_sd_model_name",
    "ss_sd_model_hash",
    "ss_new_sd_model_hash",
    "ss_v2",
    "ss_network_module",
    "modelspec.sai_model_spec",
    "modelspec.architecture",
    "modelspec.implementation",
    "modelspec.prediction_type",
    "modelspec.resolution",
];

/// The kohya name of a merged module: its alignment key, with the first text
/// encoder spelled `lora_te_` unless a second one is present (SD 1.x/2.x
/// files use `lora_te_`, SDXL files `lora_te1_`/`lora_te2_`). Plain PEFT
/// names (never aligned) are taken as UNet paths.
fn kohya_names(modules: &[MergedModule]) -> Vec<String> {
    let has_te2 = modules
        .iter()
        .any(|m| m.name.starts_with(sdnames::TEXT_ENCODER_2.kohya));
    modules
        .iter()
        .map(|m| {
            if let Some(rest) = m.name.strip_prefix(sdnames::TEXT_ENCODER.kohya) {
                if !has_te2 {
                    return format!("{}{rest}", sdnames::KOHYA_TE_SINGLE);
                }
            }
            if sdnames::is_key(&m.name) {
                m.name.clone()
            } else {
                sdnames::key(sdnames::UNET, &m.name)
            }
        })
        .collect()
}

/// `value` as `dtype` when that keeps it exact, else F32: sd-scripts saves
/// `.alpha` in the file's dtype, but an alpha that rounds (say 257 in bf16)
/// would change the scale, and readers take any float dtype.
fn alpha_dtype(value: f32, dtype: DType) -> DType {
    let exact = match dtype {
        DType::F16 => half::f16::from_f32(value).to_f32() == value,
        DType::BF16 => half::bf16::from_f32(value).to_f32() == value,
        DType::F32 | DType::F64 => true,
    };
    if exact {
        dtype
    } else {
        DType::F32
    }
}

/// The tensors: down = A and up = B with their kernel shapes restored, and
/// `.alpha` = rank, so that sd-scripts' scale alpha/rank is exactly 1.
pub fn tensors(modules: &[MergedModule], dtype: DType) -> BTreeMap<String, OutTensor<'_>> {
    let mut out = BTreeMap::new();
    for (m, name) in modules.iter().zip(kohya_names(modules)) {
        let (a_shape, b_shape) = super::factor_shapes(m);
        out.insert(
            format!("{name}.lora_down.weight"),
            OutTensor {
                dtype,
                shape: a_shape,
                values: Cow::Borrowed(&m.factored.a),
            },
        );
        out.insert(
            format!("{name}.lora_up.weight"),
            OutTensor {
                dtype,
                shape: b_shape,
                values: Cow::Borrowed(&m.factored.b),
            },
        );
        let alpha = m.factored.rank as f32;
        out.insert(
            format!("{name}.alpha"),
            OutTensor {
                dtype: alpha_dtype(alpha, dtype),
                shape: Vec::new(),
                values: Cow::Owned(vec![alpha]),
            },
        );
    }
    out
}

/// What the metadata records about the merge.
pub struct MergeFacts<'a> {
    /// The metadata of every kohya input (others carry none of these keys).
    pub kohya_inputs: Vec<&'a BTreeMap<String, String>>,
    /// The input files' names, in order.
    pub merged_from: Vec<String>,
    pub method: &'a str,
    /// The weights, as JSON.
    pub weights: String,
}

/// `ss_*`/`modelspec.*` entries every kohya input agrees on (from
/// [`CARRIED`]), plus the merge: `ss_merged_from` as sd-scripts' merge
/// scripts write it, `ss_network_dim`/`ss_network_alpha` (the rank when
/// every module has the same, else "Dynamic" as sd-scripts' resize does),
/// and `lora_merge.*`.
pub fn metadata(modules: &[MergedModule], facts: &MergeFacts) -> BTreeMap<String, String> {
    let mut md = BTreeMap::new();
    if let Some((first, rest)) = facts.kohya_inputs.split_first() {
        for key in CARRIED {
            if let Some(v) = first.get(*key) {
                if rest.iter().all(|m| m.get(*key) == Some(v)) {
                    md.insert((*key).to_string(), v.clone());
                }
            }
        }
    }
    md.entry("ss_network_module".into())
        .or_insert_with(|| "networks.lora".into());
    let mut ranks: Vec<usize> = modules.iter().map(|m| m.factored.rank).collect();
    ranks.sort_unstable();
    ranks.dedup();
    let dim = match ranks.as_slice() {
        [one] => one.to_string(),
        _ => "Dynamic".to_string(),
    };
    md.insert("ss_network_dim".into(), dim.clone());
    md.insert("ss_network_alpha".into(), dim);
    md.insert("ss_merged_from".into(), facts.merged_from.join(", "));
    md.insert("lora_merge.method".into(), facts.method.to_string());
    md.insert("lora_merge.weights".into(), facts.weights.clone());
    md
}
