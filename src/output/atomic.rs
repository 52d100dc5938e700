//! Outputs appear whole or not at all. The protocol, for an output OUT in
//! folder P:
//!
//! 1. **Claim.** Before any work, the run takes an exclusive lock on
//!    `P/.OUT.lora-merge.lock` (an OS file lock, released by the kernel when
//!    the process ends, even by kill -9). A second run on the same OUT is
//!    refused at once, naming the process that holds it. Holding the lock,
//!    the run removes what interrupted runs on OUT left behind (staging
//!    folders `P/.OUT.lora-merge-XXXXXX`) and says so.
//! 2. **Stage.** Every file is written into a fresh staging folder
//!    `P/.OUT.lora-merge-XXXXXX` and synced to disk.
//! 3. **Swap.** Still holding the lock, the run checks OUT again (a file or
//!    a non-empty folder that appeared meanwhile is replaced only with
//!    `--force`), then swaps the staging folder and OUT in one atomic
//!    exchange (Linux `renameat2(RENAME_EXCHANGE)`; elsewhere, two renames
//!    a crash could split), so OUT is at every moment the old output or
//!    the new one. The old one, now in the staging folder, is removed.
//! 4. **Release.** The lock file is removed when the run ends, whatever
//!    the outcome.
//!
//! On failure, Ctrl-C or SIGTERM the staging folder and the lock file are
//! removed and OUT is untouched (a signal that arrives during the swap
//! waits for it). After kill -9 or a power cut, what was left is removed by
//! the next run on the same OUT.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// An output this process has claimed.
struct Held {
    /// OUT, absolute.
    target: PathBuf,
    lock_path: PathBuf,
    /// Holds the lock while open.
    _lock: File,
    force: bool,
    /// The staging folder in use, to remove on a signal.
    staging: Option<PathBuf>,
}

/// The outputs this process holds, and whether it is ending (after which
/// nothing new is claimed or staged: a signal's cleanup must not be
/// outrun by the main thread).
struct Registry {
    closing: bool,
    outputs: Vec<Held>,
}

static HELD: Mutex<Registry> = Mutex::new(Registry {
    closing: false,
    outputs: Vec::new(),
});

fn held() -> std::sync::MutexGuard<'static, Registry> {
    HELD.lock().unwrap_or_else(|e| e.into_inner())
}

fn closing_error() -> Error {
    Error::Usage("interrupted".into())
}

fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Ok(std::env::current_dir()
            .map_err(|e| Error::io(".", e))?
            .join(p))
    }
}

/// The name every temporary folder of OUT starts with.
fn staging_prefix(name: &str) -> String {
    format!(".{name}.lora-merge-")
}

/// Is `entry` (a name in P) a staging folder of OUT `name`: the prefix and
/// exactly six letters or digits, as the staging folders are made.
fn is_staging_of(entry: &str, name: &str) -> bool {
    entry
        .strip_prefix(&staging_prefix(name))
        .is_some_and(|rest| rest.len() == 6 && rest.bytes().all(|b| b.is_ascii_alphanumeric()))
}

fn name_of(target: &Path) -> Result<(PathBuf, String)> {
    let parent = target.parent().ok_or_else(|| {
        Error::Usage(format!(
            "output {} has no parent directory",
            target.display()
        ))
    })?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::Usage(format!("output {} has no name", target.display())))?;
    Ok((parent.to_path_buf(), name))
}

/// Claim OUT for this process (step 1). Idempotent; when OUT's folder
/// does not exist yet, the claim waits until staging creates it.
pub fn claim(target: &Path, force: bool) -> Result<()> {
    let target = absolute(target)?;
    let mut h = held();
    if h.closing {
        return Err(closing_error());
    }
    if let Some(e) = h.outputs.iter_mut().find(|e| e.target == target) {
        e.force = force;
        return Ok(());
    }
    let (parent, name) = name_of(&target)?;
    if !parent.is_dir() {
        return Ok(());
    }
    let lock_path = parent.join(format!(".{name}.lora-merge.lock"));
    let lock = lock_file(&lock_path, &target)?;
    remove_leftovers(&parent, &name);
    h.outputs.push(Held {
        target,
        lock_path,
        _lock: lock,
        force,
        staging: None,
    });
    Ok(())
}

