// cuda_sim.cpp — the scheduler behind cuda_sim.h: blocks over OS threads, CUDA threads as fibers.
//
// Each OS worker owns one fiber per thread of the block, created once per launch with makecontext (the
// only ucontext call) and from then on switched with _setjmp/_longjmp. A fiber loops: wait for a block,
// run the kernel body, report done. The scheduler runs every runnable fiber until it blocks, then
// resolves barriers: a __syncthreads completes when every thread of the block waits at it, a warp
// collective when every lane of the warp posted it. Anything else (a thread exited while others wait at
// __syncthreads, lanes of a warp at different barriers) is a divergence and fails the launch.
//
// Between two barriers the runnable fibers run in a seeded random order (a new permutation every
// round), so code that depends on one thread finishing before another without a barrier fails here as
// it can on the device; seed 0 keeps thread order (cudasim_set_order_seed, or RETINAFACE_SIM_SEED).
//
// The tensor-core path adds warp_call (mma.sync, ldmatrix: computed once per warp from all 32 lanes'
// operands), cp.async (per-thread copies queued until wait_group retires their group) and per-launch
// counters of shared-memory bank conflicts and global sectors per warp request (cudasim_counters).
#include "cuda_sim.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <csetjmp>
#include <cstdio>
#include <mutex>
#include <string>
#include <sys/mman.h>
#include <thread>
#include <ucontext.h>
#include <unistd.h>
#include <vector>

