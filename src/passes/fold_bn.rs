//! BatchNorm folding, the first graph pass. The IR has no BatchNorm op: the builder applies this to
//! each conv's weights as it reads them (src/model/mod.rs, `conv_bn`), so no graph ever holds an
//! unfolded BN.
//!
//! BatchNorm folding: `bn(conv(x, w))` becomes `conv(x, w·s) + (β − μ·s)` with `s = γ / sqrt(σ² + ε)`.

pub const BN_EPS: f64 = 1e-5;

/// Folds BN statistics into conv weights `[cout, ...]` in place and returns the bias. Computed in f64
/// and rounded once, so the folded layer is as close to the reference's two f32 steps as one f32 can be.
pub fn fold_batchnorm(weight: &mut [f32], gamma: &[f32], beta: &[f32], mean: &[f32], var: &[f32]) -> Vec<f32> {
    let cout = gamma.len();
    let per_out = weight.len() / cout;
    let mut bias = Vec::with_capacity(cout);
    for o in 0..cout {
        let s = gamma[o] as f64 / (var[o] as f64 + BN_EPS).sqrt();
        for w in &mut weight[o * per_out..(o + 1) * per_out] {
            *w = (*w as f64 * s) as f32;
        }
        bias.push((beta[o] as f64 - mean[o] as f64 * s) as f32);
    }
    bias
}
