//! THE writer: every command that produces an adapter (`uniform`, `fit`,
//! `train`) describes it as [`Contents`] and hands it here. One place
//! writes the weights in the asked layout, the PEFT config, extra files,
//! the model card and the manifest, all staged and committed at once
//! (see [`super::atomic`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::atomic::{Staging, WrittenFile};
use super::card::Card;
use super::manifest::{self, Manifest};
use super::{diffusers, kohya, peft, safetensors};
use crate::adapter::Format;
use crate::compose::merge::MergedModule;
use crate::tensors::DType;
use crate::{Error, Result};

/// Everything an adapter directory holds, as a command describes it.
pub struct Contents<'a> {
    pub modules: &'a [MergedModule],
    pub format: Format,
    pub dtype: DType,
    /// What `adapter_config.json` says besides the modules (PEFT output).
    pub config: peft::ConfigFacts,
    /// What kohya output's metadata says about the merge.
    pub kohya: Option<kohya::MergeFacts<'a>>,
    /// The card; the writer fills in the command and the weights' hash.
    pub card: Card,
    /// (as given, pinned to a commit) for every Hub reference used, so that
    /// the card's command gives the same bytes whatever branches do later.
    pub pins: Vec<(String, String)>,
    /// The manifest; the writer fills in the time, command line and outputs.
    pub manifest: Manifest,
    /// Extra files (a heatmap, a head), hashed into the manifest like the rest.
    pub files: Vec<(String, Vec<u8>)>,
}

/// Where the output went and what it holds (the manifest and its digest
/// aside).
pub struct Written {
    pub dir: PathBuf,
    pub files: BTreeMap<String, WrittenFile>,
}

impl Written {
    pub fn total_size(&self) -> u64 {
        self.files.values().map(|w| w.size).sum()
    }
}

/// The weights file's name in each layout.
pub fn weights_file(format: Format) -> &'static str {
    match format {
        Format::Peft => crate::layout::ADAPTER_WEIGHTS,
        Format::Kohya => kohya::FILE_NAME,
        Format::Diffusers => diffusers::FILE_NAME,
    }
}

/// The largest magnitude each element type stores.
fn largest(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 65504.0,
        DType::BF16 => 3.389_531_389_251_535_5e38,
        DType::F32 => f32::MAX as f64,
        DType::F64 => f64::MAX,
    }
}

/// Refuse to write a number the file cannot hold as computed: NaN, an
/// infinity, or a value beyond the range of the element type (an f16 merge
/// of large deltas). Checked before anything is staged.
pub fn check_values(modules: &[MergedModule], dtype: DType) -> Result<()> {
    let max = largest(dtype);
    for m in modules {
        for (which, values) in [("lora_A", m.a_values()), ("lora_B", m.b_values())] {
            let mut seen = 0usize;
            let mut bad = None;
            values
                .for_each_piece(|piece| {
                    if let Some(i) = piece
                        .iter()
                        .position(|x| !x.is_finite() || f64::from(x.abs()) > max)
                    {
                        bad = Some((seen + i, piece[i]));
                        return Err(std::io::Error::other("stop"));
                    }
                    seen += piece.len();
                    Ok(())
                })
                .or_else(|e| {
                    if bad.is_some() {
                        Ok(())
                    } else {
                        Err(Error::Internal(format!(
                            "reading back the merged factors of module {}: {e}",
                            m.name
                        )))
                    }
                })?;
            if let Some((i, x)) = bad {
                let why = if x.is_finite() {
                    format!(
                        "which {} cannot store (largest {max:e}); write --dtype f32",
                        dtype.name()
                    )
                } else {
                    "so an input holds NaN or infinite values, or the weights overflowed; \
                     check the inputs (lora-merge inspect) and the weights"
                        .to_string()
                };
                return Err(Error::Incompatible(format!(
                    "module {}: the merged {which} holds {x} (element {i}), {why}. Nothing \
                     was written",
                    m.name
                )));
            }
        }
    }
    Ok(())
}

