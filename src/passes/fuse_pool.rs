//! A convolution whose output only the 3×3 stride-2 max-pool after it reads (ResNet's stem) becomes
//! `Op::ConvMaxPool`, so an executor can pool the conv's rows as it computes them instead of writing
//! the conv's output (64 channels at half the input size: 26 MB at 640²) and reading it back. Only
//! where pooling before the epilogue gives the same values (`Conv::epilogue_commutes_with_max`), the
//! conv dense and writing its whole tensor; taps are never fused away.

use crate::graph::ir::{Conv, Graph, Op};

/// Whether the pool of `c`'s output can run on its sums, and `c` is dense and writes its whole tensor.
fn poolable(graph: &Graph, c: &Conv) -> bool {
    c.epilogue_commutes_with_max()
        && c.groups == 1
        && c.out_channel_offset == 0
        && graph.tensors[c.output].channels == c.cout
        && !graph.is_tap(c.output)
}

pub fn run(graph: Graph) -> Graph {
    super::fuse_adjacent(graph, |g, first, second| match (first, second) {
        (Op::Conv(c), Op::MaxPool { input, output })
            if *input == c.output
                && poolable(g, c)
                && g.ops.iter().filter(|o| o.reads().contains(&c.output)).count() == 1 =>
        {
            Some(Op::ConvMaxPool { conv: c.clone(), output: *output })
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use crate::graph::Op;
    use crate::network::Network;
    use crate::weights::synthetic::SyntheticSource;

    /// The ResNets' stem and max-pool become one op; the MobileNets have no max-pool and stay as they
    /// were; the fused graph still plans.
    #[test]
    fn the_resnet_stems_take_their_max_pool() {
        for net in Network::ALL {
            let g = crate::model::build(net, &mut SyntheticSource { seed: 1 }).unwrap();
            let f = super::run(g.clone());
            let fused: Vec<&str> = f
                .ops
                .iter()
                .filter_map(|o| if let Op::ConvMaxPool { conv, .. } = o { Some(conv.name.as_str()) } else { None })
                .collect();
            let pools = g.ops.iter().filter(|o| matches!(o, Op::MaxPool { .. })).count();
            assert_eq!(fused.len(), pools, "{net}: {fused:?}");
            assert!(fused.iter().all(|n| n.ends_with("conv1")), "{net}: {fused:?}");
            assert_eq!(f.ops.len(), g.ops.len() - pools);
            assert!(!f.ops.iter().any(|o| matches!(o, Op::MaxPool { .. })), "{net}");
            crate::graph::Plan::new(&f, 2, 61, 45, false).unwrap();
        }
    }
}
