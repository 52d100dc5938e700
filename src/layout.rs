//! What the files of adapters and base models are called, how a sharded
//! model's index names its shards, and the one rule for pickled weights.
//!
//! A leaf: local reading ([`crate::source`], [`crate::adapter`],
//! [`crate::checkpoint`]) and the Hub ([`crate::hub`]) all decide from
//! here, so a directory on disk and the same repository on the Hub are read
//! by the same rules.

use std::path::Path;

use crate::error::{Error, Result};

/// PEFT's adapter config.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// PEFT's adapter weights.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// diffusers' LoRA weights.
pub const DIFFUSERS_WEIGHTS: &str = "pytorch_lora_weights.safetensors";
/// The weights files an adapter folder is looked for under, in order.
pub const ADAPTER_WEIGHTS_NAMES: [&str; 2] = [ADAPTER_WEIGHTS, DIFFUSERS_WEIGHTS];
/// A model card (Hub front matter: license, base model).
pub const CARD: &str = "README.md";

/// A base model's config.
pub const MODEL_CONFIG: &str = "config.json";
/// A base model's tokenizer, as Python's `tokenizers` writes it.
pub const TOKENIZER: &str = "tokenizer.json";
/// A base model's weights in one file.
pub const MODEL_WEIGHTS: &str = "model.safetensors";
/// The index of a sharded model's weights.
pub const MODEL_INDEX: &str = "model.safetensors.index.json";
/// Files a base model needs besides its weights.
pub const MODEL_REQUIRED: [&str; 2] = [MODEL_CONFIG, TOKENIZER];
/// Files a base model may have that are fetched when present.
pub const MODEL_OPTIONAL: [&str; 3] = [
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

/// Weights stored with Python's pickle (`*.bin`, `*.pt`, ... and the index
/// of pickled shards). Unpickling can run arbitrary code, so such files are
/// never downloaded and never loaded, whatever they are called.
pub fn is_pickle(name: &str) -> bool {
    const EXT: [&str; 6] = [".bin", ".pt", ".pth", ".pkl", ".ckpt", ".bin.index.json"];
    EXT.iter().any(|e| name.ends_with(e))
}

/// The refusal of a pickled weights file, with what to do instead.
pub fn pickled_refusal(file: &Path) -> Error {
    Error::invalid(
        file,
        "pickled weights are never loaded (unpickling can run arbitrary code); convert them to \
         safetensors in an environment you trust, e.g. `save_pretrained(DIR, \
         safe_serialization=True)` in PEFT or transformers",
    )
}

/// The first pickled weights file directly in `dir`, by name order.
pub fn pickle_in(dir: &Path) -> Option<std::path::PathBuf> {
    let mut found: Vec<_> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_some_and(is_pickle))
        .map(|e| e.path())
        .collect();
    found.sort();
    found.into_iter().next()
}

/// The shard files that `model.safetensors.index.json`'s `weight_map`
/// names, sorted, each once: plain `.safetensors` file names beside the
/// index (no folders, nothing hidden). Local models and the Hub fetcher
/// both use this, so both agree on what a sharded model is.
pub fn index_shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::invalid(index, format!("not JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::invalid(index, "no \"weight_map\" object"))?;
    let mut shards: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::invalid(index, format!("weight_map[{tensor:?}] is not a file name"))
        })?;
        if file.contains('/')
            || file.contains('\\')
            || file.starts_with('.')
            || !file.ends_with(".safetensors")
        {
            return Err(Error::invalid(
                index,
                format!(
                    "weight_map[{tensor:?}] = {file:?} is not a .safetensors file beside the index"
                ),
            ));
        }
        if !shards.iter().any(|s| s == file) {
            shards.push(file.to_string());
        }
    }
    shards.sort();
    if shards.is_empty() {
        return Err(Error::invalid(index, "weight_map is empty"));
    }
    Ok(shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pickles_by_any_name() {
        for p in [
            "adapter_model.bin",
            "pytorch_lora_weights.bin",
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
            "training_args.bin",
            "x.pt",
            "x.pth",
            "x.pkl",
            "x.ckpt",
        ] {
            assert!(is_pickle(p), "{p}");
        }
        for p in [
            "adapter_model.safetensors",
            "model.safetensors.index.json",
            "config.json",
            "binary.txt",
        ] {
            assert!(!is_pickle(p), "{p}");
        }
    }

    #[test]
    fn index_names_only_safetensors_beside_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(MODEL_INDEX);
        std::fs::write(
            &p,
            r#"{"weight_map": {"a": "m-2.safetensors", "b": "m-1.safetensors", "c": "m-2.safetensors"}}"#,
        )
        .unwrap();
        assert_eq!(
            index_shard_names(&p).unwrap(),
            ["m-1.safetensors", "m-2.safetensors"]
        );
        for bad in [
            r#"{"weight_map": {"a": "../x.safetensors"}}"#,
            r#"{"weight_map": {"a": "pytorch_model.bin"}}"#,
            r#"{"weight_map": {"a": ".hidden.safetensors"}}"#,
            r#"{"weight_map": {}}"#,
            r#"{"metadata": {}}"#,
        ] {
            std::fs::write(&p, bad).unwrap();
            assert!(index_shard_names(&p).is_err(), "{bad}");
        }
    }
}
