//! The settings of a `stats --sequential` pass, recorded as the `sequential` object of a stats or
//! Gram sidecar's metadata (docs/sidecar.md). The core writes them (`SequentialSettings::to_value`,
//! through the binding's `sequential_settings`) and reads them back (`SequentialSettings::of`) to
//! compare with an `apply` run's settings.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::unstructured::allocation::Allocation;
use crate::unstructured::dsnot::DsnotOptions;
use crate::unstructured::score::Method;
use crate::unstructured::select::{Scope, Target};

/// The sequential pass's method, target and refinements, in the order and with the keys the
/// metadata records: a key is left out where its setting is off (`update`, `compensate`, a uniform
/// allocation, no refinement).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SequentialSettings {
    pub method: String,
    /// `N:M`, when pruned to a pattern.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparsity: Option<f64>,
    /// Each block's kept weights were updated by the SparseGPT sweep (`--update`, or sparsegpt).
    #[serde(default, skip_serializing_if = "is_false")]
    pub update: bool,
    /// `uniform`, `owl` or `schedule`.
    #[serde(default = "uniform", skip_serializing_if = "is_uniform")]
    pub allocation: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owl_m: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owl_lambda: Option<f64>,
    /// The sparsity each block was pruned at (OWL or a schedule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_sparsity: Option<Vec<f64>>,
    /// `dsnot` when masks were refined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refine: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dsnot: Option<DsnotSettings>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub compensate: bool,
}

/// DSnoT's settings as provenance and sequential metadata record them (`same_sign` only when set).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DsnotSettings {
    pub iters: usize,
    pub threshold: f64,
    pub skip: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub same_sign: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn uniform() -> String {
    "uniform".into()
}

fn is_uniform(a: &str) -> bool {
    a == "uniform"
}

impl From<&DsnotOptions> for DsnotSettings {
    fn from(o: &DsnotOptions) -> Self {
        DsnotSettings { iters: o.iters, threshold: o.threshold, skip: o.skip.name().into(), same_sign: o.same_sign }
    }
}

impl DsnotSettings {
    /// As a JSON value (for provenance and the method registry).
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).expect("plain fields serialize")
    }
}

impl SequentialSettings {
    /// The settings of a sequential pass, validated as `apply` validates its own: the method, one
    /// of `sparsity` or `pattern`, `allocation` (uniform, owl or schedule) with the blocks' sparsities for owl and schedule, and DSnoT's options.
    /// `update` is recorded for method sparsegpt too, which always updates.
    pub fn new(
        method: Method,
        target: Target,
        update: bool,
        allocation: &Allocation,
        block_sparsity: Option<Vec<f64>>,
        refine: Option<&DsnotOptions>,
        compensate: bool,
    ) -> Result<SequentialSettings> {
        target.validate(Scope::Row)?;
        allocation.validate(target)?;
        if let Some(r) = refine {
            r.validate()?;
        }
        let (owl_m, owl_lambda) = match allocation {
            Allocation::Owl { m, lambda } => (Some(*m), Some(*lambda)),
            _ => (None, None),
        };
        let block_sparsity = match (allocation, block_sparsity) {
            (Allocation::Uniform, None) => None,
            (Allocation::Uniform, Some(_)) => return Err(Error::arg("block sparsities go with an owl or schedule allocation")),
            (Allocation::Schedule(v), None) => Some(v.clone()),
            (Allocation::Schedule(v), Some(b)) if *v != b => return Err(Error::arg("a schedule allocation records its own block sparsities")),
            (_, Some(b)) => Some(b),
            (Allocation::Owl { .. }, None) => return Err(Error::arg("an owl allocation records the block sparsities it chose")),
        };
        Ok(SequentialSettings {
            method: method.name().into(),
            pattern: match target {
                Target::Pattern { n, m } => Some(format!("{n}:{m}")),
                Target::Sparsity(_) => None,
            },
            sparsity: match target {
                Target::Sparsity(s) => Some(s),
                Target::Pattern { .. } => None,
            },
            update: update || method.needs_gram(),
            allocation: allocation.name().into(),
            owl_m,
            owl_lambda,
            block_sparsity,
            refine: refine.map(|_| "dsnot".into()),
            dsnot: refine.map(DsnotSettings::from),
            compensate,
        })
    }

