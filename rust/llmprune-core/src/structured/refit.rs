//! Structured reconstruction (`apply --reconstruct`): once the groups are chosen, the output
//! projection (LLaMA o_proj / down_proj, OPT out_proj / fc2) is refitted on its kept input channels
//! so that it reproduces, in the least-squares sense on the calibration tokens, the output the whole
//! layer gave.
//!
//! With C = H/N (H = Σ x xᵀ of the projection's input from the Gram sidecar, N its tokens), K the
//! kept channels and λ = damp · mean(diag C_KK):
//!     W' = W C_{:,K} (C_KK + λI)⁻¹.
//! With bias compensation the fit is centered instead: C is the covariance H/N − μμᵀ (μ from the
//! stats sidecar), and the bias absorbs the means: b' = b + W μ − W' μ_K. Keeping exactly the kept
//! columns of W is the special case of uncorrelated channels; FLAP's compensation b + W_R μ_R is the
//! centered fit's bias when W' = W_K.

use faer::linalg::solvers::Solve;
use faer::{Mat, Side};

use crate::error::{Error, Result};
use crate::io::checkpoint::Checkpoint;
use crate::io::dtype::decode;
use crate::sidecar::gram::Gram;
use crate::sidecar::Sidecar;
use crate::structured::arch::ColTensor;
use crate::structured::metric::output_stats;

pub struct Refit {
    /// [out, kept] row-major.
    pub weight: Vec<f64>,
    /// The new bias, with compensation.
    pub bias: Option<Vec<f64>>,
}

pub fn refit(
    ckpt: &Checkpoint,
    sidecar: Option<&Sidecar>,
    gram: &Gram,
    out: &ColTensor,
    kept: &[usize],
    compensate: bool,
    damp: f64,
) -> Result<Refit> {
    let (shard, t) = ckpt.get(&out.weight).ok_or_else(|| Error::Internal(format!("{} resolved by the group rules", out.weight)))?;
    let (rows, n) = (t.shape[0], t.shape[1]);
    let group = gram
        .group_of(&out.weight)
        .filter(|g| g.features == n)
        .ok_or_else(|| Error::gram_mismatch(&gram.path, format!("no Gram matrix of the input of {}", out.weight)))?;
    let (packed, count) = gram.packed(&group.key)?;
    let inv_n = 1.0 / count as f64;
    let mu: Option<Vec<f64>> = if compensate {
        let sc = sidecar.ok_or_else(|| Error::arg("bias compensation needs activation statistics"))?;
        let s = output_stats(sc, &out.weight, n, 1, "bias compensation")?;
        Some(s.means())
    } else {
        None
    };
    let c = |i: usize, j: usize| -> f64 {
        let (a, b) = if i >= j { (i, j) } else { (j, i) };
        let v = packed[a * (a + 1) / 2 + b] * inv_n;
        match &mu {
            Some(m) => v - m[i] * m[j],
            None => v,
        }
    };
    let k = kept.len();
    let w: Vec<f32> = decode(t.dtype, shard.data(t));
    let mean_diag = kept.iter().map(|&j| c(j, j)).sum::<f64>() / k.max(1) as f64;
    let lambda = damp * if mean_diag > 0.0 { mean_diag } else { 1.0 };
    let a = Mat::<f64>::from_fn(k, k, |p, q| c(kept[p], kept[q]) + if p == q { lambda } else { 0.0 });
    // B = C_{K,:} Wᵀ: [k, out]
    let ck = Mat::<f64>::from_fn(k, n, |p, j| c(kept[p], j));
    let wt = Mat::<f64>::from_fn(n, rows, |j, o| w[o * n + j] as f64);
    let mut x = &ck * &wt;
    drop((ck, wt));
    let llt = a.llt(Side::Lower).map_err(|_| {
        Error::arg(format!("{}: the kept channels' Gram matrix is not positive definite with damping {damp}; raise --damp", out.weight))
    })?;
    llt.solve_in_place(x.as_mut());
    let weight: Vec<f64> = (0..rows).flat_map(|o| (0..k).map(move |p| (o, p))).map(|(o, p)| x[(p, o)]).collect();
    let bias = match &mu {
        None => None,
        Some(m) => {
            let old: Vec<f64> = match &out.bias {
                Some(b) => {
                    let (bs, bt) = ckpt.get(b).ok_or_else(|| Error::Internal(format!("{b} resolved by the group rules")))?;
                    decode(bt.dtype, bs.data(bt)).into_iter().map(f64::from).collect()
                }
                None => vec![0.0; rows],
            };
            Some(
                (0..rows)
                    .map(|o| {
                        let full: f64 = (0..n).map(|j| w[o * n + j] as f64 * m[j]).sum();
                        let refit: f64 = (0..k).map(|p| weight[o * k + p] * m[kept[p]]).sum();
                        old[o] + full - refit
                    })
                    .collect(),
            )
        }
    };
    Ok(Refit { weight, bias })
}
