//! The CPU reference of every operation: plain NCHW f32 functions, the oracle the CUDA kernels are
//! checked against. Threaded with rayon over independent output regions; every output element is
//! computed by one task in a fixed order, so results do not depend on the thread count.

use crate::model::graph::{Act, Conv, HEAD_BOX_OFFSET, HEAD_CLASS_OFFSET, HEAD_LANDMARK_OFFSET};
use rayon::prelude::*;
use std::cell::RefCell;

/// Output spatial size of a k×k convolution or pool with `stride` and `pad`.
pub fn out_size(size: usize, kernel: usize, stride: usize, pad: usize) -> usize {
    (size + 2 * pad - kernel) / stride + 1
}

/// A raw pointer that tasks writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    // A method, not a field access, so closures capture the Send + Sync wrapper rather than the raw pointer.
    fn get(self) -> *mut f32 {
        self.0
    }
}

thread_local! {
    static COLUMNS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Columns of the im2col matrix budgeted per task: about 1 MiB of f32, so a task's panel stays in L2.
const COLUMN_BUDGET: usize = 1 << 18;
/// Tasks wanted per convolution, so small maps still spread over every core.
const MIN_TASKS: usize = 16;

/// `out[n, off + co, y, x] = act(Σ w[co, ci, ky, kx] · x[n, g·cin_g + ci, y·s + ky − p, x·s + kx − p] + bias[co] + residual[n, co, y, x])`.
///
/// `x` is [n, conv.cin, h, w]; `out` is [n, out_channels, oh, ow] with `out_channels ≥ off + cout`;
/// `residual`, if any, is [n, cout, oh, ow].
pub fn conv2d(conv: &Conv, x: &[f32], n: usize, h: usize, w: usize, out: &mut [f32], out_channels: usize, residual: Option<&[f32]>) {
    let (k, s, p) = (conv.kernel, conv.stride, conv.pad);
    let (oh, ow) = (out_size(h, k, s, p), out_size(w, k, s, p));
    assert_eq!(x.len(), n * conv.cin * h * w, "conv {} input size", conv.name);
    assert_eq!(out.len(), n * out_channels * oh * ow, "conv {} output size", conv.name);
    assert!(conv.out_channel_offset + conv.cout <= out_channels);
    if let Some(r) = residual {
        assert_eq!(r.len(), n * conv.cout * oh * ow, "conv {} residual size", conv.name);
    }
    if conv.groups == 1 {
        conv_gemm(conv, x, n, h, w, oh, ow, SharedMut(out.as_mut_ptr()), out_channels, residual);
    } else {
        assert!(conv.groups == conv.cin && conv.groups == conv.cout, "only depthwise grouped convolutions are used");
        conv_depthwise(conv, x, n, h, w, oh, ow, SharedMut(out.as_mut_ptr()), out_channels, residual);
    }
}

#[allow(clippy::too_many_arguments)]
fn conv_gemm(conv: &Conv, x: &[f32], n: usize, h: usize, w: usize, oh: usize, ow: usize, out: SharedMut, out_channels: usize, residual: Option<&[f32]>) {
    let (k, s, p) = (conv.kernel, conv.stride, conv.pad);
    let depth = conv.cin * k * k;
    let npix = oh * ow;
    let direct = k == 1 && s == 1 && p == 0;
    let pix_chunk = npix.min((COLUMN_BUDGET / depth).max(64));
    let pix_tasks = npix.div_ceil(pix_chunk);
    let co_tasks = (MIN_TASKS.div_ceil(n * pix_tasks)).min(conv.cout.div_ceil(16)).max(1);
    let co_chunk = conv.cout.div_ceil(co_tasks);
    let tasks: Vec<(usize, usize, usize)> = (0..n)
        .flat_map(|b| (0..pix_tasks).flat_map(move |pt| (0..co_tasks).map(move |ct| (b, pt, ct))))
        .collect();
    tasks.into_par_iter().for_each(|(b, pt, ct)| {
        let p0 = pt * pix_chunk;
        let np = pix_chunk.min(npix - p0);
        let co0 = ct * co_chunk;
        let nco = co_chunk.min(conv.cout - co0);
        if nco == 0 {
            return;
        }
        let xb = &x[b * conv.cin * h * w..(b + 1) * conv.cin * h * w];
        let c_ptr = unsafe { out.get().add(((b * out_channels + conv.out_channel_offset + co0) * npix) + p0) };
        let a = &conv.weight[co0 * depth..];
        let gemm = |bmat: *const f32, rsb: isize| unsafe {
            matrixmultiply::sgemm(nco, depth, np, 1.0, a.as_ptr(), depth as isize, 1, bmat, rsb, 1, 0.0, c_ptr, npix as isize, 1);
        };
        if direct {
            gemm(xb[p0..].as_ptr(), (h * w) as isize);
        } else {
            COLUMNS.with(|cols| {
                let mut cols = cols.borrow_mut();
                cols.resize(depth * np, 0.0);
                im2col(xb, conv.cin, h, w, k, s, p, ow, p0, np, &mut cols);
                gemm(cols.as_ptr(), np as isize);
            });
        }
        for co in co0..co0 + nco {
            let row = unsafe { std::slice::from_raw_parts_mut(out.get().add((b * out_channels + conv.out_channel_offset + co) * npix + p0), np) };
            let bias = conv.bias[co];
            match residual {
                Some(r) => {
                    let rr = &r[(b * conv.cout + co) * npix + p0..][..np];
                    for (v, &res) in row.iter_mut().zip(rr) {
                        *v = conv.act.apply(*v + bias + res);
                    }
                }
                None => {
                    for v in row.iter_mut() {
                        *v = conv.act.apply(*v + bias);
                    }
                }
            }
        }
    });
}

/// Rows (ci, ky, kx), columns the output pixels p0..p0+np (flattened y·ow + x); zero padding.
#[allow(clippy::too_many_arguments)]
fn im2col(x: &[f32], cin: usize, h: usize, w: usize, k: usize, s: usize, p: usize, ow: usize, p0: usize, np: usize, cols: &mut [f32]) {
    for ci in 0..cin {
        let plane = &x[ci * h * w..(ci + 1) * h * w];
        for ky in 0..k {
            for kx in 0..k {
                let row = &mut cols[((ci * k + ky) * k + kx) * np..][..np];
                let (mut oy, mut ox) = (p0 / ow, p0 % ow);
                for v in row.iter_mut() {
                    let iy = (oy * s + ky) as isize - p as isize;
                    let ix = (ox * s + kx) as isize - p as isize;
                    *v = if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w { plane[iy as usize * w + ix as usize] } else { 0.0 };
                    ox += 1;
                    if ox == ow {
                        ox = 0;
                        oy += 1;
                    }
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn conv_depthwise(conv: &Conv, x: &[f32], n: usize, h: usize, w: usize, oh: usize, ow: usize, out: SharedMut, out_channels: usize, residual: Option<&[f32]>) {
    let (k, s, p) = (conv.kernel, conv.stride, conv.pad);
    let c = conv.cout;
    (0..n * c).into_par_iter().for_each(|bc| {
        let (b, ch) = (bc / c, bc % c);
        let plane = &x[bc * h * w..(bc + 1) * h * w];
        let wk = &conv.weight[ch * k * k..(ch + 1) * k * k];
        let o = unsafe { std::slice::from_raw_parts_mut(out.get().add((b * out_channels + conv.out_channel_offset + ch) * oh * ow), oh * ow) };
        for oy in 0..oh {
            for ox in 0..ow {
                let mut acc = 0.0f32;
                for ky in 0..k {
                    let iy = (oy * s + ky) as isize - p as isize;
                    if iy < 0 || iy as usize >= h {
                        continue;
                    }
                    let row = &plane[iy as usize * w..];
                    for kx in 0..k {
                        let ix = (ox * s + kx) as isize - p as isize;
                        if ix >= 0 && (ix as usize) < w {
                            acc += wk[ky * k + kx] * row[ix as usize];
                        }
                    }
                }
                let mut v = acc + conv.bias[ch];
                if let Some(r) = residual {
                    v += r[(b * c + ch) * oh * ow + oy * ow + ox];
                }
                o[oy * ow + ox] = conv.act.apply(v);
            }
        }
    });
}

/// 3×3 stride-2 max-pool, padding 1 counted as −∞. `x` [n·c, h, w] → `out` [n·c, oh, ow].
pub fn max_pool_3x3s2(x: &[f32], nc: usize, h: usize, w: usize, out: &mut [f32]) {
    let (oh, ow) = (out_size(h, 3, 2, 1), out_size(w, 3, 2, 1));
    assert_eq!(out.len(), nc * oh * ow);
    out.par_chunks_mut(oh * ow).enumerate().for_each(|(i, o)| {
        let plane = &x[i * h * w..(i + 1) * h * w];
        for oy in 0..oh {
            for ox in 0..ow {
                let mut m = f32::NEG_INFINITY;
                for iy in (oy * 2).saturating_sub(1)..(oy * 2 + 2).min(h) {
                    for ix in (ox * 2).saturating_sub(1)..(ox * 2 + 2).min(w) {
                        m = m.max(plane[iy * w + ix]);
                    }
                }
                o[oy * ow + ox] = m;
            }
        }
    });
}

/// PyTorch's `nearest` source index for an explicit output size: `min(floor(dst · (in/out as f32)), in − 1)`.
pub fn nearest_index(dst: usize, input: usize, output: usize) -> usize {
    let scale = input as f32 / output as f32;
    ((dst as f32 * scale).floor() as usize).min(input - 1)
}

/// `dst[i, y, x] += src[i, ny(y), nx(x)]` with the nearest rule; `src` [nc, sh, sw], `dst` [nc, dh, dw].
pub fn upsample_nearest_add(src: &[f32], sh: usize, sw: usize, dst: &mut [f32], dh: usize, dw: usize) {
    let ys: Vec<usize> = (0..dh).map(|y| nearest_index(y, sh, dh)).collect();
    let xs: Vec<usize> = (0..dw).map(|x| nearest_index(x, sw, dw)).collect();
    dst.par_chunks_mut(dh * dw).enumerate().for_each(|(i, d)| {
        let s = &src[i * sh * sw..(i + 1) * sh * sw];
        for (y, &sy) in ys.iter().enumerate() {
            for (x, &sx) in xs.iter().enumerate() {
                d[y * dw + x] += s[sy * sw + sx];
            }
        }
    });
}

/// Softmax over two logits, as PyTorch computes it: `exp(x − max) / Σ exp(x − max)`.
pub fn softmax2(a: f32, b: f32) -> [f32; 2] {
    let m = a.max(b);
    let (ea, eb) = ((a - m).exp(), (b - m).exp());
    let s = ea + eb;
    [ea / s, eb / s]
}

/// Scatters one level's head tensor (one image, [32, h, w]) into the flat anchor layout:
/// anchor `(y·w + x)·2 + j`, `loc` [A, 4], `conf` [A, 2] softmaxed, `landmarks` [A, 10].
pub fn heads_to_anchors(head: &[f32], h: usize, w: usize, loc: &mut [f32], conf: &mut [f32], landmarks: &mut [f32]) {
    let hw = h * w;
    for pix in 0..hw {
        for j in 0..2 {
            let a = pix * 2 + j;
            let ch = |c: usize| head[c * hw + pix];
            let s = softmax2(ch(HEAD_CLASS_OFFSET + 2 * j), ch(HEAD_CLASS_OFFSET + 2 * j + 1));
            conf[a * 2..a * 2 + 2].copy_from_slice(&s);
            for d in 0..4 {
                loc[a * 4 + d] = ch(HEAD_BOX_OFFSET + 4 * j + d);
            }
            for d in 0..10 {
                landmarks[a * 10 + d] = ch(HEAD_LANDMARK_OFFSET + 10 * j + d);
            }
        }
    }
}

/// u8 HWC BGR pixels to f32 CHW minus the reference means (B 104, G 117, R 123).
pub const BGR_MEAN: [f32; 3] = [104.0, 117.0, 123.0];

pub fn preprocess(bgr: &[u8], h: usize, w: usize, out: &mut [f32]) {
    assert_eq!(bgr.len(), h * w * 3);
    assert_eq!(out.len(), 3 * h * w);
    for (c, plane) in out.chunks_mut(h * w).enumerate() {
        for (i, v) in plane.iter_mut().enumerate() {
            *v = bgr[i * 3 + c] as f32 - BGR_MEAN[c];
        }
    }
}

/// `act` applied in place (kept for kernel tests of standalone activations).
pub fn activation(x: &mut [f32], act: Act) {
    for v in x {
        *v = act.apply(*v);
    }
}
