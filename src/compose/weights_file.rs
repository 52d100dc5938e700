//! Per-module weights from a file (`--weights-file`): a JSON object whose
//! keys are regular expressions over module names and whose values give one
//! weight per adapter, in order. The first rule (in the file's order) that
//! matches a module gives its weights; modules no rule matches keep the
//! global weights (`--weights`, or the method's default). This is how block
//! weights for Stable Diffusion and layer ranges for LLMs are given, and the
//! format `fit` writes its learned weights in (`weights.json`), so that they
//! can be merged again with another method or rank without refitting.
//!
//! ```json
//! {
//!   "down_blocks\\.0\\.": [1.0, 0.0],
//!   "layers\\.(1[6-9]|2[0-9]|3[01])\\.": [0.25, 0.75]
//! }
//! ```
//!
//! A rule matches when its expression matches anywhere in the module's name
//! as `inspect` and the manifest spell it, or, for Stable Diffusion modules,
//! in its diffusers path (`unet.down_blocks.0.attentions.0...`); anchor with
//! `^` and `$` to match whole names.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use regex::{Regex, RegexBuilder};
use serde::de::{self, Deserializer, MapAccess, Visitor};

use crate::{Error, Result};

/// The most rules a file may hold (one per module of a large model).
const MAX_RULES: usize = 16_384;
/// The longest expression, in bytes.
const MAX_PATTERN_LEN: usize = 4096;
/// What one compiled expression may take, for its program and its DFA.
const PATTERN_SIZE: usize = 1 << 20;
/// What all compiled expressions of one file may take together.
const PATTERN_BUDGET: usize = 256 << 20;

/// One rule: an expression and a weight per adapter.
#[derive(Debug, Clone)]
pub struct Rule {
    pub pattern: String,
    regex: Regex,
    pub weights: Vec<f64>,
}

/// The rules of a weights file, in the file's order.
#[derive(Debug, Clone)]
pub struct WeightRules {
    pub file: PathBuf,
    pub rules: Vec<Rule>,
}

