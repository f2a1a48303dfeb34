//! f32 `exp` and `erf` as branch-free polynomials, for the hot loops of
//! Softmax and Erf (GELU in a transformer). Written as plain scalar code
//! without branches (every case is computed and one selected), so that
//! inside a `pulp` operation, compiled once per vector unit and chosen at
//! run time, the compiler turns each loop into AVX2 or AVX-512 code. libm's
//! `expf` and `erff` branch on their argument and stay scalar: ten times
//! slower on a transformer's Softmax and GELU.
//!
//! Accuracy: `exp` within 2 ulp of the exact value over the normal range
//! (it flushes results below 2.5e-38 to zero); `erf` within 3e-7 absolute
//! (a Taylor series below 0.5, Abramowitz and Stegun 7.1.26 above: the
//! formula's 1.5e-7 plus f32 rounding, 2.8e-7 at most over [-6, 6] in an
//! f32 emulation), and within a few ulp below 0.5. NaN stays NaN, ±inf go to
//! their limits.

/// 1.5 * 2^23: adding it to a float of magnitude below 2^22 rounds it to
/// an integer (to nearest, ties to even), which the low bits then hold.
const ROUNDING: f32 = 12_582_912.0;
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two (Cody and Waite): `n * LN2_HI` is exact for the `n`
/// that occur.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Above: infinity. Below: zero (the result would not be a normal float).
const EXP_HI: f32 = 88.722_83;
const EXP_LO: f32 = -86.6;

/// `e^x` (Cephes' `expf`: `x = n ln2 + r`, `|r| <= ln2 / 2`, a degree 7
/// polynomial for `e^r`, times `2^n` built from its bits). `mul_add` is one
/// FMA instruction inside the `pulp` operations (AVX2 and AVX-512 imply
/// FMA), a third fewer instructions than a product and a sum; outside them
/// it is libm's `fmaf`, slower but the same value.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    // Comparisons are false for NaN, which passes through.
    let xc = if x > EXP_HI {
        EXP_HI
    } else if x < EXP_LO {
        EXP_LO
    } else {
        x
    };
    let shifted = xc.mul_add(LOG2_E, ROUNDING);
    let n = shifted - ROUNDING;
    let r = n.mul_add(-LN2_HI, xc);
    let r = n.mul_add(-LN2_LO, r);
    let p: f32 = 1.987_569_1e-4;
    let p = p.mul_add(r, 1.398_2e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 1.666_666_5e-1);
    let p = p.mul_add(r, 5.000_000_1e-1);
    let er = p.mul_add(r * r, r) + 1.0;
    // 2^(n-1), times 2 below: n reaches 128 at the top of the range, whose
    // 2^n has no f32; n - 1 + 127 stays within 1..=254 over the range.
    let n_bits = shifted.to_bits().wrapping_sub(ROUNDING.to_bits());
    let half_scale = f32::from_bits(n_bits.wrapping_add(126) << 23);
    let y = er * half_scale * 2.0;
    if x > EXP_HI {
        f32::INFINITY
    } else if x < EXP_LO {
        0.0
    } else {
        y
    }
}

/// Below this magnitude erf takes its Taylor series.
const ERF_SERIES_BELOW: f32 = 0.5;

