//! Which groups go: from scores and parameter costs to the kept groups of every layer.
//!
//! Global allocation (FLAP's adaptive structure): every layer's attention scores and MLP scores
//! are standardized separately, z = (s − mean) / std (unbiased std; z = 0 when a layer's module has
//! fewer than two groups or equal scores). All attention groups (layer by layer), then all MLP
//! channels (layer by layer), are sorted ascending by z, stably; the removed set is the shortest
//! prefix of that order whose total parameter cost is closest to S × (parameters of the decoder
//! blocks). That is one threshold across layers and modules, weighted by cost.
//!
//! Uniform allocation: every layer removes h = ⌊S·G + ½⌋ of its G attention groups and then the
//! number of MLP channels, ⌊x + ½⌋ (at least 0), that brings the layer closest to removing S of its
//! parameters; in each layer the lowest scores go, lower index first on ties.
//!
//! Skipped (frozen) layers keep everything. Uniform allocation then targets, in every other layer,
//! S' = S · (parameters of all decoder layers) / (parameters of the layers not skipped), so the
//! model as a whole still loses S; global allocation ranks only the groups of the layers not
//! skipped against the same overall target S × (parameters of all decoder layers).

use crate::error::{Error, Result};
use crate::structured::metric::LayerScores;

/// How structured pruning spreads the removed groups over the layers: one ranking of every
/// layer's groups together (global), or the same share removed from each layer (uniform).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupAllocation {
    Global,
    Uniform,
}

impl GroupAllocation {
    pub fn name(self) -> &'static str {
        match self {
            GroupAllocation::Global => "global",
            GroupAllocation::Uniform => "uniform",
        }
    }
}

impl std::str::FromStr for GroupAllocation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "global" => Ok(GroupAllocation::Global),
            "uniform" => Ok(GroupAllocation::Uniform),
            other => Err(Error::arg(format!("unknown allocation {other:?}; expected global or uniform"))),
        }
    }
}

/// Parameter accounting of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerBudget {
    /// Parameters one attention group / one MLP channel owns.
    pub attn_cost: u64,
    pub mlp_cost: u64,
    /// All parameters of the layer (norms and anything else included).
    pub params: u64,
}

/// Kept group indices of one layer, ascending.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerPlan {
    pub attn_keep: Vec<usize>,
    pub mlp_keep: Vec<usize>,
}

impl LayerPlan {
    pub fn removed_params(&self, scores: &LayerScores, b: &LayerBudget) -> u64 {
        (scores.attn.len() - self.attn_keep.len()) as u64 * b.attn_cost + (scores.mlp.len() - self.mlp_keep.len()) as u64 * b.mlp_cost
    }
}

/// (s − mean) / std with the unbiased std; zeros when that is undefined.
pub fn standardize(s: &[f64]) -> Vec<f64> {
    let n = s.len();
    if n < 2 {
        return vec![0.0; n];
    }
    let mean = s.iter().sum::<f64>() / n as f64;
    let var = s.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1) as f64;
    let std = var.sqrt();
    if !(std.is_finite() && std > 0.0) {
        return vec![0.0; n];
    }
    s.iter().map(|x| (x - mean) / std).collect()
}

/// Indices in ascending order of (score, index).
fn ascending(s: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..s.len()).collect();
    order.sort_by(|&a, &b| s[a].total_cmp(&s[b]));
    order
}

fn keep_all_but(n: usize, removed: impl IntoIterator<Item = usize>) -> Vec<usize> {
    let mut keep = vec![true; n];
    for i in removed {
        keep[i] = false;
    }
    (0..n).filter(|&i| keep[i]).collect()
}

pub fn plan(scores: &[LayerScores], budgets: &[LayerBudget], sparsity: f64, allocation: GroupAllocation) -> Result<Vec<LayerPlan>> {
    plan_skipping(scores, budgets, sparsity, allocation, &vec![false; scores.len()])
}

/// `plan` with the layers where `frozen` is true left whole.
pub fn plan_skipping(
    scores: &[LayerScores],
    budgets: &[LayerBudget],
    sparsity: f64,
    allocation: GroupAllocation,
    frozen: &[bool],
) -> Result<Vec<LayerPlan>> {
    if !(0.0..1.0).contains(&sparsity) {
        return Err(Error::arg(format!("sparsity must be in [0, 1), got {sparsity}")));
    }
    let skipped = frozen.iter().filter(|&&f| f).count();
    let local = if skipped == 0 {
        sparsity
    } else {
        if skipped == scores.len() {
            return Err(Error::arg(format!("all {skipped} layers are skipped; no layer is left to prune")));
        }
        let total: u64 = budgets.iter().map(|b| b.params).sum();
        let free: u64 = budgets.iter().zip(frozen).filter(|(_, &f)| !f).map(|(b, _)| b.params).sum();
        let local = sparsity * total as f64 / free as f64;
        if local >= 1.0 {
            return Err(Error::arg(format!(
                "sparsity {sparsity} of the decoder layers' {total} parameters is {local:.4} of the {free} in the {} layers not \
                 skipped; it must stay below 1: lower --sparsity or skip fewer layers",
                scores.len() - skipped
            )));
        }
        local
    };
    let plans = match allocation {
        GroupAllocation::Global => global(scores, budgets, sparsity, frozen),
        GroupAllocation::Uniform => uniform(scores, budgets, local, frozen),
    };
    for (i, (p, s)) in plans.iter().zip(scores).enumerate() {
        let what = if p.attn_keep.is_empty() {
            Some(format!("all {} of its attention groups (key/value heads with their query heads)", s.attn.len()))
        } else if p.mlp_keep.is_empty() {
            Some(format!("all {} of its MLP channels", s.mlp.len()))
        } else {
            None
        };
        if let Some(what) = what {
            return Err(Error::arg(format!(
                "sparsity {sparsity} with {} allocation would remove {what} in layer {i}; lower --sparsity",
                allocation.name()
            )));
        }
    }
    Ok(plans)
}

