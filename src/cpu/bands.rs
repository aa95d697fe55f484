//! Depthwise-separable ops (MobileNetV1's depthwise + pointwise pairs, MobileNetV2's inverted
//! residuals) run band by band in the channel-blocked layout (`cpu::blocked`), so that their
//! intermediate maps stay in the cache: the expansion of an inverted residual is six times its input
//! (MobileNetV2's 96-channel map at 320², 39 MB, written and read back whole otherwise) and the
//! depthwise output as wide as its input. `cargo bench --bench conv_shapes -- bands` times each op
//! against the same kernels on whole maps.
//!
//! Per band of output rows the expansion computes the input rows the band reads into a ring of rows
//! (the rows the slot's previous band expanded stay: no row is expanded twice), the depthwise writes
//! the band's rows into a second buffer, and the projection reads them from the cache into the output
//! (with the shortcut). A pair reading an NCHW input (a blocked run's first op) fills the same ring
//! with the band's input rows reordered into the layout. The values are the whole-map kernels' (the
//! same kernels on the same operands, bit for bit). Threads: the batch's output rows are split evenly
//! into one contiguous run per slot, each slot a thread's buffers; work per band: the three steps'
//! flops, the input and output read and written once, the weights read once per band (hence
//! MIN_BAND_PIXELS).

use super::blocked::{
    BLOCK, DepthwiseWeights, DwSource, PointwiseWeights, Simd, Span, blocked_len, depthwise_span, pointwise_span,
    to_blocked_span,
};
use super::conv::{SharedMut, rows_blocked};
use crate::graph::Conv;
use crate::reference::out_size;
use rayon::prelude::*;
use std::ops::Range;

/// Bytes of a band's buffers (the expansion's rows and the depthwise output's) a slot keeps in the
/// cache: half the L2 of a 1.25 MiB-L2 Xeon, the whole of a 512 KiB-L2 EPYC's.
const BAND_BYTES: usize = 512 << 10;

/// The same for a pair without an expansion, whose one buffer (the depthwise output) competes in the
/// cache with the input rows it is made of: `conv_shapes -- bands` on MobileNetV1 x1.0's pairs (one
/// thread, Ice Lake Xeon) ran 1.03–1.26x the whole maps at 64 KiB and 0.76–1.19x at 512.
const DW_BAND_BYTES: usize = 64 << 10;

/// Output rows per band of an op with a depthwise step, most first.
const MAX_BAND_ROWS: usize = 16;

/// Output pixels per band, least: each band reads the op's weights again.
const MIN_BAND_PIXELS: usize = 128;

/// How an op with a depthwise step runs in bands of output rows: `rows` per band, the expansion's
/// buffer holding `cap` input rows (0 without an expansion), each buffer `mid` channels wide.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Band {
    /// Output rows per band.
    pub rows: usize,
    /// Input rows the ring holds (an expansion's, or an NCHW input reordered; 0: none).
    pub cap: usize,
    /// Channels of either buffer (whole blocks).
    pub mid: usize,
}

impl Band {
    /// The band for a depthwise step of `channels` and stride `s` on a `h`×`w` map, its input rows
    /// made in a ring when `ring` (by an expansion, or reordered from an NCHW input): as many output
    /// rows as keep both buffers within BAND_BYTES, at least MIN_BAND_PIXELS.
    fn new(channels: usize, s: usize, ring: bool, (h, w): (usize, usize)) -> Band {
        let (oh, ow) = (out_size(h, 3, s, 1), out_size(w, 3, s, 1));
        let mid = channels.div_ceil(BLOCK) * BLOCK;
        let band = |rows: usize| Band::of(rows, s, ring, mid);
        let mut rows = 1;
        let budget = if ring { BAND_BYTES } else { DW_BAND_BYTES };
        while rows < MAX_BAND_ROWS.min(oh) && band(rows + 1).floats(w, ow) * 4 <= budget {
            rows += 1;
        }
        band(rows.max(MIN_BAND_PIXELS.div_ceil(ow)).min(oh))
    }

    /// Bands of `rows` output rows of a depthwise step of stride `s` and `mid` channels: the ring
    /// holds the rows the band reads, (rows − 1)·s + 3, when there is one.
    fn of(rows: usize, s: usize, ring: bool, mid: usize) -> Band {
        Band { rows, cap: if ring { (rows - 1) * s + 3 } else { 0 }, mid }
    }

