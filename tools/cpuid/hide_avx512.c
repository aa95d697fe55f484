/*
 * hide_avx512.so: an LD_PRELOAD shim that makes a process see an x86-64 CPU without AVX-512 (and
 * without AMX or AVX10), while AVX2, FMA and everything else CPUID reports stay as they are.
 *
 * Why: benches/baselines.py compares the engine held to AVX2 (RETINAFACE_CPU_ISA=avx2) with ONNX
 * Runtime and PyTorch. ONNX Runtime's MLAS picks its kernels from CPUID and has no switch, so on an
 * AVX-512 processor its "AVX2" row ran AVX-512 kernels. Under this shim MLAS (and PyTorch's cpuinfo,
 * oneDNN's Xbyak, numpy) read CPUID leaf 7 without the AVX-512 bits and choose their AVX2/FMA3 paths.
 *
 * How: Linux's arch_prctl(ARCH_SET_CPUID, 0) makes the CPUID instruction fault (SIGSEGV) in the
 * calling thread and in every thread or child it later creates (CPUID faulting, /proc/cpuinfo flag
 * `cpuid_fault`; execve resets it, and LD_PRELOAD re-arms it in the new image). The constructor
 * installs a SIGSEGV handler and turns faulting on. The handler, for a fault whose instruction at RIP
 * is CPUID (0F A2), turns faulting off for this thread, runs the real CPUID with the trapped EAX/ECX,
 * turns faulting back on, clears the AVX-512/AMX/AVX10 bits, writes EAX..EDX into the interrupted
 * context and steps RIP over the instruction. Any other SIGSEGV goes to the handler that was there
 * before (or the default action), so crashes still crash.
 *
 * A library that installs its own SIGSEGV handler later would cut this one off and CPUID would kill
 * the process; sigaction() and signal() are therefore interposed: a SIGSEGV handler installed after
 * the constructor becomes the one this shim chains to, and hide_avx512_foreign counts them.
 * (Measured with ONNX Runtime 1.32 and PyTorch 2.15: neither installs one in a baseline worker;
 * benches/baselines.py checks the count and the live handler anyway.)
 *
 * If CPUID faulting is unavailable (no `cpuid_fault`: another CPU, a VM or container that hides it)
 * the shim cannot work, and a process that then ran AVX-512 under a label saying AVX2 would be a
 * wrong answer; so the constructor prints a message naming the problem and exits with status 86.
 *
 * What glibc chose for itself (memcpy/strlen IFUNCs) is decided by ld.so before any constructor runs
 * and is not changed: the shim holds the libraries that detect CPU features after start-up, which is
 * where the compute kernels are chosen. The engine held to AVX2 uses the same glibc routines.
 *
 * Build (nothing is committed as a binary; tests/cpuid_mask.rs and benches/baselines.py build it):
 *     cc -O2 -shared -fPIC -o hide_avx512.so tools/cpuid/hide_avx512.c -ldl
 * Use: LD_PRELOAD=/path/hide_avx512.so program ...
 * Exported for checks (dlsym / ctypes): int hide_avx512_active, unsigned long hide_avx512_trapped,
 * int hide_avx512_foreign, void hide_avx512_cpuid(unsigned leaf, unsigned sub, unsigned out[4]),
 * int hide_avx512_handler_installed(void).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#ifndef ARCH_GET_CPUID
#define ARCH_GET_CPUID 0x1011
#endif
#ifndef ARCH_SET_CPUID
#define ARCH_SET_CPUID 0x1012
#endif

/* Exit status when CPUID faulting is unavailable: distinct, so a caller can tell it from a crash. */
#define EXIT_NO_CPUID_FAULT 86

__attribute__((visibility("default"))) volatile int hide_avx512_active = 0;
__attribute__((visibility("default"))) volatile unsigned long hide_avx512_trapped = 0;
__attribute__((visibility("default"))) volatile int hide_avx512_foreign = 0;

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);
static sigaction_fn real_sigaction;
/* The handler this shim chains to for faults that are not CPUID: the one before it, or one a
 * library installed after it (see the interposed sigaction below). */
static struct sigaction chained;

/* A raw syscall: async-signal-safe, and it leaves errno alone when it succeeds. */
static long arch_prctl_raw(long code, long arg) {
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "0"((long)SYS_arch_prctl), "D"(code), "S"(arg) : "rcx", "r11", "memory");
    return ret;
}

static void cpuid_raw(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "0"(leaf), "2"(sub));
}

/* Clears every feature bit that would lead software to 512-bit (EVEX) or AMX code paths. AVX-VNNI,
 * AVX-IFMA and the other VEX-encoded (256-bit) extensions stay: they are AVX2-class. */
static void mask(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    if (leaf == 7 && sub == 0) {
        /* EBX: AVX512F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31 */
        r[1] &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31));
        /* ECX: VBMI 1, VBMI2 6, VNNI 11, BITALG 12, VPOPCNTDQ 14 */
        r[2] &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
        /* EDX: 4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, AMX-BF16 22, AVX512_FP16 23, AMX-TILE 24, AMX-INT8 25 */
        r[3] &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25));
    } else if (leaf == 7 && sub == 1) {
        /* EAX: AVX512_BF16 5, AMX-FP16 21; EDX: AMX-COMPLEX 8, AVX10 19 */
        r[0] &= ~((1u << 5) | (1u << 21));
        r[3] &= ~((1u << 8) | (1u << 19));
    } else if (leaf == 0x1d || leaf == 0x1e || leaf == 0x24) {
        /* AMX tile and TMUL information, AVX10 version: absent with their feature bits */
        r[0] = r[1] = r[2] = r[3] = 0;
    }
}

