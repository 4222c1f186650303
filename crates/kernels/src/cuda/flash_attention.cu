// Fused attention for CUDA: softmax(q·kᵀ·scale)·v without the score matrix in device memory
// (FlashAttention-2's online softmax). f16/bf16 inputs, tensor-core products (mma.sync
// m16n8k16), f32 scores, softmax statistics and accumulators, all in registers. Head dimensions
// 16, 32, 64 (every attention of the real UNet) and 128; any query and key length.
//
// A block of 4 warps takes 64 queries of one (batch·head); each warp owns 16 query rows and walks
// the keys in tiles of 64 that the block stages in shared memory (v transposed, so both products
// read their B operands as 32-bit pairs). Grid: batch × ceil(n / 64) blocks along x.
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, q = lane % 4):
//   A (16×16): a0 = (g, 2q..2q+1), a1 = (g+8, 2q..), a2 = (g, 2q+8..), a3 = (g+8, 2q+8..)
//   B (16×8, k×n): b0 = (k 2q..2q+1, n g), b1 = (k 2q+8.., n g)
//   C (16×8): c0,c1 = (g, 2q..2q+1), c2,c3 = (g+8, 2q..2q+1)
// so the score accumulators of two adjacent 8-key tiles are exactly the A fragment of p·v.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

constexpr int WARPS = 4;
constexpr int BQ = WARPS * 16;
constexpr int BK = 64;    // keys per tile
constexpr int PAD = 8;    // row padding (elements): for d = 64 rows 144 B apart, so a warp's pairs hit 32 banks

template <typename T> struct Pair;
template <> struct Pair<__half> {
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __half2 h = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&h);
    }
};
template <> struct Pair<__nv_bfloat16> {
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&h);
    }
};

