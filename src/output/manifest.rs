//! merge_manifest.json: provenance of a merge. Everything needed to tell
//! what was merged, how, and whether the files are still what was written.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::atomic::WrittenFile;

pub const FILE_NAME: &str = "merge_manifest.json";

#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub tool: Tool,
    /// UTC, RFC 3339; from SOURCE_DATE_EPOCH when set. The only timestamp
    /// anywhere in the output.
    pub created: String,
    pub command_line: Vec<String>,
    pub method: Value,
    pub weights: Value,
    pub inputs: Vec<Value>,
    pub base_model: Value,
    pub compatibility: Value,
    pub modules: BTreeMap<String, ModuleRecord>,
    pub timings: Value,
    /// `fit` only: shots, split, hyper-parameters, seed, device, loss curve,
    /// learned weights per group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fit: Option<Value>,
    /// `train` only: data, hyper-parameters, seed, device, loss curve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<Value>,
    /// sha256 and size of every other file in the directory.
    pub outputs: BTreeMap<String, WrittenFile>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Tool {
    pub name: String,
    pub version: String,
}

impl Tool {
    pub fn this() -> Tool {
        Tool {
            name: env!("CARGO_PKG_NAME").into(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ModuleRecord {
    pub rank: usize,
    /// ||written - exact weighted sum||_F / ||exact weighted sum||_F.
    pub rel_error: f64,
    /// Share of the exact sum's squared Frobenius norm that is kept.
    pub energy: f64,
    /// Indices into `inputs` of the adapters that adapt this module.
    pub adapters: Vec<usize>,
}

/// Only what `verify` needs, so that it can read manifests of later versions.
#[derive(Debug, Deserialize)]
pub struct OutputsOnly {
    pub outputs: BTreeMap<String, WrittenFile>,
}

/// Now (or SOURCE_DATE_EPOCH) as an RFC 3339 UTC timestamp.
pub fn timestamp() -> String {
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0)
        });
    format_rfc3339(secs)
}

/// Days-from-civil inverse (Howard Hinnant's algorithm), to avoid a date
/// crate for one timestamp.
pub fn format_rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_rfc3339(1_796_319_296), "2026-12-03T17:34:56Z");
        assert_eq!(format_rfc3339(-1), "1969-12-31T23:59:59Z");
    }
}
