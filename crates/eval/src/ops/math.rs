//! Elementwise math in every type the spec allows: unary functions and
//! activations, broadcasting arithmetic, comparisons, logic and bitwise
//! operators, the variadic Max/Min/Sum/Mean, Clip, Dropout.
//!
//! f32 keeps the older fast kernels of `elementwise` and `pointwise` (the
//! fusion plan and the training tape were measured against them); every
//! other type computes here, in its own type.

use super::typed::{
    any_elem, floating, integer, numeric, same_as, same_type, zip2, Elem, Float, Number,
};
use super::{elementwise, fastmath, input, Kernel};
use crate::{EvalError, OpCtx};
use qgraph_ir::ndarray::{ArrayD, IxDyn};
use qgraph_ir::Tensor;
use rayon::prelude::*;

pub const KERNELS: &[(&str, Kernel)] = &[
    ("Abs", abs),
    ("Neg", neg),
    ("Sign", sign),
    ("Sqrt", sqrt),
    ("Exp", exp),
    ("Log", log),
    ("Reciprocal", reciprocal),
    ("Floor", floor),
    ("Ceil", ceil),
    ("Round", round),
    ("Sin", sin),
    ("Cos", cos),
    ("Tan", tan),
    ("Asin", asin),
    ("Acos", acos),
    ("Atan", atan),
    ("Sinh", sinh),
    ("Cosh", cosh),
    ("Asinh", asinh),
    ("Acosh", acosh),
    ("Atanh", atanh),
    ("Erf", erf),
    ("Sigmoid", sigmoid),
    ("Tanh", tanh),
    ("Relu", relu),
    ("LeakyRelu", leaky_relu),
    ("Elu", elu),
    ("Selu", selu),
    ("Celu", celu),
    ("Softplus", softplus),
    ("Softsign", softsign),
    ("Mish", mish),
    ("Swish", swish),
    ("HardSigmoid", hard_sigmoid),
    ("HardSwish", hard_swish),
    ("ThresholdedRelu", thresholded_relu),
    ("Shrink", shrink),
    ("PRelu", prelu),
    ("IsNaN", is_nan),
    ("IsInf", is_inf),
    ("Not", not),
    ("BitwiseNot", bitwise_not),
    ("Add", add),
    ("Sub", sub),
    ("Mul", mul),
    ("Div", div),
    ("Pow", pow),
    ("Mod", modulo),
    ("BitShift", bit_shift),
    ("BitwiseAnd", bitwise_and),
    ("BitwiseOr", bitwise_or),
    ("BitwiseXor", bitwise_xor),
    ("And", and),
    ("Or", or),
    ("Xor", xor),
    ("Equal", equal),
    ("Less", less),
    ("LessOrEqual", less_or_equal),
    ("Greater", greater),
    ("GreaterOrEqual", greater_or_equal),
    ("Max", max),
    ("Min", min),
    ("Sum", sum),
    ("Mean", mean),
    ("Clip", clip),
    ("Identity", identity),
    ("Dropout", dropout),
];

type Out = Result<Vec<Tensor>, EvalError>;

fn is_f32(inputs: &[Option<&Tensor>]) -> bool {
    matches!(inputs.first().copied().flatten(), Some(Tensor::F32(_)))
}

// ---------------------------------------------------------------- unary

fn map_float<T: Float>(a: &ArrayD<T>, f: &impl Fn(f32) -> f32, g: &impl Fn(f64) -> f64) -> Tensor {
    T::wrap(a.mapv(|v| v.map(f, g)))
}

/// A float function given in both precisions, on any float type.
fn unary_float(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    f: impl Fn(f32) -> f32,
    g: impl Fn(f64) -> f64,
) -> Out {
    let x = input(cx, inputs, 0)?;
    Ok(vec![floating!(cx, x, "input 0", |a| map_float(a, &f, &g))])
}

/// Defines a kernel for a float function with an f32 and an f64 form;
/// `$old` names the older f32 kernel to keep for f32.
macro_rules! float_fn {
    ($name:ident, $f:expr, $g:expr) => {
        pub fn $name(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
            unary_float(cx, inputs, $f, $g)
        }
    };
    ($name:ident, $f:expr, $g:expr, old $old:path) => {
        pub fn $name(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
            if is_f32(inputs) {
                return $old(cx, inputs);
            }
            unary_float(cx, inputs, $f, $g)
        }
    };
}

