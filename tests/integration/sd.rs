//! Stable Diffusion layouts end to end: fixtures in kohya, diffusers and
//! PEFT-on-UNet layouts (written by fixtures/make_sd_fixtures.py, which also
//! checks its conv reference deltas against real PyTorch convolutions) are
//! merged by the binary into every layout, read back with the library, and
//! compared with the reference deltas.
//!
//! Tolerance: relative Frobenius error <= 1e-6. The reference is computed in
//! float64 and stored as f32 (one rounding, 2^-24 relative); a weight-1
//! exact merge rounds `w * s * A` to f32 once more; products are summed in
//! f64. Two or three f32 roundings stay well below 1e-6.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use lora_merge::adapter::{sdnames, AdapterSet};
use lora_merge::tensors::safetensors::SafetensorsFile;

use crate::common;

use common::run;

const BIN: &str = env!("CARGO_BIN_EXE_lora-merge");
const TOL: f64 = 1e-6;

/// Generate the fixtures once per test binary.
fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| common::generate("fixtures/make_sd_fixtures.py", &[]))
}

fn ok(args: &[&str]) {
    let o = run(args);
    assert!(
        o.status.success(),
        "lora-merge {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Input reference of fixture `stem` in layout `fmt`.
fn input(stem: &str, fmt: &str) -> String {
    let d = fixtures();
    match fmt {
        "kohya" => d.join(format!("{stem}_kohya.safetensors")),
        f => d.join(format!("{stem}_{f}")),
    }
    .to_string_lossy()
    .into_owned()
}

/// The reference deltas of a fixture: kohya name -> (fan_out*fan_in values).
fn reference(stem: &str) -> BTreeMap<String, Vec<f32>> {
    let f = SafetensorsFile::open(fixtures().join(format!("{stem}_ref.safetensors"))).unwrap();
    f.tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.to_f32()))
        .collect()
}

/// Every module's delta (scale * B @ A, flattened like the reference), by
/// alignment key.
fn deltas(path: &Path) -> BTreeMap<String, Vec<f64>> {
    let mut set = AdapterSet::load(&[path.to_string_lossy().into_owned()]).unwrap();
    set.align_sd_names().unwrap();
    let a = &set.adapters[0];
    a.modules
        .iter()
        .map(|(k, m)| {
            let (av, bv) = (m.a.to_f32(), m.b.to_f32());
            let (r, n, o) = (m.rank, m.fan_in, m.fan_out);
            let mut d = vec![0f64; o * n];
            for i in 0..o {
                for j in 0..n {
                    let s: f64 = (0..r)
                        .map(|t| f64::from(bv[i * r + t]) * f64::from(av[t * n + j]))
                        .sum();
                    d[i * n + j] = m.scale * s;
                }
            }
            (k.clone(), d)
        })
        .collect()
}

fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got.iter().zip(want).map(|(g, w)| (g - w).powi(2)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den).sqrt()
}

fn as_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

/// The weights file a merged directory holds.
fn weights_of(dir: &Path) -> PathBuf {
    for n in [
        "adapter_model.safetensors",
        "pytorch_lora_weights.safetensors",
        "lora.safetensors",
    ] {
        if dir.join(n).exists() {
            return dir.join(n);
        }
    }
    panic!("no weights in {}", dir.display());
}

#[test]
fn every_format_pair_round_trips_every_delta() {
    let tmp = tempfile::tempdir().unwrap();
    let mut worst: f64 = 0.0;
    let mut conv_worst: f64 = 0.0;
    let mut checked = 0;
    for model in ["sd15", "sdxl"] {
        let stem = format!("{model}_a");
        let want = reference(&stem);
        for from in ["kohya", "diffusers", "peft"] {
            for to in ["kohya", "diffusers", "peft"] {
                let out = tmp.path().join(format!("{model}-{from}-{to}"));
                ok(&[
                    "uniform",
                    "--adapters",
                    &input(&stem, from),
                    "--weights",
                    "1",
                    "--output-format",
                    to,
                    "-o",
                    out.to_str().unwrap(),
                ]);
                let got = deltas(&weights_of(&out));
                // PEFT fixtures hold the UNet modules only.
                let expected: Vec<&String> = want
                    .keys()
                    .filter(|k| from != "peft" || k.starts_with(sdnames::UNET.kohya))
                    .collect();
                let names: Vec<&String> = got.keys().collect();
                assert_eq!(names, expected, "{model} {from} -> {to}: module names");
                for (k, d) in &got {
                    let e = rel_err(d, &as_f64(&want[k]));
                    assert!(e <= TOL, "{model} {from} -> {to}: {k}: rel error {e:e}");
                    worst = worst.max(e);
                    if k.contains("conv") || k.ends_with("proj_in") || k.ends_with("proj_out") {
                        conv_worst = conv_worst.max(e);
                    }
                    checked += 1;
                }
            }
        }
    }
    println!(
        "round trips: {checked} module deltas, max relative error {worst:.3e} (conv modules {conv_worst:.3e})"
    );
}

