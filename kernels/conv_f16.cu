// conv_f16.cu — f16 convolutions on the tensor cores (sm_80+: mma.sync m16n8k16, f32 accumulation),
// BatchNorm folded into weight and bias, with the f32 path's fused epilogue:
// y[.., out_coff + co] = f16(act(conv(x, w)[co] + bias[co] (+ residual[co]))).
//
// Layout: x [n][h][w][cin] f16 with cin a multiple of 8 (the stem's 3 channels padded with zeros),
// weights [cout][k][k][cin] f16 (the GEMM's B as N×K, K contiguous), bias f32, residual
// [n][oh][ow][cout] f16, y [n][oh][ow][out_ctot] f16; cout, out_ctot, out_coff multiples of 8.
// 32-bit element indexing: the host rejects tensors of 2^31 elements or more.
//
// conv_f16_BMxBN (groups 1): implicit GEMM, M = n·oh·ow pixels, N = cout, K = k·k·cin in (ky, kx, ci)
//   order; a block computes a BM×BN tile, each warp a WM×WN sub-tile of m16n8 accumulators. K moves 32
//   at a time through a 3-stage cp.async ring in shared memory: every 16-byte chunk (8 channels of one
//   tap, never across taps as cin % 8 == 0) is one cp.async.cg whose src-size 0 zero-fills padding, K
//   tails and rows/columns past the edge. Rows of 32 halves (64 bytes) are stored with chunk
//   c ^ ((row / 2) % 4), so the 8 rows an ldmatrix phase reads, and the 2 rows × 4 chunks a cp.async
//   phase writes, fall in 8 distinct 16-byte bank groups: conflict-free. Fragments come from
//   ldmatrix.x4 (A: 16×16; B: two n8×k16) or .x2 (B of an 8-wide tile).
//   Variants (the registry in src/cuda/ops/conv_f16.rs): 128×128 (8 warps of 64×32), 128×64 (4 of 64×32),
//   64×64 (4 of 32×32), and narrow-N 128×32 / 128×16 / 128×8 (4 warps of 32×BN) for 8..32 channels.
//   Launch: grid (ceil(M/BM), ceil(cout/BN), splits), block 32·warps. Shared: 3·(BM+BN)·32·2 B (48 KiB
//   at 128×128). Cost: 2·M·cout·K FLOPs; reads M·K·2 B of x per BN channels (L2 absorbs the k² reuse)
//   and K·cout·2 B of weights per BM pixels; writes M·cout·2 B.
//   Split-K (p.ws set; small maps with deep K, where M×N tiles alone cannot fill the SMs): block z
//   reduces its own range of k-tiles and stores f32 partials to ws; conv_f16_splitk_reduce (1-D over
//   M·cout/2, 256 threads) sums them in z order, so the result does not depend on timing, and applies
//   the epilogue. Extra traffic: 2·splits·M·cout·4 B.
//
// conv_f16_wgBMxBN (sm_90a only; 128x256, 128x128, 128x64, 64x128): the same implicit GEMM, the same
//   loads into the same swizzled ring, on Hopper's warpgroup MMAs. The ring's rows (32 halves, chunk c
//   at c ^ ((row/2) % 4)) are exactly wgmma's K-major 64-byte-swizzle layout (8-row groups 512 bytes
//   apart), so the tensor cores read the tiles straight from shared memory through descriptors: no
//   ldmatrix, no A/B fragments in registers. BM/64 warpgroups, each 64 pixel rows × BN channels with
//   wgmma.m64nBNk16 (BN/2 f32 accumulators per thread), two per k-tile; fence.proxy.async before the
//   barrier hands the cp.async data to the async proxy. A 4-stage ring in dynamic shared memory
//   (4·(BM+BN)·64 B: 96 KiB at 128x256, plus 1 KiB in which the kernel aligns it to 1024 bytes), kept
//   two k-tiles ahead of the math; each k-tile ends with wgmma.wait_group 1, so one k-tile's wgmmas run
//   while the next ones issue (SASS: WARPGROUP.DEPBAR.LE gsb0, 0x1), and the refill after the next
//   barrier targets the slot that wait retired (the simulation traps if a refill ever lands under
//   wgmmas in flight). Issue slots are not what changes: per warp, the loop spends about as many
//   instructions per 2048 multiply-adds as the mma.sync tiles (4.2 at 128x128 against 5.0; 2.6 at
//   128x256), most of them the loader's; what changes is the instruction the
//   tensor cores run (wgmma is Hopper's full-rate path, mma.sync is not) and that no A/B fragment
//   passes through registers. Shared-memory traffic per multiply-add falls with the tile:
//   each warpgroup reads its A and the whole B per k-tile, so 128x256 moves about 125 B per clock per SM
//   at the tensor cores' rate where 64x128 would need ~190 (an SM serves 128): the tuner decides per
//   shape. Fused flavours: conv_dwpw_f16_wg*, conv_ex_f16_wg*. ptxas must not serialise the wgmmas
//   (tests/conv_f16_sass.rs fails on its advisories).
//
// conv_dwpw_f16_BMxBN (DwPwF16Params): depthwise k×k (any stride) + pointwise 1×1 (MobileNet blocks),
//   the depthwise output never written: conv_f16_igemm with K = c, whose A tiles (BM pixels × 32
//   channels) are not copied from memory but made by the depthwise conv itself, 8 channels of one
//   pixel per thread and step, exactly as conv_dw_f16 makes them (f32 sums in its order, bias,
//   activation, one rounding to f16), stored with plain 16-byte shared stores into the same swizzled
//   ring the weights' cp.async fills. So the GEMM sees the very f16 values the unfused pair would read
//   back, and with the same variant the output is bit-identical to conv_dw_f16 + conv_f16_BMxBN.
//   Variants, launch and split-K as conv_f16_BMxBN (shared memory the same). Cost: the pointwise
//   GEMM's 2·M·cout·c FLOPs plus 2·k²·M·c per column of BN output channels (the depthwise tile is
//   recomputed per column); reads k²·16 B of x (L1/L2 absorb the taps' reuse) per 8 A values per
//   column; writes M·cout·2 B, and neither writes nor re-reads the M·c·2 B depthwise tensor.
//
// conv_ex_f16_BMxBN (ConvExF16Params): conv_f16_BMxBN with the f32 conv_ex family's epilogue, for the
//   fused ops of the f16 executor: the FPN lateral 1×1 with the top-down upsample-add (`up`: the
//   conv's output is rounded to f16, as the unfused conv stores it, then up is added in f32 and the
//   sum rounded once, as upsample_nearest_add_f16 does: bit-identical to the unfused pair), and two
//   convs of one input as one GEMM over split + cout2 channels (SSH's conv3X3 + conv5X5_1: each
//   channel pair goes to its conv's destination, offset and activation; split is a multiple of 8).
//   Split-K reduces through conv_ex_f16_splitk_reduce (the same epilogue). Launch, shared memory and
//   cost as conv_f16_BMxBN over the combined cout, plus 4 B of `up` read per output pair when set
//   (instead of upsample_nearest_add_f16's two reads and one write of the map); a pair reads its
//   input once instead of twice.
//
// conv_dw_f16 (groups = cin = cout = c, c % 8 == 0): one thread per output pixel and 8 channels, one
//   16-byte load of x and of w per tap (weights [k][k][c] f16), f32 sums over (ky, kx) in the CPU
//   reference's order, one 16-byte store. Launch: 1-D over n·oh·ow·c/8, 256 threads. Cost: 2·k² FLOPs
//   per output; reads k²·16 B per 8 outputs (neighbouring pixels' taps hit in L1), writes 16 B.
#include "common.cuh"
#include "conv_f16.cuh"
#include "mma.cuh"
#include "nearest.cuh"
#include "wgmma.cuh"

