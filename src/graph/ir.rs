//! The network as data: a list of ops over tensors, built once from the weights, run by a backend.
//!
//! Every tensor is [N, C, ceil(H/stride), ceil(W/stride)] for an input of N×3×H×W: each stride-2 layer
//! of every network maps a size s to ceil(s/2), so a tensor's shape follows from its channel count and
//! its stride alone, for any input size.

use crate::network::Network;

pub type TensorId = usize;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Act {
    None,
    /// LeakyReLU with this negative slope; 0 is ReLU.
    Leaky(f32),
    Relu6,
}

impl Act {
    #[inline(always)]
    pub fn apply(self, v: f32) -> f32 {
        match self {
            Act::None => v,
            Act::Leaky(a) => {
                if v >= 0.0 {
                    v
                } else {
                    v * a
                }
            }
            Act::Relu6 => v.clamp(0.0, 6.0),
        }
    }
}

#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub channels: usize,
    /// Downsampling factor relative to the network input.
    pub stride: usize,
}

impl TensorInfo {
    pub fn height(&self, input_h: usize) -> usize {
        input_h.div_ceil(self.stride)
    }
    pub fn width(&self, input_w: usize) -> usize {
        input_w.div_ceil(self.stride)
    }
}

/// Convolution with its BatchNorm folded in: `out[:, off..off+cout] = act(conv(x, weight) + bias [+ residual])`.
#[derive(Clone, Debug)]
pub struct Conv {
    /// The state-dict prefix of the conv, for messages and profiling.
    pub name: String,
    pub input: TensorId,
    pub output: TensorId,
    /// First output channel written (SSH branches write into one buffer at their channel offset).
    pub out_channel_offset: usize,
    pub cin: usize,
    pub cout: usize,
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
    pub groups: usize,
    /// [cout, cin/groups, k, k], BatchNorm folded.
    pub weight: Vec<f32>,
    /// [cout].
    pub bias: Vec<f32>,
    /// Added before the activation (ResNet and MobileNetV2 shortcuts).
    pub residual: Option<TensorId>,
    pub act: Act,
    /// The CPU backend's repackings of `weight` for its kernels, each made on first use.
    pub packed: PackedWeights,
}

impl Conv {
    /// Whether the maximum of the conv's outputs is its epilogue applied to the maximum of its sums:
    /// no residual, and an activation that never decreases (ReLU, ReLU6, none, LeakyReLU of slope ≥ 0),
    /// so with g(s) = act(s + bias) non-decreasing (rounding s + bias is monotone too), max g(sᵢ) =
    /// g(max sᵢ) exactly. What lets a max-pool run on the sums (`Op::ConvMaxPool`).
    pub fn epilogue_commutes_with_max(&self) -> bool {
        let non_decreasing = match self.act {
            Act::None | Act::Relu6 => true,
            Act::Leaky(a) => a >= 0.0,
        };
        non_decreasing && self.residual.is_none()
    }

    /// A convolution from tensor 0 into tensor 1 with "same" padding (`kernel / 2`), no channel offset,
    /// no shortcut and nothing packed, its weights ([cout, cin/groups, k, k]) then its biases drawn
    /// from `values`: the convolution tests and benchmarks start from (other fields by struct update).
    pub fn with_values(
        name: &str,
        [cin, cout, kernel, stride, groups]: [usize; 5],
        act: Act,
        values: &mut dyn FnMut() -> f32,
    ) -> Conv {
        let weight = (0..cout * (cin / groups.max(1)) * kernel * kernel).map(|_| values()).collect();
        let bias = (0..cout).map(|_| values()).collect();
        Conv {
            name: name.into(),
            input: 0,
            output: 1,
            out_channel_offset: 0,
            cin,
            cout,
            kernel,
            stride,
            pad: kernel / 2,
            groups,
            weight,
            bias,
            residual: None,
            act,
            packed: Default::default(),
        }
    }
}

