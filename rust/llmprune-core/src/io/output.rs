//! Where output goes: refusing to overwrite the input, a temporary sibling directory (or file) that
//! is removed on any failure, the final rename into place, cleanup of what a killed run left, and
//! the copy of the model directory's other files under the symbolic-link policy.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::checkpoint::{allowed_target, Checkpoint, INDEX_FILE};

const OTHER_HINT: &str = "choose another --out";
const FORCE_HINT: &str = "choose another --out, or pass --force to replace it";
/// Infix of every temporary name: `.<name>.llmprune-tmp-<pid>` beside the destination.
const TMP_INFIX: &str = ".llmprune-tmp-";

/// A directory beside the target that becomes the target only on `commit`; dropped uncommitted,
/// it is deleted with everything written so far.
pub struct StagingDir {
    pub path: PathBuf,
    target: PathBuf,
    force: bool,
    committed: bool,
    /// Leftovers of killed runs found beside the target (removed, or named when still in use).
    pub warnings: Vec<String>,
}

fn canonical_or_joined(p: &Path) -> Result<PathBuf> {
    if p.as_os_str().is_empty() {
        return Err(Error::output_hint(p, "is empty", OTHER_HINT));
    }
    if p.exists() {
        return fs::canonicalize(p).map_err(|e| Error::io(p, e));
    }
    let name = p.file_name().ok_or_else(|| Error::output_hint(p, "not a directory name", OTHER_HINT))?;
    let parent = match p.parent() {
        Some(pp) if !pp.as_os_str().is_empty() => pp.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(Error::output_hint(p, format!("parent directory {} does not exist", parent.display()), OTHER_HINT));
    }
    let parent = fs::canonicalize(&parent).map_err(|e| Error::io(&parent, e))?;
    Ok(parent.join(name))
}

/// The temporary name beside `target` for this process.
pub(crate) fn temp_beside(target: &Path) -> Result<(PathBuf, String)> {
    let parent = target.parent().unwrap_or(Path::new("."));
    let name =
        target.file_name().ok_or_else(|| Error::output_hint(target, "not a file or directory name", OTHER_HINT))?.to_string_lossy().into_owned();
    let prefix = format!(".{name}{TMP_INFIX}");
    Ok((parent.join(format!("{prefix}{}", std::process::id())), prefix))
}

fn process_alive(pid: u32) -> Option<bool> {
    let proc_root = Path::new("/proc");
    proc_root.join("self").exists().then(|| proc_root.join(pid.to_string()).exists())
}

/// Removes the temporary files or directories that runs killed without a chance to clean up (e.g.
/// by SIGKILL) left beside `target`; one still owned by a live process is only named.
pub fn clean_stale(target: &Path) -> Vec<String> {
    let mut notes = Vec::new();
    let Ok((own, prefix)) = temp_beside(target) else { return notes };
    let parent = own.parent().unwrap_or(Path::new(".")).to_path_buf();
    let Ok(entries) = fs::read_dir(&parent) else { return notes };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let digits = name.strip_prefix(&prefix).map(|p| p.split(|c: char| !c.is_ascii_digit()).next().unwrap_or(""));
        let Some(pid) = digits.and_then(|p| p.parse::<u32>().ok()) else { continue };
        let path = entry.path();
        if pid == std::process::id() {
            continue;
        }
        match process_alive(pid) {
            Some(false) => {
                let removed = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
                match removed {
                    Ok(()) => notes.push(format!("removed {}, left by an interrupted run (process {pid})", path.display())),
                    Err(e) => notes.push(format!("cannot remove {}, left by an interrupted run: {e}", path.display())),
                }
            }
            _ => notes.push(format!(
                "{} may belong to a running llmprune (process {pid}); if none runs, remove it: rm -rf '{}'",
                path.display(),
                path.display()
            )),
        }
    }
    notes
}

