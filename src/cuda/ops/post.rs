//! The post-processing family (kernels/post.cu): score threshold and order-preserving compaction, a
//! radix sort by score, decoding, NMS (bitmask or tiled) and the packing of the kept detections, all
//! on the device, for any number of candidates; only the detections are downloaded (their count, then
//! count × 15 floats).

use super::dim;
use super::heads::{CandidateOut, FusedHeadArgs};
use crate::cuda::params::*;
use crate::cuda::runner::{DevBuf, KernelRunner, KernelRunnerExt, LaunchDims};
use crate::detection::Detection;
use crate::error::{Error, Result};
use crate::post::{PostOptions, RawOutput, anchors};

/// Which NMS runs. `Auto` takes the bitmask path when k (the candidates kept before NMS, at most) is
/// at most [`NMS_BITMASK_MAX`], the tiled path otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NmsPath {
    Auto,
    /// k²/64 mask words per image, built in parallel, reduced by one block: k ≤ [`NMS_BITMASK_MAX`].
    Bitmask,
    /// Tiles of 256 sorted candidates against the detections kept so far: any k, O(k) memory.
    Tiled,
}

/// A plan's post-processing buffers on the device, sized once from its batch `n` and anchors `a`.
pub struct PostBufs {
    n: usize,
    a: usize,
    /// Candidates per image (keys = ~score bits, values = anchor index), sorted ping-pong.
    keys: [DevBuf; 2],
    vals: [DevBuf; 2],
    /// [n][256][tiles] digit counts, then scatter bases.
    hist: DevBuf,
    count: DevBuf,
    kept: DevBuf,
    resize: DevBuf,
    /// [n][A] boxes ×4, scores, landmarks ×10 of the sorted candidates; after NMS, the packed detections.
    cand: DevBuf,
    /// [n][min(A, NMS_BITMASK_MAX)][words] suppression bits of the bitmask path.
    mask: DevBuf,
    /// [n][max_out][15] kept detections per image.
    dets: DevBuf,
    det_count: DevBuf,
}

impl PostBufs {
    /// Allocates the buffers of an n-image batch with `a` anchors per image.
    pub fn new(r: &mut dyn KernelRunner, n: usize, a: usize) -> Result<PostBufs> {
        let kb = a.min(NMS_BITMASK_MAX);
        let tiles = a.div_ceil(RADIX_TILE);
        Ok(PostBufs {
            n,
            a,
            keys: [r.alloc(4 * n * a)?, r.alloc(4 * n * a)?],
            vals: [r.alloc(4 * n * a)?, r.alloc(4 * n * a)?],
            hist: r.alloc(4 * n * 256 * tiles)?,
            count: r.alloc(4 * n)?,
            kept: r.alloc(4 * n)?,
            resize: r.alloc(4 * n)?,
            cand: r.alloc(4 * n * a * 15)?,
            mask: r.alloc(8 * n * kb * kb.div_ceil(64))?,
            dets: r.alloc(4 * n * a * 15)?,
            det_count: r.alloc(4 * n)?,
        })
    }

    /// The detection counts and the packed detections a pass leaves (what [`collect`] downloads).
    pub fn outputs(&self) -> (DevBuf, DevBuf) {
        (self.det_count, self.cand)
    }

    pub fn all(&self) -> [DevBuf; 12] {
        [
            self.keys[0],
            self.keys[1],
            self.vals[0],
            self.vals[1],
            self.hist,
            self.count,
            self.kept,
            self.resize,
            self.cand,
            self.mask,
            self.dets,
            self.det_count,
        ]
    }
}

/// (anchors, candidates k, detections kept) for an h×w input.
pub fn post_sizes(h: usize, w: usize, post: &PostOptions) -> (usize, usize, usize) {
    let a = anchors::num_anchors(h, w);
    let k = a.min(post.pre_nms_topk.unwrap_or(a));
    (a, k, k.min(post.post_nms_topk.unwrap_or(k)))
}

/// One post-processing pass: its sizes, NMS path and thresholds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PostPass {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    /// Anchors per image, candidates kept before NMS (at most), detections kept (at most).
    pub a: usize,
    pub k: usize,
    pub max_out: usize,
    pub bitmask: bool,
    pub conf_threshold: f32,
    pub nms_threshold: f32,
}

