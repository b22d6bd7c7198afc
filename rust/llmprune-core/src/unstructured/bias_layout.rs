//! The output layout of unstructured `apply`: every shard's tensors in order, and with
//! `--compensate` each compensated weight's bias (its own, or an added one) right after it.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::io::checkpoint::{Checkpoint, Shard, TensorEntry};
use crate::io::layout::OutTensor;
use crate::unstructured::compensate::{BiasPlan, BiasSource};

/// Where an output tensor of `apply` comes from.
pub enum Item<'a> {
    /// An input tensor, pruned when it is a prunable weight, else copied.
    Tensor(&'a TensorEntry),
    /// A compensated (or zero) bias written after its weight, or in its own place when its
    /// weight was in an earlier shard.
    Bias { weight: &'a str, existing: Option<&'a TensorEntry> },
}

/// The output tensors of one shard in order: the input's, with each compensated weight's bias
/// (its own, or an added one) right after it.
pub fn shard_items<'a>(ckpt: &'a Checkpoint, shard: &'a Shard, plan: Option<&'a BiasPlan>) -> Result<Vec<OutTensor<Item<'a>>>> {
    let mut items = Vec::with_capacity(shard.tensors.len());
    let plain =
        |t: &'a TensorEntry| OutTensor { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone(), nbytes: t.nbytes(), source: Item::Tensor(t) };
    let Some(plan) = plan else {
        items.extend(shard.tensors.iter().map(plain));
        return Ok(items);
    };
    let here = ckpt.shard_of(&shard.tensors.first().map(|t| t.name.clone()).unwrap_or_default());
    // existing biases of compensated weights -> their weight
    let owner: BTreeMap<&str, &str> = plan
        .compensated
        .iter()
        .filter_map(|(w, s)| match s {
            BiasSource::Existing(b) => Some((b.as_str(), w.as_str())),
            BiasSource::Added => None,
        })
        .collect();
    for t in &shard.tensors {
        if let Some(&w) = owner.get(t.name.as_str()) {
            if ckpt.shard_of(w) == here {
                continue; // written right after its weight
            }
            items.push(OutTensor { source: Item::Bias { weight: w, existing: Some(t) }, ..plain(t) });
            continue;
        }
        items.push(plain(t));
        let rows = || t.shape.first().copied().unwrap_or(0);
        match plan.compensated.get(&t.name) {
            Some(BiasSource::Existing(b)) if ckpt.shard_of(b) == here => {
                let (_, bt) = ckpt.get(b).ok_or_else(|| Error::Internal(format!("{b} planned but missing")))?;
                items.push(OutTensor { source: Item::Bias { weight: &t.name, existing: Some(bt) }, ..plain(bt) });
            }
            // written in its own place, in its own shard
            Some(BiasSource::Existing(_)) => {}
            Some(BiasSource::Added) => items.push(added_bias(t, rows())),
            None if plan.zero_added.contains(&t.name) => items.push(added_bias(t, rows())),
            None => {}
        }
    }
    Ok(items)
}

fn added_bias(t: &TensorEntry, rows: usize) -> OutTensor<Item<'_>> {
    let es = t.dtype.bitsize() / 8;
    OutTensor {
        name: BiasPlan::bias_name(&t.name),
        dtype: t.dtype,
        shape: vec![rows],
        nbytes: rows * es,
        source: Item::Bias { weight: &t.name, existing: None },
    }
}
