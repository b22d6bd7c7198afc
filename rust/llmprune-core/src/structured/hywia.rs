//! HyWIA group scores (docs/hywia.md): a fine and a coarse first-order estimate of each group's
//! effect on the loss, fused per layer and module with weights that favour the estimate whose
//! ranking of the groups is more reproducible between two halves of the calibration set.
//!
//! Everything comes from the sidecar's gradient statistics (`stats --grad`); no weight is read.

use std::str::FromStr;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::sidecar::{GradStats, Sidecar};
use crate::structured::arch::{Module, Rules};
use crate::structured::metric::LayerScores;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fusion {
    /// Softmax of the two estimates' split-half reliabilities over a temperature.
    Adaptive,
    Fine,
    Coarse,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taylor {
    /// First order: Σ|w·g| (fine) and |Σw·g| (coarse).
    First,
    /// First order minus half the diagonal Fisher term.
    Mix,
}

impl Fusion {
    pub fn name(self) -> &'static str {
        match self {
            Fusion::Adaptive => "adaptive",
            Fusion::Fine => "fine",
            Fusion::Coarse => "coarse",
        }
    }
}

impl Taylor {
    pub fn name(self) -> &'static str {
        match self {
            Taylor::First => "first",
            Taylor::Mix => "mix",
        }
    }
}

impl FromStr for Fusion {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "adaptive" => Ok(Fusion::Adaptive),
            "fine" => Ok(Fusion::Fine),
            "coarse" => Ok(Fusion::Coarse),
            other => Err(Error::arg(format!("unknown fusion {other:?}; expected adaptive, fine or coarse"))),
        }
    }
}

impl FromStr for Taylor {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "first" => Ok(Taylor::First),
            "mix" => Ok(Taylor::Mix),
            other => Err(Error::arg(format!("unknown taylor order {other:?}; expected first or mix"))),
        }
    }
}

/// Options of `--method hywia`; layer counts left at None take their defaults from the model's depth.
#[derive(Clone, Debug, PartialEq)]
pub struct HywiaOptions {
    pub fusion: Fusion,
    pub taylor: Taylor,
    pub temperature: f64,
    pub skip_first: Option<usize>,
    pub skip_last: Option<usize>,
}

impl Default for HywiaOptions {
    fn default() -> Self {
        HywiaOptions { fusion: Fusion::Fine, taylor: Taylor::First, temperature: 0.1, skip_first: None, skip_last: None }
    }
}

impl HywiaOptions {
    /// (first, last) layers kept whole: given, or ⌊L/8 + ½⌋ and ⌊L/16 + ½⌋ of L layers (4 and 2 for
    /// LLaMA-7B's 32, as LLM-Pruner's recipe, and for SmolLM2's 30). Unlike the other structured
    /// methods' defaults, whose output loads in stock transformers, layers then differ in size: on
    /// SmolLM2 at 20% pruning every layer instead costs 8× the perplexity (docs/hywia.md).
    pub fn skipped(&self, layers: usize) -> Result<(usize, usize)> {
        let first = self.skip_first.unwrap_or((layers + 4) / 8);
        let last = self.skip_last.unwrap_or((layers + 8) / 16);
        if first + last >= layers {
            return Err(Error::arg(format!("--skip-first {first} and --skip-last {last} leave no layer of the model's {layers} to prune")));
        }
        Ok((first, last))
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(Error::arg(format!("--fusion-temperature must be a positive number, got {}", self.temperature)));
        }
        Ok(())
    }
}

/// Fusion weights and reliabilities of one module of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ModuleFusion {
    pub alpha_fine: f64,
    pub alpha_coarse: f64,
    pub rho_fine: f64,
    pub rho_coarse: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerFusion {
    pub layer: usize,
    pub attn: ModuleFusion,
    pub mlp: ModuleFusion,
}

/// One estimate's value per group on all samples and on the two halves.
#[derive(Clone, Debug, PartialEq)]
pub struct Estimate {
    pub all: Vec<f64>,
    pub a: Vec<f64>,
    pub b: Vec<f64>,
}

