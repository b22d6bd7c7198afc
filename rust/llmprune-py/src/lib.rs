//! Python bindings of llmprune-core: convert arguments, release the GIL, map errors. Nothing else:
//! every file format is parsed and written by the core (see docs/architecture.md).

mod files;
mod prune;

use llmprune_core::error::Error;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyFileNotFoundError, PyKeyboardInterrupt, PyPermissionError};
use pyo3::prelude::*;

create_exception!(_core, LlmpruneError, PyException);
create_exception!(_core, InvalidCheckpointError, LlmpruneError);
create_exception!(_core, InvalidStatsError, LlmpruneError);
create_exception!(_core, StatsMismatchError, LlmpruneError);
create_exception!(_core, InvalidArgumentError, LlmpruneError);
create_exception!(_core, TensorError, LlmpruneError);
create_exception!(_core, OutputError, LlmpruneError);
create_exception!(_core, InternalError, LlmpruneError);

pub(crate) struct CoreError(pub Error);

impl From<Error> for CoreError {
    fn from(e: Error) -> Self {
        CoreError(e)
    }
}

impl From<CoreError> for PyErr {
    fn from(CoreError(e): CoreError) -> PyErr {
        let msg = e.to_string();
        let err = match &e {
            Error::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
                std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(msg),
                _ => OutputError::new_err(msg),
            },
            Error::InvalidCheckpoint { .. } => InvalidCheckpointError::new_err(msg),
            Error::InvalidStats { .. } | Error::InvalidGram { .. } => InvalidStatsError::new_err(msg),
            Error::StatsMismatch { .. } | Error::GramMismatch { .. } => StatsMismatchError::new_err(msg),
            Error::Postcondition { .. } => OutputError::new_err(msg),
            Error::Tensor { .. } => TensorError::new_err(msg),
            Error::InvalidArgument { .. } => InvalidArgumentError::new_err(msg),
            Error::Output { .. } => OutputError::new_err(msg),
            Error::Interrupted => PyKeyboardInterrupt::new_err(msg),
            Error::Internal(_) => InternalError::new_err(msg),
        };
        // The hint travels as data: the CLI prints `exc.hint` without reading the message.
        Python::attach(|py| {
            let _ = err.value(py).setattr("hint", e.hint());
        });
        err
    }
}

/// Runs core work, turning a panic (a bug) into an `InternalError` instead of letting PyO3 raise
/// its `PanicException`, which is not an `Exception` and would escape the CLI's error handling.
pub(crate) fn guarded<T>(work: impl FnOnce() -> llmprune_core::Result<T>) -> llmprune_core::Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)) {
        Ok(r) => r,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            Err(Error::Internal(what))
        }
    }
}

/// Runs a core call without the GIL, then converts its error.
pub(crate) fn detached<T: Send>(py: Python<'_>, work: impl FnOnce() -> llmprune_core::Result<T> + Send) -> PyResult<T> {
    py.detach(|| guarded(work)).map_err(|e| CoreError(e).into())
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("LlmpruneError", py.get_type::<LlmpruneError>())?;
    m.add("InvalidCheckpointError", py.get_type::<InvalidCheckpointError>())?;
    m.add("InvalidStatsError", py.get_type::<InvalidStatsError>())?;
    m.add("StatsMismatchError", py.get_type::<StatsMismatchError>())?;
    m.add("InvalidArgumentError", py.get_type::<InvalidArgumentError>())?;
    m.add("TensorError", py.get_type::<TensorError>())?;
    m.add("OutputError", py.get_type::<OutputError>())?;
    m.add("InternalError", py.get_type::<InternalError>())?;
    m.add("DEFAULT_SIDECAR", llmprune_core::sidecar::DEFAULT_SIDECAR)?;
    m.add("MAX_THREADS", llmprune_core::pool::MAX_THREADS)?;
    m.add("MAX_DSNOT_ITERS", llmprune_core::unstructured::dsnot::MAX_ITERS)?;
    prune::register(m)?;
    files::register(m)?;
    Ok(())
}