    /// The recorded settings of a stats or Gram sidecar's metadata, when it was taken in sequential
    /// mode; an error names what cannot be read.
    pub fn of(meta: &serde_json::Map<String, Value>) -> Option<std::result::Result<SequentialSettings, String>> {
        let record = crate::sidecar::sequential_of(meta)?;
        Some(SequentialSettings::deserialize(Value::Object(record.clone())).map_err(|e| e.to_string()))
    }

    /// The `sequential` metadata value.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).expect("plain fields serialize")
    }

    /// The target the blocks were pruned to; an error says what is wrong with the record.
    pub fn target(&self) -> std::result::Result<Target, String> {
        match (self.sparsity, &self.pattern) {
            (Some(s), _) => Ok(Target::Sparsity(s)),
            (None, Some(p)) => {
                let mut it = p.split(':').filter_map(|x| x.parse().ok());
                match (it.next(), it.next()) {
                    (Some(n), Some(m)) => Ok(Target::Pattern { n, m }),
                    _ => Err(format!("an unreadable pattern {p:?}")),
                }
            }
            (None, None) => Err("no recorded target".into()),
        }
    }

    /// Whether the blocks were allocated as `allocation` (OWL with the same M and λ, or the same
    /// schedule).
    pub fn same_allocation(&self, allocation: &Allocation) -> bool {
        match allocation {
            Allocation::Uniform => self.allocation == "uniform",
            Allocation::Owl { m, lambda } => self.allocation == "owl" && (self.owl_m, self.owl_lambda) == (Some(*m), Some(*lambda)),
            Allocation::Schedule(v) => self.allocation == "schedule" && self.block_sparsity.as_ref() == Some(v),
        }
    }

    /// Whether the masks were refined as `refine` says (or both not refined).
    pub fn same_refine(&self, refine: Option<&DsnotOptions>) -> bool {
        match refine {
            None => self.refine.is_none(),
            Some(r) => self.refine.as_deref() == Some("dsnot") && self.dsnot.as_ref() == Some(&DsnotSettings::from(r)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_the_keys_python_wrote() {
        let s = SequentialSettings::new(Method::Wanda, Target::Sparsity(0.5), false, &Allocation::Uniform, None, None, false).unwrap();
        assert_eq!(s.to_value().to_string(), r#"{"method":"wanda","sparsity":0.5}"#);
        let owl = Allocation::Owl { m: 5.0, lambda: 0.08 };
        let r = DsnotOptions { same_sign: true, ..DsnotOptions::default() };
        let s = SequentialSettings::new(Method::SparseGpt, Target::Sparsity(0.6), false, &owl, Some(vec![0.55, 0.65]), Some(&r), true).unwrap();
        assert_eq!(
            s.to_value().to_string(),
            r#"{"method":"sparsegpt","sparsity":0.6,"update":true,"allocation":"owl","owl_m":5.0,"owl_lambda":0.08,"block_sparsity":[0.55,0.65],"refine":"dsnot","dsnot":{"iters":50,"threshold":0.000048828125,"skip":"mlp","same_sign":true},"compensate":true}"#
        );
        let s = SequentialSettings::new(Method::Stade, Target::Pattern { n: 2, m: 4 }, true, &Allocation::Uniform, None, None, false).unwrap();
        assert_eq!(s.to_value().to_string(), r#"{"method":"stade","pattern":"2:4","update":true}"#);
    }

    #[test]
    fn reads_back_what_it_writes() {
        let s = SequentialSettings::new(Method::Wanda, Target::Pattern { n: 2, m: 4 }, false, &Allocation::Uniform, None, None, false).unwrap();
        let meta: serde_json::Map<String, Value> =
            serde_json::from_value(serde_json::json!({"mode": "sequential", "sequential": s.to_value()})).unwrap();
        assert_eq!(SequentialSettings::of(&meta), Some(Ok(s)));
    }

    #[test]
    fn refuses_what_apply_refuses() {
        let owl = Allocation::Owl { m: 5.0, lambda: 0.08 };
        assert!(SequentialSettings::new(Method::Wanda, Target::Sparsity(1.5), false, &Allocation::Uniform, None, None, false).is_err());
        assert!(SequentialSettings::new(Method::Wanda, Target::Pattern { n: 2, m: 4 }, false, &owl, Some(vec![0.5]), None, false).is_err());
        assert!(SequentialSettings::new(Method::Wanda, Target::Sparsity(0.5), false, &owl, None, None, false).is_err());
    }
}
