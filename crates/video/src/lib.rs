//! Writing generated frames to disk: H.264 MP4 (yuv420p, `moov` first, so browsers play it
//! while it downloads), animated GIF, or numbered PNGs. Every writer produces its output under a
//! temporary name and renames it at the end, so a failed write leaves nothing behind.

use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("H.264 encoder: {0}")]
    Encode(String),
    #[error("MP4 muxer: {0}")]
    Mux(String),
    #[error("image encoder: {0}")]
    Image(String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Output container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Mp4,
    Gif,
    /// One `frame_000.png`… per frame in a folder.
    Png,
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mp4" => Ok(Self::Mp4),
            "gif" => Ok(Self::Gif),
            "png" => Ok(Self::Png),
            _ => Err(Error::Invalid(format!("unknown format '{s}' (expected mp4, gif or png)"))),
        }
    }
}

impl Format {
    pub fn extension(self) -> &'static str {
        match self {
            Self::Mp4 => "mp4",
            Self::Gif => "gif",
            Self::Png => "png",
        }
    }
}

/// Frames `(t, h, w, 3)` RGB u8, as the pipeline returns them.
#[derive(Debug, Clone, Copy)]
pub struct Frames<'a> {
    pub data: &'a [u8],
    pub count: usize,
    pub width: usize,
    pub height: usize,
}

impl<'a> Frames<'a> {
    pub fn new(data: &'a [u8], count: usize, width: usize, height: usize) -> Result<Self> {
        if count == 0 || width == 0 || height == 0 || data.len() != count * width * height * 3 {
            return Err(Error::Invalid(format!(
                "{} bytes are not {count} RGB frames of {width}×{height}",
                data.len()
            )));
        }
        Ok(Self { data, count, width, height })
    }

    pub fn frame(&self, i: usize) -> &'a [u8] {
        let n = self.width * self.height * 3;
        &self.data[i * n..(i + 1) * n]
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// Refuses a destination [`write`] would not take: for png, anything but a new or empty folder
/// (a folder of frames is never emptied or merged into). Front ends call it before any work.
pub fn check_destination(format: Format, path: &Path) -> Result<()> {
    if format == Format::Png && path.exists() {
        let empty = path.is_dir() && std::fs::read_dir(path).map_err(io(path))?.next().is_none();
        if !empty {
            return Err(Error::Invalid(format!("{} exists and is not an empty folder; png frames go to a new or empty folder", path.display())));
        }
    }
    Ok(())
}

/// Writes `frames` to `path` in `format` at `fps` frames per second. The file (or, for png, the
/// folder) is written under a temporary name created exclusively beside `path` (unpredictable,
/// so a planted link is never followed), then renamed into place: a failure leaves nothing. A
/// png folder goes to a new or empty folder; a non-empty one is refused, never deleted.
pub fn write(frames: Frames, format: Format, fps: f64, path: &Path) -> Result<()> {
    if !(fps.is_finite() && fps > 0.0) {
        return Err(Error::Invalid(format!("fps must be a positive number, got {fps}")));
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let prefix = format!(".{name}.");
    let mut temp = tempfile::Builder::new();
    temp.prefix(&prefix).suffix(".partial");
    // As `File::create` / `create_dir` would (the umask applies), not tempfile's private 0600.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        temp.permissions(std::fs::Permissions::from_mode(if format == Format::Png { 0o777 } else { 0o666 }));
    }
    check_destination(format, path)?;
    match format {
        Format::Png => {
            let tmp = temp.tempdir_in(dir).map_err(io(dir))?;
            write_pngs(frames, tmp.path())?;
            // Renaming onto an empty folder replaces it; the temporary one is removed on failure.
            std::fs::rename(tmp.path(), path).map_err(io(path))?;
            let _ = tmp.keep();
            Ok(())
        }
        Format::Mp4 | Format::Gif => {
            let mut tmp = temp.tempfile_in(dir).map_err(io(dir))?;
            let tmp_path = tmp.path().to_path_buf();
            match format {
                Format::Mp4 => tmp.write_all(&encode_mp4(frames, fps)?).map_err(io(&tmp_path))?,
                _ => write_gif(frames, fps, tmp.as_file_mut()).map_err(|e| match e {
                    Error::Io { source, .. } => Error::Io { path: tmp_path.clone(), source },
                    other => other,
                })?,
            }
            tmp.persist(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e.error })?;
            Ok(())
        }
    }
}

