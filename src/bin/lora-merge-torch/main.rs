//! The libtorch half of lora-merge. `lora-merge` runs it for what needs
//! libtorch (`lora-merge-torch cli <the same arguments>`), so that everything
//! else starts without loading libtorch's ~500 MB of libraries. All tch code
//! lives under this binary, never in the library. Not meant to be run by
//! hand.
//!
//! - `engine/`: base models in libtorch with adapters composed in.
//! - `training/`: examples, splits, losses, heads, the one step loop.
//! - `commands/`: eval, fit, train, bench, thin.

mod commands;
mod engine;
#[cfg(test)]
mod parity;
mod training;

use lora_merge::cli::Command;
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
            if let Err(e) = commands::bench::run(&rest) {
                lora_merge::ui::note(&format!("lora-merge-torch bench: error: {e}"));
                std::process::exit(e.exit_code());
            }
        }
        Some("cli") => {
            lora_merge::exit::main(std::iter::once("lora-merge".into()).chain(args), |cli| {
                match &cli.command {
                    Command::Eval(a) => commands::eval::run(a),
                    Command::Fit(a) => commands::fit::run(a),
                    Command::Train(a) => commands::train::run(a),
                    _ => Err(Error::Internal(
                        "lora-merge-torch only runs the commands that need libtorch".into(),
                    )),
                }
            })
        }
        _ => {
            lora_merge::ui::note("lora-merge-torch is run by lora-merge; use `lora-merge --help`");
            std::process::exit(2);
        }
    }
}
