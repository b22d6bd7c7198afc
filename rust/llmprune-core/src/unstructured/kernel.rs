//! The tensor kernels of unstructured `apply`: prune one weight (row-parallel fast paths for row
//! scope and N:M, a general path for layer scope, `[in, out]` storage and DSnoT), and prune and
//! update one weight with the SparseGPT sweep on its input's Gram matrix.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::io::checkpoint::TensorEntry;
use crate::io::dtype::{decode, decode_into, encode_into, float_size};
use crate::sidecar::gram::{unpack, Gram};
use crate::unstructured::apply::ApplyOptions;
use crate::unstructured::dsnot::{self, DsnotOptions};
use crate::unstructured::score::Method;
use crate::unstructured::select::{mask_matrix, n_m_flags, prune_row, row_scores, Scope, Scratch, Target};
use crate::unstructured::sparsegpt::{factor, sparsegpt, Factor, Selection};

/// Mean and variance of a weight's input channels, for DSnoT and compensation.
pub struct Moments {
    pub mu: Vec<f64>,
    pub var: Vec<f64>,
}

/// How one weight is pruned.
pub struct Job<'a> {
    pub input_axis: usize,
    /// Per-input-channel score factor (None: magnitude).
    pub factors: Option<&'a [f32]>,
    pub target: Target,
    /// DSnoT's settings and the input channels' moments, when the mask is refined.
    pub refine: Option<(&'a DsnotOptions, &'a Moments)>,
}

impl<'a> Job<'a> {
    /// A job without refinement.
    pub fn plain(input_axis: usize, factors: Option<&'a [f32]>, target: Target) -> Job<'a> {
        Job { input_axis, factors, target, refine: None }
    }
}

/// Prunes one tensor into `out` (resized to the tensor's size) with `opts`' target and scope;
/// returns the number of entries pruned.
pub fn prune_tensor(t: &TensorEntry, data: &[u8], input_axis: usize, factors: Option<&[f32]>, opts: &ApplyOptions, out: &mut Vec<u8>) -> Result<u64> {
    prune_tensor_with(t, data, &Job::plain(input_axis, factors, opts.target), opts.scope, out).map(|r| r.0)
}

/// Prunes one tensor into `out` as `job` says; returns the entries pruned and DSnoT's swaps.
pub fn prune_tensor_with(t: &TensorEntry, data: &[u8], job: &Job, scope: Scope, out: &mut Vec<u8>) -> Result<(u64, u64)> {
    let es = float_size(t.dtype).ok_or_else(|| Error::Internal(format!("{}: dtype checked before writing", t.name)))?;
    let (input_axis, factors, target) = (job.input_axis, job.factors, job.target);
    let (rows, cols) = if input_axis == 1 { (t.shape[0], t.shape[1]) } else { (t.shape[1], t.shape[0]) };
    if rows == 0 || cols == 0 {
        out.clear();
        out.extend_from_slice(data);
        return Ok((0, 0));
    }
    if input_axis == 1 && job.refine.is_none() && (scope == Scope::Row || matches!(target, Target::Pattern { .. })) {
        // Rows are copied from the input map inside the parallel loop; the reused buffer is only
        // resized (zero-filled where it grows), never cleared and refilled on one thread.
        out.resize(data.len(), 0);
        let row_bytes = cols * es;
        if let Target::Pattern { n, m } = target {
            // N:M: zero pruned entries with a branch-free byte mask.
            out.par_chunks_mut(row_bytes).zip(data.par_chunks(row_bytes)).for_each_init(
                || (Vec::new(), Vec::new(), Vec::new()),
                |(weights, scores, flags): &mut (Vec<f32>, Vec<f32>, Vec<u8>), (row, input)| {
                    row.copy_from_slice(input);
                    weights.resize(cols, 0.0);
                    decode_into(t.dtype, row, weights);
                    row_scores(weights, factors, scores);
                    n_m_flags(scores, n, m, flags);
                    match es {
                        2 => zero_flagged::<2>(row, flags),
                        4 => zero_flagged::<4>(row, flags),
                        _ => unreachable!("supported dtypes are 2 or 4 bytes"),
                    }
                },
            );
            return Ok(((rows * (cols / m) * n) as u64, 0));
        }
        // Fused path: decode, score, select and zero one row at a time, rows in parallel.
        let counts: u64 = out
            .par_chunks_mut(row_bytes)
            .zip(data.par_chunks(row_bytes))
            .map_init(Scratch::default, |scratch, (row, input)| {
                row.copy_from_slice(input);
                scratch.weights.resize(cols, 0.0);
                decode_into(t.dtype, row, &mut scratch.weights);
                let w = std::mem::take(&mut scratch.weights);
                prune_row(&w, factors, target, scratch);
                scratch.weights = w;
                for &j in &scratch.pruned {
                    let j = j as usize;
                    row[j * es..(j + 1) * es].fill(0);
                }
                scratch.pruned.len() as u64
            })
            .sum();
        return Ok((counts, 0));
    }
    // General path (layer scope, [in, out] storage or DSnoT): mask the logical [out, in] matrix.
    out.clear();
    out.extend_from_slice(data);
    let stored = decode(t.dtype, data);
    // stored [in, out] when input_axis is 0
    let logical: Vec<f32> = if input_axis == 1 { stored } else { transpose(&stored, t.shape[0], t.shape[1]) };
    let (mask, swaps) = job.mask(&logical, rows, cols, scope)?;
    let mut count = 0u64;
    for (li, &m) in mask.iter().enumerate() {
        if m {
            let si = if input_axis == 1 { li } else { (li % cols) * rows + li / cols };
            out[si * es..(si + 1) * es].fill(0);
            count += 1;
        }
    }
    Ok((count, swaps))
}

impl Job<'_> {
    /// The mask of the logical [rows, cols] weight `w` (true = pruned), refined by DSnoT when
    /// asked; returns it with DSnoT's swaps.
    fn mask(&self, w: &[f32], rows: usize, cols: usize, scope: Scope) -> Result<(Vec<bool>, u64)> {
        let mut mask = mask_matrix(w, rows, cols, self.factors, self.target, scope)?;
        let swaps = match self.refine {
            Some((r, m)) => dsnot::refine(w, rows, cols, self.factors, &m.mu, &m.var, &mut mask, r, self.target.group()) as u64,
            None => 0,
        };
        Ok((mask, swaps))
    }
}

