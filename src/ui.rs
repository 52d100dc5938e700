//! What the user sees: results on stdout (a closed pipe is not an error),
//! progress bars on stderr when it is a terminal, byte counts for people.
//! Every command, in both binaries, speaks through this.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

use crate::{Error, Result};

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
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Internal(e.to_string()))?;
    stdout_line(format_args!("{text}"));
    stdout_status()
}

/// The first failure to write a result to stdout, other than a closed pipe.
static STDOUT_ERROR: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Write one line of a result to stdout. A reader that went away (`| head`)
/// is not an error: the rest is dropped. Any other failure is remembered for
/// [`stdout_status`], so that `main` can report it with exit status 2.
pub fn stdout_line(args: std::fmt::Arguments) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|_| out.write_all(b"\n")) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            if let Ok(mut slot) = STDOUT_ERROR.lock() {
                slot.get_or_insert(e.to_string());
            }
        }
    }
}

/// Whether every result line reached stdout (or a reader that left).
pub fn stdout_status() -> Result<()> {
    use std::io::Write;
    let flushed = std::io::stdout().flush();
    let first = STDOUT_ERROR.lock().ok().and_then(|s| s.clone());
    match (first, flushed) {
        (Some(e), _) => Err(Error::Internal(format!("cannot write to stdout: {e}"))),
        (None, Err(e)) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Error::io("<stdout>", e))
        }
        _ => Ok(()),
    }
}

/// `println!` for results: to stdout, where a closed pipe is not an error
/// (see [`stdout_line`]).
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::ui::stdout_line(format_args!($($arg)*))
    };
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

/// A line for people on stderr (progress, summaries, notes). A closed or
/// broken stderr (`2>&1 | head -1` after the reader left) is not an error:
/// the line is dropped and the run goes on, where `eprintln!` would panic
/// after the output was already written.
pub fn note(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// A warning on stderr. A closed or broken stderr is not an error: the
/// warning is dropped and the run goes on.
pub fn warn(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "warning: {msg}");
}
