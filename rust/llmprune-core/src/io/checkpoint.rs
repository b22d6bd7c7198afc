//! Opening a checkpoint directory: the shard index, each shard's header, and memory maps.
//!
//! Everything is validated before any data is touched: index paths stay inside the model directory,
//! every tensor lives in exactly one shard, headers parse and their offsets tile the data section.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::path::{Component, Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::SafeTensorError;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::error::{Error, Result};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One tensor of a shard, with its absolute byte range in the shard file.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

impl TensorEntry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn nbytes(&self) -> usize {
        self.end - self.start
    }

    /// `DTYPE[d0,d1,...]`, the form used in fingerprints and sidecar metadata.
    pub fn describe(&self) -> String {
        let dims: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        format!("{}[{}]", dtype_name(self.dtype), dims.join(","))
    }
}

pub fn dtype_name(dtype: Dtype) -> String {
    format!("{dtype:?}")
}

/// A memory-mapped shard whose header has been validated.
pub struct Shard {
    /// File name relative to the model directory, as written in the index.
    pub file_name: String,
    pub path: PathBuf,
    pub mmap: Mmap,
    /// Length of the JSON header (the file's data section starts at 8 + header_len).
    pub header_len: usize,
    /// The raw header JSON, key order preserved, so it can be rewritten faithfully.
    pub header: serde_json::Map<String, Value>,
    /// Tensors in file order (ascending offsets).
    pub tensors: Vec<TensorEntry>,
}

impl Shard {
    pub fn open(path: &Path, file_name: &str) -> Result<Shard> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < 8 {
            return Err(Error::checkpoint(path, format!("truncated file: {len} bytes, too short for a safetensors header")));
        }
        // SAFETY: the map is read-only; a checkpoint modified while being pruned is outside the
        // contract (as for every reader of safetensors files).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        // Shards are read front to back: ask for aggressive read-ahead (a hint; failure is harmless).
        #[cfg(unix)]
        let _ = mmap.advise(memmap2::Advice::Sequential);
        let parsed = parse_header(&mmap, path)?;
        Ok(Shard {
            file_name: file_name.to_string(),
            path: path.to_path_buf(),
            mmap,
            header_len: parsed.header_len,
            header: parsed.header,
            tensors: parsed.tensors,
        })
    }

    pub fn metadata(&self) -> BTreeMap<String, String> {
        match self.header.get("__metadata__") {
            Some(Value::Object(map)) => map.iter().filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string()))).collect(),
            _ => BTreeMap::new(),
        }
    }

    pub fn data(&self, t: &TensorEntry) -> &[u8] {
        &self.mmap[t.start..t.end]
    }
}

/// A validated safetensors header: its length, the raw JSON (key order kept) and the tensors in
/// file order with absolute byte ranges.
pub struct ParsedHeader {
    pub header_len: usize,
    pub header: serde_json::Map<String, Value>,
    pub tensors: Vec<TensorEntry>,
}

/// Parses and validates the header of a whole safetensors file held in `buf`: the length prefix,
/// the JSON, every tensor's dtype, shape and offsets (which must tile the data section exactly).
/// Works on bytes only, so the fuzz harness exercises exactly what `Shard::open` runs.
pub fn parse_header(buf: &[u8], path: &Path) -> Result<ParsedHeader> {
    if buf.len() < 8 {
        return Err(Error::checkpoint(path, format!("truncated file: {} bytes, too short for a safetensors header", buf.len())));
    }
    let (header_len, metadata) = SafeTensors::read_metadata(buf).map_err(|e| header_error(path, buf, e))?;
    let data_start = header_len
        .checked_add(8)
        .filter(|&s| s <= buf.len())
        .ok_or_else(|| Error::checkpoint(path, "header length runs past the end of the file"))?;
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&buf[8..data_start]).map_err(|e| Error::checkpoint(path, format!("corrupt JSON header: {e}")))?;
    let mut tensors = Vec::new();
    for (name, info) in metadata.tensors() {
        let (a, b) = info.data_offsets;
        let (start, end) = match (data_start.checked_add(a), data_start.checked_add(b)) {
            (Some(s), Some(e)) if s <= e && e <= buf.len() => (s, e),
            _ => return Err(Error::checkpoint(path, format!("tensor {name}: data offsets out of range"))),
        };
        let Some(nbytes) = byte_size(info.dtype, &info.shape) else {
            return Err(Error::checkpoint(path, format!("tensor {name}: shape {:?} overflows", info.shape)));
        };
        if nbytes != end - start {
            return Err(Error::checkpoint(path, format!("tensor {name}: data offsets do not match its dtype and shape")));
        }
        tensors.push(TensorEntry { name, dtype: info.dtype, shape: info.shape.clone(), start, end });
    }
    tensors.sort_by_key(|t| (t.start, t.end));
    Ok(ParsedHeader { header_len, header, tensors })
}

