//! tokenizer.json through the `tokenizers` crate (the library Python's fast
//! tokenizers are built on), with the file's own padding and truncation
//! switched off: batches are padded here, to their longest member.

use std::path::{Path, PathBuf};

use lora_merge::{Error, Result};
use tch::{Device, Kind, Tensor};
use tokenizers::{Tokenizer, TruncationParams};

pub struct Tok {
    inner: Tokenizer,
    path: PathBuf,
}

impl Tok {
    pub fn load(path: &Path) -> Result<Tok> {
        let bytes = lora_merge::layout::read_capped(path, lora_merge::layout::TOKENIZER_CAP)?;
        let mut inner = Tokenizer::from_bytes(bytes)
            .map_err(|e| Error::invalid(path, format!("cannot read the tokenizer: {e}")))?;
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| Error::invalid(path, e.to_string()))?;
        Ok(Tok {
            inner,
            path: path.to_path_buf(),
        })
    }

    /// Cut encodings at `max_len` tokens, special tokens included.
    pub fn truncate_at(&mut self, max_len: usize) -> Result<()> {
        self.inner
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..TruncationParams::default()
            }))
            .map_err(|e| Error::invalid(&self.path, e.to_string()))?;
        Ok(())
    }

    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<i64>> {
        let enc = self
            .inner
            .encode(text, special)
            .map_err(|e| Error::invalid(&self.path, format!("cannot tokenize {text:?}: {e}")))?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }
}

/// Right-pad sequences into ids [B, T] and mask [B, T] (1 = token). The pad
/// id is 0: padded positions are masked out, so any valid id does.
pub fn pad(seqs: &[&[i64]], device: Device) -> (Tensor, Tensor) {
    let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
    let mut ids = vec![0i64; seqs.len() * t];
    let mut mask = vec![0i64; seqs.len() * t];
    for (r, s) in seqs.iter().enumerate() {
        ids[r * t..r * t + s.len()].copy_from_slice(s);
        mask[r * t..r * t + s.len()].fill(1);
    }
    let shape = [seqs.len() as i64, t as i64];
    (
        Tensor::from_slice(&ids).view(shape).to_device(device),
        Tensor::from_slice(&mask)
            .view(shape)
            .to_kind(Kind::Int64)
            .to_device(device),
    )
}
