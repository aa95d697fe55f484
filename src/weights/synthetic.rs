//! The synthetic-weights recipe (`docs/synthetic-weights.md`): reproducible weights for any network,
//! bit for bit those that produced the reference goldens.

use crate::error::Result;
use crate::model::params::{ParamKind, ParamSource};

const GOLDEN: u64 = 0x9E3779B97F4A7C15;

pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xCBF29CE484222325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001B3);
    }
    h
}

/// The uniform stream of one tensor: `n` values in [0, 1), each a 24-bit integer over 2^24.
pub fn uniform_stream(key: &str, seed: u64, n: usize) -> Vec<f32> {
    let mut state = fnv1a64(key.as_bytes()) ^ seed.wrapping_mul(GOLDEN);
    (0..n)
        .map(|_| {
            state = state.wrapping_add(GOLDEN);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
            z ^= z >> 31;
            (z >> 40) as f32 / 16777216.0
        })
        .collect()
}

/// The value of one tensor of the recipe.
pub fn synthetic_tensor(key: &str, shape: &[usize], kind: ParamKind, seed: u64) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let u = uniform_stream(key, seed, n);
    let f = |g: &dyn Fn(f64) -> f64| u.iter().map(|&u| g(u as f64) as f32).collect::<Vec<f32>>();
    match kind {
        ParamKind::BnWeight { residual_last: true } => f(&|u| 0.1 + 0.2 * u),
        ParamKind::BnWeight { residual_last: false } => f(&|u| 0.8 + 0.4 * u),
        ParamKind::BnBias | ParamKind::BnMean | ParamKind::ConvBias => f(&|u| 0.2 * u - 0.1),
        ParamKind::BnVar => f(&|u| 0.5 + u),
        ParamKind::ConvWeight => {
            let fan_in: usize = shape[1..].iter().product();
            let mut scale = (3.0 / fan_in as f64).sqrt();
            if shape.get(1) == Some(&3) {
                scale /= 64.0;
            }
            f(&|u| (2.0 * u - 1.0) * scale)
        }
    }
}

pub struct SyntheticSource {
    pub seed: u64,
}

impl ParamSource for SyntheticSource {
    fn take(&mut self, key: &str, shape: &[usize], kind: ParamKind) -> Result<Vec<f32>> {
        Ok(synthetic_tensor(key, shape, kind, self.seed))
    }
}

/// The whole synthetic state dict of a network (every key the network reads, in the reference layout).
pub fn state_dict(network: crate::network::Network, seed: u64) -> super::StateDict {
    let tensors = crate::model::required_keys(network)
        .into_iter()
        .filter_map(|(key, shape, kind)| {
            let kind = kind?;
            let data = synthetic_tensor(&key, &shape, kind, seed);
            Some((key, super::Tensor { shape, data }))
        })
        .collect();
    super::StateDict { tensors, network: Some(network.name().to_string()) }
}
