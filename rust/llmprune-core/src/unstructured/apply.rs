//! `apply`: stream a checkpoint shard by shard, tensor by tensor, prune the prunable weights and
//! write a complete output checkpoint. Only one tensor's output buffer is held at a time.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rayon::prelude::*;
use serde::Serialize;
use serde_json::Value;

use crate::unstructured::allocation::{resolve_targets, schedule_mean_warning, Allocation};
use crate::io::checkpoint::{read_config, Checkpoint, Shard, TensorEntry};
use crate::unstructured::compensate::{self, BiasPlan, BiasSource};
use crate::unstructured::dsnot::{self, DsnotOptions};
use crate::io::dtype::{decode, decode_into, float_size};
use crate::error::{Error, Result};
use crate::io::output::{encode_header, layout_header, metadata_with_provenance};
use crate::pool;
use crate::unstructured::prunable::{resolve_prunable, Prunable};
use crate::run::{Run, StatsNeed};
use crate::unstructured::score::{channel_factors, Method};
use crate::unstructured::select::{mask_matrix, n_m_flags, prune_row, row_scores, Scope, Scratch, Target};
use crate::sidecar::gram::{unpack, Gram};
use crate::unstructured::sparsegpt::{factor, sparsegpt, Factor, Selection, SparseGptOptions};
use crate::io::dtype::encode_into;

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
    /// Per-block sparsity: uniform, OWL, or a schedule (`unstructured::allocation`).
    pub allocation: Allocation,
    /// Refine each mask with DSnoT before it is applied (`unstructured::dsnot`).
    pub refine: Option<DsnotOptions>,
    /// Fold what pruning removed into the output biases (`unstructured::compensate`).
    pub compensate: bool,
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
    /// uniform, owl or schedule.
    pub allocation: String,
    /// The sparsity of every decoder block (OWL or a schedule).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_sparsity: Option<Vec<f64>>,
    /// "dsnot" when masks were refined.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refine: Option<String>,
    /// Prune-and-grow swaps DSnoT made, over all rows.
    pub dsnot_swaps: u64,
    pub compensate: bool,
    /// Weights whose output bias absorbed what pruning removed.
    pub biases_compensated: usize,
    /// Bias parameters the output has that the input had not (compensation).
    pub bias_params_added: u64,
    pub warnings: Vec<String>,
}

/// What this run's settings are called in sequential metadata, for comparing with a sidecar's.
fn run_settings(opts: &ApplyOptions, update: bool) -> String {
    let upd = if update { " with weight updates" } else { "" };
    let alloc = match &opts.allocation {
        Allocation::Uniform => String::new(),
        a => format!(", {} allocation", a.name()),
    };
    let refine = if opts.refine.is_some() { ", DSnoT" } else { "" };
    let comp = if opts.compensate { ", bias compensation" } else { "" };
    format!("{} at {}{upd}{alloc}{refine}{comp}", opts.method.name(), opts.target.describe())
}

