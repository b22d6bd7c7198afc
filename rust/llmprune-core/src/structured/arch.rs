//! Group rules: which rows and columns of which tensors form one prunable structure, decided per
//! architecture from config.json and checked against the checkpoint's shapes.
//!
//! An attention group is one key/value head with the query heads that share it: its rows of the
//! query/key/value projections (and their biases) and its columns of the output projection. An MLP
//! group is one intermediate channel: its row of each input projection (gate/up, or fc1) and its
//! column of the output projection (down, or fc2). Nothing else is ever removed.
//!
//! Per-layer sizes are read from the tensors, not the config, so a checkpoint that was already
//! pruned non-uniformly is described correctly.

use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::checkpoint::{read_config, Checkpoint};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// LLaMA and its config-compatible relatives (model_type "llama"), with grouped-query attention.
    Llama,
    /// Meta's OPT: every projection has a bias, one key/value head per query head.
    Opt,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Opt => "opt",
        }
    }
}

/// One input projection of a group: a weight whose rows `rows_per_group` at a time belong to
/// consecutive groups.
#[derive(Clone, Debug)]
pub struct RowTensor {
    pub weight: String,
    pub bias: Option<String>,
    pub rows_per_group: usize,
    /// First row of this projection inside its weight: 0, or its offset in a fused weight (Phi-3's
    /// qkv_proj holds q, k and v one after another, gate_up_proj gate and up).
    pub row_offset: usize,
}

/// The output projection of a module: `cols_per_group` consecutive input columns per group.
#[derive(Clone, Debug)]
pub struct ColTensor {
    pub weight: String,
    pub bias: Option<String>,
    pub cols_per_group: usize,
    /// Output features (rows): the size of the bias that compensation writes.
    pub out_features: usize,
}

/// One prunable module (attention or MLP) of one decoder layer.
#[derive(Clone, Debug)]
pub struct Module {
    pub inputs: Vec<RowTensor>,
    pub output: ColTensor,
    /// Number of groups in this layer (key/value heads, or intermediate channels).
    pub groups: usize,
}

impl Module {
    /// Parameters one group owns: its rows (weights and biases) and its columns of the output.
    pub fn group_cost(&self, in_features: usize) -> u64 {
        let rows: usize = self.inputs.iter().map(|t| t.rows_per_group * (in_features + t.bias.is_some() as usize)).sum();
        (rows + self.output.cols_per_group * self.output.out_features) as u64
    }
}

#[derive(Clone, Debug)]
pub struct Layer {
    /// Name prefix of every tensor of this layer, ending with a dot (`model.layers.3.`).
    pub prefix: String,
    pub attn: Module,
    pub mlp: Module,
    /// Input features of the projections (the model's hidden size).
    pub hidden: usize,
}

#[derive(Clone, Debug)]
pub struct Rules {
    pub family: Family,
    /// config.json's model_type.
    pub model_type: String,
    /// The config flags that give the attention (`attention_bias`) and the MLP (`mlp_bias`)
    /// projections biases in this architecture, when it has them.
    pub bias_flags: (bool, bool),
    pub head_dim: usize,
    /// Query heads per key/value head.
    pub q_per_kv: usize,
    pub layers: Vec<Layer>,
    pub config: serde_json::Map<String, Value>,
}

/// The model_types structured pruning knows.
pub const SUPPORTED: [&str; 9] = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "opt"];

fn usize_field(config: &serde_json::Map<String, Value>, key: &str) -> Option<usize> {
    config.get(key).and_then(Value::as_u64).map(|v| v as usize)
}