#define CONVH_BK 32
#define CONVH_STAGES 3

// Offset in halves of chunk c (8 halves) of row r in a [rows][32] tile, swizzled as described above.
__device__ __forceinline__ int convh_swz(int r, int c) { return r * CONVH_BK + ((c ^ ((r >> 1) & 3)) << 3); }

// The fused epilogue for channels co, co + 1 of pixel m: bias, residual, activation, f16, one 32-bit
// store (cout, out_ctot, out_coff are even). P: ConvF16Params or DwPwF16Params.
template <class P>
__device__ __forceinline__ void convh_store2(const P& p, int m, int co, float v0, float v1) {
    v0 += p.bias[co];
    v1 += p.bias[co + 1];
    if (p.residual) {
        const unsigned r = *reinterpret_cast<const unsigned*>(p.residual + m * p.cout + co);
        v0 += half_to_float((unsigned short)(r & 0xffff));
        v1 += half_to_float((unsigned short)(r >> 16));
    }
    v0 = apply_act(v0, p.act, p.slope);
    v1 = apply_act(v1, p.act, p.slope);
    *reinterpret_cast<unsigned*>(p.y + m * p.out_ctot + p.out_coff + co) = pack_half2(v0, v1);
}

// conv_ex_f16's epilogue: channels below split to y (then + nearest(up), rounded as the unfused
// conv and upsample-add round), the rest to y2 with the second activation.
__device__ __forceinline__ void convh_store2(const ConvExF16Params& p, int m, int co, float v0, float v1) {
    v0 += p.bias[co];
    v1 += p.bias[co + 1];
    if (p.residual) {
        const unsigned r = *reinterpret_cast<const unsigned*>(p.residual + m * p.cout + co);
        v0 += half_to_float((unsigned short)(r & 0xffff));
        v1 += half_to_float((unsigned short)(r >> 16));
    }
    if (co >= p.split) {
        v0 = apply_act(v0, p.act2, p.slope2);
        v1 = apply_act(v1, p.act2, p.slope2);
        *reinterpret_cast<unsigned*>(p.y2 + m * p.out_ctot2 + p.out_coff2 + (co - p.split)) = pack_half2(v0, v1);
        return;
    }
    v0 = apply_act(v0, p.act, p.slope);
    v1 = apply_act(v1, p.act, p.slope);
    if (p.up) {
        const unsigned c = pack_half2(v0, v1);
        const int ox = m % p.ow, r = m / p.ow;
        const int oy = r % p.oh, b = r / p.oh;
        const int sy = nearest_src(oy, p.uh, p.oh), sx = nearest_src(ox, p.uw, p.ow);
        const unsigned u = *reinterpret_cast<const unsigned*>(p.up + ((b * p.uh + sy) * p.uw + sx) * p.split + co);
        v0 = half_to_float((unsigned short)(c & 0xffff)) + half_to_float((unsigned short)(u & 0xffff));
        v1 = half_to_float((unsigned short)(c >> 16)) + half_to_float((unsigned short)(u >> 16));
    }
    *reinterpret_cast<unsigned*>(p.y + m * p.out_ctot + p.out_coff + co) = pack_half2(v0, v1);
}

