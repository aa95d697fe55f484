//! The f16 tensor-core convolutions (kernels/conv_f16.cu): the variant registry, the deterministic
//! choice of a variant per shape, parameter checks, f16 packing of weights and activations, and the
//! launch. One entry per kernel of the family: the mma.sync tiles run on sm_80 and later, the wgmma
//! tiles (`conv_f16_wg*`) on sm_90 only (Hopper's arch-specific sm_90a instructions).
//!
//! Every variant computes the same convolution; they differ only in the tile (and so in how many
//! blocks a shape gets, and how much of a tile is wasted on narrow outputs). With a GPU the tuner times
//! the supported variants per shape; without one [`heuristic`] picks.

use crate::cuda::params::ConvF16Params;
use crate::cuda::runner::{DevBuf, KernelRunner, KernelRunnerExt, LaunchDims};
use crate::error::{Error, Result};
use crate::graph::Conv;

/// One way to run a groups-1 convolution: a kernel of the family and how K is split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    /// The variant's name in tables and the tuning cache.
    pub name: &'static str,
    /// The kernel's name in kernels/conv_f16.cu.
    pub kernel: &'static str,
    /// Output pixels (GEMM M) per block.
    pub bm: usize,
    /// Output channels (GEMM N) per block.
    pub bn: usize,
    pub threads: u32,
    /// The oldest architecture the kernel runs on (mma.sync and cp.async need sm_80).
    pub min_sm: u32,
    /// The newest: wgmma is sm_90a's alone (Blackwell has other tensor-core instructions).
    pub max_sm: u32,
    /// Depth of the shared-memory ring of 32-deep k-tiles.
    pub stages: usize,
    /// K split over this many blocks (1: none), partial sums reduced by conv_f16_splitk_reduce.
    pub split_k: usize,
}

impl Variant {
    /// Whether this is a warpgroup (wgmma) tile: warpgroups of 64 pixel rows each.
    pub fn is_wgmma(&self) -> bool {
        self.max_sm == 90
    }

    /// Shared memory: the ring's stages of A (bm × 32) and B (bn × 32) f16 tiles (static in the
    /// mma.sync tiles, dynamic in the Hopper ones: [`dynamic_shared_bytes`]).
    pub fn shared_bytes(&self) -> usize {
        self.stages * (self.bm + self.bn) * 32 * 2
    }
}

const fn tile(name: &'static str, bm: usize, bn: usize, threads: u32, split_k: usize) -> Variant {
    Variant { name, kernel: name, bm, bn, threads, min_sm: 80, max_sm: u32::MAX, stages: 3, split_k }
}

/// A Hopper tile: bm pixels (a warpgroup per 64) × bn channels on wgmma.m64n{bn}k16, a ring of
/// `stages` (one k-tile's wgmmas left running while the next issue, `stages` − 2 k-tiles loading).
const fn wg_tile(name: &'static str, bm: usize, bn: usize, stages: usize) -> Variant {
    Variant { min_sm: 90, max_sm: 90, stages, ..tile(name, bm, bn, 2 * bm as u32, 1) }
}

/// Every way to run an f16 groups-1 convolution, widest tile first.
pub const VARIANTS: &[Variant] = &[
    tile("conv_f16_128x128", 128, 128, 256, 1),
    tile("conv_f16_128x64", 128, 64, 128, 1),
    tile("conv_f16_64x64", 64, 64, 128, 1),
    tile("conv_f16_128x32", 128, 32, 128, 1),
    tile("conv_f16_128x16", 128, 16, 128, 1),
    tile("conv_f16_128x8", 128, 8, 128, 1),
    Variant { name: "conv_f16_64x64_sk4", ..tile("conv_f16_64x64", 64, 64, 128, 4) },
    Variant { name: "conv_f16_64x64_sk8", ..tile("conv_f16_64x64", 64, 64, 128, 8) },
    wg_tile("conv_f16_wg128x256", 128, 256, 4),
    wg_tile("conv_f16_wg128x128", 128, 128, 4),
    wg_tile("conv_f16_wg128x64", 128, 64, 4),
    wg_tile("conv_f16_wg64x128", 64, 128, 4),
];

