//! SparseGPT kernel: basic properties (the numpy transcription of the official algorithm is compared
//! mask for mask in tests/test_sparsegpt.py).

use llmprune_core::unstructured::select::Target;
use llmprune_core::unstructured::sparsegpt::{prune_matrix, Selection, SparseGptOptions};

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    ((*seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
}

fn gram(n: usize, tokens: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    // correlated inputs (a shared component per token and neighbours mixed), as activations are
    let mut s = seed;
    let z: Vec<f32> = (0..tokens * n).map(|_| lcg(&mut s)).collect();
    let x: Vec<f32> = (0..tokens * n)
        .map(|k| {
            let (t, j) = (k / n, k % n);
            z[k] + 0.9 * z[t * n + (j + 1) % n] + 0.7 * z[t * n]
        })
        .collect();
    let mut h = vec![0f32; n * n];
    for t in 0..tokens {
        let row = &x[t * n..(t + 1) * n];
        for i in 0..n {
            for j in 0..n {
                h[i * n + j] += row[i] * row[j];
            }
        }
    }
    (x, h)
}

#[test]
fn identity_gram_prunes_smallest_and_keeps_the_rest() {
    let (rows, cols) = (8, 16);
    let mut s = 3;
    let w0: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut s)).collect();
    let mut h = vec![0f32; cols * cols];
    for i in 0..cols {
        h[i * cols + i] = 1.0;
    }
    let mut w = w0.clone();
    let (mask, warnings) =
        prune_matrix("t", &mut w, rows, cols, || Ok(h.clone()), Selection::Target(Target::Sparsity(0.5)), SparseGptOptions::default()).unwrap();
    assert!(warnings.is_empty());
    assert_eq!(mask.iter().filter(|&&m| m).count(), rows * cols / 2);
    for (i, (&a, &b)) in w0.iter().zip(&w).enumerate() {
        if mask[i] {
            assert_eq!(b.to_bits(), 0);
        } else {
            assert!((a - b).abs() < 1e-6, "{a} {b}");
        }
    }
}

#[test]
fn reconstruction_beats_zeroing_the_same_mask() {
    let (rows, cols, tokens) = (16, 64, 512);
    let (x, h) = gram(cols, tokens, 11);
    let mut s = 5;
    let w0: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut s)).collect();
    for sel in [Selection::Target(Target::Sparsity(0.5)), Selection::Target(Target::Pattern { n: 2, m: 4 })] {
        let mut w = w0.clone();
        let opts = SparseGptOptions { damp: 0.01, blocksize: 16 };
        let (mask, _) = prune_matrix("t", &mut w, rows, cols, || Ok(h.clone()), sel, opts).unwrap();
        let zeroed: Vec<f32> = w0.iter().zip(&mask).map(|(&a, &m)| if m { 0.0 } else { a }).collect();
        let err = |v: &[f32]| -> f64 {
            let mut e = 0f64;
            for t in 0..tokens {
                for r in 0..rows {
                    let d: f32 = (0..cols).map(|j| (w0[r * cols + j] - v[r * cols + j]) * x[t * cols + j]).sum();
                    e += (d as f64).powi(2);
                }
            }
            e
        };
        assert!(err(&w) < 0.7 * err(&zeroed), "{} vs {}", err(&w), err(&zeroed));
        assert!(mask.iter().zip(&w).all(|(&m, &v)| !m || v.to_bits() == 0));
    }
}

#[test]
fn not_positive_definite_gets_more_damping() {
    let n = 8;
    let mut h = vec![0f32; n * n];
    for i in 0..n {
        for j in 0..n {
            h[i * n + j] = 1.0; // rank one: singular
        }
        h[i * n + i] = 1.0;
    }
    h[3 * n + 5] = -5.0;
    h[5 * n + 3] = -5.0; // indefinite
    let mut w = vec![0.5f32; 4 * n];
    let r = prune_matrix("t", &mut w, 4, n, || Ok(h.clone()), Selection::Target(Target::Sparsity(0.5)), SparseGptOptions::default());
    match r {
        Ok((_, warnings)) => assert!(!warnings.is_empty()),
        Err(e) => assert!(e.to_string().contains("positive definite"), "{e}"),
    }
}
