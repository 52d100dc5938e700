//! `adapter_config.json`: PEFT's `LoraConfig`, read in full.
//!
//! Fields we do not model are kept in `extra` so that nothing in the input is
//! lost. Adapters that cannot be merged from their files alone are refused
//! here, before any tensor is read.

use std::path::Path;
use std::sync::OnceLock;

use regex::{Regex, RegexBuilder};
use serde::de::DeserializeOwned;
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::hash::sha256_hex;
use crate::tensors::FileRecord;

/// `init_lora_weights` values whose training starts from a base model that
/// was itself changed (a residual, or a quantised copy). Their adapter files
/// only make sense on top of that changed base, which is not in the files.
const BASE_MODIFYING_INITS: &[&str] = &["pissa", "olora", "corda", "loftq", "mica", "lora_ga"];

/// `init_lora_weights` values that only choose starting values for A and B
/// and leave the base model as it is.
const PLAIN_INITS: &[&str] = &["gaussian", "eva", "orthogonal"];

/// PEFT's `LoraConfig` as saved in `adapter_config.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PeftConfig {
    #[serde(default)]
    pub peft_type: Option<String>,
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    #[serde(default, deserialize_with = "null_as_default")]
    pub use_rslora: bool,
    /// Per-module rank overrides, in file order (the first matching key wins).
    #[serde(default)]
    pub rank_pattern: PatternMap<usize>,
    /// Per-module alpha overrides, in file order (the first matching key wins).
    #[serde(default)]
    pub alpha_pattern: PatternMap<f64>,
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub fan_in_fan_out: bool,
    /// "none", "all" or "lora_only"; only "none" can be merged.
    #[serde(default)]
    pub bias: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub lora_bias: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub use_dora: bool,
    #[serde(default, deserialize_with = "null_as_default")]
    pub init_lora_weights: InitLoraWeights,
    #[serde(default)]
    pub layers_to_transform: Option<OneOrMany<i64>>,
    #[serde(default)]
    pub layers_pattern: Option<OneOrMany<String>>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Revision of the base model.
    #[serde(default)]
    pub revision: Option<String>,
    #[serde(default)]
    pub task_type: Option<String>,
    /// Every other field, as it was.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
    /// Pattern keys compiled once; filled on first use.
    #[serde(skip)]
    compiled: OnceLock<Compiled>,
}

/// `target_modules`: a list of name suffixes, or one regex that must match a
/// whole module name (`"all-linear"` is PEFT's special spelling for every
/// linear layer but the output head).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Pattern(String),
}

impl TargetModules {
    pub fn is_all_linear(&self) -> bool {
        matches!(self, TargetModules::Pattern(p) if p == "all-linear")
    }
}

/// `init_lora_weights`: a boolean or the name of an initialisation method.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitLoraWeights {
    Bool(bool),
    Method(String),
}

impl Default for InitLoraWeights {
    fn default() -> Self {
        InitLoraWeights::Bool(true)
    }
}

/// PEFT fields typed `Union[T, list[T]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

/// Compiled pattern keys, with the keys they were built from: the fields are
/// public, and a cache that outlived an edit must not be trusted.
#[derive(Debug, Clone, Default)]
struct Compiled {
    rank_keys: Vec<String>,
    rank: Vec<Option<Regex>>,
    alpha_keys: Vec<String>,
    alpha: Vec<Option<Regex>>,
}

fn default_r() -> usize {
    8
}

fn default_alpha() -> f64 {
    8.0
}

/// PEFT writes `null` for unset optional fields; treat it as the default.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A JSON object of pattern keys to values with its file order kept (the
/// order decides which of two matching keys wins). Serialises as an object.
#[derive(Debug, Clone, PartialEq)]
pub struct PatternMap<T>(pub Vec<(String, T)>);

impl<T> Default for PatternMap<T> {
    fn default() -> Self {
        PatternMap(Vec::new())
    }
}

