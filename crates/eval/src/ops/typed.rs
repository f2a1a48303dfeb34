//! The element types kernels compute in, and generic helpers over them.
//!
//! Every ONNX type is computed in its own type: f64 in f64, integers with
//! the spec's wrapping and truncating semantics, bool as bool. float16 and
//! bfloat16 are computed as ONNX Runtime computes them: each operation in
//! f32, the result rounded back to the narrow type.
//!
//! A kernel dispatches on the tensor's variant with one of the macros below
//! (`numeric!`, `floating!`, `any_elem!`); each arm pastes the same body
//! with `$a` bound to `&ArrayD<T>` for that arm's `T`, so the body calls
//! generic functions and wraps the result with [`Elem::wrap`].

use crate::{EvalError, OpCtx};
use qgraph_ir::half::{bf16, f16};
use qgraph_ir::ndarray::{ArrayD, ArrayViewD, IxDyn, Zip};
use qgraph_ir::{DataType, Tensor};

/// A type a tensor holds.
pub trait Elem: Clone + Send + Sync + 'static {
    const DTYPE: DataType;
    fn wrap(a: ArrayD<Self>) -> Tensor;
    fn unwrap(t: &Tensor) -> Option<&ArrayD<Self>>;
}

macro_rules! impl_elem {
    ($($t:ty => $v:ident),* $(,)?) => {$(
        impl Elem for $t {
            const DTYPE: DataType = DataType::$v;
            fn wrap(a: ArrayD<Self>) -> Tensor {
                Tensor::$v(a)
            }
            fn unwrap(t: &Tensor) -> Option<&ArrayD<Self>> {
                match t {
                    Tensor::$v(a) => Some(a),
                    _ => None,
                }
            }
        }
    )*};
}

impl_elem!(
    f32 => F32, f64 => F64, f16 => F16, bf16 => BF16,
    i8 => I8, i16 => I16, i32 => I32, i64 => I64,
    u8 => U8, u16 => U16, u32 => U32, u64 => U64,
    bool => Bool, Vec<u8> => String,
);

/// A number: arithmetic as the spec defines it for the type. Integer
/// arithmetic wraps (as C and ONNX Runtime do); integer division truncates
/// toward zero.
pub trait Number: Elem + Copy + PartialOrd + Default + std::fmt::Debug {
    const IS_FLOAT: bool;
    fn zero() -> Self;
    fn one() -> Self;
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    /// `None` for an integer division by zero.
    fn div(self, o: Self) -> Option<Self>;
    fn neg(self) -> Self;
    fn abs(self) -> Self;
    /// The smaller; a NaN operand gives NaN (as numpy's `minimum`).
    fn min_of(self, o: Self) -> Self;
    fn max_of(self, o: Self) -> Self;
    fn is_nan(self) -> bool;
    fn to_f64(self) -> f64;
    /// Rounds (floats) or truncates and wraps (integers), as a C cast does.
    fn from_f64(v: f64) -> Self;
    fn to_i64(self) -> i64;
    fn from_i64(v: i64) -> Self;
    /// The lowest and highest values (−inf and inf for floats).
    fn lowest() -> Self;
    fn highest() -> Self;
}

macro_rules! impl_int {
    ($($t:ty, $signed:expr);* $(;)?) => {$(
        impl Number for $t {
            const IS_FLOAT: bool = false;
            fn zero() -> Self { 0 }
            fn one() -> Self { 1 }
            fn add(self, o: Self) -> Self { self.wrapping_add(o) }
            fn sub(self, o: Self) -> Self { self.wrapping_sub(o) }
            fn mul(self, o: Self) -> Self { self.wrapping_mul(o) }
            fn div(self, o: Self) -> Option<Self> {
                if o == 0 { None } else { Some(self.wrapping_div(o)) }
            }
            #[allow(clippy::bool_comparison)]
            fn neg(self) -> Self { (0 as $t).wrapping_sub(self) }
            fn abs(self) -> Self {
                if $signed && self < (0 as $t) { self.neg() } else { self }
            }
            fn min_of(self, o: Self) -> Self { if o < self { o } else { self } }
            fn max_of(self, o: Self) -> Self { if o > self { o } else { self } }
            fn is_nan(self) -> bool { false }
            fn to_f64(self) -> f64 { self as f64 }
            fn from_f64(v: f64) -> Self {
                // Through i128, wrapping, as C's cast on the values the
                // spec defines (in range); NaN gives 0.
                if v.is_nan() { 0 } else { (v as i128) as $t }
            }
            fn to_i64(self) -> i64 { self as i64 }
            fn from_i64(v: i64) -> Self { v as $t }
            fn lowest() -> Self { <$t>::MIN }
            fn highest() -> Self { <$t>::MAX }
        }
    )*};
}

