//! tools/cpuid/hide_avx512.c, the LD_PRELOAD shim that holds ONNX Runtime and PyTorch to AVX2 in
//! benches/baselines.py: under it a process sees CPUID without AVX-512 (in every thread and forked
//! child) and with AVX2/FMA, a real crash still crashes, a handler installed later still gets its
//! faults; where CPUID faulting is unavailable the shim stops the process with a message instead of
//! letting it run AVX-512 under an AVX2 label. Shim and probe (tools/cpuid/cpuid_probe.c) are built
//! with the C compiler (`CC`, default `cc`) into a temporary directory.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The shim's exit status when CPUID faulting is unavailable (EXIT_NO_CPUID_FAULT in the C file).
const EXIT_NO_CPUID_FAULT: i32 = 86;
const NO_FAULT_MESSAGE: &str = "CPUID faulting is unavailable";

// The bits the shim must clear, by register (leaf 7 subleaf 0 EBX/ECX/EDX, subleaf 1 EAX/EDX), as
// the Intel SDM numbers them: every AVX-512 extension, AMX, AVX10.
const L7_EBX: u32 = 1 << 16 | 1 << 17 | 1 << 21 | 1 << 26 | 1 << 27 | 1 << 28 | 1 << 30 | 1 << 31;
const L7_ECX: u32 = 1 << 1 | 1 << 6 | 1 << 11 | 1 << 12 | 1 << 14;
const L7_EDX: u32 = 1 << 2 | 1 << 3 | 1 << 8 | 1 << 22 | 1 << 23 | 1 << 24 | 1 << 25;
const L7_1_EAX: u32 = 1 << 5 | 1 << 21;
const L7_1_EDX: u32 = 1 << 8 | 1 << 19;
const AVX512F: u32 = 1 << 16;
const AVX2: u32 = 1 << 5;
const FMA: u32 = 1 << 12;
const AVX: u32 = 1 << 28;
/// Linux's signal number on x86-64.
const SIGSEGV: i32 = 11;

fn cc(dir: &Path, src: &str, out: &str, extra: &[&str]) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // CI promises g++; `cc` is its usual alias, `gcc` the driver behind it where the alias is missing.
    let compilers = match std::env::var("CC") {
        Ok(c) => vec![c],
        Err(_) => vec!["cc".to_string(), "gcc".to_string()],
    };
    let path = dir.join(out);
    for compiler in &compilers {
        let res = match Command::new(compiler)
            .arg("-O2")
            .args(extra)
            .arg("-o")
            .arg(&path)
            .arg(root.join(src))
            .args(if out.ends_with(".so") { &["-ldl"][..] } else { &["-lpthread"][..] })
            .output()
        {
            Ok(res) => res,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("cannot run the C compiler `{compiler}`: {e}"),
        };
        assert!(res.status.success(), "{compiler} {src} failed:\n{}", String::from_utf8_lossy(&res.stderr));
        return path;
    }
    panic!("no C compiler found (tried {compilers:?}; set CC)");
}

fn run(probe: &Path, shim: Option<&Path>, arg: Option<&str>) -> Output {
    let mut cmd = Command::new(probe);
    cmd.args(arg);
    cmd.env_remove("LD_PRELOAD");
    if let Some(s) = shim {
        cmd.env("LD_PRELOAD", s);
    }
    cmd.output().unwrap()
}

fn registers(out: &Output) -> HashMap<String, u32> {
    assert!(out.status.success(), "probe failed ({:?}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_string(), u32::from_str_radix(v, 16).unwrap())
        })
        .collect()
}

fn cpu_flags() -> Vec<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let line = info.lines().find(|l| l.starts_with("flags")).expect("/proc/cpuinfo has a flags line");
    line.split_once(':').unwrap().1.split_whitespace().map(String::from).collect()
}

fn assert_refused(out: &Output, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_NO_CPUID_FAULT), "{what}: status {:?}, stderr {err}", out.status);
    assert!(err.contains(NO_FAULT_MESSAGE), "{what}: the message does not say why: {err}");
    assert!(out.stdout.is_empty(), "{what}: the program ran anyway");
}

