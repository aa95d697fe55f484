//! Backbones: MobileNetV1 (any width), MobileNetV2, ResNet-18/34/50. Each returns the three pyramid
//! inputs at strides 8, 16 and 32.

use super::{Act, Builder, ConvBn, Dest, TensorId};
use crate::error::Result;
use crate::network::Network;

pub fn build(b: &mut Builder<'_>, input: TensorId) -> Result<[TensorId; 3]> {
    match b.network {
        Network::MobileNetV1_025 | Network::MobileNetV1_050 | Network::MobileNetV1 => {
            mobilenet_v1(b, input, b.network.mobilenetv1_width().unwrap_or(1.0))
        }
        Network::MobileNetV2 => mobilenet_v2(b, input),
        Network::ResNet18 => resnet(b, input, &[2, 2, 2, 2], false),
        Network::ResNet34 => resnet(b, input, &[3, 4, 6, 3], false),
        Network::ResNet50 => resnet(b, input, &[3, 4, 6, 3], true),
    }
}

/// torchvision's `_make_divisible(v, 8)`.
pub fn make_divisible(v: f64) -> usize {
    let d: f64 = 8.0;
    let mut n = d.max(((v + d / 2.0) / d).floor() * d);
    if n < 0.9 * v {
        n += d;
    }
    n as usize
}

const MBV1_SLOPE: Act = Act::Leaky(0.1);

fn mobilenet_v1(b: &mut Builder<'_>, input: TensorId, width: f64) -> Result<[TensorId; 3]> {
    let f: Vec<usize> = [32.0, 64.0, 128.0, 256.0, 512.0, 1024.0].iter().map(|c| make_divisible(c * width)).collect();
    // (stage, index, cin, cout, stride) of each depthwise-separable layer after the stem.
    let mut layers: Vec<(usize, usize, usize, usize, usize)> = vec![
        (1, 1, f[0], f[1], 1),
        (1, 2, f[1], f[2], 2),
        (1, 3, f[2], f[2], 1),
        (1, 4, f[2], f[3], 2),
        (1, 5, f[3], f[3], 1),
    ];
    layers.push((2, 0, f[3], f[4], 2));
    for i in 1..=5 {
        layers.push((2, i, f[4], f[4], 1));
    }
    layers.push((3, 0, f[4], f[5], 2));
    layers.push((3, 1, f[5], f[5], 1));

    let mut x =
        b.conv_bn(input, ConvBn::new("fx.stage1.0.0.weight", "fx.stage1.0.1", 3, f[0], 3, 2, MBV1_SLOPE), Dest::New)?;
    let mut outs = [0; 3];
    for (stage, i, cin, cout, stride) in layers {
        let p = format!("fx.stage{stage}.{i}");
        let (dw_w, dw_bn) = (format!("{p}.0.0.weight"), format!("{p}.0.1"));
        x = b.conv_bn(x, ConvBn::new(&dw_w, &dw_bn, cin, cin, 3, stride, MBV1_SLOPE).depthwise(), Dest::New)?;
        let (pw_w, pw_bn) = (format!("{p}.1.0.weight"), format!("{p}.1.1"));
        x = b.conv_bn(x, ConvBn::new(&pw_w, &pw_bn, cin, cout, 1, 1, MBV1_SLOPE), Dest::New)?;
        match (stage, i) {
            (1, 5) => outs[0] = x,
            (2, 5) => outs[1] = x,
            (3, 1) => outs[2] = x,
            _ => {}
        }
    }
    Ok(outs)
}