/// H.264 (constant high quality, one keyframe) in an MP4 with `moov` before `mdat`.
pub fn encode_mp4(frames: Frames, fps: f64) -> Result<Vec<u8>> {
    use openh264::encoder::{BitRate, Encoder, EncoderConfig, FrameRate, QpRange, RateControlMode};
    use openh264::formats::YUVBuffer;
    use openh264::OpenH264API;
    if !frames.width.is_multiple_of(2) || !frames.height.is_multiple_of(2) {
        return Err(Error::Invalid(format!("yuv420p needs even sizes, got {}×{}", frames.width, frames.height)));
    }
    // Near-lossless, like upstream's libx264 CRF 10: a bitrate budget no frame can exhaust and
    // a low QP ceiling (openh264 ignores the QP range with rate control off).
    let pixels_per_second = (frames.width * frames.height) as f64 * fps;
    let config = EncoderConfig::new()
        .max_frame_rate(FrameRate::from_hz(fps as f32))
        .rate_control_mode(RateControlMode::Quality)
        .bitrate(BitRate::from_bps((pixels_per_second * 24.0).min(u32::MAX as f64 / 2.0) as u32))
        .qp(QpRange::new(0, 10));
    let mut encoder =
        Encoder::with_api_config(OpenH264API::from_source(), config).map_err(|e| Error::Encode(e.to_string()))?;
    let mut out = Vec::new();
    let mut muxer = muxide::api::MuxerBuilder::new(&mut out)
        .video(muxide::api::VideoCodec::H264, frames.width as u32, frames.height as u32, fps)
        .with_fast_start(true)
        .build()
        .map_err(|e| Error::Mux(e.to_string()))?;
    for i in 0..frames.count {
        let yuv = YUVBuffer::from_vec(rgb_to_i420(frames.frame(i), frames.width, frames.height), frames.width, frames.height);
        let bitstream = encoder.encode(&yuv).map_err(|e| Error::Encode(e.to_string()))?;
        let keyframe = matches!(bitstream.frame_type(), openh264::encoder::FrameType::IDR | openh264::encoder::FrameType::I);
        let nal = bitstream.to_vec();
        muxer.write_video(i as f64 / fps, &nal, keyframe).map_err(|e| Error::Mux(e.to_string()))?;
    }
    muxer.finish().map_err(|e| Error::Mux(e.to_string()))?;
    Ok(out)
}

/// RGB → planar I420, BT.601 limited range (what players assume for untagged H.264), rounded;
/// chroma from the mean of each 2×2 block.
fn rgb_to_i420(rgb: &[u8], w: usize, h: usize) -> Vec<u8> {
    let mut out = vec![0u8; w * h * 3 / 2];
    let (y_plane, uv) = out.split_at_mut(w * h);
    let (u_plane, v_plane) = uv.split_at_mut(w * h / 4);
    let px = |x: usize, y: usize| {
        let i = (y * w + x) * 3;
        (rgb[i] as f32, rgb[i + 1] as f32, rgb[i + 2] as f32)
    };
    let clamp = |v: f32| v.round().clamp(0.0, 255.0) as u8;
    for y in 0..h {
        for x in 0..w {
            let (r, g, b) = px(x, y);
            y_plane[y * w + x] = clamp(16.0 + 0.256788 * r + 0.504129 * g + 0.097906 * b);
        }
    }
    for cy in 0..h / 2 {
        for cx in 0..w / 2 {
            let (mut r, mut g, mut b) = (0.0, 0.0, 0.0);
            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                let p = px(2 * cx + dx, 2 * cy + dy);
                r += p.0 / 4.0;
                g += p.1 / 4.0;
                b += p.2 / 4.0;
            }
            u_plane[cy * (w / 2) + cx] = clamp(128.0 - 0.148223 * r - 0.290993 * g + 0.439216 * b);
            v_plane[cy * (w / 2) + cx] = clamp(128.0 + 0.439216 * r - 0.367788 * g - 0.071427 * b);
        }
    }
    out
}

