//! The CPU backend: the reference ops and the graph executor.

pub mod exec;
pub mod ops;
