//! Bindings of the pruning entry points: unstructured and structured apply, single-matrix masks
//! (the sequential calibration pass), inspect, and the method registry.

use std::collections::BTreeMap;
use std::path::PathBuf;

use llmprune_core::error::Error;
use llmprune_core::sidecar::SequentialSettings;
use llmprune_core::structured::StructMethod;
use llmprune_core::unstructured::allocation::{self, Allocation};
use llmprune_core::unstructured::dsnot::DsnotOptions;
use llmprune_core::unstructured::{apply, prunable, score, select};
use llmprune_core::{pool, structured, ApplyOptions, Method, Scope, Target};
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::{detached, guarded, CoreError, InvalidArgumentError};

fn target(sparsity: Option<f64>, pattern: Option<(usize, usize)>) -> PyResult<Target> {
    match (sparsity, pattern) {
        (Some(s), None) => Ok(Target::Sparsity(s)),
        (None, Some((n, m))) => Ok(Target::Pattern { n, m }),
        _ => Err(InvalidArgumentError::new_err("give exactly one of sparsity or pattern")),
    }
}

fn parse_scope(s: &str) -> PyResult<Scope> {
    match s {
        "row" => Ok(Scope::Row),
        "layer" => Ok(Scope::Layer),
        other => Err(InvalidArgumentError::new_err(format!("unknown scope {other:?}; expected row or layer"))),
    }
}

/// `uniform`, `owl` (with M and λ) or `schedule` (with one sparsity per decoder block).
fn parse_allocation(name: &str, owl_m: Option<f64>, owl_lambda: Option<f64>, block_sparsity: Option<Vec<f64>>) -> PyResult<Allocation> {
    let owl_given = owl_m.is_some() || owl_lambda.is_some();
    match name {
        "owl" => Ok(Allocation::Owl { m: owl_m.unwrap_or(allocation::OWL_M), lambda: owl_lambda.unwrap_or(allocation::OWL_LAMBDA) }),
        _ if owl_given => Err(InvalidArgumentError::new_err("--owl-m and --owl-lambda go with --allocation owl")),
        "uniform" if block_sparsity.is_none() => Ok(Allocation::Uniform),
        "schedule" => {
            block_sparsity.map(Allocation::Schedule).ok_or_else(|| InvalidArgumentError::new_err("a schedule allocation needs its block sparsities"))
        }
        other => Err(InvalidArgumentError::new_err(format!("unknown allocation {other:?}; expected uniform, owl or a schedule"))),
    }
}

/// DSnoT's options when `refine` is "dsnot"; its knobs without it are an error.
fn parse_refine(
    refine: Option<&str>,
    iters: Option<usize>,
    threshold: Option<f64>,
    skip: Option<&str>,
    same_sign: Option<bool>,
) -> PyResult<Option<DsnotOptions>> {
    let knobs = iters.is_some() || threshold.is_some() || skip.is_some() || same_sign.is_some();
    match refine {
        None if knobs => {
            Err(InvalidArgumentError::new_err("--dsnot-iters, --dsnot-threshold, --dsnot-skip and --dsnot-same-sign go with --refine dsnot"))
        }
        None => Ok(None),
        Some("dsnot") => {
            let d = DsnotOptions::default();
            Ok(Some(DsnotOptions {
                iters: iters.unwrap_or(d.iters),
                threshold: threshold.unwrap_or(d.threshold),
                skip: skip.map_or(Ok(d.skip), str::parse).map_err(CoreError)?,
                same_sign: same_sign.unwrap_or(d.same_sign),
            }))
        }
        Some(other) => Err(InvalidArgumentError::new_err(format!("unknown --refine {other:?}; expected dsnot"))),
    }
}

fn parse_method(s: &str) -> PyResult<Method> {
    s.parse::<Method>().map_err(|e| CoreError(e).into())
}

