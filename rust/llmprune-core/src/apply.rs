//! `apply`: stream a checkpoint shard by shard, tensor by tensor, prune the prunable weights and
//! write a complete output checkpoint. Only one tensor's output buffer is held at a time.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;
use serde_json::Value;

use crate::checkpoint::{Checkpoint, Shard, TensorEntry, INDEX_FILE};
use crate::dtype::{decode, decode_into, float_size};
use crate::error::{Error, Result};
use crate::output::{copy_other_files, encode_header, metadata_with_provenance, write_index, StagingDir};
use crate::prunable::{resolve_prunable, Prunable};
use crate::score::{channel_factors, Method};
use crate::select::{mask_matrix, n_m_flags, prune_row, row_scores, Scope, Scratch, Target};
use crate::sidecar::Sidecar;
use crate::writer::ShardWriter;

/// Default location of the stats sidecar inside a model directory; never copied into outputs.
pub const DEFAULT_SIDECAR: &str = "llmprune-stats.safetensors";

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
}

/// Reported after every tensor; returning an error stops the run and removes partial output.
pub struct Progress<'a> {
    pub tensor: &'a str,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub tensors_done: usize,
    pub tensors_total: usize,
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
    pub warnings: Vec<String>,
}

pub fn build_pool(threads: Option<usize>) -> Result<rayon::ThreadPool> {
    let n = threads
        .or_else(|| std::env::var("LLMPRUNE_NUM_THREADS").ok().and_then(|v| v.parse().ok()))
        .unwrap_or(0);
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("llmprune-{i}"))
        .build()
        .map_err(|e| Error::arg(format!("cannot start {n} threads: {e}")))
}

fn stats_path(opts: &ApplyOptions) -> Option<PathBuf> {
    match &opts.stats {
        Some(p) => Some(p.clone()),
        None => {
            let p = opts.model_dir.join(DEFAULT_SIDECAR);
            p.is_file().then_some(p)
        }
    }
}

fn sequential_warning(sidecar: &Sidecar, method: Method, target: Target) -> Option<String> {
    let seq = sidecar.sequential()?;
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
    if their_method != method.name() || theirs != target {
        Some(format!(
            "statistics were taken sequentially with {their_method} at {}; pruning with {} at {} does not reproduce that algorithm",
            theirs.describe(),
            method.name(),
            target.describe()
        ))
    } else {
        None
    }
}

