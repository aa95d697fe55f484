//! Per-shape choice of an f16 convolution variant. On a GPU each supported variant of a shape is
//! validated and timed (by the caller's `time` closure) and the fastest kept; choices are cached on
//! disk keyed by GPU name, compute capability, driver, shape and dtype. Without a GPU, or with
//! `--tune off`, the deterministic [`conv_f16::heuristic`] picks.
//!
//! The fused f16 ops (depthwise + pointwise, SSH pairs, FPN lateral + upsample-add) run the same
//! tiles as the plain convs with another A or epilogue ([`super::ops::fused_f16`]), so they are
//! tuned the same way over the same variants, but under keys of their own ([`Fused`]): a fused
//! kernel's cost is not its GEMM's (the depthwise tile is remade per column of output channels, the
//! epilogue reads the upsampled map), so a plain conv's choice does not carry over.
//!
//! Modes: `off` (heuristic, no timing), `cached` (cached choices; shapes missing from the cache are
//! timed once and added), `full` (every shape re-timed, the cache overwritten).

use super::ops::conv_f16::{self, ConvShape, VARIANTS, Variant};
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TuneMode {
    Off,
    #[default]
    Cached,
    Full,
}

impl FromStr for TuneMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(TuneMode::Off),
            "cached" => Ok(TuneMode::Cached),
            "full" => Ok(TuneMode::Full),
            _ => Err(Error::InvalidArgument(format!("--tune `{s}`: expected off, cached or full"))),
        }
    }
}

/// The device a choice was measured on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceKey {
    pub name: String,
    pub compute_capability: (u32, u32),
    /// The driver version as cuDriverGetVersion reports it (e.g. 13000).
    pub driver: i32,
    pub sms: usize,
}

/// The cache key of one shape on one device in one dtype.
pub fn cache_key(dev: &DeviceKey, s: &ConvShape, dtype: &str) -> String {
    format!(
        "{}|sm_{}{}|driver {}|{dtype}|n{} {}x{} {}->{} k{} s{} p{}",
        dev.name,
        dev.compute_capability.0,
        dev.compute_capability.1,
        dev.driver,
        s.n,
        s.h,
        s.w,
        s.cin,
        s.cout,
        s.k,
        s.stride,
        s.pad
    )
}

/// What runs a tuned GEMM shape besides the plain conv kernel: the fused op's own geometry, which the
/// GEMM shape (`n` × `oh` × `ow` pixels, K and N) does not say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fused {
    /// conv_f16_*: a plain groups-1 conv.
    None,
    /// conv_dwpw_f16_*: a k×k depthwise conv (stride, pad) of an h × w map, then the 1×1 GEMM.
    DwPw { k: usize, stride: usize, pad: usize, h: usize, w: usize },
    /// conv_ex_f16_* as two convs of one input: output channels below `split` go to the first.
    Pair { split: usize },
    /// conv_ex_f16_* with the nearest upsample of a uh × uw map added in the epilogue.
    UpsampleAdd { uh: usize, uw: usize },
}

/// The cache key of `s` run as `fused`: a plain conv's is [`cache_key`]'s (caches written before
/// fused ops were tuned stay valid); a fused op's adds its kernel and geometry.
pub fn op_key(dev: &DeviceKey, s: &ConvShape, fused: Fused, dtype: &str) -> String {
    let key = cache_key(dev, s, dtype);
    match fused {
        Fused::None => key,
        Fused::DwPw { k, stride, pad, h, w } => format!("{key}|dwpw k{k} s{stride} p{pad} from {h}x{w}"),
        Fused::Pair { split } => format!("{key}|pair split {split}"),
        Fused::UpsampleAdd { uh, uw } => format!("{key}|upsample-add from {uh}x{uw}"),
    }
}

/// Whether `v` can run `s` on a device of compute capability `sm` (e.g. 90). `RETINAFACE_WGMMA=0`
/// withdraws the Hopper tiles ([`wgmma_enabled`]).
pub fn supported(v: &Variant, s: &ConvShape, sm: u32) -> bool {
    supported_with(v, s, sm, wgmma_enabled())
}

/// [`supported`] with the Hopper tiles allowed or not.
pub fn supported_with(v: &Variant, s: &ConvShape, sm: u32, wgmma: bool) -> bool {
    (wgmma || !v.is_wgmma()) && (v.min_sm..=v.max_sm).contains(&sm) && (v.split_k == 1 || s.k_tiles() >= 2 * v.split_k)
}

