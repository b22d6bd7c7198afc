//! config.json of a structurally pruned checkpoint.
//!
//! Sizes every layer shares go into the stock fields, so transformers builds the right modules:
//! LLaMA gets `num_attention_heads`, `num_key_value_heads`, `intermediate_size` and an explicit
//! `head_dim` (the head size no longer follows from hidden_size / heads), plus `attention_bias` /
//! `mlp_bias` when biases were added. transformers 5's LLaMA and Gemma 2/3 configs refuse a head
//! count that does not divide hidden_size, explicit head_dim or not, so such an output is left to
//! `llmprune.load_pruned`. OPT derives its head size from hidden_size / heads, so a
//! checkpoint with heads removed cannot be described by a stock OPT config.
//!
//! Every output also records its per-layer sizes under `llmprune.structured.layers`, and
//! `llmprune.loader` says whether stock `from_pretrained` builds it (`transformers`) or
//! `llmprune.load_pruned` must resize the modules layer by layer (`llmprune.load_pruned`); for the
//! latter the stock fields keep the input's values.

use serde::Serialize;
use serde_json::{json, Value};

use crate::structured::arch::{Family, Rules};
use crate::structured::plan::LayerPlan;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct LayerShape {
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub intermediate_size: usize,
}

pub fn layer_shapes(rules: &Rules, plans: &[LayerPlan]) -> Vec<LayerShape> {
    plans
        .iter()
        .map(|p| LayerShape {
            num_attention_heads: p.attn_keep.len() * rules.q_per_kv,
            num_key_value_heads: p.attn_keep.len(),
            intermediate_size: p.mlp_keep.len(),
        })
        .collect()
}

/// Model types whose transformers 5 config refuses a head count that does not divide hidden_size,
/// even with an explicit head_dim.
const HEADS_DIVIDE_HIDDEN: [&str; 4] = ["llama", "gemma2", "gemma3", "gemma3_text"];

/// True when a stock transformers config (4.x and 5.x) can describe a layer that keeps `kv` of its
/// key/value groups (each with its query heads): LLaMA-style configs whose head count must divide
/// hidden_size, OPT configs that derive the head size from it and so keep every head.
pub fn heads_describable(rules: &Rules, kv: usize) -> bool {
    let field = |k: &str| rules.config.get(k).and_then(Value::as_u64).unwrap_or(0) as usize;
    let heads = kv * rules.q_per_kv;
    match rules.family {
        Family::Llama => {
            let strict = rules.config.get("model_type").and_then(Value::as_str).is_some_and(|t| HEADS_DIVIDE_HIDDEN.contains(&t));
            !(strict && (heads == 0 || field("hidden_size") % heads != 0))
        }
        Family::Opt => heads == field("num_attention_heads"),
    }
}

/// True when a stock transformers config (4.x and 5.x) can describe every layer.
pub fn stock_loadable(rules: &Rules, shapes: &[LayerShape]) -> bool {
    shapes.windows(2).all(|w| w[0] == w[1]) && shapes.iter().all(|s| heads_describable(rules, s.num_key_value_heads))
}

pub struct Rewrite<'a> {
    pub shapes: &'a [LayerShape],
    pub added_attn_bias: bool,
    pub added_mlp_bias: bool,
    /// method, sparsity, allocation, ... recorded beside the layer sizes.
    pub provenance: serde_json::Map<String, Value>,
}

pub fn rewrite(rules: &Rules, r: &Rewrite) -> serde_json::Map<String, Value> {
    let mut c = rules.config.clone();
    let stock = stock_loadable(rules, r.shapes);
    match rules.family {
        Family::Llama => {
            c.insert("head_dim".into(), rules.head_dim.into());
            if stock {
                if let Some(s) = r.shapes.first() {
                    c.insert("num_attention_heads".into(), s.num_attention_heads.into());
                    c.insert("num_key_value_heads".into(), s.num_key_value_heads.into());
                    c.insert("intermediate_size".into(), s.intermediate_size.into());
                }
            }
            if r.added_attn_bias {
                c.insert("attention_bias".into(), true.into());
            }
            if r.added_mlp_bias {
                c.insert("mlp_bias".into(), true.into());
            }
        }
        Family::Opt => {
            if stock {
                if let Some(s) = r.shapes.first() {
                    c.insert("ffn_dim".into(), s.intermediate_size.into());
                }
            }
        }
    }
    let mut structured = r.provenance.clone();
    structured.insert("family".into(), rules.family.name().into());
    structured.insert("head_dim".into(), rules.head_dim.into());
    structured.insert("layers".into(), serde_json::to_value(r.shapes).expect("shapes serialize"));
    c.insert(
        "llmprune".into(),
        json!({
            "loader": if stock { "transformers" } else { "llmprune.load_pruned" },
            "structured": Value::Object(structured),
        }),
    );
    c
}
