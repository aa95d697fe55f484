//! The fused members of the f16 convolution family (kernels/conv_f16.cu: conv_dwpw_f16_*,
//! conv_ex_f16_*): the kernel of each variant, weight packing, parameter checks and the launches of
//! `Op::DwPw`, `Op::ConvPair` and `Op::ConvUpsampleAdd` on the f16 executor. The GEMM's variant
//! comes from the plain convs' registry ([`conv_f16::VARIANTS`]): the fused kernels are the same
//! tiles with A made by the depthwise conv, or with another epilogue.

use super::conv_f16::{self, Variant};
use super::dim;
use crate::cuda::params::{ConvExF16Params, ConvF16Params, DwPwF16Params};
use crate::cuda::runner::{DevBuf, KernelRunner, KernelRunnerExt, LaunchDims};
use crate::error::{Error, Result};
use crate::graph::Conv;

/// The depthwise + pointwise kernel with `v`'s tile.
pub fn dwpw_kernel(v: &Variant) -> Result<&'static str> {
    Ok(match v.kernel {
        "conv_f16_128x128" => "conv_dwpw_f16_128x128",
        "conv_f16_128x64" => "conv_dwpw_f16_128x64",
        "conv_f16_64x64" => "conv_dwpw_f16_64x64",
        "conv_f16_128x32" => "conv_dwpw_f16_128x32",
        "conv_f16_128x16" => "conv_dwpw_f16_128x16",
        "conv_f16_128x8" => "conv_dwpw_f16_128x8",
        "conv_f16_wg128x256" => "conv_dwpw_f16_wg128x256",
        "conv_f16_wg128x128" => "conv_dwpw_f16_wg128x128",
        "conv_f16_wg128x64" => "conv_dwpw_f16_wg128x64",
        "conv_f16_wg64x128" => "conv_dwpw_f16_wg64x128",
        other => {
            return Err(Error::Cuda(format!("f16 variant {} ({other}) has no depthwise + pointwise kernel", v.name)));
        }
    })
}

/// The depthwise conv's part of a fused launch: its packed weights ([k][k][c] f16, `pack_depthwise`),
/// padded bias, kernel size and activation.
#[derive(Clone, Copy, Debug)]
pub struct DepthwisePart {
    pub wdw: u64,
    pub bdw: u64,
    pub k: usize,
    pub act: crate::graph::Act,
}

