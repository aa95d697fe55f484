//! The f16 forward pass of [`GpuEngine`] (`Precision::F16`): NHWC f16 activations with channels padded
//! to multiples of 8 (the plan's [`Layout::F16`]: the same planner, stored channels padded), f16
//! weights packed once, f32 accumulation on the tensor cores (kernels/conv_f16.cu), the f32 path's
//! fused epilogue (bias, residual, activation, output channel offset), and heads that read f16 and
//! write the f32 raw outputs, so post-processing is the f32 path's.
//!
//! Padded channels are zeros everywhere: preprocessing writes them, packed weights and biases are zero
//! there, so every conv writes act(0) = 0 into its padded outputs, and pool / upsample keep zeros.
//! Each groups-1 conv and fused op runs the variant `tune::choose_op` keeps for its shape (the
//! heuristic in the simulation; timed on a GPU, a fused op as its fused kernel), chosen when a plan
//! is made and kept with its buffers, as is the split-K workspace the chosen variants need.

use super::*;
use crate::cuda::ops::conv_f16::{self, ConvShape, Variant, pad8};
use crate::cuda::params::{ConvF16Params, act_code};
use crate::cuda::tune::{self, DeviceKey, Fused, TuneCache, TuneMode};
use crate::graph::Conv;
use crate::graph::Layout;

