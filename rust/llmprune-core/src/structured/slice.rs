//! What happens to each tensor: copied, sliced to the kept rows/columns, replaced (a compensated
//! bias), or added (a bias the model did not have); and the byte-level slicing itself.

use std::collections::BTreeMap;
use std::ops::Range;

use rayon::prelude::*;
use safetensors::Dtype;

use crate::error::{Error, Result};
use crate::io::checkpoint::Checkpoint;
use crate::io::dtype::{decode, encode_into, float_size};
use crate::sidecar::gram::Gram;
use crate::sidecar::Sidecar;
use crate::structured::arch::{ColTensor, Module, Rules};
use crate::structured::metric::{map_rows, output_stats};
use crate::structured::plan::LayerPlan;
use crate::structured::refit::refit;

/// The fate of one input tensor.
#[derive(Clone, Debug)]
pub enum Op {
    /// Keep these row ranges (axis 0) and/or column ranges (axis 1); None keeps the whole axis.
    Slice { rows: Option<Vec<Range<usize>>>, cols: Option<Vec<Range<usize>>> },
    /// New contents of the same dtype and shape (a bias with the removed channels folded in).
    Replace(Vec<u8>),
    /// New contents of the same dtype and a new shape (a refitted output projection).
    Computed { shape: Vec<usize>, data: Vec<u8> },
}

/// A tensor written right after `after` in the same shard.
#[derive(Clone, Debug)]
pub struct Added {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

#[derive(Default)]
pub struct Edits {
    pub ops: BTreeMap<String, Op>,
    /// Anchor tensor name -> tensors to write after it.
    pub added: BTreeMap<String, Vec<Added>>,
    pub bias_params_added: u64,
}

/// Ranges covering `per_group` consecutive items of each kept group, adjacent ones merged.
pub fn group_ranges(keep: &[usize], per_group: usize) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for &g in keep {
        let r = g * per_group..(g + 1) * per_group;
        match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => out.push(r),
        }
    }
    out
}

fn ranges_len(r: &[Range<usize>]) -> usize {
    r.iter().map(|r| r.len()).sum()
}

/// Shape after an op.
pub fn new_shape(shape: &[usize], op: &Op) -> Vec<usize> {
    match op {
        Op::Replace(_) => shape.to_vec(),
        Op::Computed { shape, .. } => shape.clone(),
        Op::Slice { rows, cols } => {
            let mut s = shape.to_vec();
            if let Some(r) = rows {
                s[0] = ranges_len(r);
            }
            if let Some(c) = cols {
                s[1] = ranges_len(c);
            }
            s
        }
    }
}

/// Copies the kept rows and columns of a stored [rows, cols] (or 1-D [rows]) tensor into `out`.
pub fn slice_into(data: &[u8], es: usize, shape: &[usize], rows: Option<&[Range<usize>]>, cols: Option<&[Range<usize>]>, out: &mut Vec<u8>) {
    let n_cols = if shape.len() == 2 { shape[1] } else { 1 };
    let all_cols = 0..n_cols;
    let cols = cols.unwrap_or(std::slice::from_ref(&all_cols));
    let kept_rows: Vec<usize> = match rows {
        Some(r) => r.iter().flat_map(|r| r.clone()).collect(),
        None => (0..shape[0]).collect(),
    };
    let row_out = ranges_len(cols) * es;
    out.clear();
    out.resize(kept_rows.len() * row_out, 0);
    if row_out == 0 {
        return;
    }
    out.par_chunks_mut(row_out).zip(&kept_rows).for_each(|(dst, &r)| {
        let src = &data[r * n_cols * es..(r + 1) * n_cols * es];
        let mut at = 0;
        for c in cols {
            let n = c.len() * es;
            dst[at..at + n].copy_from_slice(&src[c.start * es..c.end * es]);
            at += n;
        }
    });
}

/// f64 values rounded to f32, then to `dtype` (round to nearest even, as PyTorch casts).
pub fn encode(dtype: Dtype, vals: &[f64]) -> Vec<u8> {
    let narrow: Vec<f32> = vals.iter().map(|&v| v as f32).collect();
    let mut out = Vec::with_capacity(narrow.len() * 4);
    encode_into(dtype, &narrow, &mut out);
    out
}

