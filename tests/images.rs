//! Image decoding like OpenCV's imread, resize plans, and bad or odd images: each a clear error or a
//! correct answer, never a panic.

use image::{ImageEncoder, RgbImage};
use retinaface::image_io::{self, DecodeLimits, ResizeMode, apply_resize, decode, resize_factor};
use retinaface::{BgrImage, DetectOptions, Engine, Network, WeightsSpec};

fn err_of(bytes: &[u8]) -> String {
    match decode(bytes, "input.bin", &DecodeLimits::default()) {
        Ok(img) => panic!("decoded {}x{} from bad input", img.width, img.height),
        Err(e) => e.to_string(),
    }
}

fn png_bytes(w: u32, h: u32, color: image::ExtendedColorType, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out).write_image(data, w, h, color).unwrap();
    out
}

/// A pattern where every pixel differs, so any flip or rotation is visible.
fn pattern(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 40) as u8, (y * 40) as u8, ((x + y) * 10) as u8]))
}

#[test]
fn bad_images_are_clear_errors() {
    assert!(err_of(b"").contains("empty"));
    assert!(err_of(b"hello, this is not an image").contains("not a JPEG or PNG"));
    assert!(err_of(&[0xff, 0xd8, 0xff, 0xd9]).contains("input.bin"));
    let crowd = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/images/crowd.jpg")).unwrap();
    let e = err_of(&crowd[..crowd.len() / 10]);
    assert!(e.contains("truncated"), "{e}");
    let e = err_of(&crowd[..crowd.len() - 2]);
    assert!(e.contains("truncated"), "{e}");
    // Cut in the middle of the scan with an end-of-image marker appended: the marker check passes, the
    // decoder finds the scan data missing.
    let mut cut = crowd[..crowd.len() / 2].to_vec();
    cut.extend_from_slice(&[0xFF, 0xD9]);
    let e = err_of(&cut);
    assert!(e.contains("input.bin") && e.contains("corrupt or truncated JPEG data"), "{e}");
    // Scan data overwritten with garbage (libjpeg would fill with grey and warn).
    let mut bad = crowd.clone();
    let sos = bad.windows(2).position(|m| m == [0xFF, 0xDA]).unwrap();
    for b in &mut bad[sos + 400..sos + 4000] {
        *b = 0xFF;
    }
    assert!(err_of(&bad).contains("input.bin"));
    // PNG header and IHDR declaring 65535x65535, then IEND: 65 bytes. Must be refused before decoding.
    let mut png = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    let chunk = |png: &mut Vec<u8>, kind: &[u8], data: &[u8]| {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        png.extend_from_slice(&body);
        png.extend_from_slice(&crc32(&body).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&65535u32.to_be_bytes());
    ihdr.extend_from_slice(&65535u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(&mut png, b"IDAT", &[0x78, 0x9c, 0x03, 0x00]);
    chunk(&mut png, b"IEND", &[]);
    let e = err_of(&png);
    assert!(e.contains("65535x65535") && e.contains("limits"), "{e}");
    // A valid header with corrupt pixel data.
    let mut p = png_bytes(8, 8, image::ExtendedColorType::Rgb8, &[7u8; 8 * 8 * 3]);
    let n = p.len();
    p[n - 20..n - 12].copy_from_slice(&[0xAA; 8]);
    err_of(&p);
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

#[test]
fn colour_types_convert_like_opencv_imread() {
    let lim = DecodeLimits::default();
    // grey → three equal channels
    let g = decode(&png_bytes(2, 1, image::ExtendedColorType::L8, &[10, 200]), "g", &lim).unwrap();
    assert_eq!(g.data, vec![10, 10, 10, 200, 200, 200]);
    // RGBA → BGR, alpha dropped, not blended
    let a = decode(&png_bytes(1, 1, image::ExtendedColorType::Rgba8, &[1, 2, 3, 0]), "a", &lim).unwrap();
    assert_eq!(a.data, vec![3, 2, 1]);
    // 16-bit → high byte (OpenCV shifts right by 8)
    let px: Vec<u8> = [0x1234u16, 0xABFF, 0x00FF].iter().flat_map(|v| v.to_ne_bytes()).collect();
    let s = decode(&png_bytes(1, 1, image::ExtendedColorType::Rgb16, &px), "s", &lim).unwrap();
    assert_eq!(s.data, vec![0x00, 0xAB, 0x12]);
    // RGB → BGR
    let c = decode(&png_bytes(1, 1, image::ExtendedColorType::Rgb8, &[9, 8, 7]), "c", &lim).unwrap();
    assert_eq!(c.data, vec![7, 8, 9]);
}

/// A JPEG with an EXIF APP1 segment carrying `orientation`.
fn jpeg_with_orientation(img: &RgbImage, orientation: u16) -> Vec<u8> {
    let mut jpg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 100)
        .write_image(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8)
        .unwrap();
    let mut tiff = b"MM\x00\x2a\x00\x00\x00\x08\x00\x01".to_vec();
    tiff.extend_from_slice(&[0x01, 0x12, 0x00, 0x03, 0x00, 0x00, 0x00, 0x01]);
    tiff.extend_from_slice(&orientation.to_be_bytes());
    tiff.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let mut app1 = b"Exif\x00\x00".to_vec();
    app1.extend_from_slice(&tiff);
    let mut out = jpg[..2].to_vec();
    out.extend_from_slice(&[0xff, 0xe1]);
    out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpg[2..]);
    out
}

#[test]
fn every_exif_orientation_is_applied() {
    let base = pattern(5, 3);
    let plain = decode(&jpeg_with_orientation(&base, 1), "o1", &DecodeLimits::default()).unwrap();
    let px = |img: &BgrImage, x: usize, y: usize| img.data[(y * img.width + x) * 3..][..3].to_vec();
    for o in 1..=8u16 {
        let img = decode(&jpeg_with_orientation(&base, o), "o", &DecodeLimits::default()).unwrap();
        let rotated = o >= 5;
        assert_eq!((img.width, img.height), if rotated { (3, 5) } else { (5, 3) }, "orientation {o}");
        // Where the plain image's pixel (x, y) lands, per EXIF's definition of each orientation.
        for y in 0..3 {
            for x in 0..5 {
                let (w, h) = (5, 3);
                let (dx, dy) = match o {
                    1 => (x, y),
                    2 => (w - 1 - x, y),
                    3 => (w - 1 - x, h - 1 - y),
                    4 => (x, h - 1 - y),
                    5 => (y, x),
                    6 => (h - 1 - y, x),
                    7 => (h - 1 - y, w - 1 - x),
                    _ => (y, w - 1 - x),
                };
                assert_eq!(px(&img, dx, dy), px(&plain, x, y), "orientation {o} pixel ({x},{y})");
            }
        }
    }
}

#[test]
fn resize_plans_follow_the_reference() {
    assert_eq!(resize_factor(ResizeMode::Original, 624, 1024), 1.0);
    // 1600 / 624 · 1024 rounds past 2150, so the longer side is capped.
    assert_eq!(resize_factor(ResizeMode::MultiScale, 624, 1024), 2150.0 / 1024.0);
    assert_eq!(resize_factor(ResizeMode::MultiScale, 1000, 1200), 1.6);
    assert_eq!(resize_factor(ResizeMode::LongSide(640), 360, 540), 640.0 / 540.0);
    assert!("long-side:0".parse::<ResizeMode>().is_err());
    assert!("bogus".parse::<ResizeMode>().is_err());
    // Bilinear with OpenCV's half-pixel centres: an exact 2x upscale of a ramp keeps its mean, and a
    // constant image stays constant.
    let flat = BgrImage::new(7, 5, vec![77; 7 * 5 * 3]).unwrap();
    let (up, r) = apply_resize(&flat, ResizeMode::LongSide(21));
    assert_eq!(r, 3.0);
    assert_eq!((up.width, up.height), (21, 15));
    assert!(up.data.iter().all(|&v| v == 77));
    let ramp = BgrImage::new(4, 1, vec![0, 0, 0, 100, 100, 100, 200, 200, 200, 250, 250, 250]).unwrap();
    let (up, _) = apply_resize(&ramp, ResizeMode::LongSide(8));
    // OpenCV: [0, 25, 75, 125, 175, 212.5→212/213, 237.5, 250] per channel.
    let row: Vec<u8> = up.data.chunks(3).map(|p| p[0]).take(8).collect();
    assert_eq!(&row[..5], &[0, 25, 75, 125, 175]);
    assert_eq!(row[7], 250);
}

#[test]
fn tiny_and_odd_images_run_without_panicking() {
    let e = Engine::new(&WeightsSpec::Synthetic { seed: 1 }, Some(Network::MobileNetV1_025)).unwrap();
    for (w, h) in [(1, 1), (2, 3), (17, 9), (33, 65)] {
        let img = BgrImage::new(w, h, vec![128; w * h * 3]).unwrap();
        let dets = e.detect(&img, &DetectOptions::default()).unwrap();
        assert!(dets.iter().all(|d| d.score.is_finite() && d.bbox.iter().all(|v| v.is_finite())), "{w}x{h}");
    }
    let real = Engine::new(
        &WeightsSpec::File(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/weights/retinaface_mv1_0.25.pth").into()),
        None,
    )
    .unwrap();
    let one = BgrImage::new(1, 1, vec![128; 3]).unwrap();
    let dets = real.detect(&one, &DetectOptions::default()).unwrap();
    assert!(dets.iter().all(|d| d.score < 0.5), "a 1x1 grey image holds no face: {dets:?}");
    // A mixed-size batch is refused, not silently padded.
    let a = BgrImage::new(8, 8, vec![0; 192]).unwrap();
    let b = BgrImage::new(9, 8, vec![0; 216]).unwrap();
    assert!(real.forward(&[&a, &b]).is_err());
    // Mixed sizes through detect_batch are grouped, and each matches its single run.
    let imgs = vec![a.clone(), b.clone(), a.clone()];
    let batched = real.detect_batch(&imgs, &DetectOptions::default(), None).unwrap();
    for (img, got) in imgs.iter().zip(&batched) {
        assert_eq!(&real.detect(img, &DetectOptions::default()).unwrap(), got);
    }
}

/// Against OpenCV's own output: tests/fixtures/opencv_resize.json holds random images and what
/// `cv2.resize(src, None, None, fx=r, fy=r, interpolation=cv2.INTER_LINEAR)` (OpenCV 5.0, x86-64) made
/// of them (tools/opencv_resize_fixture.py). Sizes and every pixel must agree exactly, including OpenCV's
/// unclamped edge rows and its switch to the area path for an exact 2x downscale.
#[test]
fn bilinear_resize_matches_opencv() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/opencv_resize.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    for c in v["cases"].as_array().unwrap() {
        let (w, h, r) = (
            c["width"].as_u64().unwrap() as usize,
            c["height"].as_u64().unwrap() as usize,
            c["factor"].as_f64().unwrap(),
        );
        let src: Vec<u8> = c["src"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u8).collect();
        let want: Vec<u8> = c["dst"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u8).collect();
        let (dw, dh) = (c["dst_width"].as_u64().unwrap() as usize, c["dst_height"].as_u64().unwrap() as usize);
        let img = BgrImage::new(w, h, src).unwrap();
        let (ow, oh) = image_io::resized_dims(w, h, r);
        assert_eq!((ow, oh), (dw, dh), "{w}x{h} x{r}: output size");
        let got = image_io::resize_bilinear(&img, ow, oh, r, r);
        let diffs: Vec<i32> = got.data.iter().zip(&want).map(|(a, b)| (*a as i32 - *b as i32).abs()).collect();
        let max = *diffs.iter().max().unwrap();
        let equal = diffs.iter().filter(|&&d| d == 0).count() as f64 / diffs.len() as f64;
        println!("{w}x{h} x{r:.4}: max diff {max}, {:.2}% equal", equal * 100.0);
        assert_eq!(max, 0, "{w}x{h} x{r}: max diff {max}, {:.2}% equal", equal * 100.0);
    }
}

/// A 64x64 RGB PNG with an iCCP chunk (after IHDR) whose zlib stream inflates to `profile_bytes` zeros.
fn png_with_icc(profile_bytes: usize) -> (Vec<u8>, Vec<u8>) {
    let rgb: Vec<u8> = (0..64 * 64 * 3).map(|i| (i * 7 % 251) as u8).collect();
    let png = png_bytes(64, 64, image::ExtendedColorType::Rgb8, &rgb);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..profile_bytes >> 20 {
        std::io::Write::write_all(&mut z, &zeros).unwrap();
    }
    let mut body = b"iCCPsRGB\0\0".to_vec();
    body.extend_from_slice(&z.finish().unwrap());
    let mut chunk = ((body.len() - 4) as u32).to_be_bytes().to_vec();
    chunk.extend_from_slice(&body);
    chunk.extend_from_slice(&crc32(&body).to_be_bytes());
    let at = 8 + 25; // signature, IHDR
    let mut out = png[..at].to_vec();
    out.extend_from_slice(&chunk);
    out.extend_from_slice(&png[at..]);
    (out, rgb)
}

#[test]
fn a_1_gib_icc_profile_costs_no_memory() {
    let (png, rgb) = png_with_icc(1 << 30);
    assert!(png.len() < 2 << 20, "{} bytes", png.len());
    let img = decode(&png, "icc.png", &DecodeLimits::default()).unwrap();
    let bgr: Vec<u8> = rgb.chunks(3).flat_map(|p| [p[2], p[1], p[0]]).collect();
    assert_eq!(img.data, bgr);
    // The decode's memory is bounded by the pixels: under a 300 MiB address-space cap (the 1 GiB
    // profile, or image's default 512 MiB allowance for it, would not fit).
    let path = std::env::temp_dir().join(format!("retinaface-icc-{}.png", std::process::id()));
    std::fs::write(&path, &png).unwrap();
    let cmd = format!(
        "ulimit -v {}; exec '{}' detect --backend cpu --synthetic-seed 1 --network mobilenetv1_0.25 '{}'",
        300 * 1024,
        env!("CARGO_BIN_EXE_retinaface"),
        path.display()
    );
    let out = std::process::Command::new("bash").args(["-c", &cmd]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let info = image_io::probe(&png, "icc.png").unwrap();
    assert_eq!((info.width, info.height, info.format), (64, 64, image_io::ImageKind::Png));
    assert!(info.decode_bytes >= 64 * 64 * 6 && info.decode_bytes < 1 << 20, "{info:?}");
}

/// A valid progressive grey 8x8 JPEG, all coefficients zero, sent in successive approximation: each of
/// the 64 coefficients in its own band, first at bit `max_al`, then refined bit by bit, so 64 times
/// `max_al + 1` scans. Written by hand: each scan's data is one Huffman code `0` (DC difference 0, or
/// EOB), or for a DC refinement one raw `0` bit, padded with ones.
fn jpeg_with_scans(max_al: u8) -> Vec<u8> {
    let mut j = vec![0xFF, 0xD8];
    j.extend_from_slice(&[0xFF, 0xDB, 0, 67, 0]);
    j.extend_from_slice(&[1; 64]);
    j.extend_from_slice(&[0xFF, 0xC2, 0, 11, 8, 0, 8, 0, 8, 1, 1, 0x11, 0]);
    for class in [0x00, 0x10] {
        j.extend_from_slice(&[0xFF, 0xC4, 0, 20, class, 1]);
        j.extend_from_slice(&[0; 15]);
        j.push(0);
    }
    for band in 0..64u8 {
        for (ah, al) in std::iter::once((0, max_al)).chain((0..max_al).rev().map(|al| (al + 1, al))) {
            j.extend_from_slice(&[0xFF, 0xDA, 0, 8, 1, 1, 0x00, band, band, ah << 4 | al, 0x7F]);
        }
    }
    j.extend_from_slice(&[0xFF, 0xD9]);
    j
}

#[test]
fn progressive_jpegs_with_too_many_scans_are_refused() {
    // 64 bands × 8 bit levels = 512 scans, past the limit of 500; 64 × 7 = 448 decode (to grey 0 + 128).
    let many = jpeg_with_scans(7);
    let e = err_of(&many);
    assert!(e.contains("more than 500 scans"), "{e}");
    let fewer = jpeg_with_scans(6);
    let img = decode(&fewer, "fewer", &DecodeLimits::default()).unwrap();
    assert_eq!((img.width, img.height), (8, 8));
    assert!(img.data.iter().all(|&v| v == 128), "{:?}", &img.data[..6]);
}
