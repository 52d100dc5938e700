//! `lora-merge train`: an ordinary LoRA, trained on labelled examples with
//! the same model engine, losses and writer as `fit`. It is the baseline the
//! paper compares composition with ("LoRA from scratch"), and how upstream
//! adapters are made.

use std::collections::BTreeMap;
use std::time::Instant;

use lora_merge::adapter::{DType, ModuleKind};
use lora_merge::cli::{HeadArg, TrainArgs};
use lora_merge::commands::{print_json, progress};
use lora_merge::compose::math::Factored;
use lora_merge::compose::merge::MergedModule;
use lora_merge::data::Task;
use lora_merge::model::Arch;
use lora_merge::output::atomic::{self, Staging};
use lora_merge::output::manifest::{self, Manifest, ModuleRecord, Tool};
use lora_merge::output::{peft, safetensors as st_out};
use lora_merge::{Error, Result};
use serde_json::json;
use tch::{nn, nn::OptimizerConfig, Kind, Tensor};

use crate::engine::{catching, device, device_name, tch_err};
use crate::eval::open_base;
use crate::fit::{curve_table, head_files, load_shots, new_head, sha256_file, Point, Rng, Trainer};
use crate::lora::TrainSpec;
use crate::model::Model;
use crate::tokenize::Tok;

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Vec::<f32>::try_from(
        t.to_kind(Kind::Float)
            .to_device(tch::Device::Cpu)
            .flatten(0, -1),
    )
    .map_err(tch_err)
}

