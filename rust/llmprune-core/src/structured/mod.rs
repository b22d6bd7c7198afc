//! Structured pruning: remove whole attention groups (a key/value head with its query heads) and
//! MLP channels, and write a physically smaller checkpoint.
//!
//! Phases: group rules from config.json and the tensor shapes (`arch`), one score per group
//! (`metric`), the kept groups of every layer (`plan`), then a streaming pass that writes every
//! tensor copied, sliced or with its bias compensated (`slice`), new shard headers with new
//! offsets, the index, and a rewritten config.json (`config`). Only one output tensor is held in
//! memory at a time, as in unstructured `apply`.

pub mod arch;
pub mod config;
pub mod hywia;
pub mod metric;
pub mod plan;
pub mod refit;
pub mod slice;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::checkpoint::{Checkpoint, Shard};
use crate::io::dtype::float_size;
use crate::io::layout::{shard_header, OutTensor};
use crate::io::postcheck::{check_written, scan};
use crate::pool;
use crate::run::{Progress, Run, StatsNeed};
use crate::sidecar::SequentialSettings;

pub use arch::{Family, Rules};
pub use config::LayerShape;
pub use hywia::{Fusion, HywiaOptions, LayerFusion, Taylor};
pub use metric::{LayerScores, StructMethod};
pub use plan::{GroupAllocation, LayerBudget, LayerPlan, WIDTH_MULTIPLE};

use slice::{new_shape, slice_into, Edits, Op};

#[derive(Clone, Debug)]
pub struct StructuredOptions {
    pub model_dir: PathBuf,
    pub out_dir: PathBuf,
    pub method: StructMethod,
    /// Fraction of the decoder blocks' parameters to remove, in [0, 1).
    pub sparsity: f64,
    pub allocation: GroupAllocation,
    /// Fold the removed channels' mean contribution into the output projections' biases;
    /// None: the method's default (on for flap).
    pub compensate: Option<bool>,
    pub stats: Option<PathBuf>,
    pub threads: Option<usize>,
    pub force: bool,
    pub provenance: BTreeMap<String, String>,
    /// Options of method hywia (None: its defaults); refused with the other methods.
    pub hywia: Option<HywiaOptions>,
    /// Refit the output projections on the kept channels (`--reconstruct`), with the Gram sidecar
    /// (None: the default one) and this damping.
    pub reconstruct: Option<(Option<PathBuf>, f64)>,
    /// A searched schedule: each layer's own share of its parameters to remove (their mean is
    /// `sparsity`), planned by the uniform rule with `allocation`'s width multiple; None: `allocation`.
    pub layer_sparsity: Option<Vec<f64>>,
}

#[derive(Debug, Serialize)]
pub struct StructuredSummary {
    pub out: String,
    pub method: String,
    pub sparsity: f64,
    pub allocation: String,
    /// Uniform allocation's width multiple (None: global allocation).
    pub width_multiple: Option<usize>,
    pub compensate: bool,
    pub family: String,
    pub layers: usize,
    /// Key/value heads (each with its query heads) and query heads, over all layers.
    pub attn_groups_before: usize,
    pub attn_groups_after: usize,
    pub heads_before: usize,
    pub heads_after: usize,
    pub mlp_channels_before: usize,
    pub mlp_channels_after: usize,
    /// Parameters of the decoder blocks before, the removed groups' share, and after (the latter
    /// includes biases added for compensation).
    pub block_params_before: u64,
    pub params_removed: u64,
    pub bias_params_added: u64,
    pub block_params_after: u64,
    /// params_removed / block_params_before.
    pub achieved_sparsity: f64,
    pub model_params_before: u64,
    pub model_params_after: u64,
    pub bytes_before: u64,
    pub bytes_written: u64,
    /// `transformers` (stock from_pretrained loads the output) or `llmprune.load_pruned`.
    pub loader: String,
    pub per_layer: Vec<LayerShape>,
    pub shards: usize,
    pub seconds: f64,
    pub threads: usize,
    pub stats: Option<String>,
    pub warnings: Vec<String>,
    /// hywia only (null otherwise): the settings, the layers kept whole at each end, and the fusion
    /// weights and split-half reliabilities of every pruned layer.
    pub fusion_mode: Option<String>,
    pub taylor: Option<String>,
    pub fusion_temperature: Option<f64>,
    pub skip_first: Option<usize>,
    pub skip_last: Option<usize>,
    pub fusion: Option<Vec<LayerFusion>>,
}

