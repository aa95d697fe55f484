//! Head fusion: the conv writing each level's head tap (a 1×1 conv to 32 channels at the level's
//! anchor stride) becomes `Op::Heads { level, conv }`, so executors dispatch on the op instead of
//! recognising heads by where a conv writes. A head tap written by anything else is an error.

use crate::error::{Error, Result};
use crate::graph::ir::{Graph, HEAD_CHANNELS, Op};
use crate::post::anchors;

pub fn run(mut graph: Graph) -> Result<Graph> {
    let heads = graph.taps.head;
    let mut fused = [false; 3];
    for op in &mut graph.ops {
        let Some(level) = heads.iter().position(|&t| t == op.output()) else { continue };
        let conv = match op {
            Op::Conv(c) => c,
            Op::Heads { .. } => {
                fused[level] = true;
                continue;
            }
            _ => return Err(Error::Graph(format!("head {level} is not written by a convolution"))),
        };
        let stride = graph.tensors[conv.output].stride;
        if conv.kernel != 1
            || conv.stride != 1
            || conv.groups != 1
            || conv.cout != HEAD_CHANNELS
            || conv.out_channel_offset != 0
            || conv.residual.is_some()
            || stride != anchors::STEPS[level]
        {
            return Err(Error::Graph(format!(
                "head {} is not a 1x1 conv to {HEAD_CHANNELS} channels at stride {}",
                conv.name,
                anchors::STEPS[level]
            )));
        }
        if fused[level] {
            return Err(Error::Graph(format!("head {level} is written twice")));
        }
        fused[level] = true;
        *op = Op::Heads { level, conv: conv.clone() };
    }
    if let Some(l) = fused.iter().position(|f| !f) {
        return Err(Error::Graph(format!("head {l} is never written")));
    }
    Ok(graph)
}

#[cfg(test)]
mod tests {
    use crate::graph::Op;
    use crate::network::Network;
    use crate::weights::synthetic::SyntheticSource;

    #[test]
    fn every_network_gets_three_head_ops_and_the_pass_is_idempotent() {
        for net in Network::ALL {
            let g = crate::model::build(net, &mut SyntheticSource { seed: 1 }).unwrap();
            let convs = g.ops.len();
            let g = super::run(g).unwrap();
            let levels: Vec<usize> = g
                .ops
                .iter()
                .filter_map(|op| if let Op::Heads { level, .. } = op { Some(*level) } else { None })
                .collect();
            assert_eq!(levels, vec![0, 1, 2], "{net}");
            assert_eq!(g.ops.len(), convs);
            assert_eq!(super::run(g.clone()).unwrap().ops.len(), convs);
        }
    }

    #[test]
    fn a_head_that_is_not_a_1x1_conv_is_named() {
        let mut g = crate::model::build(Network::MobileNetV1_025, &mut SyntheticSource { seed: 1 }).unwrap();
        let t = g.taps.head[1];
        for op in &mut g.ops {
            if let Op::Conv(c) = op
                && c.output == t
            {
                c.kernel = 3;
            }
        }
        let e = super::run(g).unwrap_err().to_string();
        assert!(e.contains("is not a 1x1 conv to 32 channels at stride 16"), "{e}");
    }
}
