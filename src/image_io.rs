//! Image → BGR u8 pixels, as the reference's `cv2.imread(path, IMREAD_COLOR)` gives them: EXIF orientation
//! applied, grey replicated to three channels, alpha dropped (not blended), 16-bit samples shifted right
//! by 8. JPEG through libjpeg-turbo's decoder set up as OpenCV sets it up (see `jpeg`), so the pixels
//! are OpenCV's. Decoding is bounded: dimensions and buffer size are checked before any pixel is decoded.
//! Also the resize plans (original size, the reference's multi-scale protocol, a fixed longest side)
//! with OpenCV's bilinear `INTER_LINEAR` in its fixed-point form.

use crate::error::{Error, Result};
use image::{DynamicImage, ImageDecoder, ImageReader};

mod jpeg;
use std::io::Cursor;
use std::path::Path;

/// An 8-bit BGR image, rows top to bottom, pixels interleaved B, G, R (OpenCV's HWC layout).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BgrImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl BgrImage {
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        if data.len() != width * height * 3 {
            return Err(Error::InvalidArgument(format!(
                "BGR buffer of {} bytes does not hold {width}x{height}x3",
                data.len()
            )));
        }
        Ok(BgrImage { width, height, data })
    }

    /// The `[x0, y0, w, h]` crop (the goldens' `crop`).
    pub fn crop(&self, x0: usize, y0: usize, w: usize, h: usize) -> Result<BgrImage> {
        if x0 + w > self.width || y0 + h > self.height {
            return Err(Error::InvalidArgument(format!(
                "crop [{x0}, {y0}, {w}, {h}] lies outside the {}x{} image",
                self.width, self.height
            )));
        }
        let mut data = Vec::with_capacity(w * h * 3);
        for y in y0..y0 + h {
            data.extend_from_slice(&self.data[(y * self.width + x0) * 3..(y * self.width + x0 + w) * 3]);
        }
        Ok(BgrImage { width: w, height: h, data })
    }
}

/// Bounds on what a decode may allocate.
#[derive(Clone, Copy, Debug)]
pub struct DecodeLimits {
    pub max_pixels: u64,
    pub max_dimension: u32,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits { max_pixels: 100_000_000, max_dimension: 32_768 }
    }
}

pub fn load(path: &Path, limits: &DecodeLimits) -> Result<BgrImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode(&bytes, &path.display().to_string(), limits)
}

/// What an image's header says, read without decoding a pixel: for admission control before decoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: ImageKind,
    pub width: u32,
    pub height: u32,
    /// Bytes per pixel of the decoder's own output before its conversion to BGR, an upper bound:
    /// 16-bit PNG samples take two bytes, and a PNG is counted with alpha whenever a
    /// tRNS chunk (which may follow IHDR) could add it.
    pub decoder_bytes_per_pixel: u64,
    /// An upper estimate of the bytes a decode holds at its peak: the decoder's own buffers (its
    /// output, a progressive JPEG's coefficients) plus the BGR output.
    pub decode_bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    Jpeg,
    Png,
}

fn kind_of(bytes: &[u8]) -> Option<ImageKind> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(ImageKind::Jpeg)
    } else if bytes.starts_with(PNG_SIGNATURE) {
        Some(ImageKind::Png)
    } else {
        None
    }
}

