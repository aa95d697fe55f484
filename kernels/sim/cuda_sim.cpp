// cuda_sim.cpp — the scheduler behind cuda_sim.h: blocks over OS threads, CUDA threads as fibers.
//
// Each OS worker owns one fiber per thread of the block, created once per launch with makecontext (the
// only ucontext call) and from then on switched with _setjmp/_longjmp. A fiber loops: wait for a block,
// run the kernel body, report done. The scheduler runs every runnable fiber until it blocks, then
// resolves barriers: a __syncthreads completes when every thread of the block waits at it, a warp
// collective when every lane of the warp posted it. Anything else (a thread exited while others wait at
// __syncthreads, lanes of a warp at different barriers) is a divergence and fails the launch.
#include "cuda_sim.h"

#include <atomic>
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

struct Fiber {
    jmp_buf ctx;
    State state = IDLE;
    ThreadCtx tc{};
    int op = 0;
    unsigned mask = 0;
    uint64_t value = 0, result = 0;
    int arg = 0, width = 32;
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
};

thread_local Worker* t_worker = nullptr;
thread_local int t_index = 0;

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
        f.tc.linear = i;
        f.tc.tid = uint3{i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y)};
    }
    for (;;) {
        for (unsigned i = 0; i < nthreads; ++i)
            if (w->fibers[i].state == RUNNABLE) resume(w, i);
        if (!w->error.empty()) return false;
        unsigned done = 0, at_block = 0, at_warp = 0;
        for (unsigned i = 0; i < nthreads; ++i) {
            State s = w->fibers[i].state;
            done += s == DONE;
            at_block += s == AT_BLOCK_BARRIER;
            at_warp += s == AT_WARP;
        }
        if (done == nthreads) return true;
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

void trap(const char* msg) {
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
        while (ok && !failed.load(std::memory_order_relaxed)) {
            unsigned long long b = next.fetch_add(1);
            if (b >= nblocks) break;
            t_blockIdx = uint3{(unsigned)(b % grid[0]), (unsigned)((b / grid[0]) % grid[1]), (unsigned)(b / ((unsigned long long)grid[0] * grid[1]))};
            ok = run_block(&w, nthreads);
            if (!ok) w.error = "block (" + std::to_string(t_blockIdx.x) + ", " + std::to_string(t_blockIdx.y) + ", " + std::to_string(t_blockIdx.z) + "): " + w.error;
        }
        if (!ok) {
            failed = true;
            std::lock_guard<std::mutex> g(m);
            if (first_error.empty()) first_error = w.error;
        }
        if (w.stacks) munmap(w.stacks, w.stacks_len);
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
    if (failed) return fail(first_error);
    return 0;
}
