//! The stats sidecar v1 (docs/sidecar.md): reading and validating it (here), writing it
//! atomically (`write`), merging sidecars of disjoint calibration sets (`merge`), and the settings
//! of a sequential pass (`sequential`). Python never
//! parses or writes this format itself; it asks the core through the bindings.

pub mod gram;
mod merge;
mod sequential;
mod write;

pub use merge::{merge, MergeSummary};
pub use sequential::{DsnotSettings, SequentialSettings};
pub use write::{encode, write, SidecarInfo};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::checkpoint::{hex, Checkpoint};

/// Default location of the stats sidecar inside a model directory; never copied into outputs.
pub const DEFAULT_SIDECAR: &str = "llmprune-stats.safetensors";
pub const FORMAT: &str = "llmprune-stats";
pub const FORMAT_VERSION: u64 = 1;

/// The sidecar to use for a model: the one given, else the default one when it exists.
pub fn locate(model_dir: &Path, explicit: Option<&Path>) -> Option<PathBuf> {
    match explicit {
        Some(p) => Some(p.to_path_buf()),
        None => {
            let p = model_dir.join(DEFAULT_SIDECAR);
            p.is_file().then_some(p)
        }
    }
}

/// Refuses a sidecar path that names no file: missing, or a directory (`what` names the kind of
/// file, `option` how a command producing it is run: `--gram` for Gram sidecars).
pub fn check_is_file(path: &Path, what: &str, option: &str) -> Result<()> {
    let (default, make) =
        if option == "--gram" { (gram::DEFAULT_GRAM, "llmprune stats MODEL --gram") } else { (DEFAULT_SIDECAR, "llmprune stats MODEL") };
    if path.is_dir() {
        return Err(Error::arg_hint(
            format!("{} is a directory, not a {what} file", path.display()),
            format!("give the file itself, e.g. {}", path.join(default).display()),
        ));
    }
    if !path.exists() {
        return Err(Error::arg_hint(format!("{what} {} not found", path.display()), format!("check the path, or compute one with `{make}`")));
    }
    if !path.is_file() {
        return Err(Error::arg(format!("{what} {} is not a regular file", path.display())));
    }
    Ok(())
}

/// Per-input-channel statistics of one prunable weight.
#[derive(Debug, Clone)]
pub struct LayerStats {
    pub act_sum: Vec<f64>,
    pub act_sqsum: Vec<f64>,
    pub count: i64,
    /// Axis of the stored weight that indexes input features (1 for [out, in], 0 for [in, out]).
    pub input_axis: usize,
}

impl LayerStats {
    /// Mean per channel: Σx / n.
    pub fn means(&self) -> Vec<f64> {
        let n = self.count as f64;
        self.act_sum.iter().map(|&s| s / n).collect()
    }

    /// Unbiased variance per channel, (Σx² − n·μ²) / (n − 1), clamped at 0 (rounding can make a
    /// constant channel's negative).
    pub fn variances(&self) -> Vec<f64> {
        let n = self.count as f64;
        self.act_sum
            .iter()
            .zip(&self.act_sqsum)
            .map(|(&sum, &sq)| {
                let mu = sum / n;
                ((sq - n * mu * mu) / (n - 1.0)).max(0.0)
            })
            .collect()
    }

    /// Refuses statistics no calibration pass can produce: non-finite sums, a negative Σx², a
    /// count below one, or Σx² smaller than (Σx)²/n beyond rounding (a negative variance).
    pub fn validate(&self, name: &str) -> std::result::Result<(), String> {
        if self.act_sum.len() != self.act_sqsum.len() {
            return Err(format!("{name}: act_sum has {} channels but act_sqsum {}", self.act_sum.len(), self.act_sqsum.len()));
        }
        if self.count < 1 {
            return Err(format!("{name}.act_count is {}; a token count must be at least 1", self.count));
        }
        let n = self.count as f64;
        for (j, (&s, &q)) in self.act_sum.iter().zip(&self.act_sqsum).enumerate() {
            if !s.is_finite() {
                return Err(format!("{name}.act_sum holds a non-finite value ({s}) at channel {j}"));
            }
            if !q.is_finite() {
                return Err(format!("{name}.act_sqsum holds a non-finite value ({q}) at channel {j}"));
            }
            if q < 0.0 {
                return Err(format!("{name}.act_sqsum is negative ({q}) at channel {j}"));
            }
            // n·Σx² ≥ (Σx)² for any real data; allow rounding of accumulations in low precision.
            if n * q < s * s * (1.0 - 1e-3) - f64::MIN_POSITIVE {
                return Err(format!(
                    "{name}: channel {j} has Σx² = {q} below (Σx)²/n = {} (a negative variance): not statistics of real activations",
                    s * s / n
                ));
            }
        }
        Ok(())
    }
}

