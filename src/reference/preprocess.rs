//! The network's input: the reference's `img -= (104, 117, 123)` and HWC→CHW transpose.

/// The BGR means the reference subtracts (B 104, G 117, R 123): `kernels/constants.cuh`'s, via
/// `crate::consts`.
pub const BGR_MEAN: [f32; 3] = crate::consts::BGR_MEAN;

/// u8 HWC BGR pixels of one image to f32 CHW minus the means: `out[c, y, x] = bgr[(y·w + x)·3 + c] −
/// BGR_MEAN[c]`, exact in f32.
pub fn preprocess(bgr: &[u8], h: usize, w: usize, out: &mut [f32]) {
    assert_eq!(bgr.len(), h * w * 3, "preprocess input size");
    assert_eq!(out.len(), 3 * h * w, "preprocess output size");
    for (c, plane) in out.chunks_mut(h * w).enumerate() {
        for (i, v) in plane.iter_mut().enumerate() {
            *v = bgr[i * 3 + c] as f32 - BGR_MEAN[c];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_are_split_and_centred() {
        let bgr = [104, 117, 123, 0, 255, 7];
        let mut out = vec![0.0; 6];
        preprocess(&bgr, 1, 2, &mut out);
        assert_eq!(out, [0.0, -104.0, 0.0, 138.0, 0.0, -116.0]);
    }
}
