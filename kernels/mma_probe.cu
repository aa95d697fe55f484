// mma_probe.cu — one-warp probes of the tensor-core helpers (kernels/mma.cuh), used by tests/mma_sim.rs
// to check the simulation's emulation against a plain matrix product lane by lane, and compiled by the
// SASS test like every family (so the PTX of each helper is checked by ptxas too). Not used in
// inference.
//
// probe_mma: block 32; every lane passes its own registers straight from global memory (a [32][4],
//   b [32][2] u32 of f16x2, c [32][4] f32) and writes d [32][4]: the host places matrix elements by the
//   PTX ISA's fragment formulas, so every lane and fragment index is exercised.
// probe_ldmatrix: block 32; src holds 4 matrices of 8×8 halves (row-major, 16-byte rows); the rows are
//   copied into shared memory in a permuted order (lane l's row address is where row l went) and
//   read back with ldmatrix .x1/.x2/.x4 (.trans per mode), registers written to out [32][4].
// probe_cp_async: block `threads`; each thread copies 16 bytes (src_bytes of them) into shared memory
//   in two commit groups, records what it sees before and after the waits.
// probe_barrier: block `threads`; thread i writes s[i] and reads s[i-1], with or without a barrier
//   between (a missing barrier must show as a wrong value under a random thread order).
// probe_wgmma (wgmma.cuh): block 128 (one warpgroup); src holds A [64][16] then B [n][16] halves
//   (n = threads: 64 or 128), placed in shared memory in K-major layout `mode` (0 interleave with
//   LBO 128 / SBO 256, 1/2/3 the 128/64/32-byte swizzles, 8-row groups dense); c and d are each
//   thread's n/2 accumulator registers. token: scale-d. misalign: 0 one wgmma; 1 the same wgmma twice
//   in one group (D = C + 2AB); 2 thread 0 rewrites an A element before the wait (must trap); 3 each
//   thread stores its first register to out before the wait (must be NaN: in flight).
#include "mma.cuh"
#include "wgmma.cuh"

struct ProbeParams {
    const unsigned* a;
    const unsigned* b;
    const float* c;
    float* d;
    const unsigned short* src;
    unsigned* out;
    int mode;     // ldmatrix: 1, 2, 4 matrices, +8 for .trans; cp_async: src bytes; barrier: 1 = with barrier
    int threads;  // cp_async/barrier: block size
    int misalign; // cp_async: byte offset added to the shared destination (must trap when not 16-aligned)
    int token;    // barrier: a value per launch, so a stale shared value cannot pass for a fresh one
};

extern "C" __global__ void probe_mma(const ProbeParams p) {
    const int l = threadIdx.x;
    unsigned a[4], b[2];
    float c[4], d[4];
    for (int i = 0; i < 4; ++i) a[i] = p.a[l * 4 + i];
    for (int i = 0; i < 2; ++i) b[i] = p.b[l * 2 + i];
    for (int i = 0; i < 4; ++i) c[i] = p.c[l * 4 + i];
    mma_m16n8k16(d, a, b, c);
    for (int i = 0; i < 4; ++i) p.d[l * 4 + i] = d[i];
}

extern "C" __global__ void probe_ldmatrix(const ProbeParams p) {
    __shared__ __align__(128) unsigned short s[32 * 8];
    const int l = threadIdx.x;
    // Row l of the source (matrix l/8, row l%8) goes to shared row (5l + 3) % 32.
    const int slot = (5 * l + 3) % 32;
    for (int i = 0; i < 8; ++i) s[slot * 8 + i] = p.src[l * 8 + i];
    __syncthreads();
    unsigned r[4] = {0, 0, 0, 0};
    const unsigned short* row = s + slot * 8;
    switch (p.mode) {
        case 1: ldmatrix_x1(r, row); break;
        case 2: ldmatrix_x2(r, row); break;
        case 4: ldmatrix_x4(r, row); break;
        case 9: ldmatrix_x1_trans(r, row); break;
        case 10: ldmatrix_x2_trans(r, row); break;
        case 12: ldmatrix_x4_trans(r, row); break;
        default: break;
    }
    for (int i = 0; i < 4; ++i) p.out[l * 4 + i] = r[i];
}

