//! The scaffold every `apply` run shares, unstructured or structured: open the checkpoint, find
//! and check the stats sidecar, stream the shards through the writer thread into a staging
//! directory with progress after every tensor, stamp provenance, write the index, copy the other
//! files and rename the result into place.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::checkpoint::{Checkpoint, Shard, INDEX_FILE};
use crate::io::output::{copy_other_files, write_index, StagingDir};
use crate::io::writer::ShardWriter;
use crate::sidecar::gram::{Gram, DEFAULT_GRAM};
use crate::sidecar::{self, Sidecar, DEFAULT_SIDECAR};

/// Reported after every tensor; returning an error stops the run and removes partial output.
pub struct Progress<'a> {
    pub tensor: &'a str,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub tensors_done: usize,
    pub tensors_total: usize,
}

/// Why a run needs a sidecar, and what to tell a user who has none.
pub struct StatsNeed {
    /// e.g. "method wanda needs activation"
    pub what: String,
    pub hint: String,
}

impl StatsNeed {
    pub fn activations(who: &str) -> StatsNeed {
        StatsNeed { what: format!("{who} needs activation"), hint: "run `llmprune stats MODEL` first, or pass --stats PATH".into() }
    }
}

pub struct Run {
    pub started: Instant,
    pub ckpt: Checkpoint,
    pub sidecar: Option<Sidecar>,
    pub warnings: Vec<String>,
}

impl Run {
    /// Opens the checkpoint and, when needed or given, the sidecar (checked against the model).
    pub fn open(model_dir: &Path, stats: Option<&Path>, need: Option<StatsNeed>) -> Result<Run> {
        let mut run = Run::open_checkpoint(model_dir)?;
        run.attach_sidecar(stats, need)?;
        Ok(run)
    }

    /// Opens the checkpoint only (a caller with checks of its own to make first).
    pub fn open_checkpoint(model_dir: &Path) -> Result<Run> {
        Ok(Run { started: Instant::now(), ckpt: Checkpoint::open(model_dir)?, sidecar: None, warnings: Vec::new() })
    }

    /// Opens the sidecar when needed or given, and checks it against the checkpoint.
    pub fn attach_sidecar(&mut self, stats: Option<&Path>, need: Option<StatsNeed>) -> Result<()> {
        let model_dir = self.ckpt.dir.clone();
        let sidecar = match (sidecar::locate(&model_dir, stats), need) {
            (Some(p), need) if need.is_some() || stats.is_some() => Some(Sidecar::open(&p)?),
            (None, Some(need)) => {
                return Err(Error::arg_hint(format!("{} statistics, and {} has no {DEFAULT_SIDECAR}", need.what, model_dir.display()), need.hint))
            }
            _ => None,
        };
        if let Some(sc) = &sidecar {
            sc.check_matches(&self.ckpt)?;
        }
        self.sidecar = sidecar;
        Ok(())
    }

    /// The `llmprune` provenance entry of every output shard: the method's `fields`, then what
    /// every run records (version, sidecar hash, source fingerprint), then the caller's `extra`.
    pub fn provenance(&self, fields: serde_json::Map<String, Value>, extra: &BTreeMap<String, String>) -> String {
        let mut p = serde_json::Map::new();
        p.insert("llmprune_version".into(), env!("CARGO_PKG_VERSION").into());
        p.extend(fields);
        p.insert("stats_sha256".into(), self.sidecar.as_ref().map(|s| Value::from(s.sha256.clone())).unwrap_or(Value::Null));
        p.insert("source_fingerprint".into(), self.ckpt.fingerprint().into());
        for (k, v) in extra {
            p.insert(k.clone(), v.clone().into());
        }
        Value::Object(p).to_string()
    }