pub fn apply(opts: &ApplyOptions, progress: &mut dyn FnMut(Progress) -> Result<()>) -> Result<ApplySummary> {
    let started = Instant::now();
    opts.target.validate(opts.scope)?;
    let ckpt = Checkpoint::open(&opts.model_dir)?;

    let sidecar = match stats_path(opts) {
        Some(p) if opts.method.needs_stats() || opts.stats.is_some() => Some(Sidecar::open(&p)?),
        _ if opts.method.needs_stats() => {
            return Err(Error::arg(format!(
                "method {} needs activation statistics, and {} has no {DEFAULT_SIDECAR}",
                opts.method.name(),
                opts.model_dir.display(),
            )))
        }
        _ => None,
    };
    let mut warnings = Vec::new();
    if let Some(sc) = &sidecar {
        sc.check_matches(&ckpt)?;
        warnings.extend(sequential_warning(sc, opts.method, opts.target));
    }
    let prunable = resolve_prunable(&ckpt, sidecar.as_ref(), opts)?;
    // Every per-tensor check happens before anything is written.
    let mut factors: BTreeMap<&str, Option<Vec<f32>>> = BTreeMap::new();
    for (name, p) in &prunable {
        let (shard, t) = ckpt.get(name).expect("resolved from the checkpoint");
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
        let stats = sidecar.as_ref().and_then(|s| s.layers.get(name.as_str()));
        factors.insert(name.as_str(), channel_factors(opts.method, name, stats)?);
    }

    let staging = StagingDir::prepare(&opts.model_dir, &opts.out_dir, opts.force)?;
    let pool = build_pool(opts.threads)?;
    let mut summary = ApplySummary {
        out: staging.target().display().to_string(),
        method: opts.method.name().into(),
        sparsity: match opts.target { Target::Sparsity(s) => Some(s), _ => None },
        pattern: match opts.target { Target::Pattern { .. } => Some(opts.target.describe()), _ => None },
        scope: match opts.scope { Scope::Row => "row".into(), Scope::Layer => "layer".into() },
        shards: ckpt.shards.len(),
        tensors_pruned: 0,
        tensors_copied: 0,
        params_pruned: 0,
        params_prunable: 0,
        bytes_written: 0,
        seconds: 0.0,
        threads: pool.current_num_threads(),
        stats: sidecar.as_ref().map(|s| s.path.display().to_string()),
        warnings,
    };
    if opts.check_only {
        summary.seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    }

    let provenance = provenance_json(opts, &ckpt, sidecar.as_ref());
    let bytes_total = ckpt.total_bytes();
    let tensors_total = ckpt.tensors().count();
    let mut bytes_done = 0u64;
    let mut tensors_done = 0usize;
    std::thread::scope(|scope| -> Result<()> {
        let mut writer = ShardWriter::spawn(scope);
        let result = (|| -> Result<()> {
            for shard in &ckpt.shards {
                let out_path = staging.path.join(&shard.file_name);
                if let Some(parent) = out_path.parent() {
                    fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
                }
                writer.open(out_path)?;
                writer.write_owned(shard_header(shard, &provenance)?)?;
                for t in &shard.tensors {
                    let data = shard.data(t);
                    match prunable.get(&t.name) {
                        Some(p) => {
                            let f = factors[t.name.as_str()].as_deref();
                            let mut buf = writer.buffer()?;
                            let pruned = pool.install(|| prune_tensor(t, data, p.input_axis, f, opts, &mut buf))?;
                            writer.write_owned(buf)?;
                            summary.tensors_pruned += 1;
                            summary.params_pruned += pruned;
                            summary.params_prunable += t.numel() as u64;
                        }
                        None => {
                            writer.write_borrowed(data)?;
                            summary.tensors_copied += 1;
                        }
                    }
                    bytes_done += t.nbytes() as u64;
                    tensors_done += 1;
                    progress(Progress { tensor: &t.name, bytes_done, bytes_total, tensors_done, tensors_total })?;
                }
                bytes_done += (8 + shard.header_len) as u64;
            }
            Ok(())
        })();
        let written = writer.finish();
        result?;
        summary.bytes_written = written?;
        Ok(())
    })?;
    if let Some(index) = &ckpt.index {
        let total: u64 = ckpt.tensors().map(|(_, t)| t.nbytes() as u64).sum();
        write_index(index, total, None, &staging.path.join(INDEX_FILE))?;
    }
    copy_other_files(&ckpt, &staging.path, &[])?;
    staging.commit()?;
    summary.seconds = started.elapsed().as_secs_f64();
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
    let es = float_size(t.dtype).expect("checked before writing");
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
    let logical: Vec<f32> = if input_axis == 1 {
        stored
    } else {
        let (r, c) = (t.shape[0], t.shape[1]); // stored [in = r, out = c]
        let mut tr = vec![0f32; r * c];
        tr.par_chunks_mut(r).enumerate().for_each(|(o, dst)| {
            for (i, d) in dst.iter_mut().enumerate() {
                *d = stored[i * c + o];
            }
        });
        tr
    };
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

fn provenance_json(opts: &ApplyOptions, ckpt: &Checkpoint, sidecar: Option<&Sidecar>) -> String {
    let mut p = serde_json::Map::new();
    p.insert("llmprune_version".into(), env!("CARGO_PKG_VERSION").into());
    p.insert("method".into(), opts.method.name().into());
    match opts.target {
        Target::Sparsity(s) => p.insert("sparsity".into(), s.into()),
        Target::Pattern { .. } => p.insert("pattern".into(), opts.target.describe().into()),
    };
    p.insert("scope".into(), if opts.scope == Scope::Row { "row" } else { "layer" }.into());
    p.insert("stats_sha256".into(), sidecar.map(|s| Value::from(s.sha256.clone())).unwrap_or(Value::Null));
    p.insert("source_fingerprint".into(), ckpt.fingerprint().into());
    for (k, v) in &opts.provenance {
        p.insert(k.clone(), v.clone().into());
    }
    Value::Object(p).to_string()
}

/// The shard's header with `llmprune` provenance added to `__metadata__`. Tensor offsets are
/// unchanged: pruning keeps every tensor's size.
fn shard_header(shard: &Shard, provenance: &str) -> Result<Vec<u8>> {
    let tensors = shard.header.iter().filter(|(k, _)| *k != "__metadata__").map(|(k, v)| (k.clone(), v.clone()));
    encode_header(shard, metadata_with_provenance(shard, provenance), tensors)
}

/// Resolved prunable set, re-exported for the bindings.
pub type PrunableSet = BTreeMap<String, Prunable>;
