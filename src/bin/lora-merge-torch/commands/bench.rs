//! `lora-merge-torch bench`: time forward + backward through a model with N
//! composed adapters, gradients to the composition weights. Used by
//! tests/bench/model_bench.py to compare with PyTorch + PEFT on the same
//! machine and thread count. Not part of the user-facing CLI.
//!
//! Usage: lora-merge-torch bench --base DIR --batch B --seq T --steps S
//!        --warmup W --threads N [--adapters A ...]

use std::time::Instant;

use lora_merge::adapter::AdapterSet;
use lora_merge::checkpoint::ModelDir;
use lora_merge::{Error, Result};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::engine::lora::Grouping;
use crate::engine::{catching, Model};

fn value<T: std::str::FromStr>(args: &[String], flag: &str, default: T) -> Result<T> {
    match args.iter().position(|a| a == flag) {
        None => Ok(default),
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Error::Usage(format!("{flag} needs a value"))),
    }
}

pub fn run(args: &[String]) -> Result<()> {
    let base: String = value(args, "--base", String::new())?;
    let batch: i64 = value(args, "--batch", 16)?;
    let seq: i64 = value(args, "--seq", 64)?;
    let steps: usize = value(args, "--steps", 20)?;
    let warmup: usize = value(args, "--warmup", 3)?;
    let threads: i32 = value(args, "--threads", 0)?;
    let adapters: Vec<String> = match args.iter().position(|a| a == "--adapters") {
        None => Vec::new(),
        Some(i) => args[i + 1..]
            .iter()
            .take_while(|a| !a.starts_with("--"))
            .cloned()
            .collect(),
    };
    if threads > 0 {
        tch::set_num_threads(threads);
    }
    tch::manual_seed(0);
    let dir = ModelDir::open(&base)?;
    let set = if adapters.is_empty() {
        None
    } else {
        Some(AdapterSet::load(&adapters)?)
    };
    let n = adapters.len() as i64;
    let t_load = Instant::now();
    let model = Model::load(
        &dir,
        set.as_ref(),
        Grouping::Module,
        Kind::Float,
        Device::Cpu,
    )?;
    let load_s = t_load.elapsed().as_secs_f64();
    let groups = model.groups.len() as i64;
    let vocab = match &dir.arch {
        lora_merge::checkpoint::Arch::Bert { config, .. } => config.vocab_size as i64,
        lora_merge::checkpoint::Arch::Llama { config, .. } => config.vocab_size as i64,
    };
    catching(|| {
        let ids = Tensor::randint_low(
            1000.min(vocab - 1),
            vocab,
            [batch, seq],
            (Kind::Int64, Device::Cpu),
        );
        let mask = Tensor::ones([batch, seq], (Kind::Int64, Device::Cpu));
        let mut logits = Tensor::zeros([groups.max(1), n.max(1)], (Kind::Float, Device::Cpu))
            .set_requires_grad(true);
        let mut times = Vec::new();
        let mut last = 0.0;
        for i in 0..warmup + steps {
            let t0 = Instant::now();
            let w = logits.softmax(-1, Kind::Float);
            let mix: Vec<Tensor> = if n == 0 {
                Vec::new()
            } else {
                (0..groups).map(|g| w.get(g)).collect()
            };
            let out = model.forward(&ids, &mask, &mix);
            let emb = crate::engine::bert::embed(&out, &mask);
            let loss = emb.sum(Kind::Float);
            if n > 0 {
                logits.zero_grad();
                loss.backward();
            }
            last = loss.double_value(&[]);
            if i >= warmup {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        let mut sorted = times.clone();
        sorted.sort_by(f64::total_cmp);
        println!(
            "{}",
            json!({
                "adapters": n, "groups": groups, "batch": batch, "seq": seq,
                "threads": tch::get_num_threads(), "load_seconds": load_s,
                "step_seconds_median": sorted[sorted.len() / 2],
                "step_seconds_min": sorted[0],
                "step_seconds": times, "loss": last,
            })
        );
        Ok(())
    })
}
