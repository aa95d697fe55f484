//! The device resize (kernels/resize.cu through cuda::ops::resize) in the CPU simulation against the
//! host's OpenCV-faithful functions: `image_io::apply_resize` (INTER_LINEAR, its exact-2x area path)
//! and the video letterbox `video::letterbox::letterbox`. Exact equality of every byte: the kernel's
//! arithmetic is integer, so any difference is a bug. Then the engine: detections through the device
//! resize equal those of the host-resize path on the same executor.
#![cfg(feature = "cuda-sim")]

mod common;
mod rng;
use retinaface::cuda::ops::resize;
use retinaface::cuda::sim::SimRunner;
use retinaface::cuda::{GpuEngine, KernelRunner};
use retinaface::image_io::{self, BgrImage, ResizeMode, ResizeSpec};
use retinaface::video::letterbox;
use retinaface::{Backend, DetectOptions, Engine, PostOptions, WeightsSpec};
use rng::Rng;

fn random_image(w: usize, h: usize, rng: &mut Rng) -> BgrImage {
    BgrImage::new(w, h, (0..w * h * 3).map(|_| rng.below(256) as u8).collect()).unwrap()
}

/// The device's batch of `images` made by `specs`, one image per canvas.
fn device(r: &mut SimRunner, images: &[&BgrImage], specs: &[ResizeSpec]) -> Vec<BgrImage> {
    let (cw, ch) = (specs[0].canvas_w, specs[0].canvas_h);
    let dst = r.alloc(images.len() * cw * ch * 3).unwrap();
    r.poison(dst).unwrap();
    let mut staging = None;
    resize::run(r, &mut staging, images, specs, dst).unwrap();
    let mut out = vec![0u8; dst.bytes];
    r.download(dst, 0, &mut out).unwrap();
    r.free(dst).unwrap();
    for b in staging.iter().flat_map(|s| s.all()) {
        r.free(b).unwrap();
    }
    out.chunks_exact(cw * ch * 3).map(|c| BgrImage::new(cw, ch, c.to_vec()).unwrap()).collect()
}

fn first_difference(got: &BgrImage, want: &BgrImage) -> String {
    assert_eq!((got.width, got.height), (want.width, want.height), "sizes");
    match got.data.iter().zip(&want.data).position(|(a, b)| a != b) {
        None => String::new(),
        Some(i) => format!(
            "first difference at x {} y {} channel {}: device {} host {}",
            i / 3 % got.width,
            i / 3 / got.width,
            i % 3,
            got.data[i],
            want.data[i]
        ),
    }
}

#[test]
fn device_resize_equals_the_host_opencv_rule_on_every_size() {
    let mut rng = Rng(12);
    let mut r = SimRunner::new();
    // (width, height, mode): down and up scales, odd sizes, factor 1, the exact 2x area path (even and
    // odd sources), extreme aspect ratios, a 1-pixel side.
    let cases: &[(usize, usize, ResizeMode)] = &[
        (64, 48, ResizeMode::Original),
        (301, 203, ResizeMode::LongSide(160)),
        (203, 301, ResizeMode::LongSide(97)),
        (37, 23, ResizeMode::LongSide(640)),
        (17, 29, ResizeMode::LongSide(101)),
        (128, 96, ResizeMode::LongSide(64)),
        (127, 95, ResizeMode::LongSide(63)),
        (130, 66, ResizeMode::LongSide(65)),
        (1000, 3, ResizeMode::LongSide(333)),
        (2, 900, ResizeMode::LongSide(450)),
        (5, 1, ResizeMode::LongSide(12)),
        (1, 1, ResizeMode::LongSide(7)),
        (250, 100, ResizeMode::MultiScale),
        (99, 100, ResizeMode::LongSide(100)),
    ];
    let mut area_paths = 0;
    for &(w, h, mode) in cases {
        let img = random_image(w, h, &mut rng);
        let spec = ResizeSpec::for_mode(mode, w, h);
        area_paths += usize::from(spec.fx == 0.5);
        let (want, r_host) = image_io::apply_resize(&img, mode);
        assert_eq!(spec.scale, r_host, "{w}x{h} {mode:?}");
        let got = device(&mut r, &[&img], &[spec]);
        let diff = first_difference(&got[0], &want);
        assert!(diff.is_empty(), "{w}x{h} {mode:?} -> {}x{}: {diff}", spec.new_w, spec.new_h);
    }
    assert!(area_paths >= 2, "the 2x area path is covered");
}

#[test]
fn device_letterbox_equals_the_reference_video_rule() {
    let mut rng = Rng(7);
    let mut r = SimRunner::new();
    for &(w, h, cw, ch) in &[
        (1280, 720, 64, 64),
        (720, 1280, 64, 64),
        (641, 479, 96, 80),
        (333, 777, 64, 64),
        (64, 64, 64, 64),
        (128, 128, 64, 64),
        (40, 30, 96, 64),
        (500, 7, 128, 128),
    ] {
        let img = random_image(w, h, &mut rng);
        let spec = letterbox::spec(w, h, cw, ch).unwrap();
        let (want, factor) = letterbox::letterbox(&img, cw, ch).unwrap();
        assert_eq!(spec.scale, factor);
        let got = device(&mut r, &[&img], &[spec]);
        let diff = first_difference(&got[0], &want);
        assert!(diff.is_empty(), "{w}x{h} on {cw}x{ch}: {diff}");
    }
}

