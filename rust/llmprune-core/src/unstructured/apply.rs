//! `apply`: stream a checkpoint shard by shard, tensor by tensor, prune the prunable weights and
//! write a complete output checkpoint. Only one tensor's output buffer is held at a time.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::checkpoint::read_config;
use crate::io::dtype::{decode, encode_into, float_size};
use crate::io::layout::shard_header;
use crate::io::postcheck::check_written;
use crate::pool;
use crate::run::{Run, StatsNeed};
use crate::sidecar::gram::Gram;
use crate::unstructured::allocation::{resolve_targets, schedule_mean_warning, Allocation};
use crate::unstructured::bias_layout::{shard_items, Item};
use crate::unstructured::compensate;
use crate::unstructured::dsnot::DsnotOptions;
use crate::unstructured::kernel::{prune_tensor_with, reconstruct_tensor, Job, Moments};
use crate::unstructured::prunable::resolve_prunable;
use crate::unstructured::score::{channel_factors, Method};
use crate::unstructured::select::{Scope, Target};
use crate::unstructured::sequential::{dsnot_meta, recorded_block_sparsity, sequential_warning};
use crate::unstructured::sparsegpt::{Factor, SparseGptOptions};

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
    let mut signal_checked = std::collections::BTreeSet::new();
    for (name, p) in &prunable {
        let (shard, t) = ckpt.get(name).ok_or_else(|| Error::Internal(format!("{name} resolved but not in the checkpoint")))?;
        if float_size(t.dtype).is_none() {
            return Err(Error::tensor(&shard.path, name, format!("dtype {:?} is not supported for pruning (BF16, F16 and F32 are)", t.dtype)));
        }
        if t.shape.len() != 2 {
            return Err(Error::tensor(&shard.path, name, format!("is {}-D; only 2-D weights are pruned", t.shape.len())));
        }
        if let Target::Pattern { m, .. } = opts.target {
            let cols = t.shape[p.input_axis];
            if cols % m != 0 {
                return Err(Error::tensor(&shard.path, name, format!("{cols} input features are not divisible by M = {m} of the N:M pattern")));
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
                Some(grp) if grp.features == t.shape[p.input_axis] => {
                    if signal_checked.insert(grp.key.clone()) {
                        g.check_signal(&grp.key)?;
                    }
                }
                _ => return Err(Error::gram_mismatch(&g.path, format!("no Gram matrix of the input of {name}"))),
            }
        }
    }
    let recorded = run.sidecar.as_ref().and_then(|s| recorded_block_sparsity(&s.meta, &opts.allocation));
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
        sparsity: match opts.target {
            Target::Sparsity(s) => Some(s),
            _ => None,
        },
        pattern: match opts.target {
            Target::Pattern { .. } => Some(opts.target.describe()),
            _ => None,
        },
        scope: match opts.scope {
            Scope::Row => "row".into(),
            Scope::Layer => "layer".into(),
        },
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
        out.header(shard_header(shard, &provenance, &items)?)?;
        for it in &items {
            match it.source {
                Item::Tensor(t) => {
                    let data = shard.data(t);
                    match prunable.get(&t.name) {
                        Some(p) => {
                            let f = factors[t.name.as_str()].as_deref();
                            let target = targets[t.name.as_str()];
                            let m = if opts.refine.is_some() || plan.is_some_and(|pl| pl.compensated.contains_key(&t.name)) {
                                moments(&t.name)
                            } else {
                                None
                            };
                            let refine = opts.refine.as_ref().filter(|r| r.applies_to(&t.name)).zip(m.as_ref());
                            let job = Job { input_axis: p.input_axis, factors: f, target, refine };
                            let (pruned, sw, delta) = out.fill(|buf| {
                                let (pruned, sw) = match &gram {
                                    Some(g) => pool.install(|| reconstruct_tensor(t, data, &job, opts, g, &mut cached, &mut recon_warnings, buf))?,
                                    None => pool.install(|| prune_tensor_with(t, data, &job, opts.scope, buf))?,
                                };
                                let hint = if gram.is_some() {
                                    "the weight update diverged; check the Gram sidecar (`llmprune stats MODEL --gram`) and --damp"
                                } else {
                                    "this is a bug in llmprune; please report it with the command line"
                                };
                                pool.install(|| check_written(&t.name, t.dtype, buf, Some((t.dtype, data)), Some(hint)))?;
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
                        let input = existing.and_then(|b| run.ckpt.get(&b.name).map(|(bs, _)| (b.dtype, bs.data(b))));
                        check_written(
                            &it.name,
                            it.dtype,
                            buf,
                            input,
                            Some("the bias compensation produced non-finite values; run without --compensate, or recompute the statistics"),
                        )?;
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

/// The Gram sidecar of a run that updates weights, checked.
fn open_gram(run: &Run, opts: &ApplyOptions) -> Result<Gram> {
    if opts.scope == Scope::Layer && opts.method == Method::SparseGpt {
        return Err(Error::arg("--scope layer does not apply to sparsegpt, which chooses its mask block by block"));
    }
    opts.sparsegpt.validate()?;
    let who = if opts.method.needs_gram() { format!("method {}", opts.method.name()) } else { "--update".to_string() };
    run.open_gram(opts.gram.as_deref(), &who)
}
