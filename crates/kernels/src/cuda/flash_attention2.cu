// Fused attention, pipelined: the same math as flash_attention.cu (online softmax in registers,
// mma.sync m16n8k16 with f32 accumulation) with what that kernel lacked for long sequences:
//
// * 128 queries per block share each key/value tile: half the tile loads per query;
// * tiles arrive by cp.async into two buffers, the next one in flight while the warps compute on
//   the current one (one barrier per tile);
// * v stays row-major: ldmatrix.trans hands out its B fragments, so nothing is transposed
//   element by element into shared memory; k's fragments come by ldmatrix too (one instruction
//   for four 8×8 matrices instead of eight 32-bit loads).
//
// Two shapes: 8 warps of 16 query rows each, or 4 warps of 32 (MT = 2 row tiles per warp, as
// FlashAttention-2 does): each k or v fragment a warp loads from shared memory then feeds four
// products instead of two, halving the shared-memory traffic per product, at twice the registers
// for scores and accumulators (head dimensions up to 64).
//
// Rows are padded by 16 bytes: the 8 row addresses of an ldmatrix then fall in distinct banks for
// every head dimension here. Dynamic shared memory: 2 buffers × (k + v) × BK × (D + 8) elements,
// at most 36 KiB (BK = 64, or 32 for D = 128), so no opt-in above 48 KiB is needed.
//
// Rows of D elements per (batch, head) where the AttentionLayout says (attention.cuh), 16-byte
// aligned. Grid: batch × heads × ceil(n / 128) blocks along x, 256 / MT threads each.

#include "attention.cuh"

extern __shared__ __align__(128) unsigned char dynamic_smem[];

namespace {

constexpr int ROW_PAD = 8;  // elements after each shared row: 16 bytes, the ldmatrix rows' banks apart
constexpr int BQ = 128;     // queries per block

// Issues the copies of keys [key0, key0 + BK) of k and v into one buffer (zeros past m).
template <typename T, int D, int BK, int THREADS>
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

// MT: 16-row tiles of queries per warp (1: 8 warps, 2: 4 warps).
template <typename T, int D, int MT>
__device__ void flash_attention2(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                 T* __restrict__ out, const T* __restrict__ addend, int n, int m, float scale,
                                const AttentionLayout& layout) {
    constexpr int THREADS = BQ / (16 * MT) * 32;
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
    // The warp's row tiles start at row0, row0 + 16, …
    const int row0 = (blockIdx.x % q_blocks) * BQ + warp * 16 * MT;
    const HeadOffsets at = head_offsets<D>(layout, blockIdx.x / q_blocks);
    q += at.q;
    k += at.k;
    v += at.v;
    out += at.out;

    const int tiles = (m + BK - 1) / BK;
    load_tile<T, D, BK, THREADS>(k_buf(0), v_buf(0), k, v, layout.k_row, layout.v_row, 0, m);
    cp_async_commit();

    // Q fragments of the warp's rows, from global memory while the first tile is in flight.
    uint32_t qf[MT][D / 16][4];
    float o[MT][D / 8][4];
    RowStats rows[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) start_rows<D>(qf[mt], o[mt], rows[mt], q, layout.q_row, row0 + 16 * mt, n);
    const float log2_scale = log2_units(scale);

    for (int t = 0; t < tiles; ++t) {
        const int key0 = t * BK;
        cp_async_wait<0>();
        // Tile t has landed, every thread's share of it; every warp is done with tile t - 1,
        // whose buffer the next load refills while the warps compute on this one.
        __syncthreads();
        if (t + 1 < tiles)
            load_tile<T, D, BK, THREADS>(k_buf((t + 1) % 2), v_buf((t + 1) % 2), k, v, layout.k_row, layout.v_row, key0 + BK, m);
        cp_async_commit();
        const T* kt = k_buf(t % 2);
        const T* vt = v_buf(t % 2);

        // Scores of the warp's rows against the tile's keys: BK / 8 tiles of 8 keys. One
        // ldmatrix.x4 gives the B fragments of key tiles j and j + 1 for 16 head dimensions:
        // matrices (j, d lo), (j, d hi), (j + 1, d lo), (j + 1, d hi).
        float s[MT][BK / 8][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int j = 0; j < BK / 8; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
#pragma unroll
        for (int j = 0; j < BK / 8; j += 2) {
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                uint32_t b[4];
                ldmatrix_x4(b, kt + ((j + mat / 2) * 8 + mat_row) * LD + kk * 16 + (mat % 2) * 8);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_m16n8k16<T>(s[mt][j], qf[mt][kk], b);
                    mma_m16n8k16<T>(s[mt][j + 1], qf[mt][kk], b + 2);
                }
            }
        }

        uint32_t p[MT][BK / 16][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            float corr_lo, corr_hi;
            softmax_tile<T, BK>(s[mt], p[mt], rows[mt], key0, m, log2_scale, corr_lo, corr_hi);
            rescale<D>(o[mt], corr_lo, corr_hi);
        }

        // o = o·corr + p·v. One ldmatrix.x4.trans gives the B fragments of head-dimension tiles
        // j and j + 1 for 16 keys: matrices (keys lo, j), (keys hi, j), (keys lo, j + 1), (keys
        // hi, j + 1), each 8 keys (rows of v) × 8 dimensions.
#pragma unroll
        for (int j = 0; j < D / 8; j += 2) {
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk) {
                uint32_t b[4];
                ldmatrix_x4_trans(b, vt + (kk * 16 + (mat % 2) * 8 + mat_row) * LD + (j + mat / 2) * 8);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_m16n8k16<T>(o[mt][j], p[mt][kk], b);
                    mma_m16n8k16<T>(o[mt][j + 1], p[mt][kk], b + 2);
                }
            }
        }
    }
    cp_async_wait<0>();  // the last commit was empty; none outlives the block