/// Gradient statistics of one prunable weight (`llmprune stats --grad`), each [split, quantity,
/// feature] flattened row-major: split 0 all samples, 1 the even-indexed ones (A), 2 the odd (B);
/// quantity 0 Σ|w·g|, 1 Σw·g, 2 Σw²·F, 3 Σ|w·g − ½w²·F| (see docs/hywia.md).
#[derive(Debug, Clone)]
pub struct GradStats {
    /// Per output row, summed over the input axis: [3, 4, out_features].
    pub per_output: Vec<f64>,
    /// Per input column, summed over the output axis: [3, 4, in_features].
    pub per_input: Vec<f64>,
    /// Samples in split all / A / B.
    pub count: [i64; 3],
}

impl GradStats {
    pub const SPLITS: usize = 3;
    pub const QUANTITIES: usize = 4;

    fn plane(v: &[f64], split: usize, quantity: usize) -> &[f64] {
        let n = v.len() / (Self::SPLITS * Self::QUANTITIES);
        let at = (split * Self::QUANTITIES + quantity) * n;
        &v[at..at + n]
    }

    /// One quantity of one split, per output row.
    pub fn rows(&self, split: usize, quantity: usize) -> &[f64] {
        Self::plane(&self.per_output, split, quantity)
    }

    /// One quantity of one split, per input column.
    pub fn cols(&self, split: usize, quantity: usize) -> &[f64] {
        Self::plane(&self.per_input, split, quantity)
    }

    pub fn out_features(&self) -> usize {
        self.per_output.len() / (Self::SPLITS * Self::QUANTITIES)
    }
}

/// Per decoder block, over the calibration tokens: Σ cos(block input, block output) and the token
/// count (ShortGPT's Block Influence is 1 − their ratio). Stored as `block_influence.cos_sum` (F64
/// [blocks]) and `block_influence.count` (I64 [blocks]); additive like every other sum.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockStats {
    pub cos_sum: Vec<f64>,
    pub count: Vec<i64>,
}

pub const BLOCK_COS_SUM: &str = "block_influence.cos_sum";
pub const BLOCK_COUNT: &str = "block_influence.count";

impl BlockStats {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.cos_sum.is_empty() || self.cos_sum.len() != self.count.len() {
            return Err(format!("block statistics need one cosine sum and one count per block, got {} and {}", self.cos_sum.len(), self.count.len()));
        }
        for (b, (&c, &n)) in self.cos_sum.iter().zip(&self.count).enumerate() {
            if n < 1 {
                return Err(format!("block {b}: token count {n} < 1"));
            }
            if !c.is_finite() || c.abs() > n as f64 * (1.0 + 1e-6) {
                return Err(format!("block {b}: impossible cosine sum {c} over {n} tokens"));
            }
        }
        Ok(())
    }

    /// ShortGPT's Block Influence per block: 1 − mean cosine of its input and output.
    pub fn influence(&self) -> Vec<f64> {
        self.cos_sum.iter().zip(&self.count).map(|(&c, &n)| 1.0 - c / n as f64).collect()
    }
}

/// Per MoE layer (keyed by the MoE module's name, e.g. `model.layers.3.block_sparse_moe`) and per
/// routed expert, over the calibration tokens: the tokens routed to it, Σ of its router weight g_j(t)
/// (softmax over the router logits, renormalized over the top-k), and REAP's Σ g_j(t) · ‖f_j(t)‖₂ with
/// f_j(t) the expert's output. Stored as `<module>.expert_count` (I64 [E]), `.expert_gate_sum` and
/// `.expert_reap_sum` (F64 [E]); the metadata's `experts` table gives each layer's `top_k`.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertStats {
    pub count: Vec<i64>,
    pub gate_sum: Vec<f64>,
    pub reap_sum: Vec<f64>,
    pub top_k: usize,
}

