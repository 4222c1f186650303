//! Output buffers and the raw-pointer plumbing of the multi-threaded kernels.

use candle_core::{CpuStorage, Layout, Result};

/// A layer's bias as f32 values for `n` outputs, zeros for a layer without one (`what` names the
/// kernel in the error).
pub(crate) fn bias_f32(bias: Option<&candle_core::Tensor>, n: usize, what: &str) -> Result<Vec<f32>> {
    let bias = match bias {
        Some(b) => b.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?,
        None => vec![0.0; n],
    };
    if bias.len() != n {
        candle_core::bail!("{what}: bias of the wrong length for {n} outputs");
    }
    Ok(bias)
}

/// Room for `len` outputs: an empty `Vec` of that capacity whose pages, for a large buffer,
/// all threads fault in at once ahead of use (Linux's `MADV_POPULATE_WRITE`). A fresh buffer of
/// many megabytes otherwise takes a page fault per 4 KB inside the kernel that writes it, one
/// thread at a time (docs/PERFORMANCE.md).
pub(crate) fn output_buffer<T>(len: usize) -> Vec<T> {
    let buffer = Vec::with_capacity(len);
    populate(buffer.as_ptr() as usize, len * std::mem::size_of::<T>());
    buffer
}

/// From this size glibc maps every allocation fresh from the OS (its largest mmap threshold), so
/// all its pages fault; smaller buffers are mostly reused heap memory, already resident, and
/// populating them measured slower.
const POPULATE_MIN_BYTES: usize = 32 << 20;

#[cfg(target_os = "linux")]
fn populate(start: usize, bytes: usize) {
    use rayon::prelude::*;
    const PAGE: usize = 4096;
    if bytes < POPULATE_MIN_BYTES {
        return;
    }
    // Whole pages inside the buffer only.
    let (first, end) = (start.next_multiple_of(PAGE), (start + bytes) / PAGE * PAGE);
    let part = (end - first).div_ceil(4 * rayon::current_num_threads()).next_multiple_of(PAGE);
    (first..end).into_par_iter().step_by(part).for_each(|a| {
        // SAFETY: the range lies inside an allocation this function's caller owns and has not
        // handed out; populating changes no contents. A kernel without MADV_POPULATE_WRITE
        // (before Linux 5.14) answers EINVAL, and the pages fault in on first write as before.
        unsafe { libc::madvise(a as *mut libc::c_void, part.min(end - a), libc::MADV_POPULATE_WRITE) };
    });
}

#[cfg(not(target_os = "linux"))]
fn populate(_: usize, _: usize) {}

/// The f32 data of a contiguous CPU input, from its start offset to its end.
pub(crate) fn contiguous_f32<'a>(op: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else { candle_core::bail!("{op}: f32 only") };
    if !layout.is_contiguous() {
        candle_core::bail!("{op}: contiguous inputs only")
    }
    Ok(&data[layout.start_offset()..layout.start_offset() + layout.shape().elem_count()])
}

/// [`contiguous_f32`] of a tensor's storage, which must be on the CPU.
pub(crate) fn cpu_f32<'a>(op: &str, storage: &'a candle_core::Storage, layout: &Layout) -> Result<&'a [f32]> {
    let candle_core::Storage::Cpu(cpu) = storage else { candle_core::bail!("{op}: input not on the CPU") };
    contiguous_f32(op, cpu, layout)
}

/// The shape of a multi-head attention's inputs `q (b, m, heads·d)`, `k (b, n, heads·d)`,
/// `v (b, n, heads·dv)`; `qw = heads·d` and `vw = heads·dv` are their row widths.
#[derive(Clone, Copy)]
pub(crate) struct HeadsShape {
    pub(crate) b: usize,
    pub(crate) m: usize,
    pub(crate) n: usize,
    pub(crate) qw: usize,
    pub(crate) vw: usize,
    pub(crate) d: usize,
    pub(crate) dv: usize,
}

/// Checks a multi-head attention's CPU f32 inputs against each other and hands `f` their
/// shape and contiguous values (`op` names the kernel in errors).
pub(crate) fn with_heads<R>(
    op: &str,
    (q, k, v): (&candle_core::Tensor, &candle_core::Tensor, &candle_core::Tensor),
    heads: usize,
    f: impl FnOnce(HeadsShape, &[f32], &[f32], &[f32]) -> Result<R>,
) -> Result<R> {
    let (b, m, qw) = q.dims3()?;
    let (_, n, vw) = v.dims3()?;
    if k.dims3()? != (b, n, qw) || v.dim(0)? != b {
        candle_core::bail!("{op}: q {:?}, k {:?}, v {:?} do not match", q.dims(), k.dims(), v.dims());
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let shape = HeadsShape { b, m, n, qw, vw, d: qw / heads, dv: vw / heads };
    f(shape, cpu_f32(op, &qs, ql)?, cpu_f32(op, &ks, kl)?, cpu_f32(op, &vs, vl)?)
}

/// Writes `sums.len()` rows of `block` (row stride `block_stride`), `cols` wide, each divided by
/// its row's sum, into `out` from element `start` on with row stride `out_stride`: an attention
/// block's softmax normalisation on its way out.
///
/// # Safety
/// The rows and columns written must lie in `out`'s buffer and be written by this caller only.
pub(crate) unsafe fn store_normalized(
    out: SendPtr<std::mem::MaybeUninit<f32>>,
    start: usize,
    out_stride: usize,
    cols: usize,
    block: &[f32],
    block_stride: usize,
    sums: &[f32],
) {
    for (r, &sum) in sums.iter().enumerate() {
        let inv = 1.0 / sum;
        // SAFETY: the caller's rows and columns, inside the buffer.
        let dst = unsafe { std::slice::from_raw_parts_mut(out.get().add(start + r * out_stride), cols) };
        for (o, &x) in dst.iter_mut().zip(&block[r * block_stride..r * block_stride + cols]) {
            o.write(x * inv);
        }
    }
}

#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T = f32>(pub(crate) *mut T);
// SAFETY: used only to hand disjoint output rows to rayon tasks.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}
