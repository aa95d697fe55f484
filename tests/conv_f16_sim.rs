//! The f16 tensor-core convolutions (kernels/conv_f16.cu) in the CPU simulation, every variant on every
//! shape, against the CPU reference `reference::conv2d` run on the same inputs, weights and residual rounded to
//! f16 first, so the only differences are the f32 accumulation order and the final rounding to f16.
//!
//! Bound, per element: |gpu − ref| ≤ ½ulp_f16(ref) + 1e-5·max(1, max |ref|): the final rounding to f16
//! (round to nearest: at most half an ulp of the value) plus f32 accumulation-order error over up to
//! 2304 products. Measured (printed with `--nocapture`): the error beyond the half ulp is at most
//! 4.0e-7 of max(1, max |ref|) (column `acc`, 3x3 over 64 channels, batch 3), 25× inside the 1e-5
//! allowance; the worst element uses 0.94–0.97 of the whole bound because the rounding alone may take
//! a full half ulp.
//!
//! Also: channels outside [out_coff, out_coff + cout) stay untouched, the hot kernels' shared memory is
//! bank-conflict-free and their global loads ≥ 90% sector-efficient in the simulation's counters.
#![cfg(feature = "cuda-sim")]

mod rng;
use retinaface::cuda::conv_f16::{self, ConvShape, VARIANTS, Variant, last_sim_counters};
use retinaface::cuda::params::{ConvF16Params, act_code};
use retinaface::cuda::sim::SimRunner;
use retinaface::cuda::{KernelRunner, nchw_to_nhwc};
use retinaface::model::graph::{Act, Conv};
use retinaface::reference;
use rng::Rng;

#[derive(Clone, Debug)]
struct Case {
    name: &'static str,
    n: usize,
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    act: Act,
    off: usize,
    ctot: usize,
    residual: bool,
}

#[allow(clippy::too_many_arguments)]
fn case(
    name: &'static str,
    n: usize,
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    act: Act,
) -> Case {
    Case { name, n, h, w, cin, cout, k, stride, act, off: 0, ctot: cout, residual: false }
}

fn cases() -> Vec<Case> {
    vec![
        case("stem3x3s2-cin3", 2, 17, 13, 3, 8, 3, 2, Act::Leaky(0.1)),
        Case { off: 8, ctot: 48, ..case("3x3-offset", 2, 9, 11, 16, 32, 3, 1, Act::Leaky(0.0)) },
        case("3x3s2", 1, 15, 10, 24, 64, 3, 2, Act::Relu6),
        Case { residual: true, ..case("3x3-residual", 2, 7, 9, 32, 32, 3, 1, Act::Leaky(0.0)) },
        case("1x1", 2, 9, 7, 40, 72, 1, 1, Act::Relu6),
        case("1x1s2", 2, 11, 9, 16, 24, 1, 2, Act::None),
        Case { residual: true, ..case("1x1-residual", 2, 6, 5, 64, 64, 1, 1, Act::None) },
        case("7x7s2-stem", 1, 23, 19, 3, 16, 7, 2, Act::Leaky(0.0)),
        case("5x5", 2, 12, 10, 8, 16, 5, 1, Act::Leaky(0.1)),
        case("3x3-deep", 2, 5, 5, 256, 256, 3, 1, Act::Leaky(0.0)),
        case("1x1-wide", 1, 16, 16, 128, 128, 1, 1, Act::Relu6),
        case("3x3s2-batch3", 3, 13, 13, 64, 128, 3, 2, Act::Leaky(0.0)),
        case("1x1-narrow-deep", 2, 7, 7, 256, 8, 1, 1, Act::None),
    ]
}

struct Prepared {
    c: Conv,
    shape: ConvShape,
    oh: usize,
    ow: usize,
    want: Vec<f32>, // NHWC [n][oh][ow][cout]
    x16: Vec<u16>,
    w16: Vec<u16>,
    bias: Vec<f32>,
    res16: Option<Vec<u16>>,
}

