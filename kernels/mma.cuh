// mma.cuh — the tensor-core and async-copy instructions the f16 kernels use, each as one device helper
// with two bodies: inline PTX for NVRTC (sm_80 and later), and under CUDASIM an emulation in the exact
// fragment layouts of the PTX ISA, run as a warp collective (kernels/sim/cuda_sim.h: warp_call), so
// the same kernel source is what the GPU runs and what the tests check.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"), with
// g = lane / 4 (groupID) and t = lane % 4 (threadID_in_group); a .f16x2 register holds element 2i in
// its low half and 2i+1 in its high half:
//   A (16×16, row-major, 4 regs = 8 halves a0..a7): a_i is (row g + 8·((i/2)%2), col 2t + i%2 + 8·(i/4))
//   B (16×8, "col": K×N, 2 regs = 4 halves b0..b3):  b_i is (row k = 2t + i%2 + 8·(i/2), col n = g)
//   C/D (16×8 f32, 4 regs c0..c3):                   c_i is (row g + 8·(i/2), col 2t + i%2)
// ldmatrix .m8n8 .b16 (.x1/.x2/.x4): lanes 8j..8j+7 give the 16-byte row addresses of matrix j; lane l
// receives in register j the halves (row l/4, cols 2(l%4), 2(l%4)+1) of matrix j, or with .trans the
// halves (rows 2(l%4), 2(l%4)+1, col l/4).
// cp.async.cg (16 bytes, L2 only) with a src-size operand: src_bytes < 16 zero-fills the rest, which
// is how the convolutions read zero padding without a branch around the copy.
#pragma once

#ifdef CUDASIM
namespace mma_sim {
inline float h2f(unsigned short h) { return (float)::cudasim::from_bits<_Float16>(h); }
inline unsigned short f2h(float f) { return (unsigned short)::cudasim::to_bits((_Float16)f); }

struct MmaLane {
    float* d;
    const unsigned* a;
    const unsigned* b;
    const float* c;
};
inline unsigned short half_of(const unsigned* regs, int i) { return (unsigned short)(regs[i / 2] >> (16 * (i % 2))); }
inline void mma_m16n8k16_warp(void* const* lanes) {
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
        const MmaLane& p = *static_cast<const MmaLane*>(lanes[l]);
        const int g = l / 4, t = l % 4;
        for (int i = 0; i < 8; ++i) A[g + 8 * ((i / 2) % 2)][2 * t + i % 2 + 8 * (i / 4)] = h2f(half_of(p.a, i));
        for (int i = 0; i < 4; ++i) B[2 * t + i % 2 + 8 * (i / 2)][g] = h2f(half_of(p.b, i));
        for (int i = 0; i < 4; ++i) C[g + 8 * (i / 2)][2 * t + i % 2] = p.c[i];
    }
    // Products of f16 values are exact in f32; the sum runs in k order in f32 (the hardware's internal
    // order and precision differ slightly: tests allow for f32 accumulation-order error).
    float D[16][8];
    for (int m = 0; m < 16; ++m)
        for (int n = 0; n < 8; ++n) {
            float s = C[m][n];
            for (int k = 0; k < 16; ++k) s += A[m][k] * B[k][n];
            D[m][n] = s;
        }
    for (int l = 0; l < 32; ++l) {
        const MmaLane& p = *static_cast<const MmaLane*>(lanes[l]);
        const int g = l / 4, t = l % 4;
        for (int i = 0; i < 4; ++i) p.d[i] = D[g + 8 * (i / 2)][2 * t + i % 2];
    }
}

template <int NUM, bool TRANS>
struct LdmLane {
    unsigned* r;
    const void* row;
};
template <int NUM, bool TRANS>
inline void ldmatrix_warp(void* const* lanes) {
    const void* rows[32] = {nullptr};
    for (int l = 0; l < 8 * NUM; ++l) {
        const void* a = static_cast<LdmLane<NUM, TRANS>*>(lanes[l])->row;
        if ((uintptr_t)a % 16 != 0) ::cudasim::trap("ldmatrix: row address not 16-byte aligned");
        rows[l] = a;
    }
    ::cudasim::count_shared(rows, 8 * NUM, 16);
    unsigned short M[4][8][8];
    for (int j = 0; j < NUM; ++j)
        for (int r = 0; r < 8; ++r) std::memcpy(M[j][r], rows[8 * j + r], 16);
    for (int l = 0; l < 32; ++l) {
        unsigned* out = static_cast<LdmLane<NUM, TRANS>*>(lanes[l])->r;
        for (int j = 0; j < NUM; ++j) {
            unsigned lo, hi;
            if (TRANS) {
                lo = M[j][2 * (l % 4)][l / 4];
                hi = M[j][2 * (l % 4) + 1][l / 4];
            } else {
                lo = M[j][l / 4][2 * (l % 4)];
                hi = M[j][l / 4][2 * (l % 4) + 1];
            }
            out[j] = lo | (hi << 16);
        }
    }
}
template <int NUM, bool TRANS>
inline void ldmatrix(unsigned* r, const void* row) {
    LdmLane<NUM, TRANS> me{r, row};
    ::cudasim::warp_call(ldmatrix_warp<NUM, TRANS>, &me);
}
}  // namespace mma_sim
#endif