// One 16-byte chunk of an A tile: 8 input channels ci.. of tap (ky, kx) of the pixel whose batch
// offset is base and whose first tap is (iy0, ix0), copied asynchronously (zero outside the image or
// past K). at: the chunk's offset in x, the pixel's first-tap offset plus the tap's (computed by the
// caller once per k-tile, not per chunk).
template <class P>
__device__ __forceinline__ void convh_load_a(const P& p, unsigned short* dst, bool kin, int, int ky, int kx, int,
                                             int iy0, int ix0, int at) {
    const int iy = iy0 + ky, ix = ix0 + kx;
    const bool ok = kin && (unsigned)iy < (unsigned)p.h && (unsigned)ix < (unsigned)p.w;
    cp_async_16(dst, p.x + (ok ? at : 0), ok ? 16 : 0);
}

// conv_dwpw_f16's A chunk: the depthwise outputs of channels ci..ci+8 at the pixel, computed as
// conv_dw_f16 computes them and stored to shared memory (zero past K).
__device__ __forceinline__ void convh_load_a(const DwPwF16Params& p, unsigned short* dst, bool kin, int ci, int,
                                             int, int base, int iy0, int ix0, int) {
    uint4 o;
    o.x = o.y = o.z = o.w = 0u;
    if (kin) {
        float acc[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = 0.0f;
        for (int ky = 0; ky < p.kdw; ++ky) {
            const int iy = iy0 + ky;
            for (int kx = 0; kx < p.kdw; ++kx) {
                const int ix = ix0 + kx;
                const bool ok = (unsigned)iy < (unsigned)p.h && (unsigned)ix < (unsigned)p.w;
                const uint4 xv = ldg16_or_zero(p.x + (ok ? base + (iy * p.w + ix) * p.cin + ci : 0), ok);
                const uint4 wv = ldg16_or_zero(p.wdw + (ky * p.kdw + kx) * p.cin + ci, true);
                const unsigned xs[4] = {xv.x, xv.y, xv.z, xv.w}, ws[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    acc[2 * e] += half_to_float((unsigned short)(xs[e] & 0xffff)) * half_to_float((unsigned short)(ws[e] & 0xffff));
                    acc[2 * e + 1] += half_to_float((unsigned short)(xs[e] >> 16)) * half_to_float((unsigned short)(ws[e] >> 16));
                }
            }
        }
        float v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = apply_act(acc[e] + p.bdw[ci + e], p.act_dw, p.slope_dw);
        o.x = pack_half2(v[0], v[1]);
        o.y = pack_half2(v[2], v[3]);
        o.z = pack_half2(v[4], v[5]);
        o.w = pack_half2(v[6], v[7]);
    }
    *reinterpret_cast<uint4*>(dst) = o;
}

// The copies of one k-tile of a BM×BN block's A (pixels) and B (output channels) into the swizzled
// ring, by THREADS threads, 4 chunks of 8 channels per 32-deep row. P: ConvF16Params or ConvExF16Params
// (A copied from x), or DwPwF16Params (A made by the depthwise conv).
template <int BM, int BN, int THREADS, class P>
struct ConvhTileLoader {
    static constexpr int A_ITERS = BM * 4 / THREADS;
    static constexpr int B_ITERS = (BN * 4 + THREADS - 1) / THREADS;
    static_assert(BM * 4 % THREADS == 0, "A tile chunks must split evenly over the threads");
    int tid, K, n0;
    // The pixels whose A rows this thread copies: rows tid/4 + i·THREADS/4 of the tile. A row past M
    // gets an origin no tap can bring into the image, so its copies zero-fill.
    int a_base[A_ITERS], a_iy0[A_ITERS], a_ix0[A_ITERS];
    // Each pixel's offset of its first tap (iy0, ix0) in x, which may lie outside the image: a chunk's
    // offset is this plus its tap's (ky·w + kx)·cin + ci, valid only when the tap is inside.
    int a_org[A_ITERS];
    // The weight rows (output channels) this thread copies: their offset in wt, or -1 past cout.
    int b_row[B_ITERS];
    // This thread's chunk of the next k-tile to load: its K index and (channel, tap), advanced by one
    // k-tile per load instead of divided out of the K index each time (two integer divisions per
    // k-tile were a large share of the main loop's instructions).
    int kidx, ci, ky, kx;

    // kt0: the first k-tile this block loads; the loads then go k-tile after k-tile.
    __device__ __forceinline__ ConvhTileLoader(const P& p, int m0, int n0_, int tid_, int kt0)
        : tid(tid_), K(p.k * p.k * p.cin), n0(n0_) {
        const int M = p.n * p.oh * p.ow;
#pragma unroll
        for (int i = 0; i < A_ITERS; ++i) {
            const int m = m0 + tid / 4 + i * (THREADS / 4);
            const int ox = m % p.ow, r = m / p.ow;
            const int oy = r % p.oh, b = r / p.oh;
            a_base[i] = b * p.h * p.w * p.cin;
            a_iy0[i] = m < M ? oy * p.stride - p.pad : -(1 << 24);
            a_ix0[i] = ox * p.stride - p.pad;
            a_org[i] = m < M ? a_base[i] + (a_iy0[i] * p.w + a_ix0[i]) * p.cin : 0;
        }
#pragma unroll
        for (int i = 0; i < B_ITERS; ++i) {
            const int co = n0 + tid / 4 + i * (THREADS / 4);
            b_row[i] = co < p.cout ? co * K : -1;
        }
        kidx = kt0 * CONVH_BK + (tid % 4) * 8;
        const int tap = kidx / p.cin;
        ci = kidx - tap * p.cin;
        ky = tap / p.k;
        kx = tap - ky * p.k;
    }

    // The next k-tile into the stage at as (BM rows) and bs (BN rows).
    __device__ __forceinline__ void load_next(const P& p, unsigned short* as, unsigned short* bs) {
        const int chunk = tid % 4;
        const bool kin = kidx < K;
        const int tap_at = (ky * p.w + kx) * p.cin + ci;
#pragma unroll
        for (int i = 0; i < A_ITERS; ++i) {
            const int row = tid / 4 + i * (THREADS / 4);
            convh_load_a(p, as + convh_swz(row, chunk), kin, ci, ky, kx, a_base[i], a_iy0[i], a_ix0[i],
                         a_org[i] + tap_at);
        }
#pragma unroll
        for (int i = 0; i < B_ITERS; ++i) {
            const int row = tid / 4 + i * (THREADS / 4);
            if (BN * 4 % THREADS != 0 && row >= BN) break;
            const bool ok = kin && b_row[i] >= 0;
            cp_async_16(bs + convh_swz(row, chunk), p.wt + (ok ? b_row[i] + kidx : 0), ok ? 16 : 0);
        }
        // Past K the position runs on unused (kin is false from then on).
        kidx += CONVH_BK;
        ci += CONVH_BK;
        while (ci >= p.cin) {
            ci -= p.cin;
            if (++kx == p.k) {
                kx = 0;
                ++ky;
            }
        }
    }
};

// The k-tiles this block reduces: all of them, or split-K block z's range.
template <class P>
__device__ __forceinline__ void convh_k_range(const P& p, int& kt0, int& KT) {
    kt0 = 0;
    KT = (p.k * p.k * p.cin + CONVH_BK - 1) / CONVH_BK;
    if (p.ws) {
        kt0 = blockIdx.z * p.kt_per_split;
        KT = min(KT - kt0, p.kt_per_split);
    }
}

// Output channels co, co + 1 of pixel m from the accumulators: split-K's f32 partials, or the epilogue.
template <class P>
__device__ __forceinline__ void convh_out2(const P& p, int M, int m, int co, float v0, float v1) {
    if (m >= M || co >= p.cout) return;
    if (p.ws) {
        float* w = p.ws + ((long long)blockIdx.z * M + m) * p.cout + co;
        w[0] = v0;
        w[1] = v1;
    } else {
        convh_store2(p, m, co, v0, v1);
    }
}

template <int BM, int BN, int WM, int WN, class P>
__device__ __forceinline__ void conv_f16_igemm(const P& p) {
    constexpr int WARPS_M = BM / WM, WARPS_N = BN / WN;
    constexpr int THREADS = WARPS_M * WARPS_N * 32;
    constexpr int MT = WM / 16, NT = WN / 8;
    static_assert(NT == 1 || NT % 2 == 0, "B fragments load in pairs of n8 tiles, or one");
    __shared__ __align__(128) unsigned short As[CONVH_STAGES][BM * CONVH_BK];
    __shared__ __align__(128) unsigned short Bs[CONVH_STAGES][BN * CONVH_BK];

    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int M = p.n * p.oh * p.ow;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int wm0 = (warp % WARPS_M) * WM, wn0 = (warp / WARPS_M) * WN;
    int kt0, KT;
    convh_k_range(p, kt0, KT);
    ConvhTileLoader<BM, BN, THREADS, P> loader(p, m0, n0, tid, kt0);

    float acc[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

#pragma unroll
    for (int s = 0; s < CONVH_STAGES - 1; ++s) {
        if (s < KT) loader.load_next(p, As[s], Bs[s]);
        cp_async_commit();
    }
    for (int kt = 0; kt < KT; ++kt) {
        // Stage kt has landed for this thread; the barrier makes every thread's copies visible and
        // tells everyone that slot (kt - 1) % STAGES, read in the last iteration, may be refilled.
        cp_async_wait<CONVH_STAGES - 2>();
        __syncthreads();
        const int nk = kt + CONVH_STAGES - 1;
        if (nk < KT) loader.load_next(p, As[nk % CONVH_STAGES], Bs[nk % CONVH_STAGES]);
        cp_async_commit();

        const unsigned short* as = As[kt % CONVH_STAGES];
        const unsigned short* bs = Bs[kt % CONVH_STAGES];
#pragma unroll
        for (int kk = 0; kk < CONVH_BK / 8; kk += 2) {
            unsigned af[MT][4], bf[NT][2];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                ldmatrix_x4(af[mt], as + convh_swz(wm0 + mt * 16 + lane % 16, kk + lane / 16));
            if (NT == 1) {
                ldmatrix_x2(bf[0], bs + convh_swz(wn0 + lane % 8, kk + (lane / 8) % 2));
            } else {
#pragma unroll
                for (int np = 0; np < NT / 2; ++np) {
                    unsigned r[4];
                    ldmatrix_x4(r, bs + convh_swz(wn0 + np * 16 + lane % 8 + (lane / 16) * 8, kk + (lane / 8) % 2));
                    bf[2 * np][0] = r[0];
                    bf[2 * np][1] = r[1];
                    bf[2 * np + 1][0] = r[2];
                    bf[2 * np + 1][1] = r[3];
                }
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) mma_m16n8k16(acc[mt][nt], af[mt], bf[nt], acc[mt][nt]);
        }
    }
    // Nothing may still write shared memory when the block exits (empty groups only, but be exact).
    cp_async_wait<0>();

    // Epilogue: c_i of tile (mt, nt) is pixel g + 8·(i/2), channel 2t + i%2.
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int h = 0; h < 2; ++h)
                convh_out2(p, M, m0 + wm0 + mt * 16 + g + 8 * h, n0 + wn0 + nt * 8 + 2 * t, acc[mt][nt][2 * h],
                           acc[mt][nt][2 * h + 1]);
}

// wgmma.m64nBNk16 for the tile widths the Hopper tiles use (each a fixed register list in PTX).
template <int BN>
__device__ __forceinline__ void wgmma_m64k16(float* acc, unsigned long long da, unsigned long long db);
template <>
__device__ __forceinline__ void wgmma_m64k16<128>(float* acc, unsigned long long da, unsigned long long db) {
    wgmma_m64n128k16(acc, da, db, 1);
}
template <>
__device__ __forceinline__ void wgmma_m64k16<64>(float* acc, unsigned long long da, unsigned long long db) {
    wgmma_m64n64k16(acc, da, db, 1);
}
template <>
__device__ __forceinline__ void wgmma_m64k16<256>(float* acc, unsigned long long da, unsigned long long db) {
    wgmma_m64n256k16(acc, da, db, 1);
}

// WGS warpgroups (64 pixel rows each) × BN channels, a STAGES-deep ring: a k-tile's wgmmas run while
// the next ones are issued (wait_group 1), the ring STAGES - 2 k-tiles ahead of the math, its refill
// target the slot whose wgmmas the previous wait retired.
template <int WGS, int BN, int STAGES, class P>
__device__ __forceinline__ void conv_f16_wgmma(const P& p) {
#if !defined(CUDASIM) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
    // Not sm_90a: a stub the registry never launches (it offers these tiles on compute capability 9.0
    // only, where the engine compiles for sm_90a), so no target compiles a body it cannot run.
    (void)p;
    __trap();
#else
    constexpr int BM = 64 * WGS, THREADS = 128 * WGS, NREG = BN / 2;
    constexpr int AHEAD = STAGES - 2;  // k-tiles the ring holds ahead of the math
    static_assert(STAGES >= 4, "a slot for the math, one for the wgmmas in flight, two or more ahead");
    // The ring in dynamic shared memory (up to 96 KiB), from a 1024-aligned base: the descriptors'
    // swizzle works on absolute shared addresses, so the base is rounded up inside the 1 KiB of slack
    // the host adds (conv_f16::dynamic_shared_bytes) rather than trusted to the declaration.
    constexpr unsigned RING = STAGES * (BM + BN) * CONVH_BK * 2;
    DYNAMIC_SHARED(convh_dyn);
    require(dynamic_shared_size() >= RING + 1024, "conv_f16_wgmma: launched with less dynamic shared memory than its ring");
    unsigned char* const base = convh_dyn + shared_pad_to_1024(convh_dyn);
    wgmma_shared_window(base, RING);
    unsigned short* const As = reinterpret_cast<unsigned short*>(base);
    unsigned short* const Bs = As + STAGES * BM * CONVH_BK;

    const int tid = threadIdx.x, wg = tid / 128;
    const int M = p.n * p.oh * p.ow;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    int kt0, KT;
    convh_k_range(p, kt0, KT);
    ConvhTileLoader<BM, BN, THREADS, P> loader(p, m0, n0, tid, kt0);

    float acc[NREG];
#pragma unroll
    for (int i = 0; i < NREG; ++i) acc[i] = 0.0f;

#pragma unroll
    for (int s = 0; s < AHEAD; ++s) {
        if (s < KT) loader.load_next(p, As + s * BM * CONVH_BK, Bs + s * BN * CONVH_BK);
        cp_async_commit();
    }
    for (int kt = 0; kt < KT; ++kt) {
        // Stage kt has landed for this thread; the proxy fence hands its writes (and the depthwise
        // tiles' stores) to wgmma's async proxy; the barrier publishes everyone's, and says that every
        // warpgroup retired the wgmmas of k-tile kt + AHEAD - STAGES, whose slot is refilled next.
        cp_async_wait<AHEAD - 1>();
        wgmma_fence_proxy();
        __syncthreads();
        const int nk = kt + AHEAD;
        if (nk < KT) {
            const int slot = nk % STAGES;
            loader.load_next(p, As + slot * BM * CONVH_BK, Bs + slot * BN * CONVH_BK);
        }
        cp_async_commit();

        const int slot = kt % STAGES;
        const unsigned short* as = As + slot * BM * CONVH_BK + wg * 64 * CONVH_BK;
        const unsigned short* bs = Bs + slot * BN * CONVH_BK;
        wgmma_fence_operands<NREG>(acc);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < CONVH_BK; kk += 16) wgmma_m64k16<BN>(acc, wgmma_desc_k64b(as + kk), wgmma_desc_k64b(bs + kk));
        wgmma_commit();
        wgmma_wait<1>();
        wgmma_fence_operands<NREG>(acc);
    }
    wgmma_wait<0>();
    wgmma_fence_operands<NREG>(acc);
    cp_async_wait<0>();

    // Epilogue: register 4j + i of thread (warp w of the group, lane l) is pixel row 16w + l/4 + 8·(i/2)
    // of the group's 64, channel 8j + 2·(l%4) + i%2.
    const int w = (tid % 128) / 32, lane = tid % 32;
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h)
            convh_out2(p, M, m0 + 64 * wg + 16 * w + g + 8 * h, n0 + 8 * j + 2 * t, acc[4 * j + 2 * h],
                       acc[4 * j + 2 * h + 1]);