impl StagingDir {
    /// Checks that `target` may receive the output of pruning `model_dir`, and creates the staging
    /// directory beside it.
    pub fn prepare(model_dir: &Path, target: &Path, force: bool) -> Result<StagingDir> {
        let model = fs::canonicalize(model_dir).map_err(|e| Error::io(model_dir, e))?;
        let out = canonical_or_joined(target)?;
        let refuse = |msg: &str, hint: &str| Error::output_hint(target, msg, hint);
        if out == model {
            return Err(refuse("is the input model directory; llmprune never writes over its input", OTHER_HINT));
        }
        if out.starts_with(&model) {
            return Err(refuse("is inside the input model directory", OTHER_HINT));
        }
        if model.starts_with(&out) {
            return Err(refuse("contains the input model directory", OTHER_HINT));
        }
        if out.exists() {
            if !out.is_dir() {
                return Err(refuse("exists and is not a directory", OTHER_HINT));
            }
            if !force && !is_empty_dir(&out)? {
                return Err(refuse("exists and is not empty", FORCE_HINT));
            }
        }
        let warnings = clean_stale(&out);
        let (path, _) = temp_beside(&out)?;
        if path.exists() {
            fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        }
        let parent = out.parent().unwrap_or(Path::new("."));
        fs::create_dir(&path)
            .map_err(|e| Error::output_hint(target, format!("cannot create a directory in {}: {e}", parent.display()), OTHER_HINT))?;
        Ok(StagingDir { path, target: out, force, committed: false, warnings })
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Moves the finished output into place. An empty directory at the target is replaced; a
    /// non-empty one only with `force` (it may have appeared while the output was written).
    pub fn commit(mut self) -> Result<PathBuf> {
        if self.target.exists() {
            if !self.target.is_dir() || (!self.force && !is_empty_dir(&self.target)?) {
                return Err(Error::output_hint(&self.target, "appeared while writing; not replaced", FORCE_HINT));
            }
            // The old target goes aside first, so a failed rename can put it back.
            let mut old = self.path.clone().into_os_string();
            old.push("-old");
            let old = PathBuf::from(old);
            fs::rename(&self.target, &old).map_err(|e| Error::io(&self.target, e))?;
            if let Err(e) = fs::rename(&self.path, &self.target) {
                let _ = fs::rename(&old, &self.target);
                return Err(Error::io(&self.target, e));
            }
            let _ = fs::remove_dir_all(&old);
        } else {
            fs::rename(&self.path, &self.target).map_err(|e| Error::io(&self.target, e))?;
        }
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

fn is_empty_dir(p: &Path) -> Result<bool> {
    Ok(fs::read_dir(p).map_err(|e| Error::io(p, e))?.next().is_none())
}

/// Whether two paths name the same existing file (through links or different spellings).
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Refuses to write `dest` when it is the file `input` that the command reads.
pub fn check_not_input(dest: &Path, input: &Path) -> Result<()> {
    if same_file(dest, input) {
        return Err(Error::output_hint(
            dest,
            format!("is the input {}; llmprune never writes over its input", input.display()),
            "choose another --out",
        ));
    }
    Ok(())
}

/// Checks that a file can be written at `path` (its folder exists and takes a new file, and it is
/// not a folder), by creating and removing the temporary file `atomic_write` would use. Long runs
/// call it first, so a bad destination is reported before the work, not after.
pub fn check_file_destination(path: &Path) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if path.as_os_str().is_empty() {
        return Err(Error::output_hint(path, "is empty", "give a file name with --out"));
    }
    if path.is_dir() {
        return Err(Error::output_hint(path, "is a directory", "give a file name with --out, e.g. stats.safetensors"));
    }
    if !parent.is_dir() {
        return Err(Error::output_hint(path, format!("directory {} does not exist", parent.display()), "choose another location with --out"));
    }
    if let Some(kind) = foreign_kind(path) {
        return Err(Error::output_hint(
            path,
            format!("exists and is {kind}; llmprune writes a sidecar only over an llmprune sidecar"),
            "choose another file name with --out, e.g. stats.safetensors",
        ));
    }
    let (tmp, _) = temp_beside(path)?;
    match fs::OpenOptions::new().write(true).create_new(true).open(&tmp) {
        Ok(_) => {
            let _ = fs::remove_file(&tmp);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(unwritable(path, &parent, e)),
    }
}

/// The files of a model directory that are not weights: a sidecar is never written over them.
const MODEL_FILES: [&str; 11] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
];

/// What an existing file at a sidecar's destination is, when it is not a file a sidecar may
/// replace (an llmprune sidecar, or an empty file): a model shard, an index, config.json, a
/// tokenizer file, or any other file.
pub fn foreign_kind(path: &Path) -> Option<String> {
    let meta = fs::metadata(path).ok()?;
    if !meta.is_file() || meta.len() == 0 {
        return None;
    }
    let name = path.file_name()?.to_string_lossy().to_ascii_lowercase();
    if name == "config.json" {
        return Some("a model's config.json".into());
    }
    if name.ends_with(".index.json") {
        return Some("a checkpoint index".into());
    }
    if MODEL_FILES.contains(&name.as_str()) || name.starts_with("tokenizer") {
        return Some(format!("a model file ({name})"));
    }
    match sidecar_format(path) {
        Some(Some(_)) => None,
        Some(None) => Some("a safetensors file that is not an llmprune sidecar (a model shard?)".into()),
        None => Some("a file that is not an llmprune sidecar".into()),
    }
}

/// Reads a safetensors header: None when the file is not safetensors, Some(format) otherwise,
/// with the `llmprune-stats` / `llmprune-gram` format a sidecar declares.
fn sidecar_format(path: &Path) -> Option<Option<String>> {
    use std::io::Read;
    let mut f = fs::File::open(path).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let n = u64::from_le_bytes(len);
    if n == 0 || n > 100_000_000 || n + 8 > f.metadata().ok()?.len() {
        return None;
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).ok()?;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&header).ok()?;
    let format = header
        .get("__metadata__")
        .and_then(|m| m.get("llmprune"))
        .and_then(Value::as_str)
        .and_then(|t| serde_json::from_str::<serde_json::Map<String, Value>>(t).ok())
        .and_then(|m| m.get("format").and_then(Value::as_str).map(str::to_string))
        .filter(|f| f == "llmprune-stats" || f == "llmprune-gram");
    Some(format)
}

fn unwritable(path: &Path, parent: &Path, e: std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem => {
            Error::output_hint(path, format!("directory {} is not writable", parent.display()), "choose another location with --out")
        }
        _ => Error::io(path, e),
    }
}