/// A warning when statistics taken sequentially (recorded in `meta`) came from another method,
/// target, update, allocation, refinement or compensation than this run's, which then does not reproduce that
/// algorithm.
fn sequential_warning(meta: &serde_json::Map<String, Value>, opts: &ApplyOptions, update: bool) -> Option<String> {
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
    let their_alloc = seq.get("allocation").and_then(Value::as_str).unwrap_or("uniform");
    let their_owl = (seq.get("owl_m").and_then(Value::as_f64), seq.get("owl_lambda").and_then(Value::as_f64));
    let alloc_same = match &opts.allocation {
        Allocation::Uniform => their_alloc == "uniform",
        Allocation::Owl { m, lambda } => their_alloc == "owl" && their_owl == (Some(*m), Some(*lambda)),
        Allocation::Schedule(v) => their_alloc == "schedule" && recorded_block_sparsity(seq).as_deref() == Some(v.as_slice()),
    };
    let their_refine = seq.get("refine").and_then(Value::as_str);
    let refine_same = match &opts.refine {
        None => their_refine.is_none(),
        Some(r) => their_refine == Some("dsnot") && seq.get("dsnot") == Some(&dsnot_meta(r)),
    };
    let their_comp = seq.get("compensate").and_then(Value::as_bool).unwrap_or(false);
    if their_method != opts.method.name() || theirs != opts.target || their_update != update || !alloc_same || !refine_same || their_comp != opts.compensate {
        let upd = if their_update { " with weight updates" } else { "" };
        let alloc = if their_alloc == "uniform" { String::new() } else { format!(", {their_alloc} allocation") };
        let refine = if their_refine.is_some() { ", DSnoT" } else { "" };
        let comp = if their_comp { ", bias compensation" } else { "" };
        Some(format!(
            "statistics were taken sequentially with {their_method} at {}{upd}{alloc}{refine}{comp}; pruning with {} does not reproduce that algorithm",
            theirs.describe(),
            run_settings(opts, update)
        ))
    } else {
        None
    }
}

fn recorded_block_sparsity(seq: &serde_json::Map<String, Value>) -> Option<Vec<f64>> {
    seq.get("block_sparsity")?.as_array()?.iter().map(Value::as_f64).collect()
}

/// DSnoT's settings as recorded in provenance and sequential metadata.
pub fn dsnot_meta(r: &DsnotOptions) -> Value {
    let mut m = serde_json::json!({"iters": r.iters, "threshold": r.threshold, "skip": r.skip.name()});
    if r.same_sign {
        m["same_sign"] = true.into();
    }
    m
}

/// What needs the stats sidecar in this run, if anything.
fn stats_need(opts: &ApplyOptions) -> Option<StatsNeed> {
    let who = if opts.method.needs_stats() {
        format!("method {}", opts.method.name())
    } else if matches!(opts.allocation, Allocation::Owl { .. }) {
        "--allocation owl".into()
    } else if opts.refine.is_some() {
        "--refine dsnot".into()
    } else if opts.compensate {
        "--compensate".into()
    } else {
        return None;
    };
    Some(StatsNeed::activations(&who))
}

fn check_refine(opts: &ApplyOptions) -> Result<()> {
    let Some(r) = &opts.refine else { return Ok(()) };
    r.validate()?;
    if opts.scope == Scope::Layer {
        return Err(Error::arg("--refine dsnot works row by row; it does not apply to --scope layer"));
    }
    if opts.method == Method::SparseGpt {
        return Err(Error::arg_hint(
            "--refine dsnot cannot refine sparsegpt, which chooses its mask inside the weight update",
            "refine another method's mask and update it: --method wanda --refine dsnot --update",
        ));
    }
    Ok(())
}

/// Mean and variance of a weight's input channels, for DSnoT and compensation.
struct Moments {
    mu: Vec<f64>,
    var: Vec<f64>,
}

