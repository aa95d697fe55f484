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
