//! The Hub cache, written by us, in the layout Python's `huggingface_hub`
//! shares (`models--owner--name/{blobs/<etag>, snapshots/<commit>/<path>,
//! refs/<revision>}`, snapshot entries relative symlinks to blobs).
//!
//! Nothing a server sends becomes a path before it is checked: a blob name
//! is 40 or 64 hex digits, a commit is the 40-hex commit we asked for, a
//! file path is made of plain components, and every folder is created one
//! component at a time, refusing a symbolic link on the way, and then
//! checked after resolution to lie inside the repository's cache folder.
//! A blob enters the cache only whole and verified (its size as announced
//! and its content hashing to its name: sha256 for LFS files, git's blob
//! sha1 for the others), through a uniquely named temporary file renamed
//! into place, so two runs can fill one cache at once without a lock.

use std::io::Read;
#[cfg(feature = "hub")]
use std::io::Write;
#[cfg(feature = "hub")]
use std::path::Component;
use std::path::{Path, PathBuf};

use sha2::Digest;

use super::{cache_dir, is_commit, repo_folder};
use crate::error::{Error, Result};

/// An ETag as the Hub sends it (`"<hex>"`, maybe `W/"<hex>"`), reduced to
/// the blob name it stands for: 40 hex (a git blob id) or 64 hex (the
/// sha256 of an LFS file), lower case. None for anything else.
pub(super) fn blob_name(etag: &str) -> Option<String> {
    let e = etag.trim();
    let e = e.strip_prefix("W/").unwrap_or(e);
    let e = e.strip_prefix('"').unwrap_or(e);
    let e = e.strip_suffix('"').unwrap_or(e);
    ((e.len() == 40 || e.len() == 64) && e.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| e.to_ascii_lowercase())
}

/// A path inside a repository, split into plain components, or None when
/// any part could point elsewhere (empty, `.`, `..`, a backslash, a control
/// character, a leading `/`).
pub(super) fn repo_path_parts(path: &str) -> Option<Vec<&str>> {
    let parts: Vec<&str> = path.split('/').collect();
    parts
        .iter()
        .all(|p| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && !p.contains('\\')
                && !p.chars().any(char::is_control)
        })
        .then_some(parts)
}

/// The hash a blob's name is: sha256 (64 hex) or git's blob sha1 (40 hex,
/// over `blob <len>\0` and the content).
pub(super) enum Hasher {
    Sha256(sha2::Sha256),
    GitSha1(sha1::Sha1),
}

impl Hasher {
    pub(super) fn for_blob(name: &str, len: u64) -> Hasher {
        if name.len() == 64 {
            Hasher::Sha256(sha2::Sha256::new())
        } else {
            let mut h = sha1::Sha1::new();
            h.update(format!("blob {len}\0").as_bytes());
            Hasher::GitSha1(h)
        }
    }
    pub(super) fn update(&mut self, b: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(b),
            Hasher::GitSha1(h) => h.update(b),
        }
    }
    pub(super) fn finish(self) -> String {
        match self {
            Hasher::Sha256(h) => crate::hash::hex(&h.finalize()),
            Hasher::GitSha1(h) => crate::hash::hex(&h.finalize()),
        }
    }
    pub(super) fn what(name: &str) -> &'static str {
        if name.len() == 64 {
            "sha256"
        } else {
            "git blob id"
        }
    }
}

/// Hash the file at `path` as a blob named `name` would be. A sha256 blob
/// whose content matches its name is remembered for this process, so that
/// the safetensors reader does not hash the same bytes again for the
/// manifest.
fn hash_blob(path: &Path, name: &str) -> Result<String> {
    let identity = |p: &Path| {
        std::fs::File::open(p)
            .ok()
            .and_then(|f| crate::hash::FileIdentity::of(&f))
    };
    let before = identity(path);
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    let mut h = Hasher::for_blob(name, len);
    crate::hash::stream_file(path, |b| h.update(b))?;
    let got = h.finish();
    if got == name && name.len() == 64 {
        if let Some(id) = before.filter(|id| Some(*id) == identity(path)) {
            crate::hash::remember(id, &got);
        }
    }
    Ok(got)
}

/// One repository's folder in the cache, resolved.
pub(super) struct RepoCache {
    /// The cache folder of the repository, canonical.
    folder: PathBuf,
}