namespace cudasim {
thread_local ThreadCtx* t_cur = nullptr;
thread_local uint3 t_blockIdx;
thread_local dim3 t_blockDim;
thread_local dim3 t_gridDim;

namespace {
// 256 KiB per fiber plus a guard page: kernels keep small register-like locals, and an overflow hits the
// guard instead of a neighbour's stack.
constexpr size_t kStack = 256 * 1024;
constexpr size_t kGuard = 4096;

enum State { IDLE, RUNNABLE, AT_BLOCK_BARRIER, AT_WARP, DONE };
constexpr int W_CALL = 100;
constexpr int W_GROUP_CALL = 101;

// One cp.async in flight: the bytes read at issue (the source is global memory, read-only for the
// kernel's life), written to dst when its group retires.
struct PendingCopy {
    void* dst;
    int bytes;
    unsigned group;
    unsigned char data[16];
};

// One lane's cp.async as the counters see it; entry j of every lane of a warp is one warp instruction.
struct CopyAccess {
    const void* dst;
    const void* src;
    int bytes, src_bytes;
};

// Per-launch efficiency counters (see cudasim_counters).
struct Counters {
    uint64_t shared_requests = 0, shared_wavefronts = 0, shared_ideal = 0;
    uint64_t global_requests = 0, global_sectors = 0, global_bytes = 0;
};
// Both belong to the thread that launches (tests launch from several threads at once).
thread_local Counters t_last_counters;
thread_local uint64_t t_seed = 0;
thread_local bool t_seed_set = false;
thread_local unsigned t_dynamic_shared = 0;  // the next launch's dynamic shared memory

struct Fiber {
    jmp_buf ctx;
    State state = IDLE;
    ThreadCtx tc{};
    int op = 0;
    unsigned mask = 0;
    uint64_t value = 0, result = 0;
    int arg = 0, width = 32;
    WarpFn call = nullptr;
    std::vector<PendingCopy> copies;
    unsigned open_group = 0;  // copies issued since the last commit carry this group number
    std::vector<CopyAccess> log;
};

typedef void (*KernelFn)(const void*);

struct Worker {
    jmp_buf sched;
    std::vector<Fiber> fibers;
    unsigned char* stacks = nullptr;
    size_t stacks_len = 0;
    KernelFn fn = nullptr;
    const void* params = nullptr;
    std::string error;
    std::vector<unsigned> order;
    uint64_t rng = 0;
    Counters counters;
    unsigned char* shared_base = nullptr;
    size_t shared_bytes = 0;
    uint64_t block_serial = 0;
    unsigned char* dynamic = nullptr;  // this worker's dynamic shared memory (1024-aligned)
    unsigned dynamic_bytes = 0;
};
std::atomic<uint64_t> g_block_serial{0};

thread_local Worker* t_worker = nullptr;
thread_local int t_index = 0;
// True while a warp or warpgroup collective runs on the scheduler's stack: a trap there cannot jump
// to the scheduler (it is the scheduler), so it throws to the collective's caller instead.
thread_local bool t_in_collective = false;
struct CollectiveTrap {
    std::string msg;
};

// Runs a collective's body; false (with err) if it trapped.
bool run_collective(WarpFn fn, void* const* lanes, std::string& err) {
    t_in_collective = true;
    try {
        fn(lanes);
    } catch (const CollectiveTrap& t) {
        t_in_collective = false;
        err = "kernel trapped: " + t.msg;
        return false;
    }
    t_in_collective = false;
    return true;
}

void fiber_entry() {
    Worker* w = t_worker;
    Fiber* f = &w->fibers[t_index];
    for (;;) {
        if (_setjmp(f->ctx) == 0) _longjmp(w->sched, 1);
        w->fn(w->params);
        f->state = DONE;
    }
}

void yield_current() {
    Worker* w = t_worker;
    Fiber* f = &w->fibers[t_index];
    if (_setjmp(f->ctx) == 0) _longjmp(w->sched, 1);
}

bool create_fibers(Worker* w, unsigned n) {
    w->fibers.resize(n);
    w->stacks_len = n * (kStack + kGuard);
    void* mem = mmap(nullptr, w->stacks_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) {
        w->error = "cannot map fiber stacks";
        return false;
    }
    w->stacks = static_cast<unsigned char*>(mem);
    for (unsigned i = 0; i < n; ++i) {
        unsigned char* base = w->stacks + i * (kStack + kGuard);
        mprotect(base, kGuard, PROT_NONE);  // stacks grow down into the guard page
        ucontext_t uc;
        getcontext(&uc);
        uc.uc_stack.ss_sp = base + kGuard;
        uc.uc_stack.ss_size = kStack;
        uc.uc_link = nullptr;
        makecontext(&uc, fiber_entry, 0);
        t_index = (int)i;
        if (_setjmp(w->sched) == 0) setcontext(&uc);
        // The fiber parked itself at the top of its loop.
    }
    return true;
}

void resume(Worker* w, unsigned i) {
    t_index = (int)i;
    t_cur = &w->fibers[i].tc;
    if (_setjmp(w->sched) == 0) _longjmp(w->fibers[i].ctx, 1);
}

uint64_t next_rand(uint64_t& s) {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return s * 0x2545f4914f6cdd1dull;
}

void shuffle(Worker* w) {
    std::vector<unsigned>& o = w->order;
    for (size_t i = o.size(); i > 1; --i) std::swap(o[i - 1], o[next_rand(w->rng) % i]);
}

// Wavefronts one warp instruction's shared access needs: lanes are served in phases of 128 bytes
// (32 lanes of 4 bytes, 16 of 8, 8 of 16); within a phase, distinct 4-byte words in one bank serialise.
void count_shared_into(Counters& c, const void* const* addrs, unsigned nlanes, int bytes) {
    if (bytes != 4 && bytes != 8 && bytes != 16) return;  // global-only log entries have no shared side
    const unsigned per_phase = 128u / (unsigned)bytes;
    bool any = false;
    for (unsigned p0 = 0; p0 < nlanes; p0 += per_phase) {
        uintptr_t words[32][32];
        unsigned nword[32] = {0};
        bool active = false;
        for (unsigned l = p0; l < std::min(nlanes, p0 + per_phase); ++l) {
            if (!addrs[l]) continue;
            active = true;
            uintptr_t a = (uintptr_t)addrs[l] / 4;
            for (int k = 0; k < bytes / 4; ++k) {
                uintptr_t word = a + k;
                unsigned bank = word % 32;
                bool seen = false;
                for (unsigned j = 0; j < nword[bank]; ++j) seen |= words[bank][j] == word;
                if (!seen && nword[bank] < 32) words[bank][nword[bank]++] = word;
            }
        }
        if (!active) continue;
        any = true;
        unsigned wf = 0;
        for (unsigned b = 0; b < 32; ++b) wf = std::max(wf, nword[b]);
        c.shared_wavefronts += wf;
        c.shared_ideal += 1;
    }
    if (any) c.shared_requests += 1;
}

// Global sectors of one warp request: distinct 32-byte sectors touched, against the distinct bytes
// the lanes asked for (overlapping lanes count once, as the coalescer merges them).
void count_global(Counters& c, const CopyAccess* const* acc, unsigned nlanes) {
    std::vector<std::pair<uintptr_t, uintptr_t>> iv;
    for (unsigned l = 0; l < nlanes; ++l)
        if (acc[l] && acc[l]->src_bytes > 0) iv.push_back({(uintptr_t)acc[l]->src, (uintptr_t)acc[l]->src + acc[l]->src_bytes});
    if (iv.empty()) return;
    std::sort(iv.begin(), iv.end());
    uint64_t bytes = 0, sectors = 0;
    uintptr_t cur_lo = iv[0].first, cur_hi = iv[0].second, last_sector = ~(uintptr_t)0;
    auto close = [&](uintptr_t lo, uintptr_t hi) {
        bytes += hi - lo;
        for (uintptr_t s = lo / 32; s <= (hi - 1) / 32; ++s)
            if (s != last_sector) { sectors += 1; last_sector = s; }
    };
    for (size_t i = 1; i < iv.size(); ++i) {
        if (iv[i].first <= cur_hi) { cur_hi = std::max(cur_hi, iv[i].second); continue; }
        close(cur_lo, cur_hi);
        cur_lo = iv[i].first;
        cur_hi = iv[i].second;
    }
    close(cur_lo, cur_hi);
    c.global_requests += 1;
    c.global_sectors += sectors;
    c.global_bytes += bytes;
}

// Counts the cp.async instructions logged since the last flush, warp instruction by warp instruction.
void flush_counts(Worker* w, unsigned nthreads) {
    for (unsigned lo = 0; lo < nthreads; lo += 32) {
        unsigned hi = std::min(nthreads, lo + 32);
        size_t len = 0;
        for (unsigned i = lo; i < hi; ++i) len = std::max(len, w->fibers[i].log.size());
        for (size_t j = 0; j < len; ++j) {
            const void* sh[32] = {nullptr};
            const CopyAccess* ga[32] = {nullptr};
            int bytes = 16;
            for (unsigned i = lo; i < hi; ++i) {
                const std::vector<CopyAccess>& lg = w->fibers[i].log;
                if (j >= lg.size()) continue;
                sh[i - lo] = lg[j].dst;
                ga[i - lo] = &lg[j];
                bytes = lg[j].bytes;
            }
            count_shared_into(w->counters, sh, hi - lo, bytes);
            count_global(w->counters, ga, hi - lo);
        }
        for (unsigned i = lo; i < hi; ++i) w->fibers[i].log.clear();
    }
}

bool resolve_call(Worker* w, unsigned warp, unsigned lo, unsigned hi, unsigned posted, std::string& err) {
    Fiber* fs = &w->fibers[0];
    if (hi - lo != 32 || posted != 0xffffffffu) {
        err = "warp " + std::to_string(warp) + ": a .sync.aligned warp instruction (mma/ldmatrix) needs all 32 lanes, " +
              std::to_string(__builtin_popcount(posted)) + " of " + std::to_string(hi - lo) + " took part";
        return false;
    }
    void* lanes[32];
    for (unsigned i = lo; i < hi; ++i) {
        if (fs[i].call != fs[lo].call) { err = "lanes of warp " + std::to_string(warp) + " execute different warp instructions"; return false; }
        lanes[i - lo] = reinterpret_cast<void*>(fs[i].value);
    }
    if (!run_collective(fs[lo].call, lanes, err)) return false;
    for (unsigned i = lo; i < hi; ++i) fs[i].state = RUNNABLE;
    return true;
}

// A warpgroup collective, resolved by the group's first warp once all 128 threads posted it.
bool resolve_group(Worker* w, unsigned warp, unsigned nthreads, std::string& err) {
    if (warp % 4 != 0) return true;
    const unsigned lo = warp * 32, hi = lo + 128;
    const std::string name = "warpgroup " + std::to_string(warp / 4);
    if (hi > nthreads) {
        err = name + ": a .sync.aligned warpgroup instruction (wgmma) in a block of " + std::to_string(nthreads) + " threads";
        return false;
    }
    Fiber* fs = &w->fibers[0];
    void* lanes[128];
    for (unsigned i = lo; i < hi; ++i) {
        if (fs[i].state == DONE) { err = name + ": a thread exited while the others wait at a wgmma instruction"; return false; }
        if (fs[i].state != AT_WARP) return true;  // not every thread has arrived yet
        if (fs[i].op != W_GROUP_CALL || fs[i].call != fs[lo].call) {
            err = name + ": threads execute different warpgroup instructions";
            return false;
        }
        lanes[i - lo] = reinterpret_cast<void*>(fs[i].value);
    }
    if (!run_collective(fs[lo].call, lanes, err)) return false;
    for (unsigned i = lo; i < hi; ++i) fs[i].state = RUNNABLE;
    return true;
}

bool resolve_warp(Worker* w, unsigned warp, unsigned nthreads, std::string& err) {
    unsigned lo = warp * 32, hi = std::min(nthreads, lo + 32);
    Fiber* fs = &w->fibers[0];
    int op = -1;
    unsigned posted = 0;
    for (unsigned i = lo; i < hi; ++i) {
        if (fs[i].state == AT_WARP) {
            if (op >= 0 && fs[i].op != op) { err = "lanes of warp " + std::to_string(warp) + " wait at different warp collectives"; return false; }
            op = fs[i].op;
            posted |= 1u << (i - lo);
        } else if (fs[i].state != DONE) {
            return true;  // not every lane has arrived yet
        }
    }
    if (op < 0) return true;
    if (op == W_CALL) return resolve_call(w, warp, lo, hi, posted, err);
    if (op == W_GROUP_CALL) return resolve_group(w, warp, nthreads, err);
    for (unsigned i = lo; i < hi; ++i) {
        if (fs[i].state != AT_WARP) continue;
        unsigned m = fs[i].mask;
        // Lanes named in the mask must all take part (lanes beyond the block do not exist).
        unsigned exist = (hi - lo) == 32 ? 0xffffffffu : ((1u << (hi - lo)) - 1);
        if ((m & exist & ~posted) != 0) { err = "warp " + std::to_string(warp) + ": a collective's mask names lanes that exited or diverged"; return false; }
    }
    for (unsigned i = lo; i < hi; ++i) {
        Fiber& f = fs[i];
        if (f.state != AT_WARP) continue;
        int lane = (int)(i - lo);
        int width = f.width, seg = lane - lane % width;
        int src = lane;
        switch (f.op) {
            case W_SYNC: break;
            case W_SHFL: src = seg + (f.arg % width); break;
            case W_SHFL_DOWN: src = lane + f.arg < seg + width ? lane + f.arg : lane; break;
            case W_SHFL_UP: src = lane - f.arg >= seg ? lane - f.arg : lane; break;
            case W_SHFL_XOR: src = ((lane ^ f.arg) < seg + width && (lane ^ f.arg) >= seg) ? (lane ^ f.arg) : lane; break;
            case W_BALLOT: break;
        }
        if (f.op == W_BALLOT) {
            uint64_t b = 0;
            for (unsigned j = lo; j < hi; ++j)
                if (fs[j].state == AT_WARP && fs[j].value && ((f.mask >> (j - lo)) & 1)) b |= 1ull << (j - lo);
            f.result = b;
        } else {
            unsigned s = lo + (unsigned)src;
            if (s >= hi || fs[s].state != AT_WARP) { err = "warp " + std::to_string(warp) + ": shuffle reads a lane that is not taking part"; return false; }
            f.result = fs[s].value;
        }
    }
    for (unsigned i = lo; i < hi; ++i)
        if (fs[i].state == AT_WARP) fs[i].state = RUNNABLE;
    return true;
}

// Runs one block to completion; false (with w->error) on a divergence or deadlock.
bool run_block(Worker* w, unsigned nthreads) {
    const dim3 bd = t_blockDim;
    for (unsigned i = 0; i < nthreads; ++i) {
        Fiber& f = w->fibers[i];
        f.state = RUNNABLE;
        f.copies.clear();
        f.open_group = 0;
        f.log.clear();
        f.tc.linear = i;
        f.tc.tid = uint3{i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y)};
    }
    w->shared_base = nullptr;
    w->shared_bytes = 0;
    w->block_serial = g_block_serial.fetch_add(1) + 1;
    // Shared memory starts undefined on the device: poison it, so a read of what no thread wrote shows.
    if (w->dynamic) std::memset(w->dynamic, 0xff, w->dynamic_bytes);
    w->order.resize(nthreads);
    for (unsigned i = 0; i < nthreads; ++i) w->order[i] = i;
    for (;;) {
        if (w->rng != 0) shuffle(w);
        for (unsigned i : w->order)
            if (w->fibers[i].state == RUNNABLE) resume(w, i);
        if (!w->error.empty()) return false;
        unsigned done = 0, at_block = 0, at_warp = 0;
        for (unsigned i = 0; i < nthreads; ++i) {
            State s = w->fibers[i].state;
            done += s == DONE;
            at_block += s == AT_BLOCK_BARRIER;
            at_warp += s == AT_WARP;
        }
        if (done == nthreads) {
            flush_counts(w, nthreads);
            return true;
        }
        if (at_warp > 0) {
            std::string err;
            unsigned before = at_warp;
            for (unsigned warp = 0; warp * 32 < nthreads; ++warp)
                if (!resolve_warp(w, warp, nthreads, err)) { w->error = err; return false; }
            unsigned after = 0;
            for (unsigned i = 0; i < nthreads; ++i) after += w->fibers[i].state == AT_WARP;
            if (after < before) continue;
        }
        if (at_block == nthreads) {
            flush_counts(w, nthreads);
            for (unsigned i = 0; i < nthreads; ++i) w->fibers[i].state = RUNNABLE;
            continue;
        }
        if (at_block > 0 && at_block + done == nthreads) {
            w->error = "divergent __syncthreads: " + std::to_string(done) + " of " + std::to_string(nthreads) + " threads exited while the others wait";
            return false;
        }
        w->error = "deadlock: threads wait at different barriers (" + std::to_string(at_block) + " at __syncthreads, " + std::to_string(at_warp) + " at warp collectives)";
        return false;
    }
}
}  // namespace