/// Whether the Hopper (wgmma) tiles may run: yes unless `RETINAFACE_WGMMA=0` (read once), the way out
/// if they ever fault on a device (a fault ends the CUDA context, and with it the tuning that would
/// have rejected a tile that merely computes wrongly). tools/gpu-check.sh sets it when its guard run
/// of them fails.
pub fn wgmma_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("RETINAFACE_WGMMA").map_or(true, |v| v.trim() != "0"))
}

/// Whether `v` can run `s` as `fused` on `sm`: [`supported`], and the fused family has `v`'s tile.
pub fn supported_fused(v: &Variant, s: &ConvShape, fused: Fused, sm: u32) -> bool {
    let kernel = match fused {
        Fused::None => Ok(v.kernel),
        Fused::DwPw { .. } => super::ops::fused_f16::dwpw_kernel(v),
        Fused::Pair { .. } | Fused::UpsampleAdd { .. } => super::ops::fused_f16::ex_kernel(v),
    };
    kernel.is_ok() && supported(v, s, sm)
}

/// A variant kept for a shape, and how it was chosen.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Choice {
    pub variant: String,
    /// Microseconds per launch when timed; None for the heuristic.
    pub micros: Option<f64>,
    /// "heuristic", "cache" or "timed".
    pub source: String,
}

/// The on-disk cache: a JSON object key → choice.
#[derive(Debug, Default)]
pub struct TuneCache {
    pub path: Option<PathBuf>,
    pub entries: BTreeMap<String, Choice>,
}

/// `RETINAFACE_TUNE_CACHE`, else `$XDG_CACHE_HOME/retinaface/conv_tune.json`, else under `~/.cache`.
pub fn default_cache_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("RETINAFACE_TUNE_CACHE") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("retinaface").join("conv_tune.json"))
}

