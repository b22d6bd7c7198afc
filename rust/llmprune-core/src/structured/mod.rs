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
pub mod slice;

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;
use serde_json::Value;

use crate::apply::{build_pool, Progress, DEFAULT_SIDECAR};
use crate::checkpoint::{dtype_name, Checkpoint, Shard, INDEX_FILE};
use crate::dtype::float_size;
use crate::error::{Error, Result};
use crate::output::{copy_other_files, encode_header, metadata_with_provenance, write_index, StagingDir};
use crate::sidecar::Sidecar;
use crate::writer::ShardWriter;

pub use arch::{Family, Rules};
pub use config::LayerShape;
pub use hywia::{Fusion, HywiaOptions, LayerFusion, Taylor};
pub use metric::{LayerScores, StructMethod};
pub use plan::{Allocation, LayerBudget, LayerPlan};

use slice::{new_shape, slice_into, Edits, Op};

#[derive(Clone, Debug)]
pub struct StructuredOptions {
    pub model_dir: PathBuf,
    pub out_dir: PathBuf,
    pub method: StructMethod,
    /// Fraction of the decoder blocks' parameters to remove, in [0, 1).
    pub sparsity: f64,
    pub allocation: Allocation,
    /// Fold the removed channels' mean contribution into the output projections' biases;
    /// None: the method's default (on for flap).
    pub compensate: Option<bool>,
    pub stats: Option<PathBuf>,
    pub threads: Option<usize>,
    pub force: bool,
    pub provenance: BTreeMap<String, String>,
    /// Options of method hywia (None: its defaults); refused with the other methods.
    pub hywia: Option<HywiaOptions>,
}

