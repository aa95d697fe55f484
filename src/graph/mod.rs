//! The network as data and what is computed from it before any executor runs: the IR ([`ir`]) and the
//! execution plan for one input size ([`plan`]). Imports nothing above the network description.

pub mod ir;
pub mod plan;

pub use ir::{Act, Conv, Graph, Op, Stage, Taps, TensorId, TensorInfo};
pub use plan::{DEFAULT_PLAN_CACHE_BYTES, Layout, Plan, PlanBuffers, PlanCache, PlanKey};
