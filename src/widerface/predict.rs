//! The engine-independent half of `retinaface widerface predict`: walk the validation images,
//! run a detector on each, write one prediction file per image in the standard format.
//!
//! File format, `<out>/<event>/<image stem>.txt`:
//!
//! ```text
//! 0_Parade_marchingband_1_465      line 1: the image name (file stem)
//! 108                              line 2: the number of boxes
//! 1002.2 295.4 8.1 8.6 0.59912     x y w h score, one box a line, in the detector's order
//! ```
//!
//! Boxes: `x = x1`, `y = y1`, `w = x2 - x1`, `h = y2 - y1` (no +1; the evaluation adds `x + w`
//! back), each with one decimal, as in the reference prediction files. The reference
//! `test_widerface.py` of Pytorch_Retinaface truncates the corners to integers instead
//! (`int(x1)`, `int(x2) - int(x1)`); one decimal keeps sub-pixel positions that matter for the
//! smallest faces. Score: the shortest decimal that reads back to the same f32, which is what the
//! reference writes (`str()` of a float32), so no ranking information is lost to rounding.
//!
//! Runs are resumable: a file is written to `<stem>.txt.partial` and renamed into place, so a
//! killed run never leaves a half file under the final name, and an image whose file exists and
//! is complete is skipped by the next run.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use rayon::prelude::*;

use super::eval::parse_prediction_text;
use super::event_files;
use crate::{Detection, Error, Result};

/// One validation image: `<images_dir>/<event>/<stem>.jpg`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValImage {
    pub event: String,
    pub stem: String,
    pub path: PathBuf,
}

/// What a predict run did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PredictSummary {
    /// Images found.
    pub total: usize,
    /// Images skipped because their prediction file was already complete.
    pub skipped: usize,
    /// Images detected and written by this run.
    pub predicted: usize,
    /// Boxes written by this run.
    pub detections: usize,
    /// Wall time of the run.
    pub seconds: f64,
}

/// The images of a validation tree `DIR/<event>/<image>.jpg` (`.jpg`/`.jpeg`, any case), sorted by
/// event then file name. Loose files in `DIR` and other files in event folders are ignored.
pub fn list_val_images(images_dir: &Path) -> Result<Vec<ValImage>> {
    let is_jpeg = |path: &Path| {
        path.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("jpg") || e.eq_ignore_ascii_case("jpeg"))
    };
    event_files(images_dir, is_jpeg)?
        .into_iter()
        .map(|(event, path)| {
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .ok_or_else(|| Error::WiderFace(format!("{}: file name is not valid UTF-8", path.display())))?
                .to_string();
            Ok(ValImage { event, stem, path })
        })
        .collect()
}

/// `<out_dir>/<event>/<stem>.txt`.
pub fn prediction_path(out_dir: &Path, event: &str, stem: &str) -> PathBuf {
    out_dir.join(event).join(format!("{stem}.txt"))
}

/// The text of one prediction file (see the module documentation). Non-finite values are an error.
pub fn format_prediction(stem: &str, detections: &[Detection]) -> Result<String> {
    use std::fmt::Write;
    let mut out = format!("{stem}\n{}\n", detections.len());
    for (i, d) in detections.iter().enumerate() {
        let [x1, y1, x2, y2] = d.bbox.map(f64::from);
        if !(d.bbox.iter().all(|v| v.is_finite()) && d.score.is_finite()) {
            return Err(Error::WiderFace(format!(
                "{stem}: detection {i} has a non-finite value: {:?} score {}",
                d.bbox, d.score
            )));
        }
        let _ = writeln!(out, "{x1:.1} {y1:.1} {:.1} {:.1} {}", x2 - x1, y2 - y1, d.score);
    }
    Ok(out)
}

/// Writes one prediction file atomically (temporary file, then rename); returns its path.
pub fn write_prediction(out_dir: &Path, event: &str, stem: &str, detections: &[Detection]) -> Result<PathBuf> {
    let text = format_prediction(stem, detections)?;
    let path = prediction_path(out_dir, event, stem);
    let dir = out_dir.join(event);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let partial = dir.join(format!("{stem}.txt.partial"));
    std::fs::write(&partial, text).map_err(|e| Error::io(&partial, e))?;
    std::fs::rename(&partial, &path).map_err(|e| Error::io(&path, e))?;
    Ok(path)
}

/// Whether `path` is a complete prediction file for image `stem`: it ends with a newline, line 1
/// is `stem`, line 2 is the number of box lines that follow, and every box line reads.
pub fn is_complete(path: &Path, stem: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    let mut lines = text.split('\n');
    let (Some(name), Some(count)) = (lines.next(), lines.next()) else {
        return false;
    };
    let Ok(count) = count.parse::<usize>() else {
        return false;
    };
    match parse_prediction_text(&text, path) {
        Ok((_, boxes)) => text.ends_with('\n') && name == stem && boxes.len() == count,
        Err(_) => false,
    }
}

