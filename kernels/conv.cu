// conv.cu — the convolution family, BatchNorm already folded into weight and bias, with the epilogue
// fused: y[.., out_coff + co] = act(conv(x, w)[co] + bias[co] (+ residual[co])). The channel offset
// lets the SSH branches write their slices of one buffer (no concat copy); the residual is added
// before the activation (ResNet, MobileNetV2 shortcuts), in the CPU reference's order.
//
// Layout: x [n][h][w][cin], y [n][oh][ow][out_ctot], residual [n][oh][ow][cout] (NHWC f32).
//
// conv1x1 / conv3x3 / conv_kxk (groups 1): implicit GEMM. M = n·oh·ow output pixels (the batch is
//   folded into M), N = cout, K = k·k·cin ordered (ky, kx, ci), weights [K][cout] (host repacks
//   OIHW → HWIO). A block computes a 64×64 (pixel × channel) tile with 256 threads, each a 4×4 micro-
//   tile (pixels ty + 16i, channels tx + 16j: conflict-free shared reads); K advances 16 at a time
//   through shared memory (A gathered on the fly from x with zero padding, ci contiguous so a warp's
//   loads coalesce; B rows of w coalesced over cout). The 3×3 and 1×1 entry points fix k at compile
//   time so the (ky, kx, ci) decomposition folds; the 7×7 stem uses the runtime-k entry.
//   Launch: grid (ceil(M/64), ceil(cout/64)), block 256. Shared: 2·16·64·4 B = 8 KiB.
//   Cost: 2·M·cout·K FLOPs; reads M·K·4 B of x per 64 output channels (L2 absorbs the k² reuse),
//   K·cout·4 B of w per 64 pixels, writes M·cout·4 B.
//   The f16 path replaces the inner 16-step loop by mma.sync m16n8k16 on the same tiles.
//
// conv1x1_ex / conv3x3_ex (ConvExParams): the same implicit GEMM with a fused epilogue of two
//   destinations and an upsample-add. Channels co < split go to y (out_ctot, out_coff, act), then,
//   when `up` is set, get + up[nearest pixel][co] after the activation (the FPN lateral with the
//   top-down merge: the finer map is written once, never re-read); channels co >= split go to y2
//   (out_ctot2, out_coff2, act2) at co − split (SSH's conv3X3 and conv5X5_1 as one GEMM over
//   split + cout2 channels, reading the input once). Weights [K][cout] with both convs' columns side
//   by side. Launch and shared memory as conv1x1 / conv3x3. Cost: as the plain GEMM, plus one 4 B
//   read of `up` per output when set (instead of upsample_nearest_add's 2 reads and 1 write).
//
// conv_dwpw (DwPwParams): depthwise k×k (any stride) + pointwise 1×1 through shared memory, the
//   depthwise output never written. The pointwise conv is the GEMM above with M = n·oh·ow pixels,
//   N = cout, K = c; each K tile of A (64 pixels × 16 channels) is the depthwise conv itself, computed
//   into shared memory (bias and activation applied, in the order of conv_depthwise), then multiplied
//   by the 16 × 64 tile of pointwise weights [c][cout]. Epilogue: bias, residual (MobileNetV2's
//   shortcut), activation, store at the channel offset. Launch: grid (ceil(M/64), ceil(cout/64)),
//   block 256; shared 8 KiB. Cost: 2·M·cout·c + 2·k²·M·c·ceil(cout/64) FLOPs (the depthwise tile is
//   recomputed per 64 output channels: ≤ 15% more FLOPs at k = 3); reads M·k²·c·4 B of x (cached) per
//   64 output channels, writes M·cout·4 B, and neither writes nor re-reads the n·oh·ow·c
//   intermediate.
//
// conv_invres (InvResParams): MobileNetV2's inverted residual, expand 1×1 + act, depthwise 3×3
//   (stride 1 or 2) + act, project 1×1 + bias (+ shortcut) + act, in one launch; neither the expanded
//   (n·h·w·c) nor the depthwise (n·oh·ow·c) tensor is written. A block owns an 8×8 spatial tile of
//   one image's output pixels × 64 output channels (the project GEMM's 64×64 tile, as conv_dwpw).
//   K (the expanded channels c) advances 16 at a time: the expansion of those 16 channels over the
//   tile's input window (halo included: (7s+3)² pixels, 10×10 at s = 1, 17×17 at s = 2) is computed
//   into shared memory (cin in chunks of 64 with their weights staged; pixels outside the image are
//   the depthwise conv's zero padding, not act(bias)), the depthwise outputs of the 64 pixels are
//   made from it into the A tile, and the GEMM step multiplies by the 16 × 64 project weights.
//   Weights: wex [cin][c], wdw [3][3][c], wpw [c][cout] (conv::pack of each conv).
//   Launch: grid (n·ceil(oh/8)·ceil(ow/8), ceil(cout/64)), block 256. Shared: (17²·16 + 3·64·16)·4 B
//   = 30.1 KiB. FLOPs per tile and 64-channel column: 2·(7s+3)²·c·cin (the expansion over the
//   window: (7s+3)²/(64s²) = 1.56× the unfused expansion's at s = 1, 1.13× at s = 2) + 18·64·c
//   (depthwise) + 2·64·64·c (project); with ceil(cout/64) > 1 columns the expansion and depthwise
//   are recomputed per column. Reads x's window (cin·4 B per window pixel per column), the weights
//   and the shortcut; writes n·oh·ow·cout·4 B. The unfused block writes and re-reads the expanded
//   and depthwise tensors besides: 2·4·(h·w + oh·ow)·c B per image, which this kernel never moves.
//
// conv_depthwise (groups = cin = cout): one output element per thread, channel fastest, weights
//   [k][k][c]; summed over (ky, kx) in the CPU reference's order. Launch: 1-D over n·oh·ow·c, 256
//   threads. Cost: 2·k² FLOPs per output, k² reads (neighbouring pixels hit in L1).
#include "common.cuh"
#include "nearest.cuh"

