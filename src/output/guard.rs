//! The output directory is checked against every input before any work:
//! an OUT that is an input, holds one, or lies inside one is refused, with
//! `--force` or without, since replacing it would destroy what is being
//! read (or add files to an input). Paths are compared after resolving
//! symbolic links, and also as given, so neither a link into OUT nor a
//! link inside OUT gets past.

use std::ffi::OsString;
use std::fs;
use std::path::{Component, Path, PathBuf};

use crate::{Error, Result};

/// One input the command reads: what the user called it (for the
/// message) and its path.
pub struct Input<'a> {
    pub what: &'a str,
    pub path: PathBuf,
    /// A folder (adapter or model directory): OUT may not lie inside it. A
    /// file input only forbids OUT being the file or a folder holding it.
    pub is_dir: bool,
}

impl<'a> Input<'a> {
    /// An input whose kind is read from the disk (a folder or a file).
    pub fn at(what: &'a str, path: impl Into<PathBuf>) -> Input<'a> {
        let path = path.into();
        let is_dir = fs::metadata(&path).is_ok_and(|m| m.is_dir());
        Input { what, path, is_dir }
    }
}

/// `p` as an absolute path with `.` and `..` removed, links in the
/// existing part resolved: the directory it names or would name.
fn resolved(p: &Path) -> Result<PathBuf> {
    let abs = absolute(p)?;
    // The longest prefix that exists is canonicalised; the rest is appended.
    let mut existing = abs.clone();
    let mut rest: Vec<OsString> = Vec::new();
    loop {
        match fs::canonicalize(&existing) {
            Ok(c) => {
                let mut out = c;
                for r in rest.iter().rev() {
                    out.push(r);
                }
                return Ok(out);
            }
            Err(_) => match (existing.file_name(), existing.parent()) {
                (Some(name), Some(parent)) => {
                    rest.push(name.to_os_string());
                    existing = parent.to_path_buf();
                }
                _ => return Ok(abs),
            },
        }
    }
}

/// Absolute, with `.` and `..` removed lexically; links untouched.
fn absolute(p: &Path) -> Result<PathBuf> {
    let base = if p.is_absolute() {
        PathBuf::new()
    } else {
        std::env::current_dir().map_err(|e| Error::io(".", e))?
    };
    let mut out = base;
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    Ok(out)
}

/// Refuse `target` as an output before any work is done: a file, a
/// non-empty directory without `force`, and anything that overlaps an
/// input.
pub fn check_output(target: &Path, force: bool, inputs: &[Input]) -> Result<()> {
    if target.as_os_str().is_empty() {
        return Err(Error::Usage("-o needs a directory name".into()));
    }
    let out_given = absolute(target)?;
    let out_real = resolved(target)?;
    for input in inputs {
        // Inputs that are not on this disk (Hub references) cannot overlap.
        if fs::symlink_metadata(&input.path).is_err() {
            continue;
        }
        let Ok(in_given) = absolute(&input.path) else {
            continue;
        };
        let in_real = resolved(&input.path).unwrap_or_else(|_| in_given.clone());
        for (o, i) in [
            (&out_given, &in_given),
            (&out_real, &in_real),
            (&out_given, &in_real),
            (&out_real, &in_given),
        ] {
            let why = if o == i {
                Some("is")
            } else if i.starts_with(o) {
                Some("holds")
            } else if input.is_dir && o.starts_with(i) {
                Some("lies inside")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(Error::Usage(format!(
                    "output {} {why} the {} {}; writing there would {} what is being read. \
                     Choose another -o (--force does not change this)",
                    target.display(),
                    input.what,
                    input.path.display(),
                    if why == "lies inside" {
                        "add files to"
                    } else {
                        "replace"
                    }
                )));
            }
        }
    }
    if let Ok(meta) = fs::symlink_metadata(target) {
        if !meta.is_dir() {
            return Err(Error::Usage(format!(
                "output {} exists and is not a directory; choose another -o",
                target.display()
            )));
        }
        let non_empty = fs::read_dir(target)
            .map_err(|e| Error::io(target, e))?
            .next()
            .is_some();
        if non_empty && !force {
            return Err(Error::Usage(format!(
                "output {} exists and is not empty; pass --force to replace it",
                target.display()
            )));
        }
    }
    // Two runs on one OUT: the second is refused here, before its work.
    super::atomic::claim(target, force)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(out: &Path, inputs: &[Input]) -> String {
        check_output(out, true, inputs).unwrap_err().to_string()
    }

    #[test]
    fn every_overlap_is_refused_with_force() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let model = root.join("model");
        fs::create_dir(&model).unwrap();
        fs::write(model.join("config.json"), "{}").unwrap();
        let shots = root.join("shots");
        fs::create_dir(&shots).unwrap();
        fs::write(shots.join("d.jsonl"), "{}").unwrap();
        let base = [Input::at("base model", &model)];
        let data = [Input::at("shots file", shots.join("d.jsonl"))];

        // OUT is the input.
        assert!(refused(&model, &base).contains("is the base model"));
        // OUT holds the input.
        assert!(refused(&shots, &data).contains("holds the shots file"));
        assert!(refused(root, &base).contains("holds the base model"));
        // OUT inside an input folder, existing or not.
        assert!(refused(&model.join("sub"), &base).contains("lies inside"));
        assert!(refused(&model.join("a/b/../c"), &base).contains("lies inside"));
        // Spelled with .. and . .
        assert!(refused(&root.join("x/../model/."), &base).contains("is the base model"));
        // OUT beside a file input is fine.
        check_output(&shots.join("merged"), true, &data).unwrap();
        // A link to the input, as OUT or as the input.
        let link = root.join("link");
        std::os::unix::fs::symlink(&model, &link).unwrap();
        assert!(refused(&link, &base).contains("base model"));
        let via_link = [Input::at("base model", &link)];
        assert!(refused(&model, &via_link).contains("base model"));
        // A link inside OUT pointing elsewhere: OUT holds the input as given.
        let holder = root.join("holder");
        fs::create_dir(&holder).unwrap();
        std::os::unix::fs::symlink(shots.join("d.jsonl"), holder.join("d.jsonl")).unwrap();
        let linked = [Input::at("shots file", holder.join("d.jsonl"))];
        assert!(refused(&holder, &linked).contains("holds the shots file"));
        // Unrelated: fine (empty or new).
        check_output(&root.join("new"), false, &base).unwrap();
    }

    #[test]
    fn non_empty_needs_force_and_files_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("out");
        fs::create_dir(&out).unwrap();
        check_output(&out, false, &[]).unwrap();
        fs::write(out.join("x"), "x").unwrap();
        let e = check_output(&out, false, &[]).unwrap_err().to_string();
        assert!(e.contains("--force"), "{e}");
        check_output(&out, true, &[]).unwrap();
        let e = check_output(&out.join("x"), true, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a directory"), "{e}");
    }
}
