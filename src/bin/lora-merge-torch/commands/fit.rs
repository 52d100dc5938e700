//! `lora-merge fit`: learn composition weights on a few labelled examples,
//! then merge them exactly as `uniform` does (one materializer, one writer,
//! one manifest format).
//!
//! Per group g (module, layer or whole model) the weights are
//! softmax(v_g) over the N adapters, with v_g = 0 at step 0, so step 0 is
//! the uniform merge. A true softmax: the authors' code detaches its
//! denominator, which gives wrong gradients.

use std::collections::BTreeMap;
use std::time::Instant;

use lora_merge::adapter::{AdapterSet, CompatReport, Format};
use lora_merge::checkpoint::ModelDir;
use lora_merge::cli::{FitArgs, GranularityArg, HeadArg, OptimizerArg};
use lora_merge::compose::merge::{self, Weights};
use lora_merge::compose::weights_file::WeightRules;
use lora_merge::data::Task;
use lora_merge::output::describe::{self, Merge};
use lora_merge::output::guard::Input;
use lora_merge::output::manifest::{
    BaseModelRecord, DataRecord, FitHyperParameters, FitRecord, GroupWeights, LossPoint, Score,
    Validation,
};
use lora_merge::output::{heatmap, writer};
use lora_merge::rng::Rng;
use lora_merge::search;
use lora_merge::settings::{self, MergeSettings, OutputSettings};
use lora_merge::ui::{human_bytes, print_json, progress};
use lora_merge::{Error, Result};
use serde_json::json;
use tch::{nn, nn::OptimizerConfig, Kind, Tensor};

/// The learned weights, in `uniform --weights-file` format.
const WEIGHTS_FILE: &str = "weights.json";

use crate::engine::lora::{canonical, group_key, Grouping};
use crate::engine::tokenize::Tok;
use crate::engine::{catching, device, device_name, tch_err, to_f32, Model};
use crate::training::heads::{head_files, new_head};
use crate::training::steps::{self, curve_table, Objective, Plan};
use crate::training::{
    check_rate, check_steps, load_shots, open_base, split, Shots, Trainer, PROTO_SCALE,
};

/// The weight groups of a run: `--granularity` (default module); one for
/// the whole model with the gradient-free optimizer.
fn granularity(args: &FitArgs) -> Grouping {
    if args.optimizer == OptimizerArg::GradientFree {
        return Grouping::Global;
    }
    match args.granularity.unwrap_or(GranularityArg::Module) {
        GranularityArg::Module => Grouping::Module,
        GranularityArg::Layer => Grouping::Layer,
        GranularityArg::Global => Grouping::Global,
    }
}

/// LoraHub's search (Huang et al. 2023, `lorahub/algorithm.py`): weights in
/// [-1.5, 1.5], an L1 penalty of 0.05 x mean |w| added to the loss, 40
/// evaluations by default. The search starts from the uniform merge (LoraHub
/// starts from zero, the base model) so that its first point is the same
/// baseline as Adam's step 0, with LoraHub's step size of a sixth of the box.
const GF_BOUND: f64 = 1.5;
const GF_L1: f64 = 0.05;
const GF_BUDGET: usize = 40;
const GF_SIGMA: f64 = 2.0 * GF_BOUND / 6.0;

/// The evaluations of a gradient-free run.
fn budget(args: &FitArgs) -> usize {
    args.budget.unwrap_or(GF_BUDGET)
}

/// How the weights were learned, for the card and the report.
fn schedule(args: &FitArgs) -> String {
    match args.optimizer {
        OptimizerArg::Adam => format!("{} Adam steps", args.steps),
        OptimizerArg::GradientFree => format!(
            "a gradient-free search (CMA-ES, LoraHub's recipe) of {} evaluations",
            budget(args)
        ),
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

/// The composition logits, the head, and the step kept.
struct Composition<'a> {
    trainer: Trainer<'a>,
    logits: Tensor,
    opt: nn::Optimizer,
    train: &'a [usize],
    val: &'a [usize],
    batch: usize,
    kept: Option<(Tensor, Option<(Tensor, Tensor)>)>,
}

impl Composition<'_> {
    fn mix(&self) -> Vec<Tensor> {
        let w = self.logits.softmax(-1, Kind::Float);
        (0..w.size()[0]).map(|i| w.get(i)).collect()
    }
}