/// Runs `detect` on every validation image under `images_dir` whose prediction file in `out_dir`
/// is missing or incomplete, and writes the files. Images run in parallel on rayon's pool, so
/// `detect` (which decodes the image itself) is called from several threads at once. With
/// `progress`, a line on stderr shows images done, images/s and the time left (ended with a
/// newline, also on error). Stops at the first error; what was written stays and the next run
/// resumes.
pub fn run_predict<F>(images_dir: &Path, out_dir: &Path, detect: F, progress: bool) -> Result<PredictSummary>
where
    F: Fn(&Path) -> Result<Vec<Detection>> + Sync,
{
    let start = Instant::now();
    let (total, pending) = plan(images_dir, out_dir)?;
    let bar = Progress::new(progress, pending.len(), total - pending.len());
    let detections = AtomicUsize::new(0);
    let result = pending.par_iter().try_for_each(|img| {
        let dets = detect(&img.path).map_err(|e| detect_error(img, e))?;
        write_prediction(out_dir, &img.event, &img.stem, &dets)?;
        detections.fetch_add(dets.len(), Ordering::Relaxed);
        bar.tick();
        Ok::<(), Error>(())
    });
    bar.finish();
    result?;
    Ok(summary(total, pending.len(), detections.into_inner(), start))
}

/// As [`run_predict`], for a detector that runs one image at a time: `load` (decoding, say) runs on
/// `loaders` background threads, at most `queue` images ahead, while `detect` runs on the calling
/// thread, so loading overlaps the network. The loader threads are plain threads, not rayon's, so
/// `detect` may use rayon freely.
pub fn run_predict_pipelined<T, L, D>(
    images_dir: &Path,
    out_dir: &Path,
    load: L,
    mut detect: D,
    loaders: usize,
    queue: usize,
    progress: bool,
) -> Result<PredictSummary>
where
    T: Send,
    L: Fn(&Path) -> Result<T> + Sync,
    D: FnMut(&Path, T) -> Result<Vec<Detection>>,
{
    let start = Instant::now();
    let (total, pending) = plan(images_dir, out_dir)?;
    let bar = Progress::new(progress, pending.len(), total - pending.len());
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let mut detections = 0usize;
    let (tx, rx) = mpsc::sync_channel::<(usize, Result<T>)>(queue.max(1));
    let result = std::thread::scope(|scope| {
        for _ in 0..loaders.max(1) {
            let tx = tx.clone();
            let (next, stop, pending, load) = (&next, &stop, &pending, &load);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(img) = pending.get(i) else { break };
                    if tx.send((i, load(&img.path))).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let result = (|| {
            for (i, loaded) in rx.iter() {
                let img = &pending[i];
                let dets = loaded.and_then(|t| detect(&img.path, t)).map_err(|e| detect_error(img, e))?;
                write_prediction(out_dir, &img.event, &img.stem, &dets)?;
                detections += dets.len();
                bar.tick();
            }
            Ok::<(), Error>(())
        })();
        // On an error, stop the loaders and unblock any waiting on a full queue.
        stop.store(true, Ordering::Relaxed);
        drop(rx);
        result
    });
    bar.finish();
    result?;
    Ok(summary(total, pending.len(), detections, start))
}

/// All images, and those still to do.
fn plan(images_dir: &Path, out_dir: &Path) -> Result<(usize, Vec<ValImage>)> {
    let images = list_val_images(images_dir)?;
    if images.is_empty() {
        return Err(Error::WiderFace(format!("no images found as {}/<event>/<image>.jpg", images_dir.display())));
    }
    let total = images.len();
    let pending: Vec<ValImage> = images
        .into_par_iter()
        .filter(|img| !is_complete(&prediction_path(out_dir, &img.event, &img.stem), &img.stem))
        .collect();
    Ok((total, pending))
}

fn detect_error(img: &ValImage, e: Error) -> Error {
    Error::WiderFace(format!("predict {}: {e}", img.path.display()))
}

fn summary(total: usize, predicted: usize, detections: usize, start: Instant) -> PredictSummary {
    PredictSummary { total, skipped: total - predicted, predicted, detections, seconds: start.elapsed().as_secs_f64() }
}

/// The progress line on stderr.
struct Progress {
    enabled: bool,
    total: usize,
    skipped: usize,
    done: AtomicUsize,
    start: Instant,
    last_print: Mutex<Option<Instant>>,
}

impl Progress {
    fn new(enabled: bool, total: usize, skipped: usize) -> Progress {
        Progress {
            enabled,
            total,
            skipped,
            done: AtomicUsize::new(0),
            start: Instant::now(),
            last_print: Mutex::new(None),
        }
    }

    fn tick(&self) {
        let done = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        if !self.enabled {
            return;
        }
        if let Ok(mut last) = self.last_print.lock() {
            let now = Instant::now();
            if last.is_none_or(|t| now - t >= Duration::from_millis(250)) || done == self.total {
                *last = Some(now);
                eprint!("\r{}", self.line(done));
            }
        }
    }

    fn finish(&self) {
        if self.enabled {
            eprintln!("\r{}", self.line(self.done.load(Ordering::Relaxed)));
        }
    }

    fn line(&self, done: usize) -> String {
        let secs = self.start.elapsed().as_secs_f64();
        let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
        let eta = if rate > 0.0 { format_duration((self.total - done) as f64 / rate) } else { "?".into() };
        format!(
            "widerface predict: {done}/{} images ({} already done), {rate:.1} images/s, elapsed {}, ETA {eta}   ",
            self.total,
            self.skipped,
            format_duration(secs)
        )
    }
}

fn format_duration(secs: f64) -> String {
    let s = secs.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m{:02}s", s / 3600, s % 3600 / 60, s % 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}
