//! A deterministic safetensors serializer: keys sorted, header padded to 8
//! bytes as the reference implementation does, so the same tensors always
//! give the same bytes.

use std::collections::BTreeMap;
use std::io::Write;

use serde::Serialize;

use crate::adapter::DType;

/// A tensor ready to be written: little-endian bytes of `dtype`.
pub struct OutTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl OutTensor {
    /// Encode f32 values as `dtype` (round to nearest even for f16/bf16).
    pub fn from_f32(values: &[f32], shape: Vec<usize>, dtype: DType) -> OutTensor {
        let mut data = Vec::with_capacity(values.len() * dtype.size());
        match dtype {
            DType::F64 => values
                .iter()
                .for_each(|v| data.extend_from_slice(&(*v as f64).to_le_bytes())),
            DType::F32 => values
                .iter()
                .for_each(|v| data.extend_from_slice(&v.to_le_bytes())),
            DType::F16 => values
                .iter()
                .for_each(|v| data.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
            DType::BF16 => values
                .iter()
                .for_each(|v| data.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        }
        OutTensor { dtype, shape, data }
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
    tensors: &BTreeMap<String, OutTensor>,
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
        let end = offset + t.data.len();
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
        w.write_all(&t.data)?;
    }
    Ok(())
}
