//! What the integration tests that drive Python share: the project's venv,
//! running a committed script, fixture generation and the "N passed, 0
//! failed" summary of the oracle scripts, running the binary, and the test
//! Hub server. (Each test binary uses a part.)
#![allow(dead_code)]

pub mod hub_server;

use std::path::PathBuf;
use std::process::{Command, Output};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A command for a test to run. Tests run side by side (two on two
/// cores), and OpenMP threads (libtorch's, in our companion and in the
/// Python oracles) that spin while waiting take the CPU from the other
/// test: with a passive wait policy the whole suite measured 3m49s instead
/// of 5m48s on 2 cores. A policy set by the caller is kept.
pub fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    if std::env::var_os("OMP_WAIT_POLICY").is_none() {
        c.env("OMP_WAIT_POLICY", "PASSIVE");
    }
    c
}

/// Run the `lora-merge` binary under test with `args` (colour off).
pub fn run(args: &[&str]) -> Output {
    command(env!("CARGO_BIN_EXE_lora-merge"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run lora-merge")
}

/// The venv's Python, which setup.sh fills with torch and the oracles.
pub fn python() -> PathBuf {
    let p = repo().join(".venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run ./setup.sh first (it installs torch, transformers, peft and \
         diffusers into .venv)",
        p.display()
    );
    p
}

/// Run `script` (relative to the repo) with `args`, the binary under test
/// as LORA_MERGE_BIN.
pub fn run_script(script: &str, args: &[&std::ffi::OsStr], bin: &str) -> Output {
    command(python())
        .arg(repo().join(script))
        .args(args)
        .env("LORA_MERGE_BIN", bin)
        .env("PYTHONUNBUFFERED", "1")
        .output()
        .expect("run python")
}

/// Run a fixture script into a new directory that outlives the test (the
/// fixtures are shared by every test of the binary); panics with the
/// script's output if it fails.
pub fn generate(script: &str, args: &[&str]) -> PathBuf {
    let dir = tempfile::tempdir().unwrap().keep();
    let mut all: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    all.push("--out".as_ref());
    all.push(dir.as_os_str());
    let out = run_script(script, &all, "");
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{}", String::from_utf8_lossy(&out.stdout));
    dir
}

/// An oracle script's run: it must succeed and end with "N passed, 0
/// failed" for some N >= `min_checks`, so that a script that checked
/// nothing cannot pass.
pub fn assert_oracle_passed(out: &Output, what: &str, min_checks: usize) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "{what} failed:\n{stdout}\n{stderr}");
    let last = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let passed: usize = last
        .split(" passed")
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        last.ends_with(", 0 failed") && passed >= min_checks,
        "{what}: expected at least {min_checks} passed checks, got {last:?}"
    );
}

/// Every file under `dir` with its bytes: a snapshot to prove that a run
/// changed nothing there.
pub fn snapshot(dir: &std::path::Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}
