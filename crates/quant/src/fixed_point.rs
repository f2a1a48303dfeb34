//! Fixed-point requantization for integer-only inference (Jacob et al.
//! 2018, section 2.2): a real multiplier `M` in (0, 1) — in practice
//! `S1 * S2 / S3` — is stored as an int32 `M0` in [2^30, 2^31) and a shift
//! `n`, `M = M0 * 2^-31 * 2^-n`, and applied to an int32 accumulator with a
//! rounding doubling high multiply and a rounding right shift, the
//! arithmetic of gemmlowp and TensorFlow Lite.

/// `M = multiplier * 2^-31 * 2^(-right_shift)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantizedMultiplier {
    pub multiplier: i32,
    pub right_shift: i32,
}

/// Represents a real multiplier in (0, 1) as a normalised int32 and a
/// right shift. Multipliers of 1 or more use a negative shift (a left
/// shift); 0 gives multiplier 0.
pub fn quantize_multiplier(m: f64) -> QuantizedMultiplier {
    if m <= 0.0 || !m.is_finite() {
        return QuantizedMultiplier {
            multiplier: 0,
            right_shift: 0,
        };
    }
    // m = q * 2^e with q in [0.5, 1).
    let mut e = m.log2().floor() as i32 + 1;
    let mut q = m / 2f64.powi(e);
    if q >= 1.0 {
        q /= 2.0;
        e += 1;
    }
    if q < 0.5 {
        q *= 2.0;
        e -= 1;
    }
    let mut q_fixed = (q * (1u64 << 31) as f64).round() as i64;
    if q_fixed == 1i64 << 31 {
        q_fixed /= 2;
        e += 1;
    }
    QuantizedMultiplier {
        multiplier: q_fixed as i32,
        right_shift: -e,
    }
}

/// gemmlowp's SaturatingRoundingDoublingHighMul: `a * b / 2^31` rounded to
/// nearest, ties up, saturating the one overflowing case.
fn rounding_doubling_high_mul(a: i32, b: i32) -> i32 {
    if a == i32::MIN && b == i32::MIN {
        return i32::MAX;
    }
    let ab = a as i64 * b as i64;
    let nudge = if ab >= 0 { 1 << 30 } else { 1 - (1 << 30) };
    // Division truncates toward zero, as gemmlowp's C++ does (a shift would
    // round negative products down).
    ((ab + nudge) / (1i64 << 31)) as i32
}

/// gemmlowp's RoundingDivideByPOT: `x / 2^exponent` rounded to nearest,
/// ties away from zero.
fn rounding_divide_by_pot(x: i32, exponent: i32) -> i32 {
    if exponent <= 0 {
        return x;
    }
    let mask = (1i64 << exponent) - 1;
    let remainder = x as i64 & mask;
    let threshold = (mask >> 1) + if x < 0 { 1 } else { 0 };
    ((x as i64 >> exponent) + if remainder > threshold { 1 } else { 0 }) as i32
}

/// `x * M` rounded, in integer arithmetic.
pub fn multiply_by_quantized_multiplier(x: i32, m: QuantizedMultiplier) -> i32 {
    let left = (-m.right_shift).max(0);
    let right = m.right_shift.max(0);
    let shifted = (x as i64) << left;
    let shifted = shifted.clamp(i32::MIN as i64, i32::MAX as i64) as i32;
    rounding_divide_by_pot(rounding_doubling_high_mul(shifted, m.multiplier), right)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn multipliers_are_normalised() {
        for m in [0.5, 0.25, 0.0078125, 0.123456, 0.999999, 1.0, 3.5] {
            let q = quantize_multiplier(m);
            assert!(q.multiplier >= 1 << 30, "{m}: {q:?}");
            let back = q.multiplier as f64 / (1u64 << 31) as f64 * 2f64.powi(-q.right_shift);
            assert!((back - m).abs() <= m * 1e-9, "{m}: {back}");
        }
        assert_eq!(quantize_multiplier(0.0).multiplier, 0);
    }

    #[test]
    fn known_values_match_gemmlowp() {
        // 0.5 is 2^30 * 2^-31 with no shift.
        let half = quantize_multiplier(0.5);
        assert_eq!(
            half,
            QuantizedMultiplier {
                multiplier: 1 << 30,
                right_shift: 0
            }
        );
        // The doubling high multiply rounds ties up (toward +infinity).
        assert_eq!(multiply_by_quantized_multiplier(7, half), 4);
        assert_eq!(multiply_by_quantized_multiplier(-7, half), -3);
        assert_eq!(multiply_by_quantized_multiplier(6, half), 3);
        assert_eq!(rounding_divide_by_pot(5, 1), 3);
        assert_eq!(rounding_divide_by_pot(-5, 1), -3);
        assert_eq!(rounding_divide_by_pot(-6, 2), -2);
        assert_eq!(rounding_doubling_high_mul(i32::MIN, i32::MIN), i32::MAX);
    }

    proptest! {
        /// The integer result is within one unit of the exact product.
        #[test]
        fn fixed_point_products_are_within_one_of_the_real_product(
            x in -(1i32 << 24)..(1i32 << 24), m in 1e-6f64..0.999,
        ) {
            let q = quantize_multiplier(m);
            let got = multiply_by_quantized_multiplier(x, q) as f64;
            let exact = x as f64 * m;
            prop_assert!((got - exact).abs() <= 1.0, "{x} * {m}: {got} vs {exact}");
        }
    }
}
