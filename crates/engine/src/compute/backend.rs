//! The backend: which kernel each layer runs, decided once per pipeline from the device, the
//! precision policy, the weights' format and the CPU's instruction sets. Every layer
//! constructor takes it and asks it; nothing else chooses a kernel. It also counts what it
//! chose, for the run report.

use super::precision::PrecisionPolicy;
use crate::models::{keeps_float, VAE_PREFIX};
use crate::weights::q8;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use dynamicrafter_kernels::cpu::{self, CpuFeatures};
use dynamicrafter_kernels::{Bf16DotConv, Bf16DotMatrix, F32Conv, F32Matrix};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// The kinds of layer whose kernel is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LayerKind {
    Linear,
    Conv3x3,
    Conv1x1,
    Downsample,
    TemporalConv,
    Attention,
}

impl LayerKind {
    pub fn name(self) -> &'static str {
        match self {
            LayerKind::Linear => "linear",
            LayerKind::Conv3x3 => "conv3x3",
            LayerKind::Conv1x1 => "conv1x1",
            LayerKind::Downsample => "downsample",
            LayerKind::TemporalConv => "temporal conv",
            LayerKind::Attention => "attention",
        }
    }
}

/// The kernel one layer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kernel {
    /// candle's own op on the layer's device and dtype (the `gemm` crate on the CPU, cuBLAS on a
    /// GPU), or the reference composition of ours.
    Candle,
    /// Our plain-Rust CPU kernels in f32: shifted-GEMM convolutions, blocked attention.
    PortableF32,
    /// Our CUDA kernels: shifted-GEMM convolutions on cuBLAS, fused attention.
    Cuda,
    /// cuDNN's convolutions (a `cudnn` build), the bias in our epilogue.
    Cudnn,
    /// f32 microkernels with the weight packed at load.
    Avx512F32,
    /// bf16 tile products, f32 in and out.
    AmxBf16,
    /// bf16 pair products (`vdpbf16ps`) on AVX512-BF16, f32 in and out: the bf16 mode of CPUs
    /// without AMX (linear layers, temporal convolutions, 3×3 convolutions in Winograd form).
    Avx512Bf16,
    /// int8 (`q8_0`) products on AVX-512 VNNI.
    VnniQ8,
    /// candle's quantized matmul (`q8_0`), on any device.
    CandleQ8,
}

impl Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Candle => "candle",
            Kernel::PortableF32 => "portable-f32",
            Kernel::Cuda => "cuda",
            Kernel::Cudnn => "cudnn",
            Kernel::Avx512F32 => "avx512-f32",
            Kernel::AmxBf16 => "amx-bf16",
            Kernel::Avx512Bf16 => "avx512-bf16",
            Kernel::VnniQ8 => "vnni-q8_0",
            Kernel::CandleQ8 => "candle-q8_0",
        }
    }
}

/// Where int8 weights come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Int8 {
    None,
    /// A `convert --quantize` file: the weights stored as `X.q8_0` are int8.
    Stored,
    /// `--quantize` with a float file: every weight that does not [`keeps_float`] is quantized
    /// as it loads.
    OnLoad,
}

#[derive(Debug)]
pub struct Backend {
    device: Device,
    cpu: CpuFeatures,
    int8: Int8,
    bf16_products: bool,
    batched_guidance: bool,
    ff_chunk_rows: Option<usize>,
    cuda_graphs: bool,
    /// Whether our CUDA kernels serve the layers: a CUDA build on a GPU, unless
    /// `DYNAMICRAFTER_CUDA_KERNELS=0` leaves them to candle's ops.
    cuda_kernels: bool,
    chosen: Mutex<BTreeMap<LayerKind, BTreeMap<Kernel, usize>>>,
    /// Off once the pipeline is built: networks rebuilt later (`--offload`) are not counted twice.
    counting: AtomicBool,
    /// Self-attentions whose q/k/v products were stacked into one ([`Backend::fused_qkv`]).
    stacked_qkv: AtomicUsize,
}

