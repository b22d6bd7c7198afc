//! DSnoT (Zhang et al., ICLR 2024): training-free prune-and-grow refinement of an unstructured or
//! N:M mask, row by row, driven by the per-channel mean and variance of the layer's inputs (the
//! N:M variant is `refine_row_nm`; docs/refinements.md).
//!
//! For a row w with pruned set P, the expected output lost to pruning is e = Σ_{j∈P} w_j μ_j
//! (per token). Each cycle, while |e| exceeds the threshold:
//! - grow one pruned weight: the next one from the top of P ordered by w_j μ_j / Var_j when e > 0
//!   (it reduces e most per unit of variance it brings back), else the next from the bottom;
//! - prune one kept weight: the kept weights are ordered by the method's own score, ascending, and
//!   split by the sign of w_j μ_j: when e < 0 the next positive one with the lowest score, else the
//!   next negative one with the lowest score;
//! - swap the two, e += w_p μ_p − w_g μ_g.
//!
//! A row stops at its first cycle with |e| ≤ threshold, after `iters` cycles, when a candidate
//! list runs out, or (with `same_sign`) at the first swap that would flip the sign of e. Every
//! swap trades one pruned weight for one kept weight, so each row keeps its
//! count. As in the official code, the sign of e after a swap is not required to match the sign
//! before (its default), the cursors advance whether or not the row swaps, and the error is the
//! official per-sample sum divided by the tokens of a sample: the default threshold is the official
//! 0.1 at its 2048-token calibration samples. Deviations (docs/refinements.md): the
//! variance is the sidecar's (over all calibration tokens, unbiased) where the official code averages
//! per-sample variances; weights with w_j μ_j = 0 are no candidates (swapping one changes nothing
//! the error measures, and the official reorder maps such kept weights all to column 0); the
//! candidate lists hold only pruned (grow) and kept (prune) weights.

use rayon::prelude::*;

use crate::error::{Error, Result};

/// The official default threshold 0.1 on sums over 2048-token samples, per token.
pub const DSNOT_THRESHOLD: f64 = 0.1 / 2048.0;
pub const DSNOT_ITERS: usize = 50;

/// Which linears DSnoT refines (the official default skips the MLP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DsnotSkip {
    Mlp,
    Attention,
    None,
}

impl DsnotSkip {
    pub fn name(self) -> &'static str {
        match self {
            DsnotSkip::Mlp => "mlp",
            DsnotSkip::Attention => "attn",
            DsnotSkip::None => "none",
        }
    }
}

impl std::str::FromStr for DsnotSkip {
    type Err = Error;
    fn from_str(s: &str) -> Result<DsnotSkip> {
        match s {
            "mlp" => Ok(DsnotSkip::Mlp),
            "attn" => Ok(DsnotSkip::Attention),
            "none" => Ok(DsnotSkip::None),
            other => Err(Error::arg(format!("unknown --dsnot-skip {other:?}; expected mlp, attn or none"))),
        }
    }
}

/// The most prune-and-grow cycles a row may run (`--dsnot-iters`).
pub const MAX_ITERS: usize = 1_000_000;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DsnotOptions {
    pub iters: usize,
    pub threshold: f64,
    pub skip: DsnotSkip,
    /// Refuse a swap that would flip the sign of the row's error, and stop the row there (the
    /// official code's `without_same_sign=False`; its default, and llmprune's, is false).
    pub same_sign: bool,
}

impl Default for DsnotOptions {
    fn default() -> Self {
        DsnotOptions { iters: DSNOT_ITERS, threshold: DSNOT_THRESHOLD, skip: DsnotSkip::Mlp, same_sign: false }
    }
}

impl DsnotOptions {
    pub fn validate(&self) -> Result<()> {
        if self.iters == 0 || self.iters > MAX_ITERS {
            return Err(Error::arg(format!("--dsnot-iters must be in 1..={MAX_ITERS}, got {}", self.iters)));
        }
        if !(self.threshold.is_finite() && self.threshold >= 0.0) {
            return Err(Error::arg(format!("--dsnot-threshold must be a finite number >= 0, got {}", self.threshold)));
        }
        Ok(())
    }

    /// Whether the weight `name` is refined: attention and MLP linears are told apart by their
    /// module path (`self_attn` / `attn` / `attention`; `mlp` / `fc1` / `fc2`).
    pub fn applies_to(&self, name: &str) -> bool {
        let parts: Vec<&str> = name.split('.').collect();
        let mlp = parts.iter().any(|p| matches!(*p, "mlp" | "fc1" | "fc2" | "feed_forward" | "ffn"));
        let attn = parts.iter().any(|p| matches!(*p, "self_attn" | "attn" | "attention" | "self_attention"));
        match self.skip {
            DsnotSkip::Mlp => !mlp,
            DsnotSkip::Attention => !attn,
            DsnotSkip::None => true,
        }
    }
}

