//! Node attributes: every ONNX attribute kind, kept in file order.

use crate::{Graph, Tensor, ValueType};

/// A named attribute of a node (or a function's attribute default).
#[derive(Clone, Debug, PartialEq)]
pub struct Attribute {
    pub name: String,
    pub value: AttrValue,
    pub doc: String,
}

impl Attribute {
    /// An attribute without documentation.
    pub fn new(name: impl Into<String>, value: AttrValue) -> Attribute {
        Attribute {
            name: name.into(),
            value,
            doc: String::new(),
        }
    }
}

/// The kind of an attribute, as ONNX names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttrKind {
    Float,
    Int,
    String,
    Tensor,
    Graph,
    SparseTensor,
    Type,
    Floats,
    Ints,
    Strings,
    Tensors,
    Graphs,
    SparseTensors,
    Types,
}

impl AttrKind {
    pub const ALL: [AttrKind; 14] = [
        AttrKind::Float,
        AttrKind::Int,
        AttrKind::String,
        AttrKind::Tensor,
        AttrKind::Graph,
        AttrKind::SparseTensor,
        AttrKind::Type,
        AttrKind::Floats,
        AttrKind::Ints,
        AttrKind::Strings,
        AttrKind::Tensors,
        AttrKind::Graphs,
        AttrKind::SparseTensors,
        AttrKind::Types,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AttrKind::Float => "float",
            AttrKind::Int => "int",
            AttrKind::String => "string",
            AttrKind::Tensor => "tensor",
            AttrKind::Graph => "graph",
            AttrKind::SparseTensor => "sparse_tensor",
            AttrKind::Type => "type",
            AttrKind::Floats => "floats",
            AttrKind::Ints => "ints",
            AttrKind::Strings => "strings",
            AttrKind::Tensors => "tensors",
            AttrKind::Graphs => "graphs",
            AttrKind::SparseTensors => "sparse_tensors",
            AttrKind::Types => "types",
        }
    }

    pub fn from_name(name: &str) -> Option<AttrKind> {
        AttrKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// An attribute's value. Strings are byte strings, as in ONNX.
#[derive(Clone, Debug)]
pub enum AttrValue {
    Float(f32),
    Int(i64),
    String(Vec<u8>),
    Tensor(Tensor),
    Graph(Box<Graph>),
    Type(ValueType),
    Floats(Vec<f32>),
    Ints(Vec<i64>),
    Strings(Vec<Vec<u8>>),
    Tensors(Vec<Tensor>),
    Graphs(Vec<Graph>),
    Types(Vec<ValueType>),
    /// Inside a function body: the value is the calling node's attribute
    /// `name` (ONNX `ref_attr_name`), of the given kind.
    Ref {
        name: String,
        kind: AttrKind,
    },
}

impl AttrValue {
    pub fn kind(&self) -> AttrKind {
        match self {
            AttrValue::Float(_) => AttrKind::Float,
            AttrValue::Int(_) => AttrKind::Int,
            AttrValue::String(_) => AttrKind::String,
            AttrValue::Tensor(_) => AttrKind::Tensor,
            AttrValue::Graph(_) => AttrKind::Graph,
            AttrValue::Type(_) => AttrKind::Type,
            AttrValue::Floats(_) => AttrKind::Floats,
            AttrValue::Ints(_) => AttrKind::Ints,
            AttrValue::Strings(_) => AttrKind::Strings,
            AttrValue::Tensors(_) => AttrKind::Tensors,
            AttrValue::Graphs(_) => AttrKind::Graphs,
            AttrValue::Types(_) => AttrKind::Types,
            AttrValue::Ref { kind, .. } => *kind,
        }
    }

    /// Subgraphs held by this value (one for `Graph`, all for `Graphs`).
    pub fn subgraphs(&self) -> &[Graph] {
        match self {
            AttrValue::Graph(g) => std::slice::from_ref(g.as_ref()),
            AttrValue::Graphs(gs) => gs,
            _ => &[],
        }
    }
}

/// Floats compare by bits, so an attribute equals itself even when NaN.
impl PartialEq for AttrValue {
    fn eq(&self, other: &AttrValue) -> bool {
        use AttrValue::*;
        match (self, other) {
            (Float(a), Float(b)) => a.to_bits() == b.to_bits(),
            (Int(a), Int(b)) => a == b,
            (String(a), String(b)) => a == b,
            (Tensor(a), Tensor(b)) => a == b,
            (Graph(a), Graph(b)) => a == b,
            (Type(a), Type(b)) => a == b,
            (Floats(a), Floats(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
            }
            (Ints(a), Ints(b)) => a == b,
            (Strings(a), Strings(b)) => a == b,
            (Tensors(a), Tensors(b)) => a == b,
            (Graphs(a), Graphs(b)) => a == b,
            (Types(a), Types(b)) => a == b,
            (Ref { name: a, kind: ka }, Ref { name: b, kind: kb }) => a == b && ka == kb,
            _ => false,
        }
    }
}
