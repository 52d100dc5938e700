//! Base models as files: where a model directory's config, tokenizer and
//! weights are, which architecture it is, and its weights as memory-mapped
//! views by name. The forward passes themselves need libtorch and live in the
//! `lora-merge-torch` companion binary; everything here is plain Rust, so it
//! is checked (and tested) without libtorch.

pub mod config;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::source;
use crate::tensors::safetensors::SafetensorsFile;
use crate::tensors::TensorRef;

pub use config::{Arch, BertConfig, LlamaConfig, RopeScaling};

use crate::layout::{
    self, MODEL_CONFIG as CONFIG_FILE, MODEL_INDEX as WEIGHTS_INDEX_FILE,
    MODEL_WEIGHTS as WEIGHTS_FILE, TOKENIZER as TOKENIZER_FILE,
};

/// A base model directory, opened and validated: its architecture and every
/// weight tensor, still in the memory maps.
pub struct ModelDir {
    pub dir: PathBuf,
    pub arch: Arch,
    pub tokenizer: PathBuf,
    /// Every float tensor of every weights file, by name.
    pub tensors: BTreeMap<String, TensorRef>,
    /// Which file each tensor came from (for error messages).
    pub origin: BTreeMap<String, PathBuf>,
    /// Non-float tensors set aside (e.g. BERT's int64 `position_ids`).
    pub skipped: Vec<String>,
    pub files: Vec<ModelFile>,
    /// Repository, revision and commit, when the model came from the Hub.
    pub hub: Option<source::HubOrigin>,
}

/// A weights file of a base model. Not hashed: base models run to many
/// gigabytes, and the Hub revision (or the path) identifies them.
#[derive(Debug, Clone, Serialize)]
pub struct ModelFile {
    pub path: PathBuf,
    pub size: u64,
}

impl ModelDir {
    /// Open the base model a `--base` reference names (see
    /// [`source::resolve_model`]).
    pub fn open_ref(given: &str) -> Result<ModelDir> {
        let src = source::resolve_model_source(given)?;
        let mut m = ModelDir::open(&src.dir)?;
        m.hub = src.hub;
        Ok(m)
    }

    /// Open a local model directory: `config.json`, `tokenizer.json`, and
    /// `model.safetensors` or the shards listed in
    /// `model.safetensors.index.json`. Pickled weights are never read.
    pub fn open(dir: impl AsRef<Path>) -> Result<ModelDir> {
        let dir = dir.as_ref();
        let config_path = dir.join(CONFIG_FILE);
        let text = crate::layout::read_capped_text(&config_path, crate::layout::JSON_CAP).map_err(
            |e| match e {
                Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                    Error::invalid(
                        &config_path,
                        "missing: a base model directory needs config.json",
                    )
                }
                e => e,
            },
        )?;
        let arch = Arch::from_config_json(&text).map_err(|m| Error::invalid(&config_path, m))?;
        let tokenizer = dir.join(TOKENIZER_FILE);
        if !tokenizer.is_file() {
            return Err(Error::invalid(
                &tokenizer,
                "missing: lora-merge reads the fast tokenizer's tokenizer.json (save it with \
                 `AutoTokenizer.from_pretrained(...).save_pretrained(DIR)`)",
            ));
        }

        let weight_files = weight_files(dir)?;
        let mut tensors = BTreeMap::new();
        let mut origin = BTreeMap::new();
        let mut skipped = Vec::new();
        let mut files = Vec::new();
        for path in weight_files {
            let f = SafetensorsFile::open_lenient(&path)?;
            for (name, t) in f.tensors.iter() {
                if let Some(prev) = origin.insert(name.clone(), path.clone()) {
                    return Err(Error::invalid(
                        &path,
                        format!("tensor {name:?} is also in {}", prev.display()),
                    ));
                }
                tensors.insert(name.clone(), t.clone());
            }
            skipped.extend(f.other.keys().cloned());
            files.push(ModelFile {
                path: path.clone(),
                size: f.map.len() as u64,
            });
        }
        Ok(ModelDir {
            dir: dir.to_path_buf(),
            arch,
            tokenizer,
            tensors,
            origin,
            skipped,
            files,
            hub: None,
        })
    }

    /// The tensor `name`, which must have `shape`. Errors name the file, the
    /// tensor and both shapes.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<&TensorRef> {
        let t = self.tensors.get(name).ok_or_else(|| {
            Error::invalid(
                &self.dir,
                format!(
                    "weight {name:?} is missing ({} architecture, {} tensors in the weights files)",
                    self.arch.name(),
                    self.tensors.len()
                ),
            )
        })?;
        if t.shape != shape {
            return Err(Error::invalid(
                self.origin.get(name).unwrap_or(&self.dir),
                format!(
                    "weight {name:?} has shape {:?}, but config.json implies {shape:?}",
                    t.shape
                ),
            ));
        }
        Ok(t)
    }

    pub fn parameter_count(&self) -> usize {
        self.tensors.values().map(TensorRef::numel).sum()
    }
}