impl_int!(i8, true; i16, true; i32, true; i64, true; u8, false; u16, false; u32, false; u64, false);

macro_rules! impl_float {
    ($($t:ty),*) => {$(
        impl Number for $t {
            const IS_FLOAT: bool = true;
            fn zero() -> Self { 0.0 }
            fn one() -> Self { 1.0 }
            fn add(self, o: Self) -> Self { self + o }
            fn sub(self, o: Self) -> Self { self - o }
            fn mul(self, o: Self) -> Self { self * o }
            fn div(self, o: Self) -> Option<Self> { Some(self / o) }
            fn neg(self) -> Self { -self }
            fn abs(self) -> Self { self.abs() }
            fn min_of(self, o: Self) -> Self {
                if self.is_nan() || o.is_nan() { <$t>::NAN } else if o < self { o } else { self }
            }
            fn max_of(self, o: Self) -> Self {
                if self.is_nan() || o.is_nan() { <$t>::NAN } else if o > self { o } else { self }
            }
            fn is_nan(self) -> bool { <$t>::is_nan(self) }
            fn to_f64(self) -> f64 { self as f64 }
            fn from_f64(v: f64) -> Self { v as $t }
            fn to_i64(self) -> i64 { self as i64 }
            fn from_i64(v: i64) -> Self { v as $t }
            fn lowest() -> Self { <$t>::NEG_INFINITY }
            fn highest() -> Self { <$t>::INFINITY }
        }
    )*};
}

impl_float!(f32, f64);

macro_rules! impl_half {
    ($($t:ty),*) => {$(
        impl Number for $t {
            const IS_FLOAT: bool = true;
            fn zero() -> Self { <$t>::ZERO }
            fn one() -> Self { <$t>::ONE }
            fn add(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() + o.to_f32()) }
            fn sub(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() - o.to_f32()) }
            fn mul(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() * o.to_f32()) }
            fn div(self, o: Self) -> Option<Self> {
                Some(<$t>::from_f32(self.to_f32() / o.to_f32()))
            }
            fn neg(self) -> Self { -self }
            fn abs(self) -> Self { <$t>::from_f32(self.to_f32().abs()) }
            fn min_of(self, o: Self) -> Self {
                if self.is_nan() || o.is_nan() { <$t>::NAN } else if o < self { o } else { self }
            }
            fn max_of(self, o: Self) -> Self {
                if self.is_nan() || o.is_nan() { <$t>::NAN } else if o > self { o } else { self }
            }
            fn is_nan(self) -> bool { <$t>::is_nan(self) }
            fn to_f64(self) -> f64 { self.to_f64() }
            fn from_f64(v: f64) -> Self { <$t>::from_f64(v) }
            fn to_i64(self) -> i64 { self.to_f32() as i64 }
            fn from_i64(v: i64) -> Self { <$t>::from_f64(v as f64) }
            fn lowest() -> Self { <$t>::NEG_INFINITY }
            fn highest() -> Self { <$t>::INFINITY }
        }
    )*};
}

impl_half!(f16, bf16);