float_fn!(sqrt, f32::sqrt, f64::sqrt, old elementwise::sqrt);
float_fn!(exp, f32::exp, f64::exp, old elementwise::exp);
float_fn!(log, f32::ln, f64::ln, old elementwise::log);
float_fn!(reciprocal, |x| 1.0 / x, |x| 1.0 / x, old elementwise::reciprocal);
float_fn!(floor, f32::floor, f64::floor, old elementwise::floor);
float_fn!(ceil, f32::ceil, f64::ceil, old elementwise::ceil);
float_fn!(round, f32::round_ties_even, f64::round_ties_even);
float_fn!(sin, f32::sin, f64::sin);
float_fn!(cos, f32::cos, f64::cos);
float_fn!(tan, f32::tan, f64::tan);
float_fn!(asin, f32::asin, f64::asin);
float_fn!(acos, f32::acos, f64::acos);
float_fn!(atan, f32::atan, f64::atan);
float_fn!(sinh, f32::sinh, f64::sinh);
float_fn!(cosh, f32::cosh, f64::cosh);
float_fn!(asinh, f32::asinh, f64::asinh);
float_fn!(acosh, f32::acosh, f64::acosh);
float_fn!(atanh, f32::atanh, f64::atanh);
float_fn!(erf_any, libm::erff, libm::erf);

/// Erf: f32 by the vectorized polynomial of `fastmath` (GELU in every
/// transformer layer; libm's scalar `erff` took most of that layer's
/// elementwise time), in parallel blocks; other types by libm.
pub fn erf(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
    let Some(Tensor::F32(x)) = inputs.first().copied().flatten() else {
        return erf_any(cx, inputs);
    };
    let xs = x.as_standard_layout();
    let xs = xs.as_slice().expect("standard layout");
    let mut out = cx.buffers.take(xs.len());
    out.par_chunks_mut(1 << 14)
        .zip(xs.par_chunks(1 << 14))
        .for_each(|(o, x)| fastmath::erf_into(x, o));
    Ok(vec![Tensor::F32(
        ArrayD::from_shape_vec(IxDyn(x.shape()), out).expect("same element count"),
    )])
}
float_fn!(
    sigmoid,
    |x| 1.0 / (1.0 + (-x).exp()),
    |x| 1.0 / (1.0 + (-x).exp()),
    old super::pointwise::kernel
);
float_fn!(tanh, f32::tanh, f64::tanh, old super::pointwise::kernel);
float_fn!(softsign, |x| x / (1.0 + x.abs()), |x| x / (1.0 + x.abs()));

/// `ln(1 + e^x)` without overflow for large `x`.
fn softplus32(x: f32) -> f32 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

