//! Hand-made adapters for tests: safetensors files written byte by byte, so
//! tests do not depend on the reader they check.

use std::path::Path;

use serde_json::{json, Map, Value};

use crate::tensors::DType;

#[derive(Debug, Clone)]
pub(crate) struct TestTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl TestTensor {
    /// Values 0.5, 1.0, 1.5, ... (exact in every supported dtype for small
    /// tensors), so tests can assert decoded values.
    pub fn ramp(name: &str, dtype: DType, shape: &[usize]) -> TestTensor {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (1..=n).map(|i| i as f32 * 0.5).collect();
        TestTensor::from_f32(name, dtype, shape, &values)
    }

    pub fn from_f32(name: &str, dtype: DType, shape: &[usize], values: &[f32]) -> TestTensor {
        let mut data = Vec::new();
        for &v in values {
            match dtype {
                DType::F64 => data.extend_from_slice(&(v as f64).to_le_bytes()),
                DType::F32 => data.extend_from_slice(&v.to_le_bytes()),
                DType::F16 => data.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                DType::BF16 => data.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
            }
        }
        TestTensor {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            data,
        }
    }
}

/// Write a valid safetensors file the way the reference writer lays it out:
/// largest elements first (so every offset is aligned), header padded with
/// spaces to a multiple of 8.
pub(crate) fn write_safetensors(path: &Path, tensors: &[TestTensor]) {
    write_safetensors_with_metadata(path, tensors, json!({"format": "pt"}));
}

/// [`write_safetensors`] with the given `__metadata__` object.
pub(crate) fn write_safetensors_with_metadata(
    path: &Path,
    tensors: &[TestTensor],
    metadata: Value,
) {
    let mut sorted: Vec<&TestTensor> = tensors.iter().collect();
    sorted.sort_by(|a, b| {
        b.dtype
            .size()
            .cmp(&a.dtype.size())
            .then(a.name.cmp(&b.name))
    });
    let mut header = Map::new();
    header.insert("__metadata__".into(), metadata);
    let mut data = Vec::new();
    for t in sorted {
        let begin = data.len();
        data.extend_from_slice(&t.data);
        header.insert(
            t.name.clone(),
            json!({
                "dtype": t.dtype.safetensors_name(),
                "shape": t.shape,
                "data_offsets": [begin, data.len()],
            }),
        );
    }
    let mut h = Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    std::fs::write(path, out).unwrap();
}

/// A PEFT LoRA config with the given rank, alpha and patterns.
pub(crate) fn config_json(
    r: usize,
    alpha: f64,
    rank_pattern: &[(&str, usize)],
    alpha_pattern: &[(&str, f64)],
) -> Value {
    let rp: Map<String, Value> = rank_pattern
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let ap: Map<String, Value> = alpha_pattern
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    json!({
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": rp,
        "alpha_pattern": ap,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "use_rslora": false,
        "use_dora": false,
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "base_model_name_or_path": "org/base",
        "revision": null,
        "task_type": "CAUSAL_LM",
    })
}

/// One linear module: (name without prefix, rank, fan_in, fan_out).
pub(crate) type LinearSpec<'a> = (&'a str, usize, usize, usize);

/// Write `adapter_config.json` and `adapter_model.safetensors` into `dir`
/// with linear modules as given (ramp-filled f32 factors).
pub(crate) fn write_peft_dir(dir: &Path, config: &Value, modules: &[LinearSpec]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let mut tensors = Vec::new();
    for &(name, r, fan_in, fan_out) in modules {
        let p = format!("base_model.model.{name}");
        tensors.push(TestTensor::ramp(
            &format!("{p}.lora_A.weight"),
            DType::F32,
            &[r, fan_in],
        ));
        tensors.push(TestTensor::ramp(
            &format!("{p}.lora_B.weight"),
            DType::F32,
            &[fan_out, r],
        ));
    }
    write_safetensors(&dir.join("adapter_model.safetensors"), &tensors);
}