#endif
}

extern "C" __global__ void __launch_bounds__(256) conv_f16_128x128(const ConvF16Params p) { conv_f16_igemm<128, 128, 64, 32>(p); }
extern "C" __global__ void __launch_bounds__(128) conv_f16_128x64(const ConvF16Params p) { conv_f16_igemm<128, 64, 64, 32>(p); }
extern "C" __global__ void __launch_bounds__(128) conv_f16_64x64(const ConvF16Params p) { conv_f16_igemm<64, 64, 32, 32>(p); }
extern "C" __global__ void __launch_bounds__(128) conv_f16_128x32(const ConvF16Params p) { conv_f16_igemm<128, 32, 32, 32>(p); }
extern "C" __global__ void __launch_bounds__(128) conv_f16_128x16(const ConvF16Params p) { conv_f16_igemm<128, 16, 32, 16>(p); }
extern "C" __global__ void __launch_bounds__(128) conv_f16_128x8(const ConvF16Params p) { conv_f16_igemm<128, 8, 32, 8>(p); }
extern "C" __global__ void __launch_bounds__(256) conv_f16_wg128x256(const ConvF16Params p) { conv_f16_wgmma<2, 256, 4>(p); }
extern "C" __global__ void __launch_bounds__(256) conv_f16_wg128x128(const ConvF16Params p) { conv_f16_wgmma<2, 128, 4>(p); }
extern "C" __global__ void __launch_bounds__(256) conv_f16_wg128x64(const ConvF16Params p) { conv_f16_wgmma<2, 64, 4>(p); }
extern "C" __global__ void __launch_bounds__(128) conv_f16_wg64x128(const ConvF16Params p) { conv_f16_wgmma<1, 128, 4>(p); }