/// Open and lock `path`, making sure the file locked is the one at `path`
/// (another run may remove it between our open and our lock).
fn lock_file(path: &Path, target: &Path) -> Result<File> {
    for _ in 0..5 {
        let mut f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        match f.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = (&f).take(32).read_to_string(&mut pid);
                let who = match pid.trim().parse::<u32>() {
                    Ok(p) => format!("process {p}"),
                    Err(_) => "another process".into(),
                };
                return Err(Error::Usage(format!(
                    "another lora-merge run ({who}) is writing {}; wait for it to finish or \
                     choose another -o",
                    target.display()
                )));
            }
            Err(fs::TryLockError::Error(e)) => return Err(Error::io(path, e)),
        }
        if same_file(&f, path) {
            let _ = f.set_len(0);
            let _ = writeln!(f, "{}", std::process::id());
            return Ok(f);
        }
    }
    Err(Error::Usage(format!(
        "cannot lock {}: other runs keep replacing it; try again",
        path.display()
    )))
}

#[cfg(unix)]
fn same_file(f: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_f: &File, path: &Path) -> bool {
    path.exists()
}

/// Remove the staging folders interrupted runs on OUT left in `parent`
/// (only called holding OUT's lock, so none of them is in use), and say so.
fn remove_leftovers(parent: &Path, name: &str) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let entry = e.file_name().to_string_lossy().into_owned();
        if is_staging_of(&entry, name) && e.file_type().is_ok_and(|t| t.is_dir()) {
            let size = dir_size(&e.path());
            if fs::remove_dir_all(e.path()).is_ok() {
                removed.push((entry, size));
            }
        }
    }
    if !removed.is_empty() {
        let total: u64 = removed.iter().map(|(_, s)| s).sum();
        crate::ui::warn(&format!(
            "removed {} folder(s) that interrupted runs on {} left in {} ({}): {}",
            removed.len(),
            name,
            parent.display(),
            crate::ui::human_bytes(total),
            removed
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
}

fn dir_size(p: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![p.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(_) => total += e.metadata().map(|m| m.len()).unwrap_or(0),
                Err(_) => {}
            }
        }
    }
    total
}

/// Step 4, and what a signal does: remove every staging folder in use and
/// every lock file this process holds. Called at exit and from the
/// Ctrl-C/SIGTERM handler (it waits for a swap in progress).
pub fn release_all() {
    release(held());
}