pub fn apply(opts: &ApplyOptions, progress: &mut dyn FnMut(Progress) -> Result<()>) -> Result<ApplySummary> {
    opts.target.validate(opts.scope)?;
    opts.allocation.validate(opts.target)?;
    check_refine(opts)?;
    let mut run = Run::open(&opts.model_dir, opts.stats.as_deref(), stats_need(opts))?;
    let pool = pool::pool(opts.threads)?;
    let reconstruct = opts.update || opts.method.needs_gram();
    if let Some(sc) = &run.sidecar {
        run.warnings.extend(sequential_warning(&sc.meta, opts, reconstruct));
    }
    let gram = if reconstruct { Some(open_gram(&run, opts)?) } else { None };
    if let (Some(g), None) = (&gram, &run.sidecar) {
        run.warnings.extend(sequential_warning(&g.meta, opts, reconstruct));
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
        if (opts.refine.is_some() || opts.compensate) && stats.is_none() {
            let path = run.sidecar.as_ref().map(|s| s.path.clone()).unwrap_or_default();
            return Err(Error::StatsMismatch { path, msg: format!("no activation statistics for {name}, which --refine / --compensate need") });
        }
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
    let recorded = run
        .sidecar
        .as_ref()
        .and_then(|s| crate::sidecar::sequential_of(&s.meta))
        .filter(|seq| seq.get("allocation").and_then(Value::as_str) == Some(opts.allocation.name()))
        .and_then(recorded_block_sparsity);
    let (targets, block_sparsity) =
        pool.install(|| resolve_targets(ckpt, &prunable, run.sidecar.as_ref().map(|s| &s.layers), opts.target, &opts.allocation, recorded))?;
    if let (Allocation::Schedule(v), Target::Sparsity(s)) = (&opts.allocation, opts.target) {
        run.warnings.extend(schedule_mean_warning(v, s));
    }
    let bias_plan = if opts.compensate {
        let config = read_config(&ckpt.dir)?;
        let plan = compensate::plan(ckpt, &config, &prunable)?;
        if !plan.skipped.is_empty() {
            run.warnings.push(format!(
                "{} pruned weights have no bias in this architecture and are not compensated (e.g. {})",
                plan.skipped.len(),
                plan.skipped[0]
            ));
        }
        Some((plan, config))
    } else {
        None
    };

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
        allocation: opts.allocation.name().into(),
        block_sparsity: block_sparsity.clone(),
        refine: opts.refine.map(|_| "dsnot".into()),
        dsnot_swaps: 0,
        compensate: opts.compensate,
        biases_compensated: bias_plan.as_ref().map_or(0, |(p, _)| p.compensated.len()),
        bias_params_added: 0,
        warnings: run.warnings.clone(),
    };
    if opts.check_only {
        summary.seconds = run.seconds();
        return Ok(summary);
    }

    let mut fields = provenance_fields(opts, gram.as_ref());
    if let Some(b) = &block_sparsity {
        fields.extend(opts.allocation.describe());
        fields.insert("block_sparsity".into(), b.clone().into());
    }
    if let Some(r) = &opts.refine {
        fields.insert("refine".into(), "dsnot".into());
        fields.insert("dsnot".into(), dsnot_meta(r));
    }
    if opts.compensate {
        fields.insert("compensate".into(), true.into());
    }
    let provenance = run.provenance(fields, &opts.provenance);
    let moments = |name: &str| -> Option<Moments> {
        let s = run.sidecar.as_ref()?.layers.get(name)?;
        Some(Moments { mu: s.means(), var: s.variances() })
    };
    // the factor of the last input seen: q/k/v (gate/up) share one and come one after another
    let mut cached: Option<(String, Factor)> = None;
    let mut recon_warnings: Vec<String> = Vec::new();
    let plan = bias_plan.as_ref().map(|(p, _)| p);
    // compensated weights' bias deltas, until their bias is written
    let mut deltas: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut weight_map: BTreeMap<String, String> = BTreeMap::new();
    let mut tensor_bytes = 0u64;
    let mut swaps = 0u64;
    summary.bytes_written = run.write_shards(&staging, progress, |shard, out| {
        let items = shard_items(&run.ckpt, shard, plan)?;
        for it in &items {
            weight_map.insert(it.name.clone(), shard.file_name.clone());
            tensor_bytes += it.nbytes as u64;
        }
        let header = match plan {
            None => shard_header(shard, &provenance)?,
            Some(_) => {
                let layout: Vec<_> = items.iter().map(|i| (i.name.clone(), i.dtype, i.shape.clone(), i.nbytes)).collect();
                layout_header(shard, &provenance, &layout)?
            }
        };
        out.header(header)?;
        for it in &items {
            match it.kind {
                Item::Tensor(t) => {
                    let data = shard.data(t);
                    match prunable.get(&t.name) {
                        Some(p) => {
                            let f = factors[t.name.as_str()].as_deref();
                            let target = targets[t.name.as_str()];
                            let m = if opts.refine.is_some() || plan.is_some_and(|pl| pl.compensated.contains_key(&t.name)) { moments(&t.name) } else { None };
                            let refine = opts.refine.as_ref().filter(|r| r.applies_to(&t.name)).zip(m.as_ref());
                            let job = Job { input_axis: p.input_axis, factors: f, target, refine };
                            let (pruned, sw, delta) = out.fill(|buf| {
                                let (pruned, sw) = match &gram {
                                    Some(g) => pool.install(|| reconstruct_tensor(t, data, &job, opts, g, &mut cached, &mut recon_warnings, buf))?,
                                    None => pool.install(|| prune_tensor_with(t, data, &job, opts.scope, buf))?,
                                };
                                let delta = match (plan, &m) {
                                    (Some(pl), Some(m)) if pl.compensated.contains_key(&t.name) => {
                                        Some(pool.install(|| compensate::bias_delta(t, data, buf, p.input_axis, &m.mu)))
                                    }
                                    _ => None,
                                };
                                Ok((pruned, sw, delta))
                            })?;
                            if let Some(d) = delta {
                                deltas.insert(t.name.clone(), d);
                            }
                            summary.tensors_pruned += 1;
                            summary.params_pruned += pruned;
                            summary.params_prunable += t.numel() as u64;
                            swaps += sw;
                        }
                        None => {
                            out.copy(data)?;
                            summary.tensors_copied += 1;
                        }
                    }
                    out.done(&t.name, t.nbytes())?;
                }
                Item::Bias { weight, existing } => {
                    let delta = deltas.remove(weight);
                    let rows = it.shape[0];
                    let mut values: Vec<f64> = match existing {
                        Some(b) => {
                            let (bs, _) = run.ckpt.get(&b.name).ok_or_else(|| Error::Internal(format!("{} planned but missing", b.name)))?;
                            decode(b.dtype, bs.data(b)).into_iter().map(f64::from).collect()
                        }
                        None => {
                            summary.bias_params_added += rows as u64;
                            vec![0.0; rows]
                        }
                    };
                    if let Some(d) = delta {
                        for (v, dv) in values.iter_mut().zip(d) {
                            *v += dv;
                        }
                    }
                    let v32: Vec<f32> = values.iter().map(|&x| x as f32).collect();
                    out.fill(|buf| {
                        encode_into(it.dtype, &v32, buf);
                        Ok(())
                    })?;
                    if let Some(b) = existing {
                        out.done(&b.name, b.nbytes())?;
                    }
                }
            }
        }
        Ok(())
    })?;
    summary.warnings.extend(recon_warnings);
    summary.dsnot_swaps = swaps;
    let (map, rewritten): (Option<&BTreeMap<String, String>>, Vec<&str>) = match &bias_plan {
        Some((p, config)) => {
            if let Some(c) = compensate::rewrite_config(config, p) {
                crate::io::output::write_config(&staging.path, c)?;
                (Some(&weight_map), vec!["config.json"])
            } else {
                (None, vec![])
            }
        }
        None => (None, vec![]),
    };
    run.finish(staging, tensor_bytes, map, &rewritten)?;
    summary.seconds = run.seconds();
    Ok(summary)
}

