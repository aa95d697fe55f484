//! The f16 network's non-convolution kernels (kernels/net_f16.cu) in the simulation against the CPU
//! reference ops on the same f16-rounded inputs. All three are exact: preprocessing yields integers
//! (exact in f16), max-pool returns one of its inputs, and upsample-add rounds the same f32 sum once.
#![cfg(feature = "cuda-sim")]

use retinaface::cuda::params::{PoolF16Params, PreprocessF16Params, UpsampleAddF16Params};
use retinaface::cuda::sim::SimRunner;
use retinaface::cuda::{DevBuf, KernelRunner, KernelRunnerExt, LaunchDims, nchw_to_nhwc};
use retinaface::reference;

fn f16v(n: usize, seed: &mut u64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            half::f16::from_f32(((*seed >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0).to_f32()
        })
        .collect()
}

fn up16(r: &mut SimRunner, v: &[f32]) -> DevBuf {
    let bits: Vec<u16> = v.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect();
    let b = r.alloc(bits.len() * 2).unwrap();
    r.upload(b, 0, bytemuck::cast_slice(&bits)).unwrap();
    b
}

fn down16(r: &mut SimRunner, b: DevBuf, n: usize) -> Vec<f32> {
    let mut bits = vec![0u16; n];
    r.download(b, 0, bytemuck::cast_slice_mut(&mut bits)).unwrap();
    bits.iter().map(|&h| half::f16::from_bits(h).to_f32()).collect()
}

#[test]
fn preprocess_pads_to_8_channels_exactly() {
    let mut r = SimRunner::new();
    let (h, w) = (7, 9);
    let bgr: Vec<u8> = (0..h * w * 3).map(|i| (i * 37 % 256) as u8).collect();
    let mut want = vec![0.0; 3 * h * w];
    reference::preprocess(&bgr, h, w, &mut want);
    let want = nchw_to_nhwc(&want, 1, 3, h, w);
    let sb = r.alloc(bgr.len()).unwrap();
    r.upload(sb, 0, &bgr).unwrap();
    let db = r.alloc(h * w * 16).unwrap();
    r.memset(db, 0xff).unwrap();
    let p = PreprocessF16Params { src: sb.ptr, dst: db.ptr, pixels: (h * w) as i32, pad0: 0 };
    r.launch("preprocess_bgr_f16", LaunchDims::linear(h * w, 256), &p).unwrap();
    let got = down16(&mut r, db, h * w * 8);
    for px in 0..h * w {
        assert_eq!(&got[px * 8..px * 8 + 3], &want[px * 3..px * 3 + 3], "pixel {px}");
        assert_eq!(&got[px * 8 + 3..px * 8 + 8], &[0.0; 5], "pixel {px}: padding channels");
    }
}

#[test]
fn maxpool_f16_is_exact() {
    let mut r = SimRunner::new();
    let mut seed = 7;
    for (n, c, h, w) in [(2, 16, 9, 11), (1, 64, 8, 8), (1, 8, 5, 3)] {
        let x = f16v(n * c * h * w, &mut seed);
        let (oh, ow) = (reference::out_size(h, 3, 2, 1), reference::out_size(w, 3, 2, 1));
        let mut want = vec![0.0; n * c * oh * ow];
        reference::max_pool_3x3s2(&x, n * c, h, w, &mut want);
        let xb = up16(&mut r, &nchw_to_nhwc(&x, n, c, h, w));
        let yb = r.alloc(n * oh * ow * c * 2).unwrap();
        r.memset(yb, 0xff).unwrap();
        let p = PoolF16Params {
            x: xb.ptr,
            y: yb.ptr,
            n: n as i32,
            h: h as i32,
            w: w as i32,
            c: c as i32,
            oh: oh as i32,
            ow: ow as i32,
        };
        r.launch("maxpool3x3s2_f16", LaunchDims::linear(n * oh * ow * c / 8, 256), &p).unwrap();
        assert_eq!(down16(&mut r, yb, n * oh * ow * c), nchw_to_nhwc(&want, n, c, oh, ow), "{n}x{c}x{h}x{w}");
    }
}

#[test]
fn upsample_add_f16_rounds_the_f32_sum_once() {
    let mut r = SimRunner::new();
    let mut seed = 11;
    for (n, c, sh, sw, dh, dw) in [(2, 16, 5, 4, 10, 8), (1, 8, 3, 5, 7, 10), (1, 32, 20, 20, 40, 40)] {
        let src = f16v(n * c * sh * sw, &mut seed);
        let dst = f16v(n * c * dh * dw, &mut seed);
        let mut want = dst.clone();
        reference::upsample_nearest_add(&src, sh, sw, &mut want, dh, dw);
        let want: Vec<f32> =
            nchw_to_nhwc(&want, n, c, dh, dw).iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
        let sb = up16(&mut r, &nchw_to_nhwc(&src, n, c, sh, sw));
        let db = up16(&mut r, &nchw_to_nhwc(&dst, n, c, dh, dw));
        let p = UpsampleAddF16Params {
            src: sb.ptr,
            dst: db.ptr,
            n: n as i32,
            sh: sh as i32,
            sw: sw as i32,
            dh: dh as i32,
            dw: dw as i32,
            c: c as i32,
        };
        r.launch("upsample_nearest_add_f16", LaunchDims::linear(n * dh * dw * c / 8, 256), &p).unwrap();
        assert_eq!(down16(&mut r, db, n * dh * dw * c), want, "{sh}x{sw} -> {dh}x{dw}");
    }
}
