// pool.cu — 3×3 stride-2 max-pool with padding 1 (padding counts as −∞, i.e. is skipped), NHWC f32.
//
// Layout: x [n][h][w][c] → y [n][oh][ow][c], oh = (h − 1) / 2 + 1.
// Launch: 1-D over n·oh·ow·c outputs, 256 threads, channel fastest so a warp reads 32 consecutive
//   channels of one pixel (coalesced).
// Cost: 9 reads and 8 comparisons per output; bandwidth bound (≈ 4·(h·w·c + oh·ow·c) bytes, the
//   overlapping windows hit in L1/L2).
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256) maxpool3x3s2(const PoolParams p) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long total = (long long)p.n * p.oh * p.ow * p.c;
    if (i >= total) return;
    const int ch = (int)(i % p.c);
    long long r = i / p.c;
    const int ox = (int)(r % p.ow);
    r /= p.ow;
    const int oy = (int)(r % p.oh);
    const int b = (int)(r / p.oh);
    float m = __uint_as_float(0xff800000u);  // −∞
    const int y0 = max(oy * 2 - 1, 0), y1 = min(oy * 2 + 2, p.h);
    const int x0 = max(ox * 2 - 1, 0), x1 = min(ox * 2 + 2, p.w);
    for (int iy = y0; iy < y1; ++iy)
        for (int ix = x0; ix < x1; ++ix) m = fmaxf(m, p.x[(((long long)b * p.h + iy) * p.w + ix) * p.c + ch]);
    p.y[i] = m;
}
