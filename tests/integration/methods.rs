//! The pruning merges (ties, dare-linear, dare-ties, magnitude-prune): their
//! flags, and PEFT's merge_utils as the oracle of what they compute
//! (tests/python/merge_methods.py, on the committed demo adapters).

use std::collections::BTreeSet;

use crate::common::{self, run};

fn demo(name: &str) -> String {
    common::repo()
        .join("fixtures/adapters")
        .join(name)
        .to_str()
        .unwrap()
        .to_string()
}

/// Every flag a method ignores, every missing one and every bad value is
/// refused by name before anything is read or written, with the usage
/// status.
#[test]
fn pruning_methods_refuse_bad_and_ignored_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let (a, b) = (demo("alpha"), demo("gamma"));
    let cases: &[(&[&str], &str)] = &[
        (&["--method", "ties", "--density", "0.2"], "needs --rank"),
        (
            &["--method", "dare-linear", "--rank", "4"],
            "needs --density",
        ),
        (
            &["--method", "ties", "--rank", "4", "--density", "0"],
            "(0, 1]",
        ),
        (
            &["--method", "ties", "--rank", "4", "--density", "1.01"],
            "(0, 1]",
        ),
        (
            &["--method", "dare-ties", "--rank", "4", "--density", "NaN"],
            "(0, 1]",
        ),
        (
            &["--method", "ties", "--rank", "0", "--density", "0.2"],
            "--rank must be at least 1",
        ),
        (
            &["--method", "svd", "--rank", "4", "--density", "0.2"],
            "--density only applies",
        ),
        (
            &["--method", "exact", "--density", "0.5"],
            "--density only applies",
        ),
        (
            &[
                "--method",
                "magnitude-prune",
                "--rank",
                "4",
                "--density",
                "0.2",
                "--majority-sign",
                "total",
            ],
            "--majority-sign only applies",
        ),
        (
            &[
                "--method",
                "dare-linear",
                "--rank",
                "4",
                "--density",
                "0.2",
                "--majority-sign",
                "frequency",
            ],
            "--majority-sign only applies",
        ),
        (
            &[
                "--method",
                "ties",
                "--rank",
                "4",
                "--density",
                "0.2",
                "--seed",
                "1",
            ],
            "--seed only applies",
        ),
        (&["--seed", "1"], "--seed only applies"),
        (
            &["--method", "linear", "--rank", "4"],
            "--rank only applies",
        ),
        (
            &[
                "--method",
                "ties",
                "--rank",
                "4",
                "--density",
                "0.2",
                "--majority-sign",
                "most",
            ],
            "invalid value",
        ),
        // --rank auto and its targets.
        (
            &["--method", "svd", "--rank", "auto"],
            "--rank auto needs a target",
        ),
        (
            &[
                "--method",
                "svd",
                "--rank",
                "auto",
                "--energy",
                "0.9",
                "--tolerance",
                "0.1",
            ],
            "not both",
        ),
        (
            &["--method", "svd", "--rank", "auto", "--energy", "1.5"],
            "--energy must be in (0, 1]",
        ),
        (
            &["--method", "svd", "--rank", "auto", "--tolerance", "1"],
            "--tolerance must be in [0, 1)",
        ),
        (
            &["--method", "svd", "--rank", "8", "--energy", "0.9"],
            "--energy only applies with --rank auto",
        ),
        (
            &["--method", "svd", "--rank", "8", "--max-rank", "4"],
            "--max-rank only applies with --rank auto",
        ),
        (
            &[
                "--method",
                "svd",
                "--rank",
                "auto",
                "--energy",
                "0.9",
                "--max-rank",
                "0",
            ],
            "--max-rank must be at least 1",
        ),
        (&["--method", "svd", "--rank", "most"], "`auto`"),
    ];
    for (flags, why) in cases {
        let mut args = vec!["uniform", "--adapters", &a, &b, "-o", out.to_str().unwrap()];
        args.extend_from_slice(flags);
        let o = run(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{flags:?}: {err}");
        assert!(err.contains(why), "{flags:?}: expected {why:?} in {err}");
        assert!(!out.exists(), "{flags:?} wrote an output");
    }
    // The same flags are fine where they apply.
    let o = run(&[
        "uniform",
        "--adapters",
        &a,
        &b,
        "-o",
        out.to_str().unwrap(),
        "--method",
        "dare-ties",
        "--rank",
        "4",
        "--density",
        "0.5",
        "--majority-sign",
        "frequency",
        "--seed",
        "9",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains("dare-ties (density 0.5, majority sign frequency, seed 9, rank 4)"),
        "{card}"
    );
    // --rank auto applies to the pruning methods too, and the card says so.
    let o = run(&[
        "uniform",
        "--adapters",
        &a,
        &b,
        "-o",
        out.to_str().unwrap(),
        "--force",
        "--method",
        "ties",
        "--density",
        "0.5",
        "--rank",
        "auto",
        "--energy",
        "0.8",
        "--max-rank",
        "6",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("rank auto (energy 0.8, at most 6)"), "{card}");
    let man: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("merge_manifest.json")).unwrap()).unwrap();
    for (name, m) in man["modules"].as_object().unwrap() {
        let r = m["rank"].as_u64().unwrap();
        assert!((1..=6).contains(&r), "{name}: {m}");
        assert!(
            m["energy"].as_f64().unwrap() >= 0.8 - 1e-6 || r == 6,
            "{name}: {m}"
        );
    }
}

