//! Videos of another length than the model's window (the frames it was trained on, 16 for the
//! real models). Longer: sliding temporal windows of the model's length, each window's guided
//! model output blended per frame with weights that sum to one, at every step (the ComfyUI
//! wrapper's context windows; optional FreeNoise rescheduling of the initial noise). Shorter:
//! the whole window runs and evenly spaced frames are kept, so the model stays in the regime it
//! was trained on.

use crate::config::{KnobError, ModeKind, Sampling};
use crate::Result;
use candle_core::Tensor;
use serde::Serialize;

/// How a request's frames map onto the model's window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FramePlan {
    /// Frames the sampler runs.
    pub run: usize,
    /// The model's window.
    pub window: usize,
    /// Window stride (frames between window starts).
    pub stride: usize,
    /// First frame of each window, in order; one window covers the whole run.
    pub starts: Vec<usize>,
    /// The frames kept for the output when fewer than a window were asked for.
    pub keep: Option<Vec<usize>>,
}

impl FramePlan {
    /// The plan for `s.frames` frames with a model window of `window` frames.
    pub fn new(s: &Sampling, mode: ModeKind, window: usize) -> std::result::Result<Self, KnobError> {
        let (frames, stride) = (s.frames, s.window_stride);
        if frames > window && mode != ModeKind::ImageToVideo {
            return Err(KnobError::new("frames", format!(
                "frames must be at most {window} (the model's window) for {}: its two keyframes are the window's first and last frames, got {frames}",
                mode.name()
            )));
        }
        if frames > window && !(1..=window).contains(&stride) {
            return Err(KnobError::new("window_stride", format!("window_stride must be between 1 and the model's window ({window}), got {stride}")));
        }
        let mut plan = Self::over(frames.max(window), window, stride);
        plan.keep = (frames < window).then(|| evenly_spaced(frames, window));
        Ok(plan)
    }

    /// Windows over a run of `run` frames (one window when it fits).
    pub fn over(run: usize, window: usize, stride: usize) -> Self {
        if run <= window {
            return Self { run, window: run, stride, starts: vec![0], keep: None };
        }
        let mut starts: Vec<usize> = (0..).map(|i| i * stride.max(1)).take_while(|&s| s + window < run).collect();
        starts.push(run - window);
        Self { run, window, stride, starts, keep: None }
    }

    pub fn windows(&self) -> usize {
        self.starts.len()
    }

    /// Each window's weight of each of its frames, normalised so that every frame's weights
    /// over the windows covering it sum to one. Within a window the raw weight rises towards
    /// its middle (`min(j + 1, window - j)`), so overlapping windows cross-fade.
    pub fn weights(&self) -> Vec<Vec<f32>> {
        let w = self.window;
        let raw: Vec<f64> = (0..w).map(|j| (j + 1).min(w - j) as f64).collect();
        let mut total = vec![0f64; self.run];
        for &s in &self.starts {
            for (j, r) in raw.iter().enumerate() {
                total[s + j] += r;
            }
        }
        self.starts.iter().map(|&s| raw.iter().enumerate().map(|(j, r)| (r / total[s + j]) as f32).collect()).collect()
    }

    /// The run in words for the report, e.g. `3 windows of 16 frames, stride 4`.
    pub fn describe(&self) -> String {
        match (&self.keep, self.windows()) {
            (Some(keep), _) => format!("1 window of {} frames, {} evenly spaced kept", self.window, keep.len()),
            (None, 1) => format!("1 window of {} frames", self.window),
            (None, n) => format!("{n} windows of {} frames, stride {}", self.window, self.stride),
        }
    }

    /// The model output over all frames from one call per window: `output(x_window,
    /// c_concat_window)` on each window's frames, blended with [`Self::weights`]. One window
    /// is the plain call.
    pub fn blend(&self, x: &Tensor, c_concat: &Tensor, output: &mut dyn FnMut(&Tensor, &Tensor) -> Result<Tensor>) -> Result<Tensor> {
        if self.windows() == 1 {
            return output(x, c_concat);
        }
        let mut sum: Option<Tensor> = None;
        for (&s, w) in self.starts.iter().zip(self.weights()) {
            let out = output(&x.narrow(2, s, self.window)?, &c_concat.narrow(2, s, self.window)?)?;
            let weights = Tensor::from_vec(w, (1, 1, self.window, 1, 1), out.device())?.to_dtype(out.dtype())?;
            let part = out.broadcast_mul(&weights)?.pad_with_zeros(2, s, self.run - s - self.window)?;
            sum = Some(match sum {
                Some(acc) => (acc + part)?,
                None => part,
            });
        }
        Ok(sum.expect("a plan has a window"))
    }

    /// FreeNoise (Qiu et al. 2023) noise rescheduling: every stride of frames past the first
    /// window reuses the noise of the frames one window earlier, shuffled, so windows start
    /// from related noise. The shuffles come from `seed`.
    pub fn reschedule_noise(&self, x: &Tensor, seed: u64) -> Result<Tensor> {
        if self.windows() == 1 {
            return Ok(x.clone());
        }
        let mut order: Vec<usize> = (0..self.run).collect();
        let mut state = seed ^ 0x4652_4545_4e4f_4953;
        for start in (self.window..self.run).step_by(self.stride) {
            let len = self.stride.min(self.run - start);
            let mut src: Vec<usize> = (start - self.window..start - self.window + len).map(|f| order[f]).collect();
            for i in (1..src.len()).rev() {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                src.swap(i, (state >> 33) as usize % (i + 1));
            }
            order[start..start + len].copy_from_slice(&src);
        }
        let frames: Vec<Tensor> = order.iter().map(|&f| x.narrow(2, f, 1)).collect::<candle_core::Result<_>>()?;
        Ok(Tensor::cat(&frames, 2)?)
    }

