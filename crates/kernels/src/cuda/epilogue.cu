// What follows a GEMM, in one pass over its output: bias (+ residual) of linear layers, the bias
// and GELU gate of the feed-forwards (GEGLU), the bias and layout of the shifted-GEMM
// convolutions, the transformers' residual stream with its next LayerNorm, and the transformers'
// exits (bias, layout back, residual). candle composes these from broadcast ops that compute strided indices per
// element and make a pass (and often an f32 round trip) per op.
//
// Arithmetic in f32; inputs and outputs in the tensor's dtype (the convolutions' product is f32).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "permute.cuh"

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

// sum = y + bias (+ residual) as bias_rows makes it, and normed = LayerNorm(sum) · gamma + beta
// over each row of `cols`: a transformer block's attention output joining the residual stream,
// and the next norm of that stream, with the stream read once from device memory. A warp per row
// (8 per block, grid-stride): the first pass writes the row's sum and totals it, the second
// totals the squared deviations from the mean, the third writes the normalised row, each lane
// re-reading only what it wrote itself (from cache). Statistics of the rounded sum in f32, as
// the composition computes them on the stored tensor. `packed`: cols and every pointer allow
// 16-byte accesses.
template <typename T>
__device__ void add_layer_norm(const T* __restrict__ y, const T* __restrict__ bias, const T* __restrict__ residual,
                               const T* __restrict__ gamma, const T* __restrict__ beta, T* sum, T* __restrict__ normed,
                               size_t rows, int cols, float eps, int packed) {
    const int lane = threadIdx.x % 32;
    const size_t warps = (size_t)gridDim.x * (blockDim.x / 32);
    const int V = packed ? vec<T>() : 1;
    const float inv_cols = 1.f / cols;
    for (size_t row = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; row < rows; row += warps) {
        const size_t base = row * cols;
        float total = 0.f;
        for (int c = lane * V; c < cols; c += 32 * V) {
            if (packed) {
                Pack<T> a = load_pack(y + base + c);
                const Pack<T> b = load_pack(bias + c);
                Pack<T> r;
                if (residual) r = load_pack(residual + base + c);
#pragma unroll
                for (int k = 0; k < vec<T>(); ++k) {
                    float v = to_f32(a.v[k]) + to_f32(b.v[k]);
                    if (residual) v += to_f32(r.v[k]);
                    a.v[k] = from_f32<T>(v);
                    total += to_f32(a.v[k]);
                }
                store_pack(sum + base + c, a);
            } else {
                float v = to_f32(y[base + c]) + to_f32(bias[c]);
                if (residual) v += to_f32(residual[base + c]);
                const T t = from_f32<T>(v);
                sum[base + c] = t;
                total += to_f32(t);
            }
        }
        for (int o = 16; o > 0; o /= 2) total += __shfl_xor_sync(0xffffffff, total, o);
        const float mean = total * inv_cols;
        float squares = 0.f;
        for (int c = lane * V; c < cols; c += 32 * V) {
            if (packed) {
                const Pack<T> a = load_pack(sum + base + c);
#pragma unroll
                for (int k = 0; k < vec<T>(); ++k) {
                    const float d = to_f32(a.v[k]) - mean;
                    squares += d * d;
                }
            } else {
                const float d = to_f32(sum[base + c]) - mean;
                squares += d * d;
            }
        }
        for (int o = 16; o > 0; o /= 2) squares += __shfl_xor_sync(0xffffffff, squares, o);
        const float inv_std = rsqrtf(squares * inv_cols + eps);
        for (int c = lane * V; c < cols; c += 32 * V) {
            if (packed) {
                Pack<T> a = load_pack(sum + base + c);
                const Pack<T> g = load_pack(gamma + c), b = load_pack(beta + c);
#pragma unroll
                for (int k = 0; k < vec<T>(); ++k)
                    a.v[k] = from_f32<T>((to_f32(a.v[k]) - mean) * inv_std * to_f32(g.v[k]) + to_f32(b.v[k]));
                store_pack(normed + base + c, a);
            } else {
                const float v = (to_f32(sum[base + c]) - mean) * inv_std;
                normed[base + c] = from_f32<T>(v * to_f32(gamma[c]) + to_f32(beta[c]));
            }
        }
    }
}

// out = permute(y) + bias + addend, the transformers' exits: their output projection's product
// goes back to the (…, channels, h, w) layout and joins the block's input. Tiles as
// permute.cu's permute_tiles (the innermost axis moves); the bias (null: none) runs along y's last
// axis, `bias_len` long, the fastest part of I (which merges the input's innermost axes). One
// rounding, as bias_rows with a residual.
template <typename T>
__device__ void permute_bias_add(const T* __restrict__ y, const T* __restrict__ bias, int64_t bias_len,
                                 const T* __restrict__ addend, T* __restrict__ out, Tiles t, int64_t batches) {
    __shared__ float tile[32][33];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int64_t i0 = (int64_t)blockIdx.x * 32, j0 = (int64_t)blockIdx.y * 32;
    for (int64_t batch = blockIdx.z; batch < batches; batch += gridDim.z) {
        int64_t in_base, out_base;
        tile_bases(t, batch, in_base, out_base);
        __syncthreads();  // the previous batch's tile has been written out
        for (int j = ty; j < 32; j += 8) {
            if (i0 + tx < t.ni && j0 + j < t.nj) {
                float v = to_f32(y[in_base + (j0 + j) * t.in_stride_j + i0 + tx]);
                if (bias) v += to_f32(bias[(i0 + tx) % bias_len]);
                tile[j][tx] = v;
            }
        }
        __syncthreads();
        for (int i = ty; i < 32; i += 8) {
            if (i0 + i < t.ni && j0 + tx < t.nj) {
                const int64_t o = out_base + (i0 + i) * t.out_stride_i + j0 + tx;
                out[o] = from_f32<T>(tile[tx][i] + to_f32(addend[o]));
            }
        }
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
    }                                                                                                        \
    extern "C" __global__ void add_layer_norm_##NAME(const T* y, const T* bias, const T* residual,         \
                                                     const T* gamma, const T* beta, T* sum, T* normed,      \
                                                     size_t rows, int cols, float eps, int packed) {         \
        add_layer_norm(y, bias, residual, gamma, beta, sum, normed, rows, cols, eps, packed);               \
    }                                                                                                        \
    extern "C" __global__ void permute_bias_add_##NAME(const T* y, const T* bias, int64_t bias_len,         \
                                                       const T* addend, T* out, Tiles t, int64_t batches) {  \
        permute_bias_add(y, bias, bias_len, addend, out, t, batches);                                        \
    }

EPILOGUE(f32, float)
EPILOGUE(f16, __half)
EPILOGUE(bf16, __nv_bfloat16)
