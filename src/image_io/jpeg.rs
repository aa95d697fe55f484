//! JPEG decoding with libjpeg-turbo's decoder (vendored by `mozjpeg-sys`, built from C by cargo), set up
//! as OpenCV's `imread(IMREAD_COLOR)` sets it up (modules/imgcodecs/src/grfmt_jpeg.cpp): the default
//! accurate integer IDCT, fancy upsampling, three-component images straight to BGR, four-component ones
//! (CMYK, and YCCK, which libjpeg turns into CMYK) to CMYK and then to BGR by OpenCV's formula. So the
//! pixels are OpenCV's, bit for bit.
//!
//! libjpeg reports fatal errors through `error_exit`, which must not return: it unwinds (a Rust panic
//! payload through C compiled with -fexceptions, the `C-unwind` ABI) to the `catch_unwind` here. Warnings
//! (corrupt or missing data, which libjpeg would paper over with grey) are errors too, raised at once,
//! except extraneous bytes between markers, which lose no pixel.

use super::{BgrImage, DecodeLimits};
use mozjpeg_sys::*;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};

/// The unwinding payload of a fatal libjpeg error: its formatted message.
struct Fatal(String);

fn message(cinfo: &mut jpeg_common_struct) -> String {
    let buf = [0u8; 80];
    // SAFETY: `err` is the manager set up in `decode`, whose format_message is libjpeg's own.
    unsafe {
        if let Some(f) = (*cinfo.err).format_message {
            f(cinfo, &buf);
        }
    }
    let n = buf.iter().position(|&c| c == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

unsafe extern "C-unwind" fn error_exit(cinfo: &mut jpeg_common_struct) {
    // resume_unwind, not panic!: no panic hook runs, nothing is printed.
    resume_unwind(Box::new(Fatal(message(cinfo))))
}

unsafe extern "C-unwind" fn emit_message(cinfo: &mut jpeg_common_struct, level: c_int) {
    if level >= 0 {
        return; // trace messages
    }
    // SAFETY: `err` is set up in `Decompressor::new` and outlives the decompressor.
    let code = unsafe { (*cinfo.err).msg_code };
    if code == JWRN_EXTRANEOUS_DATA as c_int {
        return;
    }
    // An error here, so stop at once: a hostile file must not make libjpeg work on through bad data.
    resume_unwind(Box::new(Fatal(format!("corrupt or truncated JPEG data: {}", message(cinfo)))))
}

/// More scans than any sensible progressive file has (libjpeg-turbo's own tools stop at 500): each scan
/// is another pass over the whole coefficient buffer, so thousands of tiny scans cost minutes.
const MAX_SCANS: c_int = 500;

unsafe extern "C-unwind" fn progress_monitor(cinfo: &mut jpeg_common_struct) {
    if cinfo.is_decompressor == 0 {
        return;
    }
    // SAFETY: a decompressor's common struct is the first field of its jpeg_decompress_struct.
    let scans = unsafe { (*(cinfo as *mut jpeg_common_struct as *mut jpeg_decompress_struct)).input_scan_number };
    if scans > MAX_SCANS {
        resume_unwind(Box::new(Fatal(format!("JPEG has more than {MAX_SCANS} scans"))))
    }
}

/// Header facts, read without decoding any pixel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub width: u32,
    pub height: u32,
    pub components: u32,
}

/// The decompressor, destroyed on every path (including an unwind out of libjpeg).
struct Decompressor {
    cinfo: Box<jpeg_decompress_struct>,
    _err: Box<jpeg_error_mgr>,
    _progress: Box<jpeg_progress_mgr>,
}

impl Decompressor {
    fn new(bytes: &[u8]) -> Result<Self, String> {
        // SAFETY: zeroed C structs are what libjpeg's own examples start from; jpeg_std_error fills the
        // manager, and jpeg_create_decompress the decompressor. Boxes keep the addresses libjpeg stores.
        unsafe {
            let mut err: Box<jpeg_error_mgr> = Box::new(std::mem::zeroed());
            jpeg_std_error(&mut err);
            err.error_exit = Some(error_exit);
            err.emit_message = Some(emit_message);
            let mut cinfo: Box<jpeg_decompress_struct> = Box::new(std::mem::zeroed());
            cinfo.common.err = &mut *err;
            let mut progress: Box<jpeg_progress_mgr> = Box::new(std::mem::zeroed());
            progress.progress_monitor = Some(progress_monitor);
            let mut d = Decompressor { cinfo, _err: err, _progress: progress };
            guarded(|| {
                jpeg_create_decompress(&mut *d.cinfo);
            })?;
            // After creation, which zeroes everything but the error manager and client data.
            d.cinfo.common.progress = &mut *d._progress;
            guarded(|| {
                jpeg_mem_src(&mut d.cinfo, bytes.as_ptr(), bytes.len() as c_ulong);
                // EXIF (APP1) kept for the orientation, as OpenCV reads it.
                jpeg_save_markers(&mut d.cinfo, 0xE1, 0xFFFF);
                jpeg_read_header(&mut d.cinfo, 1);
            })?;
            Ok(d)
        }
    }

    fn header(&self) -> Header {
        Header {
            width: self.cinfo.image_width,
            height: self.cinfo.image_height,
            components: self.cinfo.num_components as u32,
        }
    }

    /// The EXIF block (TIFF header onwards) of the first APP1 marker that holds one.
    fn exif(&self) -> Option<Vec<u8>> {
        let mut m = self.cinfo.marker_list;
        while !m.is_null() {
            // SAFETY: libjpeg's saved-marker list, alive until the decompressor is destroyed.
            let mk = unsafe { &*m };
            let data = unsafe { std::slice::from_raw_parts(mk.data, mk.data_length as usize) };
            if mk.marker == 0xE1 && data.starts_with(b"Exif\0\0") {
                return Some(data[6..].to_vec());
            }
            m = mk.next;
        }
        None
    }
}

impl Drop for Decompressor {
    fn drop(&mut self) {
        // SAFETY: created in `new`; destroy is safe after any error (libjpeg frees its pools).
        let _ = guarded(|| unsafe { jpeg_destroy_decompress(&mut self.cinfo) });
    }
}

/// Runs libjpeg calls, turning a fatal error's unwind into its message.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| match payload.downcast::<Fatal>() {
        Ok(fatal) => fatal.0,
        Err(other) => resume_unwind(other),
    })
}

