//! A mutation fuzzer for everything the core parses from untrusted files: safetensors shard headers,
//! `model.safetensors.index.json`, and stats sidecars. It runs on stable Rust with no extra tools,
//! from a seed corpus of valid files, with byte-level and JSON-aware mutations (numbers replaced by
//! boundary values such as 2^32, 2^63 and u64::MAX, keys dropped, truncation, splicing). Every input
//! must give `Ok` or `Err`; a panic (overflow checks are on in the profiles that run it) is a bug.
//!
//! Shared by the smoke test (`tests/fuzz_smoke.rs`, run by `make test`) and the long run
//! (`cargo run --profile fuzz --example fuzz_parsers -- N`).

#![allow(dead_code)]

use std::path::Path;

use llmprune_core::io::checkpoint::{parse_header, parse_index};
use llmprune_core::sidecar::Sidecar;

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Which parser an input goes to.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    Header,
    Index,
    Sidecar,
}

fn shard(header: &str, data_len: usize) -> Vec<u8> {
    let mut h = header.as_bytes().to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(std::iter::repeat_n(0x3fu8, data_len));
    out
}

/// Valid files of each kind, the starting points of mutation.
pub fn seeds() -> Vec<(Target, Vec<u8>)> {
    let mut out = vec![
        (
            Target::Header,
            shard(
                r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},"b":{"dtype":"F32","shape":[3],"data_offsets":[12,24]}}"#,
                24,
            ),
        ),
        (
            Target::Header,
            shard(r#"{"b":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},"a":{"dtype":"F32","shape":[4,0],"data_offsets":[12,12]}}"#, 12),
        ),
        (
            Target::Header,
            shard(r#"{"x":{"dtype":"F16","shape":[],"data_offsets":[0,2]},"y":{"dtype":"I64","shape":[1,1,1],"data_offsets":[2,10]}}"#, 10),
        ),
        (
            Target::Index,
            br#"{"metadata":{"total_size":48},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#
                .to_vec(),
        ),
        (Target::Index, br#"{"weight_map":{"model.layers.0.q.weight":"sub/dir/s.safetensors"}}"#.to_vec()),
    ];
    out.push((Target::Sidecar, sidecar_seed()));
    out
}

fn sidecar_seed() -> Vec<u8> {
    use llmprune_core::sidecar::{encode, LayerStats, SidecarInfo};
    let mut layers = std::collections::BTreeMap::new();
    layers.insert("w".to_string(), LayerStats { act_sum: vec![1.0, -2.0], act_sqsum: vec![3.0, 5.0], count: 2, input_axis: 1 });
    let info = SidecarInfo {
        fingerprint: "0".repeat(64),
        model_tensors: serde_json::Map::new(),
        calibration: serde_json::json!({"tokens": 2}),
        mode: "dense".into(),
        sequential: serde_json::Value::Null,
        grad: serde_json::Value::Null,
        blocks: None,
        experts: Default::default(),
    };
    encode(&info, &layers, &Default::default()).expect("a valid seed sidecar")
}

const NUMBERS: [&str; 14] = [
    "0",
    "1",
    "-1",
    "7",
    "8",
    "255",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "1e400",
    "35184372088832",
];

/// One mutation of `input` (another corpus entry may be spliced in).
pub fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        match rng.below(9) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = [0u8, 0xff, b'"', b'{', b'}', b'[', b']', b',', b':', b'-', b'9', 0x80][rng.below(12)];
            }
            2 => {
                // replace a run of ASCII digits by a boundary number
                let digits: Vec<usize> = (0..v.len()).filter(|&i| v[i].is_ascii_digit() && (i == 0 || !v[i - 1].is_ascii_digit())).collect();
                if !digits.is_empty() {
                    let start = digits[rng.below(digits.len())];
                    let end = (start..v.len()).find(|&i| !v[i].is_ascii_digit()).unwrap_or(v.len());
                    let n = NUMBERS[rng.below(NUMBERS.len())].as_bytes();
                    v.splice(start..end, n.iter().copied());
                }
            }
            3 if !v.is_empty() => v.truncate(rng.below(v.len())),
            4 if v.len() >= 8 => {
                // the length prefix
                let n: u64 = [0, 1, 7, v.len() as u64 - 8, v.len() as u64, u64::MAX, 1 << 40][rng.below(7)];
                v[..8].copy_from_slice(&n.to_le_bytes());
            }
            5 if !other.is_empty() && !v.is_empty() => {
                let (a, b) = (rng.below(v.len()), rng.below(other.len()));
                let len = rng.below(other.len() - b + 1).min(64);
                v.splice(a..a, other[b..b + len].iter().copied());
            }
            6 if v.len() > 2 => {
                let a = rng.below(v.len());
                let len = rng.below((v.len() - a).min(32) + 1);
                v.drain(a..a + len);
            }
            7 => {
                let tokens: [&[u8]; 8] = [
                    br#""dtype":"BOOL""#,
                    br#""shape":[]"#,
                    br#""data_offsets":[0]"#,
                    br#"null"#,
                    br#""__metadata__":7"#,
                    br#""..""#,
                    br#""/x.safetensors""#,
                    br#""input_axis":2"#,
                ];
                let t = tokens[rng.below(tokens.len())];
                let at = rng.below(v.len() + 1);
                v.splice(at..at, t.iter().copied());
            }
            _ if !v.is_empty() => {
                let i = rng.below(v.len());
                let b = v[i];
                v.insert(i, b);
            }
            _ => v.push(b'0'),
        }
    }
    v
}

/// Feeds one input to its parser; Ok(true) when it parsed, Ok(false) when it was refused.
pub fn parse(target: Target, data: &[u8]) -> bool {
    let p = Path::new("fuzz-input");
    match target {
        Target::Header => parse_header(data, p).is_ok(),
        Target::Index => parse_index(data, p).is_ok(),
        Target::Sidecar => Sidecar::from_bytes(data, p).is_ok(),
    }
}

pub struct Report {
    pub execs: u64,
    pub accepted: u64,
    pub panics: Vec<(Target, Vec<u8>, String)>,
}

/// Runs `n` mutated inputs from `seed`; every panic is caught and kept with its input.
pub fn run(n: u64, seed: u64) -> Report {
    let corpus = seeds();
    let mut rng = Rng::new(seed);
    let mut report = Report { execs: 0, accepted: 0, panics: Vec::new() };
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for _ in 0..n {
        let (target, base) = &corpus[rng.below(corpus.len())];
        let other = &corpus[rng.below(corpus.len())].1;
        let input = mutate(&mut rng, base, other);
        match std::panic::catch_unwind(|| parse(*target, &input)) {
            Ok(true) => report.accepted += 1,
            Ok(false) => {}
            Err(e) => {
                let msg = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
                if report.panics.len() < 10 {
                    report.panics.push((*target, input, msg));
                }
            }
        }
        report.execs += 1;
    }
    std::panic::set_hook(quiet);
    report
}
