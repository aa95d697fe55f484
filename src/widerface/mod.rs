//! WIDER FACE validation: the standard evaluation (Easy / Medium / Hard AP, exactly as the
//! standard `evaluation.py`), its ground truth read from the official MAT-files by a reader of our
//! own, precision-recall curves as CSV and PNG, and the engine-independent half of `predict`.

pub mod ground_truth;
pub mod mat;

pub use ground_truth::{GroundTruth, GtEvent, GtImage, Subset};
pub use mat::MatFile;
