//! Depthwise + pointwise: a depthwise conv followed by the 1×1 dense conv that alone reads its output
//! (MobileNetV1's blocks, MobileNetV2's depthwise + project) becomes `Op::DwPw`, which a kernel runs
//! through shared memory without writing the depthwise output. A tap is never fused away.

use crate::graph::ir::{Conv, Graph, Op};

pub(super) fn fusable(graph: &Graph, dw: &Conv, pw: &Conv) -> bool {
    dw.groups == dw.cin
        && dw.cin == dw.cout
        && dw.groups > 1
        && dw.kernel == 3
        && dw.residual.is_none()
        && dw.out_channel_offset == 0
        && pw.input == dw.output
        && pw.kernel == 1
        && pw.stride == 1
        && pw.groups == 1
        && pw.residual != Some(dw.output)
        && !graph.is_tap(dw.output)
        && graph.ops.iter().filter(|o| o.reads().contains(&dw.output)).count() == 1
}

pub fn run(graph: Graph) -> Graph {
    super::fuse_adjacent(graph, |g, first, second| match (first, second) {
        (Op::Conv(dw), Op::Conv(pw)) if fusable(g, dw, pw) => Some(Op::DwPw { dw: dw.clone(), pw: pw.clone() }),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use crate::graph::Op;
    use crate::network::Network;
    use crate::weights::synthetic::SyntheticSource;

    #[test]
    fn every_depthwise_conv_of_the_mobilenets_is_fused() {
        for net in Network::ALL {
            let g = crate::model::build(net, &mut SyntheticSource { seed: 1 }).unwrap();
            let dw = g.ops.iter().filter(|o| matches!(o, Op::Conv(c) if c.groups > 1)).count();
            let f = super::run(g.clone());
            let fused = f.ops.iter().filter(|o| matches!(o, Op::DwPw { .. })).count();
            let expect = match net {
                Network::MobileNetV1_025 | Network::MobileNetV1_050 | Network::MobileNetV1 => 13,
                Network::MobileNetV2 => 17,
                _ => 0,
            };
            assert_eq!((dw, fused), (expect, expect), "{net}");
            assert_eq!(f.ops.len(), g.ops.len() - fused);
            crate::graph::Plan::new(&f, 2, 61, 45, true).unwrap();
        }
    }
}
