//! Building blocks shared by the networks. Layers with a choice of kernel take the
//! [`Backend`](crate::compute::Backend) in their constructor and ask it.

mod attention;
mod clip_block;
mod conv;
mod linear;
mod norm;

pub use attention::{attend, attend_add, attention, merge_heads, multi_head_attention, split_heads};
pub use clip_block::ClipBlock;
pub use conv::{conv1x1, conv2d, conv2d_no_bias, conv3x3, downsample, stored_conv2d, temporal_conv, Conv1x1, Conv2d, Conv3x3, Downsample, TemporalConv};
pub use linear::{conv1x1_as_linear, linear, linear_no_bias, Int8Matmul, Linear};
pub use norm::{group_norm, layer_norm, GroupNorm};

use candle_core::{Result, Tensor};
use dynamicrafter_kernels::permute;

/// `(b·t, c, h, w) → (b, c, t, h, w)`.
pub fn frames_to_video(xs: &Tensor, b: usize) -> Result<Tensor> {
    let (bt, c, h, w) = xs.dims4()?;
    permute(&xs.reshape((b, bt / b, c, h, w))?, &[0, 2, 1, 3, 4])
}

/// `(b, c, t, h, w) → (b·t, c, h, w)`.
pub fn video_to_frames(xs: &Tensor) -> Result<Tensor> {
    let (b, c, t, h, w) = xs.dims5()?;
    permute(xs, &[0, 2, 1, 3, 4])?.reshape((b * t, c, h, w))
}

/// Sinusoidal embedding of scalar timesteps, `[cos, sin]` halves, computed in f32 exactly as
/// the reference (`timestep_embedding`, max period 1e4).
pub fn timestep_embedding(values: &[f32], dim: usize, dev: &candle_core::Device) -> Result<Tensor> {
    let half = dim / 2;
    let neg_log = -(10000f64.ln()) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| (neg_log * i as f32 / half as f32).exp()).collect();
    let mut out = Vec::with_capacity(values.len() * dim);
    for &t in values {
        out.extend(freqs.iter().map(|f| (t * f).cos()));
        out.extend(freqs.iter().map(|f| (t * f).sin()));
        if dim % 2 == 1 {
            out.push(0.0);
        }
    }
    Tensor::from_vec(out, (values.len(), dim), dev)
}

pub fn silu(xs: &Tensor) -> Result<Tensor> {
    xs.silu()
}

