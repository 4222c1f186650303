// Convolutions as implicit GEMMs on tensor cores (f16/bf16, f32 accumulation): every tap and input
// channel of an output tile accumulates in registers, where the shifted-GEMM path (mod.rs) runs
// one cuBLAS GEMM per tap and reads and writes an f32 accumulator in device memory for each.
//
// Two kernels:
// * to_channels_last: x (n, c, rows, cols) → xp (n, rows + 2·pad_r, cols + 2·pad_c, c), zero
//   border, through 32×32 tiles in shared memory (both sides coalesced);
// * conv_igemm: out (n, co, rows·cols) = bias (+ sample_bias[sample]) (+ residual) + Σ_tap
//   w[tap] · xp shifted by the tap, with w (taps, co, ci): what the UNet's residual blocks add
//   to a convolution (the timestep embedding per frame, the skip connection) on the way out. Tap t reads input row (t / kw)·row_step + t % kw positions past the
//   output's own: a 3×3 convolution is kh = kw = 3, row_step = the padded width; the temporal
//   (3, 1, 1) convolution is kh = 3, kw = 1, row_step = the frame size.
//
// GEMM view: M = output channels, N = output positions, K = taps × input channels. Channels
// last makes each position's input channels one contiguous row, so a shifted tap is a shift by
// whole rows and every row stays 16-byte aligned for cp.async and ldmatrix.
//
// A block computes 128 channels × 128 positions of one sample with 8 warps (2 along M × 4 along
// N, 64 × 32 each: 16 mma tiles of 16×8). K advances 32 input channels of one tap per stage; two
// stages of shared memory, the next in flight by cp.async while the warps compute.
// Requirements (the launcher checks): ci a multiple of 32, all pointers 16-byte aligned.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "ptx.cuh"

extern __shared__ __align__(128) unsigned char dynamic_smem[];

namespace {

constexpr int BM = 128;       // output channels per block
constexpr int BN = 128;       // output positions per block
constexpr int BC = 32;        // input channels per stage
constexpr int LDS = BC + 8;   // shared row: 80 bytes, so the 8 rows of an ldmatrix hit distinct banks
constexpr int THREADS = 256;
constexpr int STAGE = (BM + BN) * LDS;  // elements per stage: A (BM rows) then B (BN rows)

__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

// x (n, c, rows, cols) upsampled by `up` (1, or 2: nearest, as a 2× upsample before a
// convolution) → xp (n, rows·up + 2·pad_r, cols·up + 2·pad_c, c). Grid: (ceil(cols_p / 32),
// ceil(c / 32), n · rows_p); block (32, 8).
template <typename T>
__device__ void to_channels_last(const T* __restrict__ x, T* __restrict__ xp, int c, int rows, int cols, int pad_r,
                                 int pad_c, int up) {
    __shared__ T tile[32][33];
    const int rows_p = rows * up + 2 * pad_r, cols_p = cols * up + 2 * pad_c;
    const int sample = blockIdx.z / rows_p, r = blockIdx.z % rows_p;
    const int col0 = blockIdx.x * 32, ch0 = blockIdx.y * 32;
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int in_r = r - pad_r, in_c = col0 + tx - pad_c;  // in the upsampled image
    const bool inside = in_r >= 0 && in_r < rows * up && in_c >= 0 && in_c < cols * up;
    for (int i = ty; i < 32; i += 8) {
        const int ch = ch0 + i;
        tile[i][tx] = inside && ch < c ? x[(((size_t)sample * c + ch) * rows + in_r / up) * cols + in_c / up] : from_f32<T>(0.f);
    }
    __syncthreads();
    for (int i = ty; i < 32; i += 8) {
        const int col = col0 + i, ch = ch0 + tx;
        if (col < cols_p && ch < c) xp[(((size_t)sample * rows_p + r) * cols_p + col) * c + ch] = tile[tx][i];
    }
}

// Issues stage `s` (tap s / (ci / BC), channels (s % (ci / BC))·BC ..) into buffer `buf`.
template <typename T>
__device__ __forceinline__ void load_stage(T* buf, const T* xp, const T* w, int s, int ci, int co, int co0,
                                           const int (&in_base)[2], const bool (&in_valid)[2], int kw,
                                           int row_step) {
    const int chunks_per_tap = ci / BC;
    const int tap = s / chunks_per_tap, c0 = (s % chunks_per_tap) * BC;
    const int shift = (tap / kw) * row_step + tap % kw;
    // 512 16-byte chunks per operand (128 rows × 4), two per thread; a thread keeps its rows.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int chunk = threadIdx.x + i * THREADS;
        const int row = chunk / 4, part = (chunk % 4) * 8;
        const bool a_valid = co0 + row < co;
        const T* a_src = w + ((size_t)tap * co + (a_valid ? co0 + row : 0)) * ci + c0 + part;
        cp_async_16(buf + row * LDS + part, a_src, a_valid);
        const T* b_src = xp + (size_t)(in_valid[i] ? in_base[i] + shift : 0) * ci + c0 + part;
        cp_async_16(buf + (BM + row) * LDS + part, b_src, in_valid[i]);
    }
}

