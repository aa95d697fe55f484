//! The graph as an ONNX model with the reference export's interface (`scripts/onnx_export.py`): input
//! `input` f32 [N, 3, H, W] (BGR minus 104, 117, 123), outputs `loc` [N, A, 4], `conf` [N, A, 2]
//! (softmaxed) and `landmarks` [N, A, 10], anchors in the reference's order. BatchNorm is already folded
//! into the graph's convs; N, H and W are dynamic unless fixed.

use super::proto::{
    AttributeProto, DimValue, Dimension, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TensorTypeProto, TypeProto, ValueInfoProto, attribute_type, data_type,
};
use crate::error::{Error, Result};
use crate::model::graph::{HEAD_BOX_OFFSET, HEAD_CHANNELS, HEAD_CLASS_OFFSET, HEAD_LANDMARK_OFFSET};
use crate::model::{Act, Conv, Graph, Op, TensorId};
use crate::post::anchors;
use prost::Message;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

/// The opsets the export writes: 13 is the first with optional Resize inputs and per-axis Softmax.
pub const OPSETS: std::ops::RangeInclusive<i64> = 13..=21;
/// The reference export's opset.
pub const DEFAULT_OPSET: i64 = 16;

#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub opset: i64,
    /// Fixed (height, width) instead of dynamic ones.
    pub static_hw: Option<(usize, usize)>,
    /// Fixed batch size instead of a dynamic one.
    pub batch: Option<usize>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions { opset: DEFAULT_OPSET, static_hw: None, batch: None }
    }
}

/// The output of each head: the ONNX output name, the head's offset in the fused 32-channel conv, its
/// channels per level (two anchors), the reference's module name.
pub(crate) const HEADS: [(&str, usize, usize, &str); 3] = [
    ("conf", HEAD_CLASS_OFFSET, 4, "class_head.class_head"),
    ("loc", HEAD_BOX_OFFSET, 8, "bbox_head.bbox_head"),
    ("landmarks", HEAD_LANDMARK_OFFSET, 20, "landmark_head.landmark_head"),
];

/// The IR version of the onnx release that introduced `opset` (onnx's VERSION_TABLE).
fn ir_version(opset: i64) -> i64 {
    match opset {
        ..=14 => 7,
        15..=18 => 8,
        19..=20 => 9,
        _ => 10,
    }
}

fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(attribute_type::INTS),
        ints: v.to_vec(),
        ..Default::default()
    }
}
fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto { name: Some(name.into()), r#type: Some(attribute_type::INT), i: Some(v), ..Default::default() }
}
fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto { name: Some(name.into()), r#type: Some(attribute_type::FLOAT), f: Some(v), ..Default::default() }
}
fn attr_string(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(attribute_type::STRING),
        s: Some(v.as_bytes().to_vec()),
        ..Default::default()
    }
}

pub fn tensor_f32(name: &str, dims: &[usize], data: &[f32]) -> TensorProto {
    TensorProto {
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(data_type::FLOAT),
        name: Some(name.into()),
        raw_data: Some(data.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}
fn tensor_i64(name: &str, dims: &[usize], data: &[i64]) -> TensorProto {
    TensorProto {
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(data_type::INT64),
        name: Some(name.into()),
        raw_data: Some(data.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

fn value_info(name: &str, dims: &[Result<usize, &str>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Ok(v) => DimValue::DimValue(*v as i64),
                Err(p) => DimValue::DimParam(p.to_string()),
            }),
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type: Some(data_type::FLOAT),
                shape: Some(TensorShapeProto { dim }),
            }),
        }),
        doc_string: None,
    }
}

struct Writer<'g> {
    graph: &'g Graph,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    names: HashSet<String>,
    /// The ONNX value holding each tensor now.
    current: Vec<Option<String>>,
    /// Channel ranges written into a tensor by convs with an offset (the SSH concat): (offset, value).
    parts: BTreeMap<TensorId, Vec<(usize, usize, String)>>,
    /// Per head output, the per-level reshaped values.
    heads: [Vec<(usize, String)>; 3],
}

impl<'g> Writer<'g> {
    fn unique(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut i = 1;
        while !self.names.insert(name.clone()) {
            name = format!("{base}_{i}");
            i += 1;
        }
        name
    }