/// Bytes of a tensor of `dtype` and `shape`, or None when the size overflows.
pub fn byte_size(dtype: Dtype, shape: &[usize]) -> Option<usize> {
    let numel = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
    Some(numel.checked_mul(dtype.bitsize())? / 8)
}

/// Turns the safetensors crate's terse errors into messages that name what is wrong.
fn header_error(path: &Path, buf: &[u8], e: SafeTensorError) -> Error {
    let declared = u64::from_le_bytes(buf[..8].try_into().unwrap_or([0; 8]));
    let msg = match e {
        SafeTensorError::HeaderTooLarge => format!("header length {declared} is too large"),
        SafeTensorError::InvalidHeaderLength => {
            format!("header length {declared} is larger than the file ({} bytes): truncated or not a safetensors file", buf.len())
        }
        SafeTensorError::InvalidHeader(err) => format!("header is not UTF-8: {err}"),
        SafeTensorError::InvalidHeaderDeserialization(err) | SafeTensorError::JsonError(err) => {
            format!("corrupt JSON header: {err}")
        }
        SafeTensorError::InvalidOffset(name) => {
            format!("tensor {name}: data offsets overlap, leave gaps or are out of order")
        }
        SafeTensorError::TensorInvalidInfo => match first_size_mismatch(buf) {
            Some(name) => format!("tensor {name}: data offsets do not match its dtype and shape"),
            None => "a tensor's data offsets do not match its dtype and shape".to_string(),
        },
        SafeTensorError::MetadataIncompleteBuffer => {
            "data section does not end where the header says: the file is truncated or has trailing bytes (offsets out of range)".to_string()
        }
        SafeTensorError::ValidationOverflow => "a tensor's shape overflows".to_string(),
        other => other.to_string(),
    };
    Error::checkpoint(path, msg)
}

fn first_size_mismatch(buf: &[u8]) -> Option<String> {
    let n = usize::try_from(u64::from_le_bytes(buf.get(..8)?.try_into().ok()?)).ok()?;
    let header: HashMap<String, Value> = serde_json::from_slice(buf.get(8..8usize.checked_add(n)?)?).ok()?;
    let mut names: Vec<&String> = header.keys().filter(|k| *k != "__metadata__").collect();
    names.sort();
    names
        .into_iter()
        .find(|name| {
            let info = &header[*name];
            let dtype: Option<Dtype> = serde_json::from_value(info["dtype"].clone()).ok();
            let shape: Option<Vec<usize>> = serde_json::from_value(info["shape"].clone()).ok();
            let offs: Option<(usize, usize)> = serde_json::from_value(info["data_offsets"].clone()).ok();
            match (dtype, shape, offs) {
                (Some(d), Some(s), Some((a, b))) => b < a || byte_size(d, &s) != Some(b - a),
                _ => true,
            }
        })
        .cloned()
}