    /// Floats of the two buffers on a map `w` wide whose output is `ow` wide.
    pub fn floats(&self, w: usize, ow: usize) -> usize {
        (self.cap * w + self.rows * ow) * self.mid
    }

    /// `floats` as a whole number of blocks, so slots cut from one 64-byte aligned buffer stay aligned.
    fn slot_floats(&self, w: usize, ow: usize) -> usize {
        self.floats(w, ow).next_multiple_of(BLOCK)
    }
}

/// An op with a depthwise step, run band by band: per band of output rows the expansion computes the
/// input rows the band reads (into the slot's row buffer, keeping the rows the previous band of the
/// slot computed: no row is expanded twice), the depthwise writes the band's rows (into the slot's
/// second buffer) and the projection reads them from the cache into the output. Every value is the
/// one the whole-map kernels compute (the same kernels on the same operands), so the expanded map,
/// the largest tensor of an inverted residual (six times its input), never goes to memory.
///
/// Threads: the output rows of the batch are split evenly into one contiguous range per slot.
#[derive(Clone, Copy)]
pub struct FusedOp<'a> {
    /// How the depthwise step's input rows are made in the ring; `None`: it reads the op's input (in
    /// the blocked layout) in place.
    ring: Option<Ring<'a>>,
    dw: &'a DepthwiseWeights,
    pw: &'a PointwiseWeights,
    band: Band,
    n: usize,
    /// (channels, height, width) of the op's input and output.
    pub(super) input: (usize, usize, usize),
    pub(super) output: (usize, usize, usize),
    /// Height and width of the depthwise step's input (the stem's output; else the op's input).
    dw_in: (usize, usize),
}

