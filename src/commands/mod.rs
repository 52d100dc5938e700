//! One file per subcommand. Each takes its parsed arguments and returns a
//! Result; `main` alone decides exit codes.

pub mod doctor;
pub mod inspect;
pub mod push;
pub mod uniform;
pub mod verify;

use std::io::IsTerminal;
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};

use crate::adapter::{source, Format};
use crate::cli::{FormatArg, InputFormat};
use crate::{Error, Result};

/// The companion binary that holds everything linked to libtorch: beside
/// this executable, named `lora-merge-torch`. None in builds without the
/// `torch` feature.
pub fn torch_companion() -> Option<std::path::PathBuf> {
    if !cfg!(feature = "torch") {
        return None;
    }
    let exe = std::env::current_exe().ok()?;
    Some(exe.with_file_name(format!("lora-merge-torch{}", std::env::consts::EXE_SUFFIX)))
}

/// Run this command line in the companion binary, which links libtorch, in
/// place of this process (same arguments, terminal, exit status). Returns
/// only on failure.
pub fn run_in_companion() -> Result<()> {
    let Some(exe) = torch_companion() else {
        return Err(Error::Usage(
            "this command needs libtorch, and this lora-merge was built without the `torch` \
             feature; build it with default features"
                .into(),
        ));
    };
    if !exe.exists() {
        return Err(Error::Internal(format!(
            "{} is missing: it is built and installed with lora-merge (cargo build)",
            exe.display()
        )));
    }
    let mut cmd = std::process::Command::new(&exe);
    cmd.arg("cli").args(std::env::args_os().skip(1));
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let e = cmd.exec();
        Err(Error::Internal(format!(
            "cannot run {}: {e}",
            exe.display()
        )))
    }
    #[cfg(not(unix))]
    {
        let status = cmd
            .status()
            .map_err(|e| Error::Internal(format!("cannot run {}: {e}", exe.display())))?;
        std::process::exit(status.code().unwrap_or(2));
    }
}

/// The command line as the user typed it, the program spelled `lora-merge`
/// (argv[0] is wherever the binary happened to be). The companion binary
/// receives the user's arguments after a `cli` marker, which is dropped.
pub fn command_line() -> Vec<String> {
    let mut args = std::env::args().skip(1).peekable();
    let companion = std::env::current_exe()
        .ok()
        .and_then(|p| {
            p.file_stem()
                .map(|s| s.to_string_lossy().starts_with("lora-merge-torch"))
        })
        .unwrap_or(false);
    if companion && args.peek().map(String::as_str) == Some("cli") {
        args.next();
    }
    std::iter::once("lora-merge".to_string())
        .chain(args)
        .collect()
}

/// References from the command line followed by those in --adapters-file;
/// possibly none.
pub fn adapter_refs_opt(given: &[String], file: Option<&Path>) -> Result<Vec<String>> {
    let mut refs = given.to_vec();
    if let Some(f) = file {
        refs.extend(source::read_adapters_file(f)?);
    }
    Ok(refs)
}

/// References from the command line followed by those in --adapters-file.
pub fn adapter_refs(given: &[String], file: Option<&Path>) -> Result<Vec<String>> {
    let refs = adapter_refs_opt(given, file)?;
    if refs.is_empty() {
        return Err(Error::Usage(
            "no adapters given; pass --adapters A B ... or --adapters-file FILE".into(),
        ));
    }
    Ok(refs)
}

/// The layout `--format` forces, or None to detect each file's.
pub fn input_format(arg: &InputFormat) -> Option<Format> {
    match arg.format {
        FormatArg::Auto => None,
        FormatArg::Peft => Some(Format::Peft),
        FormatArg::Kohya => Some(Format::Kohya),
        FormatArg::Diffusers => Some(Format::Diffusers),
    }
}

/// A progress bar on stderr, or a hidden one when stderr is not a terminal.
pub fn progress(len: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// Machine output on stdout. A closed pipe is not an error.
pub fn print_json(value: &impl serde::Serialize) -> Result<()> {
    use std::io::Write;
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Internal(e.to_string()))?;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.map_err(|e| Error::io("<stdout>", e)),
    }
}

/// Human-readable byte count.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
