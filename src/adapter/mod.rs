//! Reading adapters: where they come from, their formats, and the strict
//! checks that make every later step safe. Nothing here knows about libtorch.

pub mod config;
pub mod diffusers;
pub mod format;
pub mod kohya;
pub mod lycoris;
pub mod peft;
pub mod sdnames;
pub mod set;

use std::collections::BTreeMap;

use serde::Serialize;

pub use config::PeftConfig;
pub use format::Format;
pub use set::{AdapterSet, CompatReport};

use crate::tensors::{DType, FileRecord, TensorRef};

/// What kind of layer a LoRA module adapts. The factors are always handled
/// as matrices (A: rank x fan_in, B: fan_out x rank); the kind only matters
/// at the edges, where shapes and key names are restored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "type")]
pub enum ModuleKind {
    Linear,
    /// `kernel` is A's shape after the rank, e.g. [in, kh, kw]; B's trailing
    /// dims are all 1.
    Conv {
        kernel: Vec<usize>,
    },
    /// PEFT `lora_embedding_A` [r, num_embeddings] / `lora_embedding_B` [dim, r].
    Embedding,
}

/// One adapted module of one adapter: delta = scale * B @ A.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// Module path inside the base model, without PEFT's
    /// `base_model.model.` prefix (e.g. `model.layers.0.self_attn.q_proj`).
    pub name: String,
    pub kind: ModuleKind,
    pub rank: usize,
    pub alpha: f64,
    /// alpha / rank, or alpha / sqrt(rank) with rsLoRA, after the patterns.
    pub scale: f64,
    /// Columns of A after flattening (in, or in*kh*kw for conv).
    pub fan_in: usize,
    pub fan_out: usize,
    pub a: TensorRef,
    pub b: TensorRef,
    /// The dotted module path to write in PEFT and diffusers layouts, when
    /// `name` is an alignment key rather than that path (Stable Diffusion
    /// modules, see [`sdnames`]) and the input spelled it out. `None` for
    /// plain PEFT modules (`name` is the path) and for kohya inputs (the
    /// path is rebuilt from the key when needed).
    pub path: Option<String>,
    /// The name as a kohya file spelled it after the original (SGM) UNet
    /// (`lora_unet_input_blocks_4_1_...`), when it did; `name` is then the
    /// diffusers-named alignment key. Kept so that kohya output can keep
    /// the inputs' naming.
    pub sgm_name: Option<String>,
}

/// One validated adapter.
#[derive(Debug)]
pub struct Adapter {
    /// The reference exactly as the user gave it.
    pub given: String,
    /// Where it resolved to: a local directory or a Hub snapshot.
    pub resolved: crate::source::Resolved,
    pub files: Vec<FileRecord>,
    /// PEFT's config; for kohya and diffusers files, one synthesised from
    /// the modules (most common rank and alpha), so that reports read the
    /// same for every layout.
    pub config: PeftConfig,
    pub format: Format,
    /// The weights file's safetensors metadata (kohya's `ss_*` and
    /// `modelspec.*`, diffusers' `lora_adapter_metadata`).
    pub metadata: BTreeMap<String, String>,
    /// By module name, sorted.
    pub modules: BTreeMap<String, LoraModule>,
    /// The weights file's hash, until [`AdapterSet::hash_inputs`] computes
    /// it (its record in `files` has an empty `sha256` until then).
    pub pending_hash: Option<crate::tensors::safetensors::PendingHash>,
}

impl Adapter {
    pub fn dtypes(&self) -> Vec<DType> {
        let mut d: Vec<DType> = self
            .modules
            .values()
            .flat_map(|m| [m.a.dtype, m.b.dtype])
            .collect();
        d.sort();
        d.dedup();
        d
    }

    pub fn parameter_count(&self) -> usize {
        self.modules
            .values()
            .map(|m| m.a.numel() + m.b.numel())
            .sum()
    }
}

#[cfg(test)]
pub(crate) mod testutil;

/// Both factors of a module, `None` when neither is present, or a message
/// naming the tensor that lacks its partner. One rule for every layout.
pub(crate) fn pair_factors<T: std::borrow::Borrow<TensorRef>>(
    a: Option<T>,
    b: Option<T>,
    a_label: &str,
    b_label: &str,
) -> std::result::Result<Option<(T, T)>, String> {
    match (a, b) {
        (Some(a), Some(b)) => Ok(Some((a, b))),
        (Some(a), None) => Err(format!(
            "tensor {} has no matching {b_label} tensor",
            a.borrow().name
        )),
        (None, Some(b)) => Err(format!(
            "tensor {} has no matching {a_label} tensor",
            b.borrow().name
        )),
        (None, None) => Ok(None),
    }
}
