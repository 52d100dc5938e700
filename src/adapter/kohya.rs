//! kohya/sd-scripts' layout: from key names and shapes to [`LoraModule`]s.
//!
//! Keys: `<prefix><path with _>.lora_down.weight` (A: `[r, in]` or
//! `[r, in, kh, kw]`), `.lora_up.weight` (B: `[out, r]` or `[out, r, 1, 1]`)
//! and an optional `.alpha` scalar, with prefixes `lora_unet_`, `lora_te_`
//! (SD 1.x/2.x), `lora_te1_` and `lora_te2_` (SDXL). sd-scripts scales the
//! delta by `alpha / r`, and a missing or zero alpha means `alpha = r`
//! (scale 1). Module names are alignment keys (see [`super::sdnames`]): UNet
//! names after the original SGM UNet, as sd-scripts writes them for SDXL,
//! become diffusers' names, and the file's own spelling is kept beside them.

use std::collections::BTreeMap;

use super::peft::pair_shape;
use super::sdnames;
use super::LoraModule;
use crate::error::{Error, Result};
use crate::tensors::safetensors::SafetensorsFile;
use crate::tensors::TensorRef;

#[derive(Default)]
struct Parts<'a> {
    /// The name as the file spells it, for messages.
    stem: &'a str,
    down: Option<&'a TensorRef>,
    up: Option<&'a TensorRef>,
    alpha: Option<&'a TensorRef>,
    /// The stem uses SGM UNet names.
    sgm: bool,
}