/// `Op::DwPw` on f16: `pw` is the pointwise conv's parameters as a plain f16 conv of the depthwise
/// output would get them, except that `x`, `h`, `w`, `stride` and `pad` are the depthwise conv's
/// input and geometry (its output is `oh` × `ow`, the pointwise conv's). Split-K variants need `ws`
/// as [`conv_f16::launch`] does; the reduce runs the pointwise epilogue.
pub fn launch_dwpw(
    r: &mut (impl KernelRunner + ?Sized),
    v: &Variant,
    name: &str,
    pw: &ConvF16Params,
    dw: &DepthwisePart,
    ws: Option<DevBuf>,
) -> Result<()> {
    let kernel = dwpw_kernel(v)?;
    let bad = |msg: String| Err(Error::InvalidArgument(format!("f16 depthwise + pointwise {name}: {msg}")));
    if pw.k != 1 {
        return bad(format!("the pointwise conv is {}x{}, not 1x1", pw.k, pw.k));
    }
    if dw.k == 0 || pw.stride <= 0 || pw.pad < 0 {
        return bad(format!("depthwise kernel {} stride {} pad {}", dw.k, pw.stride, pw.pad));
    }
    // The pointwise GEMM's checks (channels, offsets, 32-bit sizes) on the depthwise output's shape.
    let (oh, ow) = (pw.oh, pw.ow);
    let dw_out = |s: i32| (s + 2 * pw.pad - dw.k as i32) / pw.stride + 1;
    if (dw_out(pw.h), dw_out(pw.w)) != (oh, ow) {
        return bad(format!("a {}x{} input gives {}x{}, not {oh}x{ow}", pw.h, pw.w, dw_out(pw.h), dw_out(pw.w)));
    }
    let gemm = ConvF16Params { h: oh, w: ow, stride: 1, pad: 0, ..*pw };
    conv_f16::check(name, &gemm)?;
    let fits = (pw.n as i64) * (pw.h as i64) * (pw.w as i64) * (pw.cin as i64) < i32::MAX as i64;
    if !fits {
        return bad("an input of 2^31 elements or more (the kernels index with 32-bit ints)".into());
    }
    let shape = gemm.shape();
    let m = shape.m();
    let (splits, per) = shape.splits(v);
    let (act_dw, slope_dw) = crate::cuda::params::act_code(dw.act);
    let mut p = DwPwF16Params {
        x: pw.x,
        wt: pw.wt,
        bias: pw.bias,
        residual: pw.residual,
        y: pw.y,
        n: pw.n,
        h: pw.h,
        w: pw.w,
        cin: pw.cin,
        oh,
        ow,
        cout: pw.cout,
        k: 1,
        stride: pw.stride,
        pad: pw.pad,
        out_ctot: pw.out_ctot,
        out_coff: pw.out_coff,
        act: pw.act,
        slope: pw.slope,
        ws: 0,
        splits: 1,
        kt_per_split: per as i32,
        wdw: dw.wdw,
        bdw: dw.bdw,
        kdw: dim(dw.k, "kernel")?,
        act_dw,
        slope_dw,
        pad0: 0,
    };
    if v.split_k > 1 {
        let need = shape.workspace_bytes(v);
        let ws = ws.filter(|b| b.bytes >= need).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "f16 depthwise + pointwise {name}: {} needs a workspace of {need} bytes",
                v.name
            ))
        })?;
        p.ws = ws.ptr;
        p.splits = splits as i32;
    }
    let dims = LaunchDims {
        grid: [m.div_ceil(v.bm) as u32, (p.cout as usize).div_ceil(v.bn) as u32, p.splits as u32],
        block: [v.threads, 1, 1],
    };
    if dims.grid[1] > 65535 {
        return bad(format!("{} output channels is too many", p.cout));
    }
    r.launch(kernel, dims, &p)?;
    if v.split_k > 1 {
        let reduce = ConvF16Params { ws: p.ws, splits: p.splits, kt_per_split: per as i32, ..gemm };
        r.launch(conv_f16::SPLITK_REDUCE, LaunchDims::linear(m * p.cout as usize / 2, 256), &reduce)?;
    }
    Ok(())
}

/// The conv_ex kernel with `v`'s tile.
pub fn ex_kernel(v: &Variant) -> Result<&'static str> {
    Ok(match v.kernel {
        "conv_f16_128x128" => "conv_ex_f16_128x128",
        "conv_f16_128x64" => "conv_ex_f16_128x64",
        "conv_f16_64x64" => "conv_ex_f16_64x64",
        "conv_f16_128x32" => "conv_ex_f16_128x32",
        "conv_f16_128x16" => "conv_ex_f16_128x16",
        "conv_f16_128x8" => "conv_ex_f16_128x8",
        "conv_f16_wg128x256" => "conv_ex_f16_wg128x256",
        "conv_f16_wg128x128" => "conv_ex_f16_wg128x128",
        "conv_f16_wg128x64" => "conv_ex_f16_wg128x64",
        "conv_f16_wg64x128" => "conv_ex_f16_wg64x128",
        other => return Err(Error::Cuda(format!("f16 variant {} ({other}) has no fused-epilogue kernel", v.name))),
    })
}

const EX_SPLITK_REDUCE: &str = "conv_ex_f16_splitk_reduce";

/// The fused epilogue of a conv_ex_f16 launch beyond the first destination's (which is the conv's
/// own `ConvF16Params`): the second conv's destination, or the map upsampled into the first.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExPart {
    /// Output channels (padded) that go to the first destination; the rest go to `y2`.
    pub split: usize,
    /// 0 when every channel goes to the first destination.
    pub y2: u64,
    pub out_ctot2: usize,
    pub out_coff2: usize,
    pub act2: Option<crate::graph::Act>,
    /// [n][uh][uw][split] f16 added after the activation, or 0.
    pub up: u64,
    pub uh: usize,
    pub uw: usize,
}