pub fn run(args: &TrainArgs) -> Result<()> {
    let t0 = Instant::now();
    if args.rank == 0 || args.steps == 0 || args.batch_size == 0 {
        return Err(Error::Usage(
            "--rank, --steps and --batch-size must be at least 1".into(),
        ));
    }
    if !(args.lr > 0.0 && args.lr.is_finite() && args.alpha.is_finite() && args.alpha > 0.0) {
        return Err(Error::Usage(
            "--lr and --alpha must be positive numbers".into(),
        ));
    }
    let (dir, task) = open_base(&args.base, args.task, args.head)?;
    atomic::preflight(&args.output, args.force, &[])?;
    let (hidden, model_max) = match &dir.arch {
        Arch::Llama { config, .. } => (config.hidden_size, config.max_position_embeddings),
        Arch::Bert { config, .. } => (config.hidden_size, config.max_position_embeddings),
    };
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

    let dev = device(args.device)?;
    tch::manual_seed(args.seed as i64);
    let vs = nn::VarStore::new(dev);
    let spec = TrainSpec {
        root: vs.root(),
        targets: targets.clone(),
        rank: args.rank as i64,
        alpha: args.alpha,
    };
    let model = Model::load_training(&dir, spec, Kind::Float, dev)?;
    let params: usize = model
        .trained
        .iter()
        .map(|t| t.a.numel() + t.b.numel())
        .sum();
    eprintln!(
        "train: LoRA r={} alpha={} on {} layers ({} parameters) of {} on {}, {} examples",
        args.rank,
        args.alpha,
        model.trained.len(),
        params,
        dir.arch.name(),
        device_name(dev),
        count
    );
    let t_train = Instant::now();
    let all: Vec<usize> = (0..count).collect();
    let (curve, head) = catching(|| {
        let mut opt = nn::Adam::default().build(&vs, args.lr).map_err(tch_err)?;
        let mut trainer = Trainer {
            model: &model,
            shots,
            head: None,
        };
        if args.head == HeadArg::Linear {
            // B = 0: the model is the base model here.
            trainer.head = Some(new_head(
                &trainer,
                &all,
                &[],
                args.batch_size,
                args.head_lr,
            )?);
        }
        let mut rng = Rng(args.seed);
        let mut order = all.clone();
        let mut cursor = order.len();
        let bar = progress(args.steps as u64, "train");
        let mut curve = Vec::new();
        for step in 0..args.steps {
            let batch: Vec<usize> = if count <= args.batch_size {
                all.clone()
            } else {
                if cursor + args.batch_size > order.len() {
                    rng.shuffle(&mut order);
                    cursor = 0;
                }
                cursor += args.batch_size;
                order[cursor - args.batch_size..cursor].to_vec()
            };
            let loss = trainer.train_loss(&batch, &[]);
            let value = loss.double_value(&[]);
            if !value.is_finite() {
                return Err(Error::Internal(format!(
                    "the training loss became {value} at step {step}; try a smaller --lr"
                )));
            }
            curve.push(Point {
                step,
                train_loss: value,
                val_loss: None,
                val_accuracy: None,
            });
            opt.zero_grad();
            if let Some(h) = trainer.head.as_mut() {
                h.opt.zero_grad();
            }
            loss.backward();
            opt.step();
            if let Some(h) = trainer.head.as_mut() {
                h.opt.step();
            }
            bar.set_message(format!("loss {value:.4}"));
            bar.inc(1);
        }
        bar.finish_and_clear();
        let head = match &trainer.head {
            Some(h) => Some((to_vec(&h.w)?, to_vec(&h.b)?)),
            None => None,
        };
        Ok((curve, head))
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
                    a: to_vec(&t.a)?,
                    b: to_vec(&(&t.b * t.scale))?,
                    rel_error: 0.0,
                    energy: 1.0,
                },
            })
        })
        .collect::<Result<_>>()?;
    drop(model);

    let facts = peft::ConfigFacts {
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
        shared_target_modules: Some(json!(targets)),
    };
    let staging = Staging::new(&args.output)?;
    let mut written = BTreeMap::new();
    let tensors = peft::tensors(&modules, DType::F32);
    let adapter = staging.write_with("adapter_model.safetensors", |w| {
        st_out::write(
            w,
            &tensors,
            &BTreeMap::from([("format".to_string(), "pt".to_string())]),
        )
    })?;
    written.insert("adapter_model.safetensors".to_string(), adapter.clone());
    let config = peft::config(&modules, &facts);
    let config_text =
        serde_json::to_string_pretty(&config).map_err(|e| Error::Internal(e.to_string()))? + "\n";
    written.insert(
        "adapter_config.json".into(),
        staging.write("adapter_config.json", config_text.as_bytes())?,
    );
    if let Some((hw, hb)) = &head {
        for (name, bytes) in head_files(&labels, hidden, hw, hb)? {
            written.insert(name.clone(), staging.write(&name, &bytes)?);
        }
    }
    let argv = lora_merge::commands::command_line();
    let first = curve.first().map_or(f64::NAN, |p| p.train_loss);
    let last = curve.last().map_or(f64::NAN, |p| p.train_loss);
    let card = format!(
        "---\nlibrary_name: peft\nbase_model: {}\ntags:\n- lora\n- peft\n- lora-merge\n---\n\n\
         # LoRA adapter\n\n\
         A LoRA (rank {}, alpha {}, on {}) trained with lora-merge {} on {count} examples \
         (task {}) for {} steps: training loss {first:.4} -> {last:.4}. Written with scale 1 \
         (`lora_alpha` = rank; the trained alpha/r is folded into `lora_B`).\n\n\
         Weights: `adapter_model.safetensors` sha256 `{}`. Data, hyper-parameters, seed and \
         the loss curve: `merge_manifest.json`.\n\n\
         ## Reproduce\n\n```sh\n{}\n```\n\n\
         ## Use\n\n```python\nfrom peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, \"path/to/this/adapter\")\n```\n",
        serde_json::to_string(&args.base).unwrap_or_default(),
        args.rank,
        args.alpha,
        targets.join(", "),
        env!("CARGO_PKG_VERSION"),
        task.name(),
        args.steps,
        adapter.sha256,
        argv.join(" "),
    );
    written.insert(
        "README.md".into(),
        staging.write("README.md", card.as_bytes())?,
    );
    let training = json!({
        "task": task.name(),
        "data": {"path": args.data, "sha256": sha256_file(&args.data)?, "count": count},
        "hyper_parameters": {
            "rank": args.rank, "alpha": args.alpha, "target_modules": targets,
            "steps": args.steps, "lr": args.lr, "head_lr": args.head_lr,
            "batch_size": args.batch_size, "max_length": max_len,
            "head": if task == Task::Classify { Some(format!("{:?}", args.head).to_lowercase()) } else { None },
            "init": "A uniform in +-1/sqrt(in), B zero", "optimizer": "adam",
        },
        "seed": args.seed,
        "device": device_name(dev),
        "threads": tch::get_num_threads(),
        "trainable_parameters": params,
        "loss_curve": curve,
        "train_seconds": train_s,
    });
    let manifest = Manifest {
        tool: Tool::this(),
        created: manifest::timestamp(),
        command_line: argv,
        method: json!({"name": "train", "output_format": "peft", "dtype": "f32", "approximate": false}),
        weights: serde_json::Value::Null,
        inputs: Vec::new(),
        base_model: json!({"name": args.base, "path": dir.dir, "architecture": dir.arch.name(), "files": dir.files}),
        compatibility: serde_json::Value::Null,
        modules: modules
            .iter()
            .map(|m| {
                (
                    m.name.clone(),
                    ModuleRecord {
                        rank: m.factored.rank,
                        rel_error: 0.0,
                        energy: 1.0,
                        adapters: Vec::new(),
                    },
                )
            })
            .collect(),
        timings: json!({"train_s": train_s, "total_s": t0.elapsed().as_secs_f64()}),
        fit: None,
        training: Some(training),
        outputs: written.clone(),
    };
    let text =
        serde_json::to_string_pretty(&manifest).map_err(|e| Error::Internal(e.to_string()))? + "\n";
    staging.write(manifest::FILE_NAME, text.as_bytes())?;
    let out_dir = staging.commit()?;

    if args.json {
        print_json(&json!({
            "output": out_dir,
            "task": task.name(),
            "device": device_name(dev),
            "modules": modules.len(),
            "trainable_parameters": params,
            "loss_curve": curve,
            "train_seconds": train_s,
        }))?;
    } else {
        eprintln!("{}", curve_table(&curve, curve.len().saturating_sub(1)));
        eprintln!(
            "training loss {first:.4} -> {last:.4}; wrote {} (PEFT adapter, merge_manifest.json, README.md) in {:.1} s",
            out_dir.display(),
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
