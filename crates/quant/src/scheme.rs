//! Quantization schemes by name: how weights and activations are
//! quantized (grid, symmetric or asymmetric, per channel or per tensor).
//!
//! - `int8`: TensorRT style. Weights int8 symmetric per output channel on
//!   the narrow grid [-127, 127]; activations int8 symmetric per tensor;
//!   every zero point 0.
//! - `int8-asym`: ONNX Runtime style. Weights as `int8`; activations uint8
//!   asymmetric per tensor (the zero point where 0 lands).
//! - `wNaM` (N, M from 2 to 8, e.g. `w4a8`, `w2a2`): weights N-bit signed
//!   symmetric per output channel on the narrow grid; activations M-bit
//!   unsigned asymmetric per tensor, which gives post-ReLU values the whole
//!   grid and keeps 0 exact.
//! - `pact-wNaM`: as `wNaM`, activations on `[0, alpha]` (PACT, Choi et al.
//!   2018): alpha the end of the calibrated range (the maximum, or where
//!   the calibration method clips), or 10 without data.
//! - `lsq-wNaM`: LSQ (Esser et al. 2020): one step size per layer,
//!   `s = 2 <|v|> / sqrt(Qp)` from the weight or from the first calibration
//!   batch; weights on the full signed grid, activations unsigned from 0.
//!
//! - `dorefa-wNaM`: DoReFa-Net (Zhou et al. 2016): activations clipped to
//!   [0, 1] and quantized there (`round((2^M - 1) a) / (2^M - 1)`, zero point
//!   0), weights one scale per layer from the largest |w|, on the narrow
//!   signed grid (DoReFa's weight levels `2 quantize(tanh w / 2 max|tanh w| +
//!   1/2) - 1` have no zero, which no integer zero point gives; its tanh
//!   reparametrisation belongs to the trainer: `qgraph train` trains a
//!   latent through `qgraph.train.TanhNormalize`).
//!
//! The learned-range schemes place the same Q/DQ pairs; the trainer then
//! learns their scales.

use crate::{Grid, RangeMode};

/// How one kind of tensor is quantized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorScheme {
    pub grid: Grid,
    pub mode: RangeMode,
    /// One scale per output channel (axis 0 of a weight) instead of one
    /// per tensor.
    pub per_channel: bool,
    /// How the initial range is chosen.
    pub init: RangeInit,
    /// Scales rounded to powers of two (`qgraph insert --pow2-scales`), so
    /// that an integer-only graph computes exactly what the Q/DQ graph does.
    pub pow2: bool,
}

/// How a scheme's initial range is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeInit {
    /// From the values (weights) or the calibration observer (activations).
    Observed,
    /// LSQ (Esser et al. 2020): step size `s = 2 <|v|> / sqrt(Qp)`, the mean
    /// |v| over the weight or over the first calibration batch, so the range
    /// is `Qp * s` (and `-Qn * s` when signed).
    LsqMeanAbs,
    /// PACT (Choi et al. 2018): activations clipped to `[0, alpha]`,
    /// `alpha` the end of the calibrated range, or 10 without data (the paper's
    /// initial value, its Appendix B).
    PactClip,
    /// DoReFa (Zhou et al. 2016): activations on `[0, 1]`, with or without
    /// data.
    UnitRange,
}

/// PACT's initial clipping level without data.
pub const PACT_INITIAL_ALPHA: f32 = 10.0;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scheme {
    pub name: String,
    pub weights: TensorScheme,
    pub activations: TensorScheme,
}

/// The scheme names, for `--help` and messages.
pub const SCHEME_NAMES: &str =
    "int8, int8-asym, wNaM, pact-wNaM, lsq-wNaM, dorefa-wNaM (N, M in 2..=8, e.g. w4a8, pact-w4a4)";

impl Scheme {
    pub fn parse(name: &str) -> Result<Scheme, String> {
        let weights = |bits: u8| TensorScheme {
            grid: Grid {
                bits,
                signed: true,
                narrow: true,
            },
            mode: RangeMode::Symmetric,
            per_channel: true,
            init: RangeInit::Observed,
            pow2: false,
        };
        let (w, a) = match name {
            "int8" => (
                weights(8),
                TensorScheme {
                    grid: Grid::int8(),
                    mode: RangeMode::Symmetric,
                    per_channel: false,
                    init: RangeInit::Observed,
                    pow2: false,
                },
            ),
            "int8-asym" => (
                weights(8),
                TensorScheme {
                    grid: Grid::uint8(),
                    mode: RangeMode::Asymmetric,
                    per_channel: false,
                    init: RangeInit::Observed,
                    pow2: false,
                },
            ),
            _ => {
                let unknown = || format!("unknown scheme '{name}'; the schemes are {SCHEME_NAMES}");
                let (learned, rest) = match name.split_once('-') {
                    Some((l @ ("pact" | "lsq" | "dorefa"), rest)) => (Some(l), rest),
                    _ => (None, name),
                };
                let (wb, ab) = parse_wa(rest).ok_or_else(unknown)?;
                let activations = TensorScheme {
                    grid: Grid {
                        bits: ab,
                        signed: false,
                        narrow: false,
                    },
                    mode: RangeMode::Asymmetric,
                    per_channel: false,
                    init: RangeInit::Observed,
                    pow2: false,
                };
                match learned {
                    None => (weights(wb), activations),
                    // PACT quantizes activations on [0, alpha]; its
                    // weights here are those of wNaM.
                    Some("pact") => (
                        weights(wb),
                        TensorScheme {
                            init: RangeInit::PactClip,
                            ..activations
                        },
                    ),
                    Some("dorefa") => (
                        TensorScheme {
                            per_channel: false,
                            ..weights(wb)
                        },
                        TensorScheme {
                            init: RangeInit::UnitRange,
                            ..activations
                        },
                    ),
                    // LSQ: one step size per layer, weights on the full
                    // signed grid [-2^(N-1), 2^(N-1) - 1], activations
                    // unsigned with zero point 0.
                    _ => (
                        TensorScheme {
                            grid: Grid {
                                bits: wb,
                                signed: true,
                                narrow: false,
                            },
                            mode: RangeMode::Symmetric,
                            per_channel: false,
                            init: RangeInit::LsqMeanAbs,
                            pow2: false,
                        },
                        TensorScheme {
                            init: RangeInit::LsqMeanAbs,
                            ..activations
                        },
                    ),
                }
            }
        };
        Ok(Scheme {
            name: name.to_string(),
            weights: w,
            activations: a,
        })
    }

