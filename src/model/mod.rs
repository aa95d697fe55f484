//! Graph builder: each network's backbone, FPN + SSH and heads, from a parameter source, with every
//! BatchNorm folded into its conv.

pub mod backbone;
pub mod head;
pub mod neck;
pub mod params;

use crate::error::Result;
/// The IR lives in `crate::graph`; `model::graph` stays the builders' name for it.
pub use crate::graph::ir as graph;
use crate::network::Network;
pub use graph::{Act, Conv, Graph, Op, Stage, Taps, TensorId, TensorInfo};
use params::{ParamKind, ParamSource};

pub struct Builder<'a> {
    src: &'a mut dyn ParamSource,
    pub network: Network,
    tensors: Vec<TensorInfo>,
    ops: Vec<Op>,
    op_stages: Vec<Stage>,
    stage: Stage,
}

/// Where a conv writes: a new tensor, or a channel range of an existing one.
#[derive(Clone, Copy)]
pub enum Dest {
    New,
    Into(TensorId, usize),
}

/// One conv + BN layer of the state dict.
pub struct ConvBn<'k> {
    pub conv_key: &'k str,
    pub bn_prefix: &'k str,
    pub cin: usize,
    pub cout: usize,
    pub kernel: usize,
    pub stride: usize,
    pub groups: usize,
    pub act: Act,
    pub residual: Option<TensorId>,
    /// Last BN of a ResNet residual branch (matters only to the synthetic recipe).
    pub residual_last: bool,
}

impl<'k> ConvBn<'k> {
    pub fn new(
        conv_key: &'k str,
        bn_prefix: &'k str,
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        act: Act,
    ) -> Self {
        ConvBn { conv_key, bn_prefix, cin, cout, kernel, stride, groups: 1, act, residual: None, residual_last: false }
    }
    pub fn depthwise(mut self) -> Self {
        self.groups = self.cin;
        self
    }
    pub fn residual(mut self, r: Option<TensorId>) -> Self {
        self.residual = r;
        self
    }
    pub fn residual_last(mut self) -> Self {
        self.residual_last = true;
        self
    }
}

impl<'a> Builder<'a> {
    pub fn tensor(&mut self, name: impl Into<String>, channels: usize, stride: usize) -> TensorId {
        self.tensors.push(TensorInfo { name: name.into(), channels, stride });
        self.tensors.len() - 1
    }

    pub fn info(&self, t: TensorId) -> &TensorInfo {
        &self.tensors[t]
    }

    fn push(&mut self, op: Op) {
        self.ops.push(op);
        self.op_stages.push(self.stage);
    }

    pub fn max_pool(&mut self, input: TensorId) -> TensorId {
        let (c, s) = (self.tensors[input].channels, self.tensors[input].stride);
        let output = self.tensor("maxpool", c, s * 2);
        self.push(Op::MaxPool { input, output });
        output
    }

    pub fn upsample_add(&mut self, src: TensorId, dst: TensorId) {
        self.push(Op::UpsampleAdd { src, dst });
    }

    /// Conv (no bias) + BatchNorm (+ residual) + activation, BN folded.
    pub fn conv_bn(&mut self, input: TensorId, l: ConvBn<'_>, dest: Dest) -> Result<TensorId> {
        let k = l.kernel;
        let mut weight = self.src.take(l.conv_key, &[l.cout, l.cin / l.groups, k, k], ParamKind::ConvWeight)?;
        let p = l.bn_prefix;
        let c = [l.cout];
        let gamma =
            self.src.take(&format!("{p}.weight"), &c, ParamKind::BnWeight { residual_last: l.residual_last })?;
        let beta = self.src.take(&format!("{p}.bias"), &c, ParamKind::BnBias)?;
        let mean = self.src.take(&format!("{p}.running_mean"), &c, ParamKind::BnMean)?;
        let var = self.src.take(&format!("{p}.running_var"), &c, ParamKind::BnVar)?;
        self.src.optional(&format!("{p}.num_batches_tracked"));
        let bias = crate::passes::fold_bn::fold_batchnorm(&mut weight, &gamma, &beta, &mean, &var);
        let name = l.conv_key.trim_end_matches(".weight").trim_end_matches(".0").to_string();
        Ok(self.conv(input, name, l.cin, l.cout, k, l.stride, l.groups, weight, bias, l.residual, l.act, dest))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn conv(
        &mut self,
        input: TensorId,
        name: String,
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        groups: usize,
        weight: Vec<f32>,
        bias: Vec<f32>,
        residual: Option<TensorId>,
        act: Act,
        dest: Dest,
    ) -> TensorId {
        let in_stride = self.tensors[input].stride;
        let (output, out_channel_offset) = match dest {
            Dest::New => (self.tensor(name.clone(), cout, in_stride * stride), 0),
            Dest::Into(t, off) => (t, off),
        };
        self.push(Op::Conv(Conv {
            name,
            input,
            output,
            out_channel_offset,
            cin,
            cout,
            kernel,
            stride,
            pad: (kernel - 1) / 2,
            groups,
            weight,
            bias,
            residual,
            act,
            packed: Default::default(),
        }));
        output
    }
}

/// Builds the whole network from `src`.
pub fn build(network: Network, src: &mut dyn ParamSource) -> Result<Graph> {
    let mut b =
        Builder { src, network, tensors: Vec::new(), ops: Vec::new(), op_stages: Vec::new(), stage: Stage::Backbone };
    let input = b.tensor("input", 3, 1);
    let backbone = backbone::build(&mut b, input)?;
    b.stage = Stage::Neck;
    let fpn = neck::fpn(&mut b, backbone)?;
    let ssh = neck::ssh(&mut b, fpn)?;
    b.stage = Stage::Heads;
    let head = head::build(&mut b, ssh)?;
    Ok(Graph {
        network,
        tensors: b.tensors,
        ops: b.ops,
        op_stages: b.op_stages,
        input,
        taps: Taps { backbone, fpn, ssh, head },
    })
}

/// Every state-dict key (with shape) the network reads, and the optional ones (empty shape, no kind).
pub fn required_keys(network: Network) -> Vec<(String, Vec<usize>, Option<ParamKind>)> {
    let mut rec = params::KeyRecorder::default();
    // The recorder never fails: it hands out zeros of the asked shape.
    match build(network, &mut rec) {
        Ok(_) => rec.keys,
        Err(_) => Vec::new(),
    }
}
