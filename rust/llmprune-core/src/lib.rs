//! llmprune-core: the streaming pruning engine behind `llmprune apply` and `llmprune inspect`.
//!
//! Pure Rust, no Python: checkpoints are memory-mapped and processed tensor by tensor, so memory
//! stays bounded by the largest single tensor whatever the model size.
//!
//! Modules by concern: `io` (checkpoints, dtypes, output directories, the shard writer),
//! `sidecar` (the stats and Gram sidecars), `unstructured` (scores, masks and `apply`),
//! `structured` (attention groups and MLP channels), `surgery` (whole blocks and experts), and at
//! the top the run scaffold (`run`), the thread pool (`pool`), errors (`error`) and `inspect`.

pub mod error;
pub mod inspect;
pub mod io;
pub mod pool;
pub mod run;
pub mod sidecar;
pub mod structured;
pub mod surgery;
pub mod unstructured;

pub use error::{Error, Result};
pub use run::Progress;
pub use unstructured::apply::{apply, ApplyOptions, ApplySummary};
pub use unstructured::score::Method;
pub use unstructured::select::{Scope, Target};
