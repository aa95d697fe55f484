//! The f16 forward pass of [`GpuEngine`] (`Precision::F16`): NHWC f16 activations with channels padded
//! to multiples of 8 (the plan's [`Layout::F16`]: the same planner, stored channels padded), f16
//! weights packed once, f32 accumulation on the tensor cores (kernels/conv_f16.cu), the f32 path's
//! fused epilogue (bias, residual, activation, output channel offset), and heads that read f16 and
//! write the f32 raw outputs, so post-processing is the f32 path's.
//!
//! Padded channels are zeros everywhere: preprocessing writes them, packed weights and biases are zero
//! there, so every conv writes act(0) = 0 into its padded outputs, and pool / upsample keep zeros.
//! Each groups-1 conv runs the variant `tune::choose` keeps for its shape (the heuristic in the
//! simulation; timed on a GPU), chosen when a plan is made and kept with its buffers, as is the
//! split-K workspace the chosen variants need.

use super::*;
use crate::cuda::ops::conv_f16::{self, Variant, pad8};
use crate::cuda::params::{ConvF16Params, act_code};
use crate::cuda::tune::{self, DeviceKey, TuneCache, TuneMode};
use crate::graph::Conv;
use crate::graph::Layout;

/// The f16 state of one plan: each op's conv variant (None: not a groups-1 conv) and the split-K
/// workspace they share.
pub(super) struct F16Bufs {
    pub(super) ws: Option<DevBuf>,
    pub(super) variants: Vec<Option<&'static Variant>>,
}

/// How conv variants are chosen: the mode, the device whose timings count (None: the heuristic) and
/// the cache of choices.
pub(super) struct Tuning {
    pub(super) mode: TuneMode,
    pub(super) dev: Option<DeviceKey>,
    pub(super) cache: TuneCache,
}

impl Tuning {
    /// The heuristic only (the simulation, or no device to time on).
    pub(super) fn heuristic() -> Tuning {
        Tuning { mode: TuneMode::Off, dev: None, cache: TuneCache::default() }
    }
}

/// The name of an op's variant, for errors (the Debug text up to the first field).
fn op_name(op: &Op) -> String {
    let s = format!("{op:?}");
    s.split([' ', '(', '{']).next().unwrap_or("?").to_string()
}

/// Per op, each conv's uploaded weights and bias; see [`upload_weights`].
pub(super) type Uploaded = (Vec<Option<(DevBuf, DevBuf)>>, Vec<Vec<(DevBuf, DevBuf)>>);

/// The f16 weights of every op: (f16 weights, f32 bias padded to 8) per conv (a pair's two convs as
/// one matrix), the f32 1×1 weights of the heads kernel per head, None for weightless ops; a fused
/// op's further convs in the second list (a depthwise + pointwise op's pointwise conv). An op or conv
/// the f16 kernels cannot run is an error naming it.
pub(super) fn upload_weights(r: &mut dyn KernelRunner, graph: &Graph) -> Result<Uploaded> {
    let mut out = Vec::with_capacity(graph.ops.len());
    let mut rest = vec![Vec::new(); graph.ops.len()];
    for (i, op) in graph.ops.iter().enumerate() {
        match op {
            Op::Conv(c) => {
                check_conv(graph, c)?;
                let (w, b) = if c.groups == 1 { conv_f16::pack_weights(c)? } else { conv_f16::pack_depthwise(c)? };
                let wb = r.alloc(2 * w.len())?;
                r.upload(wb, 0, bytemuck::cast_slice(&w))?;
                out.push(Some((wb, r.alloc_f32(&b)?)));
            }
            Op::Heads { conv: c, .. } => {
                out.push(Some((r.alloc_f32(&ops::heads::pack(c)?)?, r.alloc_f32(&c.bias)?)));
            }
            Op::MaxPool { .. } | Op::UpsampleAdd { .. } => out.push(None),
            Op::DwPw { dw, pw } => {
                check_dwpw(graph, dw, pw)?;
                out.push(Some(upload_f16(r, conv_f16::pack_depthwise(dw)?)?));
                rest[i].push(upload_f16(r, conv_f16::pack_weights(pw)?)?);
            }
            Op::ConvPair { a, b } => {
                check_pair(graph, a, b)?;
                out.push(Some(upload_f16(r, ops::fused_f16::pack_pair(a, b)?)?));
            }
            Op::ConvUpsampleAdd { conv, src } => {
                check_upsample_add(graph, conv, *src)?;
                out.push(Some(upload_f16(r, conv_f16::pack_weights(conv)?)?));
            }
            // Ops added for the f32 path (fusions) have no f16 kernel: say which, rather than guess.
            #[allow(unreachable_patterns)]
            other => {
                return Err(Error::Cuda(format!(
                    "the f16 CUDA path has no kernel for op {} (run it with --precision f32)",
                    op_name(other)
                )));
            }
        }
    }
    Ok((out, rest))
}