impl ExpertStats {
    pub fn validate(&self, name: &str) -> std::result::Result<(), String> {
        let e = self.count.len();
        if e == 0 || self.gate_sum.len() != e || self.reap_sum.len() != e {
            return Err(format!("{name}: expert statistics need one count and two sums per expert"));
        }
        if self.top_k == 0 || self.top_k > e {
            return Err(format!("{name}: top_k {} with {e} experts", self.top_k));
        }
        for j in 0..e {
            let (n, g, r) = (self.count[j], self.gate_sum[j], self.reap_sum[j]);
            if n < 0 || !g.is_finite() || !r.is_finite() || g < 0.0 || r < 0.0 || g > n as f64 * (1.0 + 1e-6) {
                return Err(format!("{name}: impossible statistics of expert {j} (count {n}, router weight sum {g}, REAP sum {r})"));
            }
        }
        Ok(())
    }
}

pub struct Sidecar {
    pub path: PathBuf,
    pub meta: serde_json::Map<String, Value>,
    pub layers: BTreeMap<String, LayerStats>,
    /// Present only for sidecars written with `stats --grad`.
    pub grads: BTreeMap<String, GradStats>,
    /// Present in sidecars of `stats` passes that saw every block's input and output.
    pub blocks: Option<BlockStats>,
    /// MoE layers' routing statistics (empty for dense models).
    pub experts: BTreeMap<String, ExpertStats>,
    /// sha256 of the sidecar file, recorded as provenance in the pruned shards.
    pub sha256: String,
}

impl Sidecar {
    pub fn open(path: &Path) -> Result<Sidecar> {
        check_is_file(path, "stats sidecar", "--stats")?;
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Sidecar::from_bytes(&bytes, path)
    }

    /// Parses and validates a whole sidecar file held in memory; `path` names it in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Sidecar> {
        let bad = |msg: String| Error::stats(path, msg);
        let st = SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
        let meta_text =
            metadata.metadata().as_ref().and_then(|m| m.get("llmprune")).ok_or_else(|| bad("no llmprune metadata: not a stats sidecar".into()))?;
        let meta: serde_json::Map<String, Value> = serde_json::from_str(meta_text).map_err(|e| bad(format!("corrupt llmprune metadata: {e}")))?;
        if meta.get("format_version").and_then(Value::as_u64) != Some(FORMAT_VERSION) {
            return Err(bad(format!("unsupported format_version (expected {FORMAT_VERSION})")));
        }
        if meta.get("format").and_then(Value::as_str) == Some(gram::GRAM_FORMAT) {
            return Err(Error::arg_hint(
                format!("{} is a Gram sidecar (written by `llmprune stats --gram`), not activation statistics", path.display()),
                "pass it with --gram PATH; --stats takes the sidecar `llmprune stats MODEL` writes",
            ));
        }
        let Some(Value::Object(layer_meta)) = meta.get("layers") else {
            return Err(bad("metadata has no \"layers\" table".into()));
        };
        let mut layers = BTreeMap::new();
        let mut grads = BTreeMap::new();
        for (name, info) in layer_meta {
            let input_axis = match info.get("input_axis").map(Value::as_u64) {
                None => 1,
                Some(Some(a @ (0 | 1))) => a as usize,
                Some(_) => return Err(bad(format!("{name}: input_axis must be 0 or 1"))),
            };
            let get = |suffix: &str, dtype: Dtype, rank1: Option<usize>| -> Result<Vec<u8>> {
                let key = format!("{name}.{suffix}");
                let view = st.tensor(&key).map_err(|_| bad(format!("missing tensor {key}")))?;
                if view.dtype() != dtype || view.shape().len() != 1 || rank1.is_some_and(|n| view.shape()[0] != n) {
                    return Err(bad(format!(
                        "{key} must be {dtype:?} [{}], found {:?} {:?}",
                        rank1.map_or("n".to_string(), |n| n.to_string()),
                        view.dtype(),
                        view.shape()
                    )));
                }
                Ok(view.data().to_vec())
            };
            let act_sum = f64s(&get("act_sum", Dtype::F64, None)?);
            let act_sqsum = f64s(&get("act_sqsum", Dtype::F64, Some(act_sum.len()))?);
            let count_bytes = get("act_count", Dtype::I64, Some(1))?;
            let count = i64::from_le_bytes(count_bytes[..8].try_into().expect("8 bytes"));
            let stats = LayerStats { act_sum, act_sqsum, count, input_axis };
            stats.validate(name).map_err(bad)?;
            if let Some(g) = read_grads(&st, name, stats.act_sum.len()).map_err(bad)? {
                grads.insert(name.clone(), g);
            }
            layers.insert(name.clone(), stats);
        }
        let blocks = read_blocks(&st).map_err(bad)?;
        let experts = read_experts(&st, &meta).map_err(bad)?;
        let sha256 = {
            use sha2::{Digest, Sha256};
            hex(&Sha256::digest(bytes))
        };
        Ok(Sidecar { path: path.to_path_buf(), meta, layers, grads, blocks, experts, sha256 })
    }

    /// Refuses a sidecar computed for another model, naming the first tensor that differs.
    pub fn check_matches(&self, ckpt: &Checkpoint) -> Result<()> {
        let mismatch = |msg: String| Error::StatsMismatch { path: self.path.clone(), msg };
        check_model(&self.path, &self.meta, ckpt)?;
        for (name, stats) in &self.layers {
            let Some((_, t)) = ckpt.get(name) else {
                return Err(mismatch(format!("prunable tensor {name} is not in the model")));
            };
            if t.shape.len() != 2 || t.shape[stats.input_axis] != stats.act_sum.len() {
                return Err(mismatch(format!(
                    "tensor {name} has shape {:?} but its statistics have {} input channels",
                    t.shape,
                    stats.act_sum.len()
                )));
            }
            let out = t.shape[1 - stats.input_axis];
            if let Some(g) = self.grads.get(name).filter(|g| g.out_features() != out) {
                return Err(mismatch(format!("tensor {name} has {out} output features but its gradient statistics have {}", g.out_features())));
            }
        }
        Ok(())
    }

    /// `dense`, or the sequential method and target the statistics were taken with.
    pub fn sequential(&self) -> Option<&serde_json::Map<String, Value>> {
        sequential_of(&self.meta)
    }
}

