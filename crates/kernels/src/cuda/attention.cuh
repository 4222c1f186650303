// What both fused attention kernels (flash_attention.cu, flash_attention2.cu) do the same way:
// a warp owns 16 query rows; it loads their Q fragments from global memory, keeps the running
// row maxima and sums of the online softmax (FlashAttention-2), turns each tile of scores into
// the A fragments of p·v, and stores its normalised rows. Rows g and g + 8 of the warp's 16
// (g = lane / 4) are the "lo" and "hi" halves of every accumulator (ptx.cuh's layouts).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "ptx.cuh"

// Where the rows of one (batch, head) live, in elements: row r of head h of batch b is at
// b·batch + h·D + r·row of its tensor. Heads sit side by side in the last dimension (the
// projections' own layout, no split or merge copies); a fused q/k/v projection's three parts are
// rows 3·heads·D apart. The grid's batch index is b·heads + h. Every stride and offset is a
// multiple of 8 elements (16-byte chunks). An addend (null: none) has out's layout: the kernels
// then store addend + weight · attention (else weight is 1). flash_attention.rs mirrors it
// (#[repr(C)]).
struct AttentionLayout {
    int64_t q_batch, k_batch, v_batch, out_batch;
    int64_t q_row, k_row, v_row, out_row;
    int32_t heads;
    float weight;
    int32_t batches;  // b: the grid covers b · heads (batch, head)s
};

namespace {

// Where the (batch, head) with the grid's batch index `bh` starts in each tensor (elements).
struct HeadOffsets {
    int64_t q, k, v, out;
};

template <int D>
__device__ __forceinline__ HeadOffsets head_offsets(const AttentionLayout& l, int64_t bh) {
    const int64_t b = bh / l.heads, h = bh % l.heads;
    return HeadOffsets{b * l.q_batch + h * D, b * l.k_batch + h * D, b * l.v_batch + h * D, b * l.out_batch + h * D};
}

// Two floats rounded into one register of two 16-bit values (the lower one in the low half).
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

__device__ __forceinline__ uint32_t pair_at(const void* base, size_t element) {
    return *reinterpret_cast<const uint32_t*>(reinterpret_cast<const uint16_t*>(base) + element);
}

// The A fragments of q's rows row0 .. row0 + 15 (zeros past n; rows `stride` elements apart),
// straight from global memory.
template <int D>
__device__ __forceinline__ void load_q_fragments(uint32_t (&qf)[D / 16][4], const void* q, int64_t stride, int row0, int n) {
    const int g = threadIdx.x % 32 / 4, qd = threadIdx.x % 4;
    const int r_lo = row0 + g, r_hi = row0 + g + 8;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const int c0 = kk * 16 + 2 * qd;
        qf[kk][0] = r_lo < n ? pair_at(q, r_lo * stride + c0) : 0u;
        qf[kk][1] = r_hi < n ? pair_at(q, r_hi * stride + c0) : 0u;
        qf[kk][2] = r_lo < n ? pair_at(q, r_lo * stride + c0 + 8) : 0u;
        qf[kk][3] = r_hi < n ? pair_at(q, r_hi * stride + c0 + 8) : 0u;
    }
}

// The running maxima (log2 domain) and sums of the lane's two rows.
struct RowStats {
    float max_lo, max_hi, sum_lo, sum_hi;
};

__device__ __forceinline__ RowStats row_stats() { return RowStats{-INFINITY, -INFINITY, 0.f, 0.f}; }

// A warp's 16 query rows from row0, before the first key: their Q fragments, zeroed
// accumulators, fresh statistics.
template <int D>
__device__ __forceinline__ void start_rows(uint32_t (&qf)[D / 16][4], float (&o)[D / 8][4], RowStats& rows, const void* q,
                                           int64_t q_row, int row0, int n) {
    load_q_fragments<D>(qf, q, q_row, row0, n);
#pragma unroll
    for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    rows = row_stats();
}

// The softmax's scale in log2 units (the kernels exponentiate with 2^x).
__device__ __forceinline__ float log2_units(float scale) { return scale * 1.4426950408889634f; }

