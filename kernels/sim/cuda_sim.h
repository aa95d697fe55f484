// cuda_sim.h — our CUDA-on-CPU shim. Compiles the kernels in kernels/*.cu with g++ so that `cargo test`
// runs every kernel on machines without a GPU.
//
// Model: a launch spreads its blocks over OS threads; inside a block every CUDA thread is a fiber with
// its own stack, switched with _setjmp/_longjmp (4-7x faster than swapcontext, which makes a syscall per
// switch). A fiber runs until it reaches a barrier (__syncthreads, a warp shuffle/vote, __syncwarp), so
// the code between two barriers runs thread after thread, which is a legal CUDA schedule. The scheduler
// (cuda_sim.cpp) reports barriers that not every live thread reaches (divergent __syncthreads, a warp op
// with missing lanes) as launch errors instead of hanging.
//
// __shared__ is `static thread_local`: the fibers of a block run on one OS thread and see one copy, and
// blocks on other OS threads have their own. Atomics are real atomics because blocks run concurrently.
// Only what our kernels use is provided; anything else fails to compile, which is the point.
#pragma once
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstring>
#include <cstddef>

#define CUDASIM 1

struct uint3 { unsigned x, y, z; };
struct __attribute__((aligned(16))) uint4 { unsigned x, y, z, w; };
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace cudasim {
struct ThreadCtx {
    uint3 tid;
    unsigned linear;  // x + y·bx + z·bx·by: lane = linear % 32, warp = linear / 32
};
extern thread_local ThreadCtx* t_cur;
extern thread_local uint3 t_blockIdx;
extern thread_local dim3 t_blockDim;
extern thread_local dim3 t_gridDim;

void syncthreads();
// Warp collective: every live lane of the warp posts (op, value, arg) and gets its result back.
enum WarpOp { W_SYNC = 0, W_SHFL = 1, W_SHFL_DOWN = 2, W_SHFL_UP = 3, W_SHFL_XOR = 4, W_BALLOT = 5 };
uint64_t warp_collective(int op, unsigned mask, uint64_t value, int arg, int width);
[[noreturn]] void trap(const char* msg);

// A warp collective computed once for the whole warp: every lane of the warp must post it (a
// `.sync.aligned` PTX instruction: mma.sync, ldmatrix), and when the last lane arrives `fn` runs with
// each lane's pointer (lanes[i] for lane i). fn reads every lane's inputs before writing any output,
// so in-place accumulation (d == c) is safe.
typedef void (*WarpFn)(void* const* lanes);
void warp_call(WarpFn fn, void* mine);
// A warpgroup collective (a `.sync.aligned` wgmma instruction): the 128 threads of an aligned
// warpgroup (warps 4i..4i+3) must all post it; `fn` runs once with lanes[0..128) in thread order.
void group_call(WarpFn fn, void* mine);
// The block's shared-memory window for instructions that take shared addresses as numbers (wgmma's
// matrix descriptors): `base` is address 0 of the window, `bytes` its size. Set by the kernel (on the
// device the window is the hardware's and this is not called).
void set_shared_window(void* base, size_t bytes);
// The host pointer of shared address `addr` (`bytes` long) in the window; traps outside it.
unsigned char* shared_at(unsigned addr, unsigned bytes);
unsigned shared_addr_of(const void* p);
// The calling thread's linear index in its block (lane = % 32, warp = / 32, warpgroup = / 128).
unsigned thread_linear();
// The launch's dynamic shared memory (extern __shared__) and its size.
unsigned char* dynamic_shared();
unsigned dynamic_shared_bytes();
// A number unique to the block being run (over all launches), for per-block state kept outside it.
uint64_t block_serial();
// cp.async as the hardware defines it for one thread: `bytes` (4, 8 or 16) from src to dst, of which
// src_bytes are copied and the rest zero-filled; both addresses aligned to `bytes`. The destination
// is poisoned (0xff bytes: NaN in f16 and f32) at issue and written only when a cp.async.wait_group
// retires the copy's group, so a read that forgot to wait sees NaN.
void cp_async(void* dst, const void* src, int bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending_groups);
// Counts one warp instruction's shared-memory access (bank conflicts) from inside a warp_call.
void count_shared(const void* const* addrs, unsigned nlanes, int bytes);
// Logs one lane's global load of `bytes` for the sector counters (bytes 0: the lane is predicated off);
// entry j of every lane of a warp counts as one warp request, as for cp.async.
void note_global(const void* src, int bytes);

template <class T> inline uint64_t to_bits(T v) { uint64_t b = 0; std::memcpy(&b, &v, sizeof(T)); return b; }
template <class T> inline T from_bits(uint64_t b) { T v; std::memcpy(&v, &b, sizeof(T)); return v; }
}  // namespace cudasim

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __align__(n) __attribute__((aligned(n)))
#define threadIdx (::cudasim::t_cur->tid)
#define blockIdx (::cudasim::t_blockIdx)
#define blockDim (::cudasim::t_blockDim)
#define gridDim (::cudasim::t_gridDim)
#define warpSize 32

