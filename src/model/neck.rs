//! FPN and the SSH context modules.

use super::{Act, Builder, ConvBn, Dest, TensorId};
use crate::error::Result;

pub fn fpn(b: &mut Builder<'_>, x: [TensorId; 3]) -> Result<[TensorId; 3]> {
    let c = b.network.fpn_channels();
    let act = Act::Leaky(b.network.neck_slope());
    let cin = b.network.pyramid_channels();
    let mut o = [0; 3];
    for k in 0..3 {
        let (w, bn) = (format!("fpn.output{}.0.weight", k + 1), format!("fpn.output{}.1", k + 1));
        o[k] = b.conv_bn(x[k], ConvBn::new(&w, &bn, cin[k], c, 1, 1, act), Dest::New)?;
    }
    b.upsample_add(o[2], o[1]);
    o[1] = b.conv_bn(o[1], ConvBn::new("fpn.merge2.0.weight", "fpn.merge2.1", c, c, 3, 1, act), Dest::New)?;
    b.upsample_add(o[1], o[0]);
    o[0] = b.conv_bn(o[0], ConvBn::new("fpn.merge1.0.weight", "fpn.merge1.1", c, c, 3, 1, act), Dest::New)?;
    Ok(o)
}

/// `ReLU(concat[a, b, c])`: the ReLU distributes over the concat, so each branch's last conv applies it
/// and writes straight into its channel range of the one output tensor.
pub fn ssh(b: &mut Builder<'_>, x: [TensorId; 3]) -> Result<[TensorId; 3]> {
    let c = b.network.fpn_channels();
    let act = Act::Leaky(b.network.neck_slope());
    let relu = Act::Leaky(0.0);
    let mut out = [0; 3];
    for k in 0..3 {
        let p = format!("ssh{}", k + 1);
        let stride = b.info(x[k]).stride;
        let o = b.tensor(format!("{p}.out"), c, stride);
        let l = |n: &str| (format!("{p}.{n}.0.weight"), format!("{p}.{n}.1"));
        let (w, bn) = l("conv3X3");
        b.conv_bn(x[k], ConvBn::new(&w, &bn, c, c / 2, 3, 1, relu), Dest::Into(o, 0))?;
        let (w, bn) = l("conv5X5_1");
        let t = b.conv_bn(x[k], ConvBn::new(&w, &bn, c, c / 4, 3, 1, act), Dest::New)?;
        let (w, bn) = l("conv5X5_2");
        b.conv_bn(t, ConvBn::new(&w, &bn, c / 4, c / 4, 3, 1, relu), Dest::Into(o, c / 2))?;
        let (w, bn) = l("conv7X7_2");
        let u = b.conv_bn(t, ConvBn::new(&w, &bn, c / 4, c / 4, 3, 1, act), Dest::New)?;
        let (w, bn) = l("conv7x7_3");
        b.conv_bn(u, ConvBn::new(&w, &bn, c / 4, c / 4, 3, 1, relu), Dest::Into(o, c / 2 + c / 4))?;
        out[k] = o;
    }
    Ok(out)
}
