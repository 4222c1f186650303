// Convolutions as implicit GEMMs on tensor cores (f16/bf16, f32 accumulation): every tap and input
// channel of an output tile accumulates in registers, where the shifted-GEMM path (mod.rs) runs
// one cuBLAS GEMM per tap and reads and writes an f32 accumulator in device memory for each.
//
// Two kernels:
// * to_channels_last: x (n, c, rows, cols) → xp (n, rows + 2·pad_r, cols + 2·pad_c, c), zero
//   border, through 32×32 tiles in shared memory (both sides coalesced), optionally upsampled 2×
//   and group-normalised (+ SiLU) on the way; x may also be frames (n·rows, c, cols), a video's
//   frames read as the video (n, c, rows, cols), and the output tokens across frames
//   (n, cols, rows, c) (CopyLayout);
// * conv_igemm: out (n, co, rows·cols) = bias (+ sample_bias[sample]) (+ residual) + Σ_tap
//   w[tap] · xp shifted by the tap, with w (taps, co, ci): what the UNet's residual blocks add
//   to a convolution (the timestep embedding per frame, the skip connection) on the way out;
//   out (and residual) may be frames (n·rows, co, cols) instead (ConvGeometry's out strides), so
//   a temporal convolution reads and writes a video in the frames layout around it.
//   ConvGeometry says where a tap reads: a 3×3 convolution is kh = kw = 3, row_step = the padded
//   width (stride 2 for the downsampling ones); the temporal (3, 1, 1) convolution is kh = 3,
//   kw = 1, row_step = the frame size.
//
// GEMM view: M = output channels, N = output positions of every sample, one after another (a
// tile may span samples, so the small levels of the UNet, 16 or 144 positions per frame, fill
// whole tiles), K = taps × input channels. Channels last makes each position's input channels
// one contiguous row, so a shifted tap is a shift by whole rows and every row stays 16-byte
// aligned for cp.async and ldmatrix.
//
// A block computes BM channels × BN positions (128 × 128, 128 × 256, or 64 × 256 where the
// channels are an odd multiple of 64, the first level's 320) with 8 warps (2 along M × 4 along N,
// BM/2 × BN/4 each: mma tiles of 16×8). K advances 32 input channels of one tap per stage; STAGES
// buffers of shared memory, up to STAGES - 1 of them in flight by cp.async while the warps
// compute, one barrier per stage. The grid is one-dimensional with the channel tiles fastest, so
// the blocks that read the same input positions run together and share it in L2.
// Requirements (the launcher checks): ci a multiple of 32, all pointers 16-byte aligned.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "conv_igemm.cuh"
#include "group_norm.cuh"
#include "ptx.cuh"

extern __shared__ __align__(128) unsigned char dynamic_smem[];

