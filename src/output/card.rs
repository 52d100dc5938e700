//! README.md model card with Hub front matter. Deterministic: no timestamps
//! (those live in the manifest), so identical merges give identical cards.

use std::fmt::Write;

/// One merged input as the card lists it.
pub struct CardInput {
    pub given: String,
    /// The full commit sha of a Hub input.
    pub commit: Option<String>,
    pub weight: f64,
    pub rank: String,
    pub alpha: String,
    pub rslora: bool,
    pub weights_sha256: String,
}

/// A model card. The commands say what the adapter is (title, summary,
/// inputs, their own section); the writer adds what only it knows (the
/// command, its pinned form, the weights file and its hash).
#[derive(Default)]
pub struct Card {
    /// `# ...` heading.
    pub title: String,
    /// The first paragraph: what this adapter is.
    pub summary: String,
    pub base_model: Option<String>,
    /// The inputs' license, when they all state the same one.
    pub license: Option<String>,
    /// "peft", "kohya" or "diffusers".
    pub format: &'static str,
    /// Tags after `lora`, the format and `lora-merge`.
    pub tags: Vec<&'static str>,
    /// The method, for merges.
    pub method: Option<String>,
    /// The merged inputs (none for a trained adapter).
    pub inputs: Vec<CardInput>,
    /// Markdown added after the inputs (`fit`'s learned weights).
    pub extra_section: Option<String>,
    /// The command as typed.
    pub command: String,
    /// The command with every Hub input pinned to its commit: it reproduces
    /// this output whatever the branches do later.
    pub reproduce: String,
    /// The weights file's name and sha256.
    pub weights_file: String,
    pub adapter_sha256: String,
}

/// A string as YAML reads it back exactly: JSON strings are valid YAML
/// double-quoted scalars, and escaping keeps a newline or a `---` in a
/// name from ending the front matter.
fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Text inside a Markdown code span: one line, no backticks, no table bars.
pub fn code_span(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '`' => '\'',
            '|' => '\u{2502}',
            c if c.is_control() => ' ',
            c => c,
        })
        .collect()
}

