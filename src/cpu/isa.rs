//! The instruction-set level the CPU's fast paths run at: detection, `RETINAFACE_CPU_ISA`, `set_isa`, and
//! the AVX2 dispatch of the row-vectorised loops.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};

/// The instruction-set level the CPU paths run at. Levels are nested: each one also uses what the
/// levels below it use (the AVX2 element-wise loops run under AVX-512 too).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Baseline x86-64 (SSE2) or any other architecture: the gemm-crate and plain loops.
    Portable,
    /// AVX2 + FMA: the 4×24 implicit-GEMM micro-kernel and the AVX2 element-wise loops.
    Avx2,
    /// AVX-512F: the 8×48 implicit-GEMM micro-kernel.
    Avx512,
}

/// The vector instruction sets the CPU's fast kernels are written for: the levels above `Portable`.
/// Every kernel family (implicit GEMM, Winograd, the direct path, the fused depthwise + pointwise,
/// the blocked layout's) has one variant per set and shares the rest (packing, task split,
/// epilogue); the blocked kernels and the direct path sum in the same order at both, so they give the
/// same bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Simd {
    /// AVX-512F: 16-lane registers (the implicit GEMM's 8×48 tile; a channel block in one register).
    Avx512,
    /// AVX2 + FMA: 8-lane registers (the implicit GEMM's 4×24 tiles; a block in two registers).
    Avx2,
}

impl Simd {
    /// The set of CPU level `level`, if it has one (whether or not this processor supports it).
    pub fn of(level: Isa) -> Option<Simd> {
        match level {
            Isa::Avx512 => Some(Simd::Avx512),
            Isa::Avx2 => Some(Simd::Avx2),
            Isa::Portable => None,
        }
    }

    /// The set of CPU level `level`, if it has one and this processor supports it.
    pub fn at(level: Isa) -> Option<Simd> {
        Simd::of(level).filter(|_| level.supported())
    }

    /// Every set this processor supports, widest first.
    pub fn supported() -> Vec<Simd> {
        Isa::supported_levels().into_iter().filter_map(Simd::at).collect()
    }

    /// The CPU level whose instructions the set uses.
    pub fn isa(self) -> Isa {
        match self {
            Simd::Avx512 => Isa::Avx512,
            Simd::Avx2 => Isa::Avx2,
        }
    }

    /// Panics unless the processor supports the set (kernel entry points check it once, so the
    /// `unsafe` calls below them hold).
    pub fn check(self) {
        let level = self.isa();
        assert!(level.supported(), "the {self:?} kernels need a processor with {}", level.name());
    }
}

impl Isa {
    /// From highest to lowest: the order dispatch tries them in.
    pub const ALL: [Isa; 3] = [Isa::Avx512, Isa::Avx2, Isa::Portable];

    /// The name `RETINAFACE_CPU_ISA` takes.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    pub fn parse(s: &str) -> Result<Isa, crate::error::Error> {
        Isa::ALL.into_iter().find(|l| l.name() == s.trim().to_ascii_lowercase()).ok_or_else(|| {
            crate::error::Error::InvalidArgument(format!("CPU ISA level `{s}` (expected avx512, avx2 or portable)"))
        })
    }

    /// Whether this processor can run the level's instructions.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Isa::Portable => true,
                Isa::Avx2 => std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
                Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f") && Isa::Avx2.supported(),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Portable
        }
    }

    /// The highest level this processor supports.
    pub fn best() -> Isa {
        Isa::best_up_to(Isa::Avx512)
    }

    /// The highest supported level not above `limit`.
    fn best_up_to(limit: Isa) -> Isa {
        Isa::ALL.into_iter().find(|l| *l <= limit && l.supported()).unwrap_or(Isa::Portable)
    }

    /// Every level this processor supports, highest first.
    pub fn supported_levels() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|l| l.supported()).collect()
    }
}

/// A level set by `set_isa` (index + 1 into `Isa::ALL`), or 0: none, the environment's applies.
static FORCED: AtomicU8 = AtomicU8::new(0);

/// The level the CPU paths run at: the one `set_isa` forced, else `RETINAFACE_CPU_ISA`, else the highest
/// the processor supports.
pub fn isa() -> Isa {
    match FORCED.load(Ordering::Relaxed) {
        0 => from_env(),
        i => Isa::ALL[i as usize - 1],
    }
}

/// Forces a level for the whole process (`None`: back to the environment's or the detected one). A level
/// the processor lacks is refused, so no path can reach an illegal instruction.
pub fn set_isa(level: Option<Isa>) -> Result<(), crate::error::Error> {
    let code = match level {
        None => 0,
        Some(l) if !l.supported() => {
            return Err(crate::error::Error::InvalidArgument(format!(
                "CPU ISA level {} is not supported by this processor (it supports {})",
                l.name(),
                Isa::supported_levels().iter().map(|l| l.name()).collect::<Vec<_>>().join(", ")
            )));
        }
        Some(l) => Isa::ALL.iter().position(|x| *x == l).map_or(0, |i| i as u8 + 1),
    };
    FORCED.store(code, Ordering::Relaxed);
    Ok(())
}

/// `RETINAFACE_CPU_ISA=avx512|avx2|portable`, read once. `RETINAFACE_CPU_AVX512=0` is kept as an alias
/// of `portable` (what it selected before the AVX2 level existed). An unknown or unsupported value is
/// reported on stderr with the level used instead: the variable is a tuning knob read deep inside the
/// ops, where there is no caller to return an error to, and running a lower level gives the same
/// results.
fn from_env() -> Isa {
    static LEVEL: OnceLock<Isa> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let best = Isa::best();
        if let Ok(v) = std::env::var("RETINAFACE_CPU_ISA") {
            return match Isa::parse(&v) {
                Ok(l) if l.supported() => l,
                Ok(l) => {
                    let used = Isa::best_up_to(l);
                    eprintln!(
                        "RETINAFACE_CPU_ISA={v}: this processor does not support {}; using {}",
                        l.name(),
                        used.name()
                    );
                    used
                }
                Err(e) => {
                    eprintln!("RETINAFACE_CPU_ISA: {e}; using {}", best.name());
                    best
                }
            };
        }
        if std::env::var("RETINAFACE_CPU_AVX512").is_ok_and(|v| v == "0") { Isa::Portable } else { best }
    })
}

