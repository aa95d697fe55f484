// wgmma.cuh — Hopper's warpgroup tensor-core instructions (sm_90a: wgmma.mma_async with both operands
// in shared memory, described by 64-bit matrix descriptors), each as one device helper with two bodies:
// inline PTX for NVRTC when the target is sm_90a (__CUDA_ARCH_FEAT_SM90_ALL; elsewhere the helpers
// trap, and the registry never offers their kernels), and under CUDASIM an emulation from the PTX ISA
// run as a warpgroup collective (kernels/sim/cuda_sim.h: group_call).
//
// What the emulation models (PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"):
// - the matrix descriptor: start address >> 4 in bits 0–13, leading byte offset >> 4 in 16–29, stride
//   byte offset >> 4 in 32–45, base offset in 49–51 (must be 0 here), layout in 62–63 (0 interleave,
//   1 128-byte, 2 64-byte, 3 32-byte swizzle);
// - K-major operands (transpose 0), in 16-byte units: swizzled W-byte layouts are
//   Swizzle<log2(W/16), 4, 3> o ((8, rows/8), 2) : ((W/16, SBO), 1) — 8 rows of W bytes, row groups SBO
//   apart, the k16 step's two 16-byte chunks adjacent, and address bits 4.. XORed with bits 7.. of the
//   absolute shared address; the interleaved layout is ((8, rows/8), 2) : ((1, SBO), LBO);
// - the accumulator fragment of m64nNk16: warp w of the group holds rows 16w..16w+15; register 4j + i of
//   lane l is (row 16w + l/4 + 8·(i/2), column 8j + 2·(l%4) + i%2), as mma.m16n8 per n8 block;
// - asynchrony: an issued wgmma reads its operands at issue and poisons its accumulator registers
//   (NaN) until the wgmma.wait_group that retires its group writes the result; the retiring wait
//   re-reads both operands and traps if shared memory changed while the instruction was in flight.
//   Chained wgmmas on one accumulator see each other's results, as on the device. Sums run in k order
//   in f32 from the accumulator, as mma.cuh's m16n8k16 emulation does, so a kernel gives the same bits
//   on either instruction in the simulation (the hardware's internal order differs slightly).
// Operands written by ordinary stores or cp.async reach the async proxy that wgmma reads through only
// after fence.proxy.async (wgmma_fence_proxy) and a barrier: the kernels do both before each k-tile.
#pragma once
#include "mma.cuh"