/// ANDs every element (of ES bytes) of `row` with its keep mask (`KEEP` or 0).
#[inline]
fn zero_flagged<const ES: usize>(row: &mut [u8], keep: &[u8]) {
    for (elem, &k) in row.chunks_exact_mut(ES).zip(keep) {
        for b in elem.iter_mut() {
            *b &= k;
        }
    }
}

/// Prunes one tensor and updates its kept weights with the SparseGPT sweep on its input's Gram
/// matrix; writes the tensor in its dtype into `out`, returns the entries pruned and DSnoT's swaps.
#[allow(clippy::too_many_arguments)]
pub(crate) fn reconstruct_tensor(
    t: &TensorEntry,
    data: &[u8],
    job: &Job,
    opts: &ApplyOptions,
    gram: &Gram,
    cached: &mut Option<(String, Factor)>,
    warnings: &mut Vec<String>,
    out: &mut Vec<u8>,
) -> Result<(u64, u64)> {
    let input_axis = job.input_axis;
    let (rows, cols) = if input_axis == 1 { (t.shape[0], t.shape[1]) } else { (t.shape[1], t.shape[0]) };
    if rows == 0 || cols == 0 {
        out.clear();
        out.extend_from_slice(data);
        return Ok((0, 0));
    }
    let stored = decode(t.dtype, data);
    let mut w: Vec<f32> = if input_axis == 1 { stored } else { transpose(&stored, t.shape[0], t.shape[1]) };
    let group = gram.group_of(&t.name).ok_or_else(|| Error::Internal(format!("{}: checked before writing", t.name)))?;
    if cached.as_ref().map(|(k, _)| k.as_str()) != Some(group.key.as_str()) {
        cached.take();
        let n = group.features;
        let f = factor(
            &t.name,
            n,
            || gram.packed(&group.key).map(|(p, _)| unpack(&p, n)),
            opts.sparsegpt.damp,
            crate::unstructured::sparsegpt::current_par(),
        )?;
        warnings.extend(f.warnings.iter().cloned());
        *cached = Some((group.key.clone(), f));
    }
    let f = &cached.as_ref().expect("just set").1;
    let (fixed, swaps);
    let sel = if opts.method == Method::SparseGpt {
        swaps = 0;
        Selection::Target(job.target)
    } else {
        (fixed, swaps) = job.mask(&w, rows, cols, opts.scope)?;
        Selection::Fixed(&fixed)
    };
    let mask = sparsegpt(&mut w, rows, cols, f, sel, opts.sparsegpt, crate::unstructured::sparsegpt::current_par())?;
    let stored = if input_axis == 1 { w } else { transpose(&w, rows, cols) };
    encode_into(t.dtype, &stored, out);
    // the pruned count is what was written: the mask, and the kept weights the update zeroed (the
    // columns of inputs that never fired, and values rounded to zero), but not weights that were
    // zero in the input already and stayed
    let masked = |si: usize| if input_axis == 1 { mask[si] } else { mask[(si % rows) * cols + si / rows] };
    let extra = zeroed_beyond(t.dtype, data, out, masked);
    Ok((mask.iter().filter(|&&m| m).count() as u64 + extra, swaps))
}

/// The entries of `written` that are zero where `input` was not and `masked` (by stored index)
/// says the mask did not select them.
pub(crate) fn zeroed_beyond(dtype: safetensors::Dtype, input: &[u8], written: &[u8], masked: impl Fn(usize) -> bool + Sync) -> u64 {
    let Some(es) = float_size(dtype) else { return 0 };
    let magnitude: u32 = if es == 2 { 0x7fff } else { 0x7fff_ffff };
    let bits = |c: &[u8]| if es == 2 { u16::from_le_bytes([c[0], c[1]]) as u32 } else { u32::from_le_bytes([c[0], c[1], c[2], c[3]]) };
    input
        .par_chunks_exact(es)
        .zip(written.par_chunks_exact(es))
        .enumerate()
        .filter(|(i, (a, b))| bits(b) & magnitude == 0 && bits(a) & magnitude != 0 && !masked(*i))
        .count() as u64
}

/// The transpose of a row-major [r, c] matrix.
fn transpose(m: &[f32], r: usize, c: usize) -> Vec<f32> {
    let mut tr = vec![0f32; r * c];
    tr.par_chunks_mut(r).enumerate().for_each(|(o, dst)| {
        for (i, d) in dst.iter_mut().enumerate() {
            *d = m[i * c + o];
        }
    });
    tr
}