template <typename T> __device__ __forceinline__ void mma(float* c, const uint32_t* a, const uint32_t* b);
template <> __device__ __forceinline__ void mma<__half>(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void mma<__nv_bfloat16>(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t pair_at(const void* base, int element) {
    return *reinterpret_cast<const uint32_t*>(reinterpret_cast<const uint16_t*>(base) + element);
}

// q: (batch, n, D), k and v: (batch, m, D), out: (batch, n, D); all contiguous.
template <typename T, int D>
__device__ void flash_attention(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                T* __restrict__ out, int n, int m, float scale) {
    constexpr int LD = D + PAD;
    __shared__ __align__(16) T k_tile[BK * LD];   // [key][d]
    __shared__ __align__(16) T vt_tile[D * (BK + PAD)];  // [d][key]
    constexpr int LDV = BK + PAD;

    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int g = lane / 4, qd = lane % 4;
    const int q_blocks = (n + BQ - 1) / BQ;
    const size_t batch = blockIdx.x / q_blocks;
    const int row0 = (blockIdx.x % q_blocks) * BQ + warp * 16;
    q += batch * (size_t)n * D;
    k += batch * (size_t)m * D;
    v += batch * (size_t)m * D;
    out += batch * (size_t)n * D;

    // Q fragments for the warp's 16 rows, straight from global memory (zeros past the end).
    uint32_t qf[D / 16][4];
    {
        const int r_lo = row0 + g, r_hi = row0 + g + 8;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const int c0 = kk * 16 + 2 * qd;
            qf[kk][0] = r_lo < n ? pair_at(q, r_lo * D + c0) : 0u;
            qf[kk][1] = r_hi < n ? pair_at(q, r_hi * D + c0) : 0u;
            qf[kk][2] = r_lo < n ? pair_at(q, r_lo * D + c0 + 8) : 0u;
            qf[kk][3] = r_hi < n ? pair_at(q, r_hi * D + c0 + 8) : 0u;
        }
    }

    float o[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float max_lo = -INFINITY, max_hi = -INFINITY, sum_lo = 0.f, sum_hi = 0.f;
    const float log2_scale = scale * 1.4426950408889634f;

    for (int key0 = 0; key0 < m; key0 += BK) {
        __syncthreads();  // every warp is done with the previous tiles
        // Stage k (row-major) and v (transposed): 16-byte chunks of 8 elements.
        for (int chunk = threadIdx.x; chunk < BK * D / 8; chunk += WARPS * 32) {
            const int r = chunk / (D / 8), c = (chunk % (D / 8)) * 8;
            uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
            if (key0 + r < m) {
                kv = *reinterpret_cast<const uint4*>(k + (size_t)(key0 + r) * D + c);
                vv = *reinterpret_cast<const uint4*>(v + (size_t)(key0 + r) * D + c);
            }
            *reinterpret_cast<uint4*>(k_tile + r * LD + c) = kv;
            const T* ve = reinterpret_cast<const T*>(&vv);
#pragma unroll
            for (int e = 0; e < 8; ++e) vt_tile[(c + e) * LDV + r] = ve[e];
        }
        __syncthreads();

        // Scores of the warp's 16 rows against the tile's 64 keys: 8 tiles of 8 keys.
        float s[BK / 8][4];
#pragma unroll
        for (int j = 0; j < BK / 8; ++j) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                uint32_t b[2];
                const int key = j * 8 + g;
                b[0] = pair_at(k_tile, key * LD + kk * 16 + 2 * qd);
                b[1] = pair_at(k_tile, key * LD + kk * 16 + 2 * qd + 8);
                mma<T>(s[j], qf[kk], b);
            }
        }

        // Online softmax: rows g (c0, c1) and g + 8 (c2, c3); a row's 64 values live in one quad.
        float tile_lo = -INFINITY, tile_hi = -INFINITY;
#pragma unroll
        for (int j = 0; j < BK / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const bool valid = key0 + j * 8 + 2 * qd + e < m;
                s[j][e] = valid ? s[j][e] * log2_scale : -INFINITY;
                s[j][e + 2] = valid ? s[j][e + 2] * log2_scale : -INFINITY;
                tile_lo = fmaxf(tile_lo, s[j][e]);
                tile_hi = fmaxf(tile_hi, s[j][e + 2]);
            }
        }
#pragma unroll
        for (int o_ = 1; o_ <= 2; o_ *= 2) {
            tile_lo = fmaxf(tile_lo, __shfl_xor_sync(0xffffffff, tile_lo, o_));
            tile_hi = fmaxf(tile_hi, __shfl_xor_sync(0xffffffff, tile_hi, o_));
        }
        const float new_lo = fmaxf(max_lo, tile_lo), new_hi = fmaxf(max_hi, tile_hi);
        const float corr_lo = exp2f(max_lo - new_lo), corr_hi = exp2f(max_hi - new_hi);  // 0 on the first tile
        max_lo = new_lo;
        max_hi = new_hi;
        uint32_t p[BK / 16][4];
        float part_lo = 0.f, part_hi = 0.f;
#pragma unroll
        for (int j = 0; j < BK / 8; ++j) {
            const float e0 = exp2f(s[j][0] - new_lo), e1 = exp2f(s[j][1] - new_lo);
            const float e2 = exp2f(s[j][2] - new_hi), e3 = exp2f(s[j][3] - new_hi);
            const uint32_t lo = Pair<T>::pack(e0, e1), hi = Pair<T>::pack(e2, e3);
            // Sum what the product uses: the rounded probabilities.
            const T* l = reinterpret_cast<const T*>(&lo);
            const T* h = reinterpret_cast<const T*>(&hi);
            part_lo += float(l[0]) + float(l[1]);
            part_hi += float(h[0]) + float(h[1]);
            p[j / 2][(j % 2) * 2 + 0] = lo;
            p[j / 2][(j % 2) * 2 + 1] = hi;
        }
#pragma unroll
        for (int o_ = 1; o_ <= 2; o_ *= 2) {
            part_lo += __shfl_xor_sync(0xffffffff, part_lo, o_);
            part_hi += __shfl_xor_sync(0xffffffff, part_hi, o_);
        }
        sum_lo = sum_lo * corr_lo + part_lo;
        sum_hi = sum_hi * corr_hi + part_hi;

        // o = o·corr + p·v: 8 tiles of 8 head dimensions, 4 steps of 16 keys.
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
            o[j][0] *= corr_lo;
            o[j][1] *= corr_lo;
            o[j][2] *= corr_hi;
            o[j][3] *= corr_hi;
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk) {
                uint32_t b[2];
                const int d = j * 8 + g;
                b[0] = pair_at(vt_tile, d * LDV + kk * 16 + 2 * qd);
                b[1] = pair_at(vt_tile, d * LDV + kk * 16 + 2 * qd + 8);
                mma<T>(o[j], p[kk], b);
            }
        }
    }

    const int r_lo = row0 + g, r_hi = row0 + g + 8;
    const float inv_lo = 1.f / sum_lo, inv_hi = 1.f / sum_hi;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
        const int c = j * 8 + 2 * qd;
        if (r_lo < n) *reinterpret_cast<uint32_t*>(out + (size_t)r_lo * D + c) = Pair<T>::pack(o[j][0] * inv_lo, o[j][1] * inv_lo);
        if (r_hi < n) *reinterpret_cast<uint32_t*>(out + (size_t)r_hi * D + c) = Pair<T>::pack(o[j][2] * inv_hi, o[j][3] * inv_hi);
    }
}

}  // namespace

#define FLASH_ATTENTION(NAME, T, D)                                                                        \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                              \
        flash_attention_##NAME##_d##D(const T* q, const T* k, const T* v, T* out, int n, int m, float scale) { \
        flash_attention<T, D>(q, k, v, out, n, m, scale);                                                  \
    }

FLASH_ATTENTION(f16, __half, 16)
FLASH_ATTENTION(f16, __half, 32)
FLASH_ATTENTION(f16, __half, 64)
FLASH_ATTENTION(f16, __half, 128)
FLASH_ATTENTION(bf16, __nv_bfloat16, 16)
FLASH_ATTENTION(bf16, __nv_bfloat16, 32)
FLASH_ATTENTION(bf16, __nv_bfloat16, 64)
FLASH_ATTENTION(bf16, __nv_bfloat16, 128)
