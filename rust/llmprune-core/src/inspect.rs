//! `inspect`: per-tensor sparsity, N:M compliance and provenance of a checkpoint.

use std::collections::BTreeMap;
use std::path::Path;

use rayon::prelude::*;
use safetensors::Dtype;
use serde::Serialize;
use serde_json::Value;

use crate::error::Result;
use crate::io::checkpoint::{dtype_name, Checkpoint};
use crate::io::dtype::float_size;
use crate::unstructured::prunable::in_decoder_block;

/// N:M patterns whose compliance is reported.
pub const PATTERNS: [(usize, usize); 2] = [(2, 4), (4, 8)];

#[derive(Debug, Serialize)]
pub struct TensorReport {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub numel: u64,
    pub zeros: u64,
    pub sparsity: f64,
    pub prunable: bool,
    /// "N:M" -> whether every run of M inputs in every row holds at least N zeros.
    pub nm: BTreeMap<String, bool>,
}

#[derive(Debug, Default, Serialize)]
pub struct Totals {
    pub numel: u64,
    pub zeros: u64,
    pub sparsity: f64,
}

impl Totals {
    fn add(&mut self, numel: u64, zeros: u64) {
        self.numel += numel;
        self.zeros += zeros;
        self.sparsity = if self.numel == 0 { 0.0 } else { self.zeros as f64 / self.numel as f64 };
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub model: String,
    pub shards: usize,
    pub tensors: Vec<TensorReport>,
    pub total: Totals,
    pub prunable: Totals,
    pub provenance: Option<Value>,
}

fn zero_flags(dtype: Dtype, bytes: &[u8]) -> Vec<bool> {
    match dtype {
        Dtype::BF16 | Dtype::F16 => bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7fff == 0).collect(),
        Dtype::F32 => bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7fff_ffff == 0).collect(),
        _ => Vec::new(),
    }
}

/// Orders names as a person reads them: runs of digits compare as numbers, so
/// `layers.2` comes before `layers.10`.
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for ((da, x), (db, y)) in ca.iter().zip(&cb) {
        let ord = if *da && *db {
            let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
            x.len().cmp(&y.len()).then_with(|| x.cmp(y))
        } else {
            x.cmp(y)
        };
        if ord != std::cmp::Ordering::Equal {
            return ord;
        }
    }
    ca.len().cmp(&cb.len()).then_with(|| a.cmp(b))
}

pub fn inspect(dir: &Path, input_axis: usize) -> Result<Report> {
    let ckpt = Checkpoint::open(dir)?;
    let mut tensors = Vec::new();
    let (mut total, mut prunable_total) = (Totals::default(), Totals::default());
    for (shard, t) in ckpt.tensors() {
        let numel = t.numel() as u64;
        let prunable = t.shape.len() == 2 && in_decoder_block(&t.name);
        let mut nm = BTreeMap::new();
        let mut zeros = 0;
        if float_size(t.dtype).is_some() {
            let z = zero_flags(t.dtype, shard.data(t));
            zeros = z.par_iter().filter(|&&b| b).count() as u64;
            if t.shape.len() == 2 {
                let (rows, cols) = if input_axis == 1 { (t.shape[0], t.shape[1]) } else { (t.shape[1], t.shape[0]) };
                for (n, m) in PATTERNS {
                    // An empty matrix holds no run of M inputs: vacuously compliant, and never
                    // iterated (a [2^45, 0] header would otherwise loop over 2^45 empty rows).
                    let empty = rows == 0 || cols == 0;
                    let ok = empty
                        || cols % m == 0
                            && (0..rows).into_par_iter().all(|r| {
                                (0..cols / m).all(|g| {
                                    (0..m)
                                        .filter(|&j| {
                                            let c = g * m + j;
                                            let i = if input_axis == 1 { r * cols + c } else { c * rows + r };
                                            z[i]
                                        })
                                        .count()
                                        >= n
                                })
                            });
                    nm.insert(format!("{n}:{m}"), ok);
                }
            }
        }
        total.add(numel, zeros);
        if prunable {
            prunable_total.add(numel, zeros);
        }
        tensors.push(TensorReport {
            name: t.name.clone(),
            dtype: dtype_name(t.dtype),
            shape: t.shape.clone(),
            numel,
            zeros,
            sparsity: if numel == 0 { 0.0 } else { zeros as f64 / numel as f64 },
            prunable,
            nm,
        });
    }
    tensors.sort_by(|a, b| natural_cmp(&a.name, &b.name));
    let provenance = ckpt
        .shards
        .first()
        .and_then(|s| s.metadata().get("llmprune").cloned())
        .map(|text| serde_json::from_str(&text).unwrap_or(Value::String(text)));
    Ok(Report { model: dir.display().to_string(), shards: ckpt.shards.len(), tensors, total, prunable: prunable_total, provenance })
}

#[cfg(test)]
mod tests {
    use super::natural_cmp;

    #[test]
    fn natural_order() {
        let mut names = vec!["model.layers.10.mlp.weight", "model.layers.2.mlp.weight", "lm_head.weight", "model.layers.1.a", "model.layers.01.a"];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(names, ["lm_head.weight", "model.layers.01.a", "model.layers.1.a", "model.layers.2.mlp.weight", "model.layers.10.mlp.weight"]);
    }
}