impl<T> std::ops::Deref for PatternMap<T> {
    type Target = [(String, T)];
    fn deref(&self) -> &[(String, T)] {
        &self.0
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for PatternMap<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // serde_json is built with `preserve_order`, so this map keeps file
        // order; `null` is PEFT's spelling of "no patterns".
        let map = Option::<Map<String, Value>>::deserialize(d)?.unwrap_or_default();
        let pairs = map
            .into_iter()
            .map(|(k, v)| {
                let parsed = T::deserialize(&v).map_err(|e| {
                    serde::de::Error::custom(format!("pattern {k:?} has value {v}: {e}"))
                })?;
                Ok((k, parsed))
            })
            .collect::<Result<_, D::Error>>()?;
        Ok(PatternMap(pairs))
    }
}

impl<T: Serialize> Serialize for PatternMap<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, x) in &self.0 {
            m.serialize_entry(k, x)?;
        }
        m.end()
    }
}

/// The most pattern keys a config may hold (`rank_pattern` and
/// `alpha_pattern` together). Real ones name at most every module of a
/// model: hundreds.
const MAX_PATTERN_KEYS: usize = 4096;
/// The longest pattern key, in bytes. Real ones are module names.
const MAX_PATTERN_KEY_LEN: usize = 1024;
/// What all compiled keys of one config may take together, shared out among
/// them (at most [`PATTERN_KEY_SIZE`] each): a short key such as
/// `.{1000}{1000}` compiles to gigabytes without a limit.
const PATTERN_SIZE_BUDGET: usize = 64 << 20;
/// The most one compiled key may take, for its program and for its lazy DFA.
const PATTERN_KEY_SIZE: usize = 1 << 20;

/// PEFT's pattern rule: `re.match(rf"(.*\.)?({key})$", name)`, i.e. the key
/// is a regex that must match the whole module name or a dot-separated tail
/// of it. `n` is how many keys the config holds: each gets its share of
/// [`PATTERN_SIZE_BUDGET`], so the whole set is bounded.
fn pattern_regex(key: &str, n: usize) -> Result<Regex, String> {
    if key.len() > MAX_PATTERN_KEY_LEN {
        return Err(format!(
            "it is {} bytes long, more than the {MAX_PATTERN_KEY_LEN} a key may be",
            key.len()
        ));
    }
    let limit = (PATTERN_SIZE_BUDGET / n.max(1)).clamp(64 << 10, PATTERN_KEY_SIZE);
    RegexBuilder::new(&format!(r"^(?:.*\.)?(?:{key})$"))
        .size_limit(limit)
        .dfa_size_limit(limit)
        .build()
        .map_err(|e| e.to_string())
}

fn keys_of<T>(patterns: &[(String, T)]) -> Vec<String> {
    patterns.iter().map(|(k, _)| k.clone()).collect()
}

fn compile_all<T>(patterns: &[(String, T)], n: usize) -> Vec<Option<Regex>> {
    patterns
        .iter()
        .map(|(k, _)| pattern_regex(k, n).ok())
        .collect()
}

fn same_keys<T>(keys: &[String], patterns: &[(String, T)]) -> bool {
    keys.len() == patterns.len() && keys.iter().zip(patterns).all(|(a, (b, _))| a == b)
}

/// The value of the first key matching `module`, in order.
fn first_match<T: Copy>(
    patterns: &[(String, T)],
    cached_keys: &[String],
    cached: &[Option<Regex>],
    module: &str,
) -> Option<T> {
    if !same_keys(cached_keys, patterns) {
        // The patterns were edited after first use: compile afresh.
        let fresh = compile_all(patterns, patterns.len());
        return first_match(patterns, &keys_of(patterns), &fresh, module);
    }
    patterns
        .iter()
        .zip(cached)
        .find(|(_, re)| re.as_ref().is_some_and(|re| re.is_match(module)))
        .map(|((_, v), _)| *v)
}

impl PeftConfig {
    /// Read, hash and validate `path`. The hash is of the bytes parsed.
    pub fn read(path: &Path) -> Result<(PeftConfig, FileRecord)> {
        let bytes = crate::layout::read_capped(path, crate::layout::JSON_CAP)?;
        let record = FileRecord {
            path: path.to_path_buf(),
            sha256: sha256_hex(&bytes),
            size: bytes.len() as u64,
        };
        Ok((PeftConfig::parse(path, &bytes)?, record))
    }