/// The f16 state of one plan: each op's conv variant (None: not a groups-1 conv) and the split-K
/// workspace they share.
pub(super) struct F16Bufs {
    pub(super) ws: Option<DevBuf>,
    pub(super) variants: Vec<Option<&'static Variant>>,
    /// Each tuned op's cache key and how its variant was chosen (None without a device key).
    pub(super) keys: Vec<Option<(String, tune::Choice)>>,
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
/// [`Uploaded`] borrowed.
pub(super) type UploadedRef<'a> = (&'a [Option<(DevBuf, DevBuf)>], &'a [Vec<(DevBuf, DevBuf)>]);

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

/// Launches fused op `op` (depthwise + pointwise, a conv pair, a conv with the upsample-add) with
/// variant `v` on `plan`'s arena: `w` is its uploaded weights, `rest` its further convs' (the
/// pointwise conv of a depthwise + pointwise op). The forward pass and the tuner both launch through
/// here, so a variant is timed exactly as the pass runs it.
#[allow(clippy::too_many_arguments)]
fn launch_fused(
    r: &mut dyn KernelRunner,
    plan: &Plan,
    arena: DevBuf,
    op: &Op,
    (wb, bb): (DevBuf, DevBuf),
    rest: &[(DevBuf, DevBuf)],
    v: &Variant,
    ws: Option<DevBuf>,
) -> Result<()> {
    let at = |t: TensorId| arena.at(2 * plan.offsets[t]);
    match op {
        Op::DwPw { dw, pw } => {
            let (wpw, bpw) =
                *rest.first().ok_or_else(|| Error::Cuda(format!("{} + {}: no pointwise weights", dw.name, pw.name)))?;
            let (_, ih, iw) = plan.shapes[dw.input];
            let p = ConvF16Params {
                x: at(dw.input),
                h: dim(ih, "height")?,
                w: dim(iw, "width")?,
                stride: dim(dw.stride, "stride")?,
                pad: dim(dw.pad, "pad")?,
                ..conv_params(plan, arena, pw, wpw, bpw)?
            };
            let part = ops::fused_f16::DepthwisePart { wdw: wb.ptr, bdw: bb.ptr, k: dw.kernel, act: dw.act };
            ops::fused_f16::launch_dwpw(r, v, &pw.name, &p, &part, ws)
        }
        Op::ConvPair { a, b } => {
            let pa = conv_params(plan, arena, a, wb, bb)?;
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
            ops::fused_f16::launch_ex(r, v, &a.name, &p, &e, ws)
        }
        Op::ConvUpsampleAdd { conv: c, src } => {
            let p = conv_params(plan, arena, c, wb, bb)?;
            let (_, uh, uw) = plan.shapes[*src];
            if plan.stored_channels(*src) != p.cout as usize {
                return Err(Error::Cuda(format!("{}: the upsampled map's channels differ from the conv's", c.name)));
            }
            let e = ops::fused_f16::ExPart { split: p.cout as usize, up: at(*src), uh, uw, ..Default::default() };
            ops::fused_f16::launch_ex(r, v, &c.name, &p, &e, ws)
        }
        other => Err(Error::Cuda(format!("op {} is not a fused f16 op", op_name(other)))),
    }
}

/// A fused op's GEMM as the tuner keys it: its shape (a pair's over both convs' padded channels),
/// its geometry beyond that, and the tensors it reads and writes.
type FusedGemm = (ConvShape, Fused, Vec<TensorId>, Vec<TensorId>);

/// [`FusedGemm`] of `op`; None for ops that are not fused.
fn fused_gemm(plan: &Plan, arena: DevBuf, op: &Op) -> Result<Option<FusedGemm>> {
    // Only the shape is wanted: the weights' addresses are placeholders.
    let p = |c: &Conv| conv_params(plan, arena, c, arena, arena);
    Ok(Some(match op {
        Op::DwPw { dw, pw } => {
            let (_, h, w) = plan.shapes[dw.input];
            let fused = Fused::DwPw { k: dw.kernel, stride: dw.stride, pad: dw.pad, h, w };
            (p(pw)?.shape(), fused, std::iter::once(dw.input).chain(pw.residual).collect(), vec![pw.output])
        }
        Op::ConvPair { a, b } => {
            let pa = p(a)?;
            let shape = ConvF16Params { cout: pa.cout + dim(pad8(b.cout), "channels")?, ..pa }.shape();
            (shape, Fused::Pair { split: pa.cout as usize }, vec![a.input], vec![a.output, b.output])
        }
        Op::ConvUpsampleAdd { conv: c, src } => {
            let (_, uh, uw) = plan.shapes[*src];
            (p(c)?.shape(), Fused::UpsampleAdd { uh, uw }, vec![c.input, *src], vec![c.output])
        }
        _ => return Ok(None),
    }))
}

/// Chooses each groups-1 conv's and fused op's variant for `plan` and allocates the split-K
/// workspace they need. On a device with tuning on, a shape's supported variants run on the plan's
/// own buffers (inputs filled with a fixed pattern), each is checked against the heuristic's result
/// and timed, and the fastest is kept and cached; a fused op is timed as the fused kernel, under its
/// own key ([`tune::choose_op`]).
pub(super) fn prepare(
    r: &mut dyn KernelRunner,
    graph: &Graph,
    plan: &Plan,
    arena: DevBuf,
    (weights, rest): UploadedRef<'_>,
    tuning: &mut Tuning,
) -> Result<F16Bufs> {
    let mut variants = vec![None; graph.ops.len()];
    let mut keys = vec![None; graph.ops.len()];
    let mut ws_bytes = 0usize;
    let mut timed_keys = std::collections::BTreeSet::new();
    let tune_on = tuning.dev.is_some() && tuning.mode != TuneMode::Off;
    for (i, op) in graph.ops.iter().enumerate() {
        let no_weights = || Error::Cuda(format!("op {i} ({}) has no weights", op_name(op)));
        let (shape, fused, mut timer) = if let Some((shape, fused, reads, writes)) = fused_gemm(plan, arena, op)? {
            let (w, rest) = (weights[i].ok_or_else(no_weights)?, rest[i].as_slice());
            let launch =
                move |r: &mut dyn KernelRunner, v: &Variant, ws| launch_fused(r, plan, arena, op, w, rest, v, ws);
            (shape, fused, Timer::new(plan, arena, shape, reads, writes, Box::new(launch)))
        } else if let Op::Conv(c) = op
            && c.groups == 1
        {
            let (wb, bb) = weights[i].ok_or_else(no_weights)?;
            let p = conv_params(plan, arena, c, wb, bb)?;
            let launch = move |r: &mut dyn KernelRunner, v: &Variant, ws| conv_f16::launch(r, v, &c.name, &p, ws);
            let (reads, writes) = (std::iter::once(c.input).chain(c.residual).collect(), vec![c.output]);
            (p.shape(), Fused::None, Timer::new(plan, arena, p.shape(), reads, writes, Box::new(launch)))
        } else {
            continue;
        };
        let dev = tuning.dev.clone();
        let key = dev.as_ref().map(|d| tune::op_key(d, &shape, fused, "f16"));
        // Off (or no device): the heuristic, for the device's SM count when there is one. `full`
        // times a shape once per plan: its later ops take the choice just made.
        let mode = match tuning.mode {
            _ if !tune_on => TuneMode::Off,
            TuneMode::Full if key.as_ref().is_some_and(|k| timed_keys.contains(k)) => TuneMode::Cached,
            m => m,
        };
        let (v, choice) =
            tune::choose_op(mode, dev.as_ref(), &shape, fused, "f16", &mut tuning.cache, |v| timer.time(&mut *r, v))?;
        if choice.source == "timed" {
            timed_keys.extend(key.clone());
        }
        ws_bytes = ws_bytes.max(shape.workspace_bytes(v));
        variants[i] = Some(v);
        keys[i] = key.map(|k| (k, choice));
    }
    if !timed_keys.is_empty()
        && let Err(e) = tuning.cache.save()
    {
        // The choices stand for this process; only their reuse by the next one is lost.
        eprintln!("warning: the f16 tuning cache was not saved: {e}");
    }
    let ws = if ws_bytes > 0 { Some(r.alloc(ws_bytes)?) } else { None };
    Ok(F16Bufs { ws, variants, keys })
}

/// A launch of one op with a given variant and split-K workspace.
type Launch<'a> = Box<dyn FnMut(&mut dyn KernelRunner, &Variant, Option<DevBuf>) -> Result<()> + 'a>;

/// Times the variants of one conv or fused op on the plan's buffers; the heuristic's output is the
/// reference each variant must reproduce (within f16 rounding of another summation order: split-K)
/// to be timed.
struct Timer<'a> {
    plan: &'a Plan,
    /// The plan's arena: copies address its tensors by offset in it.
    arena: DevBuf,
    /// The GEMM's shape (the heuristic's choice, each variant's workspace).
    shape: ConvShape,
    /// The tensors the op reads (filled with a pattern) and writes (compared).
    reads: Vec<TensorId>,
    writes: Vec<TensorId>,
    launch: Launch<'a>,
    /// Made on the first variant timed (a cached choice runs nothing).
    reference: Option<Vec<u16>>,
}