/// The f16 depthwise kernel (its own family member; no variants).
pub const DEPTHWISE_KERNEL: &str = "conv_dw_f16";
pub const SPLITK_REDUCE: &str = "conv_f16_splitk_reduce";

/// Dynamic shared memory `kernel` needs at launch: the Hopper tiles' rings (up to 96 KiB, over the
/// 48 KiB a kernel may declare statically) plus 1 KiB in which the kernel aligns the ring to 1024 bytes,
/// for every flavour (plain, dwpw, ex); 0 for any other kernel. The kernels check what they got and
/// trap on less.
pub fn dynamic_shared_bytes(kernel: &str) -> u32 {
    let Some(tile) = kernel.find("_wg").map(|i| &kernel[i + 1..]) else { return 0 };
    VARIANTS
        .iter()
        .find(|v| v.is_wgmma() && v.kernel.ends_with(tile) && v.kernel.len() - tile.len() == "conv_f16_".len())
        .map_or(0, |v| v.shared_bytes() as u32 + 1024)
}

pub fn variant(name: &str) -> Option<&'static Variant> {
    VARIANTS.iter().find(|v| v.name == name)
}

/// A groups-1 convolution as the f16 kernels see it (channel counts already padded to multiples of 8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvShape {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ConvShape {
    pub fn out_hw(&self) -> (usize, usize) {
        let o = |s: usize| (s + 2 * self.pad).saturating_sub(self.k) / self.stride + 1;
        (o(self.h), o(self.w))
    }
    /// GEMM M: output pixels over the batch.
    pub fn m(&self) -> usize {
        let (oh, ow) = self.out_hw();
        self.n * oh * ow
    }
    /// GEMM K: k·k·cin.
    pub fn k_dim(&self) -> usize {
        self.k * self.k * self.cin
    }
    pub fn flops(&self) -> f64 {
        2.0 * self.m() as f64 * self.cout as f64 * self.k_dim() as f64
    }
    /// k-tiles of 32 along K.
    pub fn k_tiles(&self) -> usize {
        self.k_dim().div_ceil(32)
    }
    /// (splits, k-tiles per split) a variant uses here: no split is left empty.
    pub fn splits(&self, v: &Variant) -> (usize, usize) {
        let kt = self.k_tiles().max(1);
        let per = kt.div_ceil(v.split_k.clamp(1, kt));
        (kt.div_ceil(per), per)
    }
    /// Blocks a variant launches for this shape (the GEMM kernel; split-K's reduce not counted).
    pub fn blocks(&self, v: &Variant) -> usize {
        self.m().div_ceil(v.bm) * self.cout.div_ceil(v.bn) * self.splits(v).0
    }
    /// f32 workspace bytes a variant needs (0 without split-K).
    pub fn workspace_bytes(&self, v: &Variant) -> usize {
        let (splits, _) = self.splits(v);
        if v.split_k > 1 { splits * self.m() * self.cout * 4 } else { 0 }
    }
    /// The fraction of a variant's computed tile that is real output (edge tiles compute padding).
    pub fn tile_efficiency(&self, v: &Variant) -> f64 {
        (self.m() * self.cout) as f64 / (self.m().div_ceil(v.bm) * v.bm * self.cout.div_ceil(v.bn) * v.bn) as f64
    }
}

/// Streaming multiprocessors assumed by the heuristic when no device says otherwise (H100/H200: 132).
pub const DEFAULT_SMS: usize = 132;

