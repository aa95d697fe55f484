// common.cuh — what every kernel family shares: the launch-parameter structs (build.rs generates the
// Rust mirror of every `struct *Params` in kernels/, and a test checks each field's offset against
// C's offsetof; each kernel takes exactly one struct by value, so the host has one launch path for
// every kernel, on the GPU and in the simulation) and the fused activation.
//
// Layout (see kernels/README.md): activations are NHWC f32, i.e. [n][y][x][c] with c contiguous.
// On Hopper the convolutions are implicit GEMMs whose reduction dimension (ky, kx, ci) is contiguous
// in ci, so a warp's loads of one pixel's channels are coalesced, and the same layout feeds the
// tensor-core (mma/wgmma) path, which wants K-contiguous tiles.
//
// Pointers are plain 64-bit device addresses (host addresses in the simulation). Every struct is a
// multiple of 8 bytes with no implicit padding, so the Rust mirror can be a byte-exact Pod.
#pragma once

#include "constants.cuh"

// The CPU reference's Act::apply: LeakyReLU (slope 0 is ReLU), ReLU6 as clamp(0, 6), or identity.
__device__ __forceinline__ float apply_act(float v, int act, float slope) {
    if (act == ACT_LEAKY) return v >= 0.0f ? v : v * slope;
    if (act == ACT_RELU6) return fminf(fmaxf(v, 0.0f), 6.0f);
    return v;
}

struct PreprocessParams {
    const unsigned char* src;  // [n][h][w][3] BGR u8 (OpenCV's HWC order)
    float* dst;                // [n][h][w][3] f32, minus the means
    int total;                 // n·h·w·3
    int pad0;
};

struct ConvParams {
    const float* x;         // [n][h][w][cin]
    const float* wt;        // groups 1: [k][k][cin][cout]; depthwise: [k][k][c]
    const float* bias;      // [cout]
    const float* residual;  // [n][oh][ow][cout] or null
    float* y;               // [n][oh][ow][out_ctot], written at channels out_coff..out_coff+cout
    int n, h, w, cin;
    int oh, ow, cout, k;
    int stride, pad, out_ctot, out_coff;
    int act;
    float slope;
};

struct PoolParams {
    const float* x;  // [n][h][w][c]
    float* y;        // [n][oh][ow][c]
    int n, h, w, c;
    int oh, ow;
};

struct UpsampleAddParams {
    const float* src;  // [n][sh][sw][c]
    float* dst;        // [n][dh][dw][c], dst += nearest(src)
    int n, sh, sw, dh;
    int dw, c;
};

struct HeadParams {
    const float* x;     // [n][h][w][c] (the level's SSH output)
    const float* wt;    // [c][32]
    const float* bias;  // [32]
    float* loc;         // [n][A][4]
    float* conf;        // [n][A][2], softmaxed
    float* landm;       // [n][A][10]
    int n, h, w, c;
    int anchor_base, num_anchors;
};