const PNG_SIGNATURE: &[u8] = &[0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

/// Reads the header of JPEG or PNG bytes; checks nothing against limits.
pub fn probe(bytes: &[u8], source_name: &str) -> Result<ImageInfo> {
    let err = |msg: String| Error::Image { source_name: source_name.to_string(), msg };
    match kind_of(bytes) {
        Some(ImageKind::Jpeg) => {
            let h = jpeg::probe(bytes).map_err(err)?;
            if !(1..=4).contains(&h.components) {
                return Err(err(format!("JPEG with {} colour components", h.components)));
            }
            let pixels = h.width as u64 * h.height as u64;
            // The 8-bit libjpeg-turbo API decodes to 8-bit samples (it refuses 12-bit files).
            let decoder_bytes_per_pixel = u64::from(h.components.max(3));
            // Output rows plus, should the file be progressive, every component's coefficients (2 bytes a
            // sample; the header read does not say, so counted always).
            let coefficients = pixels * h.components as u64 * 2;
            let decode_bytes = pixels * (decoder_bytes_per_pixel + 3) + coefficients;
            Ok(ImageInfo {
                format: ImageKind::Jpeg,
                width: h.width,
                height: h.height,
                decoder_bytes_per_pixel,
                decode_bytes,
            })
        }
        Some(ImageKind::Png) => {
            let (width, height, bytes_per_pixel) = png_header(bytes).map_err(err)?;
            let pixels = width as u64 * height as u64;
            let decoder_bytes_per_pixel = u64::from(bytes_per_pixel);
            // PNG sides are u32 (a header may claim 2³²−1 each): saturate rather than wrap.
            let decode_bytes = pixels.saturating_mul(decoder_bytes_per_pixel + 3);
            Ok(ImageInfo { format: ImageKind::Png, width, height, decoder_bytes_per_pixel, decode_bytes })
        }
        None => Err(err("not a JPEG or PNG image (unrecognised signature)".into())),
    }
}

/// Width, height and decoded bytes per pixel from a PNG's IHDR; grey, RGB and palette images are
/// counted with the alpha channel a later tRNS chunk would make the decoder add.
fn png_header(bytes: &[u8]) -> std::result::Result<(u32, u32, u32), String> {
    let ihdr = bytes.get(8..33).ok_or("PNG ends inside its header")?;
    if &ihdr[4..8] != b"IHDR" || u32::from_be_bytes([ihdr[0], ihdr[1], ihdr[2], ihdr[3]]) != 13 {
        return Err("PNG without an IHDR chunk first".into());
    }
    let width = u32::from_be_bytes([ihdr[8], ihdr[9], ihdr[10], ihdr[11]]);
    let height = u32::from_be_bytes([ihdr[12], ihdr[13], ihdr[14], ihdr[15]]);
    let (depth, color) = (ihdr[16], ihdr[17]);
    let channels = match color {
        0 => 2,     // grey, plus alpha if tRNS follows
        2 | 3 => 4, // RGB or palette (expanded to RGB), plus alpha if tRNS follows
        4 => 2,
        6 => 4,
        other => return Err(format!("PNG colour type {other} is invalid")),
    };
    // 16-bit samples stay 16-bit; lower depths expand to 8 bits.
    Ok((width, height, channels * if depth == 16 { 2 } else { 1 }))
}

pub(crate) fn check_limits(w: u32, h: u32, limits: &DecodeLimits) -> std::result::Result<(), String> {
    if w == 0 || h == 0 {
        return Err(format!("image has zero size ({w}x{h})"));
    }
    if w > limits.max_dimension || h > limits.max_dimension || u64::from(w) * u64::from(h) > limits.max_pixels {
        return Err(format!(
            "{w}x{h} image exceeds the limits ({} pixels, {} per side)",
            limits.max_pixels, limits.max_dimension
        ));
    }
    Ok(())
}

/// Decodes JPEG or PNG bytes. `source_name` names the input in errors.
pub fn decode(bytes: &[u8], source_name: &str, limits: &DecodeLimits) -> Result<BgrImage> {
    let err = |msg: String| Error::Image { source_name: source_name.to_string(), msg };
    if bytes.is_empty() {
        return Err(err("empty input".into()));
    }
    match kind_of(bytes) {
        Some(ImageKind::Jpeg) => {
            check_jpeg_complete(bytes).map_err(err)?;
            let (img, exif) = jpeg::decode(bytes, limits).map_err(err)?;
            let orientation = exif
                .and_then(|e| image::metadata::Orientation::from_exif_chunk(&e))
                .unwrap_or(image::metadata::Orientation::NoTransforms);
            Ok(orient(img, orientation))
        }
        Some(ImageKind::Png) => decode_png(bytes, limits).map_err(err),
        None => {
            let guessed = image::guess_format(bytes).ok();
            Err(err(match guessed {
                Some(f) => format!("{f:?} images are not supported (JPEG and PNG are)"),
                None => "not a JPEG or PNG image (unrecognised signature)".into(),
            }))
        }
    }
}

/// Applies an EXIF orientation to BGR pixels (the transforms do not care about channel order).
fn orient(img: BgrImage, orientation: image::metadata::Orientation) -> BgrImage {
    if orientation == image::metadata::Orientation::NoTransforms {
        return img;
    }
    let (w, h) = (img.width as u32, img.height as u32);
    let Some(buf) = image::RgbImage::from_raw(w, h, img.data) else {
        unreachable!("BgrImage holds width * height * 3 bytes")
    };
    let mut d = DynamicImage::ImageRgb8(buf);
    d.apply_orientation(orientation);
    let (width, height) = (d.width() as usize, d.height() as usize);
    BgrImage { width, height, data: d.into_rgb8().into_raw() }
}

/// The PNG chunks that only carry metadata OpenCV ignores for pixels, and that may be compressed (a
/// 1 GiB zlib-compressed ICC profile fits in a small file): dropped before decoding, so that decoding
/// memory is bounded by the pixels alone.
const PNG_METADATA_CHUNKS: [&[u8; 4]; 4] = [b"iCCP", b"zTXt", b"iTXt", b"tEXt"];

/// The PNG without its metadata chunks; unchanged past the first malformed chunk (the decoder reports it).
fn strip_png_metadata(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&bytes[..PNG_SIGNATURE.len().min(bytes.len())]);
    let mut pos = PNG_SIGNATURE.len();
    while pos + 12 <= bytes.len() {
        let len = u32::from_be_bytes([bytes[pos], bytes[pos + 1], bytes[pos + 2], bytes[pos + 3]]) as usize;
        let Some(end) = pos.checked_add(12).and_then(|p| p.checked_add(len)).filter(|&e| e <= bytes.len()) else {
            break;
        };
        let kind = &bytes[pos + 4..pos + 8];
        if !PNG_METADATA_CHUNKS.iter().any(|k| k.as_slice() == kind) {
            out.extend_from_slice(&bytes[pos..end]);
        }
        pos = end;
        if kind == b"IEND" {
            return out;
        }
    }
    out.extend_from_slice(&bytes[pos.min(bytes.len())..]);
    out
}

