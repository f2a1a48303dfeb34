//! Quantization numerics, as pure functions: integer grids of any width
//! from 2 to 16 bits, scale and zero point from a range (symmetric,
//! asymmetric, narrow range), quantize and dequantize with ONNX's
//! arithmetic (`saturate(round_half_even(x / scale) + zero_point)` and
//! `(q - zero_point) * scale`, in f32), and the fixed-point multipliers of
//! integer-only inference (Jacob et al. 2018, section 2.2), and the range
//! observers of calibration (`observe`).
//!
//! Everything here is deterministic and platform-independent: f32
//! division and rounding are IEEE operations, and the fixed-point
//! arithmetic is integer.

mod fixed_point;
mod grid;
pub mod observe;
pub mod rounding;
mod scheme;

pub use fixed_point::{multiply_by_quantized_multiplier, quantize_multiplier, QuantizedMultiplier};
pub use grid::{pow2_neighbours, range_for_scale, Grid, GridError, Params, RangeMode};
pub use scheme::{RangeInit, Scheme, TensorScheme, PACT_INITIAL_ALPHA, SCHEME_NAMES};

/// Rounds half to even, as ONNX QuantizeLinear does.
pub fn round_half_even(x: f32) -> f32 {
    x.round_ties_even()
}
