//! ONNX: the export of a graph with the reference export's interface, and the import of ONNX RetinaFace
//! models of this family (the reference's exports, the packages that ship them, ours) by matching their
//! graph to the builder's.

pub mod export;
pub mod import;
pub mod proto;

pub use export::{ExportOptions, export, write};
pub use import::import;