/// What a pass's launches depend on besides the plan's buffers: (k, max_out, bitmask path, the bits of
/// the score and NMS thresholds).
pub type PostGraphKey = (usize, usize, bool, u32, u32);

impl PostPass {
    /// All the launches depend on but the resize factors, which they read from the device: a captured
    /// graph of the pass is valid for this key.
    pub fn graph_key(&self) -> PostGraphKey {
        (self.k, self.max_out, self.bitmask, self.conf_threshold.to_bits(), self.nms_threshold.to_bits())
    }
}

/// Post-processing of raw outputs already on the device ([loc, conf, landm], each [n][A][d]):
/// threshold, sort, decode, NMS, packing; downloads only the detections. `resizes`: one factor per
/// image, the one its boxes and landmarks are divided by. [`prepare`], [`launch`], [`collect`].
#[allow(clippy::too_many_arguments)]
pub fn run_post(
    r: &mut dyn KernelRunner,
    slot: &mut Option<PostBufs>,
    raw: [DevBuf; 3],
    n: usize,
    h: usize,
    w: usize,
    post: &PostOptions,
    resizes: &[f32],
    path: NmsPath,
) -> Result<Vec<Vec<Detection>>> {
    let Some(pass) = prepare(r, slot, n, h, w, post, resizes, path)? else {
        return Ok(vec![Vec::new(); n]);
    };
    let pb = slot.as_ref().ok_or_else(|| Error::Cuda("post buffers vanished".into()))?;
    launch(r, pb, raw, &pass)?;
    collect(r, pb, &pass)
}

/// Checks the pass, makes the buffers on first use and uploads the resize factors (read by the
/// launches from the device, so a captured graph of them serves every call). None: nothing to do
/// (no candidates can be kept).
#[allow(clippy::too_many_arguments)]
pub fn prepare(
    r: &mut dyn KernelRunner,
    slot: &mut Option<PostBufs>,
    n: usize,
    h: usize,
    w: usize,
    post: &PostOptions,
    resizes: &[f32],
    path: NmsPath,
) -> Result<Option<PostPass>> {
    post.validate()?;
    if resizes.len() != n {
        return Err(Error::InvalidArgument(format!("{} resize factors for a batch of {n} images", resizes.len())));
    }
    if let Some((i, f)) = resizes.iter().enumerate().find(|(_, f)| !(f.is_finite() && **f > 0.0)) {
        return Err(Error::InvalidArgument(format!("resize factor {f} of image {i} is not a positive number")));
    }
    let (a, k, max_out) = post_sizes(h, w, post);
    let bitmask = match path {
        NmsPath::Auto => k <= NMS_BITMASK_MAX,
        NmsPath::Bitmask if k <= NMS_BITMASK_MAX => true,
        NmsPath::Bitmask => {
            return Err(Error::InvalidArgument(format!(
                "the bitmask NMS takes at most {NMS_BITMASK_MAX} candidates per image, not {k}: use the tiled path"
            )));
        }
        NmsPath::Tiled => false,
    };
    if k == 0 || max_out == 0 {
        return Ok(None);
    }
    if slot.is_none() {
        *slot = Some(PostBufs::new(r, n, a)?);
    }
    let pb = slot.as_ref().ok_or_else(|| Error::Cuda("post buffers vanished".into()))?;
    if (pb.n, pb.a) != (n, a) {
        return Err(Error::Cuda(format!(
            "post buffers were made for {} images of {} anchors, not {n} of {a}",
            pb.n, pb.a
        )));
    }
    if r.is_simulation() {
        for b in pb.all() {
            r.poison(b)?;
        }
    }
    r.upload(pb.resize, 0, bytemuck::cast_slice(resizes))?;
    let (conf_threshold, nms_threshold) = (post.conf_threshold, post.nms_threshold);
    Ok(Some(PostPass { n, h, w, a, k, max_out, bitmask, conf_threshold, nms_threshold }))
}

