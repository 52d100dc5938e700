//! The output commit protocol (src/output/atomic.rs): one run per OUT at a
//! time, nothing replaced that appeared during a run without --force, and a
//! run killed at any moment (SIGKILL, SIGINT, SIGTERM) leaves OUT absent, the
//! old output, or the whole new one, with nothing left behind that a later
//! run does not remove.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common;

const BIN: &str = env!("CARGO_BIN_EXE_lora-merge");

fn fixture(name: &str) -> String {
    common::repo()
        .join("fixtures/adapters")
        .join(name)
        .display()
        .to_string()
}

fn merge(out: &Path, adapters: &[&str], force: bool) -> Command {
    let mut c = common::command(BIN);
    c.arg("uniform").arg("--adapters");
    for a in adapters {
        c.arg(fixture(a));
    }
    c.arg("-o").arg(out).env("NO_COLOR", "1");
    if force {
        c.arg("--force");
    }
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Names in `dir` that a run on OUT makes beside it.
fn beside(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("lora-merge"))
        .collect();
    v.sort();
    v
}

fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    common::snapshot(dir)
        .into_iter()
        .map(|(p, b)| (p.strip_prefix(dir).unwrap().to_path_buf(), b))
        .collect()
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: a plain kill(2) of our own child.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

#[test]
fn a_second_run_on_one_output_is_refused_while_the_first_holds_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");

    // Two runs at once on a fresh OUT, each slowed before its swap: one
    // writes, the other is refused before its work, naming the holder.
    let first = merge(&out, &["alpha", "beta"], false)
        .env("LORA_MERGE_TEST_SWAP_DELAY_MS", "3000")
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let second = merge(&out, &["alpha", "gamma"], true).output().unwrap();
    assert_eq!(second.status.code(), Some(1), "{}", text(&second));
    assert!(
        text(&second).contains(&format!(
            "another lora-merge run (process {}) is writing",
            first.id()
        )),
        "{}",
        text(&second)
    );
    let first = first.wait_with_output().unwrap();
    assert!(first.status.success(), "{}", text(&first));
    assert!(common::run(&["verify", out.to_str().unwrap()])
        .status
        .success());
    // The lock file is removed when the run ends.
    assert_eq!(beside(tmp.path()), Vec::<String>::new());
    // Free again: a later run with --force replaces it.
    let third = merge(&out, &["alpha", "gamma"], true).output().unwrap();
    assert!(third.status.success(), "{}", text(&third));
}

#[test]
fn what_appears_in_out_during_a_run_is_replaced_only_with_force() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let child = merge(&out, &["alpha", "beta"], false)
        .env("LORA_MERGE_TEST_SWAP_DELAY_MS", "2000")
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("appeared"), "{}", text(&o));
    assert!(text(&o).contains("--force"), "{}", text(&o));
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
    assert_eq!(beside(tmp.path()), Vec::<String>::new());

    // With --force, the same race replaces it.
    std::fs::remove_dir_all(&out).unwrap();
    let child = merge(&out, &["alpha", "beta"], true)
        .env("LORA_MERGE_TEST_SWAP_DELAY_MS", "2000")
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(!out.join("notes.txt").exists());
}

