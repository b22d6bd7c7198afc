//! Unstructured and N:M pruning: per-weight scores (`score`), masks (`select`), the prunable
//! weights (`prunable`), per-block sparsity (`allocation`), DSnoT refinement (`dsnot`), bias
//! compensation (`compensate`), SparseGPT (`sparsegpt`), and `apply`, which streams a checkpoint
//! through them.

pub mod allocation;
pub mod apply;
pub mod compensate;
pub mod dsnot;
pub mod prunable;
pub mod score;
pub mod select;
pub mod sparsegpt;
