//! Bias compensation of unstructured pruning (`apply --compensate`): each pruned linear's output
//! bias absorbs the expected contribution of what pruning took away, b' = b + (W − W') μ, with W the
//! weight before pruning, W' the one written (zeroed and, with an update, reconstructed) and μ the
//! input channels' calibration mean. For a plain mask this is STADE's intended b += W_pruned · μ,
//! computed from the weights before they are zeroed.
//!
//! A linear without a bias gets one where stock transformers can load it: the model's own flag
//! (`attention_bias` for q/k/v/o, `mlp_bias` for gate/up/down in LLaMA; `attention_bias` in
//! Qwen3 and Gemma) is set in config.json and every linear the flag covers gets a bias — computed
//! where it was pruned, zeros elsewhere. A linear whose architecture has no such flag is left
//! uncompensated and named in a warning.

use std::collections::{BTreeMap, BTreeSet};

use rayon::prelude::*;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::blocks::block_index;
use crate::io::checkpoint::{Checkpoint, TensorEntry};
use crate::io::dtype::decode_into;
use crate::unstructured::prunable::Prunable;

/// Where a compensated weight's bias comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BiasSource {
    /// The checkpoint's bias tensor (its name).
    Existing(String),
    /// A new bias, written right after its weight.
    Added,
}

#[derive(Debug, Default)]
pub struct BiasPlan {
    /// Compensated weight -> its bias.
    pub compensated: BTreeMap<String, BiasSource>,
    /// Weights that get an added zero bias only because a config flag now covers them.
    pub zero_added: BTreeSet<String>,
    /// Config flags set to true.
    pub flags: BTreeSet<&'static str>,
    /// Pruned weights that cannot carry a bias in their architecture.
    pub skipped: Vec<String>,
}

impl BiasPlan {
    /// Whether `weight` gets a bias tensor written right after it (added, compensated or zeros).
    pub fn adds_after(&self, weight: &str) -> bool {
        self.compensated.get(weight) == Some(&BiasSource::Added) || self.zero_added.contains(weight)
    }

    pub fn bias_name(weight: &str) -> String {
        format!("{}.bias", weight.strip_suffix(".weight").unwrap_or(weight))
    }
}

/// The config flag that gives a linear of `model_type` a bias, when there is one.
pub fn bias_flag(model_type: &str, weight: &str) -> Option<&'static str> {
    let module = weight.strip_suffix(".weight")?;
    let last = module.rsplit('.').next()?;
    let attn = matches!(last, "q_proj" | "k_proj" | "v_proj" | "o_proj");
    let mlp = matches!(last, "gate_proj" | "up_proj" | "down_proj");
    match model_type {
        "llama" if attn => Some("attention_bias"),
        "llama" if mlp => Some("mlp_bias"),
        "qwen3" | "gemma" | "gemma2" | "gemma3_text" if attn => Some("attention_bias"),
        _ => None,
    }
}

/// Plans the biases of compensating `pruned` (every prunable weight of the run).
pub fn plan(ckpt: &Checkpoint, config: &serde_json::Map<String, Value>, pruned: &BTreeMap<String, Prunable>) -> Result<BiasPlan> {
    let mtype = config.get("model_type").and_then(Value::as_str).unwrap_or_default();
    let mut plan = BiasPlan::default();
    for (name, p) in pruned {
        let (_, t) = ckpt.get(name).ok_or_else(|| Error::Internal(format!("{name} resolved but not in the checkpoint")))?;
        let rows = t.shape[1 - p.input_axis];
        let bias = BiasPlan::bias_name(name);
        if let Some((shard, b)) = ckpt.get(&bias) {
            if b.shape != [rows] {
                return Err(Error::tensor(&shard.path, &bias, format!("has shape {:?}; compensation expects [{rows}]", b.shape)));
            }
            if crate::io::dtype::float_size(b.dtype).is_none() {
                return Err(Error::tensor(&shard.path, &bias, format!("dtype {:?} cannot be compensated (BF16, F16 and F32 can)", b.dtype)));
            }
            plan.compensated.insert(name.clone(), BiasSource::Existing(bias));
        } else if let Some(flag) = bias_flag(mtype, name) {
            plan.compensated.insert(name.clone(), BiasSource::Added);
            plan.flags.insert(flag);
        } else {
            plan.skipped.push(name.clone());
        }
    }
    // every linear a newly set flag covers needs a bias, pruned or not
    if !plan.flags.is_empty() {
        for (_, t) in ckpt.tensors() {
            let covered = bias_flag(mtype, &t.name).is_some_and(|f| plan.flags.contains(f));
            if covered
                && t.shape.len() == 2
                && block_index(&t.name).is_some()
                && ckpt.get(&BiasPlan::bias_name(&t.name)).is_none()
                && !plan.compensated.contains_key(&t.name)
            {
                plan.zero_added.insert(t.name.clone());
            }
        }
    }
    // a bias is written after its weight; one stored in an earlier shard would already be written
    for (w, src) in &plan.compensated {
        if let BiasSource::Existing(b) = src {
            if ckpt.shard_of(b) < ckpt.shard_of(w) {
                return Err(Error::arg(format!("{b} is stored in an earlier shard than {w}; compensation writes a bias after its weight")));
            }
        }
    }
    Ok(plan)
}

/// (W − W') μ per output row, for a weight stored as `t` (input axis `input_axis`), from its
/// original and new bytes, decoded one stored row at a time (never a whole f32 copy).
pub fn bias_delta(t: &TensorEntry, original: &[u8], new: &[u8], input_axis: usize, mu: &[f64]) -> Vec<f64> {
    let c = t.shape[1];
    let row_bytes = original.len() / t.shape[0];
    let rows = || original.chunks_exact(row_bytes).zip(new.chunks_exact(row_bytes));
    let decoded = |a: &[u8], b: &[u8], buf: &mut (Vec<f32>, Vec<f32>)| {
        decode_into(t.dtype, a, &mut buf.0);
        decode_into(t.dtype, b, &mut buf.1);
    };
    if input_axis == 1 {
        rows()
            .collect::<Vec<_>>()
            .into_par_iter()
            .map_init(
                || (vec![0f32; c], vec![0f32; c]),
                |buf, (a, b)| {
                    decoded(a, b, buf);
                    buf.0.iter().zip(&buf.1).zip(mu).map(|((&x, &y), &m)| (x as f64 - y as f64) * m).sum()
                },
            )
            .collect()
    } else {
        // stored [in, out]: row i is input channel i
        let mut d = vec![0f64; c];
        let mut buf = (vec![0f32; c], vec![0f32; c]);
        for ((a, b), &m) in rows().zip(mu) {
            decoded(a, b, &mut buf);
            for ((dv, &x), &y) in d.iter_mut().zip(&buf.0).zip(&buf.1) {
                *dv += (x as f64 - y as f64) * m;
            }
        }
        d
    }
}

/// config.json with the plan's flags set.
pub fn rewrite_config(config: &serde_json::Map<String, Value>, plan: &BiasPlan) -> Option<serde_json::Map<String, Value>> {
    if plan.flags.is_empty() {
        return None;
    }
    let mut c = config.clone();
    for f in &plan.flags {
        c.insert((*f).into(), true.into());
    }
    Some(c)
}