/// [`release_all`], unless the registry is locked (by the very thread that
/// calls this, when an allocation failed inside a registry update):
/// waiting would never end. The next run then removes the leftovers.
pub fn release_all_now() {
    match HELD.try_lock() {
        Ok(h) => release(h),
        Err(std::sync::TryLockError::Poisoned(p)) => release(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => {}
    }
}

fn release(mut h: std::sync::MutexGuard<'static, Registry>) {
    h.closing = true;
    for e in h.outputs.drain(..) {
        if let Some(s) = &e.staging {
            // A file the main thread was creating as the cleanup began can
            // make one pass fail; no new one can appear after that.
            for _ in 0..20 {
                if fs::remove_dir_all(s).is_ok() || !s.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        // Removed while still locked, then unlocked by the drop.
        let _ = fs::remove_file(&e.lock_path);
    }
}

/// renameat2(2) with `flags`.
#[cfg(target_os = "linux")]
fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let a = std::ffi::CString::new(from.as_os_str().as_bytes())?;
    let b = std::ffi::CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: two valid NUL-terminated paths; the call only reads them.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The file system or the kernel cannot do this kind of rename.
#[cfg(target_os = "linux")]
fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
    )
}

/// Swap `staged` and `target`, both existing, in one step where the
/// system can; Ok(false) where it cannot.
#[cfg(target_os = "linux")]
fn exchange(staged: &Path, target: &Path) -> std::io::Result<bool> {
    match renameat2(staged, target, libc::RENAME_EXCHANGE) {
        Ok(()) => Ok(true),
        Err(e) if unsupported(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Rename `from` to `to` unless `to` exists (Ok(false) then), in one step
/// where the system can.
#[cfg(target_os = "linux")]
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<bool> {
    match renameat2(from, to, libc::RENAME_NOREPLACE) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
        Err(e) if unsupported(&e) => fallback_rename(from, to),
        Err(e) => Err(e),
    }
}

#[cfg(not(target_os = "linux"))]
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<bool> {
    fallback_rename(from, to)
}

/// rename(2), which replaces an empty folder and fails on a full one.
fn fallback_rename(from: &Path, to: &Path) -> std::io::Result<bool> {
    match fs::rename(from, to) {
        Ok(()) => Ok(true),
        Err(e) if to.exists() && e.kind() == std::io::ErrorKind::DirectoryNotEmpty => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_staged: &Path, _target: &Path) -> std::io::Result<bool> {
    Ok(false)
}

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
    /// Step 2: a fresh staging folder beside `target`, claimed first (with
    /// `force` false if no check claimed it: nothing is then replaced).
    pub fn new(target: &Path) -> Result<Staging> {
        let target = absolute(target)?;
        let (parent, name) = name_of(&target)?;
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
        let undo_parent = |e: Error| {
            if let Some(c) = &created_parent {
                let _ = fs::remove_dir_all(c);
            }
            e
        };
        let force = held()
            .outputs
            .iter()
            .find(|e| e.target == target)
            .is_some_and(|e| e.force);
        claim(&target, force).map_err(undo_parent)?;
        // Made and registered at once, so that a signal's cleanup sees it.
        let mut h = held();
        if h.closing {
            return Err(undo_parent(closing_error()));
        }
        let dir = tempfile::Builder::new()
            .prefix(&staging_prefix(&name))
            .rand_bytes(6)
            .tempdir_in(&parent)
            .map_err(|e| undo_parent(Error::io(&parent, e)))?;
        if let Some(e) = h.outputs.iter_mut().find(|e| e.target == target) {
            e.staging = Some(dir.path().to_path_buf());
        }
        drop(h);
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
        // No new file once a signal's cleanup has begun: it could land in
        // the folder after the cleanup emptied it.
        let file = {
            let h = held();
            if h.closing {
                return Err(closing_error());
            }
            File::create(&path).map_err(|e| Error::io(&path, e))?
        };
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

    /// Step 3: check OUT again and swap the staged folder into place.
    pub fn commit(mut self) -> Result<PathBuf> {
        let target = self.target.clone();
        let parent = target.parent().unwrap_or(Path::new(".")).to_path_buf();
        if let Some(ms) = std::env::var("LORA_MERGE_TEST_SWAP_DELAY_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            // For the crash tests: widen the moment between staging and swap.
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        // Held through the check and the swap: a signal handler waits.
        let mut h = held();
        if h.closing {
            return Err(closing_error());
        }
        let force = h
            .outputs
            .iter()
            .find(|e| e.target == target)
            .is_some_and(|e| e.force);
        let exists = match fs::symlink_metadata(&target) {
            Err(_) => false,
            Ok(m) if !m.is_dir() => {
                return Err(Error::Usage(format!(
                    "output {} appeared during the run and is not a directory; it was left as \
                     it is and the result was not kept",
                    target.display()
                )))
            }
            Ok(_) => {
                let non_empty = fs::read_dir(&target)
                    .map_err(|e| Error::io(&target, e))?
                    .next()
                    .is_some();
                if non_empty && !force {
                    return Err(Error::Usage(format!(
                        "output {} appeared (or was filled) during the run; it was left as it \
                         is and the result was not kept; pass --force to replace it",
                        target.display()
                    )));
                }
                true
            }
        };
        let dir = self
            .dir
            .take()
            .ok_or_else(|| Error::Internal("staging committed twice".into()))?;
        let staged = dir.keep();
        let undo = |e: std::io::Error, path: &Path| {
            let _ = fs::remove_dir_all(&staged);
            Error::io(path, e)
        };
        if exists {
            if exchange(&staged, &target).map_err(|e| undo(e, &target))? {
                // `staged` now holds the old output.
                let _ = fs::remove_dir_all(&staged);
            } else {
                // No atomic exchange here: the old output goes aside under
                // a staging name (which the next run would clean up), then
                // the new one moves in.
                let name = name_of(&target)?.1;
                let aside = tempfile::Builder::new()
                    .prefix(&staging_prefix(&name))
                    .rand_bytes(6)
                    .tempdir_in(&parent)
                    .map_err(|e| undo(e, &parent))?
                    .keep();
                fs::remove_dir(&aside).map_err(|e| undo(e, &aside))?;
                fs::rename(&target, &aside).map_err(|e| undo(e, &target))?;
                if let Err(e) = fs::rename(&staged, &target) {
                    let _ = fs::rename(&aside, &target);
                    return Err(undo(e, &target));
                }
                let _ = fs::remove_dir_all(&aside);
            }
        } else if !rename_noreplace(&staged, &target).map_err(|e| undo(e, &target))? {
            // Something took OUT's name between the check and the rename.
            let _ = fs::remove_dir_all(&staged);
            return Err(Error::Usage(format!(
                "output {} appeared during the run; it was left as it is and the result was \
                 not kept",
                target.display()
            )));
        }
        if let Some(e) = h.outputs.iter_mut().find(|e| e.target == target) {
            e.staging = None;
        }
        drop(h);
        self.created_parent = None;
        Ok(target)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // The TempDir removes itself; also remove parents we created.
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            drop(dir);
            if let Some(e) = held()
                .outputs
                .iter_mut()
                .find(|e| e.staging.as_deref() == Some(&path))
            {
                e.staging = None;
            }
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