/// Why this run needs a sidecar (None: it does not).
fn stats_need(method: StructMethod, compensate: bool) -> Option<StatsNeed> {
    match method {
        StructMethod::Hywia => Some(StatsNeed { what: "method hywia needs gradient".into(), hint: "run: llmprune stats MODEL --grad".into() }),
        m if m.needs_stats() => Some(StatsNeed::activations(&format!("method {}", m.name()))),
        _ if compensate => Some(StatsNeed::activations("bias compensation (--compensate)")),
        _ => None,
    }
}

/// Why the biases that compensation would add could not be loaded with this architecture's config
/// (None: they can, or none would be added).
fn compensation_unloadable(rules: &Rules, plans: &[LayerPlan], compensate: bool) -> Option<String> {
    let add_attn = slice::needs_added_bias(rules, plans, compensate, true);
    let add_mlp = slice::needs_added_bias(rules, plans, compensate, false);
    if rules.family == Family::Opt && (add_attn || add_mlp) {
        return Some("bias compensation needs the model's biases, and this OPT model has none (enable_bias is false)".into());
    }
    let lacking: Vec<&str> = [(add_attn && !rules.bias_flags.0, "attention_bias"), (add_mlp && !rules.bias_flags.1, "mlp_bias")]
        .into_iter()
        .filter_map(|(missing, flag)| missing.then_some(flag))
        .collect();
    (rules.family == Family::Llama && !lacking.is_empty()).then(|| {
        format!("bias compensation adds output-projection biases, and {} models have no {} to load them", rules.model_type, lacking.join(" or "))
    })
}

/// Numel of every tensor, split into (decoder blocks, whole model).
fn count_params(ckpt: &Checkpoint, rules: &Rules) -> (u64, u64) {
    ckpt.tensors().fold((0, 0), |(b, m), (_, t)| {
        let n = t.numel() as u64;
        (b + if rules.in_blocks(&t.name) { n } else { 0 }, m + n)
    })
}

fn layer_budgets(ckpt: &Checkpoint, rules: &Rules) -> Vec<LayerBudget> {
    rules
        .layers
        .iter()
        .map(|l| LayerBudget {
            attn_cost: l.attn.group_cost(l.hidden),
            mlp_cost: l.mlp.group_cost(l.hidden),
            params: ckpt.tensors().filter(|(_, t)| t.name.starts_with(&l.prefix)).map(|(_, t)| t.numel() as u64).sum(),
        })
        .collect()
}

/// What a structured run knows before it plans: the checkpoint and sidecar, the group rules, every
/// layer's scores and parameter budget, the layers kept whole, and the Gram sidecar of a refit.
struct Prepared {
    run: Run,
    rules: Rules,
    scores: Vec<LayerScores>,
    fusion: Option<Vec<LayerFusion>>,
    budgets: Vec<LayerBudget>,
    frozen: Vec<bool>,
    gram: Option<(crate::sidecar::gram::Gram, f64)>,
    hywia: Option<(HywiaOptions, usize, usize)>,
    /// Requested, or the method's default (compensation_unloadable may still turn a default off).
    compensate: bool,
    pool: std::sync::Arc<rayon::ThreadPool>,
}