/// The deterministic choice without timing: the narrowest tile that covers cout when cout ≤ 32 (a
/// 64-wide tile on 8 channels computes 8× the output); otherwise the widest tile that still gives every
/// SM at least one block, as wide tiles reuse each loaded element most; when even 64×64 tiles leave
/// over half the SMs idle and K is deep (≥ 32 k-tiles), split K 4 or 8 ways.
pub fn heuristic(s: &ConvShape, sms: usize) -> &'static Variant {
    let by_name = |k: &str| variant(k).unwrap_or(&VARIANTS[0]);
    if s.cout <= 8 {
        return by_name("conv_f16_128x8");
    }
    if s.cout <= 16 {
        return by_name("conv_f16_128x16");
    }
    if s.cout <= 32 {
        return by_name("conv_f16_128x32");
    }
    for k in ["conv_f16_128x128", "conv_f16_128x64"] {
        let v = by_name(k);
        if s.blocks(v) >= sms && s.tile_efficiency(v) >= 0.75 {
            return v;
        }
    }
    let small = by_name("conv_f16_64x64");
    let b = s.blocks(small);
    if 2 * b <= sms && s.k_tiles() >= 32 {
        return by_name(if 8 * b <= sms { "conv_f16_64x64_sk8" } else { "conv_f16_64x64_sk4" });
    }
    small
}

/// Checks what the kernels assume of a shape, naming the conv in the error.
pub fn check(name: &str, p: &ConvF16Params) -> Result<()> {
    let bad = |msg: String| Err(Error::InvalidArgument(format!("f16 conv {name}: {msg}")));
    if p.cin <= 0 || p.cin % 8 != 0 {
        return bad(format!("input channels {} not a positive multiple of 8 (pad them)", p.cin));
    }
    if p.cout <= 0 || p.cout % 8 != 0 || p.out_ctot % 8 != 0 || p.out_coff % 8 != 0 {
        return bad(format!(
            "output channels {} / total {} / offset {} must be multiples of 8",
            p.cout, p.out_ctot, p.out_coff
        ));
    }
    if p.out_coff + p.cout > p.out_ctot {
        return bad(format!("channels {}..{} exceed the output's {}", p.out_coff, p.out_coff + p.cout, p.out_ctot));
    }
    if p.k <= 0 || p.stride <= 0 || p.pad < 0 || p.oh <= 0 || p.ow <= 0 || p.n <= 0 {
        return bad(format!("kernel {} stride {} pad {} output {}x{}", p.k, p.stride, p.pad, p.oh, p.ow));
    }
    // The kernels index with 32-bit ints.
    let fits = |v: i64| v < i32::MAX as i64;
    let (n, h, w, oh, ow) = (p.n as i64, p.h as i64, p.w as i64, p.oh as i64, p.ow as i64);
    if !fits(n * h * w * p.cin as i64)
        || !fits(n * oh * ow * p.out_ctot as i64)
        || !fits(p.cout as i64 * (p.k * p.k * p.cin) as i64)
    {
        return bad("a tensor of 2^31 elements or more (the kernels index with 32-bit ints)".into());
    }
    Ok(())
}

impl ConvF16Params {
    /// The shape the GEMM kernels see.
    pub fn shape(&self) -> ConvShape {
        let u = |v: i32| v.max(0) as usize;
        ConvShape {
            n: u(self.n),
            h: u(self.h),
            w: u(self.w),
            cin: u(self.cin),
            cout: u(self.cout),
            k: u(self.k),
            stride: u(self.stride),
            pad: u(self.pad),
        }
    }
}

