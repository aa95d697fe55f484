//! Finds the CUDA kernels in kernels/*.cu, embeds their sources for the runtime NVRTC compile, and
//! (feature `cuda-sim`, on by default) compiles them for the CPU with g++ and our shim
//! kernels/sim/cuda_sim.h, with one extern "C" launch wrapper per kernel, so `cargo test` runs every
//! kernel without a GPU.
//!
//! Every kernel is declared `extern "C" __global__ void [__launch_bounds__(..)] NAME(const PARAMS p)`;
//! that one-struct convention is what lets this script generate the wrappers and the host launch
//! them all through one path.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

struct Kernel {
    name: String,
    params: String,
    family: String,
}

fn parse_kernels(family: &str, src: &str) -> Vec<Kernel> {
    let mut out = Vec::new();
    for line in src.lines() {
        let l = line.trim_start();
        if !l.starts_with("extern \"C\" __global__") {
            continue;
        }
        let after_void = match l.find(" void ") {
            Some(i) => &l[i + 6..],
            None => panic!("kernels/{family}.cu: cannot parse kernel line `{l}`"),
        };
        let mut rest = after_void.trim_start();
        if rest.starts_with("__launch_bounds__") {
            let close = rest.find(')').unwrap_or_else(|| panic!("kernels/{family}.cu: bad __launch_bounds__ in `{l}`"));
            rest = rest[close + 1..].trim_start();
        }
        let open = rest.find('(').unwrap_or_else(|| panic!("kernels/{family}.cu: no parameter list in `{l}`"));
        let name = rest[..open].trim().to_string();
        let close = rest.find(')').unwrap_or_else(|| panic!("kernels/{family}.cu: no `)` in `{l}`"));
        let toks: Vec<&str> = rest[open + 1..close].split_whitespace().filter(|t| *t != "const").collect();
        assert!(toks.len() == 2, "kernels/{family}.cu: kernel {name} must take exactly one parameter struct by value");
        out.push(Kernel { name, params: toks[0].to_string(), family: family.to_string() });
    }
    out
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let kdir = root.join("kernels");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=RETINAFACE_SIM_ASAN");

    let mut families: Vec<(String, PathBuf)> = std::fs::read_dir(&kdir)
        .expect("kernels/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .map(|p| (p.file_stem().and_then(|s| s.to_str()).expect("utf-8 kernel file name").to_string(), p))
        .collect();
    families.sort();
    let mut kernels = Vec::new();
    for (fam, path) in &families {
        println!("cargo:rerun-if-changed={}", path.display());
        let src = std::fs::read_to_string(path).expect("readable kernel source");
        kernels.extend(parse_kernels(fam, &src));
    }

    // The table the runtime uses: which family (module) holds each kernel, and the embedded sources.
    let mut table = String::new();
    writeln!(table, "/// (kernel, family) of every kernel in kernels/*.cu.").ok();
    writeln!(table, "pub const KERNELS: &[(&str, &str)] = &[").ok();
    for k in &kernels {
        writeln!(table, "    ({:?}, {:?}),", k.name, k.family).ok();
    }
    writeln!(table, "];").ok();
    writeln!(table, "/// (family, source) of every kernels/*.cu.").ok();
    writeln!(table, "pub const SOURCES: &[(&str, &str)] = &[").ok();
    for (fam, path) in &families {
        writeln!(table, "    ({:?}, include_str!({:?})),", fam, path.display().to_string()).ok();
    }
    writeln!(table, "];").ok();
    writeln!(
        table,
        "pub const COMMON_HEADER: &str = include_str!({:?});",
        kdir.join("common.cuh").display().to_string()
    )
    .ok();
    // Every kernels/*.cuh, for NVRTC to splice in where a family includes it.
    let mut headers: Vec<PathBuf> = std::fs::read_dir(&kdir)
        .expect("kernels/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cuh"))
        .collect();
    headers.sort();
    writeln!(table, "/// (file name, source) of every kernels/*.cuh.").ok();
    writeln!(table, "pub const HEADERS: &[(&str, &str)] = &[").ok();
    for h in &headers {
        let name = h.file_name().and_then(|s| s.to_str()).expect("utf-8 header name");
        writeln!(table, "    ({:?}, include_str!({:?})),", name, h.display().to_string()).ok();
    }
    writeln!(table, "];").ok();
    std::fs::write(out.join("kernel_table.rs"), table).expect("write kernel_table.rs");

    if std::env::var_os("CARGO_FEATURE_CUDA_SIM").is_some() {
        build_sim(&kdir, &out, &families, &kernels);
    }
}

