//! MobileNetV2's inverted residual: a 1×1 expansion whose output only a depthwise 3×3 reads, then
//! the 1×1 projection that alone reads the depthwise output (three adjacent convs), wider in the
//! middle than at either end, becomes `Op::InvRes`, which one kernel runs per output tile with the
//! expanded tensor (halo recomputed) and the depthwise tile in shared memory: neither the expanded
//! nor the depthwise tensor is written. Runs before [`super::fuse_dwpw`], which would otherwise take
//! the depthwise + project pair. A tap is never fused away.
//!
//! Only blocks that widen and narrow again: there the unwritten middle tensor is the largest of
//! the block, and the recomputation (the window's halo, and the expansion once per 64 output
//! channels) stays a fraction of the traffic saved. MobileNetV1's pointwise → depthwise →
//! pointwise chains have the same three ops but widen monotonically (up to 1024 outputs: 16 column
//! recomputations); they stay `Op::DwPw`.

use super::fuse_dwpw;
use crate::graph::ir::{Conv, Graph, Op};

/// The kernel's shared halo holds a stride-1 or stride-2 3×3 window per output tile.
const MAX_STRIDE: usize = 2;

fn fusable(graph: &Graph, ex: &Conv, dw: &Conv, pw: &Conv) -> bool {
    ex.kernel == 1
        && ex.stride == 1
        && ex.pad == 0
        && ex.groups == 1
        && ex.residual.is_none()
        && ex.out_channel_offset == 0
        && ex.cout == dw.cin
        && ex.cout > ex.cin
        && pw.cout < ex.cout
        && dw.input == ex.output
        && dw.stride <= MAX_STRIDE
        && !graph.is_tap(ex.output)
        && graph.ops.iter().filter(|o| o.reads().contains(&ex.output)).count() == 1
        && fuse_dwpw::fusable(graph, dw, pw)
}

pub fn run(mut graph: Graph) -> Graph {
    let mut i = 0;
    while i + 2 < graph.ops.len() {
        let fused = match &graph.ops[i..i + 3] {
            [Op::Conv(ex), Op::Conv(dw), Op::Conv(pw)] if fusable(&graph, ex, dw, pw) => {
                Some(Op::InvRes { ex: ex.clone(), dw: dw.clone(), pw: pw.clone() })
            }
            _ => None,
        };
        if let Some(op) = fused {
            graph.ops[i] = op;
            super::remove_op(&mut graph, i + 1);
            super::remove_op(&mut graph, i + 1);
        }
        i += 1;
    }
    graph
}

#[cfg(test)]
mod tests {
    use crate::graph::Op;
    use crate::network::Network;
    use crate::weights::synthetic::SyntheticSource;

    /// MobileNetV2's 16 blocks with an expansion (all but the first) fuse; nothing else does.
    #[test]
    fn every_expanded_block_of_mobilenetv2_is_fused() {
        for net in Network::ALL {
            let g = crate::model::build(net, &mut SyntheticSource { seed: 1 }).unwrap();
            let f = super::run(g.clone());
            let fused: Vec<_> = f
                .ops
                .iter()
                .filter_map(|o| match o {
                    Op::InvRes { ex, dw, pw } => Some((ex, dw, pw)),
                    _ => None,
                })
                .collect();
            assert_eq!(fused.len(), if net == Network::MobileNetV2 { 16 } else { 0 }, "{net}");
            for (ex, dw, pw) in &fused {
                assert_eq!((ex.cout, dw.groups, pw.cin), (dw.cin, dw.cin, dw.cout), "{}", ex.name);
                // A shortcut exactly where the shapes allow it, and it is the block's input.
                let shortcut = dw.stride == 1 && ex.cin == pw.cout;
                assert_eq!(pw.residual, shortcut.then_some(ex.input), "{}", ex.name);
            }
            assert_eq!(f.ops.len(), g.ops.len() - 2 * fused.len());
            assert_eq!(f.op_stages.len(), f.ops.len());
            // The remaining depthwise + project pair (block 1, no expansion) still fuses after.
            let dwpw = crate::passes::fuse_dwpw::run(f.clone());
            let pairs = dwpw.ops.iter().filter(|o| matches!(o, Op::DwPw { .. })).count();
            let want = match net {
                Network::MobileNetV2 => 1,
                Network::MobileNetV1_025 | Network::MobileNetV1_050 | Network::MobileNetV1 => 13,
                _ => 0,
            };
            assert_eq!(pairs, want, "{net}");
            crate::graph::Plan::new(&f, 2, 61, 45, true).unwrap();
        }
    }
}