#[test]
fn uniform_help_names_every_method() {
    let help = String::from_utf8(run(&["uniform", "--help"]).stdout).unwrap();
    for m in [
        "exact",
        "svd",
        "linear",
        "ties",
        "dare-linear",
        "dare-ties",
        "magnitude-prune",
        "--density",
        "--majority-sign",
        "--seed",
    ] {
        assert!(help.contains(m), "{m} missing from uniform --help");
    }
}

/// Every check the oracle must pass, by name, so that a run that skipped a
/// case cannot pass on the others.
fn expected_checks() -> BTreeSet<String> {
    let mut want = BTreeSet::from(["setup/inputs".to_string()]);
    let mut add = |label: &str, own: &[&str]| {
        for c in own {
            want.insert(format!("{label}/{c}"));
        }
    };
    const PRUNED: [&str; 4] = ["manifest-method", "module-set", "vs-peft", "lossless-rank"];
    for label in ["ties-total", "ties-density-1", "magnitude-prune"] {
        add(label, &PRUNED);
        add(label, &["default-weights"]);
    }
    for label in ["ties-frequency-weighted", "magnitude-prune-weighted"] {
        add(label, &PRUNED);
    }
    add("ties-rank-8", &["ranks", "manifest-rel_error", "optimal"]);
    add("dare-masks", &["kept-fraction", "rescaled", "independent"]);
    for label in [
        "dare-linear",
        "dare-linear-weighted",
        "dare-ties",
        "dare-ties-frequency-weighted",
    ] {
        add(label, &["manifest-method", "module-set", "vs-peft"]);
    }
    add(
        "dare-ties",
        &["same-seed-same-bytes", "other-seed-other-bytes"],
    );
    add("dare-mean", &["approaches-linear"]);
    want
}

#[test]
fn peft_merge_utils_agree_with_the_pruning_methods() {
    let out = common::run_script(
        "tests/python/merge_methods.py",
        &[],
        env!("CARGO_BIN_EXE_lora-merge"),
    );
    let want = expected_checks();
    common::assert_oracle_passed(&out, "merge methods oracle", want.len());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let passed: BTreeSet<String> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("PASS "))
        .map(|l| l.split(':').next().unwrap_or(l).trim().to_string())
        .collect();
    let missing: Vec<&String> = want.difference(&passed).collect();
    assert!(missing.is_empty(), "checks that did not pass: {missing:?}");
    let extra: Vec<&String> = passed.difference(&want).collect();
    assert!(extra.is_empty(), "new checks to list here: {extra:?}");
}