/// A palette (PLTE) must be whole RGB entries, at most 256 of them, as libpng (OpenCV) requires; the png
/// crate panics on a palette that ends inside an entry (found by fuzz/fuzz_targets/image.rs).
fn check_png_palette(bytes: &[u8]) -> std::result::Result<(), String> {
    let mut pos = PNG_SIGNATURE.len();
    while pos + 12 <= bytes.len() {
        let len = u32::from_be_bytes([bytes[pos], bytes[pos + 1], bytes[pos + 2], bytes[pos + 3]]) as usize;
        let kind = &bytes[pos + 4..pos + 8];
        if kind == b"PLTE" && (len == 0 || !len.is_multiple_of(3) || len > 3 * 256) {
            return Err(format!("PNG palette (PLTE) of {len} bytes: not 1 to 256 RGB entries of 3 bytes"));
        }
        if kind == b"IDAT" || kind == b"IEND" {
            break; // the palette comes before the image data
        }
        match pos.checked_add(12).and_then(|p| p.checked_add(len)) {
            Some(end) => pos = end,
            None => break,
        }
    }
    Ok(())
}

fn decode_png(bytes: &[u8], limits: &DecodeLimits) -> std::result::Result<BgrImage, String> {
    let (w, h, bytes_per_pixel) = png_header(bytes)?;
    check_limits(w, h, limits)?;
    check_png_palette(bytes)?;
    // Defence in depth: a panic inside the third-party decoder on some input nobody has found yet is
    // that input's error, not the process's end.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decode_png_checked(bytes, w, h, bytes_per_pixel, limits)))
        .unwrap_or_else(|p| {
            let what = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
            Err(format!("the PNG decoder failed on this file: {}", what.unwrap_or_else(|| "no message".into())))
        })
}

