//! Elementwise operators: activations and broadcasting arithmetic.

use super::{f32_input, input};
use crate::{EvalError, OpCtx};
use qgraph_ir::ndarray::{ArrayD, IxDyn, Zip};
use qgraph_ir::Tensor;
use rayon::prelude::*;

/// Applies `f` to every element, in parallel over contiguous chunks.
pub fn par_map(x: &ArrayD<f32>, f: impl Fn(f32) -> f32 + Sync) -> ArrayD<f32> {
    let src = x.as_standard_layout();
    let data = src.as_slice().expect("standard layout");
    let out: Vec<f32> = data
        .par_iter()
        .with_min_len(1 << 14)
        .map(|&v| f(v))
        .collect();
    ArrayD::from_shape_vec(IxDyn(x.shape()), out).expect("same element count")
}

fn unary_f32(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    f: impl Fn(f32) -> f32 + Sync,
) -> Result<Vec<Tensor>, EvalError> {
    let x = f32_input(cx, inputs, 0)?;
    Ok(vec![Tensor::F32(par_map(x, f))])
}

pub fn neg(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    match input(cx, i, 0)? {
        Tensor::I64(a) => Ok(vec![Tensor::I64(a.mapv(|x| x.wrapping_neg()))]),
        _ => unary_f32(cx, i, |x| -x),
    }
}

pub fn abs(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    unary_f32(cx, i, f32::abs)
}

pub fn sqrt(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    unary_f32(cx, i, f32::sqrt)
}

pub fn exp(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    unary_f32(cx, i, f32::exp)
}

pub fn log(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    unary_f32(cx, i, f32::ln)
}

pub fn reciprocal(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    unary_f32(cx, i, |x| 1.0 / x)
}

pub fn floor(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    unary_f32(cx, i, f32::floor)
}

pub fn ceil(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    unary_f32(cx, i, f32::ceil)
}

pub fn identity(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    Ok(vec![input(cx, i, 0)?.clone()])
}

/// Inference: the input passes through; the optional mask is all ones.
pub fn dropout(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, i, 0)?;
    let mask = Tensor::Bool(ArrayD::from_elem(IxDyn(x.shape()), true));
    Ok(vec![x.clone(), mask])
}

/// The numpy broadcast of two shapes.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    (0..n)
        .map(|k| {
            let x = if k + a.len() >= n {
                a[k + a.len() - n]
            } else {
                1
            };
            let y = if k + b.len() >= n {
                b[k + b.len() - n]
            } else {
                1
            };
            match (x, y) {
                (x, y) if x == y => Some(x),
                (1, y) => Some(y),
                (x, 1) => Some(x),
                _ => None,
            }
        })
        .collect()
}

fn zip_with<T: Copy, U>(
    cx: &OpCtx,
    a: &ArrayD<T>,
    b: &ArrayD<T>,
    f: impl Fn(T, T) -> U,
) -> Result<ArrayD<U>, EvalError> {
    if a.shape() == b.shape() {
        return Ok(Zip::from(a).and(b).map_collect(|&x, &y| f(x, y)));
    }
    let Some(shape) = broadcast_shape(a.shape(), b.shape()) else {
        return cx.err(format!(
            "shapes {:?} and {:?} do not broadcast",
            a.shape(),
            b.shape()
        ));
    };
    let (av, bv) = match (a.broadcast(IxDyn(&shape)), b.broadcast(IxDyn(&shape))) {
        (Some(x), Some(y)) => (x, y),
        _ => {
            return cx.err(format!(
                "shapes {:?} and {:?} do not broadcast",
                a.shape(),
                b.shape()
            ))
        }
    };
    Ok(Zip::from(&av).and(&bv).map_collect(|&x, &y| f(x, y)))
}

