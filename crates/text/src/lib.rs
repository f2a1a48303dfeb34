//! qgraph's text form: one readable format of a whole model. It is what
//! `qgraph show` prints, the format of test fixtures and of `insta`
//! snapshots. Printing what [`parse_model`] read from printed text gives the
//! same text again.
//!
//! ```text
//! ir_version 8
//! opset "" 13
//!
//! graph main {
//!   input %x: f32[N,4]
//!   output %y: f32[N,2]
//!   init %w = f32[2,4] <blake3:5c1d0f0e8f2b6a11>
//!   init %b = f32[2] [0.5, -0.5]
//!   fc: %y = Gemm(%x, %w, %b) {transB = 1}
//! }
//! ```
//!
//! Tensors larger than [`PrintOptions::inline_limit`] elements print as a
//! type, shape and content digest (`<blake3:...>`); the parser reads those
//! back as [`qgraph_ir::Tensor::Elided`], which prints the same but cannot be
//! computed with or written to ONNX.

mod parse;
mod print;
mod syntax;

pub use parse::{parse_model, TextError};
pub use print::{
    format_attr_value, format_label, format_node, format_op, format_tensor, format_type,
    print_model, PrintOptions,
};
pub use syntax::{digest, value_ref, Pos, SyntaxError};
