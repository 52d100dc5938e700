//! `lora-merge eval` end to end: the binary on tiny transformers checkpoints
//! (fixtures/make_model_fixtures.py) against the losses transformers
//! computed, and every kind of bad input refused with one clear line.

use crate::common;

use common::run;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use serde_json::Value;

use common::repo;

fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        common::generate(
            "fixtures/make_model_fixtures.py",
            &["-q", "--models", "llama,bert"],
        )
    })
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn reference(model: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join(model).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn causal_eval_reports_the_transformers_loss() {
    let f = fixtures();
    let base = f.join("llama");
    let data = f.join("causal.jsonl");
    let adapters: Vec<PathBuf> = ["a0", "a1", "a2"]
        .iter()
        .map(|a| base.join("adapters").join(a))
        .collect();
    let want = reference("llama");
    let mut args = vec!["eval", "--base", p(&base), "--data", p(&data), "--json"];
    let out = run(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = want["eval"]["base"]["loss"].as_f64().unwrap();
    assert!(
        (got["loss"].as_f64().unwrap() - r).abs() / r < 1e-5,
        "{got} vs {r}"
    );
    assert_eq!(got["tokens"], want["eval"]["base"]["tokens"]);
    assert_eq!(got["examples"], 6);
    assert_eq!(got["task"], "causal-lm");
    let ppl = got["perplexity"].as_f64().unwrap();
    assert!((ppl.ln() - got["loss"].as_f64().unwrap()).abs() < 1e-9);

    args.push("--adapters");
    args.extend(adapters.iter().map(|a| p(a)));
    args.extend(["--weights", "0.5", "-0.25", "1.5", "--batch-size", "4"]);
    let out = run(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = want["eval"]["composed"]["loss"].as_f64().unwrap();
    assert!(
        (got["loss"].as_f64().unwrap() - r).abs() / r < 1e-5,
        "{got} vs {r}"
    );
}

#[test]
fn classify_eval_reports_the_reference_accuracy() {
    let f = fixtures();
    let base = f.join("bert");
    let want = reference("bert");
    let support = f.join("classify_support.jsonl");
    let data = f.join("classify_data.jsonl");
    let a = fixture_adapters(&base);
    let out = run(&[
        "eval",
        "--base",
        p(&base),
        "--support",
        p(&support),
        "--data",
        p(&data),
        "--json",
        "--adapters",
        p(&a[0]),
        p(&a[1]),
        p(&a[2]),
        "--weights",
        "0.5",
        "-0.25",
        "1.5",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["task"], "classify");
    assert_eq!(got["accuracy"], want["eval"]["composed"]["accuracy"]);
    assert_eq!(got["examples"], 9);
}

/// A copy of the llama fixture whose config.json is changed by `edit`.
fn llama_with(name: &str, edit: impl Fn(&mut Value)) -> PathBuf {
    let src = fixtures().join("llama");
    let dst = fixtures().join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dst.join("config.json"), cfg.to_string()).unwrap();
    dst
}

fn assert_refused(args: &[&str], needles: &[&str]) {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("lora-merge: error: "))
        .unwrap_or_else(|| panic!("no error line in {err}"));
    for n in needles {
        assert!(line.contains(n), "{args:?}: {line:?} lacks {n:?}");
    }
    // A message is one clean line: no run of blanks left by a broken
    // string continuation.
    assert!(!line.contains("   "), "{args:?}: {line:?}");
    assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
}

#[test]
fn bad_inputs_are_refused_with_one_clear_message() {
    let f = fixtures();
    let llama = f.join("llama");
    let data = f.join("causal.jsonl");
    let d = p(&data);

    let gpt2 = llama_with("gpt2", |c| {
        c["architectures"] = serde_json::json!(["GPT2LMHeadModel"])
    });
    assert_refused(
        &["eval", "--base", p(&gpt2), "--data", d],
        &[
            "config.json",
            "GPT2LMHeadModel is not supported",
            "LlamaForCausalLM",
            "BertModel",
        ],
    );
    let deeper = llama_with("deeper", |c| c["num_hidden_layers"] = 3.into());
    assert_refused(
        &["eval", "--base", p(&deeper), "--data", d],
        &["\"model.layers.2.self_attn.q_proj.weight\" is missing"],
    );
    let wider = llama_with("wider", |c| c["intermediate_size"] = 130.into());
    assert_refused(
        &["eval", "--base", p(&wider), "--data", d],
        &[
            "model.safetensors",
            "model.layers.0.mlp.gate_proj.weight",
            "[128, 64]",
            "[130, 64]",
        ],
    );
    let bert_adapter = f.join("bert/adapters/a0");
    assert_refused(
        &[
            "eval",
            "--base",
            p(&llama),
            "--adapter",
            p(&bert_adapter),
            "--data",
            d,
        ],
        &[
            "a0",
            "encoder.layer.0.attention.self.query",
            "not a linear layer of the base model",
        ],
    );
    let bad = f.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\":\"a\",\"completion\":\"b\"}\n{\"prompt\":\"a\"}\n",
    )
    .unwrap();
    assert_refused(
        &["eval", "--base", p(&llama), "--data", p(&bad)],
        &["bad.jsonl", "line 2", "no completion or output field"],
    );
    assert_refused(
        &[
            "eval",
            "--base",
            p(&llama),
            "--task",
            "classify",
            "--data",
            d,
        ],
        &["--task classify needs an encoder", "LlamaForCausalLM"],
    );
    let support = f.join("classify_support.jsonl");
    let unseen = f.join("unseen.jsonl");
    std::fs::write(&unseen, "{\"text\":\"snow\",\"label\":\"sports\"}\n").unwrap();
    assert_refused(
        &[
            "eval",
            "--base",
            p(&f.join("bert")),
            "--support",
            p(&support),
            "--data",
            p(&unseen),
        ],
        &[
            "unseen.jsonl",
            "example 1",
            "\"sports\"",
            "animals, food, weather",
        ],
    );
    assert_refused(
        &["eval", "--base", p(&f.join("bert")), "--data", p(&unseen)],
        &["needs --support"],
    );
    assert_refused(
        &[
            "eval",
            "--base",
            p(&llama),
            "--data",
            d,
            "--max-length",
            "8",
        ],
        &["causal.jsonl", "example 1", "more than --max-length 8"],
    );
    let pickled = f.join("pickled");
    std::fs::create_dir_all(&pickled).unwrap();
    for file in ["config.json", "tokenizer.json"] {
        std::fs::copy(llama.join(file), pickled.join(file)).unwrap();
    }
    std::fs::write(pickled.join("pytorch_model.bin"), b"not loaded").unwrap();
    assert_refused(
        &["eval", "--base", p(&pickled), "--data", d],
        &["pytorch_model.bin", "pickled weights are never loaded"],
    );
    assert_refused(
        &["eval", "--base", p(&llama), "--data", d, "--weights", "1"],
        &["--weights needs --adapters"],
    );
    // No machine has a hundred GPUs: refused everywhere, with what to do.
    assert_refused(
        &[
            "eval",
            "--base",
            p(&llama),
            "--data",
            d,
            "--device",
            "cuda:99",
        ],
        &["--device cuda:99", "CUDA device"],
    );
    let o = run(&["eval", "--base", p(&llama), "--data", d, "--device", "tpu"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("is not a device"));
    assert_refused(
        &[
            "eval",
            "--base",
            p(&llama),
            "--data",
            d,
            "--max-length",
            "0",
        ],
        &["--max-length must be at least 1"],
    );
}

/// Regression: `train --base ./m -o ./m --force` replaced the base model
/// with the adapter, and `fit --shots shots/d.jsonl -o shots --force`
/// deleted the shots; both exited 0. An OUT that is, holds or lies inside
/// any input is refused before any work, --force or not.
/// `1` and `"1"` read as one class "1"; a file that mixes them is refused
/// before any training, naming the file and a line of each spelling.
#[test]
fn a_label_written_as_number_and_string_is_refused() {
    let f = fixtures();
    let mixed = f.join("mixed_labels.jsonl");
    std::fs::write(
        &mixed,
        "{\"text\":\"sun\",\"label\":1}\n{\"text\":\"rain\",\"label\":2}\n\
         {\"text\":\"snow\",\"label\":\"1\"}\n",
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    assert_refused(
        &[
            "train",
            "--base",
            p(&f.join("bert")),
            "--data",
            p(&mixed),
            "-o",
            p(&out.path().join("lora")),
        ],
        &[
            "mixed_labels.jsonl",
            "line 1",
            "line 3",
            "\"1\"",
            "one class",
        ],
    );
    assert!(!out.path().join("lora").exists());
}

/// Sizes from the command line are checked against the model before
/// anything is allocated: a rank of a hundred million (tens of GB of
/// factors) or a trillion steps is refused with the range that works.
#[test]
fn train_refuses_sizes_the_model_cannot_take() {
    let f = fixtures();
    let llama = f.join("llama");
    let data = f.join("causal.jsonl");
    let out = tempfile::tempdir().unwrap();
    let o = out.path().join("lora");
    let base = [
        "train",
        "--base",
        p(&llama),
        "--data",
        p(&data),
        "-o",
        p(&o),
    ];
    let with = |extra: &[&'static str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        a
    };
    assert_refused(
        &with(&["--rank", "100000000"]),
        &["--rank 100000000", "use 1 to 64", "hidden size"],
    );
    // k_proj is 32 x 64 (two key-value heads of four): rank 64 is too many.
    assert_refused(
        &with(&["--rank", "64", "--target-modules", "k_proj", "--steps", "1"]),
        &["--rank 64", "k_proj is 32 x 64", "1 to 32"],
    );
    assert_refused(
        &with(&["--steps", "1000000000000"]),
        &["--steps 1000000000000", "1 to 1000000"],
    );
    assert!(!o.exists());
}

#[test]
fn fit_and_train_never_write_over_their_inputs() {
    let f = fixtures();
    let work = tempfile::tempdir().unwrap();
    let m = work.path().join("m");
    std::fs::create_dir(&m).unwrap();
    for file in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(f.join("llama").join(file), m.join(file)).unwrap();
    }
    let shots_dir = work.path().join("shots");
    std::fs::create_dir(&shots_dir).unwrap();
    let shots = shots_dir.join("d.jsonl");
    std::fs::copy(f.join("causal.jsonl"), &shots).unwrap();
    let adapters = fixture_adapters(&f.join("llama"));
    let before = common::snapshot(work.path());
    let adapters_before = common::snapshot(&f.join("llama").join("adapters"));
    let train = |out: &Path| {
        vec![
            "train".to_string(),
            "--base".into(),
            p(&m).into(),
            "--data".into(),
            p(&shots).into(),
            "-o".into(),
            p(out).into(),
            "--force".into(),
            "--steps".into(),
            "1".into(),
        ]
    };
    let fit_args = |out: &Path| {
        let mut a: Vec<String> = vec![
            "fit".into(),
            "--base".into(),
            p(&m).into(),
            "--adapters".into(),
        ];
        a.extend(adapters.iter().map(|x| p(x).to_string()));
        a.extend(
            [
                "--shots",
                p(&shots),
                "-o",
                p(out),
                "--force",
                "--steps",
                "1",
            ]
            .map(String::from),
        );
        a
    };
    for (args, why) in [
        (train(&m), "is the base model"),
        (train(&m.join("sub")), "lies inside the base model"),
        (train(&shots_dir), "holds the data file"),
        (train(work.path()), "holds the base model"),
        (fit_args(&shots_dir), "holds the shots file"),
        (fit_args(&m), "is the base model"),
        (fit_args(&adapters[1]), "is the adapter"),
        (fit_args(&adapters[0].join("x")), "lies inside the adapter"),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_refused(&args, &[why, "--force does not change this"]);
        assert_eq!(
            common::snapshot(work.path()),
            before,
            "{args:?} changed an input"
        );
        assert_eq!(
            common::snapshot(&f.join("llama").join("adapters")),
            adapters_before
        );
    }
}

/// A learning rate libtorch's optimiser cannot hold is the user's to fix:
/// exit 1 naming the flag, nothing written, no internal error or panic
/// text (it was "internal error: libtorch: ... overflow"). The loop's own
/// refusal of a loss that becomes NaN or infinite is tested in
/// training::steps.
#[test]
fn a_learning_rate_out_of_range_says_what_to_try() {
    let f = fixtures();
    let out = tempfile::tempdir().unwrap().path().join("t");
    let o = run(&[
        "train",
        "--base",
        p(&f.join("llama")),
        "--data",
        p(&f.join("causal.jsonl")),
        "-o",
        p(&out),
        "--lr",
        "1e38",
        "--steps",
        "5",
        "--device",
        "cpu",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--lr 1") && err.contains("no larger than 1e30"),
        "{err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("internal error"),
        "{err}"
    );
    assert!(!out.exists());
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `lora-merge eval --base BASE --data DATA --json EXTRA...`: the loss.
fn eval_loss(base: &Path, data: &Path, extra: &[&str]) -> f64 {
    let mut a = vec!["eval", "--base", p(base), "--data", p(data), "--json"];
    a.extend_from_slice(extra);
    let o = run(&a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice::<Value>(&o.stdout).unwrap()["loss"]
        .as_f64()
        .unwrap()
}

/// The fixture adapters a0, a1 and a2 of a fixture model.
fn fixture_adapters(base: &Path) -> Vec<PathBuf> {
    ["a0", "a1", "a2"]
        .iter()
        .map(|a| base.join("adapters").join(a))
        .collect()
}

/// `lora-merge fit --base BASE --adapters ... --shots SHOTS -o OUT EXTRA...`
fn fit(base: &Path, adapters: &[PathBuf], shots: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["fit", "--base", p(base), "--adapters"];
    args.extend(adapters.iter().map(|a| p(a)));
    args.extend(["--shots", p(shots), "-o", p(out)]);
    args.extend(extra);
    run(&args)
}

#[test]
fn fit_is_deterministic_and_records_what_it_did() {
    let f = fixtures();
    let base = f.join("llama");
    let shots = f.join("causal.jsonl");
    let a = fixture_adapters(&base);
    let outs = [f.join("fit-a"), f.join("fit-b")];
    let mut reports = Vec::new();
    for out in &outs {
        let o = fit(
            &base,
            &a,
            &shots,
            out,
            &[
                "--steps", "8", "--seed", "3", "--device", "cpu", "--json", "--force",
            ],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        reports.push(serde_json::from_slice::<Value>(&o.stdout).unwrap());
    }
    // Same seed on CPU: same curve, same bytes.
    assert_eq!(reports[0]["loss_curve"], reports[1]["loss_curve"]);
    for file in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "weights.svg",
    ] {
        let x = std::fs::read(outs[0].join(file)).unwrap();
        let y = std::fs::read(outs[1].join(file)).unwrap();
        assert!(x == y, "{file} differs between two runs with one seed");
    }
    let r = &reports[0];
    let curve = r["loss_curve"].as_array().unwrap();
    assert_eq!(curve.len(), 9, "steps 0..=8");
    // Step 0 is the uniform merge: its held-out loss is eval's with 1/3 each.
    let m = read_json(&outs[0].join("merge_manifest.json"));
    let fit = &m["fit"];
    let val: Vec<usize> = fit["shots"]["validation"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(val.len(), 2, "6 shots, 0.25 held out");
    assert_eq!(fit["shots"]["count"], 6);
    assert_eq!(fit["seed"], 3);
    assert_eq!(m["command_line"][1], "fit", "{}", m["command_line"]);
    assert_eq!(fit["shots"]["sha256"].as_str().unwrap().len(), 64);
    let lines: Vec<&str> = std::fs::read_to_string(&shots)
        .unwrap()
        .leak()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    let held = f.join("held.jsonl");
    std::fs::write(
        &held,
        val.iter()
            .map(|&i| format!("{}\n", lines[i]))
            .collect::<String>(),
    )
    .unwrap();
    let o = run(&[
        "eval",
        "--base",
        p(&base),
        "--adapters",
        p(&a[0]),
        p(&a[1]),
        p(&a[2]),
        "--data",
        p(&held),
        "--json",
    ]);
    let e: Value = serde_json::from_slice(&o.stdout).unwrap();
    let uniform = fit["validation"]["uniform"]["loss"].as_f64().unwrap();
    assert!(
        (e["loss"].as_f64().unwrap() - uniform).abs() / uniform < 1e-5,
        "{e} vs {uniform}"
    );
    assert_eq!(curve[0]["val_loss"].as_f64().unwrap(), uniform);
    // The best step is the lowest held-out loss.
    let best = fit["best_step"].as_u64().unwrap() as usize;
    let min = curve
        .iter()
        .map(|c| c["val_loss"].as_f64().unwrap())
        .fold(f64::INFINITY, f64::min);
    assert_eq!(curve[best]["val_loss"].as_f64().unwrap(), min);
    // Softmax weights: every group sums to 1.
    for g in fit["groups"].as_array().unwrap() {
        let s: f64 = g["weights"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_f64().unwrap())
            .sum();
        assert!((s - 1.0).abs() < 1e-9, "{g}");
    }
    assert!(std::fs::read_to_string(outs[0].join("README.md"))
        .unwrap()
        .contains("](weights.svg)"));
    let v = run(&["verify", p(&outs[0])]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    // The learned weights, written as a --weights-file, merge again without
    // refitting to the very same adapter.
    let again = f.join("fit-again");
    let o = run(&[
        "uniform",
        "--adapters",
        p(&a[0]),
        p(&a[1]),
        p(&a[2]),
        "--weights-file",
        p(&outs[0].join("weights.json")),
        "-o",
        p(&again),
        "--force",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        std::fs::read(outs[0].join("adapter_model.safetensors")).unwrap()
            == std::fs::read(again.join("adapter_model.safetensors")).unwrap(),
        "re-merging fit's weights.json gives other bytes"
    );
    // Both manifests record every module's effective weights alike.
    let m2 = read_json(&again.join("merge_manifest.json"));
    assert_eq!(m["modules"], m2["modules"]);
    for (name, rec) in m["modules"].as_object().unwrap() {
        let n = rec["adapters"].as_array().unwrap().len();
        assert!(
            n > 0 && rec["weights"].as_array().unwrap().len() == n,
            "{name}: {rec}"
        );
    }
}

#[test]
fn fit_classify_with_both_heads_and_a_dry_run() {
    let f = fixtures();
    let base = f.join("bert");
    let a = fixture_adapters(&base);
    let shots = f.join("classify_all.jsonl");
    let mut text = std::fs::read_to_string(f.join("classify_support.jsonl")).unwrap();
    text += &std::fs::read_to_string(f.join("classify_data.jsonl")).unwrap();
    std::fs::write(&shots, text).unwrap();
    let out = f.join("fit-cls");
    let o = fit(
        &base,
        &a,
        &shots,
        &out,
        &["--dry-run", "--json", "--granularity", "layer"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let plan: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(plan["groups"], 2, "two layers");
    assert_eq!(plan["trainable_parameters"], 6);
    assert_eq!(plan["shots"]["count"], 15);
    assert!(!out.exists(), "--dry-run wrote {}", out.display());
    let mut step0_scores = Vec::new();
    for head in ["prototype", "linear"] {
        let o = fit(
            &base,
            &a,
            &shots,
            &out,
            &["--head", head, "--steps", "5", "--force", "--json"],
        );
        assert!(
            o.status.success(),
            "{head}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let r: Value = serde_json::from_slice(&o.stdout).unwrap();
        let step0 = &r["loss_curve"][0];
        step0_scores.push((
            step0["val_loss"].as_f64().unwrap(),
            step0["val_accuracy"].as_f64().unwrap(),
        ));
        let curve = r["loss_curve"].as_array().unwrap();
        let (first, last) = (
            curve[0]["train_loss"].as_f64().unwrap(),
            curve[5]["train_loss"].as_f64().unwrap(),
        );
        assert!(last < first, "{head}: training loss {first} -> {last}");
        assert_eq!(
            out.join("head.safetensors").exists(),
            head == "linear",
            "{head}"
        );
        let labels = out.join("labels.json");
        if head == "linear" {
            assert_eq!(
                read_json(&labels)["labels"],
                serde_json::json!(["animals", "food", "weather"])
            );
        }
    }
    // The linear head starts as PROTO_SCALE x the prototypes with zero bias:
    // at step 0 it classifies the held-out shots exactly as the prototype
    // head does. A broken head (wrong init, scale or bias) differs here.
    let (proto, linear) = (step0_scores[0], step0_scores[1]);
    assert!(
        (proto.0 - linear.0).abs() <= 1e-5 * proto.0.abs().max(1.0) && proto.1 == linear.1,
        "step 0: prototype head {proto:?}, linear head {linear:?}"
    );
    assert_refused(
        &[
            "fit",
            "--base",
            p(&f.join("llama")),
            "--adapters",
            p(&a[0]),
            "--shots",
            p(&shots),
            "-o",
            p(&out),
            "--force",
            "--head",
            "linear",
        ],
        &["--head is for --task classify"],
    );
    assert_refused(
        &[
            "fit",
            "--base",
            p(&base),
            "--adapters",
            p(&a[0]),
            "--shots",
            p(&shots),
            "-o",
            p(&out),
            "--force",
            "--val-fraction",
            "1",
        ],
        &["--val-fraction must be in [0, 1)"],
    );
}

/// With one shot per class the prototype loss has no positive pair: an
/// example's own class prototype is the example itself, so training only
/// pushes the shots apart. `fit` then keeps the uniform merge, says why on
/// stderr, in the JSON report and in the manifest, for both optimizers; a
/// second shot of one class, or the linear head, makes it train again.
#[test]
fn fit_keeps_the_uniform_merge_when_no_class_has_two_shots() {
    let f = fixtures();
    let base = f.join("bert");
    let a = fixture_adapters(&base);
    let lines: Vec<String> = std::fs::read_to_string(f.join("classify_support.jsonl"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let label = |l: &str| -> String {
        let v: Value = serde_json::from_str(l).unwrap();
        v["label"].as_str().unwrap().to_string()
    };
    let mut seen = std::collections::BTreeSet::new();
    let one_each: Vec<&String> = lines.iter().filter(|l| seen.insert(label(l))).collect();
    assert_eq!(one_each.len(), 3, "three classes in the support set");
    let dir = tempfile::tempdir().unwrap();
    let single = dir.path().join("one-each.jsonl");
    std::fs::write(
        &single,
        one_each
            .iter()
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
    )
    .unwrap();
    // One more shot of the first class: a positive pair.
    let second = lines
        .iter()
        .find(|l| label(l) == label(one_each[0]) && *l != one_each[0])
        .unwrap();
    let paired = dir.path().join("paired.jsonl");
    std::fs::write(
        &paired,
        std::fs::read_to_string(&single).unwrap() + second + "\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let uniform = 1.0 / a.len() as f64;
    for extra in [&[][..], &["--optimizer", "gradient-free"][..]] {
        let mut args = vec!["--steps", "5", "--force", "--json"];
        if !extra.is_empty() {
            args = vec!["--force", "--json"];
            args.extend(extra);
        }
        let o = fit(&base, &a, &single, &out, &args);
        assert!(
            o.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let r: Value = serde_json::from_slice(&o.stdout).unwrap();
        let why = r["untrained"].as_str().unwrap_or_default();
        assert!(
            why.contains("no class has two training shots"),
            "{extra:?}: {r}"
        );
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("no positive pair"),
            "{extra:?}: the reason is not on stderr"
        );
        assert!(
            !String::from_utf8_lossy(&o.stderr).contains("the last step is kept"),
            "{extra:?}: no step is taken, so none is 'the last'"
        );
        assert_eq!(
            r["loss_curve"].as_array().unwrap().len(),
            1,
            "{extra:?}: {r}"
        );
        for w in r["weights_mean"].as_array().unwrap() {
            assert!(
                (w.as_f64().unwrap() - uniform).abs() < 1e-12,
                "{extra:?}: {r}"
            );
        }
        let m = read_json(&out.join("merge_manifest.json"));
        assert_eq!(m["fit"]["untrained"], r["untrained"], "{extra:?}");
        assert_eq!(m["fit"]["best_step"], 0, "{extra:?}");
    }
    let trains = |shots: &Path, extra: &[&str]| {
        let mut args = vec!["--steps", "5", "--force", "--json"];
        args.extend(extra);
        let o = fit(&base, &a, shots, &out, &args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(r["untrained"].is_null(), "{extra:?}: {r}");
        assert_eq!(
            r["loss_curve"].as_array().unwrap().len(),
            6,
            "{extra:?}: {r}"
        );
        assert!(read_json(&out.join("merge_manifest.json"))["fit"]
            .get("untrained")
            .is_none());
    };
    trains(&paired, &[]);
    trains(&single, &["--head", "linear"]);
}

/// A task with a known answer (fixtures/make_fit_fixtures.py): three
/// adapters trained on the tiny Llama for different tasks, shots from one of
/// them. `fit` must find it, beat the uniform merge and the base model on
/// held-out shots, and what it writes must reload in PEFT to the loss it
/// reported (tests/python/fit_reload.py, 1e-4 relative).
#[test]
fn fit_finds_the_adapter_trained_for_the_task_and_peft_reloads_it() {
    let dir = tempfile::tempdir().unwrap();
    let python = repo().join(".venv/bin/python");
    let o = common::command(&python)
        .arg(repo().join("fixtures/make_fit_fixtures.py"))
        .args(["-q", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let fit_dir = dir.path().join("fit");
    let expected = read_json(&fit_dir.join("expected.json"));
    let target = expected["target_index"].as_u64().unwrap() as usize;
    let adapters: Vec<PathBuf> = expected["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| fit_dir.join("adapters").join(a.as_str().unwrap()))
        .collect();
    let base = dir.path().join("llama");
    let shots = fit_dir.join("shots.jsonl");
    let out = dir.path().join("learned");
    let mut args = vec![
        "fit",
        "--base",
        p(&base),
        "--shots",
        p(&shots),
        "-o",
        p(&out),
    ];
    args.extend(["--device", "cpu", "--json", "--adapters"]);
    args.extend(adapters.iter().map(|a| p(a)));
    let o = run(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    let w: Vec<f64> = r["weights_mean"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    println!("learned weights {w:?}, validation {}", r["validation"]);
    assert!(w[target] > 0.6, "weight on the target adapter: {w:?}");
    let loss = |k: &str| r["validation"][k]["loss"].as_f64().unwrap();
    assert!(
        loss("learned") < 0.5 * loss("uniform"),
        "{}",
        r["validation"]
    );
    assert!(loss("uniform") < loss("base"), "{}", r["validation"]);

    // The merged adapter on fresh examples of the task.
    let heldout = fit_dir.join("heldout.jsonl");
    let eval = |extra: &[&str]| eval_loss(&base, &heldout, extra);
    let learned = eval(&["--adapter", p(&out)]);
    let mut all = vec!["--adapters"];
    all.extend(adapters.iter().map(|a| p(a)));
    let uniform = eval(&all);
    let base_loss = eval(&[]);
    println!("held-out file: learned {learned}, uniform {uniform}, base {base_loss}");
    assert!(learned < 0.5 * uniform && uniform < base_loss);

    // LoraHub's gradient-free search finds the same adapter, spends exactly
    // its budget, starts from the uniform merge, and one seed gives one
    // answer.
    let hub_out = dir.path().join("lorahub");
    let mut hub_args = args.clone();
    let at = hub_args.iter().position(|a| *a == "-o").unwrap();
    hub_args[at + 1] = p(&hub_out);
    hub_args.extend(["--optimizer", "gradient-free", "--budget", "60", "--force"]);
    let fit_hub = || {
        let o = run(&hub_args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<Value>(&o.stdout).unwrap()
    };
    let r = fit_hub();
    let w: Vec<f64> = r["weights_mean"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    println!("LoraHub weights {w:?}, validation {}", r["validation"]);
    let top = (0..w.len()).max_by(|&i, &j| w[i].total_cmp(&w[j])).unwrap();
    assert_eq!(top, target, "LoraHub weights {w:?}");
    assert!(w.iter().all(|x| x.abs() <= 1.5), "{w:?}");
    assert_eq!(r["loss_curve"].as_array().unwrap().len(), 60);
    assert_eq!(r["optimizer"], "gradientfree");
    let hub_loss = |k: &str| r["validation"][k]["loss"].as_f64().unwrap();
    assert!(
        hub_loss("learned") < 0.5 * hub_loss("uniform"),
        "{}",
        r["validation"]
    );
    let manifest = read_json(&hub_out.join("merge_manifest.json"));
    assert_eq!(manifest["fit"]["hyper_parameters"]["budget"], 60);
    assert_eq!(manifest["fit"]["groups"].as_array().unwrap().len(), 1);
    let first = std::fs::read(hub_out.join("adapter_model.safetensors")).unwrap();
    fit_hub();
    let again = std::fs::read(hub_out.join("adapter_model.safetensors")).unwrap();
    assert!(
        first == again,
        "two gradient-free fits with one seed differ"
    );
    let hub_loss_file = eval(&["--adapter", p(&hub_out)]);
    println!("held-out file: LoraHub {hub_loss_file}");
    assert!(hub_loss_file < 0.5 * uniform);
    // Its flags are refused where they mean nothing.
    let base_flags = [
        "fit",
        "--base",
        p(&base),
        "--shots",
        p(&shots),
        "-o",
        p(&hub_out),
    ];
    for (extra, needles) in [
        (&["--budget", "10"][..], &["--budget", "gradient-free"][..]),
        (
            &["--optimizer", "gradient-free", "--granularity", "module"],
            &["--granularity module", "one weight per adapter"],
        ),
        (
            &["--optimizer", "gradient-free", "--budget", "0"],
            &["--budget 0", "1 to"],
        ),
    ] {
        let mut a = base_flags.to_vec();
        a.extend(["--adapters", p(&adapters[0])]);
        a.extend(extra);
        assert_refused(&a, needles);
    }

    let o = common::command(&python)
        .arg(repo().join("tests/python/fit_reload.py"))
        .args([
            "--base",
            p(&base),
            "--out",
            p(&out),
            "--shots",
            p(&shots),
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "PEFT reload check failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    println!("{}", String::from_utf8_lossy(&o.stdout));
}

/// `train` makes an ordinary LoRA that lowers the loss on its data, and that
/// PEFT loads to the same loss `eval` reports for it.
#[test]
fn train_makes_a_lora_that_peft_loads_and_that_helps() {
    let f = fixtures();
    let base = f.join("llama");
    let data = f.join("causal.jsonl");
    let out = f.join("trained");
    let train = |to: &Path, extra: &[&str]| train_args(&base, &data, to, extra);
    let o = run(&[
        "train",
        "--base",
        p(&base),
        "--data",
        p(&data),
        "-o",
        p(&out),
        "--steps",
        "30",
        "--lr",
        "0.01",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--target-modules",
        "q_proj",
        "v_proj",
        "down_proj",
        "--device",
        "cpu",
        "--json",
        "--force",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["modules"], 6, "2 layers x 3 targets");
    // r (4) x (in + out) per module: q, v: 4 x (64 + 64) and 4 x (64 + 32); down: 4 x (128 + 64).
    assert_eq!(r["trainable_parameters"], 2 * (4 * 128 + 4 * 96 + 4 * 192));
    let curve = r["loss_curve"].as_array().unwrap();
    let first = curve[0]["train_loss"].as_f64().unwrap();
    let last = curve.last().unwrap()["train_loss"].as_f64().unwrap();
    assert!(last < 0.8 * first, "training loss {first} -> {last}");
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    let m = read_json(&out.join("merge_manifest.json"));
    assert_eq!(m["command_line"][1], "train");
    assert_eq!(m["training"]["hyper_parameters"]["rank"], 4);
    assert!(run(&["verify", p(&out)]).status.success());

    let eval = |extra: &[&str]| eval_loss(&base, &data, extra);
    let trained = eval(&["--adapter", p(&out)]);
    let base_loss = eval(&[]);
    assert!(
        trained < 0.8 * base_loss,
        "eval: trained {trained} vs base {base_loss}"
    );
    let o = common::command(repo().join(".venv/bin/python"))
        .arg(repo().join("tests/python/fit_reload.py"))
        .args([
            "--base",
            p(&base),
            "--out",
            p(&out),
            "--shots",
            p(&data),
            "--all",
        ])
        .args([
            "--expect-loss",
            &trained.to_string(),
            "--expect-base-loss",
            &base_loss.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "PEFT reload check failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );

    // A target that matches nothing is refused, naming the model's layers.
    assert_refused(
        &argv(&train(&f.join("t2"), &["--target-modules", "query"])),
        &[
            "--target-modules query matches no linear layer",
            "layers.0.self_attn.q_proj",
        ],
    );

    // --init starts from an adapter's own factors: with a negligible step
    // the written adapter is the one given, module for module.
    let again = f.join("again");
    let mut a = train(
        &again,
        &["--steps", "1", "--lr", "1e-12", "--device", "cpu", "--json"],
    );
    a.extend(["--init".to_string(), p(&out).to_string()]);
    let o = run(&argv(&a));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["trainable_parameters"], 2 * (4 * 128 + 4 * 96 + 4 * 192));
    assert_same_factors(&out, &again, "a negligible step");
    // ... and its step-0 loss is the loss eval gives that adapter.
    let step0 = r["loss_curve"][0]["train_loss"].as_f64().unwrap();
    assert!(
        (step0 - trained).abs() < 1e-4 * trained,
        "{step0} vs {trained}"
    );
    // An OUT that is the --init adapter is refused before anything is read;
    // an adapter for another model is refused by name.
    let mut a = train(&out, &["--force", "--init"]);
    a.push(p(&out).to_string());
    assert_refused(&argv(&a), &["--init adapter"]);
    let mut a = train(&f.join("t3"), &["--init"]);
    a.push(p(&f.join("bert/adapters/a0")).to_string());
    assert_refused(
        &argv(&a),
        &[
            "--init",
            "encoder.layer.0.attention.self.query",
            "not a linear layer of the base model",
        ],
    );
    // The adapter's own shape replaces --rank, --alpha and --target-modules:
    // giving one of them too is a usage error, not silently ignored.
    for flag in [
        &["--rank", "4"][..],
        &["--alpha", "8"],
        &["--target-modules", "q_proj"],
    ] {
        let mut a = train(&f.join("t4"), flag);
        a.extend(["--init".to_string(), p(&out).to_string()]);
        let o = run(&argv(&a));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{flag:?}: {err}");
        assert!(
            err.contains("--init") && err.contains(flag[0]),
            "{flag:?}: {err}"
        );
        assert!(!f.join("t4").exists());
    }
}

/// `train --val-fraction`: examples held out, every step scored on them, and
/// the step with the lowest held-out loss written; with `--init`, step 0 is
/// the adapter given, so a tuning that only hurts keeps it.
#[test]
fn train_keeps_the_step_with_the_lowest_held_out_loss() {
    let f = fixtures();
    let base = f.join("llama");
    let data = f.join("causal.jsonl");
    let train = |to: &Path, steps: &str, lr: &str, extra: &[&str]| {
        let mut a = train_args(
            &base,
            &data,
            to,
            &[
                "--steps",
                steps,
                "--lr",
                lr,
                "--val-fraction",
                "0.34",
                "--device",
                "cpu",
                "--json",
                "--force",
            ],
        );
        a.extend(extra.iter().map(|x| x.to_string()));
        let o = run(&argv(&a));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<Value>(&o.stdout).unwrap()
    };
    let val_losses = |r: &Value| -> Vec<f64> {
        r["loss_curve"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["val_loss"].as_f64().expect("every step is scored"))
            .collect()
    };
    let small = ["--rank", "4", "--alpha", "8"];
    let out = f.join("held-out");
    let r = train(&out, "30", "0.05", &small);
    let held = val_losses(&r);
    assert_eq!(held.len(), 31);
    let best = r["best_step"].as_u64().unwrap() as usize;
    let lowest = (0..held.len())
        .min_by(|&i, &j| held[i].total_cmp(&held[j]).then(i.cmp(&j)))
        .unwrap();
    assert_eq!(best, lowest, "{held:?}");
    // On these six examples the held-out loss turns up before the last
    // step, so the rule has something to choose.
    assert!(0 < best && best < 30, "kept step {best}: {held:?}");
    let m = read_json(&out.join("merge_manifest.json"));
    let t = &m["training"];
    assert_eq!(t["best_step"], best);
    assert_eq!(t["hyper_parameters"]["val_fraction"], 0.34);
    let mut positions: Vec<u64> = ["train", "validation"]
        .iter()
        .flat_map(|k| t["data"][k].as_array().unwrap().iter())
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(t["data"]["validation"].as_array().unwrap().len(), 2);
    positions.sort_unstable();
    assert_eq!(positions, (0..6).collect::<Vec<u64>>());
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains(&format!("step {best} kept")),
        "the card names the kept step:\n{card}"
    );
    // What was written is that step's adapter: a run stopped there (same
    // seed, so the same split and batches) writes the same bytes.
    let stopped = f.join("held-out-stopped");
    train(&stopped, &best.to_string(), "0.05", &small);
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(stopped.join("adapter_model.safetensors")).unwrap()
    );

    // Tuning that adapter further at a rate that only raises the held-out
    // loss keeps step 0: the adapter given, unchanged.
    let tuned = f.join("held-out-tuned");
    let r = train(&tuned, "4", "0.01", &["--init", p(&out)]);
    let held = val_losses(&r);
    assert!(
        held[1..].iter().all(|&v| v > held[0]),
        "every step raises the held-out loss here: {held:?}"
    );
    assert_eq!(r["best_step"], 0);
    assert_same_factors(&out, &tuned, "step 0 was kept");

    // Too few examples to hold any out (causal-lm holds none out below 4):
    // said on stderr, every example trains and the last step is written,
    // and the manifest records no split.
    let three = f.join("causal-3.jsonl");
    let text = std::fs::read_to_string(&data).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    std::fs::write(&three, lines[..3].join("\n") + "\n").unwrap();
    let few = f.join("held-out-few");
    let a = train_args(
        &base,
        &three,
        &few,
        &[
            "--steps",
            "2",
            "--val-fraction",
            "0.34",
            "--device",
            "cpu",
            "--json",
        ],
    );
    let o = run(&argv(&a));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("too few examples to hold any out"), "{err}");
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["best_step"], 2);
    assert!(r["loss_curve"][0]["val_loss"].is_null());
    let t = &read_json(&few.join("merge_manifest.json"))["training"];
    assert_eq!(t["best_step"], 2);
    assert!(t["data"].get("validation").is_none(), "{t}");

    // A share that leaves nothing to train on is a usage error.
    for bad in [
        "--val-fraction=1",
        "--val-fraction=-0.1",
        "--val-fraction=NaN",
    ] {
        let a = train_args(&base, &data, &f.join("t5"), &[bad]);
        assert_refused(&argv(&a), &["--val-fraction"]);
    }
}

/// `train` on `data` over `base` into `to`, with more flags.
fn train_args(base: &Path, data: &Path, to: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ["train", "--base", p(base), "--data", p(data), "-o", p(to)]
        .iter()
        .map(|x| x.to_string())
        .collect();
    v.extend(extra.iter().map(|x| x.to_string()));
    v
}

/// Owned arguments as `run` takes them.
fn argv(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Two PEFT adapters hold the same tensors with values within 1e-6 (NaN
/// never matches).
fn assert_same_factors(a: &Path, b: &Path, why: &str) {
    let before = safetensors_values(&a.join("adapter_model.safetensors"));
    let after = safetensors_values(&b.join("adapter_model.safetensors"));
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    for (k, v) in &before {
        let worst = v
            .iter()
            .zip(&after[k])
            // f32::max skips NaN; a NaN on either side counts as different.
            .map(|(x, y)| (x - y).abs())
            .fold(
                0f32,
                |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
            );
        assert!(worst < 1e-6, "{k}: differs by {worst} although {why}");
    }
}

/// Every tensor of a safetensors file as f32 values, by name.
fn safetensors_values(path: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let v = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (name, v)
        })
        .collect()
}

/// Weights that overflow the composition give no score: eval says why
/// instead of printing a loss or an accuracy computed from NaN.
#[test]
fn eval_reports_no_score_from_non_finite_outputs() {
    let f = fixtures();
    for (base, extra) in [
        (f.join("llama"), vec!["--data", p(&f.join("causal.jsonl"))]),
        (
            f.join("bert"),
            vec![
                "--support",
                p(&f.join("classify_support.jsonl")),
                "--data",
                p(&f.join("classify_data.jsonl")),
            ],
        ),
    ] {
        let a = fixture_adapters(&base);
        let mut args = vec!["eval", "--base", p(&base)];
        args.extend(extra);
        args.extend(["--adapters", p(&a[0]), "--weights", "1e38"]);
        let out = run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("not finite"), "{err}");
        assert!(
            out.stdout.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
