//! The Gram sidecar (docs/sidecar.md): for every distinct input of the prunable linears, H = Σ x xᵀ
//! over the calibration tokens, as a packed lower triangle of float64 (or, to halve the file, of
//! float32: what the SparseGPT kernel computes in anyway), with its token count.
//!
//! Files of a 7B-shaped model take tens of GB, so neither side ever holds one whole: the writer
//! lays out the header from the model's shapes first and takes the matrices one at a time, in any
//! order, into a temporary file renamed into place when complete; the reader maps the file and
//! hands out one matrix at a time.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use super::check_model;
use crate::error::{Error, Result};
use crate::io::checkpoint::Checkpoint;
use crate::io::output::{check_file_destination, clean_stale, same_file, temp_beside};

/// Default location of the Gram sidecar inside a model directory; never copied into outputs.
pub const DEFAULT_GRAM: &str = "llmprune-gram.safetensors";
pub const GRAM_FORMAT: &str = "llmprune-gram";

/// Start and end of a byte range in the file.
type ByteRange = (usize, usize);

/// One distinct input: the weights that read it (name, input axis) and its width.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GramGroup {
    pub key: String,
    pub weights: Vec<(String, usize)>,
    pub features: usize,
}

impl GramGroup {
    pub fn packed_len(&self) -> usize {
        packed_len(self.features)
    }
}

pub fn packed_len(n: usize) -> usize {
    n * (n + 1) / 2
}

/// Calibration facts recorded in the metadata, as for the stats sidecar, and how the matrices are
/// stored.
#[derive(Debug, Clone)]
pub struct GramInfo {
    pub calibration: Value,
    pub mode: String,
    pub sequential: Value,
    pub storage: Storage,
}

/// The element type of the stored matrices. The sums are always taken in float64; float32 storage
/// rounds each finished sum once, to exactly the value the SparseGPT kernel computes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Storage {
    #[default]
    F64,
    F32,
}

impl Storage {
    pub fn parse(name: &str) -> Option<Storage> {
        match name {
            "float64" => Some(Storage::F64),
            "float32" => Some(Storage::F32),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Storage::F64 => "float64",
            Storage::F32 => "float32",
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            Storage::F64 => 8,
            Storage::F32 => 4,
        }
    }

    fn dtype(self) -> Dtype {
        match self {
            Storage::F64 => Dtype::F64,
            Storage::F32 => Dtype::F32,
        }
    }

    /// The stored value at byte `at` of `bytes`, widened to f64.
    fn read(self, bytes: &[u8], at: usize) -> f64 {
        match self {
            Storage::F64 => f64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes")),
            Storage::F32 => f64::from(f32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))),
        }
    }
}

/// The diagonal of a Gram matrix that carries no signal: every entry zero (or not finite).
fn no_signal(key: &str, mut diag: impl Iterator<Item = f64>, n: usize) -> std::result::Result<(), String> {
    if n > 0 && !diag.any(|d| d.is_finite() && d > 0.0) {
        return Err(format!(
            "the Gram matrix of input {key} is zero on its whole diagonal: that input carried no signal during calibration, and every weight it feeds would be pruned to zero"
        ));
    }
    Ok(())
}

/// Checks one matrix: finite, a non-negative diagonal, a count of at least 1.
fn validate(key: &str, packed: &[f64], n: usize, count: i64) -> std::result::Result<(), String> {
    if packed.len() != packed_len(n) {
        return Err(format!("{key}.gram has {} values; a {n}-wide input needs {}", packed.len(), packed_len(n)));
    }
    if count < 1 {
        return Err(format!("{key}.gram_count is {count}; a token count must be at least 1"));
    }
    if let Some(i) = packed.iter().position(|x| !x.is_finite()) {
        return Err(format!("{key}.gram holds a non-finite value at packed index {i}"));
    }
    for i in 0..n {
        let d = packed[i * (i + 1) / 2 + i];
        if d < 0.0 {
            return Err(format!("{key}.gram has a negative diagonal entry ({d}) at {i}"));
        }
    }
    Ok(())
}

