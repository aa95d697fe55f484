// heads.cu — the class, box and landmark heads of one pyramid level in one kernel: the 1×1 conv to
// 32 channels (per anchor j ∈ {0, 1}: logits 2j..2j+2, box 4+4j.., landmarks 12+10j..), the softmax
// over each anchor's two logits (PyTorch's exp(x − max) / Σ), written straight into the final
// [n][A][d] layout at this level's anchor offset (anchor = base + (y·w + x)·2 + j). No 32-channel
// intermediate tensor and no permute/concat copies. These raw outputs serve `forward` and
// `--forward-only`; the detect path runs heads_fused (below), which also thresholds and decodes.
//
// Layout: x [n][h][w][c] NHWC f32; w [c][32]; loc [n][A][4], conf [n][A][2], landm [n][A][10].
// Launch: one warp per pixel, lane = output channel; 256 threads (8 pixels) per block,
//   grid = ceil(n·h·w / 8). A warp reads the pixel's c inputs as broadcasts and w rows coalesced;
//   the logit pairs meet through one __shfl_xor_sync. The pixel guard is warp-uniform.
//   Per anchor pair the 32 results are contiguous runs of 4, 8 and 20 floats: coalesced stores.
// Cost: 64·c FLOPs per pixel; reads c·4 B of x (+ w, cached), writes 128 B per pixel.
#include "common.cuh"
#include "mma.cuh"
#include "candidates.cuh"

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

// heads_fused, heads_fused_f16 — the detect path's heads: heads_level's 1×1 conv and softmax, then
// the score threshold and the decoding of the anchors above it, for all three levels in one launch, so
// post-processing reads candidates, not raw outputs. Per anchor a (= level base + (y·w + x)·2 + j) of
// image b:
//   keys[b][a] = ~bits(score) when score > threshold, else NOT_CANDIDATE (dense: every anchor written,
//     in anchor order, so the radix sort's first pass, RadixParams.dense, compacts them stably and
//     equal scores stay in anchor order as in the CPU's stable sort);
//   rows[b][a][15] = x1 y1 x2 y2, score, 5 landmark (x, y), in pixels of the original image (÷ resize[b],
//     read from the device): candidates only.
// The values are bit-exact with heads_level followed by decode_sorted (and src/post/decode.rs): the same
// conv sums and softmax, the prior from candidates.cuh, the decode in the reference's order with the
// *_rn intrinsics (no FMA contraction).
// Layout: level l's x [n][h_l][w_l][cs_l] f32 (heads_fused) or f16 (heads_fused_f16), the first c_l
//   channels real; w [c_l][32]; keys [n][A] u32; rows [n][A][15] f32 (the post family's dets buffer,
//   dead until NMS).
// Launch: one warp per pixel of the three levels (level-major, then image, then pixel; the level's
//   pointers and sizes picked per warp by selects), lane = output channel, 256 threads (8 pixels) per
//   block, grid = ceil(n·Σ h_l·w_l / 8). After the conv, lane 4 + 4j + t (box coordinate t) pairs with
//   lane ^ 2 (the other loc value its corner needs), the scores are broadcast from lanes 1 and 3; the
//   shuffles come before the only divergent exit (a non-candidate's lanes).
// Cost: 64·c FLOPs per pixel + ~10 per decoded value; reads c·4 B (c·2 B in f16) of x per pixel,
//   writes 8 B of keys per pixel and 60 B per candidate anchor (heads_level writes 128 B per pixel and
//   the post family read them back).
struct HeadFusedParams {
    const void *x0, *x1, *x2;            // level l: [n][h_l][w_l][cs_l], f32 or f16
    const float *wt0, *wt1, *wt2;        // level l: [c_l][32]
    const float *bias0, *bias1, *bias2;  // level l: [32]
    const float* resize;                 // [n]: the factor each image was resized by before the network
    unsigned* keys;                      // [n][A]
    float* rows;                         // [n][A][15]
    int n, num_anchors, img_h, img_w;    // img: the network input (the priors' and the decode's size)
    int h0, w0, c0, cs0;
    int h1, w1, c1, cs1;
    int h2, w2, c2, cs2;
    float threshold;
    int pad0;
};