void syncthreads() {
    t_worker->fibers[t_index].state = AT_BLOCK_BARRIER;
    yield_current();
}

uint64_t warp_collective(int op, unsigned mask, uint64_t value, int arg, int width) {
    Fiber& f = t_worker->fibers[t_index];
    f.state = AT_WARP;
    f.op = op;
    f.mask = mask;
    f.value = value;
    f.arg = arg;
    f.width = width;
    yield_current();
    return t_worker->fibers[t_index].result;
}

namespace {
// Parks the calling thread at a collective computed once for its warp (W_CALL) or warpgroup.
void post_call(int op, WarpFn fn, void* mine) {
    Fiber& f = t_worker->fibers[t_index];
    f.state = AT_WARP;
    f.op = op;
    f.mask = 0xffffffffu;
    f.value = reinterpret_cast<uint64_t>(mine);
    f.call = fn;
    yield_current();
}
}  // namespace

void warp_call(WarpFn fn, void* mine) { post_call(W_CALL, fn, mine); }
void group_call(WarpFn fn, void* mine) { post_call(W_GROUP_CALL, fn, mine); }

void set_shared_window(void* base, size_t bytes) {
    t_worker->shared_base = static_cast<unsigned char*>(base);
    t_worker->shared_bytes = bytes;
}

