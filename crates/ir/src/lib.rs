//! qgraph's intermediate representation.
//!
//! A [`Model`] holds a [`Graph`]: nodes (operators) and values (tensors) over a
//! `petgraph::StableGraph`, addressed by typed ids ([`NodeId`], [`ValueId`])
//! that carry a serial number, so an id kept across a removal is refused
//! rather than silently naming another vertex. Initializers are [`Tensor`]s on
//! `ndarray`. [`verify_model`] checks the invariants every pass must keep.
//!
//! No I/O and no protobuf here: the `qgraph-onnx` crate reads and writes
//! files, `qgraph-text` prints and parses the text form.

mod attr;
mod data;
mod dtype;
mod graph;
mod model;
pub mod quote;
mod tensor;
mod types;
mod verify;

pub use attr::{AttrKind, AttrValue, Attribute};
pub use data::Data;
pub use dtype::DataType;
pub use graph::{
    Cycle, Graph, Initializer, IrError, Metadata, NewNode, Node, NodeId, TensorAnnotation, Value,
    ValueDef, ValueId,
};
pub use model::{canonical_domain, Function, Model, OpsetImport};
pub use tensor::{element_count, ElidedTensor, PackedTensor, ShapeFmt, Tensor, TensorError};
pub use types::{Dim, TensorType, ValueType};
pub use verify::{verify_graph_alone, verify_model, VerifyError};

// Re-exported so users of the IR need not pin their own versions.
pub use half;
pub use ndarray;
