//! `config.json` of the architectures we run, read the way transformers
//! reads them (including transformers 5's `rope_parameters`).

use serde::Deserialize;
use serde_json::Value;

/// Causal decoders that share Llama's structure.
pub const LLAMA_FAMILY: &[&str] = &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];
/// Encoders read as BERT (the `bert.` wrapper prefix and task heads are
/// ignored; the encoder is what gets composed).
pub const BERT_FAMILY: &[&str] = &[
    "BertModel",
    "BertForMaskedLM",
    "BertForPreTraining",
    "BertForSequenceClassification",
];

/// The architecture of a base model, with its configuration.
#[derive(Debug, Clone)]
pub enum Arch {
    Llama {
        /// The class named in config.json, e.g. `Qwen2ForCausalLM`.
        name: String,
        config: LlamaConfig,
    },
    Bert {
        name: String,
        config: BertConfig,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q, k and v (Qwen2 always; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama with `attention_bias`).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Tokens further back than this are not attended to (Mistral).
    pub sliding_window: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: Activation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// The exact (erf) GELU, transformers' "gelu".
    Gelu,
    /// The tanh approximation: "gelu_new", "gelu_pytorch_tanh", "gelu_fast".
    GeluTanh,
    Relu,
}

impl Arch {
    pub fn name(&self) -> &str {
        match self {
            Arch::Llama { name, .. } | Arch::Bert { name, .. } => name,
        }
    }

    pub fn is_causal(&self) -> bool {
        matches!(self, Arch::Llama { .. })
    }

    pub fn hidden_size(&self) -> usize {
        match self {
            Arch::Llama { config, .. } => config.hidden_size,
            Arch::Bert { config, .. } => config.hidden_size,
        }
    }

    pub fn num_layers(&self) -> usize {
        match self {
            Arch::Llama { config, .. } => config.num_hidden_layers,
            Arch::Bert { config, .. } => config.num_hidden_layers,
        }
    }

    /// The longest input the model takes, in tokens.
    pub fn max_positions(&self) -> usize {
        match self {
            Arch::Llama { config, .. } => config.max_position_embeddings,
            Arch::Bert { config, .. } => config.max_position_embeddings,
        }
    }

    /// Parse config.json. The error says what is wrong (the caller adds the
    /// file name).
    pub fn from_config_json(text: &str) -> Result<Arch, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let archs: Vec<String> = v
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        let supported = || {
            format!(
                "supported: {} (causal LM), {} (encoders)",
                LLAMA_FAMILY.join(", "),
                BERT_FAMILY.join(", ")
            )
        };
        let name = match archs.first() {
            Some(a) => a.clone(),
            None => match model_type {
                "llama" => "LlamaForCausalLM".into(),
                "mistral" => "MistralForCausalLM".into(),
                "qwen2" => "Qwen2ForCausalLM".into(),
                "bert" => "BertModel".into(),
                "" => {
                    return Err(format!(
                        "names no architecture or model_type; {}",
                        supported()
                    ))
                }
                other => {
                    return Err(format!(
                        "model_type {other:?} is not supported; {}",
                        supported()
                    ))
                }
            },
        };
        if LLAMA_FAMILY.contains(&name.as_str()) {
            let config = llama_config(&v, &name)?;
            Ok(Arch::Llama { name, config })
        } else if BERT_FAMILY.contains(&name.as_str()) {
            let config = bert_config(&v)?;
            Ok(Arch::Bert { name, config })
        } else {
            Err(format!(
                "architecture {name} is not supported; {}",
                supported()
            ))
        }
    }
}

fn req_usize(v: &Value, key: &str) -> Result<usize, String> {
    v.get(key)
        .and_then(Value::as_u64)
        .filter(|&n| n > 0)
        .map(|n| n as usize)
        .ok_or_else(|| format!("{key} is missing or not a positive integer"))
}

fn opt_usize(v: &Value, key: &str) -> Result<Option<usize>, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .filter(|&n| n > 0)
            .map(|n| Some(n as usize))
            .ok_or_else(|| format!("{key} is not a positive integer")),
    }
}

fn opt_f64(v: &Value, key: &str) -> Result<Option<f64>, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .map(Some)
            .ok_or_else(|| format!("{key} is not a number")),
    }
}

fn opt_bool(v: &Value, key: &str) -> Result<Option<bool>, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_bool()
            .map(Some)
            .ok_or_else(|| format!("{key} is not true or false")),
    }
}

