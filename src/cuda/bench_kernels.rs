//! `retinaface bench-kernels`: every convolution shape of a network at one input size and batch, with
//! every f16 variant that can run it (kernels/conv_f16.cu; the depthwise kernel for depthwise convs).
//! Each row is first validated against the CPU reference (inputs, weights and residual rounded to f16,
//! bound as in tests/conv_f16_sim.rs: ½ f16 ulp + 1e-5 of the output's scale), then:
//! - on a GPU: timed over `iters` launches with CUDA events on the runner's stream, with TFLOPS, GB/s
//!   (compulsory traffic: x, w, y once) and the percentage of the roofline;
//! - in the simulation: the launch's shared-memory bank conflicts and global sectors per request.
//!
//! In both, the SASS metrics of the kernel (registers, occupancy, main-loop instructions per HMMA's
//! worth of multiply-adds: 2048 per warp, `sass::KernelSass::mma_loop`) when
//! NVRTC and nvdisasm are present, and which variant the tuner keeps (timed on a GPU, heuristic
//! otherwise). Like llm.c's dev/cuda: one file per kernel family holds the variants; this is the
//! harness that validates and times them.

use super::ops::conv_f16::{self, ConvShape, SimCounters, VARIANTS, Variant};
use super::params::{ConvF16Params, act_code};
use super::runner::{DevBuf, KernelRunner};
use super::tune::{self, DeviceKey, TuneCache, TuneMode};
use super::{nchw_to_nhwc, nvrtc, sass};
use crate::cpu::conv;
use crate::error::{Error, Result};
use crate::model::graph::{Conv, Op};
use crate::network::Network;
use crate::reference::out_size;
use std::collections::HashMap;

/// One distinct convolution shape of a network.
#[derive(Clone, Debug)]
pub struct Layer {
    /// The first conv of the network with this shape, and how many share it.
    pub name: String,
    pub count: usize,
    pub conv: Conv,
    pub n: usize,
    pub h: usize,
    pub w: usize,
}

impl Layer {
    pub fn depthwise(&self) -> bool {
        self.conv.groups != 1
    }
    pub fn shape(&self) -> ConvShape {
        ConvShape {
            n: self.n,
            h: self.h,
            w: self.w,
            cin: conv_f16::pad8(self.conv.cin),
            cout: conv_f16::pad8(self.conv.cout),
            k: self.conv.kernel,
            stride: self.conv.stride,
            pad: self.conv.pad,
        }
    }
    pub fn describe(&self) -> String {
        let c = &self.conv;
        format!(
            "{}x{}x{} {}->{} {}x{}/{}{}",
            self.n,
            self.h,
            self.w,
            c.cin,
            c.cout,
            c.kernel,
            c.kernel,
            c.stride,
            if self.depthwise() { " dw" } else { "" }
        )
    }
}

/// The distinct conv shapes of `network` at a `w`×`h` input and `batch` (synthetic weights).
pub fn layers(network: Network, w: usize, h: usize, batch: usize) -> Result<Vec<Layer>> {
    let g = crate::model::build(network, &mut crate::weights::synthetic::SyntheticSource { seed: 1 })?;
    let mut out: Vec<Layer> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for op in &g.ops {
        let Op::Conv(c) = op else { continue };
        let t = &g.tensors[c.input];
        let layer = Layer { name: c.name.clone(), count: 1, conv: c.clone(), n: batch, h: t.height(h), w: t.width(w) };
        let key = layer.describe();
        if let Some(&i) = seen.get(&key) {
            out[i].count += 1;
        } else {
            seen.insert(key, out.len());
            out.push(layer);
        }
    }
    Ok(out)
}

/// (registers, occupancy, main-loop instructions per 2048 multiply-adds per warp) of a kernel.
pub type SassMetrics = (u32, f64, Option<f64>);

/// One row of the table.
#[derive(Clone, Debug, Default)]
pub struct Row {
    pub layer: String,
    pub shape: String,
    pub variant: String,
    /// Worst error over the bound (≤ 1 passes).
    pub err_ratio: f64,
    pub sim: Option<SimCounters>,
    /// Microseconds per launch, on a GPU.
    pub micros: Option<f64>,
    pub flops: f64,
    pub bytes: f64,
    pub sass: Option<SassMetrics>,
    pub kept: bool,
}

