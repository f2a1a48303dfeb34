//! Typed tensors on `ndarray`, and their little-endian byte layout.
//!
//! The byte layout is the one ONNX uses for `raw_data` (fixed-width
//! little-endian elements, sub-byte types packed low bits first); it is not
//! protobuf, so it lives here, next to the types it describes.

use crate::DataType;
use half::{bf16, f16};
use ndarray::{ArrayD, IxDyn};
use std::fmt;

#[cfg(target_endian = "big")]
compile_error!("qgraph assumes a little-endian target (ONNX data is little-endian)");

/// A tensor value: initializer data, or a tensor attribute.
///
/// Types with a native Rust element are `ndarray` arrays. Sub-byte types
/// (int4, uint4, int2, uint2, float4), float6, float8 and complex types are
/// kept in their packed ONNX byte layout ([`PackedTensor`]). [`Tensor::Elided`]
/// stands for data a text form left out (it has a digest, not values).
///
/// Equality is bitwise: same type, same shape, same bytes (so NaN == NaN
/// when the bits match, and 0.0 != -0.0).
#[derive(Clone, Debug)]
pub enum Tensor {
    F32(ArrayD<f32>),
    F64(ArrayD<f64>),
    F16(ArrayD<f16>),
    BF16(ArrayD<bf16>),
    I8(ArrayD<i8>),
    I16(ArrayD<i16>),
    I32(ArrayD<i32>),
    I64(ArrayD<i64>),
    U8(ArrayD<u8>),
    U16(ArrayD<u16>),
    U32(ArrayD<u32>),
    U64(ArrayD<u64>),
    Bool(ArrayD<bool>),
    /// ONNX strings are byte strings (UTF-8 by convention, not by rule).
    String(ArrayD<Vec<u8>>),
    Packed(PackedTensor),
    Elided(ElidedTensor),
}

/// A tensor kept in its packed ONNX byte layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedTensor {
    dtype: DataType,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// A tensor whose values were left out of a text form: type, shape and a
/// content digest only. It can be printed and compared, not computed with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElidedTensor {
    pub dtype: DataType,
    pub shape: Vec<usize>,
    pub digest: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TensorError {
    #[error(
        "{dtype}{} needs {expected} bytes of data, found {found}",
        ShapeFmt(shape)
    )]
    ByteLength {
        dtype: DataType,
        shape: Vec<usize>,
        expected: usize,
        found: usize,
    },
    #[error(
        "shape {} has more elements than this machine can address",
        ShapeFmt(shape)
    )]
    TooLarge { shape: Vec<usize> },
    #[error("{dtype}{} needs {expected} values, found {found}", ShapeFmt(shape))]
    Count {
        dtype: DataType,
        shape: Vec<usize>,
        expected: usize,
        found: usize,
    },
    #[error("value {value} is out of range for {dtype}")]
    OutOfRange { dtype: DataType, value: String },
    #[error("{dtype} values cannot be built from {from}")]
    WrongKind { dtype: DataType, from: &'static str },
    #[error(
        "tensor data was elided (a text form printed without weights): its values are unknown"
    )]
    Elided,
}

/// Formats a shape as `[2,3]`.
pub struct ShapeFmt<'a>(pub &'a [usize]);

