//! JPEG decode speed: libjpeg-turbo's decoder as the engine uses it (OpenCV's pixels) against the `image`
//! crate's decoder the engine used before (pixels up to 7 levels off OpenCV's). Best of 5 runs of 20
//! decodes of each shared photo, ms per decode. `cargo bench --bench decode`.

use retinaface::image_io::{self, DecodeLimits};
use std::time::Instant;

fn best_ms(mut f: impl FnMut()) -> f64 {
    (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..20 {
                f();
            }
            t.elapsed().as_secs_f64() * 1e3 / 20.0
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/images");
    println!("{:<10} {:>10} {:>14} {:>12}", "photo", "size", "libjpeg ms", "image ms");
    for name in ["crowd", "kids", "trio"] {
        let bytes = std::fs::read(format!("{dir}/{name}.jpg")).expect("shared photo");
        let img = image_io::decode(&bytes, name, &DecodeLimits::default()).expect("decodes");
        let ours = best_ms(|| {
            std::hint::black_box(image_io::decode(&bytes, name, &DecodeLimits::default()).expect("decodes"));
        });
        let before = best_ms(|| {
            std::hint::black_box(image::load_from_memory(&bytes).expect("decodes").to_rgb8());
        });
        println!("{name:<10} {:>10} {ours:>14.2} {before:>12.2}", format!("{}x{}", img.width, img.height));
    }
}