fn softplus64(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

float_fn!(softplus, softplus32, softplus64);
float_fn!(mish, |x| x * softplus32(x).tanh(), |x| x * softplus64(x)
    .tanh());

/// An activation with float attributes read once (in f32, as stored; the
/// f64 form widens them).
macro_rules! float_fn_attrs {
    ($name:ident, [$($attr:ident = $default:expr),*], |$x:ident| $body:expr $(, old $old:path)?) => {
        pub fn $name(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
            $(if is_f32(inputs) {
                return $old(cx, inputs);
            })?
            $(let $attr = cx.float_attr(stringify!($attr), $default)?;)*
            unary_float(
                cx,
                inputs,
                |$x: f32| $body,
                |$x: f64| {
                    $(let $attr = $attr as f64;)*
                    $body
                },
            )
        }
    };
}

float_fn_attrs!(elu, [alpha = 1.0], |x| if x < 0.0 {
    alpha * (x.exp() - 1.0)
} else {
    x
});
float_fn_attrs!(
    selu,
    [alpha = 1.673_263_2, gamma = 1.050_701],
    |x| if x <= 0.0 {
        gamma * (alpha * x.exp() - alpha)
    } else {
        gamma * x
    }
);
float_fn_attrs!(celu, [alpha = 1.0], |x| x.max(0.0)
    + (alpha * ((x / alpha).exp() - 1.0)).min(0.0));
float_fn_attrs!(swish, [alpha = 1.0], |x| x / (1.0 + (-alpha * x).exp()));
float_fn_attrs!(hard_sigmoid, [alpha = 0.2, beta = 0.5], |x| (alpha * x + beta)
    .clamp(0.0, 1.0), old super::pointwise::kernel);
float_fn_attrs!(hard_swish, [], |x| x * (x / 6.0 + 0.5).clamp(0.0, 1.0), old super::pointwise::kernel);
float_fn_attrs!(thresholded_relu, [alpha = 1.0], |x| if x > alpha {
    x
} else {
    0.0
});

/// A function of any numeric type.
fn unary_numeric(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    f: impl Fn(&Tensor) -> Result<Tensor, EvalError>,
) -> Out {
    Ok(vec![f(input(cx, inputs, 0)?)?])
}

pub fn abs(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
    if is_f32(inputs) {
        return elementwise::abs(cx, inputs);
    }
    unary_numeric(cx, inputs, |t| {
        Ok(numeric!(cx, t, "input 0", |a| Elem::wrap(
            a.mapv(Number::abs)
        )))
    })
}

pub fn neg(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
    if is_f32(inputs) {
        return elementwise::neg(cx, inputs);
    }
    unary_numeric(cx, inputs, |t| {
        Ok(numeric!(cx, t, "input 0", |a| Elem::wrap(
            a.mapv(Number::neg)
        )))
    })
}

fn signum<T: Number>(v: T) -> T {
    if v.is_nan() {
        v
    } else if v > T::zero() {
        T::one()
    } else if v < T::zero() {
        T::one().neg()
    } else {
        T::zero()
    }
}

pub fn sign(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
    unary_numeric(cx, inputs, |t| {
        Ok(numeric!(cx, t, "input 0", |a| Elem::wrap(a.mapv(signum))))
    })
}

pub fn relu(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
    if is_f32(inputs) {
        return super::pointwise::kernel(cx, inputs);
    }
    unary_numeric(cx, inputs, |t| {
        Ok(numeric!(cx, t, "input 0", |a| Elem::wrap(a.mapv(|v| {
            if v > Number::zero() {
                v
            } else {
                Number::zero()
            }
        }))))
    })
}

pub fn leaky_relu(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
    if is_f32(inputs) {
        return super::pointwise::kernel(cx, inputs);
    }
    let alpha = cx.float_attr("alpha", 0.01)?;
    unary_float(
        cx,
        inputs,
        |x| if x < 0.0 { alpha * x } else { x },
        |x| if x < 0.0 { alpha as f64 * x } else { x },
    )
}

/// Shrink takes every numeric type: computed in f64, converted back.
pub fn shrink(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
    let bias = cx.float_attr("bias", 0.0)? as f64;
    let lambd = cx.float_attr("lambd", 0.5)? as f64;
    let f = move |x: f64| {
        if x < -lambd {
            x + bias
        } else if x > lambd {
            x - bias
        } else {
            0.0
        }
    };
    unary_numeric(cx, inputs, |t| {
        Ok(numeric!(cx, t, "input 0", |a| shrink_array(a, &f)))
    })
}

fn shrink_array<T: Number>(a: &ArrayD<T>, f: &impl Fn(f64) -> f64) -> Tensor {
    T::wrap(a.mapv(|v| T::from_f64(f(v.to_f64()))))
}

pub fn prelu(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
    let x = input(cx, inputs, 0)?;
    Ok(vec![numeric!(cx, x, "input 0", |a| {
        let slope = same_as(cx, inputs, 1, a)?;
        // Before opset 7 a 1-D slope holds one value per channel (axis 1).
        let per_channel;
        let slope = if cx.opset < 7
            && slope.ndim() == 1
            && a.ndim() > 2
            && slope.len() == a.shape()[1]
            && slope.len() > 1
        {
            let mut shape = vec![1; a.ndim() - 1];
            shape[0] = slope.len();
            per_channel = slope
                .clone()
                .into_shape_with_order(IxDyn(&shape))
                .map_err(|e| EvalError::Op {
                    node: cx.describe(),
                    message: e.to_string(),
                })?;
            &per_channel
        } else {
            slope
        };
        Elem::wrap(zip2(cx, a, slope, |&v, &s| {
            if v < Number::zero() {
                v.mul(s)
            } else {
                v
            }
        })?)
    })])
}

pub fn is_nan(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
    let x = input(cx, inputs, 0)?;
    Ok(vec![floating!(cx, x, "input 0", |a| Tensor::Bool(
        a.mapv(Number::is_nan)
    ))])
}

pub fn is_inf(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
    let negative = cx.int_attr("detect_negative", 1)? != 0;
    let positive = cx.int_attr("detect_positive", 1)? != 0;
    let x = input(cx, inputs, 0)?;
    Ok(vec![floating!(cx, x, "input 0", |a| Tensor::Bool(a.mapv(
        |v| {
            let v = v.to_f64();
            (positive && v == f64::INFINITY) || (negative && v == f64::NEG_INFINITY)
        }
    )))])
}

fn bool_input<'t>(
    cx: &OpCtx,
    inputs: &[Option<&'t Tensor>],
    i: usize,
) -> Result<&'t ArrayD<bool>, EvalError> {
    match input(cx, inputs, i)? {
        Tensor::Bool(a) => Ok(a),
        t => cx.err(format!(
            "input {i} is {}, this operator takes bool",
            t.dtype()
        )),
    }
}

