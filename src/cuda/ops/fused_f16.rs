//! The fused members of the f16 convolution family (kernels/conv_f16.cu: conv_dwpw_f16_*): the
//! kernel of each variant, parameter checks and the launch of `Op::DwPw` on the f16 executor. The
//! pointwise GEMM's variant comes from the plain convs' registry ([`conv_f16::VARIANTS`]): the fused
//! kernels are the same tiles with A made by the depthwise conv.

use super::conv_f16::{self, Variant};
use super::dim;
use crate::cuda::params::{ConvF16Params, DwPwF16Params};
use crate::cuda::runner::{DevBuf, KernelRunner, KernelRunnerExt, LaunchDims};
use crate::error::{Error, Result};

/// The depthwise + pointwise kernel with `v`'s tile.
pub fn dwpw_kernel(v: &Variant) -> Result<&'static str> {
    Ok(match v.kernel {
        "conv_f16_128x128" => "conv_dwpw_f16_128x128",
        "conv_f16_128x64" => "conv_dwpw_f16_128x64",
        "conv_f16_64x64" => "conv_dwpw_f16_64x64",
        "conv_f16_128x32" => "conv_dwpw_f16_128x32",
        "conv_f16_128x16" => "conv_dwpw_f16_128x16",
        "conv_f16_128x8" => "conv_dwpw_f16_128x8",
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
