// Fused attention for CUDA: softmax(q·kᵀ·scale)·v without the score matrix in device memory
// (FlashAttention-2's online softmax). f16/bf16 inputs, tensor-core products (mma.sync
// m16n8k16), f32 scores, softmax statistics and accumulators, all in registers. Head dimensions
// 16, 32, 64 (every attention of the real UNet) and 128; any query and key length.
//
// A block of 4 warps takes 64 queries of one (batch·head); each warp owns 16 query rows and walks
// the keys in tiles of 64 that the block stages in shared memory (v transposed, so both products
// read their B operands as 32-bit pairs). Grid: batch × ceil(n / 64) blocks along x. At most 16
// queries go to flash_attention_short (below): a warp per (batch·head), ceil(batch·heads / 4)
// blocks.
//
// With mma.m16n8k16's fragment layouts (ptx.cuh) the score accumulators of two adjacent 8-key
// tiles are exactly the A fragment of p·v.

#include "attention.cuh"

namespace {

constexpr int WARPS = 4;
constexpr int BQ = WARPS * 16;
constexpr int BK = 64;    // keys per tile
constexpr int PAD = 8;    // row padding (elements): for d = 64 rows 144 B apart, so a warp's pairs hit 32 banks

// q: n rows, k and v: m rows, out (and addend, if not null) n rows of D elements per (batch,
// head), where `layout` says.
template <typename T, int D>
__device__ void flash_attention(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                T* __restrict__ out, const T* __restrict__ addend, int n, int m, float scale,
                                const AttentionLayout& layout) {
    constexpr int LD = D + PAD;
    __shared__ __align__(16) T k_tile[BK * LD];   // [key][d]
    __shared__ __align__(16) T vt_tile[D * (BK + PAD)];  // [d][key]
    constexpr int LDV = BK + PAD;

    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int g = lane / 4, qd = lane % 4;
    const int q_blocks = (n + BQ - 1) / BQ;
    const int row0 = (blockIdx.x % q_blocks) * BQ + warp * 16;
    const HeadOffsets at = head_offsets<D>(layout, blockIdx.x / q_blocks);
    q += at.q;
    k += at.k;
    v += at.v;
    out += at.out;

    uint32_t qf[D / 16][4];
    float o[D / 8][4];
    RowStats rows;
    start_rows<D>(qf, o, rows, q, layout.q_row, row0, n);
    const float log2_scale = log2_units(scale);

    for (int key0 = 0; key0 < m; key0 += BK) {
        __syncthreads();  // every warp is done with the previous tiles
        // Stage k (row-major) and v (transposed): 16-byte chunks of 8 elements.
        for (int chunk = threadIdx.x; chunk < BK * D / 8; chunk += WARPS * 32) {
            const int r = chunk / (D / 8), c = (chunk % (D / 8)) * 8;
            uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
            if (key0 + r < m) {
                kv = *reinterpret_cast<const uint4*>(k + (key0 + r) * layout.k_row + c);
                vv = *reinterpret_cast<const uint4*>(v + (key0 + r) * layout.v_row + c);
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
                mma_m16n8k16<T>(s[j], qf[kk], b);
            }
        }

        uint32_t p[BK / 16][4];
        float corr_lo, corr_hi;
        softmax_tile<T, BK>(s, p, rows, key0, m, log2_scale, corr_lo, corr_hi);

        // o = o·corr + p·v: 8 tiles of 8 head dimensions, 4 steps of 16 keys.
        rescale<D>(o, corr_lo, corr_hi);
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk) {
                uint32_t b[2];
                const int d = j * 8 + g;
                b[0] = pair_at(vt_tile, d * LDV + kk * 16 + 2 * qd);
                b[1] = pair_at(vt_tile, d * LDV + kk * 16 + 2 * qd + 8);
                mma_m16n8k16<T>(o[j], p[kk], b);
            }
        }
    }
    store_rows<T, D>(out, layout.out_row, o, rows, row0, n, addend ? addend + at.out : nullptr, layout.weight);
}

// At most 16 queries (the temporal attention's frames): a warp takes one (batch, head) whole, its
// queries as one row tile, the keys in tiles of 16 staged in the warp's own shared memory (k as
// it is, v read by ldmatrix.trans), so nothing waits on other warps and no product is spent on
// rows or keys that are not there. A block's 4 warps take 4 (batch, head)s.
constexpr int SHORT_KEYS = 16;

