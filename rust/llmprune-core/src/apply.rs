//! `apply`: stream a checkpoint shard by shard, tensor by tensor, prune the prunable weights and
//! write a complete output checkpoint. Only one tensor's output buffer is held at a time.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rayon::prelude::*;
use serde::Serialize;
use serde_json::Value;

use crate::checkpoint::{Shard, TensorEntry};
use crate::dtype::{decode, decode_into, float_size};
use crate::error::{Error, Result};
use crate::output::{encode_header, metadata_with_provenance};
use crate::pool;
use crate::prunable::{resolve_prunable, Prunable};
use crate::run::{Run, StatsNeed};
use crate::score::{channel_factors, Method};
use crate::select::{mask_matrix, n_m_flags, prune_row, row_scores, Scope, Scratch, Target};
use crate::sidecar::gram::{unpack, Gram};
use crate::sparsegpt::{factor, sparsegpt, Factor, Selection, SparseGptOptions};
use crate::dtype::encode_into;

pub use crate::run::Progress;

#[derive(Clone, Debug)]
pub struct ApplyOptions {
    pub model_dir: PathBuf,
    pub out_dir: PathBuf,
    pub method: Method,
    pub target: Target,
    pub scope: Scope,
    pub stats: Option<PathBuf>,
    pub threads: Option<usize>,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    /// Input axis assumed for weights without a sidecar entry.
    pub default_input_axis: usize,
    pub force: bool,
    /// Extra provenance entries (e.g. the command line).
    pub provenance: BTreeMap<String, String>,
    /// Validate everything, write nothing.
    pub check_only: bool,
    /// After choosing the mask, update the kept weights with SparseGPT's sweep (method sparsegpt
    /// always does; it chooses its mask inside the sweep).
    pub update: bool,
    /// The Gram sidecar (default MODEL/llmprune-gram.safetensors) for sparsegpt and --update.
    pub gram: Option<PathBuf>,
    pub sparsegpt: SparseGptOptions,
}

#[derive(Debug, Serialize)]
pub struct ApplySummary {
    pub out: String,
    pub method: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sparsity: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    pub scope: String,
    pub shards: usize,
    pub tensors_pruned: usize,
    pub tensors_copied: usize,
    pub params_pruned: u64,
    pub params_prunable: u64,
    pub bytes_written: u64,
    pub seconds: f64,
    pub threads: usize,
    pub stats: Option<String>,
    /// The Gram sidecar, when the kept weights were updated (sparsegpt, --update).
    pub gram: Option<String>,
    pub update: bool,
    pub warnings: Vec<String>,
}

/// A warning when statistics taken sequentially (recorded in `meta`) came from another method,
/// target or update setting than this run's, which then does not reproduce that algorithm.
fn sequential_warning(meta: &serde_json::Map<String, Value>, method: Method, target: Target, update: bool) -> Option<String> {
    let seq = crate::sidecar::sequential_of(meta)?;
    let their_method = seq.get("method").and_then(Value::as_str).unwrap_or("?");
    let theirs = match (seq.get("sparsity").and_then(Value::as_f64), seq.get("pattern").and_then(Value::as_str)) {
        (Some(s), _) => Target::Sparsity(s),
        (None, Some(p)) => {
            let mut it = p.split(':').filter_map(|x| x.parse().ok());
            match (it.next(), it.next()) {
                (Some(n), Some(m)) => Target::Pattern { n, m },
                _ => return Some(format!("statistics were taken sequentially with an unreadable pattern {p:?}")),
            }
        }
        _ => return Some("statistics were taken sequentially without a recorded target".into()),
    };
    let their_update = seq.get("update").and_then(Value::as_bool).unwrap_or(false);
    if their_method != method.name() || theirs != target || their_update != update {
        let upd = |u: bool| if u { " with weight updates" } else { "" };
        Some(format!(
            "statistics were taken sequentially with {their_method} at {}{}; pruning with {} at {}{} does not reproduce that algorithm",
            theirs.describe(),
            upd(their_update),
            method.name(),
            target.describe(),
            upd(update)
        ))
    } else {
        None
    }
}

