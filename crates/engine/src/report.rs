//! The run report every front end shows: per-stage wall time, denoising step statistics,
//! precision, peak memory. One type, serialisable, so the CLI and the server say the same thing.

use crate::pipeline::Stage;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StageTime {
    pub stage: String,
    pub seconds: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StepStats {
    pub count: usize,
    pub total_seconds: f64,
    pub mean_seconds: f64,
    pub min_seconds: f64,
    pub max_seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub model: String,
    pub device: String,
    pub precision: String,
    /// The kernel of each layer kind, and the CPU's instruction set in use (see
    /// [`crate::Backend::summary`]).
    pub kernels: BTreeMap<String, String>,
    pub seed: Option<u64>,
    pub frames: usize,
    pub width: usize,
    pub height: usize,
    /// The sampler and its schedule, e.g. `dpmpp-2m karras, 20 steps`.
    pub sampler: Option<String>,
    /// How the frames ran on the model's window, e.g. `7 windows of 16 frames, stride 4`.
    pub windows: Option<String>,
    /// Wall time per stage in run order (model load, encoders, denoise total, decode, write…).
    pub stages: Vec<StageTime>,
    pub denoise_steps: StepStats,
    pub total_seconds: f64,
    /// Peak resident memory of the process.
    pub peak_rss_bytes: Option<u64>,
    /// Peak GPU memory, where a GPU was used.
    pub peak_gpu_bytes: Option<u64>,
}

impl Report {
    pub fn new(model: impl Into<String>, device: impl Into<String>, precision: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            device: device.into(),
            precision: precision.into(),
            kernels: BTreeMap::new(),
            seed: None,
            frames: 0,
            width: 0,
            height: 0,
            sampler: None,
            windows: None,
            stages: Vec::new(),
            denoise_steps: StepStats::default(),
            total_seconds: 0.0,
            peak_rss_bytes: None,
            peak_gpu_bytes: None,
        }
    }

    /// Adds (or extends) a stage's time.
    pub fn add(&mut self, stage: &str, d: Duration) {
        match self.stages.iter_mut().find(|s| s.stage == stage) {
            Some(s) => s.seconds += d.as_secs_f64(),
            None => self.stages.push(StageTime { stage: stage.to_string(), seconds: d.as_secs_f64() }),
        }
    }

    /// Folds in a pipeline run's timings: stages summed, denoising steps also as statistics.
    pub fn add_timings(&mut self, timings: &[(Stage, Duration)]) {
        for (stage, d) in timings {
            self.add(stage.name(), *d);
        }
        let steps: Vec<f64> = timings.iter().filter(|(s, _)| *s == Stage::Denoise).map(|(_, d)| d.as_secs_f64()).collect();
        if steps.is_empty() {
            return;
        }
        let s = &mut self.denoise_steps;
        let prev = s.count;
        s.count += steps.len();
        s.total_seconds += steps.iter().sum::<f64>();
        s.mean_seconds = s.total_seconds / s.count as f64;
        let (mn, mx) = steps.iter().fold((f64::INFINITY, 0f64), |(a, b), &v| (a.min(v), b.max(v)));
        s.min_seconds = if prev == 0 { mn } else { s.min_seconds.min(mn) };
        s.max_seconds = s.max_seconds.max(mx);
    }

    /// Human-readable lines.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "model {} on {} ({}), {} frames {}×{}{}\n",
            self.model,
            self.device,
            self.precision,
            self.frames,
            self.width,
            self.height,
            self.seed.map(|s| format!(", seed {s}")).unwrap_or_default()
        );
        if let Some(s) = &self.sampler {
            out.push_str(&format!("  {:<14} {s}\n", "sampler"));
        }
        if let Some(w) = &self.windows {
            out.push_str(&format!("  {:<14} {w}\n", "windows"));
        }
        if !self.kernels.is_empty() {
            let kernels: Vec<String> = self.kernels.iter().map(|(k, v)| format!("{k} {v}")).collect();
            out.push_str(&format!("  {:<14} {}\n", "kernels", kernels.join(" · ")));
        }
        for s in &self.stages {
            out.push_str(&format!("  {:<14} {:>9.3} s\n", s.stage, s.seconds));
        }
        let st = &self.denoise_steps;
        if st.count > 0 {
            out.push_str(&format!(
                "  {:<14} {} × mean {:.3} s (min {:.3}, max {:.3})\n",
                "per step", st.count, st.mean_seconds, st.min_seconds, st.max_seconds
            ));
        }
        out.push_str(&format!("  {:<14} {:>9.3} s\n", "total", self.total_seconds));
        if let Some(b) = self.peak_rss_bytes {
            out.push_str(&format!("  {:<14} {:>9.2} GB\n", "peak RSS", b as f64 / 1e9));
        }
        if let Some(b) = self.peak_gpu_bytes {
            out.push_str(&format!("  {:<14} {:>9.2} GB\n", "peak GPU", b as f64 / 1e9));
        }
        out
    }
}

/// A `kB` field of `/proc/self/status`, in bytes; `None` off Linux.
fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Peak resident set size of this process in bytes (Linux `VmHWM`); `None` elsewhere.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_bytes("VmHWM")
}

/// Resident set size of this process now, in bytes (Linux `VmRSS`); `None` elsewhere.
pub fn rss_bytes() -> Option<u64> {
    proc_status_bytes("VmRSS")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_statistics() {
        let mut r = Report::new("m", "cpu", "fp32");
        let ms = Duration::from_millis;
        r.add_timings(&[(Stage::TextEncode, ms(5)), (Stage::Denoise, ms(100)), (Stage::Denoise, ms(300))]);
        r.add_timings(&[(Stage::Denoise, ms(200))]);
        let s = &r.denoise_steps;
        assert_eq!(s.count, 3);
        assert!((s.mean_seconds - 0.2).abs() < 1e-9 && (s.min_seconds - 0.1).abs() < 1e-9 && (s.max_seconds - 0.3).abs() < 1e-9);
        assert_eq!(r.stages.len(), 2);
        assert!((r.stages[1].seconds - 0.6).abs() < 1e-9);
        assert!(r.to_text().contains("per step"));
    }
}
