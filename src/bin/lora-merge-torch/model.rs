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
            // Checkpoints name the backbone with or without a wrapper prefix.
            let (prefix, probe) = match &dir.arch {
                Arch::Llama { .. } => ("model.", "embed_tokens.weight"),
                Arch::Bert { .. } => ("bert.", "embeddings.word_embeddings.weight"),
            };
            let ld = Loader {
                dir,
                kind,
                device,
                prefix: if prefixed(prefix, probe) {
                    prefix.into()
                } else {
                    String::new()
                },
            };
            let net = match &dir.arch {
                Arch::Llama { config, .. } => Net::Llama(Llama::load(config, &ld, &mut bank)?),
                Arch::Bert { config, .. } => Net::Bert(Bert::load(config, &ld, &mut bank)?),
            };
            let (groups, module_groups) = bank.finish()?;
            Ok(Model {
                net,
                groups,
                module_groups,
                kind,
                device,
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
