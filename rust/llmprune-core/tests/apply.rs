//! End-to-end tests of the core on small checkpoints written here: validation of headers and
//! indexes, output rules, and the sparsity-0 identity.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use llmprune_core::io::checkpoint::Checkpoint;
use llmprune_core::{apply, ApplyOptions, Error, Method, Scope, Target};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

fn bytes_of(dtype: Dtype, vals: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::BF16 => vals.iter().flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes()).collect(),
        Dtype::F16 => vals.iter().flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes()).collect(),
        Dtype::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F64 => vals.iter().flat_map(|v| (*v as f64).to_le_bytes()).collect(),
        _ => unreachable!(),
    }
}

struct T {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn tensor(name: &str, dtype: Dtype, shape: &[usize], seed: u32) -> T {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(2654435761).max(1);
    let vals: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            ((s % 17) as f32 - 8.0) / 8.0 // few distinct values: plenty of ties
        })
        .collect();
    T { name: name.into(), dtype, shape: shape.to_vec(), data: bytes_of(dtype, &vals) }
}

fn write_shard(path: &Path, tensors: &[T]) {
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|t| (t.name.clone(), TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap())).collect();
    let meta = Some([("format".to_string(), "pt".to_string())].into_iter().collect());
    safetensors::serialize_to_file(views, meta, path).unwrap();
}

fn model(dtype: Dtype) -> Vec<T> {
    vec![
        tensor("model.embed_tokens.weight", dtype, &[32, 16], 1),
        tensor("model.layers.0.self_attn.q_proj.weight", dtype, &[16, 16], 2),
        tensor("model.layers.0.mlp.down_proj.weight", dtype, &[16, 32], 3),
        tensor("model.layers.0.input_layernorm.weight", dtype, &[16], 4),
        tensor("model.layers.1.mlp.up_proj.weight", dtype, &[32, 16], 5),
        tensor("lm_head.weight", dtype, &[32, 16], 6),
    ]
}