/// The file's entries in order (serde_json's maps would sort them).
struct Ordered(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ordered;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object mapping module-name regexes to lists of weights")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Ordered, A::Error> {
                let mut out: Vec<(String, serde_json::Value)> = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
                    if out.iter().any(|(seen, _)| *seen == k) {
                        return Err(de::Error::custom(format!(
                            "the expression {k:?} is given twice"
                        )));
                    }
                    if out.len() == MAX_RULES {
                        return Err(de::Error::custom(format!("more than {MAX_RULES} rules")));
                    }
                    out.push((k, v));
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl WeightRules {
    /// Read and check `path` for `n` adapters. Errors name the file and the
    /// rule at fault.
    pub fn read(path: &Path, n: usize) -> Result<WeightRules> {
        let bytes = crate::layout::read_capped(path, crate::layout::JSON_CAP)?;
        Self::parse(path, &bytes, n)
    }

    pub fn parse(path: &Path, bytes: &[u8], n: usize) -> Result<WeightRules> {
        let bad = |msg: String| Error::Usage(format!("--weights-file {}: {msg}", path.display()));
        let Ordered(entries) = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if entries.is_empty() {
            return Err(bad("it holds no rules; give at least one \
                 \"module regex\": [one weight per adapter]"
                .into()));
        }
        let each = (PATTERN_BUDGET / entries.len()).clamp(64 << 10, PATTERN_SIZE);
        let mut rules = Vec::with_capacity(entries.len());
        for (pattern, value) in entries {
            if pattern.len() > MAX_PATTERN_LEN {
                return Err(bad(format!(
                    "an expression is {} bytes long, more than the {MAX_PATTERN_LEN} allowed",
                    pattern.len()
                )));
            }
            let regex = RegexBuilder::new(&pattern)
                .size_limit(each)
                .dfa_size_limit(each)
                .build()
                .map_err(|e| {
                    bad(format!(
                        "{pattern:?} is not a valid regular expression: {e}"
                    ))
                })?;
            let weights: Vec<f64> = match &value {
                serde_json::Value::Array(items) => items
                    .iter()
                    .map(|x| x.as_f64().filter(|w| w.is_finite()))
                    .collect::<Option<_>>()
                    .ok_or_else(|| {
                        bad(format!("{pattern:?}: every weight must be a finite number"))
                    })?,
                _ => {
                    return Err(bad(format!(
                        "{pattern:?}: expected a list of {n} weights (one per adapter), got {value}"
                    )))
                }
            };
            if weights.len() != n {
                return Err(bad(format!(
                    "{pattern:?} gives {} weights but {n} adapters were given; give one weight \
                     per adapter, in the order of --adapters",
                    weights.len()
                )));
            }
            rules.push(Rule {
                pattern,
                regex,
                weights,
            });
        }
        Ok(WeightRules {
            file: path.to_path_buf(),
            rules,
        })
    }

    /// The weights of every module a rule matches, by module name. Each
    /// module is given as (name, other spelling, such as a diffusers path).
    /// A rule that matches no module is refused: it is almost always a typo.
    pub fn apply<'a>(
        &self,
        modules: impl IntoIterator<Item = (&'a str, Option<String>)>,
    ) -> Result<BTreeMap<String, Vec<f64>>> {
        let mut used = vec![false; self.rules.len()];
        let mut out = BTreeMap::new();
        let mut names = Vec::new();
        for (name, other) in modules {
            let hit = self.rules.iter().position(|r| {
                r.regex.is_match(name) || other.as_deref().is_some_and(|o| r.regex.is_match(o))
            });
            if let Some(i) = hit {
                used[i] = true;
                out.insert(name.to_string(), self.rules[i].weights.clone());
            }
            if names.len() < 3 {
                names.push(other.unwrap_or_else(|| name.to_string()));
            }
        }
        if let Some(i) = used.iter().position(|u| !u) {
            let r = &self.rules[i];
            let hint = if out.is_empty() && !names.is_empty() {
                format!(" (module names look like {})", names.join(", "))
            } else {
                String::new()
            };
            let shadowed = if i > 0 {
                " not already taken by an earlier rule"
            } else {
                ""
            };
            return Err(Error::Usage(format!(
                "--weights-file {}: the rule {:?} matches no module{shadowed}{hint}; fix or \
                 remove it (`lora-merge inspect` lists the modules)",
                self.file.display(),
                r.pattern
            )));
        }
        Ok(out)
    }

    /// A weights file giving each module of `per_module` its own weights
    /// (anchored, escaped names), in module order: what `fit` writes.
    pub fn render(per_module: &BTreeMap<String, Vec<f64>>, global: &[f64]) -> Vec<u8> {
        let mut text = String::from("{\n");
        let mut first = true;
        let mut line = |key: String, w: &[f64]| {
            if !first {
                text.push_str(",\n");
            }
            first = false;
            let key = serde_json::to_string(&key).unwrap_or_default();
            let w = serde_json::to_string(w).unwrap_or_default();
            text.push_str(&format!("  {key}: {w}"));
        };
        for (name, w) in per_module {
            line(format!("^{}$", regex::escape(name)), w);
        }
        if per_module.is_empty() {
            line(".".into(), global);
        }
        text.push_str("\n}\n");
        text.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str, n: usize) -> Result<WeightRules> {
        WeightRules::parse(Path::new("w.json"), text.as_bytes(), n)
    }

    #[test]
    fn first_matching_rule_in_file_order_wins() {
        // "z" sorts after "a", but comes first in the file.
        let r = rules(r#"{"z|layers\\.1\\.": [1, 0], "layers": [0.5, 0.5]}"#, 2).unwrap();
        let got = r
            .apply([
                ("layers.1.q", None),
                ("layers.2.q", None),
                ("lora_unet_x", Some("unet.down_blocks.0.x".to_string())),
            ])
            .unwrap();
        assert_eq!(got["layers.1.q"], vec![1.0, 0.0]);
        assert_eq!(got["layers.2.q"], vec![0.5, 0.5]);
        assert!(!got.contains_key("lora_unet_x"));
        // The other spelling (a diffusers path) matches too.
        let r = rules(r#"{"^unet\\.down_blocks\\.0\\.": [2, 3]}"#, 2).unwrap();
        let got = r
            .apply([("lora_unet_x", Some("unet.down_blocks.0.x".to_string()))])
            .unwrap();
        assert_eq!(got["lora_unet_x"], vec![2.0, 3.0]);
    }

    #[test]
    fn bad_files_are_refused_naming_the_rule() {
        let e = |t: &str| rules(t, 2).unwrap_err().to_string();
        assert!(e(r#"{"a": [1]}"#).contains("gives 1 weights but 2 adapters"));
        assert!(e(r#"{"a": [1, "x"]}"#).contains("finite number"));
        assert!(e(r#"{"a": 1}"#).contains("expected a list of 2"));
        assert!(e(r#"{"(": [1, 2]}"#).contains("not a valid regular expression"));
        assert!(e(r#"{}"#).contains("no rules"));
        assert!(e(r#"[1, 2]"#).contains("JSON object"));
        assert!(e(r#"{"a": [1, 2], "a": [2, 1]}"#).contains("given twice"));
        // A rule that compiles to an enormous program is refused, not built.
        assert!(e(r#"{"(a{1000}){1000}": [1, 2]}"#).contains("not a valid regular expression"));
        let r = rules(r#"{"q_proj": [1, 2], "nothing_here": [1, 2]}"#, 2).unwrap();
        let msg = r.apply([("l.0.q_proj", None)]).unwrap_err().to_string();
        assert!(msg.contains("\"nothing_here\" matches no module"), "{msg}");
    }

    #[test]
    fn what_fit_writes_reads_back_to_the_same_weights() {
        let per: BTreeMap<String, Vec<f64>> = [
            ("model.layers.0.q_proj".to_string(), vec![0.25, 0.75]),
            ("model.layers.10.q_proj".to_string(), vec![0.5, 0.5]),
        ]
        .into();
        let text = WeightRules::render(&per, &[0.5, 0.5]);
        let r = WeightRules::parse(Path::new("w"), &text, 2).unwrap();
        let got = r.apply(per.keys().map(|k| (k.as_str(), None))).unwrap();
        assert_eq!(got, per);
        // Global weights only: one rule for every module.
        let text = WeightRules::render(&BTreeMap::new(), &[0.1, 0.9]);
        let r = WeightRules::parse(Path::new("w"), &text, 2).unwrap();
        let got = r.apply([("a", None), ("b", None)]).unwrap();
        assert_eq!(got["b"], vec![0.1, 0.9]);
    }
}
