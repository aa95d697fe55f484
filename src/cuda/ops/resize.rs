//! The resize family (kernels/resize.cu): decoded images of any sizes → one u8 batch of network inputs
//! on the device, bit-exact with the host's [`image_io::apply_spec`] (OpenCV INTER_LINEAR, its 2x area
//! path, the video letterbox). The host computes only the per-column and per-row taps (the very
//! function its own resize uses, a few KB); every pixel is made on the device.

use super::dim;
use crate::consts::{RESIZE_AREA_HALF, RESIZE_BILINEAR, RESIZE_COPY};
use crate::cuda::params::ResizeParams;
use crate::cuda::runner::{DevBuf, KernelRunner, KernelRunnerExt, LaunchDims};
use crate::error::{Error, Result};
use crate::image_io::{self, BgrImage, ResizeSpec};

/// What one batch's launch reads besides the pixels, as the kernel lays it out: per image the byte
/// offset of its pixels, its descriptor (src_w, src_h, new_w, new_h, mode, x taps, y taps, 0), and
/// the taps (s0, s1, w0, w1) of every destination column and row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tables {
    pub src_off: Vec<i64>,
    pub desc: Vec<i32>,
    pub taps: Vec<i32>,
    /// Bytes of all images' pixels.
    pub src_bytes: usize,
    pub canvas_w: usize,
    pub canvas_h: usize,
}

impl Tables {
    /// The metadata as one upload: offsets (8-byte aligned first), descriptors, taps.
    fn meta_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(8 * self.src_off.len() + 4 * (self.desc.len() + self.taps.len()));
        v.extend_from_slice(bytemuck::cast_slice(&self.src_off));
        v.extend_from_slice(bytemuck::cast_slice(&self.desc));
        v.extend_from_slice(bytemuck::cast_slice(&self.taps));
        v
    }
}

/// The tables of `specs` applied to images of `sizes` (w, h); every spec must have the same canvas.
pub fn tables(sizes: &[(usize, usize)], specs: &[ResizeSpec]) -> Result<Tables> {
    if sizes.len() != specs.len() || sizes.is_empty() {
        return Err(Error::InvalidArgument(format!("{} images but {} resize specs", sizes.len(), specs.len())));
    }
    let (canvas_w, canvas_h) = (specs[0].canvas_w, specs[0].canvas_h);
    let mut t = Tables { src_off: Vec::new(), desc: Vec::new(), taps: Vec::new(), src_bytes: 0, canvas_w, canvas_h };
    for (&(w, h), s) in sizes.iter().zip(specs) {
        s.check(w, h)?;
        if (s.canvas_w, s.canvas_h) != (canvas_w, canvas_h) {
            return Err(Error::InvalidArgument(format!(
                "one device resize batch mixes canvases {canvas_w}x{canvas_h} and {}x{}",
                s.canvas_w, s.canvas_h
            )));
        }
        t.src_off.push(i64::try_from(t.src_bytes).map_err(|_| Error::InvalidArgument("batch too large".into()))?);
        t.src_bytes += w * h * 3;
        let mode = if s.keeps_pixels(w, h) {
            RESIZE_COPY
        } else if image_io::halves_by_area(s.fx, s.fy) {
            RESIZE_AREA_HALF
        } else {
            RESIZE_BILINEAR
        };
        let (xt, yt) = (t.taps.len(), t.taps.len() + 4 * s.new_w);
        if mode == RESIZE_BILINEAR {
            for (s0, s1, w0, w1) in image_io::linear_taps(s.new_w, w, s.fx, true)
                .into_iter()
                .chain(image_io::linear_taps(s.new_h, h, s.fy, false))
            {
                t.taps.extend([dim(s0, "tap")?, dim(s1, "tap")?, w0, w1]);
            }
        }
        t.desc.extend([
            dim(w, "image width")?,
            dim(h, "image height")?,
            dim(s.new_w, "resized width")?,
            dim(s.new_h, "resized height")?,
            mode as i32,
            dim(xt, "tap offset")?,
            dim(yt, "tap offset")?,
            0,
        ]);
    }
    dim(t.taps.len(), "taps")?;
    Ok(t)
}

