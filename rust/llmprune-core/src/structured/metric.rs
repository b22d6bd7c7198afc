//! Group importance: one f64 score per attention group and per MLP channel of every layer.
//!
//! - `flap` (FLAP's WIFV): Var(X_j) · Σ_i W_ij² over the output projection's input channel j
//!   (unbiased variance from the sidecar's sums), summed over the group's channels.
//! - `wanda-sp`: the mean over the group's columns of the output projection of |W_ij| · ‖X_j‖,
//!   with ‖X_j‖ = sqrt(Σx_j² / n).
//! - `hywia`: fused gradient-based estimates from the sidecar's gradient statistics (`hywia.rs`).
//! - `magnitude-sp`: the L2 norm of all the group's weights (its rows of every input projection
//!   and its columns of the output projection; biases are not counted).
//!
//! Sums over rows are taken in fixed blocks of rows and added in order, so scores do not depend
//! on the number of threads.

use std::str::FromStr;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::io::checkpoint::{Checkpoint, Shard, TensorEntry};
use crate::io::dtype::{decode_into, float_size};
use crate::sidecar::{LayerStats, Sidecar};
use crate::structured::arch::{Module, Rules};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StructMethod {
    Flap,
    MagnitudeSp,
    WandaSp,
    Hywia,
}

impl StructMethod {
    pub const ALL: [StructMethod; 4] = [StructMethod::Flap, StructMethod::MagnitudeSp, StructMethod::WandaSp, StructMethod::Hywia];

    pub fn name(self) -> &'static str {
        match self {
            StructMethod::Flap => "flap",
            StructMethod::MagnitudeSp => "magnitude-sp",
            StructMethod::WandaSp => "wanda-sp",
            StructMethod::Hywia => "hywia",
        }
    }

    pub fn needs_stats(self) -> bool {
        self != StructMethod::MagnitudeSp
    }

    /// FLAP compensates the removed channels' mean contribution; the baselines do not by default.
    pub fn compensates_by_default(self) -> bool {
        self == StructMethod::Flap
    }
}

impl FromStr for StructMethod {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "flap" => Ok(StructMethod::Flap),
            "magnitude-sp" => Ok(StructMethod::MagnitudeSp),
            "wanda-sp" => Ok(StructMethod::WandaSp),
            "hywia" => Ok(StructMethod::Hywia),
            other => Err(Error::arg(format!("unknown structured method {other:?}; expected flap, magnitude-sp, wanda-sp or hywia"))),
        }
    }
}

/// Scores of one layer's groups.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerScores {
    pub attn: Vec<f64>,
    pub mlp: Vec<f64>,
}

/// Rows per block of a column reduction.
const ROW_BLOCK: usize = 64;

/// Σ_i f(W_ij) for every column j of a stored [rows, cols] weight.
pub fn column_sums(ckpt: &Checkpoint, name: &str, f: fn(f32) -> f64) -> Result<Vec<f64>> {
    let (shard, t) = ckpt.get(name).ok_or_else(|| Error::checkpoint(&ckpt.dir, format!("tensor {name} is missing")))?;
    let es = float_size(t.dtype)
        .ok_or_else(|| Error::tensor(&shard.path, name, format!("dtype {:?} is not supported (BF16, F16 and F32 are)", t.dtype)))?;
    let cols = t.shape[1];
    if cols == 0 || t.shape[0] == 0 {
        return Ok(vec![0.0; cols]);
    }
    let data = shard.data(t);
    let partial: Vec<Vec<f64>> = data
        .par_chunks(cols * es * ROW_BLOCK)
        .map(|block| {
            let mut acc = vec![0f64; cols];
            let mut row = vec![0f32; cols];
            for bytes in block.chunks_exact(cols * es) {
                decode_into(t.dtype, bytes, &mut row);
                for (a, &w) in acc.iter_mut().zip(&row) {
                    *a += f(w);
                }
            }
            acc
        })
        .collect();
    let mut out = vec![0f64; cols];
    for p in partial {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    Ok(out)
}

/// Σ_j W_ij² for every row i of a stored [rows, cols] weight.
pub fn row_squares(ckpt: &Checkpoint, name: &str) -> Result<Vec<f64>> {
    let (shard, t) = ckpt.get(name).ok_or_else(|| Error::checkpoint(&ckpt.dir, format!("tensor {name} is missing")))?;
    let es = float_size(t.dtype)
        .ok_or_else(|| Error::tensor(&shard.path, name, format!("dtype {:?} is not supported (BF16, F16 and F32 are)", t.dtype)))?;
    let cols = t.shape[1];
    if cols == 0 {
        return Ok(vec![0.0; t.shape[0]]);
    }
    Ok(map_rows(shard, t, es, |row| row.iter().map(|&w| square(w)).sum()))
}

/// f of every row of a stored [rows, cols] float tensor (element size `es`, cols > 0), decoded to
/// f32, computed in parallel, in row order.
pub fn map_rows<T: Send>(shard: &Shard, t: &TensorEntry, es: usize, f: impl Fn(&[f32]) -> T + Sync + Send) -> Vec<T> {
    let cols = t.shape[1];
    shard
        .data(t)
        .par_chunks(cols * es)
        .map_init(
            || vec![0f32; cols],
            |row, bytes| {
                decode_into(t.dtype, bytes, row);
                f(row)
            },
        )
        .collect()
}

fn square(w: f32) -> f64 {
    (w as f64) * (w as f64)
}

fn absolute(w: f32) -> f64 {
    (w as f64).abs()
}

/// The sidecar's statistics of the output projection `name`, checked for `min_count` tokens.
pub fn output_stats<'a>(sidecar: &'a Sidecar, name: &str, cols: usize, min_count: i64, why: &str) -> Result<&'a LayerStats> {
    let s = sidecar
        .layers
        .get(name)
        .ok_or_else(|| Error::InvalidStats { path: sidecar.path.clone(), msg: format!("no statistics for {name}, which {why} needs") })?;
    if s.input_axis != 1 || s.act_sum.len() != cols {
        return Err(Error::StatsMismatch {
            path: sidecar.path.clone(),
            msg: format!("statistics of {name} have {} channels on axis {}, expected {cols} on axis 1", s.act_sum.len(), s.input_axis),
        });
    }
    if s.count < min_count {
        return Err(Error::arg(format!("statistics for {name} cover {} tokens; {why} needs at least {min_count}", s.count)));
    }
    Ok(s)
}

