//! Compiles every kernel family with NVRTC for sm_80, sm_90 and sm_90a straight to SASS, fails on any compile
//! error and on register spills in the hot kernels, and prints the ptxas resource table.
//!
//! Needs NVRTC: set RETINAFACE_NVRTC_LIB to libnvrtc.so.13 or its directory (.ci/run installs
//! the PyPI wheels into .venv and sets it). Without NVRTC the test prints SKIP and passes, unless
//! RETINAFACE_REQUIRE_NVRTC=1 (CI), where a missing NVRTC fails.

/// Writes straight to the process's stderr: libtest captures `eprintln!` of passing tests, and a skip
/// must be visible in a plain `cargo test` run.
macro_rules! skip {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

use retinaface::cuda::ops::{conv_f16, fused_f16};
use retinaface::cuda::{kernels, nvrtc};

/// The kernels that run per pixel of every layer: a spill there costs every frame.
const HOT: &[&str] = &[
    "conv1x1",
    "conv3x3",
    "conv_kxk",
    "conv_depthwise",
    "conv_dwpw",
    "conv_invres",
    "heads_level",
    "heads_fused",
    "heads_fused_f16",
    "maxpool3x3s2",
    "upsample_nearest_add",
    "preprocess_bgr",
];

#[test]
fn every_kernel_compiles_to_sass_without_spills() {
    if let Err(e) = nvrtc::available() {
        if std::env::var("RETINAFACE_REQUIRE_NVRTC").is_ok_and(|v| v == "1") {
            panic!("RETINAFACE_REQUIRE_NVRTC=1 but {e}");
        }
        skip!("SKIP every_kernel_compiles_to_sass_without_spills: {e}");
        return;
    }
    let (maj, min) = nvrtc::version().expect("nvrtc version");
    println!("NVRTC {maj}.{min}; include dirs {:?}", nvrtc::include_dirs());
    println!(
        "{:<22} {:<6} {:>5} {:>7} {:>6} {:>7} {:>7}",
        "kernel", "arch", "regs", "smem", "stack", "spill-s", "spill-l"
    );
    // Every tile of the f16 depthwise + pointwise kernel, as the registry names them (a new tile is
    // checked without a new line here).
    let mut hot: Vec<&str> = HOT.to_vec();
    for v in conv_f16::VARIANTS {
        let k = fused_f16::dwpw_kernel(v).expect("every f16 variant has a depthwise + pointwise kernel");
        if !hot.contains(&k) {
            hot.push(k);
        }
    }
    let mut failures = Vec::new();
    // sm_90a is what the engine compiles for on an H100/H200 (nvrtc::arch_for).
    for arch in ["sm_80", "sm_90", "sm_90a"] {
        for family in kernels::families() {
            let c = match nvrtc::compile(family, arch) {
                Ok(c) => c,
                Err(e) => {
                    failures.push(format!("{family} for {arch}: {e}"));
                    continue;
                }
            };
            assert!(!c.cubin.is_empty());
            let expected: Vec<&str> = kernels::KERNELS.iter().filter(|(_, f)| *f == family).map(|(k, _)| *k).collect();
            for k in &expected {
                let Some(r) = c.resources.iter().find(|r| r.kernel == *k) else {
                    failures.push(format!("{k} ({arch}): no ptxas report in the log:\n{}", c.log));
                    continue;
                };
                println!(
                    "{:<22} {:<6} {:>5} {:>7} {:>6} {:>7} {:>7}",
                    r.kernel,
                    r.arch,
                    r.registers,
                    r.shared_bytes,
                    r.stack_bytes,
                    r.spill_store_bytes,
                    r.spill_load_bytes
                );
                let spills = r.spill_store_bytes + r.spill_load_bytes;
                if spills > 0 && hot.contains(k) {
                    failures.push(format!("{k} ({arch}) spills {spills} bytes"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "NVRTC check failed:\n{}", failures.join("\n"));
}

/// The runtime cache: a second compile of the same source, arch and options comes from disk.
#[test]
fn compile_cache_hits_on_second_use() {
    if let Err(e) = nvrtc::available() {
        skip!("SKIP compile_cache_hits_on_second_use: {e}");
        return;
    }
    let dir = std::env::temp_dir().join(format!("retinaface-kcache-{}", std::process::id()));
    // SAFETY (edition 2024 set_var): this test binary's other test reads no variable this one sets.
    unsafe { std::env::set_var("RETINAFACE_KERNEL_CACHE", &dir) };
    let a = nvrtc::compile_cached("pool", "sm_90").expect("compile");
    let b = nvrtc::compile_cached("pool", "sm_90").expect("cached");
    assert!(!a.from_cache && b.from_cache);
    assert_eq!(a.cubin, b.cubin);
    let _ = std::fs::remove_dir_all(&dir);
}
