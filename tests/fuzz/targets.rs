//! What each fuzz target does with its input, shared by the cargo-fuzz
//! binaries (tests/fuzz/fuzz_targets/) and the stable replay test
//! (tests/integration/fuzz_replay.rs). A target fails only by panicking (or
//! hanging, or running out of memory): every malformed input must come back
//! as an error.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use lora_merge::adapter::config::PeftConfig;
use lora_merge::hub::HubRef;
use lora_merge::tensors::safetensors::SafetensorsFile;

/// A file of this process and thread holding `data` (the readers take
/// paths: they map or stream files).
fn scratch(name: &str, data: &[u8]) -> PathBuf {
    let dir = scratch_dir();
    std::fs::create_dir_all(&dir).expect("scratch folder");
    let p = dir.join(name);
    std::fs::write(&p, data).expect("scratch file");
    p
}

/// The folder `scratch` uses in this thread (for the caller to remove).
pub fn scratch_dir() -> PathBuf {
    std::env::temp_dir().join(format!(
        "lora-merge-fuzz-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ))
}

/// The safetensors reader (strict and lenient), then layout detection and
/// the kohya and diffusers module builders on what it accepted.
pub fn safetensors(data: &[u8]) {
    let p = scratch("adapter.safetensors", data);
    if let Ok(f) = SafetensorsFile::open(&p) {
        let _ = f.file_record();
        if lora_merge::adapter::format::refuse_foreign(&f).is_ok() {
            let _ = lora_merge::adapter::format::detect(&f);
            let _ = lora_merge::adapter::kohya::build_modules(&f);
            let _ = lora_merge::adapter::diffusers::build_modules(&f);
        }
    }
    let _ = SafetensorsFile::open_lenient(&p);
}

/// `adapter_config.json`: parse, validate, and ask for the rank, alpha and
/// scale of a few module names (which runs rank_pattern/alpha_pattern).
pub fn config(data: &[u8]) {
    let path = Path::new("adapter_config.json");
    if let Ok(c) = PeftConfig::parse(path, data) {
        if c.validate(path).is_ok() {
            for m in [
                "model.layers.0.self_attn.q_proj",
                "base_model.model.model.layers.11.mlp.down_proj",
                "unet.down_blocks.0.attentions.0.proj_in",
                "",
            ] {
                let _ = c.rank_for(m);
                let _ = c.alpha_for(m);
                let _ = c.scale_for(m);
            }
        }
    }
}

/// Hub references, both spellings. What parses must be a valid id whose
/// pinned form parses back to the same repository and path.
pub fn hub_ref(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    if let Some(r) = HubRef::parse_id(&s) {
        check_ref(&r);
    }
    if let Some(Ok(r)) = HubRef::parse_url(&s) {
        check_ref(&r);
    }
}

fn check_ref(r: &HubRef) {
    let _ = r.revision_or_main();
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let pinned = r.pinned(commit);
    let back = HubRef::parse_url(&pinned)
        .expect("a pinned reference is an hf:// URL")
        .unwrap_or_else(|e| panic!("{pinned:?} does not parse back: {e}"));
    assert_eq!(back.repo, r.repo, "{pinned:?}");
    assert_eq!(back.path, r.path, "{pinned:?}");
    assert_eq!(back.revision.as_deref(), Some(commit), "{pinned:?}");
}

/// Few-shot data files, read as classification and as causal-LM examples.
pub fn shots(data: &[u8]) {
    let p = scratch("shots.jsonl", data);
    let _ = lora_merge::data::read_labelled(&p);
    let _ = lora_merge::data::read_causal(&p);
}
