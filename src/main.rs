//! The only exit point: parse, dispatch, and the exit-code contract of
//! [`lora_merge::exit`].

use lora_merge::cli::Command;
use lora_merge::commands;

fn main() {
    lora_merge::resources::reuse_freed_memory();
    lora_merge::exit::main(std::env::args_os(), |cli| match &cli.command {
        Command::Doctor(a) => commands::doctor::run(a),
        Command::Inspect(a) => commands::inspect::run(a),
        Command::Uniform(a) => commands::uniform::run(a),
        Command::Verify(a) => commands::verify::run(a),
        Command::Push(a) => commands::push::run(a),
        // Needs libtorch: handed, arguments unchanged, to the companion binary.
        Command::Eval(_) | Command::Fit(_) | Command::Train(_) => commands::run_in_companion(),
    })
}
