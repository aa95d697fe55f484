//! The CPU backend: the reference ops and the graph executor.

pub mod exec;
mod igemm;
pub mod ops;

pub use exec::CpuExecutor;

/// "cpu (2 threads, AVX-512 conv kernel)" or "cpu (2 threads, portable conv paths)": what runs the
/// network on the CPU, for logs and benchmark records.
pub fn describe() -> String {
    let convs = if igemm::available() { "AVX-512 conv kernel" } else { "portable conv paths" };
    format!("cpu ({} threads, {convs})", rayon::current_num_threads())
}
