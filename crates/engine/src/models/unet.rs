//! DynamiCrafter's 3-D UNet (`model.diffusion_model.`, `openaimodel3d.py::UNetModel`).
//!
//! Activations are `(b·t, c, h, w)` ("frames folded into the batch"), unfolded to
//! `(b, c, t, h, w)` only inside temporal convs and temporal transformers.

use super::layers::{
    attend, attend_add, conv1x1, conv1x1_as_linear, conv3x3, downsample, frames_to_video, group_norm, layer_norm, linear, linear_no_bias, silu, temporal_conv, timestep_embedding,
    video_to_frames, Conv1x1, Conv3x3, Downsample, GroupNorm, Linear, TemporalConv,
};
use crate::compute::{Backend, Kernel};
use crate::config::UnetConfig;
use dynamicrafter_kernels::ConvExtras;
use candle_core::{Module, Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

/// Length of the text part of the context; hard-coded in the reference.
pub const TEXT_CONTEXT_LEN: usize = 77;
/// Image tokens per frame emitted by the Resampler; hard-coded in the reference.
pub const IMAGE_TOKENS_PER_FRAME: usize = 16;

/// ModelScope temporal conv block: four GN → SiLU → conv(3,1,1) stages over time, plus residual.
#[derive(Debug, Clone)]
struct TemporalConvBlock {
    stages: Vec<(GroupNorm, TemporalConv)>,
}

impl TemporalConvBlock {
    fn new(c: usize, vb: VarBuilder, backend: &Backend) -> Result<Self> {
        let stages = (1..=4)
            .map(|i| {
                let s = vb.pp(format!("conv{i}"));
                let conv_idx = if i == 1 { "2" } else { "3" }; // conv1 has no dropout slot
                let conv = s.pp(conv_idx);
                Ok((group_norm(c, 1e-5, s.pp("0"))?, temporal_conv(c, conv, backend)?))
            })
            .collect::<Result<_>>()?;
        Ok(Self { stages })
    }

    /// `xs`: frames `(b·t, c, h, w)` of `b` videos. Where every convolution takes frames (CUDA's
    /// implicit GEMM: the norms over the video read in runs, the output written as frames) the
    /// block never leaves that layout; elsewhere it runs on the video `(b, c, t, h, w)`, one
    /// permute each way.
    fn forward(&self, xs: &Tensor, b: usize) -> Result<Tensor> {
        let t = xs.dim(0)? / b;
        if self.stages.iter().all(|(norm, conv)| conv.takes_frames(xs, t, &norm.fused(true))) {
            let mut hs = xs.clone();
            let last = self.stages.len() - 1;
            for (i, (norm, conv)) in self.stages.iter().enumerate() {
                let residual = if i == last { Some(xs) } else { None };
                hs = conv.forward_frames_normed(&hs, t, &norm.fused(true), ConvExtras { per_sample: None, residual })?;
            }
            return Ok(hs);
        }
        video_to_frames(&self.forward_video(&frames_to_video(xs, b)?)?)
    }

    /// `xs`: `(b, c, t, h, w)`.
    fn forward_video(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, t, h, w) = xs.dims5()?;
        let mut hs = xs.clone();
        let last = self.stages.len() - 1;
        for (i, (norm, conv)) in self.stages.iter().enumerate() {
            // The norm over (b, c, t·h·w) as it lies: the same groups as over (b, c, t, h, w).
            let a = hs.reshape((b, c, t, h * w))?;
            // The block's residual goes into the last convolution's output.
            let residual = if i == last { Some(xs.reshape((b, c, t, h * w))?) } else { None };
            hs = conv.forward_normed(&a, &norm.fused(true), ConvExtras { per_sample: None, residual: residual.as_ref() })?.reshape((b, c, t, h, w))?;
        }
        Ok(hs)
    }
}

#[derive(Debug, Clone)]
struct ResBlock {
    in_norm: GroupNorm,
    in_conv: Conv3x3,
    emb_proj: Linear,
    out_norm: GroupNorm,
    out_conv: Conv3x3,
    skip: Option<Conv1x1>,
    temporal_conv: TemporalConvBlock,
}

