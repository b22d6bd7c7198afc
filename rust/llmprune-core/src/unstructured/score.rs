//! Scoring methods: each turns a weight and its layer's activation statistics into per-entry scores
//! score = |w| * factor[input channel] (factor = 1 for magnitude).

use std::str::FromStr;

use crate::error::{Error, Result};
use crate::sidecar::LayerStats;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Magnitude,
    Wanda,
    Stade,
    StadeW,
    /// Chooses its mask inside the SparseGPT sweep (`unstructured::sparsegpt`).
    SparseGpt,
}

impl Method {
    pub const ALL: [Method; 5] = [Method::Magnitude, Method::Wanda, Method::Stade, Method::StadeW, Method::SparseGpt];

    pub fn name(self) -> &'static str {
        match self {
            Method::Magnitude => "magnitude",
            Method::Wanda => "wanda",
            Method::Stade => "stade",
            Method::StadeW => "stade-w",
            Method::SparseGpt => "sparsegpt",
        }
    }

    /// Activation statistics (the stats sidecar).
    pub fn needs_stats(self) -> bool {
        !matches!(self, Method::Magnitude | Method::SparseGpt)
    }

    /// Input Gram matrices (the Gram sidecar).
    pub fn needs_gram(self) -> bool {
        self == Method::SparseGpt
    }
}

impl FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Method> {
        match s {
            "magnitude" => Ok(Method::Magnitude),
            "wanda" => Ok(Method::Wanda),
            "stade" => Ok(Method::Stade),
            "stade-w" => Ok(Method::StadeW),
            "sparsegpt" => Ok(Method::SparseGpt),
            other => Err(Error::arg(format!("unknown method {other:?}; expected magnitude, wanda, stade, stade-w or sparsegpt"))),
        }
    }
}

/// Layers fed by the attention output or the MLP hidden state, where STADE-W uses STADE.
pub fn is_output_projection(name: &str) -> bool {
    let module = name.strip_suffix(".weight").unwrap_or(name);
    let last = module.rsplit('.').next().unwrap_or(module);
    matches!(last, "o_proj" | "down_proj" | "out_proj" | "fc2" | "c_proj" | "dense_4h_to_h" | "w2")
}

/// Wanda's factor: f32(sqrt(sqsum / n)), i.e. the activation norm up to a constant.
pub fn wanda_factors(s: &LayerStats) -> Vec<f32> {
    let n = s.count as f64;
    s.act_sqsum.iter().map(|&q| (q / n).sqrt() as f32).collect()
}

/// STADE's factor: the unbiased standard deviation, f32(sqrt((sqsum - n mu^2) / (n - 1))).
/// Rounding can make a constant channel's variance slightly negative; it is clamped to 0.
pub fn stade_factors(s: &LayerStats) -> Vec<f32> {
    s.variances().into_iter().map(|v| v.sqrt() as f32).collect()
}

/// The per-input-channel factor for `name` under `method`; None means plain magnitude.
pub fn channel_factors(method: Method, name: &str, stats: Option<&LayerStats>) -> Result<Option<Vec<f32>>> {
    if !method.needs_stats() {
        return Ok(None);
    }
    let stats = stats.ok_or_else(|| Error::arg(format!("method {} needs activation statistics for {name}", method.name())))?;
    let min_count = if method == Method::Wanda { 1 } else { 2 };
    if stats.count < min_count {
        return Err(Error::arg(format!("statistics for {name} cover {} tokens; {} needs at least {min_count}", stats.count, method.name())));
    }
    let use_stade = match method {
        Method::Stade => true,
        Method::StadeW => is_output_projection(name),
        _ => false,
    };
    Ok(Some(if use_stade { stade_factors(stats) } else { wanda_factors(stats) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(sum: Vec<f64>, sqsum: Vec<f64>, count: i64) -> LayerStats {
        LayerStats { act_sum: sum, act_sqsum: sqsum, count, input_axis: 1 }
    }

    #[test]
    fn wanda_is_rms_of_inputs() {
        // inputs x0 = [1, -3], x1 = [2, 2] over two tokens
        let s = stats(vec![-2.0, 4.0], vec![10.0, 8.0], 2);
        assert_eq!(wanda_factors(&s), vec![(5.0f64).sqrt() as f32, 2.0]);
    }

    #[test]
    fn stade_is_unbiased_std() {
        // channel 0 values [1, 2, 3]: mean 2, unbiased var 1; channel 1 constant 5: var 0
        let s = stats(vec![6.0, 15.0], vec![14.0, 75.0], 3);
        assert_eq!(stade_factors(&s), vec![1.0, 0.0]);
    }

    #[test]
    fn stade_w_routes_by_layer() {
        let s = stats(vec![6.0], vec![14.0], 3);
        let o = channel_factors(Method::StadeW, "model.layers.0.self_attn.o_proj.weight", Some(&s)).unwrap();
        let q = channel_factors(Method::StadeW, "model.layers.0.self_attn.q_proj.weight", Some(&s)).unwrap();
        assert_eq!(o, Some(stade_factors(&s)));
        assert_eq!(q, Some(wanda_factors(&s)));
        assert!(is_output_projection("model.decoder.layers.3.fc2.weight"));
        assert!(!is_output_projection("model.layers.0.mlp.up_proj.weight"));
    }

    #[test]
    fn methods_need_stats_and_enough_tokens() {
        assert!(channel_factors(Method::Wanda, "w", None).is_err());
        let one = stats(vec![1.0], vec![1.0], 1);
        assert!(channel_factors(Method::Stade, "w", Some(&one)).is_err());
        assert!(channel_factors(Method::Wanda, "w", Some(&one)).is_ok());
        assert_eq!(channel_factors(Method::Magnitude, "w", None).unwrap(), None);
        assert_eq!("sparsegpt".parse::<Method>().unwrap(), Method::SparseGpt);
        assert!("sparse-gpt".parse::<Method>().is_err());
        assert_eq!(channel_factors(Method::SparseGpt, "w", None).unwrap(), None);
    }
}
