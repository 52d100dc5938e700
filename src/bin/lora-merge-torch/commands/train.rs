//! `lora-merge train`: an ordinary LoRA, trained on labelled examples with
//! the same model engine, losses, step loop and writer as `fit`. It is the
//! baseline the paper compares composition with ("LoRA from scratch"), and
//! how upstream adapters are made.

use std::collections::BTreeMap;
use std::time::Instant;

use lora_merge::adapter::{AdapterSet, Format, ModuleKind};
use lora_merge::checkpoint::ModelDir;
use lora_merge::cli::{HeadArg, TrainArgs};
use lora_merge::compose::math::Factored;
use lora_merge::compose::merge::MergedModule;
use lora_merge::data::Task;
use lora_merge::output::card::{code_span, Card};
use lora_merge::output::guard::Input;
use lora_merge::output::manifest::{
    BaseModelRecord, DataRecord, LossPoint, Manifest, MethodRecord, ModuleRecord,
    TrainHyperParameters, TrainingRecord,
};
use lora_merge::output::{peft, writer};
use lora_merge::rng::Rng;
use lora_merge::settings::{self, OutputSettings};
use lora_merge::tensors::DType;
use lora_merge::ui::print_json;
use lora_merge::{Error, Result};
use serde_json::json;
use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};

use crate::engine::from_ref;
use crate::engine::lora::{canonical, TrainSpec};
use crate::engine::tokenize::Tok;
use crate::engine::{catching, device, device_name, tch_err, to_f32, Model};
use crate::training::heads::{head_files, new_head};
use crate::training::steps::{self, curve_table, Objective, Plan};
use crate::training::{check_rate, check_steps, load_shots, open_base, split, Trainer};

/// Copies of the trained factors (A, B per layer) and of the head (weight,
/// bias) at one step.
type Snapshot = (Vec<(Tensor, Tensor)>, Option<(Tensor, Tensor)>);

/// The LoRA factors (in the model's variable store) and the head.
struct NewLora<'a> {
    trainer: Trainer<'a>,
    opt: nn::Optimizer,
    train: &'a [usize],
    val: &'a [usize],
    batch: usize,
    /// With held-out examples: the kept step's parameters, put back after
    /// the last step.
    kept: Option<Snapshot>,
}

impl Objective for NewLora<'_> {
    fn loss(&mut self, batch: &[usize]) -> Tensor {
        self.trainer.train_loss(batch, &[])
    }
    fn held_out(&mut self) -> Option<(f64, Option<f64>)> {
        (!self.val.is_empty()).then(|| self.trainer.val_loss(self.train, self.val, &[], self.batch))
    }
    // Without held-out examples the last step's parameters are the result
    // and nothing is copied.
    fn keep(&mut self, _step: usize) {
        if self.val.is_empty() {
            return;
        }
        let factors = self
            .trainer
            .model
            .trained
            .iter()
            .map(|t| (t.a.copy(), t.b.copy()))
            .collect();
        let head = self.trainer.head.as_ref().map(|h| (h.w.copy(), h.b.copy()));
        self.kept = Some((factors, head));
    }
    fn step(&mut self, loss: &Tensor) {
        self.trainer.apply(loss, &mut self.opt);
    }
}

impl NewLora<'_> {
    /// Put the kept step's parameters back into the variables.
    fn restore(&mut self) {
        let Some((factors, head)) = self.kept.take() else {
            return;
        };
        tch::no_grad(|| {
            for (t, (a, b)) in self.trainer.model.trained.iter().zip(&factors) {
                t.a.shallow_clone().copy_(a);
                t.b.shallow_clone().copy_(b);
            }
            if let (Some(h), Some((w, b))) = (&self.trainer.head, &head) {
                h.w.shallow_clone().copy_(w);
                h.b.shallow_clone().copy_(b);
            }
        });
    }
}