/// Build the modules of one kohya file.
pub fn build_modules(file: &SafetensorsFile) -> Result<BTreeMap<String, LoraModule>> {
    let invalid = |msg: String| Error::invalid(&file.path, msg);
    let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
    for (key, tensor) in &file.tensors {
        let (stem, slot) = if let Some(s) = key.strip_suffix(".lora_down.weight") {
            (s, 0)
        } else if let Some(s) = key.strip_suffix(".lora_up.weight") {
            (s, 1)
        } else if let Some(s) = key.strip_suffix(".alpha") {
            (s, 2)
        } else {
            return Err(invalid(format!(
                "tensor {key} is not a kohya LoRA tensor (expected .lora_down.weight, \
                 .lora_up.weight or .alpha)"
            )));
        };
        let Some((component, rest)) = sdnames::split_kohya(stem) else {
            return Err(invalid(format!(
                "tensor {key}: unknown kohya prefix (expected lora_unet_, lora_te_, lora_te1_ \
                 or lora_te2_)"
            )));
        };
        if rest.is_empty() {
            return Err(invalid(format!("tensor {key} names no module")));
        }
        let (k, sgm) = sdnames::kohya_key(component, rest);
        let p = parts.entry(k.clone()).or_default();
        if !p.stem.is_empty() && p.stem != stem {
            return Err(invalid(format!(
                "{} and {stem} are the same module ({})",
                p.stem,
                if sgm || p.sgm {
                    "SDXL's original SGM UNet name and diffusers' name of one layer"
                } else {
                    "lora_te_ and lora_te1_ both mean the first text encoder"
                }
            )));
        }
        p.stem = stem;
        p.sgm = sgm;
        let place = match slot {
            0 => &mut p.down,
            1 => &mut p.up,
            _ => &mut p.alpha,
        };
        *place = Some(tensor);
    }

    let mut modules = BTreeMap::new();
    for (name, p) in parts {
        let pair =
            crate::adapter::pair_factors(p.down, p.up, "lora_down", "lora_up").map_err(&invalid)?;
        let (a, b) = match pair {
            Some(ab) => ab,
            None => {
                return Err(invalid(format!(
                    "{}.alpha has no lora_down/lora_up tensors",
                    p.stem
                )))
            }
        };
        let (rank, rank_b, fan_in, fan_out, kind) =
            pair_shape(&name, a, b, false).map_err(&invalid)?;
        if rank != rank_b || rank == 0 {
            return Err(invalid(format!(
                "rank mismatch in module {}: {} {:?} and {} {:?}",
                p.stem, a.name, a.shape, b.name, b.shape
            )));
        }
        let alpha = match p.alpha {
            None => rank as f64,
            Some(t) => {
                let v = t.to_f32();
                let [x] = v.as_slice() else {
                    return Err(invalid(format!(
                        "tensor {} should be a scalar but has shape {:?}",
                        t.name, t.shape
                    )));
                };
                if !x.is_finite() {
                    return Err(invalid(format!("tensor {} is {x}", t.name)));
                }
                // sd-scripts: `if alpha is None or alpha == 0: alpha = lora_dim`.
                if *x == 0.0 {
                    rank as f64
                } else {
                    f64::from(*x)
                }
            }
        };
        modules.insert(
            name.clone(),
            LoraModule {
                name,
                kind,
                rank,
                alpha,
                scale: alpha / rank as f64,
                fan_in,
                fan_out,
                a: a.clone(),
                b: b.clone(),
                path: None,
                sgm_name: p.sgm.then(|| p.stem.to_string()),
            },
        );
    }
    if modules.is_empty() {
        return Err(invalid(
            "no LoRA tensors (lora_down/lora_up) found: nothing to merge".into(),
        ));
    }
    Ok(modules)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::testutil::{write_safetensors, TestTensor};
    use crate::adapter::ModuleKind;
    use crate::tensors::DType;

    fn build(tensors: &[TestTensor]) -> Result<BTreeMap<String, LoraModule>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lora.safetensors");
        write_safetensors(&path, tensors);
        let file = SafetensorsFile::open(&path).unwrap();
        build_modules(&file)
    }

    fn t(name: &str, shape: &[usize]) -> TestTensor {
        TestTensor::ramp(name, DType::F32, shape)
    }

    fn scalar(name: &str, v: f32) -> TestTensor {
        TestTensor::from_f32(name, DType::F32, &[], &[v])
    }

    #[test]
    fn linear_conv_and_alpha_rules() {
        let q = "lora_unet_down_blocks_0_attentions_0_proj_in";
        let c = "lora_unet_down_blocks_0_resnets_0_conv1";
        let te = "lora_te_text_model_encoder_layers_0_mlp_fc1";
        let m = build(&[
            t(&format!("{q}.lora_down.weight"), &[4, 6]),
            t(&format!("{q}.lora_up.weight"), &[5, 4]),
            scalar(&format!("{q}.alpha"), 2.0),
            t(&format!("{c}.lora_down.weight"), &[2, 3, 3, 3]),
            t(&format!("{c}.lora_up.weight"), &[7, 2, 1, 1]),
            scalar(&format!("{c}.alpha"), 0.0),
            t(&format!("{te}.lora_down.weight"), &[2, 4]),
            t(&format!("{te}.lora_up.weight"), &[4, 2]),
        ])
        .unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[q].scale, 0.5);
        assert_eq!(m[q].kind, ModuleKind::Linear);
        let conv = &m[c];
        assert_eq!(conv.scale, 1.0, "alpha 0 means alpha = rank");
        assert_eq!((conv.fan_in, conv.fan_out, conv.rank), (27, 7, 2));
        assert_eq!(
            conv.kind,
            ModuleKind::Conv {
                kernel: vec![3, 3, 3]
            }
        );
        let te1 = "lora_te1_text_model_encoder_layers_0_mlp_fc1";
        assert_eq!(m[te1].alpha, 2.0, "missing alpha means alpha = rank");
        assert!(m.values().all(|m| m.sgm_name.is_none()));
    }

    #[test]
    fn sgm_names_become_diffusers_keys() {
        let sgm = "lora_unet_output_blocks_2_2_conv";
        let m = build(&[
            t(&format!("{sgm}.lora_down.weight"), &[2, 3, 3, 3]),
            t(&format!("{sgm}.lora_up.weight"), &[7, 2, 1, 1]),
            scalar(&format!("{sgm}.alpha"), 1.0),
        ])
        .unwrap();
        let k = "lora_unet_up_blocks_0_upsamplers_0_conv";
        assert_eq!(m.keys().collect::<Vec<_>>(), [k]);
        assert_eq!(m[k].name, k);
        assert_eq!(m[k].sgm_name.as_deref(), Some(sgm));
        assert_eq!(m[k].scale, 0.5);
    }

    #[test]
    fn refusals() {
        let q = "lora_unet_x";
        let e = build(&[t(&format!("{q}.lora_down.weight"), &[4, 6])])
            .unwrap_err()
            .to_string();
        assert!(e.contains("no matching lora_up"), "{e}");
        let e = build(&[
            t(&format!("{q}.lora_down.weight"), &[4, 6]),
            t(&format!("{q}.lora_up.weight"), &[5, 3]),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("rank mismatch"), "{e}");
        let e = build(&[
            t("lora_te_a.lora_down.weight", &[1, 2]),
            t("lora_te_a.lora_up.weight", &[2, 1]),
            t("lora_te1_a.lora_down.weight", &[1, 2]),
            t("lora_te1_a.lora_up.weight", &[2, 1]),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("same module"), "{e}");
        let e = build(&[
            t("lora_unet_input_blocks_3_0_op.lora_down.weight", &[1, 2]),
            t("lora_unet_input_blocks_3_0_op.lora_up.weight", &[2, 1]),
            t(
                "lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight",
                &[1, 2],
            ),
            t(
                "lora_unet_down_blocks_0_downsamplers_0_conv.lora_up.weight",
                &[2, 1],
            ),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("same module") && e.contains("SGM"), "{e}");
        let e = build(&[t("lora_unet_x.weird", &[1])])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a kohya LoRA tensor"), "{e}");
    }
}