/// Every launch of the pass, reading the raw outputs `raw` and the resize factors [`prepare`]
/// uploaded: no copy, allocation or synchronisation, so it can be captured.
pub fn launch(r: &mut dyn KernelRunner, pb: &PostBufs, raw: [DevBuf; 3], pass: &PostPass) -> Result<()> {
    let PostPass { n, h, w, a, k, .. } = *pass;
    let [loc, conf, landm] = raw;
    dim(n * a * 15, "post-processing elements")?;
    // The compaction pass (shift −1) into keys[0]/vals[0], then four 8-bit digit passes ping-ponging
    // back into keys[0]/vals[0].
    for (i, shift) in [-1i32, 0, 8, 16, 24].into_iter().enumerate() {
        let (src, dst) = if i % 2 == 1 { (0, 1) } else { (1, 0) };
        radix_pass(r, pb, pass, (src, dst), shift, conf.ptr, false)?;
    }
    let (boxes, scores, lands) = cand_regions(pb, pass);
    r.launch(
        "decode_sorted",
        per_image(n, k.div_ceil(128), 128),
        &DecodeParams {
            order: pb.vals[0].ptr,
            kept: pb.kept.ptr,
            loc: loc.ptr,
            conf: conf.ptr,
            landm: landm.ptr,
            resize: pb.resize.ptr,
            boxes,
            scores,
            lands,
            n: dim(n, "batch")?,
            num_anchors: dim(a, "anchors")?,
            img_h: dim(h, "height")?,
            img_w: dim(w, "width")?,
        },
    )?;
    launch_nms(r, pb, pass)
}

/// [`launch`] for the detect path, starting from the heads' inputs instead of the raw outputs: the
/// fused heads (kernels/heads.cu `heads_fused`) threshold and decode every anchor into dense keys and
/// rows; the first radix pass compacts the keys in anchor order while sorting by the lowest digit, so
/// there is no separate compaction pass; `heads_gather` puts the sorted rows where NMS reads them.
/// Capturable as [`launch`] (the threshold is in the pass's graph key, the resize factors on the device).
pub fn launch_fused(
    r: &mut dyn KernelRunner,
    pb: &PostBufs,
    heads: &[FusedHeadArgs; 3],
    pass: &PostPass,
) -> Result<()> {
    let PostPass { n, h, w, a, k, .. } = *pass;
    dim(n * a * 15, "post-processing elements")?;
    if heads.iter().any(|l| l.n != n) {
        return Err(Error::InvalidArgument(format!("fused heads of another batch than the pass's {n} images")));
    }
    // The dense keys go to keys[1] and the rows to `dets` (free until NMS writes it).
    let out = CandidateOut { keys: pb.keys[1].ptr, rows: pb.dets.ptr, resize: pb.resize.ptr };
    super::heads::launch_fused(r, heads, h, w, &out, pass.conf_threshold)?;
    // Four digit passes from the dense keys[1]: 1→0, 0→1, 1→0, 0→1; the order ends in vals[1].
    for (i, shift) in [0i32, 8, 16, 24].into_iter().enumerate() {
        let (src, dst) = if i % 2 == 0 { (1, 0) } else { (0, 1) };
        radix_pass(r, pb, pass, (src, dst), shift, 0, i == 0)?;
    }
    let (boxes, scores, lands) = cand_regions(pb, pass);
    r.launch(
        "heads_gather",
        per_image(n, k.div_ceil(128), 128),
        &HeadGatherParams {
            order: pb.vals[1].ptr,
            kept: pb.kept.ptr,
            rows: pb.dets.ptr,
            boxes,
            scores,
            lands,
            n: dim(n, "batch")?,
            num_anchors: dim(a, "anchors")?,
        },
    )?;
    launch_nms(r, pb, pass)
}

/// A grid of `blocks` blocks per image (at least one), images along y.
fn per_image(n: usize, blocks: usize, threads: u32) -> LaunchDims {
    LaunchDims { grid: [blocks.max(1) as u32, n as u32, 1], block: [threads, 1, 1] }
}

/// The sorted candidates' boxes, scores and landmarks: three regions of `cand`.
fn cand_regions(pb: &PostBufs, pass: &PostPass) -> (u64, u64, u64) {
    let (n, a) = (pass.n, pass.a);
    (pb.cand.ptr, pb.cand.at(4 * n * a * 4), pb.cand.at(4 * n * a * 5))
}