// conv1x1_ex / conv3x3_ex: ConvParams' fields (same names, so the GEMM body serves both) and the
// fused epilogue's.
struct ConvExParams {
    const float* x;         // [n][h][w][cin]
    const float* wt;        // [k][k][cin][cout]: columns 0..split of y's conv, then y2's
    const float* bias;      // [cout]
    const float* residual;  // [n][oh][ow][cout] or null (split == cout only)
    float* y;               // [n][oh][ow][out_ctot], channels 0..split at out_coff
    float* y2;              // [n][oh][ow][out_ctot2], channels split..cout at out_coff2; null if split == cout
    const float* up;        // [n][uh][uw][split] or null: y += nearest(up) after the activation
    int n, h, w, cin;
    int oh, ow, cout, k;
    int stride, pad, out_ctot, out_coff;
    int act;
    float slope;
    int split, out_ctot2;
    int out_coff2, act2;
    float slope2;
    int uh, uw;
    int pad0;
};

// conv_dwpw: a depthwise conv's and the following 1x1 conv's fields.
struct DwPwParams {
    const float* x;         // [n][h][w][c]
    const float* wdw;       // [k][k][c]
    const float* bdw;       // [c]
    const float* wpw;       // [c][cout]
    const float* bpw;       // [cout]
    const float* residual;  // [n][oh][ow][cout] or null
    float* y;               // [n][oh][ow][out_ctot], written at channels out_coff..out_coff+cout
    int n, h, w, c;
    int oh, ow, cout, k;
    int stride, pad, out_ctot, out_coff;
    int act_dw;
    float slope_dw;
    int act;
    float slope;
};

// conv_invres: the expansion's, the depthwise conv's and the projection's fields.
struct InvResParams {
    const float* x;         // [n][h][w][cin]
    const float* wex;       // [cin][c]
    const float* bex;       // [c]
    const float* wdw;       // [3][3][c]
    const float* bdw;       // [c]
    const float* wpw;       // [c][cout]
    const float* bpw;       // [cout]
    const float* residual;  // [n][oh][ow][cout] or null
    float* y;               // [n][oh][ow][out_ctot], written at channels out_coff..out_coff+cout
    int n, h, w, cin;
    int c, oh, ow, cout;
    int stride, pad, out_ctot, out_coff;
    int tiles_y, tiles_x;   // ceil(oh/8), ceil(ow/8)
    int act_ex;
    float slope_ex;
    int act_dw;
    float slope_dw;
    int act;
    float slope;
};

