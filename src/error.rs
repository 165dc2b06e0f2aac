//! The library's error type: every variant names what the user has to fix.

use std::path::PathBuf;

/// Errors from loading models, reading inputs and running the pipeline.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read or written. The I/O error is part of the message,
    /// not a separate cause, so error chains print it once.
    #[error("{}: {cause}", path.display())]
    Io { path: PathBuf, cause: std::io::Error },
    /// A config file is malformed or has a value we do not support.
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    /// A weight file lacks a tensor a model needs.
    #[error("{path}: missing tensor `{key}`")]
    MissingTensor { path: PathBuf, key: String },
    /// A tensor in a weight file has the wrong shape.
    #[error("{path}: tensor `{key}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch { path: PathBuf, key: String, expected: Vec<usize>, found: Vec<usize> },
    /// A weight file is not in a format we can read.
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    /// A user-supplied argument is out of range or inconsistent.
    #[error("{0}")]
    InvalidArgument(String),
    /// What was being done when `cause` happened (e.g. "loading ControlNet cn/"). The cause is
    /// part of the message, not a separate source, so error chains print it once.
    #[error("{context}: {cause}")]
    Context { context: String, cause: Box<Error> },
    /// A tensor operation failed (a bug or an unsupported combination).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result with the library's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), cause: source }
    }

    /// An [`Error::Config`] for `path`.
    pub fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Config { path: path.into(), message: message.into() }
    }

    /// An [`Error::InvalidArgument`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidArgument(message.into())
    }
}

/// Adds what was being done to an error.
pub trait ResultExt<T> {
    /// `context` before the error's own message.
    fn context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Into<Error>> ResultExt<T> for std::result::Result<T, E> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::Context { context: context(), cause: Box::new(e.into()) })
    }
}
