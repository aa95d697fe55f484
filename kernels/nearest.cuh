// nearest.cuh — PyTorch's `nearest` source index with an explicit output size, shared by the
// upsample-add kernel and the FPN lateral conv's fused epilogue (kernels/conv.cu), so both take the
// same source pixel as src/cpu/ops.rs::nearest_index.
//   sy = min(floor(dy · (float(sh) / float(dh))), sh − 1), the scale rounded to f32 first, as torch's
//   upsample_nearest computes it. One rounded division and one rounded multiply: no FMA can form,
//   so the GPU's index equals the CPU's.
#pragma once

__device__ __forceinline__ int nearest_src(int d, int in, int out) {
    const float scale = __fdiv_rn((float)in, (float)out);
    const int s = (int)floorf(__fmul_rn((float)d, scale));
    return min(s, in - 1);
}
