//! The WIDER FACE validation evaluation, equal to the standard script (`evaluation.py` of
//! WiderFace-Evaluation, as shipped with RetinaFace): Easy / Medium / Hard average precision and
//! the precision-recall curves.
//!
//! The rules, step by step (see `../shared/reference/widerface-eval/README.md`):
//! 1. Scores are normalised over the whole prediction set, every file read included:
//!    `(s - min) / (max - min)` with `max = max(0, max score)`, `min = min(1, min score)`.
//! 2. 1000 thresholds `thr_t = 1 - (t + 1) / 1000`; a box passes when its score `>= thr_t`.
//! 3. Boxes become corners `x2 = x + w`, `y2 = y + h`; IoU uses the "+1 pixel" areas.
//! 4. Per image and subset, predictions are matched in file order to their best face (kept or
//!    ignored); a match to an ignored face drops the prediction, a second match to a kept face
//!    leaves it a false positive. Every image adds its kept faces to the subset's face total.
//! 5. At each threshold an image adds (proposals, matched) up to the last prediction that passes.
//! 6. precision = matched / proposals, recall = matched / faces; AP is the VOC all-points area,
//!    summed with numpy's pairwise summation as `np.sum` does.
//!
//! Where the script would crash or give garbage, this gives an error instead: a missing event
//! folder or image file (the script's KeyError), an unreadable number, a non-finite value.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::event_files;
use super::ground_truth::{GroundTruth, GtImage, Subset};
use crate::{Error, Result};

/// Number of score thresholds of the curve.
pub const THRESHOLDS: usize = 1000;
/// IoU at or above which a prediction matches a face.
pub const IOU_THRESHOLD: f64 = 0.5;

/// One predicted box as read from a prediction file: `x y w h score`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PredBox {
    pub x: f64,
    pub y: f64,
    pub w: f64,
    pub h: f64,
    pub score: f64,
}

/// A prediction set: event folder name → image name → boxes in file order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Predictions {
    pub events: BTreeMap<String, BTreeMap<String, Vec<PredBox>>>,
}

impl Predictions {
    pub fn new() -> Predictions {
        Predictions::default()
    }

    /// Sets the boxes of one image (replacing any it had).
    pub fn insert(&mut self, event: &str, image: &str, boxes: Vec<PredBox>) {
        self.events.entry(event.to_string()).or_default().insert(image.to_string(), boxes);
    }

    /// The boxes of one image, if the set has it.
    pub fn get(&self, event: &str, image: &str) -> Option<&[PredBox]> {
        self.events.get(event)?.get(image).map(Vec::as_slice)
    }

    /// Number of image entries.
    pub fn image_count(&self) -> usize {
        self.events.values().map(BTreeMap::len).sum()
    }

    /// Number of boxes over all images.
    pub fn box_count(&self) -> usize {
        self.events.values().flat_map(BTreeMap::values).map(Vec::len).sum()
    }

    /// Reads `<dir>/<event>/*.txt`. Each sub-folder is an event; each `.txt` file in it is one
    /// image, named by the file's first line (not the file name), as the standard script does.
    /// Other files (such as a predict run's temporary files) and loose files in `dir` are skipped.
    /// Two files naming the same image in one event are an error (the script would keep either).
    pub fn read_dir(dir: &Path) -> Result<Predictions> {
        let files = event_files(dir, |path| path.extension().is_some_and(|e| e == "txt"))?;
        let parsed: Vec<(String, PathBuf, String, Vec<PredBox>)> = files
            .into_par_iter()
            .map(|(event, path)| {
                let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
                let (image, boxes) = parse_prediction_text(&text, &path)?;
                Ok((event, path, image, boxes))
            })
            .collect::<Result<_>>()?;
        let mut preds = Predictions::new();
        let mut sources: BTreeMap<(String, String), PathBuf> = BTreeMap::new();
        for (event, path, image, boxes) in parsed {
            if let Some(first) = sources.insert((event.clone(), image.clone()), path.clone()) {
                return Err(Error::WiderFace(format!(
                    "predictions: {} and {} both name image `{image}` on their first line",
                    first.display(),
                    path.display()
                )));
            }
            preds.insert(&event, &image, boxes);
        }
        Ok(preds)
    }