fn sum_per_group(channel: &[f64], per_group: usize) -> Vec<f64> {
    channel.chunks(per_group).map(|c| c.iter().sum()).collect()
}

fn module_scores(method: StructMethod, ckpt: &Checkpoint, sidecar: Option<&Sidecar>, m: &Module) -> Result<Vec<f64>> {
    let out = &m.output;
    let cols = m.groups * out.cols_per_group;
    match method {
        StructMethod::Flap => {
            let stats = output_stats(sidecar.expect("checked by the caller"), &out.weight, cols, 2, "flap")?;
            let var = stats.variances();
            let sq = column_sums(ckpt, &out.weight, square)?;
            let channel: Vec<f64> = var.iter().zip(&sq).map(|(v, s)| v * s).collect();
            Ok(sum_per_group(&channel, out.cols_per_group))
        }
        StructMethod::WandaSp => {
            let stats = output_stats(sidecar.expect("checked by the caller"), &out.weight, cols, 1, "wanda-sp")?;
            let n = stats.count as f64;
            let abs = column_sums(ckpt, &out.weight, absolute)?;
            let channel: Vec<f64> = stats.act_sqsum.iter().zip(&abs).map(|(q, a)| (q / n).sqrt() * a).collect();
            let size = (out.out_features * out.cols_per_group) as f64;
            Ok(sum_per_group(&channel, out.cols_per_group).into_iter().map(|s| s / size).collect())
        }
        StructMethod::MagnitudeSp => {
            let mut total = sum_per_group(&column_sums(ckpt, &out.weight, square)?, out.cols_per_group);
            for t in &m.inputs {
                let rows = row_squares(ckpt, &t.weight)?;
                let part = rows
                    .get(t.row_offset..t.row_offset + m.groups * t.rows_per_group)
                    .ok_or_else(|| Error::Internal(format!("{}: rows checked by the rules", t.weight)))?;
                for (g, s) in sum_per_group(part, t.rows_per_group).into_iter().enumerate() {
                    total[g] += s;
                }
            }
            Ok(total.into_iter().map(f64::sqrt).collect())
        }
        StructMethod::Hywia => Err(Error::arg("method hywia is scored from gradient statistics by hywia::score_layers")),
    }
}

/// Scores of every group of every layer (call inside the rayon pool).
pub fn score_layers(method: StructMethod, rules: &Rules, ckpt: &Checkpoint, sidecar: Option<&Sidecar>) -> Result<Vec<LayerScores>> {
    if method.needs_stats() && sidecar.is_none() {
        return Err(Error::arg(format!("method {} needs activation statistics", method.name())));
    }
    rules
        .layers
        .iter()
        .map(|l| Ok(LayerScores { attn: module_scores(method, ckpt, sidecar, &l.attn)?, mlp: module_scores(method, ckpt, sidecar, &l.mlp)? }))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variance_is_unbiased_and_clamped() {
        // channel 0: [1, 2, 3] -> 1; channel 1: constant 5 -> 0
        let s = LayerStats { act_sum: vec![6.0, 15.0], act_sqsum: vec![14.0, 75.0], count: 3, input_axis: 1 };
        assert_eq!(s.variances(), vec![1.0, 0.0]);
        let s = LayerStats { act_sum: vec![0.1 * 3.0], act_sqsum: vec![0.03 - 1e-18], count: 3, input_axis: 1 };
        assert!(s.variances()[0] >= 0.0);
    }

    #[test]
    fn groups_sum_their_channels() {
        assert_eq!(sum_per_group(&[1.0, 2.0, 3.0, 4.0], 2), vec![3.0, 7.0]);
        assert!("flap".parse::<StructMethod>().is_ok());
        assert!("wanda".parse::<StructMethod>().is_err());
    }
}
