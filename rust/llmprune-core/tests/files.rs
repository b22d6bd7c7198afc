//! The core's own files: sidecar round trip and validation, merge refusals, staging (empty targets,
//! leftovers of killed runs), the thread-count bounds.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use llmprune_core::io::output::{clean_stale, StagingDir};
use llmprune_core::pool::{thread_count, MAX_THREADS};
use llmprune_core::sidecar::{encode, merge, write, LayerStats, Sidecar, SidecarInfo};

fn info() -> SidecarInfo {
    SidecarInfo {
        fingerprint: "f".repeat(64),
        model_tensors: serde_json::Map::new(),
        calibration: serde_json::json!({"source": "t", "nsamples": 1, "seqlen": 2, "seed": 0, "tokens": 2}),
        mode: "dense".into(),
        sequential: serde_json::Value::Null,
        grad: serde_json::Value::Null,
        blocks: None,
        experts: Default::default(),
    }
}

fn layers(sum: Vec<f64>, sqsum: Vec<f64>, count: i64) -> BTreeMap<String, LayerStats> {
    BTreeMap::from([("w".to_string(), LayerStats { act_sum: sum, act_sqsum: sqsum, count, input_axis: 1 })])
}

#[test]
fn sidecar_round_trip() {
    let l = layers(vec![1.0, -2.0, 0.0], vec![3.0, 5.0, 0.0], 2);
    let bytes = encode(&info(), &l, &BTreeMap::new()).unwrap();
    let sc = Sidecar::from_bytes(&bytes, Path::new("s")).unwrap();
    assert_eq!(sc.layers["w"].act_sum, l["w"].act_sum);
    assert_eq!(sc.layers["w"].act_sqsum, l["w"].act_sqsum);
    assert_eq!(sc.layers["w"].count, 2);
    assert_eq!(sc.meta["calibration"]["tokens"], 2);
}

#[test]
fn impossible_statistics_are_refused_naming_the_tensor() {
    let cases = [
        (layers(vec![f64::NAN], vec![1.0], 2), "non-finite"),
        (layers(vec![0.0], vec![f64::INFINITY], 2), "non-finite"),
        (layers(vec![0.0], vec![-1.0], 2), "negative"),
        (layers(vec![0.0], vec![1.0], 0), "at least 1"),
        (layers(vec![0.0], vec![1.0], -5), "at least 1"),
        (layers(vec![10.0], vec![1.0], 2), "negative variance"),
    ];
    for (l, want) in cases {
        let err = encode(&info(), &l, &BTreeMap::new()).unwrap_err().to_string();
        assert!(err.contains("w") && err.contains(want), "{err}");
    }
    // a sidecar written by another tool with the same values is refused on reading
    let good = encode(&info(), &layers(vec![1.0], vec![1.0], 2), &BTreeMap::new()).unwrap();
    let mut bad = good;
    let at = bad.len() - 3 * 8; // act_count, act_sqsum, act_sum: the count comes first in name order
    bad[at..at + 8].copy_from_slice(&(-5i64).to_le_bytes());
    let err = Sidecar::from_bytes(&bad, Path::new("s")).err().expect("refused").to_string();
    assert!(err.contains("w.act_count"), "{err}");
}

#[test]
fn merge_refuses_repeated_inputs_and_writing_over_one() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.safetensors"), d.path().join("b.safetensors"));
    write(&a, &info(), &layers(vec![1.0], vec![1.0], 2), &BTreeMap::new(), &[]).unwrap();
    write(&b, &info(), &layers(vec![2.0], vec![4.0], 2), &BTreeMap::new(), &[]).unwrap();
    let before = fs::read(&a).unwrap();
    let twice = merge(&[a.clone(), d.path().join(".").join("a.safetensors")], &d.path().join("c.safetensors")).unwrap_err();
    assert!(twice.to_string().contains("twice"), "{twice}");
    let over = merge(&[a.clone(), b.clone()], &a).unwrap_err();
    assert!(over.to_string().contains("never writes over its input"), "{over}");
    assert_eq!(fs::read(&a).unwrap(), before);
    let s = merge(&[a, b], &d.path().join("c.safetensors")).unwrap();
    assert_eq!(s.tokens, 4);
    let c = Sidecar::open(&d.path().join("c.safetensors")).unwrap();
    assert_eq!(c.layers["w"].act_sum, vec![3.0]);
}

#[test]
fn thread_counts_are_bounded() {
    assert_eq!(thread_count(Some(3)).unwrap(), 3);
    assert!(thread_count(Some(0)).is_err());
    assert!(thread_count(Some(MAX_THREADS + 1)).unwrap_err().to_string().contains("1 to 1024"));
}

#[test]
fn staging_uses_an_empty_target_and_removes_leftovers_of_dead_runs() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("m");
    fs::create_dir(&model).unwrap();
    let out = d.path().join("out");
    fs::create_dir(&out).unwrap();
    // a leftover of a killed run: a process id no live process has (above Linux's pid_max)
    let stale = d.path().join(".out.llmprune-tmp-999999999");
    fs::create_dir(&stale).unwrap();
    fs::write(stale.join("x"), b"partial").unwrap();
    let st = StagingDir::prepare(&model, &out, false).unwrap();
    if Path::new("/proc/self").exists() {
        assert!(!stale.exists());
        assert!(st.warnings.iter().any(|w| w.contains("interrupted run")), "{:?}", st.warnings);
    }
    fs::write(st.path.join("config.json"), b"{}").unwrap();
    let done = st.commit().unwrap();
    assert!(done.join("config.json").is_file());
    let names: Vec<_> = fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(
        {
            let mut n = names;
            n.sort();
            n
        },
        ["m", "out"]
    );
    // our own process's name is never treated as a leftover
    assert!(clean_stale(&out).is_empty());
}
