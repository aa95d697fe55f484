//! WIDER FACE evaluation: the reference APs, the script's edge cases, the MAT reader on bad bytes,
//! and predict → evaluate on a small image tree.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use retinaface::widerface::mat::MatFile;
use retinaface::widerface::{
    Aps, GroundTruth, GtEvent, GtImage, PredBox, Predictions, Subset, evaluate, format_report, is_complete,
    list_val_images, prediction_path, python_float_repr, run_predict, run_predict_pipelined,
};
use retinaface::{Detection, Error};

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
// (a) the reference APs

#[test]
fn seed1_matches_the_standard_script() {
    let t0 = Instant::now();
    let gt = GroundTruth::load(&reference().join("ground_truth")).expect("ground truth");
    let t_gt = t0.elapsed();
    let t1 = Instant::now();
    let preds = Predictions::read_dir(&reference().join("predictions-seed1")).expect("predictions");
    let t_preds = t1.elapsed();
    let t2 = Instant::now();
    let eval = evaluate(&gt, &preds).expect("evaluate");
    let t_eval = t2.elapsed();
    println!(
        "load ground truth {:.1} ms, read predictions {:.1} ms, evaluate {:.1} ms, total {:.1} ms",
        t_gt.as_secs_f64() * 1e3,
        t_preds.as_secs_f64() * 1e3,
        t_eval.as_secs_f64() * 1e3,
        t0.elapsed().as_secs_f64() * 1e3
    );

    // The README's counts.
    assert_eq!(gt.events.len(), 61);
    assert_eq!(gt.image_count(), 3226);
    assert_eq!(gt.box_count(), 39708);
    assert_eq!(gt.face_count(Subset::Easy), 7211);
    assert_eq!(gt.face_count(Subset::Medium), 13319);
    assert_eq!(gt.face_count(Subset::Hard), 31958);
    assert_eq!(preds.image_count(), 3226);
    assert_eq!(preds.box_count(), 41597);
    assert_eq!(eval.easy.faces, 7211);
    assert_eq!(eval.hard.faces, 31958);

    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reference().join("expected.json")).expect("expected.json"))
            .expect("json");
    let aps = eval.aps();
    for s in Subset::ALL {
        let want = expected["seed1"][s.name()].as_f64().expect("expected value");
        let got = aps.get(s);
        println!(
            "{:<6} AP {got:.4} (full {}, expected {}, difference {:e}{})",
            s.label(),
            python_float_repr(got),
            python_float_repr(want),
            got - want,
            if got == want { ", bit for bit" } else { "" }
        );
        assert!((got - want).abs() <= 1e-12, "{} AP {got} differs from the script's {want}", s.label());
    }
    print!("{}", format_report(&aps));

    // Curves: 1000 points per subset, recall rising, thresholds 0.999 .. 0.0.
    for s in Subset::ALL {
        let c = &eval.subset(s).curve;
        assert_eq!(c.len(), 1000);
        assert_eq!(c[0].threshold, 0.999);
        assert_eq!(c[999].threshold, 0.0);
        assert!(c.windows(2).all(|w| w[0].recall <= w[1].recall));
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let csv = tmp.path().join("curves.csv");
    retinaface::widerface::write_curves_csv(&eval, &csv).expect("csv");
    let text = std::fs::read_to_string(&csv).expect("read csv");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1001);
    assert_eq!(
        lines[0],
        "threshold,easy_precision,easy_recall,medium_precision,medium_recall,hard_precision,hard_recall"
    );
    assert!(lines[1].starts_with("0.999,"));
    assert!(lines[1000].starts_with("0.0,"));
    let png = tmp.path().join("curves.png");
    retinaface::widerface::write_curves_png(&eval, &png).expect("png");
    let img = image::open(&png).expect("decode png").to_rgb8();
    assert_eq!(img.dimensions(), (retinaface::widerface::plot::PLOT_WIDTH, retinaface::widerface::plot::PLOT_HEIGHT));
    for s in Subset::ALL {
        let colour = retinaface::widerface::plot::subset_colour(s);
        let n = img.pixels().filter(|p| **p == colour).count();
        assert!(n > 500, "{} curve has only {n} pixels of its colour", s.label());
    }
    if let Ok(dir) = std::env::var("WIDERFACE_PLOT_DIR") {
        std::fs::copy(&png, Path::new(&dir).join("seed1-curves.png")).expect("copy plot");
    }
}

