//! SparseGPT (Frantar & Alistarh, 2023): prune a weight column by column and update the columns not
//! yet visited so that the layer's output on the calibration inputs changes as little as possible,
//! using the inverse of the input Gram matrix H = Σ x xᵀ.
//!
//! Semantics (tests/support/sparsegpt_reference.py transcribes them in numpy):
//! 1. Dead inputs (H_jj = 0): H_jj = 1 and column j of W is zeroed.
//! 2. Damping: H += damp · mean(diag H) · I. A matrix that is still not positive definite gets ten
//!    times the damping, up to four times, with a warning; then the weight is refused.
//! 3. U = the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU), computed without forming H⁻¹: with J the
//!    reversal, if J H J = K Kᵀ (lower Cholesky) then U = J K⁻¹ J.
//! 4. Columns in blocks of `blocksize`. Unstructured: at the start of a block, the k = ⌊rows·count·s⌋
//!    entries with the smallest w²/U_jj² over the whole block are pruned, ties lower flat index first
//!    (the official code prunes every entry ≤ the k-th smallest value, one more plus ties). N:M: at
//!    every M-th column of the sweep, in each row, the N smallest w²/U_jj² of the next M columns (as
//!    updated so far), ties lower index first. A fixed mask (`--update`) is used as given.
//! 5. Per column j: q = w with pruned entries zeroed, e = (w − q)/U_jj, the block's later columns
//!    −= e·U[j, later]; after the block, the columns right of it −= E·U[block, right] (one GEMM).
//!
//! Linear algebra (Cholesky, triangular inverse, matrix products) is faer's; all of it in f32, as
//! the official code does on the GPU. Rows are independent given the mask: the sweep inside a block
//! runs rows in parallel on llmprune's pool.

use faer::linalg::cholesky::llt::factor::{cholesky_in_place, cholesky_in_place_scratch, LltRegularization};
use faer::linalg::triangular_inverse::invert_lower_triangular;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::unstructured::select::{mask_matrix, Scope, Target};

#[derive(Clone, Copy, Debug)]
pub struct SparseGptOptions {
    /// Fraction of the mean diagonal added to H's diagonal.
    pub damp: f64,
    /// Columns per lazy update block.
    pub blocksize: usize,
}

impl Default for SparseGptOptions {
    fn default() -> Self {
        SparseGptOptions { damp: 0.01, blocksize: 128 }
    }
}

/// The largest `--damp` accepted: the damping is `damp` times the mean of the Gram diagonal, so
/// beyond this it outweighs the statistics, and the update degenerates to a no-op (or, in f32, to
/// an overflow that zeroes the weights).
pub const MAX_DAMP: f64 = 10.0;

/// Refuses a `--damp` that is not a positive number of at most `MAX_DAMP`.
pub fn check_damp(damp: f64) -> Result<()> {
    if !(damp.is_finite() && damp > 0.0) {
        return Err(Error::arg_hint(
            format!("--damp must be a positive number, got {damp}"),
            "the damping is a fraction of the Gram diagonal's mean; the default is 0.01",
        ));
    }
    if damp > MAX_DAMP {
        return Err(Error::arg_hint(
            format!(
                "--damp {damp} is too large: damping {damp} times the Gram diagonal's mean would outweigh the statistics and make the update a no-op"
            ),
            format!("pass a --damp in (0, {MAX_DAMP}]; the default is 0.01, and 0.1 helps an ill-conditioned matrix"),
        ));
    }
    Ok(())
}

impl SparseGptOptions {
    pub fn validate(&self) -> Result<()> {
        check_damp(self.damp)?;
        if self.blocksize == 0 {
            return Err(Error::arg("--blocksize must be at least 1"));
        }
        Ok(())
    }
}

/// Which entries go: chosen by the sweep (a sparsity or an N:M pattern), or given (`--update`).
#[derive(Clone, Copy, Debug)]
pub enum Selection<'a> {
    Target(Target),
    Fixed(&'a [bool]),
}

/// The upper Cholesky factor of H⁻¹ (row-major n×n, upper triangle meaningful), with the dead
/// inputs. `h` gives H (row-major, symmetric) afresh for every damping tried.
pub struct Factor {
    pub u: Vec<f32>,
    pub n: usize,
    pub dead: Vec<bool>,
    pub warnings: Vec<String>,
}