fn write_gif(frames: Frames, fps: f64, file: &mut std::fs::File) -> Result<()> {
    use image::codecs::gif::{GifEncoder, Repeat};
    use image::{Delay, Frame, RgbaImage};
    let mut enc = GifEncoder::new_with_speed(std::io::BufWriter::new(file), 10);
    enc.set_repeat(Repeat::Infinite).map_err(|e| Error::Image(e.to_string()))?;
    let delay = Delay::from_numer_denom_ms(1000, fps.round().max(1.0) as u32);
    for i in 0..frames.count {
        let rgba: Vec<u8> = frames.frame(i).chunks_exact(3).flat_map(|p| [p[0], p[1], p[2], 255]).collect();
        let img = RgbaImage::from_raw(frames.width as u32, frames.height as u32, rgba)
            .ok_or_else(|| Error::Invalid("frame size".into()))?;
        enc.encode_frame(Frame::from_parts(img, 0, 0, delay)).map_err(|e| Error::Image(e.to_string()))?;
    }
    drop(enc);
    Ok(())
}

/// The frames as `frame_000.png`, … in `dir` (a new folder of ours).
fn write_pngs(frames: Frames, dir: &Path) -> Result<()> {
    for i in 0..frames.count {
        let path = dir.join(format!("frame_{i:03}.png"));
        let mut bytes = Vec::new();
        image::write_buffer_with_format(
            &mut std::io::Cursor::new(&mut bytes),
            frames.frame(i),
            frames.width as u32,
            frames.height as u32,
            image::ExtendedColorType::Rgb8,
            image::ImageFormat::Png,
        )
        .map_err(|e| Error::Image(e.to_string()))?;
        std::fs::File::create(&path).and_then(|mut f| f.write_all(&bytes)).map_err(io(&path))?;
    }
    Ok(())
}

/// An MP4 read back: what a player would show.
#[derive(Debug, Clone)]
pub struct DecodedVideo {
    pub width: usize,
    pub height: usize,
    pub fps: f64,
    /// `(t, h, w, 3)` RGB.
    pub frames: Vec<u8>,
    pub count: usize,
    /// Whether the `moov` box comes before `mdat` (playable while downloading).
    pub moov_first: bool,
}

