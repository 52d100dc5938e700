//! Memory and I/O bounds of a merge: the output is never held whole in
//! memory (merged modules are spilled as they finish and streamed into the
//! file), a merge refused for incompatible inputs has read only headers,
//! and a failed allocation ends with a message and status 2, never an
//! abort. Limits are set with `ulimit -v` (address space), which is exact
//! and does not depend on what else the machine runs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use crate::common;

const BIN: &str = env!("CARGO_BIN_EXE_lora-merge");
const MIB: u64 = 1 << 20;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A small deterministic pattern (xorshift), as bf16 bits in [-0.06, 0.06].
fn pattern(seed: u32, n: usize) -> impl Iterator<Item = u16> {
    let mut s = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n).map(move |_| {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        let x = (s >> 8) as f32 / (1u32 << 24) as f32 * 0.12 - 0.06;
        (x.to_bits() >> 16) as u16
    })
}

/// A PEFT adapter in `dir`: `modules` modules `layers.{i}.proj` of
/// `fan_out x fan_in`, rank `r`, in bf16; the weights file is written by
/// hand (header, then data) so that any size is cheap to make.
fn write_adapter(dir: &Path, modules: usize, fan_out: usize, fan_in: usize, r: usize, seed: u32) {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": ["proj"],
        "base_model_name_or_path": "test/base", "task_type": "CAUSAL_LM",
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0usize;
    let mut sizes = Vec::new();
    for i in 0..modules {
        for (f, shape) in [("lora_A", [r, fan_in]), ("lora_B", [fan_out, r])] {
            let len = shape[0] * shape[1] * 2;
            header.insert(
                format!("base_model.model.layers.{i}.proj.{f}.weight"),
                serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + len]}),
            );
            offset += len;
            sizes.push(len / 2);
        }
    }
    let mut h = serde_json::Value::Object(header).to_string();
    while !(8 + h.len()).is_multiple_of(8) {
        h.push(' ');
    }
    let file = std::fs::File::create(dir.join("adapter_model.safetensors")).unwrap();
    let mut w = std::io::BufWriter::new(file);
    w.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    w.write_all(h.as_bytes()).unwrap();
    for (k, n) in sizes.into_iter().enumerate() {
        for v in pattern(seed * 1000 + k as u32, n) {
            w.write_all(&v.to_le_bytes()).unwrap();
        }
    }
    w.into_inner().unwrap().sync_all().unwrap();
}

/// `lora-merge ARGS` under an address-space limit of `limit` bytes, with
/// two merge threads and one malloc arena so that the process's own
/// baseline is the same on every machine.
fn limited(limit: u64, args: &[&str]) -> Output {
    let mut c = common::command("sh");
    c.arg("-c")
        .arg(format!("ulimit -v {} && exec \"$0\" \"$@\"", limit / 1024))
        .arg(BIN)
        .args(args)
        .env("NO_COLOR", "1")
        .env("RAYON_NUM_THREADS", "2")
        .env("MALLOC_ARENA_MAX", "1")
        // The memory check reads MemAvailable, which a ulimit does not
        // change; this limit is what the check cannot see.
        .env("LORA_MERGE_MEMORY_LIMIT", (1u64 << 40).to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c.output().unwrap()
}

fn dir_str(p: &Path) -> String {
    p.display().to_string()
}

/// The address space a trivial run of the binary takes: its baseline.
fn baseline() -> u64 {
    // A tiny merge, measured by the smallest limit it passes under, found by
    // doubling from 32 MiB.
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    write_adapter(&a, 1, 8, 8, 2, 1);
    let mut limit = 32 * MIB;
    loop {
        let out = tmp.path().join(format!("o{limit}"));
        let o = limited(
            limit,
            &["uniform", "--adapters", &dir_str(&a), "-o", &dir_str(&out)],
        );
        if o.status.success() {
            return limit;
        }
        assert!(limit < 8192 * MIB, "a tiny merge never ran: {}", text(&o));
        limit *= 2;
    }
}

/// The output of an exact merge of 8 adapters is 192 MiB as f32 (96 MiB as
/// written, bf16), in 48 modules of 4 MiB. Under a limit that leaves 112
/// MiB beyond the inputs' maps, it must succeed and equal the unlimited
/// run's bytes: the whole output (192 MiB) never existed in memory.
#[test]
fn an_output_larger_than_memory_is_streamed() {
    let tmp = tempfile::tempdir().unwrap();
    let mut adapters = Vec::new();
    for k in 0..8 {
        let d = tmp.path().join(format!("a{k}"));
        write_adapter(&d, 48, 2048, 2048, 32, k + 1);
        adapters.push(dir_str(&d));
    }
    let inputs: u64 = 8 * 48 * (2048 + 2048) * 32 * 2;
    assert_eq!(inputs, 96 * MIB);
    let args = |out: &Path| {
        let mut v = vec!["uniform".to_string(), "--adapters".into()];
        v.extend(adapters.iter().cloned());
        v.extend(["-o".into(), dir_str(out)]);
        v
    };
    let full = tmp.path().join("full");
    let o = common::command(BIN)
        .args(args(&full))
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));

    let base = baseline();
    let limit = base + inputs + 112 * MIB;
    let small = tmp.path().join("small");
    let a = args(&small);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let o = limited(limit, &a);
    assert!(
        o.status.success(),
        "under {} MiB (baseline {} MiB): {}",
        limit / MIB,
        base / MIB,
        text(&o)
    );
    let weights = "adapter_model.safetensors";
    assert_eq!(
        std::fs::read(full.join(weights)).unwrap(),
        std::fs::read(small.join(weights)).unwrap(),
        "the streamed output differs from the unlimited run's"
    );
    // Nothing of the spill is left beside the output.
    let left: Vec<PathBuf> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('a'))
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