pub fn not(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
    Ok(vec![Tensor::Bool(bool_input(cx, inputs, 0)?.mapv(|v| !v))])
}

pub fn bitwise_not(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
    let x = input(cx, inputs, 0)?;
    Ok(vec![integer!(cx, x, "input 0", |a| Elem::wrap(
        a.mapv(|v| !v)
    ))])
}

// --------------------------------------------------------------- binary

fn int_division_by_zero<T>(cx: &OpCtx) -> Result<T, EvalError> {
    cx.err("integer division by zero")
}

/// `f` on two operands of the same numeric type, broadcast.
fn arith<T: Number>(
    cx: &OpCtx,
    a: &ArrayD<T>,
    b: &ArrayD<T>,
    f: impl Fn(T, T) -> Option<T>,
) -> Result<Tensor, EvalError> {
    let r = zip2(cx, a, b, |&x, &y| f(x, y))?;
    if r.iter().any(Option::is_none) {
        return int_division_by_zero(cx);
    }
    Ok(T::wrap(r.mapv(|v| v.unwrap_or_default())))
}

macro_rules! arith_kernel {
    ($name:ident, $old:path, |$x:ident, $y:ident| $body:expr) => {
        pub fn $name(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
            if let (Some(Tensor::F32(_)), Some(Tensor::F32(_))) = (
                inputs.first().copied().flatten(),
                inputs.get(1).copied().flatten(),
            ) {
                return $old(cx, inputs);
            }
            let a = input(cx, inputs, 0)?;
            Ok(vec![numeric!(cx, a, "input 0", |a| {
                let b = same_as(cx, inputs, 1, a)?;
                arith(cx, a, b, |$x, $y| $body)?
            })])
        }
    };
}

arith_kernel!(add, elementwise::add, |x, y| Some(x.add(y)));
arith_kernel!(sub, elementwise::sub, |x, y| Some(x.sub(y)));
arith_kernel!(mul, elementwise::mul, |x, y| Some(x.mul(y)));
arith_kernel!(div, elementwise::div, |x, y| x.div(y));

/// Pow: the result has the base's type; the exponent any numeric type.
/// Integer powers of integers exactly (wrapping); anything with a float
/// in f64 (f32 bases in f32, as ONNX Runtime computes them).
pub fn pow(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
    let base = input(cx, inputs, 0)?;
    let exponent = input(cx, inputs, 1)?;
    if let (Tensor::F32(_), Tensor::F32(_) | Tensor::I64(_) | Tensor::I32(_)) = (base, exponent) {
        return elementwise::pow(cx, inputs);
    }
    Ok(vec![numeric!(cx, base, "the base", |a| numeric!(
        cx,
        exponent,
        "the exponent",
        |b| Elem::wrap(zip2(cx, a, b, |&x, &y| power(x, y))?)
    ))])
}

