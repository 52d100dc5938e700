//! Parsed arguments become validated settings here, once, so that the same
//! option means the same thing in every command (`uniform` and `fit` share
//! [`MergeSettings`]; every writing command shares [`OutputSettings`]).

use std::path::{Path, PathBuf};

use crate::adapter::{AdapterSet, Format};
use crate::cli::{DTypeArg, FormatArg, InputFormat, MergeArgs, MethodArg, OutputArgs};
use crate::compose::merge::Method;
use crate::output::guard::{self, Input};
use crate::source;
use crate::tensors::DType;
use crate::{Error, Result};

/// How a weighted sum of adapters becomes one adapter.
#[derive(Debug, Clone, Copy)]
pub struct MergeSettings {
    pub method: Method,
    /// None: the inputs' own type when they agree, else f32.
    pub dtype: Option<DType>,
    pub strict: bool,
    pub allow_base_mismatch: bool,
}

impl MergeSettings {
    pub fn from_args(a: &MergeArgs) -> Result<MergeSettings> {
        Ok(MergeSettings {
            method: method(a.method, a.rank, a.conv_rank)?,
            dtype: a.dtype.map(|d| match d {
                DTypeArg::F32 => DType::F32,
                DTypeArg::F16 => DType::F16,
                DTypeArg::Bf16 => DType::BF16,
            }),
            strict: a.strict,
            allow_base_mismatch: a.allow_base_mismatch,
        })
    }

    /// The element type to write for `set`.
    pub fn dtype_for(&self, set: &AdapterSet) -> DType {
        self.dtype.unwrap_or_else(|| set.common_dtype())
    }
}

/// The materializer the flags ask for.
fn method(method: MethodArg, rank: Option<usize>, conv_rank: Option<usize>) -> Result<Method> {
    let m = match (method, rank) {
        (MethodArg::Exact, None) => Method::Exact,
        (MethodArg::Linear, None) => Method::Linear,
        (MethodArg::Svd, Some(0)) => return Err(Error::Usage("--rank must be at least 1".into())),
        (MethodArg::Svd, Some(_)) if conv_rank == Some(0) => {
            return Err(Error::Usage("--conv-rank must be at least 1".into()))
        }
        (MethodArg::Svd, Some(rank)) => Method::Svd { rank, conv_rank },
        (MethodArg::Svd, None) => {
            return Err(Error::Usage(
                "--method svd needs --rank N (the output rank per module)".into(),
            ))
        }
        (m, Some(_)) => {
            return Err(Error::Usage(format!(
                "--rank only applies to --method svd (got --method {})",
                if m == MethodArg::Exact {
                    "exact"
                } else {
                    "linear"
                }
            )))
        }
    };
    if conv_rank.is_some() && method != MethodArg::Svd {
        return Err(Error::Usage(
            "--conv-rank only applies to --method svd".into(),
        ));
    }
    Ok(m)
}

/// Where a command writes, and whether it may replace what is there.
#[derive(Debug, Clone)]
pub struct OutputSettings {
    pub dir: PathBuf,
    pub force: bool,
}

impl OutputSettings {
    pub fn from_args(a: &OutputArgs) -> OutputSettings {
        OutputSettings {
            dir: a.output.clone(),
            force: a.force,
        }
    }

    /// Refuse this output before any work: see [`guard::check_output`].
    pub fn check(&self, inputs: &[Input]) -> Result<()> {
        guard::check_output(&self.dir, self.force, inputs)
    }
}

/// Every local path an adapter set was read from, as resolved, for the
/// output check after loading: each file, and the folder of an adapter
/// given as a folder (a `.safetensors` file given alone only protects
/// itself and its config, not the folder it sits in).
pub fn adapter_inputs(set: &AdapterSet) -> Vec<Input<'static>> {
    set.adapters
        .iter()
        .flat_map(|a| {
            let folder = (a.resolved.commit().is_some() || Path::new(&a.given).is_dir())
                .then(|| Input::at("adapter", a.resolved.dir()));
            folder
                .into_iter()
                .chain(a.files.iter().map(|f| Input::at("adapter file", &f.path)))
        })
        .collect()
}

/// The adapters as typed, and --adapters-file, for the output check before
/// anything is read.
pub fn given_inputs<'a>(refs: &'a [String], file: Option<&'a Path>) -> Vec<Input<'a>> {
    refs.iter()
        .map(|r| Input::at("adapter", r))
        .chain(file.map(|f| Input::at("--adapters-file", f)))
        .collect()
}

/// References from the command line followed by those in --adapters-file;
/// possibly none.
pub fn adapter_refs_opt(given: &[String], file: Option<&Path>) -> Result<Vec<String>> {
    let mut refs = given.to_vec();
    if let Some(f) = file {
        refs.extend(source::read_adapters_file(f)?);
    }
    Ok(refs)
}

/// References from the command line followed by those in --adapters-file.
pub fn adapter_refs(given: &[String], file: Option<&Path>) -> Result<Vec<String>> {
    let refs = adapter_refs_opt(given, file)?;
    if refs.is_empty() {
        return Err(Error::Usage(
            "no adapters given; pass --adapters A B ... or --adapters-file FILE".into(),
        ));
    }
    Ok(refs)
}

/// The layout `--format` forces, or None to detect each file's.
pub fn input_format(arg: &InputFormat) -> Option<Format> {
    match arg.format {
        FormatArg::Auto => None,
        FormatArg::Peft => Some(Format::Peft),
        FormatArg::Kohya => Some(Format::Kohya),
        FormatArg::Diffusers => Some(Format::Diffusers),
    }
}
