//! ONNX's numeric codes for data types and attribute kinds.

use qgraph_ir::{AttrKind, DataType};

pub fn dtype_code(d: DataType) -> i32 {
    match d {
        DataType::F32 => 1,
        DataType::U8 => 2,
        DataType::I8 => 3,
        DataType::U16 => 4,
        DataType::I16 => 5,
        DataType::I32 => 6,
        DataType::I64 => 7,
        DataType::String => 8,
        DataType::Bool => 9,
        DataType::F16 => 10,
        DataType::F64 => 11,
        DataType::U32 => 12,
        DataType::U64 => 13,
        DataType::C64 => 14,
        DataType::C128 => 15,
        DataType::BF16 => 16,
        DataType::F8E4M3FN => 17,
        DataType::F8E4M3FNUZ => 18,
        DataType::F8E5M2 => 19,
        DataType::F8E5M2FNUZ => 20,
        DataType::U4 => 21,
        DataType::I4 => 22,
        DataType::F4E2M1 => 23,
        DataType::F8E8M0 => 24,
        DataType::U2 => 25,
        DataType::I2 => 26,
        DataType::F6E2M3 => 27,
        DataType::F6E3M2 => 28,
    }
}

pub fn dtype_from_code(code: i32) -> Option<DataType> {
    DataType::ALL.into_iter().find(|&d| dtype_code(d) == code)
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
