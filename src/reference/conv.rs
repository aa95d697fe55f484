//! Convolution, everything `Conv` describes: groups, stride, zero padding, bias, residual, activation and
//! an output channel offset.

use super::out_size;
use crate::graph::Conv;

/// `out[b, off + co, oy, ox] = act(Σ_{ci, ky, kx} weight[co, ci, ky, kx] · x[b, g·cin_g + ci, oy·s + ky − p,
/// ox·s + kx − p] + bias[co] + residual[b, co, oy, ox])`: PyTorch's `Conv2d` (cross-correlation, zero
/// padding, no dilation) followed by the folded BatchNorm's bias, the shortcut and the activation
/// (`Act::apply`: LeakyReLU with its slope, ReLU as slope 0, or ReLU6).
///
/// - `x` is [n, cin, h, w]; `out` is [n, out_channels, oh, ow] with `off + cout ≤ out_channels`, where
///   `off = conv.out_channel_offset`, `oh = out_size(h, k, s, p)` and likewise `ow`. Only channels
///   `off..off + cout` of `out` are written.
/// - Output channel `co` belongs to group `g = co / (cout / groups)` and reads input channels
///   `g·cin_g..(g + 1)·cin_g`, `cin_g = cin / groups`; `weight` is [cout, cin_g, k, k].
/// - Inputs outside the image are zero; `residual`, if any, is [n, cout, oh, ow].
///
/// The products are summed in f64 and rounded to f32 once, before the bias: the exact sum to within one
/// rounding, so how far an f32 path lies from it is that path's own rounding.
#[allow(clippy::too_many_arguments)] // the definition's operands and sizes, as every conv path takes them
pub fn conv2d(
    conv: &Conv,
    x: &[f32],
    n: usize,
    h: usize,
    w: usize,
    out: &mut [f32],
    out_channels: usize,
    residual: Option<&[f32]>,
) {
    let (k, s, p, groups) = (conv.kernel, conv.stride, conv.pad, conv.groups);
    let (oh, ow) = (out_size(h, k, s, p), out_size(w, k, s, p));
    let name = &conv.name;
    assert!(
        groups > 0 && conv.cin.is_multiple_of(groups) && conv.cout.is_multiple_of(groups),
        "conv {name}: {groups} groups"
    );
    let (cin_g, cout_g) = (conv.cin / groups, conv.cout / groups);
    assert_eq!(x.len(), n * conv.cin * h * w, "conv {name} input size");
    assert_eq!(out.len(), n * out_channels * oh * ow, "conv {name} output size");
    assert!(conv.out_channel_offset + conv.cout <= out_channels, "conv {name} output channels");
    assert_eq!(conv.weight.len(), conv.cout * cin_g * k * k, "conv {name} weight size");
    assert_eq!(conv.bias.len(), conv.cout, "conv {name} bias size");
    if let Some(r) = residual {
        assert_eq!(r.len(), n * conv.cout * oh * ow, "conv {name} residual size");
    }
    // Where input row or column `o·s + t − p` lies, if inside the image.
    let source = |o: usize, t: usize, size: usize| (o * s + t).checked_sub(p).filter(|&i| i < size);
    let mut acc = vec![0.0f64; oh * ow];
    for b in 0..n {
        for co in 0..conv.cout {
            let g = co / cout_g;
            acc.fill(0.0);
            for ci in 0..cin_g {
                let plane = &x[(b * conv.cin + g * cin_g + ci) * h * w..][..h * w];
                for ky in 0..k {
                    for kx in 0..k {
                        let wv = conv.weight[((co * cin_g + ci) * k + ky) * k + kx] as f64;
                        for oy in 0..oh {
                            let Some(iy) = source(oy, ky, h) else { continue };
                            for ox in 0..ow {
                                if let Some(ix) = source(ox, kx, w) {
                                    acc[oy * ow + ox] += wv * plane[iy * w + ix] as f64;
                                }
                            }
                        }
                    }
                }
            }
            let dst = &mut out[(b * out_channels + conv.out_channel_offset + co) * oh * ow..][..oh * ow];
            for (i, (o, &a)) in dst.iter_mut().zip(&acc).enumerate() {
                let shortcut = residual.map_or(0.0, |r| r[(b * conv.cout + co) * oh * ow + i]);
                *o = conv.act.apply(a as f32 + conv.bias[co] + shortcut);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Act;

    fn conv(cin: usize, cout: usize, k: usize, stride: usize, groups: usize, weight: Vec<f32>) -> Conv {
        Conv { weight, ..Conv::with_values("t", [cin, cout, k, stride, groups], Act::None, &mut || 0.0) }
    }

    #[test]
    fn a_box_filter_sums_each_neighbourhood_with_zero_padding() {
        // 3x3 all-ones on a 3x3 image of 1..9: the centre sums everything (45), a corner its 2x2 block.
        let c = conv(1, 1, 3, 1, 1, vec![1.0; 9]);
        let x: Vec<f32> = (1..=9).map(|v| v as f32).collect();
        let mut out = vec![0.0; 9];
        conv2d(&c, &x, 1, 3, 3, &mut out, 1, None);
        assert_eq!(out, [12.0, 21.0, 16.0, 27.0, 45.0, 33.0, 24.0, 39.0, 28.0]);
        // Stride 2 samples the centres 0 and 2 of each axis.
        let mut out = vec![0.0; 4];
        conv2d(&conv(1, 1, 3, 2, 1, vec![1.0; 9]), &x, 1, 3, 3, &mut out, 1, None);
        assert_eq!(out, [12.0, 16.0, 24.0, 28.0]);
    }

    #[test]
    fn groups_offset_bias_residual_and_activation_apply_in_order() {
        // Two groups of one channel, 1x1: channel co scales input channel co by weight[co].
        let mut c = conv(2, 2, 1, 1, 2, vec![2.0, -3.0]);
        c.bias = vec![0.5, 0.25];
        c.act = Act::Leaky(0.1);
        c.out_channel_offset = 1;
        let x = [1.0, 2.0];
        let res = [10.0, 1.0];
        let mut out = vec![f32::NAN; 4];
        conv2d(&c, &x, 1, 1, 1, &mut out, 4, Some(&res));
        // 2·1 + 0.5 + 10 = 12.5; −3·2 + 0.25 + 1 = −4.75 → ×0.1. Channels 0 and 3 are not written.
        assert!(out[0].is_nan() && out[3].is_nan());
        assert_eq!(out[1], 12.5);
        assert!((out[2] + 0.475).abs() < 1e-7, "{}", out[2]);
    }
}