impl ResBlock {
    fn new(ci: usize, co: usize, emb_dim: usize, vb: VarBuilder, backend: &Backend) -> Result<Self> {
        Ok(Self {
            in_norm: group_norm(ci, 1e-5, vb.pp("in_layers.0"))?,
            in_conv: conv3x3(ci, co, vb.pp("in_layers.2"), backend)?,
            emb_proj: linear(emb_dim, co, vb.pp("emb_layers.1"), backend)?,
            out_norm: group_norm(co, 1e-5, vb.pp("out_layers.0"))?,
            out_conv: conv3x3(co, co, vb.pp("out_layers.3"), backend)?,
            skip: if ci != co { Some(conv1x1(ci, co, vb.pp("skip_connection"), backend)?) } else { None },
            temporal_conv: TemporalConvBlock::new(co, vb.pp("temopral_conv"), backend)?, // sic
        })
    }

    /// `xs`: `(b·t, ci, h, w)`, `emb`: `(b·t, emb_dim)`.
    fn forward(&self, xs: &Tensor, emb: &Tensor, b: usize) -> Result<Tensor> {
        // One binding reassigned (not shadowed): each activation is freed as soon as the next
        // exists, which sets the forward's peak memory.
        // The timestep embedding and the skip connection are added in the convolutions' epilogues
        // where the kernel has one (a 1×1 skip, where channels change, is computed first and held
        // through out_conv).
        let e = self.emb_proj.forward(&silu(emb)?)?;
        // Each group norm + SiLU goes into its convolution's input copy where the kernel has one.
        let mut h = self.in_conv.forward_normed(xs, &self.in_norm.fused(true), ConvExtras { per_sample: Some(&e), residual: None })?;
        let skip = self.skip.as_ref().map(|s| s.forward(xs)).transpose()?;
        h = self.out_conv.forward_normed(&h, &self.out_norm.fused(true), ConvExtras { per_sample: None, residual: Some(skip.as_ref().unwrap_or(xs)) })?;
        drop(skip);
        self.temporal_conv.forward(&h, b)
    }
}

/// What an attention attends to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AttentionKind {
    /// Its own input (`attn1`; `attn2` of the temporal transformers).
    SelfAttention,
    /// Text and image tokens (`to_k_ip/to_v_ip`); `learnable_scale`: the 256 model's `alpha`.
    DualCross { learnable_scale: bool },
}

/// The q/k/v projections: one layer each, or for a self-attention where the backend says so one
/// product with the three weights stacked (q, k, v are then views of its output).
#[derive(Debug, Clone)]
enum Projections {
    Separate { to_q: Linear, to_k: Linear, to_v: Linear },
    Stacked { qkv: Linear },
}

/// `CrossAttention`; with `to_k_ip/to_v_ip` it is the dual text/image cross-attention.
#[derive(Debug, Clone)]
struct Attention {
    projections: Projections,
    image: Option<(Linear, Linear)>,
    /// 256 model: the image branch is scaled by `tanh(alpha) + 1`, worked out once at load (in
    /// f32, as the tensor ops did) so a forward scales with one contiguous op.
    image_scale: Option<f64>,
    to_out: Linear,
    heads: usize,
    scale: f64,
    /// The kernel of the attention's own products (the backend's choice).
    kernel: Kernel,
}

