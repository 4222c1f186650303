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

/// Writes `frames` to `path` in `format` at `fps` frames per second (see [`VideoWriter`]).
pub fn write(frames: Frames, format: Format, fps: f64, path: &Path) -> Result<()> {
    let mut writer = VideoWriter::create(format, fps, path, frames.width, frames.height)?;
    for i in 0..frames.count {
        writer.push(frames.frame(i))?;
    }
    writer.finish()
}

/// A video written a frame at a time, as the frames are made: each frame is encoded when it
/// arrives and only the encoded stream is kept (MP4: the compressed samples stay in memory
/// until [`VideoWriter::finish`] writes `moov` before them; GIF and PNG go straight to disk).
/// The file (or, for png, the folder) is written under a temporary name created exclusively
/// beside `path` (unpredictable, so a planted link is never followed), then renamed into place
/// by `finish`: a failure, or a writer dropped unfinished, leaves nothing. A png folder goes to
/// a new or empty folder; a non-empty one is refused, never deleted.
pub struct VideoWriter {
    path: PathBuf,
    width: usize,
    height: usize,
    frames: usize,
    out: Output,
}

enum Output {
    Mp4 { stream: Box<Mp4Stream<std::io::BufWriter<std::fs::File>>>, fps: f64, file: tempfile::NamedTempFile },
    Gif { encoder: gif::Encoder<std::io::BufWriter<std::fs::File>>, centiseconds: u16, file: tempfile::NamedTempFile },
    Png { dir: tempfile::TempDir },
}

impl std::fmt::Debug for VideoWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VideoWriter").field("path", &self.path).field("frames", &self.frames).finish_non_exhaustive()
    }
}

impl VideoWriter {
    /// Starts a `width`×`height` video at `fps` frames per second for `path`.
    pub fn create(format: Format, fps: f64, path: &Path, width: usize, height: usize) -> Result<Self> {
        if !(fps.is_finite() && fps > 0.0) {
            return Err(Error::Invalid(format!("fps must be a positive number, got {fps}")));
        }
        if width == 0 || height == 0 {
            return Err(Error::Invalid(format!("a {width}×{height} frame is empty")));
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
        let out = match format {
            Format::Png => Output::Png { dir: temp.tempdir_in(dir).map_err(io(dir))? },
            Format::Mp4 | Format::Gif => {
                let file = temp.tempfile_in(dir).map_err(io(dir))?;
                let handle = std::io::BufWriter::new(file.as_file().try_clone().map_err(io(file.path()))?);
                if format == Format::Mp4 {
                    Output::Mp4 { stream: Box::new(mp4_stream(handle, width, height, fps)?), fps, file }
                } else {
                    let (w, h) = gif_size(width, height)?;
                    let mut encoder = gif::Encoder::new(handle, w, h, &[]).map_err(gif_error(file.path()))?;
                    encoder.set_repeat(gif::Repeat::Infinite).map_err(gif_error(file.path()))?;
                    // Whole milliseconds per frame, then centiseconds (GIF's unit), both truncated.
                    let centiseconds = (1000 / fps.round().max(1.0) as u32 / 10) as u16;
                    Output::Gif { encoder, centiseconds, file }
                }
            }
        };
        Ok(Self { path: path.to_path_buf(), width, height, frames: 0, out })
    }

    /// Encodes the next frame, `(h, w, 3)` RGB.
    pub fn push(&mut self, rgb: &[u8]) -> Result<()> {
        let (w, h) = (self.width, self.height);
        if rgb.len() != w * h * 3 {
            return Err(Error::Invalid(format!("{} bytes are not an RGB frame of {w}×{h}", rgb.len())));
        }
        let i = self.frames;
        match &mut self.out {
            Output::Mp4 { stream, fps, .. } => stream.push(rgb, w, h, i as f64 / *fps)?,
            Output::Gif { encoder, centiseconds, file } => {
                let mut rgba: Vec<u8> = rgb.chunks_exact(3).flat_map(|p| [p[0], p[1], p[2], 255]).collect();
                let mut frame = gif::Frame::from_rgba_speed(w as u16, h as u16, &mut rgba, 10);
                frame.delay = *centiseconds;
                encoder.write_frame(&frame).map_err(gif_error(file.path()))?;
            }
            Output::Png { dir } => write_png(rgb, w, h, &dir.path().join(format!("frame_{i:03}.png")))?,
        }
        self.frames += 1;
        Ok(())
    }

    /// Completes the video and renames it into place.
    pub fn finish(self) -> Result<()> {
        if self.frames == 0 {
            return Err(Error::Invalid("a video needs at least one frame".into()));
        }
        let path = self.path;
        match self.out {
            Output::Png { dir } => {
                // Renaming onto an empty folder replaces it; the temporary one is removed on failure.
                std::fs::rename(dir.path(), &path).map_err(io(&path))?;
                let _ = dir.keep();
            }
            Output::Mp4 { stream, file, .. } => {
                stream.finish()?.into_inner().map_err(|e| Error::Io { path: file.path().to_path_buf(), source: e.into_error() })?;
                file.persist(&path).map_err(|e| Error::Io { path: path.clone(), source: e.error })?;
            }
            Output::Gif { encoder, file, .. } => {
                let out = encoder.into_inner().map_err(gif_error(file.path()))?;
                out.into_inner().map_err(|e| Error::Io { path: file.path().to_path_buf(), source: e.into_error() })?;
                file.persist(&path).map_err(|e| Error::Io { path: path.clone(), source: e.error })?;
            }
        }
        Ok(())
    }
}

fn gif_size(width: usize, height: usize) -> Result<(u16, u16)> {
    match (u16::try_from(width), u16::try_from(height)) {
        (Ok(w), Ok(h)) => Ok((w, h)),
        _ => Err(Error::Invalid(format!("GIF frames are at most 65535×65535, got {width}×{height}"))),
    }
}

fn gif_error(path: &Path) -> impl Fn(gif::EncodingError) -> Error + '_ {
    move |e| match e {
        gif::EncodingError::Io(source) => Error::Io { path: path.to_path_buf(), source },
        other => Error::Image(other.to_string()),
    }
}

