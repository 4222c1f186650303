//! The conditioning of a request: text and CLIP image contexts, the keyframes' latents.

use super::{Mode, Pipeline, Progress, Request, Stage};
use crate::noise::NoiseSource;
use crate::preprocess::{resize_and_crop, to_tensor};
use crate::Result;
use candle_core::{DType, Tensor};
use std::time::{Duration, Instant};

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

impl Pipeline {
    /// Builds the conditioning of a request (text, CLIP image, keyframe latents).
    pub fn condition(
        &self,
        req: &Request,
        noise: &mut dyn NoiseSource,
        progress: &mut dyn FnMut(Progress),
        timings: &mut Vec<(Stage, Duration)>,
    ) -> Result<Conditioning> {
        let (height, width) = (req.sampling.height, req.sampling.width);
        let frame = to_tensor(&resize_and_crop(&req.image, height, width), &self.device)?;
        let guided = req.sampling.cfg_scale != 1.0;

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
        let t = self.frame_plan(req)?.run;
        let (h, w) = (height / self.cfg.vae.downsample_factor(), width / self.cfg.vae.downsample_factor());
        let zshape = [1, self.cfg.vae.embed_dim, h, w];
        let vae = self.vae()?;
        let encode = |image: &Tensor, frame_index: usize, noise: &mut dyn NoiseSource| -> Result<Tensor> {
            self.encode_with(&vae, image, &noise.vae(frame_index, &zshape)?)
        };
        let c_concat = match &req.mode {
            Mode::ImageToVideo => {
                let z = encode(&frame, 0, noise)?; // (1, c, h, w)
                z.unsqueeze(2)?.repeat((1, 1, t, 1, 1))?
            }
            Mode::Interpolate { .. } | Mode::Loop => {
                let last = match &req.mode {
                    Mode::Interpolate { end } => to_tensor(&resize_and_crop(end, height, width), &self.device)?,
                    _ => frame.clone(),
                };
                // Keyframe latents in the first and last slots, exact zeros between.
                let z0 = encode(&frame, 0, noise)?.unsqueeze(2)?;
                let z1 = encode(&last, t - 1, noise)?.unsqueeze(2)?;
                let mid = Tensor::zeros((1, zshape[1], t - 2, h, w), z0.dtype(), &self.device)?;
                Tensor::cat(&[&z0, &mid, &z1], 2)?
            }
        };
        drop(vae);
        timings.push((Stage::VaeEncode, self.elapsed(start)?));

        Ok(Conditioning {
            context: ctx(0, 0)?,
            uncond_context: if guided { Some(ctx(1, 1)?) } else { None },
            uncond_img_context: if guided && req.sampling.cfg_img.is_some() { Some(ctx(1, 0)?) } else { None },
            c_concat: c_concat.to_dtype(DType::F32)?,
            fs: req.sampling.fs,
        })
    }
}