#[test]
fn kohya_output_is_sd_scripts_shaped() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("k");
    ok(&[
        "uniform",
        "--adapters",
        &input("sd15_a", "kohya"),
        &input("sd15_b", "kohya"),
        "-o",
        out.to_str().unwrap(),
    ]);
    let f = SafetensorsFile::open(out.join("lora.safetensors")).unwrap();
    // SD 1.x spelling of the text encoder is kept.
    assert!(f
        .tensors
        .contains_key("lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"));
    let conv = "lora_unet_down_blocks_0_resnets_0_conv1";
    let down = &f.tensors[&format!("{conv}.lora_down.weight")];
    let up = &f.tensors[&format!("{conv}.lora_up.weight")];
    let alpha = &f.tensors[&format!("{conv}.alpha")];
    // Exact merge: rank 2 + 3, alpha = rank (scale 1), 0-dim alpha.
    assert_eq!(down.shape, vec![5, 40, 3, 3]);
    assert_eq!(up.shape, vec![40, 5, 1, 1]);
    assert!(alpha.shape.is_empty());
    assert_eq!(alpha.to_f32(), vec![5.0]);
    let md = &f.metadata;
    assert_eq!(md["ss_base_model_version"], "sd_v1");
    assert_eq!(md["ss_network_module"], "networks.lora");
    assert_eq!(md["ss_network_dim"], "Dynamic");
    assert_eq!(
        md["ss_merged_from"],
        "sd15_a_kohya.safetensors, sd15_b_kohya.safetensors"
    );
    // Training facts of one input do not describe the merge.
    assert!(!md.contains_key("ss_learning_rate"));
    assert!(!md.contains_key("modelspec.title"));
    assert_eq!(md["lora_merge.method"], "exact");
}

/// sd-scripts' own LoRA merge (networks/merge_lora.py, merge_lora_models)
/// multiplies both lora_down and lora_up by sqrt(ratio) (times an alpha
/// correction) and adds the factors of the inputs together, so one input's
/// delta scales with ratio but two inputs produce cross terms up_i down_j,
/// and users who scale both factors by the ratio get ratio^2. Here the
/// delta is sum_i w_i * s_i * up_i down_i: doubling every weight doubles the
/// delta, and each input enters linearly.
#[test]
fn kohya_ratios_are_linear() {
    let tmp = tempfile::tempdir().unwrap();
    let merge = |w: [&str; 2], name: &str| {
        let out = tmp.path().join(name);
        ok(&[
            "uniform",
            "--adapters",
            &input("sdxl_a", "kohya"),
            &input("sdxl_b", "kohya"),
            "--weights",
            w[0],
            w[1],
            "-o",
            out.to_str().unwrap(),
        ]);
        deltas(&out.join("lora.safetensors"))
    };
    let one = merge(["0.3", "0.7"], "one");
    let two = merge(["0.6", "1.4"], "two");
    let (ra, rb) = (reference("sdxl_a"), reference("sdxl_b"));
    let mut worst: f64 = 0.0;
    for (k, d1) in &one {
        let d2 = &two[k];
        let doubled: Vec<f64> = d1.iter().map(|x| 2.0 * x).collect();
        let e = rel_err(d2, &doubled);
        assert!(e <= TOL, "{k}: w and 2w differ by {e:e}");
        let want: Vec<f64> = ra[k]
            .iter()
            .zip(&rb[k])
            .map(|(&a, &b)| 0.3 * f64::from(a) + 0.7 * f64::from(b))
            .collect();
        let e = rel_err(d1, &want);
        assert!(e <= TOL, "{k}: not the weighted sum of deltas: {e:e}");
        worst = worst.max(e);
    }
    println!("ratio linearity: max relative error vs 0.3 dA + 0.7 dB = {worst:.3e}");
}