/// f16 weights and an f32 bias on the device.
fn upload_f16(r: &mut dyn KernelRunner, (w, b): (Vec<u16>, Vec<f32>)) -> Result<(DevBuf, DevBuf)> {
    let wb = r.alloc(2 * w.len())?;
    r.upload(wb, 0, bytemuck::cast_slice(&w))?;
    Ok((wb, r.alloc_f32(&b)?))
}

/// What conv_ex_f16 needs of a pair beyond each conv's own checks: groups-1 convs of one input with
/// one geometry and no residual.
fn check_pair(graph: &Graph, a: &Conv, b: &Conv) -> Result<()> {
    check_conv(graph, a)?;
    check_conv(graph, b)?;
    if a.groups != 1
        || b.groups != 1
        || a.input != b.input
        || (a.kernel, a.stride, a.pad, a.cin) != (b.kernel, b.stride, b.pad, b.cin)
        || a.residual.is_some()
        || b.residual.is_some()
    {
        return Err(Error::Cuda(format!(
            "f16 {} + {}: not two residual-free convs of one input with one geometry",
            a.name, b.name
        )));
    }
    Ok(())
}

/// What conv_ex_f16's upsample-add needs: a groups-1 conv writing its whole output, and a map of
/// as many channels to upsample.
fn check_upsample_add(graph: &Graph, c: &Conv, src: TensorId) -> Result<()> {
    check_conv(graph, c)?;
    let (cs, co) = (graph.tensors[src].channels, graph.tensors[c.output].channels);
    if c.groups != 1 || c.out_channel_offset != 0 || c.cout != co || cs != co || src == c.output {
        return Err(Error::Cuda(format!(
            "f16 {} + upsample-add: a {}-channel map into {co} channels written from {} (the fused kernel adds a map of the conv's own channels)",
            c.name, cs, c.out_channel_offset
        )));
    }
    Ok(())
}

/// What conv_dwpw_f16 needs beyond each conv's own checks: a depthwise conv and a 1×1 stride-1
/// conv of its output.
fn check_dwpw(graph: &Graph, dw: &Conv, pw: &Conv) -> Result<()> {
    check_conv(graph, dw)?;
    check_conv(graph, pw)?;
    if dw.groups != dw.cin || dw.groups == 1 || pw.groups != 1 || pw.kernel != 1 || pw.stride != 1 {
        return Err(Error::Cuda(format!(
            "f16 {} + {}: not a depthwise conv and a 1x1 conv of its output",
            dw.name, pw.name
        )));
    }
    if pw.input != dw.output || dw.residual.is_some() || dw.out_channel_offset != 0 {
        return Err(Error::Cuda(format!(
            "f16 {} + {}: the pointwise conv must read the depthwise output whole",
            dw.name, pw.name
        )));
    }
    Ok(())
}