/// Launches `v` on `p` after [`check`]. Split-K variants need `ws` of at least
/// [`ConvShape::workspace_bytes`]; `p.ws`, `p.splits` and `p.kt_per_split` are set here.
pub fn launch(
    r: &mut (impl KernelRunner + ?Sized),
    v: &Variant,
    name: &str,
    p: &ConvF16Params,
    ws: Option<DevBuf>,
) -> Result<()> {
    check(name, p)?;
    let shape = p.shape();
    if (p.oh as usize, p.ow as usize) != shape.out_hw() {
        return Err(Error::InvalidArgument(format!(
            "f16 conv {name}: output {}x{} but the shape gives {:?}",
            p.oh,
            p.ow,
            shape.out_hw()
        )));
    }
    let m = shape.m();
    let mut p = *p;
    let (splits, per) = shape.splits(v);
    p.ws = 0;
    p.splits = 1;
    p.kt_per_split = per as i32;
    if v.split_k > 1 {
        let need = shape.workspace_bytes(v);
        let ws = ws.filter(|b| b.bytes >= need).ok_or_else(|| {
            Error::InvalidArgument(format!("f16 conv {name}: {} needs a workspace of {need} bytes", v.name))
        })?;
        p.ws = ws.ptr;
        p.splits = splits as i32;
    }
    let dims = LaunchDims {
        grid: [m.div_ceil(v.bm) as u32, (p.cout as usize).div_ceil(v.bn) as u32, p.splits as u32],
        block: [v.threads, 1, 1],
    };
    if dims.grid[1] > 65535 {
        return Err(Error::InvalidArgument(format!("f16 conv {name}: {} output channels is too many", p.cout)));
    }
    r.launch(v.kernel, dims, &p)?;
    if v.split_k > 1 {
        r.launch(SPLITK_REDUCE, LaunchDims::linear(m * p.cout as usize / 2, 256), &p)?;
    }
    Ok(())
}

/// Launches the f16 depthwise kernel (groups = cin = cout, weights [k][k][c] f16).
pub fn launch_depthwise(r: &mut (impl KernelRunner + ?Sized), name: &str, p: &ConvF16Params) -> Result<()> {
    check(name, p)?;
    if p.cin != p.cout {
        return Err(Error::InvalidArgument(format!(
            "f16 depthwise {name}: {} input and {} output channels (must be equal)",
            p.cin, p.cout
        )));
    }
    let m = p.n as usize * p.oh as usize * p.ow as usize;
    let p = ConvF16Params { ws: 0, splits: 1, kt_per_split: 0, ..*p };
    r.launch(DEPTHWISE_KERNEL, LaunchDims::linear(m * p.cout as usize / 8, 256), &p)
}

/// A depthwise conv's OIHW ([c, 1, k, k]) f32 weights as [k][k][c_pad] f16, and its bias padded to c_pad.
pub fn pack_depthwise(c: &Conv) -> Result<(Vec<u16>, Vec<f32>)> {
    let k = c.kernel;
    if c.groups != c.cin || c.cin != c.cout || c.weight.len() != c.cout * k * k || c.bias.len() != c.cout {
        return Err(Error::InvalidArgument(format!(
            "f16 depthwise {}: groups {}, {} -> {} channels, {} weights, {} biases",
            c.name,
            c.groups,
            c.cin,
            c.cout,
            c.weight.len(),
            c.bias.len()
        )));
    }
    let cp = pad8(c.cout);
    let mut w = vec![0u16; k * k * cp];
    for ch in 0..c.cout {
        for t in 0..k * k {
            w[t * cp + ch] = half::f16::from_f32(c.weight[ch * k * k + t]).to_bits();
        }
    }
    let mut b = c.bias.clone();
    b.resize(cp, 0.0);
    Ok((w, b))
}

/// f32 → f16 bits, round to nearest even.
pub fn f16_bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect()
}

pub fn f32_from_f16_bits(v: &[u16]) -> Vec<f32> {
    v.iter().map(|&b| half::f16::from_bits(b).to_f32()).collect()
}

/// `c` rounded up to a multiple of 8: the f16 path's channel padding.
pub fn pad8(c: usize) -> usize {
    c.div_ceil(8) * 8
}

