//! (being written)

use super::Kernel;

pub const KERNELS: &[(&str, Kernel)] = &[];
