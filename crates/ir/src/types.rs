//! Declared types of values: element type and a shape whose dims may be
//! symbolic.

use crate::DataType;

/// One dimension of a declared shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    /// A known size. Kept as ONNX stores it: some exporters write -1 here.
    Known(i64),
    /// A named symbolic size, such as the batch "N".
    Symbol(String),
    /// Neither a size nor a name.
    Unknown,
}

/// The type of a tensor value: element type and, when known, the shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType {
    /// `None` when the file leaves the element type undefined.
    pub dtype: Option<DataType>,
    /// `None` when the rank is unknown; `Some(vec![])` is a scalar.
    pub shape: Option<Vec<Dim>>,
}

/// The declared type of a value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ValueType {
    Tensor(TensorType),
    SparseTensor(TensorType),
    Sequence(Box<ValueType>),
    Optional(Box<ValueType>),
    Map(DataType, Box<ValueType>),
    Opaque { domain: String, name: String },
}

impl TensorType {
    pub fn new(dtype: DataType, shape: Vec<Dim>) -> TensorType {
        TensorType {
            dtype: Some(dtype),
            shape: Some(shape),
        }
    }

    /// The exact type of a tensor with this element type and concrete shape.
    pub fn of_concrete(dtype: DataType, shape: &[usize]) -> TensorType {
        TensorType::new(dtype, shape.iter().map(|&d| Dim::Known(d as i64)).collect())
    }

    /// Whether a tensor of `dtype` and `shape` can have this declared type:
    /// same element type (when declared), same rank (when known), and equal
    /// known dims. Symbolic, unknown and negative dims match any size.
    pub fn admits(&self, dtype: DataType, shape: &[usize]) -> bool {
        if self.dtype.is_some_and(|d| d != dtype) {
            return false;
        }
        match &self.shape {
            None => true,
            Some(dims) => {
                dims.len() == shape.len()
                    && dims.iter().zip(shape).all(|(d, &s)| match d {
                        Dim::Known(k) => *k < 0 || *k as u64 == s as u64,
                        Dim::Symbol(_) | Dim::Unknown => true,
                    })
            }
        }
    }
}

impl ValueType {
    pub fn tensor(dtype: DataType, shape: Vec<Dim>) -> ValueType {
        ValueType::Tensor(TensorType::new(dtype, shape))
    }

    pub fn as_tensor(&self) -> Option<&TensorType> {
        match self {
            ValueType::Tensor(t) => Some(t),
            _ => None,
        }
    }
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Known(k) => write!(f, "{k}"),
            Dim::Symbol(s) => f.write_str(&crate::quote::ident_or_quoted(s)),
            Dim::Unknown => f.write_str("?"),
        }
    }
}

/// `f32[N,3,224,224]`; `f32` alone when the rank is unknown; `undefined`
/// for an undefined element type.
impl std::fmt::Display for TensorType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.dtype {
            Some(d) => write!(f, "{d}")?,
            None => f.write_str("undefined")?,
        }
        if let Some(dims) = &self.shape {
            f.write_str("[")?;
            for (i, d) in dims.iter().enumerate() {
                if i > 0 {
                    f.write_str(",")?;
                }
                write!(f, "{d}")?;
            }
            f.write_str("]")?;
        }
        Ok(())
    }
}

impl std::fmt::Display for ValueType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ValueType::Tensor(t) => write!(f, "{t}"),
            ValueType::SparseTensor(t) => write!(f, "sparse({t})"),
            ValueType::Sequence(t) => write!(f, "seq({t})"),
            ValueType::Optional(t) => write!(f, "optional({t})"),
            ValueType::Map(k, v) => write!(f, "map({k}, {v})"),
            ValueType::Opaque { domain, name } => {
                write!(
                    f,
                    "opaque({}, {})",
                    crate::quote::quote(domain),
                    crate::quote::quote(name)
                )
            }
        }
    }
}
