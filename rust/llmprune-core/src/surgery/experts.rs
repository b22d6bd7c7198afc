//! Expert pruning of Mixture-of-Experts checkpoints (`apply --method reap|frequency`).
//!
//! Per MoE layer, the routed experts with the lowest saliency are removed, ties lower index first:
//! REAP (Lasby et al., 2025) ranks expert j by S_j = (1/N_j) Σ_{t routed to j} g_j(t) · ‖f_j(t)‖₂
//! (0 for an expert no calibration token reached), `frequency` by N_j, the tokens routed to it
//! (sidecar: docs/sidecar.md). The kept experts are renumbered in order and their tensors copied
//! byte for byte (any dtype, including FP8 with scale tensors, which are per expert too); the
//! router's rows (`gate.weight`, and any per-expert `gate.*` vector such as a bias or score
//! correction) are sliced to the kept experts; shared experts are not routed and stay. config.json
//! gets the new expert count (`num_local_experts`, `num_experts` or `n_routed_experts`).
//!
//! Layouts: one module per expert, `<moe>.experts.<j>.<...>`, beside the router `<moe>.gate.*`
//! (Mixtral's `block_sparse_moe`, Qwen2-MoE / Qwen3-MoE / OLMoE / DeepSeek-V3's `mlp`); or fused
//! tensors with the experts on the leading axis, `<moe>.experts.<param>` [experts, ...], beside
//! `<moe>.router.*` (gpt-oss, including its MXFP4 `_blocks` / `_scales`), whose kept rows are copied
//! byte for byte in order.
//!
//! Group-limited routers (DeepSeek-V2/V3's `n_group` > 1: a token first picks `topk_group` of the
//! `n_group` equal, consecutive groups of experts, then its experts among those) lose the same number of
//! experts from every group, each group's least salient, so the kept experts still split into
//! `n_group` equal consecutive groups and the router keeps its meaning; `n_group` and `topk_group` stay.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::checkpoint::read_config;
use crate::io::postcheck::check_count;
use crate::run::{Progress, Run, StatsNeed};
use crate::sidecar::ExpertStats;
use crate::surgery::remap::{self, llmprune_record, lowest, renumbering, Fate, Written};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertMethod {
    Reap,
    Frequency,
}

impl ExpertMethod {
    pub const ALL: [ExpertMethod; 2] = [ExpertMethod::Reap, ExpertMethod::Frequency];

    pub fn name(self) -> &'static str {
        match self {
            ExpertMethod::Reap => "reap",
            ExpertMethod::Frequency => "frequency",
        }
    }

    /// Each expert's saliency in one layer.
    pub fn saliency(self, e: &ExpertStats) -> Vec<f64> {
        match self {
            ExpertMethod::Reap => e.count.iter().zip(&e.reap_sum).map(|(&n, &r)| if n > 0 { r / n as f64 } else { 0.0 }).collect(),
            ExpertMethod::Frequency => e.count.iter().map(|&n| n as f64).collect(),
        }
    }
}

impl FromStr for ExpertMethod {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        ExpertMethod::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| Error::arg(format!("unknown expert method {s:?}; expected reap or frequency")))
    }
}

/// How many routed experts each MoE layer loses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ExpertRemoval {
    /// ⌊S · E⌋ per layer.
    Sparsity(f64),
    /// Keep K per layer.
    Keep(usize),
}

#[derive(Clone, Debug)]
pub struct ExpertOptions {
    pub model_dir: PathBuf,
    pub out_dir: PathBuf,
    pub method: ExpertMethod,
    pub removal: ExpertRemoval,
    pub stats: Option<PathBuf>,
    pub threads: Option<usize>,
    pub force: bool,
    pub provenance: BTreeMap<String, String>,
}

#[derive(Debug, Serialize)]
pub struct LayerResult {
    pub layer: String,
    /// Original ids of the kept experts, ascending (new id = position).
    pub kept: Vec<usize>,
    pub saliency: Vec<f64>,
}