/// A floating type: math functions computed in f32 (f32, f16, bf16, the
/// narrow ones rounded back) or f64.
pub trait Float: Number {
    /// Applies a function given in both precisions.
    fn map(self, f32_fn: impl Fn(f32) -> f32, f64_fn: impl Fn(f64) -> f64) -> Self;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Float for f32 {
    fn map(self, f: impl Fn(f32) -> f32, _: impl Fn(f64) -> f64) -> Self {
        f(self)
    }
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Float for f64 {
    fn map(self, _: impl Fn(f32) -> f32, f: impl Fn(f64) -> f64) -> Self {
        f(self)
    }
    fn from_f32(v: f32) -> Self {
        v as f64
    }
    fn to_f32(self) -> f32 {
        self as f32
    }
}

macro_rules! impl_half_float {
    ($($t:ty),*) => {$(
        impl Float for $t {
            fn map(self, f: impl Fn(f32) -> f32, _: impl Fn(f64) -> f64) -> Self {
                <$t>::from_f32(f(self.to_f32()))
            }
            fn from_f32(v: f32) -> Self { <$t>::from_f32(v) }
            fn to_f32(self) -> f32 { <$t>::to_f32(self) }
        }
    )*};
}

impl_half_float!(f16, bf16);

/// Dispatches `$t` (a `&Tensor`) over the numeric types: `$body` runs with
/// `$a: &ArrayD<T>`; other types are an error naming `$what`.
macro_rules! numeric {
    ($cx:expr, $t:expr, $what:expr, |$a:ident| $body:expr) => {
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
            other => {
                return $cx.err(format!(
                    "{} is {}, which this operator does not take",
                    $what,
                    other.dtype()
                ))
            }
        }
    };
}
pub(crate) use numeric;

/// As [`numeric!`], over the floating types only.
macro_rules! floating {
    ($cx:expr, $t:expr, $what:expr, |$a:ident| $body:expr) => {
        match $t {
            Tensor::F32($a) => $body,
            Tensor::F64($a) => $body,
            Tensor::F16($a) => $body,
            Tensor::BF16($a) => $body,
            other => {
                return $cx.err(format!(
                    "{} is {}, which this operator does not take (it takes floats)",
                    $what,
                    other.dtype()
                ))
            }
        }
    };
}
pub(crate) use floating;

/// As [`numeric!`], over the integer types only.
macro_rules! integer {
    ($cx:expr, $t:expr, $what:expr, |$a:ident| $body:expr) => {
        match $t {
            Tensor::I8($a) => $body,
            Tensor::I16($a) => $body,
            Tensor::I32($a) => $body,
            Tensor::I64($a) => $body,
            Tensor::U8($a) => $body,
            Tensor::U16($a) => $body,
            Tensor::U32($a) => $body,
            Tensor::U64($a) => $body,
            other => {
                return $cx.err(format!(
                    "{} is {}, this operator takes integers",
                    $what,
                    other.dtype()
                ))
            }
        }
    };
}
pub(crate) use integer;

/// As [`numeric!`], over every type a tensor holds as values, bool and
/// string included (for data movement).
macro_rules! any_elem {
    ($cx:expr, $t:expr, $what:expr, |$a:ident| $body:expr) => {
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
            Tensor::String($a) => $body,
            other => {
                return $cx.err(format!(
                    "{} is {}, which this operator does not take",
                    $what,
                    other.dtype()
                ))
            }
        }
    };
}
pub(crate) use any_elem;

/// Input `i` as `&ArrayD<T>`, the type the kernel dispatched on (another
/// input's type): an error naming both types when it differs.
pub fn same_type<'t, T: Elem>(
    cx: &OpCtx,
    inputs: &[Option<&'t Tensor>],
    i: usize,
) -> Result<&'t ArrayD<T>, EvalError> {
    let t = super::input(cx, inputs, i)?;
    match T::unwrap(t) {
        Some(a) => Ok(a),
        None => cx.err(format!(
            "input {i} is {}, where {} was expected (the type of the first input)",
            t.dtype(),
            T::DTYPE
        )),
    }
}

/// As [`same_type`], with the type taken from `_like` (an array the kernel
/// already holds), for macro bodies where the type has no name.
pub fn same_as<'t, T: Elem>(
    cx: &OpCtx,
    inputs: &[Option<&'t Tensor>],
    i: usize,
    _like: &ArrayD<T>,
) -> Result<&'t ArrayD<T>, EvalError> {
    same_type::<T>(cx, inputs, i)
}

