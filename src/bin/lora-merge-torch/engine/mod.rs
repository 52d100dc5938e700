//! The model engine: base models in libtorch with LoRA adapters composed
//! into their linear layers (never merged into dense weights), and what
//! every model needs from libtorch: the device, tensors made from
//! memory-mapped weights, libtorch errors as our errors. Knows nothing of
//! training or of commands.

pub mod bert;
pub mod llama;
pub mod lora;
pub mod model;
pub mod tokenize;

use lora_merge::checkpoint::ModelDir;
use lora_merge::cli::DeviceArg;
use lora_merge::tensors::{DType, TensorRef};
use lora_merge::{Error, Result};
use tch::{Device, Kind, Tensor};

pub use model::Model;

/// A libtorch failure as our error type.
pub fn tch_err(e: tch::TchError) -> Error {
    Error::Internal(format!("libtorch: {e}"))
}

/// The device a run uses, chosen once. `auto` means CUDA when libtorch sees
/// a GPU, else CPU.
pub fn device(arg: DeviceArg) -> Result<Device> {
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Auto => Ok(Device::cuda_if_available()),
        DeviceArg::Cuda(n) => {
            let count = tch::Cuda::device_count() as usize;
            if n < count {
                Ok(Device::Cuda(n))
            } else if count == 0 {
                Err(Error::Usage(format!(
                    "--device cuda:{n}: libtorch sees no CUDA device here; use --device cpu \
                     (or auto)"
                )))
            } else {
                Err(Error::Usage(format!(
                    "--device cuda:{n}: only {count} CUDA device(s) (cuda:0..cuda:{})",
                    count - 1
                )))
            }
        }
    }
}

pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

fn kind_of(d: DType) -> Kind {
    match d {
        DType::F64 => Kind::Double,
        DType::F32 => Kind::Float,
        DType::F16 => Kind::Half,
        DType::BF16 => Kind::BFloat16,
    }
}

fn dims(shape: &[usize]) -> Vec<i64> {
    shape.iter().map(|&d| d as i64).collect()
}

/// The type softmaxes are computed in: at least f32 (as transformers does
/// for half-precision models), f64 in an f64 model.
pub fn accumulate(kind: Kind) -> Kind {
    if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// A tensor's values as f32 on the CPU, flattened (for writing).
pub fn to_f32(t: &Tensor) -> Result<Vec<f32>> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).to_device(Device::Cpu).flatten(0, -1))
        .map_err(tch_err)
}

/// A tensor of `kind` on `device` with the values of a memory-mapped one.
/// The mapped pages are dropped afterwards: the copy is what is used.
pub fn from_ref(t: &TensorRef, kind: Kind, device: Device) -> Result<Tensor> {
    let x =
        Tensor::f_from_data_size(t.bytes(), &dims(&t.shape), kind_of(t.dtype)).map_err(tch_err)?;
    t.release();
    x.f_to_device(device)
        .and_then(|x| x.f_to_kind(kind))
        .map_err(tch_err)
}

/// Reads a model's weights by name, checking each shape against the
/// config, into frozen tensors of one kind on one device.
pub struct Loader<'a> {
    pub dir: &'a ModelDir,
    pub kind: Kind,
    pub device: Device,
    /// Prefix of every name (`bert.`, or empty), found once per model.
    pub prefix: String,
}

impl Loader<'_> {
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let full = format!("{}{name}", self.prefix);
        from_ref(self.dir.get(&full, shape)?, self.kind, self.device)
    }

    pub fn has(&self, name: &str) -> bool {
        self.dir
            .tensors
            .contains_key(&format!("{}{name}", self.prefix))
    }

    /// A bias that must exist when `present`, and must not otherwise (a
    /// stray bias means the config and the weights disagree).
    pub fn bias(&self, name: &str, len: usize, present: bool) -> Result<Option<Tensor>> {
        if present {
            return self.get(name, &[len]).map(Some);
        }
        if self.has(name) {
            return Err(Error::invalid(
                &self.dir.dir,
                format!(
                    "weight {:?} exists but config.json says the layer has no bias",
                    format!("{}{name}", self.prefix)
                ),
            ));
        }
        Ok(None)
    }
}

/// Run `f`, turning a libtorch panic (a shape error deep in a forward, an
/// out-of-memory on the GPU) into an internal error instead of a crash.
pub fn catching<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            // libtorch messages carry a C++ backtrace after the first lines.
            let short: Vec<&str> = msg.lines().take(3).collect();
            Err(Error::Internal(format!("libtorch: {}", short.join(" "))))
        }
    }
}