/// The safetensors files holding a model's weights.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(WEIGHTS_INDEX_FILE);
    if index.is_file() {
        return shards_from_index(dir, &index);
    }
    if let Some(p) = layout::pickle_in(dir) {
        return Err(layout::pickled_refusal(&p));
    }
    Err(Error::invalid(
        dir,
        format!("no {WEIGHTS_FILE} and no {WEIGHTS_INDEX_FILE}: where are the weights?"),
    ))
}

/// The shard paths of a sharded model directory; each must exist.
fn shards_from_index(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    let paths: Vec<PathBuf> = layout::index_shard_names(index)?
        .iter()
        .map(|s| dir.join(s))
        .collect();
    if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
        return Err(Error::invalid(
            index,
            format!("lists shard {} which does not exist", missing.display()),
        ));
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_st(path: &Path, tensors: &[(&str, &str, Vec<usize>)]) {
        let mut header = serde_json::Map::new();
        let mut off = 0usize;
        for (name, dtype, shape) in tensors {
            let size = if *dtype == "I64" { 8 } else { 4 };
            let n = shape.iter().product::<usize>() * size;
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}),
            );
            off += n;
        }
        let h = serde_json::to_string(&header).unwrap();
        let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(h.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, off));
        std::fs::write(path, bytes).unwrap();
    }

    const BERT_CONFIG: &str = r#"{"architectures":["BertModel"],"model_type":"bert",
        "vocab_size":10,"hidden_size":4,"num_hidden_layers":1,"num_attention_heads":2,
        "intermediate_size":8,"max_position_embeddings":16,"type_vocab_size":2,
        "layer_norm_eps":1e-12,"hidden_act":"gelu"}"#;

    #[test]
    fn opens_sharded_models_and_sets_integer_buffers_aside() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(CONFIG_FILE), BERT_CONFIG).unwrap();
        std::fs::write(d.path().join(TOKENIZER_FILE), "{}").unwrap();
        write_st(
            &d.path().join("a.safetensors"),
            &[("embeddings.word_embeddings.weight", "F32", vec![10, 4])],
        );
        write_st(
            &d.path().join("b.safetensors"),
            &[
                ("embeddings.position_ids", "I64", vec![1, 16]),
                ("pooler.dense.weight", "F32", vec![4, 4]),
            ],
        );
        std::fs::write(
            d.path().join(WEIGHTS_INDEX_FILE),
            r#"{"metadata":{},"weight_map":{"embeddings.word_embeddings.weight":"a.safetensors",
               "embeddings.position_ids":"b.safetensors","pooler.dense.weight":"b.safetensors"}}"#,
        )
        .unwrap();
        let m = ModelDir::open(d.path()).unwrap();
        assert_eq!(m.arch.name(), "BertModel");
        assert_eq!(m.tensors.len(), 2);
        assert_eq!(m.skipped, ["embeddings.position_ids"]);
        assert!(m.get("pooler.dense.weight", &[4, 4]).is_ok());
        let e = m
            .get("pooler.dense.weight", &[4, 5])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("b.safetensors") && e.contains("[4, 4]") && e.contains("[4, 5]"),
            "{e}"
        );
        let e = m
            .get("encoder.layer.0.attention.self.query.weight", &[4, 4])
            .unwrap_err();
        assert!(e
            .to_string()
            .contains("\"encoder.layer.0.attention.self.query.weight\" is missing"));
    }

    #[test]
    fn base_references_resolve_like_adapters() {
        // (Hub references are tested end to end against a local Hub.)
        let e = ModelDir::open_ref("./no-such-model-dir")
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("no such directory") && e.contains("Hub repository"),
            "{e}"
        );
        let f = tempfile::NamedTempFile::new().unwrap();
        let e = ModelDir::open_ref(f.path().to_str().unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("is a file"), "{e}");
    }

    #[test]
    fn refuses_pickles_escaping_shards_and_missing_files() {
        let d = tempfile::tempdir().unwrap();
        let e = ModelDir::open(d.path()).err().unwrap().to_string();
        assert!(e.contains("config.json"), "{e}");
        std::fs::write(d.path().join(CONFIG_FILE), BERT_CONFIG).unwrap();
        let e = ModelDir::open(d.path()).err().unwrap().to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
        std::fs::write(d.path().join(TOKENIZER_FILE), "{}").unwrap();
        std::fs::write(d.path().join("pytorch_model.bin"), "x").unwrap();
        let e = ModelDir::open(d.path()).err().unwrap().to_string();
        assert!(e.contains("pickled weights are never loaded"), "{e}");
        std::fs::write(
            d.path().join(WEIGHTS_INDEX_FILE),
            r#"{"weight_map":{"w":"../elsewhere.safetensors"}}"#,
        )
        .unwrap();
        let e = ModelDir::open(d.path()).err().unwrap().to_string();
        assert!(
            e.contains("is not a .safetensors file beside the index"),
            "{e}"
        );
    }
}
