//! `lora-merge eval`, and the losses and embeddings it shares with `fit`.

use std::collections::BTreeMap;

use lora_merge::adapter::AdapterSet;
use lora_merge::cli::{EvalArgs, HeadArg, TaskArg};
use lora_merge::commands::{adapter_refs_opt, print_json, progress};
use lora_merge::compose::merge::Weights;
use lora_merge::data::{self, LabelledText, Task};
use lora_merge::model::ModelDir;
use lora_merge::{Error, Result};
use serde::Serialize;
use tch::{Kind, Tensor};

use crate::engine::{accumulate, catching, device, device_name};
use crate::lora::Grouping;
use crate::model::Model;
use crate::tokenize::{pad, Tok};

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
    file: &std::path::Path,
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

/// Summed negative log-likelihood of the scored tokens of a batch, and how
/// many tokens that is. Differentiable with respect to `mix`.
pub fn causal_nll(model: &Model, batch: &[&Tokenized], mix: &[Tensor]) -> (Tensor, usize) {
    let seqs: Vec<&[i64]> = batch.iter().map(|t| t.ids.as_slice()).collect();
    let (ids, mask) = pad(&seqs, model.device);
    let t = ids.size()[1];
    // Position p predicts token p + 1: targets are ids[:, 1:].
    // Every example has at least two tokens (one scored), so t >= 2.
    let w = t as usize - 1;
    let mut scored = vec![0f32; batch.len() * w];
    let mut count = 0;
    for (r, ex) in batch.iter().enumerate() {
        for p in ex.scored..ex.ids.len() {
            scored[r * w + p - 1] = 1.0;
            count += 1;
        }
    }
    let weight = Tensor::from_slice(&scored)
        .view([batch.len() as i64, t - 1])
        .to_device(model.device);
    let logits = model.forward(&ids, &mask, mix);
    let logp = logits
        .narrow(1, 0, t - 1)
        .log_softmax(-1, accumulate(logits.kind()));
    let target = ids.narrow(1, 1, t - 1).unsqueeze(-1);
    let nll = -logp.gather(2, &target, false).squeeze_dim(-1);
    ((nll * weight).sum(Kind::Double), count)
}

/// Embeddings [n, H] of `texts`, in batches.
pub fn embed_texts(
    model: &Model,
    tok: &Tok,
    texts: &[&str],
    batch_size: usize,
    mix: &[Tensor],
    bar: &indicatif::ProgressBar,
) -> Result<Tensor> {
    let mut out = Vec::new();
    for chunk in texts.chunks(batch_size) {
        let ids: Vec<Vec<i64>> = chunk
            .iter()
            .map(|t| tok.encode(t, true))
            .collect::<Result<_>>()?;
        let seqs: Vec<&[i64]> = ids.iter().map(Vec::as_slice).collect();
        let (ids, mask) = pad(&seqs, model.device);
        out.push(model.embed(&ids, &mask, mix));
        bar.inc(1);
    }
    Ok(Tensor::cat(&out, 0))
}

/// Class prototypes [labels, H]: the mean support embedding of each label,
/// unit length. `labels` are the sorted distinct labels.
pub fn prototypes(emb: &Tensor, support: &[LabelledText], labels: &[String]) -> Tensor {
    let rows: Vec<Tensor> = labels
        .iter()
        .map(|l| {
            let idx: Vec<i64> = support
                .iter()
                .enumerate()
                .filter(|(_, s)| &s.label == l)
                .map(|(i, _)| i as i64)
                .collect();
            let idx = Tensor::from_slice(&idx).to_device(emb.device());
            emb.index_select(0, &idx).mean_dim(0, false, None)
        })
        .collect();
    let p = Tensor::stack(&rows, 0);
    let n = p.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12);
    p / n
}

#[derive(Serialize)]
struct CausalReport {
    task: &'static str,
    loss: f64,
    perplexity: f64,
    examples: usize,
    tokens: usize,
}