fn prepare(opts: &StructuredOptions) -> Result<Prepared> {
    if !(0.0..1.0).contains(&opts.sparsity) {
        return Err(Error::arg(format!("sparsity must be in [0, 1), got {}", opts.sparsity)));
    }
    if opts.hywia.is_some() && opts.method != StructMethod::Hywia {
        return Err(Error::arg(format!("fusion and layer-skipping options apply to method hywia, not to {}", opts.method.name())));
    }
    if let Some(o) = &opts.hywia {
        o.validate()?;
    }
    if let Some(ls) = &opts.layer_sparsity {
        if opts.allocation == GroupAllocation::Global {
            return Err(Error::arg("a schedule gives every layer its own sparsity; global allocation does not go with it"));
        }
        if opts.hywia.as_ref().is_some_and(|o| o.skip_first.is_some() || o.skip_last.is_some()) {
            return Err(Error::arg_hint("a schedule sets every layer's sparsity, the skipped ones included", "drop --skip-first/--skip-last"));
        }
        let mean = ls.iter().sum::<f64>() / ls.len().max(1) as f64;
        if (mean - opts.sparsity).abs() > 1e-6 {
            return Err(Error::arg(format!(
                "the schedule's layer sparsities average {mean:.6}, not the sparsity {} it was given with",
                opts.sparsity
            )));
        }
    }
    let compensate = opts.compensate.unwrap_or(opts.method.compensates_by_default());
    let mut run = Run::open_checkpoint(&opts.model_dir)?;
    // an architecture without group rules is reported before any missing statistics
    let rules = Rules::from_checkpoint(&run.ckpt)?;
    let need = stats_need(opts.method, compensate);
    if opts.stats.is_some() && need.is_none() {
        return Err(Error::arg_hint(
            format!("--stats does not apply: method {} without --compensate reads no statistics", opts.method.name()),
            "drop --stats, or add --compensate to also compensate the removed channels' mean output",
        ));
    }
    run.attach_sidecar(opts.stats.as_deref(), need)?;
    let gram = match &opts.reconstruct {
        Some((path, damp)) => {
            crate::unstructured::sparsegpt::check_damp(*damp)?;
            let g = run.open_gram(path.as_deref(), "--reconstruct")?;
            // every output projection a refit may solve for has a Gram matrix with a signal
            for l in &rules.layers {
                for w in [&l.attn.output.weight, &l.mlp.output.weight] {
                    if let Some(grp) = g.group_of(w) {
                        g.check_signal(&grp.key)?;
                    }
                }
            }
            Some((g, *damp))
        }
        None => None,
    };
    let hywia = match (opts.method, &opts.hywia) {
        (StructMethod::Hywia, o) => {
            let o = o.clone().unwrap_or_default();
            o.validate()?;
            // a schedule chooses every layer's sparsity: no layer is kept whole by rule
            let (first, last) = if opts.layer_sparsity.is_some() { (0, 0) } else { o.skipped(rules.layers.len())? };
            Some((o, first, last))
        }
        (_, None) => None,
        (m, Some(_)) => return Err(Error::arg(format!("fusion and layer-skipping options apply to method hywia, not to {}", m.name()))),
    };
    let frozen: Vec<bool> = match &hywia {
        Some((_, first, last)) => (0..rules.layers.len()).map(|i| i < *first || i >= rules.layers.len() - last).collect(),
        None => vec![false; rules.layers.len()],
    };
    if let Some(seq) = run.sidecar.as_ref().and_then(|sc| SequentialSettings::of(&sc.meta)) {
        let m = seq.map_or_else(|_| "?".to_string(), |s| s.method);
        run.warnings.push(format!("statistics were taken sequentially with {m}; {} is defined on dense statistics", opts.method.name()));
    }
    let (ckpt, sidecar) = (&run.ckpt, run.sidecar.as_ref());
    for l in &rules.layers {
        for name in l
            .attn
            .inputs
            .iter()
            .map(|t| &t.weight)
            .chain([&l.attn.output.weight])
            .chain(l.mlp.inputs.iter().map(|t| &t.weight))
            .chain([&l.mlp.output.weight])
        {
            let (shard, t) = ckpt.get(name).ok_or_else(|| Error::Internal(format!("{name} resolved by the group rules but missing")))?;
            if float_size(t.dtype).is_none() {
                return Err(Error::tensor(&shard.path, name, format!("dtype {:?} is not supported (BF16, F16 and F32 are)", t.dtype)));
            }
        }
    }
    let pool = pool::pool(opts.threads)?;
    let (scores, fusion) = match (&hywia, sidecar) {
        (Some((o, _, _)), Some(sc)) => {
            let (scores, fusion) = hywia::score_layers(&rules, sc, o, &frozen)?;
            (scores, Some(fusion))
        }
        _ => (pool.install(|| metric::score_layers(opts.method, &rules, ckpt, sidecar))?, None),
    };
    let budgets = layer_budgets(ckpt, &rules);
    Ok(Prepared { run, rules, scores, fusion, budgets, frozen, gram, hywia, compensate, pool })
}

/// Builds structured pruning's edits one layer at a time, at any sparsity, as `apply_structured`
/// with a schedule writes them (`llmprune search` scores its candidates with it).
pub struct LayerPlanner {
    prep: Prepared,
    compensate: bool,
    add_attn: bool,
    add_mlp: bool,
    width_multiple: usize,
}

