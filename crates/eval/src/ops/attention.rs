//! (being written)

use super::Kernel;

pub const KERNELS: &[(&str, Kernel)] = &[];

/// ONNX Runtime's `com.microsoft` operators of this family.
pub const MICROSOFT_KERNELS: &[(&str, Kernel)] = &[];