    /// The initial range of an LSQ tensor from its mean |v|: `[-Qp s, Qp s]`
    /// (signed grids: with zero point 0 the grid then reaches `-Qn s`) or
    /// `[0, Qp s]`, with `s = 2 mean / sqrt(Qp)`, so that the scale is `s`.
    pub fn lsq_range(grid: Grid, mean_abs: f64) -> (f32, f32) {
        let qp = (grid.qmax() - if grid.signed { 0 } else { grid.qmin() }) as f64;
        let s = 2.0 * mean_abs / qp.max(1.0).sqrt();
        let hi = (qp * s) as f32;
        (if grid.signed { -hi } else { 0.0 }, hi)
    }

    /// Whether either kind of tensor uses fewer than 8 bits.
    pub fn is_low_bit(&self) -> bool {
        self.weights.grid.bits < 8 || self.activations.grid.bits < 8
    }
}

/// `w4a8` into (4, 8), bits from 2 to 8.
fn parse_wa(name: &str) -> Option<(u8, u8)> {
    let rest = name.strip_prefix('w')?;
    let (w, a) = rest.split_once('a')?;
    let (w, a): (u8, u8) = (w.parse().ok()?, a.parse().ok()?);
    ((2..=8).contains(&w) && (2..=8).contains(&a)).then_some((w, a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_schemes_have_the_documented_grids() {
        let trt = Scheme::parse("int8").unwrap();
        assert_eq!(
            (trt.weights.grid.qmin(), trt.weights.grid.qmax()),
            (-127, 127)
        );
        assert!(trt.weights.per_channel && !trt.activations.per_channel);
        assert_eq!(trt.activations.mode, RangeMode::Symmetric);
        let ort = Scheme::parse("int8-asym").unwrap();
        assert_eq!(
            (ort.activations.grid.qmin(), ort.activations.grid.qmax()),
            (0, 255)
        );
        assert_eq!(ort.activations.mode, RangeMode::Asymmetric);
        let low = Scheme::parse("w4a8").unwrap();
        assert_eq!((low.weights.grid.qmin(), low.weights.grid.qmax()), (-7, 7));
        assert_eq!(low.activations.grid.qmax(), 255);
        assert!(low.is_low_bit() && !trt.is_low_bit());
        let pact = Scheme::parse("pact-w4a4").unwrap();
        assert_eq!(pact.activations.init, RangeInit::PactClip);
        assert_eq!(pact.weights, Scheme::parse("w4a4").unwrap().weights);
        let lsq = Scheme::parse("lsq-w3a2").unwrap();
        assert_eq!((lsq.weights.grid.qmin(), lsq.weights.grid.qmax()), (-4, 3));
        assert!(!lsq.weights.per_channel && lsq.weights.init == RangeInit::LsqMeanAbs);
        // s = 2 <|v|> / sqrt(Qp): with <|v|> = 0.5 and Qp = 3, s = 1/sqrt(3).
        let (lo, hi) = Scheme::lsq_range(lsq.weights.grid, 0.5);
        let p = crate::Params::from_range(lo, hi, lsq.weights.grid, lsq.weights.mode).unwrap();
        assert!((p.scale - 1.0 / 3f32.sqrt()).abs() < 1e-6 && p.zero_point == 0);
        let (lo, hi) = Scheme::lsq_range(lsq.activations.grid, 0.5);
        let p =
            crate::Params::from_range(lo, hi, lsq.activations.grid, lsq.activations.mode).unwrap();
        assert!((p.scale - 1.0 / 3f32.sqrt()).abs() < 1e-6 && p.zero_point == 0);
        let w2a2 = Scheme::parse("w2a2").unwrap();
        assert_eq!(
            (w2a2.weights.grid.qmin(), w2a2.weights.grid.qmax()),
            (-1, 1)
        );
        assert_eq!(w2a2.activations.grid.qmax(), 3);
    }

    #[test]
    fn unknown_names_list_the_schemes() {
        for bad in [
            "int9",
            "w1a8",
            "w4a9",
            "w4",
            "a8",
            "w4a8x",
            "",
            "pact-int8",
            "dorefa-w4a4x",
        ] {
            let err = Scheme::parse(bad).unwrap_err();
            assert!(
                err.contains("the schemes are int8, int8-asym"),
                "{bad}: {err}"
            );
        }
    }
}