/// Ranks 1..=n in ascending order, tied values sharing the mean of their positions.
pub fn average_ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&i, &j| x[i].total_cmp(&x[j]));
    let mut ranks = vec![0.0; x.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && x[order[end]] == x[order[start]] {
            end += 1;
        }
        let mean = (start + end + 1) as f64 / 2.0; // positions start+1 ..= end
        for &i in &order[start..end] {
            ranks[i] = mean;
        }
        start = end;
    }
    ranks
}

/// Spearman's rank correlation (Pearson's on average ranks); 0 with fewer than two values or when
/// either side is constant.
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len();
    if n < 2 || y.len() != n {
        return 0.0;
    }
    let (rx, ry) = (average_ranks(x), average_ranks(y));
    let mean = (n + 1) as f64 / 2.0;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in rx.iter().zip(&ry) {
        let (dx, dy) = (a - mean, b - mean);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    if sxx == 0.0 || syy == 0.0 {
        return 0.0;
    }
    sxy / (sxx * syy).sqrt()
}

/// e / Σe, or 1/G each when the sum is not positive.
pub fn normalized(e: &[f64]) -> Vec<f64> {
    let total: f64 = e.iter().sum();
    if total > 0.0 {
        e.iter().map(|v| v / total).collect()
    } else {
        vec![1.0 / e.len() as f64; e.len()]
    }
}

/// (α_fine, α_coarse) = softmax((ρ_fine, ρ_coarse) / T).
pub fn softmax_weights(rho_fine: f64, rho_coarse: f64, temperature: f64) -> (f64, f64) {
    let top = rho_fine.max(rho_coarse);
    let (f, c) = (((rho_fine - top) / temperature).exp(), ((rho_coarse - top) / temperature).exp());
    (f / (f + c), c / (f + c))
}

/// Fused scores (lower = removed first) of one module's groups and the weights behind them.
pub fn fuse(fine: &Estimate, coarse: &Estimate, mode: Fusion, temperature: f64) -> (Vec<f64>, ModuleFusion) {
    let rho_fine = spearman(&fine.a, &fine.b);
    let rho_coarse = spearman(&coarse.a, &coarse.b);
    let (alpha_fine, alpha_coarse) = match mode {
        Fusion::Fine => (1.0, 0.0),
        Fusion::Coarse => (0.0, 1.0),
        Fusion::Adaptive => softmax_weights(rho_fine, rho_coarse, temperature),
    };
    let scores = normalized(&fine.all).into_iter().zip(normalized(&coarse.all)).map(|(f, c)| alpha_fine * f + alpha_coarse * c).collect();
    (scores, ModuleFusion { alpha_fine, alpha_coarse, rho_fine, rho_coarse })
}

/// Quantity planes of `GradStats`.
const TAYLOR_ABS: usize = 0;
const TAYLOR_SUM: usize = 1;
const FISHER: usize = 2;
const MIX_ABS: usize = 3;

/// Q[split][quantity][group]: the group's rows of every input projection plus its columns of the
/// output projection.
type GroupValues = Vec<Vec<Vec<f64>>>;

fn group_values(m: &Module, grads: &[&GradStats]) -> GroupValues {
    let (inputs, output) = grads.split_at(m.inputs.len());
    (0..GradStats::SPLITS)
        .map(|t| {
            (0..GradStats::QUANTITIES)
                .map(|q| {
                    let mut v: Vec<f64> = output[0].cols(t, q).chunks(m.output.cols_per_group).map(|c| c.iter().sum()).collect();
                    for (rt, g) in m.inputs.iter().zip(inputs) {
                        for (acc, rows) in v.iter_mut().zip(g.rows(t, q).chunks(rt.rows_per_group)) {
                            *acc += rows.iter().sum::<f64>();
                        }
                    }
                    v
                })
                .collect()
        })
        .collect()
}