impl Card {
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "---");
        match self.format {
            "peft" => {
                let _ = writeln!(s, "library_name: peft");
            }
            "diffusers" => {
                let _ = writeln!(s, "library_name: diffusers");
            }
            _ => {}
        }
        if let Some(base) = &self.base_model {
            let _ = writeln!(s, "base_model: {}", yaml_str(base));
        }
        if let Some(license) = &self.license {
            let _ = writeln!(s, "license: {}", yaml_str(license));
        }
        let _ = writeln!(s, "tags:\n- lora\n- {}\n- lora-merge", self.format);
        for t in &self.tags {
            let _ = writeln!(s, "- {t}");
        }
        let _ = writeln!(s, "---\n");
        let _ = writeln!(s, "# {}\n", self.title);
        let _ = writeln!(s, "{}\n", self.summary.trim_end());
        let _ = writeln!(s, "## Provenance\n");
        if let Some(method) = &self.method {
            let _ = writeln!(s, "Method: `{method}`.\n");
        }
        if !self.inputs.is_empty() {
            let _ = writeln!(
                s,
                "| # | adapter | revision | weight | rank | alpha | rsLoRA | weights sha256 |"
            );
            let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
            for (i, inp) in self.inputs.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "| {} | `{}` | {} | {} | {} | {} | {} | `{}` |",
                    i,
                    code_span(&inp.given),
                    inp.commit
                        .as_deref()
                        .map(|c| format!("`{c}`"))
                        .unwrap_or_else(|| "local".into()),
                    inp.weight,
                    inp.rank,
                    inp.alpha,
                    if inp.rslora { "yes" } else { "no" },
                    inp.weights_sha256
                );
            }
        }
        if let Some(extra) = &self.extra_section {
            let _ = writeln!(s, "\n{}", extra.trim_end());
        }
        let _ = writeln!(
            s,
            "\nWeights: `{}` sha256 `{}`.",
            self.weights_file, self.adapter_sha256
        );
        let _ = writeln!(
            s,
            "Full provenance (files, hashes, settings, per-module error): `merge_manifest.json`.\n"
        );
        let _ = writeln!(s, "## Reproduce\n\n```sh\n{}\n```\n", self.reproduce);
        if self.reproduce != self.command {
            let _ = writeln!(
                s,
                "(As typed: `{}`; above, every Hub input is pinned to the commit that was \
                 used.)\n",
                code_span(&self.command)
            );
        }
        let _ = match self.format {
            "kohya" => writeln!(
                s,
                "## Use\n\n`{}` is a kohya/sd-scripts LoRA file (`.alpha` = rank, so scale 1): \
                 load it in any tool that reads those.",
                self.weights_file
            ),
            "diffusers" => writeln!(
                s,
                "## Use\n\n```python\npipe.load_lora_weights(\"path/to/this/adapter\", weight_name=\"{}\")\n```",
                self.weights_file
            ),
            _ => writeln!(
                s,
                "## Use\n\n```python\nfrom peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, \"path/to/this/adapter\")\n```"
            ),
        };
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card(license: Option<&str>, command: &str, reproduce: &str) -> Card {
        Card {
            title: "Merged LoRA adapter".into(),
            summary: "A merge.".into(),
            base_model: Some("org/base".into()),
            method: Some("exact".into()),
            tags: vec!["merge"],
            inputs: vec![
                CardInput {
                    given: "org/a".into(),
                    commit: Some("a".repeat(40)),
                    weight: 0.5,
                    rank: "4".into(),
                    alpha: "8".into(),
                    rslora: false,
                    weights_sha256: "f".repeat(64),
                },
                CardInput {
                    given: "./b".into(),
                    commit: None,
                    weight: 0.5,
                    rank: "2".into(),
                    alpha: "2".into(),
                    rslora: true,
                    weights_sha256: "e".repeat(64),
                },
            ],
            command: command.into(),
            reproduce: reproduce.into(),
            license: license.map(str::to_string),
            adapter_sha256: "0123".into(),
            format: "peft",
            weights_file: "adapter_model.safetensors".into(),
            extra_section: None,
        }
    }

    #[test]
    fn front_matter_and_provenance() {
        let pinned = format!(
            "lora-merge uniform --adapters hf://org/a@{} ./b -o m",
            "a".repeat(40)
        );
        let s = card(
            Some("apache-2.0"),
            "lora-merge uniform --adapters org/a ./b -o m",
            &pinned,
        )
        .render();
        assert!(s.starts_with(
            "---\nlibrary_name: peft\nbase_model: \"org/base\"\nlicense: \"apache-2.0\"\ntags:\n- lora\n- peft\n"
        ), "{s}");
        assert!(
            s.contains(&format!(
                "| 0 | `org/a` | `{}` | 0.5 | 4 | 8 | no | `{}` |",
                "a".repeat(40),
                "f".repeat(64)
            )),
            "{s}"
        );
        assert!(
            s.contains("| 1 | `./b` | local | 0.5 | 2 | 2 | yes |"),
            "{s}"
        );
        assert!(s.contains(&format!("```sh\n{pinned}\n```")), "{s}");
        assert!(
            s.contains("(As typed: `lora-merge uniform --adapters org/a ./b -o m`"),
            "{s}"
        );

        let same = "lora-merge uniform --adapters ./b -o m";
        let s = card(None, same, same).render();
        assert!(!s.contains("license:") && !s.contains("As typed"), "{s}");
    }

    #[test]
    fn names_cannot_break_out_of_front_matter_or_tables() {
        let mut c = card(None, "lora-merge x", "lora-merge x");
        c.base_model = Some("evil\n---\n# injected".into());
        c.inputs[0].given = "a|b`c\nd".into();
        let s = c.render();
        assert!(s.contains("base_model: \"evil\\n---\\n# injected\""), "{s}");
        assert!(!s.contains("\n# injected"), "{s}");
        assert!(s.contains("| 0 | `a\u{2502}b'c d` |"), "{s}");
    }
}
