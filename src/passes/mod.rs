//! Graph passes: graph → graph rewrites run once, after the builder and before any plan, so every
//! executor sees the same optimised graph. Order matters and lives in [`optimize`].
//!
//! - [`fold_bn`]: BatchNorm into the conv before it (applied by the builder per conv, see there);
//! - [`fuse_heads`]: each level's 1×1 head conv into an explicit `Op::Heads`.
//!
//! A new fusion (depthwise + pointwise, FPN lateral + upsample-add) is a new file here with its own
//! `Op` variant in src/graph/ir.rs, a line in [`optimize`], the CPU's composition of reference ops
//! for it in src/cpu/exec.rs and its kernel launch in src/cuda/engine.rs.

pub mod fold_bn;
pub mod fuse_heads;

use crate::error::Result;
use crate::graph::Graph;

/// Every pass, in order.
pub fn optimize(graph: Graph) -> Result<Graph> {
    fuse_heads::run(graph)
}
