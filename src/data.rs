//! Labelled examples as JSON Lines. A bad line is an error with its number
//! and what is wrong; blank lines are skipped.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// What the examples are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// `{"prompt", "completion"}` (or `{"input", "output"}`): the loss is on
    /// the completion tokens.
    CausalLm,
    /// `{"text", "label"}`: classes from labels.
    Classify,
}

impl Task {
    pub fn name(self) -> &'static str {
        match self {
            Task::CausalLm => "causal-lm",
            Task::Classify => "classify",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CausalExample {
    pub prompt: String,
    pub completion: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LabelledText {
    pub text: String,
    /// Labels are compared as strings; a number label `3` reads as "3".
    pub label: String,
    /// The example's line in its file (1-based), for errors that point at
    /// it.
    pub line: usize,
}

fn lines(path: &Path) -> Result<Vec<(usize, serde_json::Map<String, Value>)>> {
    let text = crate::layout::read_capped_text(path, crate::layout::DATA_CAP)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| Error::invalid(path, format!("line {n}: not JSON: {e}")))?;
        let Value::Object(obj) = v else {
            return Err(Error::invalid(
                path,
                format!("line {n}: expected a JSON object"),
            ));
        };
        // serde_json keeps the last of two equal keys without a word, so
        // `{"label": "x", "label": "y"}` would silently mean "y".
        if let Ok(RepeatedKey(Some(key))) = serde_json::from_str(line) {
            return Err(Error::invalid(
                path,
                format!(
                    "line {n}: the key {} appears twice; keep one, since it is not clear \
                     which value is meant",
                    Value::String(key)
                ),
            ));
        }
        out.push((n, obj));
    }
    if out.is_empty() {
        return Err(Error::invalid(
            path,
            "no examples (the file has no non-blank lines)",
        ));
    }
    Ok(out)
}

/// The first key of a JSON object that appears more than once, if any.
struct RepeatedKey(Option<String>);

impl<'de> serde::Deserialize<'de> for RepeatedKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = RepeatedKey;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<RepeatedKey, A::Error> {
                let mut seen = std::collections::HashSet::new();
                let mut repeated = None;
                while let Some(key) = map.next_key::<String>()? {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    if repeated.is_none() && seen.contains(&key) {
                        repeated = Some(key);
                    } else {
                        seen.insert(key);
                    }
                }
                Ok(RepeatedKey(repeated))
            }
        }
        d.deserialize_map(Keys)
    }
}

fn string_field(
    path: &Path,
    n: usize,
    obj: &serde_json::Map<String, Value>,
    names: &[&str],
) -> Result<String> {
    let Some((name, v)) = names.iter().find_map(|k| obj.get(*k).map(|v| (*k, v))) else {
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        return Err(Error::invalid(
            path,
            format!(
                "line {n}: no {} field (found: {})",
                names.join(" or "),
                if keys.is_empty() {
                    "none".into()
                } else {
                    keys.join(", ")
                }
            ),
        ));
    };
    match v {
        Value::String(s) => Ok(s.clone()),
        other => Err(Error::invalid(
            path,
            format!("line {n}: {name} must be a string, found {other}"),
        )),
    }
}

/// Causal-LM examples: `prompt`/`completion`, or `input`/`output`.
pub fn read_causal(path: &Path) -> Result<Vec<CausalExample>> {
    lines(path)?
        .into_iter()
        .map(|(n, obj)| {
            let prompt = string_field(path, n, &obj, &["prompt", "input"])?;
            let completion = string_field(path, n, &obj, &["completion", "output"])?;
            if completion.is_empty() {
                return Err(Error::invalid(
                    path,
                    format!("line {n}: the completion is empty, so there is nothing to score"),
                ));
            }
            Ok(CausalExample { prompt, completion })
        })
        .collect()
}

