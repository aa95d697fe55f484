//! WIDER FACE ground truth: the MAT reader on real files, on files it wrote, and on bad bytes.

use std::io::Write;
use std::path::{Path, PathBuf};

use retinaface::Error;
use retinaface::widerface::mat::MatFile;
use retinaface::widerface::{GroundTruth, Subset};

fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

fn reference() -> PathBuf {
    shared().join("reference/widerface-eval")
}

fn err_text<T: std::fmt::Debug>(r: Result<T, Error>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}
// ---------------------------------------------------------------------------------------------
// (c) the MAT reader: a tiny writer for tests, real files, bad bytes

/// What the test writer can store.
enum W {
    Cell(Vec<usize>, Vec<W>),
    Str(String),
    I32(Vec<usize>, Vec<i32>),
    U8(Vec<usize>, Vec<u8>),
    /// Class double stored as uint8 / uint16, as the real gt_list entries.
    DoubleAsU8(Vec<usize>, Vec<u8>),
    DoubleAsU16(Vec<usize>, Vec<u16>),
    /// An empty double array written as 0x0 with an empty data element.
    Empty,
}

fn element(dtype: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    if data.len() <= 4 && dtype != 14 {
        // Small data element format.
        v.extend(((data.len() as u32) << 16 | dtype).to_le_bytes());
        v.extend(data);
        v.resize(8, 0);
        return v;
    }
    v.extend(dtype.to_le_bytes());
    v.extend((data.len() as u32).to_le_bytes());
    v.extend(data);
    while v.len() % 8 != 0 {
        v.push(0);
    }
    v
}

fn matrix(name: &str, w: &W) -> Vec<u8> {
    let (class, dims, body): (u8, Vec<usize>, Vec<u8>) = match w {
        W::Cell(dims, items) => (1, dims.clone(), items.iter().flat_map(|i| matrix("", i)).collect()),
        W::Str(s) => {
            let units: Vec<u8> = s.encode_utf16().flat_map(u16::to_le_bytes).collect();
            (4, vec![1, s.encode_utf16().count()], element(4, &units))
        }
        W::I32(dims, v) => (12, dims.clone(), element(5, &v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())),
        W::U8(dims, v) => (9, dims.clone(), element(2, v)),
        W::DoubleAsU8(dims, v) => (6, dims.clone(), element(2, v)),
        W::DoubleAsU16(dims, v) => {
            (6, dims.clone(), element(4, &v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()))
        }
        W::Empty => (6, vec![0, 0], element(9, &[])),
    };
    let mut m = element(6, &[class, 0, 0, 0, 0, 0, 0, 0]);
    m.extend(element(5, &dims.iter().flat_map(|&d| (d as i32).to_le_bytes()).collect::<Vec<u8>>()));
    m.extend(element(1, name.as_bytes()));
    m.extend(body);
    element(14, &m)
}

fn mat_file(vars: &[(&str, W)], compress: bool) -> Vec<u8> {
    let mut out = format!("{:<116}", "MATLAB 5.0 MAT-file, written by the retinaface tests").into_bytes();
    out.extend([0u8; 8]);
    out.extend([0x00, 0x01, b'I', b'M']);
    for (name, w) in vars {
        let m = matrix(name, w);
        if compress {
            let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            z.write_all(&m).expect("zlib");
            let data = z.finish().expect("zlib");
            out.extend(15u32.to_le_bytes());
            out.extend((data.len() as u32).to_le_bytes());
            out.extend(data);
        } else {
            out.extend(m);
        }
    }
    out
}

fn cell_col(items: Vec<W>) -> W {
    W::Cell(vec![items.len(), 1], items)
}

/// Box rows as a column-major N x 4 int32 array.
fn boxes_w(rows: &[[i32; 4]]) -> W {
    if rows.is_empty() {
        return W::Empty;
    }
    let n = rows.len();
    W::I32(vec![n, 4], (0..4).flat_map(|c| rows.iter().map(move |r| r[c])).collect())
}