pub fn factor(name: &str, n: usize, mut h: impl FnMut() -> Result<Vec<f32>>, damp: f64, par: Par) -> Result<Factor> {
    let mut warnings = Vec::new();
    let mut damp = damp;
    for attempt in 0..5 {
        let mut m = h()?;
        let mut dead = vec![false; n];
        let mut mean = 0f64;
        for j in 0..n {
            let d = &mut m[j * n + j];
            if *d == 0.0 {
                *d = 1.0;
                dead[j] = true;
            }
            mean += *d as f64;
        }
        mean /= n.max(1) as f64;
        let add = (damp * mean) as f32;
        for j in 0..n {
            m[j * n + j] += add;
        }
        // J H J is H's flat buffer reversed; every view below is column-major with positive strides
        m.reverse();
        let mut mem = faer::dyn_stack::MemBuffer::new(cholesky_in_place_scratch::<f32>(n, par, Default::default()));
        let stack = faer::dyn_stack::MemStack::new(&mut mem);
        match cholesky_in_place(MatMut::from_column_major_slice_mut(&mut m, n, n), LltRegularization::default(), par, stack, Default::default()) {
            Ok(_) => {
                let mut u = vec![0f32; n * n];
                invert_lower_triangular(MatMut::from_column_major_slice_mut(&mut u, n, n), MatRef::from_column_major_slice(&m, n, n), par);
                drop(m);
                // U = J K⁻¹ J: reverse the flat buffer (column-major U), then transpose in place
                u.reverse();
                for i in 0..n {
                    for j in i + 1..n {
                        u.swap(i * n + j, j * n + i);
                    }
                }
                for i in 0..n {
                    u[i * n..i * n + i].fill(0.0);
                }
                if let Some(bad) = (0..n).find(|&i| !(u[i * n + i].is_finite() && u[i * n + i] > 0.0)) {
                    if attempt < 4 {
                        warnings.push(format!(
                            "{name}: the damped Gram matrix is numerically singular at input {bad}; damping {:.0e} → {:.0e}",
                            damp,
                            damp * 10.0
                        ));
                        damp *= 10.0;
                        continue;
                    }
                }
                return Ok(Factor { u, n, dead, warnings });
            }
            Err(_) if attempt < 4 => {
                warnings.push(format!("{name}: the damped Gram matrix is not positive definite; damping {:.0e} → {:.0e}", damp, damp * 10.0));
                damp *= 10.0;
            }
            Err(_) => break,
        }
    }
    Err(Error::arg_hint(
        format!("{name}: the Gram matrix of its input is not positive definite even with damping {damp:.0e}"),
        "pass a larger --damp (e.g. 0.1), or recompute the Gram matrices with `llmprune stats MODEL --gram`",
    ))
}

