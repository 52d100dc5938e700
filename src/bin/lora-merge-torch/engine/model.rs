//! A base model with adapters composed in: one type for every architecture.

use lora_merge::adapter::AdapterSet;
use lora_merge::checkpoint::{Arch, ModelDir};
use lora_merge::Result;
use tch::{Device, Kind, Tensor};

use super::bert::{self, Bert};
use super::llama::Llama;
use super::lora::{Grouping, LoraBank, TrainSpec, Trained};
use super::{catching, Loader};

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
    /// The checkpoint's wrapper prefix (`model.`, `bert.` or empty): PEFT
    /// names modules with it.
    pub prefix: String,
    /// LoRAs being trained (`train`), in model order.
    pub trained: Vec<Trained>,
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
        Model::build(dir, set, grouping, None, kind, device)
    }

    /// The base model with a new trainable LoRA on every target module.
    pub fn load_training(
        dir: &ModelDir,
        spec: TrainSpec,
        kind: Kind,
        device: Device,
    ) -> Result<Model> {
        Model::build(dir, None, Grouping::Global, Some(spec), kind, device)
    }

    fn build(
        dir: &ModelDir,
        set: Option<&AdapterSet>,
        grouping: Grouping,
        spec: Option<TrainSpec>,
        kind: Kind,
        device: Device,
    ) -> Result<Model> {
        catching(|| {
            let mut bank = LoraBank::new(set, grouping, kind, device)?;
            if let Some(spec) = spec {
                bank = bank.with_training(spec);
            }
            let prefixed = |p: &str, probe: &str| dir.tensors.contains_key(&format!("{p}{probe}"));
            // Checkpoints name the backbone with or without a wrapper prefix.
            let (prefix, probe) = match &dir.arch {
                Arch::Llama { .. } => ("model.", "embed_tokens.weight"),
                Arch::Bert { .. } => ("bert.", "embeddings.word_embeddings.weight"),
            };
            let prefix_used = if prefixed(prefix, probe) {
                prefix.to_string()
            } else {
                String::new()
            };
            let ld = Loader {
                dir,
                kind,
                device,
                prefix: prefix_used.clone(),
            };
            let net = match &dir.arch {
                Arch::Llama { config, .. } => Net::Llama(Llama::load(config, &ld, &mut bank)?),
                Arch::Bert { config, .. } => Net::Bert(Bert::load(config, &ld, &mut bank)?),
            };
            let trained = std::mem::take(&mut bank.trained);
            let (groups, module_groups) = bank.finish_with(!trained.is_empty())?;
            Ok(Model {
                net,
                groups,
                module_groups,
                kind,
                device,
                prefix: prefix_used,
                trained,
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