#[test]
fn report_prints_like_python() {
    let aps = Aps { easy: 0.8339930831626076, medium: 0.8356818869153068, hard: 0.8312706775375872 };
    assert_eq!(
        format_report(&aps),
        "Easy   Val AP: 0.8339930831626076\nMedium Val AP: 0.8356818869153068\nHard   Val AP: 0.8312706775375872\n"
    );
    assert_eq!(
        serde_json::to_string(&aps).expect("json"),
        r#"{"easy":0.8339930831626076,"medium":0.8356818869153068,"hard":0.8312706775375872}"#
    );
    for (x, repr) in [
        (0.0, "0.0"),
        (-0.0, "-0.0"),
        (1.0, "1.0"),
        (0.5, "0.5"),
        (123.0, "123.0"),
        (0.1 + 0.2, "0.30000000000000004"),
        (1e-4, "0.0001"),
        (1.5e-5, "1.5e-05"),
        (1e-5, "1e-05"),
        (1e15, "1000000000000000.0"),
        (1e16, "1e+16"),
        (1.2345e100, "1.2345e+100"),
        (-2.5e-300, "-2.5e-300"),
        (f64::NAN, "nan"),
        (f64::INFINITY, "inf"),
    ] {
        assert_eq!(python_float_repr(x), repr, "repr of {x:e}");
    }
}

// ---------------------------------------------------------------------------------------------
// (b) the script's rules on small cases

fn pred(x: f64, y: f64, w: f64, h: f64, score: f64) -> PredBox {
    PredBox { x, y, w, h, score }
}

fn face_pred(b: [f64; 4], score: f64) -> PredBox {
    pred(b[0], b[1], b[2], b[3], score)
}

/// An image: name, boxes, 0-based kept indices for Easy, Medium, Hard.
type ImageSpec<'a> = (&'a str, Vec<[f64; 4]>, [Vec<usize>; 3]);

/// One event `0--Test` with the given images.
fn gt_of(images: Vec<ImageSpec>) -> GroundTruth {
    GroundTruth {
        events: vec![GtEvent {
            name: "0--Test".into(),
            images: images.into_iter().map(|(name, boxes, kept)| GtImage { name: name.into(), boxes, kept }).collect(),
        }],
    }
}

fn preds_of(images: Vec<(&str, Vec<PredBox>)>) -> Predictions {
    let mut p = Predictions::new();
    for (name, boxes) in images {
        p.insert("0--Test", name, boxes);
    }
    p
}

const F0: [f64; 4] = [10.0, 10.0, 20.0, 20.0];
const F1: [f64; 4] = [100.0, 100.0, 20.0, 20.0];

#[test]
fn more_boxes_than_faces_and_ignored_faces() {
    // Easy keeps F0, Medium keeps F1, Hard keeps both.
    let gt = gt_of(vec![("a", vec![F0, F1], [vec![0], vec![1], vec![0, 1]])]);
    // F0 found twice (the second a false positive: no fallback), then F1.
    let preds = preds_of(vec![("a", vec![face_pred(F0, 0.9), pred(11.0, 10.0, 20.0, 20.0, 0.8), face_pred(F1, 0.7)])]);
    let eval = evaluate(&gt, &preds).expect("evaluate");
    // Normalised scores 1.0, 0.5, 0.0: the duplicate passes from t = 499, F1's box only at t = 999.
    let hard = &eval.hard.curve;
    assert_eq!((hard[498].proposals, hard[498].matched), (1, 1));
    assert_eq!((hard[499].proposals, hard[499].matched), (2, 1));
    assert_eq!((hard[999].proposals, hard[999].matched), (3, 2));
    assert_eq!(eval.hard.ap, 0.5 + 0.5 * (2.0 / 3.0));
    // Easy: the box on F1 (ignored) is dropped, not a false positive.
    assert_eq!((eval.easy.curve[999].proposals, eval.easy.curve[999].matched), (2, 1));
    assert_eq!(eval.easy.ap, 1.0);
    // Medium: both boxes on F0 are dropped; no proposals (NaN precision) until t = 999.
    assert!(eval.medium.curve[998].precision.is_nan());
    assert_eq!((eval.medium.curve[999].proposals, eval.medium.curve[999].matched), (1, 1));
    assert_eq!(eval.medium.ap, 1.0);
}

