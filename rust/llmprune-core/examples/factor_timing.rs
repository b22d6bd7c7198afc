//! Times the pieces of SparseGPT's factorization at one width: Cholesky, triangular inverse, and
//! the inverse as a triangular solve against the identity.
use std::time::Instant;

use faer::linalg::cholesky::llt::factor::{cholesky_in_place, cholesky_in_place_scratch, LltRegularization};
use faer::linalg::triangular_inverse::invert_lower_triangular;
use faer::linalg::triangular_solve::solve_lower_triangular_in_place;
use faer::{MatMut, MatRef, Par};

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(4096);
    let par = Par::rayon(rayon::current_num_threads());
    // a well-conditioned SPD matrix: A Aᵀ/n + I
    let a: Vec<f32> = (0..n * n).map(|i| ((i * 2654435761usize) % 1000) as f32 / 1000.0 - 0.5).collect();
    let am = MatRef::from_column_major_slice(&a, n, n);
    let mut h = vec![0f32; n * n];
    faer::linalg::matmul::matmul(MatMut::from_column_major_slice_mut(&mut h, n, n), faer::Accum::Replace, am, am.transpose(), 1.0 / n as f32, par);
    for i in 0..n {
        h[i * n + i] += 1.0;
    }
    for round in 0..2 {
        let mut m = h.clone();
        let t = Instant::now();
        let mut mem = faer::dyn_stack::MemBuffer::new(cholesky_in_place_scratch::<f32>(n, par, Default::default()));
        cholesky_in_place(
            MatMut::from_column_major_slice_mut(&mut m, n, n),
            LltRegularization::default(),
            par,
            faer::dyn_stack::MemStack::new(&mut mem),
            Default::default(),
        )
        .unwrap();
        let chol = t.elapsed().as_secs_f64();
        let mut u = vec![0f32; n * n];
        let t = Instant::now();
        invert_lower_triangular(MatMut::from_column_major_slice_mut(&mut u, n, n), MatRef::from_column_major_slice(&m, n, n), par);
        let inv = t.elapsed().as_secs_f64();
        let mut e = vec![0f32; n * n];
        for i in 0..n {
            e[i * n + i] = 1.0;
        }
        let t = Instant::now();
        solve_lower_triangular_in_place(MatRef::from_column_major_slice(&m, n, n), MatMut::from_column_major_slice_mut(&mut e, n, n), par);
        let solve = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let f = llmprune_core::unstructured::sparsegpt::factor("h", n, || Ok(h.clone()), 0.01, par).unwrap();
        let whole = t.elapsed().as_secs_f64();
        assert_eq!(f.n, n);
        println!("round {round}: n {n} threads {} cholesky {chol:.3} s, triangular inverse {inv:.3} s, solve against I {solve:.3} s, factor() {whole:.3} s", rayon::current_num_threads());
    }
}
