//! OpenCLIP's transformer block, shared by the text and the vision tower.

use super::{layer_norm, linear, multi_head_attention, Linear};
use crate::compute::Backend;
use candle_core::{Module, Result, Tensor, D};
use candle_nn::{LayerNorm, VarBuilder};

/// OpenCLIP `ResidualAttentionBlock`: pre-LN attention with packed `in_proj`, then a GELU MLP.
#[derive(Debug, Clone)]
pub struct ClipBlock {
    ln_1: LayerNorm,
    in_proj: Linear,
    out_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    c_proj: Linear,
    heads: usize,
}

impl ClipBlock {
    pub fn new(width: usize, heads: usize, mlp_ratio: f64, vb: VarBuilder, backend: &Backend) -> Result<Self> {
        let attn = vb.pp("attn");
        let in_b = attn.get(3 * width, "in_proj_bias")?;
        let hidden = (width as f64 * mlp_ratio) as usize;
        Ok(Self {
            ln_1: layer_norm(width, 1e-5, vb.pp("ln_1"))?,
            in_proj: Linear::load(&attn, "in_proj_weight", 3 * width, width, &[3 * width, width], Some(in_b), backend)?,
            out_proj: linear(width, width, attn.pp("out_proj"), backend)?,
            ln_2: layer_norm(width, 1e-5, vb.pp("ln_2"))?,
            c_fc: linear(width, hidden, vb.pp("mlp.c_fc"), backend)?,
            c_proj: linear(hidden, width, vb.pp("mlp.c_proj"), backend)?,
            heads,
        })
    }

    /// Checkpoint keys and shapes of one block, for blocks the model holds but never runs.
    pub fn keys(prefix: &str, width: usize, mlp_ratio: f64) -> Vec<(String, Vec<usize>)> {
        let hidden = (width as f64 * mlp_ratio) as usize;
        [
            ("ln_1.weight", vec![width]),
            ("ln_1.bias", vec![width]),
            ("attn.in_proj_weight", vec![3 * width, width]),
            ("attn.in_proj_bias", vec![3 * width]),
            ("attn.out_proj.weight", vec![width, width]),
            ("attn.out_proj.bias", vec![width]),
            ("ln_2.weight", vec![width]),
            ("ln_2.bias", vec![width]),
            ("mlp.c_fc.weight", vec![hidden, width]),
            ("mlp.c_fc.bias", vec![hidden]),
            ("mlp.c_proj.weight", vec![width, hidden]),
            ("mlp.c_proj.bias", vec![width]),
        ]
        .into_iter()
        .map(|(k, s)| (format!("{prefix}.{k}"), s))
        .collect()
    }

    /// `xs`: `(n, l, width)`; `mask`: additive `(l, l)`.
    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let width = xs.dim(D::Minus1)?;
        let h = self.ln_1.forward(xs)?;
        let qkv = self.in_proj.forward(&h)?;
        let q = qkv.narrow(D::Minus1, 0, width)?;
        let k = qkv.narrow(D::Minus1, width, width)?;
        let v = qkv.narrow(D::Minus1, 2 * width, width)?;
        let scale = 1.0 / ((width / self.heads) as f64).sqrt();
        let a = multi_head_attention(&q, &k, &v, self.heads, scale, mask)?;
        let xs = (xs + self.out_proj.forward(&a)?)?;
        let h = self.c_fc.forward(&self.ln_2.forward(&xs)?)?.gelu_erf()?;
        xs + self.c_proj.forward(&h)?
    }
}
