//! Depth pruning: remove whole decoder blocks (`apply --method block-influence`).
//!
//! ShortGPT's Block Influence of block i is BI_i = 1 − mean over the calibration tokens of
//! cos(h_i, h_{i+1}), its input and output hidden states (`stats` sums the cosines per block, before
//! any final norm). The blocks with the lowest BI change the hidden state least and are removed, ties
//! lower index first. The remaining blocks' tensors are renumbered (`layers.7.` → `layers.6.` …)
//! and copied byte for byte, whatever their dtype; config.json gets the new block count
//! (`num_hidden_layers`, or GPT-2's `n_layer`) and every top-level list with one entry per block
//! (e.g. `layer_types`) loses the removed blocks' entries, so stock transformers loads the result.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::blocks::{block_index, block_segment, num_blocks};
use crate::io::checkpoint::read_config;
use crate::io::postcheck::check_count;
use crate::run::{Progress, Run, StatsNeed};
use crate::surgery::remap::{self, llmprune_record, lowest, renumbering, Fate, Written};

/// How many blocks go.
#[derive(Clone, Debug, PartialEq)]
pub enum Removal {
    /// ⌊S · blocks⌋ of the blocks.
    Sparsity(f64),
    Count(usize),
    /// These blocks (original indices), e.g. a schedule found by `llmprune search`; no sidecar needed.
    Blocks(Vec<usize>),
}

#[derive(Clone, Debug)]
pub struct DepthOptions {
    pub model_dir: PathBuf,
    pub out_dir: PathBuf,
    pub removal: Removal,
    pub stats: Option<PathBuf>,
    pub threads: Option<usize>,
    pub force: bool,
    pub provenance: BTreeMap<String, String>,
}

#[derive(Debug, Serialize)]
pub struct DepthSummary {
    pub out: String,
    pub method: String,
    pub blocks_before: usize,
    pub blocks_after: usize,
    /// Original indices of the removed blocks, ascending.
    pub removed_blocks: Vec<usize>,
    /// Block Influence of every original block.
    pub block_influence: Vec<f64>,
    pub params_before: u64,
    pub params_after: u64,
    pub bytes_before: u64,
    pub bytes_written: u64,
    pub shards: usize,
    pub seconds: f64,
    pub stats: Option<String>,
    pub warnings: Vec<String>,
}

/// The config key holding the number of decoder blocks.
const LAYER_COUNT_KEYS: [&str; 3] = ["num_hidden_layers", "n_layer", "num_layers"];

/// `name` with its block index replaced through `map` (None: the block is removed).
pub fn renumber(name: &str, map: &[Option<usize>]) -> Option<String> {
    let parts: Vec<&str> = name.split('.').collect();
    let Some((at, old)) = block_segment(&parts) else { return Some(name.to_string()) };
    let new = map.get(old).copied().flatten()?.to_string();
    let mut out = parts;
    out[at] = &new;
    Some(out.join("."))
}

pub fn apply_depth(opts: &DepthOptions, progress: &mut dyn FnMut(Progress) -> Result<()>) -> Result<DepthSummary> {
    let given = matches!(opts.removal, Removal::Blocks(_));
    let need = (!given).then(|| StatsNeed::activations("method block-influence"));
    let mut run = Run::open(&opts.model_dir, opts.stats.as_deref(), need)?;
    crate::pool::pool(opts.threads)?; // validates --threads; copying needs no workers
    let total = num_blocks(&run.ckpt);
    let influence = match run.sidecar.as_ref() {
        None => Vec::new(),
        Some(sc) => match sc.blocks.as_ref() {
            None if given => Vec::new(),
            None => {
                return Err(Error::arg_hint(
                    format!("{} has no Block Influence sums (block_influence.*), which depth pruning needs", sc.path.display()),
                    "rerun `llmprune stats MODEL`: this version records them in every pass",
                ))
            }
            Some(blocks) if blocks.cos_sum.len() != total => {
                return Err(Error::StatsMismatch {
                    path: sc.path.clone(),
                    msg: format!("Block Influence sums of {} blocks, but the model has {total}", blocks.cos_sum.len()),
                })
            }
            Some(blocks) => blocks.influence(),
        },
    };
    let removed = match &opts.removal {
        Removal::Blocks(list) => given_blocks(list, total)?,
        Removal::Count(n) => lowest(&influence, *n),
        Removal::Sparsity(s) if (0.0..1.0).contains(s) => lowest(&influence, (s * total as f64).floor() as usize),
        Removal::Sparsity(s) => return Err(Error::arg(format!("sparsity must be in [0, 1), got {s}"))),
    };
    let n = removed.len();
    if n == 0 {
        return Err(Error::arg_hint(format!("this removes no block of {total}"), "raise --sparsity, or give --remove-blocks N"));
    }
    if n >= total {
        return Err(Error::arg_hint(format!("removing {n} blocks would leave none of {total}"), format!("remove at most {}", total - 1)));
    }
    let mut config = read_config(&run.ckpt.dir)?;
    let key = LAYER_COUNT_KEYS
        .iter()
        .find(|k| config.get(**k).and_then(Value::as_u64).is_some())
        .ok_or_else(|| Error::checkpoint(&run.ckpt.dir, "config.json names no block count (num_hidden_layers / n_layer)"))?;
    if config.get(*key).and_then(Value::as_u64) != Some(total as u64) {
        return Err(Error::checkpoint(&run.ckpt.dir, format!("config.json's {key} differs from the {total} blocks of the checkpoint")));
    }
    if !given && run.sidecar.as_ref().is_some_and(|sc| sc.sequential().is_some()) {
        run.warnings.push("the Block Influence sums were taken in sequential mode, on a pruned model".into());
    }
    let map = renumbering(total, &removed);
    let keep_listed = |items: &mut Vec<Value>| {
        if total > 1 && items.len() == total {
            *items = items.iter().enumerate().filter(|(b, _)| map[*b].is_some()).map(|(_, x)| x.clone()).collect();
        }
    };
    config.insert((*key).into(), (total - n).into());
    for v in config.values_mut() {
        if let Value::Array(items) = v {
            keep_listed(items);
        }
    }
    let mut prov = serde_json::Map::new();
    prov.insert("method".into(), "block-influence".into());
    prov.insert("removed_blocks".into(), removed.clone().into());
    prov.insert("blocks_chosen_by".into(), if given { "list" } else { "block-influence" }.into());
    prov.insert("blocks_before".into(), total.into());
    // a structured run's per-layer sizes lose the removed blocks' entries too
    let record = llmprune_record(&mut config);
    if let Some(Value::Array(items)) = record.get_mut("structured").and_then(|s| s.get_mut("layers")) {
        keep_listed(items);
    }
    record.insert("depth".into(), Value::Object(prov.clone()));
    let fates = run.ckpt.tensors().map(|(_, t)| (t.name.clone(), renumber(&t.name, &map).map_or(Fate::Drop, Fate::Copy))).collect();
    let params_before: u64 = run.ckpt.tensors().map(|(_, t)| t.numel() as u64).sum();
    let staging = run.stage(&opts.out_dir, opts.force)?;
    let run = run;
    let provenance = run.provenance(prov, &opts.provenance);
    let verify = |shapes: &remap::WrittenShapes| check_blocks_written(shapes, key, total - n);
    let Written { out, bytes_written, params_after } = remap::write(&run, staging, progress, &provenance, &fates, config, &verify)?;
    Ok(DepthSummary {
        out: out.display().to_string(),
        method: "block-influence".into(),
        blocks_before: total,
        blocks_after: total - n,
        removed_blocks: removed,
        block_influence: influence,
        params_before,
        params_after,
        bytes_before: run.ckpt.total_bytes(),
        bytes_written,
        shards: run.ckpt.shards.len(),
        seconds: run.seconds(),
        stats: run.stats_path(),
        warnings: run.warnings.clone(),
    })
}

