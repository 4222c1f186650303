//! `x.permute(dims).contiguous()` on CUDA (`permute.cu`): the axes that stay adjacent merged,
//! then whole rows moved as wide words where the innermost axis stays, or 32×32 tiles through
//! shared memory where it moves. candle's strided copy indexes every element through device
//! arrays of dims and strides.

use candle_core::{DType, Result, Tensor};

/// How many axes the kernels take after merging (the UNet's permutes need at most 4).
const MAX_RANK: usize = 6;

/// What moves, in elements, after merging adjacent axes and dropping those of size 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Plan {
    /// The layout does not change: a contiguous copy.
    Copy,
    /// The innermost axis stays: rows of `inner` elements; `outer` = each other output axis as
    /// (size, input stride), outermost first.
    Rows { inner: usize, outer: Vec<(usize, usize)> },
    /// The innermost axis moves: I (the input's innermost, `ni` long) lands at output stride
    /// `out_stride_i`; J (the output's innermost, `nj` long) has input stride `in_stride_j`;
    /// `batch` = every other axis as (size, input stride, output stride).
    Tiles { ni: usize, nj: usize, in_stride_j: usize, out_stride_i: usize, batch: Vec<(usize, usize, usize)> },
}

/// The plan of `permute(dims)` on a contiguous tensor of `shape`, or `None` past [`MAX_RANK`]
/// merged axes.
pub(crate) fn plan(shape: &[usize], dims: &[usize]) -> Option<Plan> {
    // Axes of size 1 take no part in the layout.
    let kept: Vec<usize> = (0..shape.len()).filter(|&a| shape[a] != 1).collect();
    let rank_of = |a: usize| kept.iter().position(|&k| k == a);
    let out_order: Vec<usize> = dims.iter().filter_map(|&a| rank_of(a)).collect();
    // Runs of output axes that are consecutive input axes in order become one axis.
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for &a in &out_order {
        match groups.last_mut() {
            Some(g) if *g.last().expect("groups are never empty") + 1 == a => g.push(a),
            _ => groups.push(vec![a]),
        }
    }
    if groups.len() <= 1 {
        return Some(Plan::Copy);
    }
    if groups.len() > MAX_RANK {
        return None;
    }
    let size = |g: &Vec<usize>| g.iter().map(|&a| shape[kept[a]]).product::<usize>();
    // Input order of the groups: by their first axis. Input strides: contiguous in that order.
    let mut by_input: Vec<usize> = (0..groups.len()).collect();
    by_input.sort_by_key(|&g| groups[g][0]);
    let mut in_stride = vec![0; groups.len()];
    let mut stride = 1;
    for &g in by_input.iter().rev() {
        in_stride[g] = stride;
        stride *= size(&groups[g]);
    }
    let mut out_stride = vec![0; groups.len()];
    let mut stride = 1;
    for g in (0..groups.len()).rev() {
        out_stride[g] = stride;
        stride *= size(&groups[g]);
    }
    let last = groups.len() - 1;
    let input_innermost = *by_input.last().expect("at least two groups");
    Some(if input_innermost == last {
        Plan::Rows { inner: size(&groups[last]), outer: (0..last).map(|g| (size(&groups[g]), in_stride[g])).collect() }
    } else {
        Plan::Tiles {
            ni: size(&groups[input_innermost]),
            nj: size(&groups[last]),
            in_stride_j: in_stride[last],
            out_stride_i: out_stride[input_innermost],
            batch: (0..last).filter(|&g| g != input_innermost).map(|g| (size(&groups[g]), in_stride[g], out_stride[g])).collect(),
        }
    })
}

/// Whether `dims` reorders `0..rank`.
pub(crate) fn is_permutation(dims: &[usize], rank: usize) -> bool {
    let mut seen = vec![false; rank];
    dims.len() == rank && dims.iter().all(|&d| d < rank && !std::mem::replace(&mut seen[d], true))
}

/// Whether [`permute`] takes `x` with `dims`: a CUDA build, a GPU, a 2- or 4-byte float (or u32)
/// tensor with elements, `dims` a permutation whose plan has at most [`MAX_RANK`] axes and a tile
/// grid that fits; unless `DYNAMICRAFTER_CUDA_PERMUTE=0` leaves permutes to candle (A/B timings,
/// a way around the kernels without a rebuild).
pub fn supported(x: &Tensor, dims: &[usize]) -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| super::family_enabled("DYNAMICRAFTER_CUDA_PERMUTE"))
        && super::on_gpu(x)
        && matches!(x.dtype(), DType::BF16 | DType::F16 | DType::F32 | DType::U32)
        && x.elem_count() > 0
        && is_permutation(dims, x.rank())
        && plan(x.dims(), dims).is_some_and(|p| p.fits())
}