#define CONV_BM 64
#define CONV_BN 64
#define CONV_BK 16

// The epilogue of one output element: m the pixel, co the channel, v the accumulated sum.
__device__ __forceinline__ void conv_store(const ConvParams& p, long long m, int co, float v) {
    v += p.bias[co];
    if (p.residual) v += p.residual[m * p.cout + co];
    p.y[m * p.out_ctot + p.out_coff + co] = apply_act(v, p.act, p.slope);
}

__device__ __forceinline__ void conv_store(const ConvExParams& p, long long m, int co, float v) {
    v += p.bias[co];
    if (p.residual) v += p.residual[m * p.cout + co];
    if (co < p.split) {
        v = apply_act(v, p.act, p.slope);
        if (p.up) {
            const int ox = (int)(m % p.ow);
            const long long r = m / p.ow;
            const int oy = (int)(r % p.oh);
            const long long b = r / p.oh;
            const int sy = nearest_src(oy, p.uh, p.oh), sx = nearest_src(ox, p.uw, p.ow);
            v += p.up[((b * p.uh + sy) * p.uw + sx) * p.split + co];
        }
        p.y[m * p.out_ctot + p.out_coff + co] = v;
    } else {
        p.y2[m * p.out_ctot2 + p.out_coff2 + (co - p.split)] = apply_act(v, p.act2, p.slope2);
    }
}

// conv_dwpw's pointwise epilogue: as conv_store of a ConvParams.
__device__ __forceinline__ void conv_store(const DwPwParams& p, long long m, int co, float v) {
    v += p.bpw[co];
    if (p.residual) v += p.residual[m * p.cout + co];
    p.y[m * p.out_ctot + p.out_coff + co] = apply_act(v, p.act, p.slope);
}

// conv_invres's projection epilogue: as conv_store of a ConvParams.
__device__ __forceinline__ void conv_store(const InvResParams& p, long long m, int co, float v) {
    v += p.bpw[co];
    if (p.residual) v += p.residual[m * p.cout + co];
    p.y[m * p.out_ctot + p.out_coff + co] = apply_act(v, p.act, p.slope);
}

// The A rows thread tid gathers: pixels m0 + tid / 16 + 16q of the 64-pixel tile, as (image, first input
// row, first input column), and whether the pixel exists.
__device__ __forceinline__ void conv_a_rows(int oh, int ow, int stride, int pad, long long M, long long m0, int tid,
                                            int (&a_b)[4], int (&a_iy0)[4], int (&a_ix0)[4], bool (&a_ok)[4]) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const long long m = m0 + tid / CONV_BK + 16 * q;
        a_ok[q] = m < M;
        const long long mm = a_ok[q] ? m : 0;
        const int ox = (int)(mm % ow);
        const long long r = mm / ow;
        const int oy = (int)(r % oh);
        a_b[q] = (int)(r / oh);
        a_iy0[q] = oy * stride - pad;
        a_ix0[q] = ox * stride - pad;
    }
}

// Loads B: CONV_BK reduction rows from k0 × CONV_BN output channels from n0 of [K][cout] weights, zero
// past either edge.
__device__ __forceinline__ void conv_load_b(float (&Bs)[CONV_BK][CONV_BN], const float* wt, int k0, int K, int n0,
                                            int cout, int tid) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const int e = tid + 256 * q;
        const int kk = e / CONV_BN, nn = e % CONV_BN;
        const int kr = k0 + kk, co = n0 + nn;
        Bs[kk][nn] = (kr < K && co < cout) ? wt[(long long)kr * cout + co] : 0.0f;
    }
}

// One CONV_BK-deep step of the 64×64 tile: thread (tx, ty) accumulates pixels ty + 16i and channels
// tx + 16j, in k order (the CPU reference's order within a tile).
__device__ __forceinline__ void conv_tile_fma(const float (&As)[CONV_BK][CONV_BM], const float (&Bs)[CONV_BK][CONV_BN],
                                              int tx, int ty, float (&acc)[4][4]) {
#pragma unroll
    for (int kk = 0; kk < CONV_BK; ++kk) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
}

