//! Which tensors get pruned: the sidecar's list when there is one (decided by the calibration pass
//! from the module graph), else a naming rule for decoder-block weights; `--include` / `--exclude`
//! globs narrow either.

use std::collections::BTreeMap;

use crate::apply::ApplyOptions;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::sidecar::Sidecar;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prunable {
    pub input_axis: usize,
}

/// `*` matches any run of characters (dots included), `?` any one character.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// A 2-D `.weight` inside a repeated block: `*.layers.N.*`, `*.h.N.*`, `*.blocks.N.*`.
pub fn in_decoder_block(name: &str) -> bool {
    if !name.ends_with(".weight") {
        return false;
    }
    let parts: Vec<&str> = name.split('.').collect();
    parts.windows(3).any(|w| {
        matches!(w[0], "layers" | "h" | "blocks") && !w[1].is_empty() && w[1].bytes().all(|b| b.is_ascii_digit())
    })
}

pub fn resolve_prunable(
    ckpt: &Checkpoint,
    sidecar: Option<&Sidecar>,
    opts: &ApplyOptions,
) -> Result<BTreeMap<String, Prunable>> {
    let mut set: BTreeMap<String, Prunable> = match sidecar {
        Some(sc) => sc
            .layers
            .iter()
            .map(|(name, s)| (name.clone(), Prunable { input_axis: s.input_axis }))
            .collect(),
        None => ckpt
            .tensors()
            .filter(|(_, t)| t.shape.len() == 2)
            .filter(|(_, t)| {
                if opts.include.is_empty() {
                    in_decoder_block(&t.name)
                } else {
                    opts.include.iter().any(|g| glob_match(g, &t.name))
                }
            })
            .map(|(_, t)| (t.name.clone(), Prunable { input_axis: opts.default_input_axis }))
            .collect(),
    };
    if sidecar.is_some() && !opts.include.is_empty() {
        set.retain(|name, _| opts.include.iter().any(|g| glob_match(g, name)));
    }
    set.retain(|name, _| !opts.exclude.iter().any(|g| glob_match(g, name)));
    if set.is_empty() {
        return Err(Error::arg(format!(
            "no prunable tensors in {} (check --include / --exclude)",
            ckpt.dir.display()
        )));
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*q_proj*", "model.layers.0.self_attn.q_proj.weight"));
        assert!(glob_match("model.layers.?.mlp.*", "model.layers.3.mlp.up_proj.weight"));
        assert!(!glob_match("model.layers.?.mlp.*", "model.layers.13.mlp.up_proj.weight"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("a*b", "acd"));
    }

    #[test]
    fn block_rule() {
        assert!(in_decoder_block("model.layers.0.self_attn.q_proj.weight"));
        assert!(in_decoder_block("transformer.h.11.mlp.c_fc.weight"));
        assert!(in_decoder_block("model.decoder.layers.2.fc1.weight"));
        assert!(!in_decoder_block("model.embed_tokens.weight"));
        assert!(!in_decoder_block("lm_head.weight"));
        assert!(!in_decoder_block("model.layers.0.self_attn.q_proj.bias"));
    }
}