/// Writes a checkpoint: one file, or two shards with an index.
fn write_model(dir: &Path, tensors: &[T], sharded: bool) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("config.json"), "{\"model_type\": \"llama\"}").unwrap();
    fs::write(dir.join("tokenizer.json"), "{}").unwrap();
    if !sharded {
        write_shard(&dir.join("model.safetensors"), tensors);
        return;
    }
    let (a, b) = tensors.split_at(tensors.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", a), ("model-00002-of-00002.safetensors", b)] {
        write_shard(&dir.join(file), part);
        for t in part {
            map.insert(t.name.clone(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

fn opts(model: &Path, out: &Path, target: Target) -> ApplyOptions {
    ApplyOptions {
        model_dir: model.into(),
        out_dir: out.into(),
        method: Method::Magnitude,
        target,
        scope: Scope::Row,
        stats: None,
        threads: Some(2),
        include: vec![],
        exclude: vec![],
        default_input_axis: 1,
        force: false,
        provenance: BTreeMap::new(),
        check_only: false,
        update: false,
        gram: None,
        sparsegpt: Default::default(),
        allocation: llmprune_core::unstructured::allocation::Allocation::Uniform,
        refine: None,
        compensate: false,
    }
}

fn run(o: &ApplyOptions) -> Result<llmprune_core::ApplySummary, Error> {
    apply(o, &mut |_| Ok(()))
}

fn tensor_bytes(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let ck = Checkpoint::open(dir).unwrap();
    ck.tensors().map(|(s, t)| (t.name.clone(), s.data(t).to_vec())).collect()
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// Siblings of the model in `root` other than the model itself (leftover outputs or temp dirs).
fn leftovers(root: &Path, model: &Path) -> Vec<PathBuf> {
    fs::read_dir(root).unwrap().map(|e| e.unwrap().path()).filter(|p| p != model).collect()
}

#[test]
fn sparsity_zero_is_byte_identical_for_every_dtype_and_layout() {
    for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
        for sharded in [false, true] {
            let root = tmp();
            let m = root.path().join("m");
            write_model(&m, &model(dtype), sharded);
            let out = root.path().join("out");
            let s = run(&opts(&m, &out, Target::Sparsity(0.0))).unwrap();
            assert_eq!(s.params_pruned, 0);
            assert_eq!(tensor_bytes(&m), tensor_bytes(&out));
            assert!(out.join("tokenizer.json").is_file() && out.join("config.json").is_file());
            if sharded {
                let idx: serde_json::Value = serde_json::from_slice(&fs::read(out.join("model.safetensors.index.json")).unwrap()).unwrap();
                let total: usize = model(dtype).iter().map(|t| t.data.len()).sum();
                assert_eq!(idx["metadata"]["total_size"], total);
            }
        }
    }
}

#[test]
fn pruning_keeps_untouched_tensors_and_stamps_provenance() {
    let root = tmp();
    let m = root.path().join("m");
    write_model(&m, &model(Dtype::BF16), true);
    let out = root.path().join("out");
    let s = run(&opts(&m, &out, Target::Pattern { n: 2, m: 4 })).unwrap();
    assert_eq!(s.tensors_pruned, 3);
    let (a, b) = (tensor_bytes(&m), tensor_bytes(&out));
    for name in ["model.embed_tokens.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight"] {
        assert_eq!(a[name], b[name], "{name} must be copied byte for byte");
    }
    let q = &b["model.layers.0.self_attn.q_proj.weight"];
    let zeros = q.chunks(2).filter(|c| c == &[0, 0]).count();
    assert!(zeros >= 16 * 16 / 2);
    let ck = Checkpoint::open(&out).unwrap();
    for shard in &ck.shards {
        let meta = shard.metadata();
        assert_eq!(meta["format"], "pt");
        let p: serde_json::Value = serde_json::from_str(&meta["llmprune"]).unwrap();
        assert_eq!(p["method"], "magnitude");
        assert_eq!(p["pattern"], "2:4");
    }
}

#[test]
fn property_sparsity_zero_identity() {
    use proptest::prelude::*;
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config { cases: 12, ..Default::default() });
    runner
        .run(&(1usize..9, 1usize..9, 0u32..1000, 0usize..3), |(r, c, seed, d)| {
            let dtype = [Dtype::BF16, Dtype::F16, Dtype::F32][d];
            let root = tmp();
            let m = root.path().join("m");
            let ts = vec![
                tensor("model.layers.0.mlp.up_proj.weight", dtype, &[r * 4, c * 4], seed),
                tensor("model.norm.weight", dtype, &[c * 4], seed + 1),
            ];
            write_model(&m, &ts, false);
            let out = root.path().join("out");
            run(&opts(&m, &out, Target::Sparsity(0.0))).unwrap();
            prop_assert_eq!(tensor_bytes(&m), tensor_bytes(&out));
            Ok(())
        })
        .unwrap();
}

fn expect_checkpoint_error(m: &Path, root: &Path, needle: &str) {
    let out = root.join("out");
    let err = run(&opts(m, &out, Target::Sparsity(0.5))).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::InvalidCheckpoint { .. }), "{msg}");
    assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
    assert!(leftovers(root, m).is_empty(), "no output may be left behind");
}

fn single_file(root: &Path) -> PathBuf {
    let m = root.join("m");
    write_model(&m, &model(Dtype::BF16), false);
    m.join("model.safetensors")
}

#[test]
fn truncated_shard() {
    let root = tmp();
    let f = single_file(root.path());
    let bytes = fs::read(&f).unwrap();
    fs::write(&f, &bytes[..bytes.len() - 10]).unwrap();
    expect_checkpoint_error(&root.path().join("m"), root.path(), "truncated");
    fs::write(&f, &bytes[..5]).unwrap();
    expect_checkpoint_error(&root.path().join("m"), root.path(), "too short");
}

#[test]
fn header_length_larger_than_file() {
    let root = tmp();
    let f = single_file(root.path());
    let mut bytes = fs::read(&f).unwrap();
    bytes[..8].copy_from_slice(&(1_000_000u64).to_le_bytes());
    fs::write(&f, &bytes).unwrap();
    expect_checkpoint_error(&root.path().join("m"), root.path(), "larger than the file");
}

fn rewrite_header(f: &Path, edit: impl Fn(&str) -> String) {
    let bytes = fs::read(f).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    let mut new = edit(header).into_bytes();
    while new.len() < n {
        new.push(b' ');
    }
    assert_eq!(new.len(), n, "edit must keep the header length");
    let mut out = bytes[..8].to_vec();
    out.extend(new);
    out.extend(&bytes[8 + n..]);
    fs::write(f, out).unwrap();
}

#[test]
fn corrupt_json_header() {
    let root = tmp();
    let f = single_file(root.path());
    rewrite_header(&f, |h| h.replacen('{', "[", 1));
    expect_checkpoint_error(&root.path().join("m"), root.path(), "JSON");
}

#[test]
fn overlapping_and_out_of_range_offsets() {
    let root = tmp();
    let f = single_file(root.path());
    let original = fs::read(&f).unwrap();
    // make the second tensor start inside the first
    rewrite_header(&f, |h| {
        let v: serde_json::Value = serde_json::from_str(h).unwrap();
        let second = v
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| *k != "__metadata__")
            .map(|(_, t)| t["data_offsets"][0].as_u64().unwrap())
            .filter(|&s| s > 0)
            .min()
            .unwrap();
        h.replacen(&format!("[{second},"), &format!("[{},", second - 2), 1)
    });
    expect_checkpoint_error(&root.path().join("m"), root.path(), "offsets");
    fs::write(&f, &original).unwrap();
    // grow the last tensor's end past the data section
    rewrite_header(&f, |h| {
        let v: serde_json::Value = serde_json::from_str(h).unwrap();
        let end = v.as_object().unwrap().values().filter_map(|t| t.get("data_offsets")).map(|o| o[1].as_u64().unwrap()).max().unwrap();
        h.replacen(&format!(",{end}]"), &format!(",{}]", end + 64), 1)
    });
    let err = run(&opts(&root.path().join("m"), &root.path().join("out"), Target::Sparsity(0.5))).unwrap_err();
    assert!(matches!(err, Error::InvalidCheckpoint { .. }), "{err}");
}