/// What a snapshot entry holds.
pub(super) enum Cached {
    /// A verified blob.
    Good,
    /// Nothing there.
    Missing,
    /// Something that is not a whole verified blob of this repository
    /// (why); the entry was removed so that the next fetch replaces it.
    Bad(String),
}

impl RepoCache {
    /// The repository's cache folder, created when `create` (online), and
    /// refused unless it resolves to a folder directly inside the cache.
    pub(super) fn open(repo: &str, create: bool) -> Result<Option<RepoCache>> {
        let root = cache_dir();
        if create {
            std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
        } else if !root.is_dir() {
            return Ok(None);
        }
        let root = std::fs::canonicalize(&root).map_err(|e| Error::io(&root, e))?;
        let name = repo_folder(repo);
        let folder = root.join(&name);
        match std::fs::symlink_metadata(&folder) {
            Ok(m) if m.file_type().is_symlink() => {
                // A user may keep a repository's cache elsewhere through a
                // link; what counts is where it resolves.
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Error::Hub(format!(
                    "{}: not a folder; the Hub cache is damaged there (remove it)",
                    folder.display()
                )))
            }
            Err(_) if create => {
                std::fs::create_dir(&folder)
                    .or_else(|e| {
                        if e.kind() == std::io::ErrorKind::AlreadyExists {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })
                    .map_err(|e| Error::io(&folder, e))?;
            }
            Err(_) => return Ok(None),
        }
        let folder = std::fs::canonicalize(&folder).map_err(|e| Error::io(&folder, e))?;
        Ok(Some(RepoCache { folder }))
    }

    pub(super) fn folder(&self) -> &Path {
        &self.folder
    }

