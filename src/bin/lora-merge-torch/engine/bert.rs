//! BERT encoders, as transformers computes them (post-LayerNorm blocks,
//! absolute positions, token types), and the sentence embedding used for
//! classification: mean pooling over real tokens, then L2 normalisation.

use lora_merge::checkpoint::config::{Activation, BertConfig};
use lora_merge::Result;
use tch::{Kind, Tensor};

use super::lora::{Linear, LoraBank};
use super::{accumulate, Loader};

struct Norm {
    w: Tensor,
    b: Tensor,
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    attn_out: Linear,
    attn_norm: Norm,
    inter: Linear,
    out: Linear,
    out_norm: Norm,
}

pub struct Bert {
    cfg: BertConfig,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    emb_norm: Norm,
    layers: Vec<Layer>,
}

impl Bert {
    pub fn load(cfg: &BertConfig, ld: &Loader, bank: &mut LoraBank) -> Result<Bert> {
        let h = cfg.hidden_size;
        let norm = |name: &str| -> Result<Norm> {
            Ok(Norm {
                w: ld.get(&format!("{name}.weight"), &[h])?,
                b: ld.get(&format!("{name}.bias"), &[h])?,
            })
        };
        let linear = |bank: &mut LoraBank, name: &str, out: usize, inp: usize| -> Result<Linear> {
            let w = ld.get(&format!("{name}.weight"), &[out, inp])?;
            let b = ld.get(&format!("{name}.bias"), &[out])?;
            let t = bank.trainable(name, out, inp)?;
            Ok(Linear::new(w, Some(b), bank.take(name, out, inp)?).with_trainable(t))
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            layers.push(Layer {
                q: linear(bank, &format!("{p}.attention.self.query"), h, h)?,
                k: linear(bank, &format!("{p}.attention.self.key"), h, h)?,
                v: linear(bank, &format!("{p}.attention.self.value"), h, h)?,
                attn_out: linear(bank, &format!("{p}.attention.output.dense"), h, h)?,
                attn_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                inter: linear(
                    bank,
                    &format!("{p}.intermediate.dense"),
                    cfg.intermediate_size,
                    h,
                )?,
                out: linear(bank, &format!("{p}.output.dense"), h, cfg.intermediate_size)?,
                out_norm: norm(&format!("{p}.output.LayerNorm"))?,
            });
        }
        Ok(Bert {
            cfg: cfg.clone(),
            word: ld.get("embeddings.word_embeddings.weight", &[cfg.vocab_size, h])?,
            position: ld.get(
                "embeddings.position_embeddings.weight",
                &[cfg.max_position_embeddings, h],
            )?,
            token_type: ld.get(
                "embeddings.token_type_embeddings.weight",
                &[cfg.type_vocab_size, h],
            )?,
            emb_norm: norm("embeddings.LayerNorm")?,
            layers,
        })
    }

    fn layer_norm(&self, x: &Tensor, n: &Norm) -> Tensor {
        let h = self.cfg.hidden_size as i64;
        x.layer_norm([h], Some(&n.w), Some(&n.b), self.cfg.layer_norm_eps, false)
    }

    fn act(&self, x: &Tensor) -> Tensor {
        match self.cfg.hidden_act {
            Activation::Gelu => x.gelu("none"),
            Activation::GeluTanh => x.gelu("tanh"),
            Activation::Relu => x.relu(),
        }
    }

    /// Last hidden states [B, T, H] for right-padded `ids` [B, T], `mask`
    /// [B, T] (1 = token), token type 0 throughout.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor, mix: &[Tensor]) -> Tensor {
        let (b, t) = (ids.size()[0], ids.size()[1]);
        let kind = self.word.kind();
        let device = self.word.device();
        let pos = Tensor::arange(t, (Kind::Int64, device));
        let x = Tensor::embedding(&self.word, ids, -1, false, false)
            + Tensor::embedding(&self.position, &pos, -1, false, false).unsqueeze(0)
            + self.token_type.get(0).view([1, 1, -1]);
        let mut x = self.layer_norm(&x, &self.emb_norm);

        let nh = self.cfg.num_attention_heads as i64;
        let hd = self.cfg.hidden_size as i64 / nh;
        let scale = (hd as f64).powf(-0.5);
        let neg = Tensor::full([1], f64::from(f32::MIN), (kind, device));
        let zero = Tensor::zeros([1], (kind, device));
        let bias = zero.where_self(&mask.view([b, 1, 1, t]).gt(0), &neg);
        let heads = |y: Tensor| y.view([b, t, nh, hd]).transpose(1, 2);
        for l in &self.layers {
            let q = heads(l.q.forward(&x, mix));
            let k = heads(l.k.forward(&x, mix));
            let v = heads(l.v.forward(&x, mix));
            let scores = q.matmul(&k.transpose(-2, -1)) * scale + &bias;
            let probs = scores.softmax(-1, accumulate(kind)).to_kind(kind);
            let ctx = probs
                .matmul(&v)
                .transpose(1, 2)
                .contiguous()
                .view([b, t, nh * hd]);
            x = self.layer_norm(&(l.attn_out.forward(&ctx, mix) + &x), &l.attn_norm);
            let inter = self.act(&l.inter.forward(&x, mix));
            x = self.layer_norm(&(l.out.forward(&inter, mix) + &x), &l.out_norm);
        }
        x
    }
}

/// Mean over real tokens, then unit length (sentence-transformers' recipe).
pub fn embed(hidden: &Tensor, mask: &Tensor) -> Tensor {
    let m = mask.to_kind(hidden.kind()).unsqueeze(-1);
    let summed = (hidden * &m).sum_dim_intlist(1, false, None);
    let count = m.sum_dim_intlist(1, false, None).clamp_min(1e-9);
    let mean = summed / count;
    let norm = mean.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12);
    mean / norm
}