/// What the f16 kernels need of a conv beyond its shape: groups 1 or depthwise; the input's channels
/// are the conv's (the padded input is then the packed weights' padded cin); a channel offset on a
/// multiple of 8 that, with cout padded, stays inside the output's own channels; a residual of the
/// output's channel count (the kernel reads it with cout's stride).
fn check_conv(graph: &Graph, c: &Conv) -> Result<()> {
    let bad = |msg: String| Err(Error::Cuda(format!("f16 conv {}: {msg}", c.name)));
    if c.groups != 1 && !(c.groups == c.cin && c.cin == c.cout) {
        return bad(format!(
            "groups {} of {} -> {} channels (the f16 kernels run groups 1 or depthwise)",
            c.groups, c.cin, c.cout
        ));
    }
    let (cin_t, cout_t) = (graph.tensors[c.input].channels, graph.tensors[c.output].channels);
    if cin_t != c.cin {
        return bad(format!("input tensor has {cin_t} channels, the conv {}", c.cin));
    }
    let end = c.out_channel_offset + c.cout;
    if !c.out_channel_offset.is_multiple_of(8) || (!c.cout.is_multiple_of(8) && end != cout_t) || end > cout_t {
        return bad(format!(
            "writes channels {}..{end} of {cout_t}: with channels padded to 8 it would overwrite its neighbours",
            c.out_channel_offset
        ));
    }
    if let Some(res) = c.residual
        && (graph.tensors[res].channels != c.cout || c.out_channel_offset != 0 || cout_t != c.cout)
    {
        return bad(format!(
            "residual of {} channels into {cout_t} at {}",
            graph.tensors[res].channels, c.out_channel_offset
        ));
    }
    Ok(())
}

/// The f16 kernels' parameters of conv `c` on `plan`'s arena (variant fields left for the launcher).
fn conv_params(plan: &Plan, arena: DevBuf, c: &Conv, wb: DevBuf, bb: DevBuf) -> Result<ConvF16Params> {
    let at = |t: TensorId| arena.at(2 * plan.offsets[t]);
    let (_, ih, iw) = plan.shapes[c.input];
    let (_, oh, ow) = plan.shapes[c.output];
    let (act, slope) = act_code(c.act);
    Ok(ConvF16Params {
        x: at(c.input),
        wt: wb.ptr,
        bias: bb.ptr,
        residual: c.residual.map_or(0, at),
        y: at(c.output),
        n: dim(plan.n, "batch")?,
        h: dim(ih, "height")?,
        w: dim(iw, "width")?,
        cin: dim(plan.stored_channels(c.input), "channels")?,
        oh: dim(oh, "height")?,
        ow: dim(ow, "width")?,
        cout: dim(pad8(c.cout), "channels")?,
        k: dim(c.kernel, "kernel")?,
        stride: dim(c.stride, "stride")?,
        pad: dim(c.pad, "pad")?,
        out_ctot: dim(plan.stored_channels(c.output), "channels")?,
        out_coff: dim(c.out_channel_offset, "channel offset")?,
        act,
        slope,
        ws: 0,
        splits: 1,
        kt_per_split: 0,
    })
}

