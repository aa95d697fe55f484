//! The reference video script's input rule: the frame resized with its aspect ratio kept to fit a
//! `W`×`H` canvas, placed at the top left of a black canvas; boxes come back divided by one factor,
//! `new_height / frame height`, for both axes (as the reference does, though the width was truncated
//! separately).

use crate::error::{Error, Result};
use crate::image_io::{self, BgrImage, ResizeMode, ResizeSpec};

/// How frames are sized before the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameResize {
    /// The reference webcam script: aspect-preserving fit into a `width`×`height` canvas, top left.
    Letterbox { width: usize, height: usize },
    /// One of the engine's resize modes (original, long-side:N).
    Mode(ResizeMode),
}

impl Default for FrameResize {
    fn default() -> Self {
        FrameResize::Letterbox { width: 640, height: 640 }
    }
}

impl std::str::FromStr for FrameResize {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if let Some(size) = s.strip_prefix("letterbox:") {
            let bad =
                || Error::InvalidArgument(format!("resize `{s}`: expected letterbox:WxH, e.g. letterbox:640x640"));
            let (w, h) = size.split_once('x').ok_or_else(bad)?;
            let (width, height) = (w.parse::<usize>().map_err(|_| bad())?, h.parse::<usize>().map_err(|_| bad())?);
            if width == 0 || height == 0 || width * height > crate::engine::MAX_INPUT_PIXELS {
                return Err(bad());
            }
            return Ok(FrameResize::Letterbox { width, height });
        }
        match s.parse::<ResizeMode>() {
            // Multi-scale targets still images of WIDER FACE; for video it would only be slow.
            Ok(ResizeMode::MultiScale) | Err(_) => {
                Err(Error::InvalidArgument(format!("resize `{s}`: expected letterbox:WxH, original or long-side:N")))
            }
            Ok(m) => Ok(FrameResize::Mode(m)),
        }
    }
}

/// Where the frame lands on the canvas and the factor detections are divided by.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Geometry {
    pub new_width: usize,
    pub new_height: usize,
    pub factor: f64,
}

/// The reference rule: `im_ratio = h / w` against `model_ratio = H / W`; the constrained side takes the
/// canvas size, the other is truncated (`int(...)`); factor = new_height / h.
pub fn geometry(frame_w: usize, frame_h: usize, canvas_w: usize, canvas_h: usize) -> Result<Geometry> {
    if frame_w == 0 || frame_h == 0 {
        return Err(Error::InvalidArgument(format!("frame size {frame_w}x{frame_h} is empty")));
    }
    let im_ratio = frame_h as f64 / frame_w as f64;
    let model_ratio = canvas_h as f64 / canvas_w as f64;
    let (new_width, new_height) = if im_ratio > model_ratio {
        ((canvas_h as f64 / im_ratio) as usize, canvas_h)
    } else {
        (canvas_w, (canvas_w as f64 * im_ratio) as usize)
    };
    if new_width == 0 || new_height == 0 {
        return Err(Error::InvalidArgument(format!(
            "frame {frame_w}x{frame_h} is too elongated for a {canvas_w}x{canvas_h} letterbox (it would be {new_width}x{new_height})"
        )));
    }
    Ok(Geometry { new_width, new_height, factor: new_height as f64 / frame_h as f64 })
}

/// The letterbox as a [`ResizeSpec`], for resizing on the executor's device ([`crate::Engine::detect_specs`]):
/// the same geometry and factors as [`letterbox`].
pub fn spec(frame_w: usize, frame_h: usize, canvas_w: usize, canvas_h: usize) -> Result<ResizeSpec> {
    let g = geometry(frame_w, frame_h, canvas_w, canvas_h)?;
    Ok(ResizeSpec {
        new_w: g.new_width,
        new_h: g.new_height,
        canvas_w,
        canvas_h,
        fx: g.new_width as f64 / frame_w as f64,
        fy: g.new_height as f64 / frame_h as f64,
        scale: g.factor,
    })
}

/// The frame on its canvas, as `cv2.resize(frame, (new_w, new_h))` (bilinear) placed at the top left.
pub fn letterbox(img: &BgrImage, canvas_w: usize, canvas_h: usize) -> Result<(BgrImage, f64)> {
    let g = geometry(img.width, img.height, canvas_w, canvas_h)?;
    // OpenCV derives the scale from the requested size: dsize / ssize per axis.
    let resized = if (g.new_width, g.new_height) == (img.width, img.height) {
        std::borrow::Cow::Borrowed(img)
    } else {
        let fx = g.new_width as f64 / img.width as f64;
        let fy = g.new_height as f64 / img.height as f64;
        std::borrow::Cow::Owned(image_io::resize_bilinear(img, g.new_width, g.new_height, fx, fy))
    };
    let mut data = vec![0u8; canvas_w * canvas_h * 3];
    let row = g.new_width * 3;
    for y in 0..g.new_height {
        data[y * canvas_w * 3..y * canvas_w * 3 + row].copy_from_slice(&resized.data[y * row..(y + 1) * row]);
    }
    Ok((BgrImage::new(canvas_w, canvas_h, data)?, g.factor))
}