/// `erf(x)`: for `|x| < 0.5` its Taylor series to `x^13` (the next term is
/// below 1e-9 of the sum), above `1 - t P(t) e^(-x^2)` with `t = 1 / (1 +
/// 0.3275911 |x|)` (Abramowitz and Stegun 7.1.26, error below 1.5e-7),
/// signed as `x`.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let ax = x.abs();
    let z = x * x;
    // 2/sqrt(pi) (1 - z/3 + z^2/10 - z^3/42 + z^4/216 - z^5/1320 + z^6/9360).
    let s: f32 = 1.0 / 9360.0;
    let s = s.mul_add(z, -1.0 / 1320.0);
    let s = s.mul_add(z, 1.0 / 216.0);
    let s = s.mul_add(z, -1.0 / 42.0);
    let s = s.mul_add(z, 1.0 / 10.0);
    let s = s.mul_add(z, -1.0 / 3.0);
    let s = s.mul_add(z, 1.0);
    let series = std::f32::consts::FRAC_2_SQRT_PI * x * s;
    let t = 1.0 / 0.327_591_1f32.mul_add(ax, 1.0);
    let p: f32 = 1.061_405_4;
    let p = p.mul_add(t, -1.453_152);
    let p = p.mul_add(t, 1.421_413_8);
    let p = p.mul_add(t, -0.284_496_74);
    let p = p.mul_add(t, 0.254_829_6);
    let tail = 1.0 - p * t * exp(-z);
    let signed_tail = if x < 0.0 { -tail } else { tail };
    // NaN fails the comparison and takes the tail, NaN too.
    if ax < ERF_SERIES_BELOW {
        series
    } else {
        signed_tail
    }
}

/// `dst[i] = erf(src[i])`; the slices have one length.
pub(crate) fn erf_into(src: &[f32], dst: &mut [f32]) {
    struct Op<'a>(&'a [f32], &'a mut [f32]);
    impl pulp::WithSimd for Op<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) {
            for (d, &s) in self.1.iter_mut().zip(self.0) {
                *d = erf(s);
            }
        }
    }
    pulp::Arch::new().dispatch(Op(src, dst));
}

/// Softmax of each row of `rows` (rows of `len` values, `len > 0`) in
/// place: `e^(x - max) / sum`, the sum over the row. A row holding NaN, or
/// +inf, or only -inf, comes out NaN, as the formula gives.
pub(crate) fn softmax_rows_in_place(rows: &mut [f32], len: usize) {
    struct Op<'a>(&'a mut [f32], usize);
    impl pulp::WithSimd for Op<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) {
            for row in self.0.chunks_exact_mut(self.1) {
                softmax_row(row);
            }
        }
    }
    pulp::Arch::new().dispatch(Op(rows, len));
}

/// [`softmax_rows_in_place`] of `src` into `dst`, a row at a time (the
/// row copied, then its softmax taken while it is in cache): memory is
/// read and written once, where a copy of the whole then the softmax took
/// twice.
pub(crate) fn softmax_rows(src: &[f32], dst: &mut [f32], len: usize) {
    struct Op<'a>(&'a [f32], &'a mut [f32], usize);
    impl pulp::WithSimd for Op<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) {
            for (x, y) in self
                .0
                .chunks_exact(self.2)
                .zip(self.1.chunks_exact_mut(self.2))
            {
                y.copy_from_slice(x);
                softmax_row(y);
            }
        }
    }
    pulp::Arch::new().dispatch(Op(src, dst, len));
}

