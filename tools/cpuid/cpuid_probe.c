/*
 * cpuid_probe: what CPUID tells this process, for tests/cpuid_mask.rs, which runs it with and without
 * hide_avx512.so preloaded. Built by the test: cc -O2 -o cpuid_probe tools/cpuid/cpuid_probe.c -lpthread
 *
 *   cpuid_probe                        key=value lines: leaf 1 ECX, leaf 7.0 EBX/ECX/EDX, 7.1 EAX/EDX
 *                                      as the main thread, a new thread and a forked child see them
 *                                      (CPUID faulting is per thread, inherited by clone and fork)
 *   cpuid_probe --crash                a NULL store: must still die of SIGSEGV under the shim
 *   cpuid_probe --own-handler          installs its own SIGSEGV handler, then CPUID (must still be
 *                                      masked and not crash), then a NULL store that must reach the
 *                                      handler (exit 42): the shim's interposed sigaction at work
 *   cpuid_probe --deny-cpuid-faulting  installs a seccomp filter that fails arch_prctl(ARCH_SET_CPUID)
 *                                      as a kernel without CPUID faulting does (ENODEV), then runs
 *                                      itself again, so the shim's constructor meets that failure
 */
#define _GNU_SOURCE
#include <cpuid.h>
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static unsigned leaf7_ebx(void) {
    unsigned a, b, c, d;
    __cpuid_count(7, 0, a, b, c, d);
    return b;
}

static void *thread_main(void *out) {
    *(unsigned *)out = leaf7_ebx();
    return NULL;
}

static void own_handler(int sig) {
    (void)sig;
    static const char msg[] = "own handler saw the fault\n";
    ssize_t ignored = write(1, msg, sizeof msg - 1);
    (void)ignored;
    _exit(42);
}

static int deny_cpuid_faulting(char **argv) {
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_arch_prctl, 0, 3),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[0])),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0x1012 /* ARCH_SET_CPUID */, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENODEV),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {.len = sizeof f / sizeof f[0], .filter = f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0) {
        fprintf(stderr, "cpuid_probe: seccomp unavailable: %s\n", strerror(errno));
        return 3;
    }
    char *args[] = {argv[0], NULL};
    execv("/proc/self/exe", args);
    fprintf(stderr, "cpuid_probe: execv: %s\n", strerror(errno));
    return 4;
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--deny-cpuid-faulting") == 0)
        return deny_cpuid_faulting(argv);
    if (argc > 1 && strcmp(argv[1], "--crash") == 0) {
        *(volatile int *)0 = 1;
        return 0;
    }
    if (argc > 1 && strcmp(argv[1], "--own-handler") == 0) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = own_handler;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGSEGV, &sa, NULL) != 0)
            return 5;
        printf("leaf7_0_ebx=%08x\n", leaf7_ebx());
        fflush(stdout);
        *(volatile int *)0 = 1;
        return 0;
    }
    unsigned a, b, c, d;
    __cpuid(1, a, b, c, d);
    printf("leaf1_ecx=%08x\n", c);
    __cpuid_count(7, 0, a, b, c, d);
    printf("leaf7_0_ebx=%08x\nleaf7_0_ecx=%08x\nleaf7_0_edx=%08x\n", b, c, d);
    __cpuid_count(7, 1, a, b, c, d);
    printf("leaf7_1_eax=%08x\nleaf7_1_edx=%08x\n", a, d);
    unsigned in_thread = 0;
    pthread_t t;
    if (pthread_create(&t, NULL, thread_main, &in_thread) != 0 || pthread_join(t, NULL) != 0)
        return 6;
    printf("thread_leaf7_0_ebx=%08x\n", in_thread);
    int fds[2];
    if (pipe(fds) != 0)
        return 7;
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        unsigned v = leaf7_ebx();
        _exit(write(fds[1], &v, sizeof v) == sizeof v ? 0 : 1);
    }
    unsigned in_child = 0;
    int status = 0;
    if (pid < 0 || read(fds[0], &in_child, sizeof in_child) != sizeof in_child || waitpid(pid, &status, 0) != pid || status != 0)
        return 8;
    printf("child_leaf7_0_ebx=%08x\n", in_child);
    return 0;
}