impl Objective for Composition<'_> {
    fn loss(&mut self, batch: &[usize]) -> Tensor {
        self.trainer.train_loss(batch, &self.mix())
    }
    fn held_out(&mut self) -> Option<(f64, Option<f64>)> {
        (!self.val.is_empty()).then(|| {
            self.trainer
                .val_loss(self.train, self.val, &self.mix(), self.batch)
        })
    }
    fn keep(&mut self, _step: usize) {
        let head = self.trainer.head.as_ref().map(|h| (h.w.copy(), h.b.copy()));
        self.kept = Some((self.logits.copy(), head));
    }
    fn step(&mut self, loss: &Tensor) {
        self.trainer.apply(loss, &mut self.opt);
    }
}

/// Flags that can be refused before anything is read.
fn check_flags(args: &FitArgs) -> Result<()> {
    if !args.dry_run || args.steps != 0 {
        check_steps(args.steps)?;
    }
    if args.max_length == Some(0) {
        return Err(Error::Usage("--max-length must be at least 1".into()));
    }
    if args.batch_size == 0 {
        return Err(Error::Usage("--batch-size must be at least 1".into()));
    }
    if !(0.0..1.0).contains(&args.val_fraction) {
        return Err(Error::Usage("--val-fraction must be in [0, 1)".into()));
    }
    check_rate("--lr", args.lr)?;
    check_rate("--head-lr", args.head_lr)?;
    match args.optimizer {
        OptimizerArg::Adam => {
            if args.budget.is_some() {
                return Err(Error::Usage(
                    "--budget counts the evaluations of --optimizer gradient-free; Adam runs \
                     --steps steps"
                        .into(),
                ));
            }
        }
        OptimizerArg::GradientFree => {
            if let Some(g @ (GranularityArg::Module | GranularityArg::Layer)) = args.granularity {
                return Err(Error::Usage(format!(
                    "--granularity {}: --optimizer gradient-free learns one weight per adapter \
                     for the whole model (as LoraHub); use --optimizer adam for per-{} weights",
                    format!("{g:?}").to_lowercase(),
                    format!("{g:?}").to_lowercase()
                )));
            }
            if args.head == HeadArg::Linear {
                return Err(Error::Usage(
                    "--head linear is trained by gradient steps; use --optimizer adam with it"
                        .into(),
                ));
            }
            if !(1..=MAX_BUDGET).contains(&budget(args)) {
                return Err(Error::Usage(format!(
                    "--budget {}: use 1 to {MAX_BUDGET} evaluations (LoraHub uses 40)",
                    budget(args)
                )));
            }
        }
    }
    Ok(())
}

/// The most evaluations a gradient-free run may make: each is a point of the
/// curve in the manifest.
const MAX_BUDGET: usize = 100_000;

/// Everything a fit reads, checked against OUT as given and as resolved.
struct Inputs {
    dir: ModelDir,
    task: Task,
    set: AdapterSet,
    report: CompatReport,
}

