//! Outputs made of whole input tensors — kept under a new name, dropped, or cut to some of their
//! leading-axis rows — with no value decoded: depth pruning (whole blocks, `depth.rs`) and expert
//! pruning (whole experts and router rows, `experts.rs`). Every tensor's fate is decided before
//! anything is written; this module streams the shards through the run scaffold, writes the new
//! config.json and the index, and renames the output into place.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::checkpoint::{Shard, TensorEntry};
use crate::io::layout::{shard_header, OutTensor};
use crate::io::output::{write_config, StagingDir};
use crate::run::{Progress, Run};

/// What depth or expert pruning decided for one input tensor; `write` turns the fates of a shard's
/// tensors into its output plan.
#[derive(Debug)]
pub enum Fate {
    /// Copied byte for byte under this name.
    Copy(String),
    Drop,
    /// These rows (leading-axis slices, in this order) under this name.
    Rows(String, Vec<usize>),
}

/// `rows` as (first, count) runs of consecutive indices, in order.
fn runs(rows: &[usize]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for &r in rows {
        match out.last_mut() {
            Some((start, len)) if *start + *len == r => *len += 1,
            _ => out.push((r, 1)),
        }
    }
    out
}

/// The `n` indices with the lowest score, ties lower index first; ascending.
pub fn lowest(scores: &[f64], n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    let mut out = order[..n.min(order.len())].to_vec();
    out.sort_unstable();
    out
}

/// Old index → new index of `total` items after `removed` (ascending) are gone.
pub fn renumbering(total: usize, removed: &[usize]) -> Vec<Option<usize>> {
    let mut next = 0;
    (0..total)
        .map(|i| {
            if removed.binary_search(&i).is_ok() {
                None
            } else {
                next += 1;
                Some(next - 1)
            }
        })
        .collect()
}

/// config.json's `llmprune` record (made an object when it is not one), to add this run's entry to
/// while keeping what earlier llmprune runs recorded.
pub fn llmprune_record(config: &mut serde_json::Map<String, Value>) -> &mut serde_json::Map<String, Value> {
    let entry = config.entry("llmprune").or_insert_with(|| Value::Object(Default::default()));
    if !entry.is_object() {
        *entry = Value::Object(Default::default());
    }
    entry.as_object_mut().expect("made an object above")
}

/// Where an output tensor of `write` comes from: an input tensor, whole or some of its leading-axis
/// rows (in this order).
struct Kept<'a> {
    input: &'a TensorEntry,
    rows: Option<&'a [usize]>,
}

/// The output tensors of one shard in file order, from its tensors' fates (dropped ones left out).
fn shard_plan<'a>(shard: &'a Shard, fates: &'a BTreeMap<String, Fate>) -> Result<Vec<OutTensor<Kept<'a>>>> {
    let mut plan = Vec::with_capacity(shard.tensors.len());
    for t in &shard.tensors {
        let fate = fates.get(&t.name).ok_or_else(|| Error::Internal(format!("{} has no planned fate", t.name)))?;
        let (name, rows) = match fate {
            Fate::Drop => continue,
            Fate::Copy(new) => (new, None),
            Fate::Rows(new, rows) => (new, Some(rows.as_slice())),
        };
        let (shape, nbytes) = match rows {
            None => (t.shape.clone(), t.nbytes()),
            Some(rows) => {
                let mut shape = t.shape.clone();
                shape[0] = rows.len();
                (shape, t.nbytes() / t.shape[0] * rows.len())
            }
        };
        plan.push(OutTensor { name: name.clone(), dtype: t.dtype, shape, nbytes, source: Kept { input: t, rows } });
    }
    Ok(plan)
}

/// What `write` wrote.
pub struct Written {
    pub out: PathBuf,
    pub bytes_written: u64,
    pub params_after: u64,
}

/// The shapes of the tensors `write` wrote, by output name: what its postcondition checks.
pub type WrittenShapes = BTreeMap<String, Vec<usize>>;

/// Streams every shard into `staging` as `fates` says (every tensor of the checkpoint has one),
/// checks what was written with `verify` (the postcondition: the counts `config` states must be
/// those of the tensors), writes `config`, the index with its new weight map and the other files,
/// and commits.
pub fn write(
    run: &Run,
    staging: StagingDir,
    progress: &mut dyn FnMut(Progress) -> Result<()>,
    provenance: &str,
    fates: &BTreeMap<String, Fate>,
    config: serde_json::Map<String, Value>,
    verify: &dyn Fn(&WrittenShapes) -> Result<()>,
) -> Result<Written> {
    let mut shapes: WrittenShapes = BTreeMap::new();
    let mut weight_map = BTreeMap::new();
    let (mut params_after, mut tensor_bytes) = (0u64, 0u64);
    let bytes_written = run.write_shards(&staging, progress, |shard, out| {
        let plan = shard_plan(shard, fates)?;
        out.header(shard_header(shard, provenance, &plan)?)?;
        let mut planned = plan.iter().peekable();
        for t in &shard.tensors {
            // a dropped tensor has no entry in the plan: it is only counted as done
            if let Some(e) = planned.next_if(|e| std::ptr::eq(e.source.input, t)) {
                let data = shard.data(t);
                match e.source.rows {
                    None => out.copy(data)?,
                    Some(rows) => {
                        // straight from the map, one write per run of consecutive rows: a fused
                        // expert tensor of gigabytes is never buffered
                        let row = t.nbytes() / t.shape[0];
                        for (start, len) in runs(rows) {
                            out.copy(&data[start * row..(start + len) * row])?;
                        }
                    }
                }
                weight_map.insert(e.name.clone(), shard.file_name.clone());
                shapes.insert(e.name.clone(), e.shape.clone());
                params_after += e.shape.iter().product::<usize>() as u64;
                tensor_bytes += e.nbytes as u64;
            }
            out.done(&t.name, t.nbytes())?;
        }
        Ok(())
    })?;
    verify(&shapes)?;
    write_config(&staging.path, config)?;
    let out = run.finish(staging, tensor_bytes, Some(&weight_map), &["config.json"])?;
    Ok(Written { out, bytes_written, params_after })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_consecutive_rows() {
        assert_eq!(runs(&[0, 1, 2, 5, 6, 9]), vec![(0, 3), (5, 2), (9, 1)]);
        assert_eq!(runs(&[3]), vec![(3, 1)]);
        assert!(runs(&[]).is_empty());
    }

    #[test]
    fn lowest_ties_lower_index_first() {
        assert_eq!(lowest(&[0.5, 0.1, 0.3, 0.1], 2), vec![1, 3]);
        assert_eq!(lowest(&[0.2, 0.2, 0.2], 1), vec![0]);
        // the experts kept by REAP are the complement
        assert_eq!(lowest(&[0.3, 0.1, 0.5, 0.1], 2), vec![1, 3]);
        assert_eq!(lowest(&[1.0, 1.0, 1.0], 1), vec![0]);
    }

    #[test]
    fn renumbers_what_remains() {
        assert_eq!(renumbering(4, &[1, 2]), vec![Some(0), None, None, Some(1)]);
        assert_eq!(renumbering(3, &[]), vec![Some(0), Some(1), Some(2)]);
    }

    #[test]
    fn record_keeps_earlier_entries() {
        let mut c: serde_json::Map<String, Value> = serde_json::from_str(r#"{"llmprune": {"structured": {"x": 1}}}"#).unwrap();
        llmprune_record(&mut c).insert("depth".into(), 2.into());
        assert_eq!(Value::Object(c), serde_json::json!({"llmprune": {"structured": {"x": 1}, "depth": 2}}));
    }
}
