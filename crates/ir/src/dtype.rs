//! Element types of tensors, as ONNX defines them.

use std::fmt;

/// An ONNX tensor element type. Every type the ONNX spec (IR 14) defines is
/// here, so a model is never refused for a type it merely carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DataType {
    F32,
    U8,
    I8,
    U16,
    I16,
    I32,
    I64,
    String,
    Bool,
    F16,
    F64,
    U32,
    U64,
    C64,
    C128,
    BF16,
    F8E4M3FN,
    F8E4M3FNUZ,
    F8E5M2,
    F8E5M2FNUZ,
    U4,
    I4,
    F4E2M1,
    F8E8M0,
    U2,
    I2,
    F6E2M3,
    F6E3M2,
}

impl DataType {
    /// The code ONNX uses for this type (`TensorProto.DataType`), also in
    /// operator attributes such as Cast's `to`.
    pub fn onnx_code(self) -> i32 {
        match self {
            Self::F32 => 1,
            Self::U8 => 2,
            Self::I8 => 3,
            Self::U16 => 4,
            Self::I16 => 5,
            Self::I32 => 6,
            Self::I64 => 7,
            Self::String => 8,
            Self::Bool => 9,
            Self::F16 => 10,
            Self::F64 => 11,
            Self::U32 => 12,
            Self::U64 => 13,
            Self::C64 => 14,
            Self::C128 => 15,
            Self::BF16 => 16,
            Self::F8E4M3FN => 17,
            Self::F8E4M3FNUZ => 18,
            Self::F8E5M2 => 19,
            Self::F8E5M2FNUZ => 20,
            Self::U4 => 21,
            Self::I4 => 22,
            Self::F4E2M1 => 23,
            Self::F8E8M0 => 24,
            Self::U2 => 25,
            Self::I2 => 26,
            Self::F6E2M3 => 27,
            Self::F6E3M2 => 28,
        }
    }

    pub fn from_onnx_code(code: i32) -> Option<DataType> {
        DataType::ALL.into_iter().find(|d| d.onnx_code() == code)
    }

    pub const ALL: [DataType; 28] = [
        DataType::F32,
        DataType::U8,
        DataType::I8,
        DataType::U16,
        DataType::I16,
        DataType::I32,
        DataType::I64,
        DataType::String,
        DataType::Bool,
        DataType::F16,
        DataType::F64,
        DataType::U32,
        DataType::U64,
        DataType::C64,
        DataType::C128,
        DataType::BF16,
        DataType::F8E4M3FN,
        DataType::F8E4M3FNUZ,
        DataType::F8E5M2,
        DataType::F8E5M2FNUZ,
        DataType::U4,
        DataType::I4,
        DataType::F4E2M1,
        DataType::F8E8M0,
        DataType::U2,
        DataType::I2,
        DataType::F6E2M3,
        DataType::F6E3M2,
    ];

