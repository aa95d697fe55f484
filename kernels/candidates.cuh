// candidates.cuh — what the fused heads kernel (kernels/heads.cu heads_fused) and the post family
// (kernels/post.cu) share about candidates: the prior of an anchor, computed as src/post/anchors.rs
// computes it (f64 as the reference's Python, rounded to f32; the *_rn intrinsics keep the GPU's
// rounding the CPU's), and the key of an anchor that is not a candidate.
#pragma once

#include "constants.cuh"

// A candidate's sort key is ~bits(score) with score > threshold ≥ 0, so never all ones: all ones marks
// an anchor under the threshold in the fused kernel's dense [n][A] keys.
#define NOT_CANDIDATE 0xffffffffu

// The prior (cx, cy, w, h) of anchor size j at feature-map cell (row, col) of level l (stride
// PRIOR_STEPS[l]) for an h×w network input.
// The tables are read with constant indices only (selects, not a runtime index), so they stay
// immediates: a runtime index would put them in local memory (a stack frame in every thread).
__device__ __forceinline__ void prior_at(int l, int row, int col, int j, int h, int w, float pr[4]) {
    const int steps[3] = PRIOR_STEPS;
    const int sizes[3][2] = PRIOR_MIN_SIZES;
    const int st = l == 0 ? steps[0] : l == 1 ? steps[1] : steps[2];
    const int m0 = l == 0 ? sizes[0][0] : l == 1 ? sizes[1][0] : sizes[2][0];
    const int m1 = l == 0 ? sizes[0][1] : l == 1 ? sizes[1][1] : sizes[2][1];
    const double s = (double)st, ms = (double)(j ? m1 : m0);
    pr[0] = (float)__ddiv_rn(__dmul_rn(__dadd_rn((double)col, 0.5), s), (double)w);
    pr[1] = (float)__ddiv_rn(__dmul_rn(__dadd_rn((double)row, 0.5), s), (double)h);
    pr[2] = (float)__ddiv_rn(ms, (double)w);
    pr[3] = (float)__ddiv_rn(ms, (double)h);
}
