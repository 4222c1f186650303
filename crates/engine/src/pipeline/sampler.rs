//! Sampling: the guided model output at one step and the DDIM loop.

use super::{check_cancel, Conditioning, Pipeline, Progress, Stage};
use crate::compute::Part;
use crate::config::Sampling;
use crate::diffusion::{ddim_step, DdimSchedule, DdimStep, Guidance};
use crate::models::unet::UnetInput;
use crate::noise::NoiseSource;
use crate::Result;
use candle_core::{DType, Tensor};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

impl Pipeline {
    /// One UNet call on the noisy latent `x` with the concat latent and context.
    pub fn denoiser(&self, x: &Tensor, c_concat: &Tensor, t: usize, context: &Tensor, fs: i64) -> Result<Tensor> {
        let input = Tensor::cat(&[x, c_concat], 1)?.to_dtype(self.compute(Part::Unet))?;
        let ts = [t as f32];
        let fs = [fs as f32];
        let out = self.unet.forward(&UnetInput { x: &input, timesteps: &ts, context, fs: Some(&fs) })?;
        Ok(out.to_dtype(DType::F32)?)
    }

    /// The guided model output at one step (one, two or three UNet passes).
    pub fn guided_output(&self, cond: &Conditioning, opts: &Sampling, x: &Tensor, t: usize) -> Result<Tensor> {
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
        opts: &Sampling,
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
}