/// How one weight is pruned.
pub struct Job<'a> {
    pub input_axis: usize,
    /// Per-input-channel score factor (None: magnitude).
    pub factors: Option<&'a [f32]>,
    pub target: Target,
    refine: Option<(&'a DsnotOptions, &'a Moments)>,
}

impl<'a> Job<'a> {
    /// A job without refinement.
    pub fn plain(input_axis: usize, factors: Option<&'a [f32]>, target: Target) -> Job<'a> {
        Job { input_axis, factors, target, refine: None }
    }
}

enum Item<'a> {
    Tensor(&'a TensorEntry),
    /// A compensated (or zero) bias written after its weight, or in its own place when its
    /// weight was in an earlier shard.
    Bias { weight: &'a str, existing: Option<&'a TensorEntry> },
}

struct OutItem<'a> {
    name: String,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    nbytes: usize,
    kind: Item<'a>,
}

/// The output tensors of one shard in order: the input's, with each compensated weight's bias
/// (its own, or an added one) right after it.
fn shard_items<'a>(ckpt: &'a Checkpoint, shard: &'a Shard, plan: Option<&'a BiasPlan>) -> Result<Vec<OutItem<'a>>> {
    let mut items = Vec::with_capacity(shard.tensors.len());
    let plain = |t: &'a TensorEntry| OutItem { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone(), nbytes: t.nbytes(), kind: Item::Tensor(t) };
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
            items.push(OutItem { kind: Item::Bias { weight: w, existing: Some(t) }, ..plain(t) });
            continue;
        }
        items.push(plain(t));
        let rows = || t.shape.first().copied().unwrap_or(0);
        match plan.compensated.get(&t.name) {
            Some(BiasSource::Existing(b)) => {
                if ckpt.shard_of(b) == here {
                    let (_, bt) = ckpt.get(b).ok_or_else(|| Error::Internal(format!("{b} planned but missing")))?;
                    items.push(OutItem { kind: Item::Bias { weight: &t.name, existing: Some(bt) }, ..plain(bt) });
                }
            }
            Some(BiasSource::Added) => items.push(added_bias(t, rows())),
            None if plan.zero_added.contains(&t.name) => items.push(added_bias(t, rows())),
            None => {}
        }
    }
    Ok(items)
}

