//! Which file layout an adapter uses, decided in one place from its keys and
//! metadata (or forced by `--format`).

use serde::Serialize;

use crate::error::{Error, Result};
use crate::tensors::safetensors::SafetensorsFile;

/// An adapter file layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// PEFT: `adapter_config.json` + `base_model.model.<path>.lora_A.weight`.
    Peft,
    /// kohya/sd-scripts: `lora_unet_<path>.lora_down.weight`, `.alpha`.
    Kohya,
    /// diffusers: `unet.<path>.lora_A.weight`, optional `lora_adapter_metadata`.
    Diffusers,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Peft => "peft",
            Format::Kohya => "kohya",
            Format::Diffusers => "diffusers",
        }
    }
}

/// The safetensors metadata key under which diffusers stores per-component
/// LoRA configs.
pub const DIFFUSERS_METADATA_KEY: &str = "lora_adapter_metadata";

/// Key fragments of LyCORIS and other networks that are not read, with
/// what they are. Their deltas are not a LoRA's `B @ A` as stored (a
/// Tucker core, a base-weight renormalisation, a multiplicative or full
/// update), so they are refused rather than misread.
const REFUSED: &[(&str, &str)] = &[
    (".hada_t1", "LyCORIS LoHa with a Tucker core"),
    (".hada_t2", "LyCORIS LoHa with a Tucker core"),
    (".lokr_t1", "LyCORIS LoKr with a Tucker core"),
    (".lokr_t2", "LyCORIS LoKr with a Tucker core"),
    (
        ".lora_mid.weight",
        "LyCORIS LoCon with a Tucker core (lora_mid)",
    ),
    (
        ".dora_scale",
        "DoRA-style weight decomposition (dora_scale, which renormalises the base weights)",
    ),
    (".oft_blocks", "LyCORIS OFT"),
    (".oft_diag", "LyCORIS OFT"),
    (".diff", "LyCORIS full-weight difference (diff)"),
    (".b_norm", "LyCORIS norm-layer difference"),
    (".w_norm", "LyCORIS norm-layer difference"),
];

/// LyCORIS LoHa and LoKr fragments: read in kohya-style files (see
/// [`super::lycoris`]), refused in the other layouts.
const KOHYA_ONLY: &[(&str, &str)] = &[
    (".hada_w1_a", "LyCORIS LoHa"),
    (".hada_w1_b", "LyCORIS LoHa"),
    (".hada_w2_a", "LyCORIS LoHa"),
    (".hada_w2_b", "LyCORIS LoHa"),
    (".lokr_w1", "LyCORIS LoKr"),
    (".lokr_w2", "LyCORIS LoKr"),
];

/// The fragment of `key` among `table`, with the module name before it.
fn find<'k>(table: &[(&str, &'static str)], key: &'k str) -> Option<(&'k str, &'static str)> {
    table.iter().find_map(|(frag, what)| {
        if let Some(stem) = key.strip_suffix(frag) {
            return Some((stem, *what));
        }
        // Also `<frag>.<more>`, and a last segment `<frag>_<suffix>`
        // (`.lokr_w1_a`, `.diff_b`); not a module named `<frag>_<more>`.
        key.match_indices(frag)
            .find(|(at, _)| {
                let rest = &key[at + frag.len()..];
                rest.starts_with('.') || (rest.starts_with('_') && !rest.contains('.'))
            })
            .map(|(at, _)| (&key[..at], *what))
    })
}

/// Is `key` in kohya's layout (where LoHa and LoKr are read)?
fn kohya_key(key: &str) -> bool {
    key.starts_with("lora_unet_") || key.starts_with("lora_te")
}