/// H.264 (constant high quality, one keyframe) in an MP4 with `moov` before `mdat`.
pub fn encode_mp4(frames: Frames, fps: f64) -> Result<Vec<u8>> {
    let mut stream = mp4_stream(Vec::new(), frames.width, frames.height, fps)?;
    for i in 0..frames.count {
        stream.push(frames.frame(i), frames.width, frames.height, i as f64 / fps)?;
    }
    stream.finish()
}

/// The H.264 encoder and the MP4 muxer of one video.
struct Mp4Stream<W: Write> {
    encoder: openh264::encoder::Encoder,
    muxer: muxide::api::Muxer<W>,
}

impl<W: Write> Mp4Stream<W> {
    fn push(&mut self, rgb: &[u8], width: usize, height: usize, seconds: f64) -> Result<()> {
        let yuv = openh264::formats::YUVBuffer::from_vec(rgb_to_i420(rgb, width, height), width, height);
        let bitstream = self.encoder.encode(&yuv).map_err(|e| Error::Encode(e.to_string()))?;
        let keyframe = matches!(bitstream.frame_type(), openh264::encoder::FrameType::IDR | openh264::encoder::FrameType::I);
        self.muxer.write_video(seconds, &bitstream.to_vec(), keyframe).map_err(|e| Error::Mux(e.to_string()))
    }

    /// Writes `moov` and the samples; returns the writer.
    fn finish(mut self) -> Result<W> {
        self.muxer.finish_in_place().map_err(|e| Error::Mux(e.to_string()))?;
        Ok(self.muxer.into_writer())
    }
}

fn mp4_stream<W: Write>(out: W, width: usize, height: usize, fps: f64) -> Result<Mp4Stream<W>> {
    use openh264::encoder::{BitRate, Encoder, EncoderConfig, FrameRate, QpRange, RateControlMode};
    use openh264::OpenH264API;
    if !width.is_multiple_of(2) || !height.is_multiple_of(2) {
        return Err(Error::Invalid(format!("yuv420p needs even sizes, got {width}×{height}")));
    }
    // Near-lossless, like upstream's libx264 CRF 10: a bitrate budget no frame can exhaust and
    // a low QP ceiling (openh264 ignores the QP range with rate control off).
    let pixels_per_second = (width * height) as f64 * fps;
    let config = EncoderConfig::new()
        .max_frame_rate(FrameRate::from_hz(fps as f32))
        .rate_control_mode(RateControlMode::Quality)
        .bitrate(BitRate::from_bps((pixels_per_second * 24.0).min(u32::MAX as f64 / 2.0) as u32))
        .qp(QpRange::new(0, 10));
    let encoder = Encoder::with_api_config(OpenH264API::from_source(), config).map_err(|e| Error::Encode(e.to_string()))?;
    let muxer = muxide::api::MuxerBuilder::new(out)
        .video(muxide::api::VideoCodec::H264, width as u32, height as u32, fps)
        .with_fast_start(true)
        .build()
        .map_err(|e| Error::Mux(e.to_string()))?;
    Ok(Mp4Stream { encoder, muxer })
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

fn write_png(rgb: &[u8], width: usize, height: usize, path: &Path) -> Result<()> {
    let mut bytes = Vec::new();
    image::write_buffer_with_format(
        &mut std::io::Cursor::new(&mut bytes),
        rgb,
        width as u32,
        height as u32,
        image::ExtendedColorType::Rgb8,
        image::ImageFormat::Png,
    )
    .map_err(|e| Error::Image(e.to_string()))?;
    std::fs::File::create(path).and_then(|mut f| f.write_all(&bytes)).map_err(io(path))
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
