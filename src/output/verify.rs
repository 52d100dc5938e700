//! Whether an output directory still holds what its manifest says: every
//! listed file re-hashed. `verify` reports it; `push` requires it.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::atomic::WrittenFile;
use super::manifest::{OutputsOnly, FILE_NAME};
use crate::{Error, Result};

/// Re-hash every output `dir`'s manifest lists; the list when all match.
pub fn check(dir: &Path) -> Result<BTreeMap<String, WrittenFile>> {
    let manifest_path = dir.join(FILE_NAME);
    let text = std::fs::read_to_string(&manifest_path).map_err(|e| Error::io(&manifest_path, e))?;
    let manifest: OutputsOnly = serde_json::from_str(&text)
        .map_err(|e| Error::invalid(&manifest_path, format!("not a lora-merge manifest: {e}")))?;
    if manifest.outputs.is_empty() {
        return Err(Error::invalid(
            &manifest_path,
            "the manifest lists no output files",
        ));
    }
    for (name, want) in &manifest.outputs {
        if name.contains('/') || name.contains('\\') || name == ".." {
            return Err(Error::invalid(
                &manifest_path,
                format!("output name {name:?} is not a plain file name"),
            ));
        }
        let path = dir.join(name);
        let mut file = File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::Mismatch(format!(
                "{}: missing (listed in {FILE_NAME})",
                path.display()
            )),
            _ => Error::io(&path, e),
        })?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buf).map_err(|e| Error::io(&path, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        let got = crate::hash::hex(&hasher.finalize());
        if got != want.sha256 || size != want.size {
            return Err(Error::Mismatch(format!(
                "{}: differs from {FILE_NAME} (sha256 {got}, {size} bytes; expected {}, {} bytes)",
                path.display(),
                want.sha256,
                want.size
            )));
        }
    }
    Ok(manifest.outputs)
}