/// RoPE base and scaling: `rope_theta` + `rope_scaling` (transformers 4) or
/// `rope_parameters` (transformers 5), with `type` or `rope_type`.
fn rope(v: &Value) -> Result<(f64, Option<RopeScaling>), String> {
    let params = v.get("rope_parameters").filter(|p| p.is_object());
    let scaling = v.get("rope_scaling").filter(|p| p.is_object()).or(params);
    let theta = match params
        .map(|p| opt_f64(p, "rope_theta"))
        .transpose()?
        .flatten()
    {
        Some(t) => t,
        None => opt_f64(v, "rope_theta")?.unwrap_or(10_000.0),
    };
    if !(theta.is_finite() && theta > 0.0) {
        return Err(format!("rope_theta {theta} is not a positive number"));
    }
    let Some(s) = scaling else {
        return Ok((theta, None));
    };
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let factor = || -> Result<f64, String> {
        opt_f64(s, "factor")?
            .filter(|f| f.is_finite() && *f > 0.0)
            .ok_or_else(|| format!("rope scaling {kind:?} needs a positive factor"))
    };
    let scaling = match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear { factor: factor()? }),
        "llama3" => {
            let need = |k: &str| {
                opt_f64(s, k)?
                    .filter(|f| f.is_finite() && *f > 0.0)
                    .ok_or_else(|| format!("llama3 rope scaling needs a positive {k}"))
            };
            let (low, high) = (need("low_freq_factor")?, need("high_freq_factor")?);
            if high <= low {
                return Err("llama3 rope scaling needs high_freq_factor > low_freq_factor".into());
            }
            Some(RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: need("original_max_position_embeddings")?,
            })
        }
        other => {
            return Err(format!(
                "rope scaling type {other:?} is not supported (supported: default, linear, llama3)"
            ))
        }
    };
    Ok((theta, scaling))
}

