//! The losses `fit`, `train` and `eval` compute: completion-token NLL for
//! causal LMs; for classification, cosine similarity to class prototypes
//! (episodic, leave-one-out while training) or a linear head.

use tch::{nn, Kind, Tensor};

use super::data::{Shots, Tokenized};
use super::heads::Head;
use crate::engine::tokenize::{pad, Tok};
use crate::engine::{accumulate, Model};
use lora_merge::Result;

/// Cosine similarities are multiplied by this before the softmax of the
/// classification losses (a temperature of 0.1): plain cosines in [-1, 1]
/// give near-uniform class probabilities and weak gradients. The linear
/// head starts at this multiple of the prototypes, so the two heads agree
/// at step 0.
pub const PROTO_SCALE: f64 = 10.0;

/// Summed negative log-likelihood of the scored tokens of a batch, and how
/// many tokens that is. Differentiable with respect to `mix`.
pub fn causal_nll(model: &Model, batch: &[&Tokenized], mix: &[Tensor]) -> (Tensor, usize) {
    let seqs: Vec<&[i64]> = batch.iter().map(|t| t.ids.as_slice()).collect();
    let (ids, mask) = pad(&seqs, model.device);
    let t = ids.size()[1];
    // Position p predicts token p + 1: targets are ids[:, 1:].
    // Every example has at least two tokens (one scored), so t >= 2.
    let w = t as usize - 1;
    let mut scored = vec![0f32; batch.len() * w];
    let mut count = 0;
    for (r, ex) in batch.iter().enumerate() {
        for p in ex.scored..ex.ids.len() {
            scored[r * w + p - 1] = 1.0;
            count += 1;
        }
    }
    let weight = Tensor::from_slice(&scored)
        .view([batch.len() as i64, t - 1])
        .to_device(model.device);
    let logits = model.forward(&ids, &mask, mix);
    let logp = logits
        .narrow(1, 0, t - 1)
        .log_softmax(-1, accumulate(logits.kind()));
    let target = ids.narrow(1, 1, t - 1).unsqueeze(-1);
    let nll = -logp.gather(2, &target, false).squeeze_dim(-1);
    ((nll * weight).sum(Kind::Double), count)
}

/// Embeddings [n, H] of `texts`, in batches.
pub fn embed_texts(
    model: &Model,
    tok: &Tok,
    texts: &[&str],
    batch_size: usize,
    mix: &[Tensor],
    bar: &indicatif::ProgressBar,
) -> Result<Tensor> {
    let mut out = Vec::new();
    for chunk in texts.chunks(batch_size) {
        let ids: Vec<Vec<i64>> = chunk
            .iter()
            .map(|t| tok.encode(t, true))
            .collect::<Result<_>>()?;
        let seqs: Vec<&[i64]> = ids.iter().map(Vec::as_slice).collect();
        let (ids, mask) = pad(&seqs, model.device);
        out.push(model.embed(&ids, &mask, mix));
        bar.inc(1);
    }
    Ok(Tensor::cat(&out, 0))
}

/// The class prototypes [C, H]: each class's mean embedding, unit length
/// (zero for a class absent from `y`). The one prototype function of
/// `eval`, `fit` and `train`.
pub fn class_means(emb: &Tensor, y: &Tensor, classes: i64) -> Tensor {
    let onehot = y.one_hot(classes).to_kind(emb.kind());
    let sums = onehot.tr().matmul(emb);
    let norm = sums.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12);
    sums / norm
}