fn open_inputs(args: &FitArgs, out: &OutputSettings, merge: &MergeSettings) -> Result<Inputs> {
    let file = args.inputs.adapters_file.as_deref();
    // A bad output is refused before anything large is read.
    let mut given = settings::given_inputs(&args.inputs.adapters, file);
    given.push(Input::at("base model", &args.base));
    given.push(Input::at("shots file", &args.shots));
    if !args.dry_run {
        out.check(&given)?;
    }
    let refs = settings::adapter_refs(&args.inputs.adapters, file)?;
    let (dir, task) = open_base(&args.base, args.task, args.head)?;
    let mut set = AdapterSet::load(&refs)?;
    if !args.dry_run {
        let mut resolved = settings::given_inputs(&refs, file);
        resolved.extend(settings::adapter_inputs(&set));
        resolved.push(Input::at("base model", &dir.dir));
        resolved.push(Input::at("shots file", &args.shots));
        out.check(&resolved)?;
    }
    let report = set.check(merge.strict, merge.allow_base_mismatch)?;
    if !args.dry_run {
        // The merge at the end must fit: known now, before the training.
        let (memory, disk) = merge::estimate(&set, merge.method, merge.dtype_for(&set));
        lora_merge::resources::check(
            lora_merge::resources::Need { memory, disk },
            &out.dir,
            "writing this composition",
            "An svd merge to a smaller --rank, or --dtype f16/bf16, needs less.",
        )?;
        set.hash_inputs();
    }
    Ok(Inputs {
        dir,
        task,
        set,
        report,
    })
}

/// The shots, tokenized, and which of them train and which are held out.
struct Split {
    shots: Shots,
    train: Vec<usize>,
    val: Vec<usize>,
    max_len: usize,
}

fn split_shots(args: &FitArgs, inp: &Inputs, rng: &mut Rng) -> Result<Split> {
    let mut tok = Tok::load(&inp.dir.tokenizer)?;
    let model_max = inp.dir.arch.max_positions();
    let max_len = args.max_length.unwrap_or(model_max).min(model_max);
    let shots = load_shots(inp.task, &args.shots, &mut tok, max_len)?;
    let (train, val) = split::shots(&shots, args.val_fraction, rng);
    Ok(Split {
        shots,
        train,
        val,
        max_len,
    })
}

/// `--dry-run`: what a fit would train and roughly what memory it needs.
fn print_plan(args: &FitArgs, inp: &Inputs, sp: &Split) -> Result<()> {
    let (dir, set) = (&inp.dir, &inp.set);
    let grouping = granularity(args);
    let groups = planned_groups(set, grouping).len();
    let classes = sp.shots.labels().len();
    let hidden = dir.arch.hidden_size();
    let head_params = if args.head == HeadArg::Linear {
        classes * hidden + classes
    } else {
        0
    };
    let n = set.adapters.len();
    let trainable = groups * n + head_params;
    let factor_bytes: usize = set.adapters.iter().map(|a| a.parameter_count() * 4).sum();
    let model_bytes = dir.parameter_count() * 4;
    let layers = dir.arch.num_layers();
    // Activations kept for backward: roughly 24 hidden-sized tensors per
    // layer and token (attention, MLP, norms, LoRA branches).
    let act_bytes =
        args.batch_size.min(sp.train.len()) * sp.shots.longest() * hidden * layers * 24 * 4;
    let count = sp.shots.len();
    if args.json {
        return print_json(&json!({
            "base": {"path": dir.dir, "architecture": dir.arch.name(), "parameters": dir.parameter_count()},
            "task": inp.task.name(),
            "adapters": set.adapters.iter().map(|a| json!({"given": a.given, "modules": a.modules.len(), "rank": a.config.r})).collect::<Vec<_>>(),
            "modules": inp.report.modules.len(),
            "granularity": format!("{:?}", grouping).to_lowercase(),
            "groups": groups,
            "trainable_parameters": trainable,
            "shots": {"count": count, "train": sp.train.len(), "validation": sp.val.len()},
            "memory_estimate_bytes": model_bytes + factor_bytes + act_bytes,
            "memory_estimate": {"model": model_bytes, "adapter_factors": factor_bytes, "activations": act_bytes},
        }));
    }
    lora_merge::outln!(
        "plan: fit {} adapters into {} ({})\n  task {}, {} shots: {} train, {} held out\n  \
         {} adapted modules, {} weight groups ({:?}), {} trainable parameters\n  \
         memory: about {} (model {}, adapter factors {}, activations {})",
        n,
        dir.dir.display(),
        dir.arch.name(),
        inp.task.name(),
        count,
        sp.train.len(),
        sp.val.len(),
        inp.report.modules.len(),
        groups,
        grouping,
        trainable,
        human_bytes((model_bytes + factor_bytes + act_bytes) as u64),
        human_bytes(model_bytes as u64),
        human_bytes(factor_bytes as u64),
        human_bytes(act_bytes as u64)
    );
    Ok(())
}