fn llama_config(v: &Value, name: &str) -> Result<LlamaConfig, String> {
    let hidden_size = req_usize(v, "hidden_size")?;
    let heads = req_usize(v, "num_attention_heads")?;
    let kv_heads = opt_usize(v, "num_key_value_heads")?.unwrap_or(heads);
    if heads % kv_heads != 0 {
        return Err(format!(
            "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        ));
    }
    let head_dim = match opt_usize(v, "head_dim")? {
        Some(d) => d,
        None if hidden_size % heads == 0 => hidden_size / heads,
        None => {
            return Err(format!(
                "hidden_size {hidden_size} is not a multiple of num_attention_heads {heads} \
                 and no head_dim is given"
            ))
        }
    };
    if head_dim % 2 != 0 {
        return Err(format!(
            "head_dim {head_dim} is odd; rotary embeddings need it even"
        ));
    }
    let act = v
        .get("hidden_act")
        .and_then(Value::as_str)
        .unwrap_or("silu");
    if act != "silu" {
        return Err(format!(
            "hidden_act {act:?} is not supported for {name} (only silu)"
        ));
    }
    let (rope_theta, rope_scaling) = rope(v)?;
    let qwen2 = name == "Qwen2ForCausalLM";
    let attention_bias = opt_bool(v, "attention_bias")?.unwrap_or(false);
    let sliding_window = match name {
        "MistralForCausalLM" => opt_usize(v, "sliding_window")?,
        "Qwen2ForCausalLM" if opt_bool(v, "use_sliding_window")?.unwrap_or(false) => {
            return Err("Qwen2 with use_sliding_window is not supported".into())
        }
        _ => None,
    };
    Ok(LlamaConfig {
        vocab_size: req_usize(v, "vocab_size")?,
        hidden_size,
        intermediate_size: req_usize(v, "intermediate_size")?,
        num_hidden_layers: req_usize(v, "num_hidden_layers")?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: opt_f64(v, "rms_norm_eps")?.unwrap_or(1e-6),
        rope_theta,
        rope_scaling,
        max_position_embeddings: opt_usize(v, "max_position_embeddings")?.unwrap_or(2048),
        tie_word_embeddings: opt_bool(v, "tie_word_embeddings")?.unwrap_or(false),
        qkv_bias: qwen2 || attention_bias,
        o_bias: !qwen2 && attention_bias,
        mlp_bias: opt_bool(v, "mlp_bias")?.unwrap_or(false),
        sliding_window,
    })
}

fn bert_config(v: &Value) -> Result<BertConfig, String> {
    #[derive(Deserialize)]
    struct Raw {
        position_embedding_type: Option<String>,
        hidden_act: Option<String>,
    }
    let raw: Raw = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    if let Some(p) = raw.position_embedding_type.as_deref() {
        if p != "absolute" {
            return Err(format!(
                "position_embedding_type {p:?} is not supported (only absolute)"
            ));
        }
    }
    let hidden_act = match raw.hidden_act.as_deref().unwrap_or("gelu") {
        "gelu" => Activation::Gelu,
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
        "relu" => Activation::Relu,
        other => return Err(format!("hidden_act {other:?} is not supported")),
    };
    let hidden_size = req_usize(v, "hidden_size")?;
    let heads = req_usize(v, "num_attention_heads")?;
    if hidden_size % heads != 0 {
        return Err(format!(
            "hidden_size {hidden_size} is not a multiple of num_attention_heads {heads}"
        ));
    }
    Ok(BertConfig {
        vocab_size: req_usize(v, "vocab_size")?,
        hidden_size,
        num_hidden_layers: req_usize(v, "num_hidden_layers")?,
        num_attention_heads: heads,
        intermediate_size: req_usize(v, "intermediate_size")?,
        max_position_embeddings: req_usize(v, "max_position_embeddings")?,
        type_vocab_size: opt_usize(v, "type_vocab_size")?.unwrap_or(2),
        layer_norm_eps: opt_f64(v, "layer_norm_eps")?.unwrap_or(1e-12),
        hidden_act,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA: &str = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":100,
      "hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
      "num_attention_heads":4,"num_key_value_heads":2,"rms_norm_eps":1e-5,
      "rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":8.0,
      "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":32}}"#;

    #[test]
    fn llama_with_gqa_and_llama3_rope() {
        let Arch::Llama { config: c, .. } = Arch::from_config_json(LLAMA).unwrap() else {
            panic!("not llama")
        };
        assert_eq!((c.num_key_value_heads, c.head_dim), (2, 16));
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(
            c.rope_scaling,
            Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 32.0
            })
        );
        assert!(!c.qkv_bias && !c.tie_word_embeddings);
    }

    #[test]
    fn transformers5_rope_parameters_and_qwen2_biases() {
        let q = r#"{"architectures":["Qwen2ForCausalLM"],"vocab_size":100,"hidden_size":64,
          "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
          "num_key_value_heads":2,"tie_word_embeddings":true,
          "rope_parameters":{"rope_type":"linear","factor":2.0,"rope_theta":1000000.0}}"#;
        let Arch::Llama { config: c, .. } = Arch::from_config_json(q).unwrap() else {
            panic!("not llama family")
        };
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
        assert!(c.qkv_bias && !c.o_bias && c.tie_word_embeddings);
    }

    #[test]
    fn unsupported_architectures_are_refused_by_name() {
        let e = Arch::from_config_json(r#"{"architectures":["GPT2LMHeadModel"]}"#).unwrap_err();
        assert!(
            e.contains("GPT2LMHeadModel") && e.contains("LlamaForCausalLM"),
            "{e}"
        );
        let e = Arch::from_config_json(r#"{"model_type":"t5"}"#).unwrap_err();
        assert!(e.contains("\"t5\"") && e.contains("BertModel"), "{e}");
        let bad = LLAMA.replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":3");
        assert!(Arch::from_config_json(&bad)
            .unwrap_err()
            .contains("multiple"));
        let bad = LLAMA.replace("llama3", "yarn");
        assert!(Arch::from_config_json(&bad)
            .unwrap_err()
            .contains("\"yarn\""));
    }

    #[test]
    fn bert_by_model_type() {
        let b = r#"{"model_type":"bert","vocab_size":30522,"hidden_size":384,
          "num_hidden_layers":6,"num_attention_heads":12,"intermediate_size":1536,
          "max_position_embeddings":512,"hidden_act":"gelu"}"#;
        let Arch::Bert { name, config } = Arch::from_config_json(b).unwrap() else {
            panic!("not bert")
        };
        assert_eq!(name, "BertModel");
        assert_eq!(
            (config.type_vocab_size, config.hidden_act),
            (2, Activation::Gelu)
        );
    }
}