#[inline(always)]
fn softmax_row(row: &mut [f32]) {
    // Two vectors of maxima, so that two chains of comparisons overlap.
    // `>` rather than `f32::max`: one instruction, and a NaN (which it
    // skips) still makes its own exp, hence the sum and the row, NaN.
    let mut maxes = [f32::NEG_INFINITY; 2 * LANES];
    let mut chunks = row.chunks_exact(2 * LANES);
    for chunk in &mut chunks {
        for (m, &v) in maxes.iter_mut().zip(chunk) {
            *m = if v > *m { v } else { *m };
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &v in chunks.remainder() {
        max = if v > max { v } else { max };
    }
    let max = fold_tree(maxes, max, |a, b| if b > a { b } else { a });
    // A +inf (or a row of -inf) gives inf - inf = NaN below, as it should.
    // The exponentials, then their sum in a second pass over the row (in
    // cache): summing inside the first loop kept the partial sums in memory.
    for v in row.iter_mut() {
        *v = exp(*v - max);
    }
    let scale = 1.0 / lane_sum(row, |v| v);
    for v in row.iter_mut() {
        *v *= scale;
    }
}

/// Layer normalization of each row of `src` (rows of `scale.len()`
/// values) into `dst`: `(x - mean) / sqrt(var + eps) * scale + bias`, the
/// mean and (biased) variance over the row, summed in f32 over vector-wide
/// lanes, the variance from the centred values. Returns each row's mean and
/// `1 / sqrt(var + eps)`.
pub(crate) fn layer_norm_rows(
    src: &[f32],
    dst: &mut [f32],
    scale: &[f32],
    bias: Option<&[f32]>,
    eps: f32,
) -> Vec<(f32, f32)> {
    struct Op<'a> {
        src: &'a [f32],
        dst: &'a mut [f32],
        scale: &'a [f32],
        bias: Option<&'a [f32]>,
        eps: f32,
    }
    impl pulp::WithSimd for Op<'_> {
        type Output = Vec<(f32, f32)>;
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) -> Vec<(f32, f32)> {
            let len = self.scale.len();
            self.src
                .chunks_exact(len)
                .zip(self.dst.chunks_exact_mut(len))
                .map(|(x, y)| {
                    let n = len as f32;
                    let mean = lane_sum(x, |v| v) / n;
                    let var = lane_sum(x, |v| (v - mean) * (v - mean)) / n;
                    let inv = 1.0 / (var + self.eps).sqrt();
                    match self.bias {
                        Some(bias) => {
                            for (((y, &x), &s), &b) in y.iter_mut().zip(x).zip(self.scale).zip(bias)
                            {
                                *y = (x - mean) * inv * s + b;
                            }
                        }
                        None => {
                            for ((y, &x), &s) in y.iter_mut().zip(x).zip(self.scale) {
                                *y = (x - mean) * inv * s;
                            }
                        }
                    }
                    (mean, inv)
                })
                .collect()
        }
    }
    pulp::Arch::new().dispatch(Op {
        src,
        dst,
        scale,
        bias,
        eps,
    })
}

/// Lanes of the running sums: as many as a vector holds, so that the
/// reductions vectorize (a single accumulator would be a chain of
/// dependent scalar operations).
const LANES: usize = 16;

/// The sum of `f(x)` over `xs`, in `LANES` partial sums.
#[inline(always)]
fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut sums = [0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (s, &v) in sums.iter_mut().zip(chunk) {
            *s += f(v);
        }
    }
    let rest: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    // Left to right: folded in halves (faster), the softmax sums moved
    // MiniLM's output from 8.0e-5 to 1.09e-4 off ONNX Runtime's, past the
    // 1e-4 CI checks; a max does not depend on the order.
    sums.iter().sum::<f32>() + rest
}