#[test]
fn the_shim_hides_avx512_and_keeps_avx2() {
    let dir = tempfile::tempdir().unwrap();
    let shim = cc(dir.path(), "tools/cpuid/hide_avx512.c", "hide_avx512.so", &["-shared", "-fPIC"]);
    let probe = cc(dir.path(), "tools/cpuid/cpuid_probe.c", "cpuid_probe", &[]);
    let flags = cpu_flags();
    let has = |f: &str| flags.iter().any(|x| x == f);

    // The probe reads CPUID as the kernel does: its view without the shim matches /proc/cpuinfo.
    let raw = registers(&run(&probe, None, None));
    assert_eq!(raw["leaf7_0_ebx"] & AVX512F != 0, has("avx512f"));
    assert_eq!(raw["leaf7_0_ebx"] & AVX2 != 0, has("avx2"));
    assert_eq!(raw["leaf1_ecx"] & FMA != 0, has("fma"));

    let masked = run(&probe, Some(&shim), None);
    if !has("cpuid_fault") {
        assert_refused(&masked, "no cpuid_fault on this machine");
        return;
    }
    let m = registers(&masked);
    assert_eq!(m["leaf7_0_ebx"], raw["leaf7_0_ebx"] & !L7_EBX, "leaf 7 EBX: exactly the AVX-512 bits cleared");
    assert_eq!(m["leaf7_0_ecx"], raw["leaf7_0_ecx"] & !L7_ECX);
    assert_eq!(m["leaf7_0_edx"], raw["leaf7_0_edx"] & !L7_EDX);
    assert_eq!(m["leaf7_1_eax"], raw["leaf7_1_eax"] & !L7_1_EAX);
    assert_eq!(m["leaf7_1_edx"], raw["leaf7_1_edx"] & !L7_1_EDX);
    assert_eq!(m["leaf1_ecx"], raw["leaf1_ecx"], "leaf 1 (AVX, FMA, F16C) untouched");
    // Faulting is per thread and inherited: a thread and a forked child see the masked leaf too.
    assert_eq!(m["thread_leaf7_0_ebx"], m["leaf7_0_ebx"]);
    assert_eq!(m["child_leaf7_0_ebx"], m["leaf7_0_ebx"]);
    assert_eq!(m["leaf7_0_ebx"] & AVX512F, 0);
    if has("avx512f") {
        // On an AVX-512 processor the shim changed something, and kept what an AVX2 path needs.
        assert_ne!(m["leaf7_0_ebx"], raw["leaf7_0_ebx"]);
        assert_ne!(m["leaf7_0_ebx"] & AVX2, 0);
        assert_ne!(m["leaf1_ecx"] & FMA, 0);
        assert_ne!(m["leaf1_ecx"] & AVX, 0);
    }

    // A fault that is not CPUID goes on to the default action: the process dies of SIGSEGV.
    let crash = run(&probe, Some(&shim), Some("--crash"));
    assert_eq!(crash.status.signal(), Some(SIGSEGV), "a real crash under the shim: {:?}", crash.status);

    // A handler installed after the shim's gets the real faults, and CPUID stays masked.
    let own = run(&probe, Some(&shim), Some("--own-handler"));
    assert_eq!(own.status.code(), Some(42), "{:?} {}", own.status, String::from_utf8_lossy(&own.stderr));
    let text = String::from_utf8_lossy(&own.stdout);
    assert!(text.contains("own handler saw the fault"), "{text}");
    assert!(text.contains(&format!("leaf7_0_ebx={:08x}", m["leaf7_0_ebx"])), "{text}");
}

/// Where arch_prctl(ARCH_SET_CPUID) fails (a seccomp filter makes it fail as a kernel without
/// CPUID faulting does), the shim refuses to let the program run.
#[test]
fn without_cpuid_faulting_the_shim_stops_the_process_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let shim = cc(dir.path(), "tools/cpuid/hide_avx512.c", "hide_avx512.so", &["-shared", "-fPIC"]);
    let probe = cc(dir.path(), "tools/cpuid/cpuid_probe.c", "cpuid_probe", &[]);
    // Without the shim the filter itself is harmless: the probe re-executes and prints.
    let plain = run(&probe, None, Some("--deny-cpuid-faulting"));
    if plain.status.code() == Some(3) {
        // seccomp is unavailable here; the refusal is then only checked where the kernel itself
        // lacks CPUID faulting (the test above).
        eprintln!("skipped: {}", String::from_utf8_lossy(&plain.stderr));
        assert!(String::from_utf8_lossy(&plain.stderr).contains("seccomp unavailable"));
        return;
    }
    assert!(registers(&plain).contains_key("leaf7_0_ebx"));
    assert_refused(&run(&probe, Some(&shim), Some("--deny-cpuid-faulting")), "arch_prctl denied");
}