fn decode_png_checked(
    bytes: &[u8],
    w: u32,
    h: u32,
    bytes_per_pixel: u32,
    limits: &DecodeLimits,
) -> std::result::Result<BgrImage, String> {
    let stripped = strip_png_metadata(bytes);
    let mut reader = ImageReader::new(Cursor::new(&stripped[..]));
    reader.set_format(image::ImageFormat::Png);
    // Everything the decoder may allocate: the pixels at their stored depth, plus room for the row
    // buffers and the EXIF chunk kept for orientation.
    let mut il = image::Limits::default();
    il.max_image_width = Some(limits.max_dimension);
    il.max_image_height = Some(limits.max_dimension);
    il.max_alloc = Some(u64::from(w) * u64::from(h) * u64::from(bytes_per_pixel) + (16 << 20));
    reader.limits(il);
    let mut decoder = reader.into_decoder().map_err(|e| format!("cannot read the header: {e}"))?;
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| format!("corrupt or truncated image data: {e}"))?;
    img.apply_orientation(orientation);
    Ok(to_bgr(&img))
}

/// A cut file is refused: it must end with the end-of-image marker (trailing bytes after it are allowed,
/// as OpenCV allows them). A cut file with an end-of-image marker appended passes this, but not the
/// decoder, which reports the missing data as a warning that is an error here.
fn check_jpeg_complete(bytes: &[u8]) -> std::result::Result<(), String> {
    let last_sos = bytes.windows(2).rposition(|m| m == [0xFF, 0xDA]);
    let last_eoi = bytes.windows(2).rposition(|m| m == [0xFF, 0xD9]);
    match (last_sos, last_eoi) {
        (None, _) => Err("JPEG without image data (no start-of-scan marker)".into()),
        (Some(s), Some(e)) if e > s => Ok(()),
        _ => Err("truncated JPEG (no end-of-image marker after the image data)".into()),
    }
}

/// OpenCV's IMREAD_COLOR conversion to BGR.
fn to_bgr(img: &DynamicImage) -> BgrImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut data = Vec::with_capacity(w * h * 3);
    match img {
        DynamicImage::ImageLuma8(b) => b.pixels().for_each(|p| data.extend_from_slice(&[p[0]; 3])),
        DynamicImage::ImageLumaA8(b) => b.pixels().for_each(|p| data.extend_from_slice(&[p[0]; 3])),
        DynamicImage::ImageRgb8(b) => b.pixels().for_each(|p| data.extend_from_slice(&[p[2], p[1], p[0]])),
        DynamicImage::ImageRgba8(b) => b.pixels().for_each(|p| data.extend_from_slice(&[p[2], p[1], p[0]])),
        DynamicImage::ImageLuma16(b) => b.pixels().for_each(|p| data.extend_from_slice(&[(p[0] >> 8) as u8; 3])),
        DynamicImage::ImageLumaA16(b) => b.pixels().for_each(|p| data.extend_from_slice(&[(p[0] >> 8) as u8; 3])),
        DynamicImage::ImageRgb16(b) => {
            b.pixels().for_each(|p| data.extend_from_slice(&[(p[2] >> 8) as u8, (p[1] >> 8) as u8, (p[0] >> 8) as u8]))
        }
        DynamicImage::ImageRgba16(b) => {
            b.pixels().for_each(|p| data.extend_from_slice(&[(p[2] >> 8) as u8, (p[1] >> 8) as u8, (p[0] >> 8) as u8]))
        }
        other => other.to_rgb8().pixels().for_each(|p| data.extend_from_slice(&[p[2], p[1], p[0]])),
    }
    BgrImage { width: w, height: h, data }
}