    /// Adds a node; returns its (single) output value.
    fn node(&mut self, op: &str, name: &str, inputs: Vec<String>, attrs: Vec<AttributeProto>) -> String {
        let name = self.unique(&format!("{name}/{op}"));
        let out = self.unique(&format!("{name}_output"));
        self.nodes.push(NodeProto {
            input: inputs,
            output: vec![out.clone()],
            name: Some(name),
            op_type: Some(op.into()),
            attribute: attrs,
            ..Default::default()
        });
        out
    }

    fn init(&mut self, t: TensorProto) -> String {
        let base = t.name.clone().unwrap_or_default();
        let name = self.unique(&base);
        self.inits.push(TensorProto { name: Some(name.clone()), ..t });
        name
    }

    /// The value of tensor `t`, concatenating the channel ranges written into it first.
    fn value(&mut self, t: TensorId) -> Result<String> {
        if let Some(parts) = self.parts.remove(&t) {
            let info = &self.graph.tensors[t];
            let mut parts = parts;
            parts.sort_by_key(|p| p.0);
            let mut next = 0;
            for (off, c, _) in &parts {
                if *off != next {
                    return Err(Error::InvalidArgument(format!(
                        "ONNX export: tensor `{}` has no writer for channels {next}..{off}",
                        info.name
                    )));
                }
                next = off + c;
            }
            if next != info.channels {
                return Err(Error::InvalidArgument(format!(
                    "ONNX export: tensor `{}` has writers for {next} of its {} channels",
                    info.name, info.channels
                )));
            }
            let name = info.name.clone();
            let v = self.node("Concat", &name, parts.into_iter().map(|p| p.2).collect(), vec![attr_int("axis", 1)]);
            self.current[t] = Some(v);
        }
        self.current[t].clone().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "ONNX export: tensor `{}` is read before it is written",
                self.graph.tensors[t].name
            ))
        })
    }

    fn act(&mut self, name: &str, x: String, act: Act) -> String {
        match act {
            Act::None => x,
            Act::Leaky(0.0) => self.node("Relu", name, vec![x], vec![]),
            Act::Leaky(a) => self.node("LeakyRelu", name, vec![x], vec![attr_float("alpha", a)]),
            Act::Relu6 => {
                let lo = if self.names.contains("clip_min") {
                    "clip_min".to_string()
                } else {
                    self.init(tensor_f32("clip_min", &[], &[0.0]))
                };
                let hi = if self.names.contains("clip_max") {
                    "clip_max".to_string()
                } else {
                    self.init(tensor_f32("clip_max", &[], &[6.0]))
                };
                self.node("Clip", name, vec![x, lo, hi], vec![])
            }
        }
    }

    fn conv_node(&mut self, name: &str, x: String, c: &Conv, rows: std::ops::Range<usize>) -> String {
        let per_out = c.cin / c.groups * c.kernel * c.kernel;
        let cout = rows.len();
        let w = self.init(tensor_f32(
            &format!("{name}.weight"),
            &[cout, c.cin / c.groups, c.kernel, c.kernel],
            &c.weight[rows.start * per_out..rows.end * per_out],
        ));
        let b = self.init(tensor_f32(&format!("{name}.bias"), &[cout], &c.bias[rows]));
        let (k, s, p) = (c.kernel as i64, c.stride as i64, c.pad as i64);
        self.node(
            "Conv",
            name,
            vec![x, w, b],
            vec![
                attr_ints("dilations", &[1, 1]),
                attr_int("group", c.groups as i64),
                attr_ints("kernel_shape", &[k, k]),
                attr_ints("pads", &[p, p, p, p]),
                attr_ints("strides", &[s, s]),
            ],
        )
    }

    fn conv(&mut self, c: &Conv) -> Result<()> {
        if let Some(level) = self.graph.taps.head.iter().position(|&t| t == c.output) {
            return self.head(c, level);
        }
        let x = self.value(c.input)?;
        let mut y = self.conv_node(&c.name, x, c, 0..c.cout);
        if let Some(r) = c.residual {
            let rv = self.value(r)?;
            y = self.node("Add", &c.name, vec![y, rv], vec![]);
        }
        y = self.act(&c.name, y, c.act);
        let out = &self.graph.tensors[c.output];
        if c.out_channel_offset == 0 && c.cout == out.channels {
            self.current[c.output] = Some(y);
        } else {
            self.parts.entry(c.output).or_default().push((c.out_channel_offset, c.cout, y));
        }
        Ok(())
    }

    /// The fused head conv of one level as the reference's three convs, each permuted to NHWC and
    /// reshaped to [N, H·W·2, d/2].
    fn head(&mut self, c: &Conv, level: usize) -> Result<()> {
        if c.cout != HEAD_CHANNELS || c.kernel != 1 || c.groups != 1 || c.residual.is_some() || c.act != Act::None {
            return Err(Error::InvalidArgument(format!(
                "ONNX export: head conv `{}` is not a plain 1x1 conv with {HEAD_CHANNELS} outputs",
                c.name
            )));
        }
        let x = self.value(c.input)?;
        for (i, (role, offset, d, module)) in HEADS.iter().enumerate() {
            let name = format!("{module}.{level}");
            let y = self.conv_node(&name, x.clone(), c, *offset..offset + d);
            let t = self.node("Transpose", &name, vec![y], vec![attr_ints("perm", &[0, 2, 3, 1])]);
            let shape = self.init(tensor_i64(&format!("{role}_shape"), &[3], &[0, -1, (*d / 2) as i64]));
            let r = self.node("Reshape", &name, vec![t, shape], vec![]);
            self.heads[i].push((level, r));
        }
        Ok(())
    }

    /// The 3×3 stride-2 max-pool of `input` (padding 1: ONNX pads MaxPool with −∞, as PyTorch does).
    fn max_pool(&mut self, input: TensorId, output: TensorId) -> Result<()> {
        let x = self.value(input)?;
        let name = self.graph.tensors[output].name.clone();
        let y = self.node(
            "MaxPool",
            &name,
            vec![x],
            vec![
                attr_int("ceil_mode", 0),
                attr_ints("kernel_shape", &[3, 3]),
                attr_ints("pads", &[1, 1, 1, 1]),
                attr_ints("strides", &[2, 2]),
            ],
        );
        self.current[output] = Some(y);
        Ok(())
    }

    fn upsample_add(&mut self, src: TensorId, dst: TensorId) -> Result<()> {
        let (s, d) = (self.value(src)?, self.value(dst)?);
        let name = format!("{}.upsample", self.graph.tensors[dst].name);
        // Sizes from the lateral's own shape (N and C agree): the nearest rule of PyTorch's
        // `interpolate(size=...)`, odd sizes included.
        let sizes = self.node("Shape", &name, vec![d.clone()], vec![]);
        let up = self.node(
            "Resize",
            &name,
            vec![s, String::new(), String::new(), sizes],
            vec![
                attr_string("coordinate_transformation_mode", "asymmetric"),
                attr_string("mode", "nearest"),
                attr_string("nearest_mode", "floor"),
            ],
        );
        let sum = self.node("Add", &name, vec![d, up], vec![]);
        self.current[dst] = Some(sum);
        Ok(())
    }
}

