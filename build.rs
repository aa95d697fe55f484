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

/// A launch-parameter struct of a kernel header: its name, the file declaring it and its fields as
/// (name, Rust type).
struct ParamStruct {
    name: String,
    file: PathBuf,
    fields: Vec<(String, &'static str)>,
}

/// The Rust type of a C field type: every pointer is a 64-bit device address.
fn rust_type(c_type: &str, pointer: bool, at: &str) -> &'static str {
    if pointer {
        return "u64";
    }
    match c_type {
        "int" => "i32",
        "unsigned" | "unsigned int" => "u32",
        "float" => "f32",
        "long long" => "i64",
        "unsigned long long" => "u64",
        other => panic!("{at}: field type `{other}` has no Rust mirror (add it to build.rs rust_type)"),
    }
}

/// Every `struct *Params { ... };` of a kernel source, field by field (`const float* x;`, `int n, h;`).
fn parse_param_structs(path: &Path, src: &str) -> Vec<ParamStruct> {
    let mut out = Vec::new();
    let mut cur: Option<ParamStruct> = None;
    for (i, line) in src.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("").trim();
        let at = format!("{}:{}", path.display(), i + 1);
        if cur.is_none() {
            if let Some(rest) = code.strip_prefix("struct ")
                && let Some(name) = rest.strip_suffix('{').map(str::trim)
                && name.ends_with("Params")
            {
                cur = Some(ParamStruct { name: name.to_string(), file: path.to_path_buf(), fields: Vec::new() });
            }
            continue;
        }
        if code.starts_with('}') {
            out.extend(cur.take());
            continue;
        }
        if code.is_empty() {
            continue;
        }
        let decl = code.strip_suffix(';').unwrap_or_else(|| panic!("{at}: expected `type name[, name];`"));
        // `TYPE NAME, NAME, ...`: the first segment's last word is a name, the words before it the
        // type; the other segments are names. A `*` makes the field a pointer.
        let pointer = decl.contains('*');
        let decl = decl.replace('*', " ");
        let mut segments = decl.split(',');
        let first: Vec<&str> = segments.next().unwrap_or("").split_whitespace().collect();
        let (first_name, type_words) = first.split_last().unwrap_or_else(|| panic!("{at}: empty declaration"));
        let c_type = type_words.iter().filter(|w| !matches!(**w, "const" | "volatile")).copied().collect::<Vec<_>>();
        let ty = rust_type(&c_type.join(" "), pointer, &at);
        let names: Vec<String> =
            std::iter::once(first_name.to_string()).chain(segments.map(|n| n.trim().to_string())).collect();
        let s = cur.as_mut().expect("inside a struct");
        for name in names {
            s.fields.push((name, ty));
        }
    }
    out
}

/// `#define NAME VALUE` and `#define NAME {A, B, ...}` of the shared-constant header: the one place the
/// kernels and the host take them from.
fn parse_constants(src: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in src.lines() {
        let Some(rest) = line.trim().strip_prefix("#define ") else { continue };
        let rest = rest.split("//").next().unwrap_or("").trim();
        let Some((name, value)) = rest.split_once(char::is_whitespace) else { continue };
        let value = value.trim();
        let scalar = |v: &str| -> String {
            let v = v.trim().trim_end_matches('f');
            if v.contains('.') { format!("f32 = {v}") } else { format!("usize = {v}") }
        };
        let rust = if let Some(list) = value.strip_prefix('{').and_then(|v| v.strip_suffix('}')) {
            let items: Vec<&str> = list.split(',').map(str::trim).collect();
            let ty = if items[0].contains('.') { "f32" } else { "usize" };
            let items: Vec<&str> = items.iter().map(|v| v.trim_end_matches('f')).collect();
            format!("[{ty}; {}] = [{}]", items.len(), items.join(", "))
        } else {
            scalar(value)
        };
        out.push((name.to_string(), rust));
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

    // The parameter structs of every header and kernel file, mirrored into Rust (src/cuda/params.rs
    // includes the result), and the shared constants of kernels/constants.cuh.
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&kdir)
        .expect("kernels/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu" || x == "cuh"))
        .collect();
    sources.sort();
    let mut structs = Vec::new();
    for path in &sources {
        println!("cargo:rerun-if-changed={}", path.display());
        let src = std::fs::read_to_string(path).expect("readable kernel source");
        structs.extend(parse_param_structs(path, &src));
    }
    let mut params = String::from("params! {\n");
    for s in &structs {
        let fields: Vec<String> = s.fields.iter().map(|(n, t)| format!("{n}: {t}")).collect();
        writeln!(params, "    pub struct {} {{ {} }}", s.name, fields.join(", ")).ok();
    }
    params.push_str("}\n/// (struct, [(field, Rust offset)]) of every parameter struct.\n");
    params.push_str("pub const PARAM_FIELDS: &[(&str, &[(&str, usize)])] = &[\n");
    for s in &structs {
        let fields: Vec<String> =
            s.fields.iter().map(|(n, _)| format!("({n:?}, std::mem::offset_of!({}, {n}))", s.name)).collect();
        writeln!(params, "    ({:?}, &[{}]),", s.name, fields.join(", ")).ok();
    }
    params.push_str("];\n");
    std::fs::write(out.join("kernel_params.rs"), params).expect("write kernel_params.rs");
    let consts_src = std::fs::read_to_string(kdir.join("constants.cuh")).expect("kernels/constants.cuh");
    let mut consts = String::new();
    for (name, rust) in parse_constants(&consts_src) {
        writeln!(consts, "pub const {name}: {rust};").ok();
    }
    std::fs::write(out.join("kernel_constants.rs"), consts).expect("write kernel_constants.rs");

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
    writeln!(table, "/// (file name, source) of every kernels/*.cuh, for NVRTC's include splicing.").ok();
    writeln!(table, "pub const HEADERS: &[(&str, &str)] = &[").ok();
    let mut headers: Vec<PathBuf> = std::fs::read_dir(&kdir)
        .expect("kernels/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cuh"))
        .collect();
    headers.sort();
    for h in &headers {
        let name = h.file_name().and_then(|n| n.to_str()).expect("utf-8 header name");
        writeln!(table, "    ({name:?}, include_str!({:?})),", h.display().to_string()).ok();
    }
    writeln!(table, "];").ok();
    std::fs::write(out.join("kernel_table.rs"), table).expect("write kernel_table.rs");

    if std::env::var_os("CARGO_FEATURE_CUDA_SIM").is_some() {
        build_sim(&kdir, &out, &families, &kernels, &structs);
    }
}