#[derive(Debug, Serialize)]
pub struct StructuredSummary {
    pub out: String,
    pub method: String,
    pub sparsity: f64,
    pub allocation: String,
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

fn open_sidecar(opts: &StructuredOptions, needed: bool) -> Result<Option<Sidecar>> {
    let path = opts.stats.clone().or_else(|| {
        let p = opts.model_dir.join(DEFAULT_SIDECAR);
        p.is_file().then_some(p)
    });
    match path {
        Some(p) if needed || opts.stats.is_some() => Ok(Some(Sidecar::open(&p)?)),
        _ if needed => {
            let who = match opts.method {
                StructMethod::Hywia => "method hywia needs gradient".to_string(),
                m if m.needs_stats() => format!("method {} needs activation", m.name()),
                _ => "bias compensation (--compensate) needs activation".to_string(),
            };
            Err(Error::arg(format!(
                "{who} statistics, and {} has no {DEFAULT_SIDECAR}",
                opts.model_dir.display()
            )))
        }
        _ => Ok(None),
    }
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

pub fn apply_structured(opts: &StructuredOptions, progress: &mut dyn FnMut(Progress) -> Result<()>) -> Result<StructuredSummary> {
    let started = Instant::now();
    if !(0.0..1.0).contains(&opts.sparsity) {
        return Err(Error::arg(format!("sparsity must be in [0, 1), got {}", opts.sparsity)));
    }
    let ckpt = Checkpoint::open(&opts.model_dir)?;
    let rules = Rules::from_checkpoint(&ckpt)?;
    let hywia = match (opts.method, &opts.hywia) {
        (StructMethod::Hywia, o) => {
            let o = o.clone().unwrap_or_default();
            o.validate()?;
            let (first, last) = o.skipped(rules.layers.len())?;
            Some((o, first, last))
        }
        (_, None) => None,
        (m, Some(_)) => return Err(Error::arg(format!("fusion and layer-skipping options apply to method hywia, not to {}", m.name()))),
    };
    let frozen: Vec<bool> = match &hywia {
        Some((_, first, last)) => (0..rules.layers.len()).map(|i| i < *first || i >= rules.layers.len() - last).collect(),
        None => vec![false; rules.layers.len()],
    };
    let compensate = opts.compensate.unwrap_or(opts.method.compensates_by_default());
    let sidecar = open_sidecar(opts, opts.method.needs_stats() || compensate)?;
    let mut warnings = Vec::new();
    if let Some(sc) = &sidecar {
        sc.check_matches(&ckpt)?;
        if let Some(seq) = sc.sequential() {
            let m = seq.get("method").and_then(Value::as_str).unwrap_or("?");
            warnings.push(format!(
                "statistics were taken sequentially with {m}; {} is defined on dense statistics",
                opts.method.name()
            ));
        }
    }
    for l in &rules.layers {
        for name in l.attn.inputs.iter().map(|t| &t.weight).chain([&l.attn.output.weight]).chain(l.mlp.inputs.iter().map(|t| &t.weight)).chain([&l.mlp.output.weight]) {
            let (shard, t) = ckpt.get(name).expect("resolved by the group rules");
            if float_size(t.dtype).is_none() {
                return Err(Error::tensor(&shard.path, name, format!("dtype {:?} is not supported (BF16, F16 and F32 are)", t.dtype)));
            }
        }
    }
    let pool = build_pool(opts.threads)?;
    let (scores, fusion) = match (&hywia, &sidecar) {
        (Some((o, _, _)), Some(sc)) => {
            let (scores, fusion) = hywia::score_layers(&rules, sc, o, &frozen)?;
            (scores, Some(fusion))
        }
        _ => (pool.install(|| metric::score_layers(opts.method, &rules, &ckpt, sidecar.as_ref()))?, None),
    };
    let budgets = layer_budgets(&ckpt, &rules);
    let plans = plan::plan_skipping(&scores, &budgets, opts.sparsity, opts.allocation, &frozen)?;
    let (edits, add_attn, add_mlp) = pool.install(|| slice::build_edits(&ckpt, sidecar.as_ref(), &rules, &plans, compensate))?;
    if rules.family == Family::Opt && (add_attn || add_mlp) {
        return Err(Error::arg(
            "bias compensation needs the model's biases, and this OPT model has none (enable_bias is false); pass --no-compensate",
        ));
    }
    let shapes = config::layer_shapes(&rules, &plans);
    let params_removed: u64 = plans.iter().zip(&scores).zip(&budgets).map(|((p, s), b)| p.removed_params(s, b)).sum();
    let (block_before, model_before) = count_params(&ckpt, &rules);

    let staging = StagingDir::prepare(&opts.model_dir, &opts.out_dir, opts.force)?;
    let mut prov = serde_json::Map::new();
    prov.insert("method".into(), opts.method.name().into());
    prov.insert("sparsity".into(), opts.sparsity.into());
    prov.insert("allocation".into(), opts.allocation.name().into());
    prov.insert("compensate".into(), compensate.into());
    prov.insert("achieved_sparsity".into(), (params_removed as f64 / block_before.max(1) as f64).into());
    if let Some((o, first, last)) = &hywia {
        prov.insert("fusion_mode".into(), o.fusion.name().into());
        prov.insert("taylor".into(), o.taylor.name().into());
        prov.insert("fusion_temperature".into(), o.temperature.into());
        prov.insert("skip_first".into(), (*first).into());
        prov.insert("skip_last".into(), (*last).into());
    }
    let mut shard_prov = prov.clone();
    shard_prov.insert("llmprune_version".into(), env!("CARGO_PKG_VERSION").into());
    shard_prov.insert("stats_sha256".into(), sidecar.as_ref().map(|s| Value::from(s.sha256.clone())).unwrap_or(Value::Null));
    shard_prov.insert("source_fingerprint".into(), ckpt.fingerprint().into());
    for (k, v) in &opts.provenance {
        shard_prov.insert(k.clone(), v.clone().into());
    }
    let shard_prov = Value::Object(shard_prov).to_string();

    let mut weight_map: BTreeMap<String, String> = BTreeMap::new();
    let (mut block_after, mut model_after, mut tensor_bytes) = (0u64, 0u64, 0u64);
    let bytes_total = ckpt.total_bytes();
    let tensors_total = ckpt.tensors().count();
    let (mut bytes_done, mut tensors_done) = (0u64, 0usize);
    let bytes_written = std::thread::scope(|scope| -> Result<u64> {
        let mut writer = ShardWriter::spawn(scope);
        let result = (|| -> Result<()> {
            for shard in &ckpt.shards {
                let out_path = staging.path.join(&shard.file_name);
                if let Some(parent) = out_path.parent() {
                    fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
                }
                let plan = shard_plan(shard, &edits);
                for e in &plan {
                    let n: u64 = e.shape.iter().product::<usize>() as u64;
                    model_after += n;
                    if rules.in_blocks(&e.name) {
                        block_after += n;
                    }
                    tensor_bytes += e.nbytes as u64;
                    weight_map.insert(e.name.clone(), shard.file_name.clone());
                }
                writer.open(out_path)?;
                writer.write_owned(shard_header(shard, &plan, &shard_prov)?)?;
                for e in &plan {
                    match &e.source {
                        Source::Copy(data) => writer.write_borrowed(data)?,
                        Source::Bytes(bytes) => {
                            let mut buf = writer.buffer()?;
                            buf.clear();
                            buf.extend_from_slice(bytes);
                            writer.write_owned(buf)?;
                        }
                        Source::Slice { data, es, shape, rows, cols } => {
                            let mut buf = writer.buffer()?;
                            pool.install(|| slice_into(data, *es, shape, rows.as_deref(), cols.as_deref(), &mut buf));
                            writer.write_owned(buf)?;
                        }
                    }
                    if let Some(t) = e.input {
                        bytes_done += t as u64;
                        tensors_done += 1;
                        progress(Progress { tensor: &e.name, bytes_done, bytes_total, tensors_done, tensors_total })?;
                    }
                }
                bytes_done += (8 + shard.header_len) as u64;
            }
            Ok(())
        })();
        let written = writer.finish();
        result?;
        written
    })?;
    if let Some(index) = &ckpt.index {
        write_index(index, tensor_bytes, Some(&weight_map), &staging.path.join(INDEX_FILE))?;
    }
    let new_config = config::rewrite(&rules, &config::Rewrite { shapes: &shapes, added_attn_bias: add_attn, added_mlp_bias: add_mlp, provenance: prov });
    let config_path = staging.path.join("config.json");
    let text = serde_json::to_string_pretty(&Value::Object(new_config)).expect("JSON value serializes");
    fs::write(&config_path, text + "\n").map_err(|e| Error::io(&config_path, e))?;
    // config.json is rewritten above
    copy_other_files(&ckpt, &staging.path, &["config.json"])?;
    let out = staging.commit()?;

    let loader = if config::stock_loadable(&rules, &shapes) { "transformers" } else { "llmprune.load_pruned" };
    Ok(StructuredSummary {
        out: out.display().to_string(),
        method: opts.method.name().into(),
        sparsity: opts.sparsity,
        allocation: opts.allocation.name().into(),
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
        seconds: started.elapsed().as_secs_f64(),
        threads: pool.current_num_threads(),
        stats: sidecar.as_ref().map(|s| s.path.display().to_string()),
        warnings,
        fusion_mode: hywia.as_ref().map(|(o, _, _)| o.fusion.name().into()),
        taylor: hywia.as_ref().map(|(o, _, _)| o.taylor.name().into()),
        fusion_temperature: hywia.as_ref().map(|(o, _, _)| o.temperature),
        skip_first: hywia.as_ref().map(|h| h.1),
        skip_last: hywia.as_ref().map(|h| h.2),
        fusion,
    })
}

enum Source<'a> {
    Copy(&'a [u8]),
    Bytes(&'a [u8]),
    Slice { data: &'a [u8], es: usize, shape: Vec<usize>, rows: Option<Vec<std::ops::Range<usize>>>, cols: Option<Vec<std::ops::Range<usize>>> },
}

/// One tensor of an output shard.
struct OutEntry<'a> {
    name: String,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    nbytes: usize,
    source: Source<'a>,
    /// Bytes of the input tensor it comes from (None for an added tensor).
    input: Option<usize>,
}

/// The output tensors of one shard in file order; added biases follow their weight.
fn shard_plan<'a>(shard: &'a Shard, edits: &'a Edits) -> Vec<OutEntry<'a>> {
    let mut out = Vec::with_capacity(shard.tensors.len());
    for t in &shard.tensors {
        let data = shard.data(t);
        let (shape, source) = match edits.ops.get(&t.name) {
            None => (t.shape.clone(), Source::Copy(data)),
            Some(Op::Replace(bytes)) => (t.shape.clone(), Source::Bytes(bytes)),
            Some(op @ Op::Slice { rows, cols }) => {
                let es = float_size(t.dtype).expect("sliced tensors are float weights or biases");
                (new_shape(&t.shape, op), Source::Slice { data, es, shape: t.shape.clone(), rows: rows.clone(), cols: cols.clone() })
            }
        };
        let nbytes = shape.iter().product::<usize>() * t.dtype.bitsize() / 8;
        out.push(OutEntry { name: t.name.clone(), dtype: t.dtype, shape, nbytes, source, input: Some(t.nbytes()) });
        for a in edits.added.get(&t.name).into_iter().flatten() {
            out.push(OutEntry { name: a.name.clone(), dtype: a.dtype, shape: a.shape.clone(), nbytes: a.data.len(), source: Source::Bytes(&a.data), input: None });
        }
    }
    out
}

/// The shard's header for the new tensors and offsets, input metadata kept and provenance added.
fn shard_header(shard: &Shard, plan: &[OutEntry], provenance: &str) -> Result<Vec<u8>> {
    let mut offset = 0usize;
    let tensors: Vec<(String, Value)> = plan
        .iter()
        .map(|e| {
            let v = serde_json::json!({"dtype": dtype_name(e.dtype), "shape": e.shape, "data_offsets": [offset, offset + e.nbytes]});
            offset += e.nbytes;
            (e.name.clone(), v)
        })
        .collect();
    encode_header(shard, metadata_with_provenance(shard, provenance), tensors)
}