    /// Parse and validate config bytes; `path` is only used in errors.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<PeftConfig> {
        let config: PeftConfig = serde_json::from_slice(bytes)
            .map_err(|e| Error::invalid(path, format!("not a valid adapter config: {e}")))?;
        config.validate(path)?;
        Ok(config)
    }

    /// Refuse what cannot be merged from adapter files alone, and patterns
    /// that cannot be evaluated.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let refuse = |msg: String| Err(Error::invalid(path, msg));
        match self.peft_type.as_deref() {
            Some("LORA") => {}
            Some(other) => {
                return refuse(format!(
                    "peft_type is {other:?}: only LoRA adapters (\"LORA\") can be merged"
                ))
            }
            None => return refuse("peft_type is missing: is this a PEFT adapter config?".into()),
        }
        if self.r == 0 {
            return refuse("r is 0: a LoRA rank must be at least 1".into());
        }
        if !self.lora_alpha.is_finite() {
            return refuse(format!("lora_alpha is {}", self.lora_alpha));
        }
        if self.use_dora {
            return refuse(
                "use_dora is true: DoRA needs the base weights to compute its magnitude \
                 normalisation, so a DoRA adapter cannot be merged from its files alone"
                    .into(),
            );
        }
        if let InitLoraWeights::Method(m) = &self.init_lora_weights {
            let lower = m.to_ascii_lowercase();
            // `pissa_niter_16` and the like are PiSSA with a fast SVD.
            let family = lower.split("_niter").next().unwrap_or(&lower);
            if BASE_MODIFYING_INITS.contains(&family) {
                return refuse(format!(
                    "init_lora_weights is {m:?}: this initialisation changes the base weights \
                     (PiSSA/OLoRA/CorDA/LoftQ-style), so the adapter only works on that changed \
                     base. Convert it to a plain LoRA first (PEFT can save such adapters with \
                     `path_initial_model_for_weight_conversion`)"
                ));
            }
            if !PLAIN_INITS.contains(&lower.as_str()) {
                return refuse(format!(
                    "init_lora_weights is {m:?}, an initialisation this tool does not know: \
                     it cannot tell whether the adapter depends on a modified base model"
                ));
            }
        }
        if self.lora_bias {
            return refuse(
                "lora_bias is true: the adapter trains a bias on lora_B, which a merged \
                 low-rank adapter cannot represent"
                    .into(),
            );
        }
        if let Some(b) = self.bias.as_deref() {
            if b != "none" {
                return refuse(format!(
                    "bias is {b:?}: the adapter changes the base model's biases, which a \
                     merged LoRA adapter cannot carry; only bias \"none\" is supported"
                ));
            }
        }
        for (k, r) in self.rank_pattern.iter() {
            if *r == 0 {
                return refuse(format!("rank_pattern {k:?} sets rank 0"));
            }
        }
        for (k, a) in self.alpha_pattern.iter() {
            if !a.is_finite() {
                return refuse(format!("alpha_pattern {k:?} sets alpha {a}"));
            }
        }
        let n = self.pattern_keys();
        if n > MAX_PATTERN_KEYS {
            return refuse(format!(
                "rank_pattern and alpha_pattern hold {n} keys, more than the \
                 {MAX_PATTERN_KEYS} this tool evaluates"
            ));
        }
        let keys = self.rank_pattern.iter().map(|(k, _)| k);
        for k in keys.chain(self.alpha_pattern.iter().map(|(k, _)| k)) {
            if let Err(e) = pattern_regex(k, n) {
                return refuse(format!(
                    "pattern key {k:?} is not a regular expression this tool can evaluate: {e}"
                ));
            }
        }
        Ok(())
    }

    /// How many pattern keys there are, both maps together.
    fn pattern_keys(&self) -> usize {
        self.rank_pattern.len() + self.alpha_pattern.len()
    }

    fn compiled(&self) -> &Compiled {
        let n = self.pattern_keys();
        self.compiled.get_or_init(|| Compiled {
            rank_keys: keys_of(&self.rank_pattern),
            rank: compile_all(&self.rank_pattern, n),
            alpha_keys: keys_of(&self.alpha_pattern),
            alpha: compile_all(&self.alpha_pattern, n),
        })
    }

    /// Rank of `module` (a name without `base_model.model.`), after
    /// `rank_pattern`.
    pub fn rank_for(&self, module: &str) -> usize {
        let c = self.compiled();
        first_match(&self.rank_pattern, &c.rank_keys, &c.rank, module).unwrap_or(self.r)
    }

    /// Alpha of `module`, after `alpha_pattern`.
    pub fn alpha_for(&self, module: &str) -> f64 {
        let c = self.compiled();
        first_match(&self.alpha_pattern, &c.alpha_keys, &c.alpha, module).unwrap_or(self.lora_alpha)
    }

    /// The factor PEFT applies to B @ A for `module`.
    pub fn scale_for(&self, module: &str) -> f64 {
        let alpha = self.alpha_for(module);
        let r = self.rank_for(module) as f64;
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn p() -> PathBuf {
        PathBuf::from("cfg/adapter_config.json")
    }

    fn parse(json: &str) -> Result<PeftConfig> {
        PeftConfig::parse(&p(), json.as_bytes())
    }

    fn err(json: &str) -> String {
        let e = parse(json).unwrap_err();
        assert!(matches!(&e, Error::Invalid { file, .. } if *file == p()));
        e.to_string()
    }

    const FULL: &str = r#"{
        "alpha_pattern": {"v_proj": 3.0},
        "base_model_name_or_path": "org/base",
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": [0, 1],
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": 4,
        "rank_pattern": {"layers\\.1\\.self_attn\\.q_proj": 2, "q_proj": 6},
        "revision": "abc123",
        "target_modules": ["q_proj", "v_proj"],
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": false
    }"#;

    #[test]
    fn parses_all_fields_and_keeps_extra() {
        let c = parse(FULL).unwrap();
        assert_eq!(c.r, 4);
        assert_eq!(c.lora_alpha, 16.0);
        assert_eq!(c.base_model_name_or_path.as_deref(), Some("org/base"));
        assert_eq!(c.revision.as_deref(), Some("abc123"));
        assert_eq!(c.task_type.as_deref(), Some("CAUSAL_LM"));
        assert_eq!(
            c.target_modules,
            Some(TargetModules::List(vec!["q_proj".into(), "v_proj".into()]))
        );
        assert_eq!(c.layers_to_transform, Some(OneOrMany::Many(vec![0, 1])));
        assert_eq!(c.init_lora_weights, InitLoraWeights::Bool(true));
        assert_eq!(c.extra.get("lora_dropout"), Some(&serde_json::json!(0.05)));
        assert_eq!(c.extra.get("inference_mode"), Some(&Value::Bool(true)));
        // Round trip keeps the patterns as maps.
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["rank_pattern"]["q_proj"], serde_json::json!(6));
        assert_eq!(v["lora_dropout"], serde_json::json!(0.05));
    }

    #[test]
    fn patterns_follow_peft_rule() {
        let c = parse(FULL).unwrap();
        // First key in file order wins, matched on a dot boundary.
        assert_eq!(c.rank_for("model.layers.1.self_attn.q_proj"), 2);
        assert_eq!(c.rank_for("model.layers.0.self_attn.q_proj"), 6);
        assert_eq!(c.rank_for("q_proj"), 6);
        // No dot boundary: not a match.
        assert_eq!(c.rank_for("model.layers.0.self_attn.xq_proj"), 4);
        // Anchored at the end.
        assert_eq!(c.rank_for("model.layers.0.self_attn.q_proj.base"), 4);
        assert_eq!(c.alpha_for("model.layers.0.self_attn.v_proj"), 3.0);
        assert_eq!(c.alpha_for("model.layers.0.self_attn.q_proj"), 16.0);
        assert_eq!(c.scale_for("model.layers.0.self_attn.q_proj"), 16.0 / 6.0);
        assert_eq!(c.scale_for("model.layers.0.self_attn.v_proj"), 3.0 / 4.0);
        assert_eq!(c.scale_for("model.layers.0.mlp.up_proj"), 4.0);
    }

    #[test]
    fn patterns_edited_after_use() {
        let mut c = parse(FULL).unwrap();
        assert_eq!(c.rank_for("a.q_proj"), 6);
        c.rank_pattern = PatternMap(vec![("a\\.q_proj".into(), 3)]);
        assert_eq!(c.rank_for("a.q_proj"), 3);
        assert_eq!(c.rank_for("b.q_proj"), 4);
    }

    #[test]
    fn rslora_scale() {
        let c = parse(r#"{"peft_type":"LORA","r":16,"lora_alpha":8,"use_rslora":true}"#).unwrap();
        assert_eq!(c.scale_for("x"), 8.0 / 4.0);
    }

    #[test]
    fn target_modules_forms() {
        let c = parse(r#"{"peft_type":"LORA","target_modules":"all-linear"}"#).unwrap();
        assert!(c.target_modules.unwrap().is_all_linear());
        let c = parse(r#"{"peft_type":"LORA","target_modules":".*q_proj"}"#).unwrap();
        assert_eq!(
            c.target_modules,
            Some(TargetModules::Pattern(".*q_proj".into()))
        );
        let c = parse(r#"{"peft_type":"LORA","target_modules":null}"#).unwrap();
        assert_eq!(c.target_modules, None);
        assert_eq!((c.r, c.lora_alpha), (8, 8.0));
    }

    #[test]
    fn refusals() {
        assert!(err(r#"{"peft_type":"IA3"}"#).contains("\"IA3\""));
        assert!(err(r#"{"r":4}"#).contains("peft_type is missing"));
        assert!(err(r#"{"peft_type":"LORA","use_dora":true}"#).contains("DoRA needs the base"));
        for init in ["pissa", "pissa_niter_4", "olora", "corda", "loftq"] {
            let e = err(&format!(
                r#"{{"peft_type":"LORA","init_lora_weights":"{init}"}}"#
            ));
            assert!(e.contains("changes the base weights"), "{init}: {e}");
        }
        assert!(
            err(r#"{"peft_type":"LORA","init_lora_weights":"mystery"}"#).contains("does not know")
        );
        assert!(err(r#"{"peft_type":"LORA","lora_bias":true}"#).contains("lora_bias"));
        assert!(err(r#"{"peft_type":"LORA","bias":"all"}"#).contains("\"all\""));
        assert!(err(r#"{"peft_type":"LORA","r":0}"#).contains("r is 0"));
        assert!(err(r#"{"peft_type":"LORA","rank_pattern":{"(":2}}"#).contains("\"(\""));
        // Keys that compile to gigabytes, or are absurdly long or many, are
        // refused quickly, naming the key.
        let t = std::time::Instant::now();
        for key in ["(.{1,100}){1,100}", ".{1000}{1000}", "([a-z]{1000}){100}"] {
            let e = err(&format!(
                r#"{{"peft_type":"LORA","alpha_pattern":{{"q_proj":2,"{key}":3}}}}"#
            ));
            assert!(
                e.contains("not a regular expression this tool can evaluate"),
                "{e}"
            );
            assert!(e.contains(&format!("{key:?}")), "{e}");
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            t.elapsed()
        );
        let long = "a".repeat(2000);
        let e = err(&format!(
            r#"{{"peft_type":"LORA","rank_pattern":{{"{long}":2}}}}"#
        ));
        assert!(e.contains("2000 bytes long"), "{e}");
        let many: Vec<String> = (0..5000).map(|i| format!(r#""m{i}":2"#)).collect();
        let e = err(&format!(
            r#"{{"peft_type":"LORA","rank_pattern":{{{}}}}}"#,
            many.join(",")
        ));
        assert!(e.contains("5000 keys"), "{e}");
        // Plain inits are fine.
        for init in ["gaussian", "eva", "orthogonal"] {
            parse(&format!(
                r#"{{"peft_type":"LORA","init_lora_weights":"{init}"}}"#
            ))
            .unwrap();
        }
        parse(r#"{"peft_type":"LORA","init_lora_weights":false}"#).unwrap();
    }

    #[test]
    fn bad_json_has_position() {
        let e = err("{\n  \"peft_type\": \"LORA\",\n  \"r\": }");
        assert!(e.contains("line 3"), "{e}");
        let e = err(r#"{"peft_type":"LORA","r":"four"}"#);
        assert!(e.contains("column"), "{e}");
    }

    #[test]
    fn read_hashes_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adapter_config.json");
        std::fs::write(&path, FULL).unwrap();
        let (c, rec) = PeftConfig::read(&path).unwrap();
        assert_eq!(c.r, 4);
        assert_eq!(rec.size, FULL.len() as u64);
        assert_eq!(rec.sha256, sha256_hex(FULL.as_bytes()));
    }
}
