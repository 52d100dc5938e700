//! Interoperability with real Python PEFT: the merged adapters must load in
//! `PeftModel.from_pretrained` with no missing or unexpected keys, and PEFT's
//! own delta computation must agree with what we promise (exact: the weighted
//! sum of the inputs' deltas; svd: the optimal rank-N error; linear: PEFT's
//! own add_weighted_adapter). The checks live in tests/python/peft_interop.py;
//! this test runs it against the binary cargo just built.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn peft_loads_and_agrees_with_our_merges() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run ./setup.sh first (it installs torch, transformers and peft into .venv)",
        python.display()
    );
    let out = Command::new(&python)
        .arg(root.join("tests/python/peft_interop.py"))
        .env("LORA_MERGE_BIN", env!("CARGO_BIN_EXE_lora-merge"))
        .env("PYTHONUNBUFFERED", "1")
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "PEFT interop failed:\n{stdout}\n{stderr}"
    );
    // The script ends with "N passed, 0 failed"; make sure it really checked.
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
        last.ends_with(", 0 failed") && passed >= 8,
        "unexpected summary {last:?}"
    );
}