// The epilogue of the tile: conv_store of each existing (pixel, channel) of this thread.
template <class P>
__device__ __forceinline__ void conv_tile_store(const P& p, long long M, long long m0, int n0, int tx, int ty,
                                                const float (&acc)[4][4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const long long m = m0 + ty + 16 * i;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int co = n0 + tx + 16 * j;
            if (co >= p.cout) continue;
            conv_store(p, m, co, acc[i][j]);
        }
    }
}

// KS > 0: kernel size fixed at compile time; KS == 0: runtime p.k. P: ConvParams or ConvExParams.
template <int KS, class P>
__device__ __forceinline__ void conv_igemm(const P& p) {
    __shared__ float As[CONV_BK][CONV_BM];
    __shared__ float Bs[CONV_BK][CONV_BN];
    const int k = KS > 0 ? KS : p.k;
    const int tid = threadIdx.x;
    const int tx = tid % 16, ty = tid / 16;
    const long long M = (long long)p.n * p.oh * p.ow;
    const int K = k * k * p.cin;
    const long long m0 = (long long)blockIdx.x * CONV_BM;
    const int n0 = blockIdx.y * CONV_BN;

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

    // The A element each thread loads: pixel am (+16 per step q), reduction index ak within the tile.
    // Thread tid loads pixels (tid / 16) + 16q and reduction column tid % 16: 16 consecutive threads
    // read 16 consecutive ci of one pixel.
    const int ak = tid % CONV_BK;
    int a_b[4], a_iy0[4], a_ix0[4];
    bool a_ok[4];
    conv_a_rows(p.oh, p.ow, p.stride, p.pad, M, m0, tid, a_b, a_iy0, a_ix0, a_ok);

    for (int k0 = 0; k0 < K; k0 += CONV_BK) {
        // Gather A: 64 pixels × 16 reduction indices.
        const int kg = k0 + ak;
        int ci = kg, ky = 0, kx = 0;
        if (k != 1) {
            ci = kg % p.cin;
            const int t = kg / p.cin;
            kx = t % k;
            ky = t / k;
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            float v = 0.0f;
            const int iy = a_iy0[q] + ky, ix = a_ix0[q] + kx;
            if (a_ok[q] && kg < K && iy >= 0 && iy < p.h && ix >= 0 && ix < p.w)
                v = p.x[(((long long)a_b[q] * p.h + iy) * p.w + ix) * p.cin + ci];
            As[ak][tid / CONV_BK + 16 * q] = v;
        }
        // Load B: 16 reduction rows × 64 output channels.
        conv_load_b(Bs, p.wt, k0, K, n0, p.cout, tid);
        __syncthreads();
        conv_tile_fma(As, Bs, tx, ty, acc);
        __syncthreads();
    }

    // Epilogue: bias, residual, activation, store at the channel offset.
    conv_tile_store(p, M, m0, n0, tx, ty, acc);
}

extern "C" __global__ void __launch_bounds__(256) conv1x1(const ConvParams p) { conv_igemm<1>(p); }
extern "C" __global__ void __launch_bounds__(256) conv3x3(const ConvParams p) { conv_igemm<3>(p); }
extern "C" __global__ void __launch_bounds__(256) conv_kxk(const ConvParams p) { conv_igemm<0>(p); }
extern "C" __global__ void __launch_bounds__(256) conv1x1_ex(const ConvExParams p) { conv_igemm<1>(p); }
extern "C" __global__ void __launch_bounds__(256) conv3x3_ex(const ConvExParams p) { conv_igemm<3>(p); }