/// "cpu (2 threads, AVX-512 conv kernel)", "cpu (2 threads, AVX2 conv kernel)" or "cpu (2 threads,
/// portable conv paths)": what runs the network on the CPU, for logs and benchmark records.
pub fn describe() -> String {
    let convs = match isa() {
        Isa::Avx512 => "AVX-512 conv kernel",
        Isa::Avx2 => "AVX2 conv kernel",
        Isa::Portable => "portable conv paths",
    };
    format!("cpu ({} threads, {convs})", rayon::current_num_threads())
}

/// `$name(level, args)` runs `$body_fn(args)` with AVX2 enabled when `level` is AVX2 or above and the
/// processor has it: the crate is built for baseline x86-64, whose SSE2 halves the width of these loops.
/// The body is `#[inline(always)]`, so it is compiled inside the AVX2 function. Only vector width changes
/// (no FMA contraction): the results are the same bits at every level. The level is a parameter, not read
/// from `isa()` here, so a test can run each level's loops in one process.
macro_rules! avx2_dispatch {
    ($vis:vis $name:ident, $avx2:ident, $body_fn:ident, ($($arg:ident: $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        unsafe fn $avx2($($arg: $ty),*) {
            $body_fn($($arg),*)
        }

        $vis fn $name(level: $crate::cpu::isa::Isa, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if level >= $crate::cpu::isa::Isa::Avx2 && $crate::cpu::isa::Isa::Avx2.supported() {
                // SAFETY: the processor supports AVX2, checked just above.
                return unsafe { $avx2($($arg),*) };
            }
            let _ = level;
            $body_fn($($arg),*)
        }
    };
}
pub(crate) use avx2_dispatch;

/// As `avx2_dispatch`, with a third build at AVX-512 (16-lane vectors) when `level` is AVX-512. Only
/// vector width changes (no FMA contraction): the results are the same bits at every level. With
/// `unsafe` first, the body is an `unsafe fn` (one that writes through a pointer other tasks share) and
/// so is the dispatcher, with the body's safety contract.
macro_rules! avx_dispatch {
    (unsafe $vis:vis $name:ident, $avx2:ident, $avx512:ident, $body_fn:ident, ($($arg:ident: $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $avx2($($arg: $ty),*) {
            // SAFETY: the body's contract, which the dispatcher's caller upholds.
            unsafe { $body_fn($($arg),*) }
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx2")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $avx512($($arg: $ty),*) {
            // SAFETY: as above.
            unsafe { $body_fn($($arg),*) }
        }

        /// # Safety
        /// The contract of the body this dispatches to.
        #[allow(clippy::too_many_arguments)]
        $vis unsafe fn $name(level: $crate::cpu::isa::Isa, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                if level >= $crate::cpu::isa::Isa::Avx512 && $crate::cpu::isa::Isa::Avx512.supported() {
                    // SAFETY: the processor supports AVX-512F (and AVX2), checked just above; the rest
                    // is the caller's contract.
                    return unsafe { $avx512($($arg),*) };
                }
                if level >= $crate::cpu::isa::Isa::Avx2 && $crate::cpu::isa::Isa::Avx2.supported() {
                    // SAFETY: the processor supports AVX2, checked just above; as above.
                    return unsafe { $avx2($($arg),*) };
                }
            }
            let _ = level;
            // SAFETY: the caller's contract.
            unsafe { $body_fn($($arg),*) }
        }
    };
    ($vis:vis $name:ident, $avx2:ident, $avx512:ident, $body_fn:ident, ($($arg:ident: $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        #[allow(clippy::too_many_arguments)] // the body's own arguments
        unsafe fn $avx2($($arg: $ty),*) {
            $body_fn($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx2")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $avx512($($arg: $ty),*) {
            $body_fn($($arg),*)
        }

        #[allow(clippy::too_many_arguments)]
        $vis fn $name(level: $crate::cpu::isa::Isa, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                if level >= $crate::cpu::isa::Isa::Avx512 && $crate::cpu::isa::Isa::Avx512.supported() {
                    // SAFETY: the processor supports AVX-512F (and AVX2), checked just above.
                    return unsafe { $avx512($($arg),*) };
                }
                if level >= $crate::cpu::isa::Isa::Avx2 && $crate::cpu::isa::Isa::Avx2.supported() {
                    // SAFETY: the processor supports AVX2, checked just above.
                    return unsafe { $avx2($($arg),*) };
                }
            }
            let _ = level;
            $body_fn($($arg),*)
        }
    };
}
pub(crate) use avx_dispatch;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isa_names_parse_and_unknown_ones_are_refused() {
        for l in Isa::ALL {
            assert_eq!(Isa::parse(l.name()).unwrap(), l);
        }
        assert_eq!(Isa::parse(" AVX2 ").unwrap(), Isa::Avx2);
        let e = Isa::parse("sse4").unwrap_err().to_string();
        assert!(e.contains("sse4") && e.contains("avx512, avx2 or portable"), "{e}");
        assert!(Isa::Portable.supported());
        assert_eq!(Isa::supported_levels().last(), Some(&Isa::Portable));
        assert!(Isa::best().supported());
    }
}
