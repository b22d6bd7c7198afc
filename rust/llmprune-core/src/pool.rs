//! llmprune's one rayon pool: built on first use, kept for the process, rebuilt only when a
//! different thread count is asked for. Never rayon's global pool, so a host application's own
//! rayon use is unaffected.

use std::sync::{Arc, Mutex};

use rayon::ThreadPool;

use crate::error::{Error, Result};

/// More threads than this only cost start-up time and memory; refuse them.
pub const MAX_THREADS: usize = 1024;
pub const THREADS_ENV: &str = "LLMPRUNE_NUM_THREADS";

static POOL: Mutex<Option<(usize, Arc<ThreadPool>)>> = Mutex::new(None);

/// The thread count to use: `requested`, else `LLMPRUNE_NUM_THREADS`, else every core.
pub fn thread_count(requested: Option<usize>) -> Result<usize> {
    let (n, from) = match requested {
        Some(n) => (n, "--threads"),
        None => match std::env::var(THREADS_ENV) {
            Ok(v) if !v.trim().is_empty() => {
                let n = v.trim().parse::<usize>().map_err(|_| {
                    Error::arg_hint(format!("{THREADS_ENV}={v:?} is not a whole number"), format!("unset it or give a count from 1 to {MAX_THREADS}"))
                })?;
                (n, THREADS_ENV)
            }
            _ => return Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
        },
    };
    if n == 0 || n > MAX_THREADS {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        return Err(Error::arg_hint(
            format!("{from} {n} is out of range: give 1 to {MAX_THREADS} threads"),
            format!("this machine has {cores} cores; leave it unset to use them all"),
        ));
    }
    Ok(n)
}

/// The shared pool with `thread_count(requested)` threads.
pub fn pool(requested: Option<usize>) -> Result<Arc<ThreadPool>> {
    let n = thread_count(requested)?;
    let mut slot = POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((have, p)) = slot.as_ref() {
        if *have == n {
            return Ok(Arc::clone(p));
        }
    }
    let p = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("llmprune-{i}"))
            .build()
            .map_err(|e| Error::arg(format!("cannot start {n} threads: {e}")))?,
    );
    *slot = Some((n, Arc::clone(&p)));
    Ok(p)
}
