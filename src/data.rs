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
pub fn read_labelled(path: &Path) -> Result<Vec<LabelledText>> {
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
            Ok(LabelledText { text, label })
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
    fn integer_labels_read_as_strings() {
        let f = file("{\"text\":\"x\",\"label\":3}\n{\"text\":\"y\",\"label\":\"pos\"}\n");
        let ex = read_labelled(f.path()).unwrap();
        assert_eq!(ex[0].label, "3");
        assert_eq!(ex[1].label, "pos");
    }
}
