//! `lora-merge eval`: the base model, alone or with adapters composed in,
//! measured on labelled data.

use std::collections::BTreeMap;

use lora_merge::adapter::AdapterSet;
use lora_merge::checkpoint::ModelDir;
use lora_merge::cli::EvalArgs;
use lora_merge::compose::merge::Weights;
use lora_merge::data::{self, Task};
use lora_merge::settings::adapter_refs_opt;
use lora_merge::ui::{print_json, progress};
use lora_merge::{Error, Result};
use serde::Serialize;
use tch::{Kind, Tensor};

use crate::engine::lora::Grouping;
use crate::engine::tokenize::Tok;
use crate::engine::{catching, device, device_name, tch_err, Model};
use crate::training::data::{label_set, tokenize_causal};
use crate::training::losses::{causal_nll, class_means, embed_texts};
use crate::training::{resolve_task, Tokenized};

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
    if args.max_length == Some(0) {
        return Err(Error::Usage("--max-length must be at least 1".into()));
    }
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
    lora_merge::ui::note(&format!(
        "eval: {} ({}) with {what} on {}",
        dir.dir.display(),
        dir.arch.name(),
        device_name(dev)
    ));
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
            if !loss.is_finite() {
                return Err(not_finite());
            }
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
                lora_merge::outln!(
                    "loss {:.6}  perplexity {:.4}  ({} examples, {} completion tokens)",
                    report.loss,
                    report.perplexity,
                    report.examples,
                    report.tokens
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
                for e in [&s_emb, &t_emb] {
                    if !bool::try_from(e.isfinite().all()).map_err(tch_err)? {
                        return Err(not_finite());
                    }
                }
                let s_y: Vec<i64> = support.iter().map(|s| index[s.label.as_str()]).collect();
                let protos = class_means(
                    &s_emb,
                    &Tensor::from_slice(&s_y).to_device(s_emb.device()),
                    labels.len() as i64,
                );
                let pred = t_emb
                    .matmul(&protos.tr())
                    .argmax(-1, false)
                    .to_device(tch::Device::Cpu);
                let pred: Vec<i64> = Vec::<i64>::try_from(&pred).map_err(tch_err)?;
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
                lora_merge::outln!(
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

/// The model's outputs held NaN or infinities: no score is reported.
fn not_finite() -> Error {
    Error::Incompatible(
        "the composed model's outputs are not finite (NaN or infinite), so no score is \
         reported: an adapter holds non-finite values or the weights overflow; check the \
         adapters with lora-merge inspect and use smaller --weights"
            .into(),
    )
}
