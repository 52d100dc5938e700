//! merge_manifest.json: provenance of a merge. Everything needed to tell
//! what was merged, how, and whether the files are still what was written.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::atomic::WrittenFile;
use crate::adapter::config::PatternMap;
use crate::adapter::{CompatReport, Format};
use crate::checkpoint::ModelFile;
use crate::compose::merge::Weights;
use crate::source::{HubOrigin, Resolved};
use crate::tensors::{DType, FileRecord};

pub const FILE_NAME: &str = "merge_manifest.json";
/// The manifest's own sha256, beside it, as `sha256sum` writes it
/// (`<hex>  merge_manifest.json`): the manifest lists every other file's
/// hash, and this binds the manifest, so that `verify` notices an edit of
/// it and `sha256sum -c` can check it too.
pub const DIGEST_FILE: &str = "merge_manifest.sha256";

/// The contents of [`DIGEST_FILE`] for manifest bytes.
pub fn digest_line(manifest: &[u8]) -> String {
    format!("{}  {FILE_NAME}\n", crate::hash::sha256_hex(manifest))
}

/// The provenance record of an output directory. One typed section per
/// kind of run: every output has `method`, `modules` and `outputs`; merges
/// (`uniform`, `fit`) have `weights`, `inputs` and `compatibility`; `fit`
/// adds `fit`, `train` adds `training`.
#[derive(Debug, Serialize)]
pub struct Manifest {
    pub tool: Tool,
    /// UTC, RFC 3339; from SOURCE_DATE_EPOCH when set. The only timestamp
    /// anywhere in the output.
    pub created: String,
    pub command_line: Vec<String>,
    pub method: MethodRecord,
    /// The weight of every adapter (and of every module when they differ);
    /// null for a trained adapter.
    pub weights: Option<Weights>,
    pub inputs: Vec<InputRecord>,
    pub base_model: BaseModelRecord,
    pub compatibility: Option<CompatReport>,
    pub modules: BTreeMap<String, ModuleRecord>,
    /// Seconds spent per phase (load_s, merge_s, train_s, write_s, total_s).
    pub timings: BTreeMap<String, f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fit: Option<FitRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingRecord>,
    /// sha256 and size of every other file in the directory.
    pub outputs: BTreeMap<String, WrittenFile>,
}

impl Manifest {
    /// A manifest for `method`; the writer fills in the tool, the time,
    /// the command line and the outputs.
    pub fn new(method: MethodRecord, base_model: BaseModelRecord) -> Manifest {
        Manifest {
            tool: Tool::this(),
            created: String::new(),
            command_line: Vec::new(),
            method,
            weights: None,
            inputs: Vec::new(),
            base_model,
            compatibility: None,
            modules: BTreeMap::new(),
            timings: BTreeMap::new(),
            fit: None,
            training: None,
            outputs: BTreeMap::new(),
        }
    }
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

/// How the adapter's tensors were made.
#[derive(Debug, Serialize)]
pub struct MethodRecord {
    /// `exact`, `svd`, `linear`, `ties`, `dare-linear`, `dare-ties`,
    /// `magnitude-prune`, or `train`.
    pub name: &'static str,
    /// The output rank; with `rank_target`, the cap (`--max-rank`), absent
    /// when there is none. Each module's own rank is in `modules`.
    pub rank: Option<usize>,
    pub conv_rank: Option<usize>,
    /// `--rank auto`: `{"energy": F}` or `{"tolerance": F}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank_target: Option<crate::compose::merge::Target>,
    pub output_format: Format,
    pub dtype: DType,
    /// Whether the written deltas may differ from the exact weighted sum.
    pub approximate: bool,
    pub svd_factor_split: Option<&'static str>,
    /// ties, dare-linear, dare-ties, magnitude-prune: the fraction of each
    /// delta's entries kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub density: Option<f64>,
    /// ties, dare-ties: `total` or `frequency`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub majority_sign: Option<&'static str>,
    /// dare-linear, dare-ties: the seed of the dropped entries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// What each module's `rel_error` and `energy` measure against, when it
    /// is not the exact weighted sum.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rel_error_of: Option<&'static str>,
}

/// One merged input: as given, as resolved, its files and its own scale.
#[derive(Debug, Serialize)]
pub struct InputRecord {
    pub given: String,
    pub format: Format,
    pub resolved: Resolved,
    pub files: Vec<FileRecord>,
    pub rank: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub rank_pattern: PatternMap<usize>,
    pub alpha_pattern: PatternMap<f64>,
    pub base_model: Option<String>,
    pub base_model_revision: Option<String>,
    pub modules: usize,
    pub weight: Option<f64>,
}

/// The base model: the name the adapters give (merges), or the model that
/// was loaded (`fit`, `train`).
#[derive(Debug, Default, Serialize)]
pub struct BaseModelRecord {
    pub name: Option<String>,
    pub revision: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hub: Option<HubOrigin>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<ModelFile>>,
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
    /// The weight each of those adapters had in this module, in the same
    /// order: the global weights, a `--weights-file` rule's, or `fit`'s.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub weights: Vec<f64>,
}

/// One point of a loss curve.
#[derive(Debug, Clone, Serialize)]
pub struct LossPoint {
    pub step: usize,
    pub train_loss: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_accuracy: Option<f64>,
}

/// A labelled-examples file as it was read.
#[derive(Debug, Serialize)]
pub struct DataRecord {
    pub path: PathBuf,
    pub sha256: String,
    pub count: usize,
    /// `fit`: 0-based positions of the training examples.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train: Option<Vec<usize>>,
    /// `fit`: 0-based positions of the held-out examples.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation: Option<Vec<usize>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub indices: Option<&'static str>,
}

/// A held-out loss (and accuracy, when classifying).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Score {
    pub loss: Option<f64>,
    pub accuracy: Option<f64>,
}