#[derive(Serialize)]
struct ClassifyReport {
    task: &'static str,
    accuracy: f64,
    examples: usize,
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

/// Sorted distinct labels.
pub fn label_set(examples: &[LabelledText]) -> Vec<String> {
    examples
        .iter()
        .map(|s| s.label.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

pub fn run(args: &EvalArgs) -> Result<()> {
    let dir = ModelDir::open_ref(&args.base)?;
    let task = resolve_task(&dir, args.task)?;
    if args.batch_size == 0 {
        return Err(Error::Usage("--batch-size must be at least 1".into()));
    }
    let refs = adapter_refs_opt(&args.adapters, args.adapters_file.as_deref())?;
    if refs.is_empty() && !args.weights.is_empty() {
        return Err(Error::Usage("--weights needs --adapters".into()));
    }
    let set = if refs.is_empty() {
        None
    } else {
        let set = AdapterSet::load(&refs)?;
        set.check(false, true)?;
        Some(set)
    };
    let weights = match &set {
        Some(s) => Weights::uniform(s.adapters.len(), &args.weights)?.global,
        None => Vec::new(),
    };
    let dev = device(args.device)?;
    let max_len = args.max_length.unwrap_or(usize::MAX);
    let _guard = tch::no_grad_guard();
    let model = Model::load(&dir, set.as_ref(), Grouping::Global, Kind::Float, dev)?;
    let max_len = max_len.min(dir.arch.max_positions());
    let mix: Vec<Tensor> = if weights.is_empty() {
        Vec::new()
    } else {
        vec![Tensor::from_slice(&weights)
            .to_kind(model.kind)
            .to_device(dev)]
    };
    let what = match &set {
        None => "the base model".to_string(),
        Some(s) => format!("{} composed adapter(s)", s.adapters.len()),
    };
    eprintln!(
        "eval: {} ({}) with {what} on {}",
        dir.dir.display(),
        dir.arch.name(),
        device_name(dev)
    );
    let mut tok = Tok::load(&dir.tokenizer)?;
    match task {
        Task::CausalLm => {
            if args.support.is_some() {
                return Err(Error::Usage("--support is for --task classify".into()));
            }
            let examples = data::read_causal(&args.data)?;
            let toks = tokenize_causal(&tok, &examples, max_len, &args.data)?;
            let bar = progress(toks.len().div_ceil(args.batch_size) as u64, "eval");
            let (total, tokens) = catching(|| {
                let mut total = 0f64;
                let mut tokens = 0usize;
                for chunk in toks.chunks(args.batch_size) {
                    let batch: Vec<&Tokenized> = chunk.iter().collect();
                    let (nll, n) = causal_nll(&model, &batch, &mix);
                    total += nll.double_value(&[]);
                    tokens += n;
                    bar.inc(1);
                }
                Ok((total, tokens))
            })?;
            bar.finish_and_clear();
            let loss = total / tokens as f64;
            let report = CausalReport {
                task: task.name(),
                loss,
                perplexity: loss.exp(),
                examples: toks.len(),
                tokens,
            };
            if args.json {
                print_json(&report)?;
            } else {
                println!(
                    "loss {:.6}  perplexity {:.4}  ({} examples, {} completion tokens)",
                    report.loss, report.perplexity, report.examples, report.tokens
                );
            }
        }
        Task::Classify => {
            let support_path = args.support.as_deref().ok_or_else(|| {
                Error::Usage(
                    "--task classify needs --support FILE: labelled examples that make the \
                     class prototypes"
                        .into(),
                )
            })?;
            if max_len != usize::MAX {
                tok.truncate_at(max_len)?;
            }
            let support = data::read_labelled(support_path)?;
            let test = data::read_labelled(&args.data)?;
            let labels = label_set(&support);
            let index: BTreeMap<&str, i64> = labels
                .iter()
                .enumerate()
                .map(|(i, l)| (l.as_str(), i as i64))
                .collect();
            let truth: Vec<i64> = test
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    index.get(t.label.as_str()).copied().ok_or_else(|| {
                        Error::invalid(
                            &args.data,
                            format!(
                                "example {}: label {:?} has no examples in --support {} \
                                 (its labels: {})",
                                i + 1,
                                t.label,
                                support_path.display(),
                                labels.join(", ")
                            ),
                        )
                    })
                })
                .collect::<Result<_>>()?;
            let batches =
                support.len().div_ceil(args.batch_size) + test.len().div_ceil(args.batch_size);
            let bar = progress(batches as u64, "eval");
            let accuracy = catching(|| {
                let s_texts: Vec<&str> = support.iter().map(|s| s.text.as_str()).collect();
                let t_texts: Vec<&str> = test.iter().map(|s| s.text.as_str()).collect();
                let s_emb = embed_texts(&model, &tok, &s_texts, args.batch_size, &mix, &bar)?;
                let t_emb = embed_texts(&model, &tok, &t_texts, args.batch_size, &mix, &bar)?;
                let protos = prototypes(&s_emb, &support, &labels);
                let pred = t_emb
                    .matmul(&protos.tr())
                    .argmax(-1, false)
                    .to_device(tch::Device::Cpu);
                let pred: Vec<i64> = Vec::<i64>::try_from(&pred).map_err(crate::engine::tch_err)?;
                let right = pred.iter().zip(&truth).filter(|(p, t)| p == t).count();
                Ok(right as f64 / truth.len() as f64)
            })?;
            bar.finish_and_clear();
            let report = ClassifyReport {
                task: task.name(),
                accuracy,
                examples: test.len(),
            };
            if args.json {
                print_json(&report)?;
            } else {
                println!(
                    "accuracy {:.4}  ({} examples, {} classes, nearest prototype by cosine)",
                    report.accuracy,
                    report.examples,
                    labels.len()
                );
            }
        }
    }
    Ok(())
}