    /// The Gram sidecar `explicit`, else the model's default one, checked against the model;
    /// `who` names what needs it in the error when there is none.
    pub fn open_gram(&self, explicit: Option<&Path>, who: &str) -> Result<Gram> {
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None => {
                let p = self.ckpt.dir.join(DEFAULT_GRAM);
                if !p.is_file() {
                    return Err(Error::arg_hint(
                        format!("{who} needs input Gram statistics, and {} has no {DEFAULT_GRAM}", self.ckpt.dir.display()),
                        "run llmprune stats MODEL --gram, or pass --gram PATH",
                    ));
                }
                p
            }
        };
        let g = Gram::open(&path)?;
        g.check_matches(&self.ckpt)?;
        Ok(g)
    }

    pub fn stats_path(&self) -> Option<String> {
        self.sidecar.as_ref().map(|s| s.path.display().to_string())
    }

    /// Prepares the staging directory; its notes about leftovers of killed runs become warnings.
    pub fn stage(&mut self, out_dir: &Path, force: bool) -> Result<StagingDir> {
        let staging = StagingDir::prepare(&self.ckpt.dir, out_dir, force)?;
        self.warnings.extend(staging.warnings.iter().cloned());
        Ok(staging)
    }

    /// Streams every shard into `staging`: `each` writes one shard's header and tensors through
    /// the `ShardOut` it is given. Returns the bytes written.
    pub fn write_shards<'c>(
        &'c self,
        staging: &StagingDir,
        progress: &mut dyn FnMut(Progress) -> Result<()>,
        mut each: impl FnMut(&'c Shard, &mut ShardOut<'_, '_, 'c>) -> Result<()>,
    ) -> Result<u64> {
        let mut counters =
            Counters { bytes_done: 0, bytes_total: self.ckpt.total_bytes(), tensors_done: 0, tensors_total: self.ckpt.tensors().count() };
        std::thread::scope(|scope| -> Result<u64> {
            let mut writer = ShardWriter::spawn(scope);
            let result = (|| -> Result<()> {
                for shard in &self.ckpt.shards {
                    let out_path = staging.path.join(&shard.file_name);
                    if let Some(parent) = out_path.parent() {
                        fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
                    }
                    writer.open(out_path)?;
                    let mut out = ShardOut { writer: &mut writer, progress: &mut *progress, counters: &mut counters };
                    each(shard, &mut out)?;
                    counters.bytes_done += (8 + shard.header_len) as u64;
                }
                Ok(())
            })();
            let written = writer.finish();
            result?;
            written
        })
    }

    /// Writes the index (with `weight_map` when tensors moved or changed), copies the other files
    /// but those in `rewritten` and the stats and Gram sidecars (they describe the unpruned model), and renames
    /// the staging directory into place.
    pub fn finish(
        &self,
        staging: StagingDir,
        tensor_bytes: u64,
        weight_map: Option<&BTreeMap<String, String>>,
        rewritten: &[&str],
    ) -> Result<PathBuf> {
        if let Some(index) = &self.ckpt.index {
            write_index(index, tensor_bytes, weight_map, &staging.path.join(INDEX_FILE))?;
        }
        let leave_out: Vec<&str> = rewritten.iter().copied().chain([DEFAULT_SIDECAR, DEFAULT_GRAM]).collect();
        copy_other_files(&self.ckpt, &staging.path, &leave_out)?;
        staging.commit()
    }

    pub fn seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}

struct Counters {
    bytes_done: u64,
    bytes_total: u64,
    tensors_done: usize,
    tensors_total: usize,
}

/// One shard being written: its header, then its tensors in order, each reported when done.
pub struct ShardOut<'w, 's, 'c: 's> {
    writer: &'w mut ShardWriter<'s, 'c>,
    progress: &'w mut dyn FnMut(Progress) -> Result<()>,
    counters: &'w mut Counters,
}

impl<'s, 'c: 's> ShardOut<'_, 's, 'c> {
    pub fn header(&mut self, bytes: Vec<u8>) -> Result<()> {
        self.writer.write_owned(bytes)
    }

    /// Writes bytes straight from the input map.
    pub fn copy(&mut self, data: &'c [u8]) -> Result<()> {
        self.writer.write_borrowed(data)
    }

    /// Writes a tensor computed into a recycled buffer by `fill`.
    pub fn fill<T>(&mut self, fill: impl FnOnce(&mut Vec<u8>) -> Result<T>) -> Result<T> {
        let mut buf = self.writer.buffer()?;
        let value = fill(&mut buf)?;
        self.writer.write_owned(buf)?;
        Ok(value)
    }

    /// Reports an input tensor of `input_bytes` as done (and gives Ctrl-C its chance).
    pub fn done(&mut self, tensor: &str, input_bytes: usize) -> Result<()> {
        let c = &mut *self.counters;
        c.bytes_done += input_bytes as u64;
        c.tensors_done += 1;
        (self.progress)(Progress {
            tensor,
            bytes_done: c.bytes_done,
            bytes_total: c.bytes_total,
            tensors_done: c.tensors_done,
            tensors_total: c.tensors_total,
        })
    }
}