fn layout_errors(ckpt: &Checkpoint, groups: &[GramGroup]) -> std::result::Result<(), String> {
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    let mut keys: BTreeMap<&str, ()> = BTreeMap::new();
    for g in groups {
        if keys.insert(&g.key, ()).is_some() {
            return Err(format!("input {} is listed twice", g.key));
        }
        if g.weights.is_empty() || g.features == 0 {
            return Err(format!("input {} has no weights or no features", g.key));
        }
        for (w, axis) in &g.weights {
            if let Some(other) = seen.insert(w, &g.key) {
                return Err(format!("weight {w} reads two inputs ({other} and {})", g.key));
            }
            let Some((_, t)) = ckpt.get(w) else { return Err(format!("weight {w} is not a tensor of the model")) };
            if t.shape.len() != 2 || *axis > 1 || t.shape[*axis] != g.features {
                return Err(format!("weight {w} has shape {:?}, not {} input features on axis {axis}", t.shape, g.features));
            }
        }
    }
    Ok(())
}

/// Writes a Gram sidecar one matrix at a time.
pub struct GramWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
    data_start: u64,
    /// key -> (byte offsets of its matrix and of its count in the data section, group), and whether
    /// it was written
    slots: BTreeMap<String, (u64, u64, GramGroup, bool)>,
    storage: Storage,
}

impl GramWriter {
    pub fn create(path: &Path, ckpt: &Checkpoint, groups: Vec<GramGroup>, info: &GramInfo) -> Result<GramWriter> {
        layout_errors(ckpt, &groups).map_err(|m| Error::arg(format!("cannot write Gram statistics: {m}")))?;
        match info.mode.as_str() {
            "dense" | "sequential" => {}
            m => return Err(Error::arg(format!("cannot write Gram statistics: mode must be dense or sequential, not {m:?}"))),
        }
        for s in &ckpt.shards {
            if same_file(path, &s.path) {
                return Err(Error::output_hint(path, "is a shard of the model; llmprune never writes over its input", "choose another --gram-out"));
            }
        }
        check_file_destination(path)?;
        let mut sorted = groups;
        sorted.sort_by(|a, b| a.key.cmp(&b.key));
        let meta_groups: serde_json::Map<String, Value> = sorted
            .iter()
            .map(|g| {
                let weights: serde_json::Map<String, Value> = g.weights.iter().map(|(w, a)| (w.clone(), Value::from(*a))).collect();
                (g.key.clone(), serde_json::json!({"weights": weights, "features": g.features}))
            })
            .collect();
        let meta = serde_json::json!({
            "format": GRAM_FORMAT,
            "format_version": 1,
            "llmprune_version": env!("CARGO_PKG_VERSION"),
            "model_fingerprint": ckpt.fingerprint(),
            "model_tensors": ckpt.describe(),
            "calibration": info.calibration,
            "mode": info.mode,
            "sequential": info.sequential,
            "storage": info.storage.name(),
            "groups": meta_groups,
        });
        GramWriter::start(path, meta.to_string(), &sorted, info.storage)
    }

    /// Writes the matrix of input `key` (packed lower triangle) and its token count.
    pub fn write(&mut self, key: &str, packed: &[f64], count: i64) -> Result<()> {
        let Some((offset, count_offset, group, done)) = self.slots.get_mut(key) else {
            return Err(Error::arg(format!("{key} is not an input of this Gram sidecar's layout")));
        };
        if *done {
            return Err(Error::arg(format!("the Gram matrix of {key} was already written")));
        }
        validate(key, packed, group.features, count).map_err(|m| Error::arg(format!("cannot write Gram statistics: {m}")))?;
        let file = self.file.as_mut().ok_or_else(|| Error::Internal("Gram writer already finished".into()))?;
        let mut bytes: Vec<u8> = Vec::with_capacity(packed.len() * self.storage.bytes());
        match self.storage {
            Storage::F64 => bytes.extend(packed.iter().flat_map(|x| x.to_le_bytes())),
            Storage::F32 => bytes.extend(packed.iter().flat_map(|&x| (x as f32).to_le_bytes())),
        }
        let start = self.data_start;
        (|| {
            file.seek(SeekFrom::Start(start + *offset))?;
            file.write_all(&bytes)?;
            file.seek(SeekFrom::Start(start + *count_offset))?;
            file.write_all(&count.to_le_bytes())
        })()
        .map_err(|e| Error::io(&self.tmp, e))?;
        *done = true;
        Ok(())
    }

