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
//! parameters; in each layer the lowest scores go, lower index first on ties. Its output is meant to
//! load in stock transformers, so two rules shape the counts:
//! - h is the count nearest S·G (ties: more removed) whose kept head count a stock config can
//!   describe (`kv_allowed`; e.g. an OPT layer keeps all its heads, a LLaMA layer's heads must divide
//!   hidden_size); ⌊S·G + ½⌋ whenever that count is allowed;
//! - the kept MLP width W − c is rounded to the nearest multiple of `width_multiple` (halves up),
//!   at least one multiple and at most W; a layer `width_multiple` wide or narrower is not rounded,
//!   and `width_multiple` 1 rounds nothing.
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
    /// Kept MLP widths are multiples of `width_multiple` (1: any width).
    Uniform {
        width_multiple: usize,
    },
}

/// Uniform allocation's default width multiple: the MLP widths GPU kernels tile without padding
/// (and the input-dimension multiple of the common 4-bit kernels).
pub const WIDTH_MULTIPLE: usize = 128;

impl GroupAllocation {
    /// Uniform allocation with the default width multiple.
    pub const UNIFORM: GroupAllocation = GroupAllocation::Uniform { width_multiple: WIDTH_MULTIPLE };

    pub fn name(self) -> &'static str {
        match self {
            GroupAllocation::Global => "global",
            GroupAllocation::Uniform { .. } => "uniform",
        }
    }

    /// `name` with a width multiple given or not: the multiple goes with uniform allocation only.
    pub fn parse(name: &str, width_multiple: Option<usize>) -> Result<Self> {
        match (name.parse()?, width_multiple) {
            (a, None) => Ok(a),
            (GroupAllocation::Uniform { .. }, Some(m)) if m >= 1 => Ok(GroupAllocation::Uniform { width_multiple: m }),
            (GroupAllocation::Uniform { .. }, Some(m)) => Err(Error::arg(format!("the width multiple must be at least 1, got {m}"))),
            (GroupAllocation::Global, Some(_)) => Err(Error::arg_hint(
                "a width multiple goes with uniform allocation; global allocation gives every layer its own widths",
                "drop --width-multiple, or pass --allocation uniform",
            )),
        }
    }
}

impl std::str::FromStr for GroupAllocation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "global" => Ok(GroupAllocation::Global),
            "uniform" => Ok(GroupAllocation::UNIFORM),
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

/// `plan_skipping` with no layer frozen and every kept head count allowed.
pub fn plan(scores: &[LayerScores], budgets: &[LayerBudget], sparsity: f64, allocation: GroupAllocation) -> Result<Vec<LayerPlan>> {
    plan_skipping(scores, budgets, sparsity, allocation, &vec![false; scores.len()], &|_| true)
}

/// The plan, with the layers where `frozen` is true left whole; uniform allocation with no layer
/// frozen keeps k attention groups of a layer only where `kv_allowed(k)` (keeping none is left to
/// the error below).
pub fn plan_skipping(
    scores: &[LayerScores],
    budgets: &[LayerBudget],
    sparsity: f64,
    allocation: GroupAllocation,
    frozen: &[bool],
    kv_allowed: &dyn Fn(usize) -> bool,
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
        // with layers kept whole no stock config describes the output: any head count will do
        GroupAllocation::Uniform { width_multiple } => {
            uniform(scores, budgets, local, frozen, &|k| k == 0 || skipped > 0 || kv_allowed(k), width_multiple)
        }
    };
    check_nothing_emptied(&plans, scores, |i, what| {
        format!("sparsity {sparsity} with {} allocation would remove {what} in layer {i}; lower --sparsity", allocation.name())
    })?;
    Ok(plans)
}

/// An error (worded by `message(layer, what)`) where a plan keeps no attention group or no MLP
/// channel of a layer.
fn check_nothing_emptied(plans: &[LayerPlan], scores: &[LayerScores], message: impl Fn(usize, &str) -> String) -> Result<()> {
    for (i, (p, s)) in plans.iter().zip(scores).enumerate() {
        let what = if p.attn_keep.is_empty() {
            Some(format!("all {} of its attention groups (key/value heads with their query heads)", s.attn.len()))
        } else if p.mlp_keep.is_empty() {
            Some(format!("all {} of its MLP channels", s.mlp.len()))
        } else {
            None
        };
        if let Some(what) = what {
            return Err(Error::arg(message(i, &what)));
        }
    }
    Ok(())
}

