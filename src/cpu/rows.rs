//! Row helpers shared by the convolution paths and the max-pool: which output columns a tap reaches
//! inside the image, and the even/odd split that makes stride-2 taps contiguous.

/// The output columns `lo..hi` whose input column `ox·s + kx − p` lies inside `[0, w)`.
#[inline(always)]
pub(super) fn valid_columns(kx: usize, s: usize, p: usize, w: usize, ow: usize) -> (usize, usize) {
    let lo = p.saturating_sub(kx).div_ceil(s).min(ow);
    let hi = if w + p > kx { ((w + p - kx - 1) / s + 1).min(ow) } else { 0 }.max(lo);
    (lo, hi)
}

/// Splits a row into its even columns (first `ceil(w/2)` slots of `split`) and odd columns (after
/// them), so a stride-2 tap reads one contiguous run.
#[inline(always)]
pub(super) fn split_even_odd(src: &[f32], split: &mut [f32]) {
    let w = src.len();
    let half = w.div_ceil(2);
    let (even, odd) = split.split_at_mut(half);
    for ((e, o), pair) in even.iter_mut().zip(odd.iter_mut()).zip(src.chunks_exact(2)) {
        *e = pair[0];
        *o = pair[1];
    }
    if w % 2 == 1 {
        even[half - 1] = src[w - 1];
    }
}