pub fn apply(opts: &ApplyOptions, progress: &mut dyn FnMut(Progress) -> Result<()>) -> Result<ApplySummary> {
    opts.target.validate(opts.scope)?;
    let need = opts.method.needs_stats().then(|| StatsNeed::activations(&format!("method {}", opts.method.name())));
    let mut run = Run::open(&opts.model_dir, opts.stats.as_deref(), need)?;
    let pool = pool::pool(opts.threads)?;
    if let Some(sc) = &run.sidecar {
        run.warnings.extend(sequential_warning(&sc.meta, opts.method, opts.target, opts.update || opts.method.needs_gram()));
    }
    let reconstruct = opts.update || opts.method.needs_gram();
    let gram = if reconstruct { Some(open_gram(&run, opts)?) } else { None };
    if let (Some(g), None) = (&gram, &run.sidecar) {
        run.warnings.extend(sequential_warning(&g.meta, opts.method, opts.target, reconstruct));
    }
    let ckpt = &run.ckpt;
    let prunable = resolve_prunable(ckpt, run.sidecar.as_ref(), &opts.include, &opts.exclude, opts.default_input_axis)?;
    // Every per-tensor check happens before anything is written.
    let mut factors: BTreeMap<String, Option<Vec<f32>>> = BTreeMap::new();
    for (name, p) in &prunable {
        let (shard, t) = ckpt.get(name).ok_or_else(|| Error::Internal(format!("{name} resolved but not in the checkpoint")))?;
        if float_size(t.dtype).is_none() {
            return Err(Error::tensor(&shard.path, name, format!(
                "dtype {:?} is not supported for pruning (BF16, F16 and F32 are)", t.dtype
            )));
        }
        if t.shape.len() != 2 {
            return Err(Error::tensor(&shard.path, name, format!("is {}-D; only 2-D weights are pruned", t.shape.len())));
        }
        if let Target::Pattern { m, .. } = opts.target {
            let cols = t.shape[p.input_axis];
            if cols % m != 0 {
                return Err(Error::tensor(&shard.path, name, format!(
                    "{cols} input features are not divisible by M = {m} of the N:M pattern"
                )));
            }
        }
        let stats = run.sidecar.as_ref().and_then(|s| s.layers.get(name.as_str()));
        factors.insert(name.clone(), channel_factors(opts.method, name, stats)?);
        if let Some(g) = &gram {
            match g.group_of(name) {
                Some(grp) if grp.features == t.shape[p.input_axis] => {}
                _ => {
                    return Err(Error::StatsMismatch {
                        path: g.path.clone(),
                        msg: format!("no Gram matrix of the input of {name}"),
                    })
                }
            }
        }
    }

    let staging = run.stage(&opts.out_dir, opts.force)?;
    let run = run;
    let mut summary = ApplySummary {
        out: staging.target().display().to_string(),
        method: opts.method.name().into(),
        sparsity: match opts.target { Target::Sparsity(s) => Some(s), _ => None },
        pattern: match opts.target { Target::Pattern { .. } => Some(opts.target.describe()), _ => None },
        scope: match opts.scope { Scope::Row => "row".into(), Scope::Layer => "layer".into() },
        shards: run.ckpt.shards.len(),
        tensors_pruned: 0,
        tensors_copied: 0,
        params_pruned: 0,
        params_prunable: 0,
        bytes_written: 0,
        seconds: 0.0,
        threads: pool.current_num_threads(),
        stats: run.stats_path(),
        gram: gram.as_ref().map(|g| g.path.display().to_string()),
        update: reconstruct,
        warnings: run.warnings.clone(),
    };
    if opts.check_only {
        summary.seconds = run.seconds();
        return Ok(summary);
    }

    let provenance = run.provenance(provenance_fields(opts, gram.as_ref()), &opts.provenance);
    // the factor of the last input seen: q/k/v (gate/up) share one and come one after another
    let mut cached: Option<(String, Factor)> = None;
    let mut recon_warnings: Vec<String> = Vec::new();
    summary.bytes_written = run.write_shards(&staging, progress, |shard, out| {
        out.header(shard_header(shard, &provenance)?)?;
        for t in &shard.tensors {
            let data = shard.data(t);
            match prunable.get(&t.name) {
                Some(p) => {
                    let f = factors[t.name.as_str()].as_deref();
                    let pruned = match &gram {
                        Some(g) => out.fill(|buf| {
                            pool.install(|| reconstruct_tensor(t, data, p.input_axis, f, opts, g, &mut cached, &mut recon_warnings, buf))
                        })?,
                        None => out.fill(|buf| pool.install(|| prune_tensor(t, data, p.input_axis, f, opts, buf)))?,
                    };
                    summary.tensors_pruned += 1;
                    summary.params_pruned += pruned;
                    summary.params_prunable += t.numel() as u64;
                }
                None => {
                    out.copy(data)?;
                    summary.tensors_copied += 1;
                }
            }
            out.done(&t.name, t.nbytes())?;
        }
        Ok(())
    })?;
    summary.warnings.extend(recon_warnings);
    let total: u64 = run.ckpt.tensors().map(|(_, t)| t.nbytes() as u64).sum();
    run.finish(staging, total, None, &[])?;
    summary.seconds = run.seconds();
    Ok(summary)
}