fn global(scores: &[LayerScores], budgets: &[LayerBudget], sparsity: f64, frozen: &[bool]) -> Vec<LayerPlan> {
    // (z, cost, layer, is_mlp, index), attention of every layer first, then MLP.
    let mut entries: Vec<(f64, u64, usize, bool, usize)> = Vec::new();
    let free = || scores.iter().zip(budgets).enumerate().filter(|(l, _)| !frozen[*l]);
    for (l, (s, b)) in free() {
        entries.extend(standardize(&s.attn).into_iter().enumerate().map(|(g, z)| (z, b.attn_cost, l, false, g)));
    }
    for (l, (s, b)) in free() {
        entries.extend(standardize(&s.mlp).into_iter().enumerate().map(|(g, z)| (z, b.mlp_cost, l, true, g)));
    }
    entries.sort_by(|a, b| a.0.total_cmp(&b.0));
    let target = sparsity * budgets.iter().map(|b| b.params).sum::<u64>() as f64;
    let (mut best_k, mut best_gap, mut cum) = (0usize, target, 0u64);
    for (k, e) in entries.iter().enumerate() {
        cum += e.1;
        let gap = (cum as f64 - target).abs();
        if gap < best_gap {
            best_k = k + 1;
            best_gap = gap;
        }
        if cum as f64 >= target {
            break;
        }
    }
    let mut removed: Vec<(Vec<usize>, Vec<usize>)> = vec![(Vec::new(), Vec::new()); scores.len()];
    for &(_, _, l, is_mlp, g) in &entries[..best_k] {
        if is_mlp {
            removed[l].1.push(g);
        } else {
            removed[l].0.push(g);
        }
    }
    scores
        .iter()
        .zip(removed)
        .map(|(s, (ra, rm))| LayerPlan { attn_keep: keep_all_but(s.attn.len(), ra), mlp_keep: keep_all_but(s.mlp.len(), rm) })
        .collect()
}

