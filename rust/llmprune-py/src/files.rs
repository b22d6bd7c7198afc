//! Bindings of the core's file formats, so that Python never parses or writes them itself: the
//! validated checkpoint view, the staging directory, the copy of a model's other files, and the
//! stats sidecar (read, write, merge).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use llmprune_core::error::Error;
use llmprune_core::io::checkpoint::{dtype_name, Checkpoint, INDEX_FILE};
use llmprune_core::io::output::{copy_other_files, write_index, StagingDir};
use llmprune_core::sidecar::{self, gram, BlockStats, ExpertStats, GradStats, LayerStats, Sidecar, SidecarInfo};
use numpy::{PyArray1, PyReadonlyArray1, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use serde_json::Value;

use crate::{detached, CoreError};

fn json_err(what: &str, e: serde_json::Error) -> CoreError {
    CoreError(Error::arg(format!("{what} is not valid JSON: {e}")))
}

/// Opens and validates a checkpoint exactly as `apply` does. JSON: {"dir", "files": [shard names],
/// "fingerprint", "tensors": {name: [file, dtype, shape]}}; `model_tensors` maps each name to its
/// `DTYPE[d0,d1]` description (the sidecar's record of the model).
#[pyfunction]
fn open_checkpoint(py: Python<'_>, model_dir: PathBuf) -> PyResult<String> {
    detached(py, || {
        let ckpt = Checkpoint::open(&model_dir)?;
        let tensors: serde_json::Map<String, Value> =
            ckpt.tensors().map(|(s, t)| (t.name.clone(), serde_json::json!([s.file_name, dtype_name(t.dtype), t.shape]))).collect();
        let doc = serde_json::json!({
            "dir": ckpt.dir,
            "files": ckpt.shards.iter().map(|s| s.file_name.clone()).collect::<Vec<_>>(),
            "fingerprint": ckpt.fingerprint(),
            "tensors": tensors,
            "model_tensors": ckpt.describe(),
        });
        Ok(doc.to_string())
    })
}

/// A directory beside `target` that becomes `target` on `commit()`; `close()` (or garbage
/// collection) without a commit deletes it with everything written.
#[pyclass(name = "StagingDir", module = "llmprune._core")]
struct PyStagingDir {
    inner: Option<StagingDir>,
    #[pyo3(get)]
    path: PathBuf,
    #[pyo3(get)]
    target: PathBuf,
    #[pyo3(get)]
    warnings: Vec<String>,
}

#[pymethods]
impl PyStagingDir {
    #[new]
    #[pyo3(signature = (model_dir, target, force=false))]
    fn new(py: Python<'_>, model_dir: PathBuf, target: PathBuf, force: bool) -> PyResult<Self> {
        let st = detached(py, || StagingDir::prepare(&model_dir, &target, force))?;
        Ok(PyStagingDir { path: st.path.clone(), target: st.target().to_path_buf(), warnings: st.warnings.clone(), inner: Some(st) })
    }

    /// Renames the finished output into place; returns the target.
    fn commit(&mut self, py: Python<'_>) -> PyResult<PathBuf> {
        let st = self.inner.take().ok_or_else(|| CoreError(Error::Internal("staging directory already committed or closed".into())))?;
        detached(py, || st.commit())
    }

    /// Removes the staging directory unless it was committed.
    fn close(&mut self) {
        self.inner.take();
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(&mut self, _t: Option<Bound<'_, PyAny>>, _v: Option<Bound<'_, PyAny>>, _tb: Option<Bound<'_, PyAny>>) -> bool {
        self.close();
        false
    }
}

/// Copies every file of `model_dir` that is not part of the weights (tokenizer, generation config,
/// ...) into `dst`, except the top-level names in `rewritten`, under the symbolic-link policy.
#[pyfunction]
#[pyo3(signature = (model_dir, dst, rewritten=Vec::new(), with_index=false))]
fn copy_model_files(py: Python<'_>, model_dir: PathBuf, dst: PathBuf, rewritten: Vec<String>, with_index: bool) -> PyResult<()> {
    detached(py, || {
        let ckpt = Checkpoint::open(&model_dir)?;
        // the stats sidecar describes the input's weights, not the output's
        let names: Vec<&str> = rewritten.iter().map(String::as_str).chain([sidecar::DEFAULT_SIDECAR, gram::DEFAULT_GRAM]).collect();
        copy_other_files(&ckpt, &dst, &names)?;
        match (&ckpt.index, with_index) {
            // the same tensors in the same shards: only the index's total size is recomputed
            (Some(index), true) => {
                let total = ckpt.tensors().map(|(_, t)| t.nbytes() as u64).sum();
                write_index(index, total, None, &dst.join(INDEX_FILE))
            }
            _ => Ok(()),
        }
    })
}

type PyLayer<'py> = (Bound<'py, PyArray1<f64>>, Bound<'py, PyArray1<f64>>, i64, usize);
type PyGrad<'py> = (Bound<'py, PyArray1<f64>>, Bound<'py, PyArray1<f64>>, [i64; 3]);

/// Reads and validates a sidecar: (metadata JSON, {name: (act_sum, act_sqsum, act_count,
/// input_axis)}, {name: (grad_out, grad_in, grad_count)}) with the gradient arrays flattened from
/// [3, 4, n].
#[pyfunction]
#[allow(clippy::type_complexity)]
fn read_sidecar<'py>(
    py: Python<'py>,
    path: PathBuf,
) -> PyResult<(String, BTreeMap<String, PyLayer<'py>>, BTreeMap<String, PyGrad<'py>>, Option<(Vec<f64>, Vec<i64>)>)> {
    let sc = detached(py, || Sidecar::open(&path))?;
    let meta = Value::Object(sc.meta).to_string();
    let layers = sc
        .layers
        .into_iter()
        .map(|(k, s)| (k, (PyArray1::from_vec(py, s.act_sum), PyArray1::from_vec(py, s.act_sqsum), s.count, s.input_axis)))
        .collect();
    let grads =
        sc.grads.into_iter().map(|(k, g)| (k, (PyArray1::from_vec(py, g.per_output), PyArray1::from_vec(py, g.per_input), g.count))).collect();
    let blocks = sc.blocks.map(|b| (b.cos_sum, b.count));
    Ok((meta, layers, grads, blocks))
}

fn vec_of(a: &PyReadonlyArray1<'_, f64>) -> PyResult<Vec<f64>> {
    Ok(a.as_array().iter().copied().collect())
}

/// Validates and writes a sidecar for the checkpoint in `model_dir` (its fingerprint and tensor
/// list are recorded). `layers`: {name: (act_sum, act_sqsum, act_count, input_axis)}; `grads`:
/// {name: (grad_out, grad_in, grad_count)} flattened from [3, 4, n]; `info`: JSON with
/// calibration, mode, sequential and grad (docs/sidecar.md).
#[pyfunction]
#[pyo3(signature = (path, model_dir, layers, info, grads=None))]
fn write_sidecar(
    py: Python<'_>,
    path: PathBuf,
    model_dir: PathBuf,
    layers: &Bound<'_, PyDict>,
    info: &str,
    grads: Option<&Bound<'_, PyDict>>,
) -> PyResult<()> {
    let mut stats = BTreeMap::new();
    for (k, v) in layers.iter() {
        let name: String = k.extract()?;
        let (s, q, count, axis): (PyReadonlyArray1<f64>, PyReadonlyArray1<f64>, i64, usize) = v.extract()?;
        stats.insert(name, LayerStats { act_sum: vec_of(&s)?, act_sqsum: vec_of(&q)?, count, input_axis: axis });
    }
    let mut grad_stats = BTreeMap::new();
    for (k, v) in grads.map(|g| g.iter().collect::<Vec<_>>()).unwrap_or_default() {
        let name: String = k.extract()?;
        let (o, i, c): (PyReadonlyArray1<f64>, PyReadonlyArray1<f64>, [i64; 3]) = v.extract()?;
        if o.len() == 0 {
            return Err(CoreError(Error::arg(format!("{name}: empty gradient statistics"))).into());
        }
        grad_stats.insert(name, GradStats { per_output: vec_of(&o)?, per_input: vec_of(&i)?, count: c });
    }
    let info: serde_json::Map<String, Value> = serde_json::from_str(info).map_err(|e| json_err("info", e))?;
    let field = |k: &str| info.get(k).cloned().unwrap_or(Value::Null);
    let blocks = match info.get("blocks") {
        None | Some(Value::Null) => None,
        Some(b) => {
            let nums = |k: &str| b.get(k).and_then(Value::as_array).cloned().unwrap_or_default();
            let cos_sum: Option<Vec<f64>> = nums("cos_sum").iter().map(Value::as_f64).collect();
            let count: Option<Vec<i64>> = nums("count").iter().map(Value::as_i64).collect();
            match (cos_sum, count) {
                (Some(cos_sum), Some(count)) => Some(BlockStats { cos_sum, count }),
                _ => return Err(CoreError(Error::arg("info.blocks needs numeric cos_sum and count lists")).into()),
            }
        }
    };
    let mut experts = BTreeMap::new();
    if let Some(Value::Object(table)) = info.get("experts") {
        for (name, e) in table {
            let nums = |k: &str| e.get(k).and_then(Value::as_array).cloned().unwrap_or_default();
            let f = |k: &str| nums(k).iter().map(Value::as_f64).collect::<Option<Vec<f64>>>();
            let count = nums("count").iter().map(Value::as_i64).collect::<Option<Vec<i64>>>();
            let top_k = e.get("top_k").and_then(Value::as_u64);
            match (count, f("gate_sum"), f("reap_sum"), top_k) {
                (Some(count), Some(gate_sum), Some(reap_sum), Some(k)) => {
                    experts.insert(name.clone(), ExpertStats { count, gate_sum, reap_sum, top_k: k as usize });
                }
                _ => return Err(CoreError(Error::arg(format!("info.experts.{name} needs count, gate_sum, reap_sum and top_k"))).into()),
            }
        }
    }
    detached(py, || {
        let ckpt = Checkpoint::open(&model_dir)?;
        let model_tensors = ckpt.describe().into_iter().map(|(k, v)| (k, Value::from(v))).collect();
        let info = SidecarInfo {
            fingerprint: ckpt.fingerprint(),
            model_tensors,
            calibration: field("calibration"),
            mode: info.get("mode").and_then(Value::as_str).unwrap_or("dense").to_string(),
            sequential: field("sequential"),
            grad: field("grad"),
            blocks,
            experts,
        };
        for name in stats.keys() {
            if ckpt.get(name).is_none() {
                return Err(Error::arg(format!("statistics name {name}, which is not a tensor of {}", model_dir.display())));
            }
        }
        let inputs: Vec<&Path> = ckpt.shards.iter().map(|s| s.path.as_path()).collect();
        sidecar::write(&path, &info, &stats, &grad_stats, &inputs)
    })
}

/// Checks before a long pass that a sidecar can be written at `path` (see `atomic_write`).
#[pyfunction]
fn check_file_destination(py: Python<'_>, path: PathBuf) -> PyResult<()> {
    detached(py, || llmprune_core::io::output::check_file_destination(&path))
}

/// `stats merge`: sums sidecars of one model taken on disjoint calibration sets into `out`;
/// returns a JSON summary.
#[pyfunction]
fn merge_sidecars(py: Python<'_>, paths: Vec<PathBuf>, out: PathBuf) -> PyResult<String> {
    detached(py, || {
        let summary = sidecar::merge(&paths, &out)?;
        serde_json::to_string(&summary).map_err(|e| Error::Internal(e.to_string()))
    })
}

/// Every input of a Gram sidecar: (key, [(weight, input axis)], features).
type GramLayout = Vec<(String, Vec<(String, usize)>, usize)>;

/// Writes a Gram sidecar one matrix at a time (docs/sidecar.md): `write(key, packed, count)` for
/// every input of the layout, then `finish()`; leaving a with block unfinished removes the file.
#[pyclass(name = "GramWriter", module = "llmprune._core")]
struct PyGramWriter {
    inner: Option<gram::GramWriter>,
}

#[pymethods]
impl PyGramWriter {
    #[new]
    fn new(py: Python<'_>, path: PathBuf, model_dir: PathBuf, layout: GramLayout, info: &str) -> PyResult<Self> {
        let info: serde_json::Map<String, Value> = serde_json::from_str(info).map_err(|e| json_err("info", e))?;
        let field = |k: &str| info.get(k).cloned().unwrap_or(Value::Null);
        let info = gram::GramInfo {
            calibration: field("calibration"),
            mode: info.get("mode").and_then(Value::as_str).unwrap_or("dense").to_string(),
            sequential: field("sequential"),
            storage: match info.get("storage").and_then(Value::as_str) {
                None => gram::Storage::F64,
                Some(name) => gram::Storage::parse(name)
                    .ok_or_else(|| CoreError(Error::arg(format!("Gram storage must be float64 or float32, not {name:?}"))))?,
            },
        };
        let groups = layout.into_iter().map(|(key, weights, features)| gram::GramGroup { key, weights, features }).collect();
        let w = detached(py, || {
            let ckpt = Checkpoint::open(&model_dir)?;
            gram::GramWriter::create(&path, &ckpt, groups, &info)
        })?;
        Ok(PyGramWriter { inner: Some(w) })
    }

    fn write(&mut self, py: Python<'_>, key: &str, packed: PyReadonlyArray1<'_, f64>, count: i64) -> PyResult<()> {
        let data = packed.as_slice().map_err(|_| CoreError(Error::arg("packed must be a contiguous float64 array")))?;
        let w = self.inner.as_mut().ok_or_else(|| CoreError(Error::arg("the Gram writer is closed")))?;
        py.detach(|| crate::guarded(|| w.write(key, data, count))).map_err(|e| CoreError(e).into())
    }

    fn finish(&mut self, py: Python<'_>) -> PyResult<PathBuf> {
        let w = self.inner.take().ok_or_else(|| CoreError(Error::arg("the Gram writer is closed")))?;
        detached(py, || w.finish())
    }

    fn close(&mut self) {
        self.inner.take();
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(&mut self, _t: Option<Bound<'_, PyAny>>, _v: Option<Bound<'_, PyAny>>, _tb: Option<Bound<'_, PyAny>>) -> bool {
        self.close();
        false
    }
}

/// Reads a whole Gram sidecar (for tests and small models): (metadata JSON, {key: (weights,
/// packed float64, count)}).
#[pyfunction]
#[allow(clippy::type_complexity)]
fn read_gram<'py>(py: Python<'py>, path: PathBuf) -> PyResult<(String, BTreeMap<String, (Vec<String>, Bound<'py, PyArray1<f64>>, i64)>)> {
    let (meta, groups) = detached(py, || {
        let g = gram::Gram::open(&path)?;
        let mut out = Vec::new();
        for (key, grp) in &g.groups {
            let (packed, count) = g.packed(key)?;
            out.push((key.clone(), grp.weights.iter().map(|(w, _)| w.clone()).collect::<Vec<_>>(), packed, count));
        }
        Ok((Value::Object(g.meta).to_string(), out))
    })?;
    Ok((meta, groups.into_iter().map(|(k, w, p, c)| (k, (w, PyArray1::from_vec(py, p), c))).collect()))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyStagingDir>()?;
    m.add_class::<PyGramWriter>()?;
    m.add_function(wrap_pyfunction!(read_gram, m)?)?;
    m.add("DEFAULT_GRAM", gram::DEFAULT_GRAM)?;
    m.add_function(wrap_pyfunction!(open_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(copy_model_files, m)?)?;
    m.add_function(wrap_pyfunction!(read_sidecar, m)?)?;
    m.add_function(wrap_pyfunction!(write_sidecar, m)?)?;
    m.add_function(wrap_pyfunction!(merge_sidecars, m)?)?;
    m.add_function(wrap_pyfunction!(check_file_destination, m)?)?;
    Ok(())
}