// D = A·B + C, m16n8k16, f16 inputs, f32 accumulation. d may alias c.
__device__ __forceinline__ void mma_m16n8k16(float* d, const unsigned* a, const unsigned* b, const float* c) {
#ifdef CUDASIM
    mma_sim::MmaLane me{d, a, b, c};
    ::cudasim::warp_call(mma_sim::mma_m16n8k16_warp, &me);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#endif
}

#ifndef CUDASIM
__device__ __forceinline__ unsigned smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
#endif

// ldmatrix .x4 / .x2 / .x1 (.trans): `row` is this lane's row address (lanes beyond 8·NUM: ignored).
__device__ __forceinline__ void ldmatrix_x4(unsigned* r, const void* row) {
#ifdef CUDASIM
    mma_sim::ldmatrix<4, false>(r, row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
#endif
}
__device__ __forceinline__ void ldmatrix_x2(unsigned* r, const void* row) {
#ifdef CUDASIM
    mma_sim::ldmatrix<2, false>(r, row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(row)));
#endif
}
__device__ __forceinline__ void ldmatrix_x1(unsigned* r, const void* row) {
#ifdef CUDASIM
    mma_sim::ldmatrix<1, false>(r, row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_addr(row)));
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, const void* row) {
#ifdef CUDASIM
    mma_sim::ldmatrix<4, true>(r, row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
#endif
}
__device__ __forceinline__ void ldmatrix_x2_trans(unsigned* r, const void* row) {
#ifdef CUDASIM
    mma_sim::ldmatrix<2, true>(r, row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_addr(row)));
#endif
}
__device__ __forceinline__ void ldmatrix_x1_trans(unsigned* r, const void* row) {
#ifdef CUDASIM
    mma_sim::ldmatrix<1, true>(r, row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_addr(row)));
#endif
}

// 16 bytes global → shared, asynchronously; src_bytes (0..16) are read, the rest of the 16 zero-filled.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
#ifdef CUDASIM
    ::cudasim::cp_async(smem, gmem, 16, src_bytes);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(src_bytes));
#endif
}
// 4 bytes (cp.async.ca: .cg only moves 16), for tests of the small forms.
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, int src_bytes) {
#ifdef CUDASIM
    ::cudasim::cp_async(smem, gmem, 4, src_bytes);
#else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(src_bytes));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef CUDASIM
    ::cudasim::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef CUDASIM
    ::cudasim::cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// 16 bytes from global memory when `ok`, else zeros (a predicated vector load; the simulation counts
// its sectors, so call it on every lane and let `ok` say which lanes load).
__device__ __forceinline__ uint4 ldg16_or_zero(const void* p, bool ok) {
#ifdef CUDASIM
    ::cudasim::note_global(p, ok ? 16 : 0);
#endif
    uint4 v = {0u, 0u, 0u, 0u};
    if (ok) v = __ldg(static_cast<const uint4*>(p));
    return v;
}

// f16 <-> f32 without cuda_fp16.h (NVRTC then needs no CUDA include directory). Round to nearest even.
__device__ __forceinline__ float half_to_float(unsigned short h) {
#ifdef CUDASIM
    return mma_sim::h2f(h);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;\n" : "=f"(f) : "h"(h));
    return f;
#endif
}
__device__ __forceinline__ unsigned short float_to_half(float f) {
#ifdef CUDASIM
    return mma_sim::f2h(f);
#else
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;\n" : "=h"(h) : "f"(f));
    return h;
#endif
}
// Two f32 as one .f16x2 word: lo in bits 0..15 (the lower address when stored).
__device__ __forceinline__ unsigned pack_half2(float lo, float hi) {
    return (unsigned)float_to_half(lo) | ((unsigned)float_to_half(hi) << 16);
}
