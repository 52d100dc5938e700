//! Merged factors leave memory as soon as their module is merged.
//!
//! A merge of hundreds of adapters can produce an output larger than the
//! memory at hand (an exact merge's rank is the sum of the inputs'). Each
//! module's factors are therefore appended, as soon as the module is done,
//! to one anonymous temporary file (no name, so nothing is left behind
//! whatever ends the process), and the writer streams them back from it in
//! small pieces. Peak memory is then a few modules per thread, not the whole
//! output. Reading back costs page-cache reads, not resident memory.

use std::borrow::Cow;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::{Error, Result};

/// Values per piece when streaming spilled factors (256 KiB of f32).
const PIECE: usize = 64 * 1024;

/// An append-only file of f32 values, shared by the merge threads.
pub struct Spill {
    file: Arc<File>,
    /// Where the temporary file lives, for messages.
    dir: PathBuf,
    end: Mutex<u64>,
}

impl Spill {
    /// An unnamed temporary file in `dir`, which should be on the output's
    /// file system (its free space is what the resource check counted).
    pub fn new_in(dir: &Path) -> Result<Spill> {
        let file = tempfile::tempfile_in(dir).map_err(|e| Error::io(dir, e))?;
        Ok(Spill {
            file: Arc::new(file),
            dir: dir.to_path_buf(),
            end: Mutex::new(0),
        })
    }

    /// Append `values` (little-endian f32); the returned reference reads
    /// them back. Threads reserve their range under the lock and write
    /// outside it.
    pub fn put(&self, values: &[f32]) -> Result<Spilled> {
        let bytes = values.len() as u64 * 4;
        let offset = {
            let mut end = self.end.lock().unwrap_or_else(|p| p.into_inner());
            let at = *end;
            *end += bytes;
            at
        };
        let mut buf = Vec::with_capacity(PIECE * 4);
        let mut at = offset;
        for piece in values.chunks(PIECE) {
            buf.clear();
            piece
                .iter()
                .for_each(|v| buf.extend_from_slice(&v.to_le_bytes()));
            self.file.write_all_at(&buf, at).map_err(|e| {
                Error::io(
                    &self.dir,
                    std::io::Error::new(
                        e.kind(),
                        format!("writing merged factors to a temporary file here: {e}"),
                    ),
                )
            })?;
            at += buf.len() as u64;
        }
        Ok(Spilled {
            file: Arc::clone(&self.file),
            offset,
            len: values.len(),
        })
    }
}

/// Values put into a [`Spill`].
#[derive(Debug, Clone)]
pub struct Spilled {
    file: Arc<File>,
    offset: u64,
    len: usize,
}

impl Spilled {
    /// Read the values back in pieces, in order.
    pub fn for_each_piece(
        &self,
        mut f: impl FnMut(&[f32]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let mut bytes = vec![0u8; PIECE.min(self.len) * 4];
        let mut values = Vec::with_capacity(PIECE.min(self.len));
        let mut done = 0usize;
        while done < self.len {
            let n = PIECE.min(self.len - done);
            let buf = &mut bytes[..n * 4];
            self.file
                .read_exact_at(buf, self.offset + done as u64 * 4)?;
            values.clear();
            values.extend(
                buf.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
            f(&values)?;
            done += n;
        }
        Ok(())
    }
}

/// The values of one output tensor, wherever they are.
#[derive(Debug)]
pub enum Values<'a> {
    Memory(Cow<'a, [f32]>),
    Spilled(&'a Spilled),
}

impl<'a> From<&'a [f32]> for Values<'a> {
    fn from(v: &'a [f32]) -> Self {
        Values::Memory(Cow::Borrowed(v))
    }
}

impl From<Vec<f32>> for Values<'_> {
    fn from(v: Vec<f32>) -> Self {
        Values::Memory(Cow::Owned(v))
    }
}

impl Values<'_> {
    pub fn len(&self) -> usize {
        match self {
            Values::Memory(v) => v.len(),
            Values::Spilled(s) => s.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Hand the values to `f` in order, in pieces of bounded size.
    pub fn for_each_piece(
        &self,
        f: impl FnMut(&[f32]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        match self {
            Values::Memory(v) => v.chunks(PIECE).try_for_each(f),
            Values::Spilled(s) => s.for_each_piece(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_come_back_in_order_from_any_thread() {
        let dir = tempfile::tempdir().unwrap();
        let spill = Spill::new_in(dir.path()).unwrap();
        // Nothing named is left in the folder: the file is anonymous.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let inputs: Vec<Vec<f32>> = (0..8)
            .map(|k| {
                (0..(k * 40_000 + 3))
                    .map(|i| (i * (k + 1)) as f32 - 0.5)
                    .collect()
            })
            .collect();
        let spilled: Vec<Spilled> = std::thread::scope(|s| {
            let handles: Vec<_> = inputs
                .iter()
                .map(|v| s.spawn(|| spill.put(v).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (v, s) in inputs.iter().zip(&spilled) {
            let mut back = Vec::new();
            Values::Spilled(s)
                .for_each_piece(|p| {
                    assert!(p.len() <= PIECE);
                    back.extend_from_slice(p);
                    Ok(())
                })
                .unwrap();
            assert_eq!(&back, v);
            assert_eq!(Values::Spilled(s).len(), v.len());
        }
        let mut n = 0;
        Values::Memory(Cow::Borrowed(&inputs[3]))
            .for_each_piece(|p| {
                n += p.len();
                Ok(())
            })
            .unwrap();
        assert_eq!(n, inputs[3].len());
    }
}
