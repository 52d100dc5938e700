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

/// A tensor as the math reads it: usually a view into a memory-mapped file
/// (bytes are only decoded when the math needs them), or, for factors we
/// compute at load (LyCORIS modules rewritten as LoRA factors, see
/// [`crate::adapter::lycoris`]), values we own.
#[derive(Clone)]
pub struct TensorRef {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub(crate) storage: Storage,
}

/// Where a [`TensorRef`]'s values live.
#[derive(Clone)]
pub(crate) enum Storage {
    /// Bytes of a memory-mapped file: `range` is an absolute byte range
    /// inside `map` (already validated).
    Mapped { map: Arc<Mmap>, range: Range<usize> },
    /// f32 values computed in memory (`dtype` is then F32).
    Owned(Arc<[f32]>),
}

impl std::fmt::Debug for TensorRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorRef")
            .field("name", &self.name)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("owned", &matches!(self.storage, Storage::Owned(_)))
            .finish()
    }
}

impl TensorRef {
    /// A view of `range` inside `map`.
    pub(crate) fn mapped(
        name: String,
        dtype: DType,
        shape: Vec<usize>,
        map: Arc<Mmap>,
        range: Range<usize>,
    ) -> TensorRef {
        TensorRef {
            name,
            dtype,
            shape,
            storage: Storage::Mapped { map, range },
        }
    }

    /// An f32 tensor holding `values` (row-major, `shape`'s element count).
    pub fn owned(name: String, shape: Vec<usize>, values: Vec<f32>) -> TensorRef {
        assert_eq!(
            shape.iter().product::<usize>(),
            values.len(),
            "tensor {name}: shape {shape:?} does not match its values"
        );
        TensorRef {
            name,
            dtype: DType::F32,
            shape,
            storage: Storage::Owned(values.into()),
        }
    }

    /// Values computed in memory rather than read from a file.
    pub fn is_owned(&self) -> bool {
        matches!(self.storage, Storage::Owned(_))
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The values' bytes: little-endian for a mapped tensor, as safetensors
    /// mandates; native order for an owned one (the same on the
    /// little-endian targets libtorch, the only reader of raw bytes, runs on).
    pub fn bytes(&self) -> &[u8] {
        match &self.storage {
            Storage::Mapped { map, range } => &map[range.clone()],
            Storage::Owned(v) => {
                // SAFETY: any initialised f32 memory is valid as bytes, u8
                // has alignment 1, and the length covers exactly the slice.
                unsafe {
                    std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(&**v))
                }
            }
        }
    }

    /// Tell the kernel we are done with these bytes, so that pages already
    /// decoded stop counting towards resident memory while later modules are
    /// merged. Best effort: failure only costs memory. Owned values are
    /// freed with their last reference instead.
    pub fn release(&self) {
        #[cfg(unix)]
        if let Storage::Mapped { map, range } = &self.storage {
            // SAFETY: the map is a read-only mapping of a file we never
            // write. MADV_DONTNEED on such pages only drops the cached copy;
            // any later read faults the same bytes back in from the file, so
            // references into the map stay valid and see unchanged data.
            unsafe {
                let _ = map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    range.start,
                    range.len(),
                );
            }
        }
    }

    /// The values as f32: borrowed when they are owned, or stored as aligned
    /// little-endian f32 in the map (no copy, no extra memory), else decoded.
    pub fn f32_view(&self) -> std::borrow::Cow<'_, [f32]> {
        if let Storage::Owned(v) = &self.storage {
            return std::borrow::Cow::Borrowed(v);
        }
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
        if let Storage::Owned(v) = &self.storage {
            return v.to_vec();
        }
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
