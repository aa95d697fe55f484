//! `retinaface video`: files, webcams and streams through ffmpeg, with the reference webcam script's
//! letterbox, batched inference, an annotated output video and SORT face ids.
//!
//! Stages, one file each: [`source`] (ffmpeg decoding), [`letterbox`] (the network input),
//! [`pipeline`] (threads and queues), [`output`] (drawing, JSON, encoding), [`tracker`] (SORT).

pub mod letterbox;
pub mod output;
pub mod pipeline;
pub mod source;
pub mod tracker;

pub use letterbox::FrameResize;
pub use pipeline::{Summary, VideoOptions, install_sigint, run};
