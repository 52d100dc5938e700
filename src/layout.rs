//! What the files of adapters and base models are called, how a sharded
//! model's index names its shards, the one rule for pickled weights, and the
//! one way a file given to us is opened and read: regular files only, within
//! a cap for its kind.
//!
//! A leaf: local reading ([`crate::source`], [`crate::adapter`],
//! [`crate::checkpoint`]) and the Hub ([`crate::hub`]) all decide from
//! here, so a directory on disk and the same repository on the Hub are read
//! by the same rules.

use std::fs::File;
use std::io::Read;
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

/// The most bytes a file of one kind may hold. A cap per kind, so that a
/// side file that is huge, or grows while it is read, costs at most this
/// much memory.
#[derive(Clone, Copy, Debug)]
pub struct Cap {
    /// What such a file is, for the refusal ("a JSON config").
    pub what: &'static str,
    pub bytes: u64,
}

/// `adapter_config.json`, a model's `config.json`, a shard index: real ones
/// are kilobytes.
pub const JSON_CAP: Cap = Cap {
    what: "JSON config",
    bytes: 16 << 20,
};
/// A model card (README.md), ours or an input adapter's.
pub const CARD_CAP: Cap = Cap {
    what: "model card",
    bytes: 16 << 20,
};
/// An output's manifest, which lists every module of the merge.
pub const MANIFEST_CAP: Cap = Cap {
    what: "manifest",
    bytes: 64 << 20,
};
/// An `--adapters-file`: one reference a line.
pub const LIST_CAP: Cap = Cap {
    what: "list of adapters",
    bytes: 4 << 20,
};
/// A base model's `tokenizer.json` (large vocabularies take tens of MiB).
pub const TOKENIZER_CAP: Cap = Cap {
    what: "tokenizer",
    bytes: 256 << 20,
};
/// A JSON Lines file of examples: few-shot sets are small, and a mistaken
/// path to a multi-gigabyte file should fail fast.
pub const DATA_CAP: Cap = Cap {
    what: "data file",
    bytes: 1 << 30,
};

impl Cap {
    /// "16 MiB", "1 GiB", "8 bytes".
    fn size(self) -> String {
        if self.bytes < 1 << 20 {
            format!("{} bytes", self.bytes)
        } else if self.bytes >= 1 << 30 && self.bytes.is_multiple_of(1 << 30) {
            format!("{} GiB", self.bytes >> 30)
        } else {
            format!("{} MiB", self.bytes.div_ceil(1 << 20))
        }
    }

    fn refusal(self, path: &Path, len: u64) -> Error {
        Error::invalid(
            path,
            format!(
                "{len} bytes or more, larger than the {} a {} may hold",
                self.size(),
                self.what
            ),
        )
    }
}

/// What a file that is not a regular file is, in words.
fn kind_of(ft: std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if ft.is_char_device() {
            return "a character device";
        }
        if ft.is_block_device() {
            return "a block device";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    if ft.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

fn not_regular(path: &Path, ft: std::fs::FileType) -> Error {
    Error::invalid(
        path,
        format!(
            "is {}, not a regular file; only regular files are read (a pipe or a device \
             could block or never end)",
            kind_of(ft)
        ),
    )
}

/// Open `path` for reading, refusing anything but a regular file (after
/// symbolic links): a FIFO, a device, a socket or a directory is an
/// [`Error::Invalid`] that names the file and says what it is. On unix the
/// file is opened with `O_NONBLOCK`, so opening a FIFO returns at once
/// instead of waiting for a writer; the type is then checked on the opened
/// handle, so nothing can be swapped in between. Returns the file and its
/// length. A file that cannot be opened is [`Error::Io`].
pub fn open_regular(path: &Path) -> Result<(File, u64)> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(|e| {
        // Opening a socket fails (ENXIO): say what it is, not the errno.
        match std::fs::metadata(path) {
            Ok(m) if !m.is_file() => not_regular(path, m.file_type()),
            _ => Error::io(path, e),
        }
    })?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(not_regular(path, meta.file_type()));
    }
    Ok((file, meta.len()))
}

/// The whole of the regular file `path`, refused when it holds more than
/// `cap` bytes. At most `cap + 1` bytes are ever read, so a file that grows
/// while it is read, or whose size lies, is bounded all the same.
pub fn read_capped(path: &Path, cap: Cap) -> Result<Vec<u8>> {
    let (file, len) = open_regular(path)?;
    if len > cap.bytes {
        return Err(cap.refusal(path, len));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(cap.bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > cap.bytes {
        return Err(cap.refusal(path, bytes.len() as u64));
    }
    Ok(bytes)
}

/// As [`read_capped`], as UTF-8 text (anything else is [`Error::Invalid`]).
pub fn read_capped_text(path: &Path, cap: Cap) -> Result<String> {
    String::from_utf8(read_capped(path, cap)?)
        .map_err(|_| Error::invalid(path, format!("not UTF-8 text (a {})", cap.what)))
}

/// The shard files that `model.safetensors.index.json`'s `weight_map`
/// names, sorted, each once: plain `.safetensors` file names beside the
/// index (no folders, nothing hidden). Local models and the Hub fetcher
/// both use this, so both agree on what a sharded model is.
pub fn index_shard_names(index: &Path) -> Result<Vec<String>> {
    let text = read_capped_text(index, JSON_CAP)?;
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

    const TINY: Cap = Cap {
        what: "test file",
        bytes: 8,
    };

    #[test]
    fn capped_reads_stop_at_the_cap() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"12345678").unwrap();
        assert_eq!(read_capped(&p, TINY).unwrap(), b"12345678");
        std::fs::write(&p, b"123456789").unwrap();
        let e = read_capped(&p, TINY).unwrap_err();
        assert!(matches!(e, Error::Invalid { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("/f:") && msg.contains("8 bytes a test file"),
            "{msg}"
        );
        assert_eq!(JSON_CAP.size(), "16 MiB");
        assert_eq!(DATA_CAP.size(), "1 GiB");
    }

    #[test]
    fn only_regular_files_are_read() {
        let d = tempfile::tempdir().unwrap();
        let e = read_capped(d.path(), TINY).unwrap_err().to_string();
        assert!(e.contains("is a directory, not a regular file"), "{e}");
        #[cfg(unix)]
        {
            // A character device that never ends: refused, not read.
            let e = read_capped(Path::new("/dev/zero"), JSON_CAP).unwrap_err();
            assert!(matches!(e, Error::Invalid { .. }), "{e:?}");
            assert!(e.to_string().contains("a character device"), "{e}");
            // A FIFO with no writer: refused at once, not waited on.
            let fifo = d.path().join("pipe");
            let ok = std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success();
            assert!(ok);
            let e = read_capped(&fifo, JSON_CAP).unwrap_err().to_string();
            assert!(e.contains("pipe: is a FIFO (named pipe)"), "{e}");
        }
        let missing = read_capped(&d.path().join("missing"), TINY).unwrap_err();
        assert!(matches!(missing, Error::Io { .. }), "{missing:?}");
    }

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
