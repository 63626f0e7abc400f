//! The error type of kimg-init's boot steps: what was being done, and why it failed.

use std::fmt;

/// A failed step: `context` says what was tried (with the path), `cause` why it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// What was being done, e.g. `mount /proc (proc)`.
    pub context: String,
    /// The underlying error, as text.
    pub cause: String,
}

impl Error {
    /// An error with no underlying cause.
    pub fn msg(context: impl Into<String>) -> Error {
        Error {
            context: context.into(),
            cause: String::new(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.cause.is_empty() {
            f.write_str(&self.context)
        } else {
            write!(f, "{}: {}", self.context, self.cause)
        }
    }
}

/// Result of a boot step.
pub type Result<T> = std::result::Result<T, Error>;

/// Adds what was being done to any displayable error.
pub trait Context<T> {
    /// Wraps the error with `context()`'s text.
    fn context<S: Into<String>>(self, context: impl FnOnce() -> S) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context<S: Into<String>>(self, context: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| Error {
            context: context().into(),
            cause: e.to_string(),
        })
    }
}