/// Runs a long core call without the GIL, calling `progress(tensor, bytes_done, bytes_total,
/// tensors_done, tensors_total)` after every tensor and checking for signals (Ctrl-C, and SIGTERM
/// where the CLI turns it into KeyboardInterrupt); returns the JSON summary. An exception raised by
/// the callback stops the run, the partial output is removed, and the exception is re-raised.
fn run_reporting(
    py: Python<'_>,
    progress: Option<Py<PyAny>>,
    work: impl FnOnce(&mut dyn FnMut(llmprune_core::Progress) -> llmprune_core::Result<()>) -> llmprune_core::Result<String> + Send,
) -> PyResult<String> {
    let mut callback_error: Option<PyErr> = None;
    let result = py.detach(|| {
        let mut report = |p: llmprune_core::Progress| -> llmprune_core::Result<()> {
            Python::attach(|py| {
                let outcome = py.check_signals().and_then(|_| match &progress {
                    Some(cb) => cb.call1(py, (p.tensor, p.bytes_done, p.bytes_total, p.tensors_done, p.tensors_total)).map(|_| ()),
                    None => Ok(()),
                });
                outcome.map_err(|e| {
                    callback_error = Some(e);
                    Error::Interrupted
                })
            })
        };
        guarded(|| work(&mut report))
    });
    match (result, callback_error) {
        (Ok(summary), _) => Ok(summary),
        (Err(_), Some(py_err)) => Err(py_err),
        (Err(e), None) => Err(CoreError(e).into()),
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> llmprune_core::Result<String> {
    serde_json::to_string(value).map_err(|e| Error::Internal(format!("cannot serialize a summary: {e}")))
}

#[pyfunction]
#[pyo3(name = "apply", signature = (model_dir, out_dir, method, *, sparsity=None, pattern=None, scope="row",
    stats=None, threads=None, include=Vec::new(), exclude=Vec::new(), input_axis=None, force=false,
    provenance=None, progress=None, check_only=false, update=false, gram=None, damp=0.01, blocksize=128,
    allocation="uniform", owl_m=None, owl_lambda=None, block_sparsity=None, refine=None, dsnot_iters=None,
    dsnot_threshold=None, dsnot_skip=None, dsnot_same_sign=None, compensate=false))]
#[allow(clippy::too_many_arguments)]
fn apply_checkpoint(
    py: Python<'_>,
    model_dir: PathBuf,
    out_dir: PathBuf,
    method: &str,
    sparsity: Option<f64>,
    pattern: Option<(usize, usize)>,
    scope: &str,
    stats: Option<PathBuf>,
    threads: Option<usize>,
    include: Vec<String>,
    exclude: Vec<String>,
    input_axis: Option<usize>,
    force: bool,
    provenance: Option<BTreeMap<String, String>>,
    progress: Option<Py<PyAny>>,
    check_only: bool,
    update: bool,
    gram: Option<PathBuf>,
    damp: f64,
    blocksize: usize,
    allocation: &str,
    owl_m: Option<f64>,
    owl_lambda: Option<f64>,
    block_sparsity: Option<Vec<f64>>,
    refine: Option<&str>,
    dsnot_iters: Option<usize>,
    dsnot_threshold: Option<f64>,
    dsnot_skip: Option<&str>,
    dsnot_same_sign: Option<bool>,
    compensate: bool,
) -> PyResult<String> {
    let allocation = parse_allocation(allocation, owl_m, owl_lambda, block_sparsity)?;
    let refine = parse_refine(refine, dsnot_iters, dsnot_threshold, dsnot_skip, dsnot_same_sign)?;
    let default_input_axis = input_axis.unwrap_or_else(|| prunable::default_input_axis(&model_dir));
    let opts = ApplyOptions {
        model_dir,
        out_dir,
        method: parse_method(method)?,
        target: target(sparsity, pattern)?,
        scope: parse_scope(scope)?,
        stats,
        threads,
        include,
        exclude,
        default_input_axis,
        force,
        provenance: provenance.unwrap_or_default(),
        check_only,
        update,
        gram,
        sparsegpt: llmprune_core::unstructured::sparsegpt::SparseGptOptions { damp, blocksize },
        allocation,
        refine,
        compensate,
    };
    run_reporting(py, progress, |report| apply::apply(&opts, report).and_then(|s| to_json(&s)))
}