// xp: one sample after another (plane_p positions each); out and residual: (n, co, rows·cols);
// sample_bias: (n, co). sample_bias and residual may be null.
template <typename T>
__device__ void conv_igemm(const T* __restrict__ xp, const T* __restrict__ w, const T* __restrict__ bias,
                           const T* __restrict__ sample_bias, const T* __restrict__ residual, T* __restrict__ out,
                           int ci, int co, int rows, int cols, int plane_p, int cols_p, int taps, int kw, int row_step) {
    T* const smem = reinterpret_cast<T*>(dynamic_smem);
    const int positions = rows * cols;
    const int p0 = blockIdx.x * BN, co0 = blockIdx.y * BM;
    const size_t sample = blockIdx.z;
    xp += sample * (size_t)plane_p * ci;
    out += sample * (size_t)co * positions;
    if (residual) residual += sample * (size_t)co * positions;
    if (sample_bias) sample_bias += sample * (size_t)co;

    // The input row (padded coordinates, before the tap's shift) of each position this thread loads.
    int in_base[2];
    bool in_valid[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int p = p0 + (threadIdx.x + i * THREADS) / 4;
        in_valid[i] = p < positions;
        in_base[i] = in_valid[i] ? (p / cols) * cols_p + p % cols : 0;
    }

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int warp_m = (warp % 2) * 64, warp_n = (warp / 2) * 32;
    const int mat = lane / 8, mat_row = lane % 8;
    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;

    const int stages = taps * (ci / BC);
    load_stage(smem, xp, w, 0, ci, co, co0, in_base, in_valid, kw, row_step);
    cp_async_commit();
    for (int s = 0; s < stages; ++s) {
        // The next stage goes into the other buffer, released by the barrier that ended s - 1.
        if (s + 1 < stages) {
            load_stage(smem + ((s + 1) % 2) * STAGE, xp, w, s + 1, ci, co, co0, in_base, in_valid, kw, row_step);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const T* a_tile = smem + (s % 2) * STAGE;
        const T* b_tile = a_tile + BM * LDS;
#pragma unroll
        for (int ks = 0; ks < BC / 16; ++ks) {
            // A fragments of the warp's four 16-row tiles: matrices (rows lo, k lo), (rows hi,
            // k lo), (rows lo, k hi), (rows hi, k hi) are a0..a3.
            uint32_t a[4][4];
#pragma unroll
            for (int i = 0; i < 4; ++i)
                ldmatrix_x4(a[i], a_tile + (warp_m + i * 16 + (mat % 2) * 8 + mat_row) * LDS + ks * 16 + (mat / 2) * 8);
            // B fragments of the warp's four 8-position tiles, two per ldmatrix: matrices
            // (tile j, k lo), (j, k hi), (j + 1, k lo), (j + 1, k hi); rows are positions.
            uint32_t b[4][2];
#pragma unroll
            for (int j = 0; j < 4; j += 2) {
                uint32_t r[4];
                ldmatrix_x4(r, b_tile + (warp_n + (j + mat / 2) * 8 + mat_row) * LDS + ks * 16 + (mat % 2) * 8);
                b[j][0] = r[0];
                b[j][1] = r[1];
                b[j + 1][0] = r[2];
                b[j + 1][1] = r[3];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) mma_m16n8k16<T>(acc[i][j], a[i], b[j]);
        }
        __syncthreads();  // every warp is done with this buffer before it is refilled
    }

    // c0, c1 = (channel g, positions 2q, 2q + 1), c2, c3 = (channel g + 8, same positions).
    const int g = lane / 4, q = lane % 4;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int ch = co0 + warp_m + i * 16 + g + half * 8;
            if (ch >= co) continue;
            const float b_ch = to_f32(bias[ch]) + (sample_bias ? to_f32(sample_bias[ch]) : 0.f);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int p = p0 + warp_n + j * 8 + 2 * q + e;
                    if (p >= positions) continue;
                    const size_t at = (size_t)ch * positions + p;
                    float v = acc[i][j][half * 2 + e] + b_ch;
                    if (residual) v += to_f32(residual[at]);
                    out[at] = from_f32<T>(v);
                }
            }
        }
    }
}

}  // namespace

#define CONV_IGEMM(NAME, T)                                                                                  \
    extern "C" __global__ void to_channels_last_##NAME(const T* x, T* xp, int c, int rows, int cols, int pad_r, \
                                                        int pad_c, int up) {                                  \
        to_channels_last(x, xp, c, rows, cols, pad_r, pad_c, up);                                            \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                    \
        conv_igemm_##NAME(const T* xp, const T* w, const T* bias, const T* sample_bias, const T* residual,    \
                          T* out, int ci, int co, int rows, int cols, int plane_p, int cols_p, int taps, int kw, \
                          int row_step) {                                                                     \
        conv_igemm(xp, w, bias, sample_bias, residual, out, ci, co, rows, cols, plane_p, cols_p, taps, kw,   \
                   row_step);                                                                                 \
    }

CONV_IGEMM(f16, __half)
CONV_IGEMM(bf16, __nv_bfloat16)