#[test]
fn one_launch_resizes_a_batch_of_different_sizes_onto_one_canvas() {
    let mut rng = Rng(3);
    let mut r = SimRunner::new();
    let sizes = [(90, 60), (61, 97), (64, 64), (200, 13), (33, 33), (128, 64)];
    let images: Vec<BgrImage> = sizes.iter().map(|&(w, h)| random_image(w, h, &mut rng)).collect();
    let refs: Vec<&BgrImage> = images.iter().collect();
    let specs: Vec<ResizeSpec> = sizes.iter().map(|&(w, h)| letterbox::spec(w, h, 64, 64).unwrap()).collect();
    let got = device(&mut r, &refs, &specs);
    for (i, img) in images.iter().enumerate() {
        let (want, _) = letterbox::letterbox(img, 64, 64).unwrap();
        let diff = first_difference(&got[i], &want);
        assert!(diff.is_empty(), "image {i} ({}x{}): {diff}", img.width, img.height);
    }
    // Staging is reused when it is big enough, and grown when a batch needs more.
    let mut staging = None;
    let dst = r.alloc(6 * 64 * 64 * 3).unwrap();
    resize::run(&mut r, &mut staging, &refs[..1], &specs[..1], dst).unwrap();
    let small = staging.unwrap().src;
    resize::run(&mut r, &mut staging, &refs[..1], &specs[..1], dst).unwrap();
    assert_eq!(staging.unwrap().src, small, "reused");
    resize::run(&mut r, &mut staging, &refs, &specs, dst).unwrap();
    assert!(staging.unwrap().src.bytes >= sizes.iter().map(|(w, h)| w * h * 3).sum::<usize>(), "grown");
}

#[test]
fn bad_specs_are_named_errors() {
    let mut r = SimRunner::new();
    let img = BgrImage::new(8, 8, vec![1; 192]).unwrap();
    let dst = r.alloc(16 * 16 * 3).unwrap();
    let mut staging = None;
    let mut bad = ResizeSpec::for_mode(ResizeMode::LongSide(16), 8, 8);
    bad.new_w = 17; // wider than its 16-pixel canvas
    let e = resize::run(&mut r, &mut staging, &[&img], &[bad], dst).unwrap_err().to_string();
    assert!(e.contains("8x8") && e.contains("17x16"), "{e}");
    let a = ResizeSpec::for_mode(ResizeMode::LongSide(16), 8, 8);
    let b = ResizeSpec::for_mode(ResizeMode::LongSide(12), 8, 8);
    let e = resize::run(&mut r, &mut staging, &[&img, &img], &[a, b], dst).unwrap_err().to_string();
    assert!(e.contains("mixes canvases"), "{e}");
    let big = ResizeSpec::for_mode(ResizeMode::LongSide(64), 8, 8);
    let e = resize::run(&mut r, &mut staging, &[&img], &[big], dst).unwrap_err().to_string();
    assert!(e.contains("does not fit"), "{e}");
}

fn trio() -> BgrImage {
    image_io::load(&common::shared().join("images/trio.jpg"), &Default::default()).unwrap()
}

#[test]
fn detections_through_the_device_resize_equal_the_host_resize_path() {
    let weights = WeightsSpec::File(common::shared().join("weights/retinaface_mv1_0.25.pth"));
    let mut engine = Engine::new(&weights, None).unwrap();
    engine.set_backend(Backend::CudaSim).unwrap();
    let full = trio();
    // Different originals, one network input size for two of them (one batch, two factors), and a
    // size of its own for the third.
    let images =
        [full.crop(0, 0, 540, 360).unwrap(), full.crop(60, 20, 270, 180).unwrap(), full.crop(0, 0, 200, 360).unwrap()];
    let opts = DetectOptions { resize: ResizeMode::LongSide(160), post: PostOptions::default() };
    let device = engine.detect_batch(&images, &opts, None).unwrap();
    let mut faces = 0;
    for (i, img) in images.iter().enumerate() {
        let (input, r) = image_io::apply_resize(img, opts.resize);
        let host = engine.detect_resized(&[input.as_ref()], &[r], &opts.post, None).unwrap();
        assert_eq!(device[i], host[0], "image {i}");
        faces += device[i].iter().filter(|d| d.score > 0.5).count();
    }
    assert!(faces >= 3, "the comparison sees faces ({faces})");

    // The letterbox through the engine, and the device's input bytes themselves.
    let mut gpu = GpuEngine::new(engine.graph(), Backend::CudaSim).unwrap();
    let spec = letterbox::spec(full.width, full.height, 192, 192).unwrap();
    let dets = gpu.detect_specs(&[&full], &[spec], &opts.post).unwrap();
    let (canvas, factor) = letterbox::letterbox(&full, 192, 192).unwrap();
    assert_eq!(gpu.last_input_u8().unwrap(), canvas.data);
    let host = engine.detect_resized(&[&canvas], &[factor], &opts.post, None).unwrap();
    assert_eq!(dets[0], host[0]);
    assert_eq!(engine.detect_specs(&[&full], &[spec], &opts.post, None).unwrap()[0], host[0]);
}