/// 1-based index list as in the real files: class double stored as uint8 (uint16 when `wide`),
/// K x 1, or an empty 0 x 1; Easy uses class uint8 and an empty 0 x 0 instead, to cover both.
fn index_w(idx: &[u16], wide: bool, plain_uint8: bool) -> W {
    match (idx.is_empty(), wide, plain_uint8) {
        (true, _, true) => W::U8(vec![0, 0], vec![]),
        (true, _, false) => W::DoubleAsU8(vec![0, 1], vec![]),
        (false, _, true) => W::U8(vec![idx.len(), 1], idx.iter().map(|&i| i as u8).collect()),
        (false, false, false) => W::DoubleAsU8(vec![idx.len(), 1], idx.iter().map(|&i| i as u8).collect()),
        (false, true, false) => W::DoubleAsU16(vec![idx.len(), 1], idx.to_vec()),
    }
}

/// Writes the four ground-truth files for `events`: (event, [(image, boxes, [easy, medium, hard] 1-based)]).
type GtSpec<'a> = Vec<(&'a str, Vec<(&'a str, Vec<[i32; 4]>, [Vec<u16>; 3])>)>;

fn write_gt_mats(dir: &Path, events: &GtSpec, compress: bool) {
    let event_list = || cell_col(events.iter().map(|(e, _)| W::Str(e.to_string())).collect());
    let file_list = || {
        cell_col(
            events
                .iter()
                .map(|(_, imgs)| cell_col(imgs.iter().map(|(n, _, _)| W::Str(n.to_string())).collect()))
                .collect(),
        )
    };
    let bbx = || {
        cell_col(events.iter().map(|(_, imgs)| cell_col(imgs.iter().map(|(_, b, _)| boxes_w(b)).collect())).collect())
    };
    let all = mat_file(&[("face_bbx_list", bbx()), ("event_list", event_list()), ("file_list", file_list())], compress);
    std::fs::write(dir.join("wider_face_val.mat"), all).expect("write mat");
    for s in Subset::ALL {
        let gt_list = cell_col(
            events
                .iter()
                .map(|(_, imgs)| {
                    cell_col(
                        imgs.iter()
                            .map(|(_, _, k)| index_w(&k[s.index()], s == Subset::Hard, s == Subset::Easy))
                            .collect(),
                    )
                })
                .collect(),
        );
        let bytes =
            mat_file(&[("event_list", event_list()), ("file_list", file_list()), ("gt_list", gt_list)], compress);
        std::fs::write(dir.join(s.mat_file_name()), bytes).expect("write mat");
    }
}

#[test]
fn mat_reader_reads_what_it_wrote_and_the_real_files() {
    for compress in [false, true] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let spec: GtSpec = vec![
            (
                "0--Parade",
                vec![("p_1", vec![[1, 2, 3, 4], [5, 6, 7, 8], [0, 0, 0, 0]], [vec![1], vec![1, 2], vec![1, 2, 3]])],
            ),
            (
                "1--Handshaking",
                vec![
                    ("h_1", vec![], [vec![], vec![], vec![]]),
                    ("h_2", vec![[9, 9, -2, 3]], [vec![], vec![], vec![1]]),
                ],
            ),
        ];
        write_gt_mats(tmp.path(), &spec, compress);
        let gt = GroundTruth::load(tmp.path()).expect("load");
        assert_eq!(gt.events.len(), 2);
        assert_eq!(gt.events[0].name, "0--Parade");
        let p = &gt.events[0].images[0];
        assert_eq!(p.name, "p_1");
        assert_eq!(p.boxes, vec![[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [0.0; 4]]);
        assert_eq!(p.kept, [vec![0], vec![0, 1], vec![0, 1, 2]]);
        assert!(gt.events[1].images[0].boxes.is_empty());
        assert_eq!(gt.events[1].images[1].boxes, vec![[9.0, 9.0, -2.0, 3.0]]);
        assert_eq!(gt.events[1].images[1].kept, [vec![], vec![], vec![0]]);
    }

    let dir = reference().join("ground_truth");
    let all = MatFile::read(&dir.join("wider_face_val.mat")).expect("read");
    assert!(all.header_text.starts_with("MATLAB 5.0 MAT-file"));
    for name in ["event_list", "file_list", "face_bbx_list"] {
        let v = all.variable(name).expect("variable");
        assert_eq!(v.dims, vec![61, 1], "{name}");
    }
    let gt = GroundTruth::load(&dir).expect("load");
    assert_eq!(gt.events[0].name, "0--Parade");
    assert!(gt.events[0].images.iter().any(|i| i.name == "0_Parade_marchingband_1_465"));
    // Every name ends in a digit, so the script's rstrip('.jpg') only ever strips the extension.
    assert!(gt.events.iter().flat_map(|e| &e.images).all(|i| i.name.ends_with(|c: char| c.is_ascii_digit())));
    // Degenerate boxes are kept as they are.
    let boxes: Vec<[f64; 4]> = gt.events.iter().flat_map(|e| &e.images).flat_map(|i| i.boxes.clone()).collect();
    assert_eq!(boxes.iter().filter(|b| **b == [0.0; 4]).count(), 4);
    assert!(boxes.iter().any(|b| b[2] == -2.0));
}

#[test]
fn mat_reader_rejects_truncated_and_corrupt_bytes() {
    // A small uncompressed file: every truncation is an error, never a panic.
    let small = mat_file(&[("c", cell_col(vec![W::Str("ab".into()), W::I32(vec![2, 1], vec![7, 8])]))], false);
    MatFile::parse(&small, "small").expect("the whole file parses");
    for len in 0..small.len() {
        if MatFile::parse(&small[..len], "small").is_ok() && len != 128 {
            panic!("truncated to {len} bytes parsed");
        }
    }
    // A compressed real file, truncated at many places and with bytes flipped.
    let real = std::fs::read(reference().join("ground_truth/wider_easy_val.mat")).expect("read");
    let mut cuts: Vec<usize> = (0..300).collect();
    cuts.extend((1..200).map(|k| k * real.len() / 200));
    for len in cuts {
        let r = MatFile::parse(&real[..len], "easy");
        assert!(r.is_err() || len == 128, "truncated to {len} bytes parsed");
    }
    for at in [140, 1000, 5000, 100_000, real.len() / 2, real.len() - 3] {
        let mut bad = real.clone();
        bad[at] ^= 0x5a;
        let msg = err_text(MatFile::parse(&bad, "easy"));
        assert!(msg.contains("MAT-file easy"), "{msg}");
    }
    // Not a MAT-file, wrong endianness, v7.3.
    let mut bad = small.clone();
    bad[0] = b'X';
    assert!(err_text(MatFile::parse(&bad, "x")).contains("not a MATLAB 5.0 MAT-file"));
    let mut bad = small.clone();
    bad[126..128].copy_from_slice(b"MI");
    assert!(err_text(MatFile::parse(&bad, "x")).contains("big-endian"));

    // Huge dimensions are refused before any allocation.
    let mut huge = small.clone();
    // The cell's dims element: header 128 + miMATRIX tag 8 + flags 16 + dims tag 8.
    huge[160..164].copy_from_slice(&i32::MAX.to_le_bytes());
    huge[164..168].copy_from_slice(&i32::MAX.to_le_bytes());
    let msg = err_text(MatFile::parse(&huge, "huge"));
    assert!(msg.contains("cell array of") && msg.contains("remain"), "{msg}");
    let mut neg = small.clone();
    neg[160..164].copy_from_slice(&(-1i32).to_le_bytes());
    assert!(err_text(MatFile::parse(&neg, "neg")).contains("negative dimension"));

    // Deep nesting is refused.
    let mut deep = W::Str("x".into());
    for _ in 0..100 {
        deep = cell_col(vec![deep]);
    }
    let msg = err_text(MatFile::parse(&mat_file(&[("d", deep)], false), "deep"));
    assert!(msg.contains("nested deeper"), "{msg}");

    // A compressed variable that inflates past the limit.
    let big = mat_file(&[("z", W::U8(vec![1 << 21, 1], vec![0; 1 << 21]))], true);
    assert!(big.len() < 10_000);
    MatFile::parse(&big, "big").expect("within the default limit");
    let msg = err_text(MatFile::parse_with_limit(&big, "big", 1 << 20));
    assert!(msg.contains("inflates to more than"), "{msg}");

    // Unsupported classes.
    let mut st = small.clone();
    st[144] = 2; // the cell's class byte → struct
    assert!(err_text(MatFile::parse(&st, "st")).contains("struct"));
}
