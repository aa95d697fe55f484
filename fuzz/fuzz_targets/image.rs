//! Image decoding (JPEG through libjpeg-turbo, PNG) and the header probe: an error or an image within
//! the limits, never a panic; a decoded image has the size its header promised.
#![no_main]
use libfuzzer_sys::fuzz_target;
use retinaface::image_io::{self, DecodeLimits};

fuzz_target!(|data: &[u8]| {
    let limits = DecodeLimits { max_pixels: 1 << 22, max_dimension: 8192 };
    let probed = image_io::probe(data, "fuzz");
    if let Ok(img) = image_io::decode(data, "fuzz", &limits) {
        assert_eq!(img.data.len(), img.width * img.height * 3);
        let info = probed.expect("a decodable image has a readable header");
        // EXIF orientation may swap the sides.
        let (w, h) = (info.width as usize, info.height as usize);
        assert!((img.width, img.height) == (w, h) || (img.width, img.height) == (h, w));
    }
});