fn power<T: Number, E: Number>(x: T, y: E) -> T {
    if !T::IS_FLOAT && !E::IS_FLOAT {
        let mut e = y.to_i64();
        if e < 0 {
            // 1/x^|e| truncated: nonzero only for x = ±1.
            let xi = x.to_i64();
            return match xi {
                1 => T::one(),
                -1 => T::from_i64(if e % 2 == 0 { 1 } else { -1 }),
                _ => T::zero(),
            };
        }
        let (mut result, mut b) = (T::one(), x);
        while e > 0 {
            if e & 1 == 1 {
                result = result.mul(b);
            }
            b = b.mul(b);
            e >>= 1;
        }
        return result;
    }
    T::from_f64(x.to_f64().powf(y.to_f64()))
}

/// Mod: `fmod = 1` is C's fmod (the result has the dividend's sign);
/// `fmod = 0` is Python's (the divisor's sign).
pub fn modulo(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
    let c_style = cx.int_attr("fmod", 0)? != 0;
    let a = input(cx, inputs, 0)?;
    Ok(vec![numeric!(cx, a, "input 0", |a| {
        let b = same_as(cx, inputs, 1, a)?;
        arith(cx, a, b, |x, y| remainder(x, y, c_style))?
    })])
}

fn remainder<T: Number>(x: T, y: T, c_style: bool) -> Option<T> {
    if T::IS_FLOAT {
        let (xf, yf) = (x.to_f64(), y.to_f64());
        let mut r = xf % yf;
        if !c_style && r != 0.0 && (r < 0.0) != (yf < 0.0) {
            r += yf;
        }
        return Some(T::from_f64(r));
    }
    if y == T::zero() {
        return None;
    }
    // x - trunc(x / y) * y, in the type (wrapping for MIN % -1).
    let q = x.div(y)?;
    let mut r = x.sub(q.mul(y));
    if !c_style && r != T::zero() && (r < T::zero()) != (y < T::zero()) {
        r = r.add(y);
    }
    Some(r)
}

/// BitShift, as ONNX's reference computes it: a shift by a negative amount
/// or by the width or more gives 0 (a right shift of a negative signed
/// value then gives -1); right shifts of signed values are arithmetic, left
/// shifts work on the bits.
pub fn bit_shift(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
    let left = match cx.string_attr("direction", "")?.as_str() {
        "LEFT" => true,
        "RIGHT" => false,
        d => return cx.err(format!("direction must be LEFT or RIGHT, found '{d}'")),
    };
    macro_rules! shift {
        ($a:expr, $t:ty) => {{
            let b = same_type::<$t>(cx, inputs, 1)?;
            Elem::wrap(zip2(cx, $a, b, |&x, &s| {
                let amount = s as i128;
                if amount < 0 || amount >= <$t>::BITS as i128 {
                    if !left && (x as i128) < 0 {
                        !0
                    } else {
                        0
                    }
                } else if left {
                    x.wrapping_shl(amount as u32)
                } else {
                    x >> amount as u32
                }
            })?)
        }};
    }
    Ok(vec![match input(cx, inputs, 0)? {
        Tensor::U8(a) => shift!(a, u8),
        Tensor::U16(a) => shift!(a, u16),
        Tensor::U32(a) => shift!(a, u32),
        Tensor::U64(a) => shift!(a, u64),
        Tensor::I8(a) => shift!(a, i8),
        Tensor::I16(a) => shift!(a, i16),
        Tensor::I32(a) => shift!(a, i32),
        Tensor::I64(a) => shift!(a, i64),
        t => return cx.err(format!("input 0 is {}, BitShift takes integers", t.dtype())),
    }])
}

macro_rules! bitwise_kernel {
    ($name:ident, $op:tt) => {
        pub fn $name(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
            let a = input(cx, inputs, 0)?;
            Ok(vec![integer!(cx, a, "input 0", |a| {
                let b = same_as(cx, inputs, 1, a)?;
                Elem::wrap(zip2(cx, a, b, |x, y| *x $op *y)?)
            })])
        }
    };
}