impl<'a> Timer<'a> {
    fn new(
        plan: &'a Plan,
        arena: DevBuf,
        shape: ConvShape,
        reads: Vec<TensorId>,
        writes: Vec<TensorId>,
        launch: Launch<'a>,
    ) -> Timer<'a> {
        Timer { plan, arena, shape, reads, writes, launch, reference: None }
    }

    /// Fills the inputs with a fixed pattern and runs the heuristic's variant.
    fn reference(&mut self, r: &mut dyn KernelRunner) -> Result<Vec<u16>> {
        let plan = self.plan;
        let pattern = |len: usize| -> Vec<u16> {
            (0..len).map(|i| half::f16::from_f32(((i * 7919) % 61) as f32 / 30.0 - 1.0).to_bits()).collect()
        };
        for &t in &self.reads {
            r.upload(self.arena, 2 * plan.offsets[t], bytemuck::cast_slice(&pattern(plan.elems(t))))?;
        }
        self.run(r, conv_f16::heuristic(&self.shape, conv_f16::DEFAULT_SMS), 1)?;
        self.read(r)
    }

    /// `reps` launches of `v`, synchronized.
    fn run(&mut self, r: &mut dyn KernelRunner, v: &Variant, reps: usize) -> Result<()> {
        let need = self.shape.workspace_bytes(v);
        let ws = if need > 0 { Some(r.alloc(need)?) } else { None };
        let mut res = Ok(());
        for _ in 0..reps {
            res = res.and_then(|_| (self.launch)(&mut *r, v, ws));
        }
        let res = res.and_then(|_| r.synchronize());
        if let Some(b) = ws {
            r.free(b)?;
        }
        res
    }

    /// Every tensor the op writes, whole (a channel slice's neighbours are left as they were).
    fn read(&self, r: &mut dyn KernelRunner) -> Result<Vec<u16>> {
        let mut out = Vec::new();
        for &t in &self.writes {
            let mut bits = vec![0u16; self.plan.elems(t)];
            r.download(self.arena, 2 * self.plan.offsets[t], bytemuck::cast_slice_mut(&mut bits))?;
            out.extend_from_slice(&bits);
        }
        Ok(out)
    }

    /// Microseconds per launch of `v`, or None when it fails or disagrees with the reference.
    fn time(&mut self, r: &mut dyn KernelRunner, v: &'static Variant) -> Result<Option<f64>> {
        let reference = match self.reference.take() {
            Some(x) => x,
            None => self.reference(r)?,
        };
        let ok = self.run(r, v, 1).is_ok() && {
            let got = self.read(r)?;
            // Variants differ only in summation order (none where the K splits agree): a couple of
            // f16 ulps of the output's scale. Equal bits also pass what the op never writes.
            let f = |b: u16| half::f16::from_bits(b).to_f32();
            let mag = reference.iter().fold(1.0f32, |m, &x| if f(x).is_finite() { m.max(f(x).abs()) } else { m });
            got.iter().zip(&reference).all(|(&a, &b)| a == b || (f(a) - f(b)).abs() <= 4e-3 * mag)
        };
        self.reference = Some(reference);
        if !ok {
            return Ok(None);
        }
        // The simulation's launches are slow and its timings meaningless: one proves the path.
        let reps = if r.is_simulation() { 1 } else { 20 };
        let need = self.shape.workspace_bytes(v);
        let ws = if need > 0 { Some(r.alloc(need)?) } else { None };
        let launch = &mut self.launch;
        let res = crate::cuda::runner::time_with_events(r, reps, |r| launch(r, v, ws));
        if let Some(b) = ws {
            r.free(b)?;
        }
        Ok(res.ok().map(|t| t.as_secs_f64() * 1e6))
    }
}

impl GpuEngine {
    /// The f16 plan of an n×3×h×w batch (made, and tuned, on first use): per op, its variant and,
    /// with a device key set, its tuning cache key and how the variant was chosen; None for ops
    /// that have no variant (depthwise convs, pools, heads).
    #[allow(clippy::type_complexity)]
    pub fn f16_choices(
        &mut self,
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<Vec<Option<(&'static Variant, Option<(String, tune::Choice)>)>>> {
        let (_, bufs) = self.plan((n, h, w, false))?;
        let f16 = bufs.f16.as_ref().ok_or_else(|| Error::Cuda("not an f16 engine: no variant choices".into()))?;
        Ok(f16.variants.iter().zip(&f16.keys).map(|(v, k)| v.map(|v| (v, k.clone()))).collect())
    }

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
                Op::DwPw { .. } | Op::ConvPair { .. } | Op::ConvUpsampleAdd { .. } => {
                    let v =
                        variants[i].ok_or_else(|| Error::Cuda(format!("op {i} ({}): no f16 variant", op_name(op))))?;
                    launch_fused(r.as_mut(), &plan, arena, op, wts()?, &self.fused_rest[i], v, ws)?;
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
