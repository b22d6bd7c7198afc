//! Writing a stats sidecar: validate everything first, encode the safetensors bytes, and write them
//! beside the destination under a temporary name that is renamed into place only when complete.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::{BlockStats, ExpertStats, GradStats, LayerStats, BLOCK_COS_SUM, BLOCK_COUNT, FORMAT, FORMAT_VERSION};
use crate::error::{Error, Result};
use crate::io::output::{atomic_write, check_not_input};

/// What the calibration pass knows besides the sums: the model it ran on, the calibration
/// settings, the mode (`dense` or `sequential` with its method and target) and, with gradients,
/// their settings. Each is recorded verbatim in the metadata (docs/sidecar.md).
#[derive(Debug, Clone)]
pub struct SidecarInfo {
    pub fingerprint: String,
    pub model_tensors: serde_json::Map<String, Value>,
    pub calibration: Value,
    pub mode: String,
    pub sequential: Value,
    pub grad: Value,
    /// Block Influence sums, when the pass saw every block.
    pub blocks: Option<BlockStats>,
    /// Routing statistics of the MoE layers.
    pub experts: BTreeMap<String, ExpertStats>,
}

/// The bytes of a v1 sidecar holding `layers` (and `grads`, which must cover the same weights).
pub fn encode(info: &SidecarInfo, layers: &BTreeMap<String, LayerStats>, grads: &BTreeMap<String, GradStats>) -> Result<Vec<u8>> {
    let bad = |msg: String| Error::arg(format!("cannot write statistics: {msg}"));
    match (info.mode.as_str(), info.sequential.is_null()) {
        ("dense", true) | ("sequential", false) => {}
        ("dense" | "sequential", _) => return Err(bad("sequential settings go with mode sequential, and only with it".into())),
        (m, _) => return Err(bad(format!("mode must be dense or sequential, not {m:?}"))),
    }
    if !grads.is_empty() && (grads.len() != layers.len() || info.grad.is_null()) {
        return Err(bad("gradient statistics must cover every weight and come with their settings".into()));
    }
    let mut layer_meta = serde_json::Map::new();
    let mut tensors: Vec<(String, &'static str, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, s) in layers {
        s.validate(name).map_err(bad)?;
        if s.input_axis > 1 {
            return Err(bad(format!("{name}: input_axis must be 0 or 1")));
        }
        layer_meta.insert(name.clone(), serde_json::json!({"input_axis": s.input_axis}));
        let n = s.act_sum.len();
        tensors.push((format!("{name}.act_sum"), "F64", vec![n], le_bytes(&s.act_sum)));
        tensors.push((format!("{name}.act_sqsum"), "F64", vec![n], le_bytes(&s.act_sqsum)));
        tensors.push((format!("{name}.act_count"), "I64", vec![1], s.count.to_le_bytes().to_vec()));
        if let Some(g) = grads.get(name) {
            let planes = GradStats::SPLITS * GradStats::QUANTITIES;
            if g.per_input.len() != planes * n || g.per_output.is_empty() || g.per_output.len() % planes != 0 {
                return Err(bad(format!("{name}: gradient statistics must be [3, 4, out] and [3, 4, {n}]")));
            }
            let c = g.count;
            if c.iter().any(|&x| x < 0) || c[0] < 1 || c[1] + c[2] != c[0] {
                return Err(bad(format!("{name}: impossible gradient sample counts {c:?}")));
            }
            if let Some(x) = g.per_output.iter().chain(&g.per_input).find(|x| !x.is_finite()) {
                return Err(bad(format!("{name}: gradient statistics hold a non-finite value ({x})")));
            }
            tensors.push((format!("{name}.grad_out"), "F64", vec![3, 4, g.out_features()], le_bytes(&g.per_output)));
            tensors.push((format!("{name}.grad_in"), "F64", vec![3, 4, n], le_bytes(&g.per_input)));
            let counts: Vec<u8> = c.iter().flat_map(|x| x.to_le_bytes()).collect();
            tensors.push((format!("{name}.grad_count"), "I64", vec![3], counts));
        } else if !grads.is_empty() {
            return Err(bad(format!("{name} has activation statistics but no gradient statistics")));
        }
    }
    if let Some(b) = &info.blocks {
        b.validate().map_err(bad)?;
        tensors.push((BLOCK_COS_SUM.into(), "F64", vec![b.cos_sum.len()], le_bytes(&b.cos_sum)));
        tensors.push((BLOCK_COUNT.into(), "I64", vec![b.count.len()], b.count.iter().flat_map(|x| x.to_le_bytes()).collect()));
    }
    let mut expert_meta = serde_json::Map::new();
    for (name, e) in &info.experts {
        e.validate(name).map_err(bad)?;
        let n = e.count.len();
        tensors.push((format!("{name}.expert_count"), "I64", vec![n], e.count.iter().flat_map(|x| x.to_le_bytes()).collect()));
        tensors.push((format!("{name}.expert_gate_sum"), "F64", vec![n], le_bytes(&e.gate_sum)));
        tensors.push((format!("{name}.expert_reap_sum"), "F64", vec![n], le_bytes(&e.reap_sum)));
        expert_meta.insert(name.clone(), serde_json::json!({"top_k": e.top_k, "num_experts": n}));
    }
    let meta = serde_json::json!({
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "llmprune_version": env!("CARGO_PKG_VERSION"),
        "model_fingerprint": info.fingerprint,
        "model_tensors": info.model_tensors,
        "calibration": info.calibration,
        "mode": info.mode,
        "sequential": info.sequential,
        "layers": layer_meta,
        "grad": if grads.is_empty() { Value::Null } else { info.grad.clone() },
        "experts": if expert_meta.is_empty() { Value::Null } else { Value::Object(expert_meta) },
    });
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"llmprune": meta.to_string()}));
    let mut offset = 0usize;
    for (key, dtype, shape, data) in &tensors {
        header.insert(key.clone(), serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + data.len()]}));
        offset += data.len();
    }
    let mut json = serde_json::to_vec(&Value::Object(header)).map_err(|e| bad(e.to_string()))?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut bytes = Vec::with_capacity(8 + json.len() + offset);
    bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&json);
    for (_, _, _, data) in &tensors {
        bytes.extend_from_slice(data);
    }
    Ok(bytes)
}

/// Validates and writes a sidecar to `path` atomically. `inputs` are files the caller reads from
/// (a merge's sidecars): the destination may not be one of them.
pub fn write(
    path: &Path,
    info: &SidecarInfo,
    layers: &BTreeMap<String, LayerStats>,
    grads: &BTreeMap<String, GradStats>,
    inputs: &[&Path],
) -> Result<()> {
    let bytes = encode(info, layers, grads)?;
    for input in inputs {
        check_not_input(path, input)?;
    }
    atomic_write(path, &bytes)
}

fn le_bytes(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