/// hywia's fusion, taylor, temperature, skip-first and skip-last options, as given.
type HywiaArgs<'a> = (Option<&'a str>, Option<&'a str>, Option<f64>, Option<usize>, Option<usize>);

#[allow(clippy::too_many_arguments)]
fn structured_options(
    model_dir: PathBuf,
    out_dir: PathBuf,
    method: &str,
    sparsity: f64,
    allocation: Option<&str>,
    width_multiple: Option<usize>,
    compensate: Option<bool>,
    stats: Option<PathBuf>,
    threads: Option<usize>,
    force: bool,
    provenance: Option<BTreeMap<String, String>>,
    (fusion, taylor, fusion_temperature, skip_first, skip_last): HywiaArgs<'_>,
    reconstruct: Option<(Option<PathBuf>, f64)>,
    layer_sparsity: Option<Vec<f64>>,
) -> PyResult<structured::StructuredOptions> {
    let given = fusion.is_some() || taylor.is_some() || fusion_temperature.is_some() || skip_first.is_some() || skip_last.is_some();
    let hywia = if given {
        let d = structured::HywiaOptions::default();
        Some(structured::HywiaOptions {
            fusion: fusion.map_or(Ok(d.fusion), str::parse).map_err(CoreError)?,
            taylor: taylor.map_or(Ok(d.taylor), str::parse).map_err(CoreError)?,
            temperature: fusion_temperature.unwrap_or(d.temperature),
            skip_first,
            skip_last,
        })
    } else {
        None
    };
    let method: StructMethod = method.parse().map_err(CoreError)?;
    let allocation = structured::GroupAllocation::parse(allocation.unwrap_or("uniform"), width_multiple).map_err(CoreError)?;
    Ok(structured::StructuredOptions {
        model_dir,
        out_dir,
        method,
        sparsity,
        allocation,
        compensate,
        stats,
        threads,
        force,
        provenance: provenance.unwrap_or_default(),
        hywia,
        reconstruct,
        layer_sparsity,
    })
}

/// Structured pruning of one decoder layer at any sparsity, as `apply_structured` with a schedule
/// writes it: what `llmprune search` builds its candidates from. Opened once (scores every layer).
#[pyclass(name = "StructuredPlanner", module = "llmprune._core")]
struct PyStructuredPlanner {
    inner: structured::LayerPlanner,
}

#[pymethods]
impl PyStructuredPlanner {
    #[new]
    #[pyo3(signature = (model_dir, method, *, width_multiple=None, compensate=None, stats=None, threads=None,
        fusion=None, taylor=None, fusion_temperature=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        model_dir: PathBuf,
        method: &str,
        width_multiple: Option<usize>,
        compensate: Option<bool>,
        stats: Option<PathBuf>,
        threads: Option<usize>,
        fusion: Option<&str>,
        taylor: Option<&str>,
        fusion_temperature: Option<f64>,
    ) -> PyResult<Self> {
        let opts = structured_options(
            model_dir.clone(),
            model_dir,
            method,
            0.0,
            Some("uniform"),
            width_multiple,
            compensate,
            stats,
            threads,
            false,
            None,
            (fusion, taylor, fusion_temperature, None, None),
            None,
            None,
        )?;
        let inner = detached(py, || structured::LayerPlanner::open(&opts))?;
        Ok(PyStructuredPlanner { inner })
    }

    #[getter]
    fn layers(&self) -> usize {
        self.inner.layers()
    }

    #[getter]
    fn compensate(&self) -> bool {
        self.inner.compensate()
    }

    #[getter]
    fn warnings(&self) -> Vec<String> {
        self.inner.warnings().to_vec()
    }

    /// Layer `layer` removing about `sparsity` of its parameters: {"attn_keep", "mlp_keep",
    /// "removed_params", "params", "slices": {tensor: (row ranges or None, column ranges or None)},
    /// "tensors": {tensor: (shape, float32 values)} for the biases computed or added}.
    fn layer<'py>(&self, py: Python<'py>, layer: usize, sparsity: f64) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
        use llmprune_core::structured::slice::Op;
        use pyo3::types::PyDict;
        let at = detached(py, || self.inner.layer(layer, sparsity))?;
        let out = PyDict::new(py);
        out.set_item("attn_keep", at.plan.attn_keep.clone())?;
        out.set_item("mlp_keep", at.plan.mlp_keep.clone())?;
        out.set_item("removed_params", at.removed_params)?;
        out.set_item("params", at.params)?;
        let slices = PyDict::new(py);
        let tensors = PyDict::new(py);
        let ranges = |r: &Option<Vec<std::ops::Range<usize>>>| r.as_ref().map(|v| v.iter().map(|r| (r.start, r.end)).collect::<Vec<_>>());
        let values = |dtype, data: &[u8]| PyArray1::from_vec(py, llmprune_core::io::dtype::decode(dtype, data));
        for (name, op) in &at.edits.ops {
            match op {
                Op::Slice { rows, cols } => slices.set_item(name, (ranges(rows), ranges(cols)))?,
                Op::Replace(data) => {
                    let dtype = self.inner.dtype_of(name).map_err(CoreError)?;
                    tensors.set_item(name, (py.None(), values(dtype, data)))?;
                }
                Op::Computed { shape, data } => {
                    let dtype = self.inner.dtype_of(name).map_err(CoreError)?;
                    tensors.set_item(name, (shape.clone(), values(dtype, data)))?;
                }
            }
        }
        for a in at.edits.added.values().flatten() {
            tensors.set_item(&a.name, (a.shape.clone(), values(a.dtype, &a.data)))?;
        }
        out.set_item("slices", slices)?;
        out.set_item("tensors", tensors)?;
        Ok(out)
    }
}

