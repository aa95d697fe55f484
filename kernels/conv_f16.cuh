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

// conv_dwpw_f16_*: a depthwise k×k conv and the 1×1 conv of its output in one launch. ConvF16Params'
// fields first, in its order, as the pointwise GEMM sees them (k = 1, cin = the depthwise channels;
// x, h, w, stride, pad are the depthwise conv's input and geometry), so conv_f16_igemm serves both;
// then the depthwise conv's own.
struct DwPwF16Params {
    const unsigned short* x;         // [n][h][w][cin] f16: the depthwise conv's input
    const unsigned short* wt;        // pointwise [cout][cin] f16
    const float* bias;               // pointwise [cout] f32
    const unsigned short* residual;  // [n][oh][ow][cout] f16, or null
    unsigned short* y;               // [n][oh][ow][out_ctot] f16, written at channels out_coff..out_coff+cout
    int n, h, w, cin;
    int oh, ow, cout, k;             // k = 1
    int stride, pad, out_ctot, out_coff;
    int act;
    float slope;
    float* ws;                       // split-K partials, as ConvF16Params'
    int splits, kt_per_split;
    const unsigned short* wdw;       // [kdw][kdw][cin] f16
    const float* bdw;                // [cin] f32
    int kdw, act_dw;
    float slope_dw;
    int pad0;
};

// conv_ex_f16_*: ConvF16Params' fields first, in its order (so conv_f16_igemm serves it), then the
// f32 conv_ex family's fused epilogue: channels co < split go to y (out_ctot, out_coff, act), then,
// with `up` set, get + up[nearest pixel][co] (the FPN lateral's upsample-add); channels co >= split
// go to y2 (out_ctot2, out_coff2, act2) at co − split (two convs of one input as one GEMM).
struct ConvExF16Params {
    const unsigned short* x;         // [n][h][w][cin] f16
    const unsigned short* wt;        // [cout][k][k][cin] f16: split rows of y's conv, then y2's
    const float* bias;               // [cout] f32
    const unsigned short* residual;  // [n][oh][ow][cout] f16, or null (split == cout only)
    unsigned short* y;               // [n][oh][ow][out_ctot] f16, channels 0..split at out_coff
    int n, h, w, cin;
    int oh, ow, cout, k;
    int stride, pad, out_ctot, out_coff;
    int act;
    float slope;
    float* ws;                       // split-K partials, as ConvF16Params'
    int splits, kt_per_split;
    unsigned short* y2;              // [n][oh][ow][out_ctot2] f16, channels split..cout; null if split == cout
    const unsigned short* up;        // [n][uh][uw][split] f16, or null
    int split, out_ctot2, out_coff2, act2;
    float slope2;
    int uh, uw;
    int pad0;
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
