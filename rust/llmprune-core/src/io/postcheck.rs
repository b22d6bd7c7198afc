//! The postcondition of every write path: what is about to be published is checked as it is
//! produced, before the staging directory is renamed into place. A written tensor must be finite
//! wherever its input was (a non-finite value would make the model's forward pass fail, or worse,
//! quietly produce NaN logits), and the pruned counts a summary reports are the zeros actually
//! written (so entries zeroed because their input never fired are counted too), not the plan's.
//! A failed check is `Error::Postcondition`, naming the tensor: the run stops and the staging
//! directory is removed, so nothing is published.

use rayon::prelude::*;
use safetensors::Dtype;

use crate::error::{Error, Result};
use crate::io::dtype::float_size;

/// What a scan of one tensor's little-endian bytes found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// Entries equal to zero (either sign).
    pub zeros: u64,
    /// Entries that are NaN or infinite.
    pub nonfinite: u64,
    /// The first non-finite entry's index.
    pub first_nonfinite: Option<usize>,
}

impl Scan {
    fn merge(self, other: Scan, offset: usize) -> Scan {
        Scan {
            zeros: self.zeros + other.zeros,
            nonfinite: self.nonfinite + other.nonfinite,
            first_nonfinite: self.first_nonfinite.or(other.first_nonfinite.map(|i| i + offset)),
        }
    }
}

/// (mask of the magnitude bits, mask of the exponent bits) of a float dtype of 2 or 4 bytes.
fn masks(dtype: Dtype) -> Option<(u32, u32)> {
    match dtype {
        Dtype::BF16 => Some((0x7fff, 0x7f80)),
        Dtype::F16 => Some((0x7fff, 0x7c00)),
        Dtype::F32 => Some((0x7fff_ffff, 0x7f80_0000)),
        _ => None,
    }
}

fn scan_serial(bytes: &[u8], es: usize, (mag, exp): (u32, u32)) -> Scan {
    let mut s = Scan::default();
    for (i, c) in bytes.chunks_exact(es).enumerate() {
        let bits = if es == 2 { u16::from_le_bytes([c[0], c[1]]) as u32 } else { u32::from_le_bytes([c[0], c[1], c[2], c[3]]) };
        if bits & mag == 0 {
            s.zeros += 1;
        } else if bits & exp == exp {
            s.nonfinite += 1;
            s.first_nonfinite.get_or_insert(i);
        }
    }
    s
}

/// Counts the zeros and non-finite entries of `bytes` of `dtype` (None for a dtype that is not a
/// 2- or 4-byte float: such tensors are copied, never computed). Large tensors are scanned in
/// parallel on the current rayon pool.
pub fn scan(dtype: Dtype, bytes: &[u8]) -> Option<Scan> {
    let m = masks(dtype)?;
    let es = float_size(dtype)?;
    const CHUNK: usize = 1 << 16;
    if bytes.len() <= CHUNK * es {
        return Some(scan_serial(bytes, es, m));
    }
    let parts: Vec<Scan> = bytes.par_chunks(CHUNK * es).map(|c| scan_serial(c, es, m)).collect();
    Some(parts.into_iter().enumerate().fold(Scan::default(), |acc, (k, s)| acc.merge(s, k * CHUNK)))
}

/// The postcondition on one computed tensor: every entry finite wherever `input` (the tensor it
/// was computed from, when there is one of the same size) was finite. Returns the scan of the
/// written bytes, whose `zeros` is what the summary counts.
pub fn check_written(name: &str, dtype: Dtype, written: &[u8], input: Option<(Dtype, &[u8])>, hint: Option<&str>) -> Result<Scan> {
    let Some(s) = scan(dtype, written) else { return Ok(Scan::default()) };
    if s.nonfinite == 0 {
        return Ok(s);
    }
    // only on failure: was the input already non-finite there (then it is carried, not produced)?
    if let Some((idt, ibytes)) = input {
        if let Some(is) = scan(idt, ibytes) {
            if is.nonfinite >= s.nonfinite {
                return Ok(s);
            }
        }
    }
    let at = s.first_nonfinite.unwrap_or(0);
    Err(Error::postcondition(
        name,
        format!(
            "the computed tensor has {} non-finite value(s) (first at flat index {at}) where its input was finite; nothing was written",
            s.nonfinite
        ),
        hint.map(str::to_string),
    ))
}

