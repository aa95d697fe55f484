//! The two checkpoint key layouts (`retinaface-spec.md`, "Checkpoint layouts"). Everything is mapped to
//! the reference layout on load.

use super::Tensor;
use std::collections::BTreeMap;

/// Maps one key of the older Pytorch_Retinaface layout to the reference layout; reference keys pass
/// through unchanged.
pub fn reference_key(key: &str) -> String {
    let key = key.strip_prefix("module.").unwrap_or(key);
    for (old, new) in [
        ("ClassHead.", "class_head.class_head."),
        ("BboxHead.", "bbox_head.bbox_head."),
        ("LandmarkHead.", "landmark_head.landmark_head."),
    ] {
        if let Some(rest) = key.strip_prefix(old) {
            // `ClassHead.k.conv1x1.weight` → `class_head.class_head.k.weight`
            return format!("{new}{}", rest.replacen(".conv1x1", "", 1));
        }
    }
    let Some(rest) = key.strip_prefix("body.") else { return key.to_string() };
    // MobileNetV1 depthwise-separable layers are one flat sequence of 6 children in this layout.
    let parts: Vec<&str> = rest.split('.').collect();
    if parts.len() >= 4
        && parts[0].starts_with("stage")
        && let (Ok(i), Ok(c)) = (parts[1].parse::<usize>(), parts[2].parse::<usize>())
    {
        let is_stem = parts[0] == "stage1" && i == 0;
        if !is_stem && c < 6 {
            return format!("fx.{}.{}.{}.{}.{}", parts[0], i, c / 3, c % 3, parts[3..].join("."));
        }
    }
    format!("fx.{rest}")
}

pub fn to_reference_layout(tensors: BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    if !tensors.keys().any(|k| k.starts_with("module.") || k.starts_with("body.") || k.contains("Head.")) {
        return tensors;
    }
    tensors.into_iter().map(|(k, t)| (reference_key(&k), t)).collect()
}

#[cfg(test)]
mod tests {
    use super::reference_key;

    #[test]
    fn maps_the_spec_examples() {
        assert_eq!(reference_key("body.stage1.1.3.weight"), "fx.stage1.1.1.0.weight");
        assert_eq!(reference_key("module.body.stage1.0.1.running_var"), "fx.stage1.0.1.running_var");
        assert_eq!(reference_key("body.stage2.0.4.bias"), "fx.stage2.0.1.1.bias");
        assert_eq!(reference_key("body.stage1.1.0.weight"), "fx.stage1.1.0.0.weight");
        assert_eq!(reference_key("ClassHead.2.conv1x1.bias"), "class_head.class_head.2.bias");
        assert_eq!(reference_key("LandmarkHead.0.conv1x1.weight"), "landmark_head.landmark_head.0.weight");
        assert_eq!(reference_key("fpn.merge1.0.weight"), "fpn.merge1.0.weight");
        assert_eq!(reference_key("body.layer1.0.conv1.weight"), "fx.layer1.0.conv1.weight");
        assert_eq!(reference_key("fx.stage1.1.1.0.weight"), "fx.stage1.1.1.0.weight");
    }
}
