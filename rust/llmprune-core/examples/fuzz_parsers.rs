//! The long fuzzing run: `cargo run --profile fuzz -p llmprune-core --example fuzz_parsers -- N [SEED]`
//! feeds N mutated headers, indexes and sidecars to the core's parsers (overflow checks on) and
//! prints the executions per second and any input that made a parser panic.

#[path = "../tests/fuzz_engine/mod.rs"]
mod fuzz_engine;

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let seed: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let t = std::time::Instant::now();
    let r = fuzz_engine::run(n, seed);
    let s = t.elapsed().as_secs_f64();
    println!("{} executions in {s:.1} s ({:.0}/s), {} accepted, {} panics", r.execs, r.execs as f64 / s, r.accepted, r.panics.len());
    for (target, input, msg) in &r.panics {
        println!("{target:?}: {msg}: {:?}", String::from_utf8_lossy(input));
    }
    if !r.panics.is_empty() {
        std::process::exit(1);
    }
}