fn prepare(cs: &Case, rng: &mut Rng) -> Prepared {
    let fan = (cs.cin * cs.k * cs.k) as f32;
    let c = Conv {
        name: cs.name.into(),
        input: 0,
        output: 1,
        out_channel_offset: 0,
        cin: cs.cin,
        cout: cs.cout,
        kernel: cs.k,
        stride: cs.stride,
        pad: cs.k / 2,
        groups: 1,
        weight: rng.vec16(cs.cout * cs.cin * cs.k * cs.k, 1.0 / fan.sqrt()),
        bias: rng.vec16(cs.cout, 0.5),
        residual: None,
        act: cs.act,
        packed: Default::default(),
    };
    let (oh, ow) =
        (reference::out_size(cs.h, cs.k, cs.stride, c.pad), reference::out_size(cs.w, cs.k, cs.stride, c.pad));
    let x = rng.vec16(cs.n * cs.cin * cs.h * cs.w, 1.0);
    let res = cs.residual.then(|| rng.vec16(cs.n * cs.cout * oh * ow, 1.0));
    let mut want = vec![f32::NAN; cs.n * cs.cout * oh * ow];
    reference::conv2d(&c, &x, cs.n, cs.h, cs.w, &mut want, cs.cout, res.as_deref());
    let cinp = conv_f16::pad8(cs.cin);
    let x16 = conv_f16::nchw_to_nhwc_f16(&x, cs.n, cs.cin, cs.h, cs.w, cinp);
    let (w16, bias) = conv_f16::pack_weights(&c).unwrap();
    let res16 = res.map(|r| conv_f16::f16_bits(&nchw_to_nhwc(&r, cs.n, cs.cout, oh, ow)));
    let shape = ConvShape {
        n: cs.n,
        h: cs.h,
        w: cs.w,
        cin: cinp,
        cout: conv_f16::pad8(cs.cout),
        k: cs.k,
        stride: cs.stride,
        pad: c.pad,
    };
    let want = nchw_to_nhwc(&want, cs.n, cs.cout, oh, ow);
    Prepared { c, shape, oh, ow, want, x16, w16, bias, res16 }
}

/// Half an f16 ulp at |v| (normal: 2^(e−11) for 2^e ≤ |v|; subnormal: 2^-25).
fn half_ulp16(v: f64) -> f64 {
    let a = v.abs();
    if a < 2f64.powi(-14) { 2f64.powi(-25) } else { 2f64.powi(a.log2().floor() as i32 - 11) }
}