// Lane `lane` holds output channel `lane` (bias added) of pixel `local` (of a w-wide map) of level l,
// whose anchors start at `base`, of image b.
__device__ __forceinline__ void heads_fused_store(float v, int lane, int b, int local, int l, int w, int base,
                                                  const HeadFusedParams& p) {
    // The softmax exactly as heads_store computes it (meaningful on lanes 0..3).
    const float other = __shfl_xor_sync(0xffffffffu, v, 1);
    const float l0 = (lane & 1) ? other : v, l1 = (lane & 1) ? v : other;
    const float m = fmaxf(l0, l1);
    const float e0 = expf(l0 - m), e1 = expf(l1 - m);
    const float s = e0 + e1;
    const float prob = ((lane & 1) ? e1 : e0) / s;
    const float s0 = __shfl_sync(0xffffffffu, prob, 1), s1 = __shfl_sync(0xffffffffu, prob, 3);
    const float pair = __shfl_xor_sync(0xffffffffu, v, 2);
    // This lane's anchor j and column of the 15-float row.
    int j, col;
    if (lane < 4) {
        j = lane >> 1;
        col = 4;
    } else if (lane < 12) {
        j = (lane - 4) >> 2;
        col = (lane - 4) & 3;
    } else {
        j = (lane - 12) / 10;
        col = 5 + (lane - 12) % 10;
    }
    const float score = j ? s1 : s0;
    const long long a = (long long)b * p.num_anchors + base + (long long)local * 2 + j;
    const bool cand = score > p.threshold;
    if (lane == 0 || lane == 2) p.keys[a] = cand ? ~__float_as_uint(score) : NOT_CANDIDATE;
    if (!cand || lane == 0 || lane == 2) return;
    float pr[4];
    prior_at(l, local / w, local % w, j, p.img_h, p.img_w, pr);
    const float W = (float)p.img_w, H = (float)p.img_h, resize = p.resize[b];
    float out = score;
    if (lane >= 4) {
        // ax: 0 for x (prior cx, w; scaled by W), 1 for y (cy, h; by H). Selects, not pr[ax]: a runtime
        // index would put pr in local memory.
        int ax;
        float q;
        if (lane < 12) {
            // Corner t of the box: t < 2 is (cx, cy) − size/2 from (loc t, loc t+2); t ≥ 2 adds the size
            // to that corner, from (loc t−2, loc t), as src/post/decode.rs orders it.
            const int t = col;
            ax = t & 1;
            const float c = t < 2 ? v : pair, e = t < 2 ? pair : v;
            const float pc = ax ? pr[1] : pr[0], ps = ax ? pr[3] : pr[2];
            const float ctr = __fadd_rn(pc, __fmul_rn(__fmul_rn(c, 0.1f), ps));
            const float sz = __fmul_rn(ps, expf(__fmul_rn(e, 0.2f)));
            const float c1 = __fsub_rn(ctr, __fdiv_rn(sz, 2.0f));
            q = t < 2 ? c1 : __fadd_rn(sz, c1);
        } else {
            ax = (col - 5) & 1;
            q = __fadd_rn(ax ? pr[1] : pr[0], __fmul_rn(__fmul_rn(v, 0.1f), ax ? pr[3] : pr[2]));
        }
        out = __fdiv_rn(__fmul_rn(q, ax ? H : W), resize);
    }
    p.rows[a * 15 + col] = out;
}

__device__ __forceinline__ float head_in(const float* x, int i) { return x[i]; }
__device__ __forceinline__ float head_in(const unsigned short* x, int i) { return half_to_float(x[i]); }

// The body of heads_fused (T = float) and heads_fused_f16 (T = unsigned short, f16 bits).
template <typename T>
__device__ __forceinline__ void heads_fused_body(const HeadFusedParams& p) {
    const int lane = threadIdx.x & 31;
    long long g = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const long long p0 = (long long)p.h0 * p.w0, p1 = (long long)p.h1 * p.w1, p2 = (long long)p.h2 * p.w2;
    const long long t0 = p.n * p0, t1 = p.n * p1;
    if (g >= t0 + t1 + p.n * p2) return;  // whole warp leaves together
    // The warp's level (uniform over the warp) and its sizes, by selects.
    const int l = g < t0 ? 0 : g < t0 + t1 ? 1 : 2;
    g -= l == 0 ? 0 : l == 1 ? t0 : t0 + t1;
    const long long hw = l == 0 ? p0 : l == 1 ? p1 : p2;
    const int w = l == 0 ? p.w0 : l == 1 ? p.w1 : p.w2;
    const int c = l == 0 ? p.c0 : l == 1 ? p.c1 : p.c2;
    const int cs = l == 0 ? p.cs0 : l == 1 ? p.cs1 : p.cs2;
    const int base = l == 0 ? 0 : l == 1 ? (int)(2 * p0) : (int)(2 * (p0 + p1));
    const T* xr = (const T*)(l == 0 ? p.x0 : l == 1 ? p.x1 : p.x2) + g * cs;
    const float* wt = l == 0 ? p.wt0 : l == 1 ? p.wt1 : p.wt2;
    const float* bias = l == 0 ? p.bias0 : l == 1 ? p.bias1 : p.bias2;
    float acc = 0.0f;
    for (int ci = 0; ci < c; ++ci) acc = fmaf(head_in(xr, ci), wt[ci * 32 + lane], acc);
    heads_fused_store(acc + bias[lane], lane, (int)(g / hw), (int)(g % hw), l, w, base, p);
}

extern "C" __global__ void __launch_bounds__(256) heads_fused(const HeadFusedParams p) {
    heads_fused_body<float>(p);
}

extern "C" __global__ void __launch_bounds__(256) heads_fused_f16(const HeadFusedParams p) {
    heads_fused_body<unsigned short>(p);
}

// heads_gather: the sorted candidates' rows, in score order, into the split arrays the NMS kernels
// read (boxes [n][A][4], scores [n][A], landmarks [n][A][10]; the post family's cand buffer), replacing
// decode_sorted on the fused path. Grid (ceil(k/128), n), 128 threads, one per kept candidate:
// 60 B read, 60 B written.
struct HeadGatherParams {
    const int* order;    // [n][A]: anchor indices, best first; the first kept[i] are used
    const int* kept;     // [n]
    const float* rows;   // [n][A][15]
    float* boxes;        // [n][A][4]
    float* scores;       // [n][A]
    float* lands;        // [n][A][10]
    int n, num_anchors;
};

extern "C" __global__ void __launch_bounds__(128) heads_gather(const HeadGatherParams p) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    const int img = blockIdx.y;
    if (r >= p.kept[img]) return;
    const long long o = (long long)img * p.num_anchors + r;
    const float* s = p.rows + ((long long)img * p.num_anchors + p.order[o]) * 15;
    for (int q = 0; q < 4; ++q) p.boxes[o * 4 + q] = s[q];
    p.scores[o] = s[4];
    for (int q = 0; q < 10; ++q) p.lands[o * 10 + q] = s[5 + q];
}