/// Prunes (and updates) the row-major [rows, cols] weight `w` in place with the factor of its
/// input's Gram matrix; returns the mask (true = pruned). Runs on the current rayon pool.
pub fn sparsegpt(w: &mut [f32], rows: usize, cols: usize, f: &Factor, sel: Selection, opts: SparseGptOptions, par: Par) -> Result<Vec<bool>> {
    if f.n != cols || w.len() != rows * cols {
        return Err(Error::Internal(format!("sparsegpt: weight [{rows}, {cols}] against a {}-wide Gram matrix", f.n)));
    }
    let mut bs = opts.blocksize.min(cols.max(1));
    if let Selection::Target(Target::Pattern { m, .. }) = sel {
        if !cols.is_multiple_of(m) {
            return Err(Error::arg(format!("{cols} input features are not divisible by M = {m} of the N:M pattern")));
        }
        bs = bs.div_ceil(m) * m; // blocks start on group boundaries
    }
    if let Selection::Fixed(mask) = sel {
        if mask.len() != w.len() {
            return Err(Error::Internal("sparsegpt: mask and weight sizes differ".into()));
        }
    }
    for (j, &d) in f.dead.iter().enumerate() {
        if d {
            for r in 0..rows {
                w[r * cols + j] = 0.0;
            }
        }
    }
    let u = &f.u;
    let mut mask = vec![false; rows * cols];
    let mut i1 = 0;
    while i1 < cols {
        let i2 = (i1 + bs).min(cols);
        let cnt = i2 - i1;
        let mut w1 = vec![0f32; rows * cnt];
        w1.par_chunks_mut(cnt).zip(w.par_chunks(cols)).for_each(|(dst, src)| dst.copy_from_slice(&src[i1..i2]));
        let mut m1: Vec<bool> = match sel {
            Selection::Fixed(given) => given.chunks(cols).flat_map(|r| r[i1..i2].iter().copied()).collect(),
            Selection::Target(Target::Sparsity(s)) => {
                let scores: Vec<f32> = w1
                    .par_chunks(cnt)
                    .flat_map_iter(|row| {
                        row.iter().enumerate().map(move |(i, &x)| {
                            let d = u[(i1 + i) * cols + i1 + i];
                            x * x / (d * d)
                        })
                    })
                    .collect();
                mask_matrix(&scores, rows, cnt, None, Target::Sparsity(s), Scope::Layer)?
            }
            Selection::Target(Target::Pattern { .. }) => vec![false; rows * cnt],
        };
        let mut e1 = vec![0f32; rows * cnt];
        let pattern = match sel {
            Selection::Target(Target::Pattern { n, m }) => Some((n, m)),
            _ => None,
        };
        w1.par_chunks_mut(cnt).zip(e1.par_chunks_mut(cnt)).zip(m1.par_chunks_mut(cnt)).for_each(|((wr, er), mr)| {
            let mut order: Vec<usize> = Vec::new();
            for i in 0..cnt {
                let g = i1 + i;
                if let Some((n, m)) = pattern {
                    if i % m == 0 {
                        order.clear();
                        order.extend(i..i + m);
                        let score = |j: usize| {
                            let d = u[(i1 + j) * cols + i1 + j];
                            wr[j] * wr[j] / (d * d)
                        };
                        order.sort_by(|&a, &b| score(a).total_cmp(&score(b)).then(a.cmp(&b)));
                        for &j in &order[..n] {
                            mr[j] = true;
                        }
                    }
                }
                let x = wr[i];
                let q = if mr[i] { 0.0 } else { x };
                let d = u[g * cols + g];
                let e = (x - q) / d;
                let urow = &u[g * cols + i1..g * cols + i2];
                for j in i + 1..cnt {
                    wr[j] -= e * urow[j];
                }
                wr[i] = q;
                er[i] = e;
            }
        });
        w.par_chunks_mut(cols).zip(w1.par_chunks(cnt)).zip(m1.par_chunks(cnt)).zip(mask.par_chunks_mut(cols)).for_each(|(((dst, src), ms), md)| {
            dst[i1..i2].copy_from_slice(src);
            md[i1..i2].copy_from_slice(ms);
        });
        if i2 < cols {
            // W[:, i2:] −= E · U[i1:i2, i2:], as column-major views of the row-major buffers:
            // Wᵀ[i2:, :] −= U[i1:i2, i2:]ᵀ · Eᵀ
            let rest = cols - i2;
            let dst = MatMut::from_column_major_slice_mut(w, cols, rows).submatrix_mut(i2, 0, rest, rows);
            let lhs = MatRef::from_column_major_slice(u, cols, cols).submatrix(i2, i1, rest, cnt);
            let rhs = MatRef::from_column_major_slice(&e1, cnt, rows);
            faer::linalg::matmul::matmul(dst, Accum::Add, lhs, rhs, -1.0f32, par);
        }
        i1 = i2;
    }
    Ok(mask)
}

/// Factors H (given afresh by `h` for each damping tried) and runs the sweep on `w`, on the current
/// rayon pool; returns the mask and any damping warnings.
pub fn prune_matrix(
    name: &str,
    w: &mut [f32],
    rows: usize,
    cols: usize,
    h: impl FnMut() -> Result<Vec<f32>>,
    sel: Selection,
    opts: SparseGptOptions,
) -> Result<(Vec<bool>, Vec<String>)> {
    opts.validate()?;
    let par = current_par();
    let f = factor(name, cols, h, opts.damp, par)?;
    let mask = sparsegpt(w, rows, cols, &f, sel, opts, par)?;
    Ok((mask, f.warnings))
}

/// faer's parallelism on the rayon pool this runs in.
pub fn current_par() -> Par {
    Par::rayon(rayon::current_num_threads())
}
