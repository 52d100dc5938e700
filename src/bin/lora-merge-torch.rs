//! The libtorch half of lora-merge. `lora-merge` runs it for what needs
//! libtorch, so that everything else starts without loading libtorch's
//! ~500 MB of libraries. All tch code lives under this binary, never in the
//! library. Not meant to be run by hand.

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
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("info") => println!("{}", info()),
        _ => {
            eprintln!("lora-merge-torch is run by lora-merge; use `lora-merge --help`");
            std::process::exit(2);
        }
    }
}
