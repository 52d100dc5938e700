//! The libtorch half of lora-merge. `lora-merge` runs it for what needs
//! libtorch (`lora-merge-torch cli <the same arguments>`), so that everything
//! else starts without loading libtorch's ~500 MB of libraries. All tch code
//! lives under this binary, never in the library. Not meant to be run by
//! hand.

mod bench;
mod bert;
mod engine;
mod eval;
mod fit;
mod llama;
mod lora;
mod model;
#[cfg(test)]
mod parity;
mod tokenize;
mod train;

use clap::Parser;
use lora_merge::cli::{Cli, Command};
use lora_merge::Error;
use serde_json::json;

/// What libtorch reports about itself.
fn info() -> serde_json::Value {
    json!({
        "version": option_env!("LORA_MERGE_LIBTORCH_VERSION"),
        "lib_dir": option_env!("LORA_MERGE_LIBTORCH_LIB"),
        "cuda_available": tch::Cuda::is_available(),
        "cuda_devices": tch::Cuda::device_count(),
        "cudnn_available": tch::Cuda::cudnn_is_available(),
    })
}

fn main() {
    let mut args = std::env::args_os().skip(1);
    match args.next().as_ref().and_then(|a| a.to_str()) {
        Some("info") => println!("{}", info()),
        Some("bench") => {
            let rest: Vec<String> = args.filter_map(|a| a.into_string().ok()).collect();
            if let Err(e) = bench::run(&rest) {
                eprintln!("lora-merge-torch bench: error: {e}");
                std::process::exit(e.exit_code());
            }
        }
        Some("cli") => {
            let cli = Cli::parse_from(std::iter::once("lora-merge".into()).chain(args));
            let result = match &cli.command {
                Command::Eval(a) => eval::run(a),
                Command::Fit(a) => fit::run(a),
                Command::Train(a) => train::run(a),
                _ => Err(Error::Internal(
                    "lora-merge-torch only runs the commands that need libtorch".into(),
                )),
            };
            if let Err(e) = result {
                eprintln!("lora-merge: error: {e}");
                std::process::exit(e.exit_code());
            }
        }
        _ => {
            eprintln!("lora-merge-torch is run by lora-merge; use `lora-merge --help`");
            std::process::exit(2);
        }
    }
}