/// Kill a merge that replaces an existing OUT at many moments spread over
/// its whole run (and, with a delay, just before its swap), with SIGKILL,
/// SIGINT and SIGTERM in turn.
#[test]
fn a_run_killed_at_any_moment_leaves_the_old_output_or_the_whole_new_one() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let old_run = merge(&out, &["alpha", "beta"], false).output().unwrap();
    assert!(old_run.status.success(), "{}", text(&old_run));
    let mut old = files(&out);

    // The new output, made once elsewhere, for its weights.
    // The new output, made elsewhere, for its weights; the slowest of three
    // runs sets the span the kill points are spread over.
    let reference = tmp.path().join("reference");
    let mut run_time = Duration::ZERO;
    for _ in 0..3 {
        let t0 = Instant::now();
        let r = merge(&reference, &["alpha", "gamma"], true)
            .output()
            .unwrap();
        run_time = run_time.max(t0.elapsed());
        assert!(r.status.success(), "{}", text(&r));
    }
    let new_weights = std::fs::read(reference.join("adapter_model.safetensors")).unwrap();

    let mut rng = lora_merge::rng::Rng(20261201);
    let (mut saw_old, mut saw_new, mut leftovers_cleaned) = (0, 0, 0);
    let points = 60;
    for i in 0..points {
        let sig = [libc::SIGKILL, libc::SIGINT, libc::SIGTERM][i % 3];
        // Every third run also pauses before its swap, so that kills land
        // between staging and swap as often as elsewhere.
        let delay = if i % 4 == 3 { 300 } else { 0 };
        let span = run_time.as_secs_f64() * 1.3 + delay as f64 / 1000.0;
        let at = Duration::from_secs_f64(span * (rng.next_u64() % 1000) as f64 / 1000.0);
        let left_before = beside(tmp.path());
        let child = merge(&out, &["alpha", "gamma"], true)
            .env("LORA_MERGE_TEST_SWAP_DELAY_MS", delay.to_string())
            .spawn()
            .unwrap();
        std::thread::sleep(at);
        signal(&child, sig);
        let o = child.wait_with_output().unwrap();
        if text(&o).contains("removed") {
            leftovers_cleaned += 1;
        }

        // OUT is the old output, byte for byte, or the whole new one.
        assert!(out.is_dir(), "point {i}: OUT vanished");
        let now = files(&out);
        if now == old {
            saw_old += 1;
        } else {
            let v = common::run(&["verify", out.to_str().unwrap()]);
            assert!(v.status.success(), "point {i}: {}", text(&v));
            assert_eq!(
                std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
                new_weights,
                "point {i}"
            );
            saw_new += 1;
            // Back to the old output for the next point.
            std::fs::remove_dir_all(&out).unwrap();
            assert!(merge(&out, &["alpha", "beta"], false)
                .output()
                .unwrap()
                .status
                .success());
            old = files(&out);
        }
        // After Ctrl-C or SIGTERM the run left nothing beside OUT (what an
        // earlier SIGKILL left goes when a run gets as far as its claim);
        // after SIGKILL the next run removes it (checked at the end).
        if sig != libc::SIGKILL {
            let left = beside(tmp.path());
            assert!(
                left.iter().all(|n| left_before.contains(n)),
                "point {i}, signal {sig}: {left:?} (before: {left_before:?})"
            );
        }
    }
    println!(
        "{points} kill points over {:.0} ms runs: {saw_old} left the old output, {saw_new} the new \
         one; {leftovers_cleaned} runs removed what a killed run left",
        run_time.as_secs_f64() * 1000.0
    );
    assert!(
        saw_old > 0 && saw_new > 0,
        "the kill points did not span the run"
    );
    // The next run on OUT removes whatever a SIGKILL left, and says so.
    let o = merge(&out, &["alpha", "gamma"], true).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(beside(tmp.path()), Vec::<String>::new());
}

/// A merge that cannot fit in memory is refused before any work, with the
/// figures, and leaves nothing (LORA_MERGE_MEMORY_LIMIT stands in for a
/// small machine; the same check reads MemAvailable and the cgroup limit).
#[test]
fn a_merge_that_cannot_fit_is_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = merge(&out, &["alpha", "beta", "gamma"], false)
        .env("LORA_MERGE_MEMORY_LIMIT", "1000000")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    for n in [
        "needs about",
        "of memory",
        "LORA_MERGE_MEMORY_LIMIT",
        "--rank",
    ] {
        assert!(text(&o).contains(n), "{n:?} is not in {}", text(&o));
    }
    assert!(!out.exists());
    assert_eq!(beside(tmp.path()), Vec::<String>::new());
    let o = merge(&out, &["alpha", "beta", "gamma"], false)
        .env("LORA_MERGE_MEMORY_LIMIT", "1000000000")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
}
