//! Unstructured and N:M pruning: per-weight scores (`score`), masks (`select`), the prunable
//! weights (`prunable`), per-block sparsity (`allocation`), DSnoT refinement (`dsnot`), bias
//! compensation (`compensate`), SparseGPT (`sparsegpt`), and `apply`, which streams a checkpoint
//! through them: its output layout (`bias_layout`), its tensor kernels (`kernel`) and its check of
//! a sequential sidecar's settings (`sequential`).

pub mod allocation;
pub mod apply;
pub mod bias_layout;
pub mod compensate;
pub mod dsnot;
pub mod kernel;
pub mod prunable;
pub mod score;
pub mod select;
pub mod sequential;
pub mod sparsegpt;
