//! Image preprocessing exactly as the reference CLI does it (`docs/spec/sampling.md` §1.1): PIL
//! bilinear shorter-side resize, centre crop with black padding, `[-1, 1]` tensor; and the CLIP
//! embedder's kornia resize to 224 (Gaussian antialias + bicubic `align_corners=True`).

use crate::{Error, Result};
use candle_core::{Device, Tensor};

/// An 8-bit RGB image, rows top to bottom, `data.len() == width·height·3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        if width == 0 || height == 0 || data.len() != width * height * 3 {
            return Err(Error::InvalidInput(format!(
                "image buffer of {} bytes does not hold {width}×{height} RGB pixels",
                data.len()
            )));
        }
        Ok(Self { width, height, data })
    }
}

/// Pillow's bilinear filter (support 1).
fn bilinear(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`: per output pixel, the first input
/// index and fixed-point weights.
fn pil_coeffs(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // bilinear support 1.0 × filterscale
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (xmin..xmax).map(|x| bilinear((x as f64 - center + 0.5) * ss)).collect();
            let total: f64 = w.iter().sum();
            let k = w
                .iter()
                .map(|&v| {
                    let v = if total != 0.0 { v / total } else { v };
                    let f = v * (1u32 << PRECISION_BITS) as f64;
                    if f < 0.0 {
                        (-0.5 + f) as i32
                    } else {
                        (0.5 + f) as i32
                    }
                })
                .collect();
            (xmin, k)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// `PIL.Image.resize((w, h), BILINEAR)`: horizontal pass then vertical, 8-bit intermediate.
pub fn resize_bilinear_pil(img: &RgbImage, width: usize, height: usize) -> RgbImage {
    if width == img.width && height == img.height {
        return img.clone();
    }
    let mut horiz = img.clone();
    if width != img.width {
        let coeffs = pil_coeffs(img.width, width);
        let mut out = vec![0u8; width * img.height * 3];
        for y in 0..img.height {
            let row = &img.data[y * img.width * 3..(y + 1) * img.width * 3];
            for (x, (xmin, k)) in coeffs.iter().enumerate() {
                for c in 0..3 {
                    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                    for (i, &w) in k.iter().enumerate() {
                        ss += row[(xmin + i) * 3 + c] as i64 * w as i64;
                    }
                    out[(y * width + x) * 3 + c] = clip8(ss);
                }
            }
        }
        horiz = RgbImage { width, height: img.height, data: out };
    }
    if height == horiz.height {
        return horiz;
    }
    let coeffs = pil_coeffs(horiz.height, height);
    let mut out = vec![0u8; width * height * 3];
    for (y, (ymin, k)) in coeffs.iter().enumerate() {
        for x in 0..width {
            for c in 0..3 {
                let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                for (i, &w) in k.iter().enumerate() {
                    ss += horiz.data[((ymin + i) * width + x) * 3 + c] as i64 * w as i64;
                }
                out[(y * width + x) * 3 + c] = clip8(ss);
            }
        }
    }
    RgbImage { width, height, data: out }
}

/// The size `Resize(min(height, width))` gives `img`: its shorter side scaled to that.
fn resized_size(img: &RgbImage, height: usize, width: usize) -> (usize, usize) {
    let size = height.min(width);
    let (w, h) = (img.width, img.height);
    if w <= h {
        (size, (size as f64 * h as f64 / w as f64) as usize)
    } else {
        ((size as f64 * w as f64 / h as f64) as usize, size)
    }
}

/// The most pixels the resize of [`resize_and_crop`] may pass through (its horizontal pass or
/// its result): 2²⁷, 384 MB of RGB. An image of extreme aspect ratio needs far more than itself
/// (a 1 × 2 000 000 one, 24 GB for a 64-pixel video), so such images are refused up front.
pub const MAX_RESIZE_PIXELS: usize = 1 << 27;

/// Refuses an image whose resize to a `height × width` video would pass [`MAX_RESIZE_PIXELS`];
/// `what` names it in the error.
pub fn check_resizable(img: &RgbImage, height: usize, width: usize, what: &str) -> Result<()> {
    let (new_w, new_h) = resized_size(img, height, width);
    let pixels = new_w.saturating_mul(new_h.max(img.height));
    if pixels > MAX_RESIZE_PIXELS {
        return Err(Error::InvalidInput(format!(
            "{what} is {}×{}: too elongated for a {width}×{height} video (its resize would take {pixels} pixels; the limit is {MAX_RESIZE_PIXELS})",
            img.width, img.height
        )));
    }
    Ok(())
}

/// `torchvision.transforms.Resize(min(h, w))` then `CenterCrop((h, w))` on a PIL image; an
/// undersized side is padded with black first, as torchvision does. Check the image with
/// [`check_resizable`] first: an extreme aspect ratio makes the resize huge.
pub fn resize_and_crop(img: &RgbImage, height: usize, width: usize) -> RgbImage {
    let (new_w, new_h) = resized_size(img, height, width);
    let resized = resize_bilinear_pil(img, new_w, new_h);
    // Pad (left = (W−w)//2, right = (W−w+1)//2) where the image is smaller than the crop.
    let pad_w = width.saturating_sub(resized.width);
    let pad_h = height.saturating_sub(resized.height);
    let padded = if pad_w > 0 || pad_h > 0 {
        let (pw, ph) = (resized.width + pad_w, resized.height + pad_h);
        let (left, top) = (pad_w / 2, pad_h / 2);
        let mut data = vec![0u8; pw * ph * 3];
        for y in 0..resized.height {
            let src = &resized.data[y * resized.width * 3..(y + 1) * resized.width * 3];
            let dst = ((y + top) * pw + left) * 3;
            data[dst..dst + src.len()].copy_from_slice(src);
        }
        RgbImage { width: pw, height: ph, data }
    } else {
        resized
    };
    // Python round() is half-to-even.
    let top = ((padded.height - height) as f64 / 2.0).round_ties_even() as usize;
    let left = ((padded.width - width) as f64 / 2.0).round_ties_even() as usize;
    let mut data = Vec::with_capacity(width * height * 3);
    for y in top..top + height {
        let start = (y * padded.width + left) * 3;
        data.extend_from_slice(&padded.data[start..start + width * 3]);
    }
    RgbImage { width, height, data }
}

/// `ToTensor` + `Normalize(0.5, 0.5)`: `(1, 3, h, w)` f32 in [-1, 1].
pub fn to_tensor(img: &RgbImage, dev: &Device) -> Result<Tensor> {
    let (w, h) = (img.width, img.height);
    let mut v = vec![0f32; 3 * w * h];
    for (i, px) in img.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            v[c * w * h + i] = (px[c] as f32 / 255.0 - 0.5) / 0.5;
        }
    }
    Ok(Tensor::from_vec(v, (1, 3, h, w), dev)?)
}

/// Frames of a video tensor `(t, h, w, 3)` u8 from `(1, 3, t, h, w)` in [-1, 1]: clamp,
/// `(x+1)/2·255`, truncating cast, as `save_results_seperate`.
pub fn video_to_u8(video: &Tensor) -> Result<Vec<u8>> {
    let v = video.squeeze(0)?.clamp(-1f32, 1f32)?;
    let v = ((v + 1.0)? / 2.0)?;
    let v = (v * 255.0)?;
    let v = v.permute((1, 2, 3, 0))?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    Ok(v.into_iter().map(|x| x as u8).collect())
}

// The reference literals, as written upstream (f32 rounds them).
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Separable Gaussian blur with reflect padding (kornia `gaussian_blur2d`), on `(c, h, w)`.
fn gaussian_blur(data: &[f32], c: usize, h: usize, w: usize, ks: (usize, usize), sigma: (f64, f64)) -> Vec<f32> {
    fn kernel(k: usize, sigma: f64) -> Vec<f32> {
        let g: Vec<f32> = (0..k)
            .map(|i| {
                let x = i as f32 - (k / 2) as f32;
                (-(x * x) / (2.0 * (sigma * sigma) as f32)).exp()
            })
            .collect();
        let s: f32 = g.iter().sum();
        g.into_iter().map(|v| v / s).collect()
    }
    fn reflect(i: isize, n: usize) -> usize {
        let n = n as isize;
        let mut i = i;
        if i < 0 {
            i = -i;
        }
        if i >= n {
            i = 2 * (n - 1) - i;
        }
        i as usize
    }
    let (ky, kx) = (kernel(ks.0, sigma.0), kernel(ks.1, sigma.1));
    let mut tmp = vec![0f32; data.len()];
    let rx = (ks.1 / 2) as isize;
    for ch in 0..c {
        for y in 0..h {
            for x in 0..w {
                let mut s = 0f32;
                for (j, &k) in kx.iter().enumerate() {
                    let xx = reflect(x as isize + j as isize - rx, w);
                    s += k * data[(ch * h + y) * w + xx];
                }
                tmp[(ch * h + y) * w + x] = s;
            }
        }
    }
    let mut out = vec![0f32; data.len()];
    let ry = (ks.0 / 2) as isize;
    for ch in 0..c {
        for y in 0..h {
            for x in 0..w {
                let mut s = 0f32;
                for (j, &k) in ky.iter().enumerate() {
                    let yy = reflect(y as isize + j as isize - ry, h);
                    s += k * tmp[(ch * h + yy) * w + x];
                }
                out[(ch * h + y) * w + x] = s;
            }
        }
    }
    out
}

/// PyTorch bicubic (A = −0.75) `align_corners=True` resampling weights for one axis.
fn bicubic_taps(in_size: usize, out_size: usize) -> Vec<([usize; 4], [f32; 4])> {
    const A: f32 = -0.75;
    let cc1 = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let cc2 = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = if out_size > 1 { (in_size - 1) as f32 / (out_size - 1) as f32 } else { 0.0 };
    (0..out_size)
        .map(|o| {
            let real = scale * o as f32;
            let i0 = real.floor();
            let t = real - i0;
            let i0 = i0 as isize;
            let idx = [-1isize, 0, 1, 2].map(|d| (i0 + d).clamp(0, in_size as isize - 1) as usize);
            (idx, [cc2(t + 1.0), cc1(t), cc1(1.0 - t), cc2(2.0 - t)])
        })
        .collect()
}

/// The CLIP image embedder's input: kornia `resize` to `size`×`size` (antialiased bicubic,
/// `align_corners=True`), `(x+1)/2`, CLIP mean/std. `images`: `(n, 3, h, w)` in [-1, 1].
pub fn clip_preprocess(images: &Tensor, size: usize) -> Result<Tensor> {
    let (n, c, h, w) = images.dims4()?;
    let dev = images.device().clone();
    let data = images.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let plane = c * h * w;
    let mut out = Vec::with_capacity(n * c * size * size);
    for img in data.chunks_exact(plane) {
        let resized = if (h, w) == (size, size) {
            img.to_vec()
        } else {
            let (fh, fw) = (h as f64 / size as f64, w as f64 / size as f64);
            let src = if fh.max(fw) > 1.0 {
                let sigma = (((fh - 1.0) / 2.0).max(0.001), ((fw - 1.0) / 2.0).max(0.001));
                let mut ks = ((4.0 * sigma.0).max(3.0) as usize, (4.0 * sigma.1).max(3.0) as usize);
                if ks.0.is_multiple_of(2) {
                    ks.0 += 1;
                }
                if ks.1.is_multiple_of(2) {
                    ks.1 += 1;
                }
                gaussian_blur(img, c, h, w, ks, sigma)
            } else {
                img.to_vec()
            };
            let (ty, tx) = (bicubic_taps(h, size), bicubic_taps(w, size));
            let mut r = vec![0f32; c * size * size];
            for ch in 0..c {
                let p = &src[ch * h * w..(ch + 1) * h * w];
                for (oy, (iy, wy)) in ty.iter().enumerate() {
                    for (ox, (ix, wx)) in tx.iter().enumerate() {
                        let mut acc = 0f32;
                        for a in 0..4 {
                            let row = &p[iy[a] * w..];
                            let v = row[ix[0]] * wx[0] + row[ix[1]] * wx[1] + row[ix[2]] * wx[2] + row[ix[3]] * wx[3];
                            acc += v * wy[a];
                        }
                        r[(ch * size + oy) * size + ox] = acc;
                    }
                }
            }
            r
        };
        for ch in 0..c {
            let (m, s) = (CLIP_MEAN[ch % 3], CLIP_STD[ch % 3]);
            out.extend(resized[ch * size * size..(ch + 1) * size * size].iter().map(|&v| ((v + 1.0) / 2.0 - m) / s));
        }
    }
    Ok(Tensor::from_vec(out, (n, c, size, size), &dev)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elongated_images_are_refused_before_the_resize() {
        let thin = |w, h| RgbImage::new(w, h, vec![9; w * h * 3]).unwrap();
        let e = check_resizable(&thin(1, 2_000_000), 64, 128, "image").unwrap_err();
        assert!(e.to_string().contains("image is 1×2000000"), "{e}");
        assert!(check_resizable(&thin(2_000_000, 1), 64, 128, "image").is_err());
        assert!(check_resizable(&thin(1, 60_000), 64, 64, "image").is_err());
        for (w, h) in [(6000, 6000), (1, 1), (4000, 300), (300, 4000)] {
            assert!(check_resizable(&thin(w, h), 576, 1024, "image").is_ok(), "{w}×{h}");
        }
    }

    #[test]
    fn crop_pads_undersized_images_with_black() {
        let img = RgbImage::new(4, 4, vec![200; 48]).unwrap();
        let out = resize_and_crop(&img, 4, 8);
        assert_eq!((out.width, out.height), (8, 4));
        assert_eq!(&out.data[..6], &[0; 6]);
        assert_eq!(out.data[2 * 3], 200);
    }

    #[test]
    fn identity_resize_is_exact() {
        let img = RgbImage::new(3, 2, (0..18).collect()).unwrap();
        assert_eq!(resize_bilinear_pil(&img, 3, 2), img);
    }
}
