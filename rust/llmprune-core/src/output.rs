//! The output directory: refusing to overwrite the input, a temporary sibling directory that is
//! removed on any failure, and the final rename into place.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::apply::DEFAULT_SIDECAR;
use crate::checkpoint::{Checkpoint, Shard, INDEX_FILE};

use crate::error::{Error, Result};

/// A directory beside the target that becomes the target only on `commit`; dropped uncommitted,
/// it is deleted with everything written so far.
pub struct StagingDir {
    pub path: PathBuf,
    target: PathBuf,
    force: bool,
    committed: bool,
}

fn canonical_or_joined(p: &Path) -> Result<PathBuf> {
    if p.exists() {
        return fs::canonicalize(p).map_err(|e| Error::io(p, e));
    }
    let name = p.file_name().ok_or_else(|| Error::Output {
        path: p.to_path_buf(),
        msg: "not a directory name".into(),
    })?;
    let parent = match p.parent() {
        Some(pp) if !pp.as_os_str().is_empty() => pp.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(Error::Output {
            path: p.to_path_buf(),
            msg: format!("parent directory {} does not exist", parent.display()),
        });
    }
    let parent = fs::canonicalize(&parent).map_err(|e| Error::io(&parent, e))?;
    Ok(parent.join(name))
}

impl StagingDir {
    /// Checks that `target` may receive the output of pruning `model_dir`, and creates the staging
    /// directory beside it.
    pub fn prepare(model_dir: &Path, target: &Path, force: bool) -> Result<StagingDir> {
        let model = fs::canonicalize(model_dir).map_err(|e| Error::io(model_dir, e))?;
        let out = canonical_or_joined(target)?;
        let refuse = |msg: &str| Error::Output {
            path: target.to_path_buf(),
            msg: msg.to_string(),
        };
        if out == model {
            return Err(refuse("is the input model directory; llmprune never writes over its input"));
        }
        if out.starts_with(&model) {
            return Err(refuse("is inside the input model directory"));
        }
        if model.starts_with(&out) {
            return Err(refuse("contains the input model directory"));
        }
        if out.exists() {
            if !out.is_dir() {
                return Err(refuse("exists and is not a directory"));
            }
            let non_empty = fs::read_dir(&out)
                .map_err(|e| Error::io(&out, e))?
                .next()
                .is_some();
            if non_empty && !force {
                return Err(refuse("exists and is not empty"));
            }
        }
        let parent = out.parent().expect("canonical path has a parent");
        let name = out.file_name().expect("canonical path has a name").to_string_lossy();
        let path = parent.join(format!(".{name}.llmprune-tmp-{}", std::process::id()));
        if path.exists() {
            fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        }
        fs::create_dir(&path).map_err(|e| Error::Output {
            path: target.to_path_buf(),
            msg: format!("cannot create a directory in {}: {e}", parent.display()),
        })?;
        Ok(StagingDir {
            path,
            target: out,
            force,
            committed: false,
        })
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Moves the finished output into place.
    pub fn commit(mut self) -> Result<PathBuf> {
        if self.target.exists() {
            if !self.force {
                return Err(Error::Output {
                    path: self.target.clone(),
                    msg: "appeared while pruning; not replaced".into(),
                });
            }
            fs::remove_dir_all(&self.target).map_err(|e| Error::io(&self.target, e))?;
        }
        fs::rename(&self.path, &self.target).map_err(|e| Error::io(&self.target, e))?;
        self.committed = true;
        Ok(self.target.clone())
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Copies `src` (file or directory tree) to `dst`, leaving out the entries whose path relative to
/// the top of the copy `skip` selects.
pub fn copy_tree(src: &Path, dst: &Path, rel: &Path, skip: &dyn Fn(&Path) -> bool) -> Result<u64> {
    if skip(rel) {
        return Ok(0);
    }
    let meta = fs::metadata(src).map_err(|e| Error::io(src, e))?;
    if meta.is_dir() {
        fs::create_dir_all(dst).map_err(|e| Error::io(dst, e))?;
        let mut total = 0;
        for entry in fs::read_dir(src).map_err(|e| Error::io(src, e))? {
            let entry = entry.map_err(|e| Error::io(src, e))?;
            let name = entry.file_name();
            total += copy_tree(&entry.path(), &dst.join(&name), &rel.join(&name), skip)?;
        }
        Ok(total)
    } else {
        fs::copy(src, dst).map_err(|e| Error::io(src, e))
    }
}

/// The shard's `__metadata__` entries with `llmprune` provenance added.
pub fn metadata_with_provenance(shard: &Shard, provenance: &str) -> serde_json::Map<String, Value> {
    let mut meta = match shard.header.get("__metadata__") {
        Some(Value::Object(m)) => m.clone(),
        _ => serde_json::Map::new(),
    };
    meta.insert("llmprune".into(), provenance.into());
    meta
}

/// A safetensors header: `__metadata__` first, then `tensors`, serialized, padded with spaces to 8
/// bytes and prefixed with its little-endian length.
pub fn encode_header(
    shard: &Shard,
    meta: serde_json::Map<String, Value>,
    tensors: impl IntoIterator<Item = (String, Value)>,
) -> Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), Value::Object(meta));
    header.extend(tensors);
    let mut json = serde_json::to_vec(&Value::Object(header))
        .map_err(|e| Error::checkpoint(&shard.path, format!("cannot serialize header: {e}")))?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    Ok(bytes)
}

/// Writes index.json with a new `total_size` and, when given, a new weight map.
pub fn write_index(
    index: &serde_json::Map<String, Value>,
    total: u64,
    weight_map: Option<&BTreeMap<String, String>>,
    path: &Path,
) -> Result<()> {
    let mut index = index.clone();
    let meta = index.entry("metadata").or_insert_with(|| Value::Object(Default::default()));
    if let Value::Object(m) = meta {
        m.insert("total_size".into(), total.into());
    }
    if let Some(map) = weight_map {
        let map: serde_json::Map<String, Value> = map.iter().map(|(k, v)| (k.clone(), Value::from(v.clone()))).collect();
        index.insert("weight_map".into(), Value::Object(map));
    }
    let text = serde_json::to_string_pretty(&Value::Object(index)).expect("JSON value serializes");
    fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

/// Everything else in the model directory (tokenizer, generation config, ...): not the shards, the
/// index, the stats sidecar (it describes the unpruned model), nor the top-level files in `rewritten`.
pub fn copy_other_files(ckpt: &Checkpoint, dst: &Path, rewritten: &[&str]) -> Result<()> {
    let dir = &ckpt.dir;
    let skip = |rel: &Path| {
        rel == Path::new(INDEX_FILE)
            || rel == Path::new(DEFAULT_SIDECAR)
            || rewritten.iter().any(|f| rel == Path::new(f))
            || ckpt.shards.iter().any(|s| Path::new(&s.file_name) == rel)
    };
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        copy_tree(&entry.path(), &dst.join(&name), Path::new(&name), &skip)?;
    }
    Ok(())
}