/// One layer at one sparsity: the kept groups, and every edit of its tensors.
pub struct LayerAtSparsity {
    pub plan: LayerPlan,
    pub edits: Edits,
    pub removed_params: u64,
    pub params: u64,
}

impl LayerPlanner {
    /// `opts` as for `apply_structured` with a schedule (its output directory and sparsity unused).
    pub fn open(opts: &StructuredOptions) -> Result<LayerPlanner> {
        let width_multiple = match opts.allocation {
            GroupAllocation::Uniform { width_multiple } => width_multiple,
            GroupAllocation::Global => {
                return Err(Error::arg("a schedule gives every layer its own sparsity; global allocation does not go with it"))
            }
        };
        if opts.reconstruct.is_some() {
            return Err(Error::arg("searching with --reconstruct is not supported; search without it, then apply with --reconstruct"));
        }
        // as with a schedule (hywia keeps no layer whole by rule); its mean is the given sparsity
        let mut prep = prepare(&StructuredOptions { layer_sparsity: Some(vec![opts.sparsity]), ..opts.clone() })?;
        // what a schedule that removes something of every module kind adds: any layer may
        let some: Vec<LayerPlan> =
            prep.scores.iter().map(|s| LayerPlan { attn_keep: (1..s.attn.len()).collect(), mlp_keep: (1..s.mlp.len()).collect() }).collect();
        let mut compensate = prep.compensate;
        if let Some(why) = compensation_unloadable(&prep.rules, &some, compensate) {
            if opts.compensate.is_some() {
                return Err(Error::arg_hint(why, "pass --no-compensate"));
            }
            prep.run.warnings.push(format!("bias compensation is off (the default for {} where it can load): {why}", opts.method.name()));
            compensate = false;
        }
        let add_attn = slice::needs_added_bias(&prep.rules, &some, compensate, true);
        let add_mlp = slice::needs_added_bias(&prep.rules, &some, compensate, false);
        Ok(LayerPlanner { prep, compensate, add_attn, add_mlp, width_multiple })
    }

    pub fn layers(&self) -> usize {
        self.prep.rules.layers.len()
    }

    pub fn compensate(&self) -> bool {
        self.compensate
    }

    pub fn warnings(&self) -> &[String] {
        &self.prep.run.warnings
    }

    /// The checkpoint dtype of tensor `name`.
    pub fn dtype_of(&self, name: &str) -> Result<safetensors::Dtype> {
        self.prep.run.ckpt.get(name).map(|(_, t)| t.dtype).ok_or_else(|| Error::Internal(format!("{name} is not in the checkpoint")))
    }

    /// Layer `i` removing about `sparsity` of its parameters.
    pub fn layer(&self, i: usize, sparsity: f64) -> Result<LayerAtSparsity> {
        let p = &self.prep;
        if i >= p.rules.layers.len() {
            return Err(Error::arg(format!("layer {i} does not exist; the model has {} decoder layers", p.rules.layers.len())));
        }
        if !(0.0..1.0).contains(&sparsity) {
            return Err(Error::arg(format!("sparsity must be in [0, 1), got {sparsity}")));
        }
        let plan = plan::plan_scheduled(&p.scores[i..=i], &p.budgets[i..=i], &[sparsity], self.width_multiple)
            .map_err(|e| Error::arg(e.to_string().replace("layer 0", &format!("layer {i}"))))?
            .remove(0);
        let edits = p.pool.install(|| {
            slice::layer_edits(&p.run.ckpt, p.run.sidecar.as_ref(), &p.rules.layers[i], &plan, self.compensate, self.add_attn, self.add_mlp)
        })?;
        Ok(LayerAtSparsity { removed_params: plan.removed_params(&p.scores[i], &p.budgets[i]), params: p.budgets[i].params, plan, edits })
    }
}

