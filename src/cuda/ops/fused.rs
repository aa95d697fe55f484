//! The fused members of the convolution family (kernels/conv.cu: conv1x1_ex, conv3x3_ex, conv_dwpw,
//! conv_invres): weight packing and launches of `Op::ConvUpsampleAdd`, `Op::ConvPair`, `Op::DwPw`
//! and `Op::InvRes`. The plain convs' packing ([`super::conv::pack`]) serves each part.

use super::conv::pack;
use super::dim;
use crate::cuda::params::{ConvExParams, DwPwParams, InvResParams, act_code};
use crate::cuda::runner::{KernelRunner, KernelRunnerExt, LaunchDims};
use crate::error::{Error, Result};
use crate::graph::Conv;

/// 64×64 output tiles (pixels × channels), 256 threads (kernels/conv.cu CONV_BM, CONV_BN).
fn gemm_dims(pixels: usize, cout: usize) -> LaunchDims {
    LaunchDims { grid: [pixels.div_ceil(64) as u32, cout.div_ceil(64) as u32, 1], block: [256, 1, 1] }
}

fn ex_kernel(c: &Conv) -> Result<&'static str> {
    match (c.kernel, c.groups) {
        (1, 1) => Ok("conv1x1_ex"),
        (3, 1) => Ok("conv3x3_ex"),
        _ => Err(Error::Cuda(format!(
            "conv {}: the fused epilogue has kernels for dense 1x1 and 3x3 convs, not {}x{} groups {}",
            c.name, c.kernel, c.kernel, c.groups
        ))),
    }
}

/// A pair's weights as one [k][k][cin][a.cout + b.cout] matrix (a's columns first) and its biases.
pub fn pack_pair(a: &Conv, b: &Conv) -> Result<(Vec<f32>, Vec<f32>)> {
    if (a.kernel, a.stride, a.pad, a.cin, a.groups) != (b.kernel, b.stride, b.pad, b.cin, b.groups) {
        return Err(Error::Cuda(format!("convs {} and {} differ in shape: not a pair", a.name, b.name)));
    }
    let (pa, pb) = (pack(a)?, pack(b)?);
    let rows = a.kernel * a.kernel * a.cin;
    let cols = a.cout + b.cout;
    let mut w = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        w.extend_from_slice(&pa[r * a.cout..(r + 1) * a.cout]);
        w.extend_from_slice(&pb[r * b.cout..(r + 1) * b.cout]);
    }
    Ok((w, a.bias.iter().chain(&b.bias).copied().collect()))
}

/// Input and output sizes of a fused launch (NHWC tensors).
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub oh: usize,
    pub ow: usize,
}

#[allow(clippy::too_many_arguments)] // one field per ConvExParams group
fn ex_params(
    c: &Conv,
    s: Sizes,
    (x, wt, bias, residual): (u64, u64, u64, u64),
    (y, out_ctot): (u64, usize),
    (y2, out_ctot2, coff2, act2): (u64, usize, usize, crate::graph::Act),
    (up, uh, uw): (u64, usize, usize),
    split: usize,
    cout: usize,
) -> Result<ConvExParams> {
    let (act, slope) = act_code(c.act);
    let (act2, slope2) = act_code(act2);
    dim(s.n * s.oh * s.ow * out_ctot.max(out_ctot2), "output elements")?;
    Ok(ConvExParams {
        x,
        wt,
        bias,
        residual,
        y,
        y2,
        up,
        n: dim(s.n, "batch")?,
        h: dim(s.h, "height")?,
        w: dim(s.w, "width")?,
        cin: dim(c.cin, "channels")?,
        oh: dim(s.oh, "height")?,
        ow: dim(s.ow, "width")?,
        cout: dim(cout, "channels")?,
        k: dim(c.kernel, "kernel")?,
        stride: dim(c.stride, "stride")?,
        pad: dim(c.pad, "pad")?,
        out_ctot: dim(out_ctot, "channels")?,
        out_coff: dim(c.out_channel_offset, "channel offset")?,
        act,
        slope,
        split: dim(split, "channels")?,
        out_ctot2: dim(out_ctot2, "channels")?,
        out_coff2: dim(coff2, "channel offset")?,
        act2,
        slope2,
        uh: dim(uh, "height")?,
        uw: dim(uw, "width")?,
        pad0: 0,
    })
}

