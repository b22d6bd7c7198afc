//! One error type for the whole core. Every variant names the file (and the tensor where one is
//! involved) so a user can act on the message without a traceback; `hint()` carries the suggested
//! next step as data, so no caller has to search message text for it.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error on a named path.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The model directory, its index or one of its shards is malformed.
    #[error("invalid checkpoint {}: {msg}", path.display())]
    InvalidCheckpoint { path: PathBuf, msg: String },

    /// The stats sidecar is malformed.
    #[error("invalid stats sidecar {}: {msg}", path.display())]
    InvalidStats { path: PathBuf, msg: String },

    /// The Gram sidecar (`stats --gram`) is malformed or carries no usable signal.
    #[error("invalid Gram sidecar {}: {msg}", path.display())]
    InvalidGram { path: PathBuf, msg: String },

    /// The Gram sidecar was computed for another model, or lacks an input the run needs.
    #[error("Gram sidecar {} does not match the model: {msg}", path.display())]
    GramMismatch { path: PathBuf, msg: String },

    /// What is about to be published fails a check of the output (non-finite values, a config
    /// that does not describe the tensors): nothing is published.
    #[error("output check failed for tensor {name}: {msg}")]
    Postcondition { name: String, msg: String, hint: Option<String> },

    /// The stats sidecar was computed for another model.
    #[error("stats sidecar {} does not match the model: {msg}", path.display())]
    StatsMismatch { path: PathBuf, msg: String },

    /// A tensor cannot be pruned as asked (dtype, shape, N:M divisibility).
    #[error("tensor {name} in {}: {msg}", path.display())]
    Tensor { path: PathBuf, name: String, msg: String },

    /// Bad arguments (sparsity range, N:M pattern, method/scope combination).
    #[error("{msg}")]
    InvalidArgument { msg: String, hint: Option<String> },

    /// The output location cannot be used.
    #[error("output {}: {msg}", path.display())]
    Output { path: PathBuf, msg: String, hint: Option<String> },

    /// The caller asked to stop (Ctrl-C, SIGTERM).
    #[error("interrupted")]
    Interrupted,

    /// A bug: something the core believed impossible happened (a caught panic, for one).
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    pub fn checkpoint(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::InvalidCheckpoint { path: path.into(), msg: msg.into() }
    }

    pub fn stats(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::InvalidStats { path: path.into(), msg: msg.into() }
    }

    pub fn gram(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::InvalidGram { path: path.into(), msg: msg.into() }
    }

    pub fn gram_mismatch(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::GramMismatch { path: path.into(), msg: msg.into() }
    }

    /// A failed check of the output about to be published, naming the tensor.
    pub fn postcondition(name: impl Into<String>, msg: impl Into<String>, hint: Option<String>) -> Self {
        Error::Postcondition { name: name.into(), msg: msg.into(), hint }
    }

    pub fn tensor(path: impl Into<PathBuf>, name: &str, msg: impl Into<String>) -> Self {
        Error::Tensor { path: path.into(), name: name.to_string(), msg: msg.into() }
    }

    pub fn arg(msg: impl Into<String>) -> Self {
        Error::InvalidArgument { msg: msg.into(), hint: None }
    }

    pub fn arg_hint(msg: impl Into<String>, hint: impl Into<String>) -> Self {
        Error::InvalidArgument { msg: msg.into(), hint: Some(hint.into()) }
    }

    pub fn output(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Output { path: path.into(), msg: msg.into(), hint: None }
    }

    pub fn output_hint(path: impl Into<PathBuf>, msg: impl Into<String>, hint: impl Into<String>) -> Self {
        Error::Output { path: path.into(), msg: msg.into(), hint: Some(hint.into()) }
    }

    /// The next step a user can take, when there is an obvious one.
    pub fn hint(&self) -> Option<String> {
        match self {
            Error::StatsMismatch { .. } => Some("compute statistics for this model with `llmprune stats MODEL`".into()),
            Error::InvalidStats { .. } => Some("recompute the statistics with `llmprune stats MODEL`".into()),
            Error::InvalidGram { .. } => {
                Some("recompute the Gram matrices with `llmprune stats MODEL --gram`, or pass another file with --gram PATH".into())
            }
            Error::GramMismatch { .. } => {
                Some("compute Gram matrices for this model with `llmprune stats MODEL --gram`, or pass them with --gram PATH".into())
            }
            Error::Postcondition { hint, .. } => hint.clone(),
            Error::InvalidArgument { hint, .. } | Error::Output { hint, .. } => hint.clone(),
            Error::Internal(_) => Some("this is a bug in llmprune; please report it with the command line".into()),
            _ => None,
        }
    }
}