fn build_sim(kdir: &Path, out: &Path, families: &[(String, PathBuf)], kernels: &[Kernel]) {
    let sim = kdir.join("sim");
    println!("cargo:rerun-if-changed={}", sim.join("cuda_sim.h").display());
    println!("cargo:rerun-if-changed={}", sim.join("cuda_sim.cpp").display());
    let mut files = vec![sim.join("cuda_sim.cpp")];
    for (fam, path) in families {
        let mut w = String::new();
        writeln!(w, "#include \"cuda_sim.h\"\n#include {:?}\n#include <cstddef>", path.display().to_string()).ok();
        for k in kernels.iter().filter(|k| &k.family == fam) {
            writeln!(
                w,
                "extern \"C\" void cudasim_w_{n}(const void* p) {{ {n}(*static_cast<const {t}*>(p)); }}",
                n = k.name,
                t = k.params
            )
            .ok();
            writeln!(w, "extern \"C\" const size_t cudasim_sz_{n} = sizeof({t});", n = k.name, t = k.params).ok();
        }
        let f = out.join(format!("sim_{fam}.cpp"));
        std::fs::write(&f, w).expect("write sim wrapper");
        files.push(f);
    }
    // One registry TU that references every wrapper, so the linker keeps them all.
    let mut r = String::from("#include <cstddef>\n#include <cstdio>\n#include <cstring>\n");
    for k in kernels {
        writeln!(
            r,
            "extern \"C\" void cudasim_w_{n}(const void*); extern \"C\" const size_t cudasim_sz_{n};",
            n = k.name
        )
        .ok();
    }
    r.push_str("extern \"C\" int cudasim_run(void (*)(const void*), const void*, const unsigned*, const unsigned*, char*, size_t);\n");
    r.push_str("struct Entry { const char* name; void (*fn)(const void*); const size_t* size; };\nstatic const Entry entries[] = {\n");
    for k in kernels {
        writeln!(r, "  {{{:?}, cudasim_w_{n}, &cudasim_sz_{n}}},", k.name, n = k.name).ok();
    }
    r.push_str(
        "};\nextern \"C\" int cudasim_launch(const char* name, const unsigned* grid, const unsigned* block, const void* params, size_t size, char* err, size_t errlen) {\n\
  for (const Entry& e : entries) {\n\
    if (std::strcmp(e.name, name) != 0) continue;\n\
    if (*e.size != size) { std::snprintf(err, errlen, \"kernel %s: parameter struct is %zu bytes in C, %zu on the host\", name, *e.size, size); return 1; }\n\
    return cudasim_run(e.fn, params, grid, block, err, errlen);\n\
  }\n\
  std::snprintf(err, errlen, \"no simulated kernel named %s\", name);\n  return 1;\n}\n",
    );
    let reg = out.join("sim_registry.cpp");
    std::fs::write(&reg, r).expect("write sim registry");
    files.push(reg);

    let mut b = cc::Build::new();
    b.cpp(true)
        .compiler("g++")
        .std("c++17")
        .include(&sim)
        .include(kdir)
        .opt_level(2)
        .debug(false)
        .warnings(false)
        // No FMA contraction: device code that must round like the CPU says so with *_rn intrinsics,
        // and explicit fmaf stays fmaf. Hardware FMA keeps fmaf fast and bit-exact to the device.
        .flag("-ffp-contract=off")
        .flag("-march=native")
        // _FORTIFY_SOURCE's longjmp check rejects the jumps between fiber stacks.
        .flag("-U_FORTIFY_SOURCE")
        .flag("-fno-strict-aliasing")
        .flag("-pthread");
    if std::env::var_os("RETINAFACE_SIM_ASAN").is_some_and(|v| v == "1") {
        b.flag("-fsanitize=address").flag("-fno-omit-frame-pointer");
        println!("cargo:rustc-link-lib=dylib=asan");
    }
    for f in &files {
        b.file(f);
    }
    b.compile("cudasim");
    println!("cargo:rustc-link-lib=dylib=stdc++");
    println!("cargo:rustc-link-lib=dylib=pthread");
}