// One tile of scores s (16 rows × BK keys from key0; keys ≥ m masked) → probabilities p as the A
// fragments of p·v; updates the row statistics and returns by how much the accumulators of
// earlier tiles must shrink (corr_lo, corr_hi: 0 on the first tile). A row's values live in one
// quad of lanes, so its reductions are two shuffles. Per score: a max, one FMA (the scale and the
// row's maximum, in log2 units) and one ex2; the mask only in a tile that reaches past m.
template <typename T, int BK>
__device__ __forceinline__ void softmax_tile(float (&s)[BK / 8][4], uint32_t (&p)[BK / 16][4], RowStats& rows,
                                             int key0, int m, float log2_scale, float& corr_lo, float& corr_hi) {
    const int qd = threadIdx.x % 4;
    if (key0 + BK > m) {
#pragma unroll
        for (int j = 0; j < BK / 8; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e)
                if (key0 + j * 8 + 2 * qd + e >= m) s[j][e] = s[j][e + 2] = -INFINITY;
    }
    float tile_lo = -INFINITY, tile_hi = -INFINITY;
#pragma unroll
    for (int j = 0; j < BK / 8; ++j) {
        tile_lo = fmaxf(tile_lo, fmaxf(s[j][0], s[j][1]));
        tile_hi = fmaxf(tile_hi, fmaxf(s[j][2], s[j][3]));
    }
#pragma unroll
    for (int o = 1; o <= 2; o *= 2) {
        tile_lo = fmaxf(tile_lo, __shfl_xor_sync(0xffffffff, tile_lo, o));
        tile_hi = fmaxf(tile_hi, __shfl_xor_sync(0xffffffff, tile_hi, o));
    }
    // In log2 units (the scale is positive: the maximum stays where it is). Every tile holds at
    // least one valid key, so the new maxima are finite.
    const float new_lo = fmaxf(rows.max_lo, tile_lo * log2_scale), new_hi = fmaxf(rows.max_hi, tile_hi * log2_scale);
    corr_lo = exp2_approx(rows.max_lo - new_lo);
    corr_hi = exp2_approx(rows.max_hi - new_hi);
    rows.max_lo = new_lo;
    rows.max_hi = new_hi;
    float part_lo = 0.f, part_hi = 0.f;
#pragma unroll
    for (int j = 0; j < BK / 8; ++j) {
        const float e0 = exp2_approx(fmaf(s[j][0], log2_scale, -new_lo)), e1 = exp2_approx(fmaf(s[j][1], log2_scale, -new_lo));
        const float e2 = exp2_approx(fmaf(s[j][2], log2_scale, -new_hi)), e3 = exp2_approx(fmaf(s[j][3], log2_scale, -new_hi));
        const uint32_t lo = Pair<T>::pack(e0, e1), hi = Pair<T>::pack(e2, e3);
        // Sum what the product uses: the rounded probabilities.
        const T* l = reinterpret_cast<const T*>(&lo);
        const T* h = reinterpret_cast<const T*>(&hi);
        part_lo += float(l[0]) + float(l[1]);
        part_hi += float(h[0]) + float(h[1]);
        // Two adjacent 8-key accumulator tiles are exactly one 16-key A fragment.
        p[j / 2][(j % 2) * 2 + 0] = lo;
        p[j / 2][(j % 2) * 2 + 1] = hi;
    }
#pragma unroll
    for (int o = 1; o <= 2; o *= 2) {
        part_lo += __shfl_xor_sync(0xffffffff, part_lo, o);
        part_hi += __shfl_xor_sync(0xffffffff, part_hi, o);
    }
    rows.sum_lo = rows.sum_lo * corr_lo + part_lo;
    rows.sum_hi = rows.sum_hi * corr_hi + part_hi;
}

template <int D>
__device__ __forceinline__ void rescale(float (&o)[D / 8][4], float corr_lo, float corr_hi) {
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
        o[j][0] *= corr_lo;
        o[j][1] *= corr_lo;
        o[j][2] *= corr_hi;
        o[j][3] *= corr_hi;
    }
}

// Value i (0: the low half) of a 32-bit pair of T, as a float.
template <typename T>
__device__ __forceinline__ float pair_value(uint32_t pair, int i) {
    return float(reinterpret_cast<const T*>(&pair)[i]);
}

// out's rows row0 .. row0 + 15 (those below n; `stride` elements apart) = o / the row sums, or
// with an addend (same layout as out) addend + weight · o / the row sums: the dual
// cross-attention's second branch joining the first in the store, one rounding.
template <typename T, int D>
__device__ __forceinline__ void store_rows(T* out, int64_t stride, const float (&o)[D / 8][4], const RowStats& rows, int row0,
                                           int n, const T* addend, float weight) {
    const int g = threadIdx.x % 32 / 4, qd = threadIdx.x % 4;
    const int r_lo = row0 + g, r_hi = row0 + g + 8;
    const float inv_lo = weight / rows.sum_lo, inv_hi = weight / rows.sum_hi;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
        const int c = j * 8 + 2 * qd;
        const int64_t lo = r_lo * stride + c, hi = r_hi * stride + c;
        uint32_t add_lo = 0u, add_hi = 0u;  // all bits zero: +0 in f16 and bf16
        if (addend) {
            if (r_lo < n) add_lo = pair_at(addend, lo);
            if (r_hi < n) add_hi = pair_at(addend, hi);
        }
        if (r_lo < n)
            *reinterpret_cast<uint32_t*>(out + lo) =
                Pair<T>::pack(pair_value<T>(add_lo, 0) + o[j][0] * inv_lo, pair_value<T>(add_lo, 1) + o[j][1] * inv_lo);
        if (r_hi < n)
            *reinterpret_cast<uint32_t*>(out + hi) =
                Pair<T>::pack(pair_value<T>(add_hi, 0) + o[j][2] * inv_hi, pair_value<T>(add_hi, 1) + o[j][3] * inv_hi);
    }
}

}  // namespace