/// What training found.
struct Learned {
    /// Why the start (the uniform merge) was kept without training, when it was.
    untrained: Option<&'static str>,
    curve: Vec<LossPoint>,
    best_step: usize,
    /// Held-out loss and accuracy of the base model alone.
    base_val: Option<(f64, Option<f64>)>,
    /// Weights per group at the kept step, and the group names.
    group_weights: Vec<Vec<f64>>,
    group_names: Vec<String>,
    /// The merge's weights: the mean per adapter, and per module.
    weights: Weights,
    head: Option<(Vec<f32>, Vec<f32>)>,
    labels: Vec<String>,
    device: String,
    seconds: f64,
}

/// Why a classification fit with the prototype head keeps the uniform merge
/// when no class has two training shots.
const NO_POSITIVE_PAIR: &str = "no class has two training shots, so the prototype loss has no \
     positive pair (a shot's own class prototype is the shot itself) and cannot tell \
     compositions apart; the uniform merge is kept untrained. Two shots of a class are enough \
     to learn from (--head linear learns from one)";

/// The rule's verdict for this run: Some(reason) when training is skipped.
fn untrained(args: &FitArgs, sp: &Split) -> Option<&'static str> {
    (args.head == HeadArg::Prototype && !sp.shots.has_positive_pair(&sp.train))
        .then_some(NO_POSITIVE_PAIR)
}

