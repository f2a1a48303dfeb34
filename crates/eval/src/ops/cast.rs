//! Type conversion: Cast, CastLike and BitCast between every ONNX tensor
//! type, and QuantizeLinear / DequantizeLinear in every type their
//! versions allow (float8, float4, float6, 2- and 4-bit integers, float16
//! and bfloat16 inputs and scales, blocked scales, `output_dtype`,
//! `precision`, `saturate`).
//!
//! Every value passes through a [`Scalar`]: an exact f64 for the floating
//! types (every float type but f64 itself converts to f64 exactly), an
//! exact i128 for the integer types and bool. Conversions to the narrow
//! float formats round to nearest even from that exact value, once.
//! Native-to-native casts map the array directly, without the detour.
//!
//! Where ONNX leaves the result undefined, the choices follow what the
//! backend tests expect (which is what `ml_dtypes` computes): a float cast
//! to a 2- or 4-bit integer truncates and gives 0 when out of range; NaN
//! cast to float4/float6 gives a zero of the opposite sign. Numbers cast to
//! strings as ONNX Runtime formats them (`%.8g`, `NaN`, `INF`, `-INF`), and
//! strings parse as ONNX Runtime parses them (the longest numeric prefix,
//! `stod`/`stoll` style).

use super::{input, quant, Kernel};
use crate::{EvalError, OpCtx};
use qgraph_ir::half::{bf16, f16};
use qgraph_ir::ndarray::ArrayD;
use qgraph_ir::{DataType, PackedTensor, Tensor};

pub const KERNELS: &[(&str, Kernel)] = &[
    ("Cast", cast),
    ("CastLike", cast_like),
    ("BitCast", bit_cast),
    ("QuantizeLinear", quantize_linear),
    ("DequantizeLinear", dequantize_linear),
];

// ---------------------------------------------------------------------------
// Kernels

/// How values that do not fit a narrow float type convert.
#[derive(Clone, Copy, Debug, PartialEq)]
struct CastOptions {
    /// Out-of-range values (and infinities) become the largest finite value
    /// of a float8 type, rather than its infinity or NaN.
    saturate: bool,
    /// Rounding to float8e8m0 (a power of two).
    round_mode: RoundMode,
}

impl CastOptions {
    const DEFAULT: CastOptions = CastOptions {
        saturate: true,
        round_mode: RoundMode::Up,
    };

