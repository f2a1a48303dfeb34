//! ONNX's numeric codes for data types and attribute kinds.

use qgraph_ir::{AttrKind, DataType};

pub fn dtype_code(d: DataType) -> i32 {
    d.onnx_code()
}

pub fn dtype_from_code(code: i32) -> Option<DataType> {
    DataType::from_onnx_code(code)
}

pub fn attr_kind_code(k: AttrKind) -> i32 {
    match k {
        AttrKind::Float => 1,
        AttrKind::Int => 2,
        AttrKind::String => 3,
        AttrKind::Tensor => 4,
        AttrKind::Graph => 5,
        AttrKind::Floats => 6,
        AttrKind::Ints => 7,
        AttrKind::Strings => 8,
        AttrKind::Tensors => 9,
        AttrKind::Graphs => 10,
        AttrKind::SparseTensor => 11,
        AttrKind::SparseTensors => 12,
        AttrKind::Type => 13,
        AttrKind::Types => 14,
    }
}

pub fn attr_kind_from_code(code: i32) -> Option<AttrKind> {
    AttrKind::ALL
        .into_iter()
        .find(|&k| attr_kind_code(k) == code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_the_generated_enum() {
        use crate::proto::tensor_proto::DataType as P;
        for d in DataType::ALL {
            let code = dtype_code(d);
            assert!(P::try_from(code).is_ok(), "{d} -> {code}");
            assert_eq!(dtype_from_code(code), Some(d));
        }
        assert_eq!(dtype_code(DataType::I4), P::Int4 as i32);
        assert_eq!(dtype_code(DataType::F6E3M2), P::Float6e3m2 as i32);
        use crate::proto::attribute_proto::AttributeType as A;
        for k in AttrKind::ALL {
            assert!(A::try_from(attr_kind_code(k)).is_ok());
        }
        assert_eq!(attr_kind_code(AttrKind::Types), A::TypeProtos as i32);
    }
}