unsigned char* shared_at(unsigned addr, unsigned bytes) {
    Worker* w = t_worker;
    if (!w->shared_base) trap("a shared address was used before the kernel set its shared window");
    if ((size_t)addr + bytes > w->shared_bytes) trap("a shared address lies outside the block's shared window");
    return w->shared_base + addr;
}

unsigned shared_addr_of(const void* p) {
    Worker* w = t_worker;
    const unsigned char* c = static_cast<const unsigned char*>(p);
    if (!w->shared_base || c < w->shared_base || c >= w->shared_base + w->shared_bytes)
        trap("a pointer outside the block's shared window was converted to a shared address");
    return (unsigned)(c - w->shared_base);
}

unsigned thread_linear() { return t_cur->linear; }
unsigned char* dynamic_shared() { return t_worker->dynamic; }
unsigned dynamic_shared_bytes() { return t_worker->dynamic_bytes; }
uint64_t block_serial() { return t_worker->block_serial; }

void count_shared(const void* const* addrs, unsigned nlanes, int bytes) { count_shared_into(t_worker->counters, addrs, nlanes, bytes); }

void cp_async(void* dst, const void* src, int bytes, int src_bytes) {
    if (bytes != 4 && bytes != 8 && bytes != 16) trap("cp.async of a size other than 4, 8 or 16 bytes");
    if (src_bytes < 0 || src_bytes > bytes) trap("cp.async src-size outside 0..cp-size");
    if ((uintptr_t)dst % bytes != 0) trap("cp.async: shared destination not aligned to the copy size");
    if ((uintptr_t)src % bytes != 0) trap("cp.async: global source not aligned to the copy size");
    Fiber& f = t_worker->fibers[t_index];
    PendingCopy c;
    c.dst = dst;
    c.bytes = bytes;
    c.group = f.open_group;
    std::memset(c.data, 0, sizeof c.data);
    if (src_bytes > 0) std::memcpy(c.data, src, (size_t)src_bytes);
    std::memset(dst, 0xff, (size_t)bytes);
    f.copies.push_back(c);
    f.log.push_back(CopyAccess{dst, src, bytes, src_bytes});
}