/// Refines `mask` (row-major [rows, cols], true = pruned) of the logical [out, in] weight `w` in
/// place. `scores` gives the method's per-entry score (|w| · factor); `mu` and `var` are the input
/// channels' mean and variance; `group`: the M of an N:M mask, whose pattern every swap keeps.
/// Returns the number of swaps made.
#[allow(clippy::too_many_arguments)]
pub fn refine(
    w: &[f32],
    rows: usize,
    cols: usize,
    factors: Option<&[f32]>,
    mu: &[f64],
    var: &[f64],
    mask: &mut [bool],
    opts: &DsnotOptions,
    group: Option<usize>,
) -> usize {
    mask.par_chunks_mut(cols)
        .zip(w.par_chunks(cols))
        .take(rows)
        .map(|(m, row)| match group {
            Some(g) => refine_row_nm(row, factors, mu, var, m, opts, g),
            None => refine_row(row, factors, mu, var, m, opts),
        })
        .sum()
}

/// The grow candidates of a row: its pruned weights with w μ ≠ 0 by w μ / Var ascending (ties by column).
fn grow_order(metric: &[f64], var: &[f64], mask: &[bool]) -> Vec<usize> {
    let ratio = |j: usize| -> f64 {
        if var[j] > 0.0 {
            metric[j] / var[j]
        } else {
            metric[j].signum() * f64::INFINITY
        }
    };
    let mut grow: Vec<(f64, usize)> = (0..metric.len()).filter(|&j| mask[j] && metric[j] != 0.0).map(|j| (ratio(j), j)).collect();
    grow.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    grow.into_iter().map(|(_, j)| j).collect()
}

/// DSnoT on an N:M row, as the official code's N:M branch: the grown weight comes from the ends of
/// the grow order as in the unstructured loop, and the weight pruned in exchange is, within the
/// grown weight's group of M, the kept weight of the original mask with the lowest score (so every
/// group keeps its N). A swap must keep the error's sign (the official N:M branch requires it); the
/// row stops at the first swap that would not, at |e| ≤ threshold, after `iters` cycles, or when
/// the grow list or the group's candidates run out (the official code would then re-prune a pruned
/// weight and break the pattern).
fn refine_row_nm(w: &[f32], factors: Option<&[f32]>, mu: &[f64], var: &[f64], mask: &mut [bool], opts: &DsnotOptions, m: usize) -> usize {
    let cols = w.len();
    let metric: Vec<f64> = (0..cols).map(|j| w[j] as f64 * mu[j]).collect();
    let mut err: f64 = (0..cols).filter(|&j| mask[j]).map(|j| metric[j]).sum();
    let sign = err.signum();
    let grow = grow_order(&metric, var, mask);
    let score = |j: usize| -> f32 { w[j].abs() * factors.map_or(1.0, |f| f[j]) };
    let mut candidate: Vec<bool> = mask.iter().map(|&p| !p).collect(); // kept in the original mask, not yet pruned
    let (mut lo, mut hi) = (0usize, grow.len());
    let mut swaps = 0;
    for _ in 0..opts.iters {
        // negated so that a NaN error stops the row
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        if !(err.abs() > opts.threshold) || lo >= hi {
            break;
        }
        let g = if err > 0.0 {
            hi -= 1;
            grow[hi]
        } else {
            lo += 1;
            grow[lo - 1]
        };
        let start = g - g % m;
        let Some(p) = (start..(start + m).min(cols)).filter(|&j| candidate[j]).min_by(|&a, &b| score(a).total_cmp(&score(b)).then(a.cmp(&b))) else {
            break;
        };
        let after = err + metric[p] - metric[g];
        if after.signum() != sign {
            break;
        }
        mask[g] = false;
        mask[p] = true;
        candidate[p] = false;
        err = after;
        swaps += 1;
    }
    swaps
}