#[test]
fn svd_conv_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("svd");
    ok(&[
        "uniform",
        "--adapters",
        &input("sd15_a", "kohya"),
        &input("sd15_b", "diffusers"),
        "--output-format",
        "kohya",
        "--method",
        "svd",
        "--rank",
        "7",
        "--conv-rank",
        "3",
        "-o",
        out.to_str().unwrap(),
    ]);
    let f = SafetensorsFile::open(out.join("lora.safetensors")).unwrap();
    let r = |k: &str| f.tensors[&format!("{k}.lora_down.weight")].shape[0];
    assert_eq!(r("lora_unet_down_blocks_0_resnets_0_conv1"), 3);
    assert_eq!(r("lora_unet_down_blocks_0_attentions_0_proj_in"), 7);
    assert_eq!(
        r("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
        7
    );
    // rank 3 of a sum of rank-2 and rank-3 convs is not exact, but the
    // kohya + diffusers inputs did line up: 12 modules, not 24.
    let n = f
        .tensors
        .keys()
        .filter(|k| k.ends_with(".lora_down.weight"))
        .count();
    assert_eq!(n, 12);
}

/// diffusers' own loader as the oracle (tests/python/sd_loaders.py): the
/// fixtures and our kohya and diffusers merges of them (weights 0.7, -0.4)
/// load through `load_lora_weights` into tiny SD 1.5- and SDXL-shaped models
/// with no warnings and no skipped module, and `fuse_lora` changes exactly
/// the fixture's weights, each by the expected delta (rel. error <= 1e-5).
/// The same for the SGM-named SDXL fixture (whole UNet structure) and our
/// kohya, diffusers and PEFT (loaded by PEFT) outputs from it, alone and
/// merged with its diffusers-named twin.
#[test]
fn diffusers_loads_and_fuses_our_merges() {
    // 2 models x (1 shape table + 4 fixture files x 6 checks + 6 merges x
    // 7 checks) + 3 oracle self-tests on SD 1.5, then SGM-named SDXL: 1
    // shape table + 1 benchmark coverage + 2 fixture files x 6 + 4 merges
    // loaded by diffusers x 7 + 1 merge loaded by PEFT x 6.
    const MIN_CHECKS: usize = 137 + 2 + 12 + 28 + 6;
    let out = common::run_script(
        "tests/python/sd_loaders.py",
        &["--fixtures".as_ref(), fixtures().as_os_str()],
        BIN,
    );
    common::assert_oracle_passed(&out, "diffusers loader checks", MIN_CHECKS);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.lines().any(|l| l.starts_with("FAIL")),
        "a check failed:\n{stdout}"
    );
}