void note_global(const void* src, int bytes) {
    t_worker->fibers[t_index].log.push_back(CopyAccess{nullptr, src, bytes, bytes});
}

void cp_async_commit() { t_worker->fibers[t_index].open_group += 1; }

void cp_async_wait(int pending_groups) {
    Fiber& f = t_worker->fibers[t_index];
    // Committed groups are 0..open_group-1; all but the newest `pending_groups` of them retire.
    const long long retire_below = (long long)f.open_group - pending_groups;
    size_t keep = 0;
    for (size_t i = 0; i < f.copies.size(); ++i) {
        PendingCopy& c = f.copies[i];
        if ((long long)c.group < retire_below) std::memcpy(c.dst, c.data, (size_t)c.bytes);
        else f.copies[keep++] = c;
    }
    f.copies.resize(keep);
}

void trap(const char* msg) {
    if (t_in_collective) throw CollectiveTrap{msg};
    Worker* w = t_worker;
    w->error = std::string("kernel trapped: ") + msg;
    w->fibers[t_index].state = DONE;
    // The fiber's stack is abandoned; the launch fails, so the fiber is never resumed.
    _longjmp(w->sched, 1);
}
}  // namespace cudasim

using namespace cudasim;

// Runs `fn(params)` over the grid. Returns 0 on success, else writes a message into err.
extern "C" int cudasim_run(void (*fn)(const void*), const void* params, const unsigned* grid, const unsigned* block, char* err, size_t errlen) {
    const unsigned nthreads = block[0] * block[1] * block[2];
    const unsigned long long nblocks = (unsigned long long)grid[0] * grid[1] * grid[2];
    auto fail = [&](const std::string& m) {
        if (errlen) { std::snprintf(err, errlen, "%s", m.c_str()); }
        return 1;
    };
    if (nthreads == 0 || nthreads > 1024) return fail("block of " + std::to_string(nthreads) + " threads (1..=1024 allowed)");
    if (grid[1] > 65535 || grid[2] > 65535) return fail("grid y/z above 65535");
    if (nblocks == 0) return 0;
    unsigned hw = std::thread::hardware_concurrency();
    unsigned nworkers = (unsigned)std::min<unsigned long long>(nblocks, hw ? hw : 1);
    uint64_t seed = t_seed;
    if (!t_seed_set) {
        const char* e = std::getenv("RETINAFACE_SIM_SEED");
        seed = e ? std::strtoull(e, nullptr, 0) : 0x9e3779b97f4a7c15ull;
    }
    Counters launch_counters;
    t_last_counters = Counters{};
    const unsigned dynamic_bytes = t_dynamic_shared;
    t_dynamic_shared = 0;
    if (dynamic_bytes > 227 * 1024) return fail("dynamic shared memory of " + std::to_string(dynamic_bytes) + " bytes (227 KiB at most)");
    std::atomic<unsigned long long> next{0};
    std::atomic<bool> failed{false};
    std::mutex m;
    std::string first_error;
    auto work = [&]() {
        Worker w;
        w.fn = fn;
        w.params = params;
        t_worker = &w;
        t_blockDim = dim3(block[0], block[1], block[2]);
        t_gridDim = dim3(grid[0], grid[1], grid[2]);
        bool ok = create_fibers(&w, nthreads);
        if (dynamic_bytes > 0) {
            w.dynamic = static_cast<unsigned char*>(std::aligned_alloc(1024, (dynamic_bytes + 1023) / 1024 * 1024));
            w.dynamic_bytes = dynamic_bytes;
        }
        while (ok && !failed.load(std::memory_order_relaxed)) {
            unsigned long long b = next.fetch_add(1);
            if (b >= nblocks) break;
            t_blockIdx = uint3{(unsigned)(b % grid[0]), (unsigned)((b / grid[0]) % grid[1]), (unsigned)(b / ((unsigned long long)grid[0] * grid[1]))};
            w.rng = seed == 0 ? 0 : (seed ^ ((b + 1) * 0x9e3779b97f4a7c15ull)) | 1;
            ok = run_block(&w, nthreads);
            if (!ok) w.error = "block (" + std::to_string(t_blockIdx.x) + ", " + std::to_string(t_blockIdx.y) + ", " + std::to_string(t_blockIdx.z) + "): " + w.error;
        }
        if (!ok) {
            failed = true;
            std::lock_guard<std::mutex> g(m);
            if (first_error.empty()) first_error = w.error;
        }
        {
            std::lock_guard<std::mutex> g(m);
            launch_counters.shared_requests += w.counters.shared_requests;
            launch_counters.shared_wavefronts += w.counters.shared_wavefronts;
            launch_counters.shared_ideal += w.counters.shared_ideal;
            launch_counters.global_requests += w.counters.global_requests;
            launch_counters.global_sectors += w.counters.global_sectors;
            launch_counters.global_bytes += w.counters.global_bytes;
        }
        if (w.stacks) munmap(w.stacks, w.stacks_len);
        std::free(w.dynamic);
        t_worker = nullptr;
        t_cur = nullptr;
    };
    if (nworkers == 1) {
        work();
    } else {
        std::vector<std::thread> ts;
        for (unsigned i = 0; i < nworkers; ++i) ts.emplace_back(work);
        for (auto& t : ts) t.join();
    }
    t_last_counters = launch_counters;
    if (failed) return fail(first_error);
    return 0;
}

// Dynamic shared memory for the calling thread's next launch (the launch's third configuration value).
extern "C" void cudasim_set_dynamic_shared(unsigned bytes) { t_dynamic_shared = bytes; }

// The order seed for the following launches: 0 runs threads in index order between barriers; any other
// value a random order derived from it and the block index. Overrides RETINAFACE_SIM_SEED; applies to
// launches from the calling thread.
extern "C" void cudasim_set_order_seed(uint64_t seed) {
    t_seed = seed;
    t_seed_set = true;
}

// The calling thread's last launch's counters: [shared requests, shared wavefronts, conflict-free wavefronts,
// global requests, global sectors, distinct global bytes requested].
extern "C" void cudasim_counters(uint64_t* out) {
    out[0] = t_last_counters.shared_requests;
    out[1] = t_last_counters.shared_wavefronts;
    out[2] = t_last_counters.shared_ideal;
    out[3] = t_last_counters.global_requests;
    out[4] = t_last_counters.global_sectors;
    out[5] = t_last_counters.global_bytes;
}