impl Rules {
    pub fn from_checkpoint(ckpt: &Checkpoint) -> Result<Rules> {
        let config = read_config(&ckpt.dir)?;
        let config_path = ckpt.dir.join("config.json");
        let model_type = config.get("model_type").and_then(Value::as_str).unwrap_or("");
        // LLaMA's relatives share its module names and grouped-query attention; they differ in which
        // biases a config flag can add (Qwen2's q/k/v biases are always there and stay sliced).
        let (family, bias_flags) = match model_type {
            "llama" => (Family::Llama, (true, true)),
            "qwen3" | "gemma" | "gemma2" | "gemma3_text" => (Family::Llama, (true, false)),
            "mistral" | "qwen2" | "phi3" => (Family::Llama, (false, false)),
            "opt" => (Family::Opt, (false, false)),
            other => {
                let shown = if other.is_empty() { "no model_type".to_string() } else { format!("model_type {other:?}") };
                return Err(Error::arg(format!(
                    "structured pruning has no group rule for this architecture ({shown} in {}); supported: {}",
                    config_path.display(),
                    SUPPORTED.join(", ")
                )));
            }
        };
        let need = |key: &str| {
            usize_field(&config, key)
                .filter(|&v| v > 0)
                .ok_or_else(|| Error::checkpoint(&config_path, format!("config.json has no positive integer {key:?}")))
        };
        let layers_n = need("num_hidden_layers")?;
        let hidden_cfg = need("hidden_size")?;
        let heads = need("num_attention_heads")?;
        let (head_dim, kv_heads) = match family {
            Family::Llama => (
                usize_field(&config, "head_dim").filter(|&d| d > 0).unwrap_or(hidden_cfg / heads),
                usize_field(&config, "num_key_value_heads").filter(|&k| k > 0).unwrap_or(heads),
            ),
            Family::Opt => (hidden_cfg / heads, heads),
        };
        if head_dim == 0 || heads % kv_heads != 0 {
            return Err(Error::checkpoint(
                &config_path,
                format!("{heads} attention heads cannot share {kv_heads} key/value heads of dimension {head_dim}"),
            ));
        }
        let q_per_kv = heads / kv_heads;
        let fused = model_type == "phi3";
        let (attn_names, out_name, mlp_in_names, mlp_out_name): (&[&str], &str, &[&str], &str) = match family {
            Family::Llama if fused => (&["self_attn.qkv_proj"], "self_attn.o_proj", &["mlp.gate_up_proj"], "mlp.down_proj"),
            Family::Llama => (
                &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                "self_attn.o_proj",
                &["mlp.gate_proj", "mlp.up_proj"],
                "mlp.down_proj",
            ),
            Family::Opt => (&["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "self_attn.out_proj", &["fc1"], "fc2"),
        };
        let base = layer_base(ckpt, &format!("0.{}.weight", attn_names[0])).ok_or_else(|| {
            Error::checkpoint(&ckpt.dir, format!("no tensor named *layers.0.{}.weight for a {} model", attn_names[0], family.name()))
        })?;
        let mut layers = Vec::with_capacity(layers_n);
        for i in 0..layers_n {
            let prefix = format!("{base}{i}.");
            let shape = |module: &str, suffix: &str| ckpt.get(&format!("{prefix}{module}.{suffix}")).map(|(_, t)| t.shape.clone());
            let weight = |module: &str| -> Result<(String, [usize; 2])> {
                let name = format!("{prefix}{module}.weight");
                let (shard, t) = ckpt.get(&name).ok_or_else(|| Error::checkpoint(&ckpt.dir, format!("tensor {name} is missing")))?;
                match t.shape[..] {
                    [r, c] => Ok((name, [r, c])),
                    _ => Err(Error::tensor(&shard.path, &name, format!("is {}-D; a 2-D weight was expected", t.shape.len()))),
                }
            };
            let bias = |module: &str, len: usize| -> Result<Option<String>> {
                match shape(module, "bias") {
                    None => Ok(None),
                    Some(s) if s == [len] => Ok(Some(format!("{prefix}{module}.bias"))),
                    Some(s) => Err(Error::checkpoint(&ckpt.dir, format!("tensor {prefix}{module}.bias has shape {s:?}, expected [{len}]"))),
                }
            };
            let bad = |msg: String| Error::checkpoint(&ckpt.dir, format!("layer {i}: {msg}"));

            if fused {
                layers.push(
                    fused_layer(&prefix, &weight, heads, kv_heads, head_dim, q_per_kv, [attn_names[0], out_name, mlp_in_names[0], mlp_out_name])
                        .map_err(bad)?,
                );
                continue;
            }
            // Attention: the key projection's rows say how many key/value heads this layer keeps.
            let (q, [q_rows, hidden]) = weight(attn_names[0])?;
            let (k, [k_rows, k_in]) = weight(attn_names[1])?;
            let (v, [v_rows, v_in]) = weight(attn_names[2])?;
            let (o, [o_rows, o_cols]) = weight(out_name)?;
            if k_rows % head_dim != 0 || k_rows == 0 {
                return Err(bad(format!("{k} has {k_rows} rows, not a positive multiple of head_dim {head_dim}")));
            }
            let kv = k_rows / head_dim;
            let q_per_group = q_per_kv * head_dim;
            if q_rows != kv * q_per_group || v_rows != k_rows || o_cols != q_rows || k_in != hidden || v_in != hidden {
                return Err(bad(format!(
                    "attention shapes disagree: q {q_rows}x{hidden}, k {k_rows}x{k_in}, v {v_rows}x{v_in}, o {o_rows}x{o_cols} \
                     for {kv} key/value heads of {q_per_kv} query heads of dimension {head_dim}"
                )));
            }
            let attn = Module {
                inputs: vec![
                    RowTensor { bias: bias(attn_names[0], q_rows)?, weight: q, rows_per_group: q_per_group, row_offset: 0 },
                    RowTensor { bias: bias(attn_names[1], k_rows)?, weight: k, rows_per_group: head_dim, row_offset: 0 },
                    RowTensor { bias: bias(attn_names[2], v_rows)?, weight: v, rows_per_group: head_dim, row_offset: 0 },
                ],
                output: ColTensor { bias: bias(out_name, o_rows)?, weight: o, cols_per_group: q_per_group, out_features: o_rows },
                groups: kv,
            };

            // MLP: one group per intermediate channel.
            let mut inputs = Vec::new();
            let mut inter = None;
            for m in mlp_in_names {
                let (w, [r, c]) = weight(m)?;
                if c != hidden || inter.is_some_and(|n| n != r) {
                    return Err(bad(format!("{w} has shape [{r}, {c}], inconsistent with the layer's other projections")));
                }
                inter = Some(r);
                inputs.push(RowTensor { bias: bias(m, r)?, weight: w, rows_per_group: 1, row_offset: 0 });
            }
            let inter = inter.unwrap_or(0);
            let (down, [d_rows, d_cols]) = weight(mlp_out_name)?;
            if d_cols != inter || inter == 0 {
                return Err(bad(format!("{down} has {d_cols} input features but the MLP has {inter} channels")));
            }
            let mlp = Module {
                inputs,
                output: ColTensor { bias: bias(mlp_out_name, d_rows)?, weight: down, cols_per_group: 1, out_features: d_rows },
                groups: inter,
            };
            layers.push(Layer { prefix, attn, mlp, hidden });
        }
        if let Some((_, t)) = ckpt.tensors().find(|(_, t)| {
            t.name
                .strip_prefix(base.as_str())
                .and_then(|rest| rest.split('.').next())
                .and_then(|n| n.parse::<usize>().ok())
                .is_some_and(|n| n >= layers_n)
        }) {
            return Err(Error::checkpoint(&ckpt.dir, format!("tensor {} belongs to a layer beyond num_hidden_layers = {layers_n}", t.name)));
        }
        Ok(Rules { family, model_type: model_type.to_string(), bias_flags, head_dim, q_per_kv, layers, config })
    }

    /// Every tensor whose name starts with one of the decoder layers' prefixes.
    pub fn in_blocks(&self, name: &str) -> bool {
        self.layers.iter().any(|l| name.starts_with(&l.prefix))
    }
}

/// One layer of a model with fused projections (Phi-3): `qkv` holds the q rows of every head, then
/// the k rows, then the v rows; `gate_up` the gate rows, then the up rows. A group's rows are one
/// slice of each part; no biases. `names`: qkv, o, gate_up, down.
#[allow(clippy::type_complexity)]
fn fused_layer(
    prefix: &str,
    weight: &dyn Fn(&str) -> Result<(String, [usize; 2])>,
    heads: usize,
    kv: usize,
    head_dim: usize,
    q_per_kv: usize,
    names: [&str; 4],
) -> std::result::Result<Layer, String> {
    let err = |e: Error| e.to_string();
    let (qkv, [qkv_rows, hidden]) = weight(names[0]).map_err(err)?;
    let (o, [o_rows, o_cols]) = weight(names[1]).map_err(err)?;
    let (gate_up, [gu_rows, gu_cols]) = weight(names[2]).map_err(err)?;
    let (down, [d_rows, d_cols]) = weight(names[3]).map_err(err)?;
    let (q_rows, k_rows) = (heads * head_dim, kv * head_dim);
    if qkv_rows != q_rows + 2 * k_rows || o_cols != q_rows {
        return Err(format!("{qkv} has {qkv_rows} rows and {o} {o_cols} columns, not {heads} query and {kv} key/value heads of {head_dim}"));
    }
    if gu_rows % 2 != 0 || gu_cols != hidden || d_cols != gu_rows / 2 {
        return Err(format!("{gate_up} is [{gu_rows}, {gu_cols}] and {down} has {d_cols} inputs: not a fused gate/up of one width"));
    }
    let inter = gu_rows / 2;
    let row = |offset: usize, per: usize, w: &String| RowTensor { weight: w.clone(), bias: None, rows_per_group: per, row_offset: offset };
    Ok(Layer {
        prefix: prefix.to_string(),
        attn: Module {
            inputs: vec![row(0, q_per_kv * head_dim, &qkv), row(q_rows, head_dim, &qkv), row(q_rows + k_rows, head_dim, &qkv)],
            output: ColTensor { weight: o, bias: None, cols_per_group: q_per_kv * head_dim, out_features: o_rows },
            groups: kv,
        },
        mlp: Module {
            inputs: vec![row(0, 1, &gate_up), row(inter, 1, &gate_up)],
            output: ColTensor { weight: down, bias: None, cols_per_group: 1, out_features: d_rows },
            groups: inter,
        },
        hidden,
    })
}

/// `model.layers.` (or `model.decoder.layers.`, ...): the text before `0.<suffix>` of the tensor
/// ending in `layers.0.<suffix>`.
fn layer_base(ckpt: &Checkpoint, suffix: &str) -> Option<String> {
    let tail = format!("layers.{suffix}");
    let mut found: Vec<String> = ckpt
        .tensors()
        .filter_map(|(_, t)| t.name.strip_suffix(&tail).filter(|p| p.is_empty() || p.ends_with('.')).map(|p| format!("{p}layers.")))
        .collect();
    found.sort();
    found.into_iter().next()
}