/// `inspect` names each adapter's layout, and `--format` forces one the
/// same way it does for `uniform`.
#[test]
fn inspect_shows_and_forces_the_layout() {
    let kohya = input("sd15_a", "kohya");
    let diffusers = input("sd15_b", "diffusers");
    let peft = input("sd15_a", "peft");
    let o = run(&["inspect", "--json", &kohya, &diffusers, &peft]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let layouts: Vec<&str> = v["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["format"].as_str().unwrap())
        .collect();
    assert_eq!(layouts, ["kohya", "diffusers", "peft"]);
    assert_eq!(v["adapters"][0]["module_count"], 12);

    let o = run(&["inspect", &kohya, &diffusers]);
    assert!(o.status.success());
    // The report is the result: on stdout.
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("  layout      kohya\n"), "{text}");
    assert!(text.contains("  layout      diffusers\n"), "{text}");

    // Forcing the layout the file has changes nothing ...
    let o = run(&["inspect", "--json", "--format", "kohya", &kohya]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["adapters"][0]["format"], "kohya");
    // ... and forcing another one reads it as that, and names the file and
    // the tensor that does not fit.
    let o = run(&["inspect", "--format", "diffusers", &kohya]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains(
            "sd15_a_kohya.safetensors: tensor lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"
        ) && e.contains("not a diffusers LoRA factor"),
        "{e}"
    );
}

#[test]
fn mixed_layouts_need_output_format() {
    let tmp = tempfile::tempdir().unwrap();
    let o = run(&[
        "uniform",
        "--adapters",
        &input("sd15_a", "kohya"),
        &input("sd15_b", "diffusers"),
        "-o",
        tmp.path().join("x").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("different layouts") && e.contains("--output-format"),
        "{e}"
    );
    assert!(!tmp.path().join("x").exists());
}

/// Tensor names of a safetensors file.
fn tensor_names(path: &Path) -> Vec<String> {
    SafetensorsFile::open(path)
        .unwrap()
        .tensors
        .keys()
        .cloned()
        .collect()
}

/// Every delta of `got` equals `coeff` times the reference, and the module
/// set is exactly the reference's (one module per layer). Returns the worst
/// relative error.
fn assert_deltas(
    got: &BTreeMap<String, Vec<f64>>,
    want: &BTreeMap<String, Vec<f32>>,
    coeff: f64,
    what: &str,
) -> f64 {
    let names: Vec<&String> = got.keys().collect();
    let expected: Vec<&String> = want.keys().collect();
    assert_eq!(names, expected, "{what}: module names");
    let mut worst: f64 = 0.0;
    for (k, d) in got {
        let w: Vec<f64> = want[k].iter().map(|&x| coeff * f64::from(x)).collect();
        let e = rel_err(d, &w);
        assert!(e <= TOL, "{what}: {k}: rel error {e:e}");
        worst = worst.max(e);
    }
    worst
}

/// SGM-named SDXL kohya files (sd-scripts names SDXL UNet modules after the
/// original SGM UNet; fixture `sgm_a`, every adaptable layer of an
/// SDXL-structured UNet): converted to diffusers and PEFT they name
/// diffusers' modules, and kohya output keeps the file's own names.
#[test]
fn sgm_named_sdxl_converts_and_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let sgm = fixtures().join("sgm_a_kohya.safetensors");
    let want = reference("sgm_a");
    let unet_modules = want.keys().filter(|k| k.starts_with("lora_unet_")).count();
    assert!(unet_modules > 790, "the fixture covers the whole UNet");
    let mut worst: f64 = 0.0;
    for to in ["kohya", "diffusers", "peft"] {
        let out = tmp.path().join(to);
        ok(&[
            "uniform",
            "--adapters",
            sgm.to_str().unwrap(),
            "--weights",
            "1",
            "--output-format",
            to,
            "-o",
            out.to_str().unwrap(),
        ]);
        let file = weights_of(&out);
        worst = worst.max(assert_deltas(&deltas(&file), &want, 1.0, to));
        let names = tensor_names(&file);
        if to == "kohya" {
            // Names preserved: the same tensors, spelled the same way.
            assert_eq!(names, tensor_names(&sgm), "kohya output renamed modules");
        } else {
            let sgm_spelled: Vec<&String> = names
                .iter()
                .filter(|n| {
                    [
                        "input_blocks",
                        "middle_block",
                        "output_blocks",
                        "time_embed.",
                        "label_emb",
                    ]
                    .iter()
                    .any(|p| n.contains(p))
                })
                .collect();
            assert!(sgm_spelled.is_empty(), "{to}: {sgm_spelled:?}");
            let prefix = if to == "peft" {
                "base_model.model."
            } else {
                ""
            };
            for p in [
                "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                "unet.down_blocks.0.downsamplers.0.conv",
                "unet.mid_block.resnets.1.time_emb_proj",
                "unet.up_blocks.0.upsamplers.0.conv",
                "unet.up_blocks.2.resnets.2.conv_shortcut",
                "unet.add_embedding.linear_1",
                "unet.conv_in",
            ] {
                let k = format!("{prefix}{p}.lora_A.weight");
                assert!(names.contains(&k), "{to}: no {k}");
            }
        }
    }
    println!(
        "SGM-named SDXL: {} modules ({unet_modules} UNet) through kohya, diffusers and PEFT \
         output, max relative error {worst:.3e}",
        want.len()
    );
}

/// An SGM-named file and a diffusers-named one of the same deltas line up
/// module by module: the merge has one module per layer, and its delta is
/// (w1 + w2) times the fixture's, for every output layout. kohya output
/// uses SGM names when any input did, diffusers' names otherwise.
#[test]
fn sgm_and_diffusers_names_merge_as_one() {
    let tmp = tempfile::tempdir().unwrap();
    let sgm = fixtures().join("sgm_a_kohya.safetensors");
    let twin = fixtures().join("sgm_a_dnames_kohya.safetensors");
    let (sgm, twin) = (sgm.to_str().unwrap(), twin.to_str().unwrap());
    let want = reference("sgm_a");
    let mut worst: f64 = 0.0;
    for (w, coeff) in [(["0.3", "0.5"], 0.8), (["0.6", "1.0"], 1.6)] {
        for to in ["kohya", "diffusers", "peft"] {
            let out = tmp.path().join(format!("{to}-{coeff}"));
            ok(&[
                "uniform",
                "--adapters",
                sgm,
                twin,
                "--weights",
                w[0],
                w[1],
                "--output-format",
                to,
                "-o",
                out.to_str().unwrap(),
            ]);
            let file = weights_of(&out);
            let what = format!("{to}, weights {w:?}");
            worst = worst.max(assert_deltas(&deltas(&file), &want, coeff, &what));
            if to == "kohya" {
                // Both inputs' ranks stacked under the SGM names.
                let names = tensor_names(&file);
                assert_eq!(names, tensor_names(Path::new(sgm)), "{what}");
            }
        }
    }
    // The rule does not depend on the order of the inputs ...
    let out = tmp.path().join("twin-first");
    ok(&[
        "uniform",
        "--adapters",
        twin,
        sgm,
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(
        tensor_names(&weights_of(&out)),
        tensor_names(Path::new(sgm))
    );
    // ... and diffusers-named inputs alone keep diffusers' names.
    let out = tmp.path().join("twin-only");
    ok(&["uniform", "--adapters", twin, "-o", out.to_str().unwrap()]);
    assert_eq!(
        tensor_names(&weights_of(&out)),
        tensor_names(Path::new(twin))
    );
    println!(
        "SGM + diffusers-named merges: {} modules each, deltas (w1 + w2) x fixture, max relative \
         error {worst:.3e}",
        want.len()
    );
}

/// A UNet name in SGM style that is no adaptable layer has no diffusers
/// name: kohya output keeps it, diffusers and PEFT output refuse it.
#[test]
fn unmapped_sgm_names_are_refused_for_diffusers_output() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("odd.safetensors");
    let down: Vec<u8> = [0.5f32; 8].iter().flat_map(|x| x.to_le_bytes()).collect();
    let up: Vec<u8> = [0.25f32; 8].iter().flat_map(|x| x.to_le_bytes()).collect();
    let name = "lora_unet_input_blocks_1_1_norm";
    let views = vec![
        (
            format!("{name}.lora_down.weight"),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 4], &down)
                .unwrap(),
        ),
        (
            format!("{name}.lora_up.weight"),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 2], &up).unwrap(),
        ),
    ];
    safetensors::serialize_to_file(views, None, &input).unwrap();
    let out = tmp.path().join("k");
    ok(&[
        "uniform",
        "--adapters",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(tensor_names(&weights_of(&out)).contains(&format!("{name}.lora_down.weight")));
    for to in ["diffusers", "peft"] {
        let out = tmp.path().join(to);
        let o = run(&[
            "uniform",
            "--adapters",
            input.to_str().unwrap(),
            "--output-format",
            to,
            "-o",
            out.to_str().unwrap(),
        ]);
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(
            e.contains(name) && e.contains("--output-format kohya"),
            "{e}"
        );
        assert!(!out.exists());
    }
}

/// Block weights: a --weights-file rule written against diffusers paths
/// (`^unet\.down_blocks\.`) selects the same modules whatever layout the
/// inputs are in (kohya and diffusers here), and the manifest records them.
/// (The fixtures adapt down blocks, the middle block and the text encoder.)
#[test]
fn block_weights_match_diffusers_paths_in_every_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let rules = tmp.path().join("blocks.json");
    std::fs::write(
        &rules,
        r#"{"^unet\\.down_blocks\\.": [1, 0], "^unet\\.mid_block\\.": [0, 1]}"#,
    )
    .unwrap();
    let out = tmp.path().join("blocks");
    ok(&[
        "uniform",
        "--adapters",
        &input("sd15_a", "kohya"),
        &input("sd15_b", "diffusers"),
        "--output-format",
        "kohya",
        "--weights",
        "0.25",
        "0.75",
        "--weights-file",
        rules.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("merge_manifest.json")).unwrap()).unwrap();
    let mut seen = [0usize; 3];
    for (name, rec) in m["modules"].as_object().unwrap() {
        let w: Vec<f64> = rec["weights"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let (want, k) = if name.starts_with("lora_unet_down_blocks_") {
            (vec![1.0, 0.0], 0)
        } else if name.starts_with("lora_unet_mid_block_") {
            (vec![0.0, 1.0], 1)
        } else {
            (vec![0.25, 0.75], 2)
        };
        // Both inputs adapt every module (their layouts line up).
        assert_eq!(rec["adapters"], serde_json::json!([0, 1]), "{name}");
        assert_eq!(w, want, "{name}");
        seen[k] += 1;
    }
    assert!(seen.iter().all(|&n| n > 0), "{seen:?}");
}
