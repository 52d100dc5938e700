//! Where an adapter or base model reference points. The one place that turns
//! what the user typed into files: a local path, or a Hub reference
//! (`owner/name[@revision]` when no local path of that name exists, or
//! `hf://owner/name[@revision][/path]`) fetched through [`crate::hub`].

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::hub::{self, HubRef, Want};

use crate::layout::{self, ADAPTER_CONFIG as CONFIG_FILE, ADAPTER_WEIGHTS as WEIGHTS_FILE};

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
    /// Files of a Hub repository at one commit, in the Hub cache.
    Hub {
        repo: String,
        /// The revision as asked (`main` when none was).
        revision: String,
        /// The full commit sha it resolved to.
        commit: String,
        /// The folder or file inside the repository, if one was named.
        #[serde(skip_serializing_if = "Option::is_none")]
        path: Option<String>,
        /// The same reference pinned to `commit`.
        pinned: String,
        dir: PathBuf,
        weights: PathBuf,
        config: Option<PathBuf>,
    },
}

impl Resolved {
    pub fn weights(&self) -> &Path {
        match self {
            Resolved::Local { weights, .. } | Resolved::Hub { weights, .. } => weights,
        }
    }

    pub fn config(&self) -> Option<&Path> {
        match self {
            Resolved::Local { config, .. } | Resolved::Hub { config, .. } => config.as_deref(),
        }
    }

    pub fn dir(&self) -> &Path {
        match self {
            Resolved::Local { dir, .. } | Resolved::Hub { dir, .. } => dir,
        }
    }

    /// For a Hub input: the commit it resolved to.
    pub fn commit(&self) -> Option<&str> {
        match self {
            Resolved::Local { .. } => None,
            Resolved::Hub { commit, .. } => Some(commit),
        }
    }

    /// For a Hub input: the reference pinned to its commit, which gives the
    /// same files whatever the branch does later.
    pub fn pinned(&self) -> Option<&str> {
        match self {
            Resolved::Local { .. } => None,
            Resolved::Hub { pinned, .. } => Some(pinned),
        }
    }
}

/// What a base model reference resolved to.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSource {
    /// The model's directory (config.json, tokenizer.json, safetensors).
    pub dir: PathBuf,
    /// For a Hub model: repository, revision as asked, and the commit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hub: Option<HubOrigin>,
}

/// Where a Hub input came from.
#[derive(Debug, Clone, Serialize)]
pub struct HubOrigin {
    pub repo: String,
    pub revision: String,
    pub commit: String,
    pub pinned: String,
}

/// A Hub error for a reference that could also have been a mistyped local
/// path says so.
fn or_local(given: &str, e: Error) -> Error {
    match e {
        Error::Hub(m) if !given.starts_with("hf://") => {
            Error::Hub(format!("{m} (and there is no local path {given:?})"))
        }
        e => e,
    }
}

/// A Hub reference, if `given` is one: always for `hf://...`; for
/// `owner/name[@revision]` only when no local path of that name exists.
fn hub_ref(given: &str) -> Result<Option<HubRef>> {
    if let Some(r) = HubRef::parse_url(given) {
        return r.map(Some);
    }
    if std::fs::symlink_metadata(given).is_ok() {
        return Ok(None);
    }
    Ok(HubRef::parse_id(given))
}

/// Resolve a base model reference (`--base`) to a local directory: a
/// directory, or a Hub reference whose config, tokenizer and safetensors
/// weights are fetched into the cache (never pickled weights).
pub fn resolve_model(given: &str) -> Result<PathBuf> {
    resolve_model_source(given).map(|m| m.dir)
}