/// Prunes one tensor into `out` (resized to the tensor's size); returns the number of entries pruned.
pub fn prune_tensor(
    t: &TensorEntry,
    data: &[u8],
    input_axis: usize,
    factors: Option<&[f32]>,
    opts: &ApplyOptions,
    out: &mut Vec<u8>,
) -> Result<u64> {
    let es = float_size(t.dtype).ok_or_else(|| Error::Internal(format!("{}: dtype checked before writing", t.name)))?;
    let (rows, cols) = if input_axis == 1 { (t.shape[0], t.shape[1]) } else { (t.shape[1], t.shape[0]) };
    if rows == 0 || cols == 0 {
        out.clear();
        out.extend_from_slice(data);
        return Ok(0);
    }
    if input_axis == 1 && (opts.scope == Scope::Row || matches!(opts.target, Target::Pattern { .. })) {
        // Rows are copied from the input map inside the parallel loop; the reused buffer is only
        // resized (zero-filled where it grows), never cleared and refilled on one thread.
        out.resize(data.len(), 0);
        let row_bytes = cols * es;
        if let Target::Pattern { n, m } = opts.target {
            // N:M: zero pruned entries with a branch-free byte mask.
            out.par_chunks_mut(row_bytes).zip(data.par_chunks(row_bytes)).for_each_init(
                || (Vec::new(), Vec::new(), Vec::new()),
                |(weights, scores, flags): &mut (Vec<f32>, Vec<f32>, Vec<u8>), (row, input)| {
                    row.copy_from_slice(input);
                    weights.resize(cols, 0.0);
                    decode_into(t.dtype, row, weights);
                    row_scores(weights, factors, scores);
                    n_m_flags(scores, n, m, flags);
                    match es {
                        2 => zero_flagged::<2>(row, flags),
                        4 => zero_flagged::<4>(row, flags),
                        _ => unreachable!("supported dtypes are 2 or 4 bytes"),
                    }
                },
            );
            return Ok((rows * (cols / m) * n) as u64);
        }
        // Fused path: decode, score, select and zero one row at a time, rows in parallel.
        let counts: u64 = out
            .par_chunks_mut(row_bytes)
            .zip(data.par_chunks(row_bytes))
            .map_init(Scratch::default, |scratch, (row, input)| {
                row.copy_from_slice(input);
                scratch.weights.resize(cols, 0.0);
                decode_into(t.dtype, row, &mut scratch.weights);
                let w = std::mem::take(&mut scratch.weights);
                prune_row(&w, factors, opts.target, scratch);
                scratch.weights = w;
                for &j in &scratch.pruned {
                    let j = j as usize;
                    row[j * es..(j + 1) * es].fill(0);
                }
                scratch.pruned.len() as u64
            })
            .sum();
        return Ok(counts);
    }
    // General path (layer scope or [in, out] storage): score the logical [out, in] matrix.
    out.clear();
    out.extend_from_slice(data);
    let stored = decode(t.dtype, data);
    // stored [in, out] when input_axis is 0
    let logical: Vec<f32> = if input_axis == 1 { stored } else { transpose(&stored, t.shape[0], t.shape[1]) };
    let mask = mask_matrix(&logical, rows, cols, factors, opts.target, opts.scope)?;
    let mut count = 0u64;
    for (li, &m) in mask.iter().enumerate() {
        if m {
            let si = if input_axis == 1 { li } else { (li % cols) * rows + li / cols };
            out[si * es..(si + 1) * es].fill(0);
            count += 1;
        }
    }
    Ok(count)
}

/// ANDs every element (of ES bytes) of `row` with its keep mask (`KEEP` or 0).
#[inline]
fn zero_flagged<const ES: usize>(row: &mut [u8], keep: &[u8]) {
    for (elem, &k) in row.chunks_exact_mut(ES).zip(keep) {
        for b in elem.iter_mut() {
            *b &= k;
        }
    }
}