/// b_i + Σ_{j removed} W_ij · μ_j for every output row i of the output projection, in f64.
fn compensated_bias(ckpt: &Checkpoint, sidecar: &Sidecar, out: &ColTensor, removed_cols: &[usize]) -> Result<(Dtype, Vec<f64>)> {
    let (shard, t) = ckpt.get(&out.weight).expect("checked by the group rules");
    let cols = t.shape[1];
    let stats = output_stats(sidecar, &out.weight, cols, 1, "bias compensation")?;
    let n = stats.count as f64;
    let mu: Vec<(usize, f64)> = removed_cols.iter().map(|&j| (j, stats.act_sum[j] / n)).collect();
    let es = float_size(t.dtype).expect("checked by the scoring pass");
    let mut bias: Vec<f64> = map_rows(shard, t, es, |row| mu.iter().map(|&(j, m)| row[j] as f64 * m).sum());
    if let Some(b) = &out.bias {
        let (bshard, bt) = ckpt.get(b).expect("checked by the group rules");
        if float_size(bt.dtype).is_none() {
            return Err(Error::tensor(&bshard.path, b, format!("dtype {:?} is not supported (BF16, F16 and F32 are)", bt.dtype)));
        }
        for (x, old) in bias.iter_mut().zip(decode(bt.dtype, bshard.data(bt))) {
            *x += old as f64;
        }
    }
    Ok((t.dtype, bias))
}

fn dtype_of(ckpt: &Checkpoint, name: &str) -> Dtype {
    ckpt.get(name).expect("checked by the group rules").1.dtype
}

/// Edits for one module of one layer. `add_bias`: the model gains biases on this module (a config
/// flag covers all of them), so write zeros where the inputs have none and the compensation as the
/// output's bias.
#[allow(clippy::too_many_arguments)]
fn module_edits(
    ckpt: &Checkpoint,
    sidecar: Option<&Sidecar>,
    recon: Option<(&Gram, f64)>,
    m: &Module,
    keep: &[usize],
    compensate: bool,
    add_bias: bool,
    edits: &mut Edits,
) -> Result<()> {
    let pruned = keep.len() < m.groups;
    for t in &m.inputs {
        let rows: Vec<Range<usize>> =
            group_ranges(keep, t.rows_per_group).into_iter().map(|r| r.start + t.row_offset..r.end + t.row_offset).collect();
        let kept = ranges_len(&rows);
        if pruned {
            // a fused weight (several inputs, one tensor) keeps the rows of each part in order
            match edits.ops.get_mut(&t.weight) {
                Some(Op::Slice { rows: Some(prev), .. }) if t.row_offset > 0 => prev.extend(rows.iter().cloned()),
                _ => {
                    edits.ops.insert(t.weight.clone(), Op::Slice { rows: Some(rows.clone()), cols: None });
                }
            }
        }
        match &t.bias {
            Some(b) if pruned => {
                edits.ops.insert(b.clone(), Op::Slice { rows: Some(rows), cols: None });
            }
            Some(_) => {}
            None if add_bias => {
                let dtype = dtype_of(ckpt, &t.weight);
                let name = bias_name(&t.weight);
                edits.bias_params_added += kept as u64;
                edits.added.entry(t.weight.clone()).or_default().push(Added {
                    name,
                    dtype,
                    shape: vec![kept],
                    data: encode(dtype, &vec![0.0; kept]),
                });
            }
            None => {}
        }
    }
    let out = &m.output;
    let mut refitted_bias = None;
    if let (true, Some((gram, damp))) = (pruned, recon) {
        let cols: Vec<usize> = group_ranges(keep, out.cols_per_group).into_iter().flatten().collect();
        let r = refit(ckpt, sidecar, gram, out, &cols, compensate, damp)?;
        let dtype = dtype_of(ckpt, &out.weight);
        edits.ops.insert(out.weight.clone(), Op::Computed { shape: vec![out.out_features, cols.len()], data: encode(dtype, &r.weight) });
        refitted_bias = r.bias;
    } else if pruned {
        edits.ops.insert(out.weight.clone(), Op::Slice { rows: None, cols: Some(group_ranges(keep, out.cols_per_group)) });
    }
    if compensate && (pruned || (out.bias.is_none() && add_bias)) {
        let kept: std::collections::HashSet<usize> = keep.iter().copied().collect();
        let removed_cols: Vec<usize> =
            (0..m.groups).filter(|g| !kept.contains(g)).flat_map(|g| g * out.cols_per_group..(g + 1) * out.cols_per_group).collect();
        let sidecar = sidecar.ok_or_else(|| Error::arg("bias compensation needs activation statistics"))?;
        let (dtype, bias) = match refitted_bias {
            Some(b) => (dtype_of(ckpt, &out.weight), b),
            None => compensated_bias(ckpt, sidecar, out, &removed_cols)?,
        };
        let data = encode(dtype, &bias);
        match &out.bias {
            Some(b) => {
                edits.ops.insert(b.clone(), Op::Replace(data));
            }
            None => {
                edits.bias_params_added += bias.len() as u64;
                edits.added.entry(out.weight.clone()).or_default().push(Added { name: bias_name(&out.weight), dtype, shape: vec![bias.len()], data });
            }
        }
    }
    Ok(())
}

