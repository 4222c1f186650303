//! The one call every front end uses: image(s) + prompt + options → video.
//!
//! Mirrors the reference CLI (`inference.py::image_guided_synthesis`): conditioning from the
//! text and CLIP image encoders, the VAE latent of the keyframe(s) as `c_concat`, DDIM with
//! classifier-free guidance, VAE decode, clamp and truncating u8 conversion.

mod conditioning;
mod graphs;
mod request;
mod sampler;
mod windows;

pub use conditioning::Conditioning;
pub use request::{CollectFrames, FrameSink, Mode, Progress, Request, Sample, SinkResult, Stage, Video};
pub use windows::FramePlan;

use crate::config::{ModelConfig, Parameterization};
use crate::diffusion::NoiseSchedule;
use crate::models::clip_text::ClipTextEncoder;
use crate::models::clip_vision::ClipVisionEncoder;
use crate::models::resampler::Resampler;
use crate::models::unet::Unet;
use crate::models::vae::AutoencoderKL;
use crate::models::{RESAMPLER_PREFIX, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, VISION_PREFIX};
use crate::noise::NoiseSource;
use crate::preprocess::{check_resizable, clip_preprocess, video_to_u8};
use crate::tokenizer::Tokenizer;
use crate::compute::{Backend, Part, PrecisionPolicy};
use crate::weights::{Checkpoint, KeyRecorder, ParkedWeights, RandomWeights};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};


pub struct Pipeline {
    cfg: ModelConfig,
    device: Device,
    precision: PrecisionPolicy,
    backend: Backend,
    tokenizer: Tokenizer,
    text: Held<ClipTextEncoder>,
    vision: Held<ClipVisionEncoder>,
    resampler: Held<Resampler>,
    vae: Held<AutoencoderKL>,
    unet: Unet,
    /// The UNet's forward as CUDA graphs, where the backend says so.
    unet_graphs: Option<graphs::UnetGraphs>,
    /// The weights of the networks held [`Held::Parked`] (`--offload`).
    parked: Option<ParkedWeights>,
    schedule: NoiseSchedule,
}

/// How the pipeline holds a network: built once and kept on the device, or (`--offload`) parked
/// in host memory and rebuilt on the device for each stage that runs it.
enum Held<T> {
    Resident(T),
    Parked,
}

/// A network ready to run: the resident one, or one rebuilt from parked weights for this stage
/// (its device memory goes when this goes).
pub enum Net<'a, T> {
    Resident(&'a T),
    Rebuilt(T),
}

impl<T> std::ops::Deref for Net<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        match self {
            Net::Resident(t) => t,
            Net::Rebuilt(t) => t,
        }
    }
}

/// The networks `--offload` parks (the UNet stays on the device).
const PARKED_PREFIXES: [&str; 4] = [TEXT_PREFIX, VISION_PREFIX, RESAMPLER_PREFIX, VAE_PREFIX];

/// Schedule buffers inference reads from the checkpoint.
const SCHEDULE_BUFFERS: [&str; 3] = ["alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"];

/// Schedule buffers of a checkpoint that inference does not read.
const UNUSED_BUFFERS: [&str; 9] = [
    "betas",
    "alphas_cumprod_prev",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
];

fn check_cancel(cancel: &AtomicBool) -> Result<()> {
    if cancel.load(Ordering::Relaxed) {
        Err(Error::Cancelled)
    } else {
        Ok(())
    }
}

