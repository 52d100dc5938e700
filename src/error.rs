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

    /// A bug or an environment problem we cannot attribute to the input.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

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

    /// Exit code contract: 1 for bad or incompatible input (the user can fix
    /// it, Hub refusals included), 2 for I/O, network and internal errors.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Invalid { .. }
            | Error::Incompatible(_)
            | Error::Usage(_)
            | Error::Mismatch(_)
            | Error::Hub(_) => 1,
            Error::Io { .. } | Error::Network(_) | Error::Internal(_) => 2,
        }
    }
}
