//! `lora-merge fit`: learn composition weights on a few labelled examples,
//! then merge them exactly as `uniform` does (one materializer, one writer,
//! one manifest format).
//!
//! Per group g (module, layer or whole model) the weights are
//! softmax(v_g) over the N adapters, with v_g = 0 at step 0, so step 0 is
//! the uniform merge. A true softmax: the authors' code detaches its
//! denominator, which gives wrong gradients.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use lora_merge::adapter::{AdapterSet, DType};
use lora_merge::cli::{FitArgs, GranularityArg, HeadArg};
use lora_merge::commands::uniform::{parse_method, write_merge, FitExtras, MergeRecord};
use lora_merge::commands::{adapter_refs, print_json, progress};
use lora_merge::compose::merge::{self, Weights};
use lora_merge::data::{self, LabelledText, Task};
use lora_merge::output::{atomic, heatmap, safetensors as st_out};
use lora_merge::{Error, Result};
use serde_json::json;
use tch::{nn, nn::OptimizerConfig, Kind, Tensor};

use crate::engine::{catching, device, device_name, tch_err};
use crate::eval::{causal_nll, label_set, open_base, tokenize_causal, Tokenized};
use crate::lora::{canonical, group_key, Grouping};
use crate::model::Model;
use crate::tokenize::{pad, Tok};

/// Cosine similarities are multiplied by this before the softmax of the
/// classification losses (a temperature of 0.1): plain cosines in [-1, 1]
/// give near-uniform class probabilities and weak gradients. The linear
/// head starts at this multiple of the prototypes, so the two heads agree
/// at step 0.
pub(crate) const PROTO_SCALE: f64 = 10.0;

/// splitmix64: the split and batch order depend on the seed alone, not on
/// libtorch's generator or version.
pub(crate) struct Rng(pub u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub(crate) fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// Held-out indices: causal-lm none below 4 shots, else round(n * f), at
/// least 1 and leaving at least 1 for training.
fn split_plain(n: usize, frac: f64, rng: &mut Rng) -> (Vec<usize>, Vec<usize>) {
    let mut idx: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut idx);
    let n_val = if n < 4 || frac <= 0.0 {
        0
    } else {
        ((n as f64 * frac).round() as usize).clamp(1, n - 1)
    };
    let val = idx[..n_val].to_vec();
    let mut train = idx[n_val..].to_vec();
    train.sort_unstable();
    let mut val = val;
    val.sort_unstable();
    (train, val)
}

/// Per class: floor(k * f) held out, always leaving one training shot.
fn split_stratified(labels: &[String], frac: f64, rng: &mut Rng) -> (Vec<usize>, Vec<usize>) {
    let mut by_label: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, l) in labels.iter().enumerate() {
        by_label.entry(l).or_default().push(i);
    }
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (_, mut idx) in by_label {
        rng.shuffle(&mut idx);
        let k = idx.len();
        let n_val = ((k as f64 * frac.max(0.0)).floor() as usize).min(k - 1);
        val.extend_from_slice(&idx[..n_val]);
        train.extend_from_slice(&idx[n_val..]);
    }
    train.sort_unstable();
    val.sort_unstable();
    (train, val)
}

/// The shots, tokenized once.
pub(crate) enum Shots {
    Causal(Vec<Tokenized>),
    Classify {
        ids: Vec<Vec<i64>>,
        y: Vec<i64>,
        labels: Vec<String>,
    },
}

/// The trainable linear head of `--head linear`.
pub(crate) struct Head {
    pub _vs: nn::VarStore,
    pub w: Tensor,
    pub b: Tensor,
    pub opt: nn::Optimizer,
}

pub(crate) struct Trainer<'a> {
    pub model: &'a Model,
    pub shots: Shots,
    pub head: Option<Head>,
}