/// Cosine of each example to every class prototype, where its own class's
/// prototype leaves it out (when that class has another example in the
/// batch), so the loss cannot be lowered by an example matching itself.
/// Classes absent from the batch get a very low score.
pub fn episodic_scores(emb: &Tensor, y: &Tensor, classes: i64) -> Tensor {
    let kind = emb.kind();
    let onehot = y.one_hot(classes).to_kind(kind); // [B, C]
    let sums = onehot.tr().matmul(emb); // [C, H]
    let counts = onehot.sum_dim_intlist(0, false, None); // [C]
    let unit = |t: &Tensor| t / t.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12);
    let all = emb.matmul(&unit(&sums).tr()); // [B, C]
    let own_sum = sums.index_select(0, y); // [B, H]
    let own_count = counts.index_select(0, y); // [B]
    let alone = own_count.le(1.0).unsqueeze(-1);
    let loo = own_sum
        .shallow_clone()
        .where_self(&alone, &(&own_sum - emb));
    let own = (emb * unit(&loo)).sum_dim_intlist(-1, false, None); // [B]
    let scores = &all * (1.0 - &onehot) + own.unsqueeze(-1) * &onehot;
    let absent = counts.eq(0.0).unsqueeze(0);
    let floor = Tensor::full([1], -1e4, (kind, emb.device()));
    floor.where_self(&absent, &scores)
}

/// A model, the examples, and (with `--head linear`) the head: the losses
/// of a run, for whatever is being trained.
pub struct Trainer<'a> {
    pub model: &'a Model,
    pub shots: Shots,
    pub head: Option<Head>,
}