/// [`resolve_model`], with the Hub commit when the model came from the Hub.
pub fn resolve_model_source(given: &str) -> Result<ModelSource> {
    if let Some(r) = hub_ref(given)? {
        let snap = hub::fetch(&r, Want::Model).map_err(|e| or_local(given, e))?;
        return Ok(ModelSource {
            dir: snap.dir,
            hub: Some(HubOrigin {
                pinned: r.pinned(&snap.commit),
                repo: snap.repo,
                revision: snap.revision,
                commit: snap.commit,
            }),
        });
    }
    let path = Path::new(given);
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(ModelSource {
            dir: std::fs::canonicalize(path).map_err(|e| Error::io(path, e))?,
            hub: None,
        }),
        Ok(_) => Err(Error::Usage(format!(
            "base model {given:?} is a file; pass the model's directory (config.json, \
             tokenizer.json and model.safetensors)"
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::Usage(format!(
            "base model {given:?}: no such directory (a base model is a directory with \
             config.json, tokenizer.json and model.safetensors, or a Hub repository \
             OWNER/NAME[@REVISION])"
        ))),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Fetch an adapter from the Hub and describe its files.
fn resolve_hub(r: HubRef) -> Result<Resolved> {
    let snap = hub::fetch(&r, Want::Adapter)?;
    let weights = snap
        .weights
        .clone()
        .ok_or_else(|| Error::Internal("a fetched adapter without weights".into()))?;
    let dir = weights
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or(snap.dir.clone());
    let config = dir.join(CONFIG_FILE);
    Ok(Resolved::Hub {
        pinned: r.pinned(&snap.commit),
        repo: snap.repo,
        revision: snap.revision,
        commit: snap.commit,
        path: r.path,
        config: config.is_file().then_some(config),
        dir,
        weights,
    })
}

/// Resolve a reference as given on the command line or in an adapters file:
/// an adapter directory (PEFT's `adapter_model.safetensors` with its
/// `adapter_config.json`, diffusers' `pytorch_lora_weights.safetensors`, or
/// a single `.safetensors` file), or a `.safetensors` file (a PEFT one with
/// `adapter_config.json` beside it, or a kohya or diffusers file).
pub fn resolve(given: &str) -> Result<Resolved> {
    if let Some(r) = hub_ref(given)? {
        return resolve_hub(r).map_err(|e| or_local(given, e));
    }
    let path = Path::new(given);
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::Usage(format!(
                "adapter {given:?}: no such file or directory"
            )));
        }
        Err(e) => return Err(Error::io(path, e)),
    };

    let dir = if meta.is_dir() {
        path.to_path_buf()
    } else {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(layout::is_pickle)
        {
            return Err(layout::pickled_refusal(path));
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
    } else if config.exists() {
        // There, but a pipe, a device or a folder: say so, not "missing".
        crate::layout::open_regular(&config)?;
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
    for name in layout::ADAPTER_WEIGHTS_NAMES {
        let w = dir.join(name);
        // Taken when it is there at all: one that is a pipe or a device is
        // then refused by the reader, saying what it is, not "missing".
        if w.exists() {
            return Ok(w);
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
        0 if layout::pickle_in(dir).is_some() => Err(layout::pickled_refusal(
            &layout::pickle_in(dir).unwrap_or_default(),
        )),
        0 => Err(Error::invalid(
            dir,
            format!(
                "no {WEIGHTS_FILE}, {} or other .safetensors file in this \
                 directory: is it an adapter?",
                layout::DIFFUSERS_WEIGHTS
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
    let text = crate::layout::read_capped_text(path, crate::layout::LIST_CAP)?;
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
        std::fs::write(dir.join("adapter_model.bin"), b"x").unwrap();
        let e = resolve(&s(&dir)).unwrap_err().to_string();
        assert!(e.contains("pickled weights are never loaded"), "{e}");
        assert!(e.contains("adapter_model.bin"), "{e}");
        let e = resolve(&s(&dir.join("adapter_model.bin"))).unwrap_err();
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
    fn local_paths_win_over_hub_ids() {
        let tmp = tempfile::tempdir().unwrap();
        // A path that exists is local even when it reads as OWNER/NAME.
        let dir = tmp.path().join("owner").join("name");
        write_peft_dir(&dir, &config_json(2, 4.0, &[], &[]), &[("q", 2, 3, 3)]);
        assert!(hub_ref(&s(&dir)).unwrap().is_none());
        assert!(hub_ref("hf://o/n@v1").unwrap().is_some());
        assert!(hub_ref("no-such-owner-x/no-such-name-y").unwrap().is_some());
        assert!(hub_ref("a/b/c").unwrap().is_none());
        assert!(hub_ref("hf://o").is_err());
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