/// Read and tokenize the examples of `task` from `path`.
pub(crate) fn load_shots(
    task: Task,
    path: &std::path::Path,
    tok: &mut Tok,
    max_len: usize,
) -> Result<Shots> {
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
                        labels[0]
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

impl Shots {
    pub(crate) fn len(&self) -> usize {
        match self {
            Shots::Causal(t) => t.len(),
            Shots::Classify { ids, .. } => ids.len(),
        }
    }

    pub(crate) fn labels(&self) -> Vec<String> {
        match self {
            Shots::Classify { labels, .. } => labels.clone(),
            Shots::Causal(_) => Vec::new(),
        }
    }
}

/// A linear head started at PROTO_SCALE x the class prototypes of `train`
/// (so it first classifies exactly as the prototypes do), with its own Adam.
pub(crate) fn new_head(
    trainer: &Trainer,
    train: &[usize],
    mix: &[Tensor],
    batch: usize,
    lr: f64,
) -> Result<Head> {
    let protos = {
        let _ng = tch::no_grad_guard();
        let emb = Tensor::cat(
            &train
                .chunks(batch)
                .map(|c| trainer.embed(c, mix))
                .collect::<Vec<_>>(),
            0,
        );
        class_means(&emb, &trainer.labels_of(train), trainer.n_classes()) * PROTO_SCALE
    };
    let hvs = nn::VarStore::new(trainer.model.device);
    let w = hvs.root().var_copy("weight", &protos);
    let b = hvs.root().zeros("bias", &[trainer.n_classes()]);
    let opt = nn::Adam::default().build(&hvs, lr).map_err(tch_err)?;
    Ok(Head {
        _vs: hvs,
        w,
        b,
        opt,
    })
}

/// head.safetensors (weight [C, H], bias [C]) and labels.json.
pub(crate) fn head_files(
    labels: &[String],
    hidden: usize,
    hw: &[f32],
    hb: &[f32],
) -> Result<Vec<(String, Vec<u8>)>> {
    let mut t = BTreeMap::new();
    t.insert(
        "weight".to_string(),
        st_out::OutTensor {
            dtype: DType::F32,
            shape: vec![labels.len(), hidden],
            values: hw.into(),
        },
    );
    t.insert(
        "bias".to_string(),
        st_out::OutTensor {
            dtype: DType::F32,
            shape: vec![labels.len()],
            values: hb.into(),
        },
    );
    let mut bytes = Vec::new();
    st_out::write(
        &mut bytes,
        &t,
        &BTreeMap::from([("format".to_string(), "pt".to_string())]),
    )
    .map_err(|e| Error::Internal(e.to_string()))?;
    let meta = json!({
        "labels": labels,
        "pooling": "mean over tokens, then L2 normalise",
        "logits": "embedding @ weight.T + bias",
    });
    Ok(vec![
        ("head.safetensors".into(), bytes),
        (
            "labels.json".into(),
            (serde_json::to_string_pretty(&meta).unwrap_or_default() + "\n").into_bytes(),
        ),
    ])
}

/// The step kept so far: its score, number, logits and head.
type Best = (f64, usize, Tensor, Option<(Tensor, Tensor)>);

/// One point of the loss curve.
#[derive(Clone, serde::Serialize)]
pub(crate) struct Point {
    pub step: usize,
    pub train_loss: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_accuracy: Option<f64>,
}

impl Trainer<'_> {
    fn batch_ids(&self, idx: &[usize]) -> (Tensor, Tensor) {
        let Shots::Classify { ids, .. } = &self.shots else {
            unreachable!("classification batches only")
        };
        let seqs: Vec<&[i64]> = idx.iter().map(|&i| ids[i].as_slice()).collect();
        pad(&seqs, self.model.device)
    }

    pub(crate) fn labels_of(&self, idx: &[usize]) -> Tensor {
        let Shots::Classify { y, .. } = &self.shots else {
            unreachable!("classification batches only")
        };
        let v: Vec<i64> = idx.iter().map(|&i| y[i]).collect();
        Tensor::from_slice(&v).to_device(self.model.device)
    }

    pub(crate) fn n_classes(&self) -> i64 {
        match &self.shots {
            Shots::Classify { labels, .. } => labels.len() as i64,
            Shots::Causal(_) => 0,
        }
    }

    pub(crate) fn embed(&self, idx: &[usize], mix: &[Tensor]) -> Tensor {
        let (ids, mask) = self.batch_ids(idx);
        self.model.embed(&ids, &mask, mix)
    }

    /// Training loss on `idx` (differentiable).
    pub(crate) fn train_loss(&self, idx: &[usize], mix: &[Tensor]) -> Tensor {
        match &self.shots {
            Shots::Causal(toks) => {
                let batch: Vec<&Tokenized> = idx.iter().map(|&i| &toks[i]).collect();
                let (nll, n) = causal_nll(self.model, &batch, mix);
                nll / n as f64
            }
            Shots::Classify { .. } => {
                let emb = self.embed(idx, mix);
                let y = self.labels_of(idx);
                let scores = match &self.head {
                    Some(h) => emb.linear(&h.w, Some(&h.b)),
                    None => episodic_scores(&emb, &y, self.n_classes()) * PROTO_SCALE,
                };
                scores
                    .to_kind(Kind::Float)
                    .cross_entropy_for_logits(&y)
                    .to_kind(Kind::Double)
            }
        }
    }

    /// Loss (and accuracy) on held-out `val`, without gradients. For
    /// prototypes, the classes are the training shots' mean embeddings.
    fn val_loss(
        &self,
        train: &[usize],
        val: &[usize],
        mix: &[Tensor],
        batch: usize,
    ) -> (f64, Option<f64>) {
        let _g = tch::no_grad_guard();
        match &self.shots {
            Shots::Causal(toks) => {
                let (mut total, mut n) = (0.0, 0usize);
                for chunk in val.chunks(batch) {
                    let b: Vec<&Tokenized> = chunk.iter().map(|&i| &toks[i]).collect();
                    let (nll, k) = causal_nll(self.model, &b, mix);
                    total += nll.double_value(&[]);
                    n += k;
                }
                (total / n as f64, None)
            }
            Shots::Classify { .. } => {
                let embed_all = |idx: &[usize]| {
                    let parts: Vec<Tensor> =
                        idx.chunks(batch).map(|c| self.embed(c, mix)).collect();
                    Tensor::cat(&parts, 0)
                };
                let v_emb = embed_all(val);
                let scores = match &self.head {
                    Some(h) => v_emb.linear(&h.w, Some(&h.b)),
                    None => {
                        let protos = class_means(
                            &embed_all(train),
                            &self.labels_of(train),
                            self.n_classes(),
                        );
                        v_emb.matmul(&protos.tr()) * PROTO_SCALE
                    }
                };
                let y = self.labels_of(val);
                let loss = scores
                    .to_kind(Kind::Float)
                    .cross_entropy_for_logits(&y)
                    .double_value(&[]);
                let right = scores
                    .argmax(-1, false)
                    .eq_tensor(&y)
                    .sum(Kind::Int64)
                    .int64_value(&[]);
                (loss, Some(right as f64 / val.len() as f64))
            }
        }
    }
}

