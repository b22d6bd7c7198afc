//! Element types a prunable weight may have, and their conversion to f32.

use safetensors::Dtype;

/// Bytes per element of a supported floating-point dtype, or None when pruning does not support it.
pub fn float_size(dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::BF16 | Dtype::F16 => Some(2),
        Dtype::F32 => Some(4),
        _ => None,
    }
}

/// Decodes little-endian `bytes` of `dtype` into `out` (exact: every supported dtype widens to f32).
pub fn decode_into(dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        Dtype::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        Dtype::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        Dtype::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        other => unreachable!("decode_into called with unsupported dtype {other:?}"),
    }
}

pub fn decode(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    let size = float_size(dtype).expect("supported dtype");
    let mut out = vec![0f32; bytes.len() / size];
    decode_into(dtype, bytes, &mut out);
    out
}

/// Encodes `values` into little-endian bytes of `dtype`, rounding to nearest even (reconstruction
/// writes new values, unlike pruning which only zeroes).
pub fn encode_into(dtype: Dtype, values: &[f32], out: &mut Vec<u8>) {
    out.clear();
    match dtype {
        Dtype::BF16 => out.extend(values.iter().flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes())),
        Dtype::F16 => out.extend(values.iter().flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes())),
        Dtype::F32 => out.extend(values.iter().flat_map(|&v| v.to_le_bytes())),
        other => unreachable!("encode_into called with unsupported dtype {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widening_is_exact() {
        let bf = half::bf16::from_f32(-1.5).to_bits().to_le_bytes();
        let h = half::f16::from_f32(0.25).to_bits().to_le_bytes();
        let f = 3.25f32.to_le_bytes();
        assert_eq!(decode(Dtype::BF16, &bf), vec![-1.5]);
        assert_eq!(decode(Dtype::F16, &h), vec![0.25]);
        assert_eq!(decode(Dtype::F32, &f), vec![3.25]);
        assert_eq!(float_size(Dtype::F64), None);
    }
}