#[test]
fn images_without_predictions_still_count_their_faces() {
    let gt = gt_of(vec![
        ("a", vec![F0, F1], [vec![0], vec![1], vec![0, 1]]),
        ("b", vec![F0, F1], [vec![0, 1], vec![0, 1], vec![0, 1]]),
        ("c", vec![], Default::default()),
    ]);
    let preds = preds_of(vec![
        ("a", vec![face_pred(F0, 0.9), pred(11.0, 10.0, 20.0, 20.0, 0.8), face_pred(F1, 0.7)]),
        ("b", vec![]),
        // An image without faces: its boxes are not proposals.
        ("c", vec![face_pred(F0, 0.75)]),
    ]);
    let eval = evaluate(&gt, &preds).expect("evaluate");
    assert_eq!((eval.easy.faces, eval.medium.faces, eval.hard.faces), (3, 3, 4));
    assert_eq!(eval.hard.ap, 0.25 + 0.25 * (2.0 / 3.0));
    assert_eq!(eval.easy.ap, 1.0 / 3.0);
    assert_eq!(eval.medium.ap, 1.0 / 3.0);
}

#[test]
fn no_fallback_to_the_second_best_face_and_first_face_wins_ties() {
    let g0 = [0.0, 0.0, 100.0, 100.0];
    let g1 = [10.0, 0.0, 100.0, 100.0];
    // The same box twice: the second stays a false positive although g1 overlaps it by > 0.5.
    let gt = gt_of(vec![("a", vec![g0, g1], [vec![1], vec![0, 1], vec![0, 1]])]);
    let preds = preds_of(vec![("a", vec![face_pred(g0, 0.9), face_pred(g0, 0.8)])]);
    let eval = evaluate(&gt, &preds).expect("evaluate");
    assert_eq!(eval.hard.ap, 0.5);
    // Easy keeps only g1: both boxes go to g0 (ignored) and are dropped.
    assert_eq!(eval.easy.curve[999].proposals, 0);
    assert_eq!(eval.easy.ap, 0.0);

    // A box exactly between g0 and g1 goes to g0, the first; with g0 ignored it is dropped.
    let gt = gt_of(vec![("a", vec![g0, g1], [vec![1], vec![1], vec![1]])]);
    let preds = preds_of(vec![("a", vec![pred(5.0, 0.0, 100.0, 100.0, 0.9), pred(500.0, 500.0, 10.0, 10.0, 0.5)])]);
    let eval = evaluate(&gt, &preds).expect("evaluate");
    assert_eq!((eval.easy.curve[999].proposals, eval.easy.curve[999].matched), (1, 0));
    assert_eq!(eval.easy.ap, 0.0);
}

#[test]
fn normalisation_covers_every_file_read() {
    let gt = gt_of(vec![("a", vec![F0, F1], [vec![0, 1], vec![0, 1], vec![0, 1]])]);
    let boxes = vec![face_pred(F0, 0.9), pred(500.0, 500.0, 10.0, 10.0, 0.8999)];
    // Alone, the two scores normalise to 1 and 0: the false positive only counts at t = 999.
    let eval = evaluate(&gt, &preds_of(vec![("a", boxes.clone())])).expect("evaluate");
    assert_eq!(eval.hard.ap, 0.5);
    // A file for an image not in the ground truth widens the range: both now pass together.
    let mut preds = preds_of(vec![("a", boxes)]);
    preds.insert("9--Other", "z", vec![pred(0.0, 0.0, 1.0, 1.0, 0.0001)]);
    let eval = evaluate(&gt, &preds).expect("evaluate");
    assert_eq!(eval.hard.ap, 0.25);
}