impl Backend {
    /// The backend of `precision` on `device`; `stored_int8` when the checkpoint holds `q8_0`
    /// weights (which then run as int8 whatever the policy says).
    pub fn new(device: &Device, precision: &PrecisionPolicy, stored_int8: bool) -> Self {
        let int8 = match (stored_int8, precision.quantization) {
            (true, _) => Int8::Stored,
            (false, Some(_)) => Int8::OnLoad,
            (false, None) => Int8::None,
        };
        let cpu = if device.is_cpu() { cpu::features() } else { CpuFeatures::default() };
        Self {
            device: device.clone(),
            cpu,
            int8,
            bf16_products: precision.bf16_matmuls,
            batched_guidance: batched_guidance(device, precision),
            ff_chunk_rows: ff_chunk_rows(precision, batched_guidance(device, precision)),
            cuda_graphs: cfg!(feature = "cuda") && device.is_cuda() && std::env::var("DYNAMICRAFTER_CUDA_GRAPH").as_deref() == Ok("1"),
            cuda_kernels: cfg!(feature = "cuda") && device.is_cuda() && dynamicrafter_kernels::cuda_kernels_enabled(),
            chosen: Mutex::default(),
            counting: AtomicBool::new(true),
            stacked_qkv: AtomicUsize::new(0),
        }
    }

    /// Whether classifier-free guidance runs its two (or three, with `--cfg-img`) UNet passes
    /// as one batch: on a GPU, where it halves the launches and doubles the products' size,
    /// unless `--offload` asks for the least memory (a batch holds every pass's activations at
    /// once); on the CPU the passes stay separate (no faster there, more memory:
    /// docs/PERFORMANCE.md). `DYNAMICRAFTER_CFG_BATCH=0|1` overrides it (A/B timings).
    pub fn batched_guidance(&self) -> bool {
        self.batched_guidance
    }

    /// Rows per piece of the UNet's feed-forwards (the policy's `ff_chunk_rows`, else
    /// `BATCHED_FF_CHUNK_ROWS` where the guidance passes run as one batch, so the batch's
    /// feed-forward temporaries stay under one pass's; `DYNAMICRAFTER_FF_CHUNK=0|N` overrides
    /// it: whole, or N rows). Set when the backend is made:
    /// [`set_batched_guidance`](Self::set_batched_guidance) later leaves it.
    pub fn ff_chunk_rows(&self) -> Option<usize> {
        self.ff_chunk_rows
    }

    /// Whether the UNet's forward is replayed from CUDA graphs (`pipeline/graphs.rs`): with
    /// `DYNAMICRAFTER_CUDA_GRAPH=1` on a GPU of a CUDA build; off by default until measured.
    pub fn cuda_graphs(&self) -> bool {
        self.cuda_graphs
    }

    /// Overrides [`batched_guidance`](Self::batched_guidance).
    pub fn set_batched_guidance(&mut self, batched: bool) {
        self.batched_guidance = batched;
    }

