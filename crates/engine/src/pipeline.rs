//! The one call every front end uses: image(s) + prompt + options → video.
//!
//! Mirrors the reference CLI (`inference.py::image_guided_synthesis`): conditioning from the
//! text and CLIP image encoders, the VAE latent of the keyframe(s) as `c_concat`, DDIM with
//! classifier-free guidance, VAE decode, clamp and truncating u8 conversion.

use crate::config::{ModelConfig, Parameterization, TimestepSpacing};
use crate::diffusion::{ddim_step, DdimSchedule, DdimStep, Guidance, NoiseSchedule};
use crate::models::clip_text::ClipTextEncoder;
use crate::models::clip_vision::ClipVisionEncoder;
use crate::models::resampler::Resampler;
use crate::models::unet::{Unet, UnetInput};
use crate::models::vae::AutoencoderKL;
use crate::models::{RESAMPLER_PREFIX, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, VISION_PREFIX};
use crate::noise::NoiseSource;
use crate::preprocess::{clip_preprocess, resize_and_crop, to_tensor, video_to_u8, RgbImage};
use crate::tokenizer::Tokenizer;
use crate::precision::{Part, PrecisionPolicy};
use crate::weights::{Checkpoint, KeyRecorder, RandomWeights};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What the video is made from.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// Animate one image.
    ImageToVideo,
    /// Generate the frames between the image and `end` (the interpolation checkpoint).
    Interpolate { end: RgbImage },
    /// A looping video of the image; the last frame is dropped.
    Loop,
}

/// One generation request. Build it with [`Request::new`] to get the model's launch-script defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub image: RgbImage,
    pub mode: Mode,
    pub prompt: String,
    pub height: usize,
    pub width: usize,
    pub frames: usize,
    pub steps: usize,
    pub eta: f64,
    /// Text CFG scale; 1 disables guidance (one UNet pass per step).
    pub cfg_scale: f64,
    /// Image CFG scale; `Some` selects the three-pass multi-condition guidance.
    pub cfg_img: Option<f64>,
    /// Frame stride (256 model) or FPS (512/1024) conditioning.
    pub fs: i64,
    pub spacing: TimestepSpacing,
    pub guidance_rescale: f64,
}

impl Request {
    /// The sampler settings of this request.
    pub fn sampler_options(&self) -> SamplerOptions {
        SamplerOptions {
            steps: self.steps,
            eta: self.eta,
            cfg_scale: self.cfg_scale,
            cfg_img: self.cfg_img,
            spacing: self.spacing,
            guidance_rescale: self.guidance_rescale,
        }
    }

    pub fn new(cfg: &ModelConfig, image: RgbImage, prompt: impl Into<String>) -> Self {
        let d = &cfg.defaults;
        Self {
            image,
            mode: Mode::ImageToVideo,
            prompt: prompt.into(),
            height: d.height,
            width: d.width,
            frames: d.frames,
            steps: d.steps,
            eta: d.eta,
            cfg_scale: d.cfg_scale,
            cfg_img: None,
            fs: d.fs,
            spacing: d.spacing,
            guidance_rescale: d.guidance_rescale,
        }
    }
}

/// The seed a launch script uses for `mode` when the user gives none (run_application.sh uses
/// 234 for loops with the interpolation model).
pub fn default_seed(cfg: &ModelConfig, mode: &Mode) -> u64 {
    if cfg.name == "512_interp" && *mode == Mode::Loop {
        234
    } else {
        cfg.defaults.seed
    }
}

/// Pipeline stages, for progress and timing reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    TextEncode,
    ImageEncode,
    VaeEncode,
    Denoise,
    VaeDecode,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::TextEncode => "text encode",
            Stage::ImageEncode => "image encode",
            Stage::VaeEncode => "VAE encode",
            Stage::Denoise => "denoise",
            Stage::VaeDecode => "VAE decode",
        }
    }
}

/// Progress of a run: step `step` of `total` within `stage` (0 of N when a stage starts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub stage: Stage,
    pub step: usize,
    pub total: usize,
}

