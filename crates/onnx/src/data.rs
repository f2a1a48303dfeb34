//! The container values of ONNX test data sets (`onnx-data.proto`):
//! `SequenceProto` and `OptionalProto`, which hold what sequence and
//! optional inputs and outputs carry. Written by hand, as prost would
//! generate them, because the pinned `onnx.proto` does not include
//! `onnx-data.proto` and only these two messages are needed (maps and
//! sparse tensors are refused by name).

use crate::proto::TensorProto;
use crate::read::tensor_from_proto;
use crate::write::tensor_to_proto;
use crate::OnnxError;
use prost::Message;
use qgraph_ir::{Data, Tensor, ValueType};

/// `SequenceProto.DataType` / `OptionalProto.DataType`.
const UNDEFINED: i32 = 0;
const TENSOR: i32 = 1;
const SPARSE_TENSOR: i32 = 2;
const SEQUENCE: i32 = 3;
const MAP: i32 = 4;
const OPTIONAL: i32 = 5;

#[derive(Clone, PartialEq, Message)]
struct SequenceProto {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(int32, optional, tag = "2")]
    elem_type: Option<i32>,
    #[prost(message, repeated, tag = "3")]
    tensor_values: Vec<TensorProto>,
    /// Fields 4-7 (sparse tensors, sequences, maps, optionals) are skipped
    /// as unknown fields; `elem_type` says when they were meant.
    #[prost(message, repeated, tag = "5")]
    sequence_values: Vec<SequenceProto>,
}

#[derive(Clone, PartialEq, Message)]
struct OptionalProto {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(int32, optional, tag = "2")]
    elem_type: Option<i32>,
    #[prost(message, optional, tag = "3")]
    tensor_value: Option<TensorProto>,
    #[prost(message, optional, tag = "5")]
    sequence_value: Option<SequenceProto>,
}

fn kind_name(elem_type: i32) -> &'static str {
    match elem_type {
        UNDEFINED => "undefined",
        TENSOR => "tensor",
        SPARSE_TENSOR => "sparse tensor",
        SEQUENCE => "sequence",
        MAP => "map",
        OPTIONAL => "optional",
        _ => "unknown",
    }
}

fn decode_failed(what: &str, e: prost::DecodeError) -> OnnxError {
    OnnxError::Decode(format!("not a readable {what}: {e}"))
}

fn sequence_tensors(seq: SequenceProto) -> Result<Vec<Tensor>, OnnxError> {
    match seq.elem_type.unwrap_or(UNDEFINED) {
        // An empty sequence may leave its element type undefined.
        TENSOR | UNDEFINED => seq
            .tensor_values
            .into_iter()
            .map(|t| tensor_from_proto(t).map(|(_, t)| t))
            .collect(),
        other => Err(OnnxError::Unsupported(format!(
            "a sequence of {} elements (only sequences of tensors are supported)",
            kind_name(other)
        ))),
    }
}

fn optional_data(opt: OptionalProto) -> Result<Option<Data>, OnnxError> {
    match opt.elem_type.unwrap_or(UNDEFINED) {
        UNDEFINED => Ok(None),
        TENSOR => match opt.tensor_value {
            Some(t) => Ok(Some(Data::Tensor(tensor_from_proto(t)?.1))),
            None => Ok(None),
        },
        SEQUENCE => match opt.sequence_value {
            Some(s) => Ok(Some(Data::Sequence(sequence_tensors(s)?))),
            None => Ok(None),
        },
        other => Err(OnnxError::Unsupported(format!(
            "an optional {} (only optional tensors and sequences are supported)",
            kind_name(other)
        ))),
    }
}