/// Unit-length mean embedding per class [C, H] (zero for a class absent
/// from `y`).
pub(crate) fn class_means(emb: &Tensor, y: &Tensor, classes: i64) -> Tensor {
    let onehot = y.one_hot(classes).to_kind(emb.kind());
    let sums = onehot.tr().matmul(emb);
    let norm = sums.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12);
    sums / norm
}

/// Cosine of each example to every class prototype, where its own class's
/// prototype leaves it out (when that class has another example in the
/// batch), so the loss cannot be lowered by an example matching itself.
/// Classes absent from the batch get a very low score.
fn episodic_scores(emb: &Tensor, y: &Tensor, classes: i64) -> Tensor {
    let kind = emb.kind();
    let onehot = y.one_hot(classes).to_kind(kind); // [B, C]
    let sums = onehot.tr().matmul(emb); // [C, H]
    let counts = onehot.sum_dim_intlist(0, false, None); // [C]
    let unit = |t: &Tensor| t / t.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12);
    let all = emb.matmul(&unit(&sums).tr()); // [B, C]
    let own_sum = sums.index_select(0, y); // [B, H]
    let own_count = counts.index_select(0, y); // [B]
    let alone = own_count.le(1.0).unsqueeze(-1);
    let loo = own_sum
        .shallow_clone()
        .where_self(&alone, &(&own_sum - emb));
    let own = (emb * unit(&loo)).sum_dim_intlist(-1, false, None); // [B]
    let scores = &all * (1.0 - &onehot) + own.unsqueeze(-1) * &onehot;
    let absent = counts.eq(0.0).unsqueeze(0);
    let floor = Tensor::full([1], -1e4, (kind, emb.device()));
    floor.where_self(&absent, &scores)
}