    /// The short name used in the text form and in messages (`f32`, `i4`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DataType::F32 => "f32",
            DataType::U8 => "u8",
            DataType::I8 => "i8",
            DataType::U16 => "u16",
            DataType::I16 => "i16",
            DataType::I32 => "i32",
            DataType::I64 => "i64",
            DataType::String => "string",
            DataType::Bool => "bool",
            DataType::F16 => "f16",
            DataType::F64 => "f64",
            DataType::U32 => "u32",
            DataType::U64 => "u64",
            DataType::C64 => "c64",
            DataType::C128 => "c128",
            DataType::BF16 => "bf16",
            DataType::F8E4M3FN => "f8e4m3fn",
            DataType::F8E4M3FNUZ => "f8e4m3fnuz",
            DataType::F8E5M2 => "f8e5m2",
            DataType::F8E5M2FNUZ => "f8e5m2fnuz",
            DataType::U4 => "u4",
            DataType::I4 => "i4",
            DataType::F4E2M1 => "f4e2m1",
            DataType::F8E8M0 => "f8e8m0",
            DataType::U2 => "u2",
            DataType::I2 => "i2",
            DataType::F6E2M3 => "f6e2m3",
            DataType::F6E3M2 => "f6e3m2",
        }
    }

    pub fn from_name(name: &str) -> Option<DataType> {
        DataType::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Bits per element in the packed little-endian layout ONNX uses for
    /// `raw_data`; `None` for strings, which have no fixed width.
    pub fn bits(self) -> Option<usize> {
        Some(match self {
            DataType::String => return None,
            DataType::U2 | DataType::I2 => 2,
            DataType::U4 | DataType::I4 | DataType::F4E2M1 => 4,
            DataType::F6E2M3 | DataType::F6E3M2 => 6,
            DataType::U8
            | DataType::I8
            | DataType::Bool
            | DataType::F8E4M3FN
            | DataType::F8E4M3FNUZ
            | DataType::F8E5M2
            | DataType::F8E5M2FNUZ
            | DataType::F8E8M0 => 8,
            DataType::U16 | DataType::I16 | DataType::F16 | DataType::BF16 => 16,
            DataType::F32 | DataType::I32 | DataType::U32 => 32,
            DataType::F64 | DataType::I64 | DataType::U64 | DataType::C64 => 64,
            DataType::C128 => 128,
        })
    }

    /// Bytes needed for `count` elements in the packed layout, or `None` on
    /// overflow or for strings.
    pub fn packed_len(self, count: usize) -> Option<usize> {
        let bits = self.bits()?;
        Some(count.checked_mul(bits)?.div_ceil(8))
    }

    /// Sub-byte integer types, stored packed (low bits first).
    pub fn is_sub_byte_int(self) -> bool {
        matches!(
            self,
            DataType::U4 | DataType::I4 | DataType::U2 | DataType::I2
        )
    }

    pub fn is_float(self) -> bool {
        matches!(
            self,
            DataType::F32
                | DataType::F64
                | DataType::F16
                | DataType::BF16
                | DataType::F8E4M3FN
                | DataType::F8E4M3FNUZ
                | DataType::F8E5M2
                | DataType::F8E5M2FNUZ
                | DataType::F8E8M0
                | DataType::F4E2M1
                | DataType::F6E2M3
                | DataType::F6E3M2
        )
    }

    /// Value range of integer types (sub-byte ones included).
    pub fn int_range(self) -> Option<(i128, i128)> {
        Some(match self {
            DataType::U2 => (0, 3),
            DataType::I2 => (-2, 1),
            DataType::U4 => (0, 15),
            DataType::I4 => (-8, 7),
            DataType::U8 => (0, u8::MAX as i128),
            DataType::I8 => (i8::MIN as i128, i8::MAX as i128),
            DataType::U16 => (0, u16::MAX as i128),
            DataType::I16 => (i16::MIN as i128, i16::MAX as i128),
            DataType::U32 => (0, u32::MAX as i128),
            DataType::I32 => (i32::MIN as i128, i32::MAX as i128),
            DataType::U64 => (0, u64::MAX as i128),
            DataType::I64 => (i64::MIN as i128, i64::MAX as i128),
            _ => return None,
        })
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        for d in DataType::ALL {
            assert_eq!(DataType::from_name(d.name()), Some(d));
        }
        let mut names: Vec<_> = DataType::ALL.iter().map(|d| d.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), DataType::ALL.len());
    }

    #[test]
    fn packed_lengths_follow_the_onnx_layout() {
        assert_eq!(DataType::I4.packed_len(3), Some(2));
        assert_eq!(DataType::U2.packed_len(5), Some(2));
        assert_eq!(DataType::F6E2M3.packed_len(4), Some(3));
        assert_eq!(DataType::F6E2M3.packed_len(5), Some(4));
        assert_eq!(DataType::C128.packed_len(2), Some(32));
        assert_eq!(DataType::F32.packed_len(usize::MAX), None);
        assert_eq!(DataType::String.packed_len(1), None);
    }
}
