//! `stats merge`: the element-wise sum of sidecars of one model taken on disjoint calibration sets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use super::gram::merge_gram;
use super::{write, BlockStats, ExpertStats, LayerStats, Sidecar, SidecarInfo};
use crate::error::{Error, Result};
use crate::io::output::same_file;

#[derive(Debug, Serialize)]
pub struct MergeSummary {
    pub out: String,
    pub inputs: Vec<String>,
    pub layers: usize,
    pub tokens: i64,
    /// `dense`, or `sequential METHOD TARGET`
    pub mode: String,
    /// `llmprune-stats` or `llmprune-gram`
    pub format: String,
}

fn combine(values: Vec<Value>) -> Value {
    let mut distinct: Vec<Value> = Vec::new();
    for v in values {
        if !distinct.contains(&v) {
            distinct.push(v);
        }
    }
    if distinct.len() == 1 {
        distinct.pop().expect("one value")
    } else {
        Value::Array(distinct)
    }
}

pub fn merge(paths: &[PathBuf], out: &Path) -> Result<MergeSummary> {
    if paths.len() < 2 {
        return Err(Error::arg_hint("merge needs at least two sidecars", "llmprune stats merge A B ... --out C"));
    }
    for (i, p) in paths.iter().enumerate() {
        if let Some(q) = paths[..i].iter().find(|q| same_file(p, q)) {
            return Err(Error::arg_hint(
                format!("{} is given twice ({} and {}); its statistics would be counted twice", p.display(), q.display(), p.display()),
                "name each sidecar once",
            ));
        }
    }
    // the destination is checked before any input is read (a model shard, an index, config.json
    // or a tokenizer file is never replaced by a sidecar)
    for p in paths {
        crate::io::output::check_not_input(out, p)?;
    }
    crate::io::output::check_file_destination(out)?;
    if is_gram(&paths[0]) {
        let (layers, tokens, meta) = merge_gram(paths, out)?;
        return Ok(MergeSummary {
            out: out.display().to_string(),
            inputs: paths.iter().map(|p| p.display().to_string()).collect(),
            layers,
            tokens,
            mode: mode_text(&meta),
            format: super::gram::GRAM_FORMAT.into(),
        });
    }
    let cars: Vec<Sidecar> = paths.iter().map(|p| Sidecar::open(p)).collect::<Result<_>>()?;
    if let Some(c) = cars.iter().find(|c| !c.grads.is_empty()) {
        return Err(Error::arg_hint(
            format!("{} carries gradient statistics (stats --grad), which do not add up across calibration sets", c.path.display()),
            "run stats --grad once over all the samples instead",
        ));
    }
    let first = &cars[0];
    let text = |m: &serde_json::Map<String, Value>, k: &str| m.get(k).cloned().unwrap_or(Value::Null);
    for c in &cars[1..] {
        let (a, b) = (first.path.display(), c.path.display());
        if text(&c.meta, "model_fingerprint") != text(&first.meta, "model_fingerprint") {
            return Err(Error::arg_hint(
                format!("{a} and {b} were computed for different models (fingerprints differ)"),
                "merge only statistics of the same checkpoint",
            ));
        }
        if let Some(only) =
            first.layers.keys().filter(|k| !c.layers.contains_key(*k)).chain(c.layers.keys().filter(|k| !first.layers.contains_key(*k))).next()
        {
            return Err(Error::arg(format!("{a} and {b} list different prunable weights (e.g. {only})")));
        }
        for (name, s) in &c.layers {
            let r = &first.layers[name];
            if s.input_axis != r.input_axis || s.act_sum.len() != r.act_sum.len() {
                return Err(Error::arg(format!("{a} and {b} disagree on the shape of {name}'s statistics")));
            }
        }
        if (text(&c.meta, "mode"), text(&c.meta, "sequential")) != (text(&first.meta, "mode"), text(&first.meta, "sequential")) {
            return Err(Error::arg(format!("{a} and {b} were computed in different modes ({} vs {})", mode_text(&first.meta), mode_text(&c.meta))));
        }
    }
    let mut merged: BTreeMap<String, LayerStats> = BTreeMap::new();
    for (name, r) in &first.layers {
        let mut s = LayerStats { act_sum: vec![0.0; r.act_sum.len()], act_sqsum: vec![0.0; r.act_sum.len()], count: 0, input_axis: r.input_axis };
        for c in &cars {
            let l = &c.layers[name];
            s.act_sum.iter_mut().zip(&l.act_sum).for_each(|(a, b)| *a += b);
            s.act_sqsum.iter_mut().zip(&l.act_sqsum).for_each(|(a, b)| *a += b);
            s.count = s.count.checked_add(l.count).ok_or_else(|| Error::arg(format!("token counts of {name} overflow")))?;
        }
        merged.insert(name.clone(), s);
    }
    let cals: Vec<serde_json::Map<String, Value>> =
        cars.iter().map(|c| c.meta.get("calibration").and_then(Value::as_object).cloned().unwrap_or_default()).collect();
    let total = |k: &str| cals.iter().map(|c| c.get(k).and_then(Value::as_i64).unwrap_or(0)).sum::<i64>();
    let field = |k: &str| combine(cals.iter().map(|c| c.get(k).cloned().unwrap_or(Value::Null)).collect());
    let calibration = serde_json::json!({
        "source": field("source"),
        "nsamples": total("nsamples"),
        "seqlen": field("seqlen"),
        "seed": field("seed"),
        "tokens": total("tokens"),
        "merged_from": cars.iter().map(|c| c.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()).collect::<Vec<_>>(),
    });
    let info = SidecarInfo {
        fingerprint: first.meta.get("model_fingerprint").and_then(Value::as_str).unwrap_or_default().to_string(),
        model_tensors: first.meta.get("model_tensors").and_then(Value::as_object).cloned().unwrap_or_default(),
        calibration,
        mode: first.meta.get("mode").and_then(Value::as_str).unwrap_or("dense").to_string(),
        sequential: text(&first.meta, "sequential"),
        grad: Value::Null,
        blocks: merge_blocks(&cars)?,
        experts: merge_experts(&cars)?,
    };
    let inputs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    write(out, &info, &merged, &BTreeMap::new(), &inputs)?;
    Ok(MergeSummary {
        out: out.display().to_string(),
        inputs: paths.iter().map(|p| p.display().to_string()).collect(),
        layers: merged.len(),
        tokens: merged.values().map(|s| s.count).max().unwrap_or(0),
        mode: mode_text(&first.meta),
        format: super::FORMAT.into(),
    })
}

