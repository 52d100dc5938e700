//! Linear layers with N LoRA adapters composed in.
//!
//! For a module adapted by adapters i = 1..N (ranks r_i, scales s_i):
//!
//!   y = W x + b + B' ( (w_slot * s) ⊙ (A' x) )
//!
//! with A' (sum r_i x in) the A_i stacked once at load time, B' (out x sum
//! r_i) the B_i side by side, and `w_slot` the weight of the adapter each rank
//! row belongs to. The weights are a tensor, so gradients flow to them; no
//! dense delta is ever built, and a step costs two thin matmuls per module
//! whatever N is.

use std::collections::BTreeMap;

use lora_merge::adapter::{AdapterSet, ModuleKind};
use lora_merge::{Error, Result};
use tch::{nn, Device, Kind, Tensor};

use super::from_ref;

/// How composition weights are shared between modules. `eval` uses one
/// global vector; `fit --granularity` chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouping {
    /// One weight vector for the whole model.
    Global,
    /// One per transformer layer.
    Layer,
    /// One per adapted module.
    Module,
}

/// Each adapter module name with the index of its weight group.
pub type ModuleGroups = Vec<(String, usize)>;

/// The stacked factors of one module.
#[derive(Debug)]
pub struct Lora {
    /// [R, in]
    a: Tensor,
    /// [out, R]
    b: Tensor,
    /// [R] (int64): which adapter each rank row belongs to.
    slot: Tensor,
    /// [R]: that adapter's own scale (alpha/r or alpha/sqrt(r)).
    scale: Tensor,
    /// Index of this module's weight vector.
    pub group: usize,
}

/// A LoRA being trained (`lora-merge train`): y += scale * B (A x), with A
/// and B variables of the run's VarStore.
#[derive(Debug)]
pub struct Trainable {
    a: Tensor,
    b: Tensor,
    scale: f64,
}

/// What `train` reads back out of the model: the module (model-side name)
/// and its factors.
pub struct Trained {
    pub name: String,
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

/// How to add trainable LoRAs while a model is built.
pub struct TrainSpec<'a> {
    pub root: nn::Path<'a>,
    /// PEFT-style: a module matches `t` when its name is `t` or ends in `.t`.
    pub targets: Vec<String>,
    pub rank: i64,
    pub alpha: f64,
    /// Start from these factors instead (`train --init`): by model-side
    /// module name, A [r, in], B [out, r] and the scale; the modules are
    /// exactly these, whatever `targets`, `rank` and `alpha` say.
    pub init: Option<BTreeMap<String, (Tensor, Tensor, f64)>>,
}

/// A frozen linear layer, with composed adapters when any adapt it, and a
/// trainable LoRA when one is being trained on it.
#[derive(Debug)]
pub struct Linear {
    w: Tensor,
    b: Option<Tensor>,
    pub lora: Option<Lora>,
    train: Option<Trainable>,
}

impl Linear {
    pub fn new(w: Tensor, b: Option<Tensor>, lora: Option<Lora>) -> Linear {
        Linear {
            w,
            b,
            lora,
            train: None,
        }
    }

    pub fn with_trainable(mut self, t: Option<Trainable>) -> Linear {
        self.train = t;
        self
    }

    pub fn forward(&self, x: &Tensor, mix: &[Tensor]) -> Tensor {
        let y = self.forward_composed(x, mix);
        match &self.train {
            Some(t) => y + x.linear::<Tensor>(&t.a, None).linear::<Tensor>(&t.b, None) * t.scale,
            None => y,
        }
    }

    /// `mix[g]` is group g's weight per adapter ([N]).
    fn forward_composed(&self, x: &Tensor, mix: &[Tensor]) -> Tensor {
        match (&self.lora, mix.is_empty()) {
            (Some(l), false) => {
                let w = mix[l.group].index_select(0, &l.slot) * &l.scale;
                let (fout, fin) = (self.w.size()[0], self.w.size()[1]);
                let tokens = x.numel() as i64 / fin;
                let r = l.a.size()[0];
                if dense_is_cheaper(tokens, r, fin, fout, w.requires_grad()) {
                    self.forward_dense(x, l, &w)
                } else {
                    self.forward_factored(x, l, &w)
                }
            }
            _ => x.linear(&self.w, self.b.as_ref()),
        }
    }

    /// W x + b + B' (w ⊙ (A' x)): cost grows with the tokens times the summed
    /// rank.
    fn forward_factored(&self, x: &Tensor, l: &Lora, w: &Tensor) -> Tensor {
        let y = x.linear(&self.w, self.b.as_ref());
        y + (x.linear::<Tensor>(&l.a, None) * w).linear::<Tensor>(&l.b, None)
    }