    /// `(min, max)` of the normalisation: the running max starts at 0, the running min at 1.
    fn score_range(&self) -> (f64, f64) {
        let (mut min, mut max) = (1.0f64, 0.0f64);
        for b in self.events.values().flat_map(BTreeMap::values).flatten() {
            if b.score > max {
                max = b.score;
            }
            if b.score < min {
                min = b.score;
            }
        }
        (min, max)
    }
}

/// Lines as Python's `readlines()` in text mode sees them: `\n`, `\r\n` and `\r` all end a line,
/// and the line ends are removed.
fn python_lines(text: &str) -> Vec<&str> {
    let mut lines: Vec<&str> = Vec::new();
    let bytes = text.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\n' => {
                lines.push(&text[start..i]);
                start = i + 1;
            }
            b'\r' => {
                lines.push(&text[start..i]);
                if bytes.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    if start < bytes.len() {
        lines.push(&text[start..]);
    }
    lines
}

/// The image name the standard script takes from line 1: the text after the last `/`, then
/// Python's `rstrip('.jpg')`, which strips any trailing run of the characters `.`, `j`, `p`, `g`
/// (for WIDER FACE names, which end in a digit, that is the `.jpg` extension).
pub fn image_key(first_line: &str) -> &str {
    let base = first_line.rsplit('/').next().unwrap_or(first_line);
    base.trim_end_matches(['.', 'j', 'p', 'g'])
}

/// Parses one prediction file (`path` names it in errors): the image name from line 1, the count
/// line ignored, lines whose first space-separated field is empty skipped, the first five fields
/// of every other line read as `x y w h score`.
pub fn parse_prediction_text(text: &str, path: &Path) -> Result<(String, Vec<PredBox>)> {
    let lines = python_lines(text);
    let Some(first) = lines.first() else {
        return Err(Error::WiderFace(format!(
            "{}: empty prediction file (line 1 must name the image)",
            path.display()
        )));
    };
    let name = image_key(first).to_string();
    let mut boxes = Vec::with_capacity(lines.len().saturating_sub(2));
    for (k, line) in lines.iter().enumerate().skip(2) {
        let mut fields = line.split(' ');
        if fields.clone().next().is_none_or(str::is_empty) {
            continue;
        }
        let mut v = [0.0f64; 5];
        for (i, slot) in v.iter_mut().enumerate() {
            let Some(field) = fields.next() else {
                return Err(Error::WiderFace(format!(
                    "{}: line {}: expected 5 space-separated fields `x y w h score`, found {i}: `{line}`",
                    path.display(),
                    k + 1
                )));
            };
            *slot = parse_number(field).map_err(|why| {
                Error::WiderFace(format!(
                    "{}: line {}: field {} `{field}` {why}: `{line}`",
                    path.display(),
                    k + 1,
                    i + 1
                ))
            })?;
        }
        boxes.push(PredBox { x: v[0], y: v[1], w: v[2], h: v[3], score: v[4] });
    }
    Ok((name, boxes))
}

/// A number as Python's `float()` reads it (surrounding whitespace allowed), finite only.
fn parse_number(field: &str) -> std::result::Result<f64, &'static str> {
    let x: f64 = field.trim().parse().map_err(|_| "is not a number")?;
    if x.is_finite() { Ok(x) } else { Err("is not a finite number") }
}

/// One point of a precision-recall curve.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrPoint {
    /// The score threshold `1 - (t + 1) / 1000`.
    pub threshold: f64,
    /// matched / proposals (NaN where there are no proposals, as in the script).
    pub precision: f64,
    /// matched / faces of the subset.
    pub recall: f64,
    /// Predictions above the threshold, less those dropped on ignored faces.
    pub proposals: u64,
    /// Kept faces matched.
    pub matched: u64,
}

