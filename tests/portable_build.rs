//! The shipped binary targets the x86-64 baseline: nothing in the build asks for the build machine's
//! CPU (`-march=native`, `target-cpu=native`), so a binary built in the Docker image or for a release
//! runs on any x86-64; SIMD is chosen at run time (src/cpu, src/post/nms.rs).

use std::path::Path;

#[test]
fn nothing_in_the_build_targets_the_build_machine() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("build.rs"), root.join("Cargo.toml")];
    for dir in [root.join(".cargo"), root.join("deploy")] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            files.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_file()));
        }
    }
    for f in files.iter().filter(|f| f.exists()) {
        let text = std::fs::read_to_string(f).unwrap();
        for (i, line) in text.lines().enumerate() {
            let code = line.trim_start();
            // Comments may name the flags to explain the rule.
            if code.starts_with("//") || code.starts_with('#') {
                continue;
            }
            for bad in ["-march=native", "-mtune=native", "target-cpu=native"] {
                assert!(!code.contains(bad), "{}:{}: asks for {bad}: {line}", f.display(), i + 1);
            }
        }
    }
}