impl Attention {
    fn new(dim: usize, context_dim: usize, heads: usize, dim_head: usize, kind: AttentionKind, vb: VarBuilder, backend: &Backend) -> Result<Self> {
        let inner = heads * dim_head;
        let image = if let AttentionKind::DualCross { .. } = kind {
            Some((
                linear_no_bias(context_dim, inner, vb.pp("to_k_ip"), backend)?,
                linear_no_bias(context_dim, inner, vb.pp("to_v_ip"), backend)?,
            ))
        } else {
            None
        };
        let to_q = linear_no_bias(dim, inner, vb.pp("to_q"), backend)?;
        let to_k = linear_no_bias(context_dim, inner, vb.pp("to_k"), backend)?;
        let to_v = linear_no_bias(context_dim, inner, vb.pp("to_v"), backend)?;
        let kernel = backend.attention(&vb, to_q.kernel());
        let stack = kind == AttentionKind::SelfAttention && backend.fused_qkv([to_q.kernel(), to_k.kernel(), to_v.kernel()], kernel, dim_head);
        let separate = Projections::Separate { to_q, to_k, to_v };
        let projections = if stack { separate.stacked()? } else { separate };
        Ok(Self {
            kernel,
            projections,
            image,
            image_scale: if let AttentionKind::DualCross { learnable_scale: true } = kind {
                let alpha = vb.get((), "alpha")?.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
                Some((alpha.tanh() + 1.0) as f64)
            } else {
                None
            },
            to_out: linear(inner, dim, vb.pp("to_out.0"), backend)?,
            heads,
            scale: (dim_head as f64).powf(-0.5),
        })
    }

    /// `softmax(q·kᵀ·scale)·v` per head on projected `(n, l, heads·d)` tensors.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        attend(self.kernel, q, k, v, self.heads, self.scale)
    }

    /// `to_out(attention(xs, context)) + residual` (the residual joining the output projection's
    /// bias) and `norm` of it (the block's next norm), made together where the kernels can.
    fn forward_add_norm(&self, xs: &Tensor, context: Option<&Tensor>, residual: &Tensor, norm: &LayerNorm) -> Result<(Tensor, Tensor)> {
        self.to_out.forward_add_norm(&self.attend_context(xs, context)?, residual, norm)
    }

    /// The attention before `to_out`: over `xs` itself, or the text (and image) context.
    fn attend_context(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let out = match (&self.projections, &self.image, context) {
            (Projections::Stacked { qkv }, _, None) => {
                let p = qkv.forward(xs)?;
                let c = p.dim(2)? / 3;
                self.attend(&p.narrow(2, 0, c)?, &p.narrow(2, c, c)?, &p.narrow(2, 2 * c, c)?)?
            }
            (Projections::Stacked { .. }, _, Some(_)) => candle_core::bail!("a self-attention was given a context"),
            (Projections::Separate { to_q, to_k, to_v }, Some((to_k_ip, to_v_ip)), Some(ctx)) => {
                let q = to_q.forward(xs)?;
                let len = ctx.dim(1)?;
                let text = ctx.narrow(1, 0, TEXT_CONTEXT_LEN)?;
                let img = ctx.narrow(1, TEXT_CONTEXT_LEN, len - TEXT_CONTEXT_LEN)?;
                let out_txt = self.attend(&q, &to_k.forward(&text)?, &to_v.forward(&text)?)?;
                // out_txt + image_scale · attention(image tokens).
                attend_add(self.kernel, &q, &to_k_ip.forward(&img)?, &to_v_ip.forward(&img)?, self.heads, self.scale, self.image_scale, &out_txt)?
            }
            (Projections::Separate { to_q, to_k, to_v }, _, ctx) => {
                let ctx = ctx.unwrap_or(xs);
                self.attend(&to_q.forward(xs)?, &to_k.forward(ctx)?, &to_v.forward(ctx)?)?
            }
        };
        Ok(out)
    }
}

impl Projections {
    /// Separate candle products as one, the weights stacked `[q; k; v]` along the output axis
    /// (a product's rows are independent: the same dot products).
    fn stacked(&self) -> Result<Self> {
        match self {
            Projections::Separate { to_q: Linear::Float(q), to_k: Linear::Float(k), to_v: Linear::Float(v) }
                if q.bias().is_none() && k.bias().is_none() && v.bias().is_none() =>
            {
                Ok(Projections::Stacked { qkv: Linear::new(Tensor::cat(&[q.weight(), k.weight(), v.weight()], 0)?, None) })
            }
            _ => candle_core::bail!("only bias-free candle projections are stacked"),
        }
    }
}

#[derive(Debug, Clone)]
struct BasicTransformerBlock {
    attn1: Attention,
    attn2: Attention,
    ff_proj: Linear,
    ff_out: Linear,
    norm1: LayerNorm,
    norm2: LayerNorm,
    norm3: LayerNorm,
    /// Rows per feed-forward piece ([`Backend::ff_chunk_rows`]).
    ff_chunk_rows: Option<usize>,
}

