//! Sampling: the guided model output at one step and the loop of the chosen sampler.

use super::{check_cancel, Conditioning, FramePlan, Pipeline, Progress, Stage};
use crate::compute::Part;
use crate::config::Sampling;
use crate::diffusion::{DdimSchedule, Guidance};
use crate::samplers::{ddim_points, k_points, Denoiser, Prediction, SamplerKind, ScheduleOptions, Solver};
use crate::models::unet::UnetInput;
use crate::noise::NoiseSource;
use crate::Result;
use candle_core::{DType, Tensor};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

impl Pipeline {
    /// One UNet call on the noisy latent `x` with the concat latent and context. `context` may
    /// hold several contexts along its batch axis: `x` then runs once with each, in one batch.
    pub fn unet_output(&self, x: &Tensor, c_concat: &Tensor, t: usize, context: &Tensor, fs: i64) -> Result<Tensor> {
        let k = context.dim(0)?;
        let mut input = Tensor::cat(&[x, c_concat], 1)?.to_dtype(self.compute(Part::Unet))?;
        if k > 1 && input.dim(0)? == 1 {
            input = input.repeat((k, 1, 1, 1, 1))?;
        }
        let ts = vec![t as f32; k];
        let fs = vec![fs as f32; k];
        let conditioning = self.unet.condition(&UnetInput { x: &input, timesteps: &ts, context, fs: Some(&fs) }, None)?;
        let out = match &self.unet_graphs {
            Some(graphs) => graphs.forward(&self.unet, &input, &conditioning)?,
            None => self.unet.forward_conditioned(&input, &conditioning)?,
        };
        Ok(out.to_dtype(DType::F32)?)
    }

    /// The guided model output at one step (one, two or three UNet passes; as one batch where
    /// the backend says so).
    pub fn guided_output(&self, cond: &Conditioning, opts: &Sampling, x: &Tensor, t: usize) -> Result<Tensor> {
        self.guided_output_as(cond, opts, x, t, self.backend.batched_guidance())
    }

    /// [`guided_output`](Self::guided_output) with the guidance passes `batched` in one UNet
    /// call or run one by one (the same maths; tests compare the two).
    pub fn guided_output_as(&self, cond: &Conditioning, opts: &Sampling, x: &Tensor, t: usize, batched: bool) -> Result<Tensor> {
        self.guided_window(cond, opts, x, &cond.c_concat, t, batched)
    }

    /// The guided output on some frames: `x` and `c_concat` narrowed to a window.
    fn guided_window(&self, cond: &Conditioning, opts: &Sampling, x: &Tensor, c_concat: &Tensor, t: usize, batched: bool) -> Result<Tensor> {
        let run = |ctx: &Tensor| self.unet_output(x, c_concat, t, ctx, cond.fs);
        let Some(uc) = cond.uncond_context.as_ref().filter(|_| opts.cfg_scale != 1.0) else {
            return run(&cond.context);
        };
        let uncond_img = match (&opts.cfg_img, &cond.uncond_img_context) {
            (Some(_), Some(ctx)) => Some(ctx),
            _ => None,
        };
        let contexts: Vec<&Tensor> = [Some(&cond.context), Some(uc), uncond_img].into_iter().flatten().collect();
        let outs = if batched {
            let out = run(&Tensor::cat(&contexts, 0)?)?;
            (0..contexts.len()).map(|i| out.narrow(0, i, 1)).collect::<candle_core::Result<Vec<_>>>()?
        } else {
            contexts.into_iter().map(run).collect::<Result<Vec<_>>>()?
        };
        Guidance {
            cond: &outs[0],
            uncond: &outs[1],
            uncond_img: outs.get(2),
            scale: opts.cfg_scale,
            cfg_img: opts.cfg_img.unwrap_or(opts.cfg_scale),
            rescale: opts.guidance_rescale,
        }
        .combine()
    }

    /// The sampler `opts` names, over this model's schedule.
    pub fn solver(&self, opts: &Sampling) -> Result<Solver> {
        let param = self.cfg.diffusion.parameterization;
        Ok(match opts.sampler {
            SamplerKind::Ddim => {
                let ddim = DdimSchedule::new(&self.schedule, opts.spacing, opts.steps, opts.eta)?;
                let points = ddim_points(&self.schedule, &ddim, param);
                Solver::ddim(ddim, points)
            }
            kind => {
                let so = ScheduleOptions { spacing: opts.spacing, steps: opts.steps, karras: opts.karras };
                Solver::k(kind, k_points(&self.schedule, &so)?)
            }
        })
    }

    /// The sampling loop from `x_T`; `observe` sees every step (index into the run, input
    /// latent, the denoiser's prediction).
    #[allow(clippy::too_many_arguments)]
    pub fn sample(
        &self,
        cond: &Conditioning,
        opts: &Sampling,
        noise: &mut dyn NoiseSource,
        progress: &mut dyn FnMut(Progress),
        cancel: &AtomicBool,
        observe: &mut dyn FnMut(usize, &Tensor, &Prediction),
        timings: &mut Vec<(Stage, Duration)>,
    ) -> Result<Tensor> {
        let mut solver = self.solver(opts)?;
        let shape = cond.c_concat.dims().to_vec();
        let plan = FramePlan::over(shape[2], self.cfg.window(), opts.window_stride);
        let mut x = noise.initial(&shape)?;
        if opts.noise_reschedule {
            x = plan.reschedule_noise(&x, opts.seed)?;
        }
        let total = solver.steps();
        let batched = self.backend.batched_guidance();
        let mut denoiser = Denoiser {
            model: |x: &Tensor, t: usize| plan.blend(x, &cond.c_concat, &mut |xw, cw| self.guided_window(cond, opts, xw, cw, t, batched)),
            parameterization: self.cfg.diffusion.parameterization,
        };
        progress(Progress { stage: Stage::Denoise, step: 0, total });
        for i in 0..total {
            check_cancel(cancel)?;
            let start = Instant::now();
            let pred = denoiser.predict(&x, solver.point(i))?;
            observe(i, &x, &pred);
            x = solver.step(i, &x, &pred, &mut || noise.step(i, &shape))?;
            timings.push((Stage::Denoise, self.elapsed(start)?));
            progress(Progress { stage: Stage::Denoise, step: i + 1, total });
        }
        Ok(x)
    }
}