inline void __syncthreads() { ::cudasim::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::cudasim::warp_collective(::cudasim::W_SYNC, mask, 0, 0, 32); }
inline void __trap() { ::cudasim::trap("__trap() called"); }

template <class T> inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    return ::cudasim::from_bits<T>(::cudasim::warp_collective(::cudasim::W_SHFL, mask, ::cudasim::to_bits(v), src, width));
}
template <class T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return ::cudasim::from_bits<T>(::cudasim::warp_collective(::cudasim::W_SHFL_DOWN, mask, ::cudasim::to_bits(v), (int)delta, width));
}
template <class T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return ::cudasim::from_bits<T>(::cudasim::warp_collective(::cudasim::W_SHFL_UP, mask, ::cudasim::to_bits(v), (int)delta, width));
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return ::cudasim::from_bits<T>(::cudasim::warp_collective(::cudasim::W_SHFL_XOR, mask, ::cudasim::to_bits(v), lane_mask, width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    return (unsigned)::cudasim::warp_collective(::cudasim::W_BALLOT, mask, pred ? 1 : 0, 0, 32);
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, !pred) == 0; }

// Atomics: blocks run on several OS threads, so these are real atomic read-modify-writes.
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline float atomicAdd(float* p, float v) {
    uint32_t* u = reinterpret_cast<uint32_t*>(p);
    uint32_t old = __atomic_load_n(u, __ATOMIC_RELAXED);
    for (;;) {
        float nv = ::cudasim::from_bits<float>(old) + v;
        if (__atomic_compare_exchange_n(u, &old, (uint32_t)::cudasim::to_bits(nv), false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return ::cudasim::from_bits<float>(old);
    }
}
inline int atomicMax(int* p, int v) {
    int old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
    return old;
}
inline unsigned long long atomicOr(unsigned long long* p, unsigned long long v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }
inline int atomicCAS(int* p, int cmp, int v) { __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED); return cmp; }

// Intrinsics. The *_rn forms exist so that device code can forbid FMA contraction where the CPU
// reference's rounding must be reproduced; the sim is built with -ffp-contract=off so plain ops match.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline unsigned __float_as_uint(float f) { return (unsigned)::cudasim::to_bits(f); }
inline float __uint_as_float(unsigned u) { return ::cudasim::from_bits<float>(u); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __ffsll(long long v) { return __builtin_ffsll(v); }
inline int __clzll(long long v) { return v == 0 ? 64 : __builtin_clzll((unsigned long long)v); }
template <class T> inline T __ldg(const T* p) { return *p; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
// expf, floorf, fmaxf, fminf, fmaf: the C library's, from math.h, in the global namespace as in CUDA.

// Half precision on g++'s _Float16 (IEEE binary16, round to nearest even like the device's cvt.rn).
typedef _Float16 __half;
inline __half __float2half(float f) { return (__half)f; }
inline __half __float2half_rn(float f) { return (__half)f; }
inline float __half2float(__half h) { return (float)h; }
inline __half __hadd(__half a, __half b) { return (__half)((float)a + (float)b); }
inline __half __hmul(__half a, __half b) { return (__half)((float)a * (float)b); }
inline __half __hfma(__half a, __half b, __half c) { return (__half)std::fma((float)a, (float)b, (float)c); }