#ifdef CUDASIM
#include <map>
#include <vector>
namespace wgmma_sim {
struct Lane {
    float* d;
    unsigned long long da, db;
    int scale_d, n;
    unsigned group;  // warpgroup index in the block
};
struct Pending {
    unsigned commit;  // the commit group it belongs to
    unsigned long long da, db;
    int n;
    std::vector<unsigned short> a, b;
    float* key;
};
// An accumulator with wgmmas in flight: its value after every issued one, and the 128 threads'
// registers that receive it when the last of them retires.
struct Accumulator {
    std::vector<float> value;
    std::vector<float*> regs;
};
struct Group {
    uint64_t block = 0;  // cudasim::block_serial of the block it belongs to
    unsigned open = 0;  // wgmmas issued now belong to commit group `open`
    std::vector<Pending> pending;
    std::map<float*, Accumulator> in_flight;  // keyed by lane 0's registers
};
inline thread_local Group t_groups[8];

inline Group& group(unsigned g) {
    if (g >= 8) ::cudasim::trap("wgmma: more than 8 warpgroups in a block");
    Group& s = t_groups[g];
    const uint64_t b = ::cudasim::block_serial();
    if (s.block != b) {
        // A block that exited with wgmmas in flight is not caught here when its launch failed (a trap
        // leaves them behind); its state is dropped.
        s = Group{};
        s.block = b;
    }
    return s;
}

// The rows × 16 K-major operand a descriptor describes, read from the shared window.
inline std::vector<unsigned short> read_operand(unsigned long long desc, int rows) {
    const unsigned start = (unsigned)(desc & 0x3fff) << 4;
    const unsigned lbo = (unsigned)((desc >> 16) & 0x3fff) << 4;
    const unsigned sbo = (unsigned)((desc >> 32) & 0x3fff) << 4;
    const unsigned base_offset = (unsigned)((desc >> 49) & 7);
    const unsigned layout = (unsigned)(desc >> 62);
    if (base_offset != 0) ::cudasim::trap("wgmma descriptor: base offset other than 0 (not emulated)");
    const unsigned width = layout == 0 ? 16 : layout == 1 ? 128 : layout == 2 ? 64 : 32;
    const unsigned bits = layout == 0 ? 0 : layout == 1 ? 3 : layout == 2 ? 2 : 1;
    std::vector<unsigned short> out((size_t)rows * 16);
    for (int r = 0; r < rows; ++r)
        for (int k = 0; k < 16; ++k) {
            unsigned a = start + (unsigned)(r / 8) * sbo + (unsigned)(r % 8) * width + (unsigned)(k % 8) * 2;
            a += layout == 0 ? (unsigned)(k / 8) * lbo : (unsigned)(k / 8) * 16;
            a ^= ((a >> 7) & ((1u << bits) - 1)) << 4;
            unsigned short v;
            std::memcpy(&v, ::cudasim::shared_at(a, 2), 2);
            out[(size_t)r * 16 + k] = v;
        }
    return out;
}

// Element (row, col) of an m64nN accumulator for register `reg` of thread `t` (0..127) of the group.
inline int acc_index(int t, int reg, int n) {
    const int w = t / 32, l = t % 32, j = reg / 4, i = reg % 4;
    const int row = 16 * w + l / 4 + 8 * (i / 2), col = 8 * j + 2 * (l % 4) + i % 2;
    return row * n + col;
}

inline void issue_group(void* const* lanes) {
    const Lane& l0 = *static_cast<const Lane*>(lanes[0]);
    for (int t = 1; t < 128; ++t) {
        const Lane& l = *static_cast<const Lane*>(lanes[t]);
        if (l.da != l0.da || l.db != l0.db || l.scale_d != l0.scale_d || l.n != l0.n)
            ::cudasim::trap("wgmma: the threads of a warpgroup pass different descriptors or scale-d");
    }
    Group& g = group(l0.group);
    const int n = l0.n;
    Pending p{g.open, l0.da, l0.db, n, read_operand(l0.da, 64), read_operand(l0.db, n), l0.d};
    std::vector<float> acc((size_t)64 * n, 0.0f);
    auto it = g.in_flight.find(l0.d);
    if (l0.scale_d) {
        if (it != g.in_flight.end()) {
            acc = it->second.value;
        } else {
            for (int t = 0; t < 128; ++t)
                for (int r = 0; r < n / 2; ++r) acc[acc_index(t, r, n)] = static_cast<const Lane*>(lanes[t])->d[r];
        }
    }
    for (int m = 0; m < 64; ++m)
        for (int c = 0; c < n; ++c) {
            float s = acc[(size_t)m * n + c];
            for (int k = 0; k < 16; ++k) s += mma_sim::h2f(p.a[(size_t)m * 16 + k]) * mma_sim::h2f(p.b[(size_t)c * 16 + k]);
            acc[(size_t)m * n + c] = s;
        }
    std::vector<float*> regs(128);
    for (int t = 0; t < 128; ++t) {
        regs[t] = static_cast<const Lane*>(lanes[t])->d;
        for (int r = 0; r < n / 2; ++r) regs[t][r] = __builtin_nanf("");
    }
    g.in_flight[l0.d] = Accumulator{std::move(acc), std::move(regs)};
    g.pending.push_back(std::move(p));
}

inline void issue(float* d, unsigned long long da, unsigned long long db, int scale_d, int n) {
    Lane me{d, da, db, scale_d, n, ::cudasim::thread_linear() / 128};
    ::cudasim::group_call(issue_group, &me);
}

struct Sync {
    unsigned group;
    int keep;
};
inline void commit_group(void* const* lanes) { group(static_cast<const Sync*>(lanes[0])->group).open += 1; }

inline void wait_group(void* const* lanes) {
    const Sync& s = *static_cast<const Sync*>(lanes[0]);
    Group& g = group(s.group);
    const long long retire_below = (long long)g.open - s.keep;
    std::vector<Pending> left;
    for (Pending& p : g.pending) {
        if ((long long)p.commit >= retire_below) {
            left.push_back(std::move(p));
            continue;
        }
        if (read_operand(p.da, 64) != p.a || read_operand(p.db, p.n) != p.b)
            ::cudasim::trap("wgmma: shared memory under an operand changed before wgmma.wait_group retired it");
    }
    g.pending = std::move(left);
    for (auto it = g.in_flight.begin(); it != g.in_flight.end();) {
        bool busy = false;
        for (const Pending& p : g.pending) busy |= p.key == it->first;
        if (busy) {
            ++it;
            continue;
        }
        const Accumulator& a = it->second;
        const int n = (int)(a.value.size() / 64);
        for (int t = 0; t < 128; ++t)
            for (int r = 0; r < n / 2; ++r) a.regs[t][r] = a.value[acc_index(t, r, n)];
        it = g.in_flight.erase(it);
    }
}
inline void fence_group(void* const*) {}
}  // namespace wgmma_sim
#endif

// The shared address of p (what descriptors and shared-state-space PTX take).
__device__ __forceinline__ unsigned wgmma_shared_addr(const void* p) {
#ifdef CUDASIM
    return ::cudasim::shared_addr_of(p);
#else
    return smem_addr(p);
#endif
}

// The launch's dynamic shared memory (extern __shared__: the Hopper tiles' rings exceed the 48 KiB a
// kernel may declare statically) and its size in bytes.
#ifdef CUDASIM
#define DYNAMIC_SHARED(name) unsigned char* const name = ::cudasim::dynamic_shared()
__device__ __forceinline__ unsigned dynamic_shared_size() { return ::cudasim::dynamic_shared_bytes(); }
#else
#define DYNAMIC_SHARED(name) extern __shared__ __align__(1024) unsigned char name[]
__device__ __forceinline__ unsigned dynamic_shared_size() {
    unsigned r;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(r));
    return r;
}
#endif

