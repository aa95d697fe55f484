//! The engine's weights format: safetensors with the network name in the metadata (`network`).

use super::{StateDict, Tensor};
use crate::error::{Error, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub fn parse(bytes: &[u8], path: &Path) -> Result<StateDict> {
    let bad = |msg: String| Error::WeightsFormat { path: path.into(), msg };
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let network = meta.metadata().as_ref().and_then(|m| m.get("network").cloned());
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        let float = matches!(view.dtype(), Dtype::F32 | Dtype::F64 | Dtype::F16 | Dtype::BF16);
        if !float && !super::pth::integer_allowed(&name) {
            return Err(Error::TensorData {
                name,
                msg: format!("dtype {:?} is not supported: weights must be F32, F64, F16 or BF16", view.dtype()),
            });
        }
        let data = to_f32(view.dtype(), view.data()).map_err(|msg| Error::TensorData { name: name.clone(), msg })?;
        tensors.insert(name, Tensor { shape: view.shape().to_vec(), data });
    }
    Ok(StateDict { tensors, network })
}

/// Little-endian element bytes of `dtype` to f32.
pub fn to_f32(dtype: Dtype, b: &[u8]) -> std::result::Result<Vec<f32>, String> {
    fn chunks<const N: usize>(b: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        b.chunks_exact(N).map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            a
        })
    }
    Ok(match dtype {
        Dtype::F32 => chunks::<4>(b).map(f32::from_le_bytes).collect(),
        Dtype::F64 => chunks::<8>(b).map(|a| f64::from_le_bytes(a) as f32).collect(),
        Dtype::F16 => chunks::<2>(b).map(|a| half::f16::from_le_bytes(a).to_f32()).collect(),
        Dtype::BF16 => chunks::<2>(b).map(|a| half::bf16::from_le_bytes(a).to_f32()).collect(),
        Dtype::I64 => chunks::<8>(b).map(|a| i64::from_le_bytes(a) as f32).collect(),
        Dtype::I32 => chunks::<4>(b).map(|a| i32::from_le_bytes(a) as f32).collect(),
        other => return Err(format!("unsupported dtype {other:?}")),
    })
}

/// Writes f32 tensors (and the network name) as safetensors.
pub fn save(tensors: &BTreeMap<String, Tensor>, network: Option<&str>, path: &Path) -> Result<()> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, t)| {
            let bytes: &[u8] = bytemuck::cast_slice(&t.data);
            safetensors::tensor::TensorView::new(Dtype::F32, t.shape.clone(), bytes)
                .map(|v| (k.clone(), v))
                .map_err(|e| Error::TensorData { name: k.clone(), msg: e.to_string() })
        })
        .collect::<Result<_>>()?;
    let meta: Option<HashMap<String, String>> =
        network.map(|n| HashMap::from([("network".to_string(), n.to_string())]));
    let out = safetensors::serialize(views, meta)
        .map_err(|e| Error::WeightsFormat { path: path.into(), msg: e.to_string() })?;
    std::fs::write(path, out).map_err(|e| Error::io(path, e))
}
