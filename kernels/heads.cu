// heads.cu — the class, box and landmark heads of one pyramid level in one kernel: the 1×1 conv to
// 32 channels (per anchor j ∈ {0, 1}: logits 2j..2j+2, box 4+4j.., landmarks 12+10j..), the softmax
// over each anchor's two logits (PyTorch's exp(x − max) / Σ), written straight into the final
// [n][A][d] layout at this level's anchor offset (anchor = base + (y·w + x)·2 + j). No 32-channel
// intermediate tensor and no permute/concat copies.
//
// Layout: x [n][h][w][c] NHWC f32; w [c][32]; loc [n][A][4], conf [n][A][2], landm [n][A][10].
// Launch: one warp per pixel, lane = output channel; 256 threads (8 pixels) per block,
//   grid = ceil(n·h·w / 8). A warp reads the pixel's c inputs as broadcasts and w rows coalesced;
//   the logit pairs meet through one __shfl_xor_sync. The pixel guard is warp-uniform.
//   Per anchor pair the 32 results are contiguous runs of 4, 8 and 20 floats: coalesced stores.
// Cost: 64·c FLOPs per pixel; reads c·4 B of x (+ w, cached), writes 128 B per pixel.
#include "common.cuh"
#include "mma.cuh"

// The head outputs of one pixel: lane v is output channel `lane` (bias added) of pixel `local` of image
// b; the softmax pairs logits across lanes 2j, 2j + 1.
__device__ __forceinline__ void heads_store(float v, int lane, int b, int local, int anchor_base, int num_anchors,
                                            float* loc, float* conf, float* landm) {
    const float other = __shfl_xor_sync(0xffffffffu, v, 1);
    const long long a0 = (long long)b * num_anchors + anchor_base + (long long)local * 2;
    if (lane < 4) {
        // Lane 2j + t holds logit t of anchor j; its partner lane holds the other logit.
        const float l0 = (lane & 1) ? other : v, l1 = (lane & 1) ? v : other;
        const float m = fmaxf(l0, l1);
        const float e0 = expf(l0 - m), e1 = expf(l1 - m);
        const float s = e0 + e1;
        conf[a0 * 2 + lane] = ((lane & 1) ? e1 : e0) / s;
    } else if (lane < 12) {
        loc[a0 * 4 + (lane - 4)] = v;
    } else {
        landm[a0 * 10 + (lane - 12)] = v;
    }
}

extern "C" __global__ void __launch_bounds__(256) heads_level(const HeadParams p) {
    const int lane = threadIdx.x & 31;
    const long long pix = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const long long hw = (long long)p.h * p.w;
    if (pix >= (long long)p.n * hw) return;  // whole warp leaves together
    const float* xr = p.x + pix * p.c;
    float acc = 0.0f;
    for (int ci = 0; ci < p.c; ++ci) acc = fmaf(xr[ci], p.wt[ci * 32 + lane], acc);
    heads_store(acc + p.bias[lane], lane, (int)(pix / hw), (int)(pix % hw), p.anchor_base, p.num_anchors, p.loc,
                p.conf, p.landm);
}

// heads_level_f16: heads_level on the f16 path's SSH output (x [n][h][w][cstride] f16, the first c
// channels real, cstride = c padded to 8). Same weights, f32 products and sums in the same order, same
// f32 outputs, so post-processing is the f32 path's. Launch and cost as heads_level, reading c·2 B of x.
struct HeadF16Params {
    const unsigned short* x;  // [n][h][w][cstride] f16
    const float* wt;          // [c][32]
    const float* bias;        // [32]
    float* loc;               // [n][A][4]
    float* conf;              // [n][A][2], softmaxed
    float* landm;             // [n][A][10]
    int n, h, w, c;
    int cstride, anchor_base, num_anchors, pad0;
};

extern "C" __global__ void __launch_bounds__(256) heads_level_f16(const HeadF16Params p) {
    const int lane = threadIdx.x & 31;
    const long long pix = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const long long hw = (long long)p.h * p.w;
    if (pix >= (long long)p.n * hw) return;  // whole warp leaves together
    const unsigned short* xr = p.x + pix * p.cstride;
    float acc = 0.0f;
    for (int ci = 0; ci < p.c; ++ci) acc = fmaf(half_to_float(xr[ci]), p.wt[ci * 32 + lane], acc);
    heads_store(acc + p.bias[lane], lane, (int)(pix / hw), (int)(pix % hw), p.anchor_base, p.num_anchors, p.loc,
                p.conf, p.landm);
}