#[test]
fn equal_scores_give_what_the_script_gives() {
    // max - min = 0: every normalised score is NaN, nothing passes, the AP is 0 (numpy's result).
    let gt = gt_of(vec![("a", vec![F0], [vec![0], vec![0], vec![0]])]);
    for score in [0.5, 1.0] {
        let eval = evaluate(&gt, &preds_of(vec![("a", vec![face_pred(F0, score)])])).expect("evaluate");
        assert_eq!(eval.aps(), Aps { easy: 0.0, medium: 0.0, hard: 0.0 });
    }
    // No predictions at all: AP 0.
    let eval = evaluate(&gt, &preds_of(vec![("a", vec![])])).expect("evaluate");
    assert_eq!(eval.hard.ap, 0.0);
}

#[test]
fn missing_predictions_and_bad_ground_truth_are_errors() {
    let gt = gt_of(vec![("a", vec![F0], [vec![0], vec![0], vec![0]]), ("b", vec![F0], [vec![0], vec![0], vec![0]])]);
    let msg = err_text(evaluate(&gt, &preds_of(vec![("a", vec![])])));
    assert!(msg.contains("`b`") && msg.contains("0--Test"), "{msg}");
    let mut other = Predictions::new();
    other.insert("1--Other", "a", vec![]);
    let msg = err_text(evaluate(&gt, &other));
    assert!(msg.contains("no folder for event `0--Test`"), "{msg}");
    let bad = gt_of(vec![("a", vec![F0], [vec![0], vec![1], vec![0]])]);
    let msg = err_text(evaluate(&bad, &preds_of(vec![("a", vec![])])));
    assert!(msg.contains("medium") && msg.contains("index 1"), "{msg}");
}

// Prediction directories.

fn write_file(root: &Path, rel: &str, text: &str) -> PathBuf {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(&path, text).expect("write");
    path
}

#[test]
fn prediction_files_parse_like_the_script() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    // Name from line 1 (after the last '/', '.jpg' stripped), not from the file name; count line
    // ignored; lines whose first field is empty skipped; fields past the fifth ignored; CRLF.
    write_file(
        root,
        "0--Test/whatever.txt",
        "0--Test/a.jpg\r\nnot a count\r\n10 10 20 20 0.9 extra\r\n\r\n  ignored line\r\n11 10 20 20 0.8\r\n",
    );
    write_file(root, "0--Test/b.txt", "b\n0\n");
    write_file(root, "0--Test/c.txt", "c\n1\n1e2 +5 .5 5. 0.75 \n");
    write_file(root, "0--Test/c.txt.partial", "garbage");
    write_file(root, "README", "loose files are skipped");
    let preds = Predictions::read_dir(root).expect("read");
    assert_eq!(preds.image_count(), 3);
    assert_eq!(
        preds.get("0--Test", "a").expect("a"),
        &[pred(10.0, 10.0, 20.0, 20.0, 0.9), pred(11.0, 10.0, 20.0, 20.0, 0.8)]
    );
    assert_eq!(preds.get("0--Test", "b").expect("b"), &[]);
    assert_eq!(preds.get("0--Test", "c").expect("c"), &[pred(100.0, 5.0, 0.5, 5.0, 0.75)]);

    // A missing image file and a missing event folder are errors, as in the script.
    let gt = gt_of(vec![
        ("a", vec![F0], [vec![0], vec![0], vec![0]]),
        ("b", vec![], Default::default()),
        ("c", vec![], Default::default()),
        ("d", vec![F1], [vec![0], vec![0], vec![0]]),
    ]);
    let msg = err_text(evaluate(&gt, &preds));
    assert!(msg.contains("no file for image `d` in event folder `0--Test`"), "{msg}");
    let mut gt2 = gt.clone();
    gt2.events[0].images.pop();
    gt2.events.push(GtEvent { name: "1--Missing".into(), images: vec![] });
    let msg = err_text(evaluate(&gt2, &preds));
    assert!(msg.contains("1--Missing"), "{msg}");
    gt2.events.pop();
    evaluate(&gt2, &preds).expect("complete predictions evaluate");
}

