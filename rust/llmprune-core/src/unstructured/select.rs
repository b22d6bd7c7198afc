//! Selection: which entries of a scored group are pruned.
//!
//! Semantics (docs and tests rely on them bit for bit): in each group prune the k smallest scores;
//! equal scores are pruned lower index first, exactly as a stable ascending sort would. Scores are
//! non-negative, so their f32 bit patterns order like the values; packing `bits << 32 | index` into
//! a u64 makes every key distinct and turns the tie rule into plain integer order, which lets an
//! O(n) `select_nth_unstable` replace the sort.

use rayon::prelude::*;

use crate::error::{Error, Result};

/// How much to prune.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target {
    /// Fraction in [0, 1) of each group.
    Sparsity(f64),
    /// In every run of `m` consecutive input columns of a row, prune `n`.
    Pattern { n: usize, m: usize },
}

/// Comparison group for unstructured sparsity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Row,
    Layer,
}

impl Target {
    /// The M of an N:M pattern (the group every mask change must stay inside), None for a sparsity.
    pub fn group(&self) -> Option<usize> {
        match *self {
            Target::Pattern { m, .. } => Some(m),
            Target::Sparsity(_) => None,
        }
    }

    pub fn validate(&self, scope: Scope) -> Result<()> {
        match *self {
            Target::Sparsity(s) if !(0.0..1.0).contains(&s) => Err(Error::arg(format!("sparsity must be in [0, 1), got {s}"))),
            Target::Pattern { n, m } if n == 0 || n >= m => Err(Error::arg(format!("N:M pattern needs 0 < N < M, got {n}:{m}"))),
            Target::Pattern { .. } if scope == Scope::Layer => {
                Err(Error::arg("--scope layer applies to unstructured sparsity, not to an N:M pattern"))
            }
            _ => Ok(()),
        }
    }

    /// Human-readable form used in provenance and default output names.
    pub fn describe(&self) -> String {
        match *self {
            Target::Sparsity(s) => format!("{s}"),
            Target::Pattern { n, m } => format!("{n}:{m}"),
        }
    }

    /// Number of entries pruned in a group of `size` (unstructured): floor(size * s).
    pub fn count(s: f64, size: usize) -> usize {
        ((size as f64 * s).floor() as usize).min(size)
    }
}

#[inline]
fn key(score: f32, index: usize) -> u64 {
    ((score.to_bits() as u64) << 32) | index as u64
}

#[inline]
fn score(w: f32, factor: Option<f32>) -> f32 {
    match factor {
        Some(f) => w.abs() * f,
        None => w.abs(),
    }
}

/// Reusable per-thread buffers.
#[derive(Default)]
pub struct Scratch {
    pub weights: Vec<f32>,
    keys: Vec<u64>,
    pub pruned: Vec<u32>,
}

/// Appends to `scratch.pruned` the columns of one row to prune (row scope or N:M).
/// `w` is the row as f32; `factors` the per-input-channel factor (None = magnitude).
pub fn prune_row(w: &[f32], factors: Option<&[f32]>, target: Target, scratch: &mut Scratch) {
    scratch.pruned.clear();
    match target {
        Target::Sparsity(s) => {
            let k = Target::count(s, w.len());
            if k == 0 {
                return;
            }
            let keys = &mut scratch.keys;
            keys.clear();
            match factors {
                Some(f) => keys.extend(w.iter().zip(f).enumerate().map(|(j, (&x, &f))| key(score(x, Some(f)), j))),
                None => keys.extend(w.iter().enumerate().map(|(j, &x)| key(x.abs(), j))),
            }
            if k < keys.len() {
                keys.select_nth_unstable(k - 1);
            }
            scratch.pruned.extend(keys[..k].iter().map(|&kk| kk as u32));
        }
        Target::Pattern { n, m } => prune_row_n_m(w, factors, n, m, &mut scratch.pruned),
    }
}

/// Scores of one row into `out`: |w| * factor (f32), or |w| for magnitude.
pub fn row_scores(w: &[f32], factors: Option<&[f32]>, out: &mut Vec<f32>) {
    out.clear();
    match factors {
        Some(f) => out.extend(w.iter().zip(f).map(|(&x, &f)| x.abs() * f)),
        None => out.extend(w.iter().map(|x| x.abs())),
    }
}

/// Rank of each entry of every run under (score, index) order, counted with branch-free
/// comparisons; entries ranked below `n` are pruned. `M` is a compile-time run length so the
/// double loop unrolls fully and the dispatch on M happens once per row.
fn n_m_fixed<const M: usize>(scores: &[f32], n: usize, flags: &mut [u8]) {
    for (run, f) in scores.chunks_exact(M).zip(flags.chunks_exact_mut(M)) {
        let b: [u32; M] = std::array::from_fn(|i| run[i].to_bits());
        let f: &mut [u8; M] = f.try_into().expect("run of M");
        for i in 0..M {
            let mut rank = 0usize;
            for j in 0..M {
                // j before i wins ties (lower index is pruned first)
                rank += if j < i { (b[j] <= b[i]) as usize } else { (b[j] < b[i]) as usize };
            }
            f[i] = KEEP * (rank >= n) as u8;
        }
    }
}

