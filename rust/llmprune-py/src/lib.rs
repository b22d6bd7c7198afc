//! Python bindings of llmprune-core: convert arguments, release the GIL, map errors. Nothing else.

use std::collections::BTreeMap;
use std::path::PathBuf;

use llmprune_core::error::Error;
use llmprune_core::{apply, score, select, structured, ApplyOptions, Method, Scope, Target};
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyFileNotFoundError, PyPermissionError};
use pyo3::prelude::*;

create_exception!(_core, LlmpruneError, PyException);
create_exception!(_core, InvalidCheckpointError, LlmpruneError);
create_exception!(_core, InvalidStatsError, LlmpruneError);
create_exception!(_core, StatsMismatchError, LlmpruneError);
create_exception!(_core, InvalidArgumentError, LlmpruneError);
create_exception!(_core, TensorError, LlmpruneError);
create_exception!(_core, OutputError, LlmpruneError);

struct CoreError(Error);

impl From<Error> for CoreError {
    fn from(e: Error) -> Self {
        CoreError(e)
    }
}

impl From<CoreError> for PyErr {
    fn from(CoreError(e): CoreError) -> PyErr {
        let msg = e.to_string();
        match &e {
            Error::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
                std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(msg),
                _ => OutputError::new_err(msg),
            },
            Error::InvalidCheckpoint { .. } => InvalidCheckpointError::new_err(msg),
            Error::InvalidStats { .. } => InvalidStatsError::new_err(msg),
            Error::StatsMismatch { .. } => StatsMismatchError::new_err(msg),
            Error::Tensor { .. } => TensorError::new_err(msg),
            Error::InvalidArgument(_) => InvalidArgumentError::new_err(msg),
            Error::Output { .. } => OutputError::new_err(msg),
            Error::Interrupted => pyo3::exceptions::PyKeyboardInterrupt::new_err(msg),
        }
    }
}

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

fn parse_method(s: &str) -> PyResult<Method> {
    s.parse::<Method>().map_err(|e| CoreError(e).into())
}

/// Runs a long core call without the GIL, calling `progress(tensor, bytes_done, bytes_total,
/// tensors_done, tensors_total)` after every tensor and checking for Ctrl-C; returns the JSON summary.
/// An exception raised by the callback (or KeyboardInterrupt) stops the run and is re-raised.
fn run_reporting(
    py: Python<'_>,
    progress: Option<Py<PyAny>>,
    work: impl FnOnce(&mut dyn FnMut(apply::Progress) -> llmprune_core::Result<()>) -> llmprune_core::Result<String> + Send,
) -> PyResult<String> {
    let mut callback_error: Option<PyErr> = None;
    let result = py.detach(|| {
        let mut report = |p: apply::Progress| -> llmprune_core::Result<()> {
            Python::attach(|py| {
                let outcome = py.check_signals().and_then(|_| match &progress {
                    Some(cb) => cb
                        .call1(py, (p.tensor, p.bytes_done, p.bytes_total, p.tensors_done, p.tensors_total))
                        .map(|_| ()),
                    None => Ok(()),
                });
                outcome.map_err(|e| {
                    callback_error = Some(e);
                    Error::Interrupted
                })
            })
        };
        work(&mut report)
    });
    match (result, callback_error) {
        (Ok(summary), _) => Ok(summary),
        (Err(_), Some(py_err)) => Err(py_err),
        (Err(e), None) => Err(CoreError(e).into()),
    }
}

#[pyfunction]
#[pyo3(name = "apply", signature = (model_dir, out_dir, method, *, sparsity=None, pattern=None, scope="row",
    stats=None, threads=None, include=Vec::new(), exclude=Vec::new(), input_axis=1, force=false,
    provenance=None, progress=None, check_only=false))]
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
    input_axis: usize,
    force: bool,
    provenance: Option<BTreeMap<String, String>>,
    progress: Option<Py<PyAny>>,
    check_only: bool,
) -> PyResult<String> {
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
        default_input_axis: input_axis,
        force,
        provenance: provenance.unwrap_or_default(),
        check_only,
    };
    run_reporting(py, progress, |report| apply::apply(&opts, report).map(|s| serde_json::to_string(&s).expect("summary serializes")))
}