/// How an image is sized before the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResizeMode {
    /// The reference's default: the network runs at the image's own size.
    Original,
    /// WIDER FACE multi-scale protocol: shorter side to 1600 unless the longer would pass 2150.
    MultiScale,
    /// Longer side to N pixels.
    LongSide(u32),
}

impl std::str::FromStr for ResizeMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "original" => Ok(ResizeMode::Original),
            "multiscale" => Ok(ResizeMode::MultiScale),
            _ => s
                .strip_prefix("long-side:")
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|&n| n >= 1)
                .map(ResizeMode::LongSide)
                .ok_or_else(|| {
                    Error::InvalidArgument(format!("resize mode `{s}`: expected original, multiscale or long-side:N"))
                }),
        }
    }
}

/// The factor r the image is scaled by (1 for original size), computed in f64 as the reference does.
pub fn resize_factor(mode: ResizeMode, h: usize, w: usize) -> f64 {
    let (min, max) = (h.min(w) as f64, h.max(w) as f64);
    match mode {
        ResizeMode::Original => 1.0,
        ResizeMode::MultiScale => {
            let r = 1600.0 / min;
            if (r * max).round() > 2150.0 { 2150.0 / max } else { r }
        }
        ResizeMode::LongSide(n) => n as f64 / max,
    }
}

/// Applies `mode`: returns the network input and the factor r. No copy when r is 1.
pub fn apply_resize(img: &BgrImage, mode: ResizeMode) -> (std::borrow::Cow<'_, BgrImage>, f64) {
    let spec = ResizeSpec::for_mode(mode, img.width, img.height);
    (resized_by(img, &spec), spec.scale)
}

/// `img` resized as `spec` says (its canvas aside); borrowed when the pixels stay as they are.
fn resized_by<'a>(img: &'a BgrImage, spec: &ResizeSpec) -> std::borrow::Cow<'a, BgrImage> {
    if spec.keeps_pixels(img.width, img.height) {
        std::borrow::Cow::Borrowed(img)
    } else {
        std::borrow::Cow::Owned(resize_bilinear(img, spec.new_w, spec.new_h, spec.fx, spec.fy))
    }
}

/// Where an image goes on the network input: resized by `fx`, `fy` to `new_w`×`new_h`, at the top left
/// of a `canvas_w`×`canvas_h` canvas that is black elsewhere (the canvas equals the resized image for
/// [`ResizeMode`]s, and is the fixed input of the reference's video letterbox). Detections are divided
/// by `scale`. One spec drives the host resize ([`apply_spec`]) and the device's (kernels/resize.cu).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ResizeSpec {
    pub new_w: usize,
    pub new_h: usize,
    pub canvas_w: usize,
    pub canvas_h: usize,
    pub fx: f64,
    pub fy: f64,
    pub scale: f64,
}

impl ResizeSpec {
    /// The spec of `mode` for a `w`×`h` image: what [`apply_resize`] does.
    pub fn for_mode(mode: ResizeMode, w: usize, h: usize) -> ResizeSpec {
        let r = resize_factor(mode, h, w);
        let (new_w, new_h) = if r == 1.0 { (w, h) } else { resized_dims(w, h, r) };
        ResizeSpec { new_w, new_h, canvas_w: new_w, canvas_h: new_h, fx: r, fy: r, scale: r }
    }

    /// True when the pixels are copied unchanged: no resize (a canvas may still pad them).
    pub fn keeps_pixels(&self, w: usize, h: usize) -> bool {
        self.fx == 1.0 && self.fy == 1.0 && (self.new_w, self.new_h) == (w, h)
    }