pub fn apply_structured(opts: &StructuredOptions, progress: &mut dyn FnMut(Progress) -> Result<()>) -> Result<StructuredSummary> {
    let Prepared { mut run, rules, scores, fusion, budgets, frozen, gram, hywia, compensate, pool } = prepare(opts)?;
    let plans = match &opts.layer_sparsity {
        Some(ls) => {
            let GroupAllocation::Uniform { width_multiple } = opts.allocation else { unreachable!("refused by prepare") };
            plan::plan_scheduled(&scores, &budgets, ls, width_multiple)?
        }
        None => plan::plan_skipping(&scores, &budgets, opts.sparsity, opts.allocation, &frozen, &|kv| config::heads_describable(&rules, kv))?,
    };
    let mut compensate = compensate;
    if let Some(why) = compensation_unloadable(&rules, &plans, compensate) {
        if opts.compensate.is_some() {
            return Err(Error::arg_hint(why, "pass --no-compensate"));
        }
        // the method's default gives way where the output could not be loaded with it
        run.warnings.push(format!("bias compensation is off (the default for {} where it can load): {why}", opts.method.name()));
        compensate = false;
    }
    let (ckpt, sidecar) = (&run.ckpt, run.sidecar.as_ref());
    let (edits, add_attn, add_mlp) =
        pool.install(|| slice::build_edits(ckpt, sidecar, gram.as_ref().map(|(g, d)| (g, *d)), &rules, &plans, compensate))?;
    let shapes = config::layer_shapes(&rules, &plans);
    let params_removed: u64 = plans.iter().zip(&scores).zip(&budgets).map(|((p, s), b)| p.removed_params(s, b)).sum();
    let (block_before, model_before) = count_params(ckpt, &rules);
    let allocation_name = if opts.layer_sparsity.is_some() { "schedule" } else { opts.allocation.name() };

    let staging = run.stage(&opts.out_dir, opts.force)?;
    let run = run;
    let ckpt = &run.ckpt;
    let mut prov = serde_json::Map::new();
    prov.insert("method".into(), opts.method.name().into());
    prov.insert("sparsity".into(), opts.sparsity.into());
    prov.insert("allocation".into(), allocation_name.into());
    if let Some(ls) = &opts.layer_sparsity {
        prov.insert("layer_sparsity".into(), ls.clone().into());
    }
    if let GroupAllocation::Uniform { width_multiple } = opts.allocation {
        prov.insert("width_multiple".into(), width_multiple.into());
    }
    prov.insert("compensate".into(), compensate.into());
    prov.insert("achieved_sparsity".into(), (params_removed as f64 / block_before.max(1) as f64).into());
    if let Some((g, damp)) = &gram {
        prov.insert("reconstruct".into(), true.into());
        prov.insert("damp".into(), (*damp).into());
        prov.insert("gram_calibration".into(), g.meta.get("calibration").cloned().unwrap_or(Value::Null));
    }
    if let Some((o, first, last)) = &hywia {
        prov.insert("fusion_mode".into(), o.fusion.name().into());
        prov.insert("taylor".into(), o.taylor.name().into());
        prov.insert("fusion_temperature".into(), o.temperature.into());
        prov.insert("skip_first".into(), (*first).into());
        prov.insert("skip_last".into(), (*last).into());
    }
    let shard_prov = run.provenance(prov.clone(), &opts.provenance);

    let mut weight_map: BTreeMap<String, String> = BTreeMap::new();
    let mut written: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let (mut block_after, mut model_after, mut tensor_bytes) = (0u64, 0u64, 0u64);
    let bytes_total = ckpt.total_bytes();
    let bytes_written = run.write_shards(&staging, progress, |shard, out| {
        let plan = shard_plan(shard, &edits)?;
        for e in &plan {
            let n: u64 = e.shape.iter().product::<usize>() as u64;
            model_after += n;
            if rules.in_blocks(&e.name) {
                block_after += n;
            }
            tensor_bytes += e.nbytes as u64;
            weight_map.insert(e.name.clone(), shard.file_name.clone());
            written.insert(e.name.clone(), e.shape.clone());
        }
        out.header(shard_header(shard, &shard_prov, &plan)?)?;
        for e in &plan {
            match &e.source.source {
                Source::Copy(data) => out.copy(data)?,
                Source::Bytes(bytes) => {
                    // computed here (a refit, a compensated or added bias): checked before it is written
                    let input = ckpt.get(&e.name).map(|(s, t)| (t.dtype, s.data(t)));
                    check_computed(&e.name, e.dtype, bytes, input, gram.is_some())?;
                    out.fill(|buf| {
                        buf.clear();
                        buf.extend_from_slice(bytes);
                        Ok(())
                    })?;
                }
                Source::Slice { data, es, shape, rows, cols } => out.fill(|buf| {
                    pool.install(|| slice_into(data, *es, shape, rows.as_deref(), cols.as_deref(), buf));
                    Ok(())
                })?,
            }
            if let Some(t) = e.source.input {
                out.done(&e.name, t)?;
            }
        }
        Ok(())
    })?;
    check_shapes(&rules, &shapes, &written)?;
    // the summary's count is the one written (checked equal to the plan's)
    let params_removed = check_removed(params_removed, block_before, edits.bias_params_added, block_after)?;
    let new_config =
        config::rewrite(&rules, &config::Rewrite { shapes: &shapes, added_attn_bias: add_attn, added_mlp_bias: add_mlp, provenance: prov });
    crate::io::output::write_config(&staging.path, new_config)?;
    // config.json was rewritten above
    let out = run.finish(staging, tensor_bytes, Some(&weight_map), &["config.json"])?;

    let loader = if config::stock_loadable(&rules, &shapes) { "transformers" } else { "llmprune.load_pruned" };
    Ok(StructuredSummary {
        out: out.display().to_string(),
        method: opts.method.name().into(),
        sparsity: opts.sparsity,
        allocation: allocation_name.into(),
        width_multiple: match opts.allocation {
            GroupAllocation::Uniform { width_multiple } => Some(width_multiple),
            GroupAllocation::Global => None,
        },
        compensate,
        family: rules.family.name().into(),
        layers: rules.layers.len(),
        attn_groups_before: scores.iter().map(|s| s.attn.len()).sum(),
        attn_groups_after: plans.iter().map(|p| p.attn_keep.len()).sum(),
        heads_before: scores.iter().map(|s| s.attn.len() * rules.q_per_kv).sum(),
        heads_after: shapes.iter().map(|s| s.num_attention_heads).sum(),
        mlp_channels_before: scores.iter().map(|s| s.mlp.len()).sum(),
        mlp_channels_after: shapes.iter().map(|s| s.intermediate_size).sum(),
        block_params_before: block_before,
        params_removed,
        bias_params_added: edits.bias_params_added,
        block_params_after: block_after,
        achieved_sparsity: params_removed as f64 / block_before.max(1) as f64,
        model_params_before: model_before,
        model_params_after: model_after,
        bytes_before: bytes_total,
        bytes_written,
        loader: loader.into(),
        per_layer: shapes,
        shards: ckpt.shards.len(),
        seconds: run.seconds(),
        threads: pool.current_num_threads(),
        stats: run.stats_path(),
        warnings: run.warnings.clone(),
        fusion_mode: hywia.as_ref().map(|(o, _, _)| o.fusion.name().into()),
        taylor: hywia.as_ref().map(|(o, _, _)| o.taylor.name().into()),
        fusion_temperature: hywia.as_ref().map(|(o, _, _)| o.temperature),
        skip_first: hywia.as_ref().map(|h| h.1),
        skip_last: hywia.as_ref().map(|h| h.2),
        fusion,
    })
}

