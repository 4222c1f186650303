// GroupNorm (+ SiLU) for CUDA in two launches: per-(sample, group) sums, split over many blocks
// and accumulated in f64, then one elementwise pass that normalises, applies the affine weight and
// bias, and optionally SiLU. candle's composition takes ~10 passes with f32 round trips. Both
// passes give each block a stretch of one group, 16-byte accesses where the shape allows, and
// work out the group's statistics once per thread, not per element.
//
// x: (n, c, s) contiguous, s = product of the trailing dimensions; groups divide c. The
// statistics pass also reads groups that lie in several runs (GroupRuns: frames normalised as a
// video), for a convolution's copy that normalises.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "group_norm.cuh"

namespace {

__device__ __forceinline__ float load(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float load(const __half* p, size_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float load(const __nv_bfloat16* p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void store(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__half* p, size_t i, float v) { p[i] = __float2half(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, size_t i, float v) { p[i] = __float2bfloat16(v); }

constexpr int THREADS = 256;
constexpr int CHUNK = THREADS * 16;  // elements per block, in both passes

// 16 bytes of T, loaded and stored whole (`packed`: the group's length, the plane and the
// pointers allow it; the launcher decides).
template <typename T> struct alignas(16) Pack {
    T v[16 / sizeof(T)];
};

// Grid: (chunks per run, n·groups·runs). sums: (n·groups, 2) zeroed f64, [Σx, Σx²] after a
// shift by the group's first element (keeps Σx² − (Σx)²/N accurate when the mean is large).
template <typename T>
__device__ void group_stats(const T* __restrict__ x, double* __restrict__ sums, const GroupRuns runs, int packed) {
    constexpr int V = 16 / sizeof(T);
    const int64_t group = blockIdx.y / runs.runs, start = group_start(runs, group);
    const float shift = load(x, start);
    const T* g = x + start + (int64_t)(blockIdx.y % runs.runs) * runs.run_stride;
    const size_t run_len = runs.run_len;
    float s = 0.f, ss = 0.f;
    const size_t begin = (size_t)blockIdx.x * CHUNK;
    const size_t end = min(begin + CHUNK, run_len);
    if (packed) {
        for (size_t i = begin + threadIdx.x * V; i < end; i += THREADS * V) {
            const Pack<T> p = *reinterpret_cast<const Pack<T>*>(g + i);
#pragma unroll
            for (int k = 0; k < V; ++k) {
                const float v = load(p.v, k) - shift;
                s += v;
                ss += v * v;
            }
        }
    } else {
        for (size_t i = begin + threadIdx.x; i < end; i += THREADS) {
            const float v = load(g, i) - shift;
            s += v;
            ss += v * v;
        }
    }
    __shared__ float red[2][THREADS / 32];
    for (int o = 16; o > 0; o /= 2) {
        s += __shfl_xor_sync(0xffffffff, s, o);
        ss += __shfl_xor_sync(0xffffffff, ss, o);
    }
    if (threadIdx.x % 32 == 0) {
        red[0][threadIdx.x / 32] = s;
        red[1][threadIdx.x / 32] = ss;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double ts = 0, tss = 0;
        for (int w = 0; w < THREADS / 32; ++w) {
            ts += red[0][w];
            tss += red[1][w];
        }
        atomicAdd(&sums[2 * group], ts);
        atomicAdd(&sums[2 * group + 1], tss);
    }
}

template <bool SILU>
__device__ __forceinline__ float activate(float v) {
    return SILU ? group_norm_silu(v) : v;
}

// Grid: (chunks per group, n·groups), as group_stats' with one run per group: a block normalises CHUNK elements of one
// group, whose mean and scale it works out once; a group's channels are consecutive planes of
// s elements. `packed` (s a multiple of a pack): a pack never straddles two channels. SiLU is a
// template parameter: a runtime choice inside the loop kept nvcc from storing whole packs.
template <typename T, bool SILU>
__device__ void group_apply_as(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                               const double* __restrict__ sums, T* __restrict__ y, int c, size_t s,
                               int channels_per_group, float eps, int packed) {
    constexpr int V = 16 / sizeof(T);
    const size_t group = blockIdx.y;
    const size_t group_len = (size_t)channels_per_group * s;
    const int ch0 = (int)(group % (size_t)(c / channels_per_group)) * channels_per_group;
    const GroupMoments moments = group_moments(sums, group, group_len, load(x, group * group_len), eps);
    const float mean = moments.mean, rstd = moments.rstd;
    const T* gx = x + group * group_len;
    T* gy = y + group * group_len;
    const size_t begin = (size_t)blockIdx.x * CHUNK;
    const size_t end = min(begin + CHUNK, group_len);
    // A 64-bit division costs several times a 32-bit one; groups past 2³² elements take it.
    const bool narrow = group_len <= 0xffffffffu;
    auto channel = [&](size_t i) { return ch0 + (int)(narrow ? (uint32_t)i / (uint32_t)s : i / s); };
    if (packed) {
        for (size_t i = begin + threadIdx.x * V; i < end; i += THREADS * V) {
            const int ch = channel(i);
            const float weight = load(w, ch), bias = load(b, ch);
            Pack<T> p = *reinterpret_cast<const Pack<T>*>(gx + i);
#pragma unroll
            for (int k = 0; k < V; ++k) store(p.v, k, activate<SILU>((load(p.v, k) - mean) * rstd * weight + bias));
            *reinterpret_cast<Pack<T>*>(gy + i) = p;
        }
    } else {
        for (size_t i = begin + threadIdx.x; i < end; i += THREADS) {
            const int ch = channel(i);
            store(gy, i, activate<SILU>((load(gx, i) - mean) * rstd * load(w, ch) + load(b, ch)));
        }
    }
}

template <typename T>
__device__ void group_apply(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                            const double* __restrict__ sums, T* __restrict__ y, int c, size_t s, int channels_per_group,
                            float eps, int silu, int packed) {
    if (silu)
        group_apply_as<T, true>(x, w, b, sums, y, c, s, channels_per_group, eps, packed);
    else
        group_apply_as<T, false>(x, w, b, sums, y, c, s, channels_per_group, eps, packed);
}

}  // namespace

#define GROUP_NORM(NAME, T)                                                                                   \
    extern "C" __global__ void __launch_bounds__(THREADS) group_stats_##NAME(const T* x, double* sums,     \
                                                                                GroupRuns runs,             \
                                                                                int packed) {               \
        group_stats(x, sums, runs, packed);                                                                 \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                   \
        group_apply_##NAME(const T* x, const T* w, const T* b, const double* sums, T* y, int c, size_t s,   \
                           int cpg, float eps, int silu, int packed) {                                      \
        group_apply(x, w, b, sums, y, c, s, cpg, eps, silu, packed);                                        \
    }

GROUP_NORM(f32, float)
GROUP_NORM(f16, __half)
GROUP_NORM(bf16, __nv_bfloat16)