fn sharded(root: &Path) -> PathBuf {
    let m = root.join("m");
    write_model(&m, &model(Dtype::BF16), true);
    m
}

fn edit_index(m: &Path, edit: impl Fn(&mut serde_json::Map<String, serde_json::Value>)) {
    let p = m.join("model.safetensors.index.json");
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
    edit(v["weight_map"].as_object_mut().unwrap());
    fs::write(&p, v.to_string()).unwrap();
}

#[test]
fn index_paths_must_stay_inside_the_model() {
    for bad in ["../evil.safetensors", "/etc/evil.safetensors", "sub/../../x.safetensors"] {
        let root = tmp();
        let m = sharded(root.path());
        edit_index(&m, |w| {
            w.insert("model.embed_tokens.weight".into(), bad.into());
        });
        expect_checkpoint_error(&m, root.path(), "outside the model directory");
    }
}

#[test]
fn index_naming_missing_tensor_or_shard() {
    let root = tmp();
    let m = sharded(root.path());
    edit_index(&m, |w| {
        w.insert("model.layers.9.ghost.weight".into(), "model-00001-of-00002.safetensors".into());
    });
    expect_checkpoint_error(&m, root.path(), "does not hold it");
    let root = tmp();
    let m = sharded(root.path());
    fs::remove_file(m.join("model-00002-of-00002.safetensors")).unwrap();
    expect_checkpoint_error(&m, root.path(), "missing");
}

#[test]
fn missing_dir_and_config() {
    let root = tmp();
    expect_checkpoint_error(&root.path().join("nope"), root.path(), "not found");
    let m = sharded(root.path());
    fs::remove_file(m.join("config.json")).unwrap();
    expect_checkpoint_error(&m, root.path(), "config.json");
}

#[test]
fn n_m_divisibility_and_dtype_are_checked_before_writing() {
    let root = tmp();
    let m = root.path().join("m");
    write_model(&m, &model(Dtype::BF16), false);
    let err = run(&opts(&m, &root.path().join("out"), Target::Pattern { n: 1, m: 7 })).unwrap_err();
    assert!(matches!(err, Error::Tensor { .. }) && err.to_string().contains("divisible"), "{err}");
    assert!(leftovers(root.path(), &m).is_empty());

    let root = tmp();
    let m = root.path().join("m");
    let mut ts = model(Dtype::BF16);
    ts.push(tensor("model.layers.1.mlp.gate_proj.weight", Dtype::F64, &[32, 16], 9));
    write_model(&m, &ts, false);
    let err = run(&opts(&m, &root.path().join("out"), Target::Sparsity(0.5))).unwrap_err();
    assert!(err.to_string().contains("model.layers.1.mlp.gate_proj.weight") && err.to_string().contains("F64"), "{err}");
    assert!(leftovers(root.path(), &m).is_empty());
}

