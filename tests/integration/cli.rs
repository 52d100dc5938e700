//! End-to-end tests of the binary: real files in, real files out.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::{json, Value};

use crate::common;

use common::run;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

use lora_merge::rng::Rng;

/// A module of a test adapter: name, rank, fan_out, fan_in, A and B values.
struct Module {
    name: String,
    rank: usize,
    fan_out: usize,
    fan_in: usize,
    a: Vec<f32>,
    b: Vec<f32>,
}

fn module(rng: &mut Rng, name: &str, rank: usize, fan_out: usize, fan_in: usize) -> Module {
    Module {
        name: name.into(),
        rank,
        fan_out,
        fan_in,
        a: rng.symmetric_vec(rank * fan_in),
        b: rng.symmetric_vec(fan_out * rank),
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Serialize tensors by hand, so malformed variants can be derived from it.
fn safetensors_bytes(tensors: &[(String, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut off = 0;
    let mut data = Vec::new();
    for (name, shape, bytes) in tensors {
        header.insert(
            name.clone(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [off, off + bytes.len()]}),
        );
        off += bytes.len();
        data.extend_from_slice(bytes);
    }
    raw_file(&serde_json::to_string(&header).unwrap(), &data)
}

fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn lora_tensors(modules: &[Module]) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    let mut t = Vec::new();
    for m in modules {
        let p = format!("base_model.model.{}", m.name);
        t.push((
            format!("{p}.lora_A.weight"),
            vec![m.rank, m.fan_in],
            f32_bytes(&m.a),
        ));
        t.push((
            format!("{p}.lora_B.weight"),
            vec![m.fan_out, m.rank],
            f32_bytes(&m.b),
        ));
    }
    t
}

fn config(r: usize, alpha: f64, rslora: bool, targets: &[&str]) -> Value {
    json!({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora,
        "target_modules": targets, "base_model_name_or_path": "test/tiny",
        "task_type": "CAUSAL_LM", "bias": "none", "fan_in_fan_out": false,
        "lora_dropout": 0.0, "use_dora": false, "init_lora_weights": true
    })
}

fn write_adapter(dir: &Path, cfg: &Value, weights: &[u8]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_string_pretty(cfg).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), weights).unwrap();
    dir.to_path_buf()
}

const MODS: [&str; 3] = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.1.mlp.up_proj",
];

/// Three valid adapters with alpha != r, one rsLoRA, one missing a module.
fn three_adapters(root: &Path) -> (Vec<PathBuf>, Vec<Vec<Module>>, Vec<f64>) {
    let mut rng = Rng(7);
    let specs: [(usize, f64, bool, usize); 3] =
        [(4, 8.0, false, 3), (2, 5.0, true, 3), (3, 1.5, false, 2)];
    let mut dirs = Vec::new();
    let mut all = Vec::new();
    let mut scales = Vec::new();
    for (i, (r, alpha, rs, nmods)) in specs.iter().enumerate() {
        let mods: Vec<Module> = MODS[..*nmods]
            .iter()
            .map(|name| {
                let (o, n) = if name.contains("up_proj") {
                    (12, 8)
                } else {
                    (8, 8)
                };
                module(&mut rng, name, *r, o, n)
            })
            .collect();
        let targets: Vec<&str> = vec!["q_proj", "v_proj", "up_proj"];
        let dir = write_adapter(
            &root.join(format!("ad{i}")),
            &config(*r, *alpha, *rs, &targets[..*nmods]),
            &safetensors_bytes(&lora_tensors(&mods)),
        );
        scales.push(if *rs {
            alpha / (*r as f64).sqrt()
        } else {
            alpha / *r as f64
        });
        dirs.push(dir);
        all.push(mods);
    }
    (dirs, all, scales)
}

