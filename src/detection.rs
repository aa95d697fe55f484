//! The engine's output: one detected face in pixels of the original image.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    /// [x1, y1, x2, y2] in pixels of the original image (not clipped, as the reference).
    #[serde(rename = "box")]
    pub bbox: [f32; 4],
    /// Face probability (second softmax output).
    pub score: f32,
    /// Five points (left eye, right eye, nose, left mouth corner, right mouth corner) as x0, y0, ..., x4, y4.
    pub landmarks: [f32; 10],
}