/// The postcondition on the shapes written: every layer's projections have the rows and columns of
/// the groups its recorded sizes (`shapes`, what config.json states) keep: the attention's key/value
/// groups, the MLP's channels, along the input projections' rows (their biases too, kept or added)
/// and the output projection's columns; the output projection keeps its rows (and its bias, kept
/// or added, their number). Fused weights (Phi-3's qkv_proj) add up their projections' rows.
fn check_shapes(rules: &Rules, shapes: &[LayerShape], written: &BTreeMap<String, Vec<usize>>) -> Result<()> {
    for (l, s) in rules.layers.iter().zip(shapes) {
        for (m, kept, what) in [(&l.attn, s.num_key_value_heads, "key/value heads"), (&l.mlp, s.intermediate_size, "intermediate channels")] {
            // (tensor, axis, expected size, required): a bias is checked where one was written
            let mut rows: BTreeMap<String, (usize, bool)> = BTreeMap::new();
            for r in &m.inputs {
                rows.entry(r.weight.clone()).or_insert((0, true)).0 += kept * r.rows_per_group;
                let bias = r.bias.clone().unwrap_or_else(|| slice::bias_name(&r.weight));
                rows.entry(bias).or_insert((0, false)).0 += kept * r.rows_per_group;
            }
            let mut expect: Vec<(String, usize, usize, bool)> = rows.into_iter().map(|(w, (n, req))| (w, 0, n, req)).collect();
            let out_bias = m.output.bias.clone().unwrap_or_else(|| slice::bias_name(&m.output.weight));
            expect.push((m.output.weight.clone(), 1, kept * m.output.cols_per_group, true));
            expect.push((m.output.weight.clone(), 0, m.output.out_features, true));
            expect.push((out_bias, 0, m.output.out_features, false));
            for (name, axis, want, required) in expect {
                let shape = written.get(&name);
                if shape.is_none() && !required {
                    continue;
                }
                let got = shape.and_then(|sh| sh.get(axis).copied());
                if got != Some(want) {
                    return Err(Error::postcondition(
                        &name,
                        format!(
                            "written with shape {:?}, but the output's config gives this layer {kept} {what}, i.e. {want} along axis {axis}; nothing was written",
                            shape.cloned().unwrap_or_default()
                        ),
                        Some(BUG_HINT.into()),
                    ));
                }
            }
        }
    }
    Ok(())
}

