//! Which examples train and which are held out: seeded, stratified by
//! class for classification.

use std::collections::BTreeMap;

use lora_merge::rng::Rng;

use super::Shots;

/// Held-out indices: causal-lm none below 4 shots, else round(n * f), at
/// least 1 and leaving at least 1 for training.
pub fn plain(n: usize, frac: f64, rng: &mut Rng) -> (Vec<usize>, Vec<usize>) {
    let mut idx: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut idx);
    let n_val = if n < 4 || frac <= 0.0 {
        0
    } else {
        ((n as f64 * frac).round() as usize).clamp(1, n - 1)
    };
    let mut val = idx[..n_val].to_vec();
    let mut train = idx[n_val..].to_vec();
    train.sort_unstable();
    val.sort_unstable();
    (train, val)
}

/// The split of a task's examples: [`plain`] for causal-lm, [`stratified`]
/// by label for classify. `fit` and `train --val-fraction` both split so,
/// and with the same seed they hold out the same examples.
pub fn shots(shots: &Shots, frac: f64, rng: &mut Rng) -> (Vec<usize>, Vec<usize>) {
    match shots {
        Shots::Causal(t) => plain(t.len(), frac, rng),
        Shots::Classify { y, labels, .. } => {
            let names: Vec<String> = y.iter().map(|&i| labels[i as usize].clone()).collect();
            stratified(&names, frac, rng)
        }
    }
}

/// Per class: floor(k * f) held out, always leaving one training shot.
pub fn stratified(labels: &[String], frac: f64, rng: &mut Rng) -> (Vec<usize>, Vec<usize>) {
    let mut by_label: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, l) in labels.iter().enumerate() {
        by_label.entry(l).or_default().push(i);
    }
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (_, mut idx) in by_label {
        rng.shuffle(&mut idx);
        let k = idx.len();
        let n_val = ((k as f64 * frac.max(0.0)).floor() as usize).min(k - 1);
        val.extend_from_slice(&idx[..n_val]);
        train.extend_from_slice(&idx[n_val..]);
    }
    train.sort_unstable();
    val.sort_unstable();
    (train, val)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_are_seeded_and_keep_a_training_shot_per_class() {
        let labels: Vec<String> = ["a", "a", "a", "a", "b", "c", "c"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (train, val) = stratified(&labels, 0.5, &mut Rng(1));
        // a: floor(4 * 0.5) = 2; b: 1 shot, kept for training; c: 1.
        assert_eq!(val.len(), 3);
        assert_eq!(train.len() + val.len(), 7);
        for l in ["a", "b", "c"] {
            assert!(
                train.iter().any(|&i| labels[i] == l),
                "{l} has no training shot"
            );
        }
        assert_eq!(stratified(&labels, 0.5, &mut Rng(1)), (train, val));
        let (t, v) = plain(3, 0.25, &mut Rng(0));
        assert_eq!((t.len(), v.len()), (3, 0));
        let (t, v) = plain(10, 0.25, &mut Rng(0));
        assert_eq!((t.len(), v.len()), (7, 3));
    }
}
