//! The CPU backend: the reference ops and the graph executor.

pub mod exec;
mod igemm;
pub mod ops;