    fn of(cx: &OpCtx) -> Result<CastOptions, EvalError> {
        let round_mode = match cx.string_attr("round_mode", "up")?.as_str() {
            "up" => RoundMode::Up,
            "down" => RoundMode::Down,
            "nearest" => RoundMode::Nearest,
            other => {
                return cx.err(format!(
                    "round_mode {other:?} is not one of \"up\", \"down\", \"nearest\""
                ))
            }
        };
        Ok(CastOptions {
            saturate: cx.int_attr("saturate", 1)? != 0,
            round_mode,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum RoundMode {
    Up,
    Down,
    Nearest,
}

fn data_type(cx: &OpCtx, code: i64, what: &str) -> Result<DataType, EvalError> {
    match i32::try_from(code).ok().and_then(DataType::from_onnx_code) {
        Some(t) => Ok(t),
        None => cx.err(format!("{what} {code} is not an ONNX type code")),
    }
}

fn cast(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    let to = type_attr(cx, "to")?;
    Ok(vec![cast_tensor(cx, x, to, CastOptions::of(cx)?)?])
}

fn cast_like(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    let like = input(cx, inputs, 1)?;
    Ok(vec![cast_tensor(
        cx,
        x,
        like.dtype(),
        CastOptions::of(cx)?,
    )?])
}

/// BitCast: the same bytes read as another type of the same width.
fn bit_cast(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    let to = type_attr(cx, "to")?;
    if x.dtype() == DataType::String || to == DataType::String {
        return cx.err("BitCast does not take strings");
    }
    if x.is_elided() {
        return cx.err("the input's data was elided");
    }
    if x.dtype().bits() != to.bits() {
        return cx.err(format!(
            "BitCast from {} to {to}: the types differ in width",
            x.dtype()
        ));
    }
    let bytes = x.to_le_bytes().map_err(|e| op_error(cx, e))?;
    let out = Tensor::from_le_bytes(to, x.shape(), &bytes).map_err(|e| op_error(cx, e))?;
    Ok(vec![out])
}

fn op_error(cx: &OpCtx, e: impl std::fmt::Display) -> EvalError {
    EvalError::Op {
        node: cx.describe(),
        message: e.to_string(),
    }
}

/// The type named by a required attribute (`to`).
fn type_attr(cx: &OpCtx, name: &str) -> Result<DataType, EvalError> {
    if cx.graph.node(cx.node).attr(name).is_none() {
        return cx.err(format!("the attribute `{name}` is required"));
    }
    data_type(cx, cx.int_attr(name, 0)?, &format!("`{name}`"))
}

// ---------------------------------------------------------------------------
// Scalars: the exact value every conversion goes through

#[derive(Clone, Copy, Debug, PartialEq)]
enum Scalar {
    Float(f64),
    Int(i128),
}

impl Scalar {
    fn to_f64(self) -> f64 {
        match self {
            Scalar::Float(v) => v,
            Scalar::Int(n) => n as f64,
        }
    }
}

/// A native element type as a [`Scalar`].
trait ToScalar: Copy {
    fn to_scalar(self) -> Scalar;
}

/// A native element type from a [`Scalar`], as ONNX's Cast converts.
trait FromScalar: Sized + Clone {
    fn wrap_array(a: ArrayD<Self>) -> Tensor;
    fn from_scalar(s: Scalar) -> Self;
    /// Whether a string converts to this type as an integer (`stoll`) or as
    /// a float (`stod`).
    const PARSES_INT: bool;
    const IS_UNSIGNED: bool = false;
}

macro_rules! float_scalar {
    ($($t:ty => $v:ident, |$f:ident| $from_f64:expr, |$n:ident| $from_int:expr, |$s:ident| $to_f64:expr);* $(;)?) => {$(
        impl ToScalar for $t {
            fn to_scalar(self) -> Scalar {
                let $s = self;
                Scalar::Float($to_f64)
            }
        }
        impl FromScalar for $t {
            fn wrap_array(a: ArrayD<Self>) -> Tensor {
                Tensor::$v(a)
            }
            fn from_scalar(s: Scalar) -> Self {
                match s {
                    Scalar::Float($f) => $from_f64,
                    Scalar::Int($n) => $from_int,
                }
            }
            const PARSES_INT: bool = false;
        }
    )*};
}

float_scalar!(
    f32 => F32, |v| v as f32, |n| n as f32, |s| s as f64;
    f64 => F64, |v| v, |n| n as f64, |s| s;
    f16 => F16, |v| f16::from_f64(v), |n| f16::from_f64(n as f64), |s| s.to_f64();
    bf16 => BF16, |v| bf16_of(v), |n| bf16_of(n as f64), |s| s.to_f64();
);

macro_rules! int_scalar {
    ($($t:ty => $v:ident, $unsigned:expr);* $(;)?) => {$(
        impl ToScalar for $t {
            fn to_scalar(self) -> Scalar {
                Scalar::Int(self as i128)
            }
        }
        impl FromScalar for $t {
            fn wrap_array(a: ArrayD<Self>) -> Tensor {
                Tensor::$v(a)
            }
            fn from_scalar(s: Scalar) -> Self {
                match s {
                    // Truncation toward zero, then the low bits (as C's
                    // cast on x86 for values an int holds); NaN gives 0.
                    Scalar::Float(v) => {
                        if v.is_nan() { 0 } else { (v as i128) as $t }
                    }
                    // Out of range: the low bits, two's complement.
                    Scalar::Int(n) => n as $t,
                }
            }
            const PARSES_INT: bool = true;
            const IS_UNSIGNED: bool = $unsigned;
        }
    )*};
}

int_scalar!(
    i8 => I8, false; i16 => I16, false; i32 => I32, false; i64 => I64, false;
    u8 => U8, true; u16 => U16, true; u32 => U32, true; u64 => U64, true;
);

impl ToScalar for bool {
    fn to_scalar(self) -> Scalar {
        Scalar::Int(self as i128)
    }
}

impl FromScalar for bool {
    fn wrap_array(a: ArrayD<Self>) -> Tensor {
        Tensor::Bool(a)
    }
    fn from_scalar(s: Scalar) -> Self {
        match s {
            // NaN is not zero: true.
            Scalar::Float(v) => v != 0.0,
            Scalar::Int(n) => n != 0,
        }
    }
    // As ONNX Runtime (`stoull`): "0.0" is false, "1.9" true, ".5" and
    // "inf" errors.
    const PARSES_INT: bool = true;
    const IS_UNSIGNED: bool = true;
}

/// The bfloat16 nearest `v` (ties to even), rounded once. (`half`'s
/// `bf16::from_f64` misrounds some values whose f32 has sticky bits only
/// in its low half, e.g. f32 bits 0x86308006.)
fn bf16_of(v: f64) -> bf16 {
    let f = v as f32;
    let bits = f.to_bits();
    if f.is_nan() {
        // Quiet, sign kept.
        return bf16::from_bits(((bits >> 16) as u16) | 0x40);
    }
    let upper = (bits >> 16) as u16;
    let lower = bits & 0xFFFF;
    // f rounded v already: when that landed exactly on a bf16 midpoint,
    // round toward v rather than to even (no double rounding).
    if lower == 0x8000 && f as f64 != v && f.is_finite() {
        let away = (v.abs()) > (f.abs() as f64);
        return bf16::from_bits(if away { upper + 1 } else { upper });
    }
    let round_up = lower > 0x8000 || (lower == 0x8000 && upper & 1 == 1);
    // Carrying into the exponent is right: it gives the next binade, or
    // infinity past the largest finite value.
    bf16::from_bits(if round_up { upper + 1 } else { upper })
}

/// Dispatches over the native number types and bool, binding `$a` to the
/// array: the body is generic over `ToScalar` (the source of a cast).
macro_rules! native_source {
    ($t:expr, |$a:ident| $body:expr, $other:pat => $otherwise:expr) => {
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
            Tensor::Bool($a) => $body,
            $other => $otherwise,
        }
    };
}

/// Calls `$f::<T>($($arg),*)` with `T` the native type of `$dtype`, or
/// evaluates `$otherwise` for the types without a native element.
macro_rules! native_target {
    ($dtype:expr, $f:ident($($arg:expr),*), $otherwise:expr) => {
        match $dtype {
            DataType::F32 => $f::<f32>($($arg),*),
            DataType::F64 => $f::<f64>($($arg),*),
            DataType::F16 => $f::<f16>($($arg),*),
            DataType::BF16 => $f::<bf16>($($arg),*),
            DataType::I8 => $f::<i8>($($arg),*),
            DataType::I16 => $f::<i16>($($arg),*),
            DataType::I32 => $f::<i32>($($arg),*),
            DataType::I64 => $f::<i64>($($arg),*),
            DataType::U8 => $f::<u8>($($arg),*),
            DataType::U16 => $f::<u16>($($arg),*),
            DataType::U32 => $f::<u32>($($arg),*),
            DataType::U64 => $f::<u64>($($arg),*),
            DataType::Bool => $f::<bool>($($arg),*),
            _ => $otherwise,
        }
    };
}

fn map_native<B: FromScalar>(a: &ArrayD<impl ToScalar>) -> Option<Tensor> {
    Some(B::wrap_array(a.mapv(|v| B::from_scalar(v.to_scalar()))))
}

fn collect_native<B: FromScalar>(shape: &[usize], values: &[Scalar]) -> Option<Tensor> {
    Some(B::wrap_array(super::array(
        shape,
        values.iter().map(|&s| B::from_scalar(s)).collect(),
    )))
}

/// How a string converts for a target type: as an integer or a float, and
/// whether the integer may be as large as a u64.
fn text_parse_of(to: DataType) -> TextParse {
    fn of<T: FromScalar>() -> TextParse {
        if T::PARSES_INT {
            TextParse::Int {
                unsigned: T::IS_UNSIGNED,
            }
        } else {
            TextParse::Float
        }
    }
    native_target!(
        to,
        of(),
        match to {
            DataType::U4 | DataType::U2 => TextParse::Int { unsigned: true },
            DataType::I4 | DataType::I2 => TextParse::Int { unsigned: false },
            _ => TextParse::Float,
        }
    )
}

#[derive(Clone, Copy)]
enum TextParse {
    Int { unsigned: bool },
    Float,
}

/// Casts a tensor to `to`, as ONNX's Cast.
fn cast_tensor(
    cx: &OpCtx,
    x: &Tensor,
    to: DataType,
    opts: CastOptions,
) -> Result<Tensor, EvalError> {
    if x.is_elided() {
        return cx.err("the input's data was elided");
    }
    if x.dtype() == to {
        return Ok(x.clone());
    }
    if matches!(to, DataType::C64 | DataType::C128)
        || matches!(x.dtype(), DataType::C64 | DataType::C128)
    {
        return cx.err(format!(
            "Cast from {} to {to}: complex types are not supported",
            x.dtype()
        ));
    }
    // Native to native: map the array directly.
    if let Some(t) = native_source!(x, |a| native_target!(to, map_native(a), None), _ => None) {
        return Ok(t);
    }
    let shape = x.shape().to_vec();
    if let Tensor::String(s) = x {
        if to == DataType::String {
            return Ok(x.clone());
        }
        let parse = text_parse_of(to);
        let values = s
            .iter()
            .map(|t| parse_text(cx, t, parse))
            .collect::<Result<Vec<_>, _>>()?;
        return encode(cx, &shape, &values, to, opts);
    }
    let values = scalars(cx, x)?;
    encode(cx, &shape, &values, to, opts)
}

/// Every element of a tensor that has no string in it, in logical order.
fn scalars(cx: &OpCtx, x: &Tensor) -> Result<Vec<Scalar>, EvalError> {
    native_source!(x, |a| Ok(a.iter().map(|v| v.to_scalar()).collect()), t => match t {
        Tensor::Packed(p) => packed_scalars(cx, p),
        t => cx.err(format!("{} values cannot be converted here", t.dtype())),
    })
}

fn packed_scalars(cx: &OpCtx, p: &PackedTensor) -> Result<Vec<Scalar>, EvalError> {
    let dtype = p.dtype();
    if let Some(ints) = p.unpack_sub_byte_ints() {
        return Ok(ints.into_iter().map(|v| Scalar::Int(v as i128)).collect());
    }
    let Some(decode) = float_decoder(dtype) else {
        return cx.err(format!("{dtype} values cannot be converted"));
    };
    Ok(unpack_codes(p)
        .into_iter()
        .map(|c| Scalar::Float(decode(c)))
        .collect())
}

/// Builds a tensor of type `to` from exact values.
fn encode(
    cx: &OpCtx,
    shape: &[usize],
    values: &[Scalar],
    to: DataType,
    opts: CastOptions,
) -> Result<Tensor, EvalError> {
    if let Some(t) = native_target!(to, collect_native(shape, values), None) {
        return Ok(t);
    }
    if to == DataType::String {
        let texts = values.iter().map(|&s| format_scalar(s)).collect();
        return Tensor::from_strings(shape, texts).map_err(|e| op_error(cx, e));
    }
    let codes: Vec<u8> = match to {
        DataType::I4 | DataType::U4 | DataType::I2 | DataType::U2 => {
            let bits = to.bits().unwrap_or(8) as u32;
            let signed = matches!(to, DataType::I4 | DataType::I2);
            values
                .iter()
                .map(|&s| sub_byte_int_code(s, bits, signed))
                .collect()
        }
        DataType::F8E8M0 => values
            .iter()
            .map(|&s| e8m0_code(s.to_f64() as f32, opts.saturate, opts.round_mode))
            .collect(),
        _ => match MiniFloat::of(to) {
            Some(f) => values
                .iter()
                .map(|&s| f.encode(s.to_f64(), opts.saturate))
                .collect(),
            None => return cx.err(format!("Cast to {to} is not supported")),
        },
    };
    let bytes = pack_codes(to, &codes);
    Ok(Tensor::Packed(
        PackedTensor::new(to, shape, bytes).map_err(|e| op_error(cx, e))?,
    ))
}

/// A 2- or 4-bit integer's code: integers keep their low bits (two's
/// complement), as between wider integers; floats truncate toward zero and
/// give 0 when out of range (as ml_dtypes, which the tests follow).
fn sub_byte_int_code(s: Scalar, bits: u32, signed: bool) -> u8 {
    let mask = ((1u16 << bits) - 1) as u8;
    match s {
        Scalar::Int(n) => (n as u8) & mask,
        Scalar::Float(v) => {
            let (lo, hi) = if signed {
                (-(1i64 << (bits - 1)), (1i64 << (bits - 1)) - 1)
            } else {
                (0, (1i64 << bits) - 1)
            };
            let t = v.trunc();
            if t.is_nan() || t < lo as f64 || t > hi as f64 {
                0
            } else {
                (t as i64 as u8) & mask
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Strings

/// A number as ONNX Runtime writes it: `%.8g` for floats (`NaN`, `INF`,
/// `-INF` for the special values), decimal for integers, 1 and 0 for bool.
fn format_scalar(s: Scalar) -> Vec<u8> {
    match s {
        Scalar::Int(n) => n.to_string().into_bytes(),
        Scalar::Float(v) => format_g(v, 8).into_bytes(),
    }
}

/// C's `%.{precision}g`.
fn format_g(v: f64, precision: usize) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v < 0.0 { "-INF" } else { "INF" }.into();
    }
    if v == 0.0 {
        return if v.is_sign_negative() { "-0" } else { "0" }.into();
    }
    let precision = precision.max(1);
    // Rust's `{:e}` rounds the exact value correctly, as glibc's printf.
    let sci = format!("{:.*e}", precision - 1, v);
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if exponent < -4 || exponent >= precision as i32 {
        let sign = if exponent < 0 { '-' } else { '+' };
        format!(
            "{}e{sign}{:02}",
            trim_fraction_zeros(mantissa),
            exponent.unsigned_abs()
        )
    } else {
        let decimals = (precision as i32 - 1 - exponent) as usize;
        trim_fraction_zeros(&format!("{v:.decimals$}")).to_string()
    }
}

fn trim_fraction_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// A string as a number, as ONNX Runtime reads it (`std::stod` or
/// `std::stoll`/`stoull`): leading white space skipped, the longest
/// numeric prefix taken, an error when there is none.
fn parse_text(cx: &OpCtx, text: &[u8], how: TextParse) -> Result<Scalar, EvalError> {
    let s = String::from_utf8_lossy(text);
    let t = s.trim_start();
    let parsed = match how {
        TextParse::Float => parse_float_prefix(t).map(Scalar::Float),
        TextParse::Int { unsigned } => parse_int_prefix(t, unsigned).map(Scalar::Int),
    };
    match parsed {
        Some(v) => Ok(v),
        None => cx.err(format!("cannot read the string {s:?} as a number")),
    }
}

fn parse_float_prefix(t: &str) -> Option<f64> {
    let b = t.as_bytes();
    let mut i = 0;
    if matches!(b.first(), Some(b'+' | b'-')) {
        i = 1;
    }
    let negative = b.first() == Some(&b'-');
    let rest = t[i..].to_ascii_lowercase();
    let sign = if negative { -1.0 } else { 1.0 };
    if rest.starts_with("inf") {
        return Some(sign * f64::INFINITY);
    }
    if rest.starts_with("nan") {
        return Some(f64::NAN);
    }
    if let Some(v) = rest.strip_prefix("0x").and_then(parse_hex_float) {
        return Some(sign * v);
    }
    let digits = |mut j: usize| {
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        j
    };
    let int_end = digits(i);
    let mut end = int_end;
    let mut frac_digits = 0;
    if end < b.len() && b[end] == b'.' {
        let frac_end = digits(end + 1);
        frac_digits = frac_end - end - 1;
        end = frac_end;
    }
    if int_end == i && frac_digits == 0 {
        return None;
    }
    if end < b.len() && (b[end] == b'e' || b[end] == b'E') {
        let mut j = end + 1;
        if j < b.len() && (b[j] == b'+' || b[j] == b'-') {
            j += 1;
        }
        let exp_end = digits(j);
        if exp_end > j {
            end = exp_end;
        }
    }
    let mut number = t[i..end].to_string();
    if number.starts_with('.') {
        number.insert(0, '0');
    }
    // `stod` refuses a number past f64's range, and a nonzero one below
    // its normal range (glibc's ERANGE).
    let nonzero_digits = number
        .split(['e', 'E'])
        .next()
        .is_some_and(|m| m.bytes().any(|c| (b'1'..=b'9').contains(&c)));
    number
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && (*v >= f64::MIN_POSITIVE || !nonzero_digits))
        .map(|v| sign * v)
}

/// The longest hexadecimal float prefix (`strtod`'s `0x1.8p3`), after
/// the `0x`; `None` without a hex digit.
fn parse_hex_float(t: &str) -> Option<f64> {
    let b = t.as_bytes();
    let mut mantissa = 0f64;
    let mut scale = 0i32;
    let mut i = 0;
    let mut seen = false;
    let mut fraction = false;
    while i < b.len() {
        let c = b[i];
        if c == b'.' && !fraction {
            fraction = true;
        } else if let Some(d) = (c as char).to_digit(16) {
            // Exact while the digits fit f64's 53 bits.
            mantissa = mantissa * 16.0 + d as f64;
            if fraction {
                scale -= 4;
            }
            seen = true;
        } else {
            break;
        }
        i += 1;
    }
    if !seen {
        return None;
    }
    if i < b.len() && (b[i] == b'p' || b[i] == b'P') {
        let rest = &t[i + 1..];
        let digits_at = usize::from(rest.starts_with(['+', '-']));
        let end = rest[digits_at..]
            .find(|c: char| !c.is_ascii_digit())
            .map_or(rest.len(), |e| e + digits_at);
        if end > digits_at {
            let exponent: i32 = rest[..end].parse().unwrap_or(if rest.starts_with('-') {
                i32::MIN / 2
            } else {
                i32::MAX / 2
            });
            scale = scale.saturating_add(exponent.clamp(-4000, 4000));
        }
    }
    // Two steps, so that neither power of two overflows on its own.
    let half = scale / 2;
    Some(mantissa * pow2(half) * pow2(scale - half))
}

fn parse_int_prefix(t: &str, unsigned: bool) -> Option<i128> {
    let b = t.as_bytes();
    let mut i = 0;
    let negative = b.first() == Some(&b'-');
    if matches!(b.first(), Some(b'+' | b'-')) {
        i = 1;
    }
    let start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    if i == start {
        return None;
    }
    let magnitude: i128 = t[start..i].parse().ok()?;
    let n = if negative { -magnitude } else { magnitude };
    // stoll refuses what an i64 cannot hold; stoull what a u64 cannot
    // (and negates a negative one, modulo 2^64).
    let fits = if unsigned {
        magnitude <= u64::MAX as i128
    } else {
        n >= i64::MIN as i128 && n <= i64::MAX as i128
    };
    fits.then_some(n)
}

// ---------------------------------------------------------------------------
// Narrow float formats

/// Which special values a narrow float format has.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Specials {
    /// IEEE-like: infinities and NaNs at the top exponent (float8e5m2).
    Ieee,
    /// No infinity; the all-ones code (each sign) is NaN (float8e4m3fn).
    Fn,
    /// No infinity, no negative zero; the code of -0 is the NaN (fnuz).
    Fnuz,
    /// Finite values only (float4e2m1, float6).
    Finite,
}

/// A small binary float format: sign, exponent and mantissa bits.
#[derive(Clone, Copy, Debug, PartialEq)]
struct MiniFloat {
    exponent_bits: u32,
    mantissa_bits: u32,
    bias: i32,
    specials: Specials,
}

impl MiniFloat {
    fn of(dtype: DataType) -> Option<MiniFloat> {
        let (exponent_bits, mantissa_bits, bias, specials) = match dtype {
            DataType::F8E4M3FN => (4, 3, 7, Specials::Fn),
            DataType::F8E4M3FNUZ => (4, 3, 8, Specials::Fnuz),
            DataType::F8E5M2 => (5, 2, 15, Specials::Ieee),
            DataType::F8E5M2FNUZ => (5, 2, 16, Specials::Fnuz),
            DataType::F4E2M1 => (2, 1, 1, Specials::Finite),
            DataType::F6E2M3 => (2, 3, 1, Specials::Finite),
            DataType::F6E3M2 => (3, 2, 3, Specials::Finite),
            _ => return None,
        };
        Some(MiniFloat {
            exponent_bits,
            mantissa_bits,
            bias,
            specials,
        })
    }

    fn sign_bit(self) -> u8 {
        1 << (self.exponent_bits + self.mantissa_bits)
    }

    fn top_exponent(self) -> u32 {
        (1 << self.exponent_bits) - 1
    }

    /// The code (without sign) of the largest finite value.
    fn max_code(self) -> u8 {
        let all = self.sign_bit() - 1;
        match self.specials {
            Specials::Ieee => all - (1 << self.mantissa_bits),
            Specials::Fn => all - 1,
            Specials::Fnuz | Specials::Finite => all,
        }
    }

    fn nan_code(self, negative: bool) -> u8 {
        let sign = if negative { self.sign_bit() } else { 0 };
        match self.specials {
            // The quiet NaN: top mantissa bit set (as ml_dtypes converts
            // the default NaN).
            Specials::Ieee => {
                sign | ((self.top_exponent() as u8) << self.mantissa_bits)
                    | (1 << (self.mantissa_bits - 1))
            }
            Specials::Fn => sign | (self.sign_bit() - 1),
            Specials::Fnuz => self.sign_bit(),
            // No NaN: ml_dtypes gives a zero of the opposite sign.
            Specials::Finite => {
                if negative {
                    0
                } else {
                    self.sign_bit()
                }
            }
        }
    }

    fn decode(self, code: u8) -> f64 {
        let m_bits = self.mantissa_bits;
        let code = code & ((self.sign_bit() << 1).wrapping_sub(1));
        let negative = code & self.sign_bit() != 0;
        let magnitude = code & (self.sign_bit() - 1);
        let exponent = (magnitude >> m_bits) as i32;
        let mantissa = (magnitude & ((1 << m_bits) - 1)) as f64;
        match self.specials {
            Specials::Fnuz if code == self.sign_bit() => return f64::NAN,
            Specials::Fn if magnitude == self.sign_bit() - 1 => return f64::NAN,
            Specials::Ieee if exponent as u32 == self.top_exponent() => {
                return if mantissa != 0.0 {
                    f64::NAN
                } else if negative {
                    f64::NEG_INFINITY
                } else {
                    f64::INFINITY
                };
            }
            _ => {}
        }
        let value = if exponent == 0 {
            mantissa * pow2(1 - self.bias - m_bits as i32)
        } else {
            (1.0 + mantissa * pow2(-(m_bits as i32))) * pow2(exponent - self.bias)
        };
        if negative {
            -value
        } else {
            value
        }
    }

    /// The code nearest `v` (ties to even), by the spec's saturation rules.
    fn encode(self, v: f64, saturate: bool) -> u8 {
        let negative = v.is_sign_negative();
        let sign = if negative { self.sign_bit() } else { 0 };
        if v.is_nan() {
            return self.nan_code(negative);
        }
        let overflow = || -> u8 {
            if saturate || self.specials == Specials::Finite {
                return sign | self.max_code();
            }
            match self.specials {
                Specials::Ieee => sign | ((self.top_exponent() as u8) << self.mantissa_bits),
                Specials::Fn => sign | (self.sign_bit() - 1),
                _ => self.sign_bit(),
            }
        };
        if v.is_infinite() {
            return overflow();
        }
        let magnitude = match self.round_magnitude(v.abs()) {
            Some(m) if m <= self.max_code() => m,
            _ => return overflow(),
        };
        if magnitude == 0 && self.specials == Specials::Fnuz {
            // No negative zero: -0 would be the NaN.
            return 0;
        }
        sign | magnitude
    }

    /// The code of the nearest value to finite `a >= 0` (ties to even);
    /// `None` when past every exponent the format has.
    fn round_magnitude(self, a: f64) -> Option<u8> {
        if a == 0.0 {
            return Some(0);
        }
        let m_bits = self.mantissa_bits as i32;
        let min_exponent = 1 - self.bias;
        let exponent = exponent_of(a).max(min_exponent);
        // Dividing by a power of two is exact; the quotient is below 2^(m+1).
        let quantum = exponent - m_bits;
        let mut q = (a * pow2(-quantum)).round_ties_even() as u64;
        let mut exponent = exponent;
        if q >= 2u64 << m_bits {
            q >>= 1;
            exponent += 1;
        }
        let field = if q < 1u64 << m_bits {
            0 // subnormal
        } else {
            exponent + self.bias
        };
        if field > self.top_exponent() as i32 {
            return None;
        }
        let mantissa = q & ((1u64 << m_bits) - 1);
        Some(((field as u8) << m_bits) | mantissa as u8)
    }
}

/// `2^n`, exactly, for the exponents these formats and f64 reach.
fn pow2(n: i32) -> f64 {
    2f64.powi(n)
}

/// floor(log2(a)) of a finite positive f64.
fn exponent_of(a: f64) -> i32 {
    let bits = a.to_bits();
    let field = ((bits >> 52) & 0x7FF) as i32;
    if field == 0 {
        // Subnormal f64: far below every narrow format's range.
        -1075
    } else {
        field - 1023
    }
}

/// float8e8m0: a power of two, 2^(code - 127); 0xFF is NaN.
fn e8m0_decode(code: u8) -> f64 {
    if code == 0xFF {
        f64::NAN
    } else {
        pow2(code as i32 - 127)
    }
}

/// float8e8m0 from f32, as `onnx.numpy_helper.to_float8e8m0`: the exponent
/// field of the f32, rounded by `mode` (the sign is dropped).
fn e8m0_code(x: f32, saturate: bool, mode: RoundMode) -> u8 {
    let bits = x.to_bits();
    let mut exponent = (bits >> 23) & 0xFF;
    if exponent == 0xFF {
        return 0xFF;
    }
    let round_up = match mode {
        RoundMode::Nearest => {
            let guard = bits & 0x40_0000 != 0;
            let round = bits & 0x20_0000 != 0;
            let sticky = bits & 0x1F_FFFF != 0;
            let lsb = exponent > 0;
            guard && (round || sticky || lsb)
        }
        RoundMode::Up => bits & 0x7F_FFFF != 0,
        RoundMode::Down => false,
    };
    if round_up && !(saturate && exponent == 0xFE) {
        exponent += 1;
    }
    exponent as u8
}

/// The function giving a packed float type's value of each code.
fn float_decoder(dtype: DataType) -> Option<Box<dyn Fn(u8) -> f64>> {
    if dtype == DataType::F8E8M0 {
        return Some(Box::new(e8m0_decode));
    }
    let f = MiniFloat::of(dtype)?;
    // A table: at most 256 codes.
    let table: Vec<f64> = (0..=255u8).map(|c| f.decode(c)).collect();
    Some(Box::new(move |c| table[c as usize]))
}

/// The codes of a packed tensor's elements (low bits first, as ONNX packs
/// them: element `i` at bits `[i*b, (i+1)*b)` of the little-endian bytes).
fn unpack_codes(p: &PackedTensor) -> Vec<u8> {
    let bits = p.dtype().bits().unwrap_or(8);
    let count = p.shape().iter().product::<usize>();
    let bytes = p.bytes();
    if bits == 8 {
        return bytes[..count.min(bytes.len())].to_vec();
    }
    let mask = (1u16 << bits) - 1;
    (0..count)
        .map(|i| {
            let bit = i * bits;
            let lo = bytes.get(bit / 8).copied().unwrap_or(0) as u16;
            let hi = bytes.get(bit / 8 + 1).copied().unwrap_or(0) as u16;
            (((lo | (hi << 8)) >> (bit % 8)) & mask) as u8
        })
        .collect()
}

fn pack_codes(dtype: DataType, codes: &[u8]) -> Vec<u8> {
    let bits = dtype.bits().unwrap_or(8);
    if bits == 8 {
        return codes.to_vec();
    }
    let mut bytes = vec![0u8; (codes.len() * bits).div_ceil(8)];
    let mask = (1u16 << bits) - 1;
    for (i, &c) in codes.iter().enumerate() {
        let bit = i * bits;
        let v = ((c as u16) & mask) << (bit % 8);
        bytes[bit / 8] |= v as u8;
        if let Some(b) = bytes.get_mut(bit / 8 + 1) {
            *b |= (v >> 8) as u8;
        }
    }
    bytes
}

// ---------------------------------------------------------------------------
// QuantizeLinear and DequantizeLinear

/// Where each element's scale (and zero point) is: one for the tensor, one
/// per index along `axis`, or one per block of `block` along `axis`.
struct ScaleMap {
    per_tensor: bool,
    /// The scale has the input's rank (blocked), rather than one dim.
    blocked: bool,
    axis_dim: usize,
    inner: usize,
    scale_dim: usize,
    block: usize,
}

impl ScaleMap {
    fn new(cx: &OpCtx, shape: &[usize], scale_shape: &[usize]) -> Result<ScaleMap, EvalError> {
        let count: usize = scale_shape.iter().product();
        if count == 1 {
            return Ok(ScaleMap {
                per_tensor: true,
                blocked: false,
                axis_dim: 1,
                inner: 1,
                scale_dim: 1,
                block: 1,
            });
        }
        if shape.is_empty() {
            return cx.err(format!(
                "a scale of shape {scale_shape:?} for a scalar input"
            ));
        }
        let axis = cx.axis(cx.int_attr("axis", 1)?, shape.len())?;
        let block = cx.int_attr("block_size", 0)?;
        let axis_dim = shape[axis];
        let inner: usize = shape[axis + 1..].iter().product();
        if block < 0 {
            return cx.err(format!("block_size {block} is negative"));
        }
        if block == 0 {
            if scale_shape.len() != 1 || scale_shape[0] != axis_dim {
                return cx.err(format!(
                    "a per-axis scale must have {axis_dim} values (axis {axis}), found shape {scale_shape:?}"
                ));
            }
            return Ok(ScaleMap {
                per_tensor: false,
                blocked: false,
                axis_dim,
                inner,
                scale_dim: axis_dim,
                block: 1,
            });
        }
        let block = usize::try_from(block).unwrap_or(usize::MAX);
        let fits = scale_shape.len() == shape.len()
            && scale_shape
                .iter()
                .zip(shape)
                .enumerate()
                .all(|(d, (&s, &x))| {
                    if d == axis {
                        s.checked_mul(block).is_none_or(|covered| covered >= x)
                            && (x == 0 || s.saturating_sub(1).saturating_mul(block) < x)
                    } else {
                        s == x
                    }
                });
        if !fits {
            return cx.err(format!(
                "a blocked scale for shape {shape:?}, axis {axis}, block_size {block} has shape {scale_shape:?}"
            ));
        }
        Ok(ScaleMap {
            per_tensor: false,
            blocked: true,
            axis_dim,
            inner,
            scale_dim: scale_shape[axis],
            block,
        })
    }

    /// The scale index of element `e` (in logical order).
    fn of(&self, e: usize) -> usize {
        if self.per_tensor {
            return 0;
        }
        let along = (e / self.inner) % self.axis_dim;
        if !self.blocked {
            return along;
        }
        let outer = e / (self.inner * self.axis_dim);
        (outer * self.scale_dim + along / self.block) * self.inner + e % self.inner
    }
}

/// The type QuantizeLinear produces: the zero point's, else `output_dtype`,
/// else uint8.
fn quantized_type(cx: &OpCtx, zero_point: Option<&Tensor>) -> Result<DataType, EvalError> {
    let attr = cx.int_attr("output_dtype", 0)?;
    let from_attr = if attr != 0 {
        Some(data_type(cx, attr, "output_dtype")?)
    } else {
        None
    };
    let t = match (zero_point.map(Tensor::dtype), from_attr) {
        (Some(z), Some(a)) if z != a => {
            return cx.err(format!("output_dtype is {a} but the zero point is {z}"))
        }
        (Some(z), _) => z,
        (None, Some(a)) => a,
        (None, None) => DataType::U8,
    };
    if quantized_int_range(t).is_none() && !is_quantized_float(t) {
        return cx.err(format!("{t} is not a type QuantizeLinear produces"));
    }
    Ok(t)
}

fn quantized_int_range(t: DataType) -> Option<(f64, f64)> {
    Some(match t {
        DataType::U8 => (0.0, 255.0),
        DataType::I8 => (-128.0, 127.0),
        DataType::U16 => (0.0, 65535.0),
        DataType::I16 => (-32768.0, 32767.0),
        DataType::U4 => (0.0, 15.0),
        DataType::I4 => (-8.0, 7.0),
        DataType::U2 => (0.0, 3.0),
        DataType::I2 => (-2.0, 1.0),
        _ => return None,
    })
}

fn is_quantized_float(t: DataType) -> bool {
    MiniFloat::of(t).is_some()
}

/// Values of a scale or zero point, exact, as f64.
fn f64_values(cx: &OpCtx, t: &Tensor, what: &str) -> Result<Vec<f64>, EvalError> {
    if matches!(t, Tensor::String(_)) {
        return cx.err(format!("{what} is a string tensor"));
    }
    Ok(scalars(cx, t)?.into_iter().map(Scalar::to_f64).collect())
}

/// `x / scale` computed in `precision`, as the spec defines: both operands
/// rounded to that type, the quotient rounded to it.
fn divide_in(precision: DataType, x: f64, scale: f64) -> f64 {
    match precision {
        DataType::F64 => x / scale,
        DataType::F16 => {
            let q = f16::from_f64(x).to_f32() / f16::from_f64(scale).to_f32();
            f16::from_f32(q).to_f64()
        }
        DataType::BF16 => {
            let q = bf16_of(x).to_f32() / bf16_of(scale).to_f32();
            bf16_of(q as f64).to_f64()
        }
        _ => ((x as f32) / (scale as f32)) as f64,
    }
}

fn quantize_linear(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    let scale = input(cx, inputs, 1)?;
    let zero_point = inputs.get(2).copied().flatten();
    let target = quantized_type(cx, zero_point)?;
    let precision = match cx.int_attr("precision", 0)? {
        0 => match scale.dtype() {
            t @ (DataType::F64 | DataType::F16 | DataType::BF16) => t,
            _ => DataType::F32,
        },
        code => data_type(cx, code, "precision")?,
    };
    if !matches!(
        precision,
        DataType::F32 | DataType::F64 | DataType::F16 | DataType::BF16
    ) {
        return cx.err(format!("precision {precision} is not a float type"));
    }
    // The f32 integer cases are the training kernel's: keep them there.
    if matches!(x, Tensor::F32(_))
        && matches!(scale, Tensor::F32(_))
        && precision == DataType::F32
        && matches!(
            target,
            DataType::U8
                | DataType::I8
                | DataType::U16
                | DataType::I16
                | DataType::U4
                | DataType::I4
        )
        && scale_rank_allowed(cx, scale)?
    {
        return quant::quantize_linear(cx, inputs);
    }
    Ok(vec![quantize(cx, x, scale, zero_point, target, precision)?])
}

/// Before opset 21 a scale is a scalar or a vector.
fn scale_rank_allowed(cx: &OpCtx, scale: &Tensor) -> Result<bool, EvalError> {
    if cx.opset < 21 && scale.shape().len() > 1 {
        return cx.err("the scale must be a scalar or a vector before opset 21");
    }
    Ok(true)
}

fn quantize(
    cx: &OpCtx,
    x: &Tensor,
    scale: &Tensor,
    zero_point: Option<&Tensor>,
    target: DataType,
    precision: DataType,
) -> Result<Tensor, EvalError> {
    scale_rank_allowed(cx, scale)?;
    if matches!(x, Tensor::String(_) | Tensor::Bool(_)) {
        return cx.err(format!("QuantizeLinear does not take {} input", x.dtype()));
    }
    let xs = f64_values(cx, x, "the input")?;
    let scales = f64_values(cx, scale, "the scale")?;
    let zps = zero_point_values(cx, zero_point, scale)?;
    let map = ScaleMap::new(cx, x.shape(), scale.shape())?;
    let q = |e: usize, v: f64| {
        let k = map.of(e);
        (divide_in(precision, v, scales[k]), zps[k])
    };
    let values: Vec<Scalar> = match quantized_int_range(target) {
        Some((lo, hi)) => xs
            .iter()
            .enumerate()
            .map(|(e, &v)| {
                let (r, z) = q(e, v);
                let r = r.round_ties_even() + z;
                // NaN gives the zero point, as the f32 kernel.
                Scalar::Int((if r.is_nan() { z } else { r.clamp(lo, hi) }) as i128)
            })
            .collect(),
        None => xs
            .iter()
            .enumerate()
            .map(|(e, &v)| {
                let (r, z) = q(e, v);
                Scalar::Float(r + z)
            })
            .collect(),
    };
    let opts = CastOptions {
        saturate: cx.int_attr("saturate", 1)? != 0,
        round_mode: RoundMode::Up,
    };
    encode(cx, x.shape(), &values, target, opts)
}

/// The zero point's values (zeros when absent), one per scale value.
fn zero_point_values(
    cx: &OpCtx,
    zero_point: Option<&Tensor>,
    scale: &Tensor,
) -> Result<Vec<f64>, EvalError> {
    let count: usize = scale.shape().iter().product();
    let Some(z) = zero_point else {
        return Ok(vec![0.0; count]);
    };
    let values = f64_values(cx, z, "the zero point")?;
    if values.len() != count {
        return cx.err(format!(
            "the zero point has shape {:?}, the scale {:?}",
            z.shape(),
            scale.shape()
        ));
    }
    Ok(values)
}

fn dequantize_linear(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    let scale = input(cx, inputs, 1)?;
    let zero_point = inputs.get(2).copied().flatten();
    let out_type = match cx.int_attr("output_dtype", 0)? {
        0 => scale.dtype(),
        code => data_type(cx, code, "output_dtype")?,
    };
    if let Some(z) = zero_point {
        if z.dtype() != x.dtype() {
            return cx.err(format!(
                "the zero point is {} but the input is {}",
                z.dtype(),
                x.dtype()
            ));
        }
    }
    let x_is_int = matches!(
        x.dtype(),
        DataType::I8
            | DataType::U8
            | DataType::I16
            | DataType::U16
            | DataType::I32
            | DataType::I4
            | DataType::U4
            | DataType::I2
            | DataType::U2
    );
    if !x_is_int && !is_quantized_float(x.dtype()) {
        return cx.err(format!(
            "DequantizeLinear does not take {} input",
            x.dtype()
        ));
    }
    scale_rank_allowed(cx, scale)?;
    // The f32 integer cases are the training kernel's: keep them there.
    if matches!(scale, Tensor::F32(_))
        && out_type == DataType::F32
        && matches!(
            x.dtype(),
            DataType::I8
                | DataType::U8
                | DataType::I16
                | DataType::U16
                | DataType::I32
                | DataType::I4
                | DataType::U4
        )
    {
        return quant::dequantize_linear(cx, inputs);
    }
    let xs = f64_values(cx, x, "the input")?;
    let scales = f64_values(cx, scale, "the scale")?;
    let zps = zero_point_values(cx, zero_point, scale)?;
    let map = ScaleMap::new(cx, x.shape(), scale.shape())?;
    // The output type is the precision of the product (f32 for the narrow
    // ones, whose products ONNX Runtime computes in f32 and rounds).
    let wide = out_type == DataType::F64;
    let values: Vec<Scalar> = xs
        .iter()
        .enumerate()
        .map(|(e, &v)| {
            let k = map.of(e);
            let d = v - zps[k];
            Scalar::Float(if wide {
                d * scales[k]
            } else {
                ((d as f32) * (scales[k] as f32)) as f64
            })
        })
        .collect();
    Ok(vec![encode(
        cx,
        x.shape(),
        &values,
        out_type,
        CastOptions::DEFAULT,
    )?])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codes_of(dtype: DataType, values: &[f64], saturate: bool) -> Vec<u8> {
        let f = MiniFloat::of(dtype).unwrap();
        values.iter().map(|&v| f.encode(v, saturate)).collect()
    }

    #[test]
    fn float8_e4m3fn_rounds_to_nearest_even_and_saturates() {
        let v = [
            0.0,
            -0.0,
            1.0,
            448.0,
            464.0,
            465.0,
            1e6,
            f64::INFINITY,
            -1e6,
        ];
        assert_eq!(
            codes_of(DataType::F8E4M3FN, &v, true),
            vec![0x00, 0x80, 0x38, 0x7E, 0x7E, 0x7E, 0x7E, 0x7E, 0xFE]
        );
        assert_eq!(
            codes_of(DataType::F8E4M3FN, &v, false),
            vec![0x00, 0x80, 0x38, 0x7E, 0x7E, 0x7F, 0x7F, 0x7F, 0xFF]
        );
        // Smallest subnormal 2^-9; half of it ties to zero, more rounds up.
        assert_eq!(
            codes_of(
                DataType::F8E4M3FN,
                &[pow2(-9), pow2(-10), pow2(-10) * 1.01],
                true
            ),
            vec![0x01, 0x00, 0x01]
        );
    }

    #[test]
    fn float8_special_values_per_format() {
        let v = [f64::NAN, -0.0, f64::INFINITY, -f64::INFINITY];
        assert_eq!(
            codes_of(DataType::F8E4M3FNUZ, &v, false),
            vec![0x80, 0x00, 0x80, 0x80]
        );
        assert_eq!(
            codes_of(DataType::F8E5M2, &v, false),
            vec![0x7E, 0x80, 0x7C, 0xFC]
        );
        assert_eq!(
            codes_of(DataType::F8E5M2, &v, true),
            vec![0x7E, 0x80, 0x7B, 0xFB]
        );
        assert_eq!(
            codes_of(DataType::F8E5M2FNUZ, &v, true),
            vec![0x80, 0x00, 0x7F, 0xFF]
        );
        let f = MiniFloat::of(DataType::F8E5M2FNUZ).unwrap();
        assert_eq!(f.decode(0x7F), 57344.0);
        assert!(f.decode(0x80).is_nan());
        let f = MiniFloat::of(DataType::F8E4M3FNUZ).unwrap();
        assert_eq!(f.decode(0x7F), 240.0);
    }

    #[test]
    fn every_float8_code_round_trips() {
        for dtype in [
            DataType::F8E4M3FN,
            DataType::F8E4M3FNUZ,
            DataType::F8E5M2,
            DataType::F8E5M2FNUZ,
        ] {
            let f = MiniFloat::of(dtype).unwrap();
            for c in 0..=255u8 {
                let v = f.decode(c);
                if v.is_nan() {
                    continue;
                }
                assert_eq!(f.encode(v, false), c, "{dtype} code {c:#x} value {v}");
            }
        }
    }

    #[test]
    fn float4_saturates_and_maps_nan_to_a_zero() {
        let v = [0.25, 0.75, 2.5, 9.0, -8.0, f64::NAN, -f64::NAN, -1e-30];
        assert_eq!(
            codes_of(DataType::F4E2M1, &v, false),
            vec![0x0, 0x2, 0x4, 0x7, 0xF, 0x8, 0x0, 0x8]
        );
        let f = MiniFloat::of(DataType::F4E2M1).unwrap();
        let all: Vec<f64> = (0..16).map(|c| f.decode(c)).collect();
        assert_eq!(&all[..8], &[0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]);
        assert_eq!(MiniFloat::of(DataType::F6E2M3).unwrap().decode(0x1F), 7.5);
        assert_eq!(MiniFloat::of(DataType::F6E3M2).unwrap().decode(0x1F), 28.0);
    }

    #[test]
    fn e8m0_rounding_modes() {
        assert_eq!(e8m0_code(1.0, true, RoundMode::Up), 127);
        assert_eq!(e8m0_code(1.1, true, RoundMode::Up), 128);
        assert_eq!(e8m0_code(1.1, true, RoundMode::Down), 127);
        assert_eq!(e8m0_code(1.6, true, RoundMode::Nearest), 128);
        assert_eq!(e8m0_code(1.4, true, RoundMode::Nearest), 127);
        assert_eq!(e8m0_code(0.0, true, RoundMode::Up), 0);
        assert_eq!(e8m0_code(f32::MAX, true, RoundMode::Up), 254);
        assert_eq!(e8m0_code(f32::MAX, false, RoundMode::Up), 255);
        assert_eq!(e8m0_code(f32::NAN, true, RoundMode::Up), 255);
        assert_eq!(e8m0_decode(127), 1.0);
        assert_eq!(e8m0_decode(0), pow2(-127));
    }

    #[test]
    fn sub_byte_integers_wrap_from_integers_and_zero_from_floats() {
        let int4 = |s| sub_byte_int_code(s, 4, true);
        assert_eq!(int4(Scalar::Int(-9)), 0x7);
        assert_eq!(int4(Scalar::Int(8)), 0x8);
        assert_eq!(int4(Scalar::Float(-9.0)), 0);
        assert_eq!(int4(Scalar::Float(-8.9)), 0x8);
        assert_eq!(int4(Scalar::Float(7.9)), 0x7);
        assert_eq!(sub_byte_int_code(Scalar::Float(-1.0), 2, false), 0);
        assert_eq!(sub_byte_int_code(Scalar::Float(3.0), 2, false), 3);
    }

    #[test]
    fn packing_is_low_bits_first_for_every_width() {
        assert_eq!(pack_codes(DataType::I4, &[1, 0xF, 7]), vec![0xF1, 0x07]);
        assert_eq!(pack_codes(DataType::U2, &[0, 1, 2, 3, 3]), vec![0xE4, 0x03]);
        let six = pack_codes(DataType::F6E2M3, &[0x3F, 0x01, 0x2A, 0x15, 0x07]);
        assert_eq!(six.len(), 4);
        let p = PackedTensor::new(DataType::F6E2M3, &[5], six).unwrap();
        assert_eq!(unpack_codes(&p), vec![0x3F, 0x01, 0x2A, 0x15, 0x07]);
    }

    #[test]
    fn numbers_format_as_percent_8g() {
        let cases = [
            (0.47892547f32 as f64, "0.47892547"),
            (1e-7f32 as f64, "1e-07"),
            (1e16, "1e+16"),
            (123456789.0, "1.2345679e+08"),
            (1e-4f32 as f64, "9.9999997e-05"),
            (1e6, "1000000"),
            (1.0, "1"),
            (-0.0, "-0"),
            (100.5, "100.5"),
            (1e100, "1e+100"),
            (f64::NAN, "NaN"),
            (f64::NEG_INFINITY, "-INF"),
            (9.99999999, "10"),
        ];
        for (v, want) in cases {
            assert_eq!(format_g(v, 8), want, "{v}");
        }
    }

    #[test]
    fn strings_parse_their_numeric_prefix() {
        assert_eq!(parse_float_prefix("1e-5"), Some(1e-5));
        assert_eq!(parse_float_prefix("+INF"), Some(f64::INFINITY));
        assert_eq!(parse_float_prefix("-inf"), Some(f64::NEG_INFINITY));
        assert!(parse_float_prefix("NaN").unwrap().is_nan());
        assert_eq!(parse_float_prefix("12abc"), Some(12.0));
        assert_eq!(parse_float_prefix(".5"), Some(0.5));
        assert_eq!(parse_float_prefix("1E8x"), Some(1e8));
        assert_eq!(parse_float_prefix("2e"), Some(2.0));
        assert_eq!(parse_float_prefix("abc"), None);
        assert_eq!(parse_float_prefix("1e400"), None);
        assert_eq!(parse_float_prefix("1e-310"), None);
        assert_eq!(parse_float_prefix("0e999"), Some(0.0));
        assert_eq!(parse_float_prefix("-0.0"), Some(0.0));
        assert_eq!(parse_float_prefix("0x10"), Some(16.0));
        assert_eq!(parse_float_prefix("-0x1.8p3"), Some(-12.0));
        assert_eq!(parse_float_prefix("0xg"), Some(0.0));
        assert_eq!(parse_float_prefix("."), None);
        assert_eq!(parse_int_prefix("100.5", false), Some(100));
        assert_eq!(parse_int_prefix("-1", true), Some(-1));
        assert_eq!(parse_int_prefix("99999999999999999999", false), None);
        assert_eq!(
            parse_int_prefix("18446744073709551615", true),
            Some(u64::MAX as i128)
        );
        assert_eq!(parse_int_prefix("x", false), None);
    }

    #[test]
    fn native_casts_are_exact_in_f64_and_wrap_integers() {
        let a = ArrayD::from_shape_vec(vec![3], vec![0.1f64, -2.9, 1e300]).unwrap();
        let Some(Tensor::F64(same)) = map_native::<f64>(&a) else {
            panic!()
        };
        assert_eq!(same, a);
        let Some(Tensor::I32(t)) = map_native::<i32>(&a) else {
            panic!()
        };
        assert_eq!(&t.as_slice().unwrap()[..2], &[0, -2]);
        let w = ArrayD::from_shape_vec(vec![3], vec![200i16, -129, 256]).unwrap();
        let Some(Tensor::I8(t)) = map_native::<i8>(&w) else {
            panic!()
        };
        assert_eq!(t.as_slice().unwrap(), &[-56, 127, 0]);
        let big = ArrayD::from_shape_vec(vec![1], vec![u64::MAX]).unwrap();
        let Some(Tensor::F64(t)) = map_native::<f64>(&big) else {
            panic!()
        };
        assert_eq!(t[[0]], 18446744073709551615.0);
        let Some(Tensor::Bool(t)) = map_native::<bool>(
            &ArrayD::from_shape_vec(vec![3], vec![0.0f32, -0.0, f32::NAN]).unwrap(),
        ) else {
            panic!()
        };
        assert_eq!(t.as_slice().unwrap(), &[false, false, true]);
    }

    #[test]
    fn bfloat16_rounds_once_to_nearest_even() {
        let x = f32::from_bits(0x8630_8006) as f64;
        assert_eq!(bf16_of(x).to_bits(), 0x8631);
        assert_eq!(
            bf16_of(f32::from_bits(0x3F80_8000) as f64).to_bits(),
            0x3F80
        );
        assert_eq!(
            bf16_of(f32::from_bits(0x3F81_8000) as f64).to_bits(),
            0x3F82
        );
        // Just above a midpoint in f64, a midpoint in f32: up.
        let above = f32::from_bits(0x3F80_8000) as f64 + 1e-12;
        assert_eq!(bf16_of(above).to_bits(), 0x3F81);
        assert_eq!(bf16_of(f64::MAX).to_bits(), 0x7F80);
        assert_eq!(bf16_of(3.4e38).to_bits(), 0x7F80);
        assert!(bf16_of(f64::NAN).is_nan());
        assert_eq!(bf16_of(-0.0).to_bits(), 0x8000);
    }

    #[test]
    fn division_rounds_in_the_requested_precision() {
        // 2049 is not a float16: it rounds to 2048 before the division.
        assert_eq!(divide_in(DataType::F16, 2049.0, 1.0), 2048.0);
        assert_eq!(divide_in(DataType::F32, 2049.0, 1.0), 2049.0);
        assert_eq!(divide_in(DataType::F64, 1.0, 3.0), 1.0 / 3.0);
    }

    use qgraph_ir::{AttrValue, Graph, NewNode};

    /// Runs one node of `op` with integer attributes on `inputs`.
    fn run(
        op: &str,
        attrs: &[(&str, i64)],
        inputs: &[Option<&Tensor>],
    ) -> Result<Tensor, EvalError> {
        let mut g = Graph::new("test");
        let ins: Vec<_> = (0..inputs.len())
            .map(|i| g.add_input(format!("in{i}"), None).unwrap())
            .collect();
        let out = g.add_value("out", None).unwrap();
        let mut node = NewNode::new(op).inputs(ins).outputs([out]);
        for &(name, v) in attrs {
            node = node.attr(name, AttrValue::Int(v));
        }
        let id = g.add_node(node).unwrap();
        Ok(crate::run_node(&g, id, 25, inputs)?.remove(0))
    }

    fn f32s(shape: &[usize], v: Vec<f32>) -> Tensor {
        Tensor::f32(shape, v).unwrap()
    }

    #[test]
    fn cast_kernel_covers_strings_and_packed_types() {
        let x = f32s(&[4], vec![0.5, -1.0, f32::NAN, 1e-4]);
        let Tensor::String(s) = run("Cast", &[("to", 8)], &[Some(&x)]).unwrap() else {
            panic!()
        };
        let s: Vec<String> = s
            .iter()
            .map(|b| String::from_utf8(b.clone()).unwrap())
            .collect();
        assert_eq!(s, ["0.5", "-1", "NaN", "9.9999997e-05"]);
        let text = Tensor::from_strings(
            &[3],
            vec![b"3.5".to_vec(), b" -2".to_vec(), b"+INF".to_vec()],
        )
        .unwrap();
        let Tensor::F64(v) = run("Cast", &[("to", 11)], &[Some(&text)]).unwrap() else {
            panic!()
        };
        assert_eq!(v.as_slice().unwrap(), &[3.5, -2.0, f64::INFINITY]);
        let ints = Tensor::from_strings(&[2], vec![b"3.5".to_vec(), b" -2".to_vec()]).unwrap();
        let Tensor::I8(v) = run("Cast", &[("to", 3)], &[Some(&ints)]).unwrap() else {
            panic!()
        };
        assert_eq!(v.as_slice().unwrap(), &[3, -2]);
        let bad = Tensor::from_strings(&[1], vec![b"hello".to_vec()]).unwrap();
        assert!(run("Cast", &[("to", 1)], &[Some(&bad)]).is_err());
        // f32 -> int4 -> f32 and f32 -> float8e5m2 -> f32.
        let x = f32s(&[3], vec![-3.7, 7.0, 9.0]);
        let q = run("Cast", &[("to", 22)], &[Some(&x)]).unwrap();
        assert_eq!(q.to_f64_vec().unwrap(), vec![-3.0, 7.0, 0.0]);
        let back = run("Cast", &[("to", 1)], &[Some(&q)]).unwrap();
        assert_eq!(back, f32s(&[3], vec![-3.0, 7.0, 0.0]));
        let e5 = run(
            "Cast",
            &[("to", 19), ("saturate", 0)],
            &[Some(&f32s(&[2], vec![1e6, 0.3]))],
        )
        .unwrap();
        let Tensor::F32(v) = run("Cast", &[("to", 1)], &[Some(&e5)]).unwrap() else {
            panic!()
        };
        assert_eq!(v.as_slice().unwrap(), &[f32::INFINITY, 0.3125]);
        assert!(run("Cast", &[], &[Some(&x)]).is_err());
        assert!(run("Cast", &[("to", 99)], &[Some(&x)]).is_err());
    }

    #[test]
    fn bit_cast_keeps_bits_and_checks_widths() {
        let x = f32s(&[2], vec![1.0, -0.0]);
        let Tensor::I32(v) = run("BitCast", &[("to", 6)], &[Some(&x)]).unwrap() else {
            panic!()
        };
        assert_eq!(v.as_slice().unwrap(), &[0x3F80_0000, i32::MIN]);
        assert!(run("BitCast", &[("to", 7)], &[Some(&x)]).is_err());
    }

    #[test]
    fn general_quantize_agrees_with_the_f32_kernel() {
        let xs: Vec<f32> = crate::ops::test_values(24, 7)
            .iter()
            .map(|v| v * 300.0)
            .collect();
        let x = f32s(&[2, 3, 4], xs);
        let scale = f32s(&[3], vec![0.7, 1.3, 2.9]);
        for (zp, target) in [
            (
                Tensor::U8(ArrayD::from_shape_vec(vec![3], vec![128u8, 3, 250]).unwrap()),
                DataType::U8,
            ),
            (
                Tensor::I16(ArrayD::from_shape_vec(vec![3], vec![-5i16, 0, 9]).unwrap()),
                DataType::I16,
            ),
            (
                Tensor::Packed(
                    PackedTensor::from_sub_byte_ints(DataType::I4, &[3], &[1, -2, 0]).unwrap(),
                ),
                DataType::I4,
            ),
        ] {
            let fast = run("QuantizeLinear", &[], &[Some(&x), Some(&scale), Some(&zp)]).unwrap();
            // Through the general path: the same values in f64 precision
            // (exact quotients of f32 here would differ only at ties).
            let mut g = Graph::new("t");
            let a = g.add_input("x", None).unwrap();
            let b = g.add_input("s", None).unwrap();
            let c = g.add_input("z", None).unwrap();
            let o = g.add_value("y", None).unwrap();
            let id = g
                .add_node(
                    NewNode::new("QuantizeLinear")
                        .inputs([a, b, c])
                        .outputs([o]),
                )
                .unwrap();
            let buffers = Default::default();
            let cx = OpCtx {
                graph: &g,
                node: id,
                opset: 25,
                epilogue: &[],
                added: None,
                input_pads: [0; 4],
                buffers: &buffers,
                captures: &[],
                functions: &[],
            };
            let general = quantize(&cx, &x, &scale, Some(&zp), target, DataType::F32).unwrap();
            assert_eq!(fast, general, "{target}");
            let fast_back = run(
                "DequantizeLinear",
                &[],
                &[Some(&fast), Some(&scale), Some(&zp)],
            )
            .unwrap();
            let half_scale = run("Cast", &[("to", 10)], &[Some(&scale)]).unwrap();
            let Tensor::F16(h) = run(
                "DequantizeLinear",
                &[],
                &[Some(&fast), Some(&half_scale), Some(&zp)],
            )
            .unwrap() else {
                panic!()
            };
            let Tensor::F32(f) = fast_back else { panic!() };
            // The f16 scale differs from the f32 one by its rounding only.
            for (a, b) in f.iter().zip(h.iter()) {
                assert!((a - b.to_f32()).abs() <= a.abs() * 2e-3 + 1e-3, "{a} {b}");
            }
        }
    }

    #[test]
    fn quantize_to_narrow_types_and_back() {
        let x = f32s(&[2, 4], vec![0.0, 2.5, 4.8, 8.6, -4.0, -3.0, 1.0, 2.0]);
        let scale = f32s(&[2], vec![2.0, 1.0]);
        let q = run(
            "QuantizeLinear",
            &[("axis", 0), ("output_dtype", 26)],
            &[Some(&x), Some(&scale)],
        )
        .unwrap();
        assert_eq!(q.dtype(), DataType::I2);
        assert_eq!(
            q.to_f64_vec().unwrap(),
            vec![0.0, 1.0, 1.0, 1.0, -2.0, -2.0, 1.0, 1.0]
        );
        let e4 = run(
            "QuantizeLinear",
            &[("output_dtype", 17)],
            &[Some(&x), Some(&f32s(&[], vec![0.01]))],
        )
        .unwrap();
        let back = run(
            "DequantizeLinear",
            &[],
            &[Some(&e4), Some(&f32s(&[], vec![0.01]))],
        )
        .unwrap();
        let Tensor::F32(v) = back else { panic!() };
        // 200 ties between 192 and 208: to even, 192.
        assert_eq!(v.as_slice().unwrap()[7], 192.0 * 0.01f32);
        // 860 saturates to 448.
        assert_eq!(v.as_slice().unwrap()[3], 448.0 * 0.01f32);
        // Blocked: two scales of two along axis 1.
        let scale = f32s(&[2, 2], vec![1.0, 2.0, 4.0, 8.0]);
        let q = run(
            "QuantizeLinear",
            &[("axis", 1), ("block_size", 2), ("output_dtype", 3)],
            &[Some(&x), Some(&scale)],
        )
        .unwrap();
        let Tensor::I8(v) = q else { panic!() };
        assert_eq!(v.as_slice().unwrap(), &[0, 2, 2, 4, -1, -1, 0, 0]);
        let wrong = f32s(&[2, 3], vec![1.0; 6]);
        assert!(run(
            "QuantizeLinear",
            &[("axis", 1), ("block_size", 2)],
            &[Some(&x), Some(&wrong)]
        )
        .is_err());
    }
}