/// What the training run did.
struct Run {
    curve: Vec<LossPoint>,
    /// The step whose parameters were written.
    best_step: usize,
    /// Positions of the training and held-out examples, when some were held out.
    split: Option<(Vec<usize>, Vec<usize>)>,
    device: String,
    seconds: f64,
    params: usize,
    count: usize,
    max_len: usize,
}

/// What was trained: a new LoRA as the flags say, or `--init`'s modules.
struct Shape {
    rank: usize,
    alpha: f64,
    targets: Vec<String>,
    init: &'static str,
}

/// What `train` ran, for the writer: the manifest's training section, the
/// card, the PEFT config.
#[allow(clippy::too_many_arguments)]
fn contents<'a>(
    args: &TrainArgs,
    dir: &ModelDir,
    task: Task,
    shape: &Shape,
    modules: &'a [MergedModule],
    run: &Run,
    files: Vec<(String, Vec<u8>)>,
    total_s: f64,
) -> Result<writer::Contents<'a>> {
    let curve = &run.curve;
    let first = curve.first().map_or(f64::NAN, |p| p.train_loss);
    let last = curve.get(run.best_step).map_or(f64::NAN, |p| p.train_loss);
    let mut manifest = Manifest::new(
        MethodRecord {
            name: "train",
            rank: Some(shape.rank),
            conv_rank: None,
            rank_target: None,
            output_format: Format::Peft,
            dtype: DType::F32,
            approximate: false,
            svd_factor_split: None,
            density: None,
            majority_sign: None,
            seed: None,
            rel_error_of: None,
        },
        BaseModelRecord {
            name: Some(args.base.clone()),
            revision: dir.hub.as_ref().map(|h| h.commit.clone()),
            path: Some(dir.dir.clone()),
            hub: dir.hub.clone(),
            architecture: Some(dir.arch.name().to_string()),
            files: Some(dir.files.clone()),
        },
    );
    manifest.modules = modules
        .iter()
        .map(|m| {
            (
                m.name.clone(),
                ModuleRecord {
                    rank: m.factored.rank,
                    rel_error: 0.0,
                    energy: 1.0,
                    adapters: Vec::new(),
                    weights: Vec::new(),
                },
            )
        })
        .collect();
    manifest.training = Some(TrainingRecord {
        task: task.name(),
        data: DataRecord {
            path: args.data.clone(),
            sha256: lora_merge::hash::sha256_file(&args.data)?,
            count: run.count,
            train: run.split.as_ref().map(|s| s.0.clone()),
            validation: run.split.as_ref().map(|s| s.1.clone()),
            indices: run.split.as_ref().map(|_| {
                "0-based positions among the file's distinct examples (non-blank lines, \
                 repeats used once)"
            }),
        },
        hyper_parameters: TrainHyperParameters {
            rank: shape.rank,
            alpha: shape.alpha,
            target_modules: shape.targets.clone(),
            steps: args.steps,
            lr: args.lr,
            head_lr: args.head_lr,
            batch_size: args.batch_size,
            val_fraction: args.val_fraction,
            max_length: run.max_len,
            head: (task == Task::Classify).then(|| format!("{:?}", args.head).to_lowercase()),
            init: shape.init,
            optimizer: "adam",
        },
        seed: args.seed,
        device: run.device.clone(),
        threads: tch::get_num_threads(),
        trainable_parameters: run.params,
        loss_curve: curve.clone(),
        best_step: run.best_step,
        train_seconds: run.seconds,
    });
    manifest.timings = [("train_s", run.seconds), ("total_s", total_s)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let card = Card {
        title: "LoRA adapter".into(),
        summary: format!(
            "A LoRA (rank {}, alpha {}, on {}) trained with lora-merge {} on {} examples \
             (task {}) for {} steps{}: training loss {first:.4} -> {last:.4}. Written with scale 1 \
             (`lora_alpha` = rank; the trained alpha/r is folded into `lora_B`).",
            shape.rank,
            shape.alpha,
            code_span(&shape.targets.join(", ")),
            env!("CARGO_PKG_VERSION"),
            run.count,
            task.name(),
            args.steps,
            kept_phrase(run),
        ),
        base_model: Some(args.base.clone()),
        format: "peft",
        ..Card::default()
    };
    Ok(writer::Contents {
        modules,
        format: Format::Peft,
        dtype: DType::F32,
        config: peft::ConfigFacts {
            base_model: Some(args.base.clone()),
            revision: None,
            task_type: Some(
                match task {
                    Task::CausalLm => "CAUSAL_LM",
                    Task::Classify => "FEATURE_EXTRACTION",
                }
                .into(),
            ),
            fan_in_fan_out: false,
            shared_target_modules: Some(json!(shape.targets)),
        },
        kohya: None,
        card,
        pins: dir
            .hub
            .iter()
            .map(|h| (args.base.clone(), h.pinned.clone()))
            .collect(),
        manifest,
        files,
    })
}

