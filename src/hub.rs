//! Everything about the Hugging Face Hub lives here. For now: where the
//! cache shared with Python is, and whether a token is configured. The token
//! itself is never returned, printed or stored.

use std::path::PathBuf;

use serde::Serialize;

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn hf_home() -> PathBuf {
    env_nonempty("HF_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let base = env_nonempty("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| env_nonempty("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"));
            base.join("huggingface")
        })
}

/// The cache directory, resolved as huggingface_hub does:
/// HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub.
pub fn cache_dir() -> PathBuf {
    env_nonempty("HF_HUB_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| hf_home().join("hub"))
}

/// Where a token would come from, without its value.
#[derive(Debug, Serialize)]
pub struct TokenStatus {
    pub configured: bool,
    /// "HF_TOKEN", or the file it was found in.
    pub source: Option<String>,
}

pub fn token_status() -> TokenStatus {
    if env_nonempty("HF_TOKEN").is_some() {
        return TokenStatus {
            configured: true,
            source: Some("HF_TOKEN".into()),
        };
    }
    let path = env_nonempty("HF_TOKEN_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| hf_home().join("token"));
    let configured = std::fs::read_to_string(&path)
        .map(|t| !t.trim().is_empty())
        .unwrap_or(false);
    TokenStatus {
        configured,
        source: configured.then(|| path.display().to_string()),
    }
}

pub fn offline() -> bool {
    matches!(
        env_nonempty("HF_HUB_OFFLINE").as_deref(),
        Some("1" | "true" | "TRUE" | "yes" | "ON" | "on")
    )
}