const BUG_HINT: &str = "this is a bug in llmprune; please report it with the command line";

/// The postcondition on the summary's count: the parameters removed from the decoder blocks,
/// counted from the tensors written (before + added biases − after), are what the plan removed.
fn check_removed(planned: u64, before: u64, added: u64, after: u64) -> Result<u64> {
    let counted = (before + added).checked_sub(after);
    if counted != Some(planned) {
        return Err(Error::postcondition(
            "decoder blocks",
            format!("{after} parameters written of {before} (+{added} added biases), but the plan removes {planned}; nothing was written"),
            Some(BUG_HINT.into()),
        ));
    }
    Ok(planned)
}

/// The postcondition on a tensor the structured pass computed: finite, and, for a refitted weight,
/// not entirely zero where its input was not.
fn check_computed(name: &str, dtype: safetensors::Dtype, bytes: &[u8], input: Option<(safetensors::Dtype, &[u8])>, refit: bool) -> Result<()> {
    let hint = if refit {
        "the least-squares refit diverged; pass a smaller --damp, or recompute the Gram matrices with `llmprune stats MODEL --gram`"
    } else {
        "the bias compensation produced non-finite values; pass --no-compensate, or recompute the statistics"
    };
    let same_size = input.filter(|(_, d)| d.len() == bytes.len());
    let s = check_written(name, dtype, bytes, same_size, Some(hint))?;
    let numel = bytes.len() * 8 / dtype.bitsize().max(1);
    if refit && numel > 0 && s.zeros as usize == numel {
        if let Some(is) = input.and_then(|(dt, d)| scan(dt, d)) {
            let inumel = input.map_or(0, |(dt, d)| d.len() * 8 / dt.bitsize().max(1));
            if (is.zeros as usize) < inumel {
                return Err(Error::postcondition(
                    name,
                    "the refitted tensor is entirely zero, and its input was not; nothing was written",
                    Some(hint.into()),
                ));
            }
        }
    }
    Ok(())
}