extern "C" __global__ void __launch_bounds__(256) conv_dwpw_f16_128x128(const DwPwF16Params p) { conv_f16_igemm<128, 128, 64, 32>(p); }
extern "C" __global__ void __launch_bounds__(128) conv_dwpw_f16_128x64(const DwPwF16Params p) { conv_f16_igemm<128, 64, 64, 32>(p); }
extern "C" __global__ void __launch_bounds__(128) conv_dwpw_f16_64x64(const DwPwF16Params p) { conv_f16_igemm<64, 64, 32, 32>(p); }
extern "C" __global__ void __launch_bounds__(128) conv_dwpw_f16_128x32(const DwPwF16Params p) { conv_f16_igemm<128, 32, 32, 32>(p); }
extern "C" __global__ void __launch_bounds__(128) conv_dwpw_f16_128x16(const DwPwF16Params p) { conv_f16_igemm<128, 16, 32, 16>(p); }
extern "C" __global__ void __launch_bounds__(128) conv_dwpw_f16_128x8(const DwPwF16Params p) { conv_f16_igemm<128, 8, 32, 8>(p); }
extern "C" __global__ void __launch_bounds__(256) conv_dwpw_f16_wg128x256(const DwPwF16Params p) { conv_f16_wgmma<2, 256, 4>(p); }
extern "C" __global__ void __launch_bounds__(256) conv_dwpw_f16_wg128x128(const DwPwF16Params p) { conv_f16_wgmma<2, 128, 4>(p); }
extern "C" __global__ void __launch_bounds__(256) conv_dwpw_f16_wg128x64(const DwPwF16Params p) { conv_f16_wgmma<2, 64, 4>(p); }
extern "C" __global__ void __launch_bounds__(128) conv_dwpw_f16_wg64x128(const DwPwF16Params p) { conv_f16_wgmma<1, 128, 4>(p); }