/// A given list of blocks to remove: indices below `total`, no repeats; returned ascending.
fn given_blocks(list: &[usize], total: usize) -> Result<Vec<usize>> {
    let mut out = list.to_vec();
    out.sort_unstable();
    if let Some(b) = out.iter().find(|&&b| b >= total) {
        return Err(Error::arg_hint(
            format!("block {b} does not exist: the model has {total} blocks (0 to {})", total - 1),
            "list blocks of this model",
        ));
    }
    if let Some(w) = out.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::arg(format!("block {} is listed twice", w[0])));
    }
    Ok(out)
}

/// The postcondition of depth pruning: the blocks written are numbered 0..`says` (config.json's
/// `key`), none missing.
fn check_blocks_written(shapes: &remap::WrittenShapes, key: &str, says: usize) -> Result<()> {
    let blocks: std::collections::BTreeSet<usize> = shapes.keys().filter_map(|n| block_index(n)).collect();
    let next = blocks.iter().next_back().map_or(0, |b| b + 1);
    if let Some(missing) = (0..next).find(|b| !blocks.contains(b)) {
        return Err(Error::postcondition(format!("block {missing}"), "no tensor of this block was written; nothing was written", None));
    }
    check_count(key, "decoder blocks", next, says)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_written_must_be_those_the_config_says() {
        let shapes = |names: &[&str]| names.iter().map(|n| (n.to_string(), vec![2])).collect::<remap::WrittenShapes>();
        let ok = shapes(&["model.layers.0.w", "model.layers.1.w", "model.norm.weight"]);
        assert!(check_blocks_written(&ok, "num_hidden_layers", 2).is_ok());
        let e = check_blocks_written(&ok, "num_hidden_layers", 3).unwrap_err().to_string();
        assert!(e.contains("2 decoder blocks written") && e.contains("says 3"), "{e}");
        let gap = shapes(&["model.layers.0.w", "model.layers.2.w"]);
        assert!(check_blocks_written(&gap, "num_hidden_layers", 3).unwrap_err().to_string().contains("block 1"));
    }

    #[test]
    fn renumbers_kept_blocks() {
        let map = vec![Some(0), None, Some(1)];
        assert_eq!(renumber("model.layers.2.mlp.up_proj.weight", &map).as_deref(), Some("model.layers.1.mlp.up_proj.weight"));
        assert_eq!(renumber("model.layers.1.mlp.up_proj.weight", &map), None);
        assert_eq!(renumber("model.norm.weight", &map).as_deref(), Some("model.norm.weight"));
        assert_eq!(renumber("transformer.h.2.attn.c_attn.weight", &map).as_deref(), Some("transformer.h.1.attn.c_attn.weight"));
    }

    #[test]
    fn given_blocks_are_checked_and_sorted() {
        assert_eq!(given_blocks(&[7, 2, 5], 8).unwrap(), vec![2, 5, 7]);
        assert!(given_blocks(&[8], 8).unwrap_err().to_string().contains("block 8 does not exist"));
        assert!(given_blocks(&[3, 1, 3], 8).unwrap_err().to_string().contains("block 3 is listed twice"));
    }
}
