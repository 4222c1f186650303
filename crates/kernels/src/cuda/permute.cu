// `x.permute(dims).contiguous()` on CUDA for the UNet's layout changes (frames ↔ video, channels
// ↔ tokens, heads split and merged): candle's strided copy works out every element's source
// through device arrays of dims and strides, one element per thread. The launcher (permute.rs)
// first merges the axes that stay adjacent; then one of two kernels moves the data:
//
// * permute_blocks: the innermost axis stays innermost, so rows of `inner` contiguous elements
//   move whole, as 16-, 4- or 2-byte words (the widest that divides the row and the pointers);
// * permute_tiles: the innermost axis moves. 32×32 tiles of the input's innermost axis (I) and
//   the output's innermost axis (J) go through shared memory: reads along I and writes along J
//   are both coalesced. Every other axis is a batch axis, walked by blockIdx.z.
//
// Data are moved as raw words (the kernels never look at the values), so one instance per word
// size serves every dtype.

#include <stdint.h>

#include "permute.cuh"

namespace {

// Grid-stride over the output's words. I: the index type, 32-bit where the tensor allows it
// (the launcher's choice): a 64-bit division costs several times a 32-bit one, and this loop
// divides per word.
template <typename W, typename I>
__device__ void permute_blocks(const W* __restrict__ in, W* __restrict__ out, Blocks b, I inner, I total) {
    for (I i = (I)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (I)gridDim.x * blockDim.x) {
        I row = i / inner, source = i % inner;
        // Unrolled over the fixed bound so the parameter arrays are indexed statically (a dynamic
        // index would copy them to local memory).
#pragma unroll
        for (int k = 0; k < PERMUTE_MAX_RANK; ++k) {
            const int d = PERMUTE_MAX_RANK - 1 - k;
            if (d < b.rank) {
                const I dim = (I)b.dims[d];
                source += (row % dim) * (I)b.in_strides[d];
                row /= dim;
            }
        }
        out[i] = in[source];
    }
}

// Grid: (ceil(ni / 32), ceil(nj / 32), min(batches, 65535)); block (32, 8).
template <typename W>
__device__ void permute_tiles(const W* __restrict__ in, W* __restrict__ out, Tiles t, int64_t batches) {
    __shared__ W tile[32][33];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int64_t i0 = (int64_t)blockIdx.x * 32, j0 = (int64_t)blockIdx.y * 32;
    for (int64_t batch = blockIdx.z; batch < batches; batch += gridDim.z) {
        int64_t in_base, out_base;
        tile_bases(t, batch, in_base, out_base);
        __syncthreads();  // the previous batch's tile has been written out
        for (int j = ty; j < 32; j += 8) {
            if (i0 + tx < t.ni && j0 + j < t.nj) tile[j][tx] = in[in_base + (j0 + j) * t.in_stride_j + i0 + tx];
        }
        __syncthreads();
        for (int i = ty; i < 32; i += 8) {
            if (i0 + i < t.ni && j0 + tx < t.nj) out[out_base + (i0 + i) * t.out_stride_i + j0 + tx] = tile[tx][i];
        }
    }
}

}  // namespace

#define PERMUTE_BLOCKS(NAME, W)                                                                                \
    extern "C" __global__ void permute_blocks_##NAME(const W* in, W* out, Blocks b, int64_t inner, int64_t total) { \
        permute_blocks<W, int64_t>(in, out, b, inner, total);                                                 \
    }                                                                                                          \
    extern "C" __global__ void permute_blocks_##NAME##_i32(const W* in, W* out, Blocks b, uint32_t inner,     \
                                                           uint32_t total) {                                  \
        permute_blocks<W, uint32_t>(in, out, b, inner, total);                                                \
    }
#define PERMUTE_TILES(NAME, W)                                                                                 \
    extern "C" __global__ void permute_tiles_##NAME(const W* in, W* out, Tiles t, int64_t batches) {           \
        permute_tiles(in, out, t, batches);                                                                    \
    }

PERMUTE_BLOCKS(b16, uint16_t)
PERMUTE_BLOCKS(b32, uint32_t)
PERMUTE_BLOCKS(b128, uint4)
PERMUTE_TILES(b16, uint16_t)
PERMUTE_TILES(b32, uint32_t)
