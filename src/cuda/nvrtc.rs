//! Runtime compilation of the embedded kernel sources with NVRTC, straight to SASS (cubin) for the
//! device's architecture, with an on-disk cache keyed by source hash + architecture + options + NVRTC
//! version, and the ptxas resource report (registers, shared memory, spills) parsed from the log.
//!
//! Finding NVRTC: `RETINAFACE_NVRTC_LIB` may name libnvrtc.so.13 or the directory holding it (e.g. a
//! venv's `site-packages/nvidia/cu13/lib` from the `nvidia-cuda-nvrtc` wheel); it is loaded once with
//! RTLD_GLOBAL so that cudarc's own lookup by soname finds it. Otherwise the dynamic loader's search
//! path (LD_LIBRARY_PATH, system CUDA) applies. cudarc panics when a library is missing, so every
//! entry point checks presence first and returns an error instead.

use super::kernels;
use crate::error::{Error, Result};
use std::ffi::{CString, c_char};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The directory of an NVRTC given by `RETINAFACE_NVRTC_LIB`, once loaded.
fn preloaded_dir() -> Option<&'static Path> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let p = PathBuf::from(std::env::var_os("RETINAFACE_NVRTC_LIB")?);
        let file = if p.is_dir() { p.join("libnvrtc.so.13") } else { p };
        // NVRTC dlopens its builtins library by soname at compile time; outside LD_LIBRARY_PATH it is
        // only found when already loaded, so load it first from the same directory.
        if let Some(b) = file.parent().map(|d| d.join("libnvrtc-builtins.so.13.0")).filter(|b| b.exists()) {
            // SAFETY: as below; the builtins library has no initialiser preconditions.
            match unsafe {
                libloading::os::unix::Library::open(
                    Some(&b),
                    libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
                )
            } {
                Ok(l) => std::mem::forget(l),
                Err(e) => eprintln!("retinaface: {}: {e}", b.display()),
            }
        }
        // SAFETY: loading NVRTC runs its initialisers, which have no preconditions.
        let lib = unsafe {
            libloading::os::unix::Library::open(
                Some(&file),
                libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
            )
        };
        match lib {
            Ok(l) => {
                // Stays loaded for the process: cudarc resolves its symbols through it.
                std::mem::forget(l);
                file.parent().map(Path::to_path_buf)
            }
            Err(e) => {
                eprintln!("retinaface: RETINAFACE_NVRTC_LIB={}: {e}", file.display());
                None
            }
        }
    })
    .as_deref()
}

/// Ok when NVRTC can be loaded; the error says where it was looked for.
pub fn available() -> Result<()> {
    let _ = preloaded_dir();
    // SAFETY: only tries dlopen on candidate names.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::Cuda(
            "NVRTC (libnvrtc.so.13) not found: install the CUDA toolkit or `pip install nvidia-cuda-nvrtc==13.0.88` and set RETINAFACE_NVRTC_LIB to its lib directory".into(),
        ))
    }
}

/// NVRTC's version, e.g. (13, 0).
pub fn version() -> Result<(i32, i32)> {
    available()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; plain out-parameters.
    let rc = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if rc != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(Error::Cuda(format!("nvrtcVersion failed: {rc:?}")));
    }
    Ok((major, minor))
}

/// Include directories for headers NVRTC does not build in (cuda_fp16.h for the f16 path):
/// `RETINAFACE_CUDA_INCLUDE`, else the `include` next to the preloaded lib directory.
pub fn include_dirs() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(p) = std::env::var_os("RETINAFACE_CUDA_INCLUDE") {
        v.push(PathBuf::from(p));
    } else if let Some(inc) = preloaded_dir().and_then(Path::parent).map(|d| d.join("include"))
        && inc.is_dir()
    {
        v.push(inc);
    }
    v
}

