//! Decoder block numbers in tensor names: N in `…layers.N.…`, `…h.N.…`, `…blocks.N.…`.

use crate::io::checkpoint::Checkpoint;

/// The decoder block a tensor belongs to: N in `…layers.N.…`, `…h.N.…`, `…blocks.N.…`.
pub fn block_index(name: &str) -> Option<usize> {
    block_segment(&name.split('.').collect::<Vec<_>>()).map(|(_, b)| b)
}

/// In a name split at dots: the position of its block number and the number.
pub fn block_segment(parts: &[&str]) -> Option<(usize, usize)> {
    parts.windows(2).enumerate().find_map(|(i, w)| match w[0] {
        "layers" | "h" | "blocks" if !w[1].is_empty() && w[1].bytes().all(|b| b.is_ascii_digit()) => w[1].parse().ok().map(|b| (i + 1, b)),
        _ => None,
    })
}

/// Number of decoder blocks in the checkpoint: one more than the largest block index of any tensor.
pub fn num_blocks(ckpt: &Checkpoint) -> usize {
    ckpt.tensors().filter_map(|(_, t)| block_index(&t.name)).max().map_or(0, |b| b + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_indices() {
        assert_eq!(block_index("model.layers.12.mlp.up_proj.weight"), Some(12));
        assert_eq!(block_index("transformer.h.3.attn.c_attn.weight"), Some(3));
        assert_eq!(block_index("lm_head.weight"), None);
    }
}