    /// Stops counting choices: what is built after this is a rebuild of a counted network.
    pub fn stop_counting(&self) {
        self.counting.store(false, Ordering::Relaxed);
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether weight `name` of the layer at `vb` is int8: stored so in the file, or quantized
    /// as it loads.
    pub fn int8_weight(&self, vb: &VarBuilder, name: &str) -> bool {
        match self.int8 {
            Int8::None => false,
            Int8::Stored => vb.contains_tensor(&format!("{name}{}", q8::SUFFIX)),
            Int8::OnLoad => !keeps_float(&full_name(vb, name)),
        }
    }

    /// A linear layer `[out, inp]` with weight `name` at `vb`.
    pub fn linear(&self, vb: &VarBuilder, name: &str, out: usize, inp: usize) -> Kernel {
        let kernel = if q8::stored_shape(&[out, inp]).is_some() && self.int8_weight(vb, name) {
            if self.cpu.avx512_vnni {
                Kernel::VnniQ8
            } else {
                Kernel::CandleQ8
            }
        } else if self.bf16_tiles(vb, name, inp, out) {
            Kernel::AmxBf16
        } else if self.bf16_pairs(vb, name) && Bf16DotMatrix::supports(out, inp) {
            Kernel::Avx512Bf16
        } else if self.device.is_cpu() && vb.dtype() == DType::F32 && self.cpu.avx512 && F32Matrix::supports(out, inp) {
            Kernel::Avx512F32
        } else {
            Kernel::Candle
        };
        self.record(LayerKind::Linear, kernel)
    }

    /// A 3×3 convolution (stride 1, padding 1) from `in_c` to `out_c` channels at `vb`.
    pub fn conv3x3(&self, vb: &VarBuilder, in_c: usize, out_c: usize) -> Kernel {
        let kernel = if self.device.is_cpu() && self.cpu.avx512_vnni && q8::stored_shape(&[1, in_c]).is_some() && self.int8_weight(vb, "weight") {
            // Quantized again in (tap, channel) blocks, the order the int8 kernel reads.
            Kernel::VnniQ8
        } else if self.bf16_tiles(vb, "weight", in_c, out_c) {
            Kernel::AmxBf16
        } else if (self.bf16_pairs(vb, "weight") || self.vae_conv_in_pairs(vb)) && Bf16DotConv::supports(out_c) {
            Kernel::Avx512Bf16
        } else if self.device.is_cpu() && vb.dtype() == DType::F32 && self.cpu.avx512 && F32Conv::supports(out_c) {
            Kernel::Avx512F32
        } else if self.cudnn(vb.dtype()) {
            Kernel::Cudnn
        } else {
            self.op_api(vb.dtype())
        };
        self.record(LayerKind::Conv3x3, kernel)
    }

    /// A 1×1 convolution at `vb` (the UNet's skip connections): in bf16 pairs in the bf16 mode
    /// of a CPU with AVX512-BF16 and no AMX, else candle's (its weight as `stored_dtype` says).
    pub fn conv1x1(&self, vb: &VarBuilder) -> Kernel {
        let kernel = if self.bf16_pairs(vb, "weight") { Kernel::Avx512Bf16 } else { Kernel::Candle };
        self.record(LayerKind::Conv1x1, kernel)
    }

    /// A downsampling convolution (3×3, stride 2) at `vb`: the op API on CUDA (the implicit
    /// GEMM), candle's strided convolution elsewhere.
    pub fn downsample(&self, vb: &VarBuilder) -> Kernel {
        let kernel = match self.op_api(vb.dtype()) {
            Kernel::Cuda => Kernel::Cuda,
            _ => Kernel::Candle,
        };
        self.record(LayerKind::Downsample, kernel)
    }

    /// The temporal (3,1,1) convolution over `c` channels at `vb`.
    pub fn temporal_conv(&self, vb: &VarBuilder, c: usize) -> Kernel {
        let kernel = if self.bf16_tiles(vb, "weight", c, c) {
            Kernel::AmxBf16
        } else if self.bf16_pairs(vb, "weight") {
            Kernel::Avx512Bf16
        } else if self.cudnn(vb.dtype()) {
            Kernel::Cudnn
        } else {
            self.op_api(vb.dtype())
        };
        self.record(LayerKind::TemporalConv, kernel)
    }

    /// Whether a self-attention's q, k and v projections (running `projections`) become one
    /// product, their weights stacked at load, whose three parts the attention (running
    /// `attention`, heads of `head_dim`) reads in place: on a GPU, where those are candle's
    /// products and our fused attention (one launch and one read of the input instead of three,
    /// no split copies). `DYNAMICRAFTER_FUSED_QKV=0` keeps them apart (A/B timings).
    pub fn fused_qkv(&self, projections: [Kernel; 3], attention: Kernel, head_dim: usize) -> bool {
        let fused = attention == Kernel::Cuda
            && projections.iter().all(|&k| k == Kernel::Candle)
            && dynamicrafter_kernels::reads_heads_in_place(head_dim)
            && std::env::var("DYNAMICRAFTER_FUSED_QKV").as_deref() != Ok("0");
        if fused && self.counting.load(Ordering::Relaxed) {
            self.stacked_qkv.fetch_add(1, Ordering::Relaxed);
        }
        fused
    }

    /// The products of an attention whose query projection runs `q_projection`: in bf16 with
    /// it, on AMX or in AVX512-BF16 pairs (its activations are bf16-rounded anyway), else our
    /// op API for the device.
    pub fn attention(&self, vb: &VarBuilder, q_projection: Kernel) -> Kernel {
        let kernel = match q_projection {
            Kernel::AmxBf16 => Kernel::AmxBf16,
            Kernel::Avx512Bf16 => Kernel::Avx512Bf16,
            _ if self.device.is_cpu() && vb.dtype() == DType::F32 => Kernel::PortableF32,
            _ if self.cuda_kernels && matches!(vb.dtype(), DType::BF16 | DType::F16) => Kernel::Cuda,
            _ => Kernel::Candle,
        };
        self.record(LayerKind::Attention, kernel)
    }

    /// Whether convolutions with weights of `dtype` run on cuDNN: a `cudnn` build on a GPU, in
    /// bf16/f16 (f32 stays on our cuBLAS GEMMs: cuDNN may take TF32 for f32, which f32 parity
    /// must not see). `DYNAMICRAFTER_CUDNN=0` keeps our own convolutions (implicit or shifted GEMMs),
    /// to compare.
    fn cudnn(&self, dtype: DType) -> bool {
        self.device.is_cuda() && matches!(dtype, DType::F16 | DType::BF16) && dynamicrafter_kernels::cudnn_enabled()
    }

    /// What the op API runs for weights of `dtype` on this device.
    fn op_api(&self, dtype: DType) -> Kernel {
        if self.device.is_cpu() {
            // Other dtypes are computed in f32 there (candle has no bf16 CPU convolution).
            Kernel::PortableF32
        } else if self.cuda_kernels && matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            Kernel::Cuda
        } else {
            Kernel::Candle
        }
    }