extern "C" __global__ void __launch_bounds__(256) conv_dwpw(const DwPwParams p) {
    __shared__ float As[CONV_BK][CONV_BM];
    __shared__ float Bs[CONV_BK][CONV_BN];
    const int tid = threadIdx.x;
    const int tx = tid % 16, ty = tid / 16;
    const long long M = (long long)p.n * p.oh * p.ow;
    const long long m0 = (long long)blockIdx.x * CONV_BM;
    const int n0 = blockIdx.y * CONV_BN;
    const int k = p.k;

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

    // As in conv_igemm: thread tid makes the depthwise outputs of pixels tid / 16 + 16q at channel
    // tid % 16 of each K tile, so 16 consecutive threads read 16 consecutive channels of one pixel.
    const int ak = tid % CONV_BK;
    int a_b[4], a_iy0[4], a_ix0[4];
    bool a_ok[4];
    conv_a_rows(p.oh, p.ow, p.stride, p.pad, M, m0, tid, a_b, a_iy0, a_ix0, a_ok);
    // A missing pixel is image -1, so the loop below tests one 32-bit int. Testing a_ok there, ptxas
    // (sm_90) rematerialised each flag from the 64-bit pixel index (m < M) in every K tile and spilled
    // the four indices' halves to the stack (16 B stored, 32 B loaded); sm_80 kept them in 80
    // registers. Now both take 64 and nothing spills. Existing pixels keep their image, so the sums
    // are unchanged.
#pragma unroll
    for (int q = 0; q < 4; ++q) a_b[q] = a_ok[q] ? a_b[q] : -1;

    for (int k0 = 0; k0 < p.c; k0 += CONV_BK) {
        const int ch = k0 + ak;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            float v = 0.0f;
            if (a_b[q] >= 0 && ch < p.c) {
                // conv_depthwise's sum, in its order.
                float d = 0.0f;
                for (int ky = 0; ky < k; ++ky) {
                    const int iy = a_iy0[q] + ky;
                    if (iy < 0 || iy >= p.h) continue;
                    for (int kx = 0; kx < k; ++kx) {
                        const int ix = a_ix0[q] + kx;
                        if (ix < 0 || ix >= p.w) continue;
                        d = fmaf(p.wdw[(ky * k + kx) * p.c + ch],
                                 p.x[(((long long)a_b[q] * p.h + iy) * p.w + ix) * p.c + ch], d);
                    }
                }
                v = apply_act(d + p.bdw[ch], p.act_dw, p.slope_dw);
            }
            As[ak][tid / CONV_BK + 16 * q] = v;
        }
        conv_load_b(Bs, p.wpw, k0, p.c, n0, p.cout, tid);
        __syncthreads();
        conv_tile_fma(As, Bs, tx, ty, acc);
        __syncthreads();
    }

    conv_tile_store(p, M, m0, n0, tx, ty, acc);
}

// conv_invres's output tile side and the largest input window side (stride 2: 7·2 + 3).
#define INVRES_T 8
#define INVRES_HS 17
#define INVRES_CI 64

