//! The zero-padded grid the shifted-view convolutions read.

/// The zero-padded input of a convolution with three taps along its rows (and three or one
/// along its columns) for all `n` frames of one channel as one row: grid rows of `w + 1`
/// (`pad_x`: the one zero column between two image rows pads both) or `w`, and one zero row
/// after each frame (padding the frame above and the one below). Output pixel `(f, y, x)` sits
/// at grid position `(f·(h+1) + y)·pitch + x`, and tap `(dy, dx)` reads the row at that
/// position plus `dy·pitch + dx`; positions with `x = w` or `y = h` are junk. The temporal conv
/// is the case `pad_x = false` with frames = samples, rows = time steps, columns = pixels.
/// (`amx::Bf16Conv` and `avx512::F32Conv` lay the same positions out channels last.)
#[derive(Clone, Copy)]
pub(crate) struct PaddedGrid {
    pub(crate) n: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) pad_x: bool,
}

impl PaddedGrid {
    pub(crate) fn pitch(&self) -> usize {
        self.w + self.pad_x as usize
    }

    /// Zeros before the first pixel: a zero grid row (and one zero column).
    fn lead(&self) -> usize {
        self.pitch() + self.pad_x as usize
    }

    /// Grid positions of the outputs: every frame's rows and its zero row, except the last
    /// zero row.
    pub(crate) fn outputs(&self) -> usize {
        (self.n * (self.h + 1) - 1) * self.pitch()
    }

    /// Row length: the last output position plus the furthest tap stays inside.
    pub(crate) fn len(&self) -> usize {
        self.outputs() + self.shift(self.taps() - 1)
    }

    pub(crate) fn taps(&self) -> usize {
        if self.pad_x {
            9
        } else {
            3
        }
    }

    pub(crate) fn shift(&self, tap: usize) -> usize {
        let kw = if self.pad_x { 3 } else { 1 };
        (tap / kw) * self.pitch() + tap % kw
    }

    /// The grid position of output pixel `v = (f·h + y)·w + x`.
    pub(crate) fn position(&self, v: usize) -> usize {
        let hw = self.h * self.w;
        ((v / hw) * (self.h + 1) + v % hw / self.w) * self.pitch() + v % self.w
    }

    /// Visits the first `len` positions once each, in order, a segment at a time: `(range,
    /// None)` for padding, `(range, Some((frame, offset)))` for an image row of `w` pixels
    /// (`offset`: its first pixel's in the frame).
    pub(crate) fn segments(&self, len: usize, mut visit: impl FnMut(std::ops::Range<usize>, Option<(usize, usize)>)) {
        let mut at = 0;
        for f in 0..self.n {
            for y in 0..self.h {
                let start = self.lead() + (f * (self.h + 1) + y) * self.pitch();
                visit(at..start, None);
                visit(start..start + self.w, Some((f, y * self.w)));
                at = start + self.w;
            }
        }
        visit(at..len, None);
    }

    /// Writes one channel's row (`len` values): `x` holds frame f's pixels at `f·frame_stride`.
    pub(crate) fn fill(&self, x: &[f32], frame_stride: usize, row: &mut [std::mem::MaybeUninit<f32>]) {
        self.segments(row.len(), |range, image| match image {
            None => row[range].fill(std::mem::MaybeUninit::new(0.0)),
            Some((f, offset)) => {
                for (d, &s) in row[range].iter_mut().zip(&x[f * frame_stride + offset..]) {
                    d.write(s);
                }
            }
        });
    }
}