/// (fine, coarse) on split t.
fn estimates_on(q: &[Vec<f64>], taylor: Taylor) -> (Vec<f64>, Vec<f64>) {
    match taylor {
        Taylor::First => (q[TAYLOR_ABS].clone(), q[TAYLOR_SUM].iter().map(|v| v.abs()).collect()),
        Taylor::Mix => (q[MIX_ABS].clone(), q[TAYLOR_SUM].iter().zip(&q[FISHER]).map(|(s, f)| (s - 0.5 * f).abs()).collect()),
    }
}

fn estimates(values: &GroupValues, taylor: Taylor) -> (Estimate, Estimate) {
    let [(fa, ca), (f1, c1), (f2, c2)] = [0, 1, 2].map(|t| estimates_on(&values[t], taylor));
    (Estimate { all: fa, a: f1, b: f2 }, Estimate { all: ca, a: c1, b: c2 })
}

/// The gradient statistics of every projection of a module, checked against its groups.
fn module_grads<'a>(sidecar: &'a Sidecar, m: &Module, fusion: Fusion) -> Result<Vec<&'a GradStats>> {
    let invalid = |msg: String| Error::InvalidStats { path: sidecar.path.clone(), msg };
    let mut out = Vec::with_capacity(m.inputs.len() + 1);
    let names = m.inputs.iter().map(|t| (&t.weight, t.rows_per_group, true)).chain([(&m.output.weight, m.output.cols_per_group, false)]);
    for (name, per_group, rows) in names {
        let g = sidecar.grads.get(name).ok_or_else(|| invalid(format!("no gradient statistics for {name}, which hywia needs")))?;
        let axis_ok = sidecar.layers.get(name).is_some_and(|s| s.input_axis == 1);
        let len = if rows { g.out_features() } else { g.per_input.len() / (GradStats::SPLITS * GradStats::QUANTITIES) };
        if !axis_ok || len != m.groups * per_group {
            return Err(Error::StatsMismatch {
                path: sidecar.path.clone(),
                msg: format!(
                    "gradient statistics of {name} do not cover its {} groups of {per_group} {}",
                    m.groups,
                    if rows { "rows" } else { "columns" }
                ),
            });
        }
        if g.count[0] == 0 {
            return Err(invalid(format!("gradient statistics of {name} cover 0 samples")));
        }
        if fusion == Fusion::Adaptive && g.count[1].min(g.count[2]) == 0 {
            return Err(Error::arg_hint(
                format!(
                    "adaptive fusion compares two halves of the calibration samples, and the gradient statistics of {name} \
                     have {} and {} samples in them",
                    g.count[1], g.count[2]
                ),
                "take the statistics with --nsamples 2 or more, or pass --fusion fine|coarse",
            ));
        }
        out.push(g);
    }
    Ok(out)
}

