//! A writer thread that overlaps writing tensor i with computing tensor i+1.
//!
//! Pruned tensors travel as owned buffers that come back to the producer once written, so at most
//! `BUFFERS` tensor-sized buffers exist; unpruned tensors travel as slices of the input map and are
//! written straight from it.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::{Scope, ScopedJoinHandle};

use crate::error::{Error, Result};

const BUFFERS: usize = 2;

enum Job<'a> {
    Open(PathBuf),
    Owned(Vec<u8>),
    Borrowed(&'a [u8]),
}

pub struct ShardWriter<'scope, 'a> {
    jobs: Option<SyncSender<Job<'a>>>,
    free: Receiver<Vec<u8>>,
    allocated: usize,
    handle: Option<ScopedJoinHandle<'scope, Result<u64>>>,
}

impl<'scope, 'a: 'scope> ShardWriter<'scope, 'a> {
    pub fn spawn(scope: &'scope Scope<'scope, '_>) -> Self {
        let (jobs, rx) = sync_channel::<Job<'a>>(BUFFERS);
        let (free_tx, free) = sync_channel::<Vec<u8>>(BUFFERS);
        let handle = std::thread::Builder::new()
            .name("llmprune-writer".into())
            .spawn_scoped(scope, move || write_loop(rx, free_tx))
            .expect("spawn writer thread");
        ShardWriter { jobs: Some(jobs), free, allocated: 0, handle: Some(handle) }
    }

    /// A buffer to fill: a returned one, or a new one while fewer than `BUFFERS` exist.
    pub fn buffer(&mut self) -> Result<Vec<u8>> {
        if let Ok(b) = self.free.try_recv() {
            return Ok(b);
        }
        if self.allocated < BUFFERS {
            self.allocated += 1;
            return Ok(Vec::new());
        }
        match self.free.recv() {
            Ok(b) => Ok(b),
            Err(_) => Err(self.failure()),
        }
    }

    fn send(&mut self, job: Job<'a>) -> Result<()> {
        let sent = self.jobs.as_ref().map(|tx| tx.send(job).is_ok()).unwrap_or(false);
        if sent {
            Ok(())
        } else {
            Err(self.failure())
        }
    }

    pub fn open(&mut self, path: PathBuf) -> Result<()> {
        self.send(Job::Open(path))
    }

    pub fn write_owned(&mut self, buf: Vec<u8>) -> Result<()> {
        self.send(Job::Owned(buf))
    }

    pub fn write_borrowed(&mut self, data: &'a [u8]) -> Result<()> {
        self.send(Job::Borrowed(data))
    }

    /// The writer stopped early: its own error explains why.
    fn failure(&mut self) -> Error {
        match self.finish() {
            Err(e) => e,
            Ok(_) => Error::arg("writer thread stopped unexpectedly"),
        }
    }

    /// Waits for every queued write; returns the bytes written.
    pub fn finish(&mut self) -> Result<u64> {
        self.jobs.take();
        match self.handle.take() {
            Some(h) => h.join().unwrap_or_else(|_| Err(Error::arg("writer thread panicked"))),
            None => Ok(0),
        }
    }
}

fn write_loop(rx: Receiver<Job<'_>>, free: SyncSender<Vec<u8>>) -> Result<u64> {
    let mut current: Option<(PathBuf, BufWriter<File>)> = None;
    let mut written = 0u64;
    let close = |cur: &mut Option<(PathBuf, BufWriter<File>)>| -> Result<()> {
        if let Some((path, mut w)) = cur.take() {
            w.flush().map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    };
    for job in rx {
        match job {
            Job::Open(path) => {
                close(&mut current)?;
                let f = File::create(&path).map_err(|e| Error::io(&path, e))?;
                current = Some((path, BufWriter::with_capacity(1 << 22, f)));
            }
            Job::Owned(buf) => {
                let (path, w) = current.as_mut().expect("open before write");
                w.write_all(&buf).map_err(|e| Error::io(&*path, e))?;
                written += buf.len() as u64;
                let _ = free.try_send(buf);
            }
            Job::Borrowed(data) => {
                let (path, w) = current.as_mut().expect("open before write");
                w.write_all(data).map_err(|e| Error::io(&*path, e))?;
                written += data.len() as u64;
            }
        }
    }
    close(&mut current)?;
    Ok(written)
}