/// `zip_with` for f32 into a recycled buffer, in parallel blocks of rows:
/// same-shape operands as one slice, broadcast ones row by row along the
/// last dim (a bias, a scale, an attention mask), each operand's row either
/// contiguous or one value repeated.
fn zip_f32<F: Fn(f32, f32) -> f32 + Sync + Send + Copy>(
    cx: &OpCtx,
    a: &ArrayD<f32>,
    b: &ArrayD<f32>,
    f: F,
) -> Result<ArrayD<f32>, EvalError> {
    if let (true, Some(xs), Some(ys)) = (a.shape() == b.shape(), a.as_slice(), b.as_slice()) {
        let mut out = cx.buffers.take(xs.len());
        out.par_chunks_mut(1 << 14)
            .zip(xs.par_chunks(1 << 14).zip(ys.par_chunks(1 << 14)))
            .for_each(|(o, (x, y))| {
                for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
                    *o = f(x, y);
                }
            });
        return Ok(ArrayD::from_shape_vec(IxDyn(a.shape()), out).expect("same element count"));
    }
    let Some(shape) = broadcast_shape(a.shape(), b.shape()) else {
        return cx.err(format!(
            "shapes {:?} and {:?} do not broadcast",
            a.shape(),
            b.shape()
        ));
    };
    let (Some(av), Some(bv)) = (a.broadcast(IxDyn(&shape)), b.broadcast(IxDyn(&shape))) else {
        return cx.err(format!(
            "shapes {:?} and {:?} do not broadcast",
            a.shape(),
            b.shape()
        ));
    };
    let len = shape.iter().product();
    let inner = shape.last().copied().unwrap_or(1);
    if inner >= MIN_ROW {
        if let (Some(ar), Some(br)) = (Rows::of(a, &shape), Rows::of(b, &shape)) {
            let mut out = cx.buffers.take(len);
            let rows_per_block = ((1 << 14) / inner).max(1);
            out.par_chunks_mut(rows_per_block * inner)
                .enumerate()
                .for_each(|(block, o)| {
                    for (i, o) in o.chunks_exact_mut(inner).enumerate() {
                        let row = block * rows_per_block + i;
                        match (ar.row(row), br.row(row)) {
                            (Row::Values(x), Row::Values(y)) => {
                                for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
                                    *o = f(x, y);
                                }
                            }
                            (Row::Values(x), Row::Repeated(y)) => {
                                for (o, &x) in o.iter_mut().zip(x) {
                                    *o = f(x, y);
                                }
                            }
                            (Row::Repeated(x), Row::Values(y)) => {
                                for (o, &y) in o.iter_mut().zip(y) {
                                    *o = f(x, y);
                                }
                            }
                            (Row::Repeated(x), Row::Repeated(y)) => o.fill(f(x, y)),
                        }
                    }
                });
            return Ok(ArrayD::from_shape_vec(IxDyn(&shape), out).expect("element count"));
        }
    }
    let mut out =
        ArrayD::from_shape_vec(IxDyn(&shape), cx.buffers.take(len)).expect("element count");
    Zip::from(&mut out)
        .and(&av)
        .and(&bv)
        .for_each(|o, &x, &y| *o = f(x, y));
    Ok(out)
}

/// Rows (along the last dim) at least this long go row by row; shorter
/// ones element by element, where a row's bookkeeping would dominate.
const MIN_ROW: usize = 16;

/// An operand of a broadcast, row by row of the output: where each output
/// row's values start in the operand's data (in standard layout).
struct Rows<'a> {
    data: &'a [f32],
    /// Per output dim but the last, the operand's step (0 where it
    /// broadcasts); and the output's dims but the last.
    steps: Vec<usize>,
    dims: Vec<usize>,
    /// The row's length where the operand has the last dim; None where
    /// it broadcasts along it (one value per row).
    width: Option<usize>,
}

enum Row<'a> {
    Values(&'a [f32]),
    Repeated(f32),
}

impl<'a> Rows<'a> {
    /// None for an operand not in standard layout.
    fn of(x: &'a ArrayD<f32>, shape: &[usize]) -> Option<Rows<'a>> {
        let data = x.as_slice()?;
        let rank = shape.len();
        // The operand's dims aligned to the output's, 1 where it has none.
        let mut own = vec![1; rank - x.ndim()];
        own.extend_from_slice(x.shape());
        let mut steps = vec![0; rank];
        let mut step = 1;
        for d in (0..rank).rev() {
            if own[d] != 1 {
                steps[d] = step;
            }
            step *= own[d];
        }
        Some(Rows {
            data,
            width: (own[rank - 1] != 1).then_some(shape[rank - 1]),
            steps: steps[..rank - 1].to_vec(),
            dims: shape[..rank - 1].to_vec(),
        })
    }

    fn row(&self, mut row: usize) -> Row<'a> {
        let mut start = 0;
        for (&dim, &step) in self.dims.iter().zip(&self.steps).rev() {
            start += (row % dim) * step;
            row /= dim;
        }
        match self.width {
            Some(width) => Row::Values(&self.data[start..start + width]),
            None => Row::Repeated(self.data[start]),
        }
    }
}

