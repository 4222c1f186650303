//! Perceiver `Resampler` (`image_proj_model.`): CLIP image tokens → `num_queries` context tokens
//! per frame.

use super::layers::{layer_norm, linear, linear_no_bias, multi_head_attention, Linear};
use crate::compute::Backend;
use crate::config::ResamplerConfig;
use candle_core::{Module, Result, Tensor, D};
use candle_nn::{LayerNorm, VarBuilder};

#[derive(Debug, Clone)]
struct PerceiverAttention {
    norm1: LayerNorm,
    norm2: LayerNorm,
    to_q: Linear,
    to_kv: Linear,
    to_out: Linear,
    heads: usize,
    dim_head: usize,
}

impl PerceiverAttention {
    fn new(cfg: &ResamplerConfig, vb: VarBuilder, backend: &Backend) -> Result<Self> {
        let inner = cfg.heads * cfg.dim_head;
        Ok(Self {
            norm1: layer_norm(cfg.dim, 1e-5, vb.pp("norm1"))?,
            norm2: layer_norm(cfg.dim, 1e-5, vb.pp("norm2"))?,
            to_q: linear_no_bias(cfg.dim, inner, vb.pp("to_q"), backend)?,
            to_kv: linear_no_bias(cfg.dim, 2 * inner, vb.pp("to_kv"), backend)?,
            to_out: linear_no_bias(inner, cfg.dim, vb.pp("to_out"), backend)?,
            heads: cfg.heads,
            dim_head: cfg.dim_head,
        })
    }

    /// `image`: `(n, tokens, dim)`, `latents`: `(n, queries, dim)`.
    fn forward(&self, image: &Tensor, latents: &Tensor) -> Result<Tensor> {
        let xn = self.norm1.forward(image)?;
        let ln = self.norm2.forward(latents)?;
        let inner = self.heads * self.dim_head;
        // q and k are each scaled by d^(-1/4) in the reference; one d^(-1/2) on the product is
        // the same up to rounding, so scale both explicitly to stay bit-close.
        let s = (self.dim_head as f64).powf(-0.25);
        let q = (self.to_q.forward(&ln)? * s)?;
        let kv = self.to_kv.forward(&Tensor::cat(&[&xn, &ln], 1)?)?;
        let k = (kv.narrow(D::Minus1, 0, inner)? * s)?;
        let v = kv.narrow(D::Minus1, inner, inner)?;
        let out = multi_head_attention(&q, &k, &v, self.heads, 1.0, None)?;
        self.to_out.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct FeedForward {
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl FeedForward {
    fn new(cfg: &ResamplerConfig, vb: VarBuilder, backend: &Backend) -> Result<Self> {
        let hidden = cfg.dim * cfg.ff_mult;
        Ok(Self {
            norm: layer_norm(cfg.dim, 1e-5, vb.pp("0"))?,
            fc1: linear_no_bias(cfg.dim, hidden, vb.pp("1"), backend)?,
            fc2: linear_no_bias(hidden, cfg.dim, vb.pp("3"), backend)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(&self.norm.forward(xs)?)?.gelu_erf()?)
    }
}

#[derive(Debug, Clone)]
pub struct Resampler {
    latents: Tensor,
    proj_in: Linear,
    layers: Vec<(PerceiverAttention, FeedForward)>,
    proj_out: Linear,
    norm_out: LayerNorm,
}

impl Resampler {
    pub fn new(cfg: &ResamplerConfig, vb: VarBuilder, backend: &Backend) -> Result<Self> {
        let layers = (0..cfg.depth)
            .map(|i| {
                let l = vb.pp(format!("layers.{i}"));
                Ok((PerceiverAttention::new(cfg, l.pp("0"), backend)?, FeedForward::new(cfg, l.pp("1"), backend)?))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            latents: vb.get((1, cfg.num_queries * cfg.video_length, cfg.dim), "latents")?,
            proj_in: linear(cfg.embedding_dim, cfg.dim, vb.pp("proj_in"), backend)?,
            layers,
            proj_out: linear(cfg.dim, cfg.output_dim, vb.pp("proj_out"), backend)?,
            norm_out: layer_norm(cfg.output_dim, 1e-5, vb.pp("norm_out"))?,
        })
    }

    /// `tokens`: `(n, 257, embedding_dim)` → `(n, queries·frames, output_dim)`.
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        let n = tokens.dim(0)?;
        let (_, q, d) = self.latents.dims3()?;
        let mut latents = self.latents.broadcast_as((n, q, d))?.contiguous()?;
        let image = self.proj_in.forward(tokens)?;
        for (attn, ff) in &self.layers {
            latents = (attn.forward(&image, &latents)? + &latents)?;
            latents = (ff.forward(&latents)? + &latents)?;
        }
        self.norm_out.forward(&self.proj_out.forward(&latents)?)
    }
}
