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
        decode(self.dtype, self.bytes())
    }
}

/// Little-endian values of `dtype` as f32.
fn decode(dtype: DType, b: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F64 => b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        DType::F16 => decode_half(b, |bits, out| {
            use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
            bits.reinterpret_cast::<half::f16>()
                .convert_to_f32_slice(out);
        }),
        // A bf16 is the high half of an f32: widening is exact.
        DType::BF16 => decode_half(b, |bits, out| {
            for (d, &x) in out.iter_mut().zip(bits) {
                *d = f32::from_bits(u32::from(x) << 16);
            }
        }),
    }
}

/// Decodes little-endian 16-bit floats a block at a time: the bytes (which a
/// map need not align to 2) are gathered into a small aligned buffer of bit
/// patterns, and `convert` widens the block with the CPU's vector
/// conversion where it has one (F16C on x86-64). Value by value through
/// `from_le_bytes` and `to_f32` this was a few percent of a large merge.
fn decode_half(bytes: &[u8], convert: impl Fn(&[u16], &mut [f32])) -> Vec<f32> {
    const BLOCK: usize = 1024;
    let mut out = vec![0.0f32; bytes.len() / 2];
    let mut bits = [0u16; BLOCK];
    for (src, dst) in bytes.chunks(2 * BLOCK).zip(out.chunks_mut(BLOCK)) {
        let bits = &mut bits[..dst.len()];
        for (b, c) in bits.iter_mut().zip(src.chunks_exact(2)) {
            *b = u16::from_le_bytes([c[0], c[1]]);
        }
        convert(bits, dst);
    }
    out
}

/// A file we read, as we read it.
#[derive(Debug, Clone, Serialize)]
pub struct FileRecord {
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
}

#[cfg(test)]
mod tests {
    use super::decode_half;

    /// Every 16-bit pattern (zeros, subnormals, infinities, NaNs), read from
    /// an odd offset and in a length that is not a whole number of blocks,
    /// decodes as the value-by-value conversion does.
    #[test]
    fn block_decoding_agrees_with_value_by_value_for_every_bit_pattern() {
        let mut bytes = vec![0xAAu8];
        for x in 0..=u16::MAX {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        bytes.extend_from_slice(&0x3C00u16.to_le_bytes());
        let src = &bytes[1..];
        let f16 = super::decode(super::DType::F16, src);
        let bf16 = super::decode(super::DType::BF16, src);
        assert_eq!(f16.len(), 65537);
        // Bit for bit, except that a NaN may come back quieted or not.
        let same = |x: f32, y: f32| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan());
        for (i, c) in src.chunks_exact(2).enumerate() {
            let bits = u16::from_le_bytes([c[0], c[1]]);
            let want = half::f16::from_bits(bits).to_f32();
            assert!(same(f16[i], want), "f16 {bits:#06x}: {} vs {want}", f16[i]);
            let want = half::bf16::from_bits(bits).to_f32();
            assert!(
                same(bf16[i], want),
                "bf16 {bits:#06x}: {} vs {want}",
                bf16[i]
            );
        }
        // The value after the first block is in place, and exactly the
        // 2 x 1023 NaN patterns of f16 are NaN.
        assert_eq!(f16[65536], 1.0);
        let nan = f16.iter().filter(|x| x.is_nan()).count();
        assert_eq!(nan, 2 * 1023);
        assert!(decode_half(&[], |_, _| unreachable!()).is_empty());
    }
}