#[pyfunction]
#[pyo3(signature = (model_dir, out_dir, method, *, sparsity, allocation=None, width_multiple=None, compensate=None, stats=None,
    threads=None, force=false, provenance=None, progress=None, fusion=None, taylor=None, fusion_temperature=None,
    skip_first=None, skip_last=None, reconstruct=false, gram=None, damp=0.01, layer_sparsity=None))]
#[allow(clippy::too_many_arguments)]
fn apply_structured(
    py: Python<'_>,
    model_dir: PathBuf,
    out_dir: PathBuf,
    method: &str,
    sparsity: f64,
    allocation: Option<&str>,
    width_multiple: Option<usize>,
    compensate: Option<bool>,
    stats: Option<PathBuf>,
    threads: Option<usize>,
    force: bool,
    provenance: Option<BTreeMap<String, String>>,
    progress: Option<Py<PyAny>>,
    fusion: Option<&str>,
    taylor: Option<&str>,
    fusion_temperature: Option<f64>,
    skip_first: Option<usize>,
    skip_last: Option<usize>,
    reconstruct: bool,
    gram: Option<PathBuf>,
    damp: f64,
    layer_sparsity: Option<Vec<f64>>,
) -> PyResult<String> {
    let opts = structured_options(
        model_dir,
        out_dir,
        method,
        sparsity,
        allocation,
        width_multiple,
        compensate,
        stats,
        threads,
        force,
        provenance,
        (fusion, taylor, fusion_temperature, skip_first, skip_last),
        reconstruct.then_some((gram, damp)),
        layer_sparsity,
    )?;
    run_reporting(py, progress, |report| structured::apply_structured(&opts, report).and_then(|s| to_json(&s)))
}

#[pyfunction]
#[pyo3(signature = (weight, method, *, sparsity=None, pattern=None, scope="row",
    act_sum=None, act_sqsum=None, act_count=0, name="", threads=None, refine=None, dsnot_iters=None,
    dsnot_threshold=None, dsnot_skip=None, dsnot_same_sign=None))]