impl Pipeline {
    /// Builds every network from `source`. With `--offload` (`precision.offload`) the parked
    /// ones are built once here, their weights copied to host memory as they are read, and
    /// dropped; one network at a time is on the device beside the UNet, as in a run.
    fn build<'a>(
        cfg: ModelConfig,
        source: Box<dyn SimpleBackend + 'a>,
        schedule: NoiseSchedule,
        precision: PrecisionPolicy,
        backend: Backend,
    ) -> Result<Self> {
        let device = backend.device().clone();
        let parked = precision.offload.then(|| ParkedWeights::new(&PARKED_PREFIXES));
        let vb = match &parked {
            Some(park) => park.capturing(source, DType::F32, &device),
            None => VarBuilder::from_backend(source, DType::F32, device.clone()),
        };
        let part = |prefix: &str, p: Part| vb.pp(prefix).set_dtype(precision.part(p).weights);
        fn hold<T>(net: T, parked: bool) -> Held<T> {
            if parked {
                Held::Parked
            } else {
                Held::Resident(net)
            }
        }
        let off = parked.is_some();
        let b = &backend;
        let text = hold(ClipTextEncoder::new(&cfg.text, part(TEXT_PREFIX, Part::TextEncoder), b)?, off);
        let vision = hold(ClipVisionEncoder::new(&cfg.vision, part(VISION_PREFIX, Part::ImageEncoder), b)?, off);
        let resampler = hold(Resampler::new(&cfg.resampler, part(RESAMPLER_PREFIX, Part::Resampler), b)?, off);
        let vae = hold(AutoencoderKL::new(&cfg.vae, part(VAE_PREFIX, Part::Vae), b)?, off);
        let unet = Unet::new(&cfg.unet, part(UNET_PREFIX, Part::Unet), b)?;
        drop(vb);
        backend.stop_counting();
        if let Some(park) = &parked {
            tracing::info!("offload: {:.2} GB of weights parked in host memory", park.bytes() as f64 / 1e9);
        }
        let unet_graphs = backend.cuda_graphs().then(graphs::UnetGraphs::default);
        Ok(Self { tokenizer: Tokenizer::new()?, text, vision, resampler, vae, unet, unet_graphs, parked, precision, device, backend, schedule, cfg })
    }

    /// The network `held`, built from the parked weights if it is not resident.
    fn net<'a, T>(
        &'a self,
        held: &'a Held<T>,
        prefix: &str,
        part: Part,
        build: impl FnOnce(VarBuilder) -> candle_core::Result<T>,
    ) -> Result<Net<'a, T>> {
        match (held, &self.parked) {
            (Held::Resident(net), _) => Ok(Net::Resident(net)),
            (Held::Parked, Some(park)) => {
                let vb = park.var_builder(self.precision.part(part).weights, &self.device).pp(prefix);
                Ok(Net::Rebuilt(build(vb)?))
            }
            (Held::Parked, None) => Err(Error::InvalidInput(format!("{prefix}: parked without weights"))),
        }
    }

    /// Every tensor a checkpoint for `cfg` holds, with its shape, under the model's key names
    /// (the 256 checkpoint's `framestride_embed` already renamed): what the networks read, the
    /// schedule buffers, and the weights the reference keeps but inference never uses.
    pub fn checkpoint_keys(cfg: &ModelConfig) -> Result<BTreeMap<String, Vec<usize>>> {
        let recorder = KeyRecorder::default();
        let schedule = NoiseSchedule::new(&cfg.diffusion);
        let n = schedule.num_timesteps();
        let scale_len = schedule.scale_arr.as_ref().map(|s| s.len());
        let f32 = PrecisionPolicy::f32();
        Self::build(cfg.clone(), recorder.reader(), schedule, f32.clone(), Backend::new(&Device::Cpu, &f32, false))?;
        let mut keys = recorder.into_keys();
        let buffers = SCHEDULE_BUFFERS.iter().chain(&UNUSED_BUFFERS);
        keys.extend(buffers.map(|k| (k.to_string(), vec![n])));
        if let Some(len) = scale_len {
            keys.insert("scale_arr".into(), vec![len]);
        }
        let prefixed = |p: &str, list: Vec<(String, Vec<usize>)>| -> Vec<(String, Vec<usize>)> {
            list.into_iter().map(|(k, s)| (format!("{p}.{k}"), s)).collect()
        };
        keys.extend(prefixed(TEXT_PREFIX, ClipTextEncoder::unused_keys(&cfg.text, cfg.clip_embed_dim)));
        keys.extend(prefixed(VISION_PREFIX, ClipVisionEncoder::unused_keys(&cfg.vision, &cfg.text, cfg.clip_embed_dim)));
        Ok(keys)
    }

    /// Loads a `model.safetensors` or `model.ckpt` strictly against `cfg`, in fp32.
    pub fn load(cfg: ModelConfig, path: &Path, device: &Device) -> Result<Self> {
        Self::load_with(cfg, path, device, PrecisionPolicy::f32())
    }

    /// Loads with the dtypes of `precision` (weights converted as they are read).
    pub fn load_with(cfg: ModelConfig, path: &Path, device: &Device, precision: PrecisionPolicy) -> Result<Self> {
        let ck = Checkpoint::open(path)?;
        ck.verify(&Self::checkpoint_keys(&cfg)?)?;
        // A quantized file's int8 weights are read as stored (the policy's bf16 products still
        // serve the rest); a float one is quantized as it loads if asked.
        let stored = ck.quantization();
        let precision = match stored {
            Some(q) => precision.with_quantization(Some(q)),
            None => precision,
        };
        let backend = Backend::new(device, &precision, stored.is_some());
        let vb = ck.var_builder(DType::F32, device);
        // The schedule buffers in the file overwrite the computed ones, as in the reference.
        let mut schedule = NoiseSchedule::new(&cfg.diffusion);
        let n = schedule.num_timesteps();
        let buffer = |name: &str, len: usize| -> Result<Vec<f32>> {
            Ok(vb.get(len, name)?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
        };
        schedule.alphas_cumprod = buffer("alphas_cumprod", n)?;
        schedule.sqrt_alphas_cumprod = buffer("sqrt_alphas_cumprod", n)?;
        schedule.sqrt_one_minus_alphas_cumprod = buffer("sqrt_one_minus_alphas_cumprod", n)?;
        if let Some(s) = &schedule.scale_arr {
            schedule.scale_arr = Some(buffer("scale_arr", s.len())?);
        }
        drop(vb);
        let pipeline = Self::build(cfg, ck.reader(), schedule, precision, backend)?;
        tracing::info!(precision = %pipeline.precision.name(), kernels = %pipeline.backend.describe(), "model {} built", pipeline.cfg.name);
        Ok(pipeline)
    }

    /// Builds the networks of `cfg` with random weights (benchmarks, shape checks).
    pub fn random(cfg: ModelConfig, device: &Device) -> Result<Self> {
        Self::random_with(cfg, device, PrecisionPolicy::f32())
    }

    /// [`Pipeline::random`] with the dtypes (and quantization) of `precision`.
    pub fn random_with(cfg: ModelConfig, device: &Device, precision: PrecisionPolicy) -> Result<Self> {
        let schedule = NoiseSchedule::new(&cfg.diffusion);
        let backend = Backend::new(device, &precision, false);
        Self::build(cfg, RandomWeights::reader(), schedule, precision, backend)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn precision(&self) -> &PrecisionPolicy {
        &self.precision
    }

    /// Bytes of weights parked in host memory (`--offload`), `None` when every network is
    /// resident.
    pub fn parked_bytes(&self) -> Option<usize> {
        self.parked.as_ref().map(ParkedWeights::bytes)
    }

    /// Runs the guidance passes of every step as one batch or one by one, whatever the backend
    /// chose (comparisons; the maths is the same).
    pub fn with_batched_guidance(mut self, batched: bool) -> Self {
        self.backend.set_batched_guidance(batched);
        self
    }

    /// The kernels every layer runs (for the run report).
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    fn compute(&self, part: Part) -> DType {
        self.precision.part(part).compute
    }

    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    pub fn unet(&self) -> &Unet {
        &self.unet
    }

    pub fn vae(&self) -> Result<Net<'_, AutoencoderKL>> {
        self.net(&self.vae, VAE_PREFIX, Part::Vae, |vb| AutoencoderKL::new(&self.cfg.vae, vb, &self.backend))
    }

    pub fn text_encoder(&self) -> Result<Net<'_, ClipTextEncoder>> {
        self.net(&self.text, TEXT_PREFIX, Part::TextEncoder, |vb| ClipTextEncoder::new(&self.cfg.text, vb, &self.backend))
    }

    pub fn vision_encoder(&self) -> Result<Net<'_, ClipVisionEncoder>> {
        self.net(&self.vision, VISION_PREFIX, Part::ImageEncoder, |vb| ClipVisionEncoder::new(&self.cfg.vision, vb, &self.backend))
    }

    pub fn resampler(&self) -> Result<Net<'_, Resampler>> {
        self.net(&self.resampler, RESAMPLER_PREFIX, Part::Resampler, |vb| Resampler::new(&self.cfg.resampler, vb, &self.backend))
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Token ids `(n, 77)` of the prompts.
    pub fn token_ids(&self, prompts: &[&str]) -> Result<Tensor> {
        let len = self.cfg.text.context_length;
        let ids: Vec<u32> = prompts.iter().flat_map(|p| self.tokenizer.tokenize(p, len)).collect();
        Ok(Tensor::from_vec(ids, (prompts.len(), len), &self.device)?)
    }

    /// Text context `(n, 77, d)`.
    pub fn encode_text(&self, prompts: &[&str]) -> Result<Tensor> {
        Ok(self.text_encoder()?.forward(&self.token_ids(prompts)?)?.to_dtype(self.compute(Part::Unet))?)
    }

    /// CLIP image tokens `(n, 257, width)` of images `(n, 3, h, w)` in [-1, 1].
    pub fn clip_image_tokens(&self, images: &Tensor) -> Result<Tensor> {
        let pixels = clip_preprocess(images, self.cfg.vision.image_size)?.to_dtype(self.compute(Part::ImageEncoder))?;
        Ok(self.vision_encoder()?.forward(&pixels)?)
    }

    /// Image context tokens `(n, 16·frames, d)`: CLIP then the Resampler.
    pub fn encode_image(&self, images: &Tensor) -> Result<Tensor> {
        let tokens = self.clip_image_tokens(images)?.to_dtype(self.compute(Part::Resampler))?;
        Ok(self.resampler()?.forward(&tokens)?.to_dtype(self.compute(Part::Unet))?)
    }

    /// Scaled latent `0.18215·(mean + std·noise)` of images `(n, 3, h, w)`.
    pub fn vae_encode(&self, images: &Tensor, noise: &Tensor) -> Result<Tensor> {
        self.encode_with(&*self.vae()?, images, noise)
    }

    fn encode_with(&self, vae: &AutoencoderKL, images: &Tensor, noise: &Tensor) -> Result<Tensor> {
        let dt = self.compute(Part::Vae);
        let post = vae.encode(&images.to_dtype(dt)?)?;
        let z = post.sample(&noise.to_dtype(dt)?)?.to_dtype(DType::F32)?;
        Ok(z.broadcast_mul(&Tensor::new(self.cfg.diffusion.scale_factor as f32, &self.device)?)?)
    }

    /// Decodes scaled latents `(b, c, t, h, w)` to `(b, 3, t, H, W)` one frame at a time, whatever
    /// the config's `perframe_ae`: the decoder is per-image, so this is the same math, and 16
    /// frames at once would hold 16× the activations (most of a GPU run's peak memory).
    pub fn vae_decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.decode_with(&*self.vae()?, latents)
    }

    fn decode_with(&self, vae: &AutoencoderKL, latents: &Tensor) -> Result<Tensor> {
        let (b, _, _, _, _) = latents.dims5()?;
        let inv = Tensor::new((1.0 / self.cfg.diffusion.scale_factor) as f32, &self.device)?;
        let z = crate::models::layers::video_to_frames(&latents.broadcast_mul(&inv)?)?.to_dtype(self.compute(Part::Vae))?;
        let frames = (0..z.dim(0)?)
            .map(|i| vae.decode(&z.narrow(0, i, 1)?)?.to_dtype(DType::F32))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(crate::models::layers::frames_to_video(&Tensor::cat(&frames, 0)?, b)?)
    }

    /// Wall time since `start` once the device has run the queued work: GPU kernels run
    /// asynchronously, and without the wait a stage's time would land in the next one.
    fn elapsed(&self, start: Instant) -> Result<Duration> {
        self.device.synchronize()?;
        Ok(start.elapsed())
    }

    pub fn parameterization(&self) -> Parameterization {
        self.cfg.diffusion.parameterization
    }

    /// How the request's frames map onto the model's window (`unet.temporal_length`).
    pub fn frame_plan(&self, req: &Request) -> Result<FramePlan> {
        FramePlan::new(&req.sampling, req.mode.kind(), self.cfg.window()).map_err(|e| Error::InvalidInput(e.message))
    }

    fn validate(&self, req: &Request) -> Result<()> {
        let s = &req.sampling;
        s.validate(&self.cfg, req.mode.kind()).map_err(|e| Error::InvalidInput(e.message))?;
        check_resizable(&req.image, s.height, s.width, "image")?;
        if let Mode::Interpolate { end } = &req.mode {
            check_resizable(end, s.height, s.width, "image2")?;
        }
        Ok(())
    }

    /// Runs a whole request, its frames kept in memory. `progress` is called at each stage
    /// start and after every denoising step; `cancel` is checked between steps.
    pub fn generate(
        &self,
        req: &Request,
        noise: &mut dyn NoiseSource,
        progress: &mut dyn FnMut(Progress),
        cancel: &AtomicBool,
    ) -> Result<Video> {
        let mut frames = CollectFrames::default();
        let sample = self.generate_samples(req, 1, noise, progress, cancel, &mut frames)?.remove(0);
        Ok(Video { frames_u8: frames.samples.remove(0), sample })
    }

    /// `samples` videos of one request: the conditioning is computed once, each sample is a
    /// full sampler run with new noise from the continuing stream (upstream's `--n_samples`).
    /// Each frame goes to `sink` as soon as it is decoded.
    pub fn generate_samples(
        &self,
        req: &Request,
        samples: usize,
        noise: &mut dyn NoiseSource,
        progress: &mut dyn FnMut(Progress),
        cancel: &AtomicBool,
        sink: &mut dyn FrameSink,
    ) -> Result<Vec<Sample>> {
        self.validate(req)?;
        if samples == 0 {
            return Err(Error::InvalidInput("the number of samples must be at least 1".into()));
        }
        check_cancel(cancel)?;
        let mut timings = Vec::new();
        let plan = self.frame_plan(req)?;
        let cond = self.condition(req, noise, progress, &mut timings)?;
        let mut runs = Vec::with_capacity(samples);
        let (height, width) = (req.sampling.height, req.sampling.width);
        for index in 0..samples {
            check_cancel(cancel)?;
            let latent = self.sample(&cond, &req.sampling, noise, progress, cancel, &mut |_, _, _| {}, &mut timings)?;
            check_cancel(cancel)?;
            progress(Progress { stage: Stage::VaeDecode, step: 0, total: 1 });
            let mut saved = plan.kept_frames();
            if req.mode == Mode::Loop {
                saved.pop();
            }
            sink.begin(index, saved.len(), width, height).map_err(Error::Output)?;
            // One frame at a time, straight to u8 and on to the sink: a long video never
            // exists whole, in f32 or in u8.
            let start = Instant::now();
            let vae = self.vae()?;
            let mut decode = start.elapsed();
            for &f in &saved {
                check_cancel(cancel)?;
                let start = Instant::now();
                let rgb = video_to_u8(&self.decode_with(&vae, &latent.narrow(2, f, 1)?)?.to_dtype(DType::F32)?)?;
                decode += start.elapsed();
                sink.frame(&rgb).map_err(Error::Output)?;
            }
            sink.end().map_err(Error::Output)?;
            drop(vae);
            timings.push((Stage::VaeDecode, decode));
            runs.push(Sample { frames: saved.len(), height, width, latent, timings: std::mem::take(&mut timings), plan: plan.clone() });
        }
        Ok(runs)
    }
}
