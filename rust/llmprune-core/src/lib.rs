//! llmprune-core: the streaming pruning engine behind `llmprune apply` and `llmprune inspect`.
//!
//! Pure Rust, no Python: checkpoints are memory-mapped and processed tensor by tensor, so memory
//! stays bounded by the largest single tensor whatever the model size.

pub mod allocation;
pub mod apply;
pub mod checkpoint;
pub mod compensate;
pub mod depth;
pub mod dsnot;
pub mod dtype;
pub mod error;
pub mod experts;
pub mod inspect;
pub mod output;
pub mod pool;
pub mod prunable;
pub mod remap;
pub mod run;
pub mod score;
pub mod select;
pub mod sidecar;
pub mod sparsegpt;
pub mod structured;
pub mod writer;

pub use apply::{apply, ApplyOptions, ApplySummary};
pub use run::Progress;
pub use error::{Error, Result};
pub use score::Method;
pub use select::{Scope, Target};
