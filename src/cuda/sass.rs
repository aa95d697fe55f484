//! What the compiled kernels are made of, without a GPU: NVRTC's cubin disassembled by `nvdisasm`
//! (PyPI `nvidia-cuda-nvdisasm`), opcodes counted per kernel (HMMA, LDSM, LDGSTS, local memory), and the
//! theoretical occupancy from ptxas's registers and shared memory.
//!
//! Finding nvdisasm: `RETINAFACE_NVDISASM`, else `bin/nvdisasm` beside the NVRTC lib directory
//! (`RETINAFACE_NVRTC_LIB`: the wheels share the nvidia/cu13 tree), else `.venv` of the crate (what
//! .ci/run installs), else `PATH`.

use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The nvdisasm to use, or why there is none.
pub fn nvdisasm() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("RETINAFACE_NVDISASM") {
        return Ok(PathBuf::from(p));
    }
    let mut candidates = Vec::new();
    if let Some(lib) = std::env::var_os("RETINAFACE_NVRTC_LIB") {
        let lib = PathBuf::from(lib);
        let dir = if lib.is_dir() { lib } else { lib.parent().map(PathBuf::from).unwrap_or_default() };
        if let Some(cu13) = dir.parent() {
            candidates.push(cu13.join("bin").join("nvdisasm"));
        }
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv").join("lib");
    if let Ok(rd) = std::fs::read_dir(&venv) {
        for e in rd.flatten() {
            candidates.push(e.path().join("site-packages/nvidia/cu13/bin/nvdisasm"));
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("nvdisasm")));
    }
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        Error::Cuda(
            "nvdisasm not found: `pip install nvidia-cuda-nvdisasm==13.2.86` (into .venv) or set RETINAFACE_NVDISASM"
                .into(),
        )
    })
}

/// One kernel's SASS: its opcodes in order (predicates stripped, modifiers kept: "HMMA.16816.F32"),
/// and its branch structure: label → index of the instruction that follows it, and (index, target) of
/// every BRA.
#[derive(Clone, Debug, Default)]
pub struct KernelSass {
    pub name: String,
    pub opcodes: Vec<String>,
    pub labels: BTreeMap<String, usize>,
    pub branches: Vec<(usize, String)>,
}

impl KernelSass {
    /// Instructions whose opcode starts with `prefix` followed by the end or a '.': "LDS" counts
    /// "LDS.128" but not "LDSM".
    pub fn count(&self, prefix: &str) -> usize {
        self.opcodes
            .iter()
            .filter(|o| o.strip_prefix(prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with('.')))
            .count()
    }
    /// Instructions touching local memory (spills, or arrays the compiler could not keep in registers).
    pub fn local_memory_ops(&self) -> usize {
        self.count("LDL") + self.count("STL")
    }

    /// The innermost loop holding the MMAs: the shortest backward branch range [target, branch] that
    /// contains an HMMA or HGMMA, as (instructions in it, the multiply-adds its MMAs do per warp in units
    /// of one HMMA.16816's 2048). Per warp, because every warp issues the loop: an HGMMA.64xNx16 is the
    /// whole warpgroup's 64·N·16, a quarter of it per warp (N = 128: 16 HMMAs' worth).
    pub fn mma_loop(&self) -> Option<(usize, f64)> {
        self.branches
            .iter()
            .filter_map(|(at, target)| {
                let start = *self.labels.get(target)?;
                (start <= *at).then_some((start, *at))
            })
            .filter_map(|(start, end)| {
                let body = &self.opcodes[start..=end];
                let work: f64 = body.iter().filter_map(|o| mma_work(o)).sum();
                (work > 0.0).then_some((body.len(), work))
            })
            .min_by_key(|(len, _)| *len)
    }
}

/// Multiply-adds per warp of one MMA instruction, in HMMA.16816 units (2048); None for anything else.
fn mma_work(opcode: &str) -> Option<f64> {
    if opcode.starts_with("HMMA.16816") {
        return Some(1.0);
    }
    let shape = opcode.strip_prefix("HGMMA.")?.split('.').next()?;
    let dims: Vec<f64> = shape.split('x').filter_map(|d| d.parse().ok()).collect();
    let [m, n, k] = dims[..] else { return None };
    Some(m * n * k / 4.0 / 2048.0)
}

/// Disassembles a cubin into its kernels.
pub fn disassemble(cubin: &[u8]) -> Result<Vec<KernelSass>> {
    let tool = nvdisasm()?;
    let path = std::env::temp_dir().join(format!(
        "retinaface-sass-{}-{}.cubin",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
    ));
    std::fs::write(&path, cubin).map_err(|e| Error::io(&path, e))?;
    let out = std::process::Command::new(&tool).arg("-c").arg(&path).output();
    let _ = std::fs::remove_file(&path);
    let out = out.map_err(|e| Error::io(&tool, e))?;
    if !out.status.success() {
        return Err(Error::Cuda(format!("{} failed: {}", tool.display(), String::from_utf8_lossy(&out.stderr))));
    }
    Ok(parse(&String::from_utf8_lossy(&out.stdout)))
}

