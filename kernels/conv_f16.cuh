// conv_f16.cuh — the launch parameters of the f16 tensor-core convolutions (kernels/conv_f16.cu),
// mirrored field for field by ConvF16Params in src/cuda/params.rs. Same field order as ConvParams
// (common.cuh), with f16 activations stored as raw 16-bit words (no cuda_fp16.h needed).
#pragma once

struct ConvF16Params {
    const unsigned short* x;         // [n][h][w][cin] f16, cin a multiple of 8 (padded channels are 0)
    const unsigned short* wt;        // groups 1: [cout][k][k][cin] f16 (K = k·k·cin contiguous); dw: [k][k][c]
    const float* bias;               // [cout] f32
    const unsigned short* residual;  // [n][oh][ow][cout] f16, or null
    unsigned short* y;               // [n][oh][ow][out_ctot] f16, written at channels out_coff..out_coff+cout
    int n, h, w, cin;
    int oh, ow, cout, k;
    int stride, pad, out_ctot, out_coff;
    int act;
    float slope;
    // Split-K (ws non-null): block z of gridDim.z sums k-tiles [z·kt_per_split, (z+1)·kt_per_split) and
    // stores raw f32 partial sums to ws [splits][n·oh·ow][cout]; conv_f16_splitk_reduce adds them in z
    // order and applies the epilogue. ws null: one pass, epilogue fused.
    float* ws;
    int splits, kt_per_split;
};

// kernels/net_f16.cu: the f16 network's other ops, 8 channels (16 bytes) per thread.
struct PreprocessF16Params {
    const unsigned char* src;  // [pixels][3] BGR u8
    unsigned short* dst;       // [pixels][8] f16: B, G, R minus the means, then 5 zero channels
    int pixels;
    int pad0;
};

struct PoolF16Params {
    const unsigned short* x;  // [n][h][w][c] f16, c % 8 == 0
    unsigned short* y;        // [n][oh][ow][c]
    int n, h, w, c;
    int oh, ow;
};

struct UpsampleAddF16Params {
    const unsigned short* src;  // [n][sh][sw][c] f16, c % 8 == 0
    unsigned short* dst;        // [n][dh][dw][c], dst = f16(dst + nearest(src))
    int n, sh, sw, dh;
    int dw, c;
};
