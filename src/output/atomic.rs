//! Output directories appear whole or not at all: files are written into a
//! hidden temporary directory beside the target and renamed into place only
//! after everything succeeded. A failed run leaves nothing behind.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Size and hash of a written file, computed from the bytes as written.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct WrittenFile {
    pub sha256: String,
    pub size: u64,
}

pub struct Staging {
    dir: Option<tempfile::TempDir>,
    target: PathBuf,
    /// Ancestors of the target that we created and must remove on failure.
    created_parent: Option<PathBuf>,
}

impl Staging {
    pub fn new(target: &Path) -> Result<Staging> {
        let target = if target.is_absolute() {
            target.to_path_buf()
        } else {
            std::env::current_dir()
                .map_err(|e| Error::io(".", e))?
                .join(target)
        };
        let parent = target
            .parent()
            .ok_or_else(|| {
                Error::Usage(format!(
                    "output {} has no parent directory",
                    target.display()
                ))
            })?
            .to_path_buf();
        // Remember the highest ancestor we create, to undo it on failure.
        let mut created_parent = None;
        let mut p = parent.as_path();
        while !p.exists() {
            created_parent = Some(p.to_path_buf());
            match p.parent() {
                Some(up) => p = up,
                None => break,
            }
        }
        fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = tempfile::Builder::new()
            .prefix(&format!(".{name}.lora-merge-"))
            .tempdir_in(&parent)
            .map_err(|e| Error::io(&parent, e))?;
        Ok(Staging {
            dir: Some(dir),
            target,
            created_parent,
        })
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().map(|d| d.path()).unwrap_or(&self.target)
    }

    /// Write one file, hashing the bytes as they go out.
    pub fn write_with(
        &self,
        name: &str,
        f: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
    ) -> Result<WrittenFile> {
        let path = self.dir().join(name);
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = HashingWriter {
            inner: BufWriter::with_capacity(1 << 20, file),
            hasher: Sha256::new(),
            size: 0,
        };
        f(&mut w).map_err(|e| Error::io(&path, e))?;
        let HashingWriter {
            inner,
            hasher,
            size,
        } = w;
        let file = inner
            .into_inner()
            .map_err(|e| Error::io(&path, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&path, e))?;
        let sha256 = crate::hash::hex(&hasher.finalize());
        Ok(WrittenFile { sha256, size })
    }

    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<WrittenFile> {
        self.write_with(name, |w| w.write_all(bytes))
    }

    /// Move the staged directory into place, replacing an existing target.
    pub fn commit(mut self) -> Result<PathBuf> {
        let dir = self
            .dir
            .take()
            .ok_or_else(|| Error::Internal("staging committed twice".into()))?;
        let staged = dir.keep();
        let target = self.target.clone();
        let undo = |e: std::io::Error, path: &Path| {
            let _ = fs::remove_dir_all(&staged);
            Error::io(path, e)
        };
        if target.exists() {
            // Rename the old directory aside first so that a failure can put
            // it back; only then delete it.
            let parent = target.parent().unwrap_or(Path::new("."));
            let aside = tempfile::Builder::new()
                .prefix(".lora-merge-old-")
                .tempdir_in(parent)
                .map_err(|e| undo(e, parent))?
                .keep();
            let aside_target = aside.join("old");
            fs::rename(&target, &aside_target).map_err(|e| undo(e, &target))?;
            if let Err(e) = fs::rename(&staged, &target) {
                let _ = fs::rename(&aside_target, &target);
                let _ = fs::remove_dir_all(&aside);
                return Err(undo(e, &target));
            }
            fs::remove_dir_all(&aside).map_err(|e| Error::io(&aside, e))?;
        } else {
            fs::rename(&staged, &target).map_err(|e| undo(e, &target))?;
        }
        self.created_parent = None;
        Ok(target)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // The TempDir removes itself; also remove parents we created.
        if let Some(dir) = self.dir.take() {
            drop(dir);
            if let Some(p) = &self.created_parent {
                let _ = fs::remove_dir_all(p);
            }
        }
    }
}

struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