#[test]
fn malformed_prediction_files_name_file_and_line() {
    let cases = [
        ("a\n2\n1 2 3 4 0.5\n1 2 x 4 0.5\n", "line 4: field 3 `x` is not a number"),
        ("a\n1\n1 2 3 4\n", "line 3: expected 5 space-separated fields"),
        ("a\n1\n1  2 3 4 0.5\n", "line 3: field 2 `` is not a number"),
        ("a\n1\n1 2 3 4 nan\n", "line 3: field 5 `nan` is not a finite number"),
        ("a\n1\n1\t2 3 4 0.5\n", "line 3: field 1 `1\t2` is not a number"),
        ("", "empty prediction file"),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = write_file(tmp.path(), &format!("0--Test/case{i}.txt"), text);
        let msg = err_text(Predictions::read_dir(tmp.path()));
        assert!(msg.contains(&path.display().to_string()) && msg.contains(want), "case {i}: {msg}");
    }
    // Two files naming the same image.
    let tmp = tempfile::tempdir().expect("tempdir");
    write_file(tmp.path(), "0--Test/a.txt", "a\n0\n");
    write_file(tmp.path(), "0--Test/a_copy.txt", "0--Test/a.jpg\n0\n");
    let msg = err_text(Predictions::read_dir(tmp.path()));
    assert!(msg.contains("both name image `a`"), "{msg}");
    // A missing directory.
    let msg = err_text(Predictions::read_dir(&tmp.path().join("nope")));
    assert!(msg.contains("nope"), "{msg}");
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

// ---------------------------------------------------------------------------------------------
// (d) predict on a small tree, evaluate against ground truth written for it, resume

/// The fake tree: two events made of copies of the shared photos.
fn fake_tree(root: &Path) -> Vec<(&'static str, &'static str, &'static str)> {
    let layout = [
        ("0--Parade", "crowd", "crowd.jpg"),
        ("0--Parade", "kids", "kids.jpg"),
        ("1--Handshaking", "trio", "trio.jpg"),
    ];
    for (event, stem, src) in layout {
        let dir = root.join(event);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::copy(shared().join("images").join(src), dir.join(format!("{stem}.jpg"))).expect("copy image");
    }
    std::fs::write(root.join("0--Parade/notes.txt"), "not an image").expect("write");
    layout.to_vec()
}

/// Two faces per image, placed from the image size: A (found by the fake detector) and B (missed).
fn faces_for(w: u32, h: u32) -> [[i32; 4]; 2] {
    let (w, h) = (w as i32, h as i32);
    [[w / 4, h / 4, w / 4, h / 4], [w / 2 + 10, h / 2 + 10, 40, 40]]
}

/// Decodes the image, finds face A exactly (score 0.9) and a false positive (score 0.3).
fn fake_detect(path: &Path) -> retinaface::Result<Vec<Detection>> {
    let img =
        image::open(path).map_err(|e| Error::Image { source_name: path.display().to_string(), msg: e.to_string() })?;
    let [a, _] = faces_for(img.width(), img.height());
    let [x, y, w, h] = a.map(|v| v as f32);
    Ok(vec![
        Detection { bbox: [x, y, x + w, y + h], score: 0.9, landmarks: [0.0; 10] },
        Detection { bbox: [1.0, 1.0, 5.5, 6.25], score: 0.3, landmarks: [0.0; 10] },
    ])
}

#[test]
fn predict_then_evaluate_and_resume() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let images = tmp.path().join("images");
    let out = tmp.path().join("pred");
    let gt_dir = tmp.path().join("gt");
    std::fs::create_dir_all(&gt_dir).expect("mkdir");
    let layout = fake_tree(&images);

    let listed = list_val_images(&images).expect("list");
    let names: Vec<(String, String)> = listed.iter().map(|i| (i.event.clone(), i.stem.clone())).collect();
    assert_eq!(
        names,
        layout.iter().map(|(e, s, _)| (e.to_string(), s.to_string())).collect::<Vec<_>>(),
        "sorted, images only"
    );

    // Ground truth for the tree, as MAT-files: Easy keeps A, Medium keeps B, Hard both.
    let mut spec: GtSpec = Vec::new();
    for (event, stem, _) in &layout {
        let (w, h) = image::image_dimensions(images.join(event).join(format!("{stem}.jpg"))).expect("dims");
        let faces = faces_for(w, h).to_vec();
        let entry = (*stem, faces, [vec![1], vec![2], vec![1, 2]]);
        match spec.iter_mut().find(|(e, _)| e == event) {
            Some((_, imgs)) => imgs.push(entry),
            None => spec.push((event, vec![entry])),
        }
    }
    write_gt_mats(&gt_dir, &spec, true);

    let calls = AtomicUsize::new(0);
    let counting = |p: &Path| {
        calls.fetch_add(1, Ordering::Relaxed);
        fake_detect(p)
    };
    let first = run_predict(&images, &out, counting, false).expect("predict");
    assert_eq!((first.total, first.skipped, first.predicted, first.detections), (3, 0, 3, 6));
    assert_eq!(calls.load(Ordering::Relaxed), 3);
    let crowd = std::fs::read_to_string(prediction_path(&out, "0--Parade", "crowd")).expect("read");
    assert_eq!(crowd, "crowd\n2\n256.0 156.0 256.0 156.0 0.9\n1.0 1.0 4.5 5.2 0.3\n");

    let eval = retinaface::widerface::evaluate_dirs(&out, &gt_dir).expect("evaluate");
    // A matched everywhere it is kept; the false positive passes only at the lowest threshold;
    // in Medium A's box lands on an ignored face and is dropped.
    assert_eq!(eval.aps(), Aps { easy: 1.0, medium: 0.0, hard: 0.5 });
    assert_eq!((eval.easy.faces, eval.medium.faces, eval.hard.faces), (3, 3, 6));

    // A second run skips everything.
    let second = run_predict(&images, &out, counting, false).expect("predict again");
    assert_eq!((second.total, second.skipped, second.predicted), (3, 3, 0));
    assert_eq!(calls.load(Ordering::Relaxed), 3);

    // A removed file, an incomplete one and a leftover partial file: only the first two are redone.
    let kids = prediction_path(&out, "0--Parade", "kids");
    let trio = prediction_path(&out, "1--Handshaking", "trio");
    std::fs::remove_file(&kids).expect("rm");
    std::fs::write(&trio, "trio\n2\n1.0 1.0 2.0 2.0 0.5\n").expect("truncate");
    assert!(!is_complete(&trio, "trio"));
    std::fs::write(out.join("0--Parade/kids.txt.partial"), "kids\n2\n1.0").expect("partial");
    let third =
        run_predict_pipelined(&images, &out, |p| Ok(p.to_path_buf()), |_, p: PathBuf| fake_detect(&p), 2, 2, true)
            .expect("pipelined predict");
    assert_eq!((third.total, third.skipped, third.predicted), (3, 1, 2));
    assert!(is_complete(&trio, "trio") && is_complete(&kids, "kids"));
    let again = retinaface::widerface::evaluate_dirs(&out, &gt_dir).expect("evaluate");
    assert_eq!(again.aps(), eval.aps());

    // A detector error stops the run and names the image; nothing half-written is left behind.
    std::fs::remove_file(&trio).expect("rm");
    let msg = err_text(run_predict(&images, &out, |_: &Path| Err(Error::InvalidArgument("boom".into())), false));
    assert!(msg.contains("trio.jpg") && msg.contains("boom"), "{msg}");
    assert!(!trio.exists());
    let msg = err_text(run_predict_pipelined(
        &images,
        &out,
        |p| Ok(p.to_path_buf()),
        |_, _: PathBuf| Err(Error::InvalidArgument("bang".into())),
        3,
        1,
        false,
    ));
    assert!(msg.contains("trio.jpg") && msg.contains("bang"), "{msg}");

    // An empty tree is an error.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).expect("mkdir");
    assert!(err_text(run_predict(&empty, &out, fake_detect, false)).contains("no images found"));
}

