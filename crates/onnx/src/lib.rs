//! ONNX files in and out of qgraph's IR. This is the only crate that knows
//! protobuf: `generated/onnx.rs` is prost code generated from the pinned
//! `proto/onnx.proto` (see `proto/regen.sh`).
//!
//! Reading keeps everything the IR can hold (see ARCHITECTURE.md for the short
//! list of what it drops, each reported as a warning). Writing is
//! deterministic (same model, same bytes) and atomic (a temporary file, then a
//! rename), with external data for models past protobuf's 2 GiB limit.

mod codes;
mod data;
mod error;
mod read;
mod write;

#[allow(clippy::all, clippy::pedantic, missing_docs)]
mod proto {
    include!("generated/onnx.rs");
}

pub use data::{decode_data, encode_data};
pub use error::OnnxError;
pub use read::{decode_model, decode_tensor, read_model, Loaded};
pub use write::{
    encode_model, encode_tensor, write_atomic, write_model, ExternalData, WriteOptions, WriteReport,
};
