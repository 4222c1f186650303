// A group's mean and 1/σ from group_stats's sums (group_norm.cu): what the group norm's apply
// pass and a convolution's channels-last copy that normalises on the way (conv_igemm.cu) share.
#pragma once

// sums[2·group .. 2·group + 1] = [Σ(x − shift), Σ(x − shift)²] over group_len elements, shift =
// the group's first element.
struct GroupMoments {
    float mean, rstd;
};

__device__ __forceinline__ GroupMoments group_moments(const double* sums, size_t group, size_t group_len, float shift,
                                                      float eps) {
    const double n = (double)group_len;
    const double mean_shifted = sums[2 * group] / n;
    const double var = fmax(sums[2 * group + 1] / n - mean_shifted * mean_shifted, 0.0);
    return GroupMoments{(float)mean_shifted + shift, rsqrtf((float)var + eps)};
}

// SiLU as the group norm applies it.
__device__ __forceinline__ float group_norm_silu(float v) { return v / (1.f + __expf(-v)); }
