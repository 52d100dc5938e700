//! One file per subcommand. Each takes its parsed arguments and returns a
//! Result; `main` alone decides exit codes.

pub mod doctor;
pub mod inspect;
pub mod push;
pub mod uniform;
pub mod verify;

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
    // libtorch's OpenMP threads spin while they wait for work, which takes
    // the CPU from anything beside them (and them from each other when two
    // runs share a machine). Passive waiting yields it; it must be set
    // before libtorch loads, so here, not in the companion. A policy the
    // user set is kept. Figures: README, "Under load".
    if std::env::var_os("OMP_WAIT_POLICY").is_none() {
        cmd.env("OMP_WAIT_POLICY", "PASSIVE");
    }
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