/// Chooses each groups-1 conv's variant for `plan` and allocates the split-K workspace they need. On a
/// device with tuning on, a shape's supported variants run on the plan's own buffers (input filled
/// with a fixed pattern), each is checked against the heuristic's result and timed, and the fastest
/// is kept and cached.
pub(super) fn prepare(
    r: &mut dyn KernelRunner,
    graph: &Graph,
    plan: &Plan,
    arena: DevBuf,
    weights: &[Option<(DevBuf, DevBuf)>],
    tuning: &mut Tuning,
) -> Result<F16Bufs> {
    let mut variants = vec![None; graph.ops.len()];
    let mut ws_bytes = 0usize;
    let mut timed = false;
    for (i, op) in graph.ops.iter().enumerate() {
        let fused_gemm = match op {
            Op::DwPw { pw: c, .. } | Op::ConvUpsampleAdd { conv: c, .. } => Some((c, 0)),
            Op::ConvPair { a, b } => Some((a, pad8(b.cout))),
            _ => None,
        };
        if let Some((c, extra)) = fused_gemm {
            // A fused kernel's tile is its GEMM's (a pair's over both convs' channels); the heuristic
            // picks it (the tuner times plain convs only: a fused op's timing would need its other
            // buffers too).
            let (wb, bb) = weights[i].ok_or_else(|| Error::Cuda(format!("conv {} has no weights", c.name)))?;
            let p = conv_params(plan, arena, c, wb, bb)?;
            let shape = ConvF16Params { cout: p.cout + dim(extra, "channels")?, ..p }.shape();
            let (v, _) =
                tune::choose(TuneMode::Off, tuning.dev.as_ref(), &shape, "f16", &mut tuning.cache, |_| Ok(None))?;
            ws_bytes = ws_bytes.max(shape.workspace_bytes(v));
            variants[i] = Some(v);
            continue;
        }
        let Op::Conv(c) = op else { continue };
        if c.groups != 1 {
            continue;
        }
        let (wb, bb) = weights[i].ok_or_else(|| Error::Cuda(format!("conv {} has no weights", c.name)))?;
        let p = conv_params(plan, arena, c, wb, bb)?;
        let shape = p.shape();
        let (v, choice) = if tuning.dev.is_some() && tuning.mode != TuneMode::Off {
            let (mode, dev) = (tuning.mode, tuning.dev.clone());
            let mut timer = Timer::new(plan, arena, c, &p);
            tune::choose(mode, dev.as_ref(), &shape, "f16", &mut tuning.cache, |v| timer.time(&mut *r, v))?
        } else {
            // The heuristic, for the device's SM count when there is one.
            tune::choose(TuneMode::Off, tuning.dev.as_ref(), &shape, "f16", &mut tuning.cache, |_| Ok(None))?
        };
        timed |= choice.source == "timed";
        ws_bytes = ws_bytes.max(shape.workspace_bytes(v));
        variants[i] = Some(v);
    }
    if timed && let Err(e) = tuning.cache.save() {
        // The choices stand for this process; only their reuse by the next one is lost.
        eprintln!("warning: the f16 tuning cache was not saved: {e}");
    }
    let ws = if ws_bytes > 0 { Some(r.alloc(ws_bytes)?) } else { None };
    Ok(F16Bufs { ws, variants })
}

/// Times the variants of one conv on the plan's buffers; the heuristic's output is the reference each
/// variant must reproduce (within f16 rounding of a different summation order) to be timed.
struct Timer<'a> {
    plan: &'a Plan,
    /// The plan's arena: copies address its tensors by offset in it.
    arena: DevBuf,
    conv: &'a Conv,
    p: ConvF16Params,
    /// Made on the first variant timed (a cached choice runs nothing).
    reference: Option<Vec<f32>>,
}