impl BasicTransformerBlock {
    /// `context_dim` None: both attentions are self-attention (temporal transformers).
    fn new(
        dim: usize,
        heads: usize,
        dim_head: usize,
        context_dim: Option<usize>,
        learnable_scale: bool,
        vb: VarBuilder,
        backend: &Backend,
    ) -> Result<Self> {
        let inner = heads * dim_head;
        Ok(Self {
            attn1: Attention::new(dim, dim, heads, dim_head, AttentionKind::SelfAttention, vb.pp("attn1"), backend)?,
            attn2: Attention::new(
                dim,
                context_dim.unwrap_or(dim),
                heads,
                dim_head,
                if context_dim.is_some() { AttentionKind::DualCross { learnable_scale } } else { AttentionKind::SelfAttention },
                vb.pp("attn2"),
                backend,
            )?,
            ff_proj: linear(dim, inner * 8, vb.pp("ff.net.0.proj"), backend)?,
            ff_out: linear(inner * 4, dim, vb.pp("ff.net.2"), backend)?,
            norm1: layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            norm2: layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            norm3: layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff_chunk_rows: backend.ff_chunk_rows(),
        })
    }

    fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        // Each attention's output joins the residual stream together with the next norm of it.
        let (xs, normed) = self.attn1.forward_add_norm(&self.norm1.forward(xs)?, None, xs, &self.norm2)?;
        let (xs, normed) = self.attn2.forward_add_norm(&normed, context, &xs, &self.norm3)?;
        let ff = |x: &Tensor, residual: &Tensor| self.ff_out.forward_add(&self.ff_proj.forward_geglu(x)?, residual);
        let (b, n, c) = xs.dims3()?;
        match self.ff_chunk_rows {
            // Row by row the same maths: every token's feed-forward is its own.
            Some(rows) if b * n > rows => {
                let (x, r) = (normed.reshape((b * n, c))?, xs.reshape((b * n, c))?);
                let pieces = (0..b * n)
                    .step_by(rows)
                    .map(|start| {
                        let len = rows.min(b * n - start);
                        ff(&x.narrow(0, start, len)?, &r.narrow(0, start, len)?)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&pieces, 0)?.reshape((b, n, c))
            }
            _ => ff(&normed, &xs),
        }
    }
}

/// Per-frame spatial transformer with the dual text/image cross-attention.
#[derive(Debug, Clone)]
struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
}

impl SpatialTransformer {
    fn new(c: usize, heads: usize, dim_head: usize, cfg: &UnetConfig, vb: VarBuilder, backend: &Backend) -> Result<Self> {
        let inner = heads * dim_head;
        let blocks = (0..cfg.transformer_depth)
            .map(|i| {
                BasicTransformerBlock::new(
                    inner,
                    heads,
                    dim_head,
                    Some(cfg.context_dim),
                    cfg.image_cross_attention_scale_learnable,
                    vb.pp(format!("transformer_blocks.{i}")),
                    backend,
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            norm: group_norm(c, 1e-6, vb.pp("norm"))?,
            proj_in: linear(c, inner, vb.pp("proj_in"), backend)?,
            blocks,
            proj_out: linear(inner, c, vb.pp("proj_out"), backend)?,
        })
    }

    /// `xs`: `(b·t, c, h, w)`; `context`: `(b·t, l, context_dim)`.
    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = xs.dims4()?;
        // The norm and the permute to tokens in one pass where the kernel has one.
        let mut hs = self.proj_in.forward(&dynamicrafter_kernels::group_norm_tokens(xs, &self.norm.fused(false))?)?;
        for block in &self.blocks {
            hs = block.forward(&hs, Some(context))?;
        }
        // (n, h·w, c) → (n, c, h·w), plus the input.
        self.proj_out.forward_permute_add(&hs, &[n, h * w, c], &[0, 2, 1], &xs.reshape((n, c, h * w))?)?.reshape((n, c, h, w))
    }
}