/// Writes `bytes` to `path` through a temporary file beside it, renamed into place when complete.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    check_file_destination(path)?;
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let _ = clean_stale(path);
    let (tmp, _) = temp_beside(path)?;
    let result = fs::write(&tmp, bytes).and_then(|_| fs::rename(&tmp, path));
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(unwritable(path, parent, e));
    }
    Ok(())
}

/// Writes `config` as the config.json of the output being staged in `dir` (pretty, newline-ended).
pub fn write_config(dir: &Path, config: serde_json::Map<String, Value>) -> Result<()> {
    let path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&Value::Object(config)).map_err(|e| Error::Internal(e.to_string()))?;
    fs::write(&path, text + "\n").map_err(|e| Error::io(&path, e))
}

/// Writes index.json with a new `total_size` and, when given, a new weight map.
pub fn write_index(index: &serde_json::Map<String, Value>, total: u64, weight_map: Option<&BTreeMap<String, String>>, path: &Path) -> Result<()> {
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
/// index, nor the top-level files in `leave_out` (files the caller rewrites, the stats sidecar).
///
/// Symbolic links follow the checkpoint's policy (`checkpoint::contained`): links that resolve
/// inside the model directory (or a hub snapshot's blobs) are copied as what they point to, others
/// are refused; a folder reached a second time (a link cycle such as `loop -> .`) is not entered
/// again. Anything but files and folders (sockets, pipes, devices) is refused.
pub fn copy_other_files(ckpt: &Checkpoint, dst: &Path, leave_out: &[&str]) -> Result<()> {
    let dir = &ckpt.dir;
    let root = fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?;
    let skip = |rel: &Path| {
        rel == Path::new(INDEX_FILE) || leave_out.iter().any(|f| rel == Path::new(f)) || ckpt.shards.iter().any(|s| Path::new(&s.file_name) == rel)
    };
    let mut copier = Copier { root: &root, dir, visited: HashSet::from([root.clone()]), skip: &skip };
    copier.children(dir, dst, Path::new(""))
}

struct Copier<'a> {
    root: &'a Path,
    dir: &'a Path,
    visited: HashSet<PathBuf>,
    skip: &'a dyn Fn(&Path) -> bool,
}