fn provenance_fields(opts: &ApplyOptions, gram: Option<&Gram>) -> serde_json::Map<String, Value> {
    let mut p = serde_json::Map::new();
    if let Some(g) = gram {
        p.insert("update".into(), "sparsegpt".into());
        p.insert("damp".into(), opts.sparsegpt.damp.into());
        p.insert("blocksize".into(), opts.sparsegpt.blocksize.into());
        p.insert("gram_calibration".into(), g.meta.get("calibration").cloned().unwrap_or(Value::Null));
    }
    p.insert("method".into(), opts.method.name().into());
    match opts.target {
        Target::Sparsity(s) => p.insert("sparsity".into(), s.into()),
        Target::Pattern { .. } => p.insert("pattern".into(), opts.target.describe().into()),
    };
    p.insert("scope".into(), if opts.scope == Scope::Row { "row" } else { "layer" }.into());
    p
}

/// The shard's header with `llmprune` provenance added to `__metadata__`. Tensor offsets are
/// unchanged: pruning keeps every tensor's size.
fn shard_header(shard: &Shard, provenance: &str) -> Result<Vec<u8>> {
    let tensors = shard.header.iter().filter(|(k, _)| *k != "__metadata__").map(|(k, v)| (k.clone(), v.clone()));
    encode_header(shard, metadata_with_provenance(shard, provenance), tensors)
}

/// Resolved prunable set, re-exported for the bindings.
pub type PrunableSet = BTreeMap<String, Prunable>;

/// The Gram sidecar of a run that updates weights, checked.
fn open_gram(run: &Run, opts: &ApplyOptions) -> Result<Gram> {
    if opts.scope == Scope::Layer && opts.method == Method::SparseGpt {
        return Err(Error::arg("--scope layer does not apply to sparsegpt, which chooses its mask block by block"));
    }
    opts.sparsegpt.validate()?;
    let who = if opts.method.needs_gram() { format!("method {}", opts.method.name()) } else { "--update".to_string() };
    run.open_gram(opts.gram.as_deref(), &who)
}

/// Prunes one tensor and updates its kept weights with the SparseGPT sweep on its input's Gram
/// matrix; writes the tensor in its dtype into `out`, returns the number of entries pruned.
#[allow(clippy::too_many_arguments)]
fn reconstruct_tensor(
    t: &TensorEntry,
    data: &[u8],
    input_axis: usize,
    factors: Option<&[f32]>,
    opts: &ApplyOptions,
    gram: &Gram,
    cached: &mut Option<(String, Factor)>,
    warnings: &mut Vec<String>,
    out: &mut Vec<u8>,
) -> Result<u64> {
    let (rows, cols) = if input_axis == 1 { (t.shape[0], t.shape[1]) } else { (t.shape[1], t.shape[0]) };
    if rows == 0 || cols == 0 {
        out.clear();
        out.extend_from_slice(data);
        return Ok(0);
    }
    let stored = decode(t.dtype, data);
    let mut w: Vec<f32> = if input_axis == 1 { stored } else { transpose(&stored, t.shape[0], t.shape[1]) };
    let group = gram.group_of(&t.name).ok_or_else(|| Error::Internal(format!("{}: checked before writing", t.name)))?;
    if cached.as_ref().map(|(k, _)| k.as_str()) != Some(group.key.as_str()) {
        cached.take();
        let n = group.features;
        let f = factor(&t.name, n, || gram.packed(&group.key).map(|(p, _)| unpack(&p, n)), opts.sparsegpt.damp, crate::sparsegpt::current_par())?;
        warnings.extend(f.warnings.iter().cloned());
        *cached = Some((group.key.clone(), f));
    }
    let f = &cached.as_ref().expect("just set").1;
    let fixed;
    let sel = if opts.method == Method::SparseGpt {
        Selection::Target(opts.target)
    } else {
        fixed = mask_matrix(&w, rows, cols, factors, opts.target, opts.scope)?;
        Selection::Fixed(&fixed)
    };
    let mask = sparsegpt(&mut w, rows, cols, f, sel, opts.sparsegpt, crate::sparsegpt::current_par())?;
    let stored = if input_axis == 1 { w } else { transpose(&w, rows, cols) };
    encode_into(t.dtype, &stored, out);
    Ok(mask.iter().filter(|&&m| m).count() as u64)
}

/// The transpose of a row-major [r, c] matrix.
fn transpose(m: &[f32], r: usize, c: usize) -> Vec<f32> {
    let mut tr = vec![0f32; r * c];
    tr.par_chunks_mut(r).enumerate().for_each(|(o, dst)| {
        for (i, d) in dst.iter_mut().enumerate() {
            *d = m[i * c + o];
        }
    });
    tr
}
