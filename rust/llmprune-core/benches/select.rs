//! Scoring + selection throughput per method (bytes of bf16 weights per second), 1 and 2 threads.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use llmprune_core::io::checkpoint::TensorEntry;
use llmprune_core::pool::pool as build_pool;
use llmprune_core::sidecar::LayerStats;
use llmprune_core::unstructured::apply::ApplyOptions;
use llmprune_core::unstructured::kernel::prune_tensor;
use llmprune_core::unstructured::score::{channel_factors, Method};
use llmprune_core::unstructured::select::{Scope, Target};
use safetensors::Dtype;

const ROWS: usize = 1024;
const COLS: usize = 4096;

fn bf16_matrix() -> Vec<u8> {
    // xorshift: cheap deterministic pseudo-random weights
    let mut s: u32 = 0x9e37_79b9;
    (0..ROWS * COLS)
        .flat_map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let v = (s as f32 / u32::MAX as f32 - 0.5) * 0.1;
            half::bf16::from_f32(v).to_bits().to_le_bytes()
        })
        .collect()
}

fn options(method: Method, target: Target) -> ApplyOptions {
    ApplyOptions {
        model_dir: ".".into(),
        out_dir: ".".into(),
        method,
        target,
        scope: Scope::Row,
        stats: None,
        threads: None,
        include: vec![],
        exclude: vec![],
        default_input_axis: 1,
        force: false,
        provenance: Default::default(),
        check_only: false,
        update: false,
        gram: None,
        sparsegpt: Default::default(),
        allocation: llmprune_core::unstructured::allocation::Allocation::Uniform,
        refine: None,
        compensate: false,
    }
}

fn bench(c: &mut Criterion) {
    let data = bf16_matrix();
    let t =
        TensorEntry { name: "model.layers.0.mlp.down_proj.weight".into(), dtype: Dtype::BF16, shape: vec![ROWS, COLS], start: 0, end: data.len() };
    let stats = LayerStats {
        act_sum: (0..COLS).map(|j| (j % 7) as f64).collect(),
        act_sqsum: (0..COLS).map(|j| 10.0 + (j % 13) as f64).collect(),
        count: 1000,
        input_axis: 1,
    };
    let mut group = c.benchmark_group("prune_tensor_bf16_1024x4096");
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.sample_size(20);
    let cases = [
        ("magnitude-50%", Method::Magnitude, Target::Sparsity(0.5)),
        ("wanda-50%", Method::Wanda, Target::Sparsity(0.5)),
        ("stade-50%", Method::Stade, Target::Sparsity(0.5)),
        ("wanda-2:4", Method::Wanda, Target::Pattern { n: 2, m: 4 }),
    ];
    for threads in [1usize, 2] {
        let pool = build_pool(Some(threads)).unwrap();
        for (label, method, target) in cases {
            let opts = options(method, target);
            let factors = channel_factors(method, &t.name, Some(&stats)).unwrap();
            let mut out = Vec::new();
            group.bench_function(BenchmarkId::new(label, format!("{threads}t")), |b| {
                b.iter(|| pool.install(|| prune_tensor(&t, &data, 1, factors.as_deref(), &opts, &mut out)).unwrap());
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