/// Parses `nvdisasm -c` output: a function starts at a `.text.NAME:` label; instructions are the lines
/// with a `/*offset*/` prefix.
pub fn parse(text: &str) -> Vec<KernelSass> {
    let mut funcs: BTreeMap<String, KernelSass> = BTreeMap::new();
    let mut cur: Option<String> = None;
    for line in text.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix(".text.").and_then(|r| r.strip_suffix(':')) {
            cur = Some(name.to_string());
            funcs
                .entry(name.to_string())
                .or_insert_with(|| KernelSass { name: name.to_string(), ..Default::default() });
            continue;
        }
        let Some(name) = &cur else { continue };
        if let Some(label) = t.strip_suffix(':').filter(|l| l.starts_with(".L")) {
            if let Some(f) = funcs.get_mut(name) {
                let at = f.opcodes.len();
                f.labels.insert(label.to_string(), at);
            }
            continue;
        }
        let Some(rest) = t.strip_prefix("/*").and_then(|r| r.split_once("*/")).map(|(_, r)| r.trim()) else {
            continue;
        };
        let mut toks = rest.split_whitespace();
        let Some(mut op) = toks.next() else { continue };
        if op.starts_with('@') {
            let Some(o) = toks.next() else { continue };
            op = o;
        }
        let op = op.trim_end_matches(';');
        if op.is_empty() || !op.chars().next().is_some_and(|c| c.is_ascii_uppercase()) {
            continue;
        }
        if let Some(f) = funcs.get_mut(name) {
            // Targets print as `(.L_x_12)`.
            if op.starts_with("BRA")
                && let Some(i) = rest.find(".L")
            {
                let target: String =
                    rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '.').collect();
                f.branches.push((f.opcodes.len(), target));
            }
            f.opcodes.push(op.to_string());
        }
    }
    funcs.into_values().collect()
}

/// Per-SM limits of an architecture, for the occupancy estimate.
#[derive(Clone, Copy, Debug)]
pub struct SmLimits {
    pub registers: u32,
    pub shared_bytes: u32,
    pub threads: u32,
    pub blocks: u32,
}

/// A100 (sm_80): 164 KiB of shared memory per SM; H100/H200 (sm_90): 228 KiB. 1 KiB per block is
/// reserved by the system on both.
pub fn sm_limits(arch: &str) -> SmLimits {
    let shared = if arch.starts_with("sm_9") { 228 * 1024 } else { 164 * 1024 };
    SmLimits { registers: 65536, shared_bytes: shared, threads: 2048, blocks: 32 }
}

/// Resident blocks per SM for a kernel of `regs` registers per thread, `threads` per block and
/// `shared` static shared bytes (registers allocated per warp in units of 256).
pub fn blocks_per_sm(arch: &str, regs: u32, threads: u32, shared: u32) -> u32 {
    let l = sm_limits(arch);
    let warps = threads.div_ceil(32);
    let per_warp = (regs.max(1) * 32).div_ceil(256) * 256;
    let by_regs = l.registers / (per_warp * warps).max(1);
    let by_smem = if shared == 0 { l.blocks } else { l.shared_bytes / (shared + 1024) };
    let by_threads = l.threads / (warps * 32).max(1);
    by_regs.min(by_smem).min(by_threads).min(l.blocks)
}

/// Occupancy: resident warps over the SM's 64.
pub fn occupancy(arch: &str, regs: u32, threads: u32, shared: u32) -> f64 {
    (blocks_per_sm(arch, regs, threads, shared) * threads.div_ceil(32)) as f64 / 64.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_functions_and_opcodes() {
        let text = "\t.section\t.text.k1,\"ax\",@progbits\n.text.k1:\n        /*0000*/                   LDC R1, c[0x0][0x28] ;\n.L_x_1:\n        /*0010*/              @!P0 HMMA.16816.F32 R4, R8, R12, R4 ;\n        /*0020*/                   LDSM.16.M88.4 R8, [R2] ;\n        /*0030*/               @P1 BRA `(.L_x_1) ;\n.text.k2:\n        /*0000*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;\n        /*0010*/                   EXIT ;\n";
        let f = parse(text);
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].name, "k1");
        assert_eq!(f[0].opcodes, ["LDC", "HMMA.16816.F32", "LDSM.16.M88.4", "BRA"]);
        assert_eq!(f[0].mma_loop(), Some((3, 1.0)));
        assert_eq!(mma_work("HGMMA.64x128x16.F32"), Some(16.0));
        assert_eq!(mma_work("HGMMA.64x256x16.F32"), Some(32.0));
        assert_eq!(mma_work("LDSM.16.M88.4"), None);
        assert_eq!((f[0].count("HMMA"), f[0].count("LDSM"), f[0].count("LDS")), (1, 1, 0));
        assert_eq!((f[1].count("LDGSTS"), f[1].local_memory_ops()), (1, 0));
    }

    #[test]
    fn occupancy_follows_the_tightest_limit() {
        // 128 registers × 256 threads: 2 blocks by registers; 48 KiB + 1 KiB shared: 4 on sm_90.
        assert_eq!(blocks_per_sm("sm_90", 128, 256, 48 * 1024), 2);
        assert_eq!(blocks_per_sm("sm_80", 32, 128, 48 * 1024), 3);
        assert!((occupancy("sm_90", 128, 256, 48 * 1024) - 0.25).abs() < 1e-9);
    }
}