/// With held-out examples, which step was kept and why, for the card and
/// the report; empty without.
fn kept_phrase(run: &Run) -> String {
    let Some((train, val)) = &run.split else {
        return String::new();
    };
    let held = |i: usize| {
        run.curve
            .get(i)
            .and_then(|p| p.val_loss)
            .map_or("-".to_string(), |v| format!("{v:.4}"))
    };
    format!(
        " ({} training, {} held out; step {} kept, held-out loss {} against {} at step 0)",
        train.len(),
        val.len(),
        run.best_step,
        held(run.best_step),
        held(0)
    )
}

/// The result: JSON on stdout, or the curve and a summary on stderr.
fn report(
    args: &TrainArgs,
    task: Task,
    run: &Run,
    modules: usize,
    dir: &std::path::Path,
    total_s: f64,
) -> Result<()> {
    let first = run.curve.first().map_or(f64::NAN, |p| p.train_loss);
    let last = run
        .curve
        .get(run.best_step)
        .map_or(f64::NAN, |p| p.train_loss);
    if args.json {
        print_json(&json!({
            "output": dir,
            "task": task.name(),
            "device": run.device,
            "modules": modules,
            "trainable_parameters": run.params,
            "loss_curve": run.curve,
            "best_step": run.best_step,
            "train_seconds": run.seconds,
        }))?;
    } else {
        lora_merge::ui::note(&curve_table(&run.curve, run.best_step));
        lora_merge::ui::note(&format!(
            "training loss {first:.4} -> {last:.4}{}; wrote {} (PEFT adapter, merge_manifest.json, README.md) in {:.1} s",
            kept_phrase(run),
            dir.display(),
            total_s
        ));
    }
    Ok(())
}

/// `--init`: the adapter's factors by model-side module name, as variables'
/// starting values. Only linear modules can be trained here.
fn init_factors(set: &AdapterSet, dev: Device) -> Result<BTreeMap<String, (Tensor, Tensor, f64)>> {
    let a = &set.adapters[0];
    let mut out = BTreeMap::new();
    for m in a.modules.values() {
        if m.kind != ModuleKind::Linear {
            return Err(Error::Incompatible(format!(
                "--init {}: module {:?} is a LoRA on a {:?} layer; only linear layers can be \
                 trained",
                a.given, m.name, m.kind
            )));
        }
        out.insert(
            canonical(&m.name).to_string(),
            (
                from_ref(&m.a, Kind::Float, dev)?,
                from_ref(&m.b, Kind::Float, dev)?,
                m.scale,
            ),
        );
    }
    Ok(out)
}