fn arith(
    cx: &OpCtx,
    i: &[Option<&Tensor>],
    ff: impl Fn(f32, f32) -> f32 + Sync + Send + Copy,
    fi: fn(i64, i64) -> Option<i64>,
) -> Result<Vec<Tensor>, EvalError> {
    let (a, b) = (input(cx, i, 0)?, input(cx, i, 1)?);
    Ok(vec![match (a, b) {
        (Tensor::F32(x), Tensor::F32(y)) => Tensor::F32(zip_f32(cx, x, y, ff)?),
        (Tensor::F64(x), Tensor::F64(y)) => {
            Tensor::F64(zip_with(cx, x, y, |p, q| ff(p as f32, q as f32) as f64)?)
        }
        (Tensor::I64(x), Tensor::I64(y)) => {
            let r = zip_with(cx, x, y, fi)?;
            if r.iter().any(Option::is_none) {
                return cx.err("integer overflow or division by zero");
            }
            Tensor::I64(r.mapv(|v| v.unwrap_or_default()))
        }
        (Tensor::I32(x), Tensor::I32(y)) => {
            let r = zip_with(cx, x, y, |p, q| {
                fi(p as i64, q as i64).and_then(|v| i32::try_from(v).ok())
            })?;
            if r.iter().any(Option::is_none) {
                return cx.err("integer overflow or division by zero");
            }
            Tensor::I32(r.mapv(|v| v.unwrap_or_default()))
        }
        (a, b) => {
            return cx.err(format!(
                "unsupported input types {} and {}",
                a.dtype(),
                b.dtype()
            ))
        }
    }])
}

pub fn add(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    arith(cx, i, |a, b| a + b, i64::checked_add)
}

pub fn sub(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    arith(cx, i, |a, b| a - b, i64::checked_sub)
}

pub fn mul(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    arith(cx, i, |a, b| a * b, i64::checked_mul)
}

pub fn div(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    arith(cx, i, |a, b| a / b, i64::checked_div)
}

pub fn pow(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = f32_input(cx, i, 0)?;
    let y: ArrayD<f32> = match input(cx, i, 1)? {
        Tensor::F32(y) => y.clone(),
        Tensor::I64(y) => y.mapv(|v| v as f32),
        Tensor::I32(y) => y.mapv(|v| v as f32),
        t => return cx.err(format!("exponent type {} is not supported", t.dtype())),
    };
    Ok(vec![Tensor::F32(zip_with(cx, x, &y, f32::powf)?)])
}

/// Clip: integer tensors (opset 12 and later) clamped in their own type;
/// float ones by the pointwise kernel.
pub fn clip(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    fn bound<T: Copy>(
        cx: &OpCtx,
        i: &[Option<&Tensor>],
        k: usize,
        get: impl Fn(&Tensor) -> Option<T>,
        default: T,
    ) -> Result<T, EvalError> {
        match i.get(k).copied().flatten() {
            None => Ok(default),
            Some(t) if t.shape().iter().product::<usize>() == 1 => match get(t) {
                Some(v) => Ok(v),
                None => cx.err(format!(
                    "bound {k} must have the input's type, found {}",
                    t.dtype()
                )),
            },
            Some(_) => cx.err(format!("bound {k} must be a scalar")),
        }
    }
    // Each integer type: bounds of the same type (absent: its extremes).
    macro_rules! clamp {
        ($a:expr, $variant:ident, $t:ty) => {{
            let get = |t: &Tensor| match t {
                Tensor::$variant(b) => b.iter().next().copied(),
                _ => None,
            };
            let lo = bound(cx, i, 1, get, <$t>::MIN)?;
            let hi = bound(cx, i, 2, get, <$t>::MAX)?;
            Ok(vec![Tensor::$variant($a.mapv(|v| v.max(lo).min(hi)))])
        }};
    }
    match input(cx, i, 0)? {
        Tensor::I8(a) => clamp!(a, I8, i8),
        Tensor::U8(a) => clamp!(a, U8, u8),
        Tensor::I32(a) => clamp!(a, I32, i32),
        _ => super::pointwise::kernel(cx, i),
    }
}