fn refine_row(w: &[f32], factors: Option<&[f32]>, mu: &[f64], var: &[f64], mask: &mut [bool], opts: &DsnotOptions) -> usize {
    let cols = w.len();
    let metric: Vec<f64> = (0..cols).map(|j| w[j] as f64 * mu[j]).collect();
    let mut err: f64 = (0..cols).filter(|&j| mask[j]).map(|j| metric[j]).sum();
    let grow = grow_order(&metric, var, mask);
    // prune candidates: kept weights by score ascending, negatives first in that order, then the
    // positives in reverse order (the lowest-scored positive last)
    let score = |j: usize| -> f32 { w[j].abs() * factors.map_or(1.0, |f| f[j]) };
    let mut kept: Vec<(f32, usize)> = (0..cols).filter(|&j| !mask[j] && metric[j] != 0.0).map(|j| (score(j), j)).collect();
    kept.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut prune: Vec<usize> = kept.iter().filter(|x| metric[x.1] < 0.0).map(|x| x.1).collect();
    prune.extend(kept.iter().rev().filter(|x| metric[x.1] > 0.0).map(|x| x.1));
    if grow.is_empty() || prune.is_empty() {
        return 0;
    }
    let (mut g_lo, mut g_hi) = (0usize, grow.len() - 1);
    let (mut p_lo, mut p_hi) = (0usize, prune.len() - 1);
    let mut swaps = 0;
    for _ in 0..opts.iters {
        // negated so that a NaN error stops the row
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        if !(err.abs() > opts.threshold) || g_lo > g_hi || p_lo > p_hi {
            break;
        }
        let g = if err > 0.0 {
            let j = grow[g_hi];
            if g_hi == 0 {
                g_lo = 1; // list used up
            } else {
                g_hi -= 1;
            }
            j
        } else {
            let j = grow[g_lo];
            g_lo += 1;
            j
        };
        let p = if err < 0.0 {
            let j = prune[p_hi];
            if p_hi == 0 {
                p_lo = 1;
            } else {
                p_hi -= 1;
            }
            j
        } else {
            let j = prune[p_lo];
            p_lo += 1;
            j
        };
        if opts.same_sign && (err + metric[p] - metric[g]).signum() != err.signum() {
            break;
        }
        mask[g] = false;
        mask[p] = true;
        err += metric[p] - metric[g];
        swaps += 1;
    }
    swaps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nm_swaps_stay_inside_their_groups() {
        let cols = 64;
        let w: Vec<f32> = (0..cols).map(|i| ((i * 37 % 29) as f32 - 14.0) / 7.0).collect();
        let mu: Vec<f64> = (0..cols).map(|j| ((j * 13 % 11) as f64 - 3.0) / 5.0).collect();
        let var: Vec<f64> = (0..cols).map(|j| 0.5 + (j % 7) as f64 / 3.0).collect();
        // 2:4 — the first two of every group pruned
        let mut mask: Vec<bool> = (0..cols).map(|j| j % 4 < 2).collect();
        let swaps = refine(
            &w,
            1,
            cols,
            None,
            &mu,
            &var,
            &mut mask,
            &DsnotOptions { iters: 50, threshold: 1e-9, skip: DsnotSkip::None, same_sign: false },
            Some(4),
        );
        assert!(swaps > 0);
        assert!(mask.chunks(4).all(|g| g.iter().filter(|&&p| p).count() == 2));
    }

    #[test]
    fn keeps_row_counts_and_reduces_the_error() {
        let cols = 64;
        let w: Vec<f32> = (0..2 * cols).map(|i| ((i * 37 % 29) as f32 - 14.0) / 7.0).collect();
        let mu: Vec<f64> = (0..cols).map(|j| ((j * 13 % 11) as f64 - 3.0) / 5.0).collect();
        let var: Vec<f64> = (0..cols).map(|j| 0.5 + (j % 7) as f64 / 3.0).collect();
        let mut mask: Vec<bool> = (0..2 * cols).map(|i| (i * 7) % 3 == 0).collect();
        let before = mask.clone();
        let err = |m: &[bool]| -> f64 { (0..cols).filter(|&j| m[j]).map(|j| w[j] as f64 * mu[j]).sum::<f64>() };
        let e0 = err(&mask).abs();
        refine(&w, 2, cols, None, &mu, &var, &mut mask, &DsnotOptions { iters: 50, threshold: 1e-9, skip: DsnotSkip::None, same_sign: false }, None);
        for r in 0..2 {
            let count = |m: &[bool]| m[r * cols..(r + 1) * cols].iter().filter(|&&x| x).count();
            assert_eq!(count(&mask), count(&before));
        }
        assert!(err(&mask).abs() < e0);
    }

    #[test]
    fn skips_by_module() {
        let o = DsnotOptions::default();
        assert!(o.applies_to("model.layers.0.self_attn.q_proj.weight"));
        assert!(!o.applies_to("model.layers.0.mlp.up_proj.weight"));
        assert!(!o.applies_to("model.decoder.layers.0.fc1.weight"));
    }
}
