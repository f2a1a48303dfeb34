//! Integer grids and the affine map between them and real values.

use crate::round_half_even;

/// An integer grid `[qmin, qmax]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    pub bits: u8,
    pub signed: bool,
    /// Drops the most negative value of a signed grid (`[-127, 127]` for
    /// 8 bits), so that it is symmetric around zero, as TensorRT's int8
    /// weights are.
    pub narrow: bool,
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum GridError {
    #[error("{0} bits: a grid has 2 to 16 bits")]
    Bits(u8),
    #[error("the range [{min}, {max}] is not a finite interval")]
    Range { min: f32, max: f32 },
}

impl Grid {
    pub fn new(bits: u8, signed: bool, narrow: bool) -> Result<Grid, GridError> {
        if !(2..=16).contains(&bits) {
            return Err(GridError::Bits(bits));
        }
        Ok(Grid {
            bits,
            signed,
            narrow,
        })
    }

    pub fn int8() -> Grid {
        Grid {
            bits: 8,
            signed: true,
            narrow: false,
        }
    }

    pub fn uint8() -> Grid {
        Grid {
            bits: 8,
            signed: false,
            narrow: false,
        }
    }

    pub fn qmin(&self) -> i32 {
        match (self.signed, self.narrow) {
            (true, false) => -(1 << (self.bits - 1)),
            (true, true) => -(1 << (self.bits - 1)) + 1,
            (false, _) => 0,
        }
    }

    pub fn qmax(&self) -> i32 {
        if self.signed {
            (1 << (self.bits - 1)) - 1
        } else {
            (1 << self.bits) - 1
        }
    }

    /// Clamps an integer onto the grid.
    pub fn saturate(&self, q: i64) -> i32 {
        q.clamp(self.qmin() as i64, self.qmax() as i64) as i32
    }
}

/// How a real range maps onto a grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeMode {
    /// Zero point at the grid's middle (0 for a signed grid), the range
    /// made symmetric: `[-amax, amax]` with `amax = max(|min|, |max|)`.
    Symmetric,
    /// The range widened to contain 0, mapped onto the whole grid; the
    /// zero point is where 0 lands, so 0 is exact.
    Asymmetric,
}

/// Scale and zero point of an affine quantization.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Params {
    pub scale: f32,
    pub zero_point: i32,
}

impl Params {
    /// The parameters that map `[min, max]` onto `grid`. A range of width
    /// zero gets scale 1 (any positive scale quantizes it exactly).
    pub fn from_range(
        min: f32,
        max: f32,
        grid: Grid,
        mode: RangeMode,
    ) -> Result<Params, GridError> {
        if !(min.is_finite() && max.is_finite()) || min > max {
            return Err(GridError::Range { min, max });
        }
        let (qmin, qmax) = (grid.qmin() as f64, grid.qmax() as f64);
        let (min, max) = (min.min(0.0) as f64, max.max(0.0) as f64);
        match mode {
            RangeMode::Symmetric => {
                let amax = min.abs().max(max.abs());
                // Signed: zero point 0 and the positive half of the grid;
                // unsigned: zero point at the middle.
                let (zero_point, half) = if grid.signed {
                    (0.0, qmax)
                } else {
                    let mid = ((qmin + qmax + 1.0) / 2.0).floor();
                    (mid, qmax - mid)
                };
                let scale = if amax > 0.0 { amax / half } else { 1.0 };
                Ok(Params {
                    scale: positive(scale),
                    zero_point: zero_point as i32,
                })
            }
            RangeMode::Asymmetric => {
                if max - min <= 0.0 {
                    return Ok(Params {
                        scale: 1.0,
                        zero_point: grid.saturate(0),
                    });
                }
                let scale = positive((max - min) / (qmax - qmin));
                let zero_point = (qmin - min / scale as f64).round_ties_even();
                Ok(Params {
                    scale,
                    zero_point: grid.saturate(zero_point as i64),
                })
            }
        }
    }