/// What a fused op computes into its ring of rows, a band's new rows at a time.
#[derive(Clone, Copy)]
enum Ring<'a> {
    /// The expansion of an inverted residual (a 1x1 convolution of the op's blocked input).
    Expanded(&'a PointwiseWeights),
    /// The op's input reordered from NCHW (the first op of a run), the step an expansion would take,
    /// so the run's input is never written whole in the layout and read back (for MobileNetV1 x1.0
    /// and MobileNetV2, 13 MB each way).
    Reordered,
    /// A dense convolution (the network's stem) of the op's NCHW input, whose output the depthwise
    /// step reads: that output never goes to memory (13 MB for MobileNetV1 x1.0 and MobileNetV2,
    /// written and read back otherwise).
    Stem(&'a Conv),
}

/// Floats of one slot's buffers for a depthwise step of `channels` and stride `s` (its input rows in
/// a ring when `ring`) on a `h`×`w` map: what `FusedOp::slot_floats` gives for it.
pub fn slot_floats(channels: usize, s: usize, ring: bool, (h, w): (usize, usize)) -> usize {
    Band::new(channels, s, ring, (h, w)).slot_floats(w, out_size(w, 3, s, 1))
}

impl<'a> FusedOp<'a> {
    /// The op of these steps on `n` images of `h`×`w` (input channels: the expansion's, else the
    /// depthwise step's), in bands as `Band::new` chooses.
    pub fn new(
        ex: Option<&'a PointwiseWeights>,
        dw: &'a DepthwiseWeights,
        pw: &'a PointwiseWeights,
        n: usize,
        (h, w): (usize, usize),
    ) -> FusedOp<'a> {
        let s = dw.stride();
        let band = Band::new(dw.channels(), s, ex.is_some(), (h, w));
        let cin = ex.map_or(dw.channels(), |e| e.cin());
        FusedOp {
            ring: ex.map(Ring::Expanded),
            dw,
            pw,
            band,
            n,
            input: (cin, h, w),
            output: (pw.cout(), out_size(h, 3, s, 1), out_size(w, 3, s, 1)),
            dw_in: (h, w),
        }
    }

    /// The op of a depthwise step and its projection reading its input in NCHW (no shortcut): each
    /// band's input rows are reordered into the slot's row buffer, as an expansion would compute them.
    pub fn from_nchw(
        dw: &'a DepthwiseWeights,
        pw: &'a PointwiseWeights,
        n: usize,
        (h, w): (usize, usize),
    ) -> FusedOp<'a> {
        let band = Band::new(dw.channels(), dw.stride(), true, (h, w));
        FusedOp { ring: Some(Ring::Reordered), band, ..FusedOp::new(None, dw, pw, n, (h, w)) }
    }

    /// The op of a dense convolution `stem` (any kernel and stride, its output the depthwise step's
    /// input, with `simd`'s direct path), a depthwise step and its projection, reading the stem's input
    /// in NCHW (`n` images of `h`×`w`): each band's depthwise input rows are computed into the slot's
    /// row buffer. `None` unless the stem writes the depthwise step's channels with the direct path.
    pub fn from_stem(
        simd: Simd,
        stem: &'a Conv,
        dw: &'a DepthwiseWeights,
        pw: &'a PointwiseWeights,
        n: usize,
        (h, w): (usize, usize),
    ) -> Option<FusedOp<'a>> {
        if stem.cout != dw.channels() || !crate::cpu::conv::handles_blocked(stem, simd) {
            return None;
        }
        let dw_in = (out_size(h, stem.kernel, stem.stride, stem.pad), out_size(w, stem.kernel, stem.stride, stem.pad));
        let op = FusedOp::from_nchw(dw, pw, n, dw_in);
        Some(FusedOp { ring: Some(Ring::Stem(stem)), input: (stem.cin, h, w), ..op })
    }

    /// Whether the op reads its input in NCHW (`from_nchw`, `from_stem`).
    pub fn reads_nchw(&self) -> bool {
        matches!(self.ring, Some(Ring::Reordered | Ring::Stem(_)))
    }

    /// The same op in bands of `rows` output rows (at least one), whatever their size: for
    /// benchmarks and tests of the choice.
    pub fn with_band_rows(self, rows: usize) -> FusedOp<'a> {
        let band = Band::of(rows.clamp(1, self.output.1), self.dw.stride(), self.ring.is_some(), self.band.mid);
        FusedOp { band, ..self }
    }

    /// The bands it runs in.
    pub fn band(&self) -> Band {
        self.band
    }

    /// Floats of one slot's buffers (`Band::slot_floats`).
    pub fn slot_floats(&self) -> usize {
        self.band.slot_floats(self.dw_in.1, self.output.2)
    }

    /// `x` (the op's input, and its shortcut when `residual`) into `out` with the kernels of `simd`,
    /// `bands` holding the slots' buffers, `slot` floats each.
    pub fn run(&self, simd: Simd, x: &[f32], out: &mut [f32], residual: bool, bands: &mut [f32], slot: usize) {
        let (n, (ic, h, w), (oc, oh, ow)) = (self.n, self.input, self.output);
        let nchw = self.reads_nchw();
        let in_len = if nchw { n * ic * h * w } else { blocked_len(n, ic, h * w) };
        assert_eq!(x.len(), in_len, "fused op: input size");
        assert!(!(nchw && residual), "fused op: a shortcut from an NCHW input");
        assert_eq!(out.len(), blocked_len(n, oc, oh * ow), "fused op: output size");
        assert!(slot >= self.band.floats(self.dw_in.1, ow), "fused op: slot size");
        assert!(!residual || x.len() == out.len(), "fused op: shortcut size");
        simd.check();
        let total = n * oh;
        let used = (bands.len() / slot).min(total);
        let outp = SharedMut(out.as_mut_ptr());
        bands.par_chunks_mut(slot).take(used).enumerate().for_each(|(i, buf)| {
            let rows = i * total / used..(i + 1) * total / used;
            // SAFETY: the set was checked; the slot's rows of the output are its alone, and the
            // spans below lie inside `x`, `out` and `buf` (`band_rows`' contract).
            unsafe { self.band_rows(simd, x, outp, residual, buf, rows) };
        });
    }

    /// Output rows `rows` of the batch (image-major) on the calling thread.
    ///
    /// # Safety
    /// The processor must support `simd`; `out` must hold the op's output, those rows no other
    /// thread's; `buf` the slot's floats.
    unsafe fn band_rows(
        &self,
        simd: Simd,
        x: &[f32],
        out: SharedMut,
        residual: bool,
        buf: &mut [f32],
        rows: Range<usize>,
    ) {
        let ((ic, ih, iw), (oc, oh, ow), band) = (self.input, self.output, self.band);
        // The depthwise step's input: the stem's output, else the op's input.
        let (h, w) = self.dw_in;
        let s = self.dw.stride();
        let (in_plane, out_plane) = (ih * iw * BLOCK, oh * ow * BLOCK);
        let (win_plane, dw_plane) = (band.cap * w * BLOCK, band.rows * ow * BLOCK);
        let (ring, dwb) = buf.split_at_mut(band.cap * w * band.mid);
        let nchw = self.reads_nchw();
        // The expanded rows the ring holds (image b's row iy at row iy % cap): (image, rows).
        let mut held: Option<(usize, Range<usize>)> = None;
        let mut r = rows.start;
        while r < rows.end {
            let (b, y0) = (r / oh, r % oh);
            let y1 = (y0 + band.rows).min(oh).min(y0 + rows.end - r);
            let image =
                x.as_ptr().wrapping_add(if nchw { b * ic * ih * iw } else { b * ic.div_ceil(BLOCK) * in_plane });
            // SAFETY: the function's contract; every offset below stays inside image b's planes of
            // `x`, `out`, or the slot's buffers (the band's input rows number at most `cap`).
            unsafe {
                let src = if let Some(fill) = self.ring {
                    // Input rows [lo, hi) feed output rows [y0, y1); those the previous band
                    // made (expanded, reordered or computed by the stem) are still in the ring.
                    let (lo, hi) = ((y0 * s).saturating_sub(1), ((y1 - 1) * s + 2).min(h));
                    let mut from = match &held {
                        Some((hb, kept)) if *hb == b && kept.start <= lo && lo < kept.end => kept.end,
                        _ => lo,
                    };
                    // The new rows, in runs that do not wrap around the ring.
                    while from < hi {
                        let at = from % band.cap;
                        let to = hi.min(from + band.cap - at);
                        let dst = ring.as_mut_ptr().add(at * w * BLOCK);
                        match fill {
                            Ring::Expanded(ex) => {
                                let span = Span {
                                    x: image.add(from * w * BLOCK),
                                    x_plane: in_plane,
                                    npix: (to - from) * w,
                                    out: dst,
                                    out_plane: win_plane,
                                    residual: None,
                                };
                                pointwise_span(simd, ex, &span);
                            }
                            Ring::Stem(stem) => {
                                let input = std::slice::from_raw_parts(image, ic * ih * iw);
                                let (plane, first) = (band.cap * w, at * w);
                                rows_blocked(simd, stem, input, (ih, iw), from..to, ring.as_mut_ptr(), plane, first);
                            }
                            Ring::Reordered => {
                                to_blocked_span(simd, image.add(from * w), ic, h * w, (to - from) * w, dst, win_plane)
                            }
                        }
                        from = to;
                    }
                    held = Some((b, lo..hi));
                    (DwSource { x: ring.as_ptr(), ring: band.cap, h, w }, win_plane)
                } else {
                    (DwSource { x: image, ring: h, h, w }, in_plane)
                };
                depthwise_span(simd, self.dw, &src.0, src.1, y0..y1, dwb.as_mut_ptr(), dw_plane);
                let at = b * oc.div_ceil(BLOCK) * out_plane + y0 * ow * BLOCK;
                let span = Span {
                    x: dwb.as_ptr(),
                    x_plane: dw_plane,
                    npix: (y1 - y0) * ow,
                    out: out.get().add(at),
                    out_plane,
                    residual: residual.then(|| x.as_ptr().add(at)),
                };
                pointwise_span(simd, self.pw, &span);
            }
            r += y1 - y0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::blocked::{depthwise3x3, pointwise, to_blocked};
    use crate::graph::Conv;

    /// A random convolution for the fused-op test.
    fn conv(
        rnd: &mut impl FnMut() -> f32,
        (cin, cout, kernel, stride): (usize, usize, usize, usize),
        act: crate::graph::Act,
    ) -> Conv {
        let groups = if kernel == 3 { cin } else { 1 };
        Conv::with_values("c", [cin, cout, kernel, stride, groups], act, rnd)
    }

    /// Elements of `op`'s output (run on `x` with `slots` slots of band buffers, all NaN at first) whose
    /// bits differ from `want`'s.
    fn differing_bits(simd: Simd, op: &FusedOp, x: &[f32], residual: bool, slots: usize, want: &[f32]) -> usize {
        let slot = op.slot_floats();
        let mut bands = vec![f32::NAN; slots * slot];
        let mut got = vec![f32::NAN; want.len()];
        op.run(simd, x, &mut got, residual, &mut bands, slot);
        got.iter().zip(want).filter(|(g, e)| g.to_bits() != e.to_bits()).count()
    }

    /// The band-by-band op against the whole-map kernels it is made of, bit for bit: with and without
    /// an expansion, strides 1 and 2, shortcuts, odd sizes, batches, one to seven slots, bands of one
    /// row (wide expansions: the ring of three rows wraps every band) and of many.
    #[test]
    fn a_fused_op_equals_its_kernels_run_on_whole_maps() {
        use crate::graph::Act;
        let sets = Simd::supported();
        if sets.is_empty() {
            eprintln!("no AVX2 or AVX-512 on this machine: the fused op is not run");
            return;
        }
        let mut rnd = crate::cpu::conv::tests::uniform(41);
        // (n, cin, expanded channels (0: no expansion), cout, h, w, stride, shortcut)
        let cases = [
            (1, 16, 96, 24, 37, 29, 2, false),
            (2, 24, 144, 24, 21, 17, 1, true),
            (1, 32, 0, 64, 19, 23, 1, false),
            (2, 64, 0, 128, 13, 11, 2, false),
            (1, 40, 576, 40, 12, 40, 1, true),
            (1, 20, 960, 36, 6, 50, 2, false),
            (3, 16, 16, 16, 1, 1, 1, true),
            (1, 16, 48, 16, 2, 3, 2, false),
            (2, 24, 0, 40, 9, 31, 2, false),
            (1, 8, 0, 16, 1, 5, 1, false),
        ];
        for (n, cin, cm, cout, h, w, s, shortcut) in cases {
            let ex = (cm > 0).then(|| conv(&mut rnd, (cin, cm, 1, 1), Act::Relu6));
            let mid = if cm > 0 { cm } else { cin };
            let dwc = conv(&mut rnd, (mid, mid, 3, s), Act::Leaky(0.1));
            let pwc = conv(&mut rnd, (mid, cout, 1, 1), Act::None);
            let (oh, ow) = (crate::reference::out_size(h, 3, s, 1), crate::reference::out_size(w, 3, s, 1));
            let x: Vec<f32> = (0..n * cin * h * w).map(|_| rnd() * 3.0).collect();
            let (exw, dww, pww) = (
                ex.as_ref().map(|c| PointwiseWeights::new(c).unwrap()),
                DepthwiseWeights::new(&dwc).unwrap(),
                PointwiseWeights::new(&pwc).unwrap(),
            );
            for &simd in &sets {
                let mut xb = vec![0.0; blocked_len(n, cin, h * w)];
                to_blocked(simd, &x, n, cin, h * w, &mut xb);
                // The whole maps, one kernel after the other.
                let expanded = exw.as_ref().map(|e| {
                    let mut y = vec![0.0; blocked_len(n, mid, h * w)];
                    pointwise(simd, e, &xb, n, h * w, &mut y, None);
                    y
                });
                let mut dwy = vec![0.0; blocked_len(n, mid, oh * ow)];
                depthwise3x3(simd, &dww, expanded.as_deref().unwrap_or(&xb), n, h, w, &mut dwy);
                let mut want = vec![0.0; blocked_len(n, cout, oh * ow)];
                pointwise(simd, &pww, &dwy, n, oh * ow, &mut want, shortcut.then_some(&xb[..]));
                let op = FusedOp::new(exw.as_ref(), &dww, &pww, n, (h, w));
                let band = op.band();
                for slots in [1, 2, 3, 7] {
                    let differ = differing_bits(simd, &op, &xb, shortcut, slots, &want);
                    assert_eq!(
                        differ, 0,
                        "{simd:?} {cin}->{cm}->{cout} {h}x{w} s{s} n{n} {band:?}, {slots} slots: elements differ"
                    );
                }
                // Without an expansion or a shortcut, the same op reading the NCHW input (each band's
                // rows reordered into the ring) gives the same bits, in its own bands and in bands of
                // one row (the ring of three rows wraps every band).
                if cm == 0 && !shortcut {
                    let nchw = FusedOp::from_nchw(&dww, &pww, n, (h, w));
                    assert!(nchw.reads_nchw() && nchw.band().cap > 0);
                    for (op, slots) in
                        [(nchw, 1), (nchw, 3), (FusedOp::from_nchw(&dww, &pww, n, (h, w)).with_band_rows(1), 2)]
                    {
                        let differ = differing_bits(simd, &op, &x, false, slots, &want);
                        assert_eq!(
                            differ,
                            0,
                            "{simd:?} NCHW input {cin}->{cout} {h}x{w} s{s} n{n} {:?}, {slots} slots",
                            op.band()
                        );
                    }
                }
            }
        }
    }

    /// A stem computed band by band into the first pair's ring (`FusedOp::from_stem`) against the stem
    /// on the whole map (`conv_blocked`) then the pair on the whole maps, bit for bit: 3x3 stride-2 and
    /// 7x7 stems, partial channel blocks, depthwise strides 1 and 2, odd sizes, a batch, one to three
    /// slots, bands of one row.
    #[test]
    fn a_stem_computed_into_the_ring_equals_the_stem_then_the_pair() {
        use crate::cpu::conv::{conv_blocked, handles_blocked};
        use crate::graph::Act;
        let sets = Simd::supported();
        if sets.is_empty() {
            eprintln!("no AVX2 or AVX-512 on this machine: the fused op is not run");
            return;
        }
        let mut rnd = crate::cpu::conv::tests::uniform(43);
        // (n, stem cin, stem cout, stem kernel, stem stride, pair cout, dw stride, h, w)
        let cases = [
            (1, 3, 16, 3, 2, 32, 1, 37, 29),
            (2, 3, 24, 3, 2, 16, 2, 21, 18),
            (1, 3, 32, 7, 2, 40, 1, 19, 25),
            (1, 5, 16, 3, 1, 16, 1, 6, 9),
            (1, 3, 16, 3, 2, 16, 2, 2, 3),
        ];
        for (n, cin, c, k, ks, cout, s, h, w) in cases {
            let stem = Conv::with_values("stem", [cin, c, k, ks, 1], Act::Leaky(0.1), &mut rnd);
            let dwc = conv(&mut rnd, (c, c, 3, s), Act::Relu6);
            let pwc = conv(&mut rnd, (c, cout, 1, 1), Act::None);
            let (dww, pww) = (DepthwiseWeights::new(&dwc).unwrap(), PointwiseWeights::new(&pwc).unwrap());
            let (sh, sw) = (out_size(h, k, ks, k / 2), out_size(w, k, ks, k / 2));
            let (oh, ow) = (out_size(sh, 3, s, 1), out_size(sw, 3, s, 1));
            let x: Vec<f32> = (0..n * cin * h * w).map(|_| rnd() * 3.0).collect();
            for &simd in &sets {
                assert!(handles_blocked(&stem, simd));
                let mut y = vec![0.0; blocked_len(n, c, sh * sw)];
                conv_blocked(simd, &stem, &x, false, n, (h, w), &mut y, None);
                let mut dwy = vec![0.0; blocked_len(n, c, oh * ow)];
                depthwise3x3(simd, &dww, &y, n, sh, sw, &mut dwy);
                let mut want = vec![0.0; blocked_len(n, cout, oh * ow)];
                pointwise(simd, &pww, &dwy, n, oh * ow, &mut want, None);
                let op = FusedOp::from_stem(simd, &stem, &dww, &pww, n, (h, w)).expect("a dense stem");
                assert!(op.reads_nchw() && op.input == (cin, h, w) && op.output == (cout, oh, ow));
                for (op, slots) in [(op, 1), (op, 3), (op.with_band_rows(1), 2)] {
                    let differ = differing_bits(simd, &op, &x, false, slots, &want);
                    assert_eq!(
                        differ,
                        0,
                        "{simd:?} stem {cin}->{c} k{k} s{ks}, pair s{s} -> {cout}, {h}x{w} n{n} {:?}, {slots} slots",
                        op.band()
                    );
                }
            }
        }
        // A stem of other channels than the depthwise step's is not taken.
        let stem = Conv::with_values("stem", [3, 16, 3, 2, 1], Act::None, &mut rnd);
        let dw = DepthwiseWeights::new(&conv(&mut rnd, (32, 32, 3, 1), Act::None)).unwrap();
        let pw = PointwiseWeights::new(&conv(&mut rnd, (32, 16, 1, 1), Act::None)).unwrap();
        assert!(FusedOp::from_stem(sets[0], &stem, &dw, &pw, 1, (8, 8)).is_none());
    }
}