    /// The frames of the run the output keeps, in order.
    pub fn kept_frames(&self) -> Vec<usize> {
        self.keep.clone().unwrap_or_else(|| (0..self.run).collect())
    }
}

/// `n` frame indices evenly spread over `0..total`, first and last included.
fn evenly_spaced(n: usize, total: usize) -> Vec<usize> {
    if n <= 1 {
        return vec![0];
    }
    (0..n).map(|i| ((i * (total - 1)) as f64 / (n - 1) as f64).round() as usize).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::presets::Preset;
    use candle_core::Device;

    fn plan(frames: usize, stride: usize, mode: ModeKind) -> std::result::Result<FramePlan, KnobError> {
        let mut s = Preset::Dc256.config().defaults;
        (s.frames, s.window_stride) = (frames, stride);
        FramePlan::new(&s, mode, 16)
    }

    #[test]
    fn windows_cover_every_frame_and_weights_sum_to_one() {
        for (frames, stride) in [(40, 4), (17, 4), (48, 8), (96, 4), (33, 16), (20, 1)] {
            let p = plan(frames, stride, ModeKind::ImageToVideo).unwrap();
            assert_eq!(p.run, frames);
            assert_eq!(*p.starts.last().unwrap() + 16, frames, "the last window ends at the last frame");
            assert!(p.starts.windows(2).all(|w| w[1] > w[0] && w[1] - w[0] <= stride));
            let weights = p.weights();
            let mut sums = vec![0f64; frames];
            for (s, w) in p.starts.iter().zip(&weights) {
                for (j, v) in w.iter().enumerate() {
                    assert!(*v > 0.0);
                    sums[s + j] += *v as f64;
                }
            }
            assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-6), "{frames}/{stride}: {sums:?}");
        }
        let p = plan(40, 4, ModeKind::ImageToVideo).unwrap();
        assert_eq!((p.windows(), p.describe().as_str()), (7, "7 windows of 16 frames, stride 4"));
    }

    #[test]
    fn the_window_itself_and_shorter_runs() {
        let p = plan(16, 4, ModeKind::ImageToVideo).unwrap();
        assert_eq!((p.run, p.starts.clone(), p.keep.clone()), (16, vec![0], None));
        let p = plan(5, 4, ModeKind::Interpolate).unwrap();
        assert_eq!((p.run, p.keep.clone().unwrap()), (16, vec![0, 4, 8, 11, 15]), "keyframes stay first and last");
        assert_eq!(plan(1, 4, ModeKind::ImageToVideo).unwrap().keep.unwrap(), vec![0]);
        for mode in [ModeKind::Interpolate, ModeKind::Loop] {
            let e = plan(17, 4, mode).unwrap_err().to_string();
            assert!(e.contains("frames must be at most 16"), "{e}");
        }
        assert!(plan(40, 17, ModeKind::ImageToVideo).unwrap_err().to_string().contains("window_stride"));
    }

    #[test]
    fn one_window_is_the_plain_call_and_blending_is_a_weighted_sum() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, (2 * 40) as f32, &dev).unwrap().reshape((1, 2, 40, 1, 1)).unwrap();
        let c = x.zeros_like().unwrap();
        // A "model" that is the identity on its window: blended, it must give x back.
        let p = plan(40, 4, ModeKind::ImageToVideo).unwrap();
        let mut calls = 0;
        let y = p.blend(&x, &c, &mut |xw, cw| {
            calls += 1;
            assert_eq!((xw.dim(2).unwrap(), cw.dim(2).unwrap()), (16, 16));
            Ok(xw.clone())
        })
        .unwrap();
        assert_eq!(calls, p.windows());
        let (a, b): (Vec<f32>, Vec<f32>) = (x.flatten_all().unwrap().to_vec1().unwrap(), y.flatten_all().unwrap().to_vec1().unwrap());
        assert!(a.iter().zip(&b).all(|(a, b)| (a - b).abs() <= 1e-4 * a.abs().max(1.0)), "{b:?}");
        // One window: the call itself, untouched.
        let p = plan(16, 4, ModeKind::ImageToVideo).unwrap();
        let x16 = x.narrow(2, 0, 16).unwrap();
        let y = p.blend(&x16, &c.narrow(2, 0, 16).unwrap(), &mut |xw, _| Ok((xw * 3.0)?)).unwrap();
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), (x16 * 3.0).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }

    #[test]
    fn freenoise_reuses_earlier_frames_and_keeps_the_first_window() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 40.0, &dev).unwrap().reshape((1, 1, 40, 1, 1)).unwrap();
        let p = plan(40, 4, ModeKind::ImageToVideo).unwrap();
        let y: Vec<f32> = p.reschedule_noise(&x, 7).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(&y[..16], &(0..16).map(|v| v as f32).collect::<Vec<_>>()[..]);
        for start in (16..40).step_by(4) {
            let mut block: Vec<f32> = y[start..start + 4].to_vec();
            let mut earlier: Vec<f32> = y[start - 16..start - 12].to_vec();
            block.sort_by(f32::total_cmp);
            earlier.sort_by(f32::total_cmp);
            assert_eq!(block, earlier, "frames {start}.. are a shuffle of the frames a window earlier");
        }
        assert_ne!(y, p.reschedule_noise(&x, 8).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), "the seed picks the shuffle");
    }
}