    /// Checks that every input was written and renames the file into place.
    pub fn finish(mut self) -> Result<PathBuf> {
        if let Some((key, _)) = self.slots.iter().find(|(_, s)| !s.3) {
            return Err(Error::arg(format!("the Gram matrix of {key} was never written")));
        }
        let file = self.file.take().ok_or_else(|| Error::Internal("Gram writer already finished".into()))?;
        file.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        drop(file);
        fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        self.tmp = PathBuf::new();
        Ok(self.path.clone())
    }
}

impl Drop for GramWriter {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            self.file.take();
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// A mapped Gram sidecar: metadata checked on opening, each matrix checked when read.
pub struct Gram {
    pub path: PathBuf,
    pub meta: serde_json::Map<String, Value>,
    pub groups: BTreeMap<String, GramGroup>,
    /// weight name -> group key
    by_weight: BTreeMap<String, String>,
    /// group key -> (byte range of the matrix, byte range of the count)
    ranges: BTreeMap<String, (ByteRange, ByteRange)>,
    /// the element type of every matrix
    pub storage: Storage,
    mmap: Mmap,
}

impl Gram {
    pub fn open(path: &Path) -> Result<Gram> {
        let bad = |msg: String| Error::gram(path, msg);
        crate::sidecar::check_is_file(path, "Gram sidecar", "--gram")?;
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only map of a file nothing else writes while pruning (as for shards)
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| bad(e.to_string()))?;
        let meta_text =
            metadata.metadata().as_ref().and_then(|m| m.get("llmprune")).ok_or_else(|| bad("no llmprune metadata: not a Gram sidecar".into()))?;
        let meta: serde_json::Map<String, Value> = serde_json::from_str(meta_text).map_err(|e| bad(format!("corrupt llmprune metadata: {e}")))?;
        if meta.get("format").and_then(Value::as_str) != Some(GRAM_FORMAT) || meta.get("format_version").and_then(Value::as_u64) != Some(1) {
            return Err(bad(format!("not a Gram sidecar (format {GRAM_FORMAT}, version 1)")));
        }
        let Some(Value::Object(gmeta)) = meta.get("groups") else {
            return Err(bad("metadata has no \"groups\" table".into()));
        };
        let data_start = 8 + header_len;
        let infos = metadata.tensors();
        let (mut groups, mut by_weight, mut ranges) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
        // the element type is the file's own (the first matrix's); every matrix must share it
        let storage = match gmeta.keys().next().and_then(|k| infos.get(&format!("{k}.gram"))).map(|i| i.dtype) {
            Some(Dtype::F32) => Storage::F32,
            _ => Storage::F64,
        };
        for (key, g) in gmeta {
            let n = g.get("features").and_then(Value::as_u64).ok_or_else(|| bad(format!("{key}: no \"features\"")))? as usize;
            let Some(Value::Object(ws)) = g.get("weights") else { return Err(bad(format!("{key}: no \"weights\" table"))) };
            let mut weights = Vec::new();
            for (w, a) in ws {
                let axis = a.as_u64().filter(|&a| a <= 1).ok_or_else(|| bad(format!("{w}: input axis must be 0 or 1")))? as usize;
                if by_weight.insert(w.clone(), key.clone()).is_some() {
                    return Err(bad(format!("weight {w} is listed under two inputs")));
                }
                weights.push((w.clone(), axis));
            }
            let range = |suffix: &str, dtype: Dtype, len: usize| -> Result<(usize, usize)> {
                let name = format!("{key}.{suffix}");
                let info = infos.get(&name).ok_or_else(|| bad(format!("missing tensor {name}")))?;
                if info.dtype != dtype || info.shape != [len] {
                    return Err(bad(format!("{name} must be {dtype:?} [{len}], found {:?} {:?}", info.dtype, info.shape)));
                }
                Ok((data_start + info.data_offsets.0, data_start + info.data_offsets.1))
            };
            let plen = n.checked_mul(n + 1).map(|x| x / 2).ok_or_else(|| bad(format!("{key}: {n} features overflow")))?;
            ranges.insert(key.clone(), (range("gram", storage.dtype(), plen)?, range("gram_count", Dtype::I64, 1)?));
            groups.insert(key.clone(), GramGroup { key: key.clone(), weights, features: n });
        }
        Ok(Gram { path: path.to_path_buf(), meta, groups, by_weight, ranges, storage, mmap })
    }

