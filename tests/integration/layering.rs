//! The module layering the README draws, checked: no import cycle between
//! the library's top-level modules, and no command file (library or
//! companion) uses another command's file. Read from the sources, so a
//! new `use` that breaks the picture fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::common::repo;

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The code of a file without its `#[cfg(test)]` module and comments:
/// tests may reach anywhere.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => &text,
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The library's top-level module a file belongs to.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    if first == "bin" || first == "lib.rs" || first == "main.rs" {
        return None;
    }
    Some(first.trim_end_matches(".rs").to_string())
}

/// Every `crate::NAME` a text names.
fn crate_refs(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find(prefix) {
        rest = &rest[i + prefix.len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.insert(name);
        }
    }
    out
}

#[test]
fn library_modules_form_no_cycle() {
    let src = repo().join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in rust_files(&src) {
        let Some(m) = module_of(&src, &f) else {
            continue;
        };
        let text = code(&f);
        // `crate::x` and the macro spelling `$crate::x`.
        let refs = crate_refs(&text, "crate::");
        let entry = graph.entry(m.clone()).or_default();
        for r in refs {
            // Re-exports at the root (`crate::Error`, `crate::outln!`)
            // are the error module and the ui module.
            let r = match r.as_str() {
                "Error" | "Result" => "error".to_string(),
                "outln" => "ui".to_string(),
                _ => r,
            };
            if r != m {
                entry.insert(r);
            }
        }
    }
    assert!(graph.len() >= 8, "modules found: {:?}", graph.keys());
    // Depth-first search for a cycle, reporting its path.
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(n) {
            Some(2) => return None,
            Some(1) => {
                let start = path.iter().position(|p| p == n).unwrap_or(0);
                let mut cycle = path[start..].to_vec();
                cycle.push(n.to_string());
                return Some(cycle);
            }
            _ => {}
        }
        state.insert(n.to_string(), 1);
        path.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, g, state, path) {
                return Some(c);
            }
        }
        path.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        let cycle = visit(n, &graph, &mut state, &mut Vec::new());
        assert!(
            cycle.is_none(),
            "import cycle: {}",
            cycle.unwrap().join(" -> ")
        );
    }
    // The leaves stay leaves.
    for leaf in ["layout", "hash", "rng", "cli"] {
        let uses: Vec<&String> = graph[leaf].iter().filter(|r| *r != "error").collect();
        assert!(uses.is_empty(), "{leaf} should be a leaf but uses {uses:?}");
    }
    // The Hub knows no model or adapter layout beyond layout.rs.
    for m in ["adapter", "checkpoint", "compose", "output", "source"] {
        assert!(!graph["hub"].contains(m), "hub uses {m}");
    }
}

#[test]
fn no_command_uses_another_commands_file() {
    let lib_cmds = repo().join("src/commands");
    let torch_cmds = repo().join("src/bin/lora-merge-torch/commands");
    for (dir, sibling_prefixes) in [
        (&lib_cmds, ["super::", "crate::commands::"]),
        (&torch_cmds, ["super::", "crate::commands::"]),
    ] {
        let names: Vec<String> = rust_files(dir)
            .iter()
            .filter_map(|f| f.file_stem()?.to_str().map(str::to_string))
            .filter(|n| n != "mod")
            .collect();
        for f in rust_files(dir) {
            let me = f.file_stem().unwrap().to_str().unwrap().to_string();
            let text = code(&f);
            for other in names.iter().filter(|n| **n != me) {
                for p in sibling_prefixes {
                    let needle = format!("{p}{other}");
                    assert!(!text.contains(&needle), "{} uses {needle}", f.display());
                }
            }
            // The companion's commands use the library's parts, never its
            // commands.
            if dir == &torch_cmds {
                assert!(
                    !text.contains("lora_merge::commands"),
                    "{} uses the library's commands",
                    f.display()
                );
            }
        }
    }
}
