//! Convolution pairs: two adjacent dense convs of one input with the same kernel, stride and padding
//! (SSH's conv3X3 and conv5X5_1, and its conv5X5_2 and conv7X7_2; ResNet-50's first downsample and
//! conv1) become `Op::ConvPair`, one
//! GEMM over both weight sets that reads the input once. Residual convs are left alone.

use crate::graph::ir::{Conv, Graph, Op};

fn pairable(a: &Conv, b: &Conv) -> bool {
    a.input == b.input
        && a.groups == 1
        && b.groups == 1
        && matches!(a.kernel, 1 | 3)
        && (a.kernel, a.stride, a.pad) == (b.kernel, b.stride, b.pad)
        && a.cin == b.cin
        && a.residual.is_none()
        && b.residual.is_none()
        && a.output != b.output
}

pub fn run(graph: Graph) -> Graph {
    super::fuse_adjacent(graph, |_, first, second| match (first, second) {
        (Op::Conv(a), Op::Conv(b)) if pairable(a, b) => Some(Op::ConvPair { a: a.clone(), b: b.clone() }),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use crate::graph::Op;
    use crate::network::Network;
    use crate::weights::synthetic::SyntheticSource;

    /// Each SSH module has two pairs: conv3X3 + conv5X5_1 (of the module's input) and conv5X5_2 +
    /// conv7X7_2 (of conv5X5_1's output).
    #[test]
    fn each_ssh_module_gets_two_pairs() {
        for net in Network::ALL {
            let g = crate::model::build(net, &mut SyntheticSource { seed: 1 }).unwrap();
            let f = super::run(g.clone());
            let pairs: Vec<(String, String)> = f
                .ops
                .iter()
                .filter_map(
                    |o| if let Op::ConvPair { a, b } = o { Some((a.name.clone(), b.name.clone())) } else { None },
                )
                .collect();
            let ssh: Vec<(String, String)> = pairs.iter().filter(|p| p.0.starts_with("ssh")).cloned().collect();
            let want: Vec<(String, String)> = (1..=3)
                .flat_map(|k| {
                    [("conv3X3", "conv5X5_1"), ("conv5X5_2", "conv7X7_2")]
                        .map(|(a, b)| (format!("ssh{k}.{a}"), format!("ssh{k}.{b}")))
                })
                .collect();
            assert_eq!(ssh, want, "{net}");
            // Elsewhere only ResNet-50's first block (downsample + conv1, both 1x1 of the max-pool).
            let other = pairs.len() - ssh.len();
            assert_eq!(other, usize::from(net == Network::ResNet50), "{net}: {pairs:?}");
            assert_eq!(f.ops.len(), g.ops.len() - pairs.len());
            crate::graph::Plan::new(&f, 2, 61, 45, false).unwrap();
        }
    }
}