#[derive(Debug, Serialize)]
pub struct ExpertSummary {
    pub out: String,
    pub method: String,
    pub experts_before: usize,
    pub experts_after: usize,
    pub layers: Vec<LayerResult>,
    pub params_before: u64,
    pub params_after: u64,
    pub bytes_before: u64,
    pub bytes_written: u64,
    pub shards: usize,
    pub seconds: f64,
    pub stats: Option<String>,
    pub warnings: Vec<String>,
}

const EXPERT_COUNT_KEYS: [&str; 3] = ["num_local_experts", "num_experts", "n_routed_experts"];
/// The config keys of the number of experts each token is routed to.
const TOP_K_KEYS: [&str; 3] = ["num_experts_per_tok", "experts_per_token", "moe_topk"];

/// The MoE modules of a checkpoint: the `<moe>` of every `<moe>.experts.<...>` tensor (shared
/// experts, `shared_experts.*` / `shared_expert.*`, are not routed and not counted).
fn moe_modules<'a>(names: impl Iterator<Item = &'a str>) -> std::collections::BTreeSet<String> {
    names.filter_map(|n| n.find(".experts.").map(|i| n[..i].to_string())).collect()
}

/// The postcondition of expert pruning: every MoE module of the output has the `says` experts
/// config.json's `key` states: that many per-expert modules, numbered 0..says, or fused tensors and
/// router rows of that many.
fn check_experts_written(shapes: &remap::WrittenShapes, modules: &std::collections::BTreeSet<String>, key: &str, says: usize) -> Result<()> {
    for moe in modules {
        let mut ids = std::collections::BTreeSet::new();
        for (name, shape) in shapes.range(moe.clone()..) {
            if !name.starts_with(moe.as_str()) {
                break;
            }
            if let Some((j, _)) = expert_part(name, moe) {
                ids.insert(j);
            } else if name.starts_with(&format!("{moe}.experts."))
                || name.starts_with(&format!("{moe}.gate."))
                || name.starts_with(&format!("{moe}.router."))
            {
                check_count(name, &format!("rows (one per expert; {key})"), shape.first().copied().unwrap_or(0), says)?;
            }
        }
        if !ids.is_empty() {
            let next = ids.iter().next_back().map_or(0, |j| j + 1);
            if ids.len() != next {
                return Err(Error::postcondition(moe, format!("the experts written are not numbered 0..{}", ids.len()), None));
            }
            check_count(moe, &format!("experts ({key})"), next, says)?;
        }
    }
    Ok(())
}

/// A group-limited router's groups: `n` (config `n_group`, 1 for other routers) consecutive groups of
/// `size` experts, of which each token's router picks `top` (`topk_group`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RouterGroups {
    n: usize,
    size: usize,
    top: usize,
}

impl RouterGroups {
    fn of(config: &serde_json::Map<String, Value>, experts: usize) -> Result<Self> {
        let n = config.get("n_group").and_then(Value::as_u64).unwrap_or(1).max(1) as usize;
        if n > 1 && !experts.is_multiple_of(n) {
            return Err(Error::arg(format!("config.json: {experts} experts do not split into n_group = {n} equal groups")));
        }
        let top = config.get("topk_group").and_then(Value::as_u64).map_or(n, |t| (t as usize).clamp(1, n));
        Ok(RouterGroups { n, size: experts / n, top })
    }

    /// The `remove` experts to drop (ascending): the least salient overall, or with groups the
    /// `remove / n` least salient of every group (ties: lower index first).
    fn lowest(&self, saliency: &[f64], remove: usize, moe: &str) -> Result<Vec<usize>> {
        if self.n == 1 {
            return Ok(lowest(saliency, remove));
        }
        let per = remove / self.n;
        let kept = self.size - per;
        // DeepSeek-V3 ranks a group by the sum of its two best scores: every group keeps two
        if per > 0 && kept < 2 {
            return Err(Error::arg_hint(
                format!("{moe}: keeping {kept} of each group's {} experts is too few for a grouped router (DeepSeek-V3 ranks groups by their two best experts)", self.size),
                format!("keep at least 2 experts per group ({} in all)", 2 * self.n),
            ));
        }
        let mut out = Vec::with_capacity(remove);
        for g in 0..self.n {
            let base = g * self.size;
            out.extend(lowest(&saliency[base..base + self.size], per).into_iter().map(|j| base + j));
        }
        Ok(out)
    }