/// The `sequential` record of a stats or Gram sidecar's metadata, when taken in sequential mode.
pub fn sequential_of(meta: &serde_json::Map<String, Value>) -> Option<&serde_json::Map<String, Value>> {
    match (meta.get("mode"), meta.get("sequential")) {
        (Some(Value::String(m)), Some(Value::Object(s))) if m == "sequential" => Some(s),
        _ => None,
    }
}

/// Refuses statistics recorded for another model (by `model_tensors` and `model_fingerprint` in
/// the metadata), naming the first tensor that differs.
pub fn check_model(path: &Path, meta: &serde_json::Map<String, Value>, ckpt: &Checkpoint) -> Result<()> {
    let mismatch = |msg: String| Error::StatsMismatch { path: path.to_path_buf(), msg };
    let model = ckpt.describe();
    if let Some(Value::Object(recorded)) = meta.get("model_tensors") {
        let mut names: Vec<&String> = model.keys().chain(recorded.keys()).collect();
        names.sort();
        names.dedup();
        for name in names {
            let here = model.get(name).map(String::as_str);
            let there = recorded.get(name).and_then(Value::as_str);
            if here != there {
                return Err(mismatch(format!(
                    "first differing tensor {name}: model has {}, statistics were computed for {}",
                    here.unwrap_or("nothing"),
                    there.unwrap_or("nothing")
                )));
            }
        }
    }
    let fp = meta.get("model_fingerprint").and_then(Value::as_str);
    if fp != Some(ckpt.fingerprint().as_str()) {
        return Err(mismatch("model fingerprint differs (tensor names, dtypes or shapes changed)".into()));
    }
    Ok(())
}

/// `W.grad_out`, `W.grad_in` and `W.grad_count` of one weight: all three or none.
fn read_experts(st: &SafeTensors, meta: &serde_json::Map<String, Value>) -> std::result::Result<BTreeMap<String, ExpertStats>, String> {
    let mut out = BTreeMap::new();
    let Some(Value::Object(table)) = meta.get("experts") else { return Ok(out) };
    for (name, info) in table {
        let top_k = info.get("top_k").and_then(Value::as_u64).ok_or_else(|| format!("experts.{name} has no top_k"))? as usize;
        let tensor = |suffix: &str, dtype: Dtype| -> std::result::Result<Vec<u8>, String> {
            let key = format!("{name}.{suffix}");
            let v = st.tensor(&key).map_err(|_| format!("missing tensor {key}"))?;
            if v.dtype() != dtype || v.shape().len() != 1 {
                return Err(format!("{key} must be {dtype:?} [experts]"));
            }
            Ok(v.data().to_vec())
        };
        let count = tensor("expert_count", Dtype::I64)?.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes"))).collect();
        let e = ExpertStats {
            count,
            gate_sum: f64s(&tensor("expert_gate_sum", Dtype::F64)?),
            reap_sum: f64s(&tensor("expert_reap_sum", Dtype::F64)?),
            top_k,
        };
        e.validate(name)?;
        out.insert(name.clone(), e);
    }
    Ok(out)
}