    /// Refuses a Gram sidecar of another model, or whose inputs do not fit the weights.
    pub fn check_matches(&self, ckpt: &Checkpoint) -> Result<()> {
        check_model(&self.path, &self.meta, ckpt).map_err(|e| match e {
            Error::StatsMismatch { path, msg } => Error::gram_mismatch(path, msg),
            e => e,
        })?;
        let groups: Vec<GramGroup> = self.groups.values().cloned().collect();
        layout_errors(ckpt, &groups).map_err(|m| Error::gram_mismatch(&self.path, m))
    }

    pub fn group_of(&self, weight: &str) -> Option<&GramGroup> {
        self.by_weight.get(weight).and_then(|k| self.groups.get(k))
    }

    /// The packed matrix of input `key` and its token count, validated.
    pub fn packed(&self, key: &str) -> Result<(Vec<f64>, i64)> {
        let ((a, b), (c, d)) = self.ranges[key];
        let width = self.storage.bytes();
        let packed: Vec<f64> = (a..b).step_by(width).map(|at| self.storage.read(&self.mmap, at)).collect();
        let count = i64::from_le_bytes(self.mmap[c..d].try_into().map_err(|_| Error::gram(&self.path, "bad count"))?);
        let n = self.groups[key].features;
        validate(key, &packed, n, count).map_err(|m| Error::gram(&self.path, m))?;
        no_signal(key, (0..n).map(|i| packed[i * (i + 1) / 2 + i]), n).map_err(|m| Error::gram(&self.path, m))?;
        Ok((packed, count))
    }

    /// Refuses the matrix of input `key` when it carries no signal: a diagonal of zeros (the input
    /// never fired during calibration, or the file was written without data), which would make
    /// every weight fed by it prune to zero. Reads only the diagonal.
    pub fn check_signal(&self, key: &str) -> Result<()> {
        let ((a, _), _) = *self.ranges.get(key).ok_or_else(|| Error::Internal(format!("no Gram input {key}")))?;
        let n = self.groups[key].features;
        let width = self.storage.bytes();
        let diag = (0..n).map(|i| self.storage.read(&self.mmap, a + width * (i * (i + 1) / 2 + i)));
        no_signal(key, diag, n).map_err(|m| Error::gram(&self.path, m))
    }

    pub fn info(&self) -> GramInfo {
        let get = |k: &str| self.meta.get(k).cloned().unwrap_or(Value::Null);
        GramInfo {
            calibration: get("calibration"),
            mode: get("mode").as_str().unwrap_or("dense").to_string(),
            sequential: get("sequential"),
            storage: self.storage,
        }
    }
}

/// The full symmetric n×n matrix (row-major, f32) of a packed lower triangle.
pub fn unpack(packed: &[f64], n: usize) -> Vec<f32> {
    let mut full = vec![0f32; n * n];
    for i in 0..n {
        let row = &packed[i * (i + 1) / 2..i * (i + 1) / 2 + i + 1];
        for (j, &x) in row.iter().enumerate() {
            full[i * n + j] = x as f32;
            full[j * n + i] = x as f32;
        }
    }
    full
}