/// The result of one generation.
#[derive(Debug, Clone)]
pub struct Video {
    /// Decoded frames `(1, 3, t, h, w)`, unclamped model output.
    pub tensor: Tensor,
    /// Saved frames `(t, h, w, 3)` after clamping and the truncating u8 cast (loop: last frame dropped).
    pub frames_u8: Vec<u8>,
    pub frames: usize,
    pub height: usize,
    pub width: usize,
    /// Final latent `(1, 4, t, h/8, w/8)`.
    pub latent: Tensor,
    /// Wall time per stage, in order; each denoising step listed separately. With several
    /// samples, the shared conditioning stages are in the first sample's list.
    pub timings: Vec<(Stage, Duration)>,
}

/// Cross-attention contexts and concat latent, computed once per request.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// `(1, 77 + image tokens, d)`: prompt + CLIP image.
    pub context: Tensor,
    /// Empty prompt + zero image; `None` when CFG is off.
    pub uncond_context: Option<Tensor>,
    /// Empty prompt + real image, for multi-condition guidance.
    pub uncond_img_context: Option<Tensor>,
    /// `(1, 4, t, h, w)` keyframe latents, shared by every branch.
    pub c_concat: Tensor,
    pub fs: i64,
}

/// Sampler settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerOptions {
    pub steps: usize,
    pub eta: f64,
    pub cfg_scale: f64,
    pub cfg_img: Option<f64>,
    pub spacing: TimestepSpacing,
    pub guidance_rescale: f64,
}