fn read_blocks(st: &SafeTensors) -> std::result::Result<Option<BlockStats>, String> {
    let (Ok(c), Ok(n)) = (st.tensor(BLOCK_COS_SUM), st.tensor(BLOCK_COUNT)) else {
        return match (st.tensor(BLOCK_COS_SUM).is_ok(), st.tensor(BLOCK_COUNT).is_ok()) {
            (false, false) => Ok(None),
            _ => Err(format!("{BLOCK_COS_SUM} and {BLOCK_COUNT} go together")),
        };
    };
    if c.dtype() != Dtype::F64 || n.dtype() != Dtype::I64 || c.shape().len() != 1 || c.shape() != n.shape() {
        return Err(format!("{BLOCK_COS_SUM} must be F64 [blocks] and {BLOCK_COUNT} I64 [blocks]"));
    }
    let count = n.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes"))).collect();
    let b = BlockStats { cos_sum: f64s(c.data()), count };
    b.validate()?;
    Ok(Some(b))
}

fn read_grads(st: &SafeTensors, name: &str, in_features: usize) -> std::result::Result<Option<GradStats>, String> {
    let keys = ["grad_out", "grad_in", "grad_count"].map(|s| format!("{name}.{s}"));
    let views = keys.clone().map(|k| st.tensor(&k).ok());
    if views.iter().all(Option::is_none) {
        return Ok(None);
    }
    let [Some(out), Some(inp), Some(count)] = views else {
        let missing: Vec<&str> = keys.iter().zip(&views).filter(|(_, v)| v.is_none()).map(|(k, _)| k.as_str()).collect();
        return Err(format!("missing tensor {}: gradient statistics come as grad_out, grad_in and grad_count together", missing.join(", ")));
    };
    let planes = GradStats::SPLITS * GradStats::QUANTITIES;
    let floats = |key: &str, view: &safetensors::tensor::TensorView, len: Option<usize>| -> std::result::Result<Vec<f64>, String> {
        let ok_shape = matches!(view.shape(), [3, 4, n] if len.is_none_or(|l| *n == l));
        if view.dtype() != Dtype::F64 || !ok_shape {
            let want = len.map_or("n".to_string(), |l| l.to_string());
            return Err(format!("{key} must be F64 [3, 4, {want}], found {:?} {:?}", view.dtype(), view.shape()));
        }
        let v = f64s(view.data());
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(format!("{key} holds a non-finite value at flat index {i}"));
        }
        debug_assert_eq!(v.len() % planes, 0);
        Ok(v)
    };
    let per_output = floats(&keys[0], &out, None)?;
    let per_input = floats(&keys[1], &inp, Some(in_features))?;
    if count.dtype() != Dtype::I64 || count.shape() != [3] {
        return Err(format!("{} must be I64 [3], found {:?} {:?}", keys[2], count.dtype(), count.shape()));
    }
    let c: Vec<i64> = count.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes"))).collect();
    if c.iter().any(|&n| n < 0) || c[0] < 1 || c[1] + c[2] != c[0] {
        return Err(format!("{} holds impossible sample counts {c:?} (all ≥ 1, halves adding up to it)", keys[2]));
    }
    // Σ|w·g|, Σw²·F and Σ|w·g − ½w²·F| are sums of non-negative terms.
    for (key, v) in [(&keys[0], &per_output), (&keys[1], &per_input)] {
        let n = v.len() / planes;
        for split in 0..GradStats::SPLITS {
            for q in [0, 2, 3] {
                let at = (split * GradStats::QUANTITIES + q) * n;
                if let Some(i) = v[at..at + n].iter().position(|&x| x < 0.0) {
                    return Err(format!("{key} holds a negative value at [{split}, {q}, {i}] of a non-negative quantity"));
                }
            }
        }
    }
    Ok(Some(GradStats { per_output, per_input, count: [c[0], c[1], c[2]] }))
}

fn f64s(bytes: &[u8]) -> Vec<f64> {
    bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
}