/// `stats merge` of Gram sidecars: one matrix at a time, summed into a new file.
pub fn merge_gram(paths: &[PathBuf], out: &Path) -> Result<(usize, i64, serde_json::Map<String, Value>)> {
    let grams: Vec<Gram> = paths.iter().map(|p| Gram::open(p)).collect::<Result<_>>()?;
    let first = &grams[0];
    for g in &grams[1..] {
        if g.meta.get("model_fingerprint") != first.meta.get("model_fingerprint") {
            return Err(Error::arg_hint(
                format!("{} and {} were computed for different models (fingerprints differ)", first.path.display(), g.path.display()),
                "merge only statistics of the same checkpoint",
            ));
        }
        if g.groups != first.groups || (g.meta.get("mode"), g.meta.get("sequential")) != (first.meta.get("mode"), first.meta.get("sequential")) {
            return Err(Error::arg(format!(
                "{} and {} group the inputs differently or were taken in different modes",
                first.path.display(),
                g.path.display()
            )));
        }
    }
    for p in paths {
        if same_file(out, p) {
            return Err(Error::output_hint(
                out,
                format!("is the input {}; llmprune never writes over its input", p.display()),
                "choose another --out",
            ));
        }
    }
    // the writer checks the layout against a checkpoint; here the inputs agree with each other and
    // were checked against theirs when written, so the layout is taken as recorded
    let mut info = first.info();
    // the sums are taken in float64 from the stored values; a float32 input makes the output float32
    // (its rounding is already in the sum, and storing wider would not undo it)
    if grams.iter().any(|g| g.storage == Storage::F32) {
        info.storage = Storage::F32;
    }
    if let Value::Object(c) = &mut info.calibration {
        let total =
            |k: &str| grams.iter().map(|g| g.meta.get("calibration").and_then(|c| c.get(k)).and_then(Value::as_i64).unwrap_or(0)).sum::<i64>();
        c.insert("nsamples".into(), total("nsamples").into());
        c.insert("tokens".into(), total("tokens").into());
        c.insert(
            "merged_from".into(),
            paths.iter().map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()).collect::<Vec<_>>().into(),
        );
    }
    let mut w = GramWriter::create_unchecked(out, first, info)?;
    let mut tokens = 0;
    for key in first.groups.keys() {
        let (mut sum, mut count) = first.packed(key)?;
        for g in &grams[1..] {
            let (p, c) = g.packed(key)?;
            sum.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
            count = count.checked_add(c).ok_or_else(|| Error::arg(format!("token counts of {key} overflow")))?;
        }
        tokens = tokens.max(count);
        w.write(key, &sum, count)?;
    }
    w.finish()?;
    Ok((first.groups.len(), tokens, first.meta.clone()))
}

impl GramWriter {
    /// A writer with the layout and model record of an existing Gram sidecar (for merging).
    fn create_unchecked(path: &Path, like: &Gram, info: GramInfo) -> Result<GramWriter> {
        check_file_destination(path)?;
        let mut meta = like.meta.clone();
        meta.insert("calibration".into(), info.calibration);
        meta.insert("llmprune_version".into(), env!("CARGO_PKG_VERSION").into());
        meta.insert("storage".into(), info.storage.name().into());
        let groups: Vec<GramGroup> = like.groups.values().cloned().collect();
        GramWriter::start(path, Value::Object(meta).to_string(), &groups, info.storage)
    }

    /// Lays out the header under the `llmprune` metadata `meta` and creates the temporary file at its
    /// final size. float64: each input's matrix, then its count, in `groups` order; float32: every
    /// count first, then the matrices, so that each value sits at a multiple of its size.
    fn start(path: &Path, meta: String, groups: &[GramGroup], storage: Storage) -> Result<GramWriter> {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({"llmprune": meta}));
        let mut slots = BTreeMap::new();
        let counts_first = storage == Storage::F32;
        let mut offset = if counts_first { 8 * groups.len() as u64 } else { 0 };
        for (i, g) in groups.iter().enumerate() {
            let bytes = (g.packed_len() * storage.bytes()) as u64;
            let count_at = if counts_first { 8 * i as u64 } else { offset + bytes };
            header.insert(
                format!("{}.gram", g.key),
                serde_json::json!({"dtype": storage.dtype(), "shape": [g.packed_len()], "data_offsets": [offset, offset + bytes]}),
            );
            header
                .insert(format!("{}.gram_count", g.key), serde_json::json!({"dtype": "I64", "shape": [1], "data_offsets": [count_at, count_at + 8]}));
            slots.insert(g.key.clone(), (offset, count_at, g.clone(), false));
            offset += bytes + if counts_first { 0 } else { 8 };
        }
        let data_len = offset;
        let mut json = serde_json::to_vec(&Value::Object(header)).map_err(|e| Error::Internal(e.to_string()))?;
        while json.len() % 8 != 0 {
            json.push(b' ');
        }
        let _ = clean_stale(path);
        let (tmp, _) = temp_beside(path)?;
        let mut file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let data_start = 8 + json.len() as u64;
        let written = (|| {
            file.write_all(&(json.len() as u64).to_le_bytes())?;
            file.write_all(&json)?;
            file.set_len(data_start + data_len)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io(path, e));
        }
        Ok(GramWriter { path: path.to_path_buf(), tmp, file: Some(file), data_start, slots, storage })
    }
}
