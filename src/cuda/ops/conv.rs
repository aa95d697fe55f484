//! The convolution family (kernels/conv.cu): weight packing, kernel choice and grid.

use super::dim;
use crate::cuda::params::{ConvParams, act_code};
use crate::cuda::runner::{KernelRunner, KernelRunnerExt, LaunchDims};
use crate::error::{Error, Result};
use crate::graph::Conv;

/// Device addresses and sizes of one convolution launch (NHWC tensors).
#[derive(Clone, Copy, Debug)]
pub struct ConvArgs {
    pub x: u64,
    pub wt: u64,
    pub bias: u64,
    /// 0 for none.
    pub residual: u64,
    pub y: u64,
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub oh: usize,
    pub ow: usize,
    /// Channels of the output tensor (the conv writes `out_channel_offset..+cout` of them).
    pub out_ctot: usize,
}

/// OIHW → HWIO ([k][k][cin][cout]) for the implicit GEMMs; [k][k][c] for depthwise.
pub fn pack(c: &Conv) -> Result<Vec<f32>> {
    if c.groups != 1 && !(c.groups == c.cin && c.groups == c.cout) {
        return Err(Error::Cuda(format!("conv {}: only dense and depthwise convolutions have kernels", c.name)));
    }
    let k = c.kernel;
    let cin_g = c.cin / c.groups;
    let mut out = vec![0.0f32; c.weight.len()];
    for co in 0..c.cout {
        for ci in 0..cin_g {
            for ky in 0..k {
                for kx in 0..k {
                    let src = c.weight[((co * cin_g + ci) * k + ky) * k + kx];
                    if c.groups == 1 {
                        out[((ky * k + kx) * cin_g + ci) * c.cout + co] = src;
                    } else {
                        out[(ky * k + kx) * c.cout + co] = src;
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The kernel of the family that runs `c`, and its launch shape for an n×oh×ow output.
pub fn choose(c: &Conv, n: usize, oh: usize, ow: usize) -> (&'static str, LaunchDims) {
    if c.groups != 1 {
        return ("conv_depthwise", LaunchDims::linear(n * oh * ow * c.cout, 256));
    }
    let name = match c.kernel {
        1 => "conv1x1",
        3 => "conv3x3",
        _ => "conv_kxk",
    };
    // 64×64 output tiles (pixels × channels), 256 threads (kernels/conv.cu CONV_BM, CONV_BN).
    (name, LaunchDims { grid: [(n * oh * ow).div_ceil(64) as u32, c.cout.div_ceil(64) as u32, 1], block: [256, 1, 1] })
}

/// Launches `c` on `a`.
pub fn launch(r: &mut dyn KernelRunner, c: &Conv, a: &ConvArgs) -> Result<()> {
    let (act, slope) = act_code(c.act);
    let p = ConvParams {
        x: a.x,
        wt: a.wt,
        bias: a.bias,
        residual: a.residual,
        y: a.y,
        n: dim(a.n, "batch")?,
        h: dim(a.h, "height")?,
        w: dim(a.w, "width")?,
        cin: dim(c.cin, "channels")?,
        oh: dim(a.oh, "height")?,
        ow: dim(a.ow, "width")?,
        cout: dim(c.cout, "channels")?,
        k: dim(c.kernel, "kernel")?,
        stride: dim(c.stride, "stride")?,
        pad: dim(c.pad, "pad")?,
        out_ctot: dim(a.out_ctot, "channels")?,
        out_coff: dim(c.out_channel_offset, "channel offset")?,
        act,
        slope,
    };
    dim(a.n * a.oh * a.ow * a.out_ctot, "output elements")?;
    let (name, dims) = choose(c, a.n, a.oh, a.ow);
    r.launch(name, dims, &p)
}