/// `Op::ConvUpsampleAdd`: `y[.., off..off+cout] = act(conv(x)) + nearest(up)`, `up` [n][uh][uw][cout].
/// `wt` and `bias` are [`pack`]'s and the conv's.
#[allow(clippy::too_many_arguments)] // the conv's buffers and the upsampled map's
pub fn launch_upsample_add(
    r: &mut dyn KernelRunner,
    c: &Conv,
    s: Sizes,
    (x, wt, bias, residual): (u64, u64, u64, u64),
    (y, out_ctot): (u64, usize),
    (up, uh, uw): (u64, usize, usize),
) -> Result<()> {
    if uh == 0 || uw == 0 || up == 0 {
        return Err(Error::Cuda(format!("conv {}: an empty map to upsample", c.name)));
    }
    let p = ex_params(
        c,
        s,
        (x, wt, bias, residual),
        (y, out_ctot),
        (0, 0, 0, crate::graph::Act::None),
        (up, uh, uw),
        c.cout,
        c.cout,
    )?;
    r.launch(ex_kernel(c)?, gemm_dims(s.n * s.oh * s.ow, c.cout), &p)
}

/// `Op::ConvPair`: one GEMM writing `a` into `ya` ([n][oh][ow][ctot_a]) and `b` into `yb`, each at its
/// conv's channel offset with its activation. `wt` and `bias` are [`pack_pair`]'s.
pub fn launch_pair(
    r: &mut dyn KernelRunner,
    (a, b): (&Conv, &Conv),
    s: Sizes,
    (x, wt, bias): (u64, u64, u64),
    (ya, ctot_a): (u64, usize),
    (yb, ctot_b): (u64, usize),
) -> Result<()> {
    if a.residual.is_some() || b.residual.is_some() {
        return Err(Error::Cuda(format!("conv pair {} + {}: the pair kernel takes no residual", a.name, b.name)));
    }
    let p = ex_params(
        a,
        s,
        (x, wt, bias, 0),
        (ya, ctot_a),
        (yb, ctot_b, b.out_channel_offset, b.act),
        (0, 0, 0),
        a.cout,
        a.cout + b.cout,
    )?;
    r.launch(ex_kernel(a)?, gemm_dims(s.n * s.oh * s.ow, a.cout + b.cout), &p)
}

/// Device buffers of an `Op::DwPw` launch: `wdw` is [`pack`]`(dw)` ([k][k][c]), `wpw` is
/// [`pack`]`(pw)` ([c][cout]).
#[derive(Clone, Copy, Debug)]
pub struct DwPwBufs {
    pub x: u64,
    pub wdw: u64,
    pub bdw: u64,
    pub wpw: u64,
    pub bpw: u64,
    /// 0 for none.
    pub residual: u64,
    pub y: u64,
    /// Channels of the output tensor (pw writes `out_channel_offset..+cout` of them).
    pub out_ctot: usize,
}

/// `Op::DwPw`: `pw(dw(x))` with the depthwise output in shared memory only.
pub fn launch_dwpw(r: &mut dyn KernelRunner, dw: &Conv, pw: &Conv, s: Sizes, b: &DwPwBufs) -> Result<()> {
    if dw.groups != dw.cin
        || dw.cin != dw.cout
        || pw.cin != dw.cout
        || pw.kernel != 1
        || pw.stride != 1
        || pw.groups != 1
    {
        return Err(Error::Cuda(format!(
            "{} + {} is not a depthwise conv and a 1x1 conv of its output",
            dw.name, pw.name
        )));
    }
    let (act_dw, slope_dw) = act_code(dw.act);
    let (act, slope) = act_code(pw.act);
    dim(s.n * s.oh * s.ow * b.out_ctot, "output elements")?;
    let p = DwPwParams {
        x: b.x,
        wdw: b.wdw,
        bdw: b.bdw,
        wpw: b.wpw,
        bpw: b.bpw,
        residual: b.residual,
        y: b.y,
        n: dim(s.n, "batch")?,
        h: dim(s.h, "height")?,
        w: dim(s.w, "width")?,
        c: dim(dw.cout, "channels")?,
        oh: dim(s.oh, "height")?,
        ow: dim(s.ow, "width")?,
        cout: dim(pw.cout, "channels")?,
        k: dim(dw.kernel, "kernel")?,
        stride: dim(dw.stride, "stride")?,
        pad: dim(dw.pad, "pad")?,
        out_ctot: dim(b.out_ctot, "channels")?,
        out_coff: dim(pw.out_channel_offset, "channel offset")?,
        act_dw,
        slope_dw,
        act,
        slope,
    };
    r.launch("conv_dwpw", gemm_dims(s.n * s.oh * s.ow, pw.cout), &p)
}

