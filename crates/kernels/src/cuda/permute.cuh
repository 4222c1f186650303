// The launch parameters of permute.cu, passed by value (permute.rs mirrors them, #[repr(C)]).
#pragma once

#include <cuda_fp16.h>  // nothing of it is used; under the CPU emulator it is the emulator's prelude
#include <stdint.h>

constexpr int PERMUTE_MAX_RANK = 6;

// permute_blocks: the output's axes but the innermost (rows of `inner` words): their sizes, and
// the input's stride (in words) along each.
struct Blocks {
    int32_t rank;
    int64_t dims[PERMUTE_MAX_RANK];
    int64_t in_strides[PERMUTE_MAX_RANK];
};

// permute_tiles: I (size ni, input stride 1, output stride out_stride_i), J (size nj, input
// stride in_stride_j, output stride 1), and the batch axes (every other).
struct Tiles {
    int64_t ni, nj, in_stride_j, out_stride_i;
    int32_t batch_rank;
    int64_t batch_dims[PERMUTE_MAX_RANK];
    int64_t batch_in_strides[PERMUTE_MAX_RANK];
    int64_t batch_out_strides[PERMUTE_MAX_RANK];
};

// Where batch `batch` (of the Tiles' batch axes, outermost first) starts in the input and in the
// output.
__device__ __forceinline__ void tile_bases(const Tiles& t, int64_t batch, int64_t& in_base, int64_t& out_base) {
    in_base = 0;
    out_base = 0;
    int64_t rest = batch;
#pragma unroll
    for (int k = 0; k < PERMUTE_MAX_RANK; ++k) {
        // Innermost first; unrolled over the fixed bound so the parameter arrays are indexed
        // statically (a dynamic index would copy them to local memory).
        const int d = PERMUTE_MAX_RANK - 1 - k;
        if (d < t.batch_rank) {
            const int64_t coord = rest % t.batch_dims[d];
            rest /= t.batch_dims[d];
            in_base += coord * t.batch_in_strides[d];
            out_base += coord * t.batch_out_strides[d];
        }
    }
}
