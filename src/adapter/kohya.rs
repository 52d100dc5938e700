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
//!
//! The same files may hold LyCORIS LoHa (`.hada_w1_a`, ...) and LoKr
//! (`.lokr_w1`, ...) modules under the same names; [`super::lycoris`] turns
//! each into exact LoRA factors.

use std::collections::BTreeMap;

use super::lycoris;
use super::peft::pair_shape;
use super::sdnames;
use super::LoraModule;
use crate::error::{Error, Result};
use crate::tensors::safetensors::SafetensorsFile;
use crate::tensors::TensorRef;

/// What a key holds.
enum Slot {
    Down,
    Up,
    Alpha,
    Lycoris(&'static str),
}

#[derive(Default)]
struct Parts<'a> {
    /// The name as the file spells it, for messages.
    stem: &'a str,
    down: Option<&'a TensorRef>,
    up: Option<&'a TensorRef>,
    alpha: Option<&'a TensorRef>,
    /// LyCORIS LoHa/LoKr tensors, by part (`hada_w1_a`, ...).
    lycoris: BTreeMap<&'static str, &'a TensorRef>,
    /// The stem uses SGM UNet names.
    sgm: bool,
}

/// Build the modules of one kohya file.
pub fn build_modules(file: &SafetensorsFile) -> Result<BTreeMap<String, LoraModule>> {
    let invalid = |msg: String| Error::invalid(&file.path, msg);
    let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
    for (key, tensor) in &file.tensors {
        let (stem, slot) = if let Some(s) = key.strip_suffix(".lora_down.weight") {
            (s, Slot::Down)
        } else if let Some(s) = key.strip_suffix(".lora_up.weight") {
            (s, Slot::Up)
        } else if let Some(s) = key.strip_suffix(".alpha") {
            (s, Slot::Alpha)
        } else if let Some((s, part)) = lycoris::split_key(key) {
            (s, Slot::Lycoris(part))
        } else {
            return Err(invalid(format!(
                "tensor {key} is not a kohya LoRA tensor (expected .lora_down.weight, \
                 .lora_up.weight or .alpha, or LyCORIS LoHa .hada_w1_a/_b and .hada_w2_a/_b \
                 or LoKr .lokr_w1[_a/_b] and .lokr_w2[_a/_b])"
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
            Slot::Down => &mut p.down,
            Slot::Up => &mut p.up,
            Slot::Alpha => &mut p.alpha,
            Slot::Lycoris(part) => {
                p.lycoris.insert(part, tensor);
                continue;
            }
        };
        *place = Some(tensor);
    }

    let mut modules = BTreeMap::new();
    for (name, p) in parts {
        let alpha = match p.alpha {
            None => None,
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
                Some(f64::from(*x))
            }
        };
        let sgm_name = p.sgm.then(|| p.stem.to_string());
        if !p.lycoris.is_empty() {
            if let Some(t) = p.down.or(p.up) {
                return Err(invalid(format!(
                    "module {} mixes a LoRA tensor ({}) with LyCORIS tensors ({})",
                    p.stem,
                    t.name,
                    p.lycoris.keys().copied().collect::<Vec<_>>().join(", ")
                )));
            }
            let l = lycoris::build(&name, p.stem, &p.lycoris, alpha).map_err(&invalid)?;
            modules.insert(
                name.clone(),
                LoraModule {
                    name,
                    kind: l.kind,
                    rank: l.rank,
                    alpha: l.alpha,
                    scale: l.scale,
                    fan_in: l.fan_in,
                    fan_out: l.fan_out,
                    a: l.a,
                    b: l.b,
                    path: None,
                    sgm_name,
                },
            );
            continue;
        }
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
        // sd-scripts: `if alpha is None or alpha == 0: alpha = lora_dim`.
        let alpha = match alpha {
            Some(x) if x != 0.0 => x,
            _ => rank as f64,
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
                sgm_name,
            },
        );
    }
    if modules.is_empty() {
        return Err(invalid(
            "no LoRA tensors (lora_down/lora_up, or LyCORIS LoHa/LoKr) found: nothing to merge"
                .into(),
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
    fn lycoris_modules_read_beside_lora_ones() {
        let q = "lora_unet_down_blocks_0_attentions_0_proj_in";
        let h = "lora_te1_text_model_encoder_layers_0_mlp_fc1";
        let k = "lora_unet_output_blocks_2_2_conv";
        let m = build(&[
            t(&format!("{q}.lora_down.weight"), &[4, 6]),
            t(&format!("{q}.lora_up.weight"), &[5, 4]),
            t(&format!("{h}.hada_w1_a"), &[8, 2]),
            t(&format!("{h}.hada_w1_b"), &[2, 3]),
            t(&format!("{h}.hada_w2_a"), &[8, 2]),
            t(&format!("{h}.hada_w2_b"), &[2, 3]),
            scalar(&format!("{h}.alpha"), 1.0),
            // An SGM-named 3x3 conv (diffusers' up_blocks_0_upsamplers_0_conv).
            t(&format!("{k}.lokr_w1"), &[2, 2]),
            t(&format!("{k}.lokr_w2"), &[3, 4, 3, 3]),
            scalar(&format!("{k}.alpha"), 8.0),
        ])
        .unwrap();
        assert_eq!(m.len(), 3);
        let loha = &m[h];
        // rank 2 * 2 > min(8, 3): the dense delta times I_3.
        assert_eq!((loha.rank, loha.fan_out, loha.fan_in), (3, 8, 3));
        assert_eq!(loha.scale, 0.5, "alpha / r1");
        assert!(loha.a.is_owned() && !m[q].a.is_owned());
        let lokr = &m["lora_unet_up_blocks_0_upsamplers_0_conv"];
        assert_eq!(lokr.sgm_name.as_deref(), Some(k));
        assert_eq!(lokr.scale, 1.0, "both halves full: scale 1 whatever alpha");
        assert_eq!(
            lokr.kind,
            ModuleKind::Conv {
                kernel: vec![8, 3, 3]
            }
        );
        assert_eq!((lokr.rank, lokr.fan_out, lokr.fan_in), (6, 6, 72));
        let e = build(&[
            t(&format!("{q}.lora_down.weight"), &[4, 6]),
            t(&format!("{q}.lora_up.weight"), &[5, 4]),
            t(&format!("{q}.hada_w1_a"), &[5, 2]),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("mixes a LoRA tensor"), "{e}");
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