/// Reads the header only.
pub fn probe(bytes: &[u8]) -> Result<Header, String> {
    Ok(Decompressor::new(bytes)?.header())
}

/// Decodes to BGR as OpenCV does; the EXIF block is returned for the caller to orient the image.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<(BgrImage, Option<Vec<u8>>), String> {
    let mut d = Decompressor::new(bytes)?;
    let h = d.header();
    super::check_limits(h.width, h.height, limits)?;
    // Before jpeg_finish_decompress, which frees the saved markers with the image's memory pool.
    let exif = d.exif();
    let (w, hgt) = (h.width as usize, h.height as usize);
    let cmyk = h.components == 4;
    let cinfo = &mut *d.cinfo;
    cinfo.dct_method = J_DCT_METHOD::JDCT_ISLOW;
    cinfo.do_fancy_upsampling = 1;
    if cmyk {
        cinfo.out_color_space = JCS_CMYK;
        cinfo.out_color_components = 4;
    } else {
        cinfo.out_color_space = JCS_EXT_BGR;
        cinfo.out_color_components = 3;
    }
    let channels = if cmyk { 4 } else { 3 };
    let mut out = vec![0u8; w * hgt * channels];
    guarded(|| unsafe {
        jpeg_start_decompress(cinfo);
        if cinfo.output_width as usize != w || cinfo.output_height as usize != hgt {
            return Err(format!(
                "libjpeg output size {}x{} differs from the header's",
                cinfo.output_width, cinfo.output_height
            ));
        }
        while (cinfo.output_scanline as usize) < hgt {
            let y = cinfo.output_scanline as usize;
            let mut row = [out[y * w * channels..].as_mut_ptr()];
            if jpeg_read_scanlines(cinfo, row.as_mut_ptr(), 1) != 1 {
                return Err("libjpeg returned no scanline".to_string());
            }
        }
        jpeg_finish_decompress(cinfo);
        Ok(())
    })??;
    let data = if cmyk { cmyk_to_bgr(&out) } else { out };
    Ok((BgrImage { width: w, height: hgt, data }, exif))
}

/// OpenCV's `icvCvt_CMYK2BGR_8u_C4C3R`: libjpeg hands over Adobe's inverted CMYK as stored, and each
/// channel becomes `k - ((255 - c) * k >> 8)`.
fn cmyk_to_bgr(cmyk: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(cmyk.len() / 4 * 3);
    for p in cmyk.chunks_exact(4) {
        let k = p[3] as i32;
        let f = |v: u8| (k - (((255 - v as i32) * k) >> 8)) as u8;
        out.extend_from_slice(&[f(p[2]), f(p[1]), f(p[0])]);
    }
    out
}