/// The postcondition on a count of the output: what the published config says (`says`) must be
/// what was written (`written`).
pub fn check_count(name: &str, what: &str, written: usize, says: usize) -> Result<()> {
    if written != says {
        return Err(Error::postcondition(
            name,
            format!("{written} {what} written, but the output's config.json says {says}; nothing was written"),
            Some("this is a bug in llmprune; please report it with the command line".into()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn bf16s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes()).collect()
    }

    fn f16s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|&x| half::f16::from_f32(x).to_bits().to_le_bytes()).collect()
    }

    #[test]
    fn counts_zeros_of_either_sign_and_non_finite_values() {
        let v = [0.0, -0.0, 1.5, f32::NAN, f32::INFINITY, -2.0, f32::NEG_INFINITY, 1e-40];
        for (dt, bytes) in [(Dtype::F32, f32s(&v)), (Dtype::BF16, bf16s(&v))] {
            let s = scan(dt, &bytes).unwrap();
            assert_eq!(s.zeros, 2, "{dt:?}");
            assert_eq!(s.nonfinite, 3, "{dt:?}");
            assert_eq!(s.first_nonfinite, Some(3), "{dt:?}");
        }
        // f16 flushes 1e-40 to zero
        let s = scan(Dtype::F16, &f16s(&v)).unwrap();
        assert_eq!((s.zeros, s.nonfinite, s.first_nonfinite), (3, 3, Some(3)));
        assert_eq!(scan(Dtype::I64, &[0; 8]), None);
    }

    #[test]
    fn large_tensors_scan_in_parallel_with_global_indices() {
        let mut v = vec![1.0f32; 300_000];
        v[200_001] = f32::NAN;
        v[250_000] = f32::NAN;
        v[7] = 0.0;
        let s = scan(Dtype::F32, &f32s(&v)).unwrap();
        assert_eq!((s.zeros, s.nonfinite, s.first_nonfinite), (1, 2, Some(200_001)));
    }

    #[test]
    fn non_finite_output_of_finite_input_is_refused() {
        let input = f32s(&[1.0, 2.0, 3.0]);
        let ok = check_written("w", Dtype::F32, &f32s(&[0.0, 2.0, 3.0]), Some((Dtype::F32, &input)), None).unwrap();
        assert_eq!(ok.zeros, 1);
        let e = check_written("m.w", Dtype::F32, &f32s(&[0.0, f32::NAN, 3.0]), Some((Dtype::F32, &input)), Some("lower --damp")).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("m.w") && text.contains("non-finite") && text.contains("index 1"), "{text}");
        assert_eq!(e.hint().as_deref(), Some("lower --damp"));
        // a computed tensor with no input to compare to must be finite
        assert!(check_written("b", Dtype::BF16, &bf16s(&[f32::INFINITY]), None, None).is_err());
    }

    #[test]
    fn non_finite_values_carried_from_the_input_pass() {
        let input = f32s(&[f32::NAN, 2.0]);
        assert!(check_written("w", Dtype::F32, &f32s(&[f32::NAN, 0.0]), Some((Dtype::F32, &input)), None).is_ok());
        // more non-finite values than the input had: produced here
        assert!(check_written("w", Dtype::F32, &f32s(&[f32::NAN, f32::NAN]), Some((Dtype::F32, &input)), None).is_err());
    }

    #[test]
    fn counts_must_match_the_config() {
        assert!(check_count("m.layers.0.mlp", "experts", 2, 2).is_ok());
        let e = check_count("m.layers.1.mlp", "experts", 4, 2).unwrap_err().to_string();
        assert!(e.contains("m.layers.1.mlp") && e.contains("4 experts written") && e.contains("says 2"), "{e}");
    }
}