    /// (W + B' diag(w) A') x + b: the weighted delta is built once per call,
    /// at a cost that does not depend on the number of tokens.
    fn forward_dense(&self, x: &Tensor, l: &Lora, w: &Tensor) -> Tensor {
        let delta = (&l.b * w).matmul(&l.a);
        x.linear(&(&self.w + delta), self.b.as_ref())
    }
}

/// Which way of computing a composed layer does less arithmetic (multiply-
/// adds, forward plus, when training, backward). Factored: T R (in + out)
/// forward, about twice that backward. Dense: R in out to build the delta
/// (about twice that again backward, for B'^T G A'^T), plus, when training,
/// the T in out product that gives the delta's gradient. With few adapters
/// or large layers the factored form wins (and the dense delta is never
/// built); with many adapters on narrow layers (say 64 rank-8 adapters on
/// a 384-wide encoder, summed rank 512) the dense one does, which keeps the
/// step time sub-linear in N. Both are exact.
fn dense_is_cheaper(tokens: i64, r: i64, fin: i64, fout: i64, grad: bool) -> bool {
    let passes = if grad { 3 } else { 1 };
    let factored = passes * tokens * r * (fin + fout);
    let dense = passes * r * fin * fout + if grad { tokens * fin * fout } else { 0 };
    dense < factored
}

/// The adapters' modules, handed out to the layers of a model as it is
/// built, by the model's own module names.
pub struct LoraBank<'a> {
    set: Option<&'a AdapterSet>,
    /// Model module name -> the adapters' name for it.
    pending: BTreeMap<String, String>,
    grouping: Grouping,
    pub groups: Vec<String>,
    /// Adapter module name -> its group, in model order.
    assigned: Vec<(String, usize)>,
    /// Names the model asked for, for error messages.
    asked: Vec<String>,
    train: Option<TrainSpec<'a>>,
    pub trained: Vec<Trained>,
    kind: Kind,
    device: Device,
}

/// The model-side name of an adapter module: PEFT names start from the
/// wrapped model (`model.layers.0...`, `bert.encoder...`), ours from the
/// backbone.
pub fn canonical(name: &str) -> &str {
    ["model.", "bert."]
        .iter()
        .find_map(|p| name.strip_prefix(p))
        .unwrap_or(name)
}

/// The name of the weight group of a (model-side) module.
pub fn group_key(grouping: Grouping, module: &str) -> String {
    match grouping {
        Grouping::Global => "all".to_string(),
        Grouping::Layer => {
            layer_of(module).map_or_else(|| module.to_string(), |l| format!("layer {l}"))
        }
        Grouping::Module => module.to_string(),
    }
}

/// The transformer layer a module belongs to (`layers.3.` or `layer.3.`).
pub fn layer_of(name: &str) -> Option<&str> {
    let mut parts = name.split('.');
    while let Some(p) = parts.next() {
        if p == "layers" || p == "layer" {
            return parts.next().filter(|n| n.parse::<usize>().is_ok());
        }
    }
    None
}

