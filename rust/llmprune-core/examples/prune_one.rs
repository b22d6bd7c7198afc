//! Prunes one synthetic 1024x4096 bf16 tensor once, single-threaded: a fixed workload for
//! instruction counting (`valgrind --tool=callgrind`), which unlike wall time does not depend on
//! what else the machine is doing. Usage: prune_one magnitude|wanda|stade 0.5|2:4
use llmprune_core::io::checkpoint::TensorEntry;
use llmprune_core::pool::pool as build_pool;
use llmprune_core::sidecar::LayerStats;
use llmprune_core::unstructured::apply::ApplyOptions;
use llmprune_core::unstructured::kernel::prune_tensor;
use llmprune_core::unstructured::score::{channel_factors, Method};
use llmprune_core::unstructured::select::{Scope, Target};
use safetensors::Dtype;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let method: Method = args.get(1).map(String::as_str).unwrap_or("wanda").parse().expect("method");
    let target = match args.get(2).map(String::as_str).unwrap_or("0.5") {
        t if t.contains(':') => {
            let (n, m) = t.split_once(':').unwrap();
            Target::Pattern { n: n.parse().unwrap(), m: m.parse().unwrap() }
        }
        t => Target::Sparsity(t.parse().unwrap()),
    };
    let (rows, cols) = (1024usize, 4096usize);
    let mut s: u32 = 0x9e37_79b9;
    let data: Vec<u8> = (0..rows * cols)
        .flat_map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            half::bf16::from_f32((s as f32 / u32::MAX as f32 - 0.5) * 0.1).to_bits().to_le_bytes()
        })
        .collect();
    let t = TensorEntry { name: "model.layers.0.mlp.up_proj.weight".into(), dtype: Dtype::BF16, shape: vec![rows, cols], start: 0, end: data.len() };
    let stats = LayerStats { act_sum: vec![1.0; cols], act_sqsum: (0..cols).map(|j| 2.0 + j as f64).collect(), count: 100, input_axis: 1 };
    let factors = channel_factors(method, &t.name, Some(&stats)).unwrap();
    let opts = ApplyOptions {
        model_dir: ".".into(),
        out_dir: ".".into(),
        method,
        target,
        scope: Scope::Row,
        stats: None,
        threads: Some(1),
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
    };
    let pool = build_pool(Some(1)).unwrap();
    let mut out = Vec::new();
    let n = pool.install(|| prune_tensor(&t, &data, 1, factors.as_deref(), &opts, &mut out)).unwrap();
    println!("{n} pruned");
}
