//! Parsed arguments become validated settings here, once, so that the same
//! option means the same thing in every command (`uniform` and `fit` share
//! [`MergeSettings`]; every writing command shares [`OutputSettings`]).

use std::path::{Path, PathBuf};

use crate::adapter::{AdapterSet, Format};
use crate::cli::{
    DTypeArg, FormatArg, InputFormat, MajoritySignArg, MergeArgs, MethodArg, OutputArgs, RankArg,
};
use crate::compose::merge::{MajoritySign, Method, Target};
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
    /// `seed` is the seed the command was given for DARE, if any (`uniform
    /// --seed`; `fit` passes its own --seed when the method is DARE).
    pub fn from_args(a: &MergeArgs, seed: Option<u64>) -> Result<MergeSettings> {
        Ok(MergeSettings {
            method: method(a, seed)?,
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

/// The materializer the flags ask for. Every flag a method would ignore is
/// refused rather than silently dropped.
fn method(a: &MergeArgs, seed: Option<u64>) -> Result<Method> {
    let name = a.method.name();
    let takes_rank = a.method == MethodArg::Svd || a.method.prunes();
    let refuse = |flag: &str, which: &str| {
        Err(Error::Usage(format!(
            "{flag} only applies to --method {which} (got --method {name})"
        )))
    };
    if !takes_rank {
        if a.rank.is_some() {
            return refuse(
                "--rank",
                "svd, ties, dare-linear, dare-ties or magnitude-prune",
            );
        }
        if a.conv_rank.is_some() {
            return refuse(
                "--conv-rank",
                "svd, ties, dare-linear, dare-ties or magnitude-prune",
            );
        }
    }
    if !a.method.prunes() && a.density.is_some() {
        return refuse(
            "--density",
            "ties, dare-linear, dare-ties or magnitude-prune",
        );
    }
    if !a.method.elects_sign() && a.majority_sign.is_some() {
        return refuse("--majority-sign", "ties or dare-ties");
    }
    if !a.method.is_random() && seed.is_some() {
        return refuse("--seed", "dare-linear or dare-ties");
    }
    let auto = a.rank == Some(RankArg::Auto);
    if !auto {
        for (flag, given) in [
            ("--energy", a.energy.is_some()),
            ("--tolerance", a.tolerance.is_some()),
            ("--max-rank", a.max_rank.is_some()),
        ] {
            if given {
                return Err(Error::Usage(format!(
                    "{flag} only applies with --rank auto (each module's rank chosen from \
                     its spectrum)"
                )));
            }
        }
    }
    let target = if auto {
        match (a.energy, a.tolerance) {
            (Some(_), Some(_)) => {
                return Err(Error::Usage(
                    "--rank auto takes --energy or --tolerance, not both".into(),
                ))
            }
            (None, None) => {
                return Err(Error::Usage(
                    "--rank auto needs a target: --energy F (the smallest rank keeping that \
                     fraction of each module's squared norm, e.g. 0.9) or --tolerance F (the \
                     smallest rank with at most that relative error, e.g. 0.1)"
                        .into(),
                ))
            }
            (Some(e), None) if !(e > 0.0 && e <= 1.0) => {
                return Err(Error::Usage(format!(
                    "--energy must be in (0, 1] (the fraction of each module's squared norm \
                     kept), got {e}"
                )))
            }
            (None, Some(t)) if !(0.0..1.0).contains(&t) => {
                return Err(Error::Usage(format!(
                    "--tolerance must be in [0, 1) (the largest relative error), got {t}"
                )))
            }
            (Some(e), None) => Some(Target::Energy(e)),
            (None, Some(t)) => Some(Target::Tolerance(t)),
        }
    } else {
        None
    };
    if a.max_rank == Some(0) {
        return Err(Error::Usage("--max-rank must be at least 1".into()));
    }
    let rank_n = match a.rank {
        Some(RankArg::Fixed(n)) => Some(n),
        Some(RankArg::Auto) => Some(a.max_rank.unwrap_or(usize::MAX)),
        None => None,
    };
    let rank = if takes_rank {
        match (rank_n, a.conv_rank) {
            (None, _) => {
                return Err(Error::Usage(format!(
                    "--method {name} needs --rank N (the output rank per module{}), or \
                     --rank auto with --energy or --tolerance",
                    if a.method.prunes() {
                        "; the pruned merge is dense, and its best rank-N approximation \
                         is written. PEFT's *_svd merges default to the largest input rank"
                    } else {
                        ""
                    }
                )))
            }
            (Some(0), _) => return Err(Error::Usage("--rank must be at least 1".into())),
            (_, Some(0)) => return Err(Error::Usage("--conv-rank must be at least 1".into())),
            (Some(rank), conv_rank) => Some((rank, conv_rank)),
        }
    } else {
        None
    };
    let density = if a.method.prunes() {
        match a.density {
            None => {
                return Err(Error::Usage(format!(
                    "--method {name} needs --density F, the fraction of each delta's entries \
                     kept, in (0, 1] (the TIES paper uses 0.2)"
                )))
            }
            Some(d) if !(d > 0.0 && d <= 1.0) => {
                return Err(Error::Usage(format!(
                    "--density must be in (0, 1] (the fraction of entries kept), got {d}"
                )))
            }
            Some(d) => d,
        }
    } else {
        0.0
    };
    let majority_sign = match a.majority_sign {
        None | Some(MajoritySignArg::Total) => MajoritySign::Total,
        Some(MajoritySignArg::Frequency) => MajoritySign::Frequency,
    };
    let seed = seed.unwrap_or(crate::compose::merge::DEFAULT_SEED);
    Ok(match (a.method, rank) {
        (MethodArg::Exact, _) => Method::Exact,
        (MethodArg::Linear, _) => Method::Linear,
        (MethodArg::Svd, Some((rank, conv_rank))) => Method::Svd {
            rank,
            conv_rank,
            target,
        },
        (MethodArg::Ties, Some((rank, conv_rank))) => Method::Ties {
            rank,
            conv_rank,
            target,
            density,
            majority_sign,
        },
        (MethodArg::DareLinear, Some((rank, conv_rank))) => Method::DareLinear {
            rank,
            conv_rank,
            target,
            density,
            seed,
        },
        (MethodArg::DareTies, Some((rank, conv_rank))) => Method::DareTies {
            rank,
            conv_rank,
            target,
            density,
            majority_sign,
            seed,
        },
        (MethodArg::MagnitudePrune, Some((rank, conv_rank))) => Method::MagnitudePrune {
            rank,
            conv_rank,
            target,
            density,
        },
        (m, None) => {
            return Err(Error::Internal(format!(
                "--method {} without a rank",
                m.name()
            )))
        }
    })
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
