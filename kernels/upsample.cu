// upsample.cu — FPN top-down merge: dst += nearest_resize(src, size of dst), NHWC f32, in place.
//
// Index rule: nearest.cuh (PyTorch `nearest` with an explicit output size, odd sizes included).
// Layout: src [n][sh][sw][c], dst [n][dh][dw][c].
// Launch: 1-D over n·dh·dw·c, 256 threads, channel fastest (coalesced reads of src and dst).
// Cost: 2 reads + 1 write of 4 B and 1 FLOP per element.
#include "common.cuh"
#include "nearest.cuh"

extern "C" __global__ void __launch_bounds__(256) upsample_nearest_add(const UpsampleAddParams p) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long total = (long long)p.n * p.dh * p.dw * p.c;
    if (i >= total) return;
    const int ch = (int)(i % p.c);
    long long r = i / p.c;
    const int dx = (int)(r % p.dw);
    r /= p.dw;
    const int dy = (int)(r % p.dh);
    const int b = (int)(r / p.dh);
    const int sy = nearest_src(dy, p.sh, p.dh), sx = nearest_src(dx, p.sw, p.dw);
    p.dst[i] += p.src[(((long long)b * p.sh + sy) * p.sw + sx) * p.c + ch];
}