fn added_bias(t: &TensorEntry, rows: usize) -> OutItem<'_> {
    let es = t.dtype.bitsize() / 8;
    OutItem {
        name: BiasPlan::bias_name(&t.name),
        dtype: t.dtype,
        shape: vec![rows],
        nbytes: rows * es,
        kind: Item::Bias { weight: &t.name, existing: None },
    }
}

/// Prunes one tensor into `out` (resized to the tensor's size) with `opts`' target and scope;
/// returns the number of entries pruned.
pub fn prune_tensor(
    t: &TensorEntry,
    data: &[u8],
    input_axis: usize,
    factors: Option<&[f32]>,
    opts: &ApplyOptions,
    out: &mut Vec<u8>,
) -> Result<u64> {
    prune_tensor_with(t, data, &Job::plain(input_axis, factors, opts.target), opts.scope, out).map(|r| r.0)
}

/// Prunes one tensor into `out` as `job` says; returns the entries pruned and DSnoT's swaps.
pub fn prune_tensor_with(t: &TensorEntry, data: &[u8], job: &Job, scope: Scope, out: &mut Vec<u8>) -> Result<(u64, u64)> {
    let es = float_size(t.dtype).ok_or_else(|| Error::Internal(format!("{}: dtype checked before writing", t.name)))?;
    let (input_axis, factors, target) = (job.input_axis, job.factors, job.target);
    let (rows, cols) = if input_axis == 1 { (t.shape[0], t.shape[1]) } else { (t.shape[1], t.shape[0]) };
    if rows == 0 || cols == 0 {
        out.clear();
        out.extend_from_slice(data);
        return Ok((0, 0));
    }
    if input_axis == 1 && job.refine.is_none() && (scope == Scope::Row || matches!(target, Target::Pattern { .. })) {
        // Rows are copied from the input map inside the parallel loop; the reused buffer is only
        // resized (zero-filled where it grows), never cleared and refilled on one thread.
        out.resize(data.len(), 0);
        let row_bytes = cols * es;
        if let Target::Pattern { n, m } = target {
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
            return Ok(((rows * (cols / m) * n) as u64, 0));
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
                prune_row(&w, factors, target, scratch);
                scratch.weights = w;
                for &j in &scratch.pruned {
                    let j = j as usize;
                    row[j * es..(j + 1) * es].fill(0);
                }
                scratch.pruned.len() as u64
            })
            .sum();
        return Ok((counts, 0));
    }
    // General path (layer scope, [in, out] storage or DSnoT): mask the logical [out, in] matrix.
    out.clear();
    out.extend_from_slice(data);
    let stored = decode(t.dtype, data);
    // stored [in, out] when input_axis is 0
    let logical: Vec<f32> = if input_axis == 1 { stored } else { transpose(&stored, t.shape[0], t.shape[1]) };
    let (mask, swaps) = job.mask(&logical, rows, cols, scope)?;
    let mut count = 0u64;
    for (li, &m) in mask.iter().enumerate() {
        if m {
            let si = if input_axis == 1 { li } else { (li % cols) * rows + li / cols };
            out[si * es..(si + 1) * es].fill(0);
            count += 1;
        }
    }
    Ok((count, swaps))
}

