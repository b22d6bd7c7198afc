//! The output directory: refusing to overwrite the input, a temporary sibling directory that is
//! removed on any failure, and the final rename into place.

use std::fs;
use std::path::{Path, PathBuf};

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
