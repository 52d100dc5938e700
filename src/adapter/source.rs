//! Where an adapter reference points. The one place that turns what the user
//! typed into files, so that Hub references can be added here alone.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// diffusers' LoRA weights file.
pub const DIFFUSERS_WEIGHTS_FILE: &str = "pytorch_lora_weights.safetensors";
const PICKLED_WEIGHTS_FILE: &str = "adapter_model.bin";
const PICKLED_DIFFUSERS_FILE: &str = "pytorch_lora_weights.bin";

/// An adapter reference, resolved to files.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Resolved {
    /// Files on the local disk.
    Local {
        dir: PathBuf,
        weights: PathBuf,
        /// `adapter_config.json` beside the weights, when there is one
        /// (PEFT needs it; kohya and diffusers files carry no config).
        config: Option<PathBuf>,
    },
}

impl Resolved {
    pub fn weights(&self) -> &Path {
        match self {
            Resolved::Local { weights, .. } => weights,
        }
    }

    pub fn config(&self) -> Option<&Path> {
        match self {
            Resolved::Local { config, .. } => config.as_deref(),
        }
    }

    pub fn dir(&self) -> &Path {
        match self {
            Resolved::Local { dir, .. } => dir,
        }
    }
}

fn pickled_refusal(file: &Path) -> Error {
    Error::invalid(
        file,
        "pickled weights are never loaded (unpickling can run arbitrary code); convert them \
         to safetensors in an environment you trust, e.g. with PEFT: \
         `PeftModel.from_pretrained(base, DIR).save_pretrained(OUT, safe_serialization=True)`",
    )
}