/// `Conv::weight` as the CPU's micro-kernels read it, each layout made on first use (a conv may run on
/// either path, at different input sizes).
#[derive(Clone, Debug, Default)]
pub struct PackedWeights {
    /// [cout/MR][K][MR] for the implicit GEMM.
    pub igemm: std::sync::OnceLock<Vec<f32>>,
    /// The Winograd-transformed 3×3 weights, [16][cout/MR][cin][MR] for F(2×2, 3×3).
    pub winograd: std::sync::OnceLock<Vec<f32>>,
    /// The same for F(4×4, 3×3), [36][cout/MR][cin][MR].
    pub winograd4: std::sync::OnceLock<Vec<f32>>,
    /// [cout/64][K][64] from a 64-byte boundary, for the direct path vectorised over output channels.
    pub direct_co: std::sync::OnceLock<Vec<f32>>,
    /// The first conv of an `Op::ConvPair` with the second's weights after its own: the one convolution
    /// the CPU runs for the pair (its packings made on first use like these).
    pub pair: std::sync::OnceLock<Box<Conv>>,
}

// Ops are made once per graph and held in its Vec: the fused variants' size costs nothing per pass,
// and boxing their convs would only add indirection to every match.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Op {
    Conv(Conv),
    /// 3×3 stride-2 max-pool with padding 1 (padding is −∞).
    MaxPool {
        input: TensorId,
        output: TensorId,
    },
    /// `dst += nearest_resize(src, size of dst)` with PyTorch's `nearest` index rule.
    UpsampleAdd {
        src: TensorId,
        dst: TensorId,
    },
    /// The fused heads of one pyramid level (made by `passes::fuse_heads`): the 1×1 conv to
    /// [`HEAD_CHANNELS`] whose output is the level's head tap, then the anchor-major split into loc,
    /// softmaxed conf and landmarks. The CPU runs the conv and splits when it reads the raw outputs;
    /// the CUDA heads kernel does both in one launch and never writes the head tensor.
    Heads {
        level: usize,
        conv: Conv,
    },
    /// `conv`, then `conv.output += nearest_resize(src)` (made by `passes::fuse_fpn`): the FPN lateral
    /// 1×1 with the top-down merge in its epilogue. The upsampled map is added after the activation.
    ConvUpsampleAdd {
        conv: Conv,
        src: TensorId,
    },
    /// Two convolutions of one input with the same geometry (made by `passes::fuse_pair`: SSH's
    /// conv3X3 and conv5X5_1): one GEMM over `a.cout + b.cout` channels whose epilogue sends each
    /// conv's channels to its own destination with its own activation and channel offset.
    ConvPair {
        a: Conv,
        b: Conv,
    },
    /// A depthwise conv whose output only `pw`, a 1×1 dense conv, reads (made by `passes::fuse_dwpw`:
    /// MobileNetV1 blocks, MobileNetV2's depthwise + project). `dw.output` is scratch: the plan gives
    /// it arena space for the CPU's composition; the CUDA kernel keeps it in shared memory and never
    /// writes it.
    DwPw {
        dw: Conv,
        pw: Conv,
    },
    /// `conv`, then the 3×3 stride-2 max-pool (padding −∞) of its output into `output` (made by
    /// `passes::fuse_pool`: ResNet's stem), where only the pool reads the conv's output. `conv.output`
    /// is scratch, as `DwPw`'s depthwise output: the plan gives it arena space for the composition; the
    /// CPU's direct path pools the conv's rows as it computes them and never writes it.
    ConvMaxPool {
        conv: Conv,
        output: TensorId,
    },
    /// MobileNetV2's inverted residual (made by `passes::fuse_invres`): the 1×1 expansion `ex`, the
    /// depthwise conv `dw` of its output and the 1×1 projection `pw` of that (with the shortcut as
    /// `pw.residual`). `ex.output` and `dw.output` are scratch, as `DwPw`'s: the CUDA kernel keeps
    /// the expanded tile (with its halo) and the depthwise tile in shared memory.
    InvRes {
        ex: Conv,
        dw: Conv,
        pw: Conv,
    },
}

impl Op {
    /// The tensor the op writes.
    pub fn output(&self) -> TensorId {
        Graph::op_output(self)
    }