/// A whole checkpoint directory.
/// config.json of the model in `dir`, parsed.
pub fn read_config(dir: &Path) -> Result<serde_json::Map<String, Value>> {
    let path = dir.join("config.json");
    let text = fs::read(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_slice(&text).map_err(|e| Error::checkpoint(&path, format!("config.json is not a JSON object: {e}")))
}

pub struct Checkpoint {
    pub dir: PathBuf,
    pub shards: Vec<Shard>,
    /// The parsed index.json, when the checkpoint is sharded.
    pub index: Option<serde_json::Map<String, Value>>,
    /// Tensor name -> (shard number, position in that shard's `tensors`).
    locations: HashMap<String, (usize, usize)>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        if !dir.exists() {
            return Err(Error::checkpoint(dir, "model directory not found"));
        }
        if !dir.is_dir() {
            return Err(Error::checkpoint(dir, "not a directory"));
        }
        if !dir.join("config.json").is_file() {
            return Err(Error::checkpoint(dir, "no config.json in the model directory"));
        }
        let root = fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?;
        let index_path = dir.join(INDEX_FILE);
        let (index, shard_names) = if index_path.is_file() {
            let path = contained(&root, dir, INDEX_FILE)?;
            let text = fs::read(&path).map_err(|e| Error::io(&index_path, e))?;
            let (index, names) = parse_index(&text, &index_path)?;
            (Some(index), names)
        } else if dir.join(SINGLE_FILE).is_file() {
            (None, vec![SINGLE_FILE.to_string()])
        } else {
            return Err(Error::checkpoint(dir, format!("neither {SINGLE_FILE} nor {INDEX_FILE} found")));
        };
        let mut shards = Vec::with_capacity(shard_names.len());
        for name in &shard_names {
            let path = dir.join(name);
            if !path.is_file() {
                return Err(Error::checkpoint(dir, format!("shard {name} named by the index is missing")));
            }
            contained(&root, dir, name)?;
            shards.push(Shard::open(&path, name)?);
        }
        let mut locations = HashMap::new();
        for (si, shard) in shards.iter().enumerate() {
            for (ti, t) in shard.tensors.iter().enumerate() {
                if let Some((other, _)) = locations.insert(t.name.clone(), (si, ti)) {
                    return Err(Error::checkpoint(
                        dir,
                        format!("tensor {} is stored in both {} and {}", t.name, shards[other].file_name, shard.file_name),
                    ));
                }
            }
        }
        if let Some(index) = &index {
            check_weight_map(dir, index, &shards, &locations)?;
        }
        Ok(Checkpoint { dir: dir.to_path_buf(), shards, index, locations })
    }

    /// The number of the shard that holds `name`.
    pub fn shard_of(&self, name: &str) -> Option<usize> {
        self.locations.get(name).map(|&(si, _)| si)
    }

    pub fn get(&self, name: &str) -> Option<(&Shard, &TensorEntry)> {
        let &(si, ti) = self.locations.get(name)?;
        let shard = &self.shards[si];
        Some((shard, &shard.tensors[ti]))
    }

    pub fn tensors(&self) -> impl Iterator<Item = (&Shard, &TensorEntry)> {
        self.shards.iter().flat_map(|s| s.tensors.iter().map(move |t| (s, t)))
    }

    /// Name -> `DTYPE[shape]` for every tensor, sorted by name.
    pub fn describe(&self) -> BTreeMap<String, String> {
        self.tensors().map(|(_, t)| (t.name.clone(), t.describe())).collect()
    }

    /// sha256 over one `name\tDTYPE\td0,d1\n` line per tensor, sorted by name.
    pub fn fingerprint(&self) -> String {
        fingerprint_of(self.tensors().map(|(_, t)| {
            let dims: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
            (t.name.clone(), dtype_name(t.dtype), dims.join(","))
        }))
    }

    pub fn total_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.mmap.len() as u64).sum()
    }
}

