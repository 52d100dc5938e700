//! The one step loop of `fit` and `train`: batches in a seeded order, the
//! loss curve, held-out scoring, the step kept, a progress bar, and a
//! clear refusal when the loss diverges.

use lora_merge::output::manifest::LossPoint;
use lora_merge::rng::Rng;
use lora_merge::ui::progress;
use lora_merge::{Error, Result};
use tch::Tensor;

/// What is trained, seen from the loop.
pub trait Objective {
    /// The differentiable training loss on `batch` at the current parameters.
    fn loss(&mut self, batch: &[usize]) -> Tensor;
    /// Held-out loss (and accuracy) at the current parameters; None when
    /// nothing is held out.
    fn held_out(&mut self) -> Option<(f64, Option<f64>)>;
    /// Remember the current parameters as the ones to keep.
    fn keep(&mut self, step: usize);
    /// One optimisation step on `loss`.
    fn step(&mut self, loss: &Tensor);
}

/// How long and on what.
pub struct Plan<'a> {
    /// Optimisation steps; the loop scores steps + 1 points (0 is the start).
    pub steps: usize,
    pub batch_size: usize,
    /// Indices of the training examples.
    pub train: &'a [usize],
    /// The learning-rate flag and its value, for the message when the loss
    /// diverges.
    pub lr: (&'static str, f64),
    /// The progress bar's label.
    pub label: &'static str,
}

/// The loss curve and the step whose parameters were kept.
#[derive(Debug)]
pub struct Outcome {
    pub curve: Vec<LossPoint>,
    pub best_step: usize,
}

/// Score step 0, then take `steps` steps, scoring after each. With held-out
/// examples the kept step has the lowest held-out loss (the earliest on
/// ties); without, the last.
pub fn run(plan: &Plan, rng: &mut Rng, obj: &mut impl Objective) -> Result<Outcome> {
    let train = plan.train;
    let bar = progress(plan.steps as u64 + 1, plan.label);
    let mut order: Vec<usize> = train.to_vec();
    let mut cursor = order.len();
    let mut curve: Vec<LossPoint> = Vec::with_capacity(plan.steps + 1);
    let mut best: Option<(f64, usize)> = None;
    for step in 0..=plan.steps {
        let batch: Vec<usize> = if train.len() <= plan.batch_size {
            train.to_vec()
        } else {
            if cursor + plan.batch_size > order.len() {
                rng.shuffle(&mut order);
                cursor = 0;
            }
            cursor += plan.batch_size;
            order[cursor - plan.batch_size..cursor].to_vec()
        };
        let held = obj.held_out();
        let loss = obj.loss(&batch);
        let train_loss = loss.double_value(&[]);
        if !train_loss.is_finite() {
            let (flag, lr) = plan.lr;
            return Err(Error::Diverged(format!(
                "the training loss became {train_loss} at step {step} of {}: with {flag} {lr} \
                 the steps are too large for this model and data; try a smaller {flag} (say \
                 {}); nothing was written",
                plan.steps,
                lr / 10.0
            )));
        }
        curve.push(LossPoint {
            step,
            train_loss,
            val_loss: held.map(|h| h.0),
            val_accuracy: held.and_then(|h| h.1),
        });
        let better = match (held, best) {
            (None, _) | (_, None) => true,
            (Some((v, _)), Some((b, _))) => v < b,
        };
        if better {
            best = Some((held.map_or(f64::NEG_INFINITY, |h| h.0), step));
            obj.keep(step);
        }
        bar.set_message(format!("loss {train_loss:.4}"));
        bar.inc(1);
        if step < plan.steps {
            obj.step(&loss);
        }
    }
    bar.finish_and_clear();
    let best_step = best.map_or(plan.steps, |b| b.1);
    Ok(Outcome { curve, best_step })
}

