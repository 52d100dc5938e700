//! The one exit-code contract, for both binaries: parse the command line,
//! run the command, and turn every outcome into a message and a status.
//!
//! - 0: success (and `--help`, `--version`).
//! - 1: the request is at fault and the user can fix it: an unknown or bad
//!   flag (clap's usage errors included), an invalid or incompatible input,
//!   a refused output, a diverged training run, `verify` found a
//!   difference, the Hub refused.
//! - 2: the environment failed: I/O, network, out of memory, or an internal
//!   error (a bug: a panic is reported as one, never as a Rust backtrace).

use std::ffi::OsString;
use std::sync::Mutex;

use clap::Parser;

use crate::cli::Cli;
use crate::{Error, Result};

pub use crate::error::status::{FAILURE, SUCCESS, USER_ERROR};

/// Where the last panic happened and what it said, kept by the panic hook
/// for the one message the user sees.
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

/// Keep panic messages to ourselves: the default hook prints "thread 'main'
/// panicked" even when the panic is caught (libtorch reports errors by
/// panicking). `LORA_MERGE_BACKTRACE=1` restores the default output.
fn install_panic_hook() {
    if std::env::var_os("LORA_MERGE_BACKTRACE").is_some() {
        return;
    }
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        if let Ok(mut slot) = LAST_PANIC.lock() {
            *slot = Some(format!("{}{at}", msg.lines().next().unwrap_or("")));
        }
    }));
}

/// Ctrl-C and SIGTERM: remove what the run was writing (staging folder,
/// output lock; see `output::atomic`) and end with the shell's status for
/// the signal (130, 143). A swap in progress finishes first.
fn install_signal_cleanup() {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
        return; // the default behaviour stays: the next run cleans up
    };
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            crate::output::atomic::release_all();
            std::process::exit(128 + sig);
        }
    });
}

/// Parse `args` (argv[0] first) and run `dispatch`, then exit with the
/// contract's status. Never returns.
pub fn main(
    args: impl IntoIterator<Item = OsString>,
    dispatch: impl FnOnce(&Cli) -> Result<()>,
) -> ! {
    install_panic_hook();
    install_signal_cleanup();
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version go to stdout with status 0; a usage
            // error goes to stderr with status 1.
            let _ = e.print();
            std::process::exit(if e.use_stderr() { USER_ERROR } else { SUCCESS });
        }
    };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        dispatch(&cli).and_then(|()| crate::ui::stdout_status())
    }));
    let result = outcome.unwrap_or_else(|_| {
        let what = LAST_PANIC
            .lock()
            .ok()
            .and_then(|s| s.clone())
            .unwrap_or_else(|| "a panic".into());
        Err(Error::Internal(format!(
            "{what}; this is a bug in lora-merge, please report it with the command line \
             (LORA_MERGE_BACKTRACE=1 RUST_BACKTRACE=1 shows where)"
        )))
    });
    crate::output::atomic::release_all();
    match result {
        Ok(()) => std::process::exit(SUCCESS),
        Err(e) => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "lora-merge: error: {e}");
            std::process::exit(e.exit_code());
        }
    }
}
