// A group's mean and 1/σ from group_stats's sums (group_norm.cu): what the group norm's apply
// pass and a convolution's channels-last copy that normalises on the way (conv_igemm.cu) share.
#pragma once

#include <stdint.h>

// sums[2·group .. 2·group + 1] = [Σ(x − shift), Σ(x − shift)²] over group_len elements, shift =
// the group's first element.
struct GroupMoments {
    float mean, rstd;
};

// Where a group's elements lie: `runs` runs of `run_len` contiguous elements, run r of group
// (sample, g) starting at sample·sample_stride + g·group_stride + r·run_stride. A contiguous
// (n, c, s) tensor has one run per group (run_len = group_stride = cpg·s, sample_stride = c·s);
// frames (n·t, c, s), normalised as the video (n, c, t, s) they are, have t (run_stride = c·s,
// sample_stride = t·c·s). cuda/mod.rs mirrors it (#[repr(C)]).
struct GroupRuns {
    int64_t run_len, sample_stride, group_stride, run_stride;
    int32_t runs, groups;  // runs per group, groups per sample
};

// Where group `group` (sample · groups + g) starts: its first run's first element, the shift of
// its sums.
__device__ __forceinline__ int64_t group_start(const GroupRuns& r, int64_t group) {
    return group / r.groups * r.sample_stride + group % r.groups * r.group_stride;
}

__device__ __forceinline__ GroupMoments group_moments(const double* sums, size_t group, size_t group_len, float shift,
                                                      float eps) {
    const double n = (double)group_len;
    const double mean_shifted = sums[2 * group] / n;
    const double var = fmax(sums[2 * group + 1] / n - mean_shifted * mean_shifted, 0.0);
    return GroupMoments{(float)mean_shifted + shift, rsqrtf((float)var + eps)};
}

// SiLU as the group norm applies it.
__device__ __forceinline__ float group_norm_silu(float v) { return v / (1.f + __expf(-v)); }
