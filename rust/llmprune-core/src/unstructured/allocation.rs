//! Per-block sparsity of unstructured pruning: the same target everywhere (uniform), OWL's
//! outlier-weighted allocation, or a schedule the user gives block by block.
//!
//! OWL (Yin et al., ICML 2024): a block's outlier ratio D is the share of its Wanda scores
//! |W_ij| · ‖X_j‖ (all its prunable linears together) above M times their mean. With
//! r = (D − min D) / (max D − min D) · 2λ, block b keeps the density r_b − mean(r) + (1 − S), so its
//! sparsity is S + mean(r) − r_b and the mean over the blocks is S. Blocks are the decoder blocks
//! that hold prunable weights (`layers.N`, `h.N`, `blocks.N`); a prunable weight outside every
//! block keeps S. When every block has the same D the allocation is uniform.

use std::collections::BTreeMap;

use rayon::prelude::*;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::blocks::{block_index, num_blocks};
use crate::io::checkpoint::Checkpoint;
use crate::io::dtype::decode;
use crate::sidecar::LayerStats;
use crate::unstructured::prunable::Prunable;
use crate::unstructured::score::wanda_factors;
use crate::unstructured::select::Target;

pub const OWL_M: f64 = 5.0;
pub const OWL_LAMBDA: f64 = 0.08;

#[derive(Clone, Debug, PartialEq)]
pub enum Allocation {
    Uniform,
    Owl {
        m: f64,
        lambda: f64,
    },
    /// One sparsity per decoder block of the model, in block order.
    Schedule(Vec<f64>),
}

impl Allocation {
    pub fn name(&self) -> &'static str {
        match self {
            Allocation::Uniform => "uniform",
            Allocation::Owl { .. } => "owl",
            Allocation::Schedule(_) => "schedule",
        }
    }

    pub fn validate(&self, target: Target) -> Result<()> {
        match self {
            Allocation::Uniform => Ok(()),
            _ if matches!(target, Target::Pattern { .. }) => Err(Error::arg_hint(
                format!("--allocation {} gives blocks different unstructured sparsities; an N:M pattern is the same in every block", self.name()),
                "use --sparsity S with it, or drop --allocation",
            )),
            Allocation::Owl { m, lambda } => {
                if !(m.is_finite() && *m > 0.0) {
                    return Err(Error::arg(format!("--owl-m must be a positive number, got {m}")));
                }
                if !(*lambda > 0.0 && *lambda < 0.5) {
                    return Err(Error::arg(format!("--owl-lambda must be in (0, 0.5), got {lambda}")));
                }
                Ok(())
            }
            Allocation::Schedule(s) => {
                if let Some((b, v)) = s.iter().enumerate().find(|(_, v)| !(0.0..1.0).contains(*v)) {
                    return Err(Error::arg(format!("the schedule's sparsity of block {b} is {v}; every value must be in [0, 1)")));
                }
                Ok(())
            }
        }
    }

    /// The fields provenance and sequential metadata record.
    pub fn describe(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert("allocation".into(), self.name().into());
        if let Allocation::Owl { m: om, lambda } = self {
            m.insert("owl_m".into(), (*om).into());
            m.insert("owl_lambda".into(), (*lambda).into());
        }
        m
    }
}

/// The warning for a schedule whose block sparsities do not average `sparsity` (off by more than
/// 0.005): every block is still pruned as the schedule says. `apply` and `stats --sequential` give it.
pub fn schedule_mean_warning(schedule: &[f64], sparsity: f64) -> Option<String> {
    let mean = schedule.iter().sum::<f64>() / schedule.len().max(1) as f64;
    ((mean - sparsity).abs() > 0.005)
        .then(|| format!("the schedule's block sparsities average {mean:.3}, not --sparsity {sparsity}; every block is pruned as the schedule says"))
}

/// OWL's per-block sparsities from the outlier ratios `d` (indexed like the blocks): S + mean(r) − r.
pub fn owl_from_ratios(d: &[f64], sparsity: f64, lambda: f64) -> Vec<f64> {
    let (lo, hi) = d.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    let r: Vec<f64> = if hi > lo { d.iter().map(|&x| (x - lo) / (hi - lo) * 2.0 * lambda).collect() } else { vec![0.0; d.len()] };
    let mean = r.iter().sum::<f64>() / r.len().max(1) as f64;
    // density r − mean + (1 − S), written as a sparsity
    r.iter().map(|&ri| 1.0 - (ri - mean + (1.0 - sparsity))).collect()
}

