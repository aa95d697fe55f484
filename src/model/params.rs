//! Where the graph builder gets its parameters: a loaded state dict, the synthetic recipe, or a
//! recorder that lists what a network needs.

use crate::error::Result;

/// What a state-dict tensor is, so the synthetic recipe can give it its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    ConvWeight,
    ConvBias,
    /// BatchNorm gamma; `residual_last` marks the last BN of a ResNet residual branch.
    BnWeight {
        residual_last: bool,
    },
    BnBias,
    BnMean,
    BnVar,
}

pub trait ParamSource {
    /// The f32 values of `key`, which must have exactly `shape`.
    fn take(&mut self, key: &str, shape: &[usize], kind: ParamKind) -> Result<Vec<f32>>;
    /// A key the state dict may hold that the function does not use (`num_batches_tracked`).
    fn optional(&mut self, _key: &str) {}
}

/// Records every key and shape a network asks for; returns zeros.
#[derive(Default)]
pub struct KeyRecorder {
    pub keys: Vec<(String, Vec<usize>, Option<ParamKind>)>,
}

impl ParamSource for KeyRecorder {
    fn take(&mut self, key: &str, shape: &[usize], kind: ParamKind) -> Result<Vec<f32>> {
        self.keys.push((key.to_string(), shape.to_vec(), Some(kind)));
        Ok(vec![0.0; shape.iter().product()])
    }
    fn optional(&mut self, key: &str) {
        self.keys.push((key.to_string(), Vec::new(), None));
    }
}
