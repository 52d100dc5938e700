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

pub struct Card<'a> {
    pub base_model: Option<&'a str>,
    pub method: &'a str,
    pub method_note: &'a str,
    pub inputs: Vec<CardInput>,
    pub modules: usize,
    /// The command as typed.
    pub command: &'a str,
    /// The command with every Hub input pinned to its commit: it reproduces
    /// this merge whatever the branches do later.
    pub reproduce: &'a str,
    /// The inputs' license, when they all state the same one.
    pub license: Option<&'a str>,
    pub adapter_sha256: &'a str,
    /// "peft", "kohya" or "diffusers".
    pub format: &'a str,
    /// The weights file's name.
    pub weights_file: &'a str,
    /// Markdown added after the inputs (`fit`'s learned weights).
    pub extra_section: Option<&'a str>,
}

fn yaml_str(s: &str) -> String {
    // JSON strings are valid YAML double-quoted scalars.
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

impl Card<'_> {
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
        if let Some(base) = self.base_model {
            let _ = writeln!(s, "base_model: {}", yaml_str(base));
        }
        if let Some(license) = self.license {
            let _ = writeln!(s, "license: {}", yaml_str(license));
        }
        let _ = writeln!(s, "tags:\n- lora\n- {}\n- lora-merge\n- merge", self.format);
        let _ = writeln!(s, "---\n");
        let _ = writeln!(s, "# Merged LoRA adapter\n");
        let _ =
            writeln!(
            s,
            "A merge of {} LoRA adapters{} made with lora-merge {} (method `{}`, {} modules). {}\n",
            self.inputs.len(),
            self.base_model.map(|b| format!(" for `{b}`")).unwrap_or_default(),
            env!("CARGO_PKG_VERSION"),
            self.method,
            self.modules,
            self.method_note
        );
        let _ = writeln!(s, "## Provenance\n");
        let _ = writeln!(s, "Method: `{}`.\n", self.method);
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
                inp.given.replace('|', "\\|"),
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
        if let Some(extra) = self.extra_section {
            let _ = writeln!(s, "\n{}", extra.trim_end());
        }
        let _ = writeln!(
            s,
            "\nMerged weights: `{}` sha256 `{}`.",
            self.weights_file, self.adapter_sha256
        );
        let _ = writeln!(
            s,
            "Full provenance (files, hashes, per-module error): `merge_manifest.json`.\n"
        );
        let _ = writeln!(s, "## Reproduce\n\n```sh\n{}\n```\n", self.reproduce);
        if self.reproduce != self.command {
            let _ = writeln!(
                s,
                "(As typed: `{}`; above, every Hub input is pinned to the commit that was \
                 merged.)\n",
                self.command.replace('`', "'")
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

    fn card<'a>(license: Option<&'a str>, command: &'a str, reproduce: &'a str) -> Card<'a> {
        Card {
            base_model: Some("org/base"),
            method: "exact",
            method_note: "Exact.",
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
            modules: 3,
            command,
            reproduce,
            license,
            adapter_sha256: "0123",
            format: "peft",
            weights_file: "adapter_model.safetensors",
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
}
