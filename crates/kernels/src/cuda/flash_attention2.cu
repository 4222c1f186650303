// Fused attention, pipelined: the same math as flash_attention.cu (online softmax in registers,
// mma.sync m16n8k16 with f32 accumulation) with what that kernel lacked for long sequences:
//
// * 8 warps share each key/value tile (128 queries per block, 16 per warp): half the tile loads
//   per query;
// * tiles arrive by cp.async into two buffers, the next one in flight while the warps compute on
//   the current one;
// * v stays row-major: ldmatrix.trans hands out its B fragments, so nothing is transposed
//   element by element into shared memory; k's fragments come by ldmatrix too (one instruction
//   for four 8×8 matrices instead of eight 32-bit loads).
//
// Rows are padded by 16 bytes: the 8 row addresses of an ldmatrix then fall in distinct banks for
// every head dimension here. Dynamic shared memory: 2 buffers × (k + v) × BK × (D + 8) elements,
// at most 36 KiB (BK = 64, or 32 for D = 128), so no opt-in above 48 KiB is needed.
//
// Rows of D elements per (batch, head) where the AttentionLayout says (attention.cuh), 16-byte
// aligned. Grid: batch × heads × ceil(n / 128) blocks along x, 256 threads each.

#include "attention.cuh"

extern __shared__ __align__(128) unsigned char dynamic_smem[];