/// A module whose merged factors alone exceed the limit: the allocation
/// fails, and the run says so and exits 2 (not SIGABRT's 134), leaving no
/// output and no staging folder, and an existing output untouched.
#[test]
fn a_failed_allocation_is_a_message_and_status_2() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    // One module of 16 Mi columns: A is 32 MiB in bf16, 64 MiB as f32.
    write_adapter(&a, 1, 1, 16 << 20, 1, 1);
    write_adapter(&b, 1, 1, 16 << 20, 1, 2);
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "old output").unwrap();
    let base = baseline();
    // The maps of both inputs fit, the merged A (128 MiB as f32) does not.
    let o = limited(
        base + 64 * MIB + 48 * MIB,
        &[
            "uniform",
            "--adapters",
            &dir_str(&a),
            &dir_str(&b),
            "-o",
            &dir_str(&out),
            "--force",
        ],
    );
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(
        t.contains("out of memory") && t.contains("Nothing was written"),
        "{t}"
    );
    assert!(
        !t.contains("panicked") && !t.contains("memory allocation of"),
        "{t}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "old output"
    );
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.contains("lora-merge")),
        "left behind: {names:?}"
    );
}

/// Pages of `path` in the page cache, as a fraction (mincore of a map).
fn resident(path: &Path) -> f64 {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    let page = 4096usize;
    let pages = len.div_ceil(page);
    let mut vec = vec![0u8; pages];
    // SAFETY: a read-only shared map of a file we opened, unmapped below;
    // mincore only writes `pages` bytes into `vec`.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        assert_eq!(libc::mincore(p, len, vec.as_mut_ptr()), 0);
        libc::munmap(p, len);
    }
    vec.iter().filter(|&&b| b & 1 == 1).count() as f64 / pages as f64
}

/// Drop `path` from the page cache (clean pages of a synced file).
fn evict(path: &Path) {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: advice on a file descriptor we own.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

/// Inputs that do not fit together are refused from their headers: the
/// tensor data of a 64 MiB input is not read (not hashed, not decoded). The
/// page cache shows it: evicted before the run, still absent after it,
/// while a run that does read it (inspect, which hashes) brings it in.
#[test]
fn an_incompatible_set_is_refused_before_its_data_is_read() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let tmp = tempfile::tempdir_in(&dir).unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    write_adapter(&a, 4, 4096, 4096, 512, 1); // 64 MiB
    write_adapter(&b, 4, 4096, 2048, 8, 2); // another fan_in
    let weights = a.join("adapter_model.safetensors");
    evict(&weights);
    let before = resident(&weights);
    if before > 0.5 {
        // This file system keeps files in memory (tmpfs): nothing to see.
        eprintln!("page cache eviction has no effect here ({before:.2} resident); not checked");
        return;
    }
    let out = tmp.path().join("out");
    let o = common::run(&[
        "uniform",
        "--adapters",
        &dir_str(&a),
        &dir_str(&b),
        "-o",
        &dir_str(&out),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("layers.0.proj"), "{}", text(&o));
    let after = resident(&weights);
    assert!(
        after < 0.05,
        "a refused merge read {:.0}% of an input's pages",
        after * 100.0
    );
    // The same measure sees a run that reads the data.
    let o = common::run(&["inspect", &dir_str(&a)]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(resident(&weights) > 0.9, "inspect should hash every byte");
}