fn rng_vec(seed: &mut u64, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed ^= *seed >> 12;
            *seed ^= *seed << 25;
            *seed ^= *seed >> 27;
            let u = (seed.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32;
            half::f16::from_f32((u * 2.0 - 1.0) * scale).to_f32()
        })
        .collect()
}

fn half_ulp16(v: f64) -> f64 {
    let a = v.abs();
    if a < 2f64.powi(-14) { 2f64.powi(-25) } else { 2f64.powi(a.log2().floor() as i32 - 11) }
}

/// A layer's data on the device and its reference output (NHWC).
struct Prepared {
    bufs: Vec<DevBuf>,
    params: ConvF16Params,
    want: Vec<f32>,
    y: DevBuf,
    pixels: usize,
    cout: usize,
    coutp: usize,
}

fn upload<T: bytemuck::Pod>(r: &mut dyn KernelRunner, v: &[T]) -> Result<DevBuf> {
    let bytes: &[u8] = bytemuck::cast_slice(v);
    let b = r.alloc(bytes.len().max(4))?;
    r.upload(b, 0, bytes)?;
    Ok(b)
}

fn prepare(r: &mut dyn KernelRunner, l: &Layer) -> Result<Prepared> {
    let mut seed = 0x5eed_u64 ^ (l.h * 131 + l.conv.cout) as u64;
    let mut c = l.conv.clone();
    // The reference sees exactly the f16 weights the kernel sees.
    c.weight = c.weight.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
    c.out_channel_offset = 0;
    let (n, h, w) = (l.n, l.h, l.w);
    let (oh, ow) = (out_size(h, c.kernel, c.stride, c.pad), out_size(w, c.kernel, c.stride, c.pad));
    let x = rng_vec(&mut seed, n * c.cin * h * w, 1.0);
    let mut want = vec![0.0f32; n * c.cout * oh * ow];
    conv::conv2d(&c, &x, n, h, w, &mut want, c.cout, None);
    let want = nchw_to_nhwc(&want, n, c.cout, oh, ow);
    let (cinp, coutp) = (conv_f16::pad8(c.cin), conv_f16::pad8(c.cout));
    let (wt, bias) = if l.depthwise() { conv_f16::pack_depthwise(&c)? } else { conv_f16::pack_weights(&c)? };
    let xb = upload(r, &conv_f16::nchw_to_nhwc_f16(&x, n, c.cin, h, w, cinp))?;
    let wb = upload(r, &wt)?;
    let bb = upload(r, &bias)?;
    let y = r.alloc(n * oh * ow * coutp * 2)?;
    let (act, slope) = act_code(c.act);
    let params = ConvF16Params {
        x: xb.ptr,
        wt: wb.ptr,
        bias: bb.ptr,
        y: y.ptr,
        n: n as i32,
        h: h as i32,
        w: w as i32,
        cin: cinp as i32,
        oh: oh as i32,
        ow: ow as i32,
        cout: coutp as i32,
        k: c.kernel as i32,
        stride: c.stride as i32,
        pad: c.pad as i32,
        out_ctot: coutp as i32,
        act,
        slope,
        ..Default::default()
    };
    Ok(Prepared { bufs: vec![xb, wb, bb, y], params, want, y, pixels: n * oh * ow, cout: c.cout, coutp })
}

fn launch(r: &mut dyn KernelRunner, l: &Layer, p: &Prepared, v: Option<&Variant>, ws: Option<DevBuf>) -> Result<()> {
    match v {
        Some(v) => conv_f16::launch(r, v, &l.name, &p.params, ws),
        None => conv_f16::launch_depthwise(r, &l.name, &p.params),
    }
}