/// Load the model with the adapters composed in, and learn the weights
/// (none when `untrained` gives the reason: the uniform start is kept).
fn learn(
    args: &FitArgs,
    inp: &Inputs,
    sp: Split,
    untrained: Option<&'static str>,
    rng: &mut Rng,
) -> Result<Learned> {
    if args.optimizer == OptimizerArg::GradientFree {
        return learn_gradient_free(args, inp, sp, untrained);
    }
    let n = inp.set.adapters.len();
    let grouping = granularity(args);
    let dev = device(args.device)?;
    tch::manual_seed(args.seed as i64);
    let model = Model::load(&inp.dir, Some(&inp.set), grouping, Kind::Float, dev)?;
    let g = model.groups.len();
    let (train, val) = (&sp.train, &sp.val);
    lora_merge::ui::note(&format!(
        "fit: {n} adapters, {} modules in {g} weight groups, on {} ({} train / {} held-out shots)",
        model.module_groups.len(),
        device_name(dev),
        train.len(),
        val.len()
    ));
    let labels = sp.shots.labels();
    let t = Instant::now();
    let (outcome, base_val, group_weights, head) = catching(|| {
        let vs = nn::VarStore::new(dev);
        let logits = vs.root().zeros("logits", &[g as i64, n as i64]);
        let opt = nn::Adam::default().build(&vs, args.lr).map_err(tch_err)?;
        let mut c = Composition {
            trainer: Trainer {
                model: &model,
                shots: sp.shots,
                head: None,
            },
            logits,
            opt,
            train,
            val,
            batch: args.batch_size,
            kept: None,
        };
        // The base model, no adapters, before any head exists: with a linear
        // head this is the prototype classifier over base embeddings (the
        // head's start).
        let base_val =
            (!val.is_empty()).then(|| c.trainer.val_loss(train, val, &[], args.batch_size));
        if args.head == HeadArg::Linear {
            let head = new_head(&c.trainer, train, &c.mix(), args.batch_size, args.head_lr)?;
            c.trainer.head = Some(head);
        }
        let plan = Plan {
            steps: if untrained.is_some() { 0 } else { args.steps },
            batch_size: args.batch_size,
            train,
            lr: ("--lr", args.lr),
            label: "fit",
        };
        let outcome = steps::run(&plan, rng, &mut c)?;
        let (best_logits, best_head) = c
            .kept
            .take()
            .ok_or_else(|| Error::Internal("no step was kept".into()))?;
        let w = best_logits
            .softmax(-1, Kind::Double)
            .to_device(tch::Device::Cpu);
        let weights: Vec<Vec<f64>> = (0..g as i64)
            .map(|i| Vec::<f64>::try_from(w.get(i)).map_err(tch_err))
            .collect::<Result<_>>()?;
        let head = match best_head {
            Some((hw, hb)) => Some((to_f32(&hw)?, to_f32(&hb)?)),
            None => None,
        };
        Ok((outcome, base_val, weights, head))
    })?;
    let seconds = t.elapsed().as_secs_f64();
    let mean: Vec<f64> = (0..n)
        .map(|i| group_weights.iter().map(|w| w[i]).sum::<f64>() / g as f64)
        .collect();
    let weights = Weights {
        global: mean,
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
    Ok(Learned {
        untrained,
        curve: outcome.curve,
        best_step: outcome.best_step,
        base_val,
        group_names: model.groups.clone(),
        group_weights,
        weights,
        head,
        labels,
        device: device_name(dev),
        seconds,
    })
}

/// `--optimizer gradient-free`: LoraHub's search of one weight per adapter.
/// Point `i` of the curve is evaluation `i` (0: the uniform merge); its
/// train loss is the loss without the penalty. The kept point has the lowest
/// penalised loss on the training shots, as in LoraHub; held-out shots score
/// the start and the kept point only.
fn learn_gradient_free(
    args: &FitArgs,
    inp: &Inputs,
    sp: Split,
    untrained: Option<&'static str>,
) -> Result<Learned> {
    let n = inp.set.adapters.len();
    let dev = device(args.device)?;
    tch::manual_seed(args.seed as i64);
    let model = Model::load(&inp.dir, Some(&inp.set), Grouping::Global, Kind::Float, dev)?;
    let (train, val) = (&sp.train, &sp.val);
    let budget = if untrained.is_some() { 1 } else { budget(args) };
    lora_merge::ui::note(&format!(
        "fit: {n} adapters, one weight each, gradient-free search of {budget} evaluations on {} \
         ({} train / {} held-out shots)",
        device_name(dev),
        train.len(),
        val.len()
    ));
    let labels = sp.shots.labels();
    let t = Instant::now();
    let trainer = Trainer {
        model: &model,
        shots: sp.shots,
        head: None,
    };
    let mix = |w: &[f64]| vec![Tensor::from_slice(w).to_kind(Kind::Float).to_device(dev)];
    let batch = args.batch_size;
    let (trace, losses, base_val, start_val, kept_val) = catching(|| {
        let base_val = (!val.is_empty()).then(|| trainer.val_loss(train, val, &[], batch));
        let bar = progress(budget as u64, "fit");
        let mut losses = Vec::with_capacity(budget);
        let problem = search::Problem {
            start: vec![1.0 / n as f64; n],
            sigma: GF_SIGMA,
            lower: -GF_BOUND,
            upper: GF_BOUND,
            budget,
            seed: args.seed,
        };
        let trace = search::minimize(&problem, |w| {
            let loss = trainer.loss_value(train, &mix(w), batch);
            if !loss.is_finite() {
                return Err(Error::Diverged(format!(
                    "the training loss became {loss} at weights {w:?}: the model gives \
                     non-finite outputs there; nothing was written"
                )));
            }
            losses.push(loss);
            bar.set_message(format!("loss {loss:.4}"));
            bar.inc(1);
            Ok(loss + GF_L1 * w.iter().map(|x| x.abs()).sum::<f64>() / n as f64)
        })?;
        bar.finish_and_clear();
        let held =
            |w: &[f64]| (!val.is_empty()).then(|| trainer.val_loss(train, val, &mix(w), batch));
        let start_val = held(&trace.evaluations[0].x);
        let kept_val = held(&trace.evaluations[trace.best].x);
        Ok((trace, losses, base_val, start_val, kept_val))
    })?;
    let seconds = t.elapsed().as_secs_f64();
    let curve: Vec<LossPoint> = losses
        .iter()
        .enumerate()
        .map(|(i, &train_loss)| {
            let held = if i == trace.best {
                kept_val
            } else if i == 0 {
                start_val
            } else {
                None
            };
            LossPoint {
                step: i,
                train_loss,
                val_loss: held.map(|h| h.0),
                val_accuracy: held.and_then(|h| h.1),
            }
        })
        .collect();
    let w = trace.evaluations[trace.best].x.clone();
    Ok(Learned {
        untrained,
        curve,
        best_step: trace.best,
        base_val,
        group_names: model.groups.clone(),
        group_weights: vec![w.clone()],
        weights: Weights {
            global: w,
            per_module: BTreeMap::new(),
        },
        head: None,
        labels,
        device: device_name(dev),
        seconds,
    })
}

fn score(p: &LossPoint) -> Score {
    Score {
        loss: p.val_loss,
        accuracy: p.val_accuracy,
    }
}

fn validation(l: &Learned) -> Validation {
    Validation {
        base: l.base_val.map(|b| Score {
            loss: Some(b.0),
            accuracy: b.1,
        }),
        uniform: score(&l.curve[0]),
        learned: score(&l.curve[l.best_step]),
    }
}

fn fmt_loss(x: Option<f64>) -> String {
    x.map_or("n/a".to_string(), |v| format!("{v:.4}"))
}

/// The card's section on the learned composition.
fn card_section(
    args: &FitArgs,
    task: Task,
    sp_counts: (usize, usize, usize),
    l: &Learned,
    adapters: &[String],
) -> String {
    let (count, n_train, n_val) = sp_counts;
    let grouping = granularity(args);
    let untrained = l
        .untrained
        .map(|why| format!("Not trained: {why}.\n\n"))
        .unwrap_or_default();
    format!(
        "## Learned composition\n\n{untrained}\
         Weights learned by `lora-merge fit` on {count} shots ({n_train} for training, {n_val} \
         held out; task {}) by {}, {} weight groups ({} granularity). Held-out loss: \
         base model {}, uniform merge {}, learned {} (point {}).\n\n\
         ![learned weights per group and adapter](weights.svg)\n\n\
         | adapter | mean weight | min | max |\n|---|---|---|---|\n{}",
        task.name(),
        schedule(args),
        l.group_names.len(),
        format!("{grouping:?}").to_lowercase(),
        fmt_loss(l.base_val.map(|b| b.0)),
        fmt_loss(l.curve[0].val_loss),
        fmt_loss(l.curve[l.best_step].val_loss),
        l.best_step,
        adapters
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let col = l.group_weights.iter().map(|w| w[i]);
                let min = col.clone().fold(f64::INFINITY, f64::min);
                let max = col.fold(f64::NEG_INFINITY, f64::max);
                format!(
                    "| `{}` | {:.4} | {:.4} | {:.4} |\n",
                    lora_merge::output::card::code_span(a),
                    l.weights.global[i],
                    min,
                    max
                )
            })
            .collect::<String>()
    )
}

