//! Graph passes: graph → graph rewrites run after the builder and before any plan. Order matters and
//! lives in [`optimize`] (every executor's graph) and [`fuse`] (per executor).
//!
//! - [`fold_bn`]: BatchNorm into the conv before it (applied by the builder per conv, see there);
//! - [`fuse_heads`]: each level's 1×1 head conv into an explicit `Op::Heads`;
//! - [`fuse_fpn`], [`fuse_pair`], [`fuse_invres`], [`fuse_dwpw`], [`fuse_pool`]: the optional fusions
//!   of [`Fusions`]. Each executor applies those it has kernels for to the engine's graph (the CPU runs
//!   every fused op it enables as its composition of reference ops; the f16 CUDA path all but
//!   the inverted residual), and taps are never fused away, so every executor's taps stay comparable.
//!
//! A new fusion is a new file here with its own `Op` variant in src/graph/ir.rs, a flag in
//! [`Fusions`] and a line in [`fuse`], the CPU's composition of reference ops for it in
//! src/cpu/exec.rs and its kernel launch in src/cuda/engine.rs.

pub mod fold_bn;
pub mod fuse_dwpw;
pub mod fuse_fpn;
pub mod fuse_heads;
pub mod fuse_invres;
pub mod fuse_pair;
pub mod fuse_pool;

use crate::error::Result;
use crate::graph::{Graph, Op, TensorId};

/// The passes every executor's graph gets.
pub fn optimize(graph: Graph) -> Result<Graph> {
    fuse_heads::run(graph)
}

/// Which optional fusions an executor runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fusions {
    /// FPN lateral 1×1 with the upsample-add in its epilogue (`Op::ConvUpsampleAdd`).
    pub fpn_upsample_add: bool,
    /// Two convs of one input as one GEMM (`Op::ConvPair`).
    pub conv_pair: bool,
    /// Depthwise + pointwise through shared memory (`Op::DwPw`).
    pub dw_pw: bool,
    /// MobileNetV2's expand + depthwise + project through shared memory (`Op::InvRes`); applied
    /// before `dw_pw`, which takes the blocks it leaves.
    pub inv_res: bool,
    /// A conv with the max-pool of its output (`Op::ConvMaxPool`: ResNet's stem), pooled as its rows
    /// are computed.
    pub conv_max_pool: bool,
}

impl Fusions {
    pub const NONE: Fusions =
        Fusions { fpn_upsample_add: false, conv_pair: false, dw_pw: false, inv_res: false, conv_max_pool: false };
    pub const ALL: Fusions =
        Fusions { fpn_upsample_add: true, conv_pair: true, dw_pw: true, inv_res: true, conv_max_pool: true };
    /// The CPU runs each fused op as its composition, or fused where it has a faster path for it
    /// (depthwise + pointwise and the inverted residual per row band, the conv + max-pool on the direct
    /// path): the same results, and the f32 CUDA executor's plan but for the ResNets' stem and pool.
    pub const CPU: Fusions = Fusions::ALL;
    /// kernels/conv.cu has a kernel for each fused op but the conv + max-pool.
    pub const CUDA_F32: Fusions = Fusions { conv_max_pool: false, ..Fusions::ALL };
    /// kernels/conv_f16.cu's fused kernels: all but the inverted residual and the conv + max-pool.
    pub const CUDA_F16: Fusions = Fusions { inv_res: false, conv_max_pool: false, ..Fusions::ALL };
}

/// `graph` with the fusions of `f` applied. A fusion only rewrites patterns it can prove equal, so
/// it never fails; what does not fit stays as it was.
pub fn fuse(graph: &Graph, f: Fusions) -> Graph {
    let mut g = graph.clone();
    if f.fpn_upsample_add {
        g = fuse_fpn::run(g);
    }
    if f.conv_pair {
        g = fuse_pair::run(g);
    }
    if f.inv_res {
        g = fuse_invres::run(g);
    }
    if f.dw_pw {
        g = fuse_dwpw::run(g);
    }
    if f.conv_max_pool {
        g = fuse_pool::run(g);
    }
    g
}

/// Removes op `i` and its stage.
fn remove_op(graph: &mut Graph, i: usize) {
    graph.ops.remove(i);
    graph.op_stages.remove(i);
}

/// Replaces each pair of adjacent ops that `fuse` makes one op of (scanning forward, a fused op not
/// fused again) by that op, in the first one's place and stage.
fn fuse_adjacent(mut graph: Graph, fuse: impl Fn(&Graph, &Op, &Op) -> Option<Op>) -> Graph {
    let mut i = 0;
    while i + 1 < graph.ops.len() {
        if let Some(op) = fuse(&graph, &graph.ops[i], &graph.ops[i + 1]) {
            graph.ops[i] = op;
            remove_op(&mut graph, i + 1);
        }
        i += 1;
    }
    graph
}

/// Whether any op strictly between `from` and `to` reads one of `read` or writes one of `written`.
fn ops_between_touch(graph: &Graph, from: usize, to: usize, read: &[TensorId], written: &[TensorId]) -> bool {
    graph.ops[from + 1..to]
        .iter()
        .any(|o| o.reads().iter().any(|t| read.contains(t)) || o.writes().iter().any(|t| written.contains(t)))
}