/// `Op::ConvPair` (`e.y2` set: one GEMM over both convs' padded channels, `p.cout` their sum, the
/// weights [`pack_pair`]'s) or `Op::ConvUpsampleAdd` (`e.up` set) on f16: `p` is the (first) conv's
/// parameters as [`conv_f16::launch`] takes them. Split-K variants need `ws` as that does.
pub fn launch_ex(
    r: &mut (impl KernelRunner + ?Sized),
    v: &Variant,
    name: &str,
    p: &ConvF16Params,
    e: &ExPart,
    ws: Option<DevBuf>,
) -> Result<()> {
    let kernel = ex_kernel(v)?;
    let bad = |msg: String| Err(Error::InvalidArgument(format!("f16 fused conv {name}: {msg}")));
    conv_f16::check(name, &ConvF16Params { cout: e.split as i32, ..*p })?;
    let shape = p.shape();
    if (p.oh as usize, p.ow as usize) != shape.out_hw() {
        return bad(format!("output {}x{} but the shape gives {:?}", p.oh, p.ow, shape.out_hw()));
    }
    let (split, cout) = (e.split, p.cout.max(0) as usize);
    if split == 0 || !split.is_multiple_of(8) || split > cout {
        return bad(format!("split {split} of {cout} channels (a positive multiple of 8, at most cout)"));
    }
    let second = cout - split;
    if (second > 0) != (e.y2 != 0) || (second > 0 && e.up != 0) {
        return bad(format!("{second} channels for a second destination {:#x} (with upsample {:#x})", e.y2, e.up));
    }
    if second > 0 {
        let p2 = ConvF16Params {
            cout: second as i32,
            out_ctot: dim(e.out_ctot2, "channels")?,
            out_coff: dim(e.out_coff2, "channel offset")?,
            ..*p
        };
        conv_f16::check(name, &p2)?;
        if p.residual != 0 {
            return bad("a pair takes no residual".into());
        }
    }
    if e.up != 0 && (e.uh == 0 || e.uw == 0) {
        return bad("an empty map to upsample".into());
    }
    dim(p.n.max(0) as usize * e.uh * e.uw * split, "upsampled elements")?;
    let (act2, slope2) = crate::cuda::params::act_code(e.act2.unwrap_or(crate::graph::Act::None));
    let m = shape.m();
    let (splits, per) = shape.splits(v);
    let mut q = ConvExF16Params {
        x: p.x,
        wt: p.wt,
        bias: p.bias,
        residual: p.residual,
        y: p.y,
        n: p.n,
        h: p.h,
        w: p.w,
        cin: p.cin,
        oh: p.oh,
        ow: p.ow,
        cout: p.cout,
        k: p.k,
        stride: p.stride,
        pad: p.pad,
        out_ctot: p.out_ctot,
        out_coff: p.out_coff,
        act: p.act,
        slope: p.slope,
        ws: 0,
        splits: 1,
        kt_per_split: per as i32,
        y2: e.y2,
        up: e.up,
        split: dim(split, "channels")?,
        out_ctot2: dim(e.out_ctot2, "channels")?,
        out_coff2: dim(e.out_coff2, "channel offset")?,
        act2,
        slope2,
        uh: dim(e.uh, "height")?,
        uw: dim(e.uw, "width")?,
        pad0: 0,
    };
    if v.split_k > 1 {
        let need = shape.workspace_bytes(v);
        let ws = ws.filter(|b| b.bytes >= need).ok_or_else(|| {
            Error::InvalidArgument(format!("f16 fused conv {name}: {} needs a workspace of {need} bytes", v.name))
        })?;
        q.ws = ws.ptr;
        q.splits = splits as i32;
    }
    let dims = LaunchDims {
        grid: [m.div_ceil(v.bm) as u32, cout.div_ceil(v.bn) as u32, q.splits as u32],
        block: [v.threads, 1, 1],
    };
    if dims.grid[1] > 65535 {
        return bad(format!("{cout} output channels is too many"));
    }
    r.launch(kernel, dims, &q)?;
    if v.split_k > 1 {
        r.launch(EX_SPLITK_REDUCE, LaunchDims::linear(m * cout / 2, 256), &q)?;
    }
    Ok(())
}

/// A pair's f16 weights as one [a.cout_pad + b.cout_pad][k][k][cin_pad] matrix (a's rows first)
/// and its padded biases side by side.
pub fn pack_pair(a: &Conv, b: &Conv) -> Result<(Vec<u16>, Vec<f32>)> {
    if (a.kernel, a.stride, a.pad, a.cin, a.groups) != (b.kernel, b.stride, b.pad, b.cin, b.groups) {
        return Err(Error::Cuda(format!("f16 convs {} and {} differ in shape: not a pair", a.name, b.name)));
    }
    let ((mut w, mut bias), (wb, bb)) = (conv_f16::pack_weights(a)?, conv_f16::pack_weights(b)?);
    w.extend_from_slice(&wb);
    bias.extend_from_slice(&bb);
    Ok((w, bias))
}
