//! The kernel sources embedded at build time (build.rs scans kernels/*.cu) and which family (one
//! .cu file, one module on the device) holds each kernel.

include!(concat!(env!("OUT_DIR"), "/kernel_table.rs"));

pub fn family_of(kernel: &str) -> Option<&'static str> {
    KERNELS.iter().find(|(k, _)| *k == kernel).map(|(_, f)| *f)
}

pub fn source(family: &str) -> Option<&'static str> {
    SOURCES.iter().find(|(f, _)| *f == family).map(|(_, s)| *s)
}

pub fn families() -> impl Iterator<Item = &'static str> {
    SOURCES.iter().map(|(f, _)| *f)
}

/// `src` with every `#include "X.cuh"` of a kernels/ header replaced by that header (recursively; a
/// header's second inclusion is dropped, as `#pragma once` would): NVRTC compiles embedded sources and
/// has no file system to include from.
pub fn splice_headers(src: &str) -> String {
    let mut out = src.to_string();
    let mut done: Vec<&str> = Vec::new();
    for _ in 0..16 {
        let mut changed = false;
        for (name, text) in HEADERS {
            let line = format!("#include \"{name}\"");
            while let Some(i) = out.find(&line) {
                let with = if done.contains(name) { "" } else { text };
                out.replace_range(i..i + line.len(), with);
                done.push(name);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    out
}