/// Write `c` into `out`, whole or not at all.
pub fn write(out: &Path, mut c: Contents) -> Result<Written> {
    check_values(c.modules, c.dtype)?;
    let staging = Staging::new(out)?;
    let mut written = BTreeMap::new();

    let weights_file = weights_file(c.format);
    let format_meta = || BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let (tensors, metadata) = match c.format {
        Format::Peft => (peft::tensors(c.modules, c.dtype), format_meta()),
        Format::Kohya => {
            let facts = c
                .kohya
                .as_ref()
                .ok_or_else(|| Error::Internal("kohya output without its merge facts".into()))?;
            (
                kohya::tensors(c.modules, c.dtype),
                kohya::metadata(c.modules, facts),
            )
        }
        Format::Diffusers => (
            diffusers::tensors(c.modules, c.dtype),
            diffusers::metadata(c.modules),
        ),
    };
    let adapter =
        staging.write_with(weights_file, |w| safetensors::write(w, &tensors, &metadata))?;
    drop(tensors);
    written.insert(weights_file.to_string(), adapter.clone());

    if c.format == Format::Peft {
        let config = peft::config(c.modules, &c.config);
        written.insert(
            crate::layout::ADAPTER_CONFIG.into(),
            staging.write(crate::layout::ADAPTER_CONFIG, &json_text(&config)?)?,
        );
    }
    for (name, bytes) in &c.files {
        written.insert(name.clone(), staging.write(name, bytes)?);
    }

    let argv = command_line();
    c.card.command = quoted(argv.iter().map(String::as_str));
    c.card.reproduce = quoted(argv.iter().map(|a| {
        c.pins
            .iter()
            .find(|(g, _)| g == a)
            .map_or(a.as_str(), |(_, p)| p.as_str())
    }));
    c.card.weights_file = weights_file.to_string();
    c.card.adapter_sha256 = adapter.sha256.clone();
    written.insert(
        crate::layout::CARD.into(),
        staging.write(crate::layout::CARD, c.card.render().as_bytes())?,
    );

    c.manifest.created = manifest::timestamp();
    c.manifest.command_line = argv;
    c.manifest.outputs = written.clone();
    let manifest_bytes = json_text(&c.manifest)?;
    staging.write(manifest::FILE_NAME, &manifest_bytes)?;
    staging.write(
        manifest::DIGEST_FILE,
        manifest::digest_line(&manifest_bytes).as_bytes(),
    )?;
    let dir = staging.commit()?;
    Ok(Written {
        dir,
        files: written,
    })
}

/// Pretty JSON with a final newline, as every JSON file we write.
pub fn json_text(v: &impl serde::Serialize) -> Result<Vec<u8>> {
    let mut text = serde_json::to_vec_pretty(v).map_err(|e| Error::Internal(e.to_string()))?;
    text.push(b'\n');
    Ok(text)
}

/// The command line as the user typed it, the program spelled `lora-merge`
/// (argv[0] is wherever the binary happened to be). The companion binary
/// receives the user's arguments after a `cli` marker, which is dropped.
/// Arguments that are not UTF-8 are shown lossily.
pub fn command_line() -> Vec<String> {
    let mut args = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .peekable();
    let companion = std::env::current_exe()
        .ok()
        .and_then(|p| {
            p.file_stem()
                .map(|s| s.to_string_lossy().starts_with("lora-merge-torch"))
        })
        .unwrap_or(false);
    if companion && args.peek().map(String::as_str) == Some("cli") {
        args.next();
    }
    std::iter::once("lora-merge".to_string())
        .chain(args)
        .collect()
}

/// Arguments joined into one line a POSIX shell reads back as the same
/// arguments.
pub fn quoted<'a>(args: impl IntoIterator<Item = &'a str>) -> String {
    args.into_iter()
        .map(shell_quote)
        .collect::<Vec<_>>()
        .join(" ")
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@+,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::ModuleKind;
    use crate::compose::math::Factored;

    fn module(a: Vec<f32>) -> MergedModule {
        MergedModule {
            name: "m".into(),
            path: None,
            sgm_name: None,
            kind: ModuleKind::Linear,
            fan_out: 1,
            fan_in: a.len(),
            sources: vec![0],
            factored: Factored {
                rank: 1,
                b: vec![1.0],
                a,
                rel_error: 0.0,
                energy: 1.0,
            },
            spilled: None,
        }
    }

    #[test]
    fn non_finite_or_unrepresentable_values_are_never_written() {
        check_values(&[module(vec![1.0, -2.0])], DType::F16).unwrap();
        let e = check_values(&[module(vec![1.0, f32::NAN])], DType::F32)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("module m") && e.contains("element 1") && e.contains("NaN"),
            "{e}"
        );
        assert!(check_values(&[module(vec![f32::INFINITY])], DType::F32).is_err());
        let e = check_values(&[module(vec![70000.0])], DType::F16)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("f16 cannot store") && e.contains("--dtype f32"),
            "{e}"
        );
        check_values(&[module(vec![70000.0])], DType::BF16).unwrap();
    }

    #[test]
    fn quoting_survives_the_shell() {
        assert_eq!(
            quoted(["lora-merge", "fit", "--shots", "my shots.jsonl", "it's", ""]),
            "lora-merge fit --shots 'my shots.jsonl' 'it'\\''s' ''"
        );
        assert_eq!(quoted(["a=b", "hf://o/n@v1"]), "a=b hf://o/n@v1");
    }
}
