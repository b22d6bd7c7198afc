//! Files in and out: checkpoints (headers, index, fingerprint), dtypes, decoder block numbers in
//! tensor names, the plan and header of an output shard, output directories and their staging, and
//! the writer thread.

pub mod blocks;
pub mod checkpoint;
pub mod dtype;
pub mod layout;
pub mod output;
pub mod postcheck;
pub mod writer;