impl<'a> Timer<'a> {
    fn new(plan: &'a Plan, arena: DevBuf, conv: &'a Conv, p: &ConvF16Params) -> Timer<'a> {
        Timer { plan, arena, conv, p: *p, reference: None }
    }

    /// Fills the input (and residual) with a fixed pattern and runs the heuristic's variant.
    fn reference(&mut self, r: &mut dyn KernelRunner) -> Result<Vec<f32>> {
        let (plan, c) = (self.plan, self.conv);
        let pattern = |len: usize| -> Vec<u16> {
            (0..len).map(|i| half::f16::from_f32(((i * 7919) % 61) as f32 / 30.0 - 1.0).to_bits()).collect()
        };
        for t in std::iter::once(c.input).chain(c.residual) {
            r.upload(self.arena, 2 * plan.offsets[t], bytemuck::cast_slice(&pattern(plan.elems(t))))?;
        }
        self.run(r, conv_f16::heuristic(&self.p.shape(), conv_f16::DEFAULT_SMS), 1)?;
        self.read(r)
    }

    /// `reps` launches of `v`, synchronized.
    fn run(&self, r: &mut dyn KernelRunner, v: &Variant, reps: usize) -> Result<()> {
        let need = self.p.shape().workspace_bytes(v);
        let ws = if need > 0 { Some(r.alloc(need)?) } else { None };
        let mut res = Ok(());
        for _ in 0..reps {
            res = res.and_then(|_| conv_f16::launch(&mut *r, v, &self.conv.name, &self.p, ws));
        }
        let res = res.and_then(|_| r.synchronize());
        if let Some(b) = ws {
            r.free(b)?;
        }
        res
    }

    fn read(&self, r: &mut dyn KernelRunner) -> Result<Vec<f32>> {
        let t = self.conv.output;
        let mut bits = vec![0u16; self.plan.elems(t)];
        r.download(self.arena, 2 * self.plan.offsets[t], bytemuck::cast_slice_mut(&mut bits))?;
        Ok(conv_f16::f32_from_f16_bits(&bits))
    }

    /// Microseconds per launch of `v`, or None when it fails or disagrees with the reference.
    fn time(&mut self, r: &mut dyn KernelRunner, v: &'static Variant) -> Result<Option<f64>> {
        let reference = match self.reference.take() {
            Some(x) => x,
            None => self.reference(r)?,
        };
        let ok = self.run(r, v, 1).is_ok() && {
            let got = self.read(r)?;
            // Variants differ only in summation order: a couple of f16 ulps of the output's scale.
            let mag = reference.iter().fold(1.0f32, |m, x| m.max(x.abs()));
            got.iter().zip(&reference).all(|(a, b)| (a - b).abs() <= 4e-3 * mag)
        };
        self.reference = Some(reference);
        if !ok {
            return Ok(None);
        }
        // The simulation's launches are slow and its timings meaningless: one proves the path.
        let reps = if r.is_simulation() { 1 } else { 20 };
        let need = self.p.shape().workspace_bytes(v);
        let ws = if need > 0 { Some(r.alloc(need)?) } else { None };
        let (name, p) = (&self.conv.name, &self.p);
        let res = crate::cuda::runner::time_with_events(r, reps, |r| conv_f16::launch(r, v, name, p, ws));
        if let Some(b) = ws {
            r.free(b)?;
        }
        Ok(res.ok().map(|t| t.as_secs_f64() * 1e6))
    }
}