    /// Checks the spec against a `w`×`h` source: sizes non-zero, the image inside the canvas.
    pub fn check(&self, w: usize, h: usize) -> Result<()> {
        let ok = w > 0
            && h > 0
            && self.new_w > 0
            && self.new_h > 0
            && self.new_w <= self.canvas_w
            && self.new_h <= self.canvas_h
            && self.fx.is_finite()
            && self.fy.is_finite()
            && self.fx > 0.0
            && self.fy > 0.0
            && self.scale.is_finite()
            && self.scale > 0.0;
        if !ok {
            return Err(Error::InvalidArgument(format!(
                "resize of a {w}x{h} image to {}x{} (factors {}, {}) on a {}x{} canvas is not possible",
                self.new_w, self.new_h, self.fx, self.fy, self.canvas_w, self.canvas_h
            )));
        }
        Ok(())
    }
}

/// The network input `spec` makes of `img` on the host: OpenCV's bilinear resize, then the canvas. No
/// copy when nothing changes.
pub fn apply_spec<'a>(img: &'a BgrImage, spec: &ResizeSpec) -> Result<std::borrow::Cow<'a, BgrImage>> {
    spec.check(img.width, img.height)?;
    let resized = resized_by(img, spec);
    if (spec.canvas_w, spec.canvas_h) == (spec.new_w, spec.new_h) {
        return Ok(resized);
    }
    let mut data = vec![0u8; spec.canvas_w * spec.canvas_h * 3];
    let row = spec.new_w * 3;
    for y in 0..spec.new_h {
        data[y * spec.canvas_w * 3..][..row].copy_from_slice(&resized.data[y * row..(y + 1) * row]);
    }
    Ok(std::borrow::Cow::Owned(BgrImage::new(spec.canvas_w, spec.canvas_h, data)?))
}

/// The output size OpenCV gives `resize(src, None, fx=r, fy=r)`: each side times r, rounded half to even.
pub fn resized_dims(w: usize, h: usize, r: f64) -> (usize, usize) {
    (round_half_even(w as f64 * r).max(1.0) as usize, round_half_even(h as f64 * r).max(1.0) as usize)
}

fn round_half_even(v: f64) -> f64 {
    let r = v.round();
    if (v - v.trunc()).abs() == 0.5 && r % 2.0 != 0.0 { r - 1.0 } else { r }
}

const COEF_BITS: u32 = 11;
const COEF_ONE: i32 = 1 << COEF_BITS;

/// Per destination coordinate: the two source indices and their 11-bit weights, OpenCV's half-pixel
/// rule `src = (dst + 0.5) / scale − 0.5`. Columns (`clamp_weights`) are clamped as OpenCV clamps them:
/// past an edge the weight goes wholly to the edge pixel. Rows are not: OpenCV keeps the fraction and
/// clamps only the row indices, so an edge row is blended with itself (which rounds differently).
pub(crate) fn linear_taps(
    dst_len: usize,
    src_len: usize,
    scale: f64,
    clamp_weights: bool,
) -> Vec<(usize, usize, i32, i32)> {
    let inv = 1.0 / scale;
    let last = src_len as i64 - 1;
    (0..dst_len)
        .map(|d| {
            let f = ((d as f64 + 0.5) * inv - 0.5) as f32;
            let mut s = f.floor() as i64;
            let mut frac = f - s as f32;
            if clamp_weights {
                if s < 0 {
                    s = 0;
                    frac = 0.0;
                }
                if s >= last {
                    s = last;
                    frac = 0.0;
                }
            }
            let a0 = ((1.0 - frac) * COEF_ONE as f32).round_ties_even() as i32;
            let a1 = (frac * COEF_ONE as f32).round_ties_even() as i32;
            (s.clamp(0, last) as usize, (s + 1).clamp(0, last) as usize, a0, a1)
        })
        .collect()
}

/// OpenCV switches an exact 2x linear downscale to its fast area path.
pub(crate) fn halves_by_area(fx: f64, fy: f64) -> bool {
    1.0 / fx == 2.0 && 1.0 / fy == 2.0
}