impl Trainer<'_> {
    fn batch_ids(&self, idx: &[usize]) -> (Tensor, Tensor) {
        let Shots::Classify { ids, .. } = &self.shots else {
            unreachable!("classification batches only")
        };
        let seqs: Vec<&[i64]> = idx.iter().map(|&i| ids[i].as_slice()).collect();
        pad(&seqs, self.model.device)
    }

    pub fn labels_of(&self, idx: &[usize]) -> Tensor {
        let Shots::Classify { y, .. } = &self.shots else {
            unreachable!("classification batches only")
        };
        let v: Vec<i64> = idx.iter().map(|&i| y[i]).collect();
        Tensor::from_slice(&v).to_device(self.model.device)
    }

    pub fn n_classes(&self) -> i64 {
        match &self.shots {
            Shots::Classify { labels, .. } => labels.len() as i64,
            Shots::Causal(_) => 0,
        }
    }

    pub fn embed(&self, idx: &[usize], mix: &[Tensor]) -> Tensor {
        let (ids, mask) = self.batch_ids(idx);
        self.model.embed(&ids, &mask, mix)
    }

    /// Embeddings of `idx` in batches of `batch`.
    fn embed_all(&self, idx: &[usize], mix: &[Tensor], batch: usize) -> Tensor {
        let parts: Vec<Tensor> = idx.chunks(batch).map(|c| self.embed(c, mix)).collect();
        Tensor::cat(&parts, 0)
    }

    /// The class prototypes of the examples `idx`, without gradients.
    pub fn prototypes(&self, idx: &[usize], mix: &[Tensor], batch: usize) -> Tensor {
        let _g = tch::no_grad_guard();
        class_means(
            &self.embed_all(idx, mix, batch),
            &self.labels_of(idx),
            self.n_classes(),
        )
    }

    /// Cross-entropy of the embeddings `emb` of the examples `idx` against
    /// their labels: through the head, or episodic prototype scores.
    fn classify_loss(&self, emb: &Tensor, idx: &[usize]) -> Tensor {
        let y = self.labels_of(idx);
        let scores = match &self.head {
            Some(h) => emb.linear(&h.w, Some(&h.b)),
            None => episodic_scores(emb, &y, self.n_classes()) * PROTO_SCALE,
        };
        scores.to_kind(Kind::Float).cross_entropy_for_logits(&y)
    }

    /// Training loss on `idx` (differentiable).
    pub fn train_loss(&self, idx: &[usize], mix: &[Tensor]) -> Tensor {
        match &self.shots {
            Shots::Causal(toks) => {
                let batch: Vec<&Tokenized> = idx.iter().map(|&i| &toks[i]).collect();
                let (nll, n) = causal_nll(self.model, &batch, mix);
                nll / n as f64
            }
            Shots::Classify { .. } => self
                .classify_loss(&self.embed(idx, mix), idx)
                .to_kind(Kind::Double),
        }
    }

    /// The training loss on `idx` as [`Trainer::train_loss`] computes it
    /// on one batch of them all, without gradients, embedding in batches of
    /// `batch` (what a gradient-free search evaluates).
    pub fn loss_value(&self, idx: &[usize], mix: &[Tensor], batch: usize) -> f64 {
        let _g = tch::no_grad_guard();
        match &self.shots {
            Shots::Causal(toks) => {
                let (mut total, mut n) = (0.0, 0usize);
                for chunk in idx.chunks(batch) {
                    let b: Vec<&Tokenized> = chunk.iter().map(|&i| &toks[i]).collect();
                    let (nll, k) = causal_nll(self.model, &b, mix);
                    total += nll.double_value(&[]);
                    n += k;
                }
                total / n as f64
            }
            Shots::Classify { .. } => self
                .classify_loss(&self.embed_all(idx, mix, batch), idx)
                .double_value(&[]),
        }
    }

    /// Loss (and accuracy) on held-out `val`, without gradients. For
    /// prototypes, the classes are the training shots' mean embeddings.
    pub fn val_loss(
        &self,
        train: &[usize],
        val: &[usize],
        mix: &[Tensor],
        batch: usize,
    ) -> (f64, Option<f64>) {
        let _g = tch::no_grad_guard();
        match &self.shots {
            Shots::Causal(_) => (self.loss_value(val, mix, batch), None),
            Shots::Classify { .. } => {
                let v_emb = self.embed_all(val, mix, batch);
                let scores = match &self.head {
                    Some(h) => v_emb.linear(&h.w, Some(&h.b)),
                    None => v_emb.matmul(&self.prototypes(train, mix, batch).tr()) * PROTO_SCALE,
                };
                let y = self.labels_of(val);
                let loss = scores
                    .to_kind(Kind::Float)
                    .cross_entropy_for_logits(&y)
                    .double_value(&[]);
                let right = scores
                    .argmax(-1, false)
                    .eq_tensor(&y)
                    .sum(Kind::Int64)
                    .int64_value(&[]);
                (loss, Some(right as f64 / val.len() as f64))
            }
        }
    }

    /// One optimisation step on `loss`: `opt` and the head's own optimiser.
    pub fn apply(&mut self, loss: &Tensor, opt: &mut nn::Optimizer) {
        opt.zero_grad();
        if let Some(h) = self.head.as_mut() {
            h.opt.zero_grad();
        }
        loss.backward();
        opt.step();
        if let Some(h) = self.head.as_mut() {
            h.opt.step();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn episodic_scores_leave_the_example_out_of_its_own_prototype() {
        let emb = Tensor::from_slice(&[1.0f64, 0.0, 0.6, 0.8, 0.0, 1.0]).view([3, 2]);
        let y = Tensor::from_slice(&[0i64, 0, 1]);
        let s = episodic_scores(&emb, &y, 3);
        let v: Vec<f64> = Vec::try_from(s.flatten(0, -1)).unwrap();
        // Example 0's own prototype is example 1 alone: cos = 0.6.
        assert!((v[0] - 0.6).abs() < 1e-12);
        // Example 2 is alone in class 1: its prototype is itself.
        assert!((v[2 * 3 + 1] - 1.0).abs() < 1e-12);
        // Class 2 has no example in the batch.
        assert!(v[2] < -1e3 && v[5] < -1e3 && v[8] < -1e3);
    }

    #[test]
    fn class_means_are_unit_mean_directions() {
        let emb = Tensor::from_slice(&[3.0f64, 0.0, 1.0, 2.0, 0.0, 5.0]).view([3, 2]);
        let y = Tensor::from_slice(&[0i64, 0, 1]);
        let p: Vec<f64> = Vec::try_from(class_means(&emb, &y, 3).flatten(0, -1)).unwrap();
        // Class 0: mean (2, 1) / sqrt(5); class 1: (0, 1); class 2: absent, zero.
        let s5 = 5f64.sqrt();
        let want = [2.0 / s5, 1.0 / s5, 0.0, 1.0, 0.0, 0.0];
        for (g, w) in p.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{p:?}");
        }
    }
}