impl TuneCache {
    /// Reads `path`; a missing file is an empty cache, an unreadable or corrupt one an error naming it.
    pub fn load(path: &Path) -> Result<TuneCache> {
        let entries = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                Error::InvalidArgument(format!("tuning cache {}: {e} (delete it to re-tune)", path.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(Error::io(path, e)),
        };
        Ok(TuneCache { path: Some(path.to_path_buf()), entries })
    }

    /// Writes the cache (to a temporary file renamed over the old one, so readers never see half).
    pub fn save(&self) -> Result<()> {
        let Some(path) = &self.path else { return Ok(()) };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let text = serde_json::to_string_pretty(&self.entries)
            .map_err(|e| Error::InvalidArgument(format!("tuning cache {}: {e}", path.display())))?;
        std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }
}

/// Chooses the variant for `s`. `dev` None (no GPU) or mode Off: the heuristic, nothing timed. Else
/// `time(v)` is called for each supported variant (Ok(None): the variant failed validation and is
/// skipped) unless mode Cached finds the key; the fastest is stored in `cache` (the caller saves).
pub fn choose(
    mode: TuneMode,
    dev: Option<&DeviceKey>,
    s: &ConvShape,
    dtype: &str,
    cache: &mut TuneCache,
    time: impl FnMut(&'static Variant) -> Result<Option<f64>>,
) -> Result<(&'static Variant, Choice)> {
    choose_op(mode, dev, s, Fused::None, dtype, cache, time)
}

/// [`choose`] for `s` run as `fused`: the candidates are the variants the fused family has
/// ([`supported_fused`]), the key [`op_key`]'s; the heuristic is the GEMM shape's.
pub fn choose_op(
    mode: TuneMode,
    dev: Option<&DeviceKey>,
    s: &ConvShape,
    fused: Fused,
    dtype: &str,
    cache: &mut TuneCache,
    mut time: impl FnMut(&'static Variant) -> Result<Option<f64>>,
) -> Result<(&'static Variant, Choice)> {
    let heuristic = |sms: usize| {
        let v = conv_f16::heuristic(s, sms);
        (v, Choice { variant: v.name.to_string(), micros: None, source: "heuristic".into() })
    };
    let Some(dev) = dev.filter(|_| mode != TuneMode::Off) else {
        return Ok(heuristic(dev.map_or(conv_f16::DEFAULT_SMS, |d| d.sms)));
    };
    let sm = dev.compute_capability.0 * 10 + dev.compute_capability.1;
    let key = op_key(dev, s, fused, dtype);
    if mode == TuneMode::Cached
        && let Some(c) = cache.entries.get(&key)
        && let Some(v) = conv_f16::variant(&c.variant).filter(|v| supported_fused(v, s, fused, sm))
    {
        return Ok((v, Choice { source: "cache".into(), ..c.clone() }));
    }
    let mut best: Option<(&'static Variant, f64)> = None;
    for v in VARIANTS.iter().filter(|v| supported_fused(v, s, fused, sm)) {
        if let Some(us) = time(v)?
            && best.is_none_or(|(_, b)| us < b)
        {
            best = Some((v, us));
        }
    }
    let Some((v, us)) = best else {
        return Err(Error::Cuda(format!("no f16 conv variant passed validation for {key}")));
    };
    let choice = Choice { variant: v.name.to_string(), micros: Some(us), source: "timed".into() };
    cache.entries.insert(key, choice.clone());
    Ok((v, choice))
}

/// The device key of GPU `info` for the tuning cache (driver version from the driver itself).
pub fn device_key(info: &super::gpu::DeviceInfo) -> DeviceKey {
    let mut driver = 0;
    if super::gpu::driver_present().is_ok() {
        // SAFETY: the driver library is present (checked); plain out-parameter.
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver) };
    }
    let n = info.name.to_ascii_lowercase();
    let sms = if n.contains("h100") || n.contains("h200") {
        132
    } else if n.contains("a100") {
        108
    } else {
        super::ops::conv_f16::DEFAULT_SMS
    };
    DeviceKey {
        name: info.name.clone(),
        compute_capability: (info.compute_capability.0.max(0) as u32, info.compute_capability.1.max(0) as u32),
        driver,
        sms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hopper_tiles_run_on_compute_capability_9_0_only_and_can_be_withdrawn() {
        let s = shape();
        let wg: Vec<&Variant> = VARIANTS.iter().filter(|v| v.is_wgmma()).collect();
        assert!(!wg.is_empty());
        for v in &wg {
            assert!(supported_with(v, &s, 90, true), "{}", v.name);
            for sm in [80, 86, 89, 100, 120] {
                assert!(!supported_with(v, &s, sm, true), "{} on sm_{sm}", v.name);
            }
            assert!(!supported_with(v, &s, 90, false), "{} withdrawn", v.name);
        }
        // The mma.sync tiles stay, on every architecture from sm_80.
        let plain = conv_f16::variant("conv_f16_128x128").unwrap();
        for sm in [80, 90, 100] {
            assert!(supported_with(plain, &s, sm, false) && supported_with(plain, &s, sm, true));
        }
    }

    fn shape() -> ConvShape {
        ConvShape { n: 1, h: 40, w: 40, cin: 64, cout: 128, k: 3, stride: 1, pad: 1 }
    }
    fn dev() -> DeviceKey {
        DeviceKey { name: "NVIDIA H200".into(), compute_capability: (9, 0), driver: 13000, sms: 132 }
    }

    #[test]
    fn key_names_device_driver_shape_and_dtype() {
        let k = cache_key(&dev(), &shape(), "f16");
        for part in ["NVIDIA H200", "sm_90", "driver 13000", "f16", "40x40", "64->128", "k3"] {
            assert!(k.contains(part), "{k} lacks {part}");
        }
        assert_ne!(k, cache_key(&DeviceKey { driver: 12080, ..dev() }, &shape(), "f16"));
    }

    #[test]
    fn timing_keeps_the_fastest_valid_variant_and_the_cache_is_reused() {
        let mut cache = TuneCache::default();
        let mut calls = 0;
        // 128x64 is fastest but fails validation: the next fastest (64x64) must win.
        let t = |v: &Variant| -> Result<Option<f64>> {
            Ok(match v.name {
                "conv_f16_128x64" => None,
                "conv_f16_64x64" => Some(10.0),
                _ => Some(20.0 + v.bn as f64),
            })
        };
        let (v, c) = choose(TuneMode::Cached, Some(&dev()), &shape(), "f16", &mut cache, |v| {
            calls += 1;
            t(v)
        })
        .unwrap();
        assert_eq!((v.name, c.source.as_str(), c.micros), ("conv_f16_64x64", "timed", Some(10.0)));
        assert!(calls >= 6);
        let (v, c) =
            choose(TuneMode::Cached, Some(&dev()), &shape(), "f16", &mut cache, |_| panic!("timed again")).unwrap();
        assert_eq!((v.name, c.source.as_str()), ("conv_f16_64x64", "cache"));
        // full re-times.
        let mut n = 0;
        choose(TuneMode::Full, Some(&dev()), &shape(), "f16", &mut cache, |v| {
            n += 1;
            t(v)
        })
        .unwrap();
        assert!(n >= 6);
        // off and no device: the heuristic, nothing timed.
        for d in [Some(dev()), None] {
            let mode = if d.is_some() { TuneMode::Off } else { TuneMode::Full };
            let (v, c) = choose(mode, d.as_ref(), &shape(), "f16", &mut cache, |_| panic!("timed")).unwrap();
            assert_eq!((v, c.source.as_str()), (conv_f16::heuristic(&shape(), 132), "heuristic"));
        }
    }

    #[test]
    fn fused_ops_are_keyed_and_timed_apart_from_their_gemm() {
        let s = ConvShape { cin: 64, cout: 64, k: 1, pad: 0, ..shape() };
        let plain = cache_key(&dev(), &s, "f16");
        assert_eq!(op_key(&dev(), &s, Fused::None, "f16"), plain);
        let fused = [
            (Fused::DwPw { k: 3, stride: 2, pad: 1, h: 80, w: 79 }, "dwpw k3 s2 p1 from 80x79"),
            (Fused::Pair { split: 32 }, "pair split 32"),
            (Fused::UpsampleAdd { uh: 20, uw: 21 }, "upsample-add from 20x21"),
        ];
        let keys: Vec<String> = fused.iter().map(|(f, _)| op_key(&dev(), &s, *f, "f16")).collect();
        for ((_, part), k) in fused.iter().zip(&keys) {
            assert!(k.starts_with(&plain) && k.contains(part), "{k} lacks {part}");
        }
        assert_ne!(keys[0], op_key(&dev(), &s, Fused::DwPw { k: 3, stride: 1, pad: 1, h: 80, w: 79 }, "f16"));
        // A plain conv's cached choice for the same GEMM does not answer for the fused op: it is timed
        // over every variant its family has, stored under its own key, then read back.
        let mut cache = TuneCache::default();
        cache
            .entries
            .insert(plain, Choice { variant: "conv_f16_128x8".into(), micros: Some(1.0), source: "timed".into() });
        let f = fused[0].0;
        let mut timed = Vec::new();
        let (v, c) = choose_op(TuneMode::Cached, Some(&dev()), &s, f, "f16", &mut cache, |v| {
            timed.push(v.name);
            Ok(Some(if v.name == "conv_f16_128x32" { 1.0 } else { 2.0 }))
        })
        .unwrap();
        assert_eq!((v.name, c.source.as_str()), ("conv_f16_128x32", "timed"));
        let want: Vec<&str> = VARIANTS.iter().filter(|v| supported_fused(v, &s, f, 90)).map(|v| v.name).collect();
        assert_eq!(timed, want);
        assert!(want.len() >= 6, "{want:?}");
        assert_eq!(cache.entries[&keys[0]].variant, "conv_f16_128x32");
        let (v, c) =
            choose_op(TuneMode::Cached, Some(&dev()), &s, f, "f16", &mut cache, |_| panic!("timed again")).unwrap();
        assert_eq!((v.name, c.source.as_str()), ("conv_f16_128x32", "cache"));
        // Off: the GEMM shape's heuristic.
        let (v, _) = choose_op(TuneMode::Off, Some(&dev()), &s, f, "f16", &mut cache, |_| panic!("timed")).unwrap();
        assert_eq!(v, conv_f16::heuristic(&s, 132));
    }

    #[test]
    fn cache_round_trips_and_a_corrupt_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("tune.json");
        let mut c = TuneCache::load(&path).unwrap();
        assert!(c.entries.is_empty());
        c.entries
            .insert("k".into(), Choice { variant: "conv_f16_64x64".into(), micros: Some(3.5), source: "timed".into() });
        c.save().unwrap();
        assert_eq!(TuneCache::load(&path).unwrap().entries, c.entries);
        std::fs::write(&path, "{not json").unwrap();
        let e = TuneCache::load(&path).unwrap_err().to_string();
        assert!(e.contains("tune.json"), "{e}");
    }

    #[test]
    fn split_k_needs_enough_k_tiles_and_sm80() {
        let sk8 = conv_f16::variant("conv_f16_64x64_sk8").unwrap();
        let shallow = ConvShape { cin: 8, k: 1, ..shape() };
        assert!(!supported(sk8, &shallow, 90));
        assert!(supported(sk8, &shape(), 90));
        assert!(!supported(sk8, &shape(), 75));
        assert_eq!("full".parse::<TuneMode>().unwrap(), TuneMode::Full);
        assert!("fast".parse::<TuneMode>().is_err());
    }
}
