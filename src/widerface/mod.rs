//! WIDER FACE validation: the standard evaluation (Easy / Medium / Hard AP, exactly as the
//! standard `evaluation.py`), its ground truth read from the official MAT-files by a reader of our
//! own, precision-recall curves as CSV and PNG, and the engine-independent half of `predict`.

pub mod eval;
pub mod ground_truth;
pub mod mat;
pub mod plot;
pub mod predict;

use std::path::{Path, PathBuf};

use crate::{Error, Result};

pub use eval::{
    Aps, Evaluation, PrPoint, PredBox, Predictions, SubsetEval, curves_csv, evaluate, evaluate_dirs, format_report,
    parse_prediction_text, python_float_repr, write_curves_csv,
};
pub use ground_truth::{GroundTruth, GtEvent, GtImage, Subset};
pub use mat::MatFile;
pub use plot::{render_curves, write_curves_png};
pub use predict::{
    PredictSummary, ValImage, format_prediction, is_complete, list_val_images, prediction_path, run_predict,
    run_predict_pipelined, write_prediction,
};

/// The files of a `<dir>/<event>/<file>` tree that `keep` accepts, with their event folder names,
/// sorted by event then path. Loose files in `dir` are skipped.
fn event_files(dir: &Path, keep: impl Fn(&Path) -> bool) -> Result<Vec<(String, PathBuf)>> {
    let mut files = Vec::new();
    for event_path in sorted_entries(dir)? {
        if !event_path.is_dir() {
            continue;
        }
        let event = event_path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::WiderFace(format!("{}: folder name is not valid UTF-8", event_path.display())))?
            .to_string();
        for path in sorted_entries(&event_path)? {
            if keep(&path) && path.is_file() {
                files.push((event.clone(), path));
            }
        }
    }
    Ok(files)
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        paths.push(entry.map_err(|e| Error::io(dir, e))?.path());
    }
    paths.sort();
    Ok(paths)
}