    /// The most experts a token can still be routed to.
    fn reachable(&self, kept: usize) -> usize {
        kept / self.n * self.top
    }
}

/// `<moe>.experts.<j>.<rest>` → (moe, j, rest).
fn expert_part<'a>(name: &'a str, moe: &str) -> Option<(usize, &'a str)> {
    let rest = name.strip_prefix(moe)?.strip_prefix(".experts.")?;
    let (j, tail) = rest.split_once('.')?;
    Some((j.parse().ok()?, tail))
}

/// The fate of tensor `name` given each MoE layer's renumbering of its experts (old → new).
fn fate(name: &str, shape: &[usize], plans: &BTreeMap<String, Vec<Option<usize>>>) -> Result<Fate> {
    for (moe, map) in plans {
        if !name.starts_with(moe.as_str()) {
            continue;
        }
        let e = &map.len();
        let kept = || (0..*e).filter(|&j| map[j].is_some()).collect::<Vec<_>>();
        if let Some((j, tail)) = expert_part(name, moe) {
            return Ok(match map.get(j).copied().flatten() {
                Some(new) => Fate::Copy(format!("{moe}.experts.{new}.{tail}")),
                None if j < *e => Fate::Drop,
                None => return Err(Error::arg(format!("{name}: expert {j} is beyond the {e} experts the statistics know"))),
            });
        }
        // fused expert tensors ([experts, ...]: gpt-oss's gate_up_proj, its biases, MXFP4 blocks and
        // scales) and the router's rows (`gate.*` or `router.*`: weight, bias, score correction)
        let fused = name.starts_with(&format!("{moe}.experts."));
        if fused || name.starts_with(&format!("{moe}.gate.")) || name.starts_with(&format!("{moe}.router.")) {
            if shape.first() == Some(e) {
                return Ok(Fate::Rows(name.to_string(), kept()));
            }
            let what = if fused { "a fused expert tensor" } else { "a router tensor" };
            return Err(Error::arg(format!("{name} has shape {shape:?}; {what} needs {e} rows, one per expert")));
        }
    }
    Ok(Fate::Copy(name.to_string()))
}