static void chain(int sig, siginfo_t *info, void *uc) {
    if (chained.sa_flags & SA_SIGINFO) {
        chained.sa_sigaction(sig, info, uc);
    } else if (chained.sa_handler != SIG_DFL && chained.sa_handler != SIG_IGN) {
        chained.sa_handler(sig);
    } else {
        /* Default action: restore it and return, so the faulting instruction runs again and the
         * kernel delivers the fault as if this shim were absent (core dump, shell's status). An
         * ignored SIGSEGV from a fault would only loop, so it is treated as the default too. */
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        real_sigaction(SIGSEGV, &dfl, NULL);
        /* A SIGSEGV sent by kill() is not raised again by returning: send it again (it stays
         * pending until this handler returns and then takes the default action). */
        if (info->si_code <= 0)
            raise(sig);
    }
}

static void on_segv(int sig, siginfo_t *info, void *ctx) {
    ucontext_t *uc = (ucontext_t *)ctx;
    greg_t *g = uc->uc_mcontext.gregs;
    /* A CPUID fault is a general-protection fault (SI_KERNEL); a page fault (SEGV_MAPERR/ACCERR) may
     * have an unreadable RIP, so its instruction bytes are not looked at. */
    const unsigned char *ip = (const unsigned char *)g[REG_RIP];
    if (info->si_code != SI_KERNEL || ip[0] != 0x0f || ip[1] != 0xa2) {
        chain(sig, info, ctx);
        return;
    }
    uint32_t r[4];
    uint32_t leaf = (uint32_t)g[REG_RAX], sub = (uint32_t)g[REG_RCX];
    arch_prctl_raw(ARCH_SET_CPUID, 1);
    cpuid_raw(leaf, sub, r);
    arch_prctl_raw(ARCH_SET_CPUID, 0);
    mask(leaf, sub, r);
    /* CPUID writes the low 32 bits and zeroes the upper half of each 64-bit register */
    g[REG_RAX] = r[0];
    g[REG_RBX] = r[1];
    g[REG_RCX] = r[2];
    g[REG_RDX] = r[3];
    g[REG_RIP] += 2;
    hide_avx512_trapped++;
}

static void die(const char *msg) {
    /* write(2) rather than stdio: nothing of the process is set up yet, and the message must land */
    ssize_t ignored = write(2, msg, strlen(msg));
    (void)ignored;
    _exit(EXIT_NO_CPUID_FAULT);
}

__attribute__((constructor)) static void hide_avx512_init(void) {
    real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    if (!real_sigaction)
        die("hide_avx512.so: cannot find libc's sigaction (dlsym RTLD_NEXT failed)\n");
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    if (real_sigaction(SIGSEGV, &sa, &chained) != 0)
        die("hide_avx512.so: cannot install the SIGSEGV handler (sigaction failed)\n");
    long rc = arch_prctl_raw(ARCH_SET_CPUID, 0);
    if (rc != 0) {
        real_sigaction(SIGSEGV, &chained, NULL);
        char msg[400];
        snprintf(msg, sizeof msg,
                 "hide_avx512.so: CPUID faulting is unavailable (arch_prctl(ARCH_SET_CPUID, 0): %s; "
                 "no cpuid_fault flag in /proc/cpuinfo on this machine?), so AVX-512 cannot be hidden "
                 "from this process; refusing to run it as if it were held to AVX2\n",
                 strerror((int)-rc));
        die(msg);
    }
    hide_avx512_active = 1;
}

/* Interposed: a SIGSEGV handler installed after the constructor is kept as the chained one, so a
 * library's crash handler still sees real crashes and CPUID keeps working. */
__attribute__((visibility("default"))) int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (!real_sigaction)
        real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    if (sig != SIGSEGV || !hide_avx512_active)
        return real_sigaction(sig, act, old);
    if (old)
        *old = chained;
    if (act) {
        chained = *act;
        hide_avx512_foreign++;
    }
    return 0;
}

__attribute__((visibility("default"))) sighandler_t signal(int sig, sighandler_t handler) {
    struct sigaction act, old;
    memset(&act, 0, sizeof act);
    act.sa_handler = handler;
    act.sa_flags = SA_RESTART;
    sigemptyset(&act.sa_mask);
    if (sigaction(sig, &act, &old) != 0)
        return SIG_ERR;
    return old.sa_handler;
}

/* CPUID as the rest of the process sees it (trapped and masked when the shim is active). */
__attribute__((visibility("default"))) void hide_avx512_cpuid(unsigned leaf, unsigned sub, unsigned out[4]) {
    uint32_t r[4];
    cpuid_raw(leaf, sub, r);
    memcpy(out, r, sizeof r);
}

/* 1 when the process's live SIGSEGV handler is still this shim's (nothing went around sigaction). */
__attribute__((visibility("default"))) int hide_avx512_handler_installed(void) {
    struct sigaction cur;
    if (real_sigaction(SIGSEGV, NULL, &cur) != 0)
        return 0;
    return (cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_segv;
}