pub fn run(args: &TrainArgs) -> Result<()> {
    let t0 = Instant::now();
    let out = OutputSettings::from_args(&args.out);
    if args.rank == 0 || args.batch_size == 0 {
        return Err(Error::Usage(
            "--rank and --batch-size must be at least 1".into(),
        ));
    }
    check_steps(args.steps)?;
    if args.max_length == Some(0) {
        return Err(Error::Usage("--max-length must be at least 1".into()));
    }
    check_rate("--lr", args.lr)?;
    check_rate("--head-lr", args.head_lr)?;
    if !(0.0..1.0).contains(&args.val_fraction) {
        return Err(Error::Usage("--val-fraction must be in [0, 1)".into()));
    }
    if !(args.alpha.is_finite() && args.alpha > 0.0) {
        return Err(Error::Usage("--alpha must be a positive number".into()));
    }
    let mut given = vec![
        Input::at("base model", &args.base),
        Input::at("data file", &args.data),
    ];
    given.extend(args.init.iter().map(|i| Input::at("--init adapter", i)));
    out.check(&given)?;
    let (dir, task) = open_base(&args.base, args.task, args.head)?;
    let init_set = match &args.init {
        Some(i) => Some(AdapterSet::load(std::slice::from_ref(i))?),
        None => None,
    };
    let mut resolved = vec![
        Input::at("base model", &dir.dir),
        Input::at("data file", &args.data),
    ];
    if let Some(set) = &init_set {
        resolved.extend(settings::adapter_inputs(set));
    }
    out.check(&resolved)?;
    let hidden = dir.arch.hidden_size();
    // Every layer a LoRA can adapt has a side no wider than the hidden size,
    // and a rank above a layer's smaller side adds nothing but memory (each
    // layer is checked exactly when the model is built).
    if args.rank > hidden {
        return Err(Error::Usage(format!(
            "--rank {}: a LoRA's rank is at most its layer's smaller side, so use 1 to {hidden} \
             (the hidden size of {}); 4 to 64 is usual",
            args.rank,
            dir.arch.name()
        )));
    }
    let model_max = dir.arch.max_positions();
    let targets: Vec<String> = if !args.target_modules.is_empty() {
        args.target_modules.clone()
    } else if dir.arch.is_causal() {
        vec!["q_proj".into(), "v_proj".into()]
    } else {
        vec!["query".into(), "value".into()]
    };
    let max_len = args.max_length.unwrap_or(model_max).min(model_max);
    let mut tok = Tok::load(&dir.tokenizer)?;
    let shots = load_shots(task, &args.data, &mut tok, max_len)?;
    let count = shots.len();
    let labels = shots.labels();
    // The batches' generator; with --val-fraction it draws the split first,
    // as `fit` does with the same seed. Without, the batches are those of
    // earlier releases.
    let mut rng = Rng(args.seed);
    let split = (args.val_fraction > 0.0)
        .then(|| split::shots(&shots, args.val_fraction, &mut rng))
        .filter(|(_, val)| !val.is_empty());
    if args.val_fraction > 0.0 && split.is_none() {
        lora_merge::ui::note(&format!(
            "note: too few examples to hold any out with --val-fraction {}; every example \
             trains and the last step is kept",
            args.val_fraction
        ));
    }
    let all: Vec<usize> = (0..count).collect();
    let (train_idx, val_idx) = split.clone().unwrap_or((all, Vec::new()));

    let dev = device(args.device)?;
    tch::manual_seed(args.seed as i64);
    let vs = nn::VarStore::new(dev);
    let init = match &init_set {
        Some(set) => Some(init_factors(set, dev)?),
        None => None,
    };
    let spec = TrainSpec {
        root: vs.root(),
        targets: targets.clone(),
        rank: args.rank as i64,
        alpha: args.alpha,
        init,
    };
    let model = Model::load_training(&dir, spec, Kind::Float, dev)?;
    let params: usize = model
        .trained
        .iter()
        .map(|t| t.a.numel() + t.b.numel())
        .sum();
    let shape = match &init_set {
        Some(set) => {
            let mods = &set.adapters[0].modules;
            let rank = mods.values().map(|m| m.rank).max().unwrap_or(0);
            let scale = mods.values().next().map_or(1.0, |m| m.scale);
            Shape {
                rank,
                alpha: rank as f64 * scale,
                targets: mods.keys().cloned().collect(),
                init: "the factors of --init, trained further",
            }
        }
        None => Shape {
            rank: args.rank,
            alpha: args.alpha,
            targets: targets.clone(),
            init: "A uniform in +-1/sqrt(in), B zero",
        },
    };
    lora_merge::ui::note(&format!(
        "train: LoRA r={} alpha={} on {} layers ({} parameters) of {} on {}, {} examples{}",
        shape.rank,
        shape.alpha,
        model.trained.len(),
        params,
        dir.arch.name(),
        device_name(dev),
        count,
        if val_idx.is_empty() {
            String::new()
        } else {
            format!(" ({} held out to choose the step kept)", val_idx.len())
        }
    ));
    let t_train = Instant::now();
    let (curve, best_step, head) = catching(|| {
        let opt = nn::Adam::default().build(&vs, args.lr).map_err(tch_err)?;
        let mut lora = NewLora {
            trainer: Trainer {
                model: &model,
                shots,
                head: None,
            },
            opt,
            train: &train_idx,
            val: &val_idx,
            batch: args.batch_size,
            kept: None,
        };
        if args.head == HeadArg::Linear {
            // The head starts from the model as it is now: the base model
            // (B = 0), or with --init the adapter given.
            lora.trainer.head = Some(new_head(
                &lora.trainer,
                &train_idx,
                &[],
                args.batch_size,
                args.head_lr,
            )?);
        }
        let plan = Plan {
            steps: args.steps,
            batch_size: args.batch_size,
            train: &train_idx,
            lr: ("--lr", args.lr),
            label: "train",
        };
        let outcome = steps::run(&plan, &mut rng, &mut lora)?;
        lora.restore();
        let head = match &lora.trainer.head {
            Some(h) => Some((to_f32(&h.w)?, to_f32(&h.b)?)),
            None => None,
        };
        Ok((outcome.curve, outcome.best_step, head))
    })?;
    let train_s = t_train.elapsed().as_secs_f64();

    // The factors as PEFT names them (the checkpoint's wrapper prefix), with
    // the scale folded into B so that the written adapter has scale 1.
    let modules: Vec<MergedModule> = model
        .trained
        .iter()
        .map(|t| {
            let name = if t.name == "lm_head" {
                t.name.clone()
            } else {
                format!("{}{}", model.prefix, t.name)
            };
            let (r, fin) = (t.a.size()[0] as usize, t.a.size()[1] as usize);
            let fout = t.b.size()[0] as usize;
            Ok(MergedModule {
                name,
                path: None,
                sgm_name: None,
                kind: ModuleKind::Linear,
                fan_out: fout,
                fan_in: fin,
                sources: Vec::new(),
                factored: Factored {
                    rank: r,
                    a: to_f32(&t.a)?,
                    b: to_f32(&(&t.b * t.scale))?,
                    rel_error: 0.0,
                    energy: 1.0,
                },
                spilled: None,
            })
        })
        .collect::<Result<_>>()?;
    drop(model);

    let run = Run {
        curve,
        best_step,
        split,
        device: device_name(dev),
        seconds: train_s,
        params,
        count,
        max_len,
    };
    let mut files = Vec::new();
    if let Some((hw, hb)) = &head {
        files.extend(head_files(&labels, hidden, hw, hb)?);
    }
    let c = contents(
        args,
        &dir,
        task,
        &shape,
        &modules,
        &run,
        files,
        t0.elapsed().as_secs_f64(),
    )?;
    let written = writer::write(&out.dir, c)?;
    report(
        args,
        task,
        &run,
        modules.len(),
        &written.dir,
        t0.elapsed().as_secs_f64(),
    )
}