    /// Create (or find) `parts` under the repository folder, one component
    /// at a time, never following a symbolic link, and check the result.
    #[cfg(feature = "hub")]
    fn make_dirs(&self, parts: &[&str]) -> Result<PathBuf> {
        let mut p = self.folder.clone();
        for part in parts {
            p.push(part);
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(Error::Hub(format!(
                        "{}: expected a folder of the Hub cache, found a file or a link; \
                         nothing was written there (remove it and run again)",
                        p.display()
                    )))
                }
                Err(_) => match std::fs::create_dir(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(Error::io(&p, e)),
                },
            }
        }
        self.check_inside(&p)?;
        Ok(p)
    }

    /// `p` (which must exist) resolves to a path inside the repository folder.
    fn check_inside(&self, p: &Path) -> Result<PathBuf> {
        let real = std::fs::canonicalize(p).map_err(|e| Error::io(p, e))?;
        if !real.starts_with(&self.folder) {
            return Err(Error::Hub(format!(
                "{}: resolves to {}, outside the Hub cache folder {}; refused",
                p.display(),
                real.display(),
                self.folder.display()
            )));
        }
        Ok(real)
    }

    /// The snapshot path of `file` at `commit` (not created).
    pub(super) fn entry(&self, commit: &str, file: &str) -> Result<PathBuf> {
        let parts = self.entry_parts(commit, file)?;
        let mut p = self.folder.clone();
        p.extend(parts);
        Ok(p)
    }

    fn entry_parts<'a>(&self, commit: &'a str, file: &'a str) -> Result<Vec<&'a str>> {
        if !is_commit(commit) || commit.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(Error::Network(format!(
                "{commit:?} is not a commit id; refused as a cache folder"
            )));
        }
        let parts = repo_path_parts(file).ok_or_else(|| {
            Error::Network(format!(
                "{file:?} is not a plain path inside a repository; refused"
            ))
        })?;
        let mut all = vec!["snapshots", commit];
        all.extend(parts);
        Ok(all)
    }

    /// Check the snapshot entry at `link`: a link (or file) that resolves to
    /// a blob of this repository whose content hashes to its name. A bad
    /// entry is removed (and its blob, when the blob is what is wrong).
    pub(super) fn check_entry(&self, link: &Path) -> Result<Cached> {
        if std::fs::symlink_metadata(link).is_err() {
            return Ok(Cached::Missing);
        }
        // Never remove anything through a folder that leads out of the cache.
        if let Some(parent) = link.parent() {
            self.check_inside(parent)?;
        }
        let blobs = self.folder.join("blobs");
        let bad = |why: String| -> Result<Cached> {
            let _ = std::fs::remove_file(link);
            Ok(Cached::Bad(why))
        };
        let Ok(real) = std::fs::canonicalize(link) else {
            return bad("a dangling link".into());
        };
        if real.parent() != Some(blobs.as_path()) {
            return bad(format!(
                "it points to {}, not to a blob of this repository's cache",
                real.display()
            ));
        }
        let Some(name) = real
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(blob_name)
        else {
            return bad("its blob is not named by a hash".into());
        };
        if !real.is_file() {
            return bad("its blob is not a regular file".into());
        }
        let got = hash_blob(&real, &name)?;
        if got != name {
            let _ = std::fs::remove_file(&real);
            return bad(format!(
                "its content does not match its {} ({got}, expected {name})",
                Hasher::what(&name)
            ));
        }
        Ok(Cached::Good)
    }

    /// Store the `size` bytes `body` yields as the blob `name`: streamed to
    /// a temporary file beside the blobs, hashed on the way, and renamed
    /// into place only when the size and the hash are right. `progress`
    /// sees the byte count. Errors name `what` (the repository and file).
    #[cfg(feature = "hub")]
    pub(super) fn store_blob(
        &self,
        name: &str,
        size: u64,
        body: &mut dyn Read,
        progress: &dyn Fn(u64),
        what: &str,
    ) -> Result<PathBuf> {
        debug_assert!(blob_name(name).as_deref() == Some(name));
        let blobs = self.make_dirs(&["blobs"])?;
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!("{name}."))
            .suffix(".incomplete")
            .tempfile_in(&blobs)
            .map_err(|e| Error::io(&blobs, e))?;
        let mut h = Hasher::for_blob(name, size);
        let mut buf = vec![0u8; 1 << 20];
        let mut got: u64 = 0;
        loop {
            // Never more than one byte past the announced size.
            let want = (buf.len() as u64).min(size + 1 - got) as usize;
            let n = match body.read(&mut buf[..want]) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(Error::Network(format!(
                        "{what}: the transfer failed after {got} of {size} bytes: {}",
                        super::http::describe_io(&e)
                    )))
                }
            };
            if n == 0 {
                break;
            }
            got += n as u64;
            if got > size {
                return Err(Error::Network(format!(
                    "{what}: the server sent more than the {size} bytes it announced; the \
                     download was stopped and nothing was kept"
                )));
            }
            h.update(&buf[..n]);
            tmp.write_all(&buf[..n])
                .map_err(|e| Error::io(tmp.path(), e))?;
            progress(got);
        }
        if got < size {
            return Err(Error::Network(format!(
                "{what}: the transfer was cut short ({got} of {size} bytes); nothing was kept, \
                 run again to fetch it"
            )));
        }
        let hash = h.finish();
        if hash != name {
            return Err(Error::Hub(format!(
                "{what}: the downloaded file does not match its {} ({hash}, expected {name}); \
                 nothing was kept",
                Hasher::what(name)
            )));
        }
        let path = blobs.join(name);
        let identity = crate::hash::FileIdentity::of(tmp.as_file());
        tmp.persist(&path).map_err(|e| Error::io(&path, e.error))?;
        // Renaming keeps the inode, size and time stamp: the reader of this
        // blob can take the hash just verified.
        if let (Some(id), 64) = (identity, name.len()) {
            crate::hash::remember(id, name);
        }
        Ok(path)
    }

    /// Point the snapshot entry of `file` at `commit` to the blob `name`
    /// (a relative link, as huggingface_hub makes), replacing whatever
    /// entry was there. Returns the entry's path.
    #[cfg(feature = "hub")]
    pub(super) fn link(&self, commit: &str, file: &str, name: &str) -> Result<PathBuf> {
        let parts = self.entry_parts(commit, file)?;
        let (leaf, dirs) = parts.split_last().expect("a snapshot entry has a name");
        let dir = self.make_dirs(dirs)?;
        let entry = dir.join(leaf);
        if std::fs::symlink_metadata(&entry).is_ok_and(|m| m.is_dir()) {
            return Err(Error::Hub(format!(
                "{}: a folder where a file of the snapshot belongs; remove it and run again",
                entry.display()
            )));
        }
        // Up from the entry's folder to the repository folder, then down.
        let mut target = PathBuf::new();
        for _ in 0..dirs.len() {
            target.push(Component::ParentDir);
        }
        target.push("blobs");
        target.push(name);
        // A link with a unique name beside the entry, renamed over it: the
        // entry is replaced whole, and a link there is replaced, not followed.
        let tmp = tempfile::Builder::new()
            .prefix(".lora-merge-link-")
            .make_in(&dir, |p| make_link(&target, p))
            .map_err(|e| Error::io(&dir, e))?;
        let (_, tmp_path) = tmp.keep().map_err(|e| Error::io(&dir, e.error))?;
        std::fs::rename(&tmp_path, &entry).map_err(|e| {
            let _ = std::fs::remove_file(&tmp_path);
            Error::io(&entry, e)
        })?;
        Ok(entry)
    }

    /// Record that `revision` (a branch or tag) is `commit`, as
    /// huggingface_hub does, so that offline runs find it.
    #[cfg(feature = "hub")]
    pub(super) fn write_ref(&self, revision: &str, commit: &str) -> Result<()> {
        let parts = repo_path_parts(revision)
            .ok_or_else(|| Error::Usage(format!("{revision:?} is not a revision name")))?;
        let (leaf, dirs) = parts.split_last().expect("a revision has a name");
        let mut all = vec!["refs"];
        all.extend_from_slice(dirs);
        let dir = self.make_dirs(&all)?;
        let path = dir.join(leaf);
        if std::fs::symlink_metadata(&path).is_ok_and(|m| !m.is_file()) {
            return Err(Error::Hub(format!(
                "{}: not a regular file; remove it and run again",
                path.display()
            )));
        }
        let mut tmp = tempfile::NamedTempFile::new_in(&dir).map_err(|e| Error::io(&dir, e))?;
        tmp.write_all(commit.as_bytes())
            .map_err(|e| Error::io(&path, e))?;
        tmp.persist(&path).map_err(|e| Error::io(&path, e.error))?;
        Ok(())
    }

    /// The commit a ref file names, when it names one.
    pub(super) fn read_ref(&self, revision: &str) -> Option<String> {
        let parts = repo_path_parts(revision)?;
        let mut p = self.folder.join("refs");
        p.extend(parts);
        let real = self.check_inside(&p).ok()?;
        let mut s = String::new();
        std::fs::File::open(real)
            .ok()?
            .take(128)
            .read_to_string(&mut s)
            .ok()?;
        let s = s.trim();
        is_commit(s).then(|| s.to_ascii_lowercase())
    }
}