    /// ONNX QuantizeLinear of one value: `saturate(round_half_even(x /
    /// scale) + zero_point)`, the division in f32. NaN quantizes to the
    /// zero point.
    pub fn quantize(&self, x: f32, grid: Grid) -> i32 {
        let r = round_half_even(x / self.scale);
        if r.is_nan() {
            return grid.saturate(self.zero_point as i64);
        }
        // Beyond i64 the value saturates anyway.
        let r = r.clamp(-1e18, 1e18) as i64;
        grid.saturate(r + self.zero_point as i64)
    }

    /// ONNX DequantizeLinear of one value: `(q - zero_point) * scale` in f32.
    pub fn dequantize(&self, q: i32) -> f32 {
        (q - self.zero_point) as f32 * self.scale
    }

    /// Quantize then dequantize: the value a fake-quantized graph computes.
    pub fn fake_quantize(&self, x: f32, grid: Grid) -> f32 {
        self.dequantize(self.quantize(x, grid))
    }

    /// The real interval the grid covers.
    pub fn representable(&self, grid: Grid) -> (f32, f32) {
        (self.dequantize(grid.qmin()), self.dequantize(grid.qmax()))
    }
}

/// The powers of two just below and just above a positive normal `scale`
/// (both `scale` when it is one).
pub fn pow2_neighbours(scale: f32) -> (f32, f32) {
    // Clearing the mantissa of a normal f32 leaves the power of two below it.
    let below = f32::from_bits(scale.to_bits() & 0xFF80_0000);
    if below == scale {
        (scale, scale)
    } else {
        (below, below * 2.0)
    }
}

/// A range that [`Params::from_range`] maps onto `grid` with exactly the
/// power-of-two `scale`: symmetric about zero, or (asymmetric) with the zero
/// point where `min` lands, the grid's whole width above it. With every
/// scale a power of two, a dequantized value is an integer times a power of
/// two, so the products and sums a Q/DQ graph computes in f32 are exact
/// (while they stay below 2^24 steps) and equal the integer graph's.
pub fn range_for_scale(min: f32, scale: f32, grid: Grid, mode: RangeMode) -> (f32, f32) {
    let (qmin, qmax) = (grid.qmin(), grid.qmax());
    match mode {
        RangeMode::Symmetric => {
            let half = if grid.signed {
                qmax
            } else {
                qmax - (qmin + qmax + 1).div_euclid(2)
            };
            let amax = half as f32 * scale;
            (-amax, amax)
        }
        RangeMode::Asymmetric => {
            let zero_point = (qmin as f32 - min.min(0.0) / scale)
                .round_ties_even()
                .clamp(qmin as f32, qmax as f32);
            let lo = (qmin as f32 - zero_point) * scale;
            (lo, lo + (qmax - qmin) as f32 * scale)
        }
    }
}

impl Params {
    /// [`Params::from_range`] with the scale a power of two: of the powers
    /// just below and just above the scale `[min, max]` needs, the one
    /// whose parameters `error` finds smaller (the one above, which clips
    /// nothing, on a tie).
    pub fn from_range_pow2(
        min: f32,
        max: f32,
        grid: Grid,
        mode: RangeMode,
        error: impl Fn(&Params) -> f64,
    ) -> Result<Params, GridError> {
        let exact = Params::from_range(min, max, grid, mode)?;
        let (below, above) = pow2_neighbours(exact.scale);
        let params = |scale: f32| {
            let (lo, hi) = range_for_scale(min, scale, grid, mode);
            Params::from_range(lo, hi, grid, mode)
        };
        let above = params(above)?;
        if below == exact.scale && above.scale == exact.scale {
            return Ok(above);
        }
        let below = params(below)?;
        Ok(if error(&below) < error(&above) {
            below
        } else {
            above
        })
    }

    /// The squared error of fake-quantizing `values` with these parameters.
    pub fn squared_error(&self, values: impl IntoIterator<Item = f32>, grid: Grid) -> f64 {
        values
            .into_iter()
            .map(|v| (v - self.fake_quantize(v, grid)) as f64)
            .map(|e| e * e)
            .sum()
    }
}