/// Gradients of the one-input operators: the derivative at each input
/// element (or, where cheaper, from the output) times the output's gradient.
pub fn unary_backward(cx: &OpCtx, g: &super::Grads) -> Result<Vec<Option<Tensor>>, EvalError> {
    let mut grads = vec![None; g.inputs.len()];
    if !g.wants(0) {
        return Ok(grads);
    }
    let op = cx.graph.node(cx.node).op_type.as_str();
    let x = f32_input(cx, g.inputs, 0)?;
    let y = match g.outputs.first().copied().flatten() {
        Some(Tensor::F32(y)) => y,
        _ => return cx.err("the output was not kept for the backward pass"),
    };
    let d = g.d_output(cx, 0)?;
    let derivative: fn(f32, f32) -> f32 = match op {
        "Identity" | "Dropout" => |_, _| 1.0,
        "Neg" => |_, _| -1.0,
        "Abs" => |x, _| x.signum() * (x != 0.0) as u8 as f32,
        "Sqrt" => |_, y| 0.5 / y,
        "Exp" => |_, y| y,
        "Log" => |x, _| 1.0 / x,
        "Reciprocal" => |_, y| -y * y,
        other => return cx.err(format!("{other} has no gradient here")),
    };
    let mut d = d;
    Zip::from(&mut d)
        .and(x)
        .and(y)
        .par_for_each(|d, &x, &y| *d *= derivative(x, y));
    grads[0] = Some(Tensor::F32(d));
    Ok(grads)
}

/// Gradients of Add, Sub, Mul, Div and Pow with broadcasting: each operand's
/// gradient is summed back over the dims it was broadcast along.
pub fn binary_backward(cx: &OpCtx, g: &super::Grads) -> Result<Vec<Option<Tensor>>, EvalError> {
    let mut grads = vec![None; g.inputs.len()];
    if !g.wants(0) && !g.wants(1) {
        return Ok(grads);
    }
    let op = cx.graph.node(cx.node).op_type.as_str();
    let a = f32_input(cx, g.inputs, 0)?;
    let b = f32_input(cx, g.inputs, 1)?;
    let y = match g.outputs.first().copied().flatten() {
        Some(Tensor::F32(y)) => y,
        _ => return cx.err("the output was not kept for the backward pass"),
    };
    let d = g.d_output(cx, 0)?;
    let shape = d.shape().to_vec();
    let (Some(ab), Some(bb)) = (a.broadcast(IxDyn(&shape)), b.broadcast(IxDyn(&shape))) else {
        return cx.err(format!(
            "shapes {:?} and {:?} do not broadcast to the output's {:?}",
            a.shape(),
            b.shape(),
            shape
        ));
    };
    // The partial derivatives of y = f(a, b) at (a, b, y).
    type Partial = fn(f32, f32, f32) -> f32;
    let (da, db): (Partial, Partial) = match op {
        "Add" => (|_, _, _| 1.0, |_, _, _| 1.0),
        "Sub" => (|_, _, _| 1.0, |_, _, _| -1.0),
        "Mul" => (|_, b, _| b, |a, _, _| a),
        "Div" => (|_, b, _| 1.0 / b, |_, b, y| -y / b),
        "Pow" => (
            |a, b, _| if b == 0.0 { 0.0 } else { b * a.powf(b - 1.0) },
            |a, _, y| if a > 0.0 { y * a.ln() } else { 0.0 },
        ),
        other => return cx.err(format!("{other} has no gradient here")),
    };
    let mut d = Some(d);
    for (k, (partial, operand)) in [(da, a), (db, b)].into_iter().enumerate() {
        if !g.wants(k) {
            continue;
        }
        // The last operand wanted takes the output's gradient itself.
        let mut dk = if k == 0 && g.wants(1) {
            d.clone().expect("present until the last operand")
        } else {
            d.take().expect("present until the last operand")
        };
        Zip::from(&mut dk)
            .and(&ab)
            .and(&bb)
            .and(y)
            .par_for_each(|d, &a, &b, &y| *d *= partial(a, b, y));
        grads[k] = Some(Tensor::F32(super::sum_to_shape(dk, operand.shape())));
    }
    Ok(grads)
}
