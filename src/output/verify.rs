//! Whether an output directory still holds what its manifest says: the
//! manifest matches the digest written beside it, every listed file
//! re-hashed, and nothing else in the directory. `verify` reports it;
//! `push` requires it.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::atomic::WrittenFile;
use super::manifest::{OutputsOnly, DIGEST_FILE, FILE_NAME};
use crate::layout::{self, Cap};
use crate::{Error, Result};

/// One line: a sha256 in hex, two spaces, the manifest's name.
const DIGEST_CAP: Cap = Cap {
    what: "manifest digest",
    bytes: 4096,
};

/// Check every output `dir`'s manifest lists, the manifest itself, and that
/// nothing unlisted was added; the list when all hold.
pub fn check(dir: &Path) -> Result<BTreeMap<String, WrittenFile>> {
    let manifest_path = dir.join(FILE_NAME);
    let bytes = layout::read_capped(&manifest_path, layout::MANIFEST_CAP)?;
    check_digest(dir, &bytes)?;
    let manifest: OutputsOnly = serde_json::from_slice(&bytes)
        .map_err(|e| Error::invalid(&manifest_path, format!("not a lora-merge manifest: {e}")))?;
    if manifest.outputs.is_empty() {
        return Err(Error::invalid(
            &manifest_path,
            "the manifest lists no output files",
        ));
    }
    for name in manifest.outputs.keys() {
        if name.contains('/')
            || name.contains('\\')
            || name == ".."
            || name == "."
            || name == FILE_NAME
            || name == DIGEST_FILE
        {
            return Err(Error::invalid(
                &manifest_path,
                format!("output name {name:?} is not a plain file name"),
            ));
        }
    }
    check_nothing_unlisted(dir, &manifest.outputs)?;
    for (name, want) in &manifest.outputs {
        check_file(&dir.join(name), want)?;
    }
    Ok(manifest.outputs)
}

/// The manifest's bytes against the digest the writer put beside it: an
/// edit of the manifest (its weights, method, inputs, or a file's entry
/// removed) is a mismatch, not a new truth.
fn check_digest(dir: &Path, manifest: &[u8]) -> Result<()> {
    let path = dir.join(DIGEST_FILE);
    let text = layout::read_capped_text(&path, DIGEST_CAP).map_err(|e| match e {
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            Error::Mismatch(format!(
                "{}: missing, so {FILE_NAME} cannot be checked; write the output again",
                path.display()
            ))
        }
        e => e,
    })?;
    let want = text
        .strip_suffix(&format!("  {FILE_NAME}\n"))
        .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .ok_or_else(|| {
            Error::invalid(
                &path,
                format!("not one line `<sha256>  {FILE_NAME}` as sha256sum writes it"),
            )
        })?;
    let got = crate::hash::sha256_hex(manifest);
    if got != want {
        return Err(Error::Mismatch(format!(
            "{}: differs from {DIGEST_FILE} (sha256 {got}; expected {want}): the manifest was \
             changed after it was written",
            dir.join(FILE_NAME).display()
        )));
    }
    Ok(())
}

/// Every entry of `dir` is listed, or is the manifest or its digest: a file
/// added after the merge would otherwise be vouched for (and pushed) by
/// nobody's word.
fn check_nothing_unlisted(dir: &Path, outputs: &BTreeMap<String, WrittenFile>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut extra = Vec::new();
    for e in entries {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name = e.file_name();
        let listed = name
            .to_str()
            .is_some_and(|n| n == FILE_NAME || n == DIGEST_FILE || outputs.contains_key(n));
        if !listed {
            extra.push(e.path());
        }
    }
    extra.sort();
    match extra.first() {
        None => Ok(()),
        Some(first) => Err(Error::Mismatch(format!(
            "{}: not listed in {FILE_NAME}{}",
            first.display(),
            match extra.len() {
                1 => String::new(),
                n => format!(" (nor are {} more entries)", n - 1),
            }
        ))),
    }
}

/// One listed file, re-hashed. Only a regular file is read, so a pipe or a
/// device put in its place fails at once instead of hanging or never ending.
fn check_file(path: &Path, want: &WrittenFile) -> Result<()> {
    let (mut file, len) = layout::open_regular(path).map_err(|e| match e {
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            Error::Mismatch(format!(
                "{}: missing (listed in {FILE_NAME})",
                path.display()
            ))
        }
        e => e,
    })?;
    let differs = |got: &str, size: u64| {
        Error::Mismatch(format!(
            "{}: differs from {FILE_NAME} (sha256 {got}, {size} bytes; expected {}, {} bytes)",
            path.display(),
            want.sha256,
            want.size
        ))
    };
    if len != want.size {
        return Err(differs("not computed", len));
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io(path, e)),
        };
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
        // A file that grows while it is read is not what was written.
        if size > want.size {
            break;
        }
    }
    let got = crate::hash::hex(&hasher.finalize());
    if got != want.sha256 || size != want.size {
        return Err(differs(&got, size));
    }
    Ok(())
}
