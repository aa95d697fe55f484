//! FPN lateral + upsample-add: an `UpsampleAdd { src, dst }` whose `dst` is written whole by one
//! earlier 1×1 conv (the lateral) becomes `Op::ConvUpsampleAdd { conv, src }` at the upsample-add's
//! place, so the finer map is written once, already merged, instead of written, read and rewritten.
//! The conv moves later in the graph, so nothing between its old and new places may touch `dst` or
//! write the conv's input; a pattern that does not fit is left as it is.

use super::{ops_between_touch, remove_op};
use crate::graph::ir::{Graph, Op};

pub fn run(mut graph: Graph) -> Graph {
    let mut i = 0;
    while i < graph.ops.len() {
        let Op::UpsampleAdd { src, dst } = graph.ops[i] else {
            i += 1;
            continue;
        };
        let Some(j) = (0..i).rev().find(|&j| graph.ops[j].writes().contains(&dst)) else {
            i += 1;
            continue;
        };
        let conv = match &graph.ops[j] {
            Op::Conv(c)
                if c.kernel == 1
                    && c.groups == 1
                    && c.out_channel_offset == 0
                    && c.cout == graph.tensors[dst].channels
                    && graph.tensors[src].channels == c.cout
                    && src != dst
                    && !ops_between_touch(&graph, j, i, &[dst], &[c.input, dst])
                    && c.residual.is_none_or(|r| !ops_between_touch(&graph, j, i, &[], &[r])) =>
            {
                c.clone()
            }
            _ => {
                i += 1;
                continue;
            }
        };
        graph.ops[i] = Op::ConvUpsampleAdd { conv, src };
        remove_op(&mut graph, j);
        // The fused op now sits at i - 1; the next candidate is at i.
    }
    graph
}

#[cfg(test)]
mod tests {
    use crate::graph::Op;
    use crate::network::Network;
    use crate::weights::synthetic::SyntheticSource;

    #[test]
    fn every_network_loses_both_upsample_adds() {
        for net in Network::ALL {
            let g = crate::model::build(net, &mut SyntheticSource { seed: 1 }).unwrap();
            let n = g.ops.len();
            let f = super::run(g.clone());
            assert_eq!(f.ops.len(), n - 2, "{net}");
            assert_eq!(f.op_stages.len(), f.ops.len());
            assert!(!f.ops.iter().any(|o| matches!(o, Op::UpsampleAdd { .. })), "{net}");
            let fused: Vec<_> = f
                .ops
                .iter()
                .filter_map(
                    |o| if let Op::ConvUpsampleAdd { conv, src } = o { Some((conv.output, *src)) } else { None },
                )
                .collect();
            // Level 1 takes level 2's lateral, level 0 takes the level-1 merge (the FPN tap).
            assert_eq!(fused, vec![(fused[0].0, g.taps.fpn[2]), (fused[1].0, g.taps.fpn[1])], "{net}");
            crate::graph::Plan::new(&f, 2, 61, 45, false).unwrap();
        }
    }
}
