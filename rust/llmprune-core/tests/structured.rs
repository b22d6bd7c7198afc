//! Structured pruning end to end on small LLaMA- and OPT-shaped checkpoints written here: slicing
//! against hand-computed expectations, compensation, sharded outputs, and bad input.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use llmprune_core::error::Error;
use llmprune_core::io::checkpoint::Checkpoint;
use llmprune_core::structured::{
    apply_structured, Fusion, GroupAllocation, HywiaOptions, LayerPlanner, StructMethod, StructuredOptions, StructuredSummary,
};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

const HIDDEN: usize = 8;
const HEADS: usize = 4;
const KV: usize = 2;
const HD: usize = 2;
const INTER: usize = 6;
const LAYERS: usize = 2;

struct T {
    name: String,
    shape: Vec<usize>,
    vals: Vec<f32>,
}

fn rand_vals(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).max(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            ((s % 1001) as f32 - 500.0) / 512.0
        })
        .collect()
}

fn t(name: &str, shape: &[usize], seed: u32) -> T {
    T { name: name.into(), shape: shape.to_vec(), vals: rand_vals(shape.iter().product(), seed) }
}

fn llama_tensors(with_bias: bool) -> Vec<T> {
    let mut v = vec![t("model.embed_tokens.weight", &[16, HIDDEN], 1), t("model.norm.weight", &[HIDDEN], 2), t("lm_head.weight", &[16, HIDDEN], 3)];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}.");
        let s = 100 * (l as u32 + 1);
        v.push(t(&format!("{p}input_layernorm.weight"), &[HIDDEN], s));
        v.push(t(&format!("{p}post_attention_layernorm.weight"), &[HIDDEN], s + 1));
        v.push(t(&format!("{p}self_attn.q_proj.weight"), &[HEADS * HD, HIDDEN], s + 2));
        v.push(t(&format!("{p}self_attn.k_proj.weight"), &[KV * HD, HIDDEN], s + 3));
        v.push(t(&format!("{p}self_attn.v_proj.weight"), &[KV * HD, HIDDEN], s + 4));
        v.push(t(&format!("{p}self_attn.o_proj.weight"), &[HIDDEN, HEADS * HD], s + 5));
        v.push(t(&format!("{p}mlp.gate_proj.weight"), &[INTER, HIDDEN], s + 6));
        v.push(t(&format!("{p}mlp.up_proj.weight"), &[INTER, HIDDEN], s + 7));
        v.push(t(&format!("{p}mlp.down_proj.weight"), &[HIDDEN, INTER], s + 8));
        if with_bias {
            v.push(t(&format!("{p}self_attn.o_proj.bias"), &[HIDDEN], s + 9));
        }
    }
    v
}