pub(crate) fn bias_name(weight: &str) -> String {
    format!("{}.bias", weight.strip_suffix(".weight").unwrap_or(weight))
}

/// Whether a module kind must gain biases: compensation is on, some layer removes a group of it,
/// and its output projections have no bias.
pub fn needs_added_bias(rules: &Rules, plans: &[LayerPlan], compensate: bool, attn: bool) -> bool {
    compensate
        && rules.layers.iter().zip(plans).any(|(l, p)| {
            let (m, keep) = if attn { (&l.attn, &p.attn_keep) } else { (&l.mlp, &p.mlp_keep) };
            keep.len() < m.groups
        })
        && rules.layers.iter().any(|l| {
            let m = if attn { &l.attn } else { &l.mlp };
            m.output.bias.is_none()
        })
}

/// The edits of one layer alone; `add_attn`/`add_mlp` as `build_edits` decides them for the model.
pub fn layer_edits(
    ckpt: &Checkpoint,
    sidecar: Option<&Sidecar>,
    layer: &crate::structured::arch::Layer,
    plan: &LayerPlan,
    compensate: bool,
    add_attn: bool,
    add_mlp: bool,
) -> Result<Edits> {
    let mut edits = Edits::default();
    module_edits(ckpt, sidecar, None, &layer.attn, &plan.attn_keep, compensate, add_attn, &mut edits)?;
    module_edits(ckpt, sidecar, None, &layer.mlp, &plan.mlp_keep, compensate, add_mlp, &mut edits)?;
    Ok(edits)
}

pub fn build_edits(
    ckpt: &Checkpoint,
    sidecar: Option<&Sidecar>,
    recon: Option<(&Gram, f64)>,
    rules: &Rules,
    plans: &[LayerPlan],
    compensate: bool,
) -> Result<(Edits, bool, bool)> {
    let add_attn = needs_added_bias(rules, plans, compensate, true);
    let add_mlp = needs_added_bias(rules, plans, compensate, false);
    let mut edits = Edits::default();
    for (l, p) in rules.layers.iter().zip(plans) {
        module_edits(ckpt, sidecar, recon, &l.attn, &p.attn_keep, compensate, add_attn, &mut edits)?;
        module_edits(ckpt, sidecar, recon, &l.mlp, &p.mlp_keep, compensate, add_mlp, &mut edits)?;
    }
    Ok((edits, add_attn, add_mlp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_adjacent_groups() {
        assert_eq!(group_ranges(&[0, 1, 3], 2), vec![0..4, 6..8]);
        assert_eq!(group_ranges(&[], 2), Vec::<Range<usize>>::new());
    }

    #[test]
    fn slices_rows_and_columns() {
        // 3 x 4 of u8 "elements" (es = 1)
        let data: Vec<u8> = (0..12).collect();
        let mut out = Vec::new();
        slice_into(&data, 1, &[3, 4], Some(&[0..1, 2..3]), Some(&[1..2, 3..4]), &mut out);
        assert_eq!(out, vec![1, 3, 9, 11]);
        slice_into(&data, 1, &[12], Some(&[10..11, 11..12]), None, &mut out);
        assert_eq!(out, vec![10, 11]);
        assert_eq!(new_shape(&[3, 4], &Op::Slice { rows: None, cols: Some(vec![0..1, 2..4]) }), vec![3, 3]);
    }

    #[test]
    fn encode_rounds_like_torch() {
        // 1 + 2^-8 is halfway between two bf16 values: ties to even (1.0)
        let b = encode(Dtype::BF16, &[1.0 + 1.0 / 256.0, -2.0]);
        assert_eq!(decode(Dtype::BF16, &b), vec![1.0, -2.0]);
        assert_eq!(decode(Dtype::F32, &encode(Dtype::F32, &[0.1])), vec![0.1f32]);
    }
}