/// A groups-1 conv's OIHW f32 weights as the kernels' [cout_pad][k][k][cin_pad] f16 (padding zero),
/// and its bias padded with zeros to cout_pad.
pub fn pack_weights(c: &Conv) -> Result<(Vec<u16>, Vec<f32>)> {
    if c.groups != 1 {
        return Err(Error::InvalidArgument(format!(
            "f16 conv {}: groups {} (the GEMM kernels need 1)",
            c.name, c.groups
        )));
    }
    let k = c.kernel;
    if c.weight.len() != c.cout * c.cin * k * k || c.bias.len() != c.cout {
        return Err(Error::InvalidArgument(format!(
            "f16 conv {}: weight of {} / bias of {} values for [{}, {}, {k}, {k}]",
            c.name,
            c.weight.len(),
            c.bias.len(),
            c.cout,
            c.cin
        )));
    }
    let (cinp, coutp) = (pad8(c.cin), pad8(c.cout));
    let mut w = vec![0u16; coutp * k * k * cinp];
    for co in 0..c.cout {
        for ci in 0..c.cin {
            for ky in 0..k {
                for kx in 0..k {
                    let v = c.weight[((co * c.cin + ci) * k + ky) * k + kx];
                    w[((co * k + ky) * k + kx) * cinp + ci] = half::f16::from_f32(v).to_bits();
                }
            }
        }
    }
    let mut b = c.bias.clone();
    b.resize(coutp, 0.0);
    Ok((w, b))
}

/// NCHW f32 → NHWC f16 with channels padded (zeros) to `cpad`.
pub fn nchw_to_nhwc_f16(x: &[f32], n: usize, c: usize, h: usize, w: usize, cpad: usize) -> Vec<u16> {
    let mut out = vec![0u16; n * h * w * cpad];
    for b in 0..n {
        for ch in 0..c {
            for y in 0..h {
                for xx in 0..w {
                    out[((b * h + y) * w + xx) * cpad + ch] =
                        half::f16::from_f32(x[((b * c + ch) * h + y) * w + xx]).to_bits();
                }
            }
        }
    }
    out
}

/// What the simulation counted over one launch (see kernels/sim/cuda_sim.cpp).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimCounters {
    /// Warp instructions that touched shared memory through cp.async or ldmatrix.
    pub shared_requests: u64,
    /// Wavefronts they took; equal to `shared_ideal` when conflict-free.
    pub shared_wavefronts: u64,
    pub shared_ideal: u64,
    /// Warp requests of global memory through cp.async (zero-filled lanes read nothing).
    pub global_requests: u64,
    pub global_sectors: u64,
    /// Distinct bytes the lanes asked for.
    pub global_bytes: u64,
}

impl SimCounters {
    /// Shared-memory bank conflicts: wavefronts beyond one per 128-byte phase.
    pub fn bank_conflicts(&self) -> u64 {
        self.shared_wavefronts - self.shared_ideal
    }
    pub fn sectors_per_request(&self) -> f64 {
        self.global_sectors as f64 / self.global_requests.max(1) as f64
    }
    /// Bytes asked for over bytes moved in 32-byte sectors (1.0 = every sector fully used).
    pub fn sector_efficiency(&self) -> f64 {
        self.global_bytes as f64 / (32 * self.global_sectors).max(1) as f64
    }
}

#[cfg(feature = "cuda-sim")]
mod sim_ffi {
    unsafe extern "C" {
        pub fn cudasim_counters(out: *mut u64);
        pub fn cudasim_set_order_seed(seed: u64);
    }
}

/// The counters of the calling thread's last simulated launch.
#[cfg(feature = "cuda-sim")]
pub fn last_sim_counters() -> SimCounters {
    let mut c = [0u64; 6];
    // SAFETY: writes exactly 6 values.
    unsafe { sim_ffi::cudasim_counters(c.as_mut_ptr()) };
    SimCounters {
        shared_requests: c[0],
        shared_wavefronts: c[1],
        shared_ideal: c[2],
        global_requests: c[3],
        global_sectors: c[4],
        global_bytes: c[5],
    }
}

/// The simulation's thread-order seed for the calling thread's launches: 0 runs threads in index order
/// between barriers, anything else in a random order derived from it.
#[cfg(feature = "cuda-sim")]
pub fn set_sim_order_seed(seed: u64) {
    // SAFETY: sets a thread-local value.
    unsafe { sim_ffi::cudasim_set_order_seed(seed) };
}
