//! The only exit point: parse, dispatch, map errors to exit codes.

use clap::Parser;
use lora_merge::cli::{Cli, Command};
use lora_merge::commands;

fn main() {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Doctor(a) => commands::doctor::run(a),
        Command::Inspect(a) => commands::inspect::run(a),
        Command::Uniform(a) => commands::uniform::run(a),
        Command::Verify(a) => commands::verify::run(a),
        Command::Push(a) => commands::push::run(a),
        // Needs libtorch: handed, arguments unchanged, to the companion binary.
        Command::Eval(_) | Command::Fit(_) | Command::Train(_) => commands::run_in_companion(),
    };
    if let Err(e) = result {
        eprintln!("lora-merge: error: {e}");
        std::process::exit(e.exit_code());
    }
}
