//! The f16 convolution kernels as the GPU would run them: NVRTC compiles kernels/conv_f16.cu for sm_80,
//! sm_90 and sm_90a (what an H100/H200 gets), nvdisasm lists the SASS, and every mma.sync GEMM kernel
//! must contain tensor-core MMAs (HMMA), ldmatrix (LDSM) and async global→shared copies (LDGSTS), every
//! Hopper tile (`*_wg*`, sm_90a only: elsewhere they are stubs the registry never launches) warpgroup
//! MMAs (HGMMA) fed by LDGSTS and no LDSM, all with no spills and no local memory at all;
//! the depthwise kernel must use 128-bit global loads. Prints registers, shared memory, occupancy, and
//! the main loop's instructions per HMMA's worth of multiply-adds (2048 per warp; an HGMMA.64x128x16
//! counts 16, its warp's quarter of the warpgroup's work; the f32 conv3x3 issues 589 instructions per
//! 16-deep k-step for 256 FMAs per thread).
//!
//! Needs NVRTC (RETINAFACE_NVRTC_LIB) and nvdisasm (PyPI nvidia-cuda-nvdisasm; see cuda::sass). Without
//! them the test prints SKIP and passes, unless RETINAFACE_REQUIRE_NVRTC=1 (CI), where it fails.

use retinaface::cuda::{conv_f16, kernels, nvrtc, sass};

macro_rules! skip {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

#[test]
fn f16_conv_kernels_use_tensor_cores_without_local_memory() {
    let tools = nvrtc::available().and_then(|_| sass::nvdisasm());
    if let Err(e) = tools {
        if std::env::var("RETINAFACE_REQUIRE_NVRTC").is_ok_and(|v| v == "1") {
            panic!("RETINAFACE_REQUIRE_NVRTC=1 but {e}");
        }
        skip!("SKIP f16_conv_kernels_use_tensor_cores_without_local_memory: {e}");
        return;
    }
    let expected: Vec<&str> = kernels::KERNELS.iter().filter(|(_, f)| *f == "conv_f16").map(|(k, _)| *k).collect();
    assert!(expected.len() >= 8, "conv_f16 kernels: {expected:?}");
    println!(
        "{:<24} {:<6} {:>5} {:>7} {:>5} {:>6} {:>5} {:>5} {:>7} {:>5} {:>9}",
        "kernel", "arch", "regs", "smem", "occ", "instr", "HMMA", "LDSM", "LDGSTS", "local", "loop/mma"
    );
    let mut failures = Vec::new();
    for arch in ["sm_80", "sm_90", "sm_90a"] {
        let c = nvrtc::compile("conv_f16", arch).expect("NVRTC compiles conv_f16");
        let funcs = sass::disassemble(&c.cubin).expect("nvdisasm");
        // RETINAFACE_SASS_DUMP_DIR=DIR keeps the cubins for reading with nvdisasm.
        if let Some(dir) = std::env::var_os("RETINAFACE_SASS_DUMP_DIR") {
            let path = std::path::Path::new(&dir).join(format!("conv_f16-{arch}.cubin"));
            std::fs::write(&path, &c.cubin).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
        // ptxas says when it must serialise wgmmas (a wait after each, or registers it cannot keep
        // across them): the pipeline the Hopper tiles are written for would not exist.
        for line in c.log.lines().filter(|l| l.contains("wgmma") || l.contains("Performance")) {
            failures.push(format!("{arch}: ptxas: {line}"));
        }
        for k in &expected {
            let wgmma = k.contains("_wg");
            if wgmma && arch != "sm_90a" {
                continue;
            }
            let Some(f) = funcs.iter().find(|f| f.name == *k) else {
                failures.push(format!("{k} ({arch}): not in the SASS"));
                continue;
            };
            let Some(r) = c.resources.iter().find(|r| r.kernel == *k) else {
                failures.push(format!("{k} ({arch}): no ptxas report"));
                continue;
            };
            let threads =
                if k.contains("_wg128") || k.ends_with("_128x128") || !k.contains('x') || k.ends_with("reduce") {
                    256
                } else {
                    128
                };
            // Static shared memory from ptxas, plus the dynamic ring the Hopper tiles are launched with.
            let shared = r.shared_bytes + conv_f16::dynamic_shared_bytes(k);
            let occ = sass::occupancy(arch, r.registers, threads, shared);
            let (hmma, ldsm, ldgsts) = (f.count("HMMA") + f.count("HGMMA"), f.count("LDSM"), f.count("LDGSTS"));
            println!(
                "{:<24} {:<6} {:>5} {:>7} {:>4.0}% {:>6} {:>5} {:>5} {:>7} {:>5} {:>9}",
                k,
                arch,
                r.registers,
                shared,
                100.0 * occ,
                f.opcodes.len(),
                hmma,
                ldsm,
                ldgsts,
                f.local_memory_ops(),
                f.mma_loop().map_or("-".into(), |(len, work)| format!("{:.2}", len as f64 / work))
            );
            if r.spill_store_bytes + r.spill_load_bytes > 0 || r.stack_bytes > 0 || f.local_memory_ops() > 0 {
                failures.push(format!(
                    "{k} ({arch}): spills {} + {} bytes, stack {}, {} local-memory instructions",
                    r.spill_store_bytes,
                    r.spill_load_bytes,
                    r.stack_bytes,
                    f.local_memory_ops()
                ));
            }
            // The fused kernels (conv_dwpw_f16_*, conv_ex_f16_*) are the same GEMM.
            let is_gemm = ["conv_f16_", "conv_dwpw_f16_", "conv_ex_f16_"].iter().any(|p| k.starts_with(p))
                && !k.ends_with("reduce");
            if is_gemm && !wgmma && (hmma == 0 || ldsm == 0 || ldgsts == 0) {
                failures.push(format!("{k} ({arch}): HMMA {hmma}, LDSM {ldsm}, LDGSTS {ldgsts}: all must be present"));
            }
            if wgmma && (f.count("HGMMA") == 0 || f.count("HMMA") != 0 || ldsm != 0 || ldgsts == 0) {
                failures.push(format!(
                    "{k} ({arch}): HGMMA {}, HMMA {}, LDSM {ldsm}, LDGSTS {ldgsts}: wgmma fed by cp.async only",
                    f.count("HGMMA"),
                    f.count("HMMA")
                ));
            }
            if *k == "conv_dw_f16" && !f.opcodes.iter().any(|o| o.starts_with("LDG") && o.ends_with(".128")) {
                failures.push(format!("{k} ({arch}): no 128-bit global load"));
            }
            if is_gemm && f.mma_loop().is_none() {
                failures.push(format!("{k} ({arch}): no loop around the HMMAs found in the SASS"));
            }
            if occ <= 0.0 {
                failures.push(format!("{k} ({arch}): does not fit on an SM"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