/// `fit`'s section of the manifest.
#[allow(clippy::too_many_arguments)]
fn fit_record(
    args: &FitArgs,
    inp: &Inputs,
    train: &[usize],
    val: &[usize],
    count: usize,
    max_len: usize,
    l: &Learned,
) -> Result<FitRecord> {
    let task = inp.task;
    let dir = &inp.dir;
    Ok(FitRecord {
        task: task.name(),
        shots: DataRecord {
            path: args.shots.clone(),
            sha256: lora_merge::hash::sha256_file(&args.shots)?,
            count,
            train: Some(train.to_vec()),
            validation: Some(val.to_vec()),
            indices: Some(
                "0-based positions among the file's distinct examples (non-blank lines, \
                 repeats used once)",
            ),
        },
        hyper_parameters: FitHyperParameters {
            steps: args.steps,
            lr: args.lr,
            head_lr: args.head_lr,
            batch_size: args.batch_size,
            val_fraction: args.val_fraction,
            granularity: format!("{:?}", granularity(args)).to_lowercase(),
            head: (task == Task::Classify).then(|| format!("{:?}", args.head).to_lowercase()),
            prototype_scale: (task == Task::Classify).then_some(PROTO_SCALE),
            max_length: max_len,
            optimizer: match args.optimizer {
                OptimizerArg::Adam => "adam",
                OptimizerArg::GradientFree => "cma-es (gradient-free, LoraHub)",
            },
            budget: (args.optimizer == OptimizerArg::GradientFree).then(|| budget(args)),
            softmax: match args.optimizer {
                OptimizerArg::Adam => "true (not detached)",
                OptimizerArg::GradientFree => {
                    "false: weights in [-1.5, 1.5], loss + 0.05 x mean |w| minimised"
                }
            },
        },
        seed: args.seed,
        device: l.device.clone(),
        threads: tch::get_num_threads(),
        base_model: BaseModelRecord {
            path: Some(dir.dir.clone()),
            hub: dir.hub.clone(),
            architecture: Some(dir.arch.name().to_string()),
            files: Some(dir.files.clone()),
            ..BaseModelRecord::default()
        },
        loss_curve: l.curve.clone(),
        best_step: l.best_step,
        untrained: l.untrained,
        validation: validation(l),
        groups: l
            .group_names
            .iter()
            .zip(&l.group_weights)
            .map(|(name, w)| GroupWeights {
                group: name.clone(),
                weights: w.clone(),
            })
            .collect(),
        train_seconds: l.seconds,
    })
}

