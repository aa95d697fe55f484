//! Weights: state dicts read from safetensors or PyTorch checkpoints, the two key layouts, the
//! synthetic recipe, and the parameter source that checks every tensor the graph builder takes.

pub mod layout;
pub mod pth;
pub mod safetensors_io;
pub mod synthetic;

use crate::error::{Error, Result};
use crate::model::params::{ParamKind, ParamSource};
use crate::network::Network;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One tensor of a state dict, converted to f32 (integer tensors such as `num_batches_tracked` too).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A state dict in the reference layout, plus the network name if the file recorded one.
#[derive(Clone, Debug, Default)]
pub struct StateDict {
    pub tensors: BTreeMap<String, Tensor>,
    pub network: Option<String>,
}

/// Whether `path` is an ONNX model (a graph, read by `crate::onnx`, not a state dict): its extension, or
/// a ModelProto's first field (ir_version) where a safetensors header length would put `{` at byte 8.
pub fn is_onnx(path: &Path) -> Result<bool> {
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("onnx")) {
        return Ok(true);
    }
    let mut head = Vec::with_capacity(9);
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    std::io::Read::read_to_end(&mut std::io::Read::take(f, 9), &mut head).map_err(|e| Error::io(path, e))?;
    Ok(head.len() == 9 && head[0] == 0x08 && (1..=32).contains(&head[1]) && head[8] != b'{')
}

/// Loads a weights file: safetensors, or a PyTorch zip checkpoint (either layout), told apart by content.
pub fn load(path: &Path) -> Result<StateDict> {
    if is_onnx(path)? {
        return Err(Error::WeightsFormat { path: path.into(), msg: "an ONNX graph, not a state dict".into() });
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let sd = if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(&[0x80, 0x02, 0x8a, 0x0a]) {
        pth::parse_checkpoint(&bytes, path)?
    } else if bytes.len() >= 8 {
        safetensors_io::parse(&bytes, path)?
    } else {
        return Err(Error::WeightsFormat {
            path: path.into(),
            msg: format!("only {} bytes: neither safetensors nor a PyTorch checkpoint", bytes.len()),
        });
    };
    Ok(StateDict { tensors: layout::to_reference_layout(sd.tensors), network: sd.network })
}

/// Tells the network from the keys and shapes of a reference-layout state dict.
pub fn infer_network(sd: &StateDict, path: &Path) -> Result<Network> {
    if let Some(name) = &sd.network {
        return name.parse();
    }
    let has = |k: &str| sd.tensors.contains_key(k);
    let undetermined = |msg: &str| Error::NetworkUndetermined { path: path.into(), msg: msg.to_string() };
    if has("fx.layer1.0.conv3.weight") {
        Ok(Network::ResNet50)
    } else if has("fx.layer3.5.conv1.weight") {
        Ok(Network::ResNet34)
    } else if has("fx.layer1.0.conv1.weight") {
        Ok(Network::ResNet18)
    } else if has("fx.features.0.0.weight") {
        Ok(Network::MobileNetV2)
    } else if let Some(t) = sd.tensors.get("fx.stage1.0.0.weight") {
        match t.shape.first() {
            Some(8) => Ok(Network::MobileNetV1_025),
            Some(16) => Ok(Network::MobileNetV1_050),
            Some(32) => Ok(Network::MobileNetV1),
            other => Err(undetermined(&format!(
                "MobileNetV1 stem `fx.stage1.0.0.weight` has {other:?} output channels, not 8, 16 or 32"
            ))),
        }
    } else {
        Err(undetermined("no backbone tensor of any known network (fx.conv1, fx.features.0, fx.stage1.0) found"))
    }
}

/// Hands out a state dict's tensors to the graph builder, checking each, and then that none is left over.
pub struct StateDictSource<'a> {
    sd: &'a StateDict,
    network: Network,
    used: BTreeSet<String>,
    /// The conv weight and BatchNorm γ, β, μ taken since the last conv, to check the fold once σ² comes.
    pending: Vec<(String, &'a [f32])>,
}

impl<'a> StateDictSource<'a> {
    pub fn new(sd: &'a StateDict, network: Network) -> Self {
        StateDictSource { sd, network, used: BTreeSet::new(), pending: Vec::new() }
    }

    /// Errors on the first tensor the network did not take.
    pub fn check_all_used(&self) -> Result<()> {
        match self.sd.tensors.keys().find(|k| !self.used.contains(*k)) {
            Some(k) => Err(Error::UnexpectedTensor { network: self.network.to_string(), name: k.clone() }),
            None => Ok(()),
        }
    }
}

impl ParamSource for StateDictSource<'_> {
    fn take(&mut self, key: &str, shape: &[usize], kind: ParamKind) -> Result<Vec<f32>> {
        let network = self.network.to_string();
        let t = self
            .sd
            .tensors
            .get(key)
            .ok_or_else(|| Error::MissingTensor { network: network.clone(), name: key.to_string() })?;
        if t.shape != shape {
            return Err(Error::TensorShape {
                network,
                name: key.to_string(),
                expected: shape.to_vec(),
                found: t.shape.clone(),
            });
        }
        if let Some((index, &value)) = t.data.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(Error::NonFiniteWeight { name: key.to_string(), index, value });
        }
        if let Some((index, &value)) = t.data.iter().enumerate().find(|(_, v)| v.abs() > MAX_WEIGHT) {
            return Err(Error::TensorData {
                name: key.to_string(),
                msg: format!(
                    "element {index} is {value:e}, beyond the plausible magnitude {MAX_WEIGHT:e}: \
                     its products would overflow f32 activations into NaN boxes"
                ),
            });
        }
        match kind {
            ParamKind::ConvWeight => self.pending = vec![(key.to_string(), &t.data)],
            ParamKind::BnWeight { .. } | ParamKind::BnBias | ParamKind::BnMean => {
                self.pending.push((key.to_string(), &t.data))
            }
            ParamKind::BnVar => {
                if let [(wk, w), (gk, g), (_, b), (mk, m)] = self.pending.as_slice() {
                    check_fold(wk, w, gk, g, b, mk, m, key, &t.data)?;
                }
                self.pending.clear();
            }
            ParamKind::ConvBias => {}
        }
        self.used.insert(key.to_string());
        Ok(t.data.clone())
    }

    fn optional(&mut self, key: &str) {
        self.used.insert(key.to_string());
    }
}