/// General run length: stable order by (score bits, position) with an insertion sort.
fn n_m_run_general(run: &[f32], n: usize, flags: &mut [u8], order: &mut Vec<u64>) {
    order.clear();
    order.extend(run.iter().enumerate().map(|(j, s)| ((s.to_bits() as u64) << 32) | j as u64));
    order.sort_unstable();
    flags.fill(KEEP);
    for &k in &order[..n] {
        flags[k as u32 as usize] = 0;
    }
}

/// Keep-mask byte of an entry: all ones to keep it, zero to prune it. Byte masks (rather than
/// bools) let the zeroing loop be a plain AND that the compiler does not turn into a branch.
pub const KEEP: u8 = 0xff;

/// Keep masks (`KEEP` or 0) of a whole row under an N:M pattern, from its scores (non-negative f32,
/// so the bit patterns order like the values).
pub fn n_m_flags(scores: &[f32], n: usize, m: usize, flags: &mut Vec<u8>) {
    flags.clear();
    flags.resize(scores.len(), KEEP);
    match m {
        2 => n_m_fixed::<2>(scores, n, flags),
        4 => n_m_fixed::<4>(scores, n, flags),
        8 => n_m_fixed::<8>(scores, n, flags),
        16 => n_m_fixed::<16>(scores, n, flags),
        _ => {
            let mut order = Vec::new();
            for (run, f) in scores.chunks_exact(m).zip(flags.chunks_exact_mut(m)) {
                n_m_run_general(run, n, f, &mut order);
            }
        }
    }
}

fn prune_row_n_m(w: &[f32], factors: Option<&[f32]>, n: usize, m: usize, pruned: &mut Vec<u32>) {
    let mut scores = Vec::new();
    let mut flags = Vec::new();
    row_scores(w, factors, &mut scores);
    n_m_flags(&scores, n, m, &mut flags);
    pruned.extend(flags.iter().enumerate().filter(|(_, &f)| f == 0).map(|(j, _)| j as u32));
}

