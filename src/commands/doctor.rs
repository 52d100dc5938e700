//! `doctor`: what this build can do on this machine.

use serde_json::json;

use crate::cli::DoctorArgs;
use crate::{hub, Result};

pub fn run(args: &DoctorArgs) -> Result<()> {
    let torch = torch_report();
    let token = hub::token_status();
    let report = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "torch": torch,
        "hub": {
            "cache_dir": hub::cache_dir(),
            "offline": hub::offline(),
            "token_configured": token.configured,
            "token_source": token.source,
        },
        "threads": rayon::current_num_threads(),
    });
    if args.json {
        return super::print_json(&report);
    }
    eprintln!("lora-merge {}", env!("CARGO_PKG_VERSION"));
    match &report["torch"] {
        serde_json::Value::Null => {
            eprintln!("libtorch: not built in (built without the `torch` feature)")
        }
        t => {
            eprintln!(
                "libtorch: {} ({})",
                t["version"].as_str().unwrap_or("?"),
                t["lib_dir"].as_str().unwrap_or("?")
            );
            eprintln!(
                "CUDA: {} ({} devices)",
                if t["cuda_available"].as_bool() == Some(true) {
                    "available"
                } else {
                    "not available"
                },
                t["cuda_devices"]
            );
        }
    }
    eprintln!(
        "Hub cache: {}{}",
        hub::cache_dir().display(),
        if hub::offline() { " (offline)" } else { "" }
    );
    eprintln!(
        "Hub token: {}",
        match &token.source {
            Some(src) => format!("configured (from {src})"),
            None => "not configured (set HF_TOKEN or run `hf auth login`)".into(),
        }
    );
    eprintln!("threads: {}", rayon::current_num_threads());
    Ok(())
}

#[cfg(feature = "torch")]
fn torch_report() -> serde_json::Value {
    json!({
        "version": option_env!("LORA_MERGE_LIBTORCH_VERSION"),
        "lib_dir": option_env!("LORA_MERGE_LIBTORCH_LIB"),
        "cuda_available": tch::Cuda::is_available(),
        "cuda_devices": tch::Cuda::device_count(),
        "cudnn_available": tch::Cuda::cudnn_is_available(),
    })
}

#[cfg(not(feature = "torch"))]
fn torch_report() -> serde_json::Value {
    serde_json::Value::Null
}