/// One radix pass (histogram, scan, scatter) from keys/vals[src] to keys/vals[dst]: `shift` < 0 is the
/// compaction of `conf`; `dense` reads the fused heads' dense keys (and compacts them) at shift 0.
fn radix_pass(
    r: &mut dyn KernelRunner,
    pb: &PostBufs,
    pass: &PostPass,
    (src, dst): (usize, usize),
    shift: i32,
    conf: u64,
    dense: bool,
) -> Result<()> {
    let tiles = pass.a.div_ceil(RADIX_TILE);
    let p = RadixParams {
        conf,
        keys_in: pb.keys[src].ptr,
        vals_in: pb.vals[src].ptr,
        keys_out: pb.keys[dst].ptr,
        vals_out: pb.vals[dst].ptr,
        hist: pb.hist.ptr,
        count: pb.count.ptr,
        kept: pb.kept.ptr,
        n: dim(pass.n, "batch")?,
        num_anchors: dim(pass.a, "anchors")?,
        tiles: dim(tiles, "radix tiles")?,
        shift,
        k: dim(pass.k, "candidates")?,
        threshold: pass.conf_threshold,
        dense: dense as i32,
        pad0: 0,
    };
    r.launch("radix_hist", per_image(pass.n, tiles, 256), &p)?;
    r.launch("radix_scan", per_image(pass.n, 1, 256), &p)?;
    r.launch("radix_scatter", per_image(pass.n, tiles, 256), &p)
}

/// NMS over the sorted, decoded candidates in `cand` and the packing of the kept detections.
fn launch_nms(r: &mut dyn KernelRunner, pb: &PostBufs, pass: &PostPass) -> Result<()> {
    let PostPass { n, a, k, max_out, bitmask, nms_threshold, .. } = *pass;
    let (ni, ai, ki) = (dim(n, "batch")?, dim(a, "anchors")?, dim(k, "candidates")?);
    let (boxes, scores, lands) = cand_regions(pb, pass);
    let mo = dim(max_out, "post_nms_topk")?;
    if bitmask {
        let words = k.div_ceil(64);
        let wi = dim(words, "words")?;
        r.launch(
            "nms_mask",
            LaunchDims { grid: [words as u32, words as u32, n as u32], block: [64, 1, 1] },
            &NmsMaskParams {
                boxes,
                kept: pb.kept.ptr,
                mask: pb.mask.ptr,
                n: ni,
                k: ki,
                words: wi,
                stride: ai,
                threshold: nms_threshold,
                pad0: 0,
            },
        )?;
        r.launch(
            "nms_reduce",
            LaunchDims { grid: [n as u32, 1, 1], block: [128, 1, 1] },
            &NmsReduceParams {
                mask: pb.mask.ptr,
                kept: pb.kept.ptr,
                boxes,
                scores,
                lands,
                dets: pb.dets.ptr,
                det_count: pb.det_count.ptr,
                n: ni,
                k: ki,
                words: wi,
                stride: ai,
                max_out: mo,
                pad0: 0,
            },
        )?;
    } else {
        r.launch(
            "nms_tiled",
            LaunchDims { grid: [n as u32, 1, 1], block: [NMS_TILE as u32, 1, 1] },
            &NmsTiledParams {
                kept: pb.kept.ptr,
                boxes,
                scores,
                lands,
                dets: pb.dets.ptr,
                det_count: pb.det_count.ptr,
                n: ni,
                stride: ai,
                max_out: mo,
                threshold: nms_threshold,
            },
        )?;
    }
    // The detections of all images packed into the start of `cand` (dead after NMS), so one copy
    // brings them back.
    r.launch(
        "compact_dets",
        per_image(n, max_out.div_ceil(128), 128),
        &CompactParams { dets: pb.dets.ptr, det_count: pb.det_count.ptr, out: pb.cand.ptr, n: ni, max_out: mo },
    )?;
    Ok(())
}

