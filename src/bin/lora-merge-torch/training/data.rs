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

    /// Whether the episodic prototype loss on the examples `idx` can rank
    /// compositions: some class has two of them. With one example per class
    /// an example's own class prototype is the example itself, so the loss
    /// only pushes the examples apart and says nothing about the task.
    /// Causal-lm examples always can.
    pub fn has_positive_pair(&self, idx: &[usize]) -> bool {
        match self {
            Shots::Causal(_) => true,
            Shots::Classify { y, .. } => {
                let mut seen = std::collections::BTreeSet::new();
                idx.iter().any(|&i| !seen.insert(y[i]))
            }
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
            let (ex, dropped) = distinct_causal(data::read_causal(path)?);
            warn_dropped(path, dropped);
            Ok(Shots::Causal(tokenize_causal(tok, &ex, max_len, path)?))
        }
        Task::Classify => {
            tok.truncate_at(max_len)?;
            let (ex, dropped) = distinct_labelled(path, data::read_labelled(path)?)?;
            warn_dropped(path, dropped);
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

/// Each causal-LM example once (first occurrences, in file order), and how
/// many repeats were dropped: a repeated shot could land on both sides of the
/// held-out split, where it would be trained on and then "held out", and
/// make the held-out loss look better than it is. The same prompt with two
/// completions is two examples (a prompt may have several good answers).
fn distinct_causal(examples: Vec<data::CausalExample>) -> (Vec<data::CausalExample>, usize) {
    let total = examples.len();
    let mut seen = std::collections::HashSet::new();
    let kept: Vec<_> = examples
        .into_iter()
        .filter(|e| seen.insert((e.prompt.clone(), e.completion.clone())))
        .collect();
    let dropped = total - kept.len();
    (kept, dropped)
}

/// Each labelled example once, as [`distinct_causal`]; a text given two
/// different labels is refused, naming both lines, since it teaches the
/// model nothing but noise.
fn distinct_labelled(
    path: &Path,
    examples: Vec<LabelledText>,
) -> Result<(Vec<LabelledText>, usize)> {
    let total = examples.len();
    let mut first: std::collections::HashMap<String, (usize, String)> =
        std::collections::HashMap::new();
    let mut kept = Vec::new();
    for e in examples {
        match first.get(&e.text) {
            Some((_, label)) if *label == e.label => {}
            Some((line, label)) => {
                return Err(Error::invalid(
                    path,
                    format!(
                        "lines {line} and {} give the same text two labels ({} and {}); \
                         keep the line with the right label",
                        e.line,
                        serde_json::Value::from(label.as_str()),
                        serde_json::Value::from(e.label.as_str()),
                    ),
                ))
            }
            None => {
                first.insert(e.text.clone(), (e.line, e.label.clone()));
                kept.push(e);
            }
        }
    }
    let dropped = total - kept.len();
    Ok((kept, dropped))
}

/// One warning for all the repeats dropped from `path`.
fn warn_dropped(path: &Path, dropped: usize) {
    if dropped > 0 {
        lora_merge::ui::warn(&format!(
            "{}: {dropped} repeated example(s) (the same as an earlier line) used once, so that \
             none is both trained on and held out",
            path.display()
        ));
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

#[cfg(test)]
mod tests {
    use super::*;
    use lora_merge::data::CausalExample;

    fn shot(text: &str, label: &str, line: usize) -> LabelledText {
        LabelledText {
            text: text.into(),
            label: label.into(),
            line,
        }
    }

    #[test]
    fn repeated_shots_are_used_once() {
        let path = Path::new("shots.jsonl");
        let (kept, dropped) = distinct_labelled(
            path,
            vec![
                shot("a", "x", 1),
                shot("b", "y", 2),
                shot("a", "x", 4),
                shot("a", "x", 5),
                shot("c", "x", 6),
            ],
        )
        .unwrap();
        assert_eq!(dropped, 2);
        let lines: Vec<usize> = kept.iter().map(|e| e.line).collect();
        assert_eq!(lines, [1, 2, 6]);

        let ex = |p: &str, c: &str| CausalExample {
            prompt: p.into(),
            completion: c.into(),
        };
        let (kept, dropped) =
            distinct_causal(vec![ex("p", "a"), ex("p", "b"), ex("p", "a"), ex("q", "a")]);
        assert_eq!(dropped, 1);
        assert_eq!(kept, [ex("p", "a"), ex("p", "b"), ex("q", "a")]);
    }

    #[test]
    fn a_text_with_two_labels_is_refused_naming_both_lines() {
        let e = distinct_labelled(
            Path::new("shots.jsonl"),
            vec![shot("a", "x", 1), shot("b", "y", 2), shot("a", "y", 3)],
        )
        .unwrap_err()
        .to_string();
        for want in ["shots.jsonl", "lines 1 and 3", "\"x\" and \"y\""] {
            assert!(e.contains(want), "{e} lacks {want}");
        }
    }
}