/// The loss curve as a small table: every step up to 25, else 20 steps
/// evenly spread plus the kept one.
pub fn curve_table(curve: &[LossPoint], best: usize) -> String {
    let last = curve.len().saturating_sub(1);
    let mut steps: Vec<usize> = if curve.len() <= 25 {
        (0..curve.len()).collect()
    } else {
        (0..20).map(|i| i * last / 19).collect()
    };
    steps.push(best);
    steps.sort_unstable();
    steps.dedup();
    let mut s = String::from("  step  train loss  held-out loss");
    for &i in &steps {
        let Some(p) = curve.get(i) else { continue };
        let v = p.val_loss.map_or("-".to_string(), |v| format!("{v:.4}"));
        let mark = if i == best { "  <- kept" } else { "" };
        s.push_str(&format!(
            "\n{:>6}  {:>10.4}  {:>13}{mark}",
            p.step, p.train_loss, v
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A quadratic in one number: loss (x - 3)^2 on every batch, held-out
    /// loss |x - 2| so the kept step is the one nearest 2.
    struct Toy {
        x: f64,
        lr: f64,
        kept: Option<(usize, f64)>,
        held: bool,
        seen: Vec<Vec<usize>>,
    }

    impl Objective for Toy {
        fn loss(&mut self, batch: &[usize]) -> Tensor {
            self.seen.push(batch.to_vec());
            Tensor::from((self.x - 3.0) * (self.x - 3.0))
        }
        fn held_out(&mut self) -> Option<(f64, Option<f64>)> {
            self.held.then(|| ((self.x - 2.0).abs(), None))
        }
        fn keep(&mut self, step: usize) {
            self.kept = Some((step, self.x));
        }
        fn step(&mut self, _loss: &Tensor) {
            self.x += self.lr * 2.0 * (3.0 - self.x);
        }
    }

    fn toy(held: bool, lr: f64) -> Toy {
        Toy {
            x: 0.0,
            lr,
            kept: None,
            held,
            seen: Vec::new(),
        }
    }

    #[test]
    fn scores_every_step_and_keeps_the_best_held_out() {
        let train: Vec<usize> = (0..10).collect();
        let plan = Plan {
            steps: 6,
            batch_size: 4,
            train: &train,
            lr: ("--lr", 0.25),
            label: "test",
        };
        let mut t = toy(true, 0.25);
        let out = run(&plan, &mut Rng(0), &mut t).unwrap();
        assert_eq!(out.curve.len(), 7);
        // x: 0, 1.5, 2.25, 2.625, ...: 2.25 (step 2) is nearest 2.
        assert_eq!(out.best_step, 2);
        assert_eq!(t.kept, Some((2, 2.25)));
        assert_eq!(out.curve[0].train_loss, 9.0);
        // Batches of 4 cover each pass over the 10 examples without repeats.
        assert!(t.seen.iter().all(|b| b.len() == 4));
        let first_pass: std::collections::BTreeSet<usize> =
            t.seen[..2].iter().flatten().copied().collect();
        assert_eq!(first_pass.len(), 8);
        // Same seed, same batches.
        let mut again = toy(true, 0.25);
        run(&plan, &mut Rng(0), &mut again).unwrap();
        assert_eq!(again.seen, t.seen);

        let mut t = toy(false, 0.25);
        let out = run(&plan, &mut Rng(0), &mut t).unwrap();
        assert_eq!(out.best_step, 6, "nothing held out: the last step");
        assert_eq!(t.kept.map(|k| k.0), Some(6));
    }

    #[test]
    fn a_diverging_loss_is_the_users_to_fix() {
        let train = [0usize];
        let plan = Plan {
            steps: 2000,
            batch_size: 1,
            train: &train,
            lr: ("--lr", 3.0),
            label: "test",
        };
        let e = run(&plan, &mut Rng(0), &mut toy(false, 3.0)).unwrap_err();
        assert_eq!(e.exit_code(), 1);
        let m = e.to_string();
        assert!(
            m.contains("try a smaller --lr") && m.contains("nothing was written"),
            "{m}"
        );
    }
}