/// The result for one subset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SubsetEval {
    pub ap: f64,
    /// Faces counted by the subset (the recall denominator).
    pub faces: u64,
    /// One point per threshold, t = 0 .. 999 (threshold 0.999 down to 0.0).
    pub curve: Vec<PrPoint>,
}

/// Easy, Medium and Hard results.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub easy: SubsetEval,
    pub medium: SubsetEval,
    pub hard: SubsetEval,
}

impl Evaluation {
    pub fn subset(&self, subset: Subset) -> &SubsetEval {
        match subset {
            Subset::Easy => &self.easy,
            Subset::Medium => &self.medium,
            Subset::Hard => &self.hard,
        }
    }

    pub fn aps(&self) -> Aps {
        Aps { easy: self.easy.ap, medium: self.medium.ap, hard: self.hard.ap }
    }
}

/// The three APs; serialises as `{"easy":..,"medium":..,"hard":..}`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Aps {
    pub easy: f64,
    pub medium: f64,
    pub hard: f64,
}

impl Aps {
    pub fn get(&self, subset: Subset) -> f64 {
        match subset {
            Subset::Easy => self.easy,
            Subset::Medium => self.medium,
            Subset::Hard => self.hard,
        }
    }
}

/// The three result lines of the standard script, with the values as Python prints them:
/// `Easy   Val AP: 0.8339930831626076` etc., each line ending in `\n`. (The script frames them
/// with a `==================== Results ====================` line and a line of 49 `=`.)
pub fn format_report(aps: &Aps) -> String {
    format!(
        "Easy   Val AP: {}\nMedium Val AP: {}\nHard   Val AP: {}\n",
        python_float_repr(aps.easy),
        python_float_repr(aps.medium),
        python_float_repr(aps.hard)
    )
}

/// `repr()` of a Python float: the shortest digits that read back to the same value, in fixed
/// notation for 1e-4 <= |x| < 1e16 (with `.0` on integers), else as `1.5e-05` / `1e+16`.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    // Rust's `{:e}` gives the shortest round-trip digits, e.g. `-8.339930831626076e-1`.
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let decpt = exp + 1;
    if decpt <= -4 || decpt > 16 {
        let exp_sign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{mantissa}e{exp_sign}{:02}", exp.unsigned_abs());
    }
    let n = digits.len() as i32;
    let body = if decpt <= 0 {
        format!("0.{}{digits}", "0".repeat((-decpt) as usize))
    } else if decpt >= n {
        format!("{digits}{}.0", "0".repeat((decpt - n) as usize))
    } else {
        format!("{}.{}", &digits[..decpt as usize], &digits[decpt as usize..])
    };
    format!("{sign}{body}")
}

/// The threshold of step t: `1 - (t + 1) / 1000` in float64.
pub fn threshold(t: usize) -> f64 {
    1.0 - (t + 1) as f64 / THRESHOLDS as f64
}

/// Reads the predictions in `pred_dir` and the ground truth in `gt_dir` and evaluates.
pub fn evaluate_dirs(pred_dir: &Path, gt_dir: &Path) -> Result<Evaluation> {
    let gt = GroundTruth::load(gt_dir)?;
    let preds = Predictions::read_dir(pred_dir)?;
    evaluate(&gt, &preds).map_err(|e| match e {
        Error::WiderFace(msg) => Error::WiderFace(format!("{}: {msg}", pred_dir.display())),
        other => other,
    })
}

/// Per-threshold sums of (proposals, matched) for the three subsets.
type Counts = [Vec<(u64, u64)>; 3];

