//! The GEGLU gate `a · GELU_erf(g)` with a vectorised erf, in f32 on any CPU.

use crate::common::{contiguous_f32, gelu_erf};
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

dispatch!(pub(crate) geglu_rows, fn(p: &[f32], out: &mut [f32], hidden: usize) {
    for (row, o) in p.chunks_exact(2 * hidden).zip(out.chunks_exact_mut(hidden)) {
        let (a, g) = row.split_at(hidden);
        for ((o, &a), &g) in o.iter_mut().zip(a).zip(g) {
            *o = a * gelu_erf(g);
        }
    }
});

struct Geglu;

impl candle_core::CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "dc-geglu"
    }

    fn cpu_fwd(&self, p: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = contiguous_f32(self.name(), p, l)?;
        let dims = l.dims();
        let hidden = dims[dims.len() - 1] / 2;
        let mut out = vec![0f32; p.len() / 2];
        const ROWS: usize = 64;
        out.par_chunks_mut(ROWS * hidden)
            .zip(p.par_chunks(ROWS * 2 * hidden))
            .for_each(|(o, p)| geglu_rows(p, o, hidden));
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("rank ≥ 1") = hidden;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

/// `a · GELU_erf(g)` for `[a, g]` = the two halves of the last dimension of CPU f32 `p`.
pub(crate) fn geglu(p: &Tensor) -> Result<Tensor> {
    p.contiguous()?.apply_op1_no_bwd(&Geglu)
}
