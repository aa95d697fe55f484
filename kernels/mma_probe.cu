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
#include "mma.cuh"

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
