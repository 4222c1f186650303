//! Norms with the reference's eps.

use candle_core::{Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};
use dynamicrafter_kernels::ConvNorm;

/// GroupNorm with 32 groups (every norm of this model), on our fused kernel.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl GroupNorm {
    pub const GROUPS: usize = 32;

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        dynamicrafter_kernels::group_norm(xs, &self.weight, &self.bias, Self::GROUPS, self.eps, false)
    }

    /// The norm (+ SiLU) for a kernel that applies it on the way: a convolution's input copy
    /// ([`super::Conv3x3::forward_normed`]), a spatial transformer's entry.
    pub fn fused(&self, silu: bool) -> ConvNorm<'_> {
        ConvNorm { weight: &self.weight, bias: &self.bias, groups: Self::GROUPS, eps: self.eps, silu }
    }
}

pub fn group_norm(channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    Ok(GroupNorm { weight: vb.get(channels, "weight")?, bias: vb.get(channels, "bias")?, eps })
}

pub fn layer_norm(dim: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    candle_nn::layer_norm(dim, candle_nn::LayerNormConfig { eps, ..Default::default() }, vb)
}