impl<'a> LoraBank<'a> {
    pub fn new(
        set: Option<&'a AdapterSet>,
        grouping: Grouping,
        kind: Kind,
        device: Device,
    ) -> Result<LoraBank<'a>> {
        let mut pending = BTreeMap::new();
        for a in set.iter().flat_map(|s| s.adapters.iter()) {
            for m in a.modules.values() {
                let c = canonical(&m.name).to_string();
                if let Some(prev) = pending.insert(c.clone(), m.name.clone()) {
                    if prev != m.name {
                        return Err(Error::Incompatible(format!(
                            "modules {prev:?} and {:?} ({}) name the same layer {c:?}",
                            m.name, a.given
                        )));
                    }
                }
            }
        }
        Ok(LoraBank {
            set,
            pending,
            grouping,
            groups: Vec::new(),
            assigned: Vec::new(),
            asked: Vec::new(),
            train: None,
            trained: Vec::new(),
            kind,
            device,
        })
    }

    fn group(&mut self, module: &str) -> usize {
        let key = group_key(self.grouping, module);
        match self.groups.iter().position(|g| *g == key) {
            Some(i) => i,
            None => {
                self.groups.push(key);
                self.groups.len() - 1
            }
        }
    }

    /// Add a trainable LoRA to every linear layer `spec.targets` match.
    pub fn with_training(mut self, spec: TrainSpec<'a>) -> Self {
        self.train = Some(spec);
        self
    }

    /// A new trainable LoRA for the model's module `name` ([out, in]) when it
    /// is a target: A uniform in +-1/sqrt(in) (PEFT's default), B zero, so
    /// training starts from the base model.
    pub fn trainable(
        &mut self,
        name: &str,
        fan_out: usize,
        fan_in: usize,
    ) -> Result<Option<Trainable>> {
        let Some(spec) = &mut self.train else {
            return Ok(None);
        };
        if let Some(init) = &mut spec.init {
            let Some((a0, b0, scale)) = init.remove(name) else {
                return Ok(None);
            };
            if (b0.size()[0], a0.size()[1]) != (fan_out as i64, fan_in as i64) {
                return Err(Error::Incompatible(format!(
                    "--init: module {name} is {} x {} there, but the base model's is \
                     {fan_out} x {fan_in}",
                    b0.size()[0],
                    a0.size()[1]
                )));
            }
            let p = spec.root.sub(name.replace('.', "_"));
            let a = p.var_copy("lora_A", &a0);
            let b = p.var_copy("lora_B", &b0);
            self.trained.push(Trained {
                name: name.to_string(),
                a: a.shallow_clone(),
                b: b.shallow_clone(),
                scale,
            });
            return Ok(Some(Trainable { a, b, scale }));
        }
        let hit = spec
            .targets
            .iter()
            .any(|t| name == t || name.ends_with(&format!(".{t}")));
        if !hit {
            return Ok(None);
        }
        let most = fan_out.min(fan_in);
        if spec.rank < 1 || spec.rank as u64 > most as u64 {
            return Err(Error::Usage(format!(
                "--rank {}: {name} is {fan_out} x {fan_in}, so its LoRA rank can be 1 to {most}",
                spec.rank
            )));
        }
        let p = spec.root.sub(name.replace('.', "_"));
        let bound = 1.0 / (fan_in as f64).sqrt();
        let a = p.var(
            "lora_A",
            &[spec.rank, fan_in as i64],
            nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        );
        let b = p.var("lora_B", &[fan_out as i64, spec.rank], nn::Init::Const(0.0));
        let scale = spec.alpha / spec.rank as f64;
        self.trained.push(Trained {
            name: name.to_string(),
            a: a.shallow_clone(),
            b: b.shallow_clone(),
            scale,
        });
        Ok(Some(Trainable { a, b, scale }))
    }

    /// The composed factors for the model's module `name` ([out, in]), if any
    /// adapter adapts it.
    pub fn take(&mut self, name: &str, fan_out: usize, fan_in: usize) -> Result<Option<Lora>> {
        self.asked.push(name.to_string());
        let Some(adapter_name) = self.pending.remove(name) else {
            return Ok(None);
        };
        let Some(set) = self.set else {
            return Ok(None);
        };
        let (mut a_parts, mut b_parts, mut slots, mut scales) = (vec![], vec![], vec![], vec![]);
        for (i, a) in set.adapters.iter().enumerate() {
            let Some(m) = a.modules.get(&adapter_name) else {
                continue;
            };
            if m.kind != ModuleKind::Linear {
                return Err(Error::Incompatible(format!(
                    "{}: module {:?} is a LoRA on a {:?} layer; only linear layers can be \
                     composed into a model",
                    a.given, m.name, m.kind
                )));
            }
            if (m.fan_out, m.fan_in) != (fan_out, fan_in) {
                return Err(Error::Incompatible(format!(
                    "{}: module {:?} adapts a {}x{} layer, but the base model's {name} is {}x{}",
                    a.given, m.name, m.fan_out, m.fan_in, fan_out, fan_in
                )));
            }
            a_parts.push(from_ref(&m.a, self.kind, self.device)?);
            b_parts.push(from_ref(&m.b, self.kind, self.device)?);
            slots.extend(std::iter::repeat_n(i as i64, m.rank));
            scales.extend(std::iter::repeat_n(m.scale, m.rank));
        }
        let group = self.group(name);
        self.assigned.push((adapter_name, group));
        let opts = (self.kind, self.device);
        Ok(Some(Lora {
            a: Tensor::cat(&a_parts, 0),
            b: Tensor::cat(&b_parts, 1),
            slot: Tensor::from_slice(&slots).to_device(self.device),
            scale: Tensor::from_slice(&scales)
                .to_kind(opts.0)
                .to_device(opts.1),
            group,
        }))
    }

    /// Every adapter module must have found its layer, and a training run
    /// must have made at least one trainable LoRA (`any_trained`: the caller
    /// may have taken them out already). Returns the group names and, for
    /// each adapter module name, its group.
    pub fn finish_with(self, any_trained: bool) -> Result<(Vec<String>, ModuleGroups)> {
        if let Some(spec) = &self.train {
            if let Some((name, _)) = spec.init.as_ref().and_then(|i| i.iter().next()) {
                let like: Vec<&str> = self.asked.iter().take(4).map(String::as_str).collect();
                return Err(Error::Incompatible(format!(
                    "--init: module {name:?} is not a linear layer of the base model (its \
                     layers are named like {}); is the adapter for another model?",
                    like.join(", ")
                )));
            }
            if !any_trained {
                let like: Vec<&str> = self.asked.iter().take(6).map(String::as_str).collect();
                return Err(Error::Usage(format!(
                    "--target-modules {} matches no linear layer of the base model (its layers \
                     are named like {})",
                    spec.targets.join(" "),
                    like.join(", ")
                )));
            }
        }
        if let Some((c, name)) = self.pending.into_iter().next() {
            let owner = self
                .set
                .and_then(|s| s.adapters.iter().find(|a| a.modules.contains_key(&name)))
                .map_or(String::new(), |a| format!("{}: ", a.given));
            let like: Vec<&str> = self.asked.iter().take(4).map(String::as_str).collect();
            return Err(Error::Incompatible(format!(
                "{owner}module {name:?} (read as {c:?}) is not a linear layer of the base model \
                 (its layers are named like {}); is the adapter for another model?",
                like.join(", ")
            )));
        }
        Ok((self.groups, self.assigned))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_layers() {
        assert_eq!(
            canonical("model.layers.0.self_attn.q_proj"),
            "layers.0.self_attn.q_proj"
        );
        assert_eq!(
            canonical("bert.encoder.layer.1.attention.self.query"),
            "encoder.layer.1.attention.self.query"
        );
        assert_eq!(
            canonical("encoder.layer.1.output.dense"),
            "encoder.layer.1.output.dense"
        );
        assert_eq!(layer_of("layers.12.mlp.up_proj"), Some("12"));
        assert_eq!(layer_of("encoder.layer.3.attention.self.query"), Some("3"));
        assert_eq!(layer_of("lm_head"), None);
    }

    #[test]
    fn the_cheaper_form_is_chosen() {
        // 4 rank-8 adapters on a 4096-wide layer, 512 tokens: factored.
        assert!(!dense_is_cheaper(512, 32, 4096, 4096, true));
        // 64 rank-8 adapters on a 384-wide layer, 1024 tokens: dense.
        assert!(dense_is_cheaper(1024, 512, 384, 384, true));
        // MiniLM with 4 adapters, training: factored.
        assert!(!dense_is_cheaper(1024, 32, 384, 384, true));
    }

    #[test]
    fn groups_follow_the_granularity() {
        let names = ["layers.0.q", "layers.0.v", "layers.1.q", "lm_head"];
        for (g, want) in [
            (Grouping::Global, vec!["all"; 4]),
            (
                Grouping::Layer,
                vec!["layer 0", "layer 0", "layer 1", "lm_head"],
            ),
            (Grouping::Module, names.to_vec()),
        ] {
            let mut bank = LoraBank::new(None, g, Kind::Float, Device::Cpu).unwrap();
            let idx: Vec<usize> = names.iter().map(|n| bank.group(n)).collect();
            let got: Vec<&str> = idx.iter().map(|&i| bank.groups[i].as_str()).collect();
            assert_eq!(got, want, "{g:?}");
        }
    }

    #[test]
    fn composed_forward_is_the_weighted_sum_of_deltas() {
        // Two adapters on a 3x4 layer, ranks 2 and 1, scales 0.5 and 3.
        let opts = (Kind::Double, Device::Cpu);
        let w = Tensor::randn([3, 4], opts);
        let a1 = Tensor::randn([2, 4], opts);
        let b1 = Tensor::randn([3, 2], opts);
        let a2 = Tensor::randn([1, 4], opts);
        let b2 = Tensor::randn([3, 1], opts);
        let lora = Lora {
            a: Tensor::cat(&[&a1, &a2], 0),
            b: Tensor::cat(&[&b1, &b2], 1),
            slot: Tensor::from_slice(&[0i64, 0, 1]),
            scale: Tensor::from_slice(&[0.5f64, 0.5, 3.0]),
            group: 0,
        };
        let lin = Linear::new(w.shallow_clone(), None, Some(lora));
        let x = Tensor::randn([5, 4], opts);
        let mix = [Tensor::from_slice(&[0.7f64, -0.2])];
        let dense = &w + b1.matmul(&a1) * (0.7 * 0.5) + b2.matmul(&a2) * (-0.2 * 3.0);
        let want = x.matmul(&dense.tr());
        let l = lin.lora.as_ref().unwrap();
        let wv = mix[0].index_select(0, &l.slot) * &l.scale;
        for got in [
            lin.forward(&x, &mix),
            lin.forward_factored(&x, l, &wv),
            lin.forward_dense(&x, l, &wv),
        ] {
            let err = (&got - &want).abs().max().double_value(&[]);
            assert!(err < 1e-12, "max error {err}");
        }
        // No weights: the base layer alone.
        let base = lin.forward(&x, &[]);
        let err = (&base - x.matmul(&w.tr())).abs().max().double_value(&[]);
        assert!(err < 1e-12, "max error {err}");
    }
}