/// A scale as the smallest positive normal f32 at least, so dividing by it
/// never overflows to infinity for finite ranges of ordinary size.
fn positive(scale: f64) -> f32 {
    (scale as f32).max(f32::MIN_POSITIVE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pow2_scales_are_exact_and_chosen_by_error() {
        assert_eq!(pow2_neighbours(0.3), (0.25, 0.5));
        assert_eq!(pow2_neighbours(0.25), (0.25, 0.25));
        assert_eq!(pow2_neighbours(3.0e-6), (2f32.powi(-19), 2f32.powi(-18)));
        let int8 = Grid::int8();
        let uint8 = Grid::uint8();
        let narrow = Grid::new(8, true, true).unwrap();
        for (grid, mode) in [
            (int8, RangeMode::Symmetric),
            (narrow, RangeMode::Symmetric),
            (uint8, RangeMode::Asymmetric),
            (int8, RangeMode::Asymmetric),
        ] {
            for (lo, hi) in [(-1.3f32, 2.7f32), (0.0, 6.0), (-0.01, 0.02), (-5.0, 0.0)] {
                // The error that prefers the larger scale, then the smaller.
                let above =
                    Params::from_range_pow2(lo, hi, grid, mode, |p| -p.scale as f64).unwrap();
                let below =
                    Params::from_range_pow2(lo, hi, grid, mode, |p| p.scale as f64).unwrap();
                let exact = Params::from_range(lo, hi, grid, mode).unwrap();
                assert_eq!(pow2_neighbours(above.scale).0, above.scale);
                assert_eq!(pow2_neighbours(below.scale).0, below.scale);
                assert!(
                    below.scale < exact.scale && exact.scale < above.scale,
                    "{lo} {hi}"
                );
                assert_eq!(above.scale, 2.0 * below.scale);
                // The larger scale covers the whole range: nothing clips.
                let (rlo, rhi) = above.representable(grid);
                assert!(
                    rlo <= lo.min(0.0) && rhi >= hi.max(0.0),
                    "{grid:?} {mode:?} {lo} {hi} {rlo} {rhi}"
                );
                // Zero stays exact.
                assert_eq!(above.fake_quantize(0.0, grid), 0.0);
                assert_eq!(below.fake_quantize(0.0, grid), 0.0);
            }
        }
        // Squared error picks: values spread evenly, no outlier, favour the
        // finer grid unless it clips too much.
        let values: Vec<f32> = (0..200).map(|i| i as f32 / 199.0 * 1.9 - 0.95).collect();
        let p = Params::from_range_pow2(-0.95, 0.95, narrow, RangeMode::Symmetric, |p| {
            p.squared_error(values.iter().copied(), narrow)
        })
        .unwrap();
        // 0.95 / 127 lies between 2^-8 (range 0.496, clipping half) and 2^-7.
        assert_eq!(p.scale, 2f32.powi(-7));
    }

    #[test]
    fn grids_have_the_onnx_bounds() {
        let cases = [
            (8, true, false, -128, 127),
            (8, true, true, -127, 127),
            (8, false, false, 0, 255),
            (4, true, false, -8, 7),
            (4, false, false, 0, 15),
            (16, true, false, -32768, 32767),
            (16, false, false, 0, 65535),
            (2, true, false, -2, 1),
        ];
        for (bits, signed, narrow, lo, hi) in cases {
            let g = Grid::new(bits, signed, narrow).unwrap();
            assert_eq!((g.qmin(), g.qmax()), (lo, hi), "{bits} {signed} {narrow}");
        }
        assert!(Grid::new(1, true, false).is_err());
        assert!(Grid::new(17, true, false).is_err());
    }

    #[test]
    fn symmetric_int8_is_tensorrt_style() {
        let p = Params::from_range(-2.0, 1.27, Grid::int8(), RangeMode::Symmetric).unwrap();
        assert_eq!(p.zero_point, 0);
        assert_eq!(p.scale, (2.0f64 / 127.0) as f32);
        assert_eq!(p.quantize(2.0, Grid::int8()), 127);
        assert_eq!(p.quantize(-2.0, Grid::int8()), -127);
        assert_eq!(p.quantize(-5.0, Grid::int8()), -128);
        // Unsigned symmetric: zero point at the middle.
        let u = Params::from_range(-1.0, 1.0, Grid::uint8(), RangeMode::Symmetric).unwrap();
        assert_eq!(u.zero_point, 128);
        assert_eq!(u.quantize(0.0, Grid::uint8()), 128);
    }

    #[test]
    fn asymmetric_uint8_keeps_zero_exact() {
        let p = Params::from_range(-0.5, 2.0, Grid::uint8(), RangeMode::Asymmetric).unwrap();
        assert_eq!(p.quantize(0.0, Grid::uint8()), p.zero_point);
        assert_eq!(p.dequantize(p.zero_point), 0.0);
        // All-positive ranges start at 0.
        let q = Params::from_range(1.0, 3.0, Grid::uint8(), RangeMode::Asymmetric).unwrap();
        assert_eq!(q.zero_point, 0);
        assert_eq!(q.scale, (3.0f64 / 255.0) as f32);
    }

    #[test]
    fn degenerate_and_bad_ranges() {
        let z = Params::from_range(0.0, 0.0, Grid::int8(), RangeMode::Asymmetric).unwrap();
        assert_eq!((z.scale, z.zero_point), (1.0, 0));
        assert_eq!(z.quantize(0.0, Grid::int8()), 0);
        assert!(Params::from_range(1.0, -1.0, Grid::int8(), RangeMode::Symmetric).is_err());
        assert!(Params::from_range(f32::NAN, 1.0, Grid::int8(), RangeMode::Symmetric).is_err());
    }

    #[test]
    fn rounding_is_half_to_even_and_nan_goes_to_the_zero_point() {
        let p = Params {
            scale: 1.0,
            zero_point: 0,
        };
        let g = Grid::int8();
        let got: Vec<i32> = [0.5f32, 1.5, 2.5, -0.5, -1.5, -2.5]
            .iter()
            .map(|&x| p.quantize(x, g))
            .collect();
        assert_eq!(got, [0, 2, 2, 0, -2, -2]);
        assert_eq!(p.quantize(f32::NAN, g), 0);
        assert_eq!(p.quantize(f32::INFINITY, g), 127);
        assert_eq!(p.quantize(f32::NEG_INFINITY, g), -128);
    }

    proptest! {
        /// Inside the range, fake quantization moves a value by at most half
        /// a step; outside, it clamps to the grid's ends.
        #[test]
        fn fake_quantization_error_is_at_most_half_a_step(
            lo in -100f32..0.0, span in 0.01f32..200.0, t in -0.5f32..1.5,
            bits in 2u8..=8, signed: bool, symmetric: bool,
        ) {
            let grid = Grid::new(bits, signed, false).unwrap();
            let mode = if symmetric { RangeMode::Symmetric } else { RangeMode::Asymmetric };
            let hi = lo + span;
            let p = Params::from_range(lo, hi, grid, mode).unwrap();
            let x = lo + t * span;
            let (rmin, rmax) = p.representable(grid);
            let y = p.fake_quantize(x, grid);
            prop_assert!(y >= rmin && y <= rmax);
            if x >= rmin && x <= rmax {
                prop_assert!((y - x).abs() <= p.scale * 0.5 * (1.0 + 1e-5), "{x} -> {y}, scale {}", p.scale);
            }
            // The range asked for is covered (up to one step of rounding).
            let need = if symmetric && !signed { lo.abs().max(hi.abs()) } else { 0.0 };
            prop_assert!(rmax >= hi.max(need) - p.scale);
        }
    }
}