pub fn fingerprint_of(items: impl Iterator<Item = (String, String, String)>) -> String {
    use sha2::{Digest, Sha256};
    let mut lines: Vec<(String, String, String)> = items.collect();
    lines.sort();
    let mut h = Sha256::new();
    for (name, dtype, dims) in lines {
        h.update(format!("{name}\t{dtype}\t{dims}\n").as_bytes());
    }
    hex(&h.finalize())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses index.json (its bytes) and returns it with its shard file names, sorted.
pub fn parse_index(text: &[u8], path: &Path) -> Result<(serde_json::Map<String, Value>, Vec<String>)> {
    let index: serde_json::Map<String, Value> = serde_json::from_slice(text).map_err(|e| Error::checkpoint(path, format!("corrupt JSON: {e}")))?;
    let Some(Value::Object(map)) = index.get("weight_map") else {
        return Err(Error::checkpoint(path, "no \"weight_map\" object"));
    };
    let mut names: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let Some(file) = file.as_str() else {
            return Err(Error::checkpoint(path, format!("weight_map entry for {tensor} is not a file name")));
        };
        check_shard_name(path, file)?;
        if !names.iter().any(|n| n == file) {
            names.push(file.to_string());
        }
    }
    names.sort();
    Ok((index, names))
}

/// Where a file of the model directory really lives, refusing symbolic links that lead out of it.
///
/// Policy (docs/architecture.md): a link is followed when its target lies inside the model
/// directory, or, for a Hugging Face hub snapshot (`<repo>/snapshots/<revision>/`), inside the
/// same repository's `blobs/` folder where the hub keeps the real files. Any other link is refused.
pub fn contained(root: &Path, dir: &Path, rel: impl AsRef<Path>) -> Result<PathBuf> {
    let rel = rel.as_ref();
    let path = dir.join(rel);
    let real = fs::canonicalize(&path).map_err(|e| Error::io(&path, e))?;
    if allowed_target(root, &real) {
        return Ok(real);
    }
    Err(Error::checkpoint(
        dir,
        format!("{} is a symbolic link to {}, outside the model directory; llmprune follows links only within it", rel.display(), real.display()),
    ))
}

/// Whether a resolved path may be read as part of the model rooted at the canonical `root`.
pub fn allowed_target(root: &Path, real: &Path) -> bool {
    if real.starts_with(root) {
        return true;
    }
    let snapshots = root.parent();
    match snapshots.and_then(Path::parent) {
        Some(repo) if snapshots.and_then(Path::file_name) == Some(std::ffi::OsStr::new("snapshots")) => real.starts_with(repo.join("blobs")),
        _ => false,
    }
}

/// A shard name must be a relative path inside the model directory ending in `.safetensors`.
fn check_shard_name(index_path: &Path, file: &str) -> Result<()> {
    let p = Path::new(file);
    let inside = !file.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !inside {
        return Err(Error::checkpoint(index_path, format!("shard path {file:?} points outside the model directory")));
    }
    if !file.ends_with(".safetensors") {
        return Err(Error::checkpoint(index_path, format!("shard path {file:?} does not end in .safetensors")));
    }
    Ok(())
}

fn check_weight_map(dir: &Path, index: &serde_json::Map<String, Value>, shards: &[Shard], locations: &HashMap<String, (usize, usize)>) -> Result<()> {
    let index_path = dir.join(INDEX_FILE);
    let map = index["weight_map"].as_object().expect("checked in read_index");
    for (tensor, file) in map {
        let file = file.as_str().unwrap_or_default();
        match locations.get(tensor) {
            Some(&(si, _)) if shards[si].file_name == file => {}
            Some(&(si, _)) => {
                return Err(Error::checkpoint(
                    &index_path,
                    format!("index places tensor {tensor} in {file}, but it is stored in {}", shards[si].file_name),
                ))
            }
            None => return Err(Error::checkpoint(&index_path, format!("index names tensor {tensor} in {file}, which does not hold it"))),
        }
    }
    for shard in shards {
        for t in &shard.tensors {
            if !map.contains_key(&t.name) {
                return Err(Error::checkpoint(&index_path, format!("tensor {} in {} is missing from the index", t.name, shard.file_name)));
            }
        }
    }
    Ok(())
}
