//! Building blocks shared by the networks: norms with the reference's eps, convs, attention.

use crate::kernels::amx::Bf16Conv;
use crate::kernels::f32_matrix::F32Matrix;
use crate::quant::{self, Int8Matmul};
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Conv2dConfig, LayerNorm, VarBuilder};

/// A linear layer `y = x·Wᵀ + b` with a float weight, or an int8 one (`q8_0` blocks) when the
/// weights provide `<name>.q8_0` (see [`crate::quant`]).
#[derive(Debug, Clone)]
pub enum Linear {
    Float(candle_nn::Linear),
    Quantized { weight: Int8Matmul, bias: Option<Tensor> },
    /// bf16 products on the CPU's AMX tiles, f32 in and out, bias included (`--precision bf16`
    /// on a CPU).
    Bf16(std::sync::Arc<crate::kernels::amx::Bf16Matrix>),
    /// f32 on the CPU with AVX-512: the weight packed at load, the bias added in the product.
    F32(std::sync::Arc<F32Matrix>),
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::Float(candle_nn::Linear::new(weight, bias))
    }

    /// Reads weight `name` of an `[out, in]` layer (stored as `shape`), quantized if the weights
    /// offer it.
    fn load(vb: &VarBuilder, name: &str, out_dim: usize, in_dim: usize, shape: &[usize], bias: Option<Tensor>) -> Result<Self> {
        let qname = format!("{name}{}", quant::SUFFIX);
        if let Some(stored) = quant::stored_shape(&[out_dim, in_dim]).filter(|_| vb.contains_tensor(&qname)) {
            let raw = vb.get_with_hints_dtype(stored.to_vec(), &qname, candle_nn::Init::Const(0.), DType::U8)?;
            let weight = Int8Matmul::new(&raw, out_dim, in_dim, vb.device()).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            return Ok(Self::Quantized { weight, bias });
        }
        if amx_weights(vb, name, in_dim, out_dim) {
            let bname = format!("{name}{}", quant::BF16_SUFFIX);
            let w = vb.get_with_hints_dtype(shape.to_vec(), &bname, candle_nn::Init::Const(0.), DType::F32)?.reshape((out_dim, in_dim))?;
            return Ok(Self::Bf16(std::sync::Arc::new(crate::kernels::amx::Bf16Matrix::new(&w, bias.as_ref())?)));
        }
        let w = vb.get(shape.to_vec(), name)?.reshape((out_dim, in_dim))?;
        if vb.device().is_cpu() && vb.dtype() == DType::F32 && F32Matrix::supports(out_dim, in_dim) {
            return Ok(Self::F32(std::sync::Arc::new(F32Matrix::new(&w, bias.as_ref())?)));
        }
        Ok(Self::new(w, bias))
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Float(l) => l.forward(xs),
            Self::Quantized { weight, bias } => {
                let y = weight.forward(xs)?;
                match bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
            Self::Bf16(matrix) => matrix.forward(xs),
            Self::F32(matrix) => matrix.forward(xs),
        }
    }
}

pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let bias = vb.get(out_dim, "bias")?;
    Linear::load(&vb, "weight", out_dim, in_dim, &[out_dim, in_dim], Some(bias))
}

pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Linear::load(&vb, "weight", out_dim, in_dim, &[out_dim, in_dim], None)
}

/// A `Conv1d(k=1)` stored as `[out, in, 1]`, applied as the linear layer it is.
pub fn conv1x1_as_linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let bias = vb.get(out_dim, "bias")?;
    Linear::load(&vb, "weight", out_dim, in_dim, &[out_dim, in_dim, 1], Some(bias))
}

/// Whether weight `name` of a layer from `in_c` to `out_c` channels runs its products in bf16 on
/// the CPU's AMX tiles: the weights offer it (`--precision bf16` on a CPU, see
/// [`quant::Bf16OnLoad`]), the channels come in whole blocks and the CPU has AMX.
fn amx_weights(vb: &VarBuilder, name: &str, in_c: usize, out_c: usize) -> bool {
    vb.device().is_cpu()
        && in_c.is_multiple_of(32)
        && out_c.is_multiple_of(32)
        && vb.contains_tensor(&format!("{name}{}", quant::BF16_SUFFIX))
        && crate::kernels::amx::available()
}

/// candle's `Conv2d`, which on the CPU also takes bf16/f16 inputs (candle has no such CPU
/// convolution): they are computed in f32, as GPUs accumulate, and rounded back.
#[derive(Debug, Clone)]
pub struct Conv2d(candle_nn::Conv2d);

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if xs.device().is_cpu() && xs.dtype() != DType::F32 {
            let f32 = |t: &Tensor| t.to_dtype(DType::F32);
            let conv = candle_nn::Conv2d::new(f32(self.0.weight())?, self.0.bias().map(f32).transpose()?, *self.0.config());
            return conv.forward(&f32(xs)?)?.to_dtype(xs.dtype());
        }
        self.0.forward(xs)
    }
}