fn build_sim(kdir: &Path, out: &Path, families: &[(String, PathBuf)], kernels: &[Kernel], structs: &[ParamStruct]) {
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
        // The C offsets of the structs this kernel file declares (headers' go in the registry).
        for st in structs.iter().filter(|st| &st.file == path) {
            let offs: Vec<String> = st.fields.iter().map(|(n, _)| format!("offsetof({}, {n})", st.name)).collect();
            writeln!(w, "extern \"C\" const size_t cudasim_off_{}[] = {{{}}};", st.name, offs.join(", ")).ok();
        }
        let f = out.join(format!("sim_{fam}.cpp"));
        std::fs::write(&f, w).expect("write sim wrapper");
        files.push(f);
    }
    // One registry TU that references every wrapper, so the linker keeps them all.
    let mut r = String::from("#include <cstddef>\n#include <cstdio>\n#include <cstring>\n#include \"cuda_sim.h\"\n");
    let mut headers: Vec<&PathBuf> =
        structs.iter().map(|s| &s.file).filter(|f| f.extension().is_some_and(|x| x == "cuh")).collect();
    headers.dedup();
    for h in headers {
        writeln!(r, "#include {:?}", h.display().to_string()).ok();
    }
    for st in structs.iter().filter(|st| st.file.extension().is_some_and(|x| x == "cuh")) {
        let offs: Vec<String> = st.fields.iter().map(|(n, _)| format!("offsetof({}, {n})", st.name)).collect();
        writeln!(r, "extern \"C\" const size_t cudasim_off_{}[] = {{{}}};", st.name, offs.join(", ")).ok();
    }
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
    let mut decl = String::from("unsafe extern \"C\" {\n");
    for st in structs {
        writeln!(decl, "    static cudasim_off_{}: [usize; {}];", st.name, st.fields.len()).ok();
    }
    decl.push_str("}\n/// (struct, C offsets of its fields in declaration order), from the simulation's C++ build.\n");
    decl.push_str("pub fn c_param_offsets() -> Vec<(&'static str, Vec<usize>)> {\n    // SAFETY: constant arrays of the C++ objects linked in, with the lengths declared above.\n    unsafe {\n        vec![\n");
    for st in structs {
        writeln!(decl, "            ({:?}, cudasim_off_{}.to_vec()),", st.name, st.name).ok();
    }
    decl.push_str("        ]\n    }\n}\n");
    std::fs::write(out.join("sim_param_offsets.rs"), decl).expect("write sim_param_offsets.rs");
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
        // and explicit fmaf stays fmaf (libm's fma, exact on every x86-64; glibc picks the FMA
        // instruction at run time where the CPU has it).
        // No -march=native: the simulation is in the default-feature binary, which must run on any
        // x86-64 (the Docker image, release artefacts built on another machine). The CPU engine's SIMD
        // is dispatched at run time instead (src/cpu: is_x86_feature_detected!).
        .flag("-ffp-contract=off")
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