impl GpuEngine {
    /// [`GpuEngine::forward`] in f16: preprocessing into 8 padded channels, every op on the f16
    /// kernels, the heads into the f32 raw outputs.
    /// With `Heads::Fused` the heads are left to the post-processing's fused kernel.
    pub(super) fn forward_f16(
        &mut self,
        images: &[&BgrImage],
        keep_all: bool,
        heads: Heads,
    ) -> Result<(Arc<Plan>, [DevBuf; 3])> {
        let (h, w) = check_batch(images)?;
        let n = images.len();
        dim(n * h * w * 8, "batch elements")?;
        let key = (n, h, w, keep_all);
        let (plan, bufs) = self.plan(key)?;
        if plan.layout != Layout::F16 {
            return Err(Error::Cuda("the f16 pass was given an f32 plan".into()));
        }
        let (arena, input_u8, loc, conf, landm) = (bufs.arena, bufs.input_u8, bufs.loc, bufs.conf, bufs.landm);
        let f16 = bufs.f16.as_ref().ok_or_else(|| Error::Cuda("the f16 plan has no variant choices".into()))?;
        let (ws, variants) = (f16.ws, f16.variants.clone());
        self.last = Some(key);
        // A timed bench pass: its first event before the upload, the rest by the op loop.
        let marks = self.stage_marks.clone();
        let mut marker = match marks.as_deref() {
            Some([start, rest @ ..]) => {
                self.runner.event_record(*start)?;
                Marker::new(rest, self.forward_marks(heads))?
            }
            _ => Marker::off(),
        };
        let host0 = std::time::Instant::now();
        let r = &mut self.runner;
        if r.is_simulation() {
            // 0xffff is an f16 NaN: an element a kernel forgot to write poisons what reads it.
            r.memset(arena, 0xff)?;
            for b in [loc, conf, landm] {
                r.poison(b)?;
            }
        }
        let per = h * w * 3;
        for (i, img) in images.iter().enumerate() {
            r.upload(input_u8, i * per, &img.data)?;
        }
        if marks.is_some() {
            self.host_preprocess += host0.elapsed();
        }
        let g = &self.graph;
        let at = |t: TensorId| arena.at(2 * plan.offsets[t]);
        ops::net_f16::preprocess(r.as_mut(), input_u8.ptr, at(g.input), n * h * w)?;
        let dims = |t: TensorId| plan.shapes[t];
        let mut anchor_base = [0usize; 3];
        for l in 1..3 {
            let (_, fh, fw) = dims(g.taps.head[l - 1]);
            anchor_base[l] = anchor_base[l - 1] + 2 * fh * fw;
        }
        for (i, op) in g.ops.iter().enumerate() {
            let wts = || self.weights[i].ok_or_else(|| Error::Cuda(format!("op {i} ({}) has no weights", op_name(op))));
            marker.before(r.as_mut(), i)?;
            match op {
                Op::Conv(c) => {
                    let (wb, bb) = wts()?;
                    let p = conv_params(&plan, arena, c, wb, bb)?;
                    match variants[i] {
                        Some(v) => conv_f16::launch(r.as_mut(), v, &c.name, &p, ws)?,
                        None => conv_f16::launch_depthwise(r.as_mut(), &c.name, &p)?,
                    }
                }
                Op::Heads { level: l, conv: c } => {
                    let (wb, bb) = wts()?;
                    let (_, oh, ow) = dims(c.output);
                    let a = ops::heads::HeadArgs {
                        x: at(c.input),
                        wt: wb.ptr,
                        bias: bb.ptr,
                        loc: loc.ptr,
                        conf: conf.ptr,
                        landm: landm.ptr,
                        n,
                        h: oh,
                        w: ow,
                        c: c.cin,
                        anchor_base: anchor_base[*l],
                        num_anchors: anchors::num_anchors(h, w),
                    };
                    if c.kernel != 1 || dims(c.input).1 != oh || dims(c.input).2 != ow {
                        return Err(Error::Cuda(format!("head {}: not a 1x1 conv on its input's grid", c.name)));
                    }
                    if heads == Heads::Raw {
                        ops::heads::launch_f16(r.as_mut(), &a, plan.stored_channels(c.input))?;
                    }
                }
                Op::DwPw { dw, pw } => {
                    let (wdw, bdw) = wts()?;
                    let (wpw, bpw) = *self.fused_rest[i]
                        .first()
                        .ok_or_else(|| Error::Cuda(format!("op {i} ({}) has no pointwise weights", op_name(op))))?;
                    let v =
                        variants[i].ok_or_else(|| Error::Cuda(format!("{} + {}: no f16 variant", dw.name, pw.name)))?;
                    let (_, ih, iw) = dims(dw.input);
                    let p = ConvF16Params {
                        x: at(dw.input),
                        h: dim(ih, "height")?,
                        w: dim(iw, "width")?,
                        stride: dim(dw.stride, "stride")?,
                        pad: dim(dw.pad, "pad")?,
                        ..conv_params(&plan, arena, pw, wpw, bpw)?
                    };
                    let part = ops::fused_f16::DepthwisePart { wdw: wdw.ptr, bdw: bdw.ptr, k: dw.kernel, act: dw.act };
                    ops::fused_f16::launch_dwpw(r.as_mut(), v, &pw.name, &p, &part, ws)?;
                }
                Op::ConvPair { a, b } => {
                    let (wb, bb) = wts()?;
                    let v =
                        variants[i].ok_or_else(|| Error::Cuda(format!("{} + {}: no f16 variant", a.name, b.name)))?;
                    let pa = conv_params(&plan, arena, a, wb, bb)?;
                    let split = pa.cout as usize;
                    let p = ConvF16Params { cout: dim(split + pad8(b.cout), "channels")?, ..pa };
                    let e = ops::fused_f16::ExPart {
                        split,
                        y2: at(b.output),
                        out_ctot2: plan.stored_channels(b.output),
                        out_coff2: b.out_channel_offset,
                        act2: Some(b.act),
                        ..Default::default()
                    };
                    ops::fused_f16::launch_ex(r.as_mut(), v, &a.name, &p, &e, ws)?;
                }
                Op::ConvUpsampleAdd { conv: c, src } => {
                    let (wb, bb) = wts()?;
                    let v = variants[i].ok_or_else(|| Error::Cuda(format!("{}: no f16 variant", c.name)))?;
                    let p = conv_params(&plan, arena, c, wb, bb)?;
                    let (_, uh, uw) = dims(*src);
                    if plan.stored_channels(*src) != p.cout as usize {
                        return Err(Error::Cuda(format!(
                            "{}: the upsampled map's channels differ from the conv's",
                            c.name
                        )));
                    }
                    let e =
                        ops::fused_f16::ExPart { split: p.cout as usize, up: at(*src), uh, uw, ..Default::default() };
                    ops::fused_f16::launch_ex(r.as_mut(), v, &c.name, &p, &e, ws)?;
                }
                Op::MaxPool { input, output } => {
                    let (_, ih, iw) = dims(*input);
                    let (_, oh, ow) = dims(*output);
                    let c = plan.stored_channels(*input);
                    ops::net_f16::maxpool(r.as_mut(), at(*input), at(*output), n, ih, iw, c, oh, ow)?;
                }
                Op::UpsampleAdd { src, dst } => {
                    let (sc, sh, sw) = dims(*src);
                    let (dc, dh, dw) = dims(*dst);
                    if sc != dc {
                        return Err(Error::Cuda("upsample-add of tensors with different channel counts".into()));
                    }
                    let c = plan.stored_channels(*dst);
                    ops::net_f16::upsample_add(r.as_mut(), at(*src), at(*dst), n, (sh, sw), (dh, dw), c)?;
                }
                #[allow(unreachable_patterns)]
                other => {
                    return Err(Error::Cuda(format!("the f16 CUDA path has no kernel for op {}", op_name(other))));
                }
            }
        }
        marker.end(r.as_mut())?;
        Ok((plan, [loc, conf, landm]))
    }
}

/// Tensor `t` of an f16 plan's arena as f32 NCHW [n, c, h, w], padded channels dropped.
pub(super) fn tensor_nchw(r: &mut dyn KernelRunner, plan: &Plan, arena: DevBuf, t: TensorId) -> Result<Vec<f32>> {
    let (c, th, tw) = plan.shapes[t];
    let cs = plan.stored_channels(t);
    let n = plan.n;
    let mut bits = vec![0u16; plan.elems(t)];
    r.download(arena, 2 * plan.offsets[t], bytemuck::cast_slice_mut(&mut bits))?;
    let mut out = vec![0.0f32; n * c * th * tw];
    for b in 0..n {
        for y in 0..th {
            for x in 0..tw {
                let px = ((b * th + y) * tw + x) * cs;
                for ch in 0..c {
                    out[((b * c + ch) * th + y) * tw + x] = half::f16::from_bits(bits[px + ch]).to_f32();
                }
            }
        }
    }
    Ok(out)
}
