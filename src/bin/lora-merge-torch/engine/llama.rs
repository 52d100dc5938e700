//! Llama-family decoders (Llama, Mistral, Qwen2), as transformers computes
//! them: RMSNorm, rotary embeddings (with linear or llama3 scaling),
//! grouped-query attention with a causal (and, for Mistral, sliding-window)
//! mask, and a SiLU-gated MLP.

use lora_merge::checkpoint::{LlamaConfig, RopeScaling};
use lora_merge::Result;
use tch::{Kind, Tensor};

use super::lora::{Linear, LoraBank};
use super::{accumulate, Loader};

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
}

struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

struct Layer {
    input_norm: Tensor,
    attn: Attention,
    post_norm: Tensor,
    mlp: Mlp,
}

pub struct Llama {
    cfg: LlamaConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    /// None when tied to the embeddings.
    lm_head: Option<Linear>,
    /// [head_dim / 2] in f32, as transformers computes it.
    inv_freq: Tensor,
}

/// The rotary inverse frequencies, with transformers' scaling rules.
pub fn inv_freq(cfg: &LlamaConfig) -> Vec<f32> {
    let dim = cfg.head_dim;
    let base: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| 1.0 / (cfg.rope_theta as f32).powf(i as f32 / dim as f32))
        .collect();
    match cfg.rope_scaling {
        None => base,
        Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor as f32).collect(),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        }) => {
            let (factor, low, high, old) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
                old as f32,
            );
            let low_wavelen = old / low;
            let high_wavelen = old / high;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let x1 = x.narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    Tensor::cat(&[-x2, x1], 3)
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let var = x.pow_tensor_scalar(2).mean_dim(-1, true, None);
    w * (x * (var + eps).rsqrt())
}

impl Llama {
    pub fn load(cfg: &LlamaConfig, ld: &Loader, bank: &mut LoraBank) -> Result<Llama> {
        let (h, nh, nkv, hd, inter) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.intermediate_size,
        );
        let linear = |bank: &mut LoraBank, name: &str, out: usize, inp: usize, bias: bool| {
            let w = ld.get(&format!("{name}.weight"), &[out, inp])?;
            let b = ld.bias(&format!("{name}.bias"), out, bias)?;
            let t = bank.trainable(name, out, inp)?;
            Ok::<_, lora_merge::Error>(
                Linear::new(w, b, bank.take(name, out, inp)?).with_trainable(t),
            )
        };
        let embed = ld.get("embed_tokens.weight", &[cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("layers.{i}");
            let attn = Attention {
                q: linear(
                    bank,
                    &format!("{p}.self_attn.q_proj"),
                    nh * hd,
                    h,
                    cfg.qkv_bias,
                )?,
                k: linear(
                    bank,
                    &format!("{p}.self_attn.k_proj"),
                    nkv * hd,
                    h,
                    cfg.qkv_bias,
                )?,
                v: linear(
                    bank,
                    &format!("{p}.self_attn.v_proj"),
                    nkv * hd,
                    h,
                    cfg.qkv_bias,
                )?,
                o: linear(
                    bank,
                    &format!("{p}.self_attn.o_proj"),
                    h,
                    nh * hd,
                    cfg.o_bias,
                )?,
            };
            let mlp = Mlp {
                gate: linear(bank, &format!("{p}.mlp.gate_proj"), inter, h, cfg.mlp_bias)?,
                up: linear(bank, &format!("{p}.mlp.up_proj"), inter, h, cfg.mlp_bias)?,
                down: linear(bank, &format!("{p}.mlp.down_proj"), h, inter, cfg.mlp_bias)?,
            };
            layers.push(Layer {
                input_norm: ld.get(&format!("{p}.input_layernorm.weight"), &[h])?,
                attn,
                post_norm: ld.get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                mlp,
            });
        }
        let norm = ld.get("norm.weight", &[h])?;
        // The head sits outside the backbone's prefix.
        let head = Loader {
            prefix: String::new(),
            ..*ld
        };
        let lm_head = if cfg.tie_word_embeddings {
            if bank.take("lm_head", cfg.vocab_size, h)?.is_some() {
                return Err(lora_merge::Error::Incompatible(
                    "an adapter adapts lm_head, which this model ties to its embeddings; \
                     composing it is not supported"
                        .into(),
                ));
            }
            None
        } else {
            Some(linear_abs(&head, bank, "lm_head", cfg.vocab_size, h)?)
        };
        Ok(Llama {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
            inv_freq: Tensor::from_slice(&inv_freq(cfg)).to_device(ld.device),
        })
    }

