//! RetinaFace face detection: a CPU reference engine (the oracle) and CUDA kernels.
//!
//! ```no_run
//! use retinaface::{DetectOptions, Engine, WeightsSpec, image_io};
//! let engine = Engine::new(&WeightsSpec::File("weights.pth".into()), None)?;
//! let img = image_io::load("photo.jpg".as_ref(), &Default::default())?;
//! for d in engine.detect(&img, &DetectOptions::default())? {
//!     println!("{:?} {:.3}", d.bbox, d.score);
//! }
//! # Ok::<(), retinaface::Error>(())
//! ```

pub mod align;
pub mod consts;
pub mod cpu;
pub mod cuda;
pub mod detection;
pub mod draw;
pub mod engine;
pub mod error;
pub mod exec;
pub mod graph;
pub mod image_io;
pub mod model;
pub mod network;
pub mod onnx;
pub mod passes;
pub mod post;
pub mod reference;
pub mod serve;
pub mod video;
pub mod weights;
pub mod widerface;

pub use detection::Detection;
pub use engine::{DetectOptions, Engine};
pub use error::{Error, Result};
pub use exec::{Backend, Precision, Timings};
pub use image_io::{BgrImage, ResizeMode};
pub use network::Network;
pub use post::{PostOptions, RawOutput};
pub use weights::WeightsSpec;