/// `op` over the lanes and `init`, halving the lanes at each step (vector
/// operations on the two halves), where a left-to-right fold is a chain of
/// scalar ones. For maxima, whose value does not depend on the order.
#[inline(always)]
fn fold_tree<const N: usize>(mut lanes: [f32; N], init: f32, op: impl Fn(f32, f32) -> f32) -> f32 {
    const { assert!(N.is_power_of_two()) };
    let mut width = N;
    while width > 1 {
        width /= 2;
        let (low, high) = lanes.split_at_mut(width);
        for (a, &b) in low.iter_mut().zip(&high[..width]) {
            *a = op(*a, b);
        }
    }
    op(lanes[0], init)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Samples over `[lo, hi]`, ends included.
    fn grid(lo: f32, hi: f32, n: usize) -> Vec<f32> {
        (0..=n)
            .map(|i| lo + (hi - lo) * i as f32 / n as f32)
            .collect()
    }

    #[test]
    fn exp_is_within_two_ulp_over_the_normal_range() {
        for x in grid(-86.0, 88.7, 200_000) {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            let ulp = (want as f32).abs() * f32::EPSILON;
            assert!(
                (got - want).abs() <= 2.0 * ulp as f64,
                "exp({x}) = {got}, want {want}"
            );
        }
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn exp_limits_and_nan() {
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(-90.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn erf_is_within_3e7_of_libm_and_relatively_close_near_zero() {
        for x in grid(-6.0, 6.0, 200_000)
            .into_iter()
            .chain(grid(-1e-3, 1e-3, 1000))
        {
            let want = libm::erf(x as f64);
            let got = erf(x) as f64;
            assert!((got - want).abs() <= 3e-7, "erf({x}) = {got}, want {want}");
            if x.abs() < ERF_SERIES_BELOW {
                assert!(
                    (got - want).abs() <= 4.0 * f32::EPSILON as f64 * want.abs(),
                    "erf({x}) = {got}, want {want}"
                );
            }
        }
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erf(f32::INFINITY), 1.0);
        assert_eq!(erf(f32::NEG_INFINITY), -1.0);
        assert_eq!(erf(30.0), 1.0);
        assert!(erf(f32::NAN).is_nan());
    }

    #[test]
    fn slices_take_the_scalar_functions_values() {
        let xs: Vec<f32> = grid(-4.0, 4.0, 1001);
        let mut ys = vec![0f32; xs.len()];
        erf_into(&xs, &mut ys);
        for (x, y) in xs.iter().zip(&ys) {
            assert_eq!(y.to_bits(), erf(*x).to_bits());
        }
    }

    #[test]
    fn softmax_rows_match_f64_and_keep_nan() {
        let len = 37;
        let rows: Vec<f32> = (0..3 * len)
            .map(|i| ((i * 7919) % 101) as f32 / 10.0 - 5.0)
            .collect();
        let want: Vec<f64> = rows
            .chunks(len)
            .flat_map(|row| {
                let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
                let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
                row.iter()
                    .map(move |&v| (v as f64 - max).exp() / sum)
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut got = vec![0f32; rows.len()];
        softmax_rows(&rows, &mut got, len);
        for (g, w) in got.iter().zip(&want) {
            assert!((*g as f64 - w).abs() <= 1e-6 * w.max(1e-3), "{g} vs {w}");
        }
        let softmax = |row: &[f32]| {
            let mut out = vec![0f32; row.len()];
            softmax_rows(row, &mut out, row.len());
            out
        };
        // NaN first, in the middle, in the vector part and in the tail.
        for at in [0, 1, 40, 69] {
            let mut row: Vec<f32> = (0..70).map(|i| i as f32 / 10.0).collect();
            row[at] = f32::NAN;
            assert!(softmax(&row).iter().all(|v| v.is_nan()), "NaN at {at}");
        }
        assert!(softmax(&[1.0, f32::INFINITY, 2.0])
            .iter()
            .all(|v| v.is_nan()));
        assert!(softmax(&[f32::NEG_INFINITY; 3]).iter().all(|v| v.is_nan()));
        assert_eq!(softmax(&[0.0, -3.4e38, 0.0]), vec![0.5, 0.0, 0.5]);
        let mut in_place = rows.clone();
        softmax_rows_in_place(&mut in_place, len);
        assert_eq!(in_place, got);
    }

    #[test]
    fn layer_norm_rows_match_f64() {
        let len = 45;
        let xs: Vec<f32> = (0..2 * len)
            .map(|i| ((i * 7919) % 103) as f32 / 7.0 + 100.0)
            .collect();
        let scale: Vec<f32> = (0..len).map(|i| 0.5 + i as f32 / 40.0).collect();
        let bias: Vec<f32> = (0..len).map(|i| i as f32 / 9.0 - 2.0).collect();
        let mut ys = vec![0f32; xs.len()];
        let stats = layer_norm_rows(&xs, &mut ys, &scale, Some(&bias), 1e-5);
        for (r, row) in xs.chunks(len).enumerate() {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / len as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / len as f64;
            let inv = 1.0 / (var + 1e-5).sqrt();
            assert!((stats[r].0 as f64 - mean).abs() < 1e-4);
            assert!((stats[r].1 as f64 - inv).abs() < 1e-5 * inv);
            for c in 0..len {
                let want = (row[c] as f64 - mean) * inv * scale[c] as f64 + bias[c] as f64;
                let got = ys[r * len + c] as f64;
                assert!((got - want).abs() < 1e-4, "{got} vs {want}");
            }
        }
    }
}
