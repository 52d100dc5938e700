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

/// Key fragments of LyCORIS and other non-LoRA networks, with their names.
/// Their deltas are not `B @ A`, so they are refused rather than misread.
const FOREIGN: &[(&str, &str)] = &[
    (".hada_w1_a", "LyCORIS LoHa"),
    (".hada_w2_a", "LyCORIS LoHa"),
    (".hada_t1", "LyCORIS LoHa"),
    (".lokr_w1", "LyCORIS LoKr"),
    (".lokr_w2", "LyCORIS LoKr"),
    (".lokr_t2", "LyCORIS LoKr"),
    (
        ".lora_mid.weight",
        "LyCORIS LoCon with a CP/Tucker middle factor",
    ),
    (".oft_blocks", "LyCORIS OFT"),
    (".oft_diag", "LyCORIS OFT"),
    (".dora_scale", "DoRA (needs the base weights)"),
    (".diff", "LyCORIS full-rank difference"),
    (".b_norm", "LyCORIS weight-norm difference"),
    (".w_norm", "LyCORIS weight-norm difference"),
];

/// Refuse LyCORIS and similar networks by name, naming the first key.
pub fn refuse_foreign(file: &SafetensorsFile) -> Result<()> {
    for key in file.tensors.keys() {
        if let Some((_, what)) = FOREIGN
            .iter()
            .find(|(frag, _)| key.ends_with(frag) || key.contains(&format!("{frag}.")))
        {
            return Err(Error::invalid(
                &file.path,
                format!(
                    "tensor {key} belongs to a {what} network, not a LoRA: its delta is not a \
                     product of two factors, so it cannot be merged as one"
                ),
            ));
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