/// Scores of every layer (zeros for skipped ones, which keep everything) and the fusion weights of
/// the layers that are pruned.
pub fn score_layers(rules: &Rules, sidecar: &Sidecar, opts: &HywiaOptions, frozen: &[bool]) -> Result<(Vec<LayerScores>, Vec<LayerFusion>)> {
    if rules.layers.iter().any(|l| l.attn.inputs.iter().chain(&l.mlp.inputs).any(|t| t.row_offset > 0)) {
        return Err(Error::arg(format!(
            "method hywia does not support {} models' fused projections yet; use flap, wanda-sp or magnitude-sp",
            rules.model_type
        )));
    }
    if sidecar.grads.is_empty() {
        return Err(Error::arg_hint(
            format!("method hywia needs gradient statistics; {} has none", sidecar.path.display()),
            "run: llmprune stats MODEL --grad",
        ));
    }
    let mut scores = Vec::with_capacity(rules.layers.len());
    let mut fusion = Vec::new();
    for (i, l) in rules.layers.iter().enumerate() {
        if frozen[i] {
            scores.push(LayerScores { attn: vec![0.0; l.attn.groups], mlp: vec![0.0; l.mlp.groups] });
            continue;
        }
        let fused = |m: &Module| -> Result<(Vec<f64>, ModuleFusion)> {
            let values = group_values(m, &module_grads(sidecar, m, opts.fusion)?);
            let (fine, coarse) = estimates(&values, opts.taylor);
            Ok(fuse(&fine, &coarse, opts.fusion, opts.temperature))
        };
        let (attn, attn_w) = fused(&l.attn)?;
        let (mlp, mlp_w) = fused(&l.mlp)?;
        scores.push(LayerScores { attn, mlp });
        fusion.push(LayerFusion { layer: i, attn: attn_w, mlp: mlp_w });
    }
    Ok((scores, fusion))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn est(all: &[f64], a: &[f64], b: &[f64]) -> Estimate {
        Estimate { all: all.to_vec(), a: a.to_vec(), b: b.to_vec() }
    }

    fn ascending(s: &[f64]) -> Vec<usize> {
        let mut o: Vec<usize> = (0..s.len()).collect();
        o.sort_by(|&i, &j| s[i].total_cmp(&s[j]));
        o
    }

    #[test]
    fn ranks_average_ties() {
        assert_eq!(average_ranks(&[10.0, 20.0, 20.0, 5.0]), vec![2.0, 3.5, 3.5, 1.0]);
        assert_eq!(average_ranks(&[1.0, 1.0, 1.0]), vec![2.0, 2.0, 2.0]);
        assert_eq!(average_ranks(&[]), Vec::<f64>::new());
    }

    #[test]
    fn spearman_matches_hand_computed_values() {
        assert_eq!(spearman(&[1.0, 2.0, 3.0, 4.0], &[10.0, 20.0, 30.0, 40.0]), 1.0);
        assert_eq!(spearman(&[1.0, 2.0, 3.0, 4.0], &[4.0, 3.0, 2.0, 1.0]), -1.0);
        // ranks (1,2,3,4) and (2,1,4,3): d² sums to 4, 1 − 6·4/(4·15) = 0.6
        assert!((spearman(&[1.0, 2.0, 3.0, 4.0], &[2.0, 1.0, 4.0, 3.0]) - 0.6).abs() < 1e-15);
        // ties: ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4): deviations (−1.5, 0, 0, 1.5) and
        // (−1.5, −0.5, 0.5, 1.5); Σxy = 4.5, Σx² = 4.5, Σy² = 5 -> 4.5 / sqrt(22.5)
        let want = 4.5 / 22.5f64.sqrt();
        assert!((spearman(&[1.0, 3.0, 3.0, 7.0], &[1.0, 2.0, 3.0, 4.0]) - want).abs() < 1e-15);
        // both tied the same way: ranks agree exactly
        assert!((spearman(&[0.0, 5.0, 5.0, 9.0], &[1.0, 2.0, 2.0, 3.0]) - 1.0).abs() < 1e-15);
        assert_eq!(spearman(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]), 0.0, "constant side");
        assert_eq!(spearman(&[1.0], &[2.0]), 0.0, "one group");
    }

    #[test]
    fn weights_sum_to_one() {
        for (rf, rc, t) in [(0.3, -0.2, 0.1), (1.0, 1.0, 0.1), (-0.5, 0.9, 2.0), (0.0, 0.0, 1e-3), (0.99, -1.0, 1e-4)] {
            let (a, b) = softmax_weights(rf, rc, t);
            assert!((a + b - 1.0).abs() <= 2.0 * f64::EPSILON, "{rf} {rc} {t}: {a} + {b}");
            assert!(a >= 0.0 && b >= 0.0);
            assert_eq!(a > b, rf > rc);
        }
        assert_eq!(softmax_weights(0.4, 0.4, 0.1), (0.5, 0.5));
    }

    #[test]
    fn low_temperature_picks_the_more_reliable_ranking() {
        // fine reproduces between halves (ρ = 1), coarse does not (ρ = −1)
        let fine = est(&[3.0, 1.0, 4.0, 2.0], &[3.0, 1.0, 4.0, 2.0], &[30.0, 10.0, 40.0, 20.0]);
        let coarse = est(&[1.0, 9.0, 2.0, 8.0], &[1.0, 2.0, 3.0, 4.0], &[4.0, 3.0, 2.0, 1.0]);
        let (s, w) = fuse(&fine, &coarse, Fusion::Adaptive, 1e-9);
        assert_eq!((w.alpha_fine, w.alpha_coarse, w.rho_fine, w.rho_coarse), (1.0, 0.0, 1.0, -1.0));
        assert_eq!(s, normalized(&fine.all));
        assert_eq!(ascending(&s), ascending(&fine.all));
        // and the other way round
        let (s, w) = fuse(&coarse, &fine, Fusion::Adaptive, 1e-9);
        assert_eq!((w.alpha_fine, w.alpha_coarse), (0.0, 1.0));
        assert_eq!(ascending(&s), ascending(&fine.all));
        // a high temperature mixes both
        let (_, w) = fuse(&fine, &coarse, Fusion::Adaptive, 100.0);
        assert!((w.alpha_fine - 0.5).abs() < 0.01);
    }

    #[test]
    fn fixed_modes_use_one_estimate() {
        let fine = est(&[3.0, 1.0, 4.0, 0.0], &[1.0, 2.0, 3.0, 4.0], &[4.0, 3.0, 2.0, 1.0]);
        let coarse = est(&[1.0, 9.0, 2.0, 8.0], &[1.0, 2.0, 3.0, 4.0], &[1.0, 2.0, 3.0, 4.0]);
        let (s, w) = fuse(&fine, &coarse, Fusion::Fine, 0.1);
        assert_eq!(s, vec![3.0 / 8.0, 1.0 / 8.0, 4.0 / 8.0, 0.0]);
        assert_eq!((w.alpha_fine, w.alpha_coarse, w.rho_fine, w.rho_coarse), (1.0, 0.0, -1.0, 1.0));
        let (s, w) = fuse(&fine, &coarse, Fusion::Coarse, 0.1);
        assert_eq!(s, normalized(&coarse.all));
        assert_eq!((w.alpha_fine, w.alpha_coarse), (0.0, 1.0));
    }

    #[test]
    fn normalization_is_per_module_and_uniform_for_zeros() {
        assert_eq!(normalized(&[1.0, 3.0]), vec![0.25, 0.75]);
        assert_eq!(normalized(&[0.0, 0.0, 0.0, 0.0]), vec![0.25; 4]);
        // scale of one estimate does not matter: only its shares do
        let fine = est(&[1e6, 3e6], &[1.0, 2.0], &[1.0, 2.0]);
        let coarse = est(&[3.0 / 1048576.0, 1.0 / 1048576.0], &[1.0, 2.0], &[1.0, 2.0]);
        let (s, w) = fuse(&fine, &coarse, Fusion::Adaptive, 0.1);
        assert_eq!((w.alpha_fine, w.alpha_coarse), (0.5, 0.5));
        assert_eq!(s, vec![0.5, 0.5]);
    }

    #[test]
    fn skip_defaults_follow_the_depth() {
        let o = HywiaOptions::default();
        assert_eq!(o.skipped(32).unwrap(), (4, 2));
        assert_eq!(o.skipped(30).unwrap(), (4, 2));
        assert_eq!(o.skipped(10).unwrap(), (1, 1));
        assert_eq!(o.skipped(2).unwrap(), (0, 0));
        let o = HywiaOptions { skip_first: Some(3), skip_last: Some(0), ..HywiaOptions::default() };
        assert_eq!(o.skipped(4).unwrap(), (3, 0));
        assert!(o.skipped(3).unwrap_err().to_string().contains("leave no layer"));
        assert!(HywiaOptions { temperature: 0.0, ..HywiaOptions::default() }.validate().is_err());
        assert!("bogus".parse::<Fusion>().is_err() && "mix".parse::<Taylor>().is_ok());
    }
}
