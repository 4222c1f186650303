//! SD-style KL autoencoder (`first_stage_model.`): encoder → posterior moments, decoder.
//! Frames are independent (a 2-D VAE); callers fold frames into the batch.

use super::layers::{attention, conv2d, conv3x3, group_norm, Conv2d, Conv3x3, GroupNorm};
use crate::compute::Backend;
use crate::config::VaeConfig;
use candle_core::{Module, Result, Tensor};
use dynamicrafter_kernels::ConvExtras;
use candle_nn::VarBuilder;

const EPS: f64 = 1e-6;

#[derive(Debug, Clone)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv3x3,
    norm2: GroupNorm,
    conv2: Conv3x3,
    nin_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(ci: usize, co: usize, vb: VarBuilder, backend: &Backend) -> Result<Self> {
        Ok(Self {
            norm1: group_norm(ci, EPS, vb.pp("norm1"))?,
            conv1: conv3x3(ci, co, vb.pp("conv1"), backend)?,
            norm2: group_norm(co, EPS, vb.pp("norm2"))?,
            conv2: conv3x3(co, co, vb.pp("conv2"), backend)?,
            nin_shortcut: if ci != co { Some(conv2d(ci, co, 1, 0, 1, vb.pp("nin_shortcut"))?) } else { None },
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // Each group norm + SiLU goes into its convolution's input copy where the kernel has one.
        let h = self.conv1.forward_normed(xs, &self.norm1.fused(true), ConvExtras::default())?;
        // The shortcut goes into conv2's output (in its epilogue where the kernel has one).
        let shortcut = self.nin_shortcut.as_ref().map(|s| s.forward(xs)).transpose()?;
        self.conv2.forward_normed(&h, &self.norm2.fused(true), ConvExtras { per_sample: None, residual: Some(shortcut.as_ref().unwrap_or(xs)) })
    }
}

/// Single-head spatial self-attention of the mid block, 1×1-conv projections.
#[derive(Debug, Clone)]
struct AttnBlock {
    norm: GroupNorm,
    q: Conv2d,
    k: Conv2d,
    v: Conv2d,
    proj_out: Conv2d,
}

impl AttnBlock {
    fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm: group_norm(c, EPS, vb.pp("norm"))?,
            q: conv2d(c, c, 1, 0, 1, vb.pp("q"))?,
            k: conv2d(c, c, 1, 0, 1, vb.pp("k"))?,
            v: conv2d(c, c, 1, 0, 1, vb.pp("v"))?,
            proj_out: conv2d(c, c, 1, 0, 1, vb.pp("proj_out"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = xs.dims4()?;
        let hn = self.norm.forward(xs)?;
        let tokens = |t: Tensor| -> Result<Tensor> { t.flatten_from(2)?.transpose(1, 2) }; // (n, hw, c)
        let q = tokens(self.q.forward(&hn)?)?;
        let k = tokens(self.k.forward(&hn)?)?;
        let v = tokens(self.v.forward(&hn)?)?;
        let out = attention(&q, &k, &v, (c as f64).powf(-0.5), None)?;
        let out = out.transpose(1, 2)?.reshape((n, c, h, w))?;
        xs + self.proj_out.forward(&out)?
    }
}

#[derive(Debug, Clone)]
struct Mid {
    block_1: ResnetBlock,
    attn_1: AttnBlock,
    block_2: ResnetBlock,
}

impl Mid {
    fn new(c: usize, vb: VarBuilder, backend: &Backend) -> Result<Self> {
        Ok(Self {
            block_1: ResnetBlock::new(c, c, vb.pp("block_1"), backend)?,
            attn_1: AttnBlock::new(c, vb.pp("attn_1"))?,
            block_2: ResnetBlock::new(c, c, vb.pp("block_2"), backend)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.block_2.forward(&self.attn_1.forward(&self.block_1.forward(xs)?)?)
    }
}

#[derive(Debug, Clone)]
struct Level<R> {
    blocks: Vec<ResnetBlock>,
    resample: Option<R>,
}

#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv3x3,
    down: Vec<Level<Conv2d>>,
    mid: Mid,
    norm_out: GroupNorm,
    conv_out: Conv3x3,
}

impl Encoder {
    fn new(cfg: &VaeConfig, vb: VarBuilder, backend: &Backend) -> Result<Self> {
        let mut down = Vec::new();
        let mut block_in = cfg.ch;
        for (i, &mult) in cfg.ch_mult.iter().enumerate() {
            let l = vb.pp(format!("down.{i}"));
            let block_out = cfg.ch * mult;
            let mut blocks = Vec::new();
            for b in 0..cfg.num_res_blocks {
                blocks.push(ResnetBlock::new(block_in, block_out, l.pp(format!("block.{b}")), backend)?);
                block_in = block_out;
            }
            let resample = if i + 1 != cfg.ch_mult.len() {
                Some(conv2d(block_in, block_in, 3, 0, 2, l.pp("downsample.conv"))?)
            } else {
                None
            };
            down.push(Level { blocks, resample });
        }
        let z = if cfg.double_z { 2 * cfg.z_channels } else { cfg.z_channels };
        Ok(Self {
            conv_in: conv3x3(cfg.in_channels, cfg.ch, vb.pp("conv_in"), backend)?,
            down,
            mid: Mid::new(block_in, vb.pp("mid"), backend)?,
            norm_out: group_norm(block_in, EPS, vb.pp("norm_out"))?,
            conv_out: conv3x3(block_in, z, vb.pp("conv_out"), backend)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(xs)?;
        for level in &self.down {
            for b in &level.blocks {
                h = b.forward(&h)?;
            }
            if let Some(conv) = &level.resample {
                // Right/bottom-only zero pad, unlike the UNet's symmetric one.
                h = conv.forward(&h.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?)?;
            }
        }
        let h = self.mid.forward(&h)?;
        self.conv_out.forward_normed(&h, &self.norm_out.fused(true), ConvExtras::default())
    }
}

#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv3x3,
    mid: Mid,
    /// Indexed by resolution level; run from the last to the first.
    up: Vec<Level<Conv3x3>>,
    norm_out: GroupNorm,
    conv_out: Conv3x3,
}

impl Decoder {
    fn new(cfg: &VaeConfig, vb: VarBuilder, backend: &Backend) -> Result<Self> {
        let levels = cfg.ch_mult.len();
        let mut block_in = cfg.ch * cfg.ch_mult[levels - 1];
        let conv_in = conv3x3(cfg.z_channels, block_in, vb.pp("conv_in"), backend)?;
        let mid = Mid::new(block_in, vb.pp("mid"), backend)?;
        let mut up = Vec::with_capacity(levels);
        for i in (0..levels).rev() {
            let l = vb.pp(format!("up.{i}"));
            let block_out = cfg.ch * cfg.ch_mult[i];
            let mut blocks = Vec::new();
            for b in 0..=cfg.num_res_blocks {
                blocks.push(ResnetBlock::new(block_in, block_out, l.pp(format!("block.{b}")), backend)?);
                block_in = block_out;
            }
            let resample = if i != 0 { Some(conv3x3(block_in, block_in, l.pp("upsample.conv"), backend)?) } else { None };
            up.push(Level { blocks, resample });
        }
        up.reverse();
        Ok(Self {
            conv_in,
            mid,
            up,
            norm_out: group_norm(block_in, EPS, vb.pp("norm_out"))?,
            conv_out: conv3x3(block_in, cfg.out_ch, vb.pp("conv_out"), backend)?,
        })
    }

    /// Returns the output and the mid-block output (the fixtures' `vae.dec.debug.mid`).
    fn forward(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        let h = self.conv_in.forward(z)?;
        let mid = self.mid.forward(&h)?;
        let mut h = mid.clone();
        for level in self.up.iter().rev() {
            for b in &level.blocks {
                h = b.forward(&h)?;
            }
            if let Some(conv) = &level.resample {
                h = conv.forward_upsampled(&h)?;
            }
        }
        let out = self.conv_out.forward_normed(&h, &self.norm_out.fused(true), ConvExtras::default())?;
        Ok((out, mid))
    }
}

/// Diagonal Gaussian posterior `q(z|x)`.
#[derive(Debug, Clone)]
pub struct Posterior {
    pub moments: Tensor,
    pub mean: Tensor,
    /// Clamped to [-30, 20] as the reference does.
    pub logvar: Tensor,
    pub std: Tensor,
}

impl Posterior {
    /// `mean + std·noise`.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        self.mean.broadcast_add(&(&self.std * noise)?)
    }
}

#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Conv2d,
    post_quant_conv: Conv2d,
    embed_dim: usize,
}

impl AutoencoderKL {
    pub fn new(cfg: &VaeConfig, vb: VarBuilder, backend: &Backend) -> Result<Self> {
        let z2 = if cfg.double_z { 2 * cfg.z_channels } else { cfg.z_channels };
        Ok(Self {
            encoder: Encoder::new(cfg, vb.pp("encoder"), backend)?,
            decoder: Decoder::new(cfg, vb.pp("decoder"), backend)?,
            quant_conv: conv2d(z2, 2 * cfg.embed_dim, 1, 0, 1, vb.pp("quant_conv"))?,
            post_quant_conv: conv2d(cfg.embed_dim, cfg.z_channels, 1, 0, 1, vb.pp("post_quant_conv"))?,
            embed_dim: cfg.embed_dim,
        })
    }

    /// `images`: `(n, 3, H, W)` in [-1, 1].
    pub fn encode(&self, images: &Tensor) -> Result<Posterior> {
        let moments = self.quant_conv.forward(&self.encoder.forward(images)?)?;
        let mean = moments.narrow(1, 0, self.embed_dim)?;
        let logvar = moments.narrow(1, self.embed_dim, self.embed_dim)?.clamp(-30f32, 20f32)?;
        let std = (&logvar * 0.5)?.exp()?;
        Ok(Posterior { moments, mean, logvar, std })
    }

    /// `z`: unscaled latents `(n, embed_dim, h, w)`. Returns the image and, for tests, the
    /// `post_quant_conv` and mid-block activations.
    pub fn decode_with_debug(&self, z: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let pq = self.post_quant_conv.forward(z)?;
        let (out, mid) = self.decoder.forward(&pq)?;
        Ok((out, pq, mid))
    }

    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        Ok(self.decode_with_debug(z)?.0)
    }
}