pub fn apply_experts(opts: &ExpertOptions, progress: &mut dyn FnMut(Progress) -> Result<()>) -> Result<ExpertSummary> {
    let mut run = Run::open(&opts.model_dir, opts.stats.as_deref(), Some(StatsNeed::activations(&format!("method {}", opts.method.name()))))?;
    crate::pool::pool(opts.threads)?;
    let sc = run.sidecar.as_ref().ok_or_else(|| Error::Internal("the sidecar is required".into()))?;
    let mut config = read_config(&run.ckpt.dir)?;
    let key = EXPERT_COUNT_KEYS.iter().find(|k| config.get(**k).and_then(Value::as_u64).is_some_and(|n| n > 0)).copied();
    let modules = moe_modules(run.ckpt.tensors().map(|(_, t)| t.name.as_str()));
    // no MoE module in the checkpoint and no expert statistics: a dense model (expert statistics of
    // modules the checkpoint does not name are a layout llmprune does not know, reported below)
    let Some(key) = key.filter(|_| !modules.is_empty() || !sc.experts.is_empty()) else {
        return Err(Error::arg_hint(
            format!("method {} removes experts of Mixture-of-Experts layers, and {} has none", opts.method.name(), run.ckpt.dir.display()),
            "for a dense model use --method block-influence (whole blocks) or a structured method",
        ));
    };
    // every MoE module of the checkpoint needs its routing statistics, else it would keep all its
    // experts while config.json says fewer
    if let Some(moe) = modules.iter().find(|m| !sc.experts.contains_key(*m)) {
        let what = if sc.experts.is_empty() {
            format!("it has no expert routing statistics at all, which method {} needs", opts.method.name())
        } else {
            format!("it has no expert routing statistics for {moe}, one of the model's {} MoE layers", modules.len())
        };
        return Err(Error::arg_hint(
            format!("stats sidecar {}: {what}", sc.path.display()),
            "re-run `llmprune stats MODEL` on this model (this version records the routing of every MoE layer), then apply again",
        ));
    }
    let e_cfg = config[key].as_u64().unwrap_or(0) as usize;
    let groups = RouterGroups::of(&config, e_cfg)?;
    // the experts each token is routed to: config.json's, which the output is loaded with
    let config_top_k = TOP_K_KEYS.iter().find_map(|k| config.get(*k).and_then(Value::as_u64)).map(|k| k as usize);
    let mut plans = BTreeMap::new();
    let mut layers = Vec::new();
    for (moe, st) in &sc.experts {
        let e = st.count.len();
        if e != e_cfg {
            return Err(Error::StatsMismatch {
                path: sc.path.clone(),
                msg: format!("{moe} has statistics of {e} experts, config.json says {e_cfg}"),
            });
        }
        let remove = match opts.removal {
            ExpertRemoval::Sparsity(s) if (0.0..1.0).contains(&s) => groups.n * (s * groups.size as f64).floor() as usize,
            ExpertRemoval::Sparsity(s) => return Err(Error::arg(format!("sparsity must be in [0, 1), got {s}"))),
            ExpertRemoval::Keep(k) if k > e => return Err(Error::arg(format!("--experts-keep {k} is more than the {e} experts of {moe}"))),
            ExpertRemoval::Keep(k) if k % groups.n != 0 => {
                return Err(Error::arg_hint(
                    format!("--experts-keep {k}: this model routes within {} groups of experts (n_group), which must stay equal", groups.n),
                    format!("keep a multiple of {}, e.g. {}", groups.n, (k / groups.n).max(1) * groups.n),
                ))
            }
            ExpertRemoval::Keep(k) => e - k,
        };
        if remove == 0 {
            return Err(Error::arg_hint(format!("this removes no expert of {e}"), "raise --sparsity, or lower --experts-keep"));
        }
        let top_k = config_top_k.unwrap_or(st.top_k);
        if groups.reachable(e - remove) < top_k {
            let least = top_k.div_ceil(groups.top) * groups.n;
            let what = if groups.n > 1 {
                format!(", {} per group in the {} of {} groups a token's router picks,", (e - remove) / groups.n, groups.top, groups.n)
            } else {
                String::new()
            };
            return Err(Error::arg_hint(
                format!("keeping {} experts of {moe}{what} is fewer than the {top_k} each token is routed to", e - remove),
                format!("keep at least {least} (remove at most {})", e - least),
            ));
        }
        let saliency = opts.method.saliency(st);
        let map = renumbering(e, &groups.lowest(&saliency, remove, moe)?);
        let kept: Vec<usize> = (0..e).filter(|&j| map[j].is_some()).collect();
        if !run.ckpt.tensors().any(|(_, t)| t.name.starts_with(&format!("{moe}.experts."))) {
            return Err(Error::arg_hint(
                format!("no tensors {moe}.experts.* in the checkpoint: an MoE layout llmprune does not know"),
                "supported: one module per expert (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3) or fused [experts, ...] tensors (gpt-oss)",
            ));
        }
        layers.push(LayerResult { layer: moe.clone(), kept, saliency });
        plans.insert(moe.clone(), map);
    }
    let e_after = layers[0].kept.len();
    // every tensor's fate is known before anything is written
    let mut fates: BTreeMap<String, Fate> = BTreeMap::new();
    for (_, t) in run.ckpt.tensors() {
        fates.insert(t.name.clone(), fate(&t.name, &t.shape, &plans)?);
    }
    config.insert(key.into(), e_after.into());
    let kept_ids: serde_json::Map<String, Value> = layers.iter().map(|l| (l.layer.clone(), Value::from(l.kept.clone()))).collect();
    let mut prov = serde_json::Map::new();
    prov.insert("method".into(), opts.method.name().into());
    prov.insert("experts_before".into(), e_cfg.into());
    prov.insert("kept_experts".into(), Value::Object(kept_ids));
    llmprune_record(&mut config).insert("experts".into(), Value::Object(prov.clone()));
    if sc.sequential().is_some() {
        run.warnings.push("the expert statistics were taken in sequential mode, on a pruned model".into());
    }
    let params_before: u64 = run.ckpt.tensors().map(|(_, t)| t.numel() as u64).sum();
    let staging = run.stage(&opts.out_dir, opts.force)?;
    let run = run;
    let provenance = run.provenance(prov, &opts.provenance);
    let verify = |shapes: &remap::WrittenShapes| check_experts_written(shapes, &modules, key, e_after);
    let Written { out, bytes_written, params_after } = remap::write(&run, staging, progress, &provenance, &fates, config, &verify)?;
    Ok(ExpertSummary {
        out: out.display().to_string(),
        method: opts.method.name().into(),
        experts_before: e_cfg,
        experts_after: e_after,
        layers,
        params_before,
        params_after,
        bytes_before: run.ckpt.total_bytes(),
        bytes_written,
        shards: run.ckpt.shards.len(),
        seconds: run.seconds(),
        stats: run.stats_path(),
        warnings: run.warnings.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_most_salient() {
        let kept =
            |s: &[f64], n| renumbering(s.len(), &lowest(s, n)).iter().enumerate().filter(|(_, m)| m.is_some()).map(|(j, _)| j).collect::<Vec<_>>();
        assert_eq!(kept(&[0.3, 0.1, 0.5, 0.1], 2), vec![0, 2]);
        assert_eq!(kept(&[1.0, 1.0, 1.0], 1), vec![1, 2]);
    }

    #[test]
    fn grouped_routers_lose_the_same_number_from_every_group() {
        let config = |n: u64, top: u64| serde_json::json!({"n_group": n, "topk_group": top}).as_object().unwrap().clone();
        let g = RouterGroups::of(&config(2, 1), 8).unwrap();
        assert_eq!(g, RouterGroups { n: 2, size: 4, top: 1 });
        // group 0 = experts 0-3, group 1 = 4-7; globally the two lowest would both be in group 1
        let sal = [0.5, 0.4, 0.9, 0.8, 0.1, 0.2, 0.7, 0.6];
        assert_eq!(g.lowest(&sal, 2, "m").unwrap(), vec![1, 4]);
        assert_eq!(g.lowest(&sal, 4, "m").unwrap(), vec![0, 1, 4, 5]);
        assert!(g.lowest(&sal, 6, "m").unwrap_err().to_string().contains("two best"));
        assert_eq!(g.reachable(6), 3);
        assert!(RouterGroups::of(&config(3, 1), 8).is_err());
        let plain = RouterGroups::of(&serde_json::Map::new(), 8).unwrap();
        assert_eq!(plain.lowest(&sal, 2, "m").unwrap(), vec![4, 5]);
        assert_eq!(plain.reachable(5), 5);
    }

    #[test]
    fn moe_modules_leave_shared_experts_out() {
        let names =
            ["m.layers.0.mlp.experts.0.w1.weight", "m.layers.0.mlp.shared_experts.up_proj.weight", "m.layers.1.mlp.experts.gate_up_proj", "m.norm"];
        let m = moe_modules(names.into_iter());
        assert_eq!(m.into_iter().collect::<Vec<_>>(), vec!["m.layers.0.mlp".to_string(), "m.layers.1.mlp".to_string()]);
    }

    #[test]
    fn experts_written_must_be_those_the_config_says() {
        let modules: std::collections::BTreeSet<String> = ["a.mlp".to_string(), "b.mlp".to_string()].into();
        let mut shapes: remap::WrittenShapes = BTreeMap::new();
        for j in 0..2 {
            shapes.insert(format!("a.mlp.experts.{j}.w1.weight"), vec![4, 2]);
        }
        shapes.insert("a.mlp.gate.weight".into(), vec![2, 4]);
        shapes.insert("b.mlp.experts.gate_up_proj".into(), vec![2, 4, 8]);
        shapes.insert("b.mlp.router.weight".into(), vec![2, 4]);
        shapes.insert("b.mlp.shared_experts.w.weight".into(), vec![9, 4]);
        assert!(check_experts_written(&shapes, &modules, "num_experts", 2).is_ok());
        // a layer left with 4 experts while config.json says 2
        for j in 2..4 {
            shapes.insert(format!("a.mlp.experts.{j}.w1.weight"), vec![4, 2]);
        }
        let e = check_experts_written(&shapes, &modules, "num_experts", 2).unwrap_err().to_string();
        assert!(e.contains("a.mlp") && e.contains("4 experts"), "{e}");
        shapes.retain(|k, _| !k.starts_with("a.mlp.experts.2") && !k.starts_with("a.mlp.experts.3"));
        shapes.insert("b.mlp.router.weight".into(), vec![3, 4]);
        let e = check_experts_written(&shapes, &modules, "num_experts", 2).unwrap_err().to_string();
        assert!(e.contains("b.mlp.router.weight") && e.contains("3 rows"), "{e}");
        shapes.insert("b.mlp.router.weight".into(), vec![2, 4]);
        shapes.remove("a.mlp.experts.0.w1.weight");
        assert!(check_experts_written(&shapes, &modules, "num_experts", 2).unwrap_err().to_string().contains("numbered"));
    }

    #[test]
    fn saliency_of_unrouted_expert_is_zero() {
        let e = ExpertStats { count: vec![0, 4], gate_sum: vec![0.0, 2.0], reap_sum: vec![0.0, 6.0], top_k: 1 };
        assert_eq!(ExpertMethod::Reap.saliency(&e), vec![0.0, 1.5]);
        assert_eq!(ExpertMethod::Frequency.saliency(&e), vec![0.0, 4.0]);
    }

    #[test]
    fn fates_of_per_expert_fused_and_router_tensors() {
        // 4 experts, 1 and 3 removed: 0 → 0, 2 → 1
        let plans = BTreeMap::from([("m.layers.0.mlp".to_string(), vec![Some(0), None, Some(1), None])]);
        let f = |name: &str, shape: &[usize]| fate(name, shape, &plans);
        assert!(matches!(f("m.layers.0.mlp.experts.2.w1.weight", &[8, 4]).unwrap(), Fate::Copy(n) if n == "m.layers.0.mlp.experts.1.w1.weight"));
        assert!(matches!(f("m.layers.0.mlp.experts.3.w1.weight", &[8, 4]).unwrap(), Fate::Drop));
        assert!(f("m.layers.0.mlp.experts.7.w1.weight", &[8, 4]).is_err());
        for name in ["m.layers.0.mlp.experts.gate_up_proj_blocks", "m.layers.0.mlp.router.bias", "m.layers.0.mlp.gate.e_score_correction_bias"] {
            assert!(matches!(f(name, &[4, 2, 3]).unwrap(), Fate::Rows(n, rows) if n == name && rows == vec![0, 2]), "{name}");
        }
        assert!(f("m.layers.0.mlp.experts.gate_up_proj", &[5, 2, 3]).unwrap_err().to_string().contains("one per expert"));
        assert!(f("m.layers.0.mlp.gate.weight", &[3, 8]).is_err());
        // shared experts and other tensors are copied
        assert!(matches!(f("m.layers.0.mlp.shared_experts.up_proj.weight", &[8, 4]).unwrap(), Fate::Copy(_)));
        assert!(matches!(f("m.layers.1.mlp.experts.0.w1.weight", &[8, 4]).unwrap(), Fate::Copy(_)));
    }
}