#[allow(clippy::too_many_arguments)]
fn compute_mask<'py>(
    py: Python<'py>,
    weight: PyReadonlyArray2<'py, f32>,
    method: &str,
    sparsity: Option<f64>,
    pattern: Option<(usize, usize)>,
    scope: &str,
    act_sum: Option<PyReadonlyArray1<'py, f64>>,
    act_sqsum: Option<PyReadonlyArray1<'py, f64>>,
    act_count: i64,
    name: &str,
    threads: Option<usize>,
    refine: Option<&str>,
    dsnot_iters: Option<usize>,
    dsnot_threshold: Option<f64>,
    dsnot_skip: Option<&str>,
    dsnot_same_sign: Option<bool>,
) -> PyResult<Bound<'py, PyAny>> {
    let m = parse_method(method)?;
    let refine = parse_refine(refine, dsnot_iters, dsnot_threshold, dsnot_skip, dsnot_same_sign)?;
    let t = target(sparsity, pattern)?;
    let sc = parse_scope(scope)?;
    t.validate(sc).map_err(CoreError)?;
    let (rows, cols) = (weight.shape()[0], weight.shape()[1]);
    let w = weight.as_slice().map_err(|_| InvalidArgumentError::new_err("weight must be a C-contiguous float32 array"))?;
    let stats = match (act_sum, act_sqsum) {
        (Some(s), Some(q)) => {
            let (s, q) = (s.as_slice()?.to_vec(), q.as_slice()?.to_vec());
            if s.len() != cols || q.len() != cols {
                return Err(InvalidArgumentError::new_err(format!("statistics have {} channels but the weight has {cols} input features", s.len())));
            }
            Some(llmprune_core::sidecar::LayerStats { act_sum: s, act_sqsum: q, count: act_count, input_axis: 1 })
        }
        (None, None) => None,
        _ => return Err(InvalidArgumentError::new_err("give both act_sum and act_sqsum, or neither")),
    };
    let factors = score::channel_factors(m, name, stats.as_ref()).map_err(CoreError)?;
    if let Some(r) = &refine {
        r.validate().map_err(CoreError)?;
        if sc == Scope::Layer || m == Method::SparseGpt {
            return Err(InvalidArgumentError::new_err("DSnoT refines row masks (unstructured or N:M) of magnitude, wanda, stade or stade-w"));
        }
        if stats.is_none() {
            return Err(InvalidArgumentError::new_err("DSnoT needs act_sum and act_sqsum"));
        }
    }
    let mask = detached(py, || {
        pool::pool(threads)?.install(|| {
            let mut mask = select::mask_matrix(w, rows, cols, factors.as_deref(), t, sc)?;
            if let (Some(r), Some(s)) = (refine.as_ref().filter(|r| r.applies_to(name)), stats.as_ref()) {
                llmprune_core::unstructured::dsnot::refine(w, rows, cols, factors.as_deref(), &s.means(), &s.variances(), &mut mask, r, t.group());
            }
            Ok(mask)
        })
    })?;
    Ok(PyArray1::from_vec(py, mask).reshape([rows, cols])?.into_any())
}

#[pyfunction]
#[pyo3(signature = (model_dir, input_axis=None))]
fn inspect(py: Python<'_>, model_dir: PathBuf, input_axis: Option<usize>) -> PyResult<String> {
    detached(py, || {
        let axis = input_axis.unwrap_or_else(|| prunable::default_input_axis(&model_dir));
        to_json(&llmprune_core::inspect::inspect(&model_dir, axis)?)
    })
}

/// The input axis assumed for weights no sidecar describes (0 for GPT-2's Conv1D checkpoints).
#[pyfunction]
fn default_input_axis(model_dir: PathBuf) -> usize {
    prunable::default_input_axis(&model_dir)
}

/// Every method the core implements, with what it needs: JSON
/// {"unstructured": [{"name", "needs_stats"}], "structured": [{"name", "needs_stats", "compensates", "allocation", "width_multiple"}],
/// "depth": [{"name", "needs_stats"}], "experts": [{"name", "needs_stats"}], "defaults": {"owl": {"m", "lambda"}, "dsnot": {"iters", "threshold", "skip"}}}.
#[pyfunction]
fn methods() -> String {
    let unstructured: Vec<_> = Method::ALL.iter().map(|m| serde_json::json!({"name": m.name(), "needs_stats": m.needs_stats()})).collect();
    let structured: Vec<_> = StructMethod::ALL
        .iter()
        .map(|m| {
            serde_json::json!({
                "name": m.name(),
                "needs_stats": m.needs_stats(),
                "compensates": m.compensates_by_default(),
                "width_multiple": structured::WIDTH_MULTIPLE,
                "allocation": structured::GroupAllocation::UNIFORM.name(),
            })
        })
        .collect();
    let d = DsnotOptions::default();
    let defaults = serde_json::json!({
        "owl": {"m": allocation::OWL_M, "lambda": allocation::OWL_LAMBDA},
        "dsnot": llmprune_core::unstructured::sequential::dsnot_meta(&d),
    });
    let depth = vec![serde_json::json!({"name": "block-influence", "needs_stats": true})];
    let experts: Vec<_> =
        llmprune_core::surgery::experts::ExpertMethod::ALL.iter().map(|m| serde_json::json!({"name": m.name(), "needs_stats": true})).collect();
    serde_json::json!({"unstructured": unstructured, "structured": structured, "depth": depth, "experts": experts, "defaults": defaults}).to_string()
}