/// Runs one variant; returns the worst error as a fraction of the bound, the worst error beyond the
/// final rounding (relative to max(1, max |ref|)), the launch's counters and the output's f16 bits.
fn run(r: &mut SimRunner, cs: &Case, p: &Prepared, v: &Variant) -> (f64, f64, conv_f16::SimCounters, Vec<u16>) {
    let up16 = |r: &mut SimRunner, v: &[u16]| {
        let b = r.alloc(v.len() * 2).unwrap();
        r.upload(b, 0, bytemuck::cast_slice(v)).unwrap();
        b
    };
    let xb = up16(r, &p.x16);
    let wb = up16(r, &p.w16);
    let bb = r.alloc(p.bias.len() * 4).unwrap();
    r.upload(bb, 0, bytemuck::cast_slice(&p.bias)).unwrap();
    let rb = p.res16.as_ref().map(|v| up16(r, v));
    let pixels = cs.n * p.oh * p.ow;
    let yb = r.alloc(pixels * cs.ctot * 2).unwrap();
    r.memset(yb, 0xff).unwrap(); // f16 NaN everywhere
    let (act, slope) = act_code(cs.act);
    let params = ConvF16Params {
        x: xb.ptr,
        wt: wb.ptr,
        bias: bb.ptr,
        residual: rb.map_or(0, |b| b.ptr),
        y: yb.ptr,
        n: cs.n as i32,
        h: cs.h as i32,
        w: cs.w as i32,
        cin: p.shape.cin as i32,
        oh: p.oh as i32,
        ow: p.ow as i32,
        cout: p.shape.cout as i32,
        k: cs.k as i32,
        stride: cs.stride as i32,
        pad: p.c.pad as i32,
        out_ctot: cs.ctot as i32,
        out_coff: cs.off as i32,
        act,
        slope,
        ..Default::default()
    };
    let need = p.shape.workspace_bytes(v);
    let ws = (need > 0).then(|| {
        let b = r.alloc(need).unwrap();
        r.poison(b).unwrap();
        b
    });
    conv_f16::launch(r, v, cs.name, &params, ws).unwrap_or_else(|e| panic!("{} on {}: {e}", v.name, cs.name));
    // Split-K: the counters of the last launch (the reduce) are not the GEMM's; tests of counters use
    // single-pass variants.
    let counters = last_sim_counters();
    let mut raw = vec![0u16; pixels * cs.ctot];
    r.download(yb, 0, bytemuck::cast_slice_mut(&mut raw)).unwrap();
    for b in [xb, wb, bb, yb].into_iter().chain(rb).chain(ws) {
        r.free(b).unwrap();
    }
    let mag = p.want.iter().fold(1.0f32, |m, v| m.max(v.abs())) as f64;
    let (mut worst, mut acc) = (0.0f64, 0.0f64);
    for px in 0..pixels {
        for ch in 0..cs.ctot {
            let bits = raw[px * cs.ctot + ch];
            if ch < cs.off || ch >= cs.off + cs.cout {
                assert_eq!(bits, 0xffff, "{} on {}: wrote channel {ch} outside its range", v.name, cs.name);
                continue;
            }
            let got = half::f16::from_bits(bits).to_f32() as f64;
            let want = p.want[px * cs.cout + ch - cs.off] as f64;
            assert!(got.is_finite(), "{} on {}: pixel {px} channel {ch} not written ({bits:#x})", v.name, cs.name);
            let err = (got - want).abs();
            worst = worst.max(err / (half_ulp16(want) + 1e-5 * mag));
            acc = acc.max((err - half_ulp16(want)).max(0.0) / mag);
        }
    }
    (worst, acc, counters, raw)
}

