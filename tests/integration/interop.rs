//! Interoperability with real Python PEFT: the merged adapters must load in
//! `PeftModel.from_pretrained` with no missing or unexpected keys, and PEFT's
//! own delta computation must agree with what we promise (exact: the weighted
//! sum of the inputs' deltas; svd: the optimal rank-N error; linear: PEFT's
//! own add_weighted_adapter). The checks live in tests/python/peft_interop.py;
//! this test runs it against the binary cargo just built and requires every
//! check on our outputs by name, so that a run that skipped outputs (a
//! failed merge, a load that returned early) cannot pass on the input
//! checks alone.

use crate::common;

use std::collections::BTreeSet;

/// Every check the script must pass on what lora-merge wrote.
fn expected_output_checks() -> BTreeSet<String> {
    const RUN: [&str; 2] = ["run", "files"];
    const LOAD: [&str; 6] = [
        "config",
        "st-metadata",
        "dtype",
        "peft-load",
        "keys",
        "load-result",
    ];
    const EXACT: [&str; 5] = ["module-set", "deltas", "ranks", "manifest", "forward"];
    const SVD: [&str; 4] = ["module-set", "optimal", "ranks", "manifest-rel_error"];
    const DTYPE: [&str; 2] = ["module-set", "deltas"];
    const LINEAR: [&str; 3] = ["module-set", "vs-peft-linear", "ranks"];
    let mut want = BTreeSet::new();
    let mut add = |label: &str, own: &[&str]| {
        for c in RUN.iter().chain(&LOAD).chain(own) {
            want.insert(format!("{label}/{c}"));
        }
    };
    for label in [
        "exact-default",
        "exact-weighted",
        "exact-method-flag",
        "demo-exact",
    ] {
        add(label, &EXACT);
    }
    for label in ["svd-r4", "svd-r4-weighted", "svd-r12"] {
        add(label, &SVD);
    }
    const AUTO: [&str; 4] = ["module-set", "auto-ranks", "optimal", "manifest-rel_error"];
    for label in ["svd-auto-energy", "svd-auto-tolerance"] {
        add(label, &AUTO);
    }
    for label in ["exact-f16", "exact-bf16"] {
        add(label, &DTYPE);
    }
    for label in ["linear-default", "linear-weighted"] {
        add(label, &LINEAR);
    }
    want.insert("exact-default/vs-peft-cat".into());
    want
}

#[test]
fn peft_loads_and_agrees_with_our_merges() {
    let out = common::run_script(
        "tests/python/peft_interop.py",
        &[],
        env!("CARGO_BIN_EXE_lora-merge"),
    );
    let want = expected_output_checks();
    common::assert_oracle_passed(&out, "PEFT interop", want.len());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let passed: BTreeSet<String> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("PASS "))
        .map(|l| l.split(':').next().unwrap_or(l).trim().to_string())
        .collect();
    let missing: Vec<&String> = want.difference(&passed).collect();
    assert!(
        missing.is_empty(),
        "output checks that did not pass: {missing:?}"
    );
    // Exactly these checks look at outputs: a new one must be added here.
    let outputs: BTreeSet<&String> = passed
        .iter()
        .filter(|c| {
            !["setup/", "inputs/", "fixture/", "peft-cat/"]
                .iter()
                .any(|p| c.starts_with(p))
        })
        .collect();
    assert_eq!(
        outputs.len(),
        want.len(),
        "unexpected output checks: {:?}",
        outputs
            .iter()
            .filter(|c| !want.contains(**c))
            .collect::<Vec<_>>()
    );
}