impl fmt::Display for ShapeFmt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// Number of elements of a shape; `None` when the shape is too large to
/// address. ndarray also refuses shapes whose non-zero dims multiply past
/// `isize::MAX` even when another dim is 0, so those are refused too (with
/// room for the widest element).
pub fn element_count(shape: &[usize]) -> Option<usize> {
    const LIMIT: usize = isize::MAX as usize / 32;
    let nonzero = shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
    if nonzero > LIMIT {
        return None;
    }
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

fn checked_count(shape: &[usize]) -> Result<usize, TensorError> {
    element_count(shape).ok_or_else(|| TensorError::TooLarge {
        shape: shape.to_vec(),
    })
}

fn array<T>(shape: &[usize], values: Vec<T>) -> ArrayD<T> {
    // Callers check `values.len()` against the shape first.
    ArrayD::from_shape_vec(IxDyn(shape), values).expect("element count checked by caller")
}

fn pod_from_le<T: bytemuck::Pod>(shape: &[usize], bytes: &[u8]) -> ArrayD<T> {
    array(shape, bytemuck::pod_collect_to_vec(bytes))
}

fn pod_to_le<T: bytemuck::Pod>(a: &ArrayD<T>, out: &mut Vec<u8>) {
    match a.as_slice() {
        Some(s) => out.extend_from_slice(bytemuck::cast_slice(s)),
        None => {
            for x in a.iter() {
                out.extend_from_slice(bytemuck::bytes_of(x));
            }
        }
    }
}

/// Applies `$body` to the array inside every fixed-width `ndarray` variant.
macro_rules! with_pod_array {
    ($t:expr, $a:ident => $body:expr, $other:pat => $otherwise:expr) => {
        match $t {
            Tensor::F32($a) => $body,
            Tensor::F64($a) => $body,
            Tensor::F16($a) => $body,
            Tensor::BF16($a) => $body,
            Tensor::I8($a) => $body,
            Tensor::I16($a) => $body,
            Tensor::I32($a) => $body,
            Tensor::I64($a) => $body,
            Tensor::U8($a) => $body,
            Tensor::U16($a) => $body,
            Tensor::U32($a) => $body,
            Tensor::U64($a) => $body,
            $other => $otherwise,
        }
    };
}

impl Tensor {
    pub fn dtype(&self) -> DataType {
        match self {
            Tensor::F32(_) => DataType::F32,
            Tensor::F64(_) => DataType::F64,
            Tensor::F16(_) => DataType::F16,
            Tensor::BF16(_) => DataType::BF16,
            Tensor::I8(_) => DataType::I8,
            Tensor::I16(_) => DataType::I16,
            Tensor::I32(_) => DataType::I32,
            Tensor::I64(_) => DataType::I64,
            Tensor::U8(_) => DataType::U8,
            Tensor::U16(_) => DataType::U16,
            Tensor::U32(_) => DataType::U32,
            Tensor::U64(_) => DataType::U64,
            Tensor::Bool(_) => DataType::Bool,
            Tensor::String(_) => DataType::String,
            Tensor::Packed(p) => p.dtype,
            Tensor::Elided(e) => e.dtype,
        }
    }

    pub fn shape(&self) -> &[usize] {
        with_pod_array!(self, a => a.shape(), t => match t {
            Tensor::Bool(a) => a.shape(),
            Tensor::String(a) => a.shape(),
            Tensor::Packed(p) => &p.shape,
            Tensor::Elided(e) => &e.shape,
            _ => unreachable!("fixed-width variants handled above"),
        })
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        // A tensor that exists has an addressable element count.
        element_count(self.shape()).unwrap_or(usize::MAX)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_elided(&self) -> bool {
        matches!(self, Tensor::Elided(_))
    }

    /// Builds a tensor from its little-endian byte layout (ONNX `raw_data`).
    pub fn from_le_bytes(
        dtype: DataType,
        shape: &[usize],
        bytes: &[u8],
    ) -> Result<Tensor, TensorError> {
        let count = checked_count(shape)?;
        let expected = dtype.packed_len(count).ok_or(TensorError::WrongKind {
            dtype,
            from: "raw bytes",
        })?;
        if bytes.len() != expected {
            return Err(TensorError::ByteLength {
                dtype,
                shape: shape.to_vec(),
                expected,
                found: bytes.len(),
            });
        }
        Ok(match dtype {
            DataType::F32 => Tensor::F32(pod_from_le(shape, bytes)),
            DataType::F64 => Tensor::F64(pod_from_le(shape, bytes)),
            DataType::F16 => Tensor::F16(pod_from_le(shape, bytes)),
            DataType::BF16 => Tensor::BF16(pod_from_le(shape, bytes)),
            DataType::I8 => Tensor::I8(pod_from_le(shape, bytes)),
            DataType::I16 => Tensor::I16(pod_from_le(shape, bytes)),
            DataType::I32 => Tensor::I32(pod_from_le(shape, bytes)),
            DataType::I64 => Tensor::I64(pod_from_le(shape, bytes)),
            DataType::U8 => Tensor::U8(pod_from_le(shape, bytes)),
            DataType::U16 => Tensor::U16(pod_from_le(shape, bytes)),
            DataType::U32 => Tensor::U32(pod_from_le(shape, bytes)),
            DataType::U64 => Tensor::U64(pod_from_le(shape, bytes)),
            DataType::Bool => Tensor::Bool(array(shape, bytes.iter().map(|&b| b != 0).collect())),
            DataType::String => unreachable!("strings have no packed length"),
            _ => Tensor::Packed(PackedTensor::new(dtype, shape, bytes.to_vec())?),
        })
    }

    /// Size of [`Tensor::write_le_bytes`]'s output, without writing it.
    pub fn le_bytes_len(&self) -> Result<usize, TensorError> {
        match self {
            Tensor::String(_) => Err(TensorError::WrongKind {
                dtype: DataType::String,
                from: "raw bytes",
            }),
            Tensor::Elided(_) => Err(TensorError::Elided),
            t => Ok(t.dtype().packed_len(t.len()).unwrap_or(usize::MAX)),
        }
    }

    /// Appends the little-endian byte layout (ONNX `raw_data`) to `out`.
    pub fn write_le_bytes(&self, out: &mut Vec<u8>) -> Result<(), TensorError> {
        out.reserve(self.le_bytes_len()?);
        with_pod_array!(self, a => pod_to_le(a, out), t => match t {
            Tensor::Bool(a) => out.extend(a.iter().map(|&b| b as u8)),
            Tensor::Packed(p) => out.extend_from_slice(&p.bytes),
            Tensor::String(_) | Tensor::Elided(_) => unreachable!("rejected by le_bytes_len"),
            _ => unreachable!("fixed-width variants handled above"),
        });
        Ok(())
    }

    pub fn to_le_bytes(&self) -> Result<Vec<u8>, TensorError> {
        let mut out = Vec::new();
        self.write_le_bytes(&mut out)?;
        Ok(out)
    }

    pub fn from_strings(shape: &[usize], values: Vec<Vec<u8>>) -> Result<Tensor, TensorError> {
        let count = checked_count(shape)?;
        if values.len() != count {
            return Err(TensorError::Count {
                dtype: DataType::String,
                shape: shape.to_vec(),
                expected: count,
                found: values.len(),
            });
        }
        Ok(Tensor::String(array(shape, values)))
    }

    /// Builds an integer (or bool) tensor, checking every value's range.
    pub fn from_ints(
        dtype: DataType,
        shape: &[usize],
        values: &[i128],
    ) -> Result<Tensor, TensorError> {
        let count = checked_count(shape)?;
        if values.len() != count {
            return Err(TensorError::Count {
                dtype,
                shape: shape.to_vec(),
                expected: count,
                found: values.len(),
            });
        }
        let (lo, hi) = match dtype {
            DataType::Bool => (0, 1),
            d => d.int_range().ok_or(TensorError::WrongKind {
                dtype,
                from: "integers",
            })?,
        };
        if let Some(v) = values.iter().find(|&&v| v < lo || v > hi) {
            return Err(TensorError::OutOfRange {
                dtype,
                value: v.to_string(),
            });
        }
        macro_rules! cast {
            ($t:ty) => {
                array(shape, values.iter().map(|&v| v as $t).collect())
            };
        }
        Ok(match dtype {
            DataType::I8 => Tensor::I8(cast!(i8)),
            DataType::I16 => Tensor::I16(cast!(i16)),
            DataType::I32 => Tensor::I32(cast!(i32)),
            DataType::I64 => Tensor::I64(cast!(i64)),
            DataType::U8 => Tensor::U8(cast!(u8)),
            DataType::U16 => Tensor::U16(cast!(u16)),
            DataType::U32 => Tensor::U32(cast!(u32)),
            DataType::U64 => Tensor::U64(cast!(u64)),
            DataType::Bool => Tensor::Bool(array(shape, values.iter().map(|&v| v != 0).collect())),
            d => {
                let small: Vec<i8> = values.iter().map(|&v| v as i8).collect();
                Tensor::Packed(PackedTensor::from_sub_byte_ints(d, shape, &small)?)
            }
        })
    }

    /// Builds a float tensor (f32, f64, f16, bf16), rounding to the type.
    pub fn from_floats(
        dtype: DataType,
        shape: &[usize],
        values: &[f64],
    ) -> Result<Tensor, TensorError> {
        let count = checked_count(shape)?;
        if values.len() != count {
            return Err(TensorError::Count {
                dtype,
                shape: shape.to_vec(),
                expected: count,
                found: values.len(),
            });
        }
        Ok(match dtype {
            DataType::F32 => Tensor::F32(array(shape, values.iter().map(|&v| v as f32).collect())),
            DataType::F64 => Tensor::F64(array(shape, values.to_vec())),
            DataType::F16 => Tensor::F16(array(
                shape,
                values.iter().map(|&v| f16::from_f64(v)).collect(),
            )),
            DataType::BF16 => Tensor::BF16(array(
                shape,
                values.iter().map(|&v| bf16::from_f64(v)).collect(),
            )),
            _ => {
                return Err(TensorError::WrongKind {
                    dtype,
                    from: "floats",
                })
            }
        })
    }

    /// Every element as f64, for numeric types (sub-byte integers included);
    /// `None` for strings, packed float formats, complex and elided data.
    pub fn to_f64_vec(&self) -> Option<Vec<f64>> {
        macro_rules! conv {
            ($a:expr) => {
                Some($a.iter().map(|&x| x as f64).collect())
            };
        }
        match self {
            Tensor::F32(a) => conv!(a),
            Tensor::F64(a) => conv!(a),
            Tensor::F16(a) => Some(a.iter().map(|x| x.to_f64()).collect()),
            Tensor::BF16(a) => Some(a.iter().map(|x| x.to_f64()).collect()),
            Tensor::I8(a) => conv!(a),
            Tensor::I16(a) => conv!(a),
            Tensor::I32(a) => conv!(a),
            Tensor::I64(a) => conv!(a),
            Tensor::U8(a) => conv!(a),
            Tensor::U16(a) => conv!(a),
            Tensor::U32(a) => conv!(a),
            Tensor::U64(a) => conv!(a),
            Tensor::Bool(a) => Some(a.iter().map(|&b| b as u8 as f64).collect()),
            Tensor::Packed(p) => p
                .unpack_sub_byte_ints()
                .map(|v| v.into_iter().map(f64::from).collect()),
            Tensor::String(_) | Tensor::Elided(_) => None,
        }
    }

    pub fn f32(shape: &[usize], values: Vec<f32>) -> Result<Tensor, TensorError> {
        let count = checked_count(shape)?;
        if values.len() != count {
            return Err(TensorError::Count {
                dtype: DataType::F32,
                shape: shape.to_vec(),
                expected: count,
                found: values.len(),
            });
        }
        Ok(Tensor::F32(array(shape, values)))
    }

    pub fn scalar_f32(v: f32) -> Tensor {
        Tensor::F32(array(&[], vec![v]))
    }

    pub fn i64_vector(values: Vec<i64>) -> Tensor {
        Tensor::I64(array(&[values.len()], values))
    }
}

impl PartialEq for Tensor {
    fn eq(&self, other: &Tensor) -> bool {
        if self.dtype() != other.dtype() || self.shape() != other.shape() {
            return false;
        }
        match (self, other) {
            (Tensor::String(a), Tensor::String(b)) => a == b,
            (Tensor::Elided(a), Tensor::Elided(b)) => a == b,
            (Tensor::Elided(_), _) | (_, Tensor::Elided(_)) => false,
            (a, b) => a.to_le_bytes().ok() == b.to_le_bytes().ok(),
        }
    }
}

impl PackedTensor {
    /// Wraps packed bytes; checks their length against type and shape.
    pub fn new(
        dtype: DataType,
        shape: &[usize],
        bytes: Vec<u8>,
    ) -> Result<PackedTensor, TensorError> {
        let count = checked_count(shape)?;
        let expected = dtype.packed_len(count).ok_or(TensorError::WrongKind {
            dtype,
            from: "raw bytes",
        })?;
        if bytes.len() != expected {
            return Err(TensorError::ByteLength {
                dtype,
                shape: shape.to_vec(),
                expected,
                found: bytes.len(),
            });
        }
        let mut bytes = bytes;
        // Bits past the last element carry nothing; zero them so equal
        // values have equal bytes.
        let used_bits = count * dtype.bits().unwrap_or(8);
        if !used_bits.is_multiple_of(8) {
            if let Some(last) = bytes.last_mut() {
                *last &= (1u8 << (used_bits % 8)) - 1;
            }
        }
        Ok(PackedTensor {
            dtype,
            shape: shape.to_vec(),
            bytes,
        })
    }

    pub fn dtype(&self) -> DataType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Packs int4/uint4/int2/uint2 values, first element in the lowest bits.
    pub fn from_sub_byte_ints(
        dtype: DataType,
        shape: &[usize],
        values: &[i8],
    ) -> Result<PackedTensor, TensorError> {
        let bits = match dtype {
            DataType::I4 | DataType::U4 | DataType::I2 | DataType::U2 => dtype.bits().unwrap_or(8),
            _ => {
                return Err(TensorError::WrongKind {
                    dtype,
                    from: "sub-byte integers",
                })
            }
        };
        let count = checked_count(shape)?;
        if values.len() != count {
            return Err(TensorError::Count {
                dtype,
                shape: shape.to_vec(),
                expected: count,
                found: values.len(),
            });
        }
        let (lo, hi) = dtype.int_range().unwrap_or((0, 0));
        if let Some(v) = values
            .iter()
            .find(|&&v| (v as i128) < lo || (v as i128) > hi)
        {
            return Err(TensorError::OutOfRange {
                dtype,
                value: v.to_string(),
            });
        }
        let per_byte = 8 / bits;
        let mask = (1u8 << bits) - 1;
        let mut bytes = vec![0u8; count.div_ceil(per_byte)];
        for (i, &v) in values.iter().enumerate() {
            bytes[i / per_byte] |= ((v as u8) & mask) << ((i % per_byte) * bits);
        }
        Ok(PackedTensor {
            dtype,
            shape: shape.to_vec(),
            bytes,
        })
    }

    /// Unpacks int4/uint4/int2/uint2 data (sign-extended for signed types);
    /// `None` for the other packed types.
    pub fn unpack_sub_byte_ints(&self) -> Option<Vec<i8>> {
        let signed = matches!(self.dtype, DataType::I4 | DataType::I2);
        let bits = match self.dtype {
            DataType::I4 | DataType::U4 | DataType::I2 | DataType::U2 => self.dtype.bits()?,
            _ => return None,
        };
        let per_byte = 8 / bits;
        let count = element_count(&self.shape)?;
        let mask = (1u8 << bits) - 1;
        Some(
            (0..count)
                .map(|i| {
                    let raw = (self.bytes[i / per_byte] >> ((i % per_byte) * bits)) & mask;
                    if signed && raw & (1 << (bits - 1)) != 0 {
                        (raw as i8) - (1i8 << bits)
                    } else {
                        raw as i8
                    }
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn int4_packs_low_nibble_first() {
        let p = PackedTensor::from_sub_byte_ints(DataType::I4, &[3], &[1, -1, 7]).unwrap();
        assert_eq!(p.bytes(), &[0xF1, 0x07]);
        assert_eq!(p.unpack_sub_byte_ints().unwrap(), vec![1, -1, 7]);
    }

    #[test]
    fn uint2_packs_four_per_byte() {
        let p = PackedTensor::from_sub_byte_ints(DataType::U2, &[5], &[0, 1, 2, 3, 3]).unwrap();
        assert_eq!(p.bytes(), &[0b11_10_01_00, 0b11]);
        assert_eq!(p.unpack_sub_byte_ints().unwrap(), vec![0, 1, 2, 3, 3]);
    }

    #[test]
    fn out_of_range_sub_byte_values_are_refused() {
        assert!(PackedTensor::from_sub_byte_ints(DataType::I4, &[1], &[8]).is_err());
        assert!(PackedTensor::from_sub_byte_ints(DataType::U4, &[1], &[-1]).is_err());
        assert!(Tensor::from_ints(DataType::U8, &[1], &[256]).is_err());
    }

    #[test]
    fn wrong_byte_length_is_an_error_not_a_panic() {
        let e = Tensor::from_le_bytes(DataType::F32, &[2, 3], &[0; 20]).unwrap_err();
        assert_eq!(e.to_string(), "f32[2,3] needs 24 bytes of data, found 20");
        let e = Tensor::from_le_bytes(DataType::F32, &[usize::MAX, 2], &[]).unwrap_err();
        assert!(matches!(e, TensorError::TooLarge { .. }));
        // Zero elements, but the other dims overflow ndarray's limits (found by fuzzing).
        let e = Tensor::from_le_bytes(DataType::F32, &[0, 1 << 40, 1 << 40], &[]).unwrap_err();
        assert!(matches!(e, TensorError::TooLarge { .. }));
    }

    #[test]
    fn equality_is_bitwise() {
        let nan = Tensor::f32(&[1], vec![f32::NAN]).unwrap();
        assert_eq!(nan, nan.clone());
        assert_ne!(Tensor::scalar_f32(0.0), Tensor::scalar_f32(-0.0));
    }

    #[test]
    fn non_contiguous_arrays_serialise_in_logical_order() {
        let a = ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![1f32, 2., 3., 4.]).unwrap();
        let t = Tensor::F32(a.t().to_owned().into_dyn());
        let t2 = Tensor::F32(a.reversed_axes());
        assert_eq!(t.to_le_bytes().unwrap(), t2.to_le_bytes().unwrap());
    }

    fn any_dtype() -> impl Strategy<Value = DataType> {
        proptest::sample::select(
            DataType::ALL
                .iter()
                .copied()
                .filter(|d| *d != DataType::String)
                .collect::<Vec<_>>(),
        )
    }

    proptest! {
        #[test]
        fn le_bytes_round_trip_for_every_fixed_width_type(
            dtype in any_dtype(),
            shape in proptest::collection::vec(0usize..4, 0..4),
            seed in any::<u64>(),
        ) {
            let count = element_count(&shape).unwrap();
            let len = dtype.packed_len(count).unwrap();
            let mut bytes: Vec<u8> = (0..len).map(|i| (seed.rotate_left(i as u32 % 64) as u8) ^ i as u8).collect();
            if dtype == DataType::Bool { bytes.iter_mut().for_each(|b| *b &= 1); }
            let used = count * dtype.bits().unwrap();
            if !used.is_multiple_of(8) { let last = bytes.len() - 1; bytes[last] &= (1u8 << (used % 8)) - 1; }
            let t = Tensor::from_le_bytes(dtype, &shape, &bytes).unwrap();
            prop_assert_eq!(t.dtype(), dtype);
            prop_assert_eq!(t.shape(), &shape[..]);
            prop_assert_eq!(t.to_le_bytes().unwrap(), bytes);
        }

        #[test]
        fn sub_byte_ints_round_trip(dtype in proptest::sample::select(vec![DataType::I4, DataType::U4, DataType::I2, DataType::U2]),
                                    raw in proptest::collection::vec(any::<i8>(), 0..40)) {
            let (lo, hi) = dtype.int_range().unwrap();
            let span = (hi - lo + 1) as i16;
            let values: Vec<i8> = raw.iter().map(|&v| ((v as i16).rem_euclid(span) + lo as i16) as i8).collect();
            let p = PackedTensor::from_sub_byte_ints(dtype, &[values.len()], &values).unwrap();
            prop_assert_eq!(p.unpack_sub_byte_ints().unwrap(), values);
        }
    }
}