#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        store_rows<T, D>(out, layout.out_row, o[mt], rows[mt], row0 + 16 * mt, n, addend ? addend + at.out : nullptr,
                         layout.weight);
}

}  // namespace

// flash_attention2_*: 8 warps of 16 rows (every head dimension); flash_attention2w_*: 4 warps
// of 32 rows (up to 64).
#define FLASH_ATTENTION2(NAME, T, D)                                                                              \
    extern "C" __global__ void __launch_bounds__(256)                                                             \
        flash_attention2_##NAME##_d##D(const T* q, const T* k, const T* v, T* out, const T* addend, int n, int m, \
                           float scale, AttentionLayout layout) {                                                 \
        flash_attention2<T, D, 1>(q, k, v, out, addend, n, m, scale, layout);                                     \
    }
#define FLASH_ATTENTION2_WIDE(NAME, T, D)                                                                         \
    extern "C" __global__ void __launch_bounds__(128)                                                             \
        flash_attention2w_##NAME##_d##D(const T* q, const T* k, const T* v, T* out, const T* addend, int n, int m, \
                           float scale, AttentionLayout layout) {                                                 \
        flash_attention2<T, D, 2>(q, k, v, out, addend, n, m, scale, layout);                                     \
    }

FLASH_ATTENTION2(f16, __half, 16)
FLASH_ATTENTION2(f16, __half, 32)
FLASH_ATTENTION2(f16, __half, 64)
FLASH_ATTENTION2(f16, __half, 128)
FLASH_ATTENTION2(bf16, __nv_bfloat16, 16)
FLASH_ATTENTION2(bf16, __nv_bfloat16, 32)
FLASH_ATTENTION2(bf16, __nv_bfloat16, 64)
FLASH_ATTENTION2(bf16, __nv_bfloat16, 128)
FLASH_ATTENTION2_WIDE(f16, __half, 16)
FLASH_ATTENTION2_WIDE(f16, __half, 32)
FLASH_ATTENTION2_WIDE(f16, __half, 64)
FLASH_ATTENTION2_WIDE(bf16, __nv_bfloat16, 16)
FLASH_ATTENTION2_WIDE(bf16, __nv_bfloat16, 32)
FLASH_ATTENTION2_WIDE(bf16, __nv_bfloat16, 64)