/// Classification examples: `text` and `label` (a string, or an integer).
///
/// Labels are classes by their text, so `1` and `"1"` would be one class;
/// a file that spells one label both ways is refused, naming a line of each,
/// since the two spellings usually come from two sources that meant
/// different things.
pub fn read_labelled(path: &Path) -> Result<Vec<LabelledText>> {
    // Per label text: the first line that gave it, and its JSON spelling.
    let mut spelled: std::collections::HashMap<String, (usize, Value)> =
        std::collections::HashMap::new();
    lines(path)?
        .into_iter()
        .map(|(n, obj)| {
            let text = string_field(path, n, &obj, &["text"])?;
            let label = match obj.get("label") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(x)) if x.is_i64() || x.is_u64() => x.to_string(),
                Some(other) => {
                    return Err(Error::invalid(
                        path,
                        format!("line {n}: label must be a string or an integer, found {other}"),
                    ))
                }
                None => {
                    return Err(Error::invalid(path, format!("line {n}: no label field")));
                }
            };
            let value = &obj["label"];
            let (first, first_value) = spelled
                .entry(label.clone())
                .or_insert_with(|| (n, value.clone()));
            if first_value.is_string() != value.is_string() {
                return Err(Error::invalid(
                    path,
                    format!(
                        "line {first} has the label {first_value} and line {n} the label \
                         {value}, which would be one class; write every label the same way \
                         (all strings or all numbers)"
                    ),
                ));
            }
            Ok(LabelledText {
                text,
                label,
                line: n,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn causal_accepts_both_spellings_and_skips_blank_lines() {
        let f = file(
            "{\"prompt\":\"a\",\"completion\":\" b\"}\n\n{\"input\":\"c\",\"output\":\"d\"}\n",
        );
        let ex = read_causal(f.path()).unwrap();
        assert_eq!(
            ex,
            [
                CausalExample {
                    prompt: "a".into(),
                    completion: " b".into()
                },
                CausalExample {
                    prompt: "c".into(),
                    completion: "d".into()
                }
            ]
        );
    }

    #[test]
    fn bad_lines_are_named_by_number() {
        let f = file("{\"prompt\":\"a\",\"completion\":\"b\"}\n{\"prompt\":\"a\"\n");
        let e = read_causal(f.path()).unwrap_err().to_string();
        assert!(e.contains("line 2: not JSON"), "{e}");
        let f = file("{\"prompt\":\"a\",\"answer\":\"b\"}\n");
        let e = read_causal(f.path()).unwrap_err().to_string();
        assert!(
            e.contains("line 1: no completion or output field (found: prompt, answer)"),
            "{e}"
        );
        let f = file("{\"text\":\"a\",\"label\":1.5}\n");
        let e = read_labelled(f.path()).unwrap_err().to_string();
        assert!(
            e.contains("line 1: label must be a string or an integer"),
            "{e}"
        );
        let f = file("[1]\n");
        assert!(read_labelled(f.path())
            .unwrap_err()
            .to_string()
            .contains("line 1: expected"));
        let f = file("\n\n");
        assert!(read_labelled(f.path())
            .unwrap_err()
            .to_string()
            .contains("no examples"));
    }

    #[test]
    fn a_label_spelled_as_number_and_string_is_refused() {
        let f = file(
            "{\"text\":\"x\",\"label\":1}\n{\"text\":\"y\",\"label\":2}\n\n{\"text\":\"z\",\"label\":\"1\"}\n",
        );
        let e = read_labelled(f.path()).unwrap_err().to_string();
        let name = f.path().display().to_string();
        for want in [
            name.as_str(),
            "line 1",
            "label 1 ",
            "line 4",
            "\"1\"",
            "one class",
        ] {
            assert!(e.contains(want), "{e} lacks {want}");
        }
        // One spelling throughout is fine, either way.
        let f = file("{\"text\":\"x\",\"label\":\"1\"}\n{\"text\":\"z\",\"label\":\"1\"}\n");
        assert_eq!(read_labelled(f.path()).unwrap().len(), 2);
    }

    #[test]
    fn a_key_given_twice_in_a_line_is_refused() {
        let f = file(
            "{\"text\":\"a\",\"label\":\"x\"}\n{\"text\":\"b\",\"label\":\"x\",\"label\":\"y\"}\n",
        );
        let e = read_labelled(f.path()).unwrap_err().to_string();
        let name = f.path().display().to_string();
        for want in [name.as_str(), "line 2", "\"label\" appears twice"] {
            assert!(e.contains(want), "{e} lacks {want}");
        }
        let f = file("{\"prompt\":\"a\",\"completion\":\"b\",\"prompt\":\"c\"}\n");
        let e = read_causal(f.path()).unwrap_err().to_string();
        assert!(
            e.contains("line 1: the key \"prompt\" appears twice"),
            "{e}"
        );
        // The same key in a nested object is another object's key.
        let f = file("{\"prompt\":\"a\",\"completion\":\"b\",\"meta\":{\"prompt\":1}}\n");
        assert_eq!(read_causal(f.path()).unwrap().len(), 1);
    }

    #[test]
    fn integer_labels_read_as_strings() {
        let f = file("{\"text\":\"x\",\"label\":3}\n{\"text\":\"y\",\"label\":\"pos\"}\n");
        let ex = read_labelled(f.path()).unwrap();
        assert_eq!(ex[0].label, "3");
        assert_eq!(ex[1].label, "pos");
    }
}