fn uniform(scores: &[LayerScores], budgets: &[LayerBudget], sparsity: f64, frozen: &[bool]) -> Vec<LayerPlan> {
    scores
        .iter()
        .zip(budgets)
        .zip(frozen)
        .map(|((s, b), &skip)| {
            if skip {
                return LayerPlan { attn_keep: (0..s.attn.len()).collect(), mlp_keep: (0..s.mlp.len()).collect() };
            }
            let h = ((sparsity * s.attn.len() as f64 + 0.5).floor() as usize).min(s.attn.len());
            let rest = sparsity * b.params as f64 - (h as u64 * b.attn_cost) as f64;
            let c = if b.mlp_cost == 0 { 0.0 } else { (rest / b.mlp_cost as f64 + 0.5).floor().max(0.0) };
            let c = (c as usize).min(s.mlp.len());
            LayerPlan {
                attn_keep: keep_all_but(s.attn.len(), ascending(&s.attn).into_iter().take(h)),
                mlp_keep: keep_all_but(s.mlp.len(), ascending(&s.mlp).into_iter().take(c)),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(attn: &[f64], mlp: &[f64]) -> LayerScores {
        LayerScores { attn: attn.to_vec(), mlp: mlp.to_vec() }
    }

    #[test]
    fn standardize_has_zero_mean_unit_std() {
        let z = standardize(&[1.0, 2.0, 3.0]);
        assert_eq!(z, vec![-1.0, 0.0, 1.0]);
        assert_eq!(standardize(&[5.0, 5.0]), vec![0.0, 0.0]);
        assert_eq!(standardize(&[5.0]), vec![0.0]);
    }

    #[test]
    fn global_threshold_is_weighted_by_cost() {
        // two layers; attention groups cost 10, channels cost 1; 40 params per layer
        let scores = vec![layer(&[1.0, 2.0], &[1.0, 2.0, 3.0, 4.0]), layer(&[5.0, 1.0], &[4.0, 3.0, 2.0, 1.0])];
        let b = LayerBudget { attn_cost: 10, mlp_cost: 1, params: 40 };
        // 0.25 * 80 = 20: in z order the two MLP channels at z = -1.16 come first, then the attention
        // groups at z = -0.71 (layer 0 g0, layer 1 g1): cost 1 + 1 + 10 + 10 = 22 is closest to 20.
        let p = plan(&scores, &[b, b], 0.25, GroupAllocation::Global).unwrap();
        assert_eq!(p[0].attn_keep, vec![1]);
        assert_eq!(p[1].attn_keep, vec![0]);
        // MLP z = -1.16 sorts before attention z = -0.707: target 2 removes the two lowest channels
        let p = plan(&scores, &[b, b], 2.0 / 80.0, GroupAllocation::Global).unwrap();
        assert_eq!(p[0].mlp_keep, vec![1, 2, 3]);
        assert_eq!(p[1].mlp_keep, vec![0, 1, 2]);
        assert_eq!(p[0].attn_keep, vec![0, 1]);
        // sparsity 0 removes nothing
        let p = plan(&scores, &[b, b], 0.0, GroupAllocation::Global).unwrap();
        assert_eq!(p[0].mlp_keep.len() + p[1].mlp_keep.len(), 8);
    }

    #[test]
    fn uniform_keeps_the_same_counts_everywhere() {
        let scores = vec![layer(&[1.0, 2.0], &[1.0, 2.0, 3.0, 4.0]), layer(&[5.0, 1.0], &[4.0, 3.0, 2.0, 1.0])];
        let b = LayerBudget { attn_cost: 10, mlp_cost: 1, params: 40 };
        // h = floor(0.5 * 2 + 0.5) = 1; rest = 20 - 10 = 10 -> c = 10, clamped to the 4 channels: error
        assert!(plan(&scores, &[b, b], 0.5, GroupAllocation::Uniform).is_err());
        // h = floor(0.3 * 2 + 0.5) = 1, rest = 12 - 10 = 2 channels
        let p = plan(&scores, &[b, b], 0.3, GroupAllocation::Uniform).unwrap();
        assert_eq!(p[0], LayerPlan { attn_keep: vec![1], mlp_keep: vec![2, 3] });
        assert_eq!(p[1], LayerPlan { attn_keep: vec![0], mlp_keep: vec![0, 1] });
    }

    #[test]
    fn removing_every_head_is_an_error() {
        let scores = vec![layer(&[1.0], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])];
        let b = LayerBudget { attn_cost: 10, mlp_cost: 1, params: 16 };
        let e = plan(&scores, &[b], 0.7, GroupAllocation::Uniform).unwrap_err().to_string();
        assert!(e.contains("attention groups") && e.contains("layer 0"), "{e}");
        let e = plan(&scores, &[b], 0.9, GroupAllocation::Global).unwrap_err().to_string();
        assert!(e.contains("layer 0"), "{e}");
        assert!(plan(&scores, &[b], 1.0, GroupAllocation::Global).is_err());
    }

    #[test]
    fn skipped_layers_keep_everything_and_the_rest_carries_the_target() {
        let scores = vec![layer(&[1.0, 2.0], &[1.0, 2.0, 3.0, 4.0]), layer(&[5.0, 1.0], &[4.0, 3.0, 2.0, 1.0])];
        let b = LayerBudget { attn_cost: 10, mlp_cost: 1, params: 40 };
        let frozen = [true, false];
        // S' = 0.15 · 80 / 40 = 0.3: as uniform 0.3 on layer 1 alone (h = 1, 2 channels)
        let p = plan_skipping(&scores, &[b, b], 0.15, GroupAllocation::Uniform, &frozen).unwrap();
        assert_eq!(p[0], LayerPlan { attn_keep: vec![0, 1], mlp_keep: vec![0, 1, 2, 3] });
        assert_eq!(p[1], LayerPlan { attn_keep: vec![0], mlp_keep: vec![0, 1] });
        // global: target 0.15 · 80 = 12 from layer 1 only: channel 3 (z −1.16), head 1 (z −0.71),
        // channel 2 (z −0.39) cost 1 + 10 + 1
        let p = plan_skipping(&scores, &[b, b], 0.15, GroupAllocation::Global, &frozen).unwrap();
        assert_eq!(p[0], LayerPlan { attn_keep: vec![0, 1], mlp_keep: vec![0, 1, 2, 3] });
        assert_eq!(p[1], LayerPlan { attn_keep: vec![0], mlp_keep: vec![0, 1] });
        // no frozen layer: exactly `plan`
        for a in [GroupAllocation::Uniform, GroupAllocation::Global] {
            assert_eq!(plan_skipping(&scores, &[b, b], 0.3, a, &[false, false]).unwrap(), plan(&scores, &[b, b], 0.3, a).unwrap());
        }
        let e = plan_skipping(&scores, &[b, b], 0.5, GroupAllocation::Uniform, &frozen).unwrap_err().to_string();
        assert!(e.contains("must stay below 1"), "{e}");
        let e = plan_skipping(&scores, &[b, b], 0.1, GroupAllocation::Global, &[true, true]).unwrap_err().to_string();
        assert!(e.contains("no layer is left"), "{e}");
    }
}