/// Mask (true = pruned) of a row-major [rows, cols] f32 matrix. Used for layer scope, transposed
/// storage and by the calibration pass (sequential mode), so every path shares one selection.
pub fn mask_matrix(w: &[f32], rows: usize, cols: usize, factors: Option<&[f32]>, target: Target, scope: Scope) -> Result<Vec<bool>> {
    assert_eq!(w.len(), rows * cols);
    if let Some(f) = factors {
        assert_eq!(f.len(), cols);
    }
    if let Target::Pattern { m, .. } = target {
        if !cols.is_multiple_of(m) {
            return Err(Error::arg(format!("{cols} input features are not divisible by M = {m}")));
        }
    }
    let mut mask = vec![false; w.len()];
    if cols == 0 || rows == 0 {
        return Ok(mask);
    }
    match (scope, target) {
        (Scope::Layer, Target::Sparsity(s)) => {
            if w.len() > u32::MAX as usize {
                return Err(Error::arg("layer scope supports matrices of at most 2^32 entries"));
            }
            let mut keys: Vec<u64> = w.par_iter().enumerate().map(|(i, &x)| key(score(x, factors.map(|f| f[i % cols])), i)).collect();
            let k = Target::count(s, keys.len());
            if k > 0 {
                if k < keys.len() {
                    keys.select_nth_unstable(k - 1);
                }
                for &kk in &keys[..k] {
                    mask[(kk & 0xffff_ffff) as usize] = true;
                }
            }
        }
        _ => {
            mask.par_chunks_mut(cols).zip(w.par_chunks(cols)).for_each_init(Scratch::default, |scratch, (mrow, wrow)| {
                prune_row(wrow, factors, target, scratch);
                for &j in &scratch.pruned {
                    mrow[j as usize] = true;
                }
            });
        }
    }
    Ok(mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row_mask(w: &[f32], target: Target) -> Vec<bool> {
        mask_matrix(w, 1, w.len(), None, target, Scope::Row).unwrap()
    }

    /// Straightforward reference: stable sort of (score, index), prune the first k.
    fn stable_sort_mask(scores: &[f32], k: usize) -> Vec<bool> {
        let mut idx: Vec<usize> = (0..scores.len()).collect();
        idx.sort_by(|&a, &b| scores[a].partial_cmp(&scores[b]).unwrap());
        let mut m = vec![false; scores.len()];
        for &i in &idx[..k] {
            m[i] = true;
        }
        m
    }

    #[test]
    fn ties_prune_lower_index_first() {
        let w = [1.0, -1.0, 1.0, 0.5, -1.0, 1.0];
        // k = 3: 0.5 first, then the two lowest-index 1.0s
        assert_eq!(row_mask(&w, Target::Sparsity(0.5)), vec![true, true, false, true, false, false]);
    }

    #[test]
    fn all_equal_row_prunes_prefix() {
        let w = [2.0f32; 10];
        let m = row_mask(&w, Target::Sparsity(0.7));
        assert_eq!(m, (0..10).map(|i| i < 7).collect::<Vec<_>>());
    }

    #[test]
    fn k_zero_and_all_but_one() {
        let w = [3.0, 1.0, 2.0, 5.0];
        assert_eq!(row_mask(&w, Target::Sparsity(0.0)), vec![false; 4]);
        assert_eq!(row_mask(&w, Target::Sparsity(0.2)), vec![false; 4]); // floor(0.8) = 0
        assert_eq!(row_mask(&w, Target::Sparsity(0.75)), vec![true, true, true, false]);
        assert_eq!(row_mask(&w, Target::Sparsity(0.999)), vec![true, true, true, false]);
    }

    #[test]
    fn n_m_per_run_of_inputs() {
        let w = [4.0, 1.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0];
        let m = row_mask(&w, Target::Pattern { n: 2, m: 4 });
        assert_eq!(m, vec![false, true, false, true, true, true, false, false]);
        let m = row_mask(&w, Target::Pattern { n: 1, m: 2 });
        assert_eq!(m, vec![false, true, false, true, true, false, true, false]);
    }

    #[test]
    fn n_m_needs_divisible_columns() {
        let w = [1.0f32; 6];
        assert!(mask_matrix(&w, 1, 6, None, Target::Pattern { n: 2, m: 4 }, Scope::Row).is_err());
    }

    #[test]
    fn factors_scale_columns() {
        // |w| * f: [1*4, 2*1, 3*1, 1*0] -> prune col 3 (0) and col 1 (2)
        let w = [1.0, -2.0, 3.0, 1.0];
        let f = [4.0, 1.0, 1.0, 0.0];
        let m = mask_matrix(&w, 1, 4, Some(&f), Target::Sparsity(0.5), Scope::Row).unwrap();
        assert_eq!(m, vec![false, true, false, true]);
    }

    #[test]
    fn layer_scope_is_one_group() {
        // rows [1, 2] and [3, 0.5]; 50% of the matrix -> 0.5 and 1
        let w = [1.0, 2.0, 3.0, 0.5];
        let m = mask_matrix(&w, 2, 2, None, Target::Sparsity(0.5), Scope::Layer).unwrap();
        assert_eq!(m, vec![true, false, false, true]);
        let r = mask_matrix(&w, 2, 2, None, Target::Sparsity(0.5), Scope::Row).unwrap();
        assert_eq!(r, vec![true, false, false, true]);
        let w = [1.0, 2.0, 0.1, 0.5];
        let m = mask_matrix(&w, 2, 2, None, Target::Sparsity(0.5), Scope::Layer).unwrap();
        assert_eq!(m, vec![false, false, true, true]);
    }

    #[test]
    fn validation() {
        assert!(Target::Sparsity(1.0).validate(Scope::Row).is_err());
        assert!(Target::Sparsity(-0.1).validate(Scope::Row).is_err());
        assert!(Target::Sparsity(f64::NAN).validate(Scope::Row).is_err());
        assert!(Target::Pattern { n: 4, m: 4 }.validate(Scope::Row).is_err());
        assert!(Target::Pattern { n: 0, m: 4 }.validate(Scope::Row).is_err());
        assert!(Target::Pattern { n: 2, m: 4 }.validate(Scope::Layer).is_err());
        assert!(Target::Pattern { n: 2, m: 4 }.validate(Scope::Row).is_ok());
    }

    proptest::proptest! {
        /// N:M (rank path for m <= 8, sort path above) equals a stable sort within every run.
        #[test]
        fn n_m_matches_stable_sort(vals in proptest::collection::vec(0u8..4, 48), nm in proptest::sample::select(vec![(1usize, 2usize), (2, 4), (4, 8), (3, 8), (5, 16), (7, 12)])) {
            let (n, m) = nm;
            let w: Vec<f32> = vals.iter().map(|&v| v as f32 - 1.5).collect();
            let got = row_mask(&w, Target::Pattern { n, m });
            let mut want = Vec::new();
            for chunk in w.chunks(m) {
                let scores: Vec<f32> = chunk.iter().map(|x| x.abs()).collect();
                want.extend(stable_sort_mask(&scores, n));
            }
            proptest::prop_assert_eq!(got, want);
        }

        /// select_nth on packed keys prunes exactly what a stable sort prunes, ties included.
        #[test]
        fn matches_stable_sort(vals in proptest::collection::vec(0u8..6, 1..200), s in 0.0f64..0.999) {
            let w: Vec<f32> = vals.iter().map(|&v| v as f32 * 0.5 - 1.0).collect();
            let scores: Vec<f32> = w.iter().map(|x| x.abs()).collect();
            let k = Target::count(s, w.len());
            proptest::prop_assert_eq!(row_mask(&w, Target::Sparsity(s)), stable_sort_mask(&scores, k));
        }
    }
}