enum Source<'a> {
    Copy(&'a [u8]),
    Bytes(&'a [u8]),
    Slice { data: &'a [u8], es: usize, shape: Vec<usize>, rows: Option<Vec<std::ops::Range<usize>>>, cols: Option<Vec<std::ops::Range<usize>>> },
}

/// Where an output tensor's bytes come from, and the size of the input tensor it replaces (None for
/// an added tensor).
struct Origin<'a> {
    source: Source<'a>,
    input: Option<usize>,
}

/// The output tensors of one shard in file order; added biases follow their weight.
fn shard_plan<'a>(shard: &'a Shard, edits: &'a Edits) -> Result<Vec<OutTensor<Origin<'a>>>> {
    let mut out = Vec::with_capacity(shard.tensors.len());
    for t in &shard.tensors {
        let data = shard.data(t);
        let (shape, source) = match edits.ops.get(&t.name) {
            None => (t.shape.clone(), Source::Copy(data)),
            Some(Op::Replace(bytes)) => (t.shape.clone(), Source::Bytes(bytes)),
            Some(Op::Computed { shape, data }) => (shape.clone(), Source::Bytes(data)),
            Some(op @ Op::Slice { rows, cols }) => {
                let es = float_size(t.dtype).ok_or_else(|| Error::Internal(format!("{}: sliced tensors are float weights or biases", t.name)))?;
                (new_shape(&t.shape, op), Source::Slice { data, es, shape: t.shape.clone(), rows: rows.clone(), cols: cols.clone() })
            }
        };
        let nbytes = shape.iter().product::<usize>() * t.dtype.bitsize() / 8;
        out.push(OutTensor { name: t.name.clone(), dtype: t.dtype, shape, nbytes, source: Origin { source, input: Some(t.nbytes()) } });
        for a in edits.added.get(&t.name).into_iter().flatten() {
            out.push(OutTensor {
                name: a.name.clone(),
                dtype: a.dtype,
                shape: a.shape.clone(),
                nbytes: a.data.len(),
                source: Origin { source: Source::Bytes(&a.data), input: None },
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::structured::arch::{ColTensor, Layer, Module, RowTensor};

    fn row(w: &str, per: usize, offset: usize) -> RowTensor {
        RowTensor { weight: w.into(), bias: None, rows_per_group: per, row_offset: offset }
    }

    /// One layer: 2 key/value groups of 2 query heads of size 4 in a fused qkv weight, 6 channels.
    fn rules() -> Rules {
        let attn = Module {
            inputs: vec![row("l.qkv.weight", 8, 0), row("l.qkv.weight", 4, 16), row("l.qkv.weight", 4, 24)],
            output: ColTensor { weight: "l.o.weight".into(), bias: None, cols_per_group: 8, out_features: 16 },
            groups: 2,
        };
        let mlp = Module {
            inputs: vec![row("l.up.weight", 1, 0)],
            output: ColTensor { weight: "l.down.weight".into(), bias: None, cols_per_group: 1, out_features: 16 },
            groups: 6,
        };
        Rules {
            family: Family::Llama,
            model_type: "phi3".into(),
            bias_flags: (false, false),
            head_dim: 4,
            q_per_kv: 2,
            layers: vec![Layer { prefix: "l.".into(), attn, mlp, hidden: 16 }],
            config: Default::default(),
        }
    }

    #[test]
    fn written_shapes_must_be_those_the_config_gives() {
        let shape = LayerShape { num_attention_heads: 2, num_key_value_heads: 1, intermediate_size: 4 };
        let mut written: BTreeMap<String, Vec<usize>> = [
            ("l.qkv.weight", vec![16, 16]), // 1 group: 8 + 4 + 4 rows
            ("l.o.weight", vec![16, 8]),
            ("l.up.weight", vec![4, 16]),
            ("l.down.weight", vec![16, 4]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert!(check_shapes(&rules(), &[shape], &written).is_ok());
        written.insert("l.down.weight".into(), vec![16, 5]);
        let e = check_shapes(&rules(), &[shape], &written).unwrap_err().to_string();
        assert!(e.contains("l.down.weight") && e.contains("4 intermediate channels"), "{e}");
        written.insert("l.down.weight".into(), vec![16, 4]);
        written.insert("l.qkv.weight".into(), vec![32, 16]);
        let e = check_shapes(&rules(), &[shape], &written).unwrap_err().to_string();
        assert!(e.contains("l.qkv.weight") && e.contains("1 key/value heads"), "{e}");
        written.insert("l.qkv.weight".into(), vec![16, 16]);
        // a bias is checked where one was written: the input's along its rows, the output's whole
        written.insert("l.qkv.bias".into(), vec![32]);
        let e = check_shapes(&rules(), &[shape], &written).unwrap_err().to_string();
        assert!(e.contains("l.qkv.bias"), "{e}");
        written.insert("l.qkv.bias".into(), vec![16]);
        written.insert("l.down.bias".into(), vec![4]);
        let e = check_shapes(&rules(), &[shape], &written).unwrap_err().to_string();
        assert!(e.contains("l.down.bias") && e.contains("16 along axis 0"), "{e}");
        written.insert("l.down.bias".into(), vec![16]);
        assert!(check_shapes(&rules(), &[shape], &written).is_ok());
        written.insert("l.o.weight".into(), vec![8, 8]);
        assert!(check_shapes(&rules(), &[shape], &written).unwrap_err().to_string().contains("l.o.weight"));
        written.remove("l.o.weight");
        assert!(check_shapes(&rules(), &[shape], &written).is_err());
    }

    #[test]
    fn the_summary_counts_what_was_written() {
        assert_eq!(check_removed(30, 100, 4, 74).unwrap(), 30);
        let e = check_removed(30, 100, 4, 80).unwrap_err().to_string();
        assert!(e.contains("the plan removes 30"), "{e}");
        assert!(check_removed(30, 100, 0, 120).is_err());
    }
}