/// OpenCV `resize(..., fx, fy, INTER_LINEAR)` on 8-bit BGR: horizontal pass to 32-bit sums, vertical pass
/// with the rounding of its vectorised path `((s0>>4)·b0>>16 + (s1>>4)·b1>>16 + 2) >> 2`.
pub fn resize_bilinear(img: &BgrImage, ow: usize, oh: usize, fx: f64, fy: f64) -> BgrImage {
    let (w, h) = (img.width, img.height);
    if halves_by_area(fx, fy) {
        return halve_area(img, ow, oh);
    }
    let xt = linear_taps(ow, w, fx, true);
    let yt = linear_taps(oh, h, fy, false);
    let hrow = |y: usize| -> Vec<i32> {
        let src = &img.data[y * w * 3..(y + 1) * w * 3];
        let mut out = vec![0i32; ow * 3];
        for (dx, &(sx0, sx1, a0, a1)) in xt.iter().enumerate() {
            for c in 0..3 {
                out[dx * 3 + c] = src[sx0 * 3 + c] as i32 * a0 + src[sx1 * 3 + c] as i32 * a1;
            }
        }
        out
    };
    let mut data = vec![0u8; ow * oh * 3];
    for (dy, &(sy0, sy1, b0, b1)) in yt.iter().enumerate() {
        let r0 = hrow(sy0);
        let r1 = hrow(sy1);
        let dst = &mut data[dy * ow * 3..(dy + 1) * ow * 3];
        for i in 0..ow * 3 {
            let t = (((r0[i] >> 4) * b0) >> 16) + (((r1[i] >> 4) * b1) >> 16);
            dst[i] = ((t + 2) >> 2).clamp(0, 255) as u8;
        }
    }
    BgrImage { width: ow, height: oh, data }
}