/// One serialized test-data value, parsed as `declared` says (as ONNX's
/// own runner does: the file alone does not say which message it is): a
/// `SequenceProto` for a sequence, an `OptionalProto` for an optional, a
/// `TensorProto` otherwise. Returns its name (empty when it has none).
pub fn decode_data(
    bytes: &[u8],
    declared: Option<&ValueType>,
) -> Result<(String, Data), OnnxError> {
    match declared {
        Some(ValueType::Sequence(_)) => {
            let seq =
                SequenceProto::decode(bytes).map_err(|e| decode_failed("SequenceProto", e))?;
            let name = seq.name.clone().unwrap_or_default();
            Ok((name, Data::Sequence(sequence_tensors(seq)?)))
        }
        Some(ValueType::Optional(_)) => {
            let opt =
                OptionalProto::decode(bytes).map_err(|e| decode_failed("OptionalProto", e))?;
            let name = opt.name.clone().unwrap_or_default();
            Ok((name, Data::Optional(optional_data(opt)?.map(Box::new))))
        }
        Some(ValueType::Map(..)) => Err(OnnxError::Unsupported("map values".into())),
        Some(ValueType::SparseTensor(_)) => {
            Err(OnnxError::Unsupported("sparse tensor values".into()))
        }
        _ => {
            let (name, t) = crate::decode_tensor(bytes)?;
            Ok((name, Data::Tensor(t)))
        }
    }
}

fn sequence_proto(name: &str, items: &[Tensor]) -> Result<SequenceProto, OnnxError> {
    Ok(SequenceProto {
        name: (!name.is_empty()).then(|| name.to_string()),
        elem_type: Some(TENSOR),
        tensor_values: items
            .iter()
            .map(|t| tensor_to_proto("", t))
            .collect::<Result<_, _>>()?,
        sequence_values: Vec::new(),
    })
}

/// A value as the message ONNX test data sets hold for its kind.
pub fn encode_data(name: &str, data: &Data) -> Result<Vec<u8>, OnnxError> {
    Ok(match data {
        Data::Tensor(t) => crate::encode_tensor(name, t)?,
        Data::Sequence(items) => sequence_proto(name, items)?.encode_to_vec(),
        Data::Optional(inner) => {
            let mut opt = OptionalProto {
                name: (!name.is_empty()).then(|| name.to_string()),
                elem_type: Some(UNDEFINED),
                tensor_value: None,
                sequence_value: None,
            };
            match inner.as_deref() {
                None => {}
                Some(Data::Tensor(t)) => {
                    opt.elem_type = Some(TENSOR);
                    opt.tensor_value = Some(tensor_to_proto("", t)?);
                }
                Some(Data::Sequence(items)) => {
                    opt.elem_type = Some(SEQUENCE);
                    opt.sequence_value = Some(sequence_proto("", items)?);
                }
                Some(Data::Optional(_)) => {
                    return Err(OnnxError::Unsupported("an optional of an optional".into()))
                }
            }
            opt.encode_to_vec()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use qgraph_ir::{DataType, TensorType};

    fn seq_type() -> ValueType {
        ValueType::Sequence(Box::new(ValueType::Tensor(TensorType {
            dtype: Some(DataType::F32),
            shape: None,
        })))
    }

    #[test]
    fn sequences_and_optionals_round_trip() {
        let a = Tensor::f32(&[2], vec![1.0, 2.0]).unwrap();
        let b = Tensor::i64_vector(vec![3, 4, 5]);
        let seq = Data::Sequence(vec![a.clone(), b]);
        let bytes = encode_data("s", &seq).unwrap();
        assert_eq!(
            decode_data(&bytes, Some(&seq_type())).unwrap(),
            ("s".into(), seq)
        );
        let opt_type = ValueType::Optional(Box::new(seq_type()));
        for opt in [
            Data::Optional(None),
            Data::Optional(Some(Box::new(Data::Tensor(a.clone())))),
            Data::Optional(Some(Box::new(Data::Sequence(vec![])))),
        ] {
            let bytes = encode_data("", &opt).unwrap();
            assert_eq!(decode_data(&bytes, Some(&opt_type)).unwrap().1, opt);
        }
        let empty = encode_data("", &Data::Sequence(vec![])).unwrap();
        assert_eq!(
            decode_data(&empty, Some(&seq_type())).unwrap().1,
            Data::Sequence(vec![])
        );
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(decode_data(&[0xff, 0xff, 0xff], Some(&seq_type())).is_err());
    }
}