pub struct Pipeline {
    cfg: ModelConfig,
    device: Device,
    precision: PrecisionPolicy,
    tokenizer: Tokenizer,
    text: ClipTextEncoder,
    vision: ClipVisionEncoder,
    resampler: Resampler,
    vae: AutoencoderKL,
    unet: Unet,
    schedule: NoiseSchedule,
}

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
    fn build(cfg: ModelConfig, vb: VarBuilder, schedule: NoiseSchedule, precision: PrecisionPolicy, device: &Device) -> Result<Self> {
        let part = |prefix: &str, p: Part| vb.pp(prefix).set_dtype(precision.part(p).weights);
        Ok(Self {
            tokenizer: Tokenizer::new()?,
            text: ClipTextEncoder::new(&cfg.text, part(TEXT_PREFIX, Part::TextEncoder))?,
            vision: ClipVisionEncoder::new(&cfg.vision, part(VISION_PREFIX, Part::ImageEncoder))?,
            resampler: Resampler::new(&cfg.resampler, part(RESAMPLER_PREFIX, Part::Resampler))?,
            vae: AutoencoderKL::new(&cfg.vae, part(VAE_PREFIX, Part::Vae))?,
            unet: Unet::new(&cfg.unet, part(UNET_PREFIX, Part::Unet))?,
            precision,
            device: device.clone(),
            schedule,
            cfg,
        })
    }

    /// Every tensor a checkpoint for `cfg` holds, with its shape, under the model's key names
    /// (the 256 checkpoint's `framestride_embed` already renamed): what the networks read, the
    /// schedule buffers, and the weights the reference keeps but inference never uses.
    pub fn checkpoint_keys(cfg: &ModelConfig) -> Result<BTreeMap<String, Vec<usize>>> {
        let recorder = KeyRecorder::default();
        let schedule = NoiseSchedule::new(&cfg.diffusion);
        let n = schedule.num_timesteps();
        let scale_len = schedule.scale_arr.as_ref().map(|s| s.len());
        Self::build(cfg.clone(), recorder.var_builder(DType::F32), schedule, PrecisionPolicy::f32(), &Device::Cpu)?;
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
        // A quantized file is read as stored; a float one is quantized as it loads if asked.
        let (vb, precision) = match ck.quantization() {
            // Stored int8 is read as it is; the policy's bf16 products still serve the rest.
            Some(q) => (ck.var_builder_for(&precision.clone().with_quantization(None), DType::F32, device), precision.with_quantization(Some(q))),
            None => (ck.var_builder_for(&precision, DType::F32, device), precision),
        };
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
        Self::build(cfg, vb, schedule, precision, device)
    }

    /// Builds the networks of `cfg` with random weights (benchmarks, shape checks).
    pub fn random(cfg: ModelConfig, device: &Device) -> Result<Self> {
        Self::random_with(cfg, device, PrecisionPolicy::f32())
    }

    /// [`Pipeline::random`] with the dtypes (and quantization) of `precision`.
    pub fn random_with(cfg: ModelConfig, device: &Device, precision: PrecisionPolicy) -> Result<Self> {
        let schedule = NoiseSchedule::new(&cfg.diffusion);
        let vb = RandomWeights::var_builder_for(&precision, DType::F32, device);
        Self::build(cfg, vb, schedule, precision, device)
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

    fn compute(&self, part: Part) -> DType {
        self.precision.part(part).compute
    }

    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    pub fn unet(&self) -> &Unet {
        &self.unet
    }

    pub fn vae(&self) -> &AutoencoderKL {
        &self.vae
    }

    pub fn text_encoder(&self) -> &ClipTextEncoder {
        &self.text
    }

    pub fn vision_encoder(&self) -> &ClipVisionEncoder {
        &self.vision
    }

    pub fn resampler(&self) -> &Resampler {
        &self.resampler
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
        Ok(self.text.forward(&self.token_ids(prompts)?)?.to_dtype(self.compute(Part::Unet))?)
    }

    /// CLIP image tokens `(n, 257, width)` of images `(n, 3, h, w)` in [-1, 1].
    pub fn clip_image_tokens(&self, images: &Tensor) -> Result<Tensor> {
        let pixels = clip_preprocess(images, self.cfg.vision.image_size)?.to_dtype(self.compute(Part::ImageEncoder))?;
        Ok(self.vision.forward(&pixels)?)
    }

    /// Image context tokens `(n, 16·frames, d)`: CLIP then the Resampler.
    pub fn encode_image(&self, images: &Tensor) -> Result<Tensor> {
        let tokens = self.clip_image_tokens(images)?.to_dtype(self.compute(Part::Resampler))?;
        Ok(self.resampler.forward(&tokens)?.to_dtype(self.compute(Part::Unet))?)
    }

    /// Scaled latent `0.18215·(mean + std·noise)` of images `(n, 3, h, w)`.
    pub fn vae_encode(&self, images: &Tensor, noise: &Tensor) -> Result<Tensor> {
        let dt = self.compute(Part::Vae);
        let post = self.vae.encode(&images.to_dtype(dt)?)?;
        let z = post.sample(&noise.to_dtype(dt)?)?.to_dtype(DType::F32)?;
        Ok(z.broadcast_mul(&Tensor::new(self.cfg.diffusion.scale_factor as f32, &self.device)?)?)
    }

    /// Decodes scaled latents `(b, c, t, h, w)` to `(b, 3, t, H, W)` one frame at a time, whatever
    /// the config's `perframe_ae`: the decoder is per-image, so this is the same math, and 16
    /// frames at once would hold 16× the activations (12 GB on a GPU at 256×256).
    pub fn vae_decode(&self, latents: &Tensor) -> Result<Tensor> {
        let (b, _, _, _, _) = latents.dims5()?;
        let inv = Tensor::new((1.0 / self.cfg.diffusion.scale_factor) as f32, &self.device)?;
        let z = crate::models::layers::video_to_frames(&latents.broadcast_mul(&inv)?)?.to_dtype(self.compute(Part::Vae))?;
        let frames = (0..z.dim(0)?)
            .map(|i| self.vae.decode(&z.narrow(0, i, 1)?)?.to_dtype(DType::F32))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(crate::models::layers::frames_to_video(&Tensor::cat(&frames, 0)?, b)?)
    }

    /// One UNet call on the noisy latent `x` with the concat latent and context.
    pub fn denoiser(&self, x: &Tensor, c_concat: &Tensor, t: usize, context: &Tensor, fs: i64) -> Result<Tensor> {
        let input = Tensor::cat(&[x, c_concat], 1)?.to_dtype(self.compute(Part::Unet))?;
        let ts = [t as f32];
        let fs = [fs as f32];
        let out = self.unet.forward(&UnetInput { x: &input, timesteps: &ts, context, fs: Some(&fs) })?;
        Ok(out.to_dtype(DType::F32)?)
    }

    /// The guided model output at one step (one, two or three UNet passes).
    pub fn guided_output(&self, cond: &Conditioning, opts: &SamplerOptions, x: &Tensor, t: usize) -> Result<Tensor> {
        let run = |ctx: &Tensor| self.denoiser(x, &cond.c_concat, t, ctx, cond.fs);
        let o_c = run(&cond.context)?;
        let Some(uc) = cond.uncond_context.as_ref().filter(|_| opts.cfg_scale != 1.0) else {
            return Ok(o_c);
        };
        let o_u = run(uc)?;
        let o_i = match (&opts.cfg_img, &cond.uncond_img_context) {
            (Some(_), Some(ctx)) => Some(run(ctx)?),
            _ => None,
        };
        Guidance {
            cond: &o_c,
            uncond: &o_u,
            uncond_img: o_i.as_ref(),
            scale: opts.cfg_scale,
            cfg_img: opts.cfg_img.unwrap_or(opts.cfg_scale),
            rescale: opts.guidance_rescale,
        }
        .combine()
    }

    /// The DDIM loop from `x_T`; `observe` sees every step (index into the run, input latent, step).
    #[allow(clippy::too_many_arguments)]
    pub fn sample(
        &self,
        cond: &Conditioning,
        opts: &SamplerOptions,
        noise: &mut dyn NoiseSource,
        progress: &mut dyn FnMut(Progress),
        cancel: &AtomicBool,
        observe: &mut dyn FnMut(usize, &Tensor, &DdimStep),
        timings: &mut Vec<(Stage, Duration)>,
    ) -> Result<Tensor> {
        let ddim = DdimSchedule::new(&self.schedule, opts.spacing, opts.steps, opts.eta)?;
        let shape = cond.c_concat.dims().to_vec();
        let mut x = noise.initial(&shape)?;
        let total = ddim.len();
        progress(Progress { stage: Stage::Denoise, step: 0, total });
        for (i, index) in (0..total).rev().enumerate() {
            check_cancel(cancel)?;
            let start = Instant::now();
            let t = ddim.timesteps[index];
            let out = self.guided_output(cond, opts, &x, t)?;
            let step_noise = noise.step(i, &shape)?;
            let step = ddim_step(&self.schedule, &ddim, self.cfg.diffusion.parameterization, &x, &out, index, &step_noise)?;
            observe(i, &x, &step);
            x = step.x_prev;
            timings.push((Stage::Denoise, self.elapsed(start)?));
            progress(Progress { stage: Stage::Denoise, step: i + 1, total });
        }
        Ok(x)
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

    fn validate(&self, req: &Request) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidInput(m));
        let multiple = self.cfg.vae.downsample_factor() << (self.cfg.unet.channel_mult.len() - 1);
        if req.height == 0 || req.width == 0 || !req.height.is_multiple_of(multiple) || !req.width.is_multiple_of(multiple) {
            return bad(format!("height and width must be positive multiples of {multiple}, got {}×{}", req.height, req.width));
        }
        let min_frames = if req.mode == Mode::ImageToVideo { 1 } else { 2 };
        if req.frames < min_frames {
            return bad(format!("frames must be at least {min_frames}, got {}", req.frames));
        }
        if req.steps == 0 {
            return bad("steps must be at least 1".into());
        }
        if !req.cfg_scale.is_finite() || req.cfg_img.is_some_and(|c| !c.is_finite()) {
            return bad("cfg scales must be finite numbers".into());
        }
        if !req.eta.is_finite() || req.eta < 0.0 {
            return bad(format!("eta must be a finite number ≥ 0, got {}", req.eta));
        }
        if !req.guidance_rescale.is_finite() || !(0.0..=1.0).contains(&req.guidance_rescale) {
            return bad(format!("guidance rescale must be in [0, 1], got {}", req.guidance_rescale));
        }
        Ok(())
    }

    /// Builds the conditioning of a request (text, CLIP image, keyframe latents).
    pub fn condition(
        &self,
        req: &Request,
        noise: &mut dyn NoiseSource,
        progress: &mut dyn FnMut(Progress),
        timings: &mut Vec<(Stage, Duration)>,
    ) -> Result<Conditioning> {
        let frame = to_tensor(&resize_and_crop(&req.image, req.height, req.width), &self.device)?;
        let guided = req.cfg_scale != 1.0;

        progress(Progress { stage: Stage::TextEncode, step: 0, total: 1 });
        let start = Instant::now();
        let prompts: Vec<&str> = if guided { vec![&req.prompt, ""] } else { vec![&req.prompt] };
        let text = self.encode_text(&prompts)?;
        timings.push((Stage::TextEncode, self.elapsed(start)?));

        progress(Progress { stage: Stage::ImageEncode, step: 0, total: 1 });
        let start = Instant::now();
        let images = if guided { Tensor::cat(&[&frame, &frame.zeros_like()?], 0)? } else { frame.clone() };
        let img = self.encode_image(&images)?;
        timings.push((Stage::ImageEncode, self.elapsed(start)?));

        let ctx = |t: usize, i: usize| -> Result<Tensor> {
            Ok(Tensor::cat(&[&text.narrow(0, t, 1)?, &img.narrow(0, i, 1)?], 1)?)
        };

        progress(Progress { stage: Stage::VaeEncode, step: 0, total: 1 });
        let start = Instant::now();
        let t = req.frames;
        let (h, w) = (req.height / self.cfg.vae.downsample_factor(), req.width / self.cfg.vae.downsample_factor());
        let zshape = [1, self.cfg.vae.embed_dim, h, w];
        let encode = |image: &Tensor, frame_index: usize, noise: &mut dyn NoiseSource| -> Result<Tensor> {
            self.vae_encode(image, &noise.vae(frame_index, &zshape)?)
        };
        let c_concat = match &req.mode {
            Mode::ImageToVideo => {
                let z = encode(&frame, 0, noise)?; // (1, c, h, w)
                z.unsqueeze(2)?.repeat((1, 1, t, 1, 1))?
            }
            Mode::Interpolate { .. } | Mode::Loop => {
                let last = match &req.mode {
                    Mode::Interpolate { end } => to_tensor(&resize_and_crop(end, req.height, req.width), &self.device)?,
                    _ => frame.clone(),
                };
                // Keyframe latents in the first and last slots, exact zeros between.
                let z0 = encode(&frame, 0, noise)?.unsqueeze(2)?;
                let z1 = encode(&last, t - 1, noise)?.unsqueeze(2)?;
                let mid = Tensor::zeros((1, zshape[1], t - 2, h, w), z0.dtype(), &self.device)?;
                Tensor::cat(&[&z0, &mid, &z1], 2)?
            }
        };
        timings.push((Stage::VaeEncode, self.elapsed(start)?));

        Ok(Conditioning {
            context: ctx(0, 0)?,
            uncond_context: if guided { Some(ctx(1, 1)?) } else { None },
            uncond_img_context: if guided && req.cfg_img.is_some() { Some(ctx(1, 0)?) } else { None },
            c_concat: c_concat.to_dtype(DType::F32)?,
            fs: req.fs,
        })
    }

    /// Runs a whole request. `progress` is called at each stage start and after every
    /// denoising step; `cancel` is checked between steps.
    pub fn generate(
        &self,
        req: &Request,
        noise: &mut dyn NoiseSource,
        progress: &mut dyn FnMut(Progress),
        cancel: &AtomicBool,
    ) -> Result<Video> {
        let mut videos = self.generate_samples(req, 1, noise, progress, cancel)?;
        Ok(videos.remove(0))
    }

    /// `samples` videos of one request: the conditioning is computed once, each sample is a
    /// full DDIM run with new noise from the continuing stream (upstream's `--n_samples`).
    pub fn generate_samples(
        &self,
        req: &Request,
        samples: usize,
        noise: &mut dyn NoiseSource,
        progress: &mut dyn FnMut(Progress),
        cancel: &AtomicBool,
    ) -> Result<Vec<Video>> {
        self.validate(req)?;
        if samples == 0 {
            return Err(Error::InvalidInput("the number of samples must be at least 1".into()));
        }
        check_cancel(cancel)?;
        let mut timings = Vec::new();
        let cond = self.condition(req, noise, progress, &mut timings)?;
        let opts = req.sampler_options();
        let mut videos = Vec::with_capacity(samples);
        for _ in 0..samples {
            check_cancel(cancel)?;
            let latent = self.sample(&cond, &opts, noise, progress, cancel, &mut |_, _, _| {}, &mut timings)?;
            check_cancel(cancel)?;
            progress(Progress { stage: Stage::VaeDecode, step: 0, total: 1 });
            let start = Instant::now();
            let tensor = self.vae_decode(&latent)?.to_dtype(DType::F32)?;
            let saved = if req.mode == Mode::Loop { tensor.narrow(2, 0, req.frames - 1)? } else { tensor.clone() };
            let frames = saved.dim(2)?;
            let frames_u8 = video_to_u8(&saved)?;
            timings.push((Stage::VaeDecode, self.elapsed(start)?));
            videos.push(Video {
                tensor,
                frames_u8,
                frames,
                height: req.height,
                width: req.width,
                latent,
                timings: std::mem::take(&mut timings),
            });
        }
        Ok(videos)
    }
}