#[test]
fn output_location_rules() {
    let root = tmp();
    let m = sharded(root.path());
    let before = tensor_bytes(&m);
    for bad in [m.clone(), m.join("inside"), root.path().to_path_buf()] {
        let err = run(&opts(&m, &bad, Target::Sparsity(0.5))).unwrap_err();
        assert!(matches!(err, Error::Output { .. }), "{err}");
    }
    let out = root.path().join("busy");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("keep.txt"), "x").unwrap();
    let err = run(&opts(&m, &out, Target::Sparsity(0.5))).unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");
    assert!(out.join("keep.txt").exists());
    let mut forced = opts(&m, &out, Target::Sparsity(0.5));
    forced.force = true;
    run(&forced).unwrap();
    assert!(!out.join("keep.txt").exists() && out.join("config.json").exists());
    let err = run(&opts(&m, &root.path().join("no/such/parent"), Target::Sparsity(0.5))).unwrap_err();
    assert!(matches!(err, Error::Output { .. }), "{err}");
    assert_eq!(before, tensor_bytes(&m), "the input is never modified");
}

#[test]
fn interrupt_removes_partial_output() {
    let root = tmp();
    let m = sharded(root.path());
    let out = root.path().join("out");
    let mut n = 0;
    let err = apply(&opts(&m, &out, Target::Sparsity(0.5)), &mut |_| {
        n += 1;
        if n == 2 {
            Err(Error::Interrupted)
        } else {
            Ok(())
        }
    })
    .unwrap_err();
    assert!(matches!(err, Error::Interrupted));
    assert!(leftovers(root.path(), &m).is_empty());
}

#[test]
fn wanda_without_stats_is_a_clear_error() {
    let root = tmp();
    let m = sharded(root.path());
    let mut o = opts(&m, &root.path().join("out"), Target::Sparsity(0.5));
    o.method = Method::Wanda;
    let err = run(&o).unwrap_err();
    assert!(err.to_string().contains("needs activation statistics"), "{err}");
}

#[test]
fn fused_row_path_equals_mask_matrix() {
    use llmprune_core::io::checkpoint::TensorEntry;
    use llmprune_core::io::dtype::decode;
    use llmprune_core::unstructured::kernel::prune_tensor;
    use llmprune_core::unstructured::select::mask_matrix;
    for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
        let t = tensor("model.layers.0.mlp.up_proj.weight", dtype, &[24, 48], 7);
        let entry = TensorEntry { name: t.name.clone(), dtype, shape: t.shape.clone(), start: 0, end: t.data.len() };
        let factors: Vec<f32> = (0..48).map(|j| 0.5 + (j % 5) as f32).collect();
        for target in [
            Target::Sparsity(0.5),
            Target::Sparsity(0.3),
            Target::Pattern { n: 2, m: 4 },
            Target::Pattern { n: 4, m: 8 },
            Target::Pattern { n: 5, m: 12 },
        ] {
            let mut o = opts(Path::new("."), Path::new("."), target);
            o.method = Method::Wanda;
            let mut out = Vec::new();
            let count = prune_tensor(&entry, &t.data, 1, Some(&factors), &o, &mut out).unwrap();
            let w = decode(dtype, &t.data);
            let mask = mask_matrix(&w, 24, 48, Some(&factors), target, Scope::Row).unwrap();
            let es = t.data.len() / w.len();
            for (i, &m) in mask.iter().enumerate() {
                let got = &out[i * es..(i + 1) * es];
                if m {
                    assert!(got.iter().all(|&b| b == 0), "{dtype:?} {target:?}: entry {i} must be +0");
                } else {
                    assert_eq!(got, &t.data[i * es..(i + 1) * es], "{dtype:?} {target:?}: entry {i} must be kept");
                }
            }
            assert_eq!(count, mask.iter().filter(|&&m| m).count() as u64);
        }
    }
}