/// Each block's outlier ratio: the share of its Wanda scores above `m` × their mean (f32 scores as
/// `apply --method wanda` computes them; sums in f64). Returns (block index, D) for every block
/// that holds prunable weights, in block order.
pub fn outlier_ratios(
    ckpt: &Checkpoint,
    prunable: &BTreeMap<String, Prunable>,
    stats: &BTreeMap<String, LayerStats>,
    m: f64,
) -> Result<Vec<(usize, f64)>> {
    let mut blocks: BTreeMap<usize, Vec<(&str, &Prunable)>> = BTreeMap::new();
    for (name, p) in prunable {
        if let Some(b) = block_index(name) {
            blocks.entry(b).or_default().push((name.as_str(), p));
        }
    }
    // scores of one weight, computed again for each of the two passes (memory: one tensor)
    let scores = |name: &str, p: &Prunable| -> Result<Vec<f32>> {
        let (shard, t) = ckpt.get(name).ok_or_else(|| Error::Internal(format!("{name} resolved but not in the checkpoint")))?;
        let s = stats
            .get(name)
            .ok_or_else(|| Error::StatsMismatch { path: ckpt.dir.clone(), msg: format!("no activation statistics for {name}, which OWL needs") })?;
        let f = wanda_factors(s);
        let w = decode(t.dtype, shard.data(t));
        let cols = t.shape[p.input_axis];
        if f.len() != cols {
            return Err(Error::Internal(format!("{name}: statistics checked against the shape before")));
        }
        Ok(if p.input_axis == 1 {
            w.par_iter().enumerate().map(|(i, x)| x.abs() * f[i % cols]).collect()
        } else {
            let out = t.shape[1];
            w.par_iter().enumerate().map(|(i, x)| x.abs() * f[i / out]).collect()
        })
    };
    let mut out = Vec::with_capacity(blocks.len());
    for (b, members) in &blocks {
        let (mut sum, mut n) = (0f64, 0usize);
        for (name, p) in members {
            let s = scores(name, p)?;
            sum += s.par_iter().map(|&x| x as f64).sum::<f64>();
            n += s.len();
        }
        let threshold = (sum / n.max(1) as f64) * m;
        let mut above = 0usize;
        for (name, p) in members {
            let s = scores(name, p)?;
            above += s.par_iter().filter(|&&x| x as f64 > threshold).count();
        }
        out.push((*b, above as f64 / n.max(1) as f64));
    }
    Ok(out)
}

/// The target of every prunable weight, and the per-block sparsities (None for uniform).
pub type Targets = (BTreeMap<String, Target>, Option<Vec<f64>>);

/// The target of every prunable weight under `allocation`, and the per-block sparsities
/// (None for uniform). `recorded` are block sparsities a sequential pass already chose; they are
/// used as they are (the dense statistics OWL was computed from are not in a sequential sidecar).
pub fn resolve_targets(
    ckpt: &Checkpoint,
    prunable: &BTreeMap<String, Prunable>,
    stats: Option<&BTreeMap<String, LayerStats>>,
    target: Target,
    allocation: &Allocation,
    recorded: Option<Vec<f64>>,
) -> Result<Targets> {
    allocation.validate(target)?;
    let s = match (allocation, target) {
        (Allocation::Uniform, _) => return Ok((prunable.keys().map(|k| (k.clone(), target)).collect(), None)),
        (_, Target::Sparsity(s)) => s,
        (_, Target::Pattern { .. }) => return Err(Error::Internal("N:M with a non-uniform allocation passed validation".into())),
    };
    let blocks = num_blocks(ckpt);
    let per_block: Vec<f64> = match (allocation, recorded) {
        (Allocation::Owl { .. }, Some(r)) if r.len() == blocks => r,
        (Allocation::Owl { m, lambda }, _) => {
            let stats = stats.ok_or_else(|| {
                Error::arg_hint(
                    "--allocation owl needs activation statistics (the outlier ratios are Wanda scores)",
                    "run `llmprune stats MODEL` first, or pass --stats PATH",
                )
            })?;
            let d = outlier_ratios(ckpt, prunable, stats, *m)?;
            let ratios: Vec<f64> = d.iter().map(|x| x.1).collect();
            let sp = owl_from_ratios(&ratios, s, *lambda);
            // blocks without prunable weights keep S (they are not pruned anyway)
            let mut all = vec![s; blocks];
            for ((b, _), v) in d.iter().zip(sp) {
                all[*b] = v;
            }
            if let Some((b, v)) = all.iter().enumerate().find(|(_, v)| !(0.0..1.0).contains(*v)) {
                // OWL spreads the blocks' sparsities over up to 2λ around S: below 0 the target is
                // too low for that spread, at 1 or above too high
                let hint = if *v < 0.0 {
                    format!("raise --sparsity (e.g. to {lambda} or more), or lower --owl-lambda (e.g. to {s} or less)")
                } else {
                    format!("lower --sparsity (e.g. to {} or less), or lower --owl-lambda", 1.0 - lambda)
                };
                return Err(Error::arg_hint(format!("OWL gives block {b} a sparsity of {v:.4}, outside [0, 1)"), hint));
            }
            all
        }
        (Allocation::Schedule(v), _) => {
            if v.len() != blocks {
                return Err(Error::arg(format!("the schedule has {} sparsities, but {} has {blocks} decoder blocks", v.len(), ckpt.dir.display())));
            }
            v.clone()
        }
        (Allocation::Uniform, _) => unreachable!("returned above"),
    };
    let targets = prunable.keys().map(|k| (k.clone(), Target::Sparsity(block_index(k).map_or(s, |b| per_block[b])))).collect();
    Ok((targets, Some(per_block)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owl_mean_is_the_target() {
        let sp = owl_from_ratios(&[1.0, 3.0, 2.0, 7.0], 0.7, 0.08);
        let mean = sp.iter().sum::<f64>() / 4.0;
        assert!((mean - 0.7).abs() < 1e-12);
        // the block with most outliers is pruned least
        assert!(sp[3] < sp[0]);
        assert!((sp[0] - sp[3] - 0.16).abs() < 1e-12);
    }

    #[test]
    fn equal_ratios_are_uniform() {
        assert_eq!(owl_from_ratios(&[2.0, 2.0], 0.5, 0.08), vec![0.5, 0.5]);
    }
}