/// OpenCV's fast INTER_AREA for an exact 2x downscale: the mean of each 2×2 block, `(Σ + 2) >> 2`; a
/// block cut by the image edge averages the pixels it has, rounded half to even.
fn halve_area(img: &BgrImage, ow: usize, oh: usize) -> BgrImage {
    let (w, h) = (img.width, img.height);
    let mut data = vec![0u8; ow * oh * 3];
    for dy in 0..oh {
        for dx in 0..ow {
            for c in 0..3 {
                let (mut sum, mut count) = (0u32, 0u32);
                for sy in (2 * dy)..(2 * dy + 2).min(h) {
                    for sx in (2 * dx)..(2 * dx + 2).min(w) {
                        sum += img.data[(sy * w + sx) * 3 + c] as u32;
                        count += 1;
                    }
                }
                data[(dy * ow + dx) * 3 + c] = match count {
                    4 => ((sum + 2) >> 2) as u8,
                    0 => 0,
                    _ => (sum as f32 / count as f32).round_ties_even() as u8,
                };
            }
        }
    }
    BgrImage { width: ow, height: oh, data }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_ihdr(w: u32, h: u32, depth: u8, colour: u8) -> Vec<u8> {
        let mut png = PNG_SIGNATURE.to_vec();
        png.extend_from_slice(&13u32.to_be_bytes());
        png.extend_from_slice(b"IHDR");
        png.extend_from_slice(&w.to_be_bytes());
        png.extend_from_slice(&h.to_be_bytes());
        png.extend_from_slice(&[depth, colour, 0, 0, 0, 0, 0, 0, 0]); // + a CRC nobody reads here
        png
    }

    #[test]
    fn probe_reads_size_and_decoder_layout_from_headers() {
        let info = probe(&png_ihdr(4096, 2048, 16, 6), "a.png").unwrap();
        assert_eq!((info.width, info.height, info.decoder_bytes_per_pixel), (4096, 2048, 8));
        // RGB and palette images are counted with the alpha a tRNS chunk would add; grey likewise.
        assert_eq!(probe(&png_ihdr(64, 64, 8, 2), "rgb.png").unwrap().decoder_bytes_per_pixel, 4);
        assert_eq!(probe(&png_ihdr(64, 64, 8, 3), "pal.png").unwrap().decoder_bytes_per_pixel, 4);
        assert_eq!(probe(&png_ihdr(64, 64, 16, 0), "grey.png").unwrap().decoder_bytes_per_pixel, 4);
        let e = probe(&png_ihdr(64, 64, 8, 5), "bad.png").unwrap_err().to_string();
        assert!(e.contains("bad.png") && e.contains("colour type 5"), "{e}");
        assert!(probe(&png_ihdr(64, 64, 8, 2)[..20], "cut.png").is_err());
        // Found by the libFuzzer target: sides of 2³²−1 overflowed the byte count (a panic with overflow
        // checks, a small wrong estimate without). It saturates.
        let huge = probe(&png_ihdr(u32::MAX, u32::MAX - 210, 8, 6), "huge.png").unwrap();
        assert_eq!(huge.decode_bytes, u64::MAX);
    }

    #[test]
    fn a_palette_that_ends_inside_an_entry_is_an_error_not_a_panic() {
        // The libFuzzer find, reduced: a 13x7 1-bit palette PNG whose PLTE holds 131 bytes (43⅔
        // entries); the png crate indexed past it. Then the whole fuzzer artefact.
        let mut png = png_ihdr(13, 7, 1, 3);
        png.extend_from_slice(&131u32.to_be_bytes());
        png.extend_from_slice(b"PLTE");
        png.extend_from_slice(&[7u8; 131 + 4]);
        png.extend_from_slice(&[0, 0, 0, 0]);
        png.extend_from_slice(b"IEND");
        let limits = DecodeLimits::default();
        let e = decode(&png, "p.png", &limits).unwrap_err().to_string();
        assert!(e.contains("p.png") && e.contains("PLTE") && e.contains("131"), "{e}");
        let artefact =
            std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/image/regress_png_plte_131.png"))
                .expect("committed fuzz regression input");
        assert!(decode(&artefact, "f.png", &limits).unwrap_err().to_string().contains("PLTE"));
        // Whole entries still decode (the committed palette seed).
        let ok = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/image/palette.png")).unwrap();
        assert!(decode(&ok, "palette.png", &limits).is_ok());
        assert!(probe(b"GIF89a", "x.gif").unwrap_err().to_string().contains("unrecognised signature"));

        for (colour, components) in [(image::ExtendedColorType::Rgb8, 3), (image::ExtendedColorType::L8, 1)] {
            let (w, h) = (640u32, 480u32);
            let pixels = vec![90u8; (w * h) as usize * components];
            let mut jpeg = Vec::new();
            image::codecs::jpeg::JpegEncoder::new(&mut jpeg).encode(&pixels, w, h, colour).unwrap();
            let info = probe(&jpeg, "a.jpg").unwrap();
            assert_eq!((info.format, info.width, info.height), (ImageKind::Jpeg, w, h));
            // libjpeg's output is BGR (3 bytes) also for grey; the coefficients of a progressive file
            // (2 bytes a sample per component) and the BGR image are in the peak.
            assert_eq!(info.decoder_bytes_per_pixel, 3);
            let px = u64::from(w * h);
            assert_eq!(info.decode_bytes, px * 3 + px * components as u64 * 2 + px * 3);
            // Cut inside the entropy-coded data: the header still reads.
            assert!(probe(&jpeg[..jpeg.len() / 2], "half.jpg").is_ok());
        }
        // A scan before any frame header is refused.
        let e = probe(&[0xFF, 0xD8, 0xFF, 0xC4, 0, 2, 0xFF, 0xDA, 0, 2], "nosof.jpg").unwrap_err().to_string();
        assert!(e.contains("nosof.jpg"), "{e}");
    }
}