namespace {

constexpr int BC = 32;        // input channels per stage
constexpr int LDS = BC + 8;   // shared row: 80 bytes, so the 8 rows of an ldmatrix hit distinct banks
constexpr int THREADS = 256;

__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

// x (n, c, rows, cols), read at `at`'s input strides, upsampled by `up` (1, or 2: nearest, as a 2×
// upsample before a convolution) → xp (n, rows·up + 2·pad_r, cols·up + 2·pad_c, c), written at
// `at`'s output strides. With `sums`
// (group_stats's, of x in groups of cpg channels) each element is group-normalised on the way,
// weight `gamma`, bias `beta`, then SiLU where `silu`: the group norm before a convolution, whose
// own output is then never written. Grid: (ceil(cols_p / 32), ceil(c / 32), n · rows_p); block
// (32, 8).
template <typename T>
__device__ void to_channels_last(const T* __restrict__ x, T* __restrict__ xp, int c, int rows, int cols, int pad_r,
                                 int pad_c, int up, const CopyLayout at, const double* __restrict__ sums,
                                 const T* __restrict__ gamma, const T* __restrict__ beta, int cpg, float eps, int silu) {
    __shared__ T tile[32][33];
    // The norm of each of the block's 32 channels (one sample): y = (x − mean)·scale + shift.
    __shared__ float norm_mean[32], norm_scale[32], norm_shift[32];
    const int rows_p = rows * up + 2 * pad_r, cols_p = cols * up + 2 * pad_c;
    const int sample = blockIdx.z / rows_p, r = blockIdx.z % rows_p;
    const int col0 = blockIdx.x * 32, ch0 = blockIdx.y * 32;
    const int tx = threadIdx.x, ty = threadIdx.y;
    if (sums) {
        const int ch = ch0 + tx;
        if (ty == 0 && ch < c) {
            const int group = sample * (c / cpg) + ch / cpg;
            // The group's first element: the shift of its sums.
            const float first = to_f32(x[sample * at.in_sample + (int64_t)(ch / cpg * cpg) * at.in_channel]);
            const GroupMoments m = group_moments(sums, group, (size_t)cpg * rows * cols, first, eps);
            norm_mean[tx] = m.mean;
            norm_scale[tx] = m.rstd * to_f32(gamma[ch]);
            norm_shift[tx] = to_f32(beta[ch]);
        }
        __syncthreads();
    }
    const int in_r = r - pad_r, in_c = col0 + tx - pad_c;  // in the upsampled image
    const bool inside = in_r >= 0 && in_r < rows * up && in_c >= 0 && in_c < cols * up;
    const T* x_row = inside ? x + sample * at.in_sample + (int64_t)(in_r / up) * at.in_row + in_c / up : x;
    for (int i = ty; i < 32; i += 8) {
        const int ch = ch0 + i;
        T v = from_f32<T>(0.f);
        if (inside && ch < c) {
            v = x_row[ch * at.in_channel];
            if (sums) {
                const float y = (to_f32(v) - norm_mean[i]) * norm_scale[i] + norm_shift[i];
                v = from_f32<T>(silu ? group_norm_silu(y) : y);
            }
        }
        tile[i][tx] = v;
    }
    __syncthreads();
    for (int i = ty; i < 32; i += 8) {
        const int col = col0 + i, ch = ch0 + tx;
        if (col < cols_p && ch < c) xp[sample * at.out_sample + r * at.out_row + col * at.out_col + ch] = tile[tx][i];
    }
}

// The warps' share of a tile of BM channels × BN positions.
template <int BM_, int BN_> struct TileShape {
    static constexpr int BM = BM_, BN = BN_;
    static constexpr int WM = BM / 2;              // channels per warp (2 warps along M)
    static constexpr int MI = WM / 16;             // its 16-channel mma tiles
    static constexpr int WN = BN / 4;              // positions per warp (4 warps along N)
    static constexpr int NT = WN / 8;              // its 8-position mma tiles
    static constexpr int A_CHUNKS = BM * 4 / THREADS;  // 16-byte weight chunks per thread per stage
    static constexpr int B_CHUNKS = BN * 4 / THREADS;  // 16-byte input chunks per thread per stage
    static constexpr int STAGE = (BM + BN) * LDS;  // elements per stage: A (BM rows) then B (BN rows)
};

// Two adjacent outputs, stored (and residuals loaded) as one 4-byte access.
template <typename T> struct alignas(2 * sizeof(T)) Pair {
    T v[2];
};

// Issues stage `s` (tap s / (ci / BC), channels (s % (ci / BC))·BC ..) into buffer `buf`.
template <typename T, typename Shape>
__device__ __forceinline__ void load_stage(T* buf, const T* xp, const T* w, int s, const ConvGeometry& g, int co0,
                                           const int (&in_base)[Shape::B_CHUNKS],
                                           const bool (&in_valid)[Shape::B_CHUNKS]) {
    const int chunks_per_tap = g.ci / BC;
    const int tap = s / chunks_per_tap, c0 = (s % chunks_per_tap) * BC;
    const int shift = (tap / g.kw) * g.row_step + tap % g.kw;
    // 16-byte chunks, 4 per row: the weight's BM rows, the input's BN rows; a thread keeps its
    // rows from stage to stage.
#pragma unroll
    for (int i = 0; i < Shape::A_CHUNKS; ++i) {
        const int chunk = threadIdx.x + i * THREADS;
        const int row = chunk / 4, part = (chunk % 4) * 8;
        const bool a_valid = co0 + row < g.co;
        const T* a_src = w + ((size_t)tap * g.co + (a_valid ? co0 + row : 0)) * g.ci + c0 + part;
        cp_async_16(buf + row * LDS + part, a_src, a_valid);
    }
#pragma unroll
    for (int i = 0; i < Shape::B_CHUNKS; ++i) {
        const int chunk = threadIdx.x + i * THREADS;
        const int row = chunk / 4, part = (chunk % 4) * 8;
        const T* b_src = xp + (size_t)(in_valid[i] ? in_base[i] + shift : 0) * g.ci + c0 + part;
        cp_async_16(buf + (Shape::BM + row) * LDS + part, b_src, in_valid[i]);
    }
}

// xp: one sample's padded plane after another; out and residual: (n, co, rows·cols) or as
// ConvGeometry's out_* strides say; sample_bias: (n, co). sample_bias and residual may be null.
template <typename T, int BM, int BN, int STAGES>
__device__ void conv_igemm(const T* __restrict__ xp, const T* __restrict__ w, const T* __restrict__ bias,
                           const T* __restrict__ sample_bias, const T* __restrict__ residual, T* __restrict__ out,
                           const ConvGeometry g) {
    using Shape = TileShape<BM, BN>;
    constexpr int MI = Shape::MI, NT = Shape::NT, B_CHUNKS = Shape::B_CHUNKS;
    T* const smem = reinterpret_cast<T*>(dynamic_smem);
    const int positions = g.rows * g.cols, total = g.samples * positions;  // the launcher keeps both in i32
    const int co_tiles = (g.co + BM - 1) / BM;
    const int co0 = (int)(blockIdx.x % co_tiles) * BM, p0 = (int)(blockIdx.x / co_tiles) * BN;

    // The input row (padded coordinates, before the tap's shift) of each position this thread loads.
    int in_base[B_CHUNKS];
    bool in_valid[B_CHUNKS];
#pragma unroll
    for (int i = 0; i < B_CHUNKS; ++i) {
        const int at = p0 + (threadIdx.x + i * THREADS) / 4;
        in_valid[i] = at < total;
        const int s = in_valid[i] ? at / positions : 0, p = in_valid[i] ? at % positions : 0;
        in_base[i] = s * g.plane_p + (p / g.cols) * g.stride * g.cols_p + (p % g.cols) * g.stride;
    }

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int warp_m = (warp % 2) * Shape::WM, warp_n = (warp / 2) * Shape::WN;
    const int mat = lane / 8, mat_row = lane % 8;
    float acc[MI][NT][4];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;

    // Stage s lives in buffer s % STAGES. Every iteration commits one group (empty past the
    // end), so "stage s has landed" is always "at most STAGES - 2 groups pending".
    const int stages = g.taps * (g.ci / BC);
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < stages) load_stage<T, Shape>(smem + s * Shape::STAGE, xp, w, s, g, co0, in_base, in_valid);
        cp_async_commit();
    }
    for (int s = 0; s < stages; ++s) {
        cp_async_wait<STAGES - 2>();
        // Stage s is in every thread's view, and every warp is done with stage s - 1, whose
        // buffer the next load refills.
        __syncthreads();
        const int next = s + STAGES - 1;
        if (next < stages) load_stage<T, Shape>(smem + (next % STAGES) * Shape::STAGE, xp, w, next, g, co0, in_base, in_valid);
        cp_async_commit();
        const T* a_tile = smem + (s % STAGES) * Shape::STAGE;
        const T* b_tile = a_tile + BM * LDS;
#pragma unroll
        for (int ks = 0; ks < BC / 16; ++ks) {
            // A fragments of the warp's 16-row tiles: matrices (rows lo, k lo), (rows hi, k lo),
            // (rows lo, k hi), (rows hi, k hi) are a0..a3.
            uint32_t a[MI][4];
#pragma unroll
            for (int i = 0; i < MI; ++i)
                ldmatrix_x4(a[i], a_tile + (warp_m + i * 16 + (mat % 2) * 8 + mat_row) * LDS + ks * 16 + (mat / 2) * 8);
            // B fragments of the warp's 8-position tiles, two per ldmatrix: matrices (tile j,
            // k lo), (j, k hi), (j + 1, k lo), (j + 1, k hi); rows are positions.
            uint32_t b[NT][2];
#pragma unroll
            for (int j = 0; j < NT; j += 2) {
                uint32_t r[4];
                ldmatrix_x4(r, b_tile + (warp_n + (j + mat / 2) * 8 + mat_row) * LDS + ks * 16 + (mat % 2) * 8);
                b[j][0] = r[0];
                b[j][1] = r[1];
                b[j + 1][0] = r[2];
                b[j + 1][1] = r[3];
            }
#pragma unroll
            for (int i = 0; i < MI; ++i)
#pragma unroll
                for (int j = 0; j < NT; ++j) mma_m16n8k16<T>(acc[i][j], a[i], b[j]);
        }
    }
    cp_async_wait<0>();  // only empty groups are left; none outlives the block

    // c0, c1 = (channel qg, positions 2q, 2q + 1), c2, c3 = (channel qg + 8, same positions).
    // Where both of a lane's positions are in one row of the output (cols even, or rows that
    // follow one another) at an even element: one 4-byte access for the pair.
    const int qg = lane / 4, q = lane % 4;
    const bool rows_run_on = g.out_row == g.cols && positions % 2 == 0;
    const bool paired = (g.cols % 2 == 0 || rows_run_on) && (g.out_sample | g.out_channel | g.out_row) % 2 == 0 &&
                        (!residual || reinterpret_cast<uintptr_t>(residual) % (2 * sizeof(T)) == 0);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        const int at0 = p0 + warp_n + j * 8 + 2 * q;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int at = at0 + e;
            if (at >= total || (paired && e == 1)) continue;
            const int s = at / positions, p = at % positions;
            const int64_t sample_out = s * g.out_sample + (int64_t)(p / g.cols) * g.out_row + p % g.cols;