/// The largest weight magnitude accepted, before and after BatchNorm folding. Trained RetinaFace weights
/// stay below 1e3; weights near f32's range (3e38) are finite, but the first layer's products overflow and
/// the output turns into NaN boxes. Twelve orders of margin either way.
const MAX_WEIGHT: f32 = 1e15;

/// Finite weights can still fold to infinities (a 3e38 conv weight times a γ of 10) or NaN (a negative
/// σ²), which would reach the output as NaN boxes: refused here, naming the tensors, with the fold's
/// arithmetic (`model::fold`: f64, rounded once to f32).
#[allow(clippy::too_many_arguments)]
fn check_fold(
    wk: &str,
    w: &[f32],
    gk: &str,
    gamma: &[f32],
    beta: &[f32],
    mk: &str,
    mean: &[f32],
    vk: &str,
    var: &[f32],
) -> Result<()> {
    let cout = gamma.len();
    if cout == 0 || !w.len().is_multiple_of(cout) || [beta.len(), mean.len(), var.len()].iter().any(|&n| n != cout) {
        return Ok(()); // shapes are checked against the network by `take`
    }
    let per_out = w.len() / cout;
    let bad = |name: &str, msg: String| Err(Error::TensorData { name: name.to_string(), msg });
    for o in 0..cout {
        let v = var[o] as f64 + crate::passes::fold_bn::BN_EPS;
        if v.is_nan() || v <= 0.0 {
            return bad(vk, format!("running variance {} at element {o} makes BatchNorm's σ²+ε negative", var[o]));
        }
        let s = gamma[o] as f64 / v.sqrt();
        let fits = |x: f64| x.is_finite() && x.abs() <= MAX_WEIGHT as f64;
        if let Some(i) = w[o * per_out..(o + 1) * per_out].iter().position(|&x| !fits(x as f64 * s)) {
            let x = w[o * per_out + i];
            return bad(
                wk,
                format!(
                    "element {} ({x:e}) times the BatchNorm scale {s:e} of `{gk}` passes {MAX_WEIGHT:e} when folded",
                    o * per_out + i
                ),
            );
        }
        if !fits(beta[o] as f64 - mean[o] as f64 * s) {
            return bad(
                mk,
                format!(
                    "element {o} ({:e}) times the BatchNorm scale {s:e} passes {MAX_WEIGHT:e} when folded",
                    mean[o]
                ),
            );
        }
    }
    Ok(())
}

/// Where the weights of an engine come from.
#[derive(Clone, Debug)]
pub enum WeightsSpec {
    File(PathBuf),
    Synthetic { seed: u64 },
}