/// A searched schedule's plan: layer i removes about `layer_sparsity[i]` of its own parameters by
/// the uniform rule (`uniform_layer`), with any kept head count (the layers differ, so no stock
/// config describes the output unless they happen to agree) and the kept MLP widths rounded to
/// `width_multiple`.
pub fn plan_scheduled(scores: &[LayerScores], budgets: &[LayerBudget], layer_sparsity: &[f64], width_multiple: usize) -> Result<Vec<LayerPlan>> {
    if layer_sparsity.len() != scores.len() {
        return Err(Error::arg_hint(
            format!("the schedule gives {} layer sparsities, and the model has {} decoder layers", layer_sparsity.len(), scores.len()),
            "search this model: llmprune search MODEL --method METHOD --sparsity S",
        ));
    }
    if let Some((i, s)) = layer_sparsity.iter().enumerate().find(|(_, s)| !(0.0..1.0).contains(*s)) {
        return Err(Error::arg(format!("the schedule's sparsity {s} for layer {i} is not in [0, 1)")));
    }
    let plans: Vec<LayerPlan> =
        scores.iter().zip(budgets).zip(layer_sparsity).map(|((s, b), &sp)| uniform_layer(s, b, sp, &|_| true, width_multiple)).collect();
    check_nothing_emptied(&plans, scores, |i, what| {
        format!(
            "the schedule's sparsity {} for layer {i} would remove {what}; search again with fewer --levels or a smaller --step",
            layer_sparsity[i]
        )
    })?;
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

/// The count of G to remove nearest x (ties: the larger) among those `allowed` to remain.
fn nearest_allowed(x: f64, g: usize, allowed: &dyn Fn(usize) -> bool) -> usize {
    let h = ((x + 0.5).floor() as usize).min(g);
    if allowed(g - h) {
        return h;
    }
    (0..=g).filter(|&h| allowed(g - h)).min_by(|&a, &b| (a as f64 - x).abs().total_cmp(&(b as f64 - x).abs()).then(b.cmp(&a))).unwrap_or(0)
}

/// Kept width `kept` of `width` rounded to the nearest multiple of `m` (halves up), within [m, width];
/// unchanged when `width` ≤ m.
pub fn round_width(kept: usize, width: usize, m: usize) -> usize {
    if m <= 1 || width <= m {
        return kept;
    }
    ((kept + m / 2) / m * m).clamp(m, width)
}

fn uniform(
    scores: &[LayerScores],
    budgets: &[LayerBudget],
    sparsity: f64,
    frozen: &[bool],
    kv_allowed: &dyn Fn(usize) -> bool,
    width_multiple: usize,
) -> Vec<LayerPlan> {
    scores
        .iter()
        .zip(budgets)
        .zip(frozen)
        .map(|((s, b), &skip)| {
            if skip {
                return LayerPlan { attn_keep: (0..s.attn.len()).collect(), mlp_keep: (0..s.mlp.len()).collect() };
            }
            uniform_layer(s, b, sparsity, kv_allowed, width_multiple)
        })
        .collect()
}

/// One layer removing about `sparsity` of its parameters: h attention groups (the count nearest
/// S·G that `kv_allowed` leaves), then the MLP channels that bring it closest to S, the kept width
/// rounded to `width_multiple`; the lowest scores go, lower index first on ties.
pub fn uniform_layer(s: &LayerScores, b: &LayerBudget, sparsity: f64, kv_allowed: &dyn Fn(usize) -> bool, width_multiple: usize) -> LayerPlan {
    let h = nearest_allowed(sparsity * s.attn.len() as f64, s.attn.len(), kv_allowed);
    let rest = sparsity * b.params as f64 - (h as u64 * b.attn_cost) as f64;
    let c = if b.mlp_cost == 0 { 0.0 } else { (rest / b.mlp_cost as f64 + 0.5).floor().max(0.0) };
    let width = s.mlp.len();
    let c = width - round_width(width - (c as usize).min(width), width, width_multiple);
    LayerPlan {
        attn_keep: keep_all_but(s.attn.len(), ascending(&s.attn).into_iter().take(h)),
        mlp_keep: keep_all_but(s.mlp.len(), ascending(&s.mlp).into_iter().take(c)),
    }
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
        assert!(plan(&scores, &[b, b], 0.5, GroupAllocation::Uniform { width_multiple: 1 }).is_err());
        // h = floor(0.3 * 2 + 0.5) = 1, rest = 12 - 10 = 2 channels
        let p = plan(&scores, &[b, b], 0.3, GroupAllocation::Uniform { width_multiple: 1 }).unwrap();
        assert_eq!(p[0], LayerPlan { attn_keep: vec![1], mlp_keep: vec![2, 3] });
        assert_eq!(p[1], LayerPlan { attn_keep: vec![0], mlp_keep: vec![0, 1] });
    }

    #[test]
    fn removing_every_head_is_an_error() {
        let scores = vec![layer(&[1.0], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])];
        let b = LayerBudget { attn_cost: 10, mlp_cost: 1, params: 16 };
        let e = plan(&scores, &[b], 0.7, GroupAllocation::Uniform { width_multiple: 1 }).unwrap_err().to_string();
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
        let p = plan_skipping(&scores, &[b, b], 0.15, GroupAllocation::Uniform { width_multiple: 1 }, &frozen, &|_| true).unwrap();
        assert_eq!(p[0], LayerPlan { attn_keep: vec![0, 1], mlp_keep: vec![0, 1, 2, 3] });
        assert_eq!(p[1], LayerPlan { attn_keep: vec![0], mlp_keep: vec![0, 1] });
        // global: target 0.15 · 80 = 12 from layer 1 only: channel 3 (z −1.16), head 1 (z −0.71),
        // channel 2 (z −0.39) cost 1 + 10 + 1
        let p = plan_skipping(&scores, &[b, b], 0.15, GroupAllocation::Global, &frozen, &|_| true).unwrap();
        assert_eq!(p[0], LayerPlan { attn_keep: vec![0, 1], mlp_keep: vec![0, 1, 2, 3] });
        assert_eq!(p[1], LayerPlan { attn_keep: vec![0], mlp_keep: vec![0, 1] });
        // no frozen layer: exactly `plan`
        for a in [GroupAllocation::Uniform { width_multiple: 1 }, GroupAllocation::Global] {
            assert_eq!(plan_skipping(&scores, &[b, b], 0.3, a, &[false, false], &|_| true).unwrap(), plan(&scores, &[b, b], 0.3, a).unwrap());
        }
        let e = plan_skipping(&scores, &[b, b], 0.5, GroupAllocation::Uniform { width_multiple: 1 }, &frozen, &|_| true).unwrap_err().to_string();
        assert!(e.contains("must stay below 1"), "{e}");
        let e = plan_skipping(&scores, &[b, b], 0.1, GroupAllocation::Global, &[true, true], &|_| true).unwrap_err().to_string();
        assert!(e.contains("no layer is left"), "{e}");
    }

    #[test]
    fn uniform_keeps_head_counts_a_config_can_describe() {
        // 4 groups, S·G = 1.2: one group would go, but only 4 or 2 kept groups are allowed -> 2 go
        let scores = vec![layer(&[4.0, 3.0, 2.0, 1.0], &[1.0; 64]); 2];
        let b = LayerBudget { attn_cost: 10, mlp_cost: 1, params: 200 };
        let even = |k: usize| k.is_multiple_of(2);
        let u = GroupAllocation::Uniform { width_multiple: 1 };
        let p = plan_skipping(&scores, &[b, b], 0.3, u, &[false, false], &even).unwrap();
        assert_eq!((p[0].attn_keep.clone(), p[0].mlp_keep.len()), (vec![0, 1], 24)); // 60 - 20 = 40 channels go
                                                                                     // S·G = 1.4 with the full count only: none of the groups goes, 70 channels would: error
        assert!(plan_skipping(&scores, &[b, b], 0.35, u, &[false, false], &|k| k == 4).is_err());
        // only the full count allowed (OPT): attention stays whole, the MLP carries the target
        let p = plan_skipping(&scores, &[b, b], 0.05, u, &[false, false], &|k| k == 4).unwrap();
        assert_eq!((p[1].attn_keep.len(), p[1].mlp_keep.len()), (4, 54));
        assert_eq!(nearest_allowed(1.5, 4, &|_| true), 2);
        assert_eq!(nearest_allowed(1.0, 4, &|k| k == 4 || k == 2 || k == 0), 2);
        assert_eq!(nearest_allowed(3.0, 4, &|k| k == 4 || k == 0), 4);
    }

    #[test]
    fn uniform_rounds_kept_widths_to_the_multiple() {
        assert_eq!(round_width(1297, 1536, 128), 1280);
        assert_eq!(round_width(1344, 1536, 128), 1408); // 10.5 multiples: halves up
        assert_eq!(round_width(20, 1536, 128), 128);
        assert_eq!(round_width(1530, 1000 + 530, 128), 1530); // nearest multiple 1536 is wider: all kept
        assert_eq!(round_width(100, 128, 128), 100); // a layer no wider than the multiple is not rounded
        assert_eq!(round_width(77, 300, 1), 77);
        // 1 group of cost 10 (S·G = 0.2 -> none), 300 channels of cost 1, params 310: c = ⌊0.2·310 + ½⌋ = 62
        // -> kept 238 -> 256 with multiple 128 (44 removed), 238 with 1
        let scores = vec![layer(&[1.0], &(0..300).map(f64::from).collect::<Vec<_>>())];
        let b = LayerBudget { attn_cost: 10, mlp_cost: 1, params: 310 };
        let p = plan(&scores, &[b], 0.2, GroupAllocation::Uniform { width_multiple: 128 }).unwrap();
        assert_eq!(p[0].mlp_keep, (44..300).collect::<Vec<_>>());
        let p = plan(&scores, &[b], 0.2, GroupAllocation::Uniform { width_multiple: 1 }).unwrap();
        assert_eq!(p[0].mlp_keep.len(), 238);
    }

    #[test]
    fn width_multiple_goes_with_uniform_only() {
        assert_eq!(GroupAllocation::parse("uniform", None).unwrap(), GroupAllocation::UNIFORM);
        assert_eq!(GroupAllocation::parse("uniform", Some(64)).unwrap(), GroupAllocation::Uniform { width_multiple: 64 });
        assert!(GroupAllocation::parse("uniform", Some(0)).is_err());
        assert!(GroupAllocation::parse("global", Some(64)).unwrap_err().to_string().contains("uniform"));
        assert_eq!(GroupAllocation::parse("global", None).unwrap(), GroupAllocation::Global);
    }

    #[test]
    fn a_schedule_plans_each_layer_at_its_own_sparsity() {
        let scores = vec![layer(&[1.0, 2.0], &[1.0, 2.0, 3.0, 4.0]), layer(&[5.0, 1.0], &[4.0, 3.0, 2.0, 1.0])];
        let b = LayerBudget { attn_cost: 10, mlp_cost: 1, params: 40 };
        // each layer exactly as uniform allocation at its own sparsity
        let p = plan_scheduled(&scores, &[b, b], &[0.0, 0.3], 1).unwrap();
        assert_eq!(p[0], LayerPlan { attn_keep: vec![0, 1], mlp_keep: vec![0, 1, 2, 3] });
        assert_eq!(p[1], plan(&scores, &[b, b], 0.3, GroupAllocation::Uniform { width_multiple: 1 }).unwrap()[1]);
        // equal sparsities: uniform allocation
        assert_eq!(
            plan_scheduled(&scores, &[b, b], &[0.3, 0.3], 1).unwrap(),
            plan(&scores, &[b, b], 0.3, GroupAllocation::Uniform { width_multiple: 1 }).unwrap()
        );
        let e = plan_scheduled(&scores, &[b, b], &[0.3], 1).unwrap_err().to_string();
        assert!(e.contains("1 layer sparsities") && e.contains("2 decoder layers"), "{e}");
        assert!(plan_scheduled(&scores, &[b, b], &[0.3, 1.0], 1).unwrap_err().to_string().contains("not in [0, 1)"));
        let e = plan_scheduled(&scores, &[b, b], &[0.0, 0.9], 1).unwrap_err().to_string();
        assert!(e.contains("layer 1") && e.contains("0.9"), "{e}");
    }
}