/// The result: JSON on stdout, or the curve and a summary on stderr.
fn report(
    args: &FitArgs,
    task: Task,
    l: &Learned,
    adapters: &[String],
    dir: &std::path::Path,
    total_s: f64,
) -> Result<()> {
    let uniform = &l.curve[0];
    let learned = &l.curve[l.best_step];
    if args.json {
        let v = validation(l);
        return print_json(&json!({
            "output": dir,
            "task": task.name(),
            "device": l.device,
            "adapters": adapters,
            "groups": l.group_names.len(),
            "optimizer": format!("{:?}", args.optimizer).to_lowercase(),
            "steps": args.steps,
            "budget": (args.optimizer == OptimizerArg::GradientFree).then(|| budget(args)),
            "best_step": l.best_step,
            "untrained": l.untrained,
            "loss_curve": l.curve,
            "validation": {"base": v.base, "uniform": v.uniform, "learned": v.learned},
            "weights_mean": l.weights.global,
            "train_seconds": l.seconds,
        }));
    }
    let acc = |a: Option<f64>| a.map(|a| format!(", accuracy {a:.4}")).unwrap_or_default();
    lora_merge::ui::note(&curve_table(&l.curve, l.best_step));
    if let Some((loss, a)) = l.base_val {
        lora_merge::ui::note(&format!("held-out loss: base {loss:.4}{}", acc(a)));
    }
    lora_merge::ui::note(&format!(
        "held-out loss: uniform {}{}  ->  learned {}{} (point {} of {}; train loss {:.4} -> {:.4})",
        fmt_loss(uniform.val_loss),
        acc(uniform.val_accuracy),
        fmt_loss(learned.val_loss),
        acc(learned.val_accuracy),
        l.best_step,
        l.curve.len() - 1,
        uniform.train_loss,
        learned.train_loss
    ));
    let shown: Vec<String> = adapters
        .iter()
        .zip(&l.weights.global)
        .map(|(a, w)| format!("{a}: {w:.3}"))
        .collect();
    lora_merge::ui::note(&format!("mean learned weights: {}", shown.join(", ")));
    lora_merge::ui::note(&format!(
        "wrote {} (merged adapter, merge_manifest.json, README.md, weights.svg) in {total_s:.1} s",
        dir.display()
    ));
    Ok(())
}