    /// Logits [B, T, vocab] for right-padded `ids` [B, T] with
    /// `mask` [B, T] (1 = token, 0 = padding).
    // `x = x + f(x)`, not `x += f(x)`: tch's `+=` adds in place, which would
    // overwrite a tensor autograd still needs.
    #[allow(clippy::assign_op_pattern)]
    pub fn forward(&self, ids: &Tensor, mask: &Tensor, mix: &[Tensor]) -> Tensor {
        let (b, t) = (ids.size()[0], ids.size()[1]);
        let kind = self.embed.kind();
        let device = self.embed.device();
        let mut x = Tensor::embedding(&self.embed, ids, -1, false, false);

        // Rotary tables, computed in f32 as transformers does.
        let pos = Tensor::arange(t, (Kind::Float, device));
        let freqs = pos.outer(&self.inv_freq);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        let cos = emb.cos().to_kind(kind).view([1, 1, t, -1]);
        let sin = emb.sin().to_kind(kind).view([1, 1, t, -1]);

        // Additive mask [B, 1, T, T]: causal, padding, sliding window.
        let i = Tensor::arange(t, (Kind::Int64, device)).view([t, 1]);
        let j = Tensor::arange(t, (Kind::Int64, device)).view([1, t]);
        let mut allowed = j.le_tensor(&i);
        if let Some(w) = self.cfg.sliding_window {
            allowed = allowed.logical_and(&(&i - &j).lt(w as i64));
        }
        let allowed = allowed
            .view([1, 1, t, t])
            .logical_and(&mask.view([b, 1, 1, t]).gt(0));
        let neg = Tensor::full([1], f64::from(f32::MIN), (kind, device));
        let zero = Tensor::zeros([1], (kind, device));
        let bias = zero.where_self(&allowed, &neg);

        let (nh, nkv, hd) = (
            self.cfg.num_attention_heads as i64,
            self.cfg.num_key_value_heads as i64,
            self.cfg.head_dim as i64,
        );
        let scale = (hd as f64).powf(-0.5);
        let eps = self.cfg.rms_norm_eps;
        for layer in &self.layers {
            let h = rms_norm(&x, &layer.input_norm, eps);
            let a = &layer.attn;
            let q = a.q.forward(&h, mix).view([b, t, nh, hd]).transpose(1, 2);
            let k = a.k.forward(&h, mix).view([b, t, nkv, hd]).transpose(1, 2);
            let v = a.v.forward(&h, mix).view([b, t, nkv, hd]).transpose(1, 2);
            let q = &q * &cos + rotate_half(&q) * &sin;
            let k = &k * &cos + rotate_half(&k) * &sin;
            let rep = nh / nkv;
            let (k, v) = if rep > 1 {
                (
                    k.repeat_interleave_self_int(rep, 1, None),
                    v.repeat_interleave_self_int(rep, 1, None),
                )
            } else {
                (k, v)
            };
            let scores = q.matmul(&k.transpose(-2, -1)) * scale + &bias;
            let probs = scores.softmax(-1, accumulate(kind)).to_kind(kind);
            let ctx = probs
                .matmul(&v)
                .transpose(1, 2)
                .contiguous()
                .view([b, t, nh * hd]);
            x = x + a.o.forward(&ctx, mix);
            let h = rms_norm(&x, &layer.post_norm, eps);
            let m = &layer.mlp;
            let act = m.gate.forward(&h, mix).silu() * m.up.forward(&h, mix);
            x = x + m.down.forward(&act, mix);
        }
        let x = rms_norm(&x, &self.norm, eps);
        match &self.lm_head {
            Some(head) => head.forward(&x, mix),
            None => x.linear::<Tensor>(&self.embed, None),
        }
    }
}

fn linear_abs(
    ld: &Loader,
    bank: &mut LoraBank,
    name: &str,
    out: usize,
    inp: usize,
) -> Result<Linear> {
    let w = ld.get(&format!("{name}.weight"), &[out, inp])?;
    let t = bank.trainable(name, out, inp)?;
    Ok(Linear::new(w, None, bank.take(name, out, inp)?).with_trainable(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(scaling: Option<RopeScaling>) -> LlamaConfig {
        LlamaConfig {
            vocab_size: 10,
            hidden_size: 64,
            intermediate_size: 8,
            num_hidden_layers: 1,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            rms_norm_eps: 1e-5,
            rope_theta: 500000.0,
            rope_scaling: scaling,
            max_position_embeddings: 64,
            tie_word_embeddings: false,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            sliding_window: None,
        }
    }

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let plain = inv_freq(&cfg(None));
        let scaled = inv_freq(&cfg(Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 32.0,
        })));
        // Wavelength 2π/f below 32/4 = 8 positions: unchanged.
        assert_eq!(plain[0], scaled[0]);
        assert!(2.0 * std::f32::consts::PI / plain[0] < 8.0);
        // Wavelength above 32 positions: divided by the factor.
        let last = plain.len() - 1;
        assert!(2.0 * std::f32::consts::PI / plain[last] > 32.0);
        assert!((scaled[last] - plain[last] / 8.0).abs() <= f32::EPSILON * plain[last]);
        let lin = inv_freq(&cfg(Some(RopeScaling::Linear { factor: 2.0 })));
        assert_eq!(lin[3], plain[3] / 2.0);
    }
}