/// The kept detections of a launched pass: the counts, then one copy of all of them.
pub fn collect(r: &mut dyn KernelRunner, pb: &PostBufs, pass: &PostPass) -> Result<Vec<Vec<Detection>>> {
    let counts = r.download_i32(pb.det_count, pass.n)?;
    let sizes = detection_counts(&counts, pass.max_out)?;
    let total: usize = sizes.iter().sum();
    let mut dets = vec![0.0f32; total * 15];
    r.download(pb.cand, 0, bytemuck::cast_slice_mut(&mut dets))?;
    unpack(&sizes, &dets, r.is_simulation())
}

/// The detections kept per image, from the device's counts (each checked against `max_out`).
pub fn detection_counts(counts: &[i32], max_out: usize) -> Result<Vec<usize>> {
    let mut sizes = Vec::with_capacity(counts.len());
    for (b, &c) in counts.iter().enumerate() {
        let c = usize::try_from(c)
            .ok()
            .filter(|&c| c <= max_out)
            .ok_or_else(|| Error::Cuda(format!("device returned {c} detections for image {b}")))?;
        sizes.push(c);
    }
    Ok(sizes)
}

/// The packed detections (15 floats each, image after image, `sizes[b]` of image b) as detections;
/// `check_nan` (the simulation) refuses a value never written.
pub fn unpack(sizes: &[usize], dets: &[f32], check_nan: bool) -> Result<Vec<Vec<Detection>>> {
    let mut out = Vec::with_capacity(sizes.len());
    let mut rows = dets.chunks_exact(15);
    for (b, &c) in sizes.iter().enumerate() {
        let mut v = Vec::with_capacity(c);
        for d in rows.by_ref().take(c) {
            if check_nan && d.iter().any(|x| x.is_nan()) {
                return Err(Error::Cuda(format!("simulation: a detection of image {b} holds NaN (unwritten element)")));
            }
            let mut landmarks = [0.0f32; 10];
            landmarks.copy_from_slice(&d[5..15]);
            v.push(Detection { bbox: [d[0], d[1], d[2], d[3]], score: d[4], landmarks });
        }
        out.push(v);
    }
    Ok(out)
}

/// The device post-processing on raw outputs from the host (all of one size), for tests and for
/// callers that run the network elsewhere. Allocates per call.
pub fn device_postprocess(
    r: &mut dyn KernelRunner,
    raws: &[RawOutput],
    post: &PostOptions,
    resize: f32,
) -> Result<Vec<Vec<Detection>>> {
    device_postprocess_each(r, raws, post, &vec![resize; raws.len()], NmsPath::Auto)
}

/// [`device_postprocess`] with one resize factor per image and a chosen NMS path.
pub fn device_postprocess_each(
    r: &mut dyn KernelRunner,
    raws: &[RawOutput],
    post: &PostOptions,
    resizes: &[f32],
    path: NmsPath,
) -> Result<Vec<Vec<Detection>>> {
    let first = raws.first().ok_or_else(|| Error::InvalidArgument("no raw outputs".into()))?;
    let (h, w) = (first.h, first.w);
    let a = anchors::num_anchors(h, w);
    if raws
        .iter()
        .any(|x| x.h != h || x.w != w || x.loc.len() != a * 4 || x.conf.len() != a * 2 || x.landmarks.len() != a * 10)
    {
        return Err(Error::InvalidArgument("raw outputs of different sizes, or not matching their h×w".into()));
    }
    let n = raws.len();
    let cat =
        |f: &dyn Fn(&RawOutput) -> &Vec<f32>| raws.iter().flat_map(|x| f(x).iter().copied()).collect::<Vec<f32>>();
    let loc = r.alloc_f32(&cat(&|x| &x.loc))?;
    let conf = r.alloc_f32(&cat(&|x| &x.conf))?;
    let landm = r.alloc_f32(&cat(&|x| &x.landmarks))?;
    let mut slot = None;
    let res = run_post(r, &mut slot, [loc, conf, landm], n, h, w, post, resizes, path);
    let mut bufs = vec![loc, conf, landm];
    if let Some(pb) = slot {
        bufs.extend(pb.all());
    }
    for b in bufs {
        r.free(b)?;
    }
    res
}