/// settings -> inputs -> split -> learn -> merge -> write -> report.
pub fn run(args: &FitArgs) -> Result<()> {
    let t0 = Instant::now();
    let out = OutputSettings::from_args(&args.out);
    let merge_settings = MergeSettings::from_args(
        &args.merge,
        args.merge.method.is_random().then_some(args.seed),
    )?;
    check_flags(args)?;
    let inp = open_inputs(args, &out, &merge_settings)?;
    let mut rng = Rng(args.seed);
    let sp = split_shots(args, &inp, &mut rng)?;
    if args.dry_run {
        return print_plan(args, &inp, &sp);
    }
    if sp.train.is_empty() {
        return Err(Error::invalid(
            &args.shots,
            "no training shots left after the split",
        ));
    }
    let untrained = untrained(args, &sp);
    if let Some(why) = untrained {
        lora_merge::ui::note(&format!("note: {why}"));
    } else if sp.val.is_empty() {
        lora_merge::ui::note(&format!(
            "note: no held-out shots (too few for --val-fraction {}); the last step is kept",
            args.val_fraction
        ));
    }
    let (train, val, count, max_len) =
        (sp.train.clone(), sp.val.clone(), sp.shots.len(), sp.max_len);
    let hidden = inp.dir.arch.hidden_size();
    let learned = learn(args, &inp, sp, untrained, &mut rng)?;

    let bar = progress(inp.report.modules.len() as u64, "merging");
    let t_merge = Instant::now();
    let method = merge_settings.method;
    let spill = lora_merge::resources::spill_for(&out.dir)?;
    let modules = merge::merge(&inp.set, &learned.weights, method, Some(&spill), &|| {
        bar.inc(1)
    })?;
    bar.finish_and_clear();
    let merge_s = t_merge.elapsed().as_secs_f64();

    let adapters: Vec<String> = inp.set.adapters.iter().map(|a| a.given.clone()).collect();
    let mut contents = describe::merge_contents(&Merge {
        set: &inp.set,
        report: &inp.report,
        weights: &learned.weights,
        method,
        modules: &modules,
        format: Format::Peft,
        dtype: merge_settings.dtype_for(&inp.set),
    })?;
    let svg = heatmap::weights_svg(
        &format!(
            "lora-merge fit: learned weights ({} groups x {} adapters)",
            learned.group_names.len(),
            adapters.len()
        ),
        &learned.group_names,
        &adapters,
        &learned.group_weights,
    );
    contents
        .files
        .push(("weights.svg".into(), svg.into_bytes()));
    // The learned weights as a --weights-file, to merge again with another
    // method, rank or layout without refitting.
    contents.files.push((
        WEIGHTS_FILE.into(),
        WeightRules::render(&learned.weights.per_module, &learned.weights.global),
    ));
    if let Some((hw, hb)) = &learned.head {
        contents
            .files
            .extend(head_files(&learned.labels, hidden, hw, hb)?);
    }
    contents.card.extra_section = Some(card_section(
        args,
        inp.task,
        (count, train.len(), val.len()),
        &learned,
        &adapters,
    ));
    contents.pins.extend(
        inp.dir
            .hub
            .iter()
            .map(|h| (args.base.clone(), h.pinned.clone())),
    );
    contents.manifest.fit = Some(fit_record(
        args, &inp, &train, &val, count, max_len, &learned,
    )?);
    contents.manifest.timings = [
        ("train_s", learned.seconds),
        ("merge_s", merge_s),
        ("total_s", t0.elapsed().as_secs_f64()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let written = writer::write(&out.dir, contents)?;
    report(
        args,
        inp.task,
        &learned,
        &adapters,
        &written.dir,
        t0.elapsed().as_secs_f64(),
    )
}