fn read_tensors(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut out = BTreeMap::new();
    for (k, v) in header.as_object().unwrap() {
        if k == "__metadata__" {
            assert_eq!(v["format"], "pt");
            continue;
        }
        assert_eq!(v["dtype"], "F32");
        let shape: Vec<usize> = v["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let off: Vec<usize> = v["data_offsets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let vals = data[off[0]..off[1]]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        out.insert(k.clone(), (shape, vals));
    }
    out
}

/// dense = sum_i w_i * s_i * B_i @ A_i, by plain loops in f64.
fn dense_reference(terms: &[(f64, f64, &Module)]) -> Vec<f64> {
    let m0 = terms[0].2;
    let mut d = vec![0.0f64; m0.fan_out * m0.fan_in];
    for (w, s, m) in terms {
        for o in 0..m.fan_out {
            for i in 0..m.fan_in {
                let mut acc = 0.0f64;
                for k in 0..m.rank {
                    acc += m.b[o * m.rank + k] as f64 * m.a[k * m.fan_in + i] as f64;
                }
                d[o * m.fan_in + i] += w * s * acc;
            }
        }
    }
    d
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den
}

#[test]
fn exact_merge_equals_weighted_sum_of_deltas_and_is_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    let (dirs, mods, scales) = three_adapters(tmp.path());
    let out = tmp.path().join("out");
    let weights = [0.5, -0.25, 2.0];
    let mut args: Vec<String> = vec!["uniform".into(), "--adapters".into()];
    args.extend(dirs.iter().map(|d| d.display().to_string()));
    args.extend(["--weights", "0.5", "-0.25", "2.0", "-o"].map(String::from));
    args.push(out.display().to_string());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run(&argv);
    assert!(o.status.success(), "{}", stderr(&o));

    let tensors = read_tensors(&out.join("adapter_model.safetensors"));
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["use_rslora"], false);
    for (mi, name) in MODS.iter().enumerate() {
        let terms: Vec<(f64, f64, &Module)> = (0..3)
            .filter(|&i| mods[i].len() > mi)
            .map(|i| (weights[i], scales[i], &mods[i][mi]))
            .collect();
        let want = dense_reference(&terms);
        let (a_shape, a) = &tensors[&format!("base_model.model.{name}.lora_A.weight")];
        let (b_shape, b) = &tensors[&format!("base_model.model.{name}.lora_B.weight")];
        let r = a_shape[0];
        assert_eq!(
            r,
            terms.iter().map(|t| t.2.rank).sum::<usize>(),
            "exact rank is the sum of ranks for {name}"
        );
        assert_eq!(b_shape[1], r);
        // The config must give this module scale 1 (alpha == rank).
        let rank_cfg = cfg["rank_pattern"]
            .get(*name)
            .unwrap_or(&cfg["r"])
            .as_u64()
            .unwrap() as usize;
        let alpha_cfg = cfg["alpha_pattern"]
            .get(*name)
            .unwrap_or(&cfg["lora_alpha"])
            .as_f64()
            .unwrap();
        assert_eq!(rank_cfg, r, "{name}");
        assert_eq!(alpha_cfg, r as f64, "{name}");
        let (fo, fi) = (b_shape[0], a_shape[1]);
        let mut got = vec![0.0f64; fo * fi];
        for o in 0..fo {
            for i in 0..fi {
                got[o * fi + i] = (0..r)
                    .map(|k| b[o * r + k] as f64 * a[k * fi + i] as f64)
                    .sum();
            }
        }
        // f32 factors, f64 accumulation: a few f32 ulps of the terms.
        let e = rel_err(&got, &want);
        assert!(e < 1e-6, "{name}: relative error {e}");
    }

    // Same inputs, another output: byte-identical adapter files.
    let out2 = tmp.path().join("out2");
    let last = args.len() - 1;
    args[last] = out2.display().to_string();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    assert!(run(&argv).status.success());
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(out2.join(f)).unwrap(),
            "{f} differs between runs"
        );
    }

    // The manifest records inputs, hashes, and per-module error.
    let man: Value =
        serde_json::from_slice(&std::fs::read(out.join("merge_manifest.json")).unwrap()).unwrap();
    assert_eq!(man["inputs"].as_array().unwrap().len(), 3);
    assert_eq!(man["inputs"][2]["weight"], 2.0);
    assert_eq!(man["modules"][MODS[2]]["adapters"], json!([0, 1]));
    assert_eq!(man["modules"][MODS[0]]["rel_error"], 0.0);
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.starts_with("---\nlibrary_name: peft\nbase_model: \"test/tiny\"\n"),
        "{card}"
    );

    // verify: clean, then tampered.
    let o = run(&["verify", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg_path = out.join("adapter_config.json");
    let mut text = std::fs::read_to_string(&cfg_path).unwrap();
    text.push(' ');
    std::fs::write(&cfg_path, text).unwrap();
    let o = run(&["verify", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("adapter_config.json"), "{}", stderr(&o));
}

/// The delta B @ A of one merged module, in f64.
fn written_delta(tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>, name: &str) -> Vec<f64> {
    let (a_shape, a) = &tensors[&format!("base_model.model.{name}.lora_A.weight")];
    let (b_shape, b) = &tensors[&format!("base_model.model.{name}.lora_B.weight")];
    let (r, fo, fi) = (a_shape[0], b_shape[0], a_shape[1]);
    let mut got = vec![0.0f64; fo * fi];
    for o in 0..fo {
        for i in 0..fi {
            got[o * fi + i] = (0..r)
                .map(|k| b[o * r + k] as f64 * a[k * fi + i] as f64)
                .sum();
        }
    }
    got
}

/// --weights-file: the first rule in the file that matches a module gives
/// its weights, others get --weights; the manifest records each module's
/// weights; rules that match nothing or give the wrong count are refused.
#[test]
fn a_weights_file_gives_each_module_its_own_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let (dirs, mods, scales) = three_adapters(tmp.path());
    let rules = tmp.path().join("weights.json");
    // File order matters: "q_proj" would also be matched by the second
    // rule, which sorts first.
    std::fs::write(
        &rules,
        r#"{"q_proj": [1, 0, 0], "layers\\.[01]\\.(mlp|self_attn\\.q)": [0.5, -1.5, 2]}"#,
    )
    .unwrap();
    let out = tmp.path().join("out");
    let mut args: Vec<String> = vec!["uniform".into(), "--adapters".into()];
    args.extend(dirs.iter().map(|d| d.display().to_string()));
    args.extend(["--weights", "0.2", "0.3", "0.5", "--weights-file"].map(String::from));
    args.push(rules.display().to_string());
    args.push("-o".into());
    args.push(out.display().to_string());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run(&argv);
    assert!(o.status.success(), "{}", stderr(&o));
    let tensors = read_tensors(&out.join("adapter_model.safetensors"));
    let man: Value =
        serde_json::from_slice(&std::fs::read(out.join("merge_manifest.json")).unwrap()).unwrap();
    let expect: [[f64; 3]; 3] = [[1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [0.5, -1.5, 2.0]];
    for (mi, name) in MODS.iter().enumerate() {
        let terms: Vec<(f64, f64, &Module)> = (0..3)
            .filter(|&i| mods[i].len() > mi)
            .map(|i| (expect[mi][i], scales[i], &mods[i][mi]))
            .collect();
        let e = rel_err(&written_delta(&tensors, name), &dense_reference(&terms));
        assert!(e < 1e-6, "{name}: relative error {e}");
        let recorded: Vec<f64> = terms.iter().map(|t| t.0).collect();
        assert_eq!(man["modules"][*name]["weights"], json!(recorded), "{name}");
    }

    let refused = |text: &str, why: &str, names: &str| {
        std::fs::write(&rules, text).unwrap();
        let out = tmp.path().join("refused");
        let mut a = argv.clone();
        let last = a.len() - 1;
        let o = out.display().to_string();
        a[last] = &o;
        assert_refused(&a, &out, names, why);
    };
    refused(
        r#"{"q_proj": [1, 0, 0], "k_proj": [1, 2, 3]}"#,
        "a rule that matches nothing",
        "\"k_proj\" matches no module",
    );
    refused(
        r#"{"q_proj": [1, 0]}"#,
        "a rule with too few weights",
        "gives 2 weights but 3 adapters",
    );
    refused(
        r#"{"proj": [1, 1, 1], "q_proj": [1, 0, 0]}"#,
        "a rule shadowed by an earlier one",
        "\"q_proj\" matches no module not already taken",
    );
}

#[test]
fn existing_output_needs_force_and_strict_refuses_partial_modules() {
    let tmp = tempfile::tempdir().unwrap();
    let (dirs, _, _) = three_adapters(tmp.path());
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "precious").unwrap();
    let (a, b, c) = (
        dirs[0].to_str().unwrap(),
        dirs[1].to_str().unwrap(),
        dirs[2].to_str().unwrap(),
    );
    let o = run(&["uniform", "--adapters", a, b, "-o", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "precious"
    );

    let o = run(&[
        "uniform",
        "--adapters",
        a,
        b,
        c,
        "--strict",
        "-o",
        tmp.path().join("s").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("up_proj"), "{}", stderr(&o));
    assert!(!tmp.path().join("s").exists());

    let o = run(&[
        "uniform",
        "--adapters",
        a,
        b,
        "--force",
        "--json",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!out.join("keep.txt").exists());
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["modules"], 3);
    assert_eq!(report["adapters"], 2);
}

/// Each malformed input: exit 1, one error line naming the file, no output.
fn assert_refused(args: &[&str], out: &Path, names: &str, why: &str) {
    let o = run(args);
    let err = stderr(&o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected exit 1 for {why}; stderr: {err}"
    );
    assert!(
        err.contains(names),
        "error for {why} should name {names:?}: {err}"
    );
    assert_eq!(
        err.lines().filter(|l| l.contains("error")).count(),
        1,
        "one error line for {why}: {err}"
    );
    assert!(
        !out.exists() || std::fs::read_dir(out).unwrap().next().is_none(),
        "{why}: output left behind"
    );
    // No staging directories either.
    let parent = out.parent().unwrap();
    for e in std::fs::read_dir(parent).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!n.contains("lora-merge"), "{why}: left {n} behind");
    }
}

#[test]
fn bad_inputs_are_refused_with_one_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Rng(3);
    let good_mods = vec![module(&mut rng, MODS[0], 2, 4, 4)];
    let good = safetensors_bytes(&lora_tensors(&good_mods));
    let cfg = config(2, 3.0, false, &["q_proj"]);
    let ok = write_adapter(&tmp.path().join("ok"), &cfg, &good);
    let out = tmp.path().join("out");
    let outs = out.to_str().unwrap();
    let oks = ok.to_str().unwrap();

    let mut cases: Vec<(&str, PathBuf)> = Vec::new();
    let mut add = |name: &'static str, cfg: &Value, bytes: Vec<u8>| {
        cases.push((name, write_adapter(&tmp.path().join(name), cfg, &bytes)));
    };
    add("truncated", &cfg, good[..good.len() - 5].to_vec());
    let mut past = good.clone();
    past[..8].copy_from_slice(&(good.len() as u64).to_le_bytes());
    add("header-past-end", &cfg, past);
    let mut huge = good.clone();
    huge[..8].copy_from_slice(&200_000_000u64.to_le_bytes());
    add("oversized-header", &cfg, huge);
    let n = 2 * 4 * 4;
    let a = format!("base_model.model.{}.lora_A.weight", MODS[0]);
    let b = format!("base_model.model.{}.lora_B.weight", MODS[0]);
    let hdr = |a_off: [usize; 2], b_off: [usize; 2], dt: &str| {
        format!(
            r#"{{"{a}":{{"dtype":"{dt}","shape":[2,4],"data_offsets":[{},{}]}},"{b}":{{"dtype":"F32","shape":[4,2],"data_offsets":[{},{}]}}}}"#,
            a_off[0], a_off[1], b_off[0], b_off[1]
        )
    };
    add(
        "hole",
        &cfg,
        raw_file(&hdr([0, 32], [36, 68], "F32"), &[0u8; 68]),
    );
    add(
        "overlap",
        &cfg,
        raw_file(&hdr([0, 32], [28, 60], "F32"), &[0u8; 60]),
    );
    add(
        "unknown-dtype",
        &cfg,
        raw_file(&hdr([0, 32], [32, 64], "Q4"), &vec![0u8; n]),
    );
    let dup = format!(
        r#"{{"{a}":{{"dtype":"F32","shape":[2,4],"data_offsets":[0,32]}},"{a}":{{"dtype":"F32","shape":[2,4],"data_offsets":[32,64]}}}}"#
    );
    add("duplicate-key", &cfg, raw_file(&dup, &[0u8; 64]));
    let only_a: Vec<_> = lora_tensors(&good_mods)
        .into_iter()
        .filter(|t| t.0.contains("lora_A"))
        .collect();
    add("a-without-b", &cfg, safetensors_bytes(&only_a));
    let mut dora = cfg.clone();
    dora["use_dora"] = json!(true);
    add("dora", &dora, good.clone());
    let mut cases_with_file: Vec<(&str, PathBuf, String)> = cases
        .into_iter()
        .map(|(n, p)| {
            (
                n,
                p.clone(),
                p.join(if n == "dora" {
                    "adapter_config.json"
                } else {
                    "adapter_model.safetensors"
                })
                .display()
                .to_string(),
            )
        })
        .collect();

    let notjson = tmp.path().join("not-json");
    write_adapter(&notjson, &cfg, &good);
    std::fs::write(notjson.join("adapter_config.json"), "{ \"r\": 2, oops").unwrap();
    cases_with_file.push((
        "config-not-json",
        notjson.clone(),
        notjson.join("adapter_config.json").display().to_string(),
    ));

    let pickle = tmp.path().join("pickle");
    std::fs::create_dir_all(&pickle).unwrap();
    std::fs::write(pickle.join("adapter_config.json"), cfg.to_string()).unwrap();
    std::fs::write(pickle.join("adapter_model.bin"), b"\x80\x04not really").unwrap();
    cases_with_file.push(("pickle-only", pickle.clone(), pickle.display().to_string()));

    for (why, dir, names) in &cases_with_file {
        assert_refused(
            &[
                "uniform",
                "--adapters",
                oks,
                dir.to_str().unwrap(),
                "-o",
                outs,
            ],
            &out,
            names,
            why,
        );
    }

    // Shape conflict: same module, different fan_in; names both adapters.
    let other = vec![module(&mut rng, MODS[0], 2, 4, 6)];
    let conflict = write_adapter(
        &tmp.path().join("conflict"),
        &cfg,
        &safetensors_bytes(&lora_tensors(&other)),
    );
    let o = run(&[
        "uniform",
        "--adapters",
        oks,
        conflict.to_str().unwrap(),
        "-o",
        outs,
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("ok") && err.contains("conflict") && err.contains(MODS[0]),
        "{err}"
    );
    assert!(!out.exists());

    // Output equal to an input.
    let o = run(&["uniform", "--adapters", oks, "--force", "-o", oks]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("is the adapter"), "{}", stderr(&o));
    assert!(ok.join("adapter_model.safetensors").exists());

    // Wrong number of weights.
    let o = run(&[
        "uniform",
        "--adapters",
        oks,
        "--weights",
        "0.5",
        "0.5",
        "-o",
        outs,
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--weights"), "{}", stderr(&o));
    assert!(!out.exists());
}

/// Regression: `uniform --adapters-file OUT/list.txt -o OUT --force`
/// deleted the list, and `-o` inside an input adapter folder added a folder
/// to it. An OUT that is, holds or lies inside an input is refused, with
/// --force, before anything is written.
#[test]
fn an_output_that_overlaps_an_input_is_refused_even_with_force() {
    let tmp = tempfile::tempdir().unwrap();
    let (dirs, _, _) = three_adapters(tmp.path());
    let (a, b) = (dirs[0].to_str().unwrap(), dirs[1].to_str().unwrap());
    let lists = tmp.path().join("lists");
    std::fs::create_dir(&lists).unwrap();
    std::fs::write(lists.join("list.txt"), format!("{a}\n{b}\n")).unwrap();
    let link = tmp.path().join("link-to-a");
    std::os::unix::fs::symlink(&dirs[0], &link).unwrap();
    let before = common::snapshot(tmp.path());
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--adapters-file".into(),
                s(&lists.join("list.txt")),
                "-o".into(),
                s(&lists),
            ],
            "holds the --adapters-file",
        ),
        (
            vec![
                "--adapters".into(),
                a.into(),
                b.into(),
                "-o".into(),
                a.into(),
            ],
            "is the adapter",
        ),
        (
            vec![
                "--adapters".into(),
                a.into(),
                b.into(),
                "-o".into(),
                s(&dirs[1].join("merged")),
            ],
            "lies inside the adapter",
        ),
        (
            vec![
                "--adapters".into(),
                s(&link),
                b.into(),
                "-o".into(),
                a.into(),
            ],
            "the adapter",
        ),
        (
            vec![
                "--adapters".into(),
                a.into(),
                b.into(),
                "-o".into(),
                s(tmp.path()),
            ],
            "holds the adapter",
        ),
    ];
    for (args, why) in cases {
        let mut full: Vec<&str> = vec!["uniform", "--force"];
        full.extend(args.iter().map(String::as_str));
        let o = run(&full);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{full:?}: {err}");
        assert!(
            err.contains(why) && err.contains("--force does not change this"),
            "{full:?}: {err}"
        );
        assert_eq!(
            common::snapshot(tmp.path()),
            before,
            "{full:?} changed the inputs"
        );
    }
}

