//! Labelled examples as the model sees them: tokenized once, with the task
//! settled from the base model's architecture.

use std::path::Path;

use lora_merge::checkpoint::ModelDir;
use lora_merge::cli::{HeadArg, TaskArg};
use lora_merge::data::{self, LabelledText, Task};
use lora_merge::{Error, Result};

use crate::engine::tokenize::Tok;

/// A causal-LM example as tokens: the loss covers positions `scored..`.
pub struct Tokenized {
    pub ids: Vec<i64>,
    /// First token that is scored (the completion's first token, or 1 when
    /// the prompt is empty and nothing precedes it).
    pub scored: usize,
}

/// Prompt with the tokenizer's special tokens, completion without, as one
/// sequence. Errors name the data file and line.
pub fn tokenize_causal(
    tok: &Tok,
    examples: &[data::CausalExample],
    max_len: usize,
    file: &Path,
) -> Result<Vec<Tokenized>> {
    examples
        .iter()
        .enumerate()
        .map(|(i, ex)| {
            let mut ids = tok.encode(&ex.prompt, true)?;
            let scored = ids.len().max(1);
            ids.extend(tok.encode(&ex.completion, false)?);
            if ids.len() > max_len {
                return Err(Error::invalid(
                    file,
                    format!(
                        "example {}: {} tokens, more than --max-length {max_len}; shorten it \
                         or raise --max-length (up to the model's limit)",
                        i + 1,
                        ids.len()
                    ),
                ));
            }
            if ids.len() <= scored {
                return Err(Error::invalid(
                    file,
                    format!(
                        "example {}: the completion tokenizes to nothing to score",
                        i + 1
                    ),
                ));
            }
            Ok(Tokenized { ids, scored })
        })
        .collect()
}

/// The examples of a run, tokenized once.
pub enum Shots {
    Causal(Vec<Tokenized>),
    Classify {
        ids: Vec<Vec<i64>>,
        /// Index into `labels` of each example's label.
        y: Vec<i64>,
        /// Sorted distinct labels.
        labels: Vec<String>,
    },
}

impl Shots {
    pub fn len(&self) -> usize {
        match self {
            Shots::Causal(t) => t.len(),
            Shots::Classify { ids, .. } => ids.len(),
        }
    }

    pub fn labels(&self) -> Vec<String> {
        match self {
            Shots::Classify { labels, .. } => labels.clone(),
            Shots::Causal(_) => Vec::new(),
        }
    }

    /// The longest example in tokens.
    pub fn longest(&self) -> usize {
        match self {
            Shots::Causal(t) => t.iter().map(|t| t.ids.len()).max().unwrap_or(0),
            Shots::Classify { ids, .. } => ids.iter().map(Vec::len).max().unwrap_or(0),
        }
    }
}

/// Read and tokenize the examples of `task` from `path`.
pub fn load_shots(task: Task, path: &Path, tok: &mut Tok, max_len: usize) -> Result<Shots> {
    match task {
        Task::CausalLm => {
            let ex = data::read_causal(path)?;
            Ok(Shots::Causal(tokenize_causal(tok, &ex, max_len, path)?))
        }
        Task::Classify => {
            tok.truncate_at(max_len)?;
            let ex: Vec<LabelledText> = data::read_labelled(path)?;
            let labels = label_set(&ex);
            if labels.len() < 2 {
                return Err(Error::invalid(
                    path,
                    format!(
                        "one label ({}) only: classification needs at least two",
                        labels.first().map_or("none", String::as_str)
                    ),
                ));
            }
            let ids = ex
                .iter()
                .map(|e| tok.encode(&e.text, true))
                .collect::<Result<Vec<_>>>()?;
            let y = ex
                .iter()
                .map(|e| labels.iter().position(|l| *l == e.label).unwrap_or(0) as i64)
                .collect();
            Ok(Shots::Classify { ids, y, labels })
        }
    }
}

/// Sorted distinct labels.
pub fn label_set(examples: &[LabelledText]) -> Vec<String> {
    examples
        .iter()
        .map(|s| s.label.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Open `--base` and settle the task for `fit` and `train`, whose `--head`
/// only means something when classifying.
pub fn open_base(base: &str, task: Option<TaskArg>, head: HeadArg) -> Result<(ModelDir, Task)> {
    let dir = ModelDir::open_ref(base)?;
    let task = resolve_task(&dir, task)?;
    if task == Task::CausalLm && head != HeadArg::Prototype {
        return Err(Error::Usage("--head is for --task classify".into()));
    }
    Ok((dir, task))
}

/// The task asked for, or the one the architecture implies; a task the
/// architecture cannot do is refused.
pub fn resolve_task(dir: &ModelDir, task: Option<TaskArg>) -> Result<Task> {
    match (task, dir.arch.is_causal()) {
        (Some(TaskArg::CausalLm), false) => Err(Error::Usage(format!(
            "--task causal-lm needs a causal LM; {} is an encoder (use --task classify)",
            dir.arch.name()
        ))),
        (Some(TaskArg::Classify), true) => Err(Error::Usage(format!(
            "--task classify needs an encoder (BERT); {} is a causal LM (use --task causal-lm)",
            dir.arch.name()
        ))),
        (_, true) => Ok(Task::CausalLm),
        (_, false) => Ok(Task::Classify),
    }
}
