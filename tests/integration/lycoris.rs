//! LyCORIS LoHa and LoKr inputs against LyCORIS itself: modules made by
//! the lycoris-lora package (tests/python/lycoris_oracle.py, which also
//! checks its reference deltas against the modules' real forward pass) are
//! merged by the binary with every method into every layout, read back, and
//! each module's delta `scale * B @ A` compared with the dense delta
//! LyCORIS computes.
//!
//! Tolerance: relative Frobenius error <= 1e-6 per module. The reference
//! is float64 from the file's own values; the LoRA factors hold one f32
//! rounding of a product of two stored values (none for f16 inputs), the
//! merge one more when it scales a factor; products are summed in f64.
//!
//! The Tucker, DoRA refusals use LyCORIS-made files too.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use lora_merge::adapter::AdapterSet;
use lora_merge::tensors::safetensors::SafetensorsFile;

use crate::common;

const TOL: f64 = 1e-6;

fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| common::generate("tests/python/lycoris_oracle.py", &[]))
}

fn input() -> String {
    fixtures()
        .join("lycoris_kohya.safetensors")
        .to_string_lossy()
        .into_owned()
}

/// LyCORIS' dense deltas, by module (kohya name), flattened `[out, in*k*k]`.
fn reference() -> BTreeMap<String, Vec<f64>> {
    let f = SafetensorsFile::open(fixtures().join("lycoris_ref.safetensors")).unwrap();
    f.tensors
        .iter()
        .map(|(k, t)| {
            assert_eq!(t.dtype, lora_merge::tensors::DType::F64);
            let b = t.bytes();
            let v = b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (k.clone(), v)
        })
        .collect()
}

/// Every module's `scale * B @ A` of an adapter, by alignment key.
fn deltas(path: &Path) -> BTreeMap<String, Vec<f64>> {
    let mut set = AdapterSet::load(&[path.to_string_lossy().into_owned()]).unwrap();
    set.align_sd_names().unwrap();
    set.adapters[0]
        .modules
        .iter()
        .map(|(k, m)| {
            let (av, bv) = (m.a.to_f32(), m.b.to_f32());
            let (r, n, o) = (m.rank, m.fan_in, m.fan_out);
            let mut d = vec![0f64; o * n];
            for i in 0..o {
                for t in 0..r {
                    let x = f64::from(bv[i * r + t]);
                    for j in 0..n {
                        d[i * n + j] += x * f64::from(av[t * n + j]);
                    }
                }
            }
            d.iter_mut().for_each(|x| *x *= m.scale);
            (k.clone(), d)
        })
        .collect()
}

/// (worst relative Frobenius error of a module, worst absolute error of an
/// entry) of `got` against `want`, which must name the same modules.
fn compare(got: &BTreeMap<String, Vec<f64>>, want: &BTreeMap<String, Vec<f64>>) -> (f64, f64) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    let (mut rel, mut abs) = (0f64, 0f64);
    for (k, w) in want {
        let g = &got[k];
        assert_eq!(g.len(), w.len(), "{k}");
        let num: f64 = g.iter().zip(w).map(|(a, b)| (a - b).powi(2)).sum();
        let den: f64 = w.iter().map(|x| x * x).sum();
        let r = (num / den).sqrt();
        assert!(r <= TOL, "{k}: relative error {r:e}");
        rel = rel.max(r);
        abs = g
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs())
            .fold(abs, f64::max);
    }
    (rel, abs)
}

fn weights_of(dir: &Path) -> PathBuf {
    [
        "adapter_model.safetensors",
        "pytorch_lora_weights.safetensors",
        "lora.safetensors",
    ]
    .iter()
    .map(|n| dir.join(n))
    .find(|p| p.exists())
    .unwrap_or_else(|| panic!("no weights in {}", dir.display()))
}

#[test]
fn loha_and_lokr_merge_to_lycoris_own_deltas() {
    let want = reference();
    assert_eq!(want.len(), 12);
    // As read: the factors alone already give LyCORIS' deltas.
    let (rel, abs) = compare(&deltas(Path::new(&input())), &want);
    println!("as read: max relative error {rel:.2e}, max absolute error {abs:.2e}");

    let tmp = tempfile::tempdir().unwrap();
    let runs: [(&str, &[&str]); 5] = [
        ("exact-kohya", &["--method", "exact"]),
        (
            "exact-peft",
            &["--method", "exact", "--output-format", "peft"],
        ),
        (
            "exact-diffusers",
            &["--method", "exact", "--output-format", "diffusers"],
        ),
        // Rank 32 is above every module's rank here: the SVD keeps all.
        (
            "svd-kohya",
            &["--method", "svd", "--rank", "32", "--conv-rank", "32"],
        ),
        ("linear-kohya", &["--method", "linear"]),
    ];
    for (label, extra) in runs {
        let out = tmp.path().join(label);
        let input = input();
        let mut args = vec![
            "uniform",
            "--adapters",
            &input,
            "--weights",
            "1",
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = common::run(&args);
        assert!(
            o.status.success(),
            "{label}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let (rel, abs) = compare(&deltas(&weights_of(&out)), &want);
        println!("{label}: max relative error {rel:.2e}, max absolute error {abs:.2e}");
    }

    // Convolutions come out with their kernels: the 3x3 LoHa (kernel from
    // its UNet name), the LoKr with a [b, d, 3, 3] w2 and the 1x1 LoHa.
    let f = SafetensorsFile::open(tmp.path().join("exact-kohya/lora.safetensors")).unwrap();
    let shape = |k: &str| f.tensors[k].shape.clone();
    assert_eq!(
        shape("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"),
        [9, 8, 3, 3]
    );
    assert_eq!(
        shape("lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"),
        [12, 9, 1, 1]
    );
    assert_eq!(
        shape("lora_unet_down_blocks_1_resnets_0_conv2.lora_down.weight")[1..],
        [16, 3, 3]
    );
    assert_eq!(
        shape("lora_unet_down_blocks_1_resnets_0_conv_shortcut.lora_down.weight"),
        [4, 8, 1, 1]
    );
    // LoHa rank 4 * 4 on a 10 x 6 linear: the dense delta times I_6.
    assert_eq!(
        shape(
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.lora_down.weight"
        ),
        [6, 6]
    );
}

#[test]
fn tucker_and_dora_lycoris_files_are_refused_by_name() {
    for (file, module, what) in [
        (
            "tucker_loha",
            "lora_unet_down_blocks_0_resnets_0_conv1",
            "LyCORIS LoHa with a Tucker core is not supported",
        ),
        (
            "tucker_lokr",
            "lora_unet_down_blocks_0_resnets_0_conv2",
            "LyCORIS LoKr with a Tucker core is not supported",
        ),
        (
            "dora_loha",
            "lora_unet_down_blocks_0_attentions_0_proj_in",
            "DoRA-style weight decomposition",
        ),
    ] {
        let p = fixtures().join(format!("{file}.safetensors"));
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        for extra in [&[][..], &["--format", "kohya"][..]] {
            let mut args = vec![
                "uniform",
                "--adapters",
                p.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
            ];
            args.extend_from_slice(extra);
            let o = common::run(&args);
            let e = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "{file}: {e}");
            assert!(
                e.contains(p.to_str().unwrap())
                    && e.contains(&format!("module {module}:"))
                    && e.contains(what),
                "{file}: {e}"
            );
            assert!(!out.exists());
        }
    }
}
