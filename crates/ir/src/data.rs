//! What a value holds when a graph runs: a tensor, or one of the ONNX
//! container types that operators produce and take (sequences of tensors,
//! optionals).

use crate::Tensor;

#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    Tensor(Tensor),
    /// An ONNX sequence of tensors (each may have its own shape).
    Sequence(Vec<Tensor>),
    /// An ONNX optional: a tensor or a sequence, or nothing.
    Optional(Option<Box<Data>>),
}

impl Data {
    /// What kind of value this is, for messages ("a tensor", ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Data::Tensor(_) => "a tensor",
            Data::Sequence(_) => "a sequence",
            Data::Optional(_) => "an optional",
        }
    }

    /// The tensor, when this is one.
    pub fn into_tensor(self) -> Result<Tensor, Data> {
        match self {
            Data::Tensor(t) => Ok(t),
            other => Err(other),
        }
    }

    pub fn as_tensor(&self) -> Option<&Tensor> {
        match self {
            Data::Tensor(t) => Some(t),
            _ => None,
        }
    }
}

impl From<Tensor> for Data {
    fn from(t: Tensor) -> Data {
        Data::Tensor(t)
    }
}