#[test]
fn every_variant_matches_the_reference_on_every_shape() {
    let mut rng = Rng(0xf16c_0a11);
    let mut r = SimRunner::new();
    let mut failures = Vec::new();
    println!("{:<18} {:<18} {:>10} {:>10}", "case", "variant", "err/bound", "acc");
    for cs in cases() {
        let p = prepare(&cs, &mut rng);
        for v in VARIANTS {
            let (worst, acc, _, _) = run(&mut r, &cs, &p, v);
            println!("{:<18} {:<18} {:>10.3} {:>10.2e}", cs.name, v.name, worst, acc);
            if worst > 1.0 {
                failures.push(format!("{} on {}: error {worst:.3} of the bound", v.name, cs.name));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The Hopper tiles (wgmma from the swizzled ring) sum every output over the same k16 steps in the
/// same order as the mma.sync tiles, so in the simulation (whose two emulations both add in k order in
/// f32) they give the same bits on every shape; on the device the instructions' internal order may
/// differ within f32 rounding, which the reference bound above covers.
#[test]
fn wgmma_tiles_equal_the_mma_sync_tiles_bit_for_bit() {
    let mut rng = Rng(0x5a_90a);
    let mut r = SimRunner::new();
    let base = conv_f16::variant("conv_f16_128x128").unwrap();
    let wg: Vec<&Variant> = VARIANTS.iter().filter(|v| v.is_wgmma()).collect();
    assert_eq!(wg.len(), 4, "the Hopper tiles: {wg:?}");
    for cs in cases() {
        let p = prepare(&cs, &mut rng);
        let (_, _, _, want) = run(&mut r, &cs, &p, base);
        for v in &wg {
            let (_, _, _, got) = run(&mut r, &cs, &p, v);
            let diff = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            assert_eq!(diff, 0, "{} on {}: {diff} of {} outputs differ from {}", v.name, cs.name, got.len(), base.name);
        }
    }
}

/// The shapes that dominate the networks' time, on the variant the heuristic picks for them.
#[test]
fn hot_kernels_are_conflict_free_and_sector_efficient() {
    let mut rng = Rng(0xc0_ffee);
    let mut r = SimRunner::new();
    let hot = vec![
        case("3x3-64-128", 2, 20, 20, 64, 128, 3, 1, Act::Leaky(0.0)),
        case("1x1-128-256", 2, 20, 20, 128, 256, 1, 1, Act::Leaky(0.0)),
        case("3x3s2-32-64", 2, 24, 24, 32, 64, 3, 2, Act::Leaky(0.1)),
        case("1x1-64-32", 2, 20, 20, 64, 32, 1, 1, Act::Relu6),
        case("3x3-64-16", 2, 20, 20, 64, 16, 3, 1, Act::Leaky(0.0)),
        case("3x3-32-8", 2, 20, 20, 32, 8, 3, 1, Act::Leaky(0.1)),
    ];
    let mut failures = Vec::new();
    println!(
        "{:<14} {:<18} {:>9} {:>10} {:>9} {:>11} {:>8}",
        "shape", "variant", "smem req", "conflicts", "gmem req", "sectors/req", "eff"
    );
    for cs in hot {
        let p = prepare(&cs, &mut rng);
        // Every single-pass variant (split-K's GEMM is the same kernel) is held to the same bar; `*`
        // marks the heuristic's pick.
        let pick = conv_f16::heuristic(&p.shape, conv_f16::DEFAULT_SMS);
        for v in VARIANTS.iter().filter(|v| v.split_k == 1) {
            let (worst, _, c, _) = run(&mut r, &cs, &p, v);
            println!(
                "{:<14} {:<18} {:>9} {:>10} {:>9} {:>11.2} {:>7.1}%",
                cs.name,
                format!("{}{}", v.name, if v == pick { "*" } else { "" }),
                c.shared_requests,
                c.bank_conflicts(),
                c.global_requests,
                c.sectors_per_request(),
                100.0 * c.sector_efficiency()
            );
            assert!(worst <= 1.0, "{} on {}: error {worst:.3} of the bound", v.name, cs.name);
            assert!(c.shared_requests > 0 && c.global_requests > 0, "the counters saw nothing");
            if c.bank_conflicts() != 0 {
                failures.push(format!("{} on {}: {} bank conflicts", v.name, cs.name, c.bank_conflicts()));
            }
            if c.sector_efficiency() < 0.9 {
                failures.push(format!(
                    "{} on {}: global loads {:.1}% sector-efficient",
                    v.name,
                    cs.name,
                    100.0 * c.sector_efficiency()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn bad_shapes_are_rejected_with_the_conv_named() {
    let mut r = SimRunner::new();
    let p = ConvF16Params {
        n: 1,
        h: 4,
        w: 4,
        cin: 12,
        oh: 4,
        ow: 4,
        cout: 8,
        k: 3,
        stride: 1,
        pad: 1,
        out_ctot: 8,
        ..Default::default()
    };
    let e = conv_f16::launch(&mut r, &VARIANTS[0], "layer7", &p, None).unwrap_err().to_string();
    assert!(e.contains("layer7") && e.contains("multiple of 8"), "{e}");
    let p = ConvF16Params { cin: 8, out_coff: 8, ..p };
    let e = conv_f16::launch(&mut r, &VARIANTS[0], "layer8", &p, None).unwrap_err().to_string();
    assert!(e.contains("layer8") && e.contains("exceed"), "{e}");
}

/// Depthwise (MobileNet) convs: f16 vector kernel vs the reference, same bound as above; the global
/// loads of stride-1 layers (the common case) ≥ 90% sector-efficient.
#[test]
fn depthwise_matches_the_reference() {
    let mut rng = Rng(0xd0_0d);
    let mut r = SimRunner::new();
    // (name, n, h, w, c, stride, act, off, ctot, residual)
    let cases = [
        ("dw3x3s1", 2, 9, 7, 32, 1, Act::Relu6, 0, 32, true),
        ("dw3x3s2", 2, 13, 10, 40, 2, Act::Leaky(0.1), 0, 40, false),
        ("dw3x3-offset", 1, 6, 6, 8, 1, Act::None, 8, 24, false),
        ("dw3x3s1-wide", 1, 20, 20, 64, 1, Act::Leaky(0.0), 0, 64, false),
    ];
    for (name, n, h, w, c, stride, act, off, ctot, with_res) in cases {
        let conv = Conv {
            name: name.into(),
            input: 0,
            output: 1,
            out_channel_offset: 0,
            cin: c,
            cout: c,
            kernel: 3,
            stride,
            pad: 1,
            groups: c,
            weight: rng.vec16(c * 9, 1.0 / 3.0),
            bias: rng.vec16(c, 0.5),
            residual: None,
            act,
            packed: Default::default(),
        };
        let (oh, ow) = (reference::out_size(h, 3, stride, 1), reference::out_size(w, 3, stride, 1));
        let x = rng.vec16(n * c * h * w, 1.0);
        let res = with_res.then(|| rng.vec16(n * c * oh * ow, 1.0));
        let mut want = vec![f32::NAN; n * c * oh * ow];
        reference::conv2d(&conv, &x, n, h, w, &mut want, c, res.as_deref());
        let want = nchw_to_nhwc(&want, n, c, oh, ow);
        let (w16, bias) = conv_f16::pack_depthwise(&conv).unwrap();
        let up = |r: &mut SimRunner, bytes: &[u8]| {
            let b = r.alloc(bytes.len()).unwrap();
            r.upload(b, 0, bytes).unwrap();
            b
        };
        let xb = up(&mut r, bytemuck::cast_slice(&conv_f16::nchw_to_nhwc_f16(&x, n, c, h, w, c)));
        let wb = up(&mut r, bytemuck::cast_slice(&w16));
        let bb = up(&mut r, bytemuck::cast_slice(&bias));
        let rb = res.map(|v| up(&mut r, bytemuck::cast_slice(&conv_f16::f16_bits(&nchw_to_nhwc(&v, n, c, oh, ow)))));
        let yb = r.alloc(n * oh * ow * ctot * 2).unwrap();
        r.memset(yb, 0xff).unwrap();
        let (act, slope) = act_code(act);
        let p = ConvF16Params {
            x: xb.ptr,
            wt: wb.ptr,
            bias: bb.ptr,
            residual: rb.map_or(0, |b| b.ptr),
            y: yb.ptr,
            n: n as i32,
            h: h as i32,
            w: w as i32,
            cin: c as i32,
            oh: oh as i32,
            ow: ow as i32,
            cout: c as i32,
            k: 3,
            stride: stride as i32,
            pad: 1,
            out_ctot: ctot as i32,
            out_coff: off as i32,
            act,
            slope,
            ..Default::default()
        };
        conv_f16::launch_depthwise(&mut r, name, &p).unwrap();
        let cnt = last_sim_counters();
        let mut raw = vec![0u16; n * oh * ow * ctot];
        r.download(yb, 0, bytemuck::cast_slice_mut(&mut raw)).unwrap();
        let mag = want.iter().fold(1.0f32, |m, v| m.max(v.abs())) as f64;
        let mut worst = 0.0f64;
        for px in 0..n * oh * ow {
            for ch in 0..ctot {
                let bits = raw[px * ctot + ch];
                if ch < off || ch >= off + c {
                    assert_eq!(bits, 0xffff, "{name}: wrote channel {ch} outside its range");
                    continue;
                }
                let got = half::f16::from_bits(bits).to_f32() as f64;
                let wv = want[px * c + ch - off] as f64;
                worst = worst.max((got - wv).abs() / (half_ulp16(wv) + 1e-5 * mag));
            }
        }
        println!(
            "{name:<14} err/bound {worst:.3}  gmem requests {} sectors/request {:.2} efficiency {:.1}%",
            cnt.global_requests,
            cnt.sectors_per_request(),
            100.0 * cnt.sector_efficiency()
        );
        assert!(worst <= 1.0, "{name}: error {worst:.3} of the bound");
        if stride == 1 && c >= 32 {
            assert!(
                cnt.sector_efficiency() >= 0.9,
                "{name}: loads {:.1}% sector-efficient",
                100.0 * cnt.sector_efficiency()
            );
        }
        for b in [xb, wb, bb, yb].into_iter().chain(rb) {
            r.free(b).unwrap();
        }
    }
}