#[test]
fn prediction_writer_format() {
    let d = |b: [f32; 4], s: f32| Detection { bbox: b, score: s, landmarks: [0.0; 10] };
    let text = retinaface::widerface::format_prediction(
        "img_1",
        &[d([-0.26, 10.04, 20.5, 30.0], 0.99912345), d([1.0, 2.0, 3.0, 4.0], 0.02)],
    )
    .expect("format");
    assert_eq!(text, "img_1\n2\n-0.3 10.0 20.8 20.0 0.99912345\n1.0 2.0 2.0 2.0 0.02\n");
    let (name, boxes) = retinaface::widerface::parse_prediction_text(&text, Path::new("x.txt")).expect("parse");
    assert_eq!(name, "img_1");
    assert_eq!(boxes.len(), 2);
    assert_eq!(retinaface::widerface::format_prediction("e", &[]).expect("format"), "e\n0\n");
    let msg = err_text(retinaface::widerface::format_prediction("bad", &[d([f32::NAN, 0.0, 1.0, 1.0], 0.5)]));
    assert!(msg.contains("bad") && msg.contains("non-finite"), "{msg}");
}

/// The real detector through the command line: `widerface predict` on the fake tree, then `widerface eval`
/// against ground truth made of the reference's own detections above 0.5 on those photos.
#[test]
fn cli_predict_with_real_weights_then_eval() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let images = tmp.path().join("images");
    let out = tmp.path().join("pred");
    let gt_dir = tmp.path().join("gt");
    std::fs::create_dir_all(&gt_dir).expect("mkdir");
    let layout = fake_tree(&images);
    let mut boxes_of = std::collections::BTreeMap::new();
    for (_, stem, _) in &layout {
        let golden: serde_json::Value = serde_json::from_slice(
            &std::fs::read(shared().join(format!("reference/goldens/real-mv1_0.25-yakhyo-{stem}.json")))
                .expect("golden"),
        )
        .expect("json");
        let boxes: Vec<[i32; 4]> = golden["detections"]
            .as_array()
            .expect("detections")
            .iter()
            .filter(|d| d["score"].as_f64().unwrap_or(0.0) >= 0.5)
            .map(|d| {
                let b: Vec<f64> = d["box"].as_array().expect("box").iter().map(|v| v.as_f64().unwrap_or(0.0)).collect();
                [b[0].round() as i32, b[1].round() as i32, (b[2] - b[0]).round() as i32, (b[3] - b[1]).round() as i32]
            })
            .collect();
        boxes_of.insert(stem.to_string(), boxes);
    }
    let all = |n: usize| (1..=n as u16).collect::<Vec<u16>>();
    let spec: GtSpec = vec![
        (
            "0--Parade",
            vec![
                (
                    "crowd",
                    boxes_of["crowd"].clone(),
                    [all(boxes_of["crowd"].len()), all(boxes_of["crowd"].len()), all(boxes_of["crowd"].len())],
                ),
                (
                    "kids",
                    boxes_of["kids"].clone(),
                    [all(boxes_of["kids"].len()), all(boxes_of["kids"].len()), all(boxes_of["kids"].len())],
                ),
            ],
        ),
        (
            "1--Handshaking",
            vec![(
                "trio",
                boxes_of["trio"].clone(),
                [all(boxes_of["trio"].len()), vec![], all(boxes_of["trio"].len())],
            )],
        ),
    ];
    write_gt_mats(&gt_dir, &spec, true);

    let bin = env!("CARGO_BIN_EXE_retinaface");
    let weights = shared().join("weights/retinaface_mv1_0.25.pth");
    let predict = || {
        std::process::Command::new(bin)
            .args(["widerface", "predict", "--backend", "cpu", "--quiet", "--weights"])
            .arg(&weights)
            .arg("--images")
            .arg(&images)
            .arg("--out")
            .arg(&out)
            .output()
            .expect("run predict")
    };
    let first = predict();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    assert!(String::from_utf8_lossy(&first.stdout).contains("3 images: 3 predicted, 0 already done"));
    let second = predict();
    assert!(String::from_utf8_lossy(&second.stdout).contains("3 images: 0 predicted, 3 already done"));
    let eval = std::process::Command::new(bin)
        .args(["widerface", "eval", "--json", "--pred"])
        .arg(&out)
        .arg("--gt")
        .arg(&gt_dir)
        .output()
        .expect("run eval");
    assert!(eval.status.success(), "{}", String::from_utf8_lossy(&eval.stderr));
    let aps: serde_json::Value = serde_json::from_slice(&eval.stdout).expect("json");
    for s in ["easy", "medium", "hard"] {
        let ap = aps[s].as_f64().expect("ap");
        assert!(ap > 0.95 && ap <= 1.0, "{s} AP {ap}: the reference's own faces must be found");
    }
}
