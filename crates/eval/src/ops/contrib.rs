//! The `com.microsoft` quantized operators ONNX Runtime runs, which
//! integer-only graphs use where the standard set has none: QLinearAdd,
//! QLinearMul, QLinearGlobalAveragePool, QLinearConcat, QLinearSigmoid and
//! QGemm.
//!
//! Each computes what its Q/DQ form computes: the inputs dequantized
//! (`(q - zero) * scale` in f32), the float operator (the evaluator's own
//! kernel, so the summation order is the same), and the result quantized
//! (`saturate(round_half_even(y / scale) + zero)`). ONNX Runtime's kernels
//! compute the same in its own arithmetic (lookup tables, fused scales),
//! which can differ in the last step of a rounding tie; `tools/freeze_check.py`
//! measures that. QGemm accumulates in int32, as MatMulInteger does.

use super::integer::{ints, scales, zero_points};
use super::{array, input};
use crate::{EvalError, OpCtx};
use qgraph_ir::{DataType, Tensor};

/// A per-tensor dequantized copy of an 8-bit tensor.
fn dequantize(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    at: usize,
    what: &str,
) -> Result<Tensor, EvalError> {
    let q = input(cx, inputs, at)?;
    let s = scales(cx, input(cx, inputs, at + 1)?, 1, &format!("{what}_scale"))?;
    let z = zero_points(
        cx,
        inputs.get(at + 2).copied().flatten(),
        1,
        &format!("{what}_zero_point"),
    )?;
    if s.len() != 1 || z.len() != 1 {
        return cx.err(format!("{what}: only per-tensor scales are implemented"));
    }
    let v: Vec<f32> = ints(cx, q, what)?
        .into_iter()
        .map(|v| (v - z[0]) as f32 * s[0])
        .collect();
    Ok(Tensor::F32(array(q.shape(), v)))
}

/// Quantizes `y` per tensor onto the type of `zero` (uint8 without one).
fn quantize(
    cx: &OpCtx,
    y: &Tensor,
    scale: &Tensor,
    zero: Option<&Tensor>,
) -> Result<Tensor, EvalError> {
    let Tensor::F32(y) = y else {
        return cx.err("the float result is not f32");
    };
    let s = scales(cx, scale, 1, "the output scale")?;
    let z = zero_points(cx, zero, 1, "the output zero point")?;
    let (dtype, lo, hi) = match zero.map(Tensor::dtype) {
        None | Some(DataType::U8) => (DataType::U8, 0.0, 255.0),
        Some(DataType::I8) => (DataType::I8, -128.0, 127.0),
        Some(t) => return cx.err(format!("output type {t} is not int8 or uint8")),
    };
    let q: Vec<i128> = y
        .iter()
        .map(|&v| {
            let r = (v / s[0]).round_ties_even();
            let r = if r.is_nan() { 0.0 } else { r };
            (r + z[0] as f32).clamp(lo, hi) as i128
        })
        .collect();
    Tensor::from_ints(dtype, y.shape(), &q).map_err(|e| EvalError::Op {
        node: cx.describe(),
        message: e.to_string(),
    })
}

/// `op(A, B)` for the binary ops: inputs (A, A_scale, A_zero_point, B,
/// B_scale, B_zero_point, C_scale, C_zero_point).
fn binary(cx: &OpCtx, i: &[Option<&Tensor>], op: super::Kernel) -> Result<Vec<Tensor>, EvalError> {
    let a = dequantize(cx, i, 0, "A")?;
    let b = dequantize(cx, i, 3, "B")?;
    let y = op(cx, &[Some(&a), Some(&b)])?;
    let c = quantize(cx, &y[0], input(cx, i, 6)?, i.get(7).copied().flatten())?;
    Ok(vec![c])
}

pub fn qlinear_add(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    binary(cx, i, super::elementwise::add)
}

pub fn qlinear_mul(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    binary(cx, i, super::elementwise::mul)
}

/// Inputs (X, x_scale, x_zero_point, y_scale, y_zero_point), NCHW only.
pub fn qlinear_global_average_pool(
    cx: &OpCtx,
    i: &[Option<&Tensor>],
) -> Result<Vec<Tensor>, EvalError> {
    if cx.int_attr("channels_last", 0)? != 0 {
        return cx.err("channels_last is not implemented");
    }
    let x = dequantize(cx, i, 0, "X")?;
    let y = super::pool::global_average_pool(cx, &[Some(&x)])?;
    Ok(vec![quantize(
        cx,
        &y[0],
        input(cx, i, 3)?,
        i.get(4).copied().flatten(),
    )?])
}