/// Whether a file declares the Gram sidecar format (anything unreadable is left to the stats reader).
/// The sum of the inputs' Block Influence sums, when every input has them for the same blocks.
fn merge_blocks(cars: &[Sidecar]) -> Result<Option<BlockStats>> {
    let Some(first) = cars.iter().map(|c| c.blocks.as_ref()).collect::<Option<Vec<_>>>() else { return Ok(None) };
    let n = first[0].cos_sum.len();
    if first.iter().any(|b| b.cos_sum.len() != n) {
        return Err(Error::arg("the sidecars hold Block Influence sums of different numbers of blocks"));
    }
    let mut out = BlockStats { cos_sum: vec![0.0; n], count: vec![0; n] };
    for b in first {
        for i in 0..n {
            out.cos_sum[i] += b.cos_sum[i];
            out.count[i] = out.count[i].checked_add(b.count[i]).ok_or_else(|| Error::arg("block token counts overflow"))?;
        }
    }
    Ok(Some(out))
}

/// The sum of the inputs' expert statistics (every input must list the same MoE layers).
fn merge_experts(cars: &[Sidecar]) -> Result<BTreeMap<String, ExpertStats>> {
    let first = &cars[0].experts;
    let mut out = first.clone();
    for c in &cars[1..] {
        if c.experts.keys().ne(first.keys()) {
            return Err(Error::arg(format!("{} and {} hold expert statistics of different MoE layers", cars[0].path.display(), c.path.display())));
        }
        for (name, e) in &c.experts {
            let o = out.get_mut(name).expect("same keys");
            if e.count.len() != o.count.len() || e.top_k != o.top_k {
                return Err(Error::arg(format!("the sidecars disagree on the experts of {name}")));
            }
            for j in 0..e.count.len() {
                o.count[j] = o.count[j].checked_add(e.count[j]).ok_or_else(|| Error::arg("expert token counts overflow"))?;
                o.gate_sum[j] += e.gate_sum[j];
                o.reap_sum[j] += e.reap_sum[j];
            }
        }
    }
    Ok(out)
}

fn is_gram(path: &Path) -> bool {
    let Ok(bytes) = std::fs::File::open(path).and_then(|mut f| {
        use std::io::Read;
        let mut len = [0u8; 8];
        f.read_exact(&mut len)?;
        let n = u64::from_le_bytes(len).min(1 << 24) as usize;
        let mut h = vec![0u8; n];
        f.read_exact(&mut h)?;
        Ok(h)
    }) else {
        return false;
    };
    let text = String::from_utf8_lossy(&bytes);
    text.contains(&format!("\\\"format\\\":\\\"{}\\\"", super::gram::GRAM_FORMAT))
}

fn mode_text(meta: &serde_json::Map<String, Value>) -> String {
    match (meta.get("mode").and_then(Value::as_str), meta.get("sequential").and_then(Value::as_object)) {
        (Some("sequential"), Some(seq)) => {
            let target =
                seq.get("pattern").or_else(|| seq.get("sparsity")).map(|v| v.as_str().map_or(v.to_string(), str::to_string)).unwrap_or_default();
            format!("sequential {} {target}", seq.get("method").and_then(Value::as_str).unwrap_or("?"))
        }
        _ => "dense".into(),
    }
}