/// Held-out scores of the base model, step 0 (the uniform merge) and the
/// kept step.
#[derive(Debug, Serialize)]
pub struct Validation {
    pub base: Option<Score>,
    pub uniform: Score,
    pub learned: Score,
}

/// The learned weights of one group (module, layer or the whole model).
#[derive(Debug, Serialize)]
pub struct GroupWeights {
    pub group: String,
    pub weights: Vec<f64>,
}

/// `fit`'s settings.
#[derive(Debug, Serialize)]
pub struct FitHyperParameters {
    pub steps: usize,
    pub lr: f64,
    pub head_lr: f64,
    pub batch_size: usize,
    pub val_fraction: f64,
    pub granularity: String,
    pub head: Option<String>,
    pub prototype_scale: Option<f64>,
    pub max_length: usize,
    pub optimizer: &'static str,
    /// Evaluations of the gradient-free search.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<usize>,
    pub softmax: &'static str,
}

/// What `fit` did: shots, split, settings, seed, device, loss curve, kept
/// step, held-out scores and the learned weights of every group.
#[derive(Debug, Serialize)]
pub struct FitRecord {
    pub task: &'static str,
    pub shots: DataRecord,
    pub hyper_parameters: FitHyperParameters,
    pub seed: u64,
    pub device: String,
    pub threads: i32,
    pub base_model: BaseModelRecord,
    pub loss_curve: Vec<LossPoint>,
    pub best_step: usize,
    /// Why no step was taken and the uniform merge was kept, when so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub untrained: Option<&'static str>,
    pub validation: Validation,
    pub groups: Vec<GroupWeights>,
    pub train_seconds: f64,
}

/// `train`'s settings.
#[derive(Debug, Serialize)]
pub struct TrainHyperParameters {
    pub rank: usize,
    pub alpha: f64,
    pub target_modules: Vec<String>,
    pub steps: usize,
    pub lr: f64,
    pub head_lr: f64,
    pub batch_size: usize,
    /// Share of the examples held out to choose the step kept (0: none).
    pub val_fraction: f64,
    pub max_length: usize,
    pub head: Option<String>,
    pub init: &'static str,
    pub optimizer: &'static str,
}

/// What `train` did: data, settings, seed, device, loss curve.
#[derive(Debug, Serialize)]
pub struct TrainingRecord {
    pub task: &'static str,
    pub data: DataRecord,
    pub hyper_parameters: TrainHyperParameters,
    pub seed: u64,
    pub device: String,
    pub threads: i32,
    pub trainable_parameters: usize,
    pub loss_curve: Vec<LossPoint>,
    /// The step whose parameters were written: the lowest held-out loss,
    /// or the last step when nothing was held out.
    pub best_step: usize,
    pub train_seconds: f64,
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