#pragma unroll
            for (int i = 0; i < MI; ++i) {
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const int ch = co0 + warp_m + i * 16 + qg + half * 8;
                    if (ch >= g.co) continue;
                    const float b_ch = to_f32(bias[ch]) + (sample_bias ? to_f32(sample_bias[(size_t)s * g.co + ch]) : 0.f);
                    const int64_t o = sample_out + ch * g.out_channel;
                    if (paired) {
                        float v0 = acc[i][j][half * 2] + b_ch, v1 = acc[i][j][half * 2 + 1] + b_ch;
                        if (residual) {
                            const Pair<T> r = *reinterpret_cast<const Pair<T>*>(residual + o);
                            v0 += to_f32(r.v[0]);
                            v1 += to_f32(r.v[1]);
                        }
                        Pair<T> y;
                        y.v[0] = from_f32<T>(v0);
                        y.v[1] = from_f32<T>(v1);
                        *reinterpret_cast<Pair<T>*>(out + o) = y;
                    } else {
                        float v = acc[i][j][half * 2 + e] + b_ch;
                        if (residual) v += to_f32(residual[o]);
                        out[o] = from_f32<T>(v);
                    }
                }
            }
        }
    }
}

}  // namespace

// The tile shapes and pipeline depths the launcher chooses from (conv_igemm.rs's `Tile`): BM
// channels × BN positions, STAGES buffers; dynamic shared memory STAGES · (BM + BN) · 40 elements.
#define CONV_IGEMM_TILE(NAME, T, BM, BN, STAGES)                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                     \
        conv_igemm_##BM##x##BN##_s##STAGES##_##NAME(const T* xp, const T* w, const T* bias,                   \
                                                    const T* sample_bias, const T* residual, T* out,          \
                                                    ConvGeometry g) {                                         \
        conv_igemm<T, BM, BN, STAGES>(xp, w, bias, sample_bias, residual, out, g);                            \
    }

#define CONV_IGEMM(NAME, T)                                                                                  \
    extern "C" __global__ void to_channels_last_##NAME(const T* x, T* xp, int c, int rows, int cols, int pad_r, \
                                                        int pad_c, int up, CopyLayout at, const double* sums,  \
                                                        const T* gamma, const T* beta, int cpg, float eps,    \
                                                        int silu) {                                           \
        to_channels_last(x, xp, c, rows, cols, pad_r, pad_c, up, at, sums, gamma, beta, cpg, eps, silu);     \
    }                                                                                                         \
    CONV_IGEMM_TILE(NAME, T, 128, 128, 2)                                                                     \
    CONV_IGEMM_TILE(NAME, T, 128, 128, 3)                                                                     \
    CONV_IGEMM_TILE(NAME, T, 128, 128, 4)                                                                     \
    CONV_IGEMM_TILE(NAME, T, 128, 256, 3)                                                                     \
    CONV_IGEMM_TILE(NAME, T, 64, 256, 3)

CONV_IGEMM(f16, __half)
CONV_IGEMM(bf16, __nv_bfloat16)