/// SparseGPT on one [out, in] float32 weight with its input's Gram matrix H (float64 [in, in]),
/// exactly as `apply --method sparsegpt` (or `--update` with `mask`) runs it; returns (new weight,
/// mask with True = pruned, warnings).
#[pyfunction]
#[pyo3(signature = (weight, gram, *, sparsity=None, pattern=None, mask=None, damp=0.01, blocksize=128, threads=None))]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn sparsegpt<'py>(
    py: Python<'py>,
    weight: PyReadonlyArray2<'py, f32>,
    gram: PyReadonlyArray2<'py, f64>,
    sparsity: Option<f64>,
    pattern: Option<(usize, usize)>,
    mask: Option<PyReadonlyArray2<'py, bool>>,
    damp: f64,
    blocksize: usize,
    threads: Option<usize>,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>, Vec<String>)> {
    use llmprune_core::unstructured::sparsegpt::{prune_matrix, Selection, SparseGptOptions};
    let (rows, cols) = (weight.shape()[0], weight.shape()[1]);
    if gram.shape() != [cols, cols] {
        return Err(InvalidArgumentError::new_err(format!("gram must be [{cols}, {cols}], got {:?}", gram.shape())));
    }
    let mut w = weight.as_array().iter().copied().collect::<Vec<f32>>();
    let h: Vec<f32> = gram.as_array().iter().map(|&x| x as f32).collect();
    let fixed: Option<Vec<bool>> = match &mask {
        Some(m) if m.shape() == [rows, cols] => Some(m.as_array().iter().copied().collect()),
        Some(m) => return Err(InvalidArgumentError::new_err(format!("mask must be [{rows}, {cols}], got {:?}", m.shape()))),
        None => None,
    };
    let sel_target = match (&fixed, sparsity, pattern) {
        (None, _, _) => Some(target(sparsity, pattern)?),
        (Some(_), None, None) => None,
        _ => return Err(InvalidArgumentError::new_err("give a mask, or a sparsity or pattern, not both")),
    };
    let opts = SparseGptOptions { damp, blocksize };
    let (mask_out, warnings) = detached(py, || {
        opts.validate()?;
        if let Some(Target::Sparsity(s)) = sel_target {
            if !(0.0..1.0).contains(&s) {
                return Err(Error::arg(format!("sparsity must be in [0, 1), got {s}")));
            }
        }
        let pool = pool::pool(threads)?;
        let sel = match (&fixed, sel_target) {
            (Some(m), _) => Selection::Fixed(m),
            (None, Some(t)) => Selection::Target(t),
            (None, None) => return Err(Error::Internal("no selection".into())),
        };
        pool.install(|| prune_matrix("weight", &mut w, rows, cols, || Ok(h.clone()), sel, opts))
    })?;
    let w_out = PyArray1::from_vec(py, w).reshape([rows, cols])?.into_any();
    let m_out = PyArray1::from_vec(py, mask_out).reshape([rows, cols])?.into_any();
    Ok((w_out, m_out, warnings))
}

