//! Hostile weights files, each from an outside attack on the loader: every one must be a clear error that
//! names the problem, found without panicking, overflowing the stack or allocating gigabytes. The memory
//! cases run the binary under an address-space cap, so an allocation past it fails the test.

use retinaface::weights::{self, StateDict, safetensors_io, synthetic};
use retinaface::{Engine, Network, weights::WeightsSpec};
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("retinaface-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A pre-1.6 `torch.save` file: the magic number, protocol 1001, system info, `state_dict` (a protocol-2
/// pickle body, without the PROTO header and STOP), the storage keys, then each storage's count and data.
fn legacy_pth(state_dict: &[u8], storages: &[(&str, &[f32])]) -> Vec<u8> {
    let mut b: Vec<u8> = vec![0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e];
    b.extend_from_slice(&[0x80, 0x02, b'M', 0xe9, 0x03, b'.']);
    b.extend_from_slice(&[0x80, 0x02, b'}', b'.']);
    b.extend_from_slice(&[0x80, 0x02]);
    b.extend_from_slice(state_dict);
    b.push(b'.');
    b.extend_from_slice(&[0x80, 0x02, b']', b'(']);
    for (key, _) in storages {
        b.extend_from_slice(&text(key));
    }
    b.extend_from_slice(b"e.");
    for (_, data) in storages {
        b.extend_from_slice(&(data.len() as u64).to_le_bytes());
        for v in *data {
            b.extend_from_slice(&v.to_le_bytes());
        }
    }
    b
}

fn text(s: &str) -> Vec<u8> {
    let mut b = vec![b'X'];
    b.extend_from_slice(&(s.len() as u32).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
    b
}

/// A pickle integer: LONG1 with 8 bytes, so values up to 2^63 - 1 fit.
fn int(v: u64) -> Vec<u8> {
    let mut b = vec![0x8a, 8];
    b.extend_from_slice(&v.to_le_bytes());
    b
}

/// `{name: _rebuild_tensor_v2(storage key, offset 0, size, stride)}` over FloatStorage `key`.
fn one_tensor_dict(name: &str, key: &str, numel: u64, size: &[u64], stride: &[u64]) -> Vec<u8> {
    let mut b = vec![b'}', b'('];
    b.extend_from_slice(&text(name));
    b.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
    b.extend_from_slice(b"(");
    b.extend_from_slice(&text("storage"));
    b.extend_from_slice(b"ctorch\nFloatStorage\n");
    b.extend_from_slice(&text(key));
    b.extend_from_slice(&text("cpu"));
    b.extend_from_slice(&int(numel));
    b.extend_from_slice(b"tQ");
    b.extend_from_slice(&int(0));
    for dims in [size, stride] {
        b.push(b'(');
        for &d in dims {
            b.extend_from_slice(&int(d));
        }
        b.push(b't');
    }
    b.extend_from_slice(b"tRu");
    b
}

fn write(name: &str, bytes: &[u8]) -> PathBuf {
    let p = tmp(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn load_err(p: &Path) -> String {
    match weights::load(p) {
        Ok(sd) => panic!("{} loaded: {:?}", p.display(), sd.tensors.keys().collect::<Vec<_>>()),
        Err(e) => e.to_string(),
    }
}

/// Runs `retinaface detect` on `weights` with the address space capped at `cap_mb`; returns its stderr.
fn detect_capped(weights: &Path, cap_mb: u64) -> String {
    let img = tmp("tiny.png");
    let mut png = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png, 8, 8);
        enc.set_color(png::ColorType::Rgb);
        enc.write_header().unwrap().write_image_data(&[128u8; 8 * 8 * 3]).unwrap();
    }
    std::fs::write(&img, png).unwrap();
    let cmd = format!(
        "ulimit -v {}; exec '{}' detect --backend cpu --weights '{}' '{}'",
        cap_mb * 1024,
        env!("CARGO_BIN_EXE_retinaface"),
        weights.display(),
        img.display()
    );
    let out = std::process::Command::new("bash").args(["-c", &cmd]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "exit status {:?}; stderr: {stderr}", out.status);
    assert!(!stderr.contains("panicked") && !stderr.contains("memory allocation"), "{stderr}");
    stderr
}

#[test]
fn a_stride_of_2_to_the_62_is_refused_not_wrapped_past_the_bounds_check() {
    // (5 - 1) * 2^62 wraps to 0 in 64 bits: the old check passed and the gather indexed out of bounds.
    let sd = one_tensor_dict("fx.stage1.0.0.weight", "0", 5, &[5], &[1 << 62]);
    let p = write("stride.pth", &legacy_pth(&sd, &[("0", &[1.0; 5])]));
    let e = load_err(&p);
    assert!(e.contains("fx.stage1.0.0.weight") && e.contains("4611686018427387904") && e.contains("past"), "{e}");
}

#[test]
fn a_million_nested_tuples_are_an_error_not_a_stack_overflow() {
    let mut sd = vec![b'K', 0];
    sd.extend(std::iter::repeat_n(0x85u8, 1_000_000));
    let p = write("nested.pth", &legacy_pth(&sd, &[]));
    let e = load_err(&p);
    assert!(e.contains("nested.pth") && e.contains("nests containers more than 100 deep"), "{e}");
}

#[test]
fn a_stride_0_view_of_2_to_the_31_elements_is_refused_before_allocating() {
    // One stored element viewed 2^31 times would be 8 GiB of f32.
    let sd = one_tensor_dict("fx.stage1.0.0.weight", "0", 1, &[1 << 31], &[0]);
    let p = write("expand.pth", &legacy_pth(&sd, &[("0", &[1.0])]));
    let e = load_err(&p);
    assert!(e.contains("fx.stage1.0.0.weight") && e.contains("repeat storage"), "{e}");
    let stderr = detect_capped(&p, 1024);
    assert!(stderr.contains("repeat storage"), "{stderr}");
}

#[test]
fn a_memo_that_doubles_a_list_26_times_is_shared_not_copied() {
    // memo[0] = 0; 26 times: memo[0] = [memo[0], memo[0]]. Deep copies on each get would need 2^27 values.
    let mut sd = vec![b'K', 0, b'q', 0];
    for _ in 0..26 {
        sd.extend_from_slice(&[b']', b'(', b'h', 0, b'h', 0, b'e', b'q', 0]);
    }
    assert!(sd.len() < 300);
    let p = write("doubling.pth", &legacy_pth(&sd, &[]));
    let e = load_err(&p);
    assert!(e.contains("no dict of tensors"), "{e}");
    let stderr = detect_capped(&p, 1024);
    assert!(stderr.contains("no dict of tensors"), "{stderr}");
}

#[test]
fn appending_to_many_copies_of_a_shared_list_hits_the_copy_budget() {
    // A 200k-element list, memoised, then fetched and appended to 20k times: copy on write would copy
    // 4e9 elements (32 GB).
    let mut sd = vec![b']', b'('];
    sd.extend(std::iter::repeat_n([b'K', 1], 200_000).flatten());
    sd.extend_from_slice(&[b'e', b'q', 0]);
    for _ in 0..20_000 {
        sd.extend_from_slice(&[b'h', 0, b'N', b'a']);
    }
    let p = write("copies.pth", &legacy_pth(&sd, &[]));
    let e = load_err(&p);
    assert!(e.contains("copies more shared list or dict elements"), "{e}");
}

#[test]
fn integer_storages_are_refused_for_weights() {
    let mut sd = one_tensor_dict("fx.stage1.0.0.weight", "0", 2, &[2], &[1]);
    let at = sd.windows(12).position(|w| w == b"FloatStorage").unwrap();
    sd.splice(at..at + 12, b"IntStorage".iter().copied());
    let p = write("int.pth", &legacy_pth(&sd, &[("0", &[1.0, 2.0])]));
    let e = load_err(&p);
    assert!(e.contains("fx.stage1.0.0.weight") && e.contains("IntStorage"), "{e}");
}

fn save(sd: &StateDict, name: &str) -> PathBuf {
    let p = tmp(name);
    safetensors_io::save(&sd.tensors, sd.network.as_deref(), &p).unwrap();
    p
}

fn engine_err(p: &Path) -> String {
    match Engine::new(&WeightsSpec::File(p.to_path_buf()), None) {
        Ok(_) => panic!("{} loaded", p.display()),
        Err(e) => e.to_string(),
    }
}

/// A safetensors file with one tensor, its header written by hand.
fn raw_safetensors(name: &str, dtype: &str, shape: &str, data: &[u8]) -> Vec<u8> {
    let header = format!(r#"{{"{name}":{{"dtype":"{dtype}","shape":{shape},"data_offsets":[0,{}]}}}}"#, data.len());
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    b
}

#[test]
fn safetensors_integer_weights_are_refused_by_name() {
    let data = [1, 0, 0, 0, 2, 0, 0, 0];
    let p = write("i32.safetensors", &raw_safetensors("fx.stage1.0.0.weight", "I32", "[2]", &data));
    let e = load_err(&p);
    assert!(e.contains("fx.stage1.0.0.weight") && e.contains("I32"), "{e}");
    // The step counter BatchNorm keeps is an integer and stays accepted.
    let p = write("counter.safetensors", &raw_safetensors("fx.stage1.0.1.num_batches_tracked", "I64", "[]", &[7; 8]));
    let sd = weights::load(&p).unwrap();
    assert_eq!(sd.tensors["fx.stage1.0.1.num_batches_tracked"].shape, Vec::<usize>::new());
}

#[test]
fn a_shape_of_2_to_the_63_is_reported_as_it_is() {
    // In a checkpoint: 2^63 is a 9-byte LONG1 (two's complement needs the sign byte).
    let mut sd = one_tensor_dict("fx.stage1.0.0.weight", "0", 1, &[1], &[1]);
    let one = int(1);
    let at = sd.windows(one.len()).rposition(|w| w == one.as_slice()).unwrap() - one.len() - 2;
    sd.splice(at..at + one.len(), [0x8a, 9, 0, 0, 0, 0, 0, 0, 0, 0x80, 0]);
    let p = write("huge-shape.pth", &legacy_pth(&sd, &[("0", &[1.0])]));
    let e = load_err(&p);
    assert!(e.contains("huge-shape.pth") && e.contains("9223372036854775808") && !e.contains("[-1"), "{e}");

    let p = write(
        "huge-shape.safetensors",
        &raw_safetensors("fx.stage1.0.0.weight", "F32", "[9223372036854775808]", &[0; 4]),
    );
    let e = load_err(&p);
    assert!(e.contains("huge-shape.safetensors") && !e.contains("[-1"), "{e}");
}

#[test]
fn weights_that_overflow_into_nan_boxes_are_refused_naming_the_tensor() {
    let good = synthetic::state_dict(Network::MobileNetV1_025, 1);

    // Finite, but near f32's range: the head conv's products overflow.
    let mut sd = good.clone();
    sd.tensors.get_mut("bbox_head.bbox_head.1.weight").unwrap().data[5] = 3e38;
    let e = engine_err(&save(&sd, "3e38.safetensors"));
    assert!(e.contains("bbox_head.bbox_head.1.weight") && e.contains("element 5") && e.contains("3e38"), "{e}");

    // Each value plausible, but the fold multiplies the conv weight by γ / sqrt(σ² + ε) = 1e3 / sqrt(1e-5).
    let mut sd = good.clone();
    sd.tensors.get_mut("fx.stage1.0.0.weight").unwrap().data[0] = 1e14;
    sd.tensors.get_mut("fx.stage1.0.1.weight").unwrap().data[0] = 1e3;
    sd.tensors.get_mut("fx.stage1.0.1.running_var").unwrap().data[0] = 0.0;
    let e = engine_err(&save(&sd, "fold.safetensors"));
    assert!(e.contains("`fx.stage1.0.0.weight`") && e.contains("fx.stage1.0.1.weight") && e.contains("folded"), "{e}");

    // A negative variance makes the fold's square root NaN.
    let mut sd = good.clone();
    sd.tensors.get_mut("fx.stage1.0.1.running_var").unwrap().data[2] = -1.0;
    let e = engine_err(&save(&sd, "negvar.safetensors"));
    assert!(e.contains("fx.stage1.0.1.running_var") && e.contains("element 2") && e.contains("negative"), "{e}");
}

#[test]
fn forward_names_its_input_file_as_an_input() {
    let p = write("not-an-input.safetensors", b"0123456789abcdef");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_retinaface"))
        .args(["forward", "--backend", "cpu", "--synthetic-seed", "1", "--network", "mobilenetv1_0.25", "--input"])
        .arg(&p)
        .arg("--output")
        .arg(tmp("fwd-out.safetensors"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("input file") && stderr.contains("not-an-input") && !stderr.contains("weights"),
        "{stderr}"
    );
}
