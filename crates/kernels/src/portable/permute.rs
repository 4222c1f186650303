//! `x.permute(dims).contiguous()` for CPU f32 permutations that move the innermost axis (the
//! spatial and temporal transformers' layout changes). candle's CPU copy walks such a
//! permutation one element at a time; here it is a tiled transpose between the input's
//! innermost axis and the output's, tiles spread over threads.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Side of the square tiles the transpose copies (floats).
const TILE: usize = 32;

/// Whether [`permute`] takes this permutation of a rank-`rank` tensor: it moves the innermost axis.
pub(crate) fn moves_innermost(rank: usize, dims: &[usize]) -> bool {
    dims.len() == rank && rank >= 2 && dims[rank - 1] != rank - 1
}

/// The permuted CPU f32 tensor, contiguous (see [`moves_innermost`]).
pub(crate) fn permute(x: &Tensor, dims: &[usize]) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Permute { dims: dims.to_vec() })
}

struct Permute {
    dims: Vec<usize>,
}

/// The output buffer shared by the tasks; each writes its own elements.
struct Out(*mut f32);
// SAFETY: tasks write disjoint elements (see `cpu_fwd`), and the buffer outlives them.
unsafe impl Sync for Out {}

impl Out {
    /// Through a method, so closures capture the `Sync` wrapper rather than its pointer field.
    fn at(&self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

impl CustomOp1 for Permute {
    fn name(&self) -> &'static str {
        "dc-permute"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("permute: input must be contiguous".into()))?;
        let src = &storage.as_slice::<f32>()?[start..end];
        let in_dims = layout.dims();
        let rank = in_dims.len();
        let mut in_strides = vec![1usize; rank];
        for i in (0..rank - 1).rev() {
            in_strides[i] = in_strides[i + 1] * in_dims[i + 1];
        }
        let out_dims: Vec<usize> = self.dims.iter().map(|&d| in_dims[d]).collect();
        let mut out_strides = vec![1usize; rank];
        for i in (0..rank - 1).rev() {
            out_strides[i] = out_strides[i + 1] * out_dims[i + 1];
        }
        // p: the output axis the input's innermost axis went to; q: the output's innermost axis.
        let p = self.dims.iter().position(|&d| d == rank - 1).expect("a permutation holds every axis");
        let q = rank - 1;
        let (len_p, len_q) = (out_dims[p], out_dims[q]);
        let (out_stride_p, in_stride_q) = (out_strides[p], in_strides[self.dims[q]]);
        let others: Vec<usize> = (0..rank).filter(|&a| a != p && a != q).collect();
        let outer: usize = others.iter().map(|&a| out_dims[a]).product();
        let total = src.len();
        let mut dst = vec![0f32; total];
        let out = Out(dst.as_mut_ptr());
        let tiles_p = len_p.div_ceil(TILE);
        (0..outer * tiles_p).into_par_iter().for_each(|task| {
            let (mut m, tile_p) = (task / tiles_p, task % tiles_p);
            let (mut base_in, mut base_out) = (0, 0);
            for &a in others.iter().rev() {
                let i = m % out_dims[a];
                m /= out_dims[a];
                base_in += i * in_strides[self.dims[a]];
                base_out += i * out_strides[a];
            }
            let rows = tile_p * TILE..((tile_p + 1) * TILE).min(len_p);
            for j0 in (0..len_q).step_by(TILE) {
                let cols = j0..(j0 + TILE).min(len_q);
                for i in rows.clone() {
                    let (from, to) = (base_in + i, base_out + i * out_stride_p);
                    for j in cols.clone() {
                        // SAFETY: (task, i, j) ↦ `to + j` is injective and below `total`: the output
                        // index of one element of the permutation.
                        unsafe { *out.at(to + j) = src[from + j * in_stride_q] };
                    }
                }
            }
        });
        Ok((CpuStorage::F32(dst), Shape::from(out_dims)))
    }
}