#[pyfunction]
#[pyo3(signature = (model_dir, out_dir, method, *, sparsity, allocation="global", compensate=None, stats=None,
    threads=None, force=false, provenance=None, progress=None, fusion=None, taylor=None, fusion_temperature=None,
    skip_first=None, skip_last=None))]
#[allow(clippy::too_many_arguments)]
fn apply_structured(
    py: Python<'_>,
    model_dir: PathBuf,
    out_dir: PathBuf,
    method: &str,
    sparsity: f64,
    allocation: &str,
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
) -> PyResult<String> {
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
    let opts = structured::StructuredOptions {
        model_dir,
        out_dir,
        method: method.parse().map_err(CoreError)?,
        sparsity,
        allocation: allocation.parse().map_err(CoreError)?,
        compensate,
        stats,
        threads,
        force,
        provenance: provenance.unwrap_or_default(),
        hywia,
    };
    run_reporting(py, progress, |report| structured::apply_structured(&opts, report).map(|s| serde_json::to_string(&s).expect("summary serializes")))
}

#[pyfunction]
#[pyo3(signature = (weight, method, *, sparsity=None, pattern=None, scope="row",
    act_sum=None, act_sqsum=None, act_count=0, name="", threads=None))]
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
) -> PyResult<Bound<'py, PyAny>> {
    let m = parse_method(method)?;
    let t = target(sparsity, pattern)?;
    let sc = parse_scope(scope)?;
    t.validate(sc).map_err(CoreError)?;
    let (rows, cols) = (weight.shape()[0], weight.shape()[1]);
    let w = weight
        .as_slice()
        .map_err(|_| InvalidArgumentError::new_err("weight must be a C-contiguous float32 array"))?;
    let stats = match (act_sum, act_sqsum) {
        (Some(s), Some(q)) => {
            let (s, q) = (s.as_slice()?.to_vec(), q.as_slice()?.to_vec());
            if s.len() != cols || q.len() != cols {
                return Err(InvalidArgumentError::new_err(format!(
                    "statistics have {} channels but the weight has {cols} input features",
                    s.len()
                )));
            }
            Some(llmprune_core::sidecar::LayerStats { act_sum: s, act_sqsum: q, count: act_count, input_axis: 1 })
        }
        (None, None) => None,
        _ => return Err(InvalidArgumentError::new_err("give both act_sum and act_sqsum, or neither")),
    };
    let factors = score::channel_factors(m, name, stats.as_ref()).map_err(CoreError)?;
    let pool = apply::build_pool(threads).map_err(CoreError)?;
    let mask = py
        .detach(|| pool.install(|| select::mask_matrix(w, rows, cols, factors.as_deref(), t, sc)))
        .map_err(CoreError)?;
    Ok(PyArray1::from_vec(py, mask).reshape([rows, cols])?.into_any())
}

#[pyfunction]
#[pyo3(signature = (model_dir, input_axis=1))]
fn inspect(py: Python<'_>, model_dir: PathBuf, input_axis: usize) -> PyResult<String> {
    let report = py
        .detach(|| llmprune_core::inspect::inspect(&model_dir, input_axis))
        .map_err(CoreError)?;
    Ok(serde_json::to_string(&report).expect("report serializes"))
}

#[pyfunction]
fn describe_model(py: Python<'_>, model_dir: PathBuf) -> PyResult<String> {
    let (fingerprint, tensors) = py
        .detach(|| {
            let ckpt = llmprune_core::checkpoint::Checkpoint::open(&model_dir)?;
            Ok::<_, Error>((ckpt.fingerprint(), ckpt.describe()))
        })
        .map_err(CoreError)?;
    Ok(serde_json::json!({"fingerprint": fingerprint, "tensors": tensors}).to_string())
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("LlmpruneError", py.get_type::<LlmpruneError>())?;
    m.add("InvalidCheckpointError", py.get_type::<InvalidCheckpointError>())?;
    m.add("InvalidStatsError", py.get_type::<InvalidStatsError>())?;
    m.add("StatsMismatchError", py.get_type::<StatsMismatchError>())?;
    m.add("InvalidArgumentError", py.get_type::<InvalidArgumentError>())?;
    m.add("TensorError", py.get_type::<TensorError>())?;
    m.add("OutputError", py.get_type::<OutputError>())?;
    m.add_function(wrap_pyfunction!(apply_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(apply_structured, m)?)?;
    m.add_function(wrap_pyfunction!(compute_mask, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(describe_model, m)?)?;
    Ok(())
}