// Traps unless ok (the simulation names `what`; the device has only __trap).
__device__ __forceinline__ void require(bool ok, const char* what) {
#ifdef CUDASIM
    if (!ok) ::cudasim::trap(what);
#else
    (void)what;
    if (!ok) __trap();
#endif
}

// Bytes from p up to the next 1024-aligned shared address (0 when aligned).
__device__ __forceinline__ unsigned shared_pad_to_1024(const void* p) {
#ifdef CUDASIM
    const unsigned a = (unsigned)((uintptr_t)p % 1024);
#else
    const unsigned a = smem_addr(p) % 1024;
#endif
    return (1024 - a) % 1024;
}

// Tells the simulation where the block's shared memory lies (descriptors hold shared addresses, not
// pointers); nothing on the device.
__device__ __forceinline__ void wgmma_shared_window(void* base, unsigned bytes) {
#ifdef CUDASIM
    ::cudasim::set_shared_window(base, bytes);
#else
    (void)base;
    (void)bytes;
#endif
}

// A matrix descriptor: operand at shared pointer p, layout (0 interleave, 1 128-byte, 2 64-byte, 3 32-byte
// swizzle), leading and stride byte offsets (multiples of 16), base offset 0.
__device__ __forceinline__ unsigned long long wgmma_desc(const void* p, unsigned layout, unsigned lbo, unsigned sbo) {
    const unsigned a = wgmma_shared_addr(p);
    return (unsigned long long)((a >> 4) & 0x3fff) | ((unsigned long long)((lbo >> 4) & 0x3fff) << 16) |
           ((unsigned long long)((sbo >> 4) & 0x3fff) << 32) | ((unsigned long long)(layout & 3) << 62);
}

// Descriptor of a K-major operand in the 64-byte swizzle: rows of 32 halves (64 bytes) with 16-byte
// chunk c of row r stored at chunk c ^ ((r / 2) % 4) — conv_f16's convh_swz — groups of 8 rows 512 bytes
// apart. `p` is the operand's first row at the k16 step's first chunk (tile + 16 halves for the second
// step of a 32-deep k-tile); the tile itself must be 512-byte aligned. The leading byte offset is
// unused by swizzled K-major layouts (1 by convention).
__device__ __forceinline__ unsigned long long wgmma_desc_k64b(const void* p) { return wgmma_desc(p, 2, 16, 512); }

// wgmma.fence: orders this warpgroup's register accesses before the wgmmas that follow.
__device__ __forceinline__ void wgmma_fence() {
#ifdef CUDASIM
    wgmma_sim::Sync me{::cudasim::thread_linear() / 128, 0};
    ::cudasim::group_call(wgmma_sim::fence_group, &me);
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#else
    __trap();
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef CUDASIM
    wgmma_sim::Sync me{::cudasim::thread_linear() / 128, 0};
    ::cudasim::group_call(wgmma_sim::commit_group, &me);
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#else
    __trap();
#endif
}
// Waits until at most N committed wgmma groups of this warpgroup are in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#ifdef CUDASIM
    wgmma_sim::Sync me{::cudasim::thread_linear() / 128, N};
    ::cudasim::group_call(wgmma_sim::wait_group, &me);
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#else
    __trap();
#endif
}
// Makes this thread's generic-proxy writes to shared memory (stores, cp.async) visible to the async
// proxy that wgmma reads through; a barrier then publishes them to the warpgroup.
__device__ __forceinline__ void wgmma_fence_proxy() {
#if !defined(CUDASIM) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// Keeps the compiler from moving accesses of accumulator registers across the asynchronous wgmmas
// (an empty asm that reads and writes each register).
template <int R>
__device__ __forceinline__ void wgmma_fence_operands(float* d) {
#ifndef CUDASIM
#pragma unroll
    for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
#else
    (void)d;
#endif
}

// D (m64 × N, f32, the fragment above; N = 64, 128 or 256) = A (m64 × k16, f16, descriptor da) · B (N × k16, f16,
// descriptor db)ᵀ + (scale_d ? D : 0), asynchronously: D is valid after the wgmma_wait that retires it.
__device__ __forceinline__ void wgmma_m64n128k16(float* d, unsigned long long da, unsigned long long db, int scale_d) {
#ifdef CUDASIM
    wgmma_sim::issue(d, da, db, scale_d, 128);
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(scale_d));
#else
    __trap();
#endif
}

__device__ __forceinline__ void wgmma_m64n64k16(float* d, unsigned long long da, unsigned long long db, int scale_d) {
#ifdef CUDASIM
    wgmma_sim::issue(d, da, db, scale_d, 64);
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(scale_d));
#else
    __trap();
#endif
}

__device__ __forceinline__ void wgmma_m64n256k16(float* d, unsigned long long da, unsigned long long db, int scale_d) {
#ifdef CUDASIM
    wgmma_sim::issue(d, da, db, scale_d, 256);
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
          "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
          "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
          "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(da), "l"(db), "r"(scale_d));
#else
    __trap();
#endif
}
