//! The post-processing family (kernels/post.cu): score threshold and candidate compaction, top-k
//! ordering, decoding, NMS and compaction of the kept detections, all on the device; only the
//! detections are downloaded.

use super::dim;
use crate::cuda::params::*;
use crate::cuda::runner::{DevBuf, KernelRunner, KernelRunnerExt, LaunchDims};
use crate::detection::Detection;
use crate::error::{Error, Result};
use crate::post::{PostOptions, RawOutput, anchors};

/// A plan's post-processing buffers on the device.
pub struct PostBufs {
    k: usize,
    max_out: usize,
    keys: DevBuf,
    count: DevBuf,
    order: DevBuf,
    kept: DevBuf,
    boxes: DevBuf,
    scores: DevBuf,
    lands: DevBuf,
    mask: DevBuf,
    dets: DevBuf,
    det_count: DevBuf,
}

impl PostBufs {
    pub fn all(&self) -> [DevBuf; 10] {
        [
            self.keys,
            self.count,
            self.order,
            self.kept,
            self.boxes,
            self.scores,
            self.lands,
            self.mask,
            self.dets,
            self.det_count,
        ]
    }
}

/// (anchors, candidates k, detections kept) for an h×w input; an error past the device NMS's limit.
pub fn post_sizes(h: usize, w: usize, post: &PostOptions) -> Result<(usize, usize, usize)> {
    let a = anchors::num_anchors(h, w);
    let k = a.min(post.pre_nms_topk.unwrap_or(a));
    if k > NMS_MAX_CANDIDATES {
        return Err(Error::InvalidArgument(format!(
            "the CUDA NMS takes at most {NMS_MAX_CANDIDATES} candidates per image; this input has {a} anchors: set pre_nms_topk (the default is 5000)"
        )));
    }
    Ok((a, k, k.min(post.post_nms_topk.unwrap_or(k))))
}

/// Post-processing of raw outputs already on the device ([loc, conf, landm], each [n][A][d]):
/// threshold, top-k, decode, NMS, compaction; downloads only the detections.
#[allow(clippy::too_many_arguments)]
pub fn run_post(
    r: &mut dyn KernelRunner,
    slot: &mut Option<PostBufs>,
    raw: [DevBuf; 3],
    n: usize,
    h: usize,
    w: usize,
    post: &PostOptions,
    resize: f32,
) -> Result<Vec<Vec<Detection>>> {
    post.validate()?;
    if !(resize.is_finite() && resize > 0.0) {
        return Err(Error::InvalidArgument(format!("resize factor {resize} is not a positive number")));
    }
    let (a, k, max_out) = post_sizes(h, w, post)?;
    if k == 0 || max_out == 0 {
        return Ok(vec![Vec::new(); n]);
    }
    let words = k.div_ceil(64);
    let [loc, conf, landm] = raw;
    if slot.as_ref().is_none_or(|p| p.k != k || p.max_out != max_out) {
        if let Some(old) = slot.take() {
            for b in old.all() {
                r.free(b)?;
            }
        }
        *slot = Some(PostBufs {
            k,
            max_out,
            keys: r.alloc(8 * n * a)?,
            count: r.alloc(4 * n)?,
            order: r.alloc(4 * n * k)?,
            kept: r.alloc(4 * n)?,
            boxes: r.alloc(4 * n * k * 4)?,
            scores: r.alloc(4 * n * k)?,
            lands: r.alloc(4 * n * k * 10)?,
            mask: r.alloc(8 * n * k * words)?,
            dets: r.alloc(4 * n * max_out * 15)?,
            det_count: r.alloc(4 * n)?,
        });
    }
    let pb = slot.as_ref().ok_or_else(|| Error::Cuda("post buffers vanished".into()))?;
    if r.is_simulation() {
        for b in pb.all() {
            r.poison(b)?;
        }
    }
    r.memset(pb.count, 0)?;
    let (ni, ai, ki, wi) = (dim(n, "batch")?, dim(a, "anchors")?, dim(k, "candidates")?, dim(words, "words")?);
    let per_image =
        |blocks: usize, threads: u32| LaunchDims { grid: [blocks.max(1) as u32, n as u32, 1], block: [threads, 1, 1] };
    r.launch(
        "select_candidates",
        per_image(a.div_ceil(256), 256),
        &SelectParams {
            conf: conf.ptr,
            keys: pb.keys.ptr,
            count: pb.count.ptr,
            n: ni,
            num_anchors: ai,
            threshold: post.conf_threshold,
            pad0: 0,
        },
    )?;
    r.launch(
        "topk_rank",
        per_image(a.div_ceil(256), 256),
        &TopkParams {
            keys: pb.keys.ptr,
            count: pb.count.ptr,
            order: pb.order.ptr,
            kept: pb.kept.ptr,
            n: ni,
            num_anchors: ai,
            k: ki,
            pad0: 0,
        },
    )?;
    r.launch(
        "decode_sorted",
        per_image(k.div_ceil(128), 128),
        &DecodeParams {
            order: pb.order.ptr,
            kept: pb.kept.ptr,
            loc: loc.ptr,
            conf: conf.ptr,
            landm: landm.ptr,
            boxes: pb.boxes.ptr,
            scores: pb.scores.ptr,
            lands: pb.lands.ptr,
            n: ni,
            num_anchors: ai,
            k: ki,
            img_h: dim(h, "height")?,
            img_w: dim(w, "width")?,
            resize,
        },
    )?;
    r.launch(
        "nms_mask",
        LaunchDims { grid: [words as u32, words as u32, n as u32], block: [64, 1, 1] },
        &NmsMaskParams {
            boxes: pb.boxes.ptr,
            kept: pb.kept.ptr,
            mask: pb.mask.ptr,
            n: ni,
            k: ki,
            words: wi,
            threshold: post.nms_threshold,
        },
    )?;
    r.launch(
        "nms_reduce",
        LaunchDims { grid: [n as u32, 1, 1], block: [128, 1, 1] },
        &NmsReduceParams {
            mask: pb.mask.ptr,
            kept: pb.kept.ptr,
            boxes: pb.boxes.ptr,
            scores: pb.scores.ptr,
            lands: pb.lands.ptr,
            dets: pb.dets.ptr,
            det_count: pb.det_count.ptr,
            n: ni,
            k: ki,
            words: wi,
            max_out: dim(max_out, "post_nms_topk")?,
        },
    )?;
    let counts = r.download_i32(pb.det_count, n)?;
    let dets = r.download_f32(pb.dets, n * max_out * 15)?;
    let mut out = Vec::with_capacity(n);
    for (b, &c) in counts.iter().enumerate() {
        let c = usize::try_from(c)
            .ok()
            .filter(|&c| c <= max_out)
            .ok_or_else(|| Error::Cuda(format!("device returned {c} detections for image {b}")))?;
        let mut v = Vec::with_capacity(c);
        for d in dets[b * max_out * 15..][..c * 15].chunks_exact(15) {
            if r.is_simulation() && d.iter().any(|x| x.is_nan()) {
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
    let res = run_post(r, &mut slot, [loc, conf, landm], n, h, w, post, resize);
    let mut bufs = vec![loc, conf, landm];
    if let Some(pb) = slot {
        bufs.extend(pb.all());
    }
    for b in bufs {
        r.free(b)?;
    }
    res
}