/// OWL's sparsity of every decoder block of the model in `model_dir`, from activation statistics
/// `layers` (name -> (act_sum, act_sqsum, count, input_axis)) of its prunable weights; what
/// `apply --allocation owl` computes from a sidecar. Used by the sequential pass, which needs the
/// allocation before it prunes block 0.
#[pyfunction]
#[pyo3(signature = (model_dir, layers, *, sparsity, owl_m=None, owl_lambda=None, threads=None))]
#[allow(clippy::type_complexity)]
fn owl_allocation(
    py: Python<'_>,
    model_dir: PathBuf,
    layers: BTreeMap<String, (Vec<f64>, Vec<f64>, i64, usize)>,
    sparsity: f64,
    owl_m: Option<f64>,
    owl_lambda: Option<f64>,
    threads: Option<usize>,
) -> PyResult<Vec<f64>> {
    let alloc = parse_allocation("owl", owl_m, owl_lambda, None)?;
    detached(py, || {
        let ckpt = llmprune_core::io::checkpoint::Checkpoint::open(&model_dir)?;
        let stats: BTreeMap<String, llmprune_core::sidecar::LayerStats> = layers
            .into_iter()
            .map(|(k, (act_sum, act_sqsum, count, input_axis))| (k, llmprune_core::sidecar::LayerStats { act_sum, act_sqsum, count, input_axis }))
            .collect();
        let prunable = stats.iter().map(|(k, s)| (k.clone(), prunable::Prunable { input_axis: s.input_axis })).collect();
        let pool = pool::pool(threads)?;
        let (_, per_block) =
            pool.install(|| allocation::resolve_targets(&ckpt, &prunable, Some(&stats), Target::Sparsity(sparsity), &alloc, None))?;
        per_block.ok_or_else(|| Error::Internal("OWL gave no block sparsities".into()))
    })
}

/// The config flag (`attention_bias`, `mlp_bias`) that lets linear `weight` of a `model_type` model
/// carry a bias it does not have, or None: the rule `apply --compensate` follows, for `stats
/// --sequential --compensate`.
#[pyfunction]
fn compensation_flag(model_type: &str, weight: &str) -> Option<&'static str> {
    llmprune_core::unstructured::compensate::bias_flag(model_type, weight)
}

/// The warning `apply` gives when a schedule's block sparsities do not average `sparsity`, or None:
/// for `stats --sequential --allocation FILE`.
#[pyfunction]
fn schedule_mean_warning(block_sparsity: Vec<f64>, sparsity: f64) -> Option<String> {
    allocation::schedule_mean_warning(&block_sparsity, sparsity)
}

/// The `sequential` metadata of a `stats --sequential` pass with these settings, validated as `apply`
/// validates its own, as JSON: what the stats and Gram sidecars record and `apply` compares with its
/// settings. `refine` and the `dsnot_*` options as for `compute_mask`; `block_sparsity`: the sparsity
/// each block was pruned at (owl: the one OWL chose; schedule: the schedule).
#[pyfunction]
#[pyo3(signature = (method, *, sparsity=None, pattern=None, update=false, allocation="uniform", owl_m=None, owl_lambda=None,
    block_sparsity=None, refine=None, dsnot_iters=None, dsnot_threshold=None, dsnot_skip=None, dsnot_same_sign=None, compensate=false))]
#[allow(clippy::too_many_arguments)]
fn sequential_settings(
    method: &str,
    sparsity: Option<f64>,
    pattern: Option<(usize, usize)>,
    update: bool,
    allocation: &str,
    owl_m: Option<f64>,
    owl_lambda: Option<f64>,
    block_sparsity: Option<Vec<f64>>,
    refine: Option<&str>,
    dsnot_iters: Option<usize>,
    dsnot_threshold: Option<f64>,
    dsnot_skip: Option<&str>,
    dsnot_same_sign: Option<bool>,
    compensate: bool,
) -> PyResult<String> {
    // a schedule is its block sparsities; OWL's are chosen by the pass and recorded beside it
    let (alloc, chosen) = match allocation {
        "owl" => (parse_allocation(allocation, owl_m, owl_lambda, None)?, block_sparsity),
        _ => (parse_allocation(allocation, owl_m, owl_lambda, block_sparsity)?, None),
    };
    let refine = parse_refine(refine, dsnot_iters, dsnot_threshold, dsnot_skip, dsnot_same_sign)?;
    let settings = SequentialSettings::new(parse_method(method)?, target(sparsity, pattern)?, update, &alloc, chosen, refine.as_ref(), compensate)
        .map_err(CoreError)?;
    Ok(settings.to_value().to_string())
}