/// The ONNX model of `graph`.
pub fn export(graph: &Graph, opts: &ExportOptions) -> Result<ModelProto> {
    if !OPSETS.contains(&opts.opset) {
        return Err(Error::InvalidArgument(format!(
            "ONNX opset {}: the export writes opsets {} to {}",
            opts.opset,
            OPSETS.start(),
            OPSETS.end()
        )));
    }
    if opts.batch == Some(0) || opts.static_hw.is_some_and(|(h, w)| h == 0 || w == 0) {
        return Err(Error::InvalidArgument("ONNX export: a fixed batch, height or width must be at least 1".into()));
    }
    let mut w = Writer {
        graph,
        nodes: Vec::new(),
        inits: Vec::new(),
        names: HashSet::new(),
        current: vec![None; graph.tensors.len()],
        parts: BTreeMap::new(),
        heads: Default::default(),
    };
    w.names.insert("input".into());
    w.current[graph.input] = Some("input".into());
    for op in &graph.ops {
        match op {
            Op::Conv(c) => w.conv(c)?,
            Op::MaxPool { input, output } => w.max_pool(*input, *output)?,
            Op::UpsampleAdd { src, dst } => w.upsample_add(*src, *dst)?,
            Op::Heads { level, conv } => w.head(conv, *level)?,
            // A fused op exports as the ops it fuses: ONNX runtimes fuse for themselves.
            Op::ConvUpsampleAdd { conv, src } => {
                w.conv(conv)?;
                w.upsample_add(*src, conv.output)?;
            }
            Op::ConvMaxPool { conv, output } => {
                w.conv(conv)?;
                w.max_pool(conv.output, *output)?;
            }
            Op::ConvPair { a: first, b: second } | Op::DwPw { dw: first, pw: second } => {
                w.conv(first)?;
                w.conv(second)?;
            }
            Op::InvRes { ex, dw, pw } => {
                w.conv(ex)?;
                w.conv(dw)?;
                w.conv(pw)?;
            }
        }
    }
    for (i, (role, ..)) in HEADS.iter().enumerate() {
        let mut levels = std::mem::take(&mut w.heads[i]);
        levels.sort_by_key(|l| l.0);
        if levels.iter().map(|l| l.0).ne(0..3) {
            return Err(Error::InvalidArgument(format!(
                "ONNX export: the graph has no head conv for each level of `{role}`"
            )));
        }
        let inputs: Vec<String> = levels.into_iter().map(|l| l.1).collect();
        let concat = NodeProto {
            input: inputs,
            output: vec![if *role == "conf" { "conf_logits".into() } else { role.to_string() }],
            name: Some(format!("{role}/Concat")),
            op_type: Some("Concat".into()),
            attribute: vec![attr_int("axis", 1)],
            ..Default::default()
        };
        w.nodes.push(concat);
        if *role == "conf" {
            w.nodes.push(NodeProto {
                input: vec!["conf_logits".into()],
                output: vec!["conf".into()],
                name: Some("conf/Softmax".into()),
                op_type: Some("Softmax".into()),
                attribute: vec![attr_int("axis", 2)],
                ..Default::default()
            });
        }
    }

    let batch = opts.batch.ok_or("batch_size");
    let (h, wd) = match opts.static_hw {
        Some((h, wd)) => (Ok(h), Ok(wd)),
        None => (Err("height"), Err("width")),
    };
    let a = match opts.static_hw {
        Some((h, wd)) => Ok(anchors::num_anchors(h, wd)),
        None => Err("anchors"),
    };
    let outputs = HEADS.iter().map(|(role, _, d, _)| value_info(role, &[batch, a, Ok(d / 2)])).collect::<Vec<_>>();
    // The reference's output order.
    let outputs = vec![outputs[1].clone(), outputs[0].clone(), outputs[2].clone()];
    let meta = |k: &str, v: &str| StringStringEntryProto { key: Some(k.into()), value: Some(v.into()) };
    Ok(ModelProto {
        ir_version: Some(ir_version(opts.opset)),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(opts.opset) }],
        producer_name: Some("retinaface".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        doc_string: Some(format!(
            "RetinaFace {}: input `input` float32 [N, 3, H, W], BGR minus (104, 117, 123); outputs `loc` [N, A, 4], \
             `conf` [N, A, 2] (softmaxed), `landmarks` [N, A, 10]",
            graph.network
        )),
        graph: Some(GraphProto {
            node: w.nodes,
            name: Some(format!("retinaface_{}", graph.network)),
            initializer: w.inits,
            input: vec![value_info("input", &[batch, Ok(3), h, wd])],
            output: outputs,
            ..Default::default()
        }),
        metadata_props: vec![meta("network", graph.network.name()), meta("mean_bgr", "104,117,123")],
        ..Default::default()
    })
}

/// Writes the ONNX model of `graph` to `path`; returns its size in bytes.
pub fn write(graph: &Graph, opts: &ExportOptions, path: &Path) -> Result<usize> {
    let bytes = export(graph, opts)?.encode_to_vec();
    std::fs::write(path, &bytes).map_err(|e| Error::io(path, e))?;
    Ok(bytes.len())
}
