//! Training on labelled examples, shared by `fit` (composition weights)
//! and `train` (a new LoRA): the examples and their split, the losses and
//! heads, and one step loop. Uses the model engine; knows nothing of
//! command lines.

pub mod data;
pub mod heads;
pub mod losses;
pub mod split;
pub mod steps;

pub use data::{load_shots, open_base, resolve_task, Shots, Tokenized};
pub use losses::{Trainer, PROTO_SCALE};

use lora_merge::{Error, Result};

/// The largest learning rate accepted: libtorch's Adam keeps its state in
/// f32 and scales the rate by up to 10 in its first steps, so larger rates
/// overflow inside the optimiser instead of training.
pub const MAX_RATE: f64 = 1e30;

/// A learning rate (`--lr`, `--head-lr`) the optimiser can use.
pub fn check_rate(flag: &str, value: f64) -> Result<()> {
    if value > 0.0 && value <= MAX_RATE {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "{flag} {value}: a learning rate must be a positive number no larger than {MAX_RATE:e} \
             (values around 1e-3 to 1e-1 are usual)"
        )))
    }
}

/// The most optimisation steps a run may take: every step is a point of the
/// loss curve kept in memory and written to the manifest, and a few-shot run
/// needs hundreds, not millions.
pub const MAX_STEPS: usize = 1_000_000;

/// `--steps` within 1..=[`MAX_STEPS`].
pub fn check_steps(steps: usize) -> Result<()> {
    if (1..=MAX_STEPS).contains(&steps) {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "--steps {steps}: use 1 to {MAX_STEPS} (a few hundred is usual for few-shot data)"
        )))
    }
}