bitwise_kernel!(bitwise_and, &);
bitwise_kernel!(bitwise_or, |);
bitwise_kernel!(bitwise_xor, ^);

macro_rules! logic_kernel {
    ($name:ident, $op:tt) => {
        pub fn $name(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
            let a = bool_input(cx, inputs, 0)?;
            let b = bool_input(cx, inputs, 1)?;
            Ok(vec![Tensor::Bool(zip2(cx, a, b, |&x, &y| x $op y)?)])
        }
    };
}

logic_kernel!(and, &);
logic_kernel!(or, |);
logic_kernel!(xor, ^);

/// A comparison of two operands of the same type, broadcast, into bool.
/// Equal takes bool and string too; the order comparisons numbers.
macro_rules! compare_kernel {
    ($name:ident, $dispatch:ident, |$x:ident, $y:ident| $body:expr) => {
        pub fn $name(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
            let a = input(cx, inputs, 0)?;
            Ok(vec![$dispatch!(cx, a, "input 0", |a| {
                let b = same_as(cx, inputs, 1, a)?;
                Tensor::Bool(zip2(cx, a, b, |$x, $y| $body)?)
            })])
        }
    };
}

compare_kernel!(equal, any_elem, |x, y| x == y);
compare_kernel!(less, numeric, |x, y| x < y);
compare_kernel!(less_or_equal, numeric, |x, y| x <= y);
compare_kernel!(greater, numeric, |x, y| x > y);
compare_kernel!(greater_or_equal, numeric, |x, y| x >= y);

// ------------------------------------------------------------- variadic

/// Folds the inputs pairwise with broadcasting.
fn fold_inputs<T: Number>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    first: &ArrayD<T>,
    f: impl Fn(T, T) -> T,
) -> Result<ArrayD<T>, EvalError> {
    let mut acc = first.clone();
    for i in 1..inputs.len() {
        if inputs[i].is_none() {
            continue;
        }
        let b = same_type::<T>(cx, inputs, i)?;
        acc = zip2(cx, &acc, b, |&x, &y| f(x, y))?;
    }
    Ok(acc)
}

pub fn max(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
    let a = input(cx, inputs, 0)?;
    Ok(vec![numeric!(cx, a, "input 0", |a| Elem::wrap(
        fold_inputs(cx, inputs, a, Number::max_of)?
    ))])
}

pub fn min(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
    let a = input(cx, inputs, 0)?;
    Ok(vec![numeric!(cx, a, "input 0", |a| Elem::wrap(
        fold_inputs(cx, inputs, a, Number::min_of)?
    ))])
}

pub fn sum(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
    let a = input(cx, inputs, 0)?;
    Ok(vec![numeric!(cx, a, "input 0", |a| Elem::wrap(
        fold_inputs(cx, inputs, a, Number::add)?
    ))])
}

pub fn mean(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
    let count = inputs.iter().filter(|i| i.is_some()).count();
    let a = input(cx, inputs, 0)?;
    Ok(vec![floating!(cx, a, "input 0", |a| {
        let total = fold_inputs(cx, inputs, a, Number::add)?;
        let n = Number::from_i64(count as i64);
        Elem::wrap(total.mapv(|v: _| Number::div(v, n).unwrap_or(v)))
    })])
}

// ------------------------------------------------------ Clip, Identity

/// Clip: bounds as attributes before opset 11, optional inputs after; an
/// absent bound is the type's extreme.
pub fn clip(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
    if is_f32(inputs) {
        return elementwise::clip(cx, inputs);
    }
    let x = input(cx, inputs, 0)?;
    Ok(vec![numeric!(cx, x, "input 0", |a| {
        let (lo, hi) = clip_bounds(cx, inputs, a)?;
        Elem::wrap(a.mapv(|v| {
            if v.is_nan() {
                v
            } else {
                v.max_of(lo).min_of(hi)
            }
        }))
    })])
}

