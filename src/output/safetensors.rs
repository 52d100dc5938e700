//! A deterministic safetensors serializer: keys sorted, header padded to 8
//! bytes as the reference implementation does, so the same tensors always
//! give the same bytes.

use std::collections::BTreeMap;
use std::io::Write;

use serde::Serialize;

use crate::compose::spill::Values;
use crate::tensors::DType;

/// A tensor to be written: f32 values (in memory, or spilled to a temporary
/// file by the merge), encoded as `dtype` a piece at a time while they are
/// written, so the output never exists whole in memory.
pub struct OutTensor<'a> {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub values: Values<'a>,
}

impl OutTensor<'_> {
    fn byte_len(&self) -> usize {
        self.values.len() * self.dtype.size()
    }

    /// Encode as little-endian `dtype` (round to nearest even for f16/bf16),
    /// a chunk at a time.
    fn write_to(&self, w: &mut (impl Write + ?Sized)) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(64 * 1024);
        self.values.for_each_piece(|piece| {
            for chunk in piece.chunks(8192) {
                buf.clear();
                match self.dtype {
                    DType::F64 => chunk
                        .iter()
                        .for_each(|v| buf.extend_from_slice(&(*v as f64).to_le_bytes())),
                    DType::F32 => chunk
                        .iter()
                        .for_each(|v| buf.extend_from_slice(&v.to_le_bytes())),
                    DType::F16 => chunk.iter().for_each(|v| {
                        buf.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())
                    }),
                    DType::BF16 => chunk.iter().for_each(|v| {
                        buf.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())
                    }),
                }
                w.write_all(&buf)?;
            }
            Ok(())
        })?;
        Ok(())
    }
}

#[derive(Serialize)]
struct Entry<'a> {
    dtype: &'static str,
    shape: &'a [usize],
    data_offsets: [usize; 2],
}

/// Serialize `tensors` (sorted by name) with `metadata` to `w`.
pub fn write(
    w: &mut (impl Write + ?Sized),
    tensors: &BTreeMap<String, OutTensor<'_>>,
    metadata: &BTreeMap<String, String>,
) -> std::io::Result<()> {
    // Build the header by hand so that __metadata__ comes first and tensor
    // entries follow in sorted order, independent of serde_json's map order.
    let mut header = String::from("{");
    let mut first = true;
    if !metadata.is_empty() {
        header.push_str("\"__metadata__\":");
        header.push_str(&serde_json::to_string(metadata).map_err(std::io::Error::other)?);
        first = false;
    }
    let mut offset = 0usize;
    for (name, t) in tensors {
        if !first {
            header.push(',');
        }
        first = false;
        let end = offset + t.byte_len();
        header.push_str(&serde_json::to_string(name).map_err(std::io::Error::other)?);
        header.push(':');
        let entry = Entry {
            dtype: t.dtype.safetensors_name(),
            shape: &t.shape,
            data_offsets: [offset, end],
        };
        header.push_str(&serde_json::to_string(&entry).map_err(std::io::Error::other)?);
        offset = end;
    }
    header.push('}');
    // The data section starts 8-byte aligned, as the reference writer pads it.
    while (8 + header.len()) % 8 != 0 {
        header.push(' ');
    }
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(header.as_bytes())?;
    for t in tensors.values() {
        t.write_to(w)?;
    }
    Ok(())
}
