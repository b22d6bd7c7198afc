//! The settings a sequential stats pass recorded (`stats --sequential`,
//! `sidecar::SequentialSettings`), compared with an `apply` run's: the warning when pruning with
//! other settings does not reproduce that algorithm.

use crate::sidecar::{DsnotSettings, SequentialSettings};
use crate::unstructured::allocation::Allocation;
use crate::unstructured::apply::ApplyOptions;
use crate::unstructured::dsnot::DsnotOptions;

/// What this run's settings are called in sequential metadata, for comparing with a sidecar's.
fn run_settings(opts: &ApplyOptions, update: bool) -> String {
    let upd = if update { " with weight updates" } else { "" };
    let alloc = match &opts.allocation {
        Allocation::Uniform => String::new(),
        a => format!(", {} allocation", a.name()),
    };
    let refine = if opts.refine.is_some() { ", DSnoT" } else { "" };
    let comp = if opts.compensate { ", bias compensation" } else { "" };
    format!("{} at {}{upd}{alloc}{refine}{comp}", opts.method.name(), opts.target.describe())
}

/// A warning when statistics taken sequentially (recorded in `meta`) came from another method,
/// target, update, allocation, refinement or compensation than this run's, which then does not
/// reproduce that algorithm.
pub fn sequential_warning(meta: &serde_json::Map<String, serde_json::Value>, opts: &ApplyOptions, update: bool) -> Option<String> {
    let seq = match SequentialSettings::of(meta)? {
        Ok(seq) => seq,
        Err(e) => return Some(format!("statistics were taken sequentially with settings that cannot be read: {e}")),
    };
    let theirs = match seq.target() {
        Ok(t) => t,
        Err(e) => return Some(format!("statistics were taken sequentially with {e}")),
    };
    let same = seq.method == opts.method.name()
        && theirs == opts.target
        && seq.update == update
        && seq.same_allocation(&opts.allocation)
        && seq.same_refine(opts.refine.as_ref())
        && seq.compensate == opts.compensate;
    if same {
        return None;
    }
    let upd = if seq.update { " with weight updates" } else { "" };
    let alloc = if seq.allocation == "uniform" { String::new() } else { format!(", {} allocation", seq.allocation) };
    let refine = if seq.refine.is_some() { ", DSnoT" } else { "" };
    let comp = if seq.compensate { ", bias compensation" } else { "" };
    Some(format!(
        "statistics were taken sequentially with {} at {}{upd}{alloc}{refine}{comp}; pruning with {} does not reproduce that algorithm",
        seq.method,
        theirs.describe(),
        run_settings(opts, update)
    ))
}

/// The block sparsities a sequential pass recorded in `meta` for `allocation`, to be used as they
/// are (the dense statistics OWL was computed from are not in a sequential sidecar).
pub fn recorded_block_sparsity(meta: &serde_json::Map<String, serde_json::Value>, allocation: &Allocation) -> Option<Vec<f64>> {
    SequentialSettings::of(meta)?.ok().filter(|s| s.allocation == allocation.name())?.block_sparsity
}

/// DSnoT's settings as recorded in provenance and sequential metadata.
pub fn dsnot_meta(r: &DsnotOptions) -> serde_json::Value {
    DsnotSettings::from(r).to_value()
}
