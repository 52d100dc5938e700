//! A base model with adapters composed in: one type for every architecture.

use lora_merge::adapter::AdapterSet;
use lora_merge::model::{Arch, ModelDir};
use lora_merge::Result;
use tch::{Device, Kind, Tensor};

use crate::bert::{self, Bert};
use crate::engine::{catching, Loader};
use crate::llama::Llama;
use crate::lora::{Grouping, LoraBank};

pub enum Net {
    Llama(Llama),
    Bert(Bert),
}

pub struct Model {
    pub net: Net,
    /// Names of the composition weight groups, in model order.
    pub groups: Vec<String>,
    /// Each adapter module name with its group.
    pub module_groups: Vec<(String, usize)>,
    pub kind: Kind,
    pub device: Device,
    pub max_positions: usize,
}

impl Model {
    /// Build the model from its files, handing each linear layer the
    /// adapters' factors for it. Every adapter module must find its layer.
    pub fn load(
        dir: &ModelDir,
        set: Option<&AdapterSet>,
        grouping: Grouping,
        kind: Kind,
        device: Device,
    ) -> Result<Model> {
        catching(|| {
            let mut bank = LoraBank::new(set, grouping, kind, device)?;
            let prefixed = |p: &str, probe: &str| dir.tensors.contains_key(&format!("{p}{probe}"));
            let (net, max_positions) = match &dir.arch {
                Arch::Llama { config, .. } => {
                    let prefix = if prefixed("model.", "embed_tokens.weight") {
                        "model."
                    } else {
                        ""
                    };
                    let ld = Loader {
                        dir,
                        kind,
                        device,
                        prefix: prefix.into(),
                    };
                    (
                        Net::Llama(Llama::load(config, &ld, &mut bank)?),
                        config.max_position_embeddings,
                    )
                }
                Arch::Bert { config, .. } => {
                    let probe = "embeddings.word_embeddings.weight";
                    let prefix = if prefixed("bert.", probe) {
                        "bert."
                    } else {
                        ""
                    };
                    let ld = Loader {
                        dir,
                        kind,
                        device,
                        prefix: prefix.into(),
                    };
                    (
                        Net::Bert(Bert::load(config, &ld, &mut bank)?),
                        config.max_position_embeddings,
                    )
                }
            };
            let (groups, module_groups) = bank.finish()?;
            Ok(Model {
                net,
                groups,
                module_groups,
                kind,
                device,
                max_positions,
            })
        })
    }

    /// Causal LMs: logits [B, T, V]. Encoders: last hidden states [B, T, H].
    pub fn forward(&self, ids: &Tensor, mask: &Tensor, mix: &[Tensor]) -> Tensor {
        match &self.net {
            Net::Llama(m) => m.forward(ids, mask, mix),
            Net::Bert(m) => m.forward(ids, mask, mix),
        }
    }

    /// Encoders: mean-pooled, L2-normalised embeddings [B, H].
    pub fn embed(&self, ids: &Tensor, mask: &Tensor, mix: &[Tensor]) -> Tensor {
        bert::embed(&self.forward(ids, mask, mix), mask)
    }
}
