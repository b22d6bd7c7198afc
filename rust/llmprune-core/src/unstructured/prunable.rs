//! Which tensors get pruned: the sidecar's list when there is one (decided by the calibration pass
//! from the module graph), else a naming rule for decoder-block weights; `--include` / `--exclude`
//! globs narrow either.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::io::checkpoint::Checkpoint;
use crate::sidecar::Sidecar;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prunable {
    pub input_axis: usize,
}

/// Model types whose checkpoints store linear weights as [in, out] (GPT-2's Conv1D).
pub const INPUT_AXIS_0_MODEL_TYPES: [&str; 1] = ["gpt2"];

/// The input axis of weights that no sidecar describes, from config.json's `model_type`: 0 for
/// the Conv1D families, else 1 (an unreadable config is reported by `Checkpoint::open`).
pub fn default_input_axis(model_dir: &std::path::Path) -> usize {
    let model_type = std::fs::read(model_dir.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("model_type").and_then(|t| t.as_str()).map(str::to_string));
    match model_type {
        Some(t) if INPUT_AXIS_0_MODEL_TYPES.contains(&t.as_str()) => 0,
        _ => 1,
    }
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
    parts.windows(3).any(|w| matches!(w[0], "layers" | "h" | "blocks") && !w[1].is_empty() && w[1].bytes().all(|b| b.is_ascii_digit()))
}

/// An MoE router: `<moe>.gate.weight` beside `<moe>.experts.*` tensors. Routers choose experts and
/// are never pruned by the naming rule (the stats pass leaves them out of the sidecar too).
fn is_router(ckpt: &Checkpoint, name: &str) -> bool {
    let Some(moe) = name.strip_suffix(".gate.weight") else { return false };
    let experts = format!("{moe}.experts.");
    ckpt.tensors().any(|(_, t)| t.name.starts_with(&experts))
}

pub fn resolve_prunable(
    ckpt: &Checkpoint,
    sidecar: Option<&Sidecar>,
    include: &[String],
    exclude: &[String],
    default_input_axis: usize,
) -> Result<BTreeMap<String, Prunable>> {
    let mut set: BTreeMap<String, Prunable> = match sidecar {
        Some(sc) => sc.layers.iter().map(|(name, s)| (name.clone(), Prunable { input_axis: s.input_axis })).collect(),
        None => ckpt
            .tensors()
            .filter(|(_, t)| t.shape.len() == 2)
            .filter(|(_, t)| {
                if include.is_empty() {
                    in_decoder_block(&t.name) && !is_router(ckpt, &t.name)
                } else {
                    include.iter().any(|g| glob_match(g, &t.name))
                }
            })
            .map(|(_, t)| (t.name.clone(), Prunable { input_axis: default_input_axis }))
            .collect(),
    };
    if sidecar.is_some() && !include.is_empty() {
        set.retain(|name, _| include.iter().any(|g| glob_match(g, name)));
    }
    set.retain(|name, _| !exclude.iter().any(|g| glob_match(g, name)));
    if set.is_empty() {
        return Err(Error::arg(format!("no prunable tensors in {} (check --include / --exclude)", ckpt.dir.display())));
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
