//! The linear head of `--head linear`: started at the prototype classifier
//! (so step 0 classifies exactly as the prototypes do), trained with its
//! own Adam, and saved beside the adapter.

use std::collections::BTreeMap;

use lora_merge::output::safetensors as st_out;
use lora_merge::tensors::DType;
use lora_merge::{Error, Result};
use serde_json::json;
use tch::{nn, nn::OptimizerConfig, Tensor};

use super::losses::{Trainer, PROTO_SCALE};
use crate::engine::tch_err;

/// The trainable head: logits = embedding @ w.T + b.
pub struct Head {
    pub _vs: nn::VarStore,
    pub w: Tensor,
    pub b: Tensor,
    pub opt: nn::Optimizer,
}

/// A linear head started at PROTO_SCALE x the class prototypes of `train`,
/// with zero bias, and its own Adam at `lr`.
pub fn new_head(
    trainer: &Trainer,
    train: &[usize],
    mix: &[Tensor],
    batch: usize,
    lr: f64,
) -> Result<Head> {
    let protos = trainer.prototypes(train, mix, batch) * PROTO_SCALE;
    let hvs = nn::VarStore::new(trainer.model.device);
    let w = hvs.root().var_copy("weight", &protos);
    let b = hvs.root().zeros("bias", &[trainer.n_classes()]);
    let opt = nn::Adam::default().build(&hvs, lr).map_err(tch_err)?;
    Ok(Head {
        _vs: hvs,
        w,
        b,
        opt,
    })
}

/// head.safetensors (weight [C, H], bias [C]) and labels.json.
pub fn head_files(
    labels: &[String],
    hidden: usize,
    hw: &[f32],
    hb: &[f32],
) -> Result<Vec<(String, Vec<u8>)>> {
    let mut t = BTreeMap::new();
    t.insert(
        "weight".to_string(),
        st_out::OutTensor {
            dtype: DType::F32,
            shape: vec![labels.len(), hidden],
            values: hw.into(),
        },
    );
    t.insert(
        "bias".to_string(),
        st_out::OutTensor {
            dtype: DType::F32,
            shape: vec![labels.len()],
            values: hb.into(),
        },
    );
    let mut bytes = Vec::new();
    st_out::write(
        &mut bytes,
        &t,
        &BTreeMap::from([("format".to_string(), "pt".to_string())]),
    )
    .map_err(|e| Error::Internal(e.to_string()))?;
    let meta = json!({
        "labels": labels,
        "pooling": "mean over tokens, then L2 normalise",
        "logits": "embedding @ weight.T + bias",
    });
    Ok(vec![
        ("head.safetensors".into(), bytes),
        (
            "labels.json".into(),
            lora_merge::output::writer::json_text(&meta)?,
        ),
    ])
}