/// Does `s` look like a Hub repository id (`owner/name`)?
fn looks_like_hub_ref(s: &str) -> bool {
    let s = s.split_once('@').map_or(s, |(repo, _)| repo);
    let mut parts = s.split('/');
    let (Some(owner), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    ok(owner) && ok(name)
}

/// Resolve a base model reference (`--base`) to a local directory. Lives
/// beside adapter resolution so that Hub references are added for both in
/// one place.
pub fn resolve_model(given: &str) -> Result<PathBuf> {
    let path = Path::new(given);
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => std::fs::canonicalize(path).map_err(|e| Error::io(path, e)),
        Ok(_) => Err(Error::Usage(format!(
            "base model {given:?} is a file; pass the model's directory (config.json, \
             tokenizer.json and model.safetensors)"
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut msg = format!(
                "base model {given:?}: no such directory (a base model is a directory with \
                 config.json, tokenizer.json and model.safetensors)"
            );
            if looks_like_hub_ref(given) {
                msg.push_str(
                    "; it looks like a Hub repository, but Hub references are not supported \
                     yet: download it (e.g. `huggingface-cli download OWNER/NAME --local-dir \
                     DIR`) and pass the directory",
                );
            }
            Err(Error::Usage(msg))
        }
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Resolve a reference as given on the command line or in an adapters file:
/// an adapter directory (PEFT's `adapter_model.safetensors` with its
/// `adapter_config.json`, diffusers' `pytorch_lora_weights.safetensors`, or
/// a single `.safetensors` file), or a `.safetensors` file (a PEFT one with
/// `adapter_config.json` beside it, or a kohya or diffusers file).
pub fn resolve(given: &str) -> Result<Resolved> {
    let path = Path::new(given);
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut msg = format!("adapter {given:?}: no such file or directory");
            if looks_like_hub_ref(given) {
                msg.push_str(
                    "; it looks like a Hub repository, but Hub references are not supported yet: \
                     download it (e.g. `huggingface-cli download OWNER/NAME --local-dir DIR`) \
                     and pass the directory",
                );
            }
            return Err(Error::Usage(msg));
        }
        Err(e) => return Err(Error::io(path, e)),
    };

    let dir = if meta.is_dir() {
        path.to_path_buf()
    } else {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if ext == "bin" || ext == "pt" || ext == "pth" {
            return Err(pickled_refusal(path));
        }
        if ext != "safetensors" {
            return Err(Error::Usage(format!(
                "adapter {given:?} is neither a PEFT adapter directory nor a .safetensors file"
            )));
        }
        match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    };
    let dir = std::fs::canonicalize(&dir).map_err(|e| Error::io(&dir, e))?;
    let weights = if meta.is_dir() {
        weights_in_dir(&dir)?
    } else {
        // The file name is whatever the user chose; keep it, in the
        // canonical directory.
        let name = path.file_name().unwrap_or_default();
        dir.join(name)
    };
    let config = dir.join(CONFIG_FILE);
    let config = if config.is_file() {
        Some(config)
    } else if weights.file_name().is_some_and(|n| n == WEIGHTS_FILE) {
        return Err(Error::invalid(
            &dir,
            format!(
                "no {CONFIG_FILE} next to the weights: PEFT adapters need it for rank, alpha \
                 and target modules"
            ),
        ));
    } else {
        None
    };
    Ok(Resolved::Local {
        dir,
        weights,
        config,
    })
}

/// The weights file of an adapter directory: PEFT's, else diffusers', else
/// the only `.safetensors` file there.
fn weights_in_dir(dir: &Path) -> Result<PathBuf> {
    for name in [WEIGHTS_FILE, DIFFUSERS_WEIGHTS_FILE] {
        let w = dir.join(name);
        if w.is_file() {
            return Ok(w);
        }
    }
    for name in [PICKLED_WEIGHTS_FILE, PICKLED_DIFFUSERS_FILE] {
        let bin = dir.join(name);
        if bin.is_file() {
            return Err(pickled_refusal(&bin));
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(Error::invalid(
            dir,
            format!(
                "no {WEIGHTS_FILE}, {DIFFUSERS_WEIGHTS_FILE} or other .safetensors file in this \
                 directory: is it an adapter?"
            ),
        )),
        n => Err(Error::invalid(
            dir,
            format!("{n} .safetensors files in this directory: pass the one to read"),
        )),
    }
}

/// Adapter references from a file: one per line; blank lines and lines
/// starting with `#` are skipped.
pub fn read_adapters_file(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let refs: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    if refs.is_empty() {
        return Err(Error::invalid(path, "no adapter references in this file"));
    }
    Ok(refs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::testutil::{config_json, write_peft_dir};

    fn s(p: &Path) -> String {
        p.to_str().unwrap().to_string()
    }

    #[test]
    fn directory_and_file_forms() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a");
        write_peft_dir(&dir, &config_json(2, 4.0, &[], &[]), &[("q", 2, 3, 3)]);
        let canon = std::fs::canonicalize(&dir).unwrap();
        let r = resolve(&s(&dir)).unwrap();
        assert_eq!(r.dir(), canon);
        assert_eq!(r.weights(), canon.join(WEIGHTS_FILE));
        assert_eq!(r.config(), Some(canon.join(CONFIG_FILE).as_path()));
        let r = resolve(&s(&dir.join(WEIGHTS_FILE))).unwrap();
        assert_eq!(r.weights(), canon.join(WEIGHTS_FILE));
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["kind"], "local");
    }

    #[test]
    fn refusals() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("bin");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(CONFIG_FILE), "{}").unwrap();
        std::fs::write(dir.join(PICKLED_WEIGHTS_FILE), b"x").unwrap();
        let e = resolve(&s(&dir)).unwrap_err().to_string();
        assert!(e.contains("pickled weights are never loaded"), "{e}");
        assert!(e.contains(PICKLED_WEIGHTS_FILE), "{e}");
        let e = resolve(&s(&dir.join(PICKLED_WEIGHTS_FILE))).unwrap_err();
        assert!(e.to_string().contains("pickled"));

        let nocfg = tmp.path().join("nocfg");
        std::fs::create_dir(&nocfg).unwrap();
        std::fs::write(nocfg.join(WEIGHTS_FILE), b"x").unwrap();
        let e = resolve(&s(&nocfg)).unwrap_err().to_string();
        assert!(e.contains(CONFIG_FILE), "{e}");

        let missing = s(&tmp.path().join("nope"));
        let e = resolve(&missing).unwrap_err();
        assert!(matches!(e, Error::Usage(_)));
        assert!(!e.to_string().contains("Hub"));
    }

    #[test]
    fn hub_looking_refs_say_not_supported() {
        let e = resolve("some-owner/some_adapter.v2")
            .unwrap_err()
            .to_string();
        assert!(e.contains("Hub references are not supported yet"), "{e}");
        assert!(looks_like_hub_ref("owner/name@main"));
        assert!(!looks_like_hub_ref("./a/b"));
        assert!(!looks_like_hub_ref("a/b/c"));
        assert!(!looks_like_hub_ref("name"));
    }

    #[test]
    fn adapters_file() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("list.txt");
        std::fs::write(&f, "# mine\n\n a/one \n#b\nb/two\n").unwrap();
        assert_eq!(read_adapters_file(&f).unwrap(), vec!["a/one", "b/two"]);
        std::fs::write(&f, "# none\n\n").unwrap();
        assert!(read_adapters_file(&f).is_err());
    }
}
