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
