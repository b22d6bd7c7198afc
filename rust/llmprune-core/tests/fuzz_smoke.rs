//! A short run of the parser fuzzer (tests/fuzz_engine): no input may make a parser panic. The long
//! run is `cargo run --profile fuzz -p llmprune-core --example fuzz_parsers -- 10000000`.

mod fuzz_engine;

#[test]
fn parsers_never_panic_on_mutated_files() {
    let r = fuzz_engine::run(300_000, 0x11);
    if let Some((target, input, msg)) = r.panics.first() {
        panic!("{target:?} parser panicked ({msg}) on {:?}", String::from_utf8_lossy(input));
    }
    // mutations keep some inputs valid, so the parsers' accepting paths are exercised too
    assert!(r.accepted > 0 && r.accepted < r.execs, "{} of {} accepted", r.accepted, r.execs);
}

#[test]
fn overflowing_shape_after_a_valid_tensor_is_an_error() {
    // found by fuzzing: the size check of the second tensor overflowed in the error path
    let header =
        br#"{"b":{"dtype":"F32","shape":[3],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[8,8]}}"#;
    let mut h = header.to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend(h);
    file.extend([0u8; 8]);
    let err = llmprune_core::io::checkpoint::parse_header(&file, std::path::Path::new("x.safetensors")).err().expect("refused");
    assert!(err.to_string().contains("x.safetensors"), "{err}");
}