    /// Whether weight `name` of a layer from `in_c` to `out_c` channels runs its products in
    /// bf16 on AMX: the CPU's bf16 mode, a weight the policy does not keep in float, channels in
    /// whole 32-blocks, and AMX.
    fn bf16_tiles(&self, vb: &VarBuilder, name: &str, in_c: usize, out_c: usize) -> bool {
        self.bf16_products
            && self.device.is_cpu()
            && self.cpu.amx
            && in_c.is_multiple_of(32)
            && out_c.is_multiple_of(32)
            && !keeps_float(&full_name(vb, name))
    }

    /// Whether weight `name` at `vb` runs its products in bf16 pairs on AVX512-BF16: the CPU's
    /// bf16 mode without AMX, and a weight the policy does not keep in float.
    fn bf16_pairs(&self, vb: &VarBuilder, name: &str) -> bool {
        self.bf16_products && self.device.is_cpu() && !self.cpu.amx && self.cpu.avx512_bf16 && !keeps_float(&full_name(vb, name))
    }

    /// Whether a VAE 3×3 convolution at `vb` runs in bf16 pairs: in the bf16 mode of a CPU with
    /// AVX512-BF16 and no AMX, the VAE's convolutions (the rest of it stays float, as
    /// `keeps_float` says) decode 1.5× faster at 49.5 dB PSNR of the pixels against fp32
    /// (docs/PERFORMANCE.md). AMX machines keep them in f32 (not measured there).
    fn vae_conv_in_pairs(&self, vb: &VarBuilder) -> bool {
        self.bf16_products && self.device.is_cpu() && !self.cpu.amx && self.cpu.avx512_bf16 && full_name(vb, "weight").starts_with(VAE_PREFIX)
    }

    /// The dtype weight `name` at `vb` is kept in where candle computes with it (the UNet's
    /// strided convolutions, and its 1×1 ones off the bf16 pair kernel): bf16 in the CPU's bf16 mode unless the policy keeps the weight
    /// float (the precision the mode promises, at half the memory; the products run in f32),
    /// else the dtype it was loaded in.
    pub fn stored_dtype(&self, vb: &VarBuilder, name: &str) -> DType {
        if self.bf16_products && self.device.is_cpu() && vb.dtype() == DType::F32 && !keeps_float(&full_name(vb, name)) {
            DType::BF16
        } else {
            vb.dtype()
        }
    }

    /// A float weight `name` at `vb` as its f32 kernel uses it: in the bf16 mode of a CPU
    /// without bf16 products, rounded to bf16 (the precision the mode promises; the products
    /// then run in f32), else as stored.
    pub fn float_weight(&self, vb: &VarBuilder, name: &str, weight: Tensor) -> candle_core::Result<Tensor> {
        let emulated = self.bf16_products && self.device.is_cpu() && !self.cpu.amx && !self.cpu.avx512_bf16;
        if emulated && weight.dtype() == DType::F32 && !keeps_float(&full_name(vb, name)) {
            weight.to_dtype(DType::BF16)?.to_dtype(DType::F32)
        } else {
            Ok(weight)
        }
    }

    fn record(&self, kind: LayerKind, kernel: Kernel) -> Kernel {
        if !self.counting.load(Ordering::Relaxed) {
            return kernel;
        }
        let mut chosen = self.chosen.lock().unwrap_or_else(|e| e.into_inner());
        *chosen.entry(kind).or_default().entry(kernel).or_default() += 1;
        kernel
    }