/// The network input of a frame and the factor its detections are divided by.
pub fn prepare(img: &BgrImage, resize: FrameResize) -> Result<(BgrImage, f64)> {
    match resize {
        FrameResize::Letterbox { width, height } => letterbox(img, width, height),
        FrameResize::Mode(m) => {
            let (im, r) = image_io::apply_resize(img, m);
            Ok((im.into_owned(), r))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn landscape_portrait_and_odd_frames_follow_the_reference_rule() {
        // Landscape: width constrained, height = int(640 * 720 / 1280) = 360.
        assert_eq!(geometry(1280, 720, 640, 640).unwrap(), Geometry { new_width: 640, new_height: 360, factor: 0.5 });
        // Portrait: height constrained, width = int(640 / (1280 / 720)) = 360.
        let g = geometry(720, 1280, 640, 640).unwrap();
        assert_eq!((g.new_width, g.new_height), (360, 640));
        assert_eq!(g.factor, 640.0 / 1280.0);
        // Odd sizes truncate: 641x479 -> h = int(640 * 479 / 641) = int(478.25...) = 478.
        let g = geometry(641, 479, 640, 640).unwrap();
        assert_eq!((g.new_width, g.new_height), (640, 478));
        assert_eq!(g.factor, 478.0 / 479.0);
        // 333x777 portrait: w = int(640 / (777 / 333)) = int(274.28...) = 274.
        let g = geometry(333, 777, 640, 640).unwrap();
        assert_eq!((g.new_width, g.new_height), (274, 640));
        // A square frame fills the square canvas; a non-square canvas compares the two ratios.
        assert_eq!(geometry(500, 500, 640, 640).unwrap().new_width, 640);
        assert_eq!(geometry(1280, 720, 640, 480).unwrap(), Geometry { new_width: 640, new_height: 360, factor: 0.5 });
        assert!(geometry(100_000, 1, 640, 640).is_err());
    }

    #[test]
    fn canvas_holds_the_bilinear_resize_at_the_top_left_and_black_elsewhere() {
        let (w, h) = (37, 23);
        let data: Vec<u8> = (0..w * h * 3).map(|i| (i * 31 % 253) as u8).collect();
        let img = BgrImage::new(w, h, data).unwrap();
        let (canvas, r) = letterbox(&img, 64, 64).unwrap();
        let g = geometry(w, h, 64, 64).unwrap();
        assert_eq!(r, g.factor);
        let resized =
            image_io::resize_bilinear(&img, g.new_width, g.new_height, 64.0 / 37.0, g.new_height as f64 / 23.0);
        for y in 0..64 {
            for x in 0..64 {
                let px = &canvas.data[(y * 64 + x) * 3..(y * 64 + x) * 3 + 3];
                if x < g.new_width && y < g.new_height {
                    let i = (y * g.new_width + x) * 3;
                    assert_eq!(px, &resized.data[i..i + 3], "({x}, {y})");
                } else {
                    assert_eq!(px, &[0, 0, 0], "({x}, {y}) is padding");
                }
            }
        }
    }

    #[test]
    fn the_spec_on_the_host_is_the_letterbox() {
        for (w, h, cw, ch) in [(37, 23, 64, 64), (23, 37, 64, 48), (64, 64, 64, 64), (128, 90, 64, 64), (5, 60, 32, 32)]
        {
            let data: Vec<u8> = (0..w * h * 3).map(|i| (i * 131 % 251) as u8).collect();
            let img = BgrImage::new(w, h, data).unwrap();
            let s = spec(w, h, cw, ch).unwrap();
            let (want, factor) = letterbox(&img, cw, ch).unwrap();
            assert_eq!(s.scale, factor);
            assert_eq!(image_io::apply_spec(&img, &s).unwrap().as_ref(), &want, "{w}x{h} on {cw}x{ch}");
        }
        assert!(spec(5, 200, 32, 32).is_err(), "too elongated, as letterbox refuses it");
    }

    #[test]
    fn resize_strings() {
        assert_eq!(
            "letterbox:640x480".parse::<FrameResize>().unwrap(),
            FrameResize::Letterbox { width: 640, height: 480 }
        );
        assert_eq!("original".parse::<FrameResize>().unwrap(), FrameResize::Mode(ResizeMode::Original));
        assert_eq!("long-side:320".parse::<FrameResize>().unwrap(), FrameResize::Mode(ResizeMode::LongSide(320)));
        for bad in ["letterbox:640", "letterbox:0x640", "multiscale", "square"] {
            assert!(bad.parse::<FrameResize>().is_err(), "{bad}");
        }
    }
}
