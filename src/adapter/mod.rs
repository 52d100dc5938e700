//! Reading adapters: where they come from, their formats, and the strict
//! checks that make every later step safe. Nothing here knows about libtorch.

pub mod config;
pub mod diffusers;
pub mod format;
pub mod kohya;
pub mod peft;
pub mod safetensors;
pub mod sdnames;
pub mod set;
pub mod source;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use memmap2::Mmap;
use serde::Serialize;

pub use config::PeftConfig;
pub use format::Format;
pub use set::{AdapterSet, CompatReport};

/// Element types we read and write. Anything else in an adapter file is
/// refused by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F64 => 8,
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The spelling used in safetensors headers.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F64 => "F64",
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F64 => "f64",
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

/// A tensor that is still a view into a memory-mapped file. Bytes are only
/// decoded when the math needs them.
#[derive(Clone)]
pub struct TensorRef {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub(crate) map: Arc<Mmap>,
    /// Absolute byte range inside `map` (already validated).
    pub(crate) range: Range<usize>,
}

impl std::fmt::Debug for TensorRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorRef")
            .field("name", &self.name)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .finish()
    }
}

impl TensorRef {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map[self.range.clone()]
    }

    /// Tell the kernel we are done with these bytes, so that pages already
    /// decoded stop counting towards resident memory while later modules are
    /// merged. Best effort: failure only costs memory.
    pub fn release(&self) {
        #[cfg(unix)]
        // SAFETY: the map is a read-only mapping of a file we never write.
        // MADV_DONTNEED on such pages only drops the cached copy; any later
        // read faults the same bytes back in from the file, so references
        // into the map stay valid and see unchanged data.
        unsafe {
            let _ = self.map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                self.range.start,
                self.range.len(),
            );
        }
    }

    /// The values as f32: borrowed straight from the map when the tensor is
    /// stored as aligned little-endian f32 (no copy, no extra memory), else
    /// decoded.
    pub fn f32_view(&self) -> std::borrow::Cow<'_, [f32]> {
        if self.dtype == DType::F32 && cfg!(target_endian = "little") {
            // SAFETY: every bit pattern is a valid f32, and align_to only
            // yields a middle slice that is correctly aligned.
            let (head, body, tail) = unsafe { self.bytes().align_to::<f32>() };
            if head.is_empty() && tail.is_empty() {
                return std::borrow::Cow::Borrowed(body);
            }
        }
        std::borrow::Cow::Owned(self.to_f32())
    }

    /// Decode to f32 (little-endian input, as safetensors mandates).
    pub fn to_f32(&self) -> Vec<f32> {
        let b = self.bytes();
        match self.dtype {
            DType::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::F64 => b
                .chunks_exact(8)
                .map(|c| {
                    f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
                })
                .collect(),
            DType::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        }
    }
}

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

/// A file we read, as we read it.
#[derive(Debug, Clone, Serialize)]
pub struct FileRecord {
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
}

/// One validated adapter.
#[derive(Debug)]
pub struct Adapter {
    /// The reference exactly as the user gave it.
    pub given: String,
    /// Where it resolved to: a local directory or a Hub snapshot.
    pub resolved: source::Resolved,
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