extern "C" __global__ void __launch_bounds__(256) conv_ex_f16_128x128(const ConvExF16Params p) { conv_f16_igemm<128, 128, 64, 32>(p); }
extern "C" __global__ void __launch_bounds__(128) conv_ex_f16_128x64(const ConvExF16Params p) { conv_f16_igemm<128, 64, 64, 32>(p); }
extern "C" __global__ void __launch_bounds__(128) conv_ex_f16_64x64(const ConvExF16Params p) { conv_f16_igemm<64, 64, 32, 32>(p); }
extern "C" __global__ void __launch_bounds__(128) conv_ex_f16_128x32(const ConvExF16Params p) { conv_f16_igemm<128, 32, 32, 32>(p); }
extern "C" __global__ void __launch_bounds__(128) conv_ex_f16_128x16(const ConvExF16Params p) { conv_f16_igemm<128, 16, 32, 16>(p); }
extern "C" __global__ void __launch_bounds__(128) conv_ex_f16_128x8(const ConvExF16Params p) { conv_f16_igemm<128, 8, 32, 8>(p); }
extern "C" __global__ void __launch_bounds__(256) conv_ex_f16_wg128x256(const ConvExF16Params p) { conv_f16_wgmma<2, 256, 4>(p); }
extern "C" __global__ void __launch_bounds__(256) conv_ex_f16_wg128x128(const ConvExF16Params p) { conv_f16_wgmma<2, 128, 4>(p); }
extern "C" __global__ void __launch_bounds__(256) conv_ex_f16_wg128x64(const ConvExF16Params p) { conv_f16_wgmma<2, 64, 4>(p); }
extern "C" __global__ void __launch_bounds__(128) conv_ex_f16_wg64x128(const ConvExF16Params p) { conv_f16_wgmma<1, 128, 4>(p); }

