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
        return crate::ui::print_json(&report);
    }
    crate::outln!("lora-merge {}", env!("CARGO_PKG_VERSION"));
    match &report["torch"] {
        serde_json::Value::Null => {
            crate::outln!("libtorch: not built in (built without the `torch` feature)")
        }
        t => {
            crate::outln!(
                "libtorch: {} ({})",
                t["version"].as_str().unwrap_or("?"),
                t["lib_dir"].as_str().unwrap_or("?")
            );
            crate::outln!(
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
    crate::outln!(
        "Hub cache: {}{}",
        hub::cache_dir().display(),
        if hub::offline() { " (offline)" } else { "" }
    );
    crate::outln!(
        "Hub token: {}",
        match &token.source {
            Some(src) => format!("configured (from {src})"),
            None => "not configured (set HF_TOKEN or run `hf auth login`)".into(),
        }
    );
    crate::outln!("threads: {}", rayon::current_num_threads());
    Ok(())
}

/// libtorch lives in a companion binary so that commands which do not need
/// it (merging, inspecting, verifying) start without loading its ~500 MB of
/// libraries. Ask it, if this build has one.
fn torch_report() -> serde_json::Value {
    match super::torch_companion() {
        None => serde_json::Value::Null,
        Some(exe) => match std::process::Command::new(&exe).arg("info").output() {
            Ok(out) if out.status.success() => serde_json::from_slice(&out.stdout).unwrap_or_else(
                |e| json!({"error": format!("unreadable answer from {}: {e}", exe.display())}),
            ),
            Ok(out) => {
                json!({"error": format!("{} failed: {}", exe.display(), String::from_utf8_lossy(&out.stderr).trim())})
            }
            Err(e) => json!({"error": format!("{}: {e}", exe.display())}),
        },
    }
}