namespace {

constexpr int WARPS = 8;
constexpr int ROW_PAD = 8;  // elements after each shared row: 16 bytes, the ldmatrix rows' banks apart
constexpr int THREADS = WARPS * 32;
constexpr int BQ = WARPS * 16;

// Issues the copies of keys [key0, key0 + BK) of k and v into one buffer (zeros past m).
template <typename T, int D, int BK>
__device__ __forceinline__ void load_tile(T* k_tile, T* v_tile, const T* k, const T* v, int64_t k_row, int64_t v_row,
                                          int key0, int m) {
    constexpr int LD = D + ROW_PAD;
    constexpr int CHUNKS = BK * D / 8;  // 16-byte chunks per tensor
    for (int chunk = threadIdx.x; chunk < CHUNKS; chunk += THREADS) {
        const int r = chunk / (D / 8), c = (chunk % (D / 8)) * 8;
        const bool valid = key0 + r < m;
        const int64_t row = valid ? key0 + r : 0;
        cp_async_16(k_tile + r * LD + c, k + row * k_row + c, valid);
        cp_async_16(v_tile + r * LD + c, v + row * v_row + c, valid);
    }
}

template <typename T, int D>
__device__ void flash_attention2(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                 T* __restrict__ out, const T* __restrict__ addend, int n, int m, float scale,
                                const AttentionLayout& layout) {
    constexpr int BK = D <= 64 ? 64 : 32;  // keys per tile: at most 36 KiB of buffers
    constexpr int LD = D + ROW_PAD;
    constexpr int TILE = BK * LD;  // elements of one k (or v) buffer
    T* const smem = reinterpret_cast<T*>(dynamic_smem);
    // Buffer b: k at smem + 2·b·TILE, v right after it.
    auto k_buf = [&](int b) { return smem + 2 * b * TILE; };
    auto v_buf = [&](int b) { return smem + (2 * b + 1) * TILE; };

    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    // ldmatrix: this lane gives the address of row lane % 8 of matrix lane / 8.
    const int mat = lane / 8, mat_row = lane % 8;
    const int q_blocks = (n + BQ - 1) / BQ;
    const int row0 = (blockIdx.x % q_blocks) * BQ + warp * 16;
    const HeadOffsets at = head_offsets<D>(layout, blockIdx.x / q_blocks);
    q += at.q;
    k += at.k;
    v += at.v;
    out += at.out;

    const int tiles = (m + BK - 1) / BK;
    load_tile<T, D, BK>(k_buf(0), v_buf(0), k, v, layout.k_row, layout.v_row, 0, m);
    cp_async_commit();

    // Q fragments of the warp's 16 rows, from global memory while the first tile is in flight.
    uint32_t qf[D / 16][4];
    load_q_fragments<D>(qf, q, layout.q_row, row0, n);
    float o[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    RowStats rows = row_stats();
    const float log2_scale = scale * 1.4426950408889634f;

    for (int t = 0; t < tiles; ++t) {
        const int key0 = t * BK;
        // The next tile goes into the other buffer, read in iteration t - 1 and released by the
        // barrier that ended it.
        if (t + 1 < tiles) {
            load_tile<T, D, BK>(k_buf((t + 1) % 2), v_buf((t + 1) % 2), k, v, layout.k_row, layout.v_row, key0 + BK, m);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // tile t has landed, every thread's share of it
        const T* kt = k_buf(t % 2);
        const T* vt = v_buf(t % 2);

        // Scores of the warp's 16 rows against the tile's keys: BK / 8 tiles of 8 keys. One
        // ldmatrix.x4 gives the B fragments of key tiles j and j + 1 for 16 head dimensions:
        // matrices (j, d lo), (j, d hi), (j + 1, d lo), (j + 1, d hi).
        float s[BK / 8][4];
#pragma unroll
        for (int j = 0; j < BK / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int j = 0; j < BK / 8; j += 2) {
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                uint32_t b[4];
                ldmatrix_x4(b, kt + ((j + mat / 2) * 8 + mat_row) * LD + kk * 16 + (mat % 2) * 8);
                mma_m16n8k16<T>(s[j], qf[kk], b);
                mma_m16n8k16<T>(s[j + 1], qf[kk], b + 2);
            }
        }

        uint32_t p[BK / 16][4];
        float corr_lo, corr_hi;
        softmax_tile<T, BK>(s, p, rows, key0, m, log2_scale, corr_lo, corr_hi);

        // o = o·corr + p·v. One ldmatrix.x4.trans gives the B fragments of head-dimension tiles
        // j and j + 1 for 16 keys: matrices (keys lo, j), (keys hi, j), (keys lo, j + 1), (keys
        // hi, j + 1), each 8 keys (rows of v) × 8 dimensions.
        rescale<D>(o, corr_lo, corr_hi);
#pragma unroll
        for (int j = 0; j < D / 8; j += 2) {
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk) {
                uint32_t b[4];
                ldmatrix_x4_trans(b, vt + (kk * 16 + (mat % 2) * 8 + mat_row) * LD + (j + mat / 2) * 8);
                mma_m16n8k16<T>(o[j], p[kk], b);
                mma_m16n8k16<T>(o[j + 1], p[kk], b + 2);
            }
        }
        __syncthreads();  // every warp is done with this buffer before it is refilled
    }

    store_rows<T, D>(out, layout.out_row, o, rows, row0, n, addend ? addend + at.out : nullptr, layout.weight);
}

}  // namespace

#define FLASH_ATTENTION2(NAME, T, D)                                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                         \
        flash_attention2_##NAME##_d##D(const T* q, const T* k, const T* v, T* out, const T* addend, int n, int m, \
                           float scale, AttentionLayout layout) {                                                 \
        flash_attention2<T, D>(q, k, v, out, addend, n, m, scale, layout);                                        \
    }

FLASH_ATTENTION2(f16, __half, 16)
FLASH_ATTENTION2(f16, __half, 32)
FLASH_ATTENTION2(f16, __half, 64)
FLASH_ATTENTION2(f16, __half, 128)
FLASH_ATTENTION2(bf16, __nv_bfloat16, 16)
FLASH_ATTENTION2(bf16, __nv_bfloat16, 32)
FLASH_ATTENTION2(bf16, __nv_bfloat16, 64)
FLASH_ATTENTION2(bf16, __nv_bfloat16, 128)