    /// The tensors the op reads; an in-place op's destination counts, as its old values are read.
    pub fn reads(&self) -> Vec<TensorId> {
        match self {
            Op::Conv(c) | Op::Heads { conv: c, .. } => std::iter::once(c.input).chain(c.residual).collect(),
            Op::MaxPool { input, .. } => vec![*input],
            Op::ConvMaxPool { conv, .. } => vec![conv.input],
            Op::UpsampleAdd { src, dst } => vec![*src, *dst],
            Op::ConvUpsampleAdd { conv, src } => [conv.input, *src].into_iter().chain(conv.residual).collect(),
            Op::ConvPair { a, b } => [a.input, b.input].into_iter().chain(a.residual).chain(b.residual).collect(),
            Op::DwPw { dw, pw } => std::iter::once(dw.input).chain(dw.residual).chain(pw.residual).collect(),
            Op::InvRes { ex, dw, pw } => {
                std::iter::once(ex.input).chain(ex.residual).chain(dw.residual).chain(pw.residual).collect()
            }
        }
    }

    /// Every tensor the op writes, [`Op::output`] first: a pair's second destination, a fused
    /// depthwise conv's (and expansion's) scratch.
    pub fn writes(&self) -> Vec<TensorId> {
        match self {
            Op::ConvPair { a, b } => vec![a.output, b.output],
            Op::DwPw { dw, pw } => vec![pw.output, dw.output],
            Op::ConvMaxPool { conv, output } => vec![*output, conv.output],
            Op::InvRes { ex, dw, pw } => vec![pw.output, dw.output, ex.output],
            _ => vec![self.output()],
        }
    }

    /// The convolutions the op runs, in the order its CPU composition runs them.
    pub fn convs(&self) -> Vec<&Conv> {
        match self {
            Op::Conv(c) | Op::Heads { conv: c, .. } | Op::ConvUpsampleAdd { conv: c, .. } => vec![c],
            Op::ConvMaxPool { conv, .. } => vec![conv],
            Op::ConvPair { a, b } => vec![a, b],
            Op::DwPw { dw, pw } => vec![dw, pw],
            Op::InvRes { ex, dw, pw } => vec![ex, dw, pw],
            Op::MaxPool { .. } | Op::UpsampleAdd { .. } => Vec::new(),
        }
    }
}

/// Where a data-path stage's result lives.
#[derive(Clone, Copy, Debug)]
pub struct Taps {
    pub backbone: [TensorId; 3],
    pub fpn: [TensorId; 3],
    pub ssh: [TensorId; 3],
    /// Per level, the three heads as one 1×1 conv with 32 channels: per anchor j (0, 1), class logits at
    /// `2j..2j+2`, box at `4 + 4j..`, landmarks at `12 + 10j..`.
    pub head: [TensorId; 3],
}

pub const HEAD_CHANNELS: usize = 32;
pub const HEAD_CLASS_OFFSET: usize = 0;
pub const HEAD_BOX_OFFSET: usize = 4;
pub const HEAD_LANDMARK_OFFSET: usize = 12;

/// Which stage an op belongs to, for per-stage timings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Backbone,
    Neck,
    Heads,
}

#[derive(Clone, Debug)]
pub struct Graph {
    pub network: Network,
    pub tensors: Vec<TensorInfo>,
    pub ops: Vec<Op>,
    pub op_stages: Vec<Stage>,
    pub input: TensorId,
    pub taps: Taps,
}

impl Graph {
    /// Every tap tensor: the stages' results the executors hand back.
    pub fn is_tap(&self, t: TensorId) -> bool {
        let taps = &self.taps;
        taps.backbone.contains(&t) || taps.fpn.contains(&t) || taps.ssh.contains(&t) || taps.head.contains(&t)
    }

    pub fn op_output(op: &Op) -> TensorId {
        match op {
            Op::Conv(c) | Op::Heads { conv: c, .. } | Op::ConvUpsampleAdd { conv: c, .. } => c.output,
            Op::MaxPool { output, .. } | Op::ConvMaxPool { output, .. } => *output,
            Op::UpsampleAdd { dst, .. } => *dst,
            Op::ConvPair { a, .. } => a.output,
            Op::DwPw { pw, .. } | Op::InvRes { pw, .. } => pw.output,
        }
    }

    /// Multiply-accumulates of one forward pass at H×W, batch 1.
    pub fn macs(&self, h: usize, w: usize) -> u64 {
        self.ops
            .iter()
            .flat_map(|op| op.convs())
            .map(|c| {
                let t = &self.tensors[c.output];
                (t.height(h) * t.width(w) * c.cout * (c.cin / c.groups) * c.kernel * c.kernel) as u64
            })
            .sum()
    }
}
