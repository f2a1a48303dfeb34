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

use crate::{Grid, RangeMode};

/// How one kind of tensor is quantized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorScheme {
    pub grid: Grid,
    pub mode: RangeMode,
    /// One scale per output channel (axis 0 of a weight) instead of one
    /// per tensor.
    pub per_channel: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scheme {
    pub name: String,
    pub weights: TensorScheme,
    pub activations: TensorScheme,
}

/// The scheme names, for `--help` and messages.
pub const SCHEME_NAMES: &str = "int8, int8-asym, wNaM (N, M in 2..=8, e.g. w4a8)";

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
        };
        let (w, a) = match name {
            "int8" => (
                weights(8),
                TensorScheme {
                    grid: Grid::int8(),
                    mode: RangeMode::Symmetric,
                    per_channel: false,
                },
            ),
            "int8-asym" => (
                weights(8),
                TensorScheme {
                    grid: Grid::uint8(),
                    mode: RangeMode::Asymmetric,
                    per_channel: false,
                },
            ),
            _ => {
                let (wb, ab) = parse_wa(name).ok_or_else(|| {
                    format!("unknown scheme '{name}'; the schemes are {SCHEME_NAMES}")
                })?;
                (
                    weights(wb),
                    TensorScheme {
                        grid: Grid {
                            bits: ab,
                            signed: false,
                            narrow: false,
                        },
                        mode: RangeMode::Asymmetric,
                        per_channel: false,
                    },
                )
            }
        };
        Ok(Scheme {
            name: name.to_string(),
            weights: w,
            activations: a,
        })
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
        let w2a2 = Scheme::parse("w2a2").unwrap();
        assert_eq!(
            (w2a2.weights.grid.qmin(), w2a2.weights.grid.qmax()),
            (-1, 1)
        );
        assert_eq!(w2a2.activations.grid.qmax(), 3);
    }

    #[test]
    fn unknown_names_list_the_schemes() {
        for bad in ["int9", "w1a8", "w4a9", "w4", "a8", "w4a8x", ""] {
            let err = Scheme::parse(bad).unwrap_err();
            assert!(
                err.contains("the schemes are int8, int8-asym"),
                "{bad}: {err}"
            );
        }
    }
}