impl Copier<'_> {
    fn children(&mut self, src: &Path, dst: &Path, rel: &Path) -> Result<()> {
        let mut entries: Vec<_> = fs::read_dir(src).map_err(|e| Error::io(src, e))?.collect::<std::io::Result<_>>().map_err(|e| Error::io(src, e))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = entry.file_name();
            self.entry(&entry.path(), &dst.join(&name), &rel.join(&name))?;
        }
        Ok(())
    }

    fn entry(&mut self, src: &Path, dst: &Path, rel: &Path) -> Result<()> {
        if (self.skip)(rel) {
            return Ok(());
        }
        let link = fs::symlink_metadata(src).map_err(|e| Error::io(src, e))?.file_type().is_symlink();
        let real = fs::canonicalize(src)
            .map_err(|e| Error::checkpoint(self.dir, format!("{} cannot be read ({e}); a broken symbolic link?", rel.display())))?;
        if link && !allowed_target(self.root, &real) {
            return Err(Error::checkpoint(
                self.dir,
                format!(
                    "{} is a symbolic link to {}, outside the model directory; llmprune follows links only within it",
                    rel.display(),
                    real.display()
                ),
            ));
        }
        let meta = fs::metadata(&real).map_err(|e| Error::io(src, e))?;
        if meta.is_dir() {
            if !self.visited.insert(real.clone()) {
                return Ok(());
            }
            fs::create_dir_all(dst).map_err(|e| Error::io(dst, e))?;
            self.children(&real, dst, rel)
        } else if meta.is_file() {
            fs::copy(&real, dst).map(|_| ()).map_err(|e| Error::io(src, e))
        } else {
            Err(Error::checkpoint(self.dir, format!("{} is neither a file nor a folder; llmprune copies only those", rel.display())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn safetensors_with(meta: Option<&str>) -> Vec<u8> {
        let mut header = serde_json::json!({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}});
        if let Some(m) = meta {
            header["__metadata__"] = serde_json::json!({ "llmprune": m });
        }
        let text = header.to_string();
        let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
        bytes.extend(text.as_bytes());
        bytes.extend(1f32.to_le_bytes());
        bytes
    }

    #[test]
    fn a_sidecar_replaces_only_a_sidecar() {
        let d = tempfile::tempdir().unwrap();
        let put = |name: &str, bytes: &[u8]| {
            let p = d.path().join(name);
            fs::write(&p, bytes).unwrap();
            p
        };
        // files a sidecar may replace, or a new name
        assert_eq!(foreign_kind(&put("s.safetensors", &safetensors_with(Some(r#"{"format": "llmprune-stats"}"#)))), None);
        assert_eq!(foreign_kind(&put("g.safetensors", &safetensors_with(Some(r#"{"format": "llmprune-gram"}"#)))), None);
        assert_eq!(foreign_kind(&put("empty.safetensors", b"")), None);
        assert_eq!(foreign_kind(&d.path().join("new.safetensors")), None);
        assert!(check_file_destination(&d.path().join("s.safetensors")).is_ok());
        // files of a model, and anything else
        for (name, bytes, what) in [
            ("model.safetensors", safetensors_with(None), "model shard"),
            ("other.safetensors", safetensors_with(Some(r#"{"format": "something"}"#)), "model shard"),
            ("model.safetensors.index.json", b"{}".to_vec(), "index"),
            ("config.json", b"{}".to_vec(), "config.json"),
            ("tokenizer.json", b"{}".to_vec(), "tokenizer.json"),
            ("tokenizer_config.json", b"{}".to_vec(), "tokenizer_config.json"),
            ("notes.txt", b"hello".to_vec(), "not an llmprune sidecar"),
        ] {
            let p = put(name, &bytes);
            let kind = foreign_kind(&p).unwrap_or_else(|| panic!("{name} is refused"));
            assert!(kind.contains(what), "{name}: {kind}");
            let e = check_file_destination(&p).unwrap_err();
            assert!(e.to_string().contains("llmprune writes a sidecar only over an llmprune sidecar"), "{e}");
            assert!(e.hint().is_some());
            assert_eq!(fs::read(&p).unwrap(), bytes, "{name} is untouched");
        }
    }
}