impl Plan {
    /// Whether the kernels' grid holds it (a tiled plan's J tiles go along y, at most 65535).
    pub(crate) fn fits(&self) -> bool {
        match self {
            Plan::Tiles { nj, .. } => nj.div_ceil(32) <= 65535,
            _ => true,
        }
    }
}

/// `x.permute(dims).contiguous()`.
pub fn permute(x: &Tensor, dims: &[usize]) -> Result<Tensor> {
    if !is_permutation(dims, x.rank()) {
        candle_core::bail!("permute: {dims:?} is not a permutation of {} axes", x.rank());
    }
    let x = x.contiguous()?;
    match plan(x.dims(), dims) {
        Some(Plan::Copy) => x.permute(dims)?.contiguous(),
        Some(plan) => {
            let shape: Vec<usize> = dims.iter().map(|&d| x.dims()[d]).collect();
            x.apply_op1_no_bwd(&Permute { plan })?.reshape(shape)
        }
        None => candle_core::bail!("permute {dims:?} of {:?}: more than {MAX_RANK} axes after merging", x.dims()),
    }
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Permute {
    plan: Plan,
}

cuda_op!(CustomOp1 for Permute, "dc-permute-cuda", |op, x, xl| imp::permute(&op.plan, x, xl));

#[cfg(feature = "cuda")]
pub(crate) mod imp {
    use super::{Plan, MAX_RANK};
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, CudaStorage, WrapErr};
    use candle_core::{DType, Layout, Result, Shape};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/permute.ptx"));
    const MODULE: &str = "dynamicrafter_permute";

    /// permute.cuh's `Blocks`.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Blocks {
        rank: i32,
        dims: [i64; MAX_RANK],
        in_strides: [i64; MAX_RANK],
    }
    // SAFETY: plain old data laid out as the kernel's struct (#[repr(C)], same field order).
    unsafe impl DeviceRepr for Blocks {}

    /// permute.cuh's `Tiles`.
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub(crate) struct Tiles {
        ni: i64,
        nj: i64,
        in_stride_j: i64,
        out_stride_i: i64,
        batch_rank: i32,
        batch_dims: [i64; MAX_RANK],
        batch_in_strides: [i64; MAX_RANK],
        batch_out_strides: [i64; MAX_RANK],
    }
    // SAFETY: as for `Blocks`.
    unsafe impl DeviceRepr for Tiles {}

    fn array(values: impl Iterator<Item = usize>) -> [i64; MAX_RANK] {
        let mut out = [0i64; MAX_RANK];
        for (o, v) in out.iter_mut().zip(values) {
            *o = v as i64;
        }
        out
    }

    /// A tiled plan's kernel argument, batch count and launch shape: 32×32 tiles, (32, 8) threads,
    /// the batches along z (the kernels stride past 65535).
    pub(crate) fn tile_launch(plan: &Plan) -> Result<(Tiles, i64, LaunchConfig)> {
        let Plan::Tiles { ni, nj, in_stride_j, out_stride_i, batch } = plan else {
            candle_core::bail!("permute: not a tiled plan")
        };
        let tiles = Tiles {
            ni: *ni as i64,
            nj: *nj as i64,
            in_stride_j: *in_stride_j as i64,
            out_stride_i: *out_stride_i as i64,
            batch_rank: batch.len() as i32,
            batch_dims: array(batch.iter().map(|b| b.0)),
            batch_in_strides: array(batch.iter().map(|b| b.1)),
            batch_out_strides: array(batch.iter().map(|b| b.2)),
        };
        let batches: usize = batch.iter().map(|b| b.0).product();
        let grid = (ni.div_ceil(32) as u32, nj.div_ceil(32) as u32, batches.clamp(1, 65535) as u32);
        Ok((tiles, batches as i64, LaunchConfig { grid_dim: grid, block_dim: (32, 8, 1), shared_mem_bytes: 0 }))
    }

    pub fn permute(plan: &Plan, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (start, end) = xl.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("permute: input must be contiguous".into()))?;
        let storage = match x.dtype() {
            DType::BF16 => permute_as::<half::bf16>(plan, x, start, end)?,
            DType::F16 => permute_as::<half::f16>(plan, x, start, end)?,
            DType::F32 => permute_as::<f32>(plan, x, start, end)?,
            DType::U32 => permute_as::<u32>(plan, x, start, end)?,
            dt => candle_core::bail!("permute: unsupported dtype {dt:?}"),
        };
        Ok((storage, xl.shape().clone()))
    }

    /// The permute of elements `start..end` of `x`, of type `T` (the kernels move its raw words).
    fn permute_as<T: CudaDType + DeviceRepr>(plan: &Plan, x: &CudaStorage, start: usize, end: usize) -> Result<CudaStorage> {
        let (len, elem) = (end - start, std::mem::size_of::<T>());
        let dev = x.device.clone();
        let input = x.as_cuda_slice::<T>()?.slice(start..end);
        // SAFETY: either kernel writes every element of the output.
        let out = unsafe { dev.alloc::<T>(len)? };
        match plan {
            Plan::Copy => candle_core::bail!("permute: a plain copy goes through candle"),
            Plan::Rows { inner, outer } => {
                // The widest word that divides a row and the input's start (the output is fresh).
                let word = [16, 4, elem].into_iter().find(|&w| (inner * elem).is_multiple_of(w) && (start * elem).is_multiple_of(w)).unwrap_or(elem);
                let per_word = word / elem;
                let blocks = Blocks {
                    rank: outer.len() as i32,
                    dims: array(outer.iter().map(|&(d, _)| d)),
                    in_strides: array(outer.iter().map(|&(_, s)| s / per_word)),
                };
                let (inner_w, total_w) = (inner / per_word, len / per_word);
                let name = match word {
                    16 => "permute_blocks_b128",
                    4 => "permute_blocks_b32",
                    _ => "permute_blocks_b16",
                };
                let grid = total_w.div_ceil(256).clamp(1, 132 * 32) as u32;
                // 32-bit indices while every word index (and one grid stride past it) fits.
                let narrow = total_w + (grid as usize) * 256 < (1 << 31);
                let name = if narrow { format!("{name}_i32") } else { name.to_string() };
                let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
                let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
                let (inner_32, total_32, inner_64, total_64) = (inner_w as u32, total_w as u32, inner_w as i64, total_w as i64);
                let mut builder = func.builder();
                builder.arg(&input);
                builder.arg(&out);
                builder.arg(&blocks);
                if narrow {
                    builder.arg(&inner_32);
                    builder.arg(&total_32);
                } else {
                    builder.arg(&inner_64);
                    builder.arg(&total_64);
                }
                // SAFETY: arguments match `permute_blocks_*`; the words cover input and output exactly.
                unsafe { builder.launch(cfg) }.w()?;
            }
            Plan::Tiles { .. } => {
                let (tiles, batches_i, cfg) = tile_launch(plan)?;
                let name = if elem == 2 { "permute_tiles_b16" } else { "permute_tiles_b32" };
                let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
                let mut builder = func.builder();
                builder.arg(&input);
                builder.arg(&out);
                builder.arg(&tiles);
                builder.arg(&batches_i);
                // SAFETY: arguments match `permute_tiles_*`; every index stays inside the tensor.
                unsafe { builder.launch(cfg) }.w()?;
            }
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The plan carried out on the CPU the way the kernels read it.
    fn run(plan: &Plan, src: &[f32]) -> Vec<f32> {
        let mut out = vec![f32::NAN; src.len()];
        match plan {
            Plan::Copy => out.copy_from_slice(src),
            Plan::Rows { inner, outer } => {
                for (i, o) in out.iter_mut().enumerate() {
                    let (mut row, mut source) = (i / inner, i % inner);
                    for &(dim, stride) in outer.iter().rev() {
                        source += (row % dim) * stride;
                        row /= dim;
                    }
                    *o = src[source];
                }
            }
            Plan::Tiles { ni, nj, in_stride_j, out_stride_i, batch } => {
                let batches: usize = batch.iter().map(|b| b.0).product();
                for z in 0..batches {
                    let (mut rest, mut in_base, mut out_base) = (z, 0, 0);
                    for &(dim, si, so) in batch.iter().rev() {
                        in_base += (rest % dim) * si;
                        out_base += (rest % dim) * so;
                        rest /= dim;
                    }
                    for i in 0..*ni {
                        for j in 0..*nj {
                            out[out_base + i * out_stride_i + j] = src[in_base + j * in_stride_j + i];
                        }
                    }
                }
            }
        }
        out
    }

    fn permutations(n: usize) -> Vec<Vec<usize>> {
        if n == 0 {
            return vec![vec![]];
        }
        let mut all = Vec::new();
        for p in permutations(n - 1) {
            for at in 0..=p.len() {
                let mut q = p.clone();
                q.insert(at, n - 1);
                all.push(q);
            }
        }
        all
    }

    /// Every permutation of ranks 2–5 on shapes with axes of size 1, 2 and 3 (so merges and
    /// dropped axes occur): the plan, carried out as the kernels do, equals candle's permute.
    #[test]
    fn plans_carry_out_every_permutation() {
        let dev = Device::Cpu;
        let shapes: [&[usize]; 6] = [&[3, 2], &[2, 1, 3], &[2, 3, 4], &[2, 1, 3, 2], &[3, 2, 2, 1, 2], &[1, 2, 3, 2, 2]];
        let mut checked = 0;
        for shape in shapes {
            let n: usize = shape.iter().product();
            let x = Tensor::arange(0f32, n as f32, &dev).unwrap().reshape(shape).unwrap();
            for dims in permutations(shape.len()) {
                let plan = plan(shape, &dims).expect("a small rank");
                let want = x.permute(dims.as_slice()).unwrap().contiguous().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let got = run(&plan, &x.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                assert_eq!(got, want, "shape {shape:?} dims {dims:?} plan {plan:?}");
                checked += 1;
            }
        }
        assert!(checked > 200);
        // What the UNet's permutes become.
        assert_eq!(plan(&[2, 16, 320, 9216], &[0, 2, 1, 3]), Some(Plan::Rows { inner: 9216, outer: vec![(2, 16 * 320 * 9216), (320, 9216), (16, 320 * 9216)] }));
        assert!(matches!(plan(&[16, 320, 9216], &[0, 2, 1]), Some(Plan::Tiles { ni: 9216, nj: 320, .. })));
        // The transformers' exits, as the emulator's permute_bias_add cases state them.
        let spatial = Plan::Tiles { ni: 40, nj: 70, in_stride_j: 40, out_stride_i: 70, batch: vec![(3, 2800, 2800)] };
        assert_eq!(plan(&[3, 70, 40], &[0, 2, 1]), Some(spatial));
        let temporal = Plan::Tiles { ni: 180, nj: 9, in_stride_j: 180, out_stride_i: 9, batch: vec![(2, 1620, 1620)] };
        assert_eq!(plan(&[2, 3, 3, 5, 36], &[0, 3, 4, 1, 2]), Some(temporal.clone()));
        assert_eq!(plan(&[2, 9, 5, 36], &[0, 2, 3, 1]), Some(temporal));
        // What is not a permutation never reaches a plan.
        assert!(is_permutation(&[1, 2, 0], 3));
        assert!(!is_permutation(&[0, 0], 2) && !is_permutation(&[0, 2], 2) && !is_permutation(&[0], 2));
        let x = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(permute(&x, &[0, 0]).unwrap_err().to_string().contains("not a permutation"));
    }
}

#[cfg(all(test, feature = "cuda"))]
mod gpu_tests {
    use super::*;
    use candle_core::{DType, Device};

    /// On a GPU: the UNet's permutes and odd ones, each dtype, equal to candle's (bit for bit).
    #[test]
    fn permutes_match_candle_on_gpu() {
        let dev = Device::new_cuda(0).expect("a CUDA build's tests need a GPU");
        let cases: [(&[usize], &[usize]); 7] = [
            (&[2, 16, 320, 72], &[0, 2, 1, 3]),
            (&[16, 320, 1152], &[0, 2, 1]),
            (&[1, 320, 16, 9, 16], &[0, 3, 4, 2, 1]),
            (&[2, 9, 16, 16, 320], &[0, 3, 4, 1, 2]),
            (&[16, 1152, 5, 64], &[0, 2, 1, 3]),
            (&[3, 5, 7, 9], &[3, 1, 0, 2]),
            (&[2, 3, 5, 7, 3], &[4, 0, 2, 1, 3]),
        ];
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            for (shape, dims) in cases {
                let x = Tensor::randn(0f32, 1.0, shape, &dev).unwrap().to_dtype(dtype).unwrap();
                assert!(supported(&x, dims), "{shape:?} {dims:?}");
                let got = permute(&x, dims).unwrap().to_dtype(DType::F32).unwrap();
                let want = x.permute(dims).unwrap().contiguous().unwrap().to_dtype(DType::F32).unwrap();
                let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                eprintln!("permute {dtype:?} {shape:?} {dims:?}: max |difference| {diff}");
                assert_eq!(diff, 0.0, "{dtype:?} {shape:?} {dims:?}");
            }
        }
    }
}