pub fn conv2d(
    in_c: usize,
    out_c: usize,
    kernel: usize,
    padding: usize,
    stride: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig { padding, stride, ..Default::default() };
    candle_nn::conv2d(in_c, out_c, kernel, cfg, vb).map(Conv2d)
}

/// 3×3 convolution, stride 1, padding 1, with bias (every such conv of the UNet and VAE): in
/// f32 on our AVX-512 kernel, in int8 when the weights are quantized and the CPU has VNNI, with
/// bf16 products on AMX, or on the shifted-GEMM kernel (other CPUs, CUDA).
#[derive(Debug, Clone)]
pub enum Conv3x3 {
    /// The weight taps first, `(9, co, ci)`, as the shifted GEMMs read it (rearranged once, at load).
    Float { taps: Tensor, bias: Tensor },
    Int8(std::sync::Arc<crate::kernels::Q8Conv>),
    Bf16(std::sync::Arc<Bf16Conv>),
    /// f32 on the CPU with AVX-512, the weight packed at load.
    F32(std::sync::Arc<crate::kernels::F32Conv>),
}

impl Module for Conv3x3 {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Float { taps, bias } => crate::kernels::conv3x3_taps(xs, taps, bias),
            Self::Int8(conv) => conv.forward(&xs.to_dtype(DType::F32)?)?.to_dtype(xs.dtype()),
            Self::Bf16(conv) => conv.forward(xs),
            Self::F32(conv) => conv.forward(xs),
        }
    }
}

/// The temporal Conv3d, kernel (3,1,1), padding (1,0,0), over `(b, c, t, h·w)`: our
/// shifted-GEMM kernel, or bf16 products on AMX.
#[derive(Debug, Clone)]
pub enum TemporalConv {
    Float { weight: Tensor, bias: Tensor },
    Bf16(std::sync::Arc<Bf16Conv>),
}

impl Module for TemporalConv {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Float { weight, bias } => crate::kernels::temporal_conv(xs, weight, bias),
            Self::Bf16(conv) => conv.forward(xs),
        }
    }
}

/// A temporal conv from `c` to `c` channels, stored `[c, c, 3, 1, 1]`.
pub fn temporal_conv(c: usize, vb: VarBuilder) -> Result<TemporalConv> {
    let weight = vb.get((c, c, 3, 1, 1), "weight")?;
    let bias = vb.get(c, "bias")?;
    if amx_weights(&vb, "weight", c, c) {
        return Ok(TemporalConv::Bf16(std::sync::Arc::new(Bf16Conv::temporal(&weight, &bias)?)));
    }
    Ok(TemporalConv::Float { weight, bias })
}

/// Whether a convolution over `in_c` channels runs in int8: its weights are quantized (stored
/// or on load), the input channels split into blocks and the CPU has the int8 kernel.
pub fn int8_conv(in_c: usize, vb: &VarBuilder) -> bool {
    vb.device().is_cpu()
        && crate::kernels::q8_available()
        && quant::stored_shape(&[1, in_c]).is_some()
        && vb.contains_tensor(&format!("weight{}", quant::SUFFIX))
}

pub fn conv3x3(in_c: usize, out_c: usize, vb: VarBuilder) -> Result<Conv3x3> {
    let weight = vb.get((out_c, in_c, 3, 3), "weight")?;
    let bias = vb.get(out_c, "bias")?;
    if int8_conv(in_c, &vb) {
        // Quantized in (tap, channel) blocks, the order the int8 kernel reads.
        return Ok(Conv3x3::Int8(std::sync::Arc::new(crate::kernels::Q8Conv::spatial_3x3(&weight, &bias)?)));
    }
    if amx_weights(&vb, "weight", in_c, out_c) {
        return Ok(Conv3x3::Bf16(std::sync::Arc::new(Bf16Conv::spatial_3x3(&weight, &bias)?)));
    }
    if vb.device().is_cpu() && vb.dtype() == DType::F32 && crate::kernels::F32Conv::supports(out_c) {
        return Ok(Conv3x3::F32(std::sync::Arc::new(crate::kernels::F32Conv::spatial_3x3(&weight, &bias)?)));
    }
    Ok(Conv3x3::Float { taps: crate::kernels::taps_first(&weight)?, bias })
}

