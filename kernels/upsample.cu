// upsample.cu — FPN top-down merge: dst += nearest_resize(src, size of dst), NHWC f32, in place.
//
// Index rule (PyTorch `nearest` with an explicit output size, odd sizes included):
//   sy = min(floor(dy · (float(sh) / float(dh))), sh − 1), the scale rounded to f32 first, as
//   torch's upsample_nearest computes it and as src/cpu/ops.rs::nearest_index reproduces. One rounded
//   division and one rounded multiply: no FMA can form, so the GPU's index equals the CPU's.
// Layout: src [n][sh][sw][c], dst [n][dh][dw][c].
// Launch: 1-D over n·dh·dw·c, 256 threads, channel fastest (coalesced reads of src and dst).
// Cost: 2 reads + 1 write of 4 B and 1 FLOP per element.
#include "common.cuh"

__device__ __forceinline__ int nearest_src(int d, int in, int out) {
    const float scale = __fdiv_rn((float)in, (float)out);
    const int s = (int)floorf(__fmul_rn((float)d, scale));
    return min(s, in - 1);
}

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
