// What follows a GEMM, in one pass over its output: bias (+ residual) of linear layers, the bias
// and GELU gate of the feed-forwards (GEGLU), and the bias and layout of the shifted-GEMM
// convolutions. candle composes these from broadcast ops that compute strided indices per
// element and make a pass (and often an f32 round trip) per op.
//
// Arithmetic in f32; inputs and outputs in the tensor's dtype (the convolutions' product is f32).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

// Elements per 16-byte access.
template <typename T> __host__ __device__ constexpr int vec() { return 16 / sizeof(T); }

// 16 bytes of T, loaded and stored whole.
template <typename T> struct alignas(16) Pack {
    T v[vec<T>()];
};

// Through Pack itself (an aggregate of T may alias T), not a uint4: reading `v` after a store
// through another type is undefined, and the CPU emulator's g++ did drop such a store for f32.
template <typename T> __device__ __forceinline__ Pack<T> load_pack(const T* p) {
    return *reinterpret_cast<const Pack<T>*>(p);
}

template <typename T> __device__ __forceinline__ void store_pack(T* p, const Pack<T>& v) {
    *reinterpret_cast<Pack<T>*>(p) = v;
}

__device__ __forceinline__ float gelu(float g) { return 0.5f * g * (1.f + erff(g * 0.70710678118654752f)); }

// out[r, c] = y[r, c] + bias[c] (+ residual[r, c]). `packed`: cols and every pointer allow
// 16-byte accesses (checked by the caller); then `i` counts packs.
template <typename T>
__device__ void bias_rows(const T* __restrict__ y, const T* __restrict__ bias, const T* __restrict__ residual,
                          T* __restrict__ out, size_t total, int cols, int packed) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    if (packed) {
        constexpr int V = vec<T>();
        for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total / V; i += stride) {
            const size_t e = i * V;
            Pack<T> a = load_pack(y + e);
            const Pack<T> b = load_pack(bias + e % cols);
            Pack<T> r;
            if (residual) r = load_pack(residual + e);
#pragma unroll
            for (int k = 0; k < V; ++k) {
                float v = to_f32(a.v[k]) + to_f32(b.v[k]);
                if (residual) v += to_f32(r.v[k]);
                a.v[k] = from_f32<T>(v);
            }
            store_pack(out + e, a);
        }
        return;
    }
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        float v = to_f32(y[i]) + to_f32(bias[i % cols]);
        if (residual) v += to_f32(residual[i]);
        out[i] = from_f32<T>(v);
    }
}

// p: (rows, 2d), bias: (2d) → out: (rows, d) = (p[:, :d] + b[:d]) · GELU(p[:, d:] + b[d:]).
template <typename T>
__device__ void geglu_bias(const T* __restrict__ p, const T* __restrict__ bias, T* __restrict__ out, size_t rows,
                           int d, int packed) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    if (packed) {
        constexpr int V = vec<T>();
        const size_t per_row = d / V;
        for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < rows * per_row; i += stride) {
            const size_t r = i / per_row;
            const int j = (int)(i % per_row) * V;
            const T* row = p + r * 2 * (size_t)d;
            const Pack<T> a = load_pack(row + j), g = load_pack(row + d + j);
            const Pack<T> ba = load_pack(bias + j), bg = load_pack(bias + d + j);
            Pack<T> o;
#pragma unroll
            for (int k = 0; k < V; ++k) {
                o.v[k] = from_f32<T>((to_f32(a.v[k]) + to_f32(ba.v[k])) * gelu(to_f32(g.v[k]) + to_f32(bg.v[k])));
            }
            store_pack(out + r * d + j, o);
        }
        return;
    }
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < rows * d; i += stride) {
        const size_t r = i / d;
        const int j = (int)(i % d);
        const T* row = p + r * 2 * (size_t)d;
        out[i] = from_f32<T>((to_f32(row[j]) + to_f32(bias[j])) * gelu(to_f32(row[d + j]) + to_f32(bias[d + j])));
    }
}

// out[i] = y[i] + bias[channel of i] (+ residual[i]) for y (n, channels, plane) in T: a bias per
// channel, as after a convolution. `packed`: plane and every pointer allow 16-byte accesses.
template <typename T>
__device__ void bias_channels(const T* __restrict__ y, const T* __restrict__ bias, const T* __restrict__ residual,
                              T* __restrict__ out, size_t total, int channels, size_t plane, int packed) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    if (packed) {
        constexpr int V = vec<T>();
        for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total / V; i += stride) {
            const size_t e = i * V;
            const float b = to_f32(bias[(e / plane) % channels]);
            Pack<T> a = load_pack(y + e);
            Pack<T> r;
            if (residual) r = load_pack(residual + e);
#pragma unroll
            for (int k = 0; k < V; ++k) {
                float v = to_f32(a.v[k]) + b;
                if (residual) v += to_f32(r.v[k]);
                a.v[k] = from_f32<T>(v);
            }
            store_pack(out + e, a);
        }
        return;
    }
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        float v = to_f32(y[i]) + to_f32(bias[(i / plane) % channels]);
        if (residual) v += to_f32(residual[i]);
        out[i] = from_f32<T>(v);
    }
}

// y: (planes, rows, pitch) f32, planes = n·channels → out: (planes, rows, width) = y + bias[channel].
template <typename T>
__device__ void conv_bias(const float* __restrict__ y, const T* __restrict__ bias, T* __restrict__ out,
                          size_t total, int channels, int rows, int pitch, int width) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    const size_t plane = (size_t)rows * width;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const size_t pl = i / plane;
        const size_t in_plane = i % plane;
        const size_t r = in_plane / width, x = in_plane % width;
        out[i] = from_f32<T>(y[(pl * rows + r) * pitch + x] + to_f32(bias[pl % channels]));
    }
}

}  // namespace

#define EPILOGUE(NAME, T)                                                                                   \
    extern "C" __global__ void bias_rows_##NAME(const T* y, const T* bias, const T* residual, T* out,      \
                                                size_t total, int cols, int packed) {                        \
        bias_rows(y, bias, residual, out, total, cols, packed);                                              \
    }                                                                                                        \
    extern "C" __global__ void geglu_bias_##NAME(const T* p, const T* bias, T* out, size_t rows, int d,    \
                                                 int packed) {                                               \
        geglu_bias(p, bias, out, rows, d, packed);                                                           \
    }                                                                                                        \
    extern "C" __global__ void bias_channels_##NAME(const T* y, const T* bias, const T* residual, T* out,  \
                                                    size_t total, int channels, size_t plane, int packed) {  \
        bias_channels(y, bias, residual, out, total, channels, plane, packed);                               \
    }                                                                                                        \
    extern "C" __global__ void conv_bias_##NAME(const float* y, const T* bias, T* out, size_t total,       \
                                                int channels, int rows, int pitch, int width) {              \
        conv_bias(y, bias, out, total, channels, rows, pitch, width);                                        \
    }

EPILOGUE(f32, float)
EPILOGUE(f16, __half)
EPILOGUE(bf16, __nv_bfloat16)