fn check(r: &mut dyn KernelRunner, p: &Prepared) -> Result<f64> {
    let mut raw = vec![0u16; p.pixels * p.coutp];
    r.download(p.y, 0, bytemuck::cast_slice_mut(&mut raw))?;
    let mag = p.want.iter().fold(1.0f32, |m, v| m.max(v.abs())) as f64;
    let mut worst = 0.0f64;
    for px in 0..p.pixels {
        for ch in 0..p.cout {
            let got = half::f16::from_bits(raw[px * p.coutp + ch]).to_f32() as f64;
            let want = p.want[px * p.cout + ch] as f64;
            let e = (got - want).abs() / (half_ulp16(want) + 1e-5 * mag);
            worst = worst.max(if e.is_nan() { f64::INFINITY } else { e });
        }
    }
    Ok(worst)
}

/// SASS metrics per kernel for `arch`, when NVRTC and nvdisasm are present.
pub fn sass_metrics(arch: &str) -> Option<HashMap<String, SassMetrics>> {
    nvrtc::available().ok()?;
    sass::nvdisasm().ok()?;
    let c = nvrtc::compile_cached("conv_f16", arch).ok()?;
    let funcs = sass::disassemble(&c.cubin).ok()?;
    let mut m = HashMap::new();
    for f in funcs {
        let Some(res) = c.resources.iter().find(|r| r.kernel == f.name) else { continue };
        let threads = VARIANTS.iter().find(|v| v.kernel == f.name).map_or(256, |v| v.threads);
        let shared = res.shared_bytes + conv_f16::dynamic_shared_bytes(&f.name);
        let occ = sass::occupancy(arch, res.registers, threads, shared);
        let per_mma = f.mma_loop().map(|(len, work)| len as f64 / work);
        m.insert(f.name.clone(), (res.registers, occ, per_mma));
    }
    Some(m)
}

/// Runs the benchmark on `r`. `dev`: the GPU (None in the simulation); `iters` timed launches per row
/// on a GPU.
pub fn run(
    r: &mut dyn KernelRunner,
    dev: Option<&DeviceKey>,
    layers: &[Layer],
    iters: usize,
    tune_mode: TuneMode,
    cache: &mut TuneCache,
) -> Result<Vec<Row>> {
    let arch = dev.map_or("sm_90a".to_string(), |d| nvrtc::arch_for(d.compute_capability.0, d.compute_capability.1));
    let sm = dev.map_or(90, |d| d.compute_capability.0 * 10 + d.compute_capability.1);
    let sassm = sass_metrics(&arch);
    let mut rows = Vec::new();
    for l in layers {
        let p = prepare(r, l)?;
        let shape = l.shape();
        let variants: Vec<Option<&'static Variant>> = if l.depthwise() {
            vec![None]
        } else {
            VARIANTS.iter().filter(|v| tune::supported(v, &shape, sm)).map(Some).collect()
        };
        let mut layer_rows = Vec::new();
        for v in variants {
            let need = v.map_or(0, |v| shape.workspace_bytes(v));
            let ws = if need > 0 { Some(r.alloc(need)?) } else { None };
            r.memset(p.y, 0xff)?;
            launch(r, l, &p, v, ws)?;
            r.synchronize()?;
            // A split-K launch ends with the reduce kernel, whose counters are not the GEMM's: none shown.
            #[cfg(feature = "cuda-sim")]
            let sim = (r.is_simulation() && v.is_none_or(|v| v.split_k == 1)).then(conv_f16::last_sim_counters);
            #[cfg(not(feature = "cuda-sim"))]
            let sim = None;
            let err_ratio = check(r, &p)?;
            let mut micros = None;
            if dev.is_some() && err_ratio <= 1.0 {
                let t = super::runner::time_with_events(r, iters, |r| launch(r, l, &p, v, ws))?;
                micros = Some(t.as_secs_f64() * 1e6);
            }
            if let Some(b) = ws {
                r.free(b)?;
            }
            let kernel = v.map_or(conv_f16::DEPTHWISE_KERNEL, |v| v.kernel);
            let flops =
                if l.depthwise() { 2.0 * (p.pixels * shape.cout * shape.k * shape.k) as f64 } else { shape.flops() };
            let bytes = 2.0
                * (l.n * l.h * l.w * shape.cin
                    + p.pixels * shape.cout
                    + if l.depthwise() { shape.k * shape.k * shape.cout } else { shape.k_dim() * shape.cout })
                    as f64;
            layer_rows.push(Row {
                layer: if l.count > 1 { format!("{} (x{})", l.name, l.count) } else { l.name.clone() },
                shape: l.describe(),
                variant: v.map_or(kernel.to_string(), |v| v.name.to_string()),
                err_ratio,
                sim,
                micros,
                flops,
                bytes,
                sass: sassm.as_ref().and_then(|m| m.get(kernel).copied()),
                kept: l.depthwise(),
            });
        }
        if !l.depthwise() {
            let timed: HashMap<String, Option<f64>> = layer_rows
                .iter()
                .map(|row| (row.variant.clone(), row.micros.filter(|_| row.err_ratio <= 1.0)))
                .collect();
            let (kept, _) =
                tune::choose(tune_mode, dev, &shape, "f16", cache, |v| Ok(timed.get(v.name).copied().flatten()))?;
            for row in &mut layer_rows {
                row.kept = row.variant == kept.name;
            }
        }
        rows.extend(layer_rows);
        for b in p.bufs {
            r.free(b)?;
        }
    }
    Ok(rows)
}

