//! The one error type of the library. Only `main` turns it into an exit code.

use std::path::{Path, PathBuf};

/// Everything that can go wrong. Variants are grouped by what the user can do
/// about them, which is also what decides the exit code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An input file is malformed or unsupported. Names the file.
    #[error("{}: {msg}", file.display())]
    Invalid { file: PathBuf, msg: String },

    /// The inputs are each fine but do not fit together (shape conflict,
    /// different base models, ...).
    #[error("{0}")]
    Incompatible(String),

    /// The command line asks for something that cannot be done.
    #[error("{0}")]
    Usage(String),

    /// `verify` found a file that differs from its manifest.
    #[error("{0}")]
    Mismatch(String),

    /// Reading or writing failed at the operating-system level.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The Hub said no: an unknown repository, revision or file, a refused
    /// token, or (offline) something missing from the cache. Names the
    /// repository, the revision and the file.
    #[error("{0}")]
    Hub(String),

    /// The Hub could not be reached or answered something unusable.
    #[error("{0}")]
    Network(String),

    /// Training went wrong with the settings the user chose (a loss that
    /// became NaN or infinite): what happened and what to try.
    #[error("{0}")]
    Diverged(String),

    /// A bug or an environment problem we cannot attribute to the input.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The exit statuses of the contract (see [`crate::exit`]).
pub mod status {
    pub const SUCCESS: i32 = 0;
    /// The input or the command line is at fault.
    pub const USER_ERROR: i32 = 1;
    /// I/O, network or internal failure.
    pub const FAILURE: i32 = 2;
}

impl Error {
    pub fn invalid(file: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Invalid {
            file: file.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }

    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// The exit-code contract ([`crate::exit`]): 1 when the user can fix
    /// the request (bad or incompatible input, Hub refusals, diverged
    /// training), 2 for I/O, network and internal errors.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Invalid { .. }
            | Error::Incompatible(_)
            | Error::Usage(_)
            | Error::Mismatch(_)
            | Error::Hub(_)
            | Error::Diverged(_) => status::USER_ERROR,
            Error::Io { .. } | Error::Network(_) | Error::Internal(_) => status::FAILURE,
        }
    }
}