// Sums split-K partials in z order and applies P's epilogue.
template <class P>
__device__ __forceinline__ void convh_splitk_reduce(const P& p) {
    const int M = p.n * p.oh * p.ow;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= M * (p.cout / 2)) return;
    const int m = i / (p.cout / 2), co = 2 * (i % (p.cout / 2));
    float v0 = 0.0f, v1 = 0.0f;
    for (int z = 0; z < p.splits; ++z) {
        const float* w = p.ws + ((long long)z * M + m) * p.cout + co;
        v0 += w[0];
        v1 += w[1];
    }
    convh_store2(p, m, co, v0, v1);
}

extern "C" __global__ void __launch_bounds__(256) conv_f16_splitk_reduce(const ConvF16Params p) { convh_splitk_reduce(p); }
extern "C" __global__ void __launch_bounds__(256) conv_ex_f16_splitk_reduce(const ConvExF16Params p) { convh_splitk_reduce(p); }

extern "C" __global__ void __launch_bounds__(256) conv_dw_f16(const ConvF16Params p) {
    const int c8 = p.cout / 8;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const int M = p.n * p.oh * p.ow;
    if (i >= M * c8) return;
    const int cg = i % c8, m = i / c8;
    const int ox = m % p.ow, r = m / p.ow;
    const int oy = r % p.oh, b = r / p.oh;
    const int c = p.cout, ch = cg * 8;
    float acc[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] = 0.0f;
    for (int ky = 0; ky < p.k; ++ky) {
        const int iy = oy * p.stride - p.pad + ky;
        for (int kx = 0; kx < p.k; ++kx) {
            const int ix = ox * p.stride - p.pad + kx;
            const bool ok = (unsigned)iy < (unsigned)p.h && (unsigned)ix < (unsigned)p.w;
            const uint4 xv = ldg16_or_zero(p.x + (ok ? ((b * p.h + iy) * p.w + ix) * c + ch : 0), ok);
            const uint4 wv = ldg16_or_zero(p.wt + (ky * p.k + kx) * c + ch, true);
            const unsigned xs[4] = {xv.x, xv.y, xv.z, xv.w}, ws[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                acc[2 * e] += half_to_float((unsigned short)(xs[e] & 0xffff)) * half_to_float((unsigned short)(ws[e] & 0xffff));
                acc[2 * e + 1] += half_to_float((unsigned short)(xs[e] >> 16)) * half_to_float((unsigned short)(ws[e] >> 16));
            }
        }
    }
    float v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = acc[e] + p.bias[ch + e];
    if (p.residual) {
        const uint4 rv = *reinterpret_cast<const uint4*>(p.residual + m * c + ch);
        const unsigned rs[4] = {rv.x, rv.y, rv.z, rv.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            v[2 * e] += half_to_float((unsigned short)(rs[e] & 0xffff));
            v[2 * e + 1] += half_to_float((unsigned short)(rs[e] >> 16));
        }
    }
    uint4 o;
    o.x = pack_half2(apply_act(v[0], p.act, p.slope), apply_act(v[1], p.act, p.slope));
    o.y = pack_half2(apply_act(v[2], p.act, p.slope), apply_act(v[3], p.act, p.slope));
    o.z = pack_half2(apply_act(v[4], p.act, p.slope), apply_act(v[5], p.act, p.slope));
    o.w = pack_half2(apply_act(v[6], p.act, p.slope), apply_act(v[7], p.act, p.slope));
    *reinterpret_cast<uint4*>(p.y + m * p.out_ctot + p.out_coff + ch) = o;
}
