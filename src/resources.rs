//! What a run needs, checked against what the machine has, before the work
//! starts: a merge that cannot fit is refused with the figures and what to
//! do, instead of dying of an allocation failure (SIGABRT) halfway.

use std::path::Path;

use crate::{Error, Result};

/// What a run will need, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct Need {
    /// Peak memory of the run's own allocations (inputs are mapped, not
    /// copied, and do not count).
    pub memory: u64,
    /// What it writes.
    pub disk: u64,
}

fn meminfo_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A cgroup (v2) limit on this process's memory, less what it uses: what a
/// container allows, which /proc/meminfo does not show.
fn cgroup_available() -> Option<u64> {
    let rel = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = rel.lines().find_map(|l| l.strip_prefix("0::"))?.trim();
    let dir = Path::new("/sys/fs/cgroup").join(rel.trim_start_matches('/'));
    let max: u64 = std::fs::read_to_string(dir.join("memory.max"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let current: u64 = std::fs::read_to_string(dir.join("memory.current"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    Some(max.saturating_sub(current))
}

/// The memory a run may plan for, and where the figure comes from:
/// LORA_MERGE_MEMORY_LIMIT (bytes) when set, else the least of the system's
/// available memory and the cgroup's allowance. None when unknown.
pub fn memory_available() -> Option<(u64, &'static str)> {
    if let Some(v) = std::env::var("LORA_MERGE_MEMORY_LIMIT")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        return Some((v, "LORA_MERGE_MEMORY_LIMIT"));
    }
    match (meminfo_available(), cgroup_available()) {
        (Some(m), Some(c)) if c < m => Some((c, "the cgroup's memory limit")),
        (Some(m), _) => Some((m, "MemAvailable")),
        (None, Some(c)) => Some((c, "the cgroup's memory limit")),
        (None, None) => None,
    }
}

/// Free space for an unprivileged writer on the file system that holds
/// `path` (or its nearest existing ancestor).
pub fn disk_available(path: &Path) -> Option<u64> {
    free_space(&existing_ancestor(path)?)
}

/// `path` made absolute, or its nearest ancestor that exists: where a run
/// that will write `path` can put temporary files on the same file system.
pub fn existing_ancestor(path: &Path) -> Option<std::path::PathBuf> {
    let mut p = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().ok()?.join(path)
    };
    while !p.is_dir() {
        p = p.parent()?.to_path_buf();
    }
    Some(p)
}

/// A temporary file for the merged factors, on the file system of `out`
/// (whose free space [`check`] counted), beside it.
pub fn spill_for(out: &Path) -> Result<crate::compose::spill::Spill> {
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .and_then(existing_ancestor)
        .or_else(|| existing_ancestor(Path::new(".")))
        .ok_or_else(|| crate::Error::io(out, std::io::Error::other("no folder to write in")))?;
    crate::compose::spill::Spill::new_in(&dir)
}

#[cfg(unix)]
fn free_space(p: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    // SAFETY: a valid NUL-terminated path and a zeroed struct the call fills.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) != 0 {
            return None;
        }
        Some((s.f_bavail as u64).saturating_mul(s.f_frsize as u64))
    }
}

#[cfg(not(unix))]
fn free_space(_p: &Path) -> Option<u64> {
    None
}

/// Refuse `need` when it cannot fit: in memory, or on the disk holding
/// `out`. `what` names the run, `smaller` says how to make it smaller.
pub fn check(need: Need, out: &Path, what: &str, smaller: &str) -> Result<()> {
    use crate::ui::human_bytes;
    if let Some((have, source)) = memory_available() {
        if need.memory > have {
            return Err(Error::Usage(format!(
                "{what} needs about {} of memory and {} ({source}) is available; nothing was \
                 done. {smaller} (If the figure is wrong, set LORA_MERGE_MEMORY_LIMIT to the \
                 bytes this run may use.)",
                human_bytes(need.memory),
                human_bytes(have)
            )));
        }
    }
    if let Some(free) = disk_available(out) {
        if need.disk > free {
            return Err(Error::Usage(format!(
                "{what} writes about {} and the disk holding {} has {} free; nothing was \
                 done. {smaller}",
                human_bytes(need.disk),
                out.display(),
                human_bytes(free)
            )));
        }
    }
    Ok(())
}

/// Lets glibc's malloc keep and reuse the memory a merge frees, instead of
/// handing it back to the kernel after every module. A merge allocates
/// and frees tens of megabytes per module (decoded factors, stacked
/// factors, Gram matrices); by default blocks over a dynamic threshold
/// are mapped and unmapped each time and the heap top is trimmed, so every
/// module paid page faults and the kernel's zeroing of fresh pages: about
/// a sixth of an SDXL merge of 32 adapters went to system time. Blocks up to
/// 32 MiB (glibc's ceiling for this setting) now come from the heap, and
/// free memory at the heap top is kept up to 1 GiB. Peak memory does not
/// grow: what is kept is what the next module takes again. Elsewhere than
/// glibc this does nothing. Returns whether both settings were taken.
pub fn reuse_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes malloc's tuning parameters (under its
        // own lock); both values are in the ranges glibc documents.
        unsafe {
            let mmap = libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            let trim = libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            mmap == 1 && trim == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// glibc takes both values (it refuses a mapping threshold over
    /// 32 MiB on 64-bit targets).
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn malloc_takes_the_reuse_settings() {
        assert!(reuse_freed_memory());
    }

    #[test]
    fn a_need_beyond_the_limit_is_refused_with_figures() {
        // The variable is read per call; no other test sets it.
        std::env::set_var("LORA_MERGE_MEMORY_LIMIT", "1000000");
        let tmp = tempfile::tempdir().unwrap();
        let e = check(
            Need {
                memory: 5_000_000,
                disk: 10,
            },
            &tmp.path().join("out"),
            "this merge",
            "Use --method svd.",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("LORA_MERGE_MEMORY_LIMIT") && e.contains("Use --method svd."),
            "{e}"
        );
        assert!(check(
            Need {
                memory: 10,
                disk: 10
            },
            &tmp.path().join("out"),
            "this merge",
            ""
        )
        .is_ok());
        std::env::remove_var("LORA_MERGE_MEMORY_LIMIT");
        assert!(disk_available(&tmp.path().join("a/b/c")).is_some());
    }
}