/// Inputs (X, X_scale, X_zero_point, Y_scale, Y_zero_point).
pub fn qlinear_sigmoid(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let Tensor::F32(x) = dequantize(cx, i, 0, "X")? else {
        return cx.err("the dequantized input is not f32");
    };
    let y = Tensor::F32(x.mapv(|v| 1.0 / (1.0 + (-v).exp())));
    Ok(vec![quantize(
        cx,
        &y,
        input(cx, i, 3)?,
        i.get(4).copied().flatten(),
    )?])
}

/// Inputs (Y_scale, Y_zero_point, then X, X_scale, X_zero_point per input).
pub fn qlinear_concat(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    if i.len() < 5 || !(i.len() - 2).is_multiple_of(3) {
        return cx.err("QLinearConcat takes Y_scale, Y_zero_point and triples of inputs");
    }
    let parts: Vec<Tensor> = (2..i.len())
        .step_by(3)
        .map(|at| dequantize(cx, i, at, "X"))
        .collect::<Result<_, _>>()?;
    let refs: Vec<Option<&Tensor>> = parts.iter().map(Some).collect();
    let y = super::shape::concat(cx, &refs)?;
    Ok(vec![quantize(
        cx,
        &y[0],
        input(cx, i, 0)?,
        i.get(1).copied().flatten(),
    )?])
}

/// Inputs (A, a_scale, a_zero_point, B, b_scale, b_zero_point, C, y_scale,
/// y_zero_point): `alpha (A - a_zero)(B - b_zero) a_scale b_scale` plus C
/// (int32, scale `a_scale b_scale alpha`), accumulated in int32; quantized
/// when y_scale is given, else f32. 2-D, transA and transB.
pub fn qgemm(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let (a, b) = (input(cx, i, 0)?, input(cx, i, 3)?);
    if a.shape().len() != 2 || b.shape().len() != 2 {
        return cx.err("QGemm operands must be 2-D");
    }
    let (ta, tb) = (
        cx.int_attr("transA", 0)? != 0,
        cx.int_attr("transB", 0)? != 0,
    );
    let alpha = cx.float_attr("alpha", 1.0)?;
    let (m, k) = if ta {
        (a.shape()[1], a.shape()[0])
    } else {
        (a.shape()[0], a.shape()[1])
    };
    let (k2, n) = if tb {
        (b.shape()[1], b.shape()[0])
    } else {
        (b.shape()[0], b.shape()[1])
    };
    if k != k2 {
        return cx.err(format!(
            "inner dimensions differ: {:?} x {:?}",
            a.shape(),
            b.shape()
        ));
    }
    let asc = scales(cx, input(cx, i, 1)?, 1, "a_scale")?;
    let azp = zero_points(cx, i.get(2).copied().flatten(), 1, "a_zero_point")?;
    let bsc = scales(cx, input(cx, i, 4)?, n, "b_scale")?;
    let bzp = zero_points(cx, i.get(5).copied().flatten(), n, "b_zero_point")?;
    let av = ints(cx, a, "A")?;
    let bv = ints(cx, b, "B")?;
    let at = |r: usize, t: usize| av[if ta { t * m + r } else { r * k + t }] - azp[0];
    let bt = |t: usize, c: usize| {
        bv[if tb { c * k + t } else { t * n + c }] - bzp[if bzp.len() == 1 { 0 } else { c }]
    };
    let bias: Option<Vec<i32>> = match i.get(6).copied().flatten() {
        None => None,
        Some(Tensor::I32(c)) if c.len() == n || c.len() == 1 => Some(c.iter().copied().collect()),
        Some(t) => {
            return cx.err(format!(
                "C must be int32 with 1 or {n} values, found {} {:?}",
                t.dtype(),
                t.shape()
            ))
        }
    };
    let pick = |v: &[f32], c: usize| v[if v.len() == 1 { 0 } else { c }];
    let mut acc = vec![0i32; m * n];
    for r in 0..m {
        for c in 0..n {
            let mut s = 0i32;
            for t in 0..k {
                s = s.wrapping_add(at(r, t).wrapping_mul(bt(t, c)));
            }
            if let Some(bias) = &bias {
                s = s.wrapping_add(bias[if bias.len() == 1 { 0 } else { c }]);
            }
            acc[r * n + c] = s;
        }
    }
    let real: Vec<f32> = acc
        .iter()
        .enumerate()
        .map(|(e, &v)| v as f32 * (alpha * asc[0] * pick(&bsc, e % n)))
        .collect();
    let y = Tensor::F32(array(&[m, n], real));
    match i.get(7).copied().flatten() {
        None => Ok(vec![y]),
        Some(ys) => Ok(vec![quantize(cx, &y, ys, i.get(8).copied().flatten())?]),
    }
}