/// Device memory a resize keeps between batches, grown when a batch needs more: the images' pixels and
/// the tables.
#[derive(Clone, Copy, Debug)]
pub struct Staging {
    pub src: DevBuf,
    pub meta: DevBuf,
}

impl Staging {
    pub fn all(&self) -> [DevBuf; 2] {
        [self.src, self.meta]
    }
}

/// Allocates `bytes` in `slot` unless it holds enough already (grown by half again, so a slowly
/// growing stream of sizes reallocates rarely).
fn ensure(r: &mut dyn KernelRunner, slot: &mut Option<DevBuf>, bytes: usize) -> Result<DevBuf> {
    if let Some(b) = *slot
        && b.bytes >= bytes
    {
        return Ok(b);
    }
    if let Some(old) = slot.take() {
        r.free(old)?;
    }
    let b = r.alloc((bytes + bytes / 2).max(256))?;
    *slot = Some(b);
    Ok(b)
}

/// Uploads `images` (each once, as decoded) and resizes them on the device by `specs` into `dst`
/// ([n][canvas_h][canvas_w][3] u8), reusing `staging`.
pub fn run(
    r: &mut dyn KernelRunner,
    staging: &mut Option<Staging>,
    images: &[&BgrImage],
    specs: &[ResizeSpec],
    dst: DevBuf,
) -> Result<()> {
    let sizes: Vec<(usize, usize)> = images.iter().map(|i| (i.width, i.height)).collect();
    let t = tables(&sizes, specs)?;
    let n = images.len();
    let out_bytes = n * t.canvas_w * t.canvas_h * 3;
    if dst.bytes < out_bytes {
        return Err(Error::Cuda(format!("resize output of {out_bytes} bytes does not fit {} bytes", dst.bytes)));
    }
    let meta = t.meta_bytes();
    let (mut src, mut mb) = (staging.map(|s| s.src), staging.map(|s| s.meta));
    let bufs = ensure(r, &mut src, t.src_bytes).and_then(|s| Ok((s, ensure(r, &mut mb, meta.len())?)));
    // Whatever was allocated stays in the slot (and is freed with it), even when the other failed.
    *staging = match (src, mb) {
        (Some(src), Some(meta)) => Some(Staging { src, meta }),
        (a, b) => {
            for x in [a, b].into_iter().flatten() {
                r.free(x)?;
            }
            None
        }
    };
    let (src_buf, meta_buf) = bufs?;
    for (img, &off) in images.iter().zip(&t.src_off) {
        r.upload(src_buf, off as usize, &img.data)?;
    }
    r.upload(meta_buf, 0, &meta)?;
    let pixels = t.canvas_w * t.canvas_h;
    let p = ResizeParams {
        src: src_buf.ptr,
        src_off: meta_buf.ptr,
        desc: meta_buf.at(8 * n),
        taps: meta_buf.at(8 * n + 4 * t.desc.len()),
        dst: dst.ptr,
        n: dim(n, "batch")?,
        cw: dim(t.canvas_w, "canvas width")?,
        ch: dim(t.canvas_h, "canvas height")?,
        pad0: 0,
    };
    dim(pixels, "canvas pixels")?;
    let grid_y = u32::try_from(n).ok().filter(|&g| g <= 65_535).ok_or_else(|| {
        Error::InvalidArgument(format!("a device resize batch of {n} images exceeds the grid's 65535"))
    })?;
    let dims = LaunchDims { grid: [pixels.div_ceil(256).max(1) as u32, grid_y, 1], block: [256, 1, 1] };
    r.launch("resize_bgr_u8", dims, &p)
}
