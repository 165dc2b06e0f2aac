//! Vectorisable element-wise math for the CPU kernels, and the AVX2 dispatch they share.
//!
//! The functions are plain scalar Rust written so that the compiler vectorises the loops that call
//! them; a kernel's loop is defined with [`simd_dispatch`] to run compiled for AVX2+FMA when the CPU
//! has them (release builds target baseline x86-64, where loops would otherwise be SSE2).

/// `eˣ` for f32 with a relative error below 2e-7 over the whole range; inputs below -87.3 give
/// about 1e-38 rather than 0 and inputs above 88.3 are clamped (callers use it for softmax and
/// SiLU, where neither matters). Branch-free, so loops over it vectorise.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in a part exact in f32 and the rest (Cody-Waite).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer in f32.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    // eʳ on |r| ≤ ln2/2: Taylor-like minimax polynomial (Cephes expf).
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    er * pow2(n)
}

/// `2ˣ` for f32 with a relative error below 3e-7: 2ⁿ · 2ᶠ with n = round(x), |f| ≤ 1/2 and 2ᶠ from
/// a degree-6 polynomial. Inputs below -126 give about 1e-38 rather than 0 and inputs above 127 are
/// clamped. Branch-free, so loops over it vectorise.
#[inline(always)]
pub fn exp2(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-126.0, 127.0);
    let n = (x + ROUND) - ROUND;
    let f = x - n;
    let mut p = 1.540_353e-4_f32;
    for c in [1.333_355_8e-3, 9.618_129e-3, 5.550_411e-2, 0.240_226_5, std::f32::consts::LN_2, 1.0] {
        p = p * f + c;
    }
    p * pow2(n)
}

/// `2ⁿ` for an integral `n` in [-126, 127], built in the float domain: `n + 2²³ + 127` holds
/// `n + 127` in its low mantissa bits, which the shift moves into the exponent field. (An `as i32`
/// cast would be saturating and keep loops from vectorising.)
#[inline(always)]
fn pow2(n: f32) -> f32 {
    f32::from_bits((n + 8_388_735.0).to_bits() << 23)
}

/// SiLU `x · σ(x)` on top of [`exp`].
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// Σ `xs`, in eight interleaved partial sums so that the loop vectorises.
#[inline(always)]
pub fn sum(xs: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        let c: &[f32; 8] = c.try_into().unwrap_or(&[0.0; 8]);
        for (l, x) in lanes.iter_mut().zip(c) {
            *l += x;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Defines `fn $name(args) { body }` (or `unsafe fn`, with any visibility) that runs `body` compiled for AVX2+FMA when
/// the CPU has them, else for the build's baseline target. `body` is a nested `#[inline(always)]`
/// function, so it and the `#[inline(always)]` helpers it calls are compiled inside the AVX2
/// version (a closure handed to a dispatching function is not reliably inlined there).
macro_rules! simd_dispatch {
    ($(#[$doc:meta])* $vis:vis unsafe fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $crate::kernels::math::simd_dispatch!(@impl [$vis] [unsafe] $(#[$doc])* $name($($arg: $ty),*) $body);
    };
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $crate::kernels::math::simd_dispatch!(@impl [$vis] [] $(#[$doc])* $name($($arg: $ty),*) $body);
    };
    (@impl [$vis:vis] [$($unsafety:tt)*] $(#[$doc:meta])* $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        $vis $($unsafety)* fn $name($($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            $($unsafety)* fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) {
                    // SAFETY: forwarded from the caller of the dispatching function.
                    #[allow(unused_unsafe)]
                    unsafe { body($($arg),*) }
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports AVX2 and FMA (checked above); the rest of the
                    // contract is the dispatching function's own.
                    return unsafe { avx2($($arg),*) };
                }
            }
            #[allow(unused_unsafe)]
            // SAFETY: forwarded from the caller of the dispatching function.
            unsafe { body($($arg),*) }
        }
    };
}

pub(crate) use simd_dispatch;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_within_2e7_relative() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            worst = worst.max(((exp(x) as f64 - want) / want).abs());
            x += 0.00731;
        }
        assert!(worst < 2e-7, "worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-200.0) < 1e-37 && exp(200.0).is_finite());
    }

    #[test]
    fn exp2_matches_std_within_3e7_relative() {
        let mut worst = 0f64;
        let mut x = -125.0f32;
        while x < 126.0 {
            let want = (x as f64).exp2();
            worst = worst.max(((exp2(x) as f64 - want) / want).abs());
            x += 0.00917;
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert_eq!(exp2(0.0), 1.0);
        assert_eq!(exp2(-3.0), 0.125);
    }

    #[test]
    fn silu_matches_definition() {
        for &x in &[-30.0f32, -5.0, -1.0, -1e-3, 0.0, 0.5, 3.0, 40.0] {
            let want = x as f64 / (1.0 + (-(x as f64)).exp());
            assert!((silu(x) as f64 - want).abs() <= 1e-6 * want.abs().max(1e-3), "silu({x})");
        }
    }
}