/// One exit-code contract: a bad flag is the user's to fix (1, not clap's
/// 2), --help and --version succeed on stdout, and results go to stdout
/// while diagnostics go to stderr.
#[test]
fn exit_codes_and_streams_follow_one_contract() {
    for args in [
        &["uniform", "--bogus"][..],
        &["inspect", "--format", "nope", "x"],
        &["uniform", "--adapters", "a"],
        &["no-such-command"],
        &[],
        // Handed to the libtorch companion: the same contract there.
        &["fit", "--bogus"],
        &["train", "--base"],
    ] {
        let o = run(args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(o.stdout.is_empty(), "{args:?} wrote to stdout");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    for args in [&["--help"][..], &["uniform", "--help"], &["--version"]] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}");
        assert!(!o.stdout.is_empty() && o.stderr.is_empty(), "{args:?}");
    }
    let help = String::from_utf8(run(&["--help"]).stdout).unwrap();
    assert!(help.contains("Exit status"), "{help}");

    let tmp = tempfile::tempdir().unwrap();
    let (dirs, _, _) = three_adapters(tmp.path());
    let o = run(&["inspect", dirs[0].to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report = String::from_utf8(o.stdout).unwrap();
    assert!(
        report.contains("rank"),
        "inspect's report belongs on stdout: {report:?}"
    );
    let out = tmp.path().join("m");
    let o = run(&[
        "uniform",
        "--adapters",
        dirs[0].to_str().unwrap(),
        dirs[1].to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success() && o.stdout.is_empty(), "{}", stderr(&o));
    let o = run(&["verify", out.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("files match"));
}

/// Regression: a NaN in one lora_A went into the merged adapter with exit
/// 0, and `--weights 1e39` overflowed to inf; `--dtype f16` of values
/// beyond f16's range wrote infinities. Each is refused, naming the module,
/// and nothing is written.
#[test]
fn numbers_a_file_cannot_hold_are_never_written() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Rng(11);
    let mut bad = vec![module(&mut rng, MODS[0], 2, 4, 4)];
    bad[0].a[3] = f32::NAN;
    let cfg = config(2, 2.0, false, &["q_proj"]);
    let nan = write_adapter(
        &tmp.path().join("nan"),
        &cfg,
        &safetensors_bytes(&lora_tensors(&bad)),
    );
    let mut big = vec![module(&mut rng, MODS[0], 2, 4, 4)];
    big[0].b.iter_mut().for_each(|x| *x *= 1e5);
    let big = write_adapter(
        &tmp.path().join("big"),
        &cfg,
        &safetensors_bytes(&lora_tensors(&big)),
    );
    let out = tmp.path().join("out");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    for (args, needle) in [
        (vec!["--adapters".to_string(), s(&nan)], "NaN"),
        (
            vec![
                "--adapters".into(),
                s(&big),
                "--weights".into(),
                "1e39".into(),
            ],
            "inf",
        ),
        (
            vec!["--adapters".into(), s(&big), "--dtype".into(), "f16".into()],
            "f16 cannot store",
        ),
    ] {
        let mut full = vec!["uniform".to_string(), "-o".into(), s(&out)];
        full.extend(args);
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        let o = run(&full);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{full:?}: {err}");
        assert!(
            err.contains(needle) && err.contains(MODS[0]),
            "{full:?}: {err}"
        );
        assert!(!out.exists(), "{full:?} wrote {}", out.display());
    }
    // The same adapter in f32 is fine.
    let o = run(&["uniform", "--adapters", &s(&big), "-o", &s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Regression: a file name that is not UTF-8 given as -o panicked (the
/// command line was read as UTF-8 for the manifest). It is written, and the
/// manifest records the name lossily.
#[test]
fn an_output_name_that_is_not_utf8_is_written() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let (dirs, _, _) = three_adapters(tmp.path());
    let out = tmp.path().join(std::ffi::OsStr::from_bytes(b"merged-\xff"));
    let o = common::command(env!("CARGO_BIN_EXE_lora-merge"))
        .args(["uniform", "--adapters"])
        .arg(&dirs[0])
        .arg(&dirs[1])
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let m: Value =
        serde_json::from_slice(&std::fs::read(out.join("merge_manifest.json")).unwrap()).unwrap();
    let last = m["command_line"].as_array().unwrap().last().unwrap();
    assert!(
        last.as_str().unwrap().ends_with("merged-\u{fffd}"),
        "{last}"
    );
    let v = common::command(env!("CARGO_BIN_EXE_lora-merge"))
        .arg("verify")
        .arg(&out)
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", stderr(&v));
}

/// A reader that leaves before the result is written (`lora-merge inspect
/// A | head -0`) is not an error: exit 0, nothing on stderr.
#[test]
fn a_closed_stdout_is_not_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (dirs, _, _) = three_adapters(tmp.path());
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let o = common::command(env!("CARGO_BIN_EXE_lora-merge"))
        .arg("inspect")
        .args(&dirs)
        .stdout(writer)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(o.stderr.is_empty(), "{}", stderr(&o));
}

/// A copy of `fixtures/adapters/NAME` at `to`.
fn fixture_copy(name: &str, to: &Path) -> PathBuf {
    copy_dir(&common::repo().join("fixtures/adapters").join(name), to);
    to.to_path_buf()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A named pipe at `path`, replacing what was there.
fn mkfifo(path: &Path) {
    let _ = std::fs::remove_file(path);
    let ok = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mkfifo {}", path.display());
}

/// Run lora-merge, killed after 20 s: a run that would hang fails the test
/// instead of hanging it.
fn run_bounded(args: &[&std::ffi::OsStr]) -> Output {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let mut child = common::command(env!("CARGO_BIN_EXE_lora-merge"))
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(20) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("lora-merge {args:?} still running after 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// Regression: a FIFO as an adapter's README.md, config or weights hung the
/// merge forever, and a README.md linked to /dev/zero was read until memory
/// ran out. Each is refused at once, exit 1, naming the file and saying
/// what it is.
#[test]
fn side_files_that_are_pipes_or_devices_are_refused_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    type Plant = fn(&Path);
    let cases: [(&str, &str, Plant); 4] = [
        ("README.md", "a FIFO", |p| mkfifo(p)),
        ("README.md", "a character device", |p| {
            std::fs::remove_file(p).unwrap();
            std::os::unix::fs::symlink("/dev/zero", p).unwrap();
        }),
        ("adapter_config.json", "a FIFO", |p| mkfifo(p)),
        ("adapter_model.safetensors", "a FIFO", |p| mkfifo(p)),
    ];
    for (i, (file, what, plant)) in cases.iter().enumerate() {
        let dir = fixture_copy("alpha", &tmp.path().join(format!("case{i}")));
        plant(&dir.join(file));
        let out = tmp.path().join(format!("out{i}"));
        let o = run_bounded(&[
            "uniform".as_ref(),
            "--adapters".as_ref(),
            dir.as_os_str(),
            "-o".as_ref(),
            out.as_os_str(),
        ]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{file} as {what}: {e}");
        let named = format!("{}: is {what}", dir.join(file).display());
        assert!(e.contains(&named), "{file} as {what}: {e}");
        assert!(!out.exists(), "{file} as {what}: an output was written");
    }

    // The list of adapters given as a pipe.
    let list = tmp.path().join("adapters.txt");
    mkfifo(&list);
    let o = run_bounded(&[
        "uniform".as_ref(),
        "--adapters-file".as_ref(),
        list.as_os_str(),
        "-o".as_ref(),
        tmp.path().join("out-list").as_os_str(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("adapters.txt: is a FIFO"),
        "{}",
        stderr(&o)
    );

    // The per-module weights given as a pipe.
    let alpha = fixture_copy("alpha", &tmp.path().join("alpha-w"));
    let rules = tmp.path().join("weights.json");
    mkfifo(&rules);
    let out = tmp.path().join("out-weights");
    let o = run_bounded(&[
        "uniform".as_ref(),
        "--adapters".as_ref(),
        alpha.as_os_str(),
        "--weights-file".as_ref(),
        rules.as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("weights.json: is a FIFO"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
}

/// A fresh output of the alpha fixture at `out`.
fn merged_output(root: &Path, out: &Path) {
    let alpha = fixture_copy("alpha", &root.join("alpha"));
    let o = run(&[
        "uniform",
        "--adapters",
        alpha.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// `verify` of a copy of `good` changed by `tamper`: its output.
fn verify_tampered(good: &Path, at: &Path, tamper: impl FnOnce(&Path)) -> Output {
    copy_dir(good, at);
    tamper(at);
    run_bounded(&["verify".as_ref(), at.as_os_str()])
}

fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let p = dir.join("merge_manifest.json");
    let mut m: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    edit(&mut m);
    let mut bytes = serde_json::to_vec_pretty(&m).unwrap();
    bytes.push(b'\n');
    std::fs::write(&p, bytes).unwrap();
}

/// Regression: `verify` passed with a file added to the output, with the
/// manifest's weights or method edited, and with an entry removed from the
/// manifest and that file then changed; a listed file replaced by a FIFO
/// hung it. The manifest is bound by `merge_manifest.sha256` (sha256sum's
/// format), the directory may hold nothing unlisted, and only regular files
/// are read.
#[test]
fn verify_binds_the_manifest_and_the_whole_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    merged_output(tmp.path(), &good);
    let digest = std::fs::read_to_string(good.join("merge_manifest.sha256")).unwrap();
    assert!(
        digest.ends_with("  merge_manifest.json\n") && digest.len() == 64 + 2 + 20,
        "{digest:?}"
    );
    // Standard tools agree with the digest.
    if let Ok(o) = std::process::Command::new("sha256sum")
        .args(["-c", "merge_manifest.sha256"])
        .current_dir(&good)
        .output()
    {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    }

    // Untouched: passes.
    let o = run_bounded(&["verify".as_ref(), good.as_os_str()]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Rewritten as the writer writes it, unchanged: passes (so the edits
    // below are refused for what they change, not for how they are written).
    let o = verify_tampered(&good, &tmp.path().join("same"), |d| {
        edit_manifest(d, |_| {})
    });
    assert!(o.status.success(), "{}", stderr(&o));

    let case = |name: &str| tmp.path().join(name);
    let refused = |o: &Output, parts: &[&str]| {
        let e = stderr(o);
        assert_eq!(o.status.code(), Some(1), "{e}");
        for p in parts {
            assert!(e.contains(p), "{p:?} is not in {e}");
        }
    };

    let o = verify_tampered(&good, &case("added"), |d| {
        std::fs::write(d.join("extra.txt"), "not written by the merge").unwrap()
    });
    refused(&o, &["extra.txt: not listed in merge_manifest.json"]);

    for (what, edit) in [
        ("method", (|m| m["method"] = json!("svd")) as fn(&mut Value)),
        ("weights", |m| m["weights"] = json!({"global": [5.0]})),
        ("inputs", |m| m["inputs"] = json!([])),
    ] {
        let o = verify_tampered(&good, &case(what), |d| edit_manifest(d, edit));
        refused(
            &o,
            &[
                "merge_manifest.json: differs from merge_manifest.sha256",
                "changed after it was written",
            ],
        );
    }

    let o = verify_tampered(&good, &case("unlisted"), |d| {
        edit_manifest(d, |m| {
            m["outputs"]
                .as_object_mut()
                .unwrap()
                .remove("adapter_config.json");
        });
        std::fs::write(d.join("adapter_config.json"), "{}").unwrap();
    });
    refused(
        &o,
        &["merge_manifest.json: differs from merge_manifest.sha256"],
    );

    let o = verify_tampered(&good, &case("no-digest"), |d| {
        std::fs::remove_file(d.join("merge_manifest.sha256")).unwrap()
    });
    refused(&o, &["merge_manifest.sha256: missing"]);

    let o = verify_tampered(&good, &case("fifo"), |d| {
        mkfifo(&d.join("adapter_model.safetensors"))
    });
    refused(&o, &["adapter_model.safetensors: is a FIFO (named pipe)"]);

    let o = verify_tampered(&good, &case("zero"), |d| {
        std::fs::remove_file(d.join("README.md")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", d.join("README.md")).unwrap();
    });
    refused(&o, &["README.md: is a character device"]);
}

/// A closed stderr (`2>&-`), or a stderr pipe whose reader left (`2>&1 |
/// head -1`), is no reason to fail: the merge is written and verifies, and
/// the exit status is 0, also when there is a note to give (three_adapters
/// has modules that only some adapters adapt).
#[test]
fn a_closed_stderr_is_not_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (dirs, _, _) = three_adapters(tmp.path());
    let fixtures = ["alpha", "beta"].map(|a| common::repo().join("fixtures/adapters").join(a));
    let bin = env!("CARGO_BIN_EXE_lora-merge");
    for (i, adapters) in [&fixtures[..], &dirs[..]].into_iter().enumerate() {
        let closed = tmp.path().join(format!("closed-{i}"));
        let o = common::command("sh")
            .arg("-c")
            .arg("\"$0\" uniform --adapters \"$@\" 2>&-")
            .arg(bin)
            .args(adapters)
            .arg("-o")
            .arg(&closed)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));

        let broken = tmp.path().join(format!("broken-{i}"));
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let o = common::command(bin)
            .arg("uniform")
            .arg("--adapters")
            .args(adapters)
            .arg("-o")
            .arg(&broken)
            .stderr(writer)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "stderr to a pipe nobody reads");

        for out in [&closed, &broken] {
            let v = run(&["verify", out.to_str().unwrap()]);
            assert!(v.status.success(), "{}: {}", out.display(), stderr(&v));
        }
    }
}