extern "C" __global__ void probe_cp_async(const ProbeParams p) {
    __shared__ __align__(128) unsigned char s[2][1024 + 16];
    const int t = threadIdx.x;
    // Group 0: 16 bytes at src + 16t; group 1: the next 16 bytes after all threads' group-0 bytes.
    cp_async_16(&s[0][16 * t + p.misalign], p.src + 8 * t, p.mode);
    cp_async_commit();
    cp_async_16(&s[1][16 * t], p.src + 8 * (p.threads + t), 16);
    cp_async_commit();
    unsigned* o = p.out + t * 12;
    const unsigned* s0 = reinterpret_cast<const unsigned*>(&s[0][16 * t]);
    const unsigned* s1 = reinterpret_cast<const unsigned*>(&s[1][16 * t]);
    o[0] = s0[0];  // before any wait: in flight
    cp_async_wait<1>();
    for (int i = 0; i < 4; ++i) o[1 + i] = s0[i];  // group 0 landed
    o[5] = s1[0];                                  // group 1 may still be in flight
    cp_async_wait<0>();
    for (int i = 0; i < 4; ++i) o[6 + i] = s1[i];
    o[10] = 0;
    o[11] = 0;
}

extern "C" __global__ void probe_barrier(const ProbeParams p) {
    __shared__ int s[1024];
    const int i = threadIdx.x;
    s[i] = p.token + i;
    if (p.mode == 1) __syncthreads();
    p.out[i] = (unsigned)s[i > 0 ? i - 1 : 0];
}

// Byte offset of element (r, k) of a K-major operand in layout `mode` (see probe_wgmma above).
__device__ int probe_kmajor_byte(int mode, int r, int k) {
    if (mode == 0) return (r / 8) * 256 + (r % 8) * 16 + (k / 8) * 128 + (k % 8) * 2;
    const int width = mode == 1 ? 128 : mode == 2 ? 64 : 32, bits = mode == 1 ? 3 : mode == 2 ? 2 : 1;
    int a = (r / 8) * 8 * width + (r % 8) * width + (k / 8) * 16 + (k % 8) * 2;
    return a ^ (((a >> 7) & ((1 << bits) - 1)) << 4);
}

extern "C" __global__ void __launch_bounds__(128) probe_wgmma(const ProbeParams p) {
    // A at 0 (64 rows of up to 128 bytes), B at 8 KiB (up to 128 rows).
    __shared__ __align__(1024) unsigned char s[8192 + 16384];
    wgmma_shared_window(s, sizeof s);
    const int t = threadIdx.x, n = p.threads;
    for (int i = t; i < 64 * 16; i += blockDim.x)
        *reinterpret_cast<unsigned short*>(s + probe_kmajor_byte(p.mode, i / 16, i % 16)) = p.src[i];
    for (int i = t; i < n * 16; i += blockDim.x)
        *reinterpret_cast<unsigned short*>(s + 8192 + probe_kmajor_byte(p.mode, i / 16, i % 16)) = p.src[64 * 16 + i];
    wgmma_fence_proxy();
    __syncthreads();
    const unsigned lbo = p.mode == 0 ? 128 : 16;
    const unsigned sbo = p.mode == 0 ? 256 : 8 * (p.mode == 1 ? 128 : p.mode == 2 ? 64 : 32);
    const unsigned long long da = wgmma_desc(s, p.mode, lbo, sbo), db = wgmma_desc(s + 8192, p.mode, lbo, sbo);
    float acc[64];
    for (int i = 0; i < n / 2; ++i) acc[i] = p.c[t * (n / 2) + i];
    wgmma_fence_operands<64>(acc);
    wgmma_fence();
    const int times = p.misalign == 1 ? 2 : 1;
    for (int i = 0; i < times; ++i) {
        if (n == 128) wgmma_m64n128k16(acc, da, db, p.token);
        else wgmma_m64n64k16(acc, da, db, p.token);
    }
    wgmma_commit();
    if (p.misalign == 2 && t == 0) s[0] ^= 1;
    if (p.misalign == 3) p.out[t] = __float_as_uint(acc[0]);
    wgmma_wait<0>();
    wgmma_fence_operands<64>(acc);
    for (int i = 0; i < n / 2; ++i) p.d[t * (n / 2) + i] = acc[i];
}