fn bytes(vals: &[f32]) -> Vec<u8> {
    vals.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn write_shard(path: &Path, tensors: &[&T]) {
    let data: Vec<Vec<u8>> = tensors.iter().map(|t| bytes(&t.vals)).collect();
    let views: Vec<(String, TensorView)> =
        tensors.iter().zip(&data).map(|(t, d)| (t.name.clone(), TensorView::new(Dtype::F32, t.shape.clone(), d).unwrap())).collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn llama_config(kv: usize) -> serde_json::Value {
    serde_json::json!({
        "model_type": "llama", "hidden_size": HIDDEN, "num_attention_heads": HEADS, "num_key_value_heads": kv,
        "intermediate_size": INTER, "num_hidden_layers": LAYERS, "vocab_size": 16
    })
}

fn write_model(dir: &Path, tensors: &[T], config: &serde_json::Value, sharded: bool) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("config.json"), config.to_string()).unwrap();
    fs::write(dir.join("tokenizer.json"), "{}").unwrap();
    let all: Vec<&T> = tensors.iter().collect();
    if !sharded {
        write_shard(&dir.join("model.safetensors"), &all);
        return;
    }
    let (a, b) = all.split_at(all.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", a), ("model-00002-of-00002.safetensors", b)] {
        write_shard(&dir.join(file), part);
        for t in part.iter() {
            map.insert(t.name.clone(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

/// One sidecar tensor: name, dtype, shape, bytes.
type Array = (String, Dtype, Vec<usize>, Vec<u8>);

fn f64_bytes(x: &[f64]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A dense sidecar whose statistics for every weight are deterministic functions of the channel.
fn write_sidecar(dir: &Path, tensors: &[T]) {
    write_sidecar_with(dir, tensors, |_| Vec::new());
}

/// `write_sidecar` plus the tensors `extra` gives for each weight.
fn write_sidecar_with(dir: &Path, tensors: &[T], extra: impl Fn(&T) -> Vec<Array>) {
    let ck = Checkpoint::open(dir).unwrap();
    let mut arrays: Vec<Array> = Vec::new();
    let mut layers = serde_json::Map::new();
    for t in tensors.iter().filter(|t| t.name.contains(".layers.") && t.shape.len() == 2) {
        let cols = t.shape[1];
        let n = 10i64;
        // mean (j + 1) / 4, variance growing with a pseudo-random factor per channel
        let sum: Vec<f64> = (0..cols).map(|j| n as f64 * (j as f64 + 1.0) / 4.0).collect();
        let var: Vec<f64> = rand_vals(cols, t.name.len() as u32).iter().map(|v| (*v as f64).abs() + 0.1).collect();
        let sq: Vec<f64> = sum.iter().zip(&var).map(|(s, v)| v * (n as f64 - 1.0) + s * s / n as f64).collect();
        arrays.push((format!("{}.act_sum", t.name), Dtype::F64, vec![cols], f64_bytes(&sum)));
        arrays.push((format!("{}.act_sqsum", t.name), Dtype::F64, vec![cols], f64_bytes(&sq)));
        arrays.push((format!("{}.act_count", t.name), Dtype::I64, vec![1], n.to_le_bytes().to_vec()));
        arrays.extend(extra(t));
        layers.insert(t.name.clone(), serde_json::json!({"input_axis": 1}));
    }
    let meta = serde_json::json!({
        "format": "llmprune-stats", "format_version": 1, "model_fingerprint": ck.fingerprint(),
        "model_tensors": ck.describe(), "mode": "dense", "sequential": null, "layers": layers,
    });
    let views: Vec<(String, TensorView)> = arrays.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    let md: std::collections::HashMap<String, String> = [("llmprune".to_string(), meta.to_string())].into_iter().collect();
    safetensors::serialize_to_file(views, Some(md), &dir.join("llmprune-stats.safetensors")).unwrap();
}

fn opts(model: &Path, out: &Path, method: StructMethod, sparsity: f64, allocation: GroupAllocation) -> StructuredOptions {
    StructuredOptions {
        model_dir: model.into(),
        out_dir: out.into(),
        method,
        sparsity,
        allocation,
        compensate: None,
        stats: None,
        threads: Some(2),
        force: false,
        provenance: BTreeMap::new(),
        hywia: None,
        reconstruct: None,
        layer_sparsity: None,
    }
}

fn run(o: &StructuredOptions) -> Result<StructuredSummary, Error> {
    apply_structured(o, &mut |_| Ok(()))
}

fn read(dir: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let ck = Checkpoint::open(dir).unwrap();
    ck.tensors()
        .map(|(s, t)| {
            let v = s.data(t).chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            (t.name.clone(), (t.shape.clone(), v))
        })
        .collect()
}

fn rows(v: &[f32], cols: usize, keep: &[usize]) -> Vec<f32> {
    keep.iter().flat_map(|&r| v[r * cols..(r + 1) * cols].to_vec()).collect()
}

fn columns(v: &[f32], cols: usize, keep: &[usize]) -> Vec<f32> {
    v.chunks(cols).flat_map(|row| keep.iter().map(|&c| row[c]).collect::<Vec<_>>()).collect()
}

fn expand(groups: &[usize], per: usize) -> Vec<usize> {
    groups.iter().flat_map(|g| g * per..(g + 1) * per).collect()
}

fn config(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(dir.join("config.json")).unwrap()).unwrap()
}

#[test]
fn sparsity_zero_keeps_every_tensor() {
    for sharded in [false, true] {
        let root = tempfile::tempdir().unwrap();
        let m = root.path().join("m");
        let ts = llama_tensors(false);
        write_model(&m, &ts, &llama_config(KV), sharded);
        write_sidecar(&m, &ts);
        let out = root.path().join("out");
        let s = run(&opts(&m, &out, StructMethod::Flap, 0.0, GroupAllocation::Global)).unwrap();
        assert_eq!((s.params_removed, s.bias_params_added), (0, 0));
        assert_eq!(read(&m), read(&out));
        let c = config(&out);
        assert_eq!(c["head_dim"], HD);
        assert_eq!(c["llmprune"]["loader"], "transformers");
        assert!(out.join("tokenizer.json").is_file() && !out.join("llmprune-stats.safetensors").exists());
    }
}

/// magnitude-sp with uniform allocation, checked against group norms computed here.
#[test]
fn magnitude_sp_slices_the_lowest_norm_groups() {
    let root = tempfile::tempdir().unwrap();
    let m = root.path().join("m");
    let ts = llama_tensors(false);
    write_model(&m, &ts, &llama_config(KV), true);
    let out = root.path().join("out");
    // per layer: attention group cost (2 q heads + k + v rows, 2 o columns of 2) = 8*(4+2+2) + 8*4 = 96,
    // MLP channel cost 24, layer params 8*8*2 + 4*8*2 + 6*8*3 + 16 = 352: S = (96 + 2*24) / 352 -> h = 1, c = 2
    let s = run(&opts(&m, &out, StructMethod::MagnitudeSp, 144.0 / 352.0, GroupAllocation::Uniform { width_multiple: 1 })).unwrap();
    assert_eq!(s.params_removed, 2 * 144);
    assert_eq!(s.block_params_before, 2 * 352);
    assert_eq!(s.block_params_after, 2 * (352 - 144));
    assert_eq!(s.achieved_sparsity, 288.0 / 704.0);
    let (a, b) = (read(&m), read(&out));
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}.");
        let w = |n: &str| &a[&format!("{p}{n}.weight")].1;
        let sq = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>();
        let attn_norm: Vec<f64> = (0..KV)
            .map(|g| {
                sq(&rows(w("self_attn.q_proj"), HIDDEN, &expand(&[g], 2 * HD)))
                    + sq(&rows(w("self_attn.k_proj"), HIDDEN, &expand(&[g], HD)))
                    + sq(&rows(w("self_attn.v_proj"), HIDDEN, &expand(&[g], HD)))
                    + sq(&columns(w("self_attn.o_proj"), HEADS * HD, &expand(&[g], 2 * HD)))
            })
            .collect();
        let mlp_norm: Vec<f64> = (0..INTER)
            .map(|c| {
                sq(&rows(w("mlp.gate_proj"), HIDDEN, &[c]))
                    + sq(&rows(w("mlp.up_proj"), HIDDEN, &[c]))
                    + sq(&columns(w("mlp.down_proj"), INTER, &[c]))
            })
            .collect();
        let keep_g = vec![if attn_norm[0] < attn_norm[1] { 1 } else { 0 }];
        let mut order: Vec<usize> = (0..INTER).collect();
        order.sort_by(|&x, &y| mlp_norm[x].total_cmp(&mlp_norm[y]));
        let mut keep_c: Vec<usize> = order[2..].to_vec();
        keep_c.sort();
        let check = |n: &str, shape: Vec<usize>, vals: Vec<f32>| {
            let got = &b[&format!("{p}{n}.weight")];
            assert_eq!(got.0, shape, "{p}{n}");
            assert_eq!(got.1, vals, "{p}{n}");
        };
        check("self_attn.q_proj", vec![2 * HD, HIDDEN], rows(w("self_attn.q_proj"), HIDDEN, &expand(&keep_g, 2 * HD)));
        check("self_attn.k_proj", vec![HD, HIDDEN], rows(w("self_attn.k_proj"), HIDDEN, &expand(&keep_g, HD)));
        check("self_attn.v_proj", vec![HD, HIDDEN], rows(w("self_attn.v_proj"), HIDDEN, &expand(&keep_g, HD)));
        check("self_attn.o_proj", vec![HIDDEN, 2 * HD], columns(w("self_attn.o_proj"), HEADS * HD, &expand(&keep_g, 2 * HD)));
        check("mlp.gate_proj", vec![INTER - 2, HIDDEN], rows(w("mlp.gate_proj"), HIDDEN, &keep_c));
        check("mlp.up_proj", vec![INTER - 2, HIDDEN], rows(w("mlp.up_proj"), HIDDEN, &keep_c));
        check("mlp.down_proj", vec![HIDDEN, INTER - 2], columns(w("mlp.down_proj"), INTER, &keep_c));
        assert_eq!(a[&format!("{p}input_layernorm.weight")], b[&format!("{p}input_layernorm.weight")]);
    }
    let c = config(&out);
    assert_eq!((c["num_attention_heads"].as_u64(), c["num_key_value_heads"].as_u64(), c["intermediate_size"].as_u64()), (Some(2), Some(1), Some(4)));
    assert_eq!(c["head_dim"], HD);
    assert!(c.get("attention_bias").is_none(), "no compensation, no biases");
    let idx: serde_json::Value = serde_json::from_slice(&fs::read(out.join("model.safetensors.index.json")).unwrap()).unwrap();
    let total: usize = b.values().map(|(_, v)| v.len() * 4).sum();
    assert_eq!(idx["metadata"]["total_size"], total);
    assert_eq!(idx["weight_map"].as_object().unwrap().len(), b.len());
}

/// FLAP with compensation on a model without biases: zero q/k/v biases, o_proj/down_proj biases
/// equal W[:, removed] · μ[removed], and the config gains attention_bias / mlp_bias.
#[test]
fn flap_compensation_adds_biases() {
    for sharded in [false, true] {
        let root = tempfile::tempdir().unwrap();
        let m = root.path().join("m");
        let ts = llama_tensors(false);
        write_model(&m, &ts, &llama_config(KV), sharded);
        write_sidecar(&m, &ts);
        let out = root.path().join("out");
        let s = run(&opts(&m, &out, StructMethod::Flap, 0.4, GroupAllocation::Global)).unwrap();
        assert!(s.compensate && s.params_removed > 0);
        let (a, b) = (read(&m), read(&out));
        let c = config(&out);
        let per_layer = s.per_layer.clone();
        for (l, shape) in per_layer.iter().enumerate() {
            let p = format!("model.layers.{l}.");
            for (proj, n) in
                [("q_proj", shape.num_attention_heads * HD), ("k_proj", shape.num_key_value_heads * HD), ("v_proj", shape.num_key_value_heads * HD)]
            {
                let bias = &b[&format!("{p}self_attn.{proj}.bias")];
                assert_eq!(bias.0, vec![n]);
                assert!(bias.1.iter().all(|x| *x == 0.0));
            }
            for (module, bias_flag) in [("self_attn.o_proj", "attention_bias"), ("mlp.down_proj", "mlp_bias")] {
                assert_eq!(c[bias_flag], true);
                let expect = compensation(&a[&format!("{p}{module}.weight")], &b[&format!("{p}{module}.weight")], None);
                assert_eq!(b[&format!("{p}{module}.bias")].1, expect, "{p}{module}");
            }
        }
        assert_eq!(
            s.bias_params_added as usize,
            per_layer.iter().map(|x| (x.num_attention_heads + 2 * x.num_key_value_heads) * HD + x.intermediate_size * 2 + 2 * HIDDEN).sum::<usize>()
        );
        // added tensors sit in the shard of their weight and the output validates
        if sharded {
            let idx: serde_json::Value = serde_json::from_slice(&fs::read(out.join("model.safetensors.index.json")).unwrap()).unwrap();
            let map = idx["weight_map"].as_object().unwrap();
            assert_eq!(map["model.layers.0.self_attn.q_proj.bias"], map["model.layers.0.self_attn.q_proj.weight"]);
        }
    }
}

/// A schedule prunes each layer as uniform allocation would at that layer's sparsity, and the
/// layer planner (what `llmprune search` scores) gives the same kept groups and compensated biases.
#[test]
fn a_schedule_prunes_each_layer_at_its_own_sparsity() {
    let root = tempfile::tempdir().unwrap();
    let m = root.path().join("m");
    let ts = llama_tensors(false);
    write_model(&m, &ts, &llama_config(KV), false);
    write_sidecar(&m, &ts);
    let u1 = GroupAllocation::Uniform { width_multiple: 1 };
    let scheduled = StructuredOptions { layer_sparsity: Some(vec![0.1, 0.5]), ..opts(&m, &root.path().join("s"), StructMethod::Flap, 0.3, u1) };
    let s = run(&scheduled).unwrap();
    assert_eq!(s.allocation, "schedule");
    let out = read(&root.path().join("s"));
    let planner = LayerPlanner::open(&opts(&m, &root.path().join("unused"), StructMethod::Flap, 0.3, u1)).unwrap();
    assert!(planner.compensate() && planner.layers() == LAYERS);
    for (l, sp) in [(0usize, 0.1), (1, 0.5)] {
        // the layer as uniform allocation at its own sparsity writes it
        let u = root.path().join(format!("u{l}"));
        let su = run(&opts(&m, &u, StructMethod::Flap, sp, u1)).unwrap();
        assert_eq!(s.per_layer[l], su.per_layer[l], "layer {l}");
        let uo = read(&u);
        let at = planner.layer(l, sp).unwrap();
        assert_eq!(at.plan.attn_keep.len(), s.per_layer[l].num_key_value_heads);
        assert_eq!(at.plan.mlp_keep.len(), s.per_layer[l].intermediate_size);
        for (name, v) in out.iter().filter(|(n, _)| n.starts_with(&format!("model.layers.{l}."))) {
            match uo.get(name) {
                Some(u) => assert_eq!(u, v, "{name}"),
                // a bias the schedule adds because another layer prunes that module
                None => assert!(name.ends_with(".bias"), "{name}"),
            }
        }
        // the planner's computed biases are the bytes written
        for (name, a) in at.edits.added.values().flatten().map(|a| (&a.name, a)) {
            let vals: Vec<f32> = a.data.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            assert_eq!(out[name].1, vals, "{name}");
        }
    }
    // bad schedules
    let bad = |ls: Vec<f64>, sp: f64| {
        run(&StructuredOptions { layer_sparsity: Some(ls), ..opts(&m, &root.path().join("bad"), StructMethod::Flap, sp, u1) })
            .unwrap_err()
            .to_string()
    };
    assert!(bad(vec![0.3], 0.3).contains("2 decoder layers"));
    assert!(bad(vec![0.1, 0.3], 0.3).contains("average"));
    let global = StructuredOptions {
        layer_sparsity: Some(vec![0.3, 0.3]),
        ..opts(&m, &root.path().join("bad"), StructMethod::Flap, 0.3, GroupAllocation::Global)
    };
    assert!(run(&global).unwrap_err().to_string().contains("global allocation"));
    assert!(!root.path().join("bad").exists());
    assert!(planner.layer(LAYERS, 0.3).is_err() && planner.layer(0, 1.0).is_err());
}

/// Σ_{j removed} W_ij μ_j (+ old bias), μ_j = (j + 1) / 4 as written by write_sidecar; the removed
/// columns are found by matching the output's columns to the input's by value.
fn compensation(w_in: &(Vec<usize>, Vec<f32>), w_out: &(Vec<usize>, Vec<f32>), old: Option<&[f32]>) -> Vec<f32> {
    let (rows, cols, kept_n) = (w_in.0[0], w_in.0[1], w_out.0[1]);
    let kept: Vec<usize> =
        (0..kept_n).map(|k| (0..cols).find(|&j| (0..rows).all(|i| w_in.1[i * cols + j] == w_out.1[i * kept_n + k])).unwrap()).collect();
    (0..rows)
        .map(|i| {
            let c: f64 = (0..cols).filter(|j| !kept.contains(j)).map(|j| w_in.1[i * cols + j] as f64 * (j as f64 + 1.0) / 4.0).sum();
            (c + old.map_or(0.0, |o| o[i] as f64)) as f32
        })
        .collect()
}

#[test]
fn existing_bias_is_compensated_in_place() {
    let root = tempfile::tempdir().unwrap();
    let m = root.path().join("m");
    let ts = llama_tensors(true);
    // an o_proj bias exists in every layer: it is compensated in place and nothing is added
    write_model(&m, &ts, &llama_config(KV), false);
    write_sidecar(&m, &ts);
    let out = root.path().join("out");
    let mut o = opts(&m, &out, StructMethod::WandaSp, 0.3, GroupAllocation::Uniform { width_multiple: 1 });
    o.compensate = Some(true);
    let s = run(&o).unwrap();
    assert_eq!(s.per_layer[0].num_key_value_heads, 1);
    let (a, b) = (read(&m), read(&out));
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}.self_attn.o_proj.");
        let old = &a[&format!("{p}bias")].1;
        let expect = compensation(&a[&format!("{p}weight")], &b[&format!("{p}weight")], Some(old));
        assert_eq!(b[&format!("{p}bias")].1, expect);
        assert_ne!(&expect, old);
    }
    assert!(!b.contains_key("model.layers.0.self_attn.q_proj.bias"));
    assert!(config(&out).get("attention_bias").is_none());
}

#[test]
fn opt_heads_and_channels() {
    let root = tempfile::tempdir().unwrap();
    let m = root.path().join("m");
    let mut ts = vec![t("model.decoder.embed_tokens.weight", &[16, HIDDEN], 1)];
    for l in 0..LAYERS {
        let p = format!("model.decoder.layers.{l}.");
        let s = 100 * (l as u32 + 1);
        for (i, proj) in ["q_proj", "k_proj", "v_proj", "out_proj"].iter().enumerate() {
            ts.push(t(&format!("{p}self_attn.{proj}.weight"), &[HIDDEN, HIDDEN], s + i as u32));
            ts.push(t(&format!("{p}self_attn.{proj}.bias"), &[HIDDEN], s + 10 + i as u32));
        }
        ts.push(t(&format!("{p}fc1.weight"), &[INTER, HIDDEN], s + 20));
        ts.push(t(&format!("{p}fc1.bias"), &[INTER], s + 21));
        ts.push(t(&format!("{p}fc2.weight"), &[HIDDEN, INTER], s + 22));
        ts.push(t(&format!("{p}fc2.bias"), &[HIDDEN], s + 23));
    }
    let cfg =
        serde_json::json!({"model_type": "opt", "hidden_size": HIDDEN, "num_attention_heads": HEADS, "ffn_dim": INTER, "num_hidden_layers": LAYERS});
    write_model(&m, &ts, &cfg, false);
    write_sidecar(&m, &ts);
    let out = root.path().join("out");
    // global allocation removes heads: each layer's projections sliced to its own head count
    let s = run(&opts(&m, &out, StructMethod::Flap, 0.3, GroupAllocation::Global)).unwrap();
    assert!(s.heads_after < s.heads_before, "{s:?}");
    assert_eq!(s.loader, "llmprune.load_pruned");
    let b = read(&out);
    for (l, shape) in s.per_layer.iter().enumerate() {
        let heads = shape.num_attention_heads;
        assert_eq!(b[&format!("model.decoder.layers.{l}.self_attn.q_proj.bias")].0, vec![heads * HD]);
        assert_eq!(b[&format!("model.decoder.layers.{l}.self_attn.out_proj.weight")].0, vec![HIDDEN, heads * HD]);
        assert_eq!(b[&format!("model.decoder.layers.{l}.fc2.weight")].0[1], shape.intermediate_size);
    }
    let c = config(&out);
    assert_eq!(c["num_attention_heads"], HEADS, "a stock OPT config cannot describe fewer heads");
    assert_eq!(c["llmprune"]["structured"]["layers"][0]["num_attention_heads"], s.per_layer[0].num_attention_heads);

    // uniform allocation keeps every OPT head (a stock config derives the head size from hidden_size):
    // layer params 4·72 + 54 + 56 = 398, channels cost 17: S = 0.1 -> ⌊39.8 / 17 + ½⌋ = 2 channels
    let out = root.path().join("out-uniform");
    let s = run(&opts(&m, &out, StructMethod::Flap, 0.1, GroupAllocation::Uniform { width_multiple: 1 })).unwrap();
    assert_eq!((s.heads_after, s.per_layer[0].intermediate_size, s.loader.as_str()), (s.heads_before, INTER - 2, "transformers"));
    assert_eq!(config(&out)["ffn_dim"], INTER - 2);
}

#[test]
fn bad_input_is_refused_before_writing() {
    let root = tempfile::tempdir().unwrap();
    let m = root.path().join("m");
    let ts = llama_tensors(false);
    // one key/value head: any attention pruning removes all of a layer's heads
    let mut cfg = llama_config(1);
    cfg["num_attention_heads"] = 4.into();
    let ts1: Vec<T> = ts
        .into_iter()
        .map(|x| if x.name.ends_with("k_proj.weight") || x.name.ends_with("v_proj.weight") { t(&x.name, &[HD, HIDDEN], 7) } else { x })
        .collect();
    write_model(&m, &ts1, &cfg, false);
    let out = root.path().join("out");
    let e = run(&opts(&m, &out, StructMethod::MagnitudeSp, 0.6, GroupAllocation::Uniform { width_multiple: 1 })).unwrap_err().to_string();
    assert!(e.contains("all 1 of its attention groups") && e.contains("layer 0"), "{e}");
    assert!(!out.exists());
    let e = run(&opts(&m, &out, StructMethod::Flap, 0.2, GroupAllocation::Global)).unwrap_err().to_string();
    assert!(e.contains("needs activation statistics"), "{e}");

    let g = root.path().join("g");
    write_model(&g, &llama_tensors(false), &serde_json::json!({"model_type": "gpt2", "n_layer": 2}), false);
    let e = run(&opts(&g, &out, StructMethod::MagnitudeSp, 0.2, GroupAllocation::Global)).unwrap_err().to_string();
    assert!(e.contains("no group rule") && e.contains("gpt2"), "{e}");

    let e = run(&opts(&m, &out, StructMethod::MagnitudeSp, 1.0, GroupAllocation::Global)).unwrap_err().to_string();
    assert!(e.contains("sparsity must be in [0, 1)"), "{e}");
    assert!(!out.exists());
}

// ---------------------------------------------------------------------------------------------
// hywia: gradient statistics written here make the fine estimate reproducible between the two
// halves of the samples and the coarse one reversed, so adaptive fusion follows the fine ranking.
// ---------------------------------------------------------------------------------------------

/// Per MLP channel: the fine estimate on every split, the coarse one on all samples and half A
/// (half B gets 10 minus it: the opposite ranking).
const FINE: [f64; INTER] = [3.0, 1.0, 4.0, 1.5, 5.0, 9.0];
const COARSE: [f64; INTER] = [9.0, 5.0, 1.5, 4.0, 1.0, 3.0];

/// Row statistics of q_proj and gate_proj; every other plane is zero. q_proj's rows come 2·HD per
/// group: group 0 holds the fine value, group 1 the coarse one (swapped in half B).
fn hywia_rows(name: &str, split: usize, q: usize, row: usize) -> f64 {
    if name.ends_with("q_proj.weight") {
        let g = row / (2 * HD);
        return match q {
            0 => (g == 0) as u8 as f64,
            1 => ((g == 1) != (split == 2)) as u8 as f64,
            _ => 0.0,
        };
    }
    if name.ends_with("gate_proj.weight") {
        return match (q, split) {
            (0, _) => FINE[row],
            (1, 2) => 10.0 - COARSE[row],
            (1, _) => COARSE[row],
            _ => 0.0,
        };
    }
    0.0
}

fn grad_arrays(t: &T, counts: [i64; 3]) -> Vec<Array> {
    let plane = |n: usize, f: &dyn Fn(usize, usize, usize) -> f64| -> Vec<f64> {
        (0..3).flat_map(|s| (0..4).flat_map(move |q| (0..n).map(move |i| f(s, q, i)))).collect()
    };
    let (rows, cols) = (t.shape[0], t.shape[1]);
    vec![
        (format!("{}.grad_out", t.name), Dtype::F64, vec![3, 4, rows], f64_bytes(&plane(rows, &|s, q, i| hywia_rows(&t.name, s, q, i)))),
        (format!("{}.grad_in", t.name), Dtype::F64, vec![3, 4, cols], f64_bytes(&plane(cols, &|_, _, _| 0.0))),
        (format!("{}.grad_count", t.name), Dtype::I64, vec![3], counts.iter().flat_map(|c| c.to_le_bytes()).collect()),
    ]
}

fn hywia_opts(m: &Path, out: &Path, sparsity: f64, h: HywiaOptions) -> StructuredOptions {
    StructuredOptions { hywia: Some(h), ..opts(m, out, StructMethod::Hywia, sparsity, GroupAllocation::Uniform { width_multiple: 1 }) }
}

fn kept(dir: &Path, layer: usize) -> (Vec<f32>, Vec<f32>) {
    let b = read(dir);
    let w = |n: &str| b[&format!("model.layers.{layer}.{n}.weight")].1.clone();
    (w("self_attn.k_proj"), w("mlp.gate_proj"))
}

#[test]
fn hywia_follows_the_reliable_estimate() {
    let root = tempfile::tempdir().unwrap();
    let m = root.path().join("m");
    let ts = llama_tensors(false);
    write_model(&m, &ts, &llama_config(KV), false);
    write_sidecar_with(&m, &ts, |t| grad_arrays(t, [4, 2, 2]));
    let a = read(&m);
    let w = |l: usize, n: &str| a[&format!("model.layers.{l}.{n}.weight")].1.clone();
    // one attention group and two channels per layer (see magnitude_sp_slices_the_lowest_norm_groups)
    let s = 144.0 / 352.0;
    for (fusion, drop_group, keep_c) in [(Fusion::Adaptive, 1, [0, 2, 4, 5]), (Fusion::Fine, 1, [0, 2, 4, 5]), (Fusion::Coarse, 0, [0, 1, 3, 5])] {
        let out = root.path().join(format!("out-{}", fusion.name()));
        let r = run(&hywia_opts(&m, &out, s, HywiaOptions { fusion, ..HywiaOptions::default() })).unwrap();
        assert_eq!((r.skip_first, r.skip_last, r.fusion_mode.as_deref()), (Some(0), Some(0), Some(fusion.name())));
        let f = r.fusion.as_ref().unwrap();
        assert_eq!(f.len(), LAYERS);
        assert_eq!((f[0].attn.rho_fine, f[0].attn.rho_coarse, f[0].mlp.rho_fine, f[0].mlp.rho_coarse), (1.0, -1.0, 1.0, -1.0));
        assert!(fusion != Fusion::Adaptive || (f[1].mlp.alpha_fine > 0.999 && f[1].mlp.alpha_fine < 1.0), "{:?}", f[1]);
        for l in 0..LAYERS {
            let (k, gate) = kept(&out, l);
            assert_eq!(k, rows(&w(l, "self_attn.k_proj"), HIDDEN, &expand(&[1 - drop_group], HD)), "{fusion:?} layer {l}");
            assert_eq!(gate, rows(&w(l, "mlp.gate_proj"), HIDDEN, &keep_c), "{fusion:?} layer {l}");
        }
        let c = config(&out);
        assert_eq!(c["llmprune"]["structured"]["fusion_mode"], fusion.name());
        assert!(!r.compensate && c.get("attention_bias").is_none());
    }

    // the first layer skipped: layer 1 alone carries the target (S' = 2S)
    let out = root.path().join("out-skip");
    let r = run(&hywia_opts(&m, &out, s / 2.0, HywiaOptions { skip_first: Some(1), ..HywiaOptions::default() })).unwrap();
    assert_eq!((r.per_layer[0].num_key_value_heads, r.per_layer[0].intermediate_size), (KV, INTER));
    assert_eq!((r.per_layer[1].num_key_value_heads, r.per_layer[1].intermediate_size), (1, 4));
    assert_eq!(r.fusion.unwrap().iter().map(|f| f.layer).collect::<Vec<_>>(), vec![1]);
    assert_eq!(read(&out)[&"model.layers.0.mlp.down_proj.weight".to_string()], a["model.layers.0.mlp.down_proj.weight"]);
    let e =
        run(&hywia_opts(&m, &root.path().join("x"), 0.6, HywiaOptions { skip_first: Some(1), ..HywiaOptions::default() })).unwrap_err().to_string();
    assert!(e.contains("must stay below 1"), "{e}");
    let e = run(&hywia_opts(&m, &root.path().join("x"), 0.1, HywiaOptions { skip_first: Some(1), skip_last: Some(1), ..HywiaOptions::default() }))
        .unwrap_err()
        .to_string();
    assert!(e.contains("leave no layer"), "{e}");
    assert!(!root.path().join("x").exists());
}

#[test]
fn hywia_refuses_missing_or_malformed_gradient_statistics() {
    let root = tempfile::tempdir().unwrap();
    let m = root.path().join("m");
    let ts = llama_tensors(false);
    write_model(&m, &ts, &llama_config(KV), false);
    let out = root.path().join("out");
    let hy = |m: &Path, h: HywiaOptions| run(&hywia_opts(m, &out, 0.2, h)).unwrap_err().to_string();

    let e = hy(&m, HywiaOptions::default());
    assert!(e.contains("needs gradient statistics"), "{e}");
    write_sidecar(&m, &ts);
    let e = hy(&m, HywiaOptions::default());
    assert!(e.contains("method hywia needs gradient statistics;") && e.contains("has none"), "{e}");

    // one half of the samples is empty: adaptive fusion cannot compare halves, fine needs none
    write_sidecar_with(&m, &ts, |t| grad_arrays(t, [1, 1, 0]));
    let e = hy(&m, HywiaOptions { fusion: Fusion::Adaptive, ..HywiaOptions::default() });
    assert!(e.contains("adaptive fusion") && e.contains("1 and 0 samples"), "{e}");
    assert!(!out.exists());
    let fine = root.path().join("fine");
    assert!(run(&hywia_opts(&m, &fine, 0.2, HywiaOptions { fusion: Fusion::Fine, ..HywiaOptions::default() })).is_ok());

    type Spoil = fn(&mut Array);
    let malformed: [(&str, Spoil); 3] = [
        ("must be F64 [3, 4,", |a| a.1 = Dtype::I64),
        ("must be F64 [3, 4,", |a| a.2 = vec![4, 3, a.2[2]]),
        ("non-finite", |a| a.3[..8].copy_from_slice(&f64::NAN.to_le_bytes())),
    ];
    for (want, spoil) in malformed {
        write_sidecar_with(&m, &ts, |t| {
            let mut v = grad_arrays(t, [4, 2, 2]);
            spoil(&mut v[1]);
            v
        });
        let e = hy(&m, HywiaOptions::default());
        assert!(e.contains("invalid stats sidecar") && e.contains(want), "{e}");
    }
    write_sidecar_with(&m, &ts, |t| grad_arrays(t, [4, 2, 2]).into_iter().take(2).collect());
    let e = hy(&m, HywiaOptions::default());
    assert!(e.contains("grad_count") && e.contains("together"), "{e}");

    // options of hywia with another method
    let o = StructuredOptions {
        hywia: Some(HywiaOptions::default()),
        ..opts(&m, &out, StructMethod::WandaSp, 0.2, GroupAllocation::Uniform { width_multiple: 1 })
    };
    assert!(run(&o).unwrap_err().to_string().contains("apply to method hywia"));
    let e = hy(&m, HywiaOptions { temperature: -1.0, ..HywiaOptions::default() });
    assert!(e.contains("--fusion-temperature"), "{e}");
}