impl Job<'_> {
    /// The mask of the logical [rows, cols] weight `w` (true = pruned), refined by DSnoT when
    /// asked; returns it with DSnoT's swaps.
    fn mask(&self, w: &[f32], rows: usize, cols: usize, scope: Scope) -> Result<(Vec<bool>, u64)> {
        let mut mask = mask_matrix(w, rows, cols, self.factors, self.target, scope)?;
        let swaps = match self.refine {
            Some((r, m)) => dsnot::refine(w, rows, cols, self.factors, &m.mu, &m.var, &mut mask, r, self.target.group()) as u64,
            None => 0,
        };
        Ok((mask, swaps))
    }
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
/// matrix; writes the tensor in its dtype into `out`, returns the entries pruned and DSnoT's swaps.
#[allow(clippy::too_many_arguments)]
fn reconstruct_tensor(
    t: &TensorEntry,
    data: &[u8],
    job: &Job,
    opts: &ApplyOptions,
    gram: &Gram,
    cached: &mut Option<(String, Factor)>,
    warnings: &mut Vec<String>,
    out: &mut Vec<u8>,
) -> Result<(u64, u64)> {
    let input_axis = job.input_axis;
    let (rows, cols) = if input_axis == 1 { (t.shape[0], t.shape[1]) } else { (t.shape[1], t.shape[0]) };
    if rows == 0 || cols == 0 {
        out.clear();
        out.extend_from_slice(data);
        return Ok((0, 0));
    }
    let stored = decode(t.dtype, data);
    let mut w: Vec<f32> = if input_axis == 1 { stored } else { transpose(&stored, t.shape[0], t.shape[1]) };
    let group = gram.group_of(&t.name).ok_or_else(|| Error::Internal(format!("{}: checked before writing", t.name)))?;
    if cached.as_ref().map(|(k, _)| k.as_str()) != Some(group.key.as_str()) {
        cached.take();
        let n = group.features;
        let f = factor(&t.name, n, || gram.packed(&group.key).map(|(p, _)| unpack(&p, n)), opts.sparsegpt.damp, crate::unstructured::sparsegpt::current_par())?;
        warnings.extend(f.warnings.iter().cloned());
        *cached = Some((group.key.clone(), f));
    }
    let f = &cached.as_ref().expect("just set").1;
    let (fixed, swaps);
    let sel = if opts.method == Method::SparseGpt {
        swaps = 0;
        Selection::Target(job.target)
    } else {
        (fixed, swaps) = job.mask(&w, rows, cols, opts.scope)?;
        Selection::Fixed(&fixed)
    };
    let mask = sparsegpt(&mut w, rows, cols, f, sel, opts.sparsegpt, crate::unstructured::sparsegpt::current_par())?;
    let stored = if input_axis == 1 { w } else { transpose(&w, rows, cols) };
    encode_into(t.dtype, &stored, out);
    Ok((mask.iter().filter(|&&m| m).count() as u64, swaps))
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