pub fn conv2d_no_bias(
    in_c: usize,
    out_c: usize,
    kernel: usize,
    padding: usize,
    stride: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig { padding, stride, ..Default::default() };
    candle_nn::conv2d_no_bias(in_c, out_c, kernel, cfg, vb).map(Conv2d)
}

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
        crate::kernels::group_norm(xs, &self.weight, &self.bias, Self::GROUPS, self.eps, false)
    }

    /// `SiLU(norm(x))` in one pass.
    pub fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        crate::kernels::group_norm(xs, &self.weight, &self.bias, Self::GROUPS, self.eps, true)
    }
}

pub fn group_norm(channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    Ok(GroupNorm { weight: vb.get(channels, "weight")?, bias: vb.get(channels, "bias")?, eps })
}

pub fn layer_norm(dim: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    candle_nn::layer_norm(dim, candle_nn::LayerNormConfig { eps, ..Default::default() }, vb)
}

/// `(n, l, heads·d) → (n·heads, l, d)`, head-major channels as `einops 'b n (h d) -> (b h) n d'`.
pub fn split_heads(xs: &Tensor, heads: usize) -> Result<Tensor> {
    let (n, l, c) = xs.dims3()?;
    xs.reshape((n, l, heads, c / heads))?
        .transpose(1, 2)?
        .reshape((n * heads, l, c / heads))
}

/// Inverse of [`split_heads`].
pub fn merge_heads(xs: &Tensor, heads: usize) -> Result<Tensor> {
    let (nh, l, d) = xs.dims3()?;
    xs.reshape((nh / heads, heads, l, d))?
        .transpose(1, 2)?
        .reshape((nh / heads, l, heads * d))
}

/// `softmax(q·kᵀ·scale [+ mask])·v` over `(batch, len, dim)` tensors.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    match mask {
        None => crate::kernels::attention(q, k, v, scale),
        Some(m) => {
            // Softmax in f32 whatever the compute dtype (the precision policy).
            let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?.to_dtype(DType::F32)?;
            let probs = crate::kernels::softmax_last_dim(&scores.broadcast_add(&m.to_dtype(DType::F32)?)?)?;
            probs.to_dtype(v.dtype())?.matmul(&v.contiguous()?)
        }
    }
}

/// Multi-head attention with already-projected `q, k, v` of shape `(n, l, heads·d)`.
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    if mask.is_none() && crate::kernels::heads_in_place(q, k, v, heads) {
        return crate::kernels::attention_heads(q, k, v, heads, scale);
    }
    let out = attention(
        &split_heads(q, heads)?,
        &split_heads(k, heads)?,
        &split_heads(v, heads)?,
        scale,
        mask,
    )?;
    merge_heads(&out, heads)
}

/// `(b·t, c, h, w) → (b, c, t, h, w)`.
pub fn frames_to_video(xs: &Tensor, b: usize) -> Result<Tensor> {
    let (bt, c, h, w) = xs.dims4()?;
    xs.reshape((b, bt / b, c, h, w))?.permute((0, 2, 1, 3, 4))?.contiguous()
}

/// `(b, c, t, h, w) → (b·t, c, h, w)`.
pub fn video_to_frames(xs: &Tensor) -> Result<Tensor> {
    let (b, c, t, h, w) = xs.dims5()?;
    xs.permute((0, 2, 1, 3, 4))?.contiguous()?.reshape((b * t, c, h, w))
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

/// GEGLU feed-forward input half: `a · GELU(g)` where `[a, g] = proj(x)`.
pub fn geglu(proj: &Linear, xs: &Tensor) -> Result<Tensor> {
    // The gate runs on each block of the product while it is in cache.
    match proj {
        Linear::Bf16(matrix) => return matrix.forward_geglu(xs),
        Linear::F32(matrix) => return matrix.forward_geglu(xs),
        _ => {}
    }
    crate::kernels::geglu(&proj.forward(xs)?)
}

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
    pub fn new(width: usize, heads: usize, mlp_ratio: f64, vb: VarBuilder) -> Result<Self> {
        let attn = vb.pp("attn");
        let in_b = attn.get(3 * width, "in_proj_bias")?;
        let hidden = (width as f64 * mlp_ratio) as usize;
        Ok(Self {
            ln_1: layer_norm(width, 1e-5, vb.pp("ln_1"))?,
            in_proj: Linear::load(&attn, "in_proj_weight", 3 * width, width, &[3 * width, width], Some(in_b))?,
            out_proj: linear(width, width, attn.pp("out_proj"))?,
            ln_2: layer_norm(width, 1e-5, vb.pp("ln_2"))?,
            c_fc: linear(width, hidden, vb.pp("mlp.c_fc"))?,
            c_proj: linear(hidden, width, vb.pp("mlp.c_proj"))?,
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
