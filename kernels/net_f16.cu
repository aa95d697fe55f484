// net_f16.cu — the f16 network's ops besides the convolutions (kernels/conv_f16.cu), on NHWC f16 with
// channels padded to multiples of 8: one thread per pixel and 8 channels, one 16-byte load per input
// element group and one 16-byte store. Same semantics as the f32 kernels (pool.cu, upsample.cu,
// preprocess.cu); values are computed in f32 and rounded to f16 once.
//
// preprocess_bgr_f16: u8 BGR [pixels][3] → f16 [pixels][8] (B−104, G−117, R−123, then 0 padding: the
//   stem's 3 channels padded for the 16-byte chunks of the tensor-core convs; the integers are exact in
//   f16). Launch 1-D over pixels, 256 threads. Reads 3 B, writes 16 B per pixel.
// maxpool3x3s2_f16: 3×3, stride 2, pad 1 (padding never wins), exact (max of f16 values). Launch 1-D
//   over n·oh·ow·c/8, 256 threads. Reads ≤ 9·16 B, writes 16 B per thread.
// upsample_nearest_add_f16: dst += nearest(src), PyTorch's index rule (upsample.cu). Launch 1-D over
//   n·dh·dw·c/8, 256 threads. Reads 32 B, writes 16 B per thread.
#include "common.cuh"
#include "conv_f16.cuh"
#include "mma.cuh"

extern "C" __global__ void __launch_bounds__(256) preprocess_bgr_f16(const PreprocessF16Params p) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= p.pixels) return;
    const unsigned char* s = p.src + 3 * i;
    uint4 o;
    o.x = pack_half2((float)s[0] - 104.0f, (float)s[1] - 117.0f);
    o.y = pack_half2((float)s[2] - 123.0f, 0.0f);
    o.z = 0u;
    o.w = 0u;
    *reinterpret_cast<uint4*>(p.dst + 8 * i) = o;
}

__device__ __forceinline__ void unpack8(uint4 v, float* f) {
    const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        f[2 * e] = half_to_float((unsigned short)(w[e] & 0xffff));
        f[2 * e + 1] = half_to_float((unsigned short)(w[e] >> 16));
    }
}

__device__ __forceinline__ uint4 pack8(const float* f) {
    uint4 o;
    o.x = pack_half2(f[0], f[1]);
    o.y = pack_half2(f[2], f[3]);
    o.z = pack_half2(f[4], f[5]);
    o.w = pack_half2(f[6], f[7]);
    return o;
}

extern "C" __global__ void __launch_bounds__(256) maxpool3x3s2_f16(const PoolF16Params p) {
    const int c8 = p.c / 8;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= p.n * p.oh * p.ow * c8) return;
    const int cg = i % c8, m = i / c8;
    const int ox = m % p.ow, r = m / p.ow;
    const int oy = r % p.oh, b = r / p.oh;
    float best[8], v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) best[e] = __uint_as_float(0xff800000u);  // −∞
    const int y0 = max(oy * 2 - 1, 0), y1 = min(oy * 2 + 2, p.h);
    const int x0 = max(ox * 2 - 1, 0), x1 = min(ox * 2 + 2, p.w);
    for (int iy = y0; iy < y1; ++iy)
        for (int ix = x0; ix < x1; ++ix) {
            unpack8(*reinterpret_cast<const uint4*>(p.x + ((b * p.h + iy) * p.w + ix) * p.c + 8 * cg), v);
#pragma unroll
            for (int e = 0; e < 8; ++e) best[e] = fmaxf(best[e], v[e]);
        }
    *reinterpret_cast<uint4*>(p.y + m * p.c + 8 * cg) = pack8(best);
}

__device__ __forceinline__ int nearest_src_f16(int d, int in, int out) {
    const float scale = __fdiv_rn((float)in, (float)out);
    const int s = (int)floorf(__fmul_rn((float)d, scale));
    return min(s, in - 1);
}

extern "C" __global__ void __launch_bounds__(256) upsample_nearest_add_f16(const UpsampleAddF16Params p) {
    const int c8 = p.c / 8;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= p.n * p.dh * p.dw * c8) return;
    const int cg = i % c8, m = i / c8;
    const int dx = m % p.dw, r = m / p.dw;
    const int dy = r % p.dh, b = r / p.dh;
    const int sy = nearest_src_f16(dy, p.sh, p.dh), sx = nearest_src_f16(dx, p.sw, p.dw);
    float d[8], s[8];
    uint4* dp = reinterpret_cast<uint4*>(p.dst + m * p.c + 8 * cg);
    unpack8(*dp, d);
    unpack8(*reinterpret_cast<const uint4*>(p.src + ((b * p.sh + sy) * p.sw + sx) * p.c + 8 * cg), s);
#pragma unroll
    for (int e = 0; e < 8; ++e) d[e] += s[e];
    *dp = pack8(d);
}