/// Depth pruning (`apply --method block-influence`): removes whole decoder blocks by ShortGPT's
/// Block Influence from the stats sidecar; returns the JSON summary.
#[pyfunction]
#[pyo3(signature = (model_dir, out_dir, *, sparsity=None, remove_blocks=None, blocks=None, stats=None, threads=None, force=false,
    provenance=None, progress=None))]
#[allow(clippy::too_many_arguments)]
fn apply_depth(
    py: Python<'_>,
    model_dir: PathBuf,
    out_dir: PathBuf,
    sparsity: Option<f64>,
    remove_blocks: Option<usize>,
    blocks: Option<Vec<usize>>,
    stats: Option<PathBuf>,
    threads: Option<usize>,
    force: bool,
    provenance: Option<BTreeMap<String, String>>,
    progress: Option<Py<PyAny>>,
) -> PyResult<String> {
    use llmprune_core::surgery::depth::{DepthOptions, Removal};
    let removal = match (sparsity, remove_blocks, blocks) {
        (Some(s), None, None) => Removal::Sparsity(s),
        (None, Some(n), None) => Removal::Count(n),
        (None, None, Some(list)) => Removal::Blocks(list),
        _ => return Err(InvalidArgumentError::new_err("give exactly one of sparsity, remove_blocks or blocks")),
    };
    let opts = DepthOptions { model_dir, out_dir, removal, stats, threads, force, provenance: provenance.unwrap_or_default() };
    run_reporting(py, progress, |report| llmprune_core::surgery::depth::apply_depth(&opts, report).and_then(|s| to_json(&s)))
}

/// Expert pruning (`apply --method reap|frequency`): removes routed experts of every MoE layer by
/// the sidecar's routing statistics; returns the JSON summary.
#[pyfunction]
#[pyo3(signature = (model_dir, out_dir, method, *, sparsity=None, experts_keep=None, stats=None, threads=None, force=false,
    provenance=None, progress=None))]
#[allow(clippy::too_many_arguments)]
fn apply_experts(
    py: Python<'_>,
    model_dir: PathBuf,
    out_dir: PathBuf,
    method: &str,
    sparsity: Option<f64>,
    experts_keep: Option<usize>,
    stats: Option<PathBuf>,
    threads: Option<usize>,
    force: bool,
    provenance: Option<BTreeMap<String, String>>,
    progress: Option<Py<PyAny>>,
) -> PyResult<String> {
    use llmprune_core::surgery::experts::{ExpertOptions, ExpertRemoval};
    let removal = match (sparsity, experts_keep) {
        (Some(s), None) => ExpertRemoval::Sparsity(s),
        (None, Some(k)) => ExpertRemoval::Keep(k),
        _ => return Err(InvalidArgumentError::new_err("give exactly one of sparsity or experts_keep")),
    };
    let method = method.parse().map_err(CoreError)?;
    let opts = ExpertOptions { model_dir, out_dir, method, removal, stats, threads, force, provenance: provenance.unwrap_or_default() };
    run_reporting(py, progress, |report| llmprune_core::surgery::experts::apply_experts(&opts, report).and_then(|s| to_json(&s)))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(apply_experts, m)?)?;
    m.add_function(wrap_pyfunction!(apply_depth, m)?)?;
    m.add_function(wrap_pyfunction!(owl_allocation, m)?)?;
    m.add_function(wrap_pyfunction!(compensation_flag, m)?)?;
    m.add_function(wrap_pyfunction!(schedule_mean_warning, m)?)?;
    m.add_function(wrap_pyfunction!(sequential_settings, m)?)?;
    m.add_function(wrap_pyfunction!(sparsegpt, m)?)?;
    m.add_function(wrap_pyfunction!(apply_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(apply_structured, m)?)?;
    m.add_class::<PyStructuredPlanner>()?;
    m.add_function(wrap_pyfunction!(compute_mask, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(default_input_axis, m)?)?;
    m.add_function(wrap_pyfunction!(methods, m)?)?;
    Ok(())
}