/// Demuxes and decodes an H.264 MP4 (for tests and checks of our own output).
pub fn decode_mp4(bytes: &[u8]) -> Result<DecodedVideo> {
    use openh264::decoder::Decoder;
    let mux = |e: mp4::Error| Error::Mux(e.to_string());
    let mut reader = mp4::Mp4Reader::read_header(std::io::Cursor::new(bytes), bytes.len() as u64).map_err(mux)?;
    let track = reader
        .tracks()
        .values()
        .find(|t| t.track_type().ok() == Some(mp4::TrackType::Video))
        .ok_or_else(|| Error::Mux("no video track".into()))?;
    let (id, width, height, fps) = (track.track_id(), track.width() as usize, track.height() as usize, track.frame_rate());
    let mut annexb = Vec::new();
    for ps in [track.sequence_parameter_set().map_err(mux)?, track.picture_parameter_set().map_err(mux)?] {
        annexb.extend([0, 0, 0, 1]);
        annexb.extend(ps);
    }
    let samples = reader.sample_count(id).map_err(mux)?;
    let mut decoder = Decoder::new().map_err(|e| Error::Encode(e.to_string()))?;
    let mut frames = Vec::new();
    let mut count = 0;
    for s in 1..=samples {
        let sample = reader.read_sample(id, s).map_err(mux)?.ok_or_else(|| Error::Mux(format!("sample {s} missing")))?;
        // AVCC (4-byte lengths) → Annex B start codes.
        let mut data = &sample.bytes[..];
        while data.len() >= 4 {
            let n = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
            if data.len() < 4 + n {
                return Err(Error::Mux("truncated NAL unit".into()));
            }
            annexb.extend([0, 0, 0, 1]);
            annexb.extend(&data[4..4 + n]);
            data = &data[4 + n..];
        }
        if let Some(yuv) = decoder.decode(&annexb).map_err(|e| Error::Encode(e.to_string()))? {
            let mut rgb = vec![0u8; width * height * 3];
            yuv.write_rgb8(&mut rgb);
            frames.extend(rgb);
            count += 1;
        }
        annexb.clear();
    }
    for yuv in decoder.flush_remaining().map_err(|e| Error::Encode(e.to_string()))? {
        let mut rgb = vec![0u8; width * height * 3];
        yuv.write_rgb8(&mut rgb);
        frames.extend(rgb);
        count += 1;
    }
    Ok(DecodedVideo { width, height, fps, frames, count, moov_first: moov_before_mdat(bytes) })
}

fn moov_before_mdat(bytes: &[u8]) -> bool {
    let mut pos = 0;
    while pos + 8 <= bytes.len() {
        let size = u32::from_be_bytes([bytes[pos], bytes[pos + 1], bytes[pos + 2], bytes[pos + 3]]) as usize;
        match &bytes[pos + 4..pos + 8] {
            b"moov" => return true,
            b"mdat" => return false,
            _ => {}
        }
        if size < 8 {
            return false;
        }
        pos += size;
    }
    false
}

/// Peak signal-to-noise ratio of two u8 buffers, in dB.
pub fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let mse = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>() / a.len().max(1) as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

/// BT.601 luma of RGB pixels (for quality checks).
pub fn luma(rgb: &[u8]) -> Vec<u8> {
    rgb.chunks_exact(3)
        .map(|p| (0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32).round() as u8)
        .collect()
}

/// `frames` with each 2×2 block's chroma replaced by its mean, luma kept: the best any 4:2:0
/// video can reproduce. Comparing a decoded MP4 against this measures the encoder alone.
pub fn chroma_420(frames: Frames) -> Vec<u8> {
    let (w, h) = (frames.width, frames.height);
    let mut out = frames.data.to_vec();
    for f in 0..frames.count {
        let src = frames.frame(f);
        let dst = &mut out[f * w * h * 3..(f + 1) * w * h * 3];
        for cy in 0..h / 2 {
            for cx in 0..w / 2 {
                let block = [(0, 0), (1, 0), (0, 1), (1, 1)].map(|(dx, dy)| ((2 * cy + dy) * w + 2 * cx + dx) * 3);
                let (mut cb, mut cr) = (0f32, 0f32);
                for &i in &block {
                    let (r, g, b) = (src[i] as f32, src[i + 1] as f32, src[i + 2] as f32);
                    cb += (-0.168736 * r - 0.331264 * g + 0.5 * b) / 4.0;
                    cr += (0.5 * r - 0.418688 * g - 0.081312 * b) / 4.0;
                }
                for &i in &block {
                    let y = 0.299 * src[i] as f32 + 0.587 * src[i + 1] as f32 + 0.114 * src[i + 2] as f32;
                    let px = [y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb];
                    for c in 0..3 {
                        dst[i + c] = px[c].round().clamp(0.0, 255.0) as u8;
                    }
                }
            }
        }
    }
    out
}