/// Evaluates a prediction set against the ground truth, exactly as the standard script.
pub fn evaluate(gt: &GroundTruth, preds: &Predictions) -> Result<Evaluation> {
    gt.validate()?;
    let (min, max) = preds.score_range();
    let diff = max - min;
    let thresholds: Vec<f64> = (0..THRESHOLDS).map(threshold).collect();

    // Every ground-truth image must have a prediction entry (the script's KeyError otherwise).
    let mut work: Vec<(&GtImage, &[PredBox])> = Vec::with_capacity(gt.image_count());
    for event in &gt.events {
        let Some(event_preds) = preds.events.get(&event.name) else {
            return Err(Error::WiderFace(format!("predictions have no folder for event `{}`", event.name)));
        };
        for image in &event.images {
            let Some(boxes) = event_preds.get(&image.name) else {
                return Err(Error::WiderFace(format!(
                    "predictions have no file for image `{}` in event folder `{}` (a file's image is the name on its \
                     first line, after the last `/`, with trailing `.`, `j`, `p`, `g` stripped as the script's rstrip('.jpg'))",
                    image.name, event.name
                )));
            };
            work.push((image, boxes));
        }
    }

    let mut faces = [0u64; 3];
    for (image, _) in &work {
        for s in Subset::ALL {
            faces[s.index()] += image.kept[s.index()].len() as u64;
        }
    }
    let empty = || -> Counts { std::array::from_fn(|_| vec![(0u64, 0u64); THRESHOLDS]) };
    let counts = work
        .par_iter()
        .fold(empty, |mut acc, (image, boxes)| {
            if !image.boxes.is_empty() && !boxes.is_empty() {
                image_counts(image, boxes, min, diff, &thresholds, &mut acc);
            }
            acc
        })
        .reduce(empty, |mut a, b| {
            for (sa, sb) in a.iter_mut().zip(&b) {
                for (x, y) in sa.iter_mut().zip(sb) {
                    x.0 += y.0;
                    x.1 += y.1;
                }
            }
            a
        });

    let [easy, medium, hard] = Subset::ALL.map(|s| {
        let i = s.index();
        let curve: Vec<PrPoint> = counts[i]
            .iter()
            .zip(&thresholds)
            .map(|(&(proposals, matched), &threshold)| PrPoint {
                threshold,
                precision: matched as f64 / proposals as f64,
                recall: matched as f64 / faces[i] as f64,
                proposals,
                matched,
            })
            .collect();
        SubsetEval { ap: voc_ap(&curve), faces: faces[i], curve }
    });
    Ok(Evaluation { easy, medium, hard })
}

/// Adds one image's (proposals, matched) at every threshold, for every subset, to `acc`.
fn image_counts(image: &GtImage, preds: &[PredBox], min: f64, diff: f64, thresholds: &[f64], acc: &mut Counts) {
    // last[t]: the last prediction in file order whose normalised score passes threshold t.
    let mut last: Vec<Option<usize>> = vec![None; thresholds.len()];
    for (i, p) in preds.iter().enumerate() {
        let s = (p.score - min) / diff;
        // Thresholds decrease with t: the first one passed, if any (never for a NaN score).
        let t = thresholds.partition_point(|&thr| s < thr || s.is_nan());
        if t < thresholds.len() {
            last[t] = Some(i);
        }
    }
    for t in 1..last.len() {
        last[t] = last[t].max(last[t - 1]);
    }

    // Each prediction's best face (first on ties) and its IoU, over all faces.
    let faces: Vec<([f64; 4], f64)> = image
        .boxes
        .iter()
        .map(|&[x, y, w, h]| {
            let (x2, y2) = (w + x, h + y);
            ([x, y, x2, y2], (x2 - x + 1.0) * (y2 - y + 1.0))
        })
        .collect();
    let best: Vec<(usize, f64)> = preds
        .iter()
        .map(|p| {
            let b = [p.x, p.y, p.w + p.x, p.h + p.y];
            let mut best = (0usize, 0.0f64);
            for (k, (q, q_area)) in faces.iter().enumerate() {
                let iou = overlap(&b, q, *q_area);
                if iou > best.1 {
                    best = (k, iou);
                }
            }
            best
        })
        .collect();

    let mut kept = vec![false; faces.len()];
    let mut matched = vec![false; faces.len()];
    let mut prefix: Vec<(u64, u64)> = vec![(0, 0); preds.len()];
    for s in Subset::ALL {
        kept.fill(false);
        matched.fill(false);
        for &k in &image.kept[s.index()] {
            kept[k] = true;
        }
        let (mut proposals, mut n_matched) = (0u64, 0u64);
        for (h, &(k, iou)) in best.iter().enumerate() {
            let mut dropped = false;
            if iou >= IOU_THRESHOLD {
                if !kept[k] {
                    dropped = true;
                } else if !matched[k] {
                    matched[k] = true;
                    n_matched += 1;
                }
            }
            if !dropped {
                proposals += 1;
            }
            prefix[h] = (proposals, n_matched);
        }
        for (sum, r) in acc[s.index()].iter_mut().zip(&last) {
            if let Some(r) = *r {
                sum.0 += prefix[r].0;
                sum.1 += prefix[r].1;
            }
        }
    }
}

