//! The seven networks of the reference and their settings (retinaface-spec.md, "Networks").

use crate::error::{Error, Result};
use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Network {
    MobileNetV1_025,
    MobileNetV1_050,
    MobileNetV1,
    MobileNetV2,
    ResNet18,
    ResNet34,
    ResNet50,
}

impl Network {
    pub const ALL: [Network; 7] = [
        Network::MobileNetV1_025,
        Network::MobileNetV1_050,
        Network::MobileNetV1,
        Network::MobileNetV2,
        Network::ResNet18,
        Network::ResNet34,
        Network::ResNet50,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Network::MobileNetV1_025 => "mobilenetv1_0.25",
            Network::MobileNetV1_050 => "mobilenetv1_0.50",
            Network::MobileNetV1 => "mobilenetv1",
            Network::MobileNetV2 => "mobilenetv2",
            Network::ResNet18 => "resnet18",
            Network::ResNet34 => "resnet34",
            Network::ResNet50 => "resnet50",
        }
    }

    /// Channels of the three pyramid inputs (strides 8, 16, 32).
    pub fn pyramid_channels(self) -> [usize; 3] {
        match self {
            Network::MobileNetV1_025 => [64, 128, 256],
            Network::MobileNetV1_050 => [128, 256, 512],
            Network::MobileNetV1 => [256, 512, 1024],
            Network::MobileNetV2 => [32, 96, 1280],
            Network::ResNet18 | Network::ResNet34 => [128, 256, 512],
            Network::ResNet50 => [512, 1024, 2048],
        }
    }

    /// FPN / SSH channel count C.
    pub fn fpn_channels(self) -> usize {
        match self {
            Network::MobileNetV1_025 => 64,
            Network::ResNet50 => 256,
            _ => 128,
        }
    }

    /// LeakyReLU slope of the FPN and SSH layers: 0.1 when C <= 64, else 0 (ReLU).
    pub fn neck_slope(self) -> f32 {
        if self.fpn_channels() <= 64 { 0.1 } else { 0.0 }
    }

    /// MobileNetV1 width multiplier, if this is a MobileNetV1.
    pub fn mobilenetv1_width(self) -> Option<f64> {
        match self {
            Network::MobileNetV1_025 => Some(0.25),
            Network::MobileNetV1_050 => Some(0.5),
            Network::MobileNetV1 => Some(1.0),
            _ => None,
        }
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Network {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        let n = match t.as_str() {
            "mobilenetv1_0.25" | "mobilenet0.25" | "mnet0.25" | "mobilenetv1_025" => Network::MobileNetV1_025,
            "mobilenetv1_0.50" | "mobilenetv1_0.5" | "mobilenet0.5" | "mobilenetv1_050" => Network::MobileNetV1_050,
            "mobilenetv1" | "mobilenetv1_1.0" => Network::MobileNetV1,
            "mobilenetv2" => Network::MobileNetV2,
            "resnet18" => Network::ResNet18,
            "resnet34" => Network::ResNet34,
            "resnet50" => Network::ResNet50,
            _ => return Err(Error::UnknownNetwork(s.to_string())),
        };
        Ok(n)
    }
}