    /// The kernels chosen so far, per layer kind, e.g. `linear` → `amx-bf16 ×312, candle ×4`;
    /// on the CPU also `cpu` → the instruction set in use (`avx2`).
    pub fn summary(&self) -> BTreeMap<String, String> {
        let chosen = self.chosen.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: BTreeMap<String, String> = chosen
            .iter()
            .map(|(kind, kernels)| {
                let list: Vec<String> = kernels.iter().map(|(k, n)| format!("{} ×{n}", k.name())).collect();
                (kind.name().to_string(), list.join(", "))
            })
            .collect();
        if self.device.is_cpu() {
            out.insert("cpu".into(), self.cpu.best().name().into());
        }
        if self.batched_guidance {
            out.insert("guidance".into(), "passes in one batch".into());
        }
        if self.cuda_graphs {
            out.insert("unet".into(), "CUDA graphs".into());
        }
        if self.device.is_cuda() && !self.cuda_kernels {
            out.insert("cuda kernels".into(), "off (DYNAMICRAFTER_CUDA_KERNELS=0): candle's ops".into());
        } else if self.cuda_kernels {
            let (tile, unknown) = dynamicrafter_kernels::ConvTile::setting();
            let names: Vec<&str> = dynamicrafter_kernels::ConvTile::ALL.iter().map(|t| t.name()).collect();
            let note = unknown.map(|name| format!(" (DYNAMICRAFTER_CONV_IGEMM_TILE={name} names none of {})", names.join(", "))).unwrap_or_default();
            let by_channels = || format!("{}, {} for an odd multiple of 64 channels", dynamicrafter_kernels::ConvTile::for_channels(128).name(), dynamicrafter_kernels::ConvTile::for_channels(64).name());
            out.insert("conv tile".into(), format!("{}{note}", tile.map_or_else(by_channels, |t| t.name().to_string())));
        }
        match self.stacked_qkv.load(Ordering::Relaxed) {
            0 => {}
            n => {
                out.insert("q/k/v".into(), format!("stacked ×{n}"));
            }
        }
        out
    }

    /// [`summary`](Self::summary) on one line: `cpu: avx2; linear: candle ×12; …`.
    pub fn describe(&self) -> String {
        self.summary().iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join("; ")
    }
}

fn batched_guidance(device: &Device, precision: &PrecisionPolicy) -> bool {
    match std::env::var("DYNAMICRAFTER_CFG_BATCH").as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ => !device.is_cpu() && !precision.offload,
    }
}

fn ff_chunk_rows(precision: &PrecisionPolicy, batched_guidance: bool) -> Option<usize> {
    match std::env::var("DYNAMICRAFTER_FF_CHUNK").ok().and_then(|v| v.parse::<usize>().ok()) {
        Some(0) => None,
        Some(rows) => Some(rows),
        None => precision.ff_chunk_rows.or(batched_guidance.then_some(super::precision::BATCHED_FF_CHUNK_ROWS)),
    }
}

/// The checkpoint key of `name` at `vb`.
fn full_name(vb: &VarBuilder, name: &str) -> String {
    let prefix = vb.prefix();
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::precision::{BATCHED_FF_CHUNK_ROWS, OFFLOAD_FF_CHUNK_ROWS};

    /// The feed-forward pieces follow the memory policy: whole for one pass at a time, the
    /// offload pieces under `--offload`, the batch's pieces where the guidance passes are one
    /// batch (unless `DYNAMICRAFTER_FF_CHUNK` says otherwise).
    #[test]
    fn feed_forward_pieces_follow_the_guidance_batch() {
        if std::env::var_os("DYNAMICRAFTER_FF_CHUNK").is_some() {
            return;
        }
        let plain = PrecisionPolicy::f32();
        assert_eq!(ff_chunk_rows(&plain, false), None);
        assert_eq!(ff_chunk_rows(&plain, true), Some(BATCHED_FF_CHUNK_ROWS));
        let offload = PrecisionPolicy::f32().with_offload(true);
        assert_eq!(ff_chunk_rows(&offload, false), Some(OFFLOAD_FF_CHUNK_ROWS));
        assert_eq!(ff_chunk_rows(&offload, true), Some(OFFLOAD_FF_CHUNK_ROWS));
    }
}
