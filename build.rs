//! Link libtorch into the companion binary `lora-merge-torch` only, so that
//! it runs without LD_LIBRARY_PATH and really uses CUDA where a GPU exists,
//! while `lora-merge` itself starts without loading libtorch at all.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_TORCH").is_none() {
        return;
    }
    // torch-sys (links = "tch") exports the libtorch lib dir to crates that
    // depend on it directly.
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        // An rpath, so the binary finds libtorch wherever it is started from.
        println!("cargo:rustc-link-arg-bin=lora-merge-torch=-Wl,-rpath,{lib}");
        println!("cargo:rustc-env=LORA_MERGE_LIBTORCH_LIB={lib}");
        // The wheel records its exact build (e.g. 2.13.0+cu130) in version.py.
        let version_py = std::path::Path::new(&lib).join("../version.py");
        if let Ok(text) = std::fs::read_to_string(&version_py) {
            if let Some(v) = text.lines().find_map(|l| l.strip_prefix("__version__ = ")) {
                let v = v.trim().trim_matches(|c| c == '\'' || c == '"');
                println!("cargo:rustc-env=LORA_MERGE_LIBTORCH_VERSION={v}");
            }
        }
        // Nothing references libtorch_cuda's symbols directly: it registers the
        // CUDA backend from static constructors. Under --as-needed the linker
        // would drop it and CUDA would silently be unavailable.
        if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg-bin=lora-merge-torch=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
}
