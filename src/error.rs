//! The crate's one error type. Every variant names what failed: the file, the tensor, the shape, the value.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    /// A weights file that cannot be parsed (truncated, corrupt, unsupported pickle opcode, ...).
    #[error("weights file {path}: {msg}")]
    WeightsFormat { path: PathBuf, msg: String },

    /// An input file other than weights or an image (the `forward` command's input tensors).
    #[error("input file {path}: {msg}")]
    InputFile { path: PathBuf, msg: String },
    /// An ONNX file that cannot be read, or whose graph is not a RetinaFace of this family.
    #[error("ONNX {path}: {msg}")]
    Onnx { path: PathBuf, msg: String },

    #[error("weights: missing tensor `{name}` required by network {network}")]
    MissingTensor { network: String, name: String },

    #[error("weights: unexpected tensor `{name}` for network {network} (wrong network or layout?)")]
    UnexpectedTensor { network: String, name: String },

    #[error("weights: tensor `{name}` has shape {found:?}, network {network} expects {expected:?}")]
    TensorShape { network: String, name: String, expected: Vec<usize>, found: Vec<usize> },

    #[error("weights: tensor `{name}` holds a non-finite value ({value}) at element {index}")]
    NonFiniteWeight { name: String, index: usize, value: f32 },

    #[error("weights: tensor `{name}`: {msg}")]
    TensorData { name: String, msg: String },

    #[error(
        "unknown network `{0}` (expected one of mobilenetv1_0.25, mobilenetv1_0.50, mobilenetv1, mobilenetv2, resnet18, resnet34, resnet50)"
    )]
    UnknownNetwork(String),

    #[error("cannot tell the network from the weights {path}: {msg}; pass --network")]
    NetworkUndetermined { path: PathBuf, msg: String },

    #[error("image {source_name}: {msg}")]
    Image { source_name: String, msg: String },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("WIDER FACE: {0}")]
    WiderFace(String),

    /// A graph or plan that breaks an invariant the executors rely on (names the op or tensor).
    #[error("graph: {0}")]
    Graph(String),

    #[error("CUDA: {0}")]
    Cuda(String),

    /// A video source, the ffmpeg subprocess, or the encoded output (the message names which).
    #[error("video {0}")]
    Video(String),

    /// The server stopped without finishing its work (shutdown timeout, forced by a second signal).
    #[error("server: {0}")]
    Serve(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
