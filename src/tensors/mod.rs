//! Tensors as read: element types, views into memory-mapped safetensors
//! files, and the strict reader that makes them. Adapters, base-model
//! checkpoints and outputs all use this; it knows nothing of LoRA.

pub mod safetensors;

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use memmap2::Mmap;
use serde::Serialize;

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

/// A file we read, as we read it.
#[derive(Debug, Clone, Serialize)]
pub struct FileRecord {
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
}
