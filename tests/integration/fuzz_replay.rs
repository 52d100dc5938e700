//! Every fuzz seed and every input a fuzzer ever crashed on, replayed
//! through the fuzz targets' bodies on stable Rust, so that a fixed
//! crash stays fixed without the nightly toolchain (tests/fuzz/).

#[path = "../fuzz/targets.rs"]
mod targets;

use crate::common;

type Body = fn(&[u8]);

#[test]
fn every_fuzz_seed_and_saved_crasher_is_handled() {
    let targets: [(&str, Body); 4] = [
        ("safetensors", targets::safetensors),
        ("config", targets::config),
        ("hub_ref", targets::hub_ref),
        ("shots", targets::shots),
    ];
    let root = common::repo().join("tests/fuzz");
    let mut seen = 0;
    for (name, body) in targets {
        for kind in ["seeds", "regressions"] {
            let dir = root.join(kind).join(name);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries {
                let p = e.unwrap().path();
                if p.file_name().is_some_and(|n| n == ".keep") {
                    continue;
                }
                let data = std::fs::read(&p).unwrap();
                println!("{name}: {}", p.display());
                body(&data);
                seen += 1;
            }
        }
    }
    let _ = std::fs::remove_dir_all(targets::scratch_dir());
    assert!(
        seen >= 15,
        "only {seen} fuzz inputs found under {}",
        root.display()
    );
}