fn granularity(g: GranularityArg) -> Grouping {
    match g {
        GranularityArg::Module => Grouping::Module,
        GranularityArg::Layer => Grouping::Layer,
        GranularityArg::Global => Grouping::Global,
    }
}

/// Group names as the model will make them, from the adapters' module names
/// alone (for --dry-run, before anything is loaded).
fn planned_groups(set: &AdapterSet, g: Grouping) -> Vec<String> {
    let mut names: Vec<String> = set
        .adapters
        .iter()
        .flat_map(|a| a.modules.keys())
        .map(|m| group_key(g, canonical(m)))
        .collect();
    names.sort();
    names.dedup();
    names
}

pub(crate) fn sha256_file(path: &std::path::Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(lora_merge::output::sha256_hex(&bytes))
}

pub fn run(args: &FitArgs) -> Result<()> {
    let t0 = Instant::now();
    let refs = adapter_refs(&args.inputs.adapters, args.inputs.adapters_file.as_deref())?;
    let method = parse_method(args.method, args.rank, None)?;
    if args.steps == 0 && !args.dry_run {
        return Err(Error::Usage("--steps must be at least 1".into()));
    }
    if args.batch_size == 0 {
        return Err(Error::Usage("--batch-size must be at least 1".into()));
    }
    if !(0.0..1.0).contains(&args.val_fraction) {
        return Err(Error::Usage("--val-fraction must be in [0, 1)".into()));
    }
    if !(args.lr > 0.0 && args.lr.is_finite() && args.head_lr > 0.0 && args.head_lr.is_finite()) {
        return Err(Error::Usage(
            "--lr and --head-lr must be positive numbers".into(),
        ));
    }
    let (dir, task) = open_base(&args.base, args.task, args.head)?;
    // A bad output is refused before the adapters are read.
    let given_paths: Vec<PathBuf> = refs.iter().map(PathBuf::from).collect();
    if !args.dry_run {
        atomic::preflight(&args.output, args.force, &given_paths)?;
    }
    let set = AdapterSet::load(&refs)?;
    let input_files: Vec<PathBuf> = set
        .adapters
        .iter()
        .flat_map(|a| a.files.iter().map(|f| f.path.clone()))
        .collect();
    if !args.dry_run {
        atomic::preflight(&args.output, args.force, &input_files)?;
    }
    let report = set.check(false, false)?;
    let n = set.adapters.len();
    let grouping = granularity(args.granularity);

    // Shots, split, tokens.
    let mut tok = Tok::load(&dir.tokenizer)?;
    let model_max = dir.arch.max_positions();
    let max_len = args.max_length.unwrap_or(model_max).min(model_max);
    let mut rng = Rng(args.seed);
    let shots = load_shots(task, &args.shots, &mut tok, max_len)?;
    let count = shots.len();
    let (train, val) = match &shots {
        Shots::Causal(t) => split_plain(t.len(), args.val_fraction, &mut rng),
        Shots::Classify { y, labels, .. } => {
            let names: Vec<String> = y.iter().map(|&i| labels[i as usize].clone()).collect();
            split_stratified(&names, args.val_fraction, &mut rng)
        }
    };

    let groups_planned = planned_groups(&set, grouping);
    let classes = match &shots {
        Shots::Classify { labels, .. } => labels.len(),
        Shots::Causal(_) => 0,
    };
    let hidden = dir.arch.hidden_size();
    let head_params = if args.head == HeadArg::Linear {
        classes * hidden + classes
    } else {
        0
    };
    let trainable = groups_planned.len() * n + head_params;
    if args.dry_run {
        let factor_bytes: usize = set.adapters.iter().map(|a| a.parameter_count() * 4).sum();
        let model_bytes = dir.parameter_count() * 4;
        let longest = match &shots {
            Shots::Causal(t) => t.iter().map(|t| t.ids.len()).max().unwrap_or(0),
            Shots::Classify { ids, .. } => ids.iter().map(Vec::len).max().unwrap_or(0),
        };
        let layers = dir.arch.num_layers();
        // Activations kept for backward: roughly 24 hidden-sized tensors
        // per layer and token (attention, MLP, norms, LoRA branches).
        let act_bytes = args.batch_size.min(train.len()) * longest * hidden * layers * 24 * 4;
        let plan = json!({
            "base": {"path": dir.dir, "architecture": dir.arch.name(), "parameters": dir.parameter_count()},
            "task": task.name(),
            "adapters": set.adapters.iter().map(|a| json!({"given": a.given, "modules": a.modules.len(), "rank": a.config.r})).collect::<Vec<_>>(),
            "modules": report.modules.len(),
            "granularity": format!("{:?}", grouping).to_lowercase(),
            "groups": groups_planned.len(),
            "trainable_parameters": trainable,
            "shots": {"count": count, "train": train.len(), "validation": val.len()},
            "memory_estimate_bytes": model_bytes + factor_bytes + act_bytes,
            "memory_estimate": {"model": model_bytes, "adapter_factors": factor_bytes, "activations": act_bytes},
        });
        if args.json {
            print_json(&plan)?;
        } else {
            println!(
                "plan: fit {} adapters into {} ({})",
                n,
                dir.dir.display(),
                dir.arch.name()
            );
            println!(
                "  task {}, {} shots: {} train, {} held out",
                task.name(),
                count,
                train.len(),
                val.len()
            );
            println!(
                "  {} adapted modules, {} weight groups ({:?}), {} trainable parameters",
                report.modules.len(),
                groups_planned.len(),
                grouping,
                trainable
            );
            println!(
                "  memory: about {} (model {}, adapter factors {}, activations {})",
                lora_merge::commands::human_bytes((model_bytes + factor_bytes + act_bytes) as u64),
                lora_merge::commands::human_bytes(model_bytes as u64),
                lora_merge::commands::human_bytes(factor_bytes as u64),
                lora_merge::commands::human_bytes(act_bytes as u64)
            );
        }
        return Ok(());
    }
    if train.is_empty() {
        return Err(Error::invalid(
            &args.shots,
            "no training shots left after the split",
        ));
    }
    if val.is_empty() {
        eprintln!(
            "note: no held-out shots (too few for --val-fraction {}); the last step is kept",
            args.val_fraction
        );
    }

    let dev = device(args.device)?;
    tch::manual_seed(args.seed as i64);
    let model = Model::load(&dir, Some(&set), grouping, Kind::Float, dev)?;
    let g = model.groups.len();
    eprintln!(
        "fit: {n} adapters, {} modules in {g} weight groups, on {} ({} train / {} held-out shots)",
        model.module_groups.len(),
        device_name(dev),
        train.len(),
        val.len()
    );
    let t_train = Instant::now();
    let outcome = catching(|| {
        let vs = nn::VarStore::new(dev);
        let logits = vs.root().zeros("logits", &[g as i64, n as i64]);
        let mut opt = nn::Adam::default().build(&vs, args.lr).map_err(tch_err)?;
        let mut trainer = Trainer {
            model: &model,
            shots,
            head: None,
        };
        let mix_of = |l: &Tensor| -> Vec<Tensor> {
            let w = l.softmax(-1, Kind::Float);
            (0..g as i64).map(|i| w.get(i)).collect()
        };
        // The base model, no adapters, before any head exists: with a linear
        // head this is the prototype classifier over base embeddings (the
        // head's start).
        let base_val =
            (!val.is_empty()).then(|| trainer.val_loss(&train, &val, &[], args.batch_size));

        if args.head == HeadArg::Linear {
            let head = new_head(
                &trainer,
                &train,
                &mix_of(&logits),
                args.batch_size,
                args.head_lr,
            )?;
            trainer.head = Some(head);
        }

        let bar = progress(args.steps as u64 + 1, "fit");
        let mut order: Vec<usize> = train.clone();
        let mut cursor = order.len();
        let mut curve: Vec<Point> = Vec::new();
        let mut best: Option<Best> = None;
        for step in 0..=args.steps {
            let batch: Vec<usize> = if train.len() <= args.batch_size {
                train.clone()
            } else {
                if cursor + args.batch_size > order.len() {
                    rng.shuffle(&mut order);
                    cursor = 0;
                }
                cursor += args.batch_size;
                order[cursor - args.batch_size..cursor].to_vec()
            };
            let (val_loss, val_acc) = if val.is_empty() {
                (None, None)
            } else {
                let (l, a) = trainer.val_loss(&train, &val, &mix_of(&logits), args.batch_size);
                (Some(l), a)
            };
            let loss = trainer.train_loss(&batch, &mix_of(&logits));
            let train_loss = loss.double_value(&[]);
            if !train_loss.is_finite() {
                return Err(Error::Internal(format!(
                    "the training loss became {train_loss} at step {step}; try a smaller --lr"
                )));
            }
            curve.push(Point {
                step,
                train_loss,
                val_loss,
                val_accuracy: val_acc,
            });
            let score = val_loss.unwrap_or(f64::NEG_INFINITY);
            // Held out: the lowest validation loss, earliest on ties.
            // None held out: the last step.
            if best
                .as_ref()
                .is_none_or(|b| if val.is_empty() { true } else { score < b.0 })
            {
                let head = trainer.head.as_ref().map(|h| (h.w.copy(), h.b.copy()));
                best = Some((score, step, logits.copy(), head));
            }
            bar.set_message(format!("loss {train_loss:.4}"));
            bar.inc(1);
            if step < args.steps {
                opt.zero_grad();
                if let Some(h) = trainer.head.as_mut() {
                    h.opt.zero_grad();
                }
                loss.backward();
                opt.step();
                if let Some(h) = trainer.head.as_mut() {
                    h.opt.step();
                }
            }
        }
        bar.finish_and_clear();
        let (_, best_step, best_logits, best_head) =
            best.ok_or_else(|| Error::Internal("no step ran".into()))?;
        let w = best_logits
            .softmax(-1, Kind::Double)
            .to_device(tch::Device::Cpu);
        let weights: Vec<Vec<f64>> = (0..g as i64)
            .map(|i| Vec::<f64>::try_from(w.get(i)).map_err(tch_err))
            .collect::<Result<_>>()?;
        let head = match best_head {
            Some((hw, hb)) => Some((
                Vec::<f32>::try_from(
                    hw.to_kind(Kind::Float)
                        .to_device(tch::Device::Cpu)
                        .flatten(0, -1),
                )
                .map_err(tch_err)?,
                Vec::<f32>::try_from(hb.to_kind(Kind::Float).to_device(tch::Device::Cpu))
                    .map_err(tch_err)?,
            )),
            None => None,
        };
        let labels = match &trainer.shots {
            Shots::Classify { labels, .. } => labels.clone(),
            Shots::Causal(_) => Vec::new(),
        };
        Ok((curve, best_step, weights, head, base_val, labels))
    })?;
    let (curve, best_step, group_weights, head, base_val, labels) = outcome;
    let train_s = t_train.elapsed().as_secs_f64();

    // The learned weights, as the merge takes them.
    let mean: Vec<f64> = (0..n)
        .map(|i| group_weights.iter().map(|w| w[i]).sum::<f64>() / g as f64)
        .collect();
    let weights = Weights {
        global: mean.clone(),
        per_module: if grouping == Grouping::Global {
            BTreeMap::new()
        } else {
            model
                .module_groups
                .iter()
                .map(|(m, gi)| (m.clone(), group_weights[*gi].clone()))
                .collect()
        },
    };
    let group_names = model.groups.clone();
    drop(model);

    let bar = progress(report.modules.len() as u64, "merging");
    let t_merge = Instant::now();
    let modules = merge::merge(&set, &weights, method, &|| bar.inc(1))?;
    bar.finish_and_clear();
    let merge_s = t_merge.elapsed().as_secs_f64();

    let uniform = &curve[0];
    let learned = &curve[best_step];
    let adapter_names: Vec<String> = set.adapters.iter().map(|a| a.given.clone()).collect();
    let svg = heatmap::weights_svg(
        &format!(
            "lora-merge fit: learned weights ({} groups x {} adapters)",
            g, n
        ),
        &group_names,
        &adapter_names,
        &group_weights,
    );
    let mut files = vec![("weights.svg".to_string(), svg.into_bytes())];
    if let Some((hw, hb)) = &head {
        files.extend(head_files(&labels, hidden, hw, hb)?);
    }
    let fmt = |x: Option<f64>| x.map_or("n/a".to_string(), |v| format!("{v:.4}"));
    let card_section = format!(
        "## Learned composition\n\n\
         Weights learned by `lora-merge fit` on {count} shots ({} for training, {} held out; task \
         {}) over {} steps, {} weight groups ({} granularity). Held-out loss: base model {}, \
         uniform merge {}, learned {} (step {best_step}).\n\n\
         ![learned weights per group and adapter](weights.svg)\n\n\
         | adapter | mean weight | min | max |\n|---|---|---|---|\n{}",
        train.len(),
        val.len(),
        task.name(),
        args.steps,
        g,
        format!("{grouping:?}").to_lowercase(),
        fmt(base_val.map(|b| b.0)),
        fmt(uniform.val_loss),
        fmt(learned.val_loss),
        adapter_names
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let col = group_weights.iter().map(|w| w[i]);
                let min = col.clone().fold(f64::INFINITY, f64::min);
                let max = col.fold(f64::NEG_INFINITY, f64::max);
                format!(
                    "| `{}` | {:.4} | {:.4} | {:.4} |\n",
                    a.replace('|', "\\|"),
                    mean[i],
                    min,
                    max
                )
            })
            .collect::<String>()
    );
    let fit_record = json!({
        "task": task.name(),
        "shots": {
            "path": args.shots,
            "sha256": sha256_file(&args.shots)?,
            "count": count,
            "train": train,
            "validation": val,
            "indices": "0-based positions among the file's examples (non-blank lines)",
        },
        "hyper_parameters": {
            "steps": args.steps, "lr": args.lr, "head_lr": args.head_lr,
            "batch_size": args.batch_size, "val_fraction": args.val_fraction,
            "granularity": format!("{grouping:?}").to_lowercase(),
            "head": if task == Task::Classify { Some(format!("{:?}", args.head).to_lowercase()) } else { None },
            "prototype_scale": if task == Task::Classify { Some(PROTO_SCALE) } else { None },
            "max_length": max_len, "optimizer": "adam", "softmax": "true (not detached)",
        },
        "seed": args.seed,
        "device": device_name(dev),
        "threads": tch::get_num_threads(),
        "base_model": {"path": dir.dir, "hub": dir.hub, "architecture": dir.arch.name(), "files": dir.files},
        "loss_curve": curve,
        "best_step": best_step,
        "validation": {
            "base": base_val.map(|b| json!({"loss": b.0, "accuracy": b.1})),
            "uniform": {"loss": uniform.val_loss, "accuracy": uniform.val_accuracy},
            "learned": {"loss": learned.val_loss, "accuracy": learned.val_accuracy},
        },
        "groups": group_names
            .iter()
            .zip(&group_weights)
            .map(|(name, w)| json!({"group": name, "weights": w}))
            .collect::<Vec<_>>(),
        "train_seconds": train_s,
    });
    let dtype = set.common_dtype();
    let record = MergeRecord {
        set: &set,
        report: &report,
        weights: &weights,
        method,
        dtype,
        modules: &modules,
        timings: json!({"train_s": train_s, "merge_s": merge_s, "total_s": t0.elapsed().as_secs_f64()}),
        format: lora_merge::adapter::Format::Peft,
        fit: Some(FitExtras {
            pins: dir
                .hub
                .iter()
                .map(|h| (args.base.clone(), h.pinned.clone()))
                .collect(),
            manifest: fit_record,
            card_section,
            files,
        }),
    };
    let (out_dir, _written) = write_merge(&args.output, &record)?;

    if args.json {
        print_json(&json!({
            "output": out_dir,
            "task": task.name(),
            "device": device_name(dev),
            "adapters": adapter_names,
            "groups": g,
            "steps": args.steps,
            "best_step": best_step,
            "loss_curve": curve,
            "validation": {
                "base": base_val.map(|b| json!({"loss": b.0, "accuracy": b.1})),
                "uniform": {"loss": uniform.val_loss, "accuracy": uniform.val_accuracy},
                "learned": {"loss": learned.val_loss, "accuracy": learned.val_accuracy},
            },
            "weights_mean": mean,
            "train_seconds": train_s,
        }))?;
    } else {
        let acc = |a: Option<f64>| a.map(|a| format!(", accuracy {a:.4}")).unwrap_or_default();
        eprintln!("{}", curve_table(&curve, best_step));
        if let Some((l, a)) = base_val {
            eprintln!("held-out loss: base {l:.4}{}", acc(a));
        }
        eprintln!(
            "held-out loss: uniform {}{}  ->  learned {}{} (step {best_step} of {}; train loss {:.4} -> {:.4})",
            fmt(uniform.val_loss),
            acc(uniform.val_accuracy),
            fmt(learned.val_loss),
            acc(learned.val_accuracy),
            args.steps,
            uniform.train_loss,
            learned.train_loss
        );
        let shown: Vec<String> = adapter_names
            .iter()
            .zip(&mean)
            .map(|(a, w)| format!("{a}: {w:.3}"))
            .collect();
        eprintln!("mean learned weights: {}", shown.join(", "));
        eprintln!(
            "wrote {} (merged adapter, merge_manifest.json, README.md, weights.svg) in {:.1} s",
            out_dir.display(),
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// The loss curve as a small table: every step up to 25, else 20 steps
/// evenly spread plus the best one.
pub(crate) fn curve_table(curve: &[Point], best: usize) -> String {
    let last = curve.len().saturating_sub(1);
    let mut steps: Vec<usize> = if curve.len() <= 25 {
        (0..curve.len()).collect()
    } else {
        (0..20).map(|i| i * last / 19).collect()
    };
    steps.push(best);
    steps.sort_unstable();
    steps.dedup();
    let mut s = String::from("  step  train loss  held-out loss");
    for &i in &steps {
        let p = &curve[i];
        let v = p.val_loss.map_or("-".to_string(), |v| format!("{v:.4}"));
        let mark = if i == best { "  <- kept" } else { "" };
        s.push_str(&format!(
            "\n{:>6}  {:>10.4}  {:>13}{mark}",
            p.step, p.train_loss, v
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_are_seeded_and_keep_a_training_shot_per_class() {
        let labels: Vec<String> = ["a", "a", "a", "a", "b", "c", "c"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (train, val) = split_stratified(&labels, 0.5, &mut Rng(1));
        // a: floor(4 * 0.5) = 2; b: 1 shot, kept for training; c: 1.
        assert_eq!(val.len(), 3);
        assert_eq!(train.len() + val.len(), 7);
        for l in ["a", "b", "c"] {
            assert!(
                train.iter().any(|&i| labels[i] == l),
                "{l} has no training shot"
            );
        }
        assert_eq!(split_stratified(&labels, 0.5, &mut Rng(1)), (train, val));
        let (t, v) = split_plain(3, 0.25, &mut Rng(0));
        assert_eq!((t.len(), v.len()), (3, 0));
        let (t, v) = split_plain(10, 0.25, &mut Rng(0));
        assert_eq!((t.len(), v.len()), (7, 3));
    }

    #[test]
    fn episodic_scores_leave_the_example_out_of_its_own_prototype() {
        let emb = Tensor::from_slice(&[1.0f64, 0.0, 0.6, 0.8, 0.0, 1.0]).view([3, 2]);
        let y = Tensor::from_slice(&[0i64, 0, 1]);
        let s = episodic_scores(&emb, &y, 3);
        let v: Vec<f64> = Vec::try_from(s.flatten(0, -1)).unwrap();
        // Example 0's own prototype is example 1 alone: cos = 0.6.
        assert!((v[0] - 0.6).abs() < 1e-12);
        // Example 2 is alone in class 1: its prototype is itself.
        assert!((v[2 * 3 + 1] - 1.0).abs() < 1e-12);
        // Class 2 has no example in the batch.
        assert!(v[2] < -1e3 && v[5] < -1e3 && v[8] < -1e3);
    }
}