fn clip_bounds<T: Number>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    _like: &ArrayD<T>,
) -> Result<(T, T), EvalError> {
    if cx.opset < 11 {
        let lo = cx.float_attr("min", f32::NEG_INFINITY)? as f64;
        let hi = cx.float_attr("max", f32::INFINITY)? as f64;
        return Ok((T::from_f64(lo), T::from_f64(hi)));
    }
    let bound = |k: usize, default: T| -> Result<T, EvalError> {
        match inputs.get(k).copied().flatten() {
            None => Ok(default),
            Some(t) => match T::unwrap(t) {
                Some(b) if b.len() == 1 => Ok(*b.iter().next().expect("one element")),
                Some(b) => cx.err(format!(
                    "bound {k} must be a scalar, found shape {:?}",
                    b.shape()
                )),
                None => cx.err(format!(
                    "bound {k} is {}, the input {}",
                    t.dtype(),
                    T::DTYPE
                )),
            },
        }
    };
    Ok((bound(1, T::lowest())?, bound(2, T::highest())?))
}

pub fn identity(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
    Ok(vec![input(cx, inputs, 0)?.clone()])
}

/// Dropout in inference is the identity with an all-true mask. In training
/// mode with a nonzero ratio it draws a random mask, which no seed makes
/// reproducible across runtimes: refused by name.
pub fn dropout(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
    let x = input(cx, inputs, 0)?;
    let training = if cx.opset >= 12 {
        match inputs.get(2).copied().flatten() {
            Some(Tensor::Bool(t)) => t.iter().next().copied().unwrap_or(false),
            Some(t) => return cx.err(format!("training_mode is {}, not bool", t.dtype())),
            None => false,
        }
    } else if cx.opset < 7 {
        cx.int_attr("is_test", 0)? == 0
    } else {
        false
    };
    let ratio = if cx.opset >= 12 {
        match inputs.get(1).copied().flatten() {
            Some(t) => t
                .to_f64_vec()
                .and_then(|v| v.first().copied())
                .unwrap_or(0.5),
            None => 0.5,
        }
    } else {
        cx.float_attr("ratio", 0.5)? as f64
    };
    if training && ratio != 0.0 {
        return cx.err(
            "Dropout in training mode draws a random mask (ratio > 0); qgraph does not run \
             operators whose result is random",
        );
    }
    let mask = if cx.opset >= 10 {
        Tensor::Bool(ArrayD::from_elem(IxDyn(x.shape()), true))
    } else {
        floating!(cx, x, "input 0", |a| ones_like(a))
    };
    Ok(vec![x.clone(), mask])
}

fn ones_like<T: Number>(a: &ArrayD<T>) -> Tensor {
    T::wrap(a.mapv(|_| T::one()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use qgraph_ir::half::{bf16, f16};

    #[test]
    fn python_and_c_remainders() {
        assert_eq!(remainder(-7i32, 3, false), Some(2));
        assert_eq!(remainder(-7i32, 3, true), Some(-1));
        assert_eq!(remainder(7i64, -3, false), Some(-2));
        assert_eq!(remainder(i32::MIN, -1, true), Some(0));
        assert_eq!(remainder(5u8, 0, true), None);
        assert_eq!(remainder(-7.5f64, 2.0, false), Some(0.5));
        assert_eq!(remainder(-7.5f64, 2.0, true), Some(-1.5));
    }

    #[test]
    fn integer_powers_are_exact() {
        assert_eq!(power(3i64, 2i64), 9);
        assert_eq!(power(2i32, 31i64), i32::MIN);
        assert_eq!(power(-1i32, -3i32), -1);
        assert_eq!(power(2i64, -1i64), 0);
        assert_eq!(power(2.0f64, 0.5f32), 2f64.sqrt());
    }

    #[test]
    fn f64_is_computed_in_f64() {
        let x = 0.1f64;
        assert_eq!(x.add(0.2), 0.1 + 0.2);
        assert_eq!(1e300f64.add(1e300), 2e300);
    }

    #[test]
    fn softplus_does_not_overflow() {
        assert_eq!(softplus32(100.0), 100.0);
        assert!((softplus64(0.0) - 2f64.ln()).abs() < 1e-15);
    }

    #[test]
    fn half_types_have_sign() {
        assert_eq!(signum(f16::from_f32(-3.0)), f16::from_f32(-1.0));
        assert_eq!(signum(bf16::from_f32(0.0)), bf16::from_f32(0.0));
        assert_eq!(signum(-5i8), -1);
    }
}
