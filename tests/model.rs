//! `lora-merge eval` end to end: the binary on tiny transformers checkpoints
//! (fixtures/make_model_fixtures.py) against the losses transformers
//! computed, and every kind of bad input refused with one clear line.
#![cfg(feature = "torch")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_lora-merge");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let python = repo().join(".venv/bin/python");
        assert!(python.exists(), "run ./setup.sh first");
        let dir = tempfile::tempdir().unwrap().keep();
        let out = Command::new(python)
            .arg(repo().join("fixtures/make_model_fixtures.py"))
            .args(["-q", "--models", "llama,bert", "--out"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "fixture script failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run lora-merge")
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
    let a: Vec<PathBuf> = ["a0", "a1", "a2"]
        .iter()
        .map(|a| base.join("adapters").join(a))
        .collect();
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
    if !cuda_available() {
        assert_refused(
            &["eval", "--base", p(&llama), "--data", d, "--device", "cuda"],
            &["no CUDA device", "--device cpu"],
        );
    }
}

fn cuda_available() -> bool {
    let out = run(&["doctor", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v.pointer("/torch/cuda_available") == Some(&Value::Bool(true))
}
