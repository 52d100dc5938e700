//! The merged adapter in kohya/sd-scripts' layout: one safetensors file with
//! `lora_down`/`lora_up` factors, an `.alpha` scalar per module and the
//! `ss_*`/`modelspec.*` metadata that still describes the result.

use std::borrow::Cow;
use std::collections::BTreeMap;

use super::safetensors::OutTensor;
use crate::adapter::sdnames;
use crate::compose::merge::MergedModule;
use crate::compose::spill::Values;
use crate::tensors::DType;

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
///
/// UNet modules are named after the original SGM UNet when any input named
/// a module of the merge so (sd-scripts' SDXL files), else after diffusers'
/// UNet: a module keeps the SGM name an input gave it, and the others get
/// theirs from [`sdnames::diffusers_to_sgm`] (modules the SGM UNet lacks
/// keep diffusers' name). So SGM in gives SGM out, diffusers-named in gives
/// diffusers-named out, and a mix gives SGM names: those sd-scripts gives
/// SDXL's modules, which diffusers' loader reads too.
fn kohya_names(modules: &[MergedModule]) -> Vec<String> {
    let has_te2 = modules
        .iter()
        .any(|m| m.name.starts_with(sdnames::TEXT_ENCODER_2.kohya));
    let sgm_layout = modules
        .iter()
        .any(|m| m.sgm_name.is_some())
        .then(|| sdnames::UnetLayout::guess(modules.iter().map(|m| m.name.as_str())));
    modules
        .iter()
        .map(|m| {
            if let Some(layout) = sgm_layout {
                if let Some(n) = &m.sgm_name {
                    return n.clone();
                }
                if let Some(sgm) = m
                    .name
                    .strip_prefix(sdnames::UNET.kohya)
                    .and_then(|rest| sdnames::diffusers_to_sgm(rest, layout))
                {
                    return format!("{}{sgm}", sdnames::UNET.kohya);
                }
            }
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
                values: m.a_values(),
            },
        );
        out.insert(
            format!("{name}.lora_up.weight"),
            OutTensor {
                dtype,
                shape: b_shape,
                values: m.b_values(),
            },
        );
        let alpha = m.factored.rank as f32;
        out.insert(
            format!("{name}.alpha"),
            OutTensor {
                dtype: alpha_dtype(alpha, dtype),
                shape: Vec::new(),
                values: Values::Memory(Cow::Owned(vec![alpha])),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::ModuleKind;
    use crate::compose::math::Factored;

    fn module(key: &str, sgm_name: Option<&str>) -> MergedModule {
        MergedModule {
            name: key.to_string(),
            path: None,
            sgm_name: sgm_name.map(str::to_string),
            kind: ModuleKind::Linear,
            fan_out: 1,
            fan_in: 1,
            sources: vec![0],
            factored: Factored {
                rank: 1,
                a: vec![1.0],
                b: vec![1.0],
                rel_error: 0.0,
                energy: 1.0,
            },
            spilled: None,
        }
    }

    #[test]
    fn sgm_names_win_when_any_input_had_them() {
        let up = "lora_unet_up_blocks_0_upsamplers_0_conv";
        let q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q";
        let te = "lora_te1_text_model_encoder_layers_0_mlp_fc1";
        let te2 = "lora_te2_text_model_encoder_layers_0_mlp_fc1";
        let sgm_q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q";
        // A module an SGM input had keeps that input's name; one only a
        // diffusers-named input had gets its SGM name (SDXL: the upsampler
        // of up block 0 follows an attention); text encoders are untouched.
        let mixed = [
            module(q, Some(sgm_q)),
            module(up, None),
            module(te, None),
            module(te2, None),
        ];
        assert_eq!(
            kohya_names(&mixed),
            [sgm_q, "lora_unet_output_blocks_2_2_conv", te, te2]
        );
        // SD 1.x (a fourth down block): that upsampler follows a resnet.
        let sd1 = [
            module(up, None),
            module(
                "lora_unet_down_blocks_3_resnets_0_conv1",
                Some("lora_unet_input_blocks_10_0_in_layers_2"),
            ),
        ];
        assert_eq!(
            kohya_names(&sd1),
            [
                "lora_unet_output_blocks_2_1_conv",
                "lora_unet_input_blocks_10_0_in_layers_2"
            ]
        );
        // No SGM input: diffusers' names stay.
        let plain = [module(q, None), module(up, None)];
        assert_eq!(kohya_names(&plain), [q, up]);
    }
}