/// Self-attention over frames at every spatial location.
#[derive(Debug, Clone)]
struct TemporalTransformer {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
}

impl TemporalTransformer {
    /// `conv_proj`: `proj_in/out` are stored as Conv1d(k=1) (only `init_attn`).
    fn new(c: usize, heads: usize, dim_head: usize, depth: usize, conv_proj: bool, vb: VarBuilder, backend: &Backend) -> Result<Self> {
        let inner = heads * dim_head;
        let (proj_in, proj_out) = if conv_proj {
            (conv1x1_as_linear(c, inner, vb.pp("proj_in"), backend)?, conv1x1_as_linear(inner, c, vb.pp("proj_out"), backend)?)
        } else {
            (linear(c, inner, vb.pp("proj_in"), backend)?, linear(inner, c, vb.pp("proj_out"), backend)?)
        };
        let blocks = (0..depth)
            .map(|i| BasicTransformerBlock::new(inner, heads, dim_head, None, false, vb.pp(format!("transformer_blocks.{i}")), backend))
            .collect::<Result<_>>()?;
        Ok(Self { norm: group_norm(c, 1e-6, vb.pp("norm"))?, proj_in, blocks, proj_out })
    }

    /// `xs`: `(b·t, c, h, w)`; returns the same layout.
    fn forward(&self, xs: &Tensor, b: usize) -> Result<Tensor> {
        let (bt, c, h, w) = xs.dims4()?;
        let t = bt / b;
        // The norm's statistics span all frames (the video (b, c, t, h, w)), then the tokens
        // (b·h·w, t, c): one pass where the kernel has one.
        let mut hs = self.proj_in.forward(&dynamicrafter_kernels::group_norm_frame_tokens(xs, t, &self.norm.fused(false))?)?;
        for block in &self.blocks {
            hs = block.forward(&hs, None)?;
        }
        // (b·h·w, t, c) → (b, t, c, h, w), plus the input.
        self.proj_out.forward_permute_add(&hs, &[b, h, w, t, c], &[0, 3, 4, 1, 2], &xs.reshape((b, t, c, h, w))?)?.reshape((bt, c, h, w))
    }
}

#[derive(Debug, Clone)]
enum Layer {
    Conv(Conv3x3),
    Res(ResBlock),
    Spatial(SpatialTransformer),
    Temporal(TemporalTransformer),
    Down(Downsample),
    Up(Conv3x3),
}

impl Layer {
    fn forward(&self, xs: &Tensor, emb: &Tensor, context: &Tensor, b: usize) -> Result<Tensor> {
        match self {
            Layer::Conv(c) => c.forward(xs),
            Layer::Down(c) => c.forward(xs),
            Layer::Res(r) => r.forward(xs, emb, b),
            Layer::Spatial(s) => s.forward(xs, context),
            Layer::Temporal(t) => t.forward(xs, b),
            Layer::Up(c) => c.forward_upsampled(xs),
        }
    }
}

/// Inputs of one UNet call.
pub struct UnetInput<'a> {
    /// `(b, in_channels, t, h, w)`: noisy latent then `c_concat` on channels.
    pub x: &'a Tensor,
    /// DDPM timestep per batch element.
    pub timesteps: &'a [f32],
    /// `(b, l, context_dim)`: text tokens then image tokens.
    pub context: &'a Tensor,
    /// fs per batch element; `None` uses the config's `default_fs`.
    pub fs: Option<&'a [f32]>,
}

/// The per-frame conditioning of a forward ([`Unet::condition`]).
pub struct UnetConditioning {
    /// `(b·t, time_embed_dim)`: time + fps embedding, repeated per frame.
    pub emb: Tensor,
    /// `(b·t, l, context_dim)`: what each frame attends to.
    pub context: Tensor,
}

/// Intermediate activations the parity tests compare.
#[derive(Default)]
pub struct UnetTrace {
    pub time_embed: Option<Tensor>,
    pub fps_embedding: Option<Tensor>,
    pub init_attn: Option<Tensor>,
    /// Input block outputs (block 0 before `init_attn`, as a hook on the block sees it).
    pub input_blocks: Vec<Tensor>,
    pub middle_block: Option<Tensor>,
    pub output_blocks: Vec<Tensor>,
}