pub use super::tune::device_key;

/// Peak f16 tensor (mma.sync, dense) FLOP/s and DRAM bytes/s of a device, for the roofline; None when
/// the device is not in the table.
pub fn device_peaks(name: &str) -> Option<(f64, f64)> {
    let n = name.to_ascii_lowercase();
    if n.contains("h200") {
        Some((989e12, 4.8e12))
    } else if n.contains("h100") {
        Some((989e12, 3.35e12))
    } else if n.contains("a100") {
        Some((312e12, 2.0e12))
    } else {
        None
    }
}

/// The table as text.
pub fn format(rows: &[Row], device: Option<&str>) -> String {
    use std::fmt::Write as _;
    let peaks = device.and_then(device_peaks);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<34} {:<24} {:<20} {:>6} {:>9} {:>9} {:>8} {:>8} {:>6} {:>5} {:>5} {:>8} {:>4}",
        "layer",
        "shape",
        "variant",
        "check",
        "us",
        "TFLOPS",
        "GB/s",
        "roof%",
        "confl",
        "sect",
        "regs",
        "loop/mma",
        "keep"
    );
    for r in rows {
        let check = if r.err_ratio <= 1.0 { "ok" } else { "FAIL" };
        let (us, tf, gbs, roof) = match r.micros {
            Some(us) => {
                let tf = r.flops / us / 1e6;
                let gbs = r.bytes / us / 1e3;
                let roof = peaks.map(|(pf, bw)| {
                    let bound = pf.min(bw * r.flops / r.bytes);
                    format!("{:.0}", 100.0 * r.flops / (us * 1e-6) / bound)
                });
                (format!("{us:.1}"), format!("{tf:.1}"), format!("{gbs:.0}"), roof.unwrap_or_else(|| "-".into()))
            }
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        let (confl, sect) = match r.sim {
            Some(c) => (c.bank_conflicts().to_string(), format!("{:.1}", c.sectors_per_request())),
            None => ("-".into(), "-".into()),
        };
        let (regs, per_mma) = match r.sass {
            Some((regs, _, pm)) => (regs.to_string(), pm.map_or("-".into(), |v| format!("{v:.2}"))),
            None => ("-".into(), "-".into()),
        };
        let _ = writeln!(
            s,
            "{:<34} {:<24} {:<20} {:>6} {:>9} {:>9} {:>8} {:>8} {:>6} {:>5} {:>5} {:>8} {:>4}",
            truncate(&r.layer, 34),
            r.shape,
            r.variant,
            check,
            us,
            tf,
            gbs,
            roof,
            confl,
            sect,
            regs,
            per_mma,
            if r.kept { "*" } else { "" }
        );
    }
    s
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n { s.to_string() } else { s.chars().skip(s.chars().count() - n).collect() }
}

/// Fails when any row failed validation, naming them.
pub fn check_rows(rows: &[Row]) -> Result<()> {
    let bad: Vec<String> =
        rows.iter().filter(|r| r.err_ratio > 1.0).map(|r| format!("{} {} {}", r.layer, r.shape, r.variant)).collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(Error::Cuda(format!("f16 conv variants failed validation against the CPU reference: {}", bad.join("; "))))
    }
}