/// Refuse the networks that are not read by name, naming the file, the
/// module and the first such tensor: everything in [`REFUSED`], and LoHa
/// and LoKr outside kohya-style files.
pub fn refuse_foreign(file: &SafetensorsFile) -> Result<()> {
    let refuse = |key: &str, stem: &str, what: &str, why: &str| {
        Err(Error::invalid(
            &file.path,
            format!("module {stem}: {what} is not supported: {why} (tensor {key})"),
        ))
    };
    for key in file.tensors.keys() {
        if let Some((stem, what)) = find(REFUSED, key) {
            return refuse(
                key,
                stem,
                what,
                "lora-merge reads only LoRA modules (lora_down/lora_up, lora_A/lora_B) and, in \
                 kohya-style files, plain LyCORIS LoHa (hada_w1_a/_b, hada_w2_a/_b) and LoKr \
                 (lokr_w1[_a/_b], lokr_w2[_a/_b]) modules",
            );
        }
    }
    for key in file.tensors.keys() {
        if let Some((stem, what)) = find(KOHYA_ONLY, key) {
            if !kohya_key(key) {
                return refuse(
                    key,
                    stem,
                    what,
                    "LoHa and LoKr modules are read only from kohya-style files (lora_unet_*, \
                     lora_te*_* keys)",
                );
            }
        }
    }
    Ok(())
}

/// Decide the layout from the keys (and diffusers' metadata key). Every key
/// must agree; a file mixing layouts is refused.
pub fn detect(file: &SafetensorsFile) -> Result<Format> {
    refuse_foreign(file)?;
    let mut seen: Option<(Format, &str)> = None;
    for key in file.tensors.keys() {
        let f = if key.starts_with(super::peft::KEY_PREFIX) {
            Format::Peft
        } else if key.starts_with("lora_unet_") || key.starts_with("lora_te") {
            Format::Kohya
        } else if super::sdnames::split_diffusers(key).is_some() {
            Format::Diffusers
        } else {
            return Err(Error::invalid(
                &file.path,
                format!(
                    "cannot tell the adapter format from tensor {key}: expected PEFT \
                     (base_model.model.*), kohya (lora_unet_*, lora_te*_*) or diffusers \
                     (unet.*, text_encoder.*, text_encoder_2.*) keys"
                ),
            ));
        };
        match seen {
            None => seen = Some((f, key)),
            Some((g, first)) if g != f => {
                return Err(Error::invalid(
                    &file.path,
                    format!(
                        "the file mixes layouts: {first} is {} but {key} is {}",
                        g.name(),
                        f.name()
                    ),
                ))
            }
            Some(_) => {}
        }
    }
    match seen {
        Some((f, _)) => Ok(f),
        None if file.metadata.contains_key(DIFFUSERS_METADATA_KEY) => Ok(Format::Diffusers),
        None => Err(Error::invalid(
            &file.path,
            "no tensors: nothing to merge".to_string(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::testutil::{write_safetensors, TestTensor};
    use crate::tensors::DType;

    fn check(keys: &[&str]) -> Result<Format> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let ts: Vec<TestTensor> = keys
            .iter()
            .map(|k| TestTensor::ramp(k, DType::F32, &[2, 2]))
            .collect();
        write_safetensors(&path, &ts);
        detect(&SafetensorsFile::open(&path).unwrap())
    }

    #[test]
    fn loha_and_lokr_are_kohya_only_and_tucker_or_dora_never() {
        let m = "lora_unet_down_blocks_0_resnets_0_conv1";
        for part in ["hada_w1_a", "lokr_w1", "lokr_w2_b"] {
            assert_eq!(check(&[&format!("{m}.{part}")]).unwrap(), Format::Kohya);
        }
        for (part, what) in [
            (
                "hada_t1",
                "LyCORIS LoHa with a Tucker core is not supported",
            ),
            (
                "lokr_t2",
                "LyCORIS LoKr with a Tucker core is not supported",
            ),
            ("dora_scale", "DoRA-style weight decomposition"),
            ("lora_mid.weight", "LoCon with a Tucker core"),
            ("oft_blocks", "OFT"),
            ("diff_b", "full-weight difference"),
        ] {
            let key = format!("{m}.{part}");
            let e = check(&[&format!("{m}.hada_w1_a"), &key])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(what) && e.contains(&format!("module {m}:")) && e.contains(&key),
                "{e}"
            );
        }
        let e = check(&["base_model.model.q_proj.hada_w1_a"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("LyCORIS LoHa") && e.contains("only from kohya-style"),
            "{e}"
        );
        // A module whose name merely starts like a fragment is not refused.
        assert_eq!(
            check(&["base_model.model.diff_head.lora_A.weight"]).unwrap(),
            Format::Peft
        );
    }
}