/// A family's source as NVRTC compiles it: the kernels/ headers spliced in where they are included
/// (the embedded sources have no file system to include from).
pub fn full_source(family: &str) -> Result<String> {
    let src = kernels::source(family).ok_or_else(|| Error::Cuda(format!("no kernel family {family}")))?;
    Ok(kernels::splice_headers(src))
}

/// The architecture to compile for on a device of compute capability `cc`: "sm_XY", except that
/// Hopper (9.0) gets "sm_90a", whose arch-specific instructions (wgmma) the conv_f16_wg* kernels use;
/// an sm_90a cubin runs on 9.0 devices only, which is the device it is compiled for.
pub fn arch_for(major: u32, minor: u32) -> String {
    if (major, minor) == (9, 0) { "sm_90a".to_string() } else { format!("sm_{major}{minor}") }
}

/// The options every compile uses, for `arch` like "sm_90". SASS, not PTX: the driver does not JIT,
/// and ptxas checks (and reports resources of) what actually runs.
pub fn options(arch: &str) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "--ptxas-options=-v".to_string(),
        "-lineinfo".to_string(),
    ];
    for d in include_dirs() {
        o.push(format!("--include-path={}", d.display()));
    }
    o
}

/// Registers, memory and spills of one kernel as ptxas reports them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KernelResources {
    pub kernel: String,
    pub arch: String,
    pub registers: u32,
    pub shared_bytes: u32,
    pub stack_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
}

pub struct Compiled {
    pub cubin: Vec<u8>,
    pub log: String,
    pub resources: Vec<KernelResources>,
    pub from_cache: bool,
}

fn num_before(s: &str, unit: &str) -> Option<u32> {
    let i = s.find(unit)?;
    s[..i].split_whitespace().last()?.parse().ok()
}