fn mobilenet_v2(b: &mut Builder<'_>, input: TensorId) -> Result<[TensorId; 3]> {
    let settings: [(usize, usize, usize, usize); 7] =
        [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)];
    let mut x =
        b.conv_bn(input, ConvBn::new("fx.features.0.0.weight", "fx.features.0.1", 3, 32, 3, 2, Act::Relu6), Dest::New)?;
    let mut cin = 32;
    let mut idx = 1;
    let mut outs = [0; 3];
    for (t, c, n, s) in settings {
        for r in 0..n {
            let stride = if r == 0 { s } else { 1 };
            let hidden = cin * t;
            let p = format!("fx.features.{idx}.conv");
            let shortcut = (stride == 1 && cin == c).then_some(x);
            let mut h = x;
            let mut i = 0;
            if t != 1 {
                let (w, bn) = (format!("{p}.0.0.weight"), format!("{p}.0.1"));
                h = b.conv_bn(h, ConvBn::new(&w, &bn, cin, hidden, 1, 1, Act::Relu6), Dest::New)?;
                i = 1;
            }
            let (w, bn) = (format!("{p}.{i}.0.weight"), format!("{p}.{i}.1"));
            h = b.conv_bn(h, ConvBn::new(&w, &bn, hidden, hidden, 3, stride, Act::Relu6).depthwise(), Dest::New)?;
            let (w, bn) = (format!("{p}.{}.weight", i + 1), format!("{p}.{}", i + 2));
            x = b.conv_bn(h, ConvBn::new(&w, &bn, hidden, c, 1, 1, Act::None).residual(shortcut), Dest::New)?;
            cin = c;
            match idx {
                6 => outs[0] = x,
                13 => outs[1] = x,
                _ => {}
            }
            idx += 1;
        }
    }
    outs[2] = b.conv_bn(
        x,
        ConvBn::new("fx.features.18.0.weight", "fx.features.18.1", 320, 1280, 1, 1, Act::Relu6),
        Dest::New,
    )?;
    Ok(outs)
}

const RELU: Act = Act::Leaky(0.0);

fn resnet(b: &mut Builder<'_>, input: TensorId, blocks: &[usize; 4], bottleneck: bool) -> Result<[TensorId; 3]> {
    let x = b.conv_bn(input, ConvBn::new("fx.conv1.weight", "fx.bn1", 3, 64, 7, 2, RELU), Dest::New)?;
    let mut x = b.max_pool(x);
    let expansion = if bottleneck { 4 } else { 1 };
    let mut cin = 64;
    let mut outs = [0; 3];
    for (li, (&n, planes)) in blocks.iter().zip([64usize, 128, 256, 512]).enumerate() {
        let layer_stride = if li == 0 { 1 } else { 2 };
        for bi in 0..n {
            let stride = if bi == 0 { layer_stride } else { 1 };
            let p = format!("fx.layer{}.{bi}", li + 1);
            let cout = planes * expansion;
            let shortcut = if stride != 1 || cin != cout {
                let (w, bn) = (format!("{p}.downsample.0.weight"), format!("{p}.downsample.1"));
                b.conv_bn(x, ConvBn::new(&w, &bn, cin, cout, 1, stride, Act::None), Dest::New)?
            } else {
                x
            };
            let k = |n: usize| (format!("{p}.conv{n}.weight"), format!("{p}.bn{n}"));
            x = if bottleneck {
                let (w1, b1) = k(1);
                let h = b.conv_bn(x, ConvBn::new(&w1, &b1, cin, planes, 1, 1, RELU), Dest::New)?;
                let (w2, b2) = k(2);
                let h = b.conv_bn(h, ConvBn::new(&w2, &b2, planes, planes, 3, stride, RELU), Dest::New)?;
                let (w3, b3) = k(3);
                b.conv_bn(
                    h,
                    ConvBn::new(&w3, &b3, planes, cout, 1, 1, RELU).residual(Some(shortcut)).residual_last(),
                    Dest::New,
                )?
            } else {
                let (w1, b1) = k(1);
                let h = b.conv_bn(x, ConvBn::new(&w1, &b1, cin, planes, 3, stride, RELU), Dest::New)?;
                let (w2, b2) = k(2);
                b.conv_bn(
                    h,
                    ConvBn::new(&w2, &b2, planes, cout, 3, 1, RELU).residual(Some(shortcut)).residual_last(),
                    Dest::New,
                )?
            };
            cin = cout;
        }
        if li >= 1 {
            outs[li - 1] = x;
        }
    }
    Ok(outs)
}