#[cfg(all(unix, feature = "hub"))]
fn make_link(target: &Path, at: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, at)
}

#[cfg(all(not(unix), feature = "hub"))]
fn make_link(target: &Path, at: &Path) -> std::io::Result<()> {
    // Where links are not available, huggingface_hub copies; a blob never
    // changes, so a hard link is as good and costs nothing.
    let blob = at
        .parent()
        .map(|d| d.join(target))
        .unwrap_or_else(|| target.to_path_buf());
    std::fs::hard_link(blob, at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_and_paths_are_checked_before_any_use() {
        let h64 = "ab".repeat(32);
        assert_eq!(blob_name(&format!("\"{h64}\"")), Some(h64.clone()));
        assert_eq!(
            blob_name(&format!("W/\"{}\"", "AB".repeat(20))),
            Some("ab".repeat(20))
        );
        for bad in [
            "\"../../x\"",
            "/etc/passwd",
            "\"abc\"",
            &format!("\"{h64}/..\""),
            &format!("{}g", &h64[..63]),
            "",
        ] {
            assert_eq!(blob_name(bad), None, "{bad}");
        }
        assert_eq!(repo_path_parts("a/b.json"), Some(vec!["a", "b.json"]));
        for bad in ["../x", "/x", "a//b", "a/./b", "a\\..\\b", "a/\nb", ""] {
            assert_eq!(repo_path_parts(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn git_blob_ids_and_sha256_are_the_names() {
        // `git hash-object` of "hello\n".
        let mut h = Hasher::for_blob(&"0".repeat(40), 6);
        h.update(b"hello\n");
        assert_eq!(h.finish(), "ce013625030ba8dba906f756967f9e9ca394464a");
        let mut h = Hasher::for_blob(&"0".repeat(64), 6);
        h.update(b"hello\n");
        assert_eq!(h.finish(), crate::hash::sha256_hex(b"hello\n"));
    }
}