/// Device buffers of an `Op::InvRes` launch: `wex`, `wdw`, `wpw` are [`pack`] of the expansion
/// ([cin][c]), the depthwise conv ([3][3][c]) and the projection ([c][cout]).
#[derive(Clone, Copy, Debug)]
pub struct InvResBufs {
    pub x: u64,
    pub wex: u64,
    pub bex: u64,
    pub wdw: u64,
    pub bdw: u64,
    pub wpw: u64,
    pub bpw: u64,
    /// 0 for none.
    pub residual: u64,
    pub y: u64,
    /// Channels of the output tensor (pw writes `out_channel_offset..+cout` of them).
    pub out_ctot: usize,
}

/// The output tile side of kernels/conv.cu's conv_invres (INVRES_T).
const INVRES_TILE: usize = 8;

/// `Op::InvRes`: `pw(dw(ex(x)))` with the expanded window and the depthwise tile in shared memory
/// only. `s` is the block's input (h, w) and output (oh, ow) sizes.
pub fn launch_invres(
    r: &mut dyn KernelRunner,
    (ex, dw, pw): (&Conv, &Conv, &Conv),
    s: Sizes,
    b: &InvResBufs,
) -> Result<()> {
    let shape_ok = ex.kernel == 1
        && ex.stride == 1
        && ex.pad == 0
        && ex.groups == 1
        && ex.cout == dw.cin
        && dw.groups == dw.cin
        && dw.cin == dw.cout
        && dw.kernel == 3
        && matches!(dw.stride, 1 | 2)
        && pw.cin == dw.cout
        && pw.kernel == 1
        && pw.stride == 1
        && pw.groups == 1;
    if !shape_ok {
        return Err(Error::Cuda(format!(
            "{} + {} + {} is not a 1x1 expansion, a depthwise 3x3 of stride 1 or 2 and a 1x1 projection",
            ex.name, dw.name, pw.name
        )));
    }
    if ex.residual.is_some() || dw.residual.is_some() {
        return Err(Error::Cuda(format!("inverted residual {}: only the projection takes a shortcut", ex.name)));
    }
    let (act_ex, slope_ex) = act_code(ex.act);
    let (act_dw, slope_dw) = act_code(dw.act);
    let (act, slope) = act_code(pw.act);
    dim(s.n * s.oh * s.ow * b.out_ctot, "output elements")?;
    dim(s.n * s.h * s.w * ex.cin, "input elements")?;
    let (tiles_y, tiles_x) = (s.oh.div_ceil(INVRES_TILE), s.ow.div_ceil(INVRES_TILE));
    let p = InvResParams {
        x: b.x,
        wex: b.wex,
        bex: b.bex,
        wdw: b.wdw,
        bdw: b.bdw,
        wpw: b.wpw,
        bpw: b.bpw,
        residual: b.residual,
        y: b.y,
        n: dim(s.n, "batch")?,
        h: dim(s.h, "height")?,
        w: dim(s.w, "width")?,
        cin: dim(ex.cin, "channels")?,
        c: dim(dw.cout, "channels")?,
        oh: dim(s.oh, "height")?,
        ow: dim(s.ow, "width")?,
        cout: dim(pw.cout, "channels")?,
        stride: dim(dw.stride, "stride")?,
        pad: dim(dw.pad, "pad")?,
        out_ctot: dim(b.out_ctot, "channels")?,
        out_coff: dim(pw.out_channel_offset, "channel offset")?,
        tiles_y: dim(tiles_y, "tiles")?,
        tiles_x: dim(tiles_x, "tiles")?,
        act_ex,
        slope_ex,
        act_dw,
        slope_dw,
        act,
        slope,
    };
    let blocks = dim(s.n * tiles_y * tiles_x, "blocks")?;
    let dims = LaunchDims { grid: [blocks as u32, pw.cout.div_ceil(64) as u32, 1], block: [256, 1, 1] };
    r.launch("conv_invres", dims, &p)
}