/// IoU with the "+1 pixel" convention, in the order of operations of the script's `bbox_overlaps`.
fn overlap(b: &[f64; 4], q: &[f64; 4], q_area: f64) -> f64 {
    let iw = b[2].min(q[2]) - b[0].max(q[0]) + 1.0;
    if iw > 0.0 {
        let ih = b[3].min(q[3]) - b[1].max(q[1]) + 1.0;
        if ih > 0.0 {
            let ua = (b[2] - b[0] + 1.0) * (b[3] - b[1] + 1.0) + q_area - iw * ih;
            return iw * ih / ua;
        }
    }
    0.0
}

/// VOC all-points AP of a curve ordered by threshold (recall rising), as the script's `voc_ap`.
fn voc_ap(curve: &[PrPoint]) -> f64 {
    let mut mrec = Vec::with_capacity(curve.len() + 2);
    let mut mpre = Vec::with_capacity(curve.len() + 2);
    mrec.push(0.0);
    mpre.push(0.0);
    for p in curve {
        mrec.push(p.recall);
        mpre.push(p.precision);
    }
    mrec.push(1.0);
    mpre.push(0.0);
    // Precision envelope, with np.maximum's NaN propagation.
    for i in (1..mpre.len()).rev() {
        let (a, b) = (mpre[i - 1], mpre[i]);
        mpre[i - 1] = if a.is_nan() || b.is_nan() { f64::NAN } else { a.max(b) };
    }
    let terms: Vec<f64> = (0..mrec.len() - 1)
        .filter(|&i| mrec[i + 1] != mrec[i])
        .map(|i| (mrec[i + 1] - mrec[i]) * mpre[i + 1])
        .collect();
    0.0 + numpy_pairwise_sum(&terms)
}

/// numpy's float64 `add.reduce` inner sum (pairwise, 8-way unrolled, blocks of 128).
fn numpy_pairwise_sum(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        let mut res = 0.0;
        for &x in a {
            res += x;
        }
        res
    } else if n <= 128 {
        let mut r = [0.0f64; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - n % 8 {
            for (j, rj) in r.iter_mut().enumerate() {
                *rj += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        while i < n {
            res += a[i];
            i += 1;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        numpy_pairwise_sum(&a[..n2]) + numpy_pairwise_sum(&a[n2..])
    }
}

/// The curves as CSV: a header, then one row per threshold (t = 0 .. 999) with precision and
/// recall of each subset, values as Python prints them (`nan` where precision is undefined).
pub fn curves_csv(eval: &Evaluation) -> String {
    let mut out = String::from(
        "threshold,easy_precision,easy_recall,medium_precision,medium_recall,hard_precision,hard_recall\n",
    );
    let n = eval.easy.curve.len().min(eval.medium.curve.len()).min(eval.hard.curve.len());
    for t in 0..n {
        out.push_str(&python_float_repr(eval.easy.curve[t].threshold));
        for s in Subset::ALL {
            let p = &eval.subset(s).curve[t];
            out.push(',');
            out.push_str(&python_float_repr(p.precision));
            out.push(',');
            out.push_str(&python_float_repr(p.recall));
        }
        out.push('\n');
    }
    out
}

/// Writes [`curves_csv`] to `path`.
pub fn write_curves_csv(eval: &Evaluation, path: &Path) -> Result<()> {
    std::fs::write(path, curves_csv(eval)).map_err(|e| Error::io(path, e))
}
