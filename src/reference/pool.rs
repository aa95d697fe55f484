//! Max-pooling and the nearest-neighbour upsample-add of the FPN.

use super::out_size;

/// PyTorch's `MaxPool2d(kernel_size=3, stride=2, padding=1)` (ResNet's stem): `out[i, oy, ox]` is the
/// largest `x[i, 2·oy + ky − 1, 2·ox + kx − 1]` over ky, kx < 3 that lies inside the image (padding
/// never wins). `x` is [nc, h, w] (batch and channels flattened); `out` is [nc, oh, ow] with
/// `oh = out_size(h, 3, 2, 1)` and likewise `ow`.
pub fn max_pool_3x3s2(x: &[f32], nc: usize, h: usize, w: usize, out: &mut [f32]) {
    let (oh, ow) = (out_size(h, 3, 2, 1), out_size(w, 3, 2, 1));
    assert_eq!(x.len(), nc * h * w, "max-pool input size");
    assert_eq!(out.len(), nc * oh * ow, "max-pool output size");
    for i in 0..nc {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut m = f32::NEG_INFINITY;
                for iy in (2 * oy).saturating_sub(1)..(2 * oy + 2).min(h) {
                    for ix in (2 * ox).saturating_sub(1)..(2 * ox + 2).min(w) {
                        m = m.max(x[(i * h + iy) * w + ix]);
                    }
                }
                out[(i * oh + oy) * ow + ox] = m;
            }
        }
    }
}

/// PyTorch's `nearest` source index for an explicit output size (`F.interpolate(size=..)`, as the FPN
/// calls it): `min(⌊dst · (input / output)⌋, input − 1)`, the scale computed in f32 as PyTorch does.
pub fn nearest_index(dst: usize, input: usize, output: usize) -> usize {
    let scale = input as f32 / output as f32;
    ((dst as f32 * scale).floor() as usize).min(input - 1)
}

/// The FPN's `dst = dst + F.interpolate(src, size=dst's size, mode="nearest")`:
/// `dst[i, y, x] += src[i, nearest_index(y, sh, dh), nearest_index(x, sw, dw)]`. `src` is [nc, sh, sw],
/// `dst` [nc, dh, dw] (batch and channels flattened).
pub fn upsample_nearest_add(src: &[f32], sh: usize, sw: usize, dst: &mut [f32], dh: usize, dw: usize) {
    assert!(dh * dw > 0 && dst.len().is_multiple_of(dh * dw), "upsample-add destination size");
    let nc = dst.len() / (dh * dw);
    assert_eq!(src.len(), nc * sh * sw, "upsample-add source size");
    for i in 0..nc {
        for y in 0..dh {
            for x in 0..dw {
                dst[(i * dh + y) * dw + x] += src[(i * sh + nearest_index(y, sh, dh)) * sw + nearest_index(x, sw, dw)];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_pool_takes_the_largest_inside_the_image() {
        // 3x4 image; output 2x2. Window of (0, 0) covers rows 0..2, columns 0..2 (padding never wins,
        // even over negative values).
        let x = [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0, -9.0, -10.0, -11.0, 12.0];
        let mut out = vec![0.0; 4];
        max_pool_3x3s2(&x, 1, 3, 4, &mut out);
        assert_eq!(out, [-1.0, -2.0, -5.0, 12.0]);
    }

    #[test]
    fn nearest_follows_pytorch_for_upsampling_by_about_two() {
        // F.interpolate(size=5) from 3: scale 0.6 → indices floor(0, 0.6, 1.2, 1.8, 2.4) = 0 0 1 1 2.
        let idx: Vec<usize> = (0..5).map(|d| nearest_index(d, 3, 5)).collect();
        assert_eq!(idx, [0, 0, 1, 1, 2]);
        let mut dst = vec![1.0; 5];
        upsample_nearest_add(&[10.0, 20.0, 30.0], 1, 3, &mut dst, 1, 5);
        assert_eq!(dst, [11.0, 11.0, 21.0, 21.0, 31.0]);
    }
}