/// The numpy broadcast of several shapes.
pub fn broadcast_shapes(cx: &OpCtx, shapes: &[&[usize]]) -> Result<Vec<usize>, EvalError> {
    let mut out: Vec<usize> = Vec::new();
    for s in shapes {
        match super::elementwise::broadcast_shape(&out, s) {
            Some(b) => out = b,
            None => {
                return cx.err(format!(
                    "shapes {} do not broadcast",
                    shapes
                        .iter()
                        .map(|s| format!("{s:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            }
        }
    }
    Ok(out)
}

/// A view of `a` broadcast to `shape` (checked by the caller).
pub fn broadcast_to<'a, T>(
    cx: &OpCtx,
    a: &'a ArrayD<T>,
    shape: &[usize],
) -> Result<ArrayViewD<'a, T>, EvalError> {
    match a.broadcast(IxDyn(shape)) {
        Some(v) => Ok(v),
        None => cx.err(format!(
            "shape {:?} does not broadcast to {shape:?}",
            a.shape()
        )),
    }
}

/// `f` over two broadcast operands of any types.
pub fn zip2<A: Clone, B: Clone, R>(
    cx: &OpCtx,
    a: &ArrayD<A>,
    b: &ArrayD<B>,
    f: impl Fn(&A, &B) -> R,
) -> Result<ArrayD<R>, EvalError> {
    if a.shape() == b.shape() {
        return Ok(Zip::from(a).and(b).map_collect(|x, y| f(x, y)));
    }
    let shape = broadcast_shapes(cx, &[a.shape(), b.shape()])?;
    let (av, bv) = (broadcast_to(cx, a, &shape)?, broadcast_to(cx, b, &shape)?);
    Ok(Zip::from(&av).and(&bv).map_collect(|x, y| f(x, y)))
}

/// `f` over three broadcast operands of any types (Where, Clip's bounds).
pub fn zip3<A: Clone, B: Clone, C: Clone, R>(
    cx: &OpCtx,
    a: &ArrayD<A>,
    b: &ArrayD<B>,
    c: &ArrayD<C>,
    f: impl Fn(&A, &B, &C) -> R,
) -> Result<ArrayD<R>, EvalError> {
    let shape = broadcast_shapes(cx, &[a.shape(), b.shape(), c.shape()])?;
    let (av, bv, cv) = (
        broadcast_to(cx, a, &shape)?,
        broadcast_to(cx, b, &shape)?,
        broadcast_to(cx, c, &shape)?,
    );
    Ok(Zip::from(&av)
        .and(&bv)
        .and(&cv)
        .map_collect(|x, y, z| f(x, y, z)))
}

/// Converts a number between types as ONNX's Cast does between these
/// (through f64, which holds every value of the narrower types exactly;
/// i64/u64 to integers directly, so large values keep every bit).
pub fn convert<A: Number, B: Number>(v: A) -> B {
    if A::IS_FLOAT || B::IS_FLOAT {
        B::from_f64(v.to_f64())
    } else {
        B::from_i64(v.to_i64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_arithmetic_rounds_each_operation() {
        let a = f16::from_f32(1.0);
        let b = f16::from_f32(0.0004);
        assert_eq!(
            a.add(b),
            f16::from_f32(1.0 + f16::from_f32(0.0004).to_f32())
        );
        assert_eq!(
            f16::from_f32(65504.0).add(f16::from_f32(65504.0)),
            f16::INFINITY
        );
    }

    #[test]
    fn integers_wrap_and_truncate() {
        assert_eq!(i8::MAX.add(1), i8::MIN);
        assert_eq!((-7i32).div(2), Some(-3));
        assert_eq!(5u8.div(0), None);
        assert_eq!(convert::<f32, i32>(-2.7), -2);
        assert_eq!(convert::<i64, u8>(300), 44);
        assert_eq!(convert::<u64, i64>(u64::MAX), -1);
    }

    #[test]
    fn float_min_max_propagate_nan() {
        assert!(f32::NAN.min_of(1.0).is_nan());
        assert!(1.0f64.max_of(f64::NAN).is_nan());
        assert_eq!(2.0f32.min_of(-1.0), -1.0);
    }
}