template <typename T, int D>
__device__ void flash_attention_short(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                      T* __restrict__ out, const T* __restrict__ addend, int n, int m, float scale,
                                      const AttentionLayout& layout) {
    constexpr int LD = D + PAD;
    __shared__ __align__(16) T tiles[WARPS][2][SHORT_KEYS * LD];  // per warp: k, v ([key][d])
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int mat = lane / 8, mat_row = lane % 8;
    const int bh = blockIdx.x * WARPS + warp;
    if (bh >= layout.batches * layout.heads) return;  // the whole warp; nothing here waits on others
    const HeadOffsets at = head_offsets<D>(layout, bh);
    q += at.q;
    k += at.k;
    v += at.v;
    out += at.out;
    T* const kt = tiles[warp][0];
    T* const vt = tiles[warp][1];

    uint32_t qf[D / 16][4];
    float o[D / 8][4];
    RowStats rows;
    start_rows<D>(qf, o, rows, q, layout.q_row, 0, n);
    const float log2_scale = log2_units(scale);

    for (int key0 = 0; key0 < m; key0 += SHORT_KEYS) {
        __syncwarp();  // the warp is done with the previous tile
        for (int chunk = lane; chunk < SHORT_KEYS * D / 8; chunk += 32) {
            const int r = chunk / (D / 8), c = (chunk % (D / 8)) * 8;
            uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
            if (key0 + r < m) {
                kv = *reinterpret_cast<const uint4*>(k + (key0 + r) * layout.k_row + c);
                vv = *reinterpret_cast<const uint4*>(v + (key0 + r) * layout.v_row + c);
            }
            *reinterpret_cast<uint4*>(kt + r * LD + c) = kv;
            *reinterpret_cast<uint4*>(vt + r * LD + c) = vv;
        }
        __syncwarp();

        // Scores against the tile's two 8-key tiles: one ldmatrix.x4 per 16 head dimensions,
        // matrices (keys lo, d lo), (keys lo, d hi), (keys hi, d lo), (keys hi, d hi).
        float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t b[4];
            ldmatrix_x4(b, kt + ((mat / 2) * 8 + mat_row) * LD + kk * 16 + (mat % 2) * 8);
            mma_m16n8k16<T>(s[0], qf[kk], b);
            mma_m16n8k16<T>(s[1], qf[kk], b + 2);
        }
        uint32_t p[1][4];
        float corr_lo, corr_hi;
        softmax_tile<T, SHORT_KEYS>(s, p, rows, key0, m, log2_scale, corr_lo, corr_hi);
        rescale<D>(o, corr_lo, corr_hi);
        // o += p·v: one ldmatrix.x4.trans per two 8-dimension tiles, matrices (keys lo, j),
        // (keys hi, j), (keys lo, j + 1), (keys hi, j + 1).
#pragma unroll
        for (int j = 0; j < D / 8; j += 2) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, vt + ((mat % 2) * 8 + mat_row) * LD + (j + mat / 2) * 8);
            mma_m16n8k16<T>(o[j], p[0], b);
            mma_m16n8k16<T>(o[j + 1], p[0], b + 2);
        }
    }
    store_rows<T, D>(out, layout.out_row, o, rows, 0, n, addend ? addend + at.out : nullptr, layout.weight);
}

}  // namespace

#define FLASH_ATTENTION(NAME, T, D)                                                                              \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                                     \
        flash_attention_##NAME##_d##D(const T* q, const T* k, const T* v, T* out, const T* addend, int n, int m, \
                           float scale, AttentionLayout layout) {                                                \
        flash_attention<T, D>(q, k, v, out, addend, n, m, scale, layout);                                        \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                                     \
        flash_attention_short_##NAME##_d##D(const T* q, const T* k, const T* v, T* out, const T* addend, int n,   \
                                            int m, float scale, AttentionLayout layout) {                         \
        flash_attention_short<T, D>(q, k, v, out, addend, n, m, scale, layout);                                  \
    }

FLASH_ATTENTION(f16, __half, 16)
FLASH_ATTENTION(f16, __half, 32)
FLASH_ATTENTION(f16, __half, 64)
FLASH_ATTENTION(f16, __half, 128)
FLASH_ATTENTION(bf16, __nv_bfloat16, 16)
FLASH_ATTENTION(bf16, __nv_bfloat16, 32)
FLASH_ATTENTION(bf16, __nv_bfloat16, 64)
FLASH_ATTENTION(bf16, __nv_bfloat16, 128)