/// Parses ptxas -v output: "Compiling entry function 'X' for 'sm_90'", "Function properties for X",
/// "N bytes stack frame, N bytes spill stores, N bytes spill loads", "Used N registers, ... N bytes smem".
pub fn parse_resources(log: &str) -> Vec<KernelResources> {
    let mut out: Vec<KernelResources> = Vec::new();
    for line in log.lines() {
        if let Some(i) = line.find("Compiling entry function '") {
            let rest = &line[i + 26..];
            let name = rest.split('\'').next().unwrap_or("").to_string();
            let arch = rest.split('\'').nth(2).unwrap_or("").to_string();
            out.push(KernelResources { kernel: name, arch, ..Default::default() });
        } else if let Some(cur) = out.last_mut() {
            if line.contains("bytes stack frame") {
                cur.stack_bytes = num_before(line, "bytes stack frame").unwrap_or(0);
                cur.spill_store_bytes = num_before(line, "bytes spill stores").unwrap_or(0);
                cur.spill_load_bytes = num_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                cur.registers = num_before(line, "registers").unwrap_or(0);
                cur.shared_bytes = num_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

/// FNV-1a, 64 bits: stable across Rust versions, unlike std's hasher.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.iter().chain(std::iter::once(&0u8)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

/// `RETINAFACE_KERNEL_CACHE`, else `$XDG_CACHE_HOME/retinaface/kernels`, else `~/.cache/retinaface/kernels`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("RETINAFACE_KERNEL_CACHE") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("retinaface").join("kernels"))
}

fn cstr_log(v: Vec<c_char>) -> String {
    let bytes: Vec<u8> = v.into_iter().map(|c| c as u8).take_while(|&c| c != 0).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compiles `family` for `arch` ("sm_80", "sm_90", ...) to a cubin, without the cache.
pub fn compile(family: &str, arch: &str) -> Result<Compiled> {
    available()?;
    let src =
        CString::new(full_source(family)?).map_err(|_| Error::Cuda(format!("kernels/{family}.cu contains NUL")))?;
    let name = CString::new(format!("{family}.cu")).map_err(|_| Error::Cuda("bad family name".into()))?;
    let opts = options(arch);
    let prog = cudarc::nvrtc::result::create_program(&src, Some(&name))
        .map_err(|e| Error::Cuda(format!("nvrtcCreateProgram({family}): {e}")))?;
    // SAFETY: prog is a live program until destroy_program below; every path reaches it.
    let result = unsafe {
        let compiled = cudarc::nvrtc::result::compile_program(prog, &opts);
        let log = cudarc::nvrtc::result::get_program_log(prog).map(cstr_log).unwrap_or_default();
        let cubin = match compiled {
            Err(e) => Err(Error::Cuda(format!("NVRTC failed on kernels/{family}.cu for {arch}: {e}\n{log}"))),
            Ok(()) => {
                let mut size = 0usize;
                let rc = cudarc::nvrtc::sys::nvrtcGetCUBINSize(prog, &mut size);
                if rc != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
                    Err(Error::Cuda(format!(
                        "nvrtcGetCUBINSize({family}, {arch}): {rc:?} (an sm_ architecture is needed for SASS)"
                    )))
                } else {
                    let mut buf = vec![0u8; size];
                    let rc = cudarc::nvrtc::sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast());
                    if rc != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
                        Err(Error::Cuda(format!("nvrtcGetCUBIN({family}, {arch}): {rc:?}")))
                    } else {
                        Ok(buf)
                    }
                }
            }
        };
        let destroyed = cudarc::nvrtc::result::destroy_program(prog);
        cubin.and_then(|c| {
            destroyed.map_err(|e| Error::Cuda(format!("nvrtcDestroyProgram: {e}")))?;
            Ok((c, log))
        })
    };
    let (cubin, log) = result?;
    let resources = parse_resources(&log);
    Ok(Compiled { cubin, log, resources, from_cache: false })
}

/// Like [`compile`], through the on-disk cache. A cache that cannot be read or written is skipped.
pub fn compile_cached(family: &str, arch: &str) -> Result<Compiled> {
    let (maj, min) = version()?;
    let src = full_source(family)?;
    let opts = options(arch).join(" ");
    let ver = format!("{maj}.{min}");
    let key = fnv1a(&[src.as_bytes(), arch.as_bytes(), opts.as_bytes(), ver.as_bytes()]);
    let path = cache_dir().map(|d| d.join(format!("{family}-{arch}-{key:016x}.cubin")));
    if let Some(p) = &path
        && let Ok(cubin) = std::fs::read(p)
        && !cubin.is_empty()
    {
        return Ok(Compiled { cubin, log: String::new(), resources: Vec::new(), from_cache: true });
    }
    let c = compile(family, arch)?;
    if let Some(p) = &path
        && let Some(dir) = p.parent()
    {
        // Written to a temporary name and renamed, so a concurrent reader never sees half a file.
        let tmp =
            dir.join(format!(".{}.{}", p.file_name().and_then(|n| n.to_str()).unwrap_or("k"), std::process::id()));
        if std::fs::create_dir_all(dir).is_ok() && std::fs::write(&tmp, &c.cubin).is_ok() {
            let _ = std::fs::rename(&tmp, p);
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_report() {
        let log = "ptxas info    : 0 bytes gmem\nptxas info    : Compiling entry function 'conv3x3' for 'sm_90'\n\
ptxas info    : Function properties for conv3x3\n    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
ptxas info    : Used 64 registers, used 1 barriers, 8192 bytes smem, 480 bytes cmem[0]\n";
        let r = parse_resources(log);
        assert_eq!(r.len(), 1);
        assert_eq!(
            r[0],
            KernelResources {
                kernel: "conv3x3".into(),
                arch: "sm_90".into(),
                registers: 64,
                shared_bytes: 8192,
                stack_bytes: 8,
                spill_store_bytes: 4,
                spill_load_bytes: 12
            }
        );
    }

    #[test]
    fn cache_key_depends_on_every_part() {
        let a = fnv1a(&[b"src", b"sm_90"]);
        assert_ne!(a, fnv1a(&[b"src", b"sm_80"]));
        assert_ne!(a, fnv1a(&[b"sr", b"csm_90"]));
    }
}