extern "C" __global__ void __launch_bounds__(256) conv_invres(const InvResParams p) {
    __shared__ float E[INVRES_HS * INVRES_HS * CONV_BK];  // [window pixel][16 expanded channels]
    __shared__ float Wx[INVRES_CI][CONV_BK];              // a cin chunk of the expansion's weights
    __shared__ float As[CONV_BK][CONV_BM];
    __shared__ float Bs[CONV_BK][CONV_BN];
    const int tid = threadIdx.x;
    const int tx = tid % 16, ty = tid / 16;
    const int tiles = p.tiles_y * p.tiles_x;
    const int b = blockIdx.x / tiles;
    const int t = blockIdx.x % tiles;
    const int oy0 = (t / p.tiles_x) * INVRES_T, ox0 = (t % p.tiles_x) * INVRES_T;
    const int s = p.stride;
    const int hs = (INVRES_T - 1) * s + 3;  // window side
    const int wy0 = oy0 * s - p.pad, wx0 = ox0 * s - p.pad;
    const int n0 = blockIdx.y * CONV_BN;
    const int ak = tid % CONV_BK;

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

    for (int k0 = 0; k0 < p.c; k0 += CONV_BK) {
        // The expansion of channels k0..k0+16 over the window, summed over cin in order. Element e is
        // window pixel e / 16, channel e % 16: 16 consecutive threads share one pixel's x (broadcast).
        for (int e = tid; e < hs * hs * CONV_BK; e += 256) E[e] = 0.0f;
        for (int c0 = 0; c0 < p.cin; c0 += INVRES_CI) {
            __syncthreads();
            for (int e = tid; e < INVRES_CI * CONV_BK; e += 256) {
                const int ci = c0 + e / CONV_BK, hc = k0 + e % CONV_BK;
                Wx[e / CONV_BK][e % CONV_BK] = (ci < p.cin && hc < p.c) ? p.wex[(long long)ci * p.c + hc] : 0.0f;
            }
            __syncthreads();
            const int cn = min(INVRES_CI, p.cin - c0);
            for (int e = tid; e < hs * hs * CONV_BK; e += 256) {
                const int wp = e / CONV_BK;
                const int iy = wy0 + wp / hs, ix = wx0 + wp % hs;
                if (iy < 0 || iy >= p.h || ix < 0 || ix >= p.w) continue;
                const float* xp = p.x + (((long long)b * p.h + iy) * p.w + ix) * p.cin + c0;
                float a = E[e];
                for (int ci = 0; ci < cn; ++ci) a = fmaf(xp[ci], Wx[ci][e % CONV_BK], a);
                E[e] = a;
            }
        }
        __syncthreads();
        // Bias and activation inside the image; the window's outside stays 0 (the depthwise padding).
        for (int e = tid; e < hs * hs * CONV_BK; e += 256) {
            const int wp = e / CONV_BK, hc = k0 + e % CONV_BK;
            const int iy = wy0 + wp / hs, ix = wx0 + wp % hs;
            if (iy >= 0 && iy < p.h && ix >= 0 && ix < p.w && hc < p.c)
                E[e] = apply_act(E[e] + p.bex[hc], p.act_ex, p.slope_ex);
        }
        __syncthreads();
        // The depthwise outputs of the tile's 64 pixels at channel k0 + ak (conv_depthwise's order,
        // taps outside the image skipped) into A.
        const int hc = k0 + ak;
        // Not unrolled: four copies of the 3×3 window's addressing spill on sm_80.
#pragma unroll 1
        for (int q = 0; q < 4; ++q) {
            const int pi = tid / CONV_BK + 16 * q;
            const int py = pi / INVRES_T, px = pi % INVRES_T;
            float v = 0.0f;
            if (hc < p.c && oy0 + py < p.oh && ox0 + px < p.ow) {
                float d = 0.0f;
                for (int ky = 0; ky < 3; ++ky) {
                    const int wy = py * s + ky, iy = wy0 + wy;
                    if (iy < 0 || iy >= p.h) continue;
                    for (int kx = 0; kx < 3; ++kx) {
                        const int wx = px * s + kx, ix = wx0 + wx;
                        if (ix < 0 || ix >= p.w) continue;
                        d = fmaf(p.wdw[(ky * 3 + kx) * p.c + hc], E[(wy * hs + wx) * CONV_BK + ak], d);
                    }
                }
                v = apply_act(d + p.bdw[hc], p.act_dw, p.slope_dw);
            }
            As[ak][pi] = v;
        }
        conv_load_b(Bs, p.wpw, k0, p.c, n0, p.cout, tid);
        __syncthreads();
        conv_tile_fma(As, Bs, tx, ty, acc);
        __syncthreads();
    }

    // Epilogue: tile pixel ty + 16i is (oy0 + pi / 8, ox0 + pi % 8).
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int pi = ty + 16 * i;
        const int oy = oy0 + pi / INVRES_T, ox = ox0 + pi % INVRES_T;
        if (oy >= p.oh || ox >= p.ow) continue;
        const long long m = ((long long)b * p.oh + oy) * p.ow + ox;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int co = n0 + tx + 16 * j;
            if (co < p.cout) conv_store(p, m, co, acc[i][j]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) conv_depthwise(const ConvParams p) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long total = (long long)p.n * p.oh * p.ow * p.cout;
    if (i >= total) return;
    const int ch = (int)(i % p.cout);
    long long r = i / p.cout;
    const int ox = (int)(r % p.ow);
    r /= p.ow;
    const int oy = (int)(r % p.oh);
    const int b = (int)(r / p.oh);
    const int k = p.k;
    float acc = 0.0f;
    for (int ky = 0; ky < k; ++ky) {
        const int iy = oy * p.stride + ky - p.pad;
        if (iy < 0 || iy >= p.h) continue;
        for (int kx = 0; kx < k; ++kx) {
            const int ix = ox * p.stride + kx - p.pad;
            if (ix < 0 || ix >= p.w) continue;
            acc = fmaf(p.wt[(ky * k + kx) * p.cout + ch], p.x[(((long long)b * p.h + iy) * p.w + ix) * p.cin + ch], acc);
        }
    }
    float v = acc + p.bias[ch];
    if (p.residual) v += p.residual[i];
    p.y[(r * p.ow + ox) * (long long)p.out_ctot + p.out_coff + ch] = apply_act(v, p.act, p.slope);
}
