//! The plan of an output shard, one `OutTensor` per tensor in file order, and the shard header it
//! gives: unstructured `apply`, structured pruning and the block and expert writer (`surgery::remap`)
//! all plan their shards this way before writing a byte.

use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::checkpoint::{dtype_name, Shard};

/// One tensor of an output shard: its name, dtype, shape and size in the output, and `source`,
/// how its bytes are produced (each writer's own kinds: copied, pruned, sliced, added, ...).
#[derive(Debug)]
pub struct OutTensor<S> {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub nbytes: usize,
    pub source: S,
}

/// The header of an output shard holding `plan`'s tensors one after another in this order: the
/// input shard's `__metadata__` with `llmprune` provenance added, then every tensor's entry.
pub fn shard_header<S>(shard: &Shard, provenance: &str, plan: &[OutTensor<S>]) -> Result<Vec<u8>> {
    let mut offset = 0usize;
    let entries: Vec<(String, Value)> = plan
        .iter()
        .map(|t| {
            let v = serde_json::json!({"dtype": dtype_name(t.dtype), "shape": t.shape, "data_offsets": [offset, offset + t.nbytes]});
            offset += t.nbytes;
            (t.name.clone(), v)
        })
        .collect();
    encode_header(shard, metadata_with_provenance(shard, provenance), entries)
}

/// The shard's `__metadata__` entries with `llmprune` provenance added.
fn metadata_with_provenance(shard: &Shard, provenance: &str) -> serde_json::Map<String, Value> {
    let mut meta = match shard.header.get("__metadata__") {
        Some(Value::Object(m)) => m.clone(),
        _ => serde_json::Map::new(),
    };
    meta.insert("llmprune".into(), provenance.into());
    meta
}

/// A safetensors header: `__metadata__` first, then `tensors`, serialized, padded with spaces to 8
/// bytes and prefixed with its little-endian length.
fn encode_header(shard: &Shard, meta: serde_json::Map<String, Value>, tensors: impl IntoIterator<Item = (String, Value)>) -> Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), Value::Object(meta));
    header.extend(tensors);
    let mut json = serde_json::to_vec(&Value::Object(header)).map_err(|e| Error::checkpoint(&shard.path, format!("cannot serialize header: {e}")))?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    Ok(bytes)
}
