// GroupNorm (+ SiLU) for CUDA in two launches: per-(sample, group) sums, split over many blocks
// and accumulated in f64, then one elementwise pass that normalises, applies the affine weight and
// bias, and optionally SiLU. candle's composition takes ~10 passes with f32 round trips.
//
// x: (n, c, s) contiguous, s = product of the trailing dimensions; groups divide c.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace {

__device__ __forceinline__ float load(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float load(const __half* p, size_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float load(const __nv_bfloat16* p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void store(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__half* p, size_t i, float v) { p[i] = __float2half(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, size_t i, float v) { p[i] = __float2bfloat16(v); }

constexpr int THREADS = 256;
constexpr int CHUNK = THREADS * 16;  // elements per statistics block

// Grid: (chunks per group, n·groups). sums: (n·groups, 2) zeroed f64, [Σx, Σx²] after a shift by
// the group's first element (keeps Σx² − (Σx)²/N accurate when the mean is large).
template <typename T>
__device__ void group_stats(const T* __restrict__ x, double* __restrict__ sums, size_t group_len) {
    const size_t group = blockIdx.y;
    const T* g = x + group * group_len;
    const float shift = load(g, 0);
    float s = 0.f, ss = 0.f;
    const size_t begin = (size_t)blockIdx.x * CHUNK;
    const size_t end = min(begin + CHUNK, group_len);
    for (size_t i = begin + threadIdx.x; i < end; i += THREADS) {
        const float v = load(g, i) - shift;
        s += v;
        ss += v * v;
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

// Grid-stride over all n·c·s elements.
template <typename T>
__device__ void group_apply(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                            const double* __restrict__ sums, T* __restrict__ y, size_t total, int c, size_t s,
                            int channels_per_group, float eps, int silu) {
    const size_t group_len = (size_t)channels_per_group * s;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t nc = i / s;
        const int ch = nc % c;
        const size_t group = nc / channels_per_group;
        const double n = (double)group_len;
        const double mean_shifted = sums[2 * group] / n;
        const double var = fmax(sums[2 * group + 1] / n - mean_shifted * mean_shifted, 0.0);
        const float mean = (float)mean_shifted + load(x, group * group_len);
        const float rstd = rsqrtf((float)var + eps);
        float v = (load(x, i) - mean) * rstd * load(w, ch) + load(b, ch);
        if (silu) v = v / (1.f + __expf(-v));
        store(y, i, v);
    }
}

}  // namespace

#define GROUP_NORM(NAME, T)                                                                                   \
    extern "C" __global__ void __launch_bounds__(THREADS) group_stats_##NAME(const T* x, double* sums,     \
                                                                                size_t group_len) {         \
        group_stats(x, sums, group_len);                                                                    \
    }                                                                                                       \
    extern "C" __global__ void group_apply_##NAME(const T* x, const T* w, const T* b, const double* sums,  \
                                                  T* y, size_t total, int c, size_t s, int cpg, float eps,  \
                                                  int silu) {                                               \
        group_apply(x, w, b, sums, y, total, c, s, cpg, eps, silu);                                         \
    }

GROUP_NORM(f32, float)
GROUP_NORM(f16, __half)
GROUP_NORM(bf16, __nv_bfloat16)