#[derive(Debug, Clone)]
pub struct Unet {
    time_embed: (Linear, Linear),
    fps_embedding: (Linear, Linear),
    input_blocks: Vec<Vec<Layer>>,
    init_attn: Option<TemporalTransformer>,
    middle_block: Vec<Layer>,
    output_blocks: Vec<Vec<Layer>>,
    out_norm: GroupNorm,
    out_conv: Conv3x3,
    cfg: UnetConfig,
}

fn mlp(in_dim: usize, out_dim: usize, vb: VarBuilder, backend: &Backend) -> Result<(Linear, Linear)> {
    Ok((linear(in_dim, out_dim, vb.pp("0"), backend)?, linear(out_dim, out_dim, vb.pp("2"), backend)?))
}

impl Unet {
    pub fn new(cfg: &UnetConfig, vb: VarBuilder, backend: &Backend) -> Result<Self> {
        let mc = cfg.model_channels;
        let emb_dim = cfg.time_embed_dim();
        let heads_for = |ch: usize| ch / cfg.num_head_channels;
        let attn_layers = |ch: usize, vb: &VarBuilder, first: usize| -> Result<Vec<Layer>> {
            Ok(vec![
                Layer::Spatial(SpatialTransformer::new(ch, heads_for(ch), cfg.num_head_channels, cfg, vb.pp(first.to_string()), backend)?),
                Layer::Temporal(TemporalTransformer::new(
                    ch,
                    heads_for(ch),
                    cfg.num_head_channels,
                    cfg.transformer_depth,
                    false,
                    vb.pp((first + 1).to_string()),
                    backend,
                )?),
            ])
        };

        let ib = vb.pp("input_blocks");
        let mut input_blocks = vec![vec![Layer::Conv(conv3x3(cfg.in_channels, mc, ib.pp("0.0"), backend)?)]];
        let mut skip_channels = vec![mc];
        let mut ch = mc;
        let mut ds = 1;
        for (level, &mult) in cfg.channel_mult.iter().enumerate() {
            for _ in 0..cfg.num_res_blocks {
                let b = ib.pp(input_blocks.len().to_string());
                let mut layers = vec![Layer::Res(ResBlock::new(ch, mult * mc, emb_dim, b.pp("0"), backend)?)];
                ch = mult * mc;
                if cfg.attention_resolutions.contains(&ds) {
                    layers.extend(attn_layers(ch, &b, 1)?);
                }
                input_blocks.push(layers);
                skip_channels.push(ch);
            }
            if level + 1 != cfg.channel_mult.len() {
                let b = ib.pp(input_blocks.len().to_string());
                input_blocks.push(vec![Layer::Down(downsample(ch, b.pp("0.op"), backend)?)]);
                skip_channels.push(ch);
                ds *= 2;
            }
        }

        let init_attn = if cfg.addition_attention {
            Some(TemporalTransformer::new(mc, 8, cfg.num_head_channels, cfg.transformer_depth, true, vb.pp("init_attn.0"), backend)?)
        } else {
            None
        };

        let mb = vb.pp("middle_block");
        let mut middle_block = vec![Layer::Res(ResBlock::new(ch, ch, emb_dim, mb.pp("0"), backend)?)];
        middle_block.extend(attn_layers(ch, &mb, 1)?);
        middle_block.push(Layer::Res(ResBlock::new(ch, ch, emb_dim, mb.pp("3"), backend)?));

        let ob = vb.pp("output_blocks");
        let mut output_blocks = Vec::new();
        for (level, &mult) in cfg.channel_mult.iter().enumerate().rev() {
            for i in 0..=cfg.num_res_blocks {
                let b = ob.pp(output_blocks.len().to_string());
                let skip = skip_channels.pop().ok_or_else(|| candle_core::Error::Msg("skip stack underflow".into()))?;
                let mut layers = vec![Layer::Res(ResBlock::new(ch + skip, mult * mc, emb_dim, b.pp("0"), backend)?)];
                ch = mult * mc;
                if cfg.attention_resolutions.contains(&ds) {
                    layers.extend(attn_layers(ch, &b, 1)?);
                }
                if level != 0 && i == cfg.num_res_blocks {
                    let idx = layers.len();
                    layers.push(Layer::Up(conv3x3(ch, ch, b.pp(format!("{idx}.conv")), backend)?));
                    ds /= 2;
                }
                output_blocks.push(layers);
            }
        }

        Ok(Self {
            time_embed: mlp(mc, emb_dim, vb.pp("time_embed"), backend)?,
            fps_embedding: mlp(mc, emb_dim, vb.pp("fps_embedding"), backend)?,
            input_blocks,
            init_attn,
            middle_block,
            output_blocks,
            out_norm: group_norm(mc, 1e-5, vb.pp("out.0"))?,
            out_conv: conv3x3(mc, cfg.out_channels, vb.pp("out.2"), backend)?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &UnetConfig {
        &self.cfg
    }

    fn embed(&self, mlp: &(Linear, Linear), values: &[f32], dtype: candle_core::DType, dev: &candle_core::Device) -> Result<Tensor> {
        let e = timestep_embedding(values, self.cfg.model_channels, dev)?.to_dtype(dtype)?;
        mlp.1.forward(&silu(&mlp.0.forward(&e)?)?)
    }

    /// Per-frame context: with exactly `77 + 16·t` tokens, frame j sees the text and its own 16
    /// image tokens; otherwise every frame sees the whole context.
    fn frame_context(context: &Tensor, t: usize) -> Result<Tensor> {
        let (b, l, c) = context.dims3()?;
        let repeat = |x: &Tensor| -> Result<Tensor> {
            let (b, l, c) = x.dims3()?;
            x.unsqueeze(1)?.broadcast_as((b, t, l, c))?.reshape((b * t, l, c))
        };
        if l == TEXT_CONTEXT_LEN + t * IMAGE_TOKENS_PER_FRAME {
            let text = repeat(&context.narrow(1, 0, TEXT_CONTEXT_LEN)?)?;
            let img = context
                .narrow(1, TEXT_CONTEXT_LEN, l - TEXT_CONTEXT_LEN)?
                .reshape((b * t, IMAGE_TOKENS_PER_FRAME, c))?;
            Tensor::cat(&[&text, &img], 1)
        } else {
            repeat(context)
        }
    }

    pub fn forward(&self, input: &UnetInput) -> Result<Tensor> {
        self.forward_traced(input, None)
    }

    pub fn forward_traced(&self, input: &UnetInput, mut trace: Option<&mut UnetTrace>) -> Result<Tensor> {
        let conditioning = self.condition(input, trace.as_deref_mut())?;
        self.forward_frames(input.x, &conditioning, trace)
    }

    /// What a forward derives from its timesteps, fs and context before the network runs: the
    /// per-frame embedding and context. The only part of a forward that reads host memory (the
    /// timesteps), so [`forward_conditioned`](Self::forward_conditioned) is device work alone
    /// (what a CUDA graph can capture).
    pub fn condition(&self, input: &UnetInput, trace: Option<&mut UnetTrace>) -> Result<UnetConditioning> {
        let x = input.x;
        let (b, _, t, _, _) = x.dims5()?;
        let (dtype, dev) = (x.dtype(), x.device());
        let t_emb = self.embed(&self.time_embed, input.timesteps, dtype, dev)?;
        let default_fs = vec![self.cfg.default_fs as f32; b];
        let fs = input.fs.unwrap_or(&default_fs);
        let fs_emb = self.embed(&self.fps_embedding, fs, dtype, dev)?;
        if let Some(tr) = trace {
            tr.time_embed = Some(t_emb.clone());
            tr.fps_embedding = Some(fs_emb.clone());
        }
        let emb = (t_emb + fs_emb)?;
        let e = emb.dim(1)?;
        let emb = emb.unsqueeze(1)?.broadcast_as((b, t, e))?.reshape((b * t, e))?.contiguous()?;
        let context = Self::frame_context(input.context, t)?.contiguous()?;
        Ok(UnetConditioning { emb, context })
    }

    /// The network on `x (b, in_channels, t, h, w)` with a [`condition`](Self::condition)ed input.
    pub fn forward_conditioned(&self, x: &Tensor, conditioning: &UnetConditioning) -> Result<Tensor> {
        self.forward_frames(x, conditioning, None)
    }

    fn forward_frames(&self, x: &Tensor, conditioning: &UnetConditioning, mut trace: Option<&mut UnetTrace>) -> Result<Tensor> {
        let (b, _, _, _, _) = x.dims5()?;
        let UnetConditioning { emb, context } = conditioning;
        let mut h = video_to_frames(x)?;
        let mut skips = Vec::with_capacity(self.input_blocks.len());
        for (i, block) in self.input_blocks.iter().enumerate() {
            for layer in block {
                h = layer.forward(&h, emb, context, b)?;
            }
            if let Some(tr) = trace.as_deref_mut() {
                tr.input_blocks.push(h.clone());
            }
            if i == 0 {
                if let Some(init_attn) = &self.init_attn {
                    h = init_attn.forward(&h, b)?;
                    if let Some(tr) = trace.as_deref_mut() {
                        tr.init_attn = Some(h.clone());
                    }
                }
            }
            skips.push(h.clone());
        }
        for layer in &self.middle_block {
            h = layer.forward(&h, emb, context, b)?;
        }
        if let Some(tr) = trace.as_deref_mut() {
            tr.middle_block = Some(h.clone());
        }
        for block in &self.output_blocks {
            let skip = skips.pop().ok_or_else(|| candle_core::Error::Msg("skip stack underflow".into()))?;
            h = Tensor::cat(&[&h, &skip], 1)?;
            drop(skip);
            for layer in block {
                h = layer.forward(&h, emb, context, b)?;
            }
            if let Some(tr) = trace.as_deref_mut() {
                tr.output_blocks.push(h.clone());
            }
        }
        let out = self.out_conv.forward_normed(&h, &self.out_norm.fused(true), ConvExtras::default())?;
        frames_to_video(&out, b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// A self-attention with its projections stacked into one product (what the backend does on a
    /// GPU) computes what the separate ones do: q, k, v as views of one output, read in place.
    #[test]
    fn stacked_projections_attend_as_separate_ones() {
        let dev = Device::Cpu;
        let (dim, heads, dim_head) = (48, 3, 16);
        let inner = heads * dim_head;
        let w = |rows, cols| Tensor::randn(0f32, 0.2, (rows, cols), &dev).unwrap();
        let separate = Attention {
            projections: Projections::Separate {
                to_q: Linear::new(w(inner, dim), None),
                to_k: Linear::new(w(inner, dim), None),
                to_v: Linear::new(w(inner, dim), None),
            },
            image: None,
            image_scale: None,
            to_out: Linear::new(w(dim, inner), Some(Tensor::randn(0f32, 0.2, dim, &dev).unwrap())),
            heads,
            scale: (dim_head as f64).powf(-0.5),
            kernel: Kernel::Candle,
        };
        let stacked = Attention { projections: separate.projections.stacked().unwrap(), ..separate.clone() };
        let xs = Tensor::randn(0f32, 1.0, (2, 37, dim), &dev).unwrap();
        let want = separate.attend_context(&xs, None).unwrap();
        let got = stacked.attend_context(&xs, None).unwrap();
        let diff = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff <= 1e-6 * scale, "stacked vs separate projections: max difference {diff:e} (outputs up to {scale})");
        assert_eq!(got.dtype(), DType::F32);
        // A self-attention has no context to take.
        assert!(stacked.attend_context(&xs, Some(&xs)).is_err());
        // Only bias-free candle products are stacked.
        let biased = Projections::Separate {
            to_q: Linear::new(w(inner, dim), Some(Tensor::zeros(inner, DType::F32, &dev).unwrap())),
            to_k: Linear::new(w(inner, dim), None),
            to_v: Linear::new(w(inner, dim), None),
        };
        assert!(biased.stacked().is_err());
    }
}
