//! Reductions (ReduceSum … ReduceLogSumExp), ArgMax/ArgMin, CumSum/CumProd,
//! TopK, the softmax family (Softmax, LogSoftmax, Hardmax), LpNormalization
//! and MeanVarianceNormalization, in every type the spec allows.
//!
//! Float reductions accumulate in f64 and round once at the end, which is
//! at least as close to numpy's pairwise sums as ONNX Runtime's f32 sums;
//! integer reductions wrap in their own type, as C and ONNX Runtime do.
//! f32 ReduceMean and Softmax go to the older f32 kernels whenever those
//! handle the case, so that training's backward kernels see the same
//! forward values as before.

use super::typed::{floating, numeric, Number};
use super::{array, input, ints_input_or_attr, ints_of, Kernel};
use crate::{EvalError, OpCtx};
use qgraph_ir::ndarray::{ArrayD, IxDyn, Zip};
use qgraph_ir::Tensor;
use std::cmp::Ordering;

pub const KERNELS: &[(&str, Kernel)] = &[
    ("ReduceSum", reduce_sum),
    ("ReduceMean", reduce_mean),
    ("ReduceMax", reduce_max),
    ("ReduceMin", reduce_min),
    ("ReduceProd", reduce_prod),
    ("ReduceL1", reduce_l1),
    ("ReduceL2", reduce_l2),
    ("ReduceLogSum", reduce_log_sum),
    ("ReduceLogSumExp", reduce_log_sum_exp),
    ("ReduceSumSquare", reduce_sum_square),
    ("ArgMax", arg_max),
    ("ArgMin", arg_min),
    ("CumSum", cum_sum),
    ("CumProd", cum_prod),
    ("TopK", top_k),
    ("Softmax", softmax),
    ("LogSoftmax", log_softmax),
    ("Hardmax", hardmax),
    ("LpNormalization", lp_normalization),
    ("MeanVarianceNormalization", mean_variance_normalization),
];

// ---------------------------------------------------------------------------
// Reductions over a set of axes.

/// Which axes a reduction folds, and the shape it gives.
struct Reduction {
    /// The input's axes in the order groups are read: kept axes first, then
    /// the reduced ones, so that each group is a contiguous run.
    order: Vec<usize>,
    groups: usize,
    /// Values per group (1 when no axis is reduced; 0 over an empty axis).
    count: usize,
    out_shape: Vec<usize>,
}

impl Reduction {
    /// `axes`: `None` or empty reduces every axis, or none at all when
    /// `noop` (noop_with_empty_axes) is set.
    fn new(
        cx: &OpCtx,
        shape: &[usize],
        axes: Option<Vec<i64>>,
        noop: bool,
        keep: bool,
    ) -> Result<Reduction, EvalError> {
        let rank = shape.len();
        let mut reduced = vec![false; rank];
        match axes {
            Some(axes) if !axes.is_empty() => {
                for a in axes {
                    // Checked here rather than by `cx.axis`, which lets axis 0
                    // through for a scalar.
                    if a < -(rank as i64) || a >= rank as i64 {
                        return cx.err(format!("axis {a} is out of range for rank {rank}"));
                    }
                    reduced[cx.axis(a, rank)?] = true;
                }
            }
            _ if noop => {}
            _ => reduced.fill(true),
        }
        let kept = (0..rank).filter(|&d| !reduced[d]);
        let order: Vec<usize> = kept
            .clone()
            .chain((0..rank).filter(|&d| reduced[d]))
            .collect();
        let groups = kept.map(|d| shape[d]).product();
        let count = (0..rank)
            .filter(|&d| reduced[d])
            .map(|d| shape[d])
            .product();
        let out_shape: Vec<usize> = (0..rank)
            .filter(|&d| keep || !reduced[d])
            .map(|d| if reduced[d] { 1 } else { shape[d] })
            .collect();
        if qgraph_ir::element_count(&out_shape).is_none() {
            return cx.err(format!("the output shape {out_shape:?} is too large"));
        }
        Ok(Reduction {
            order,
            groups,
            count,
            out_shape,
        })
    }

    /// The reduction a Reduce* node asks for: axes an attribute before
    /// opset 13 (ReduceSum) or 18 (the others), an optional input after.
    fn of_node(
        cx: &OpCtx,
        inputs: &[Option<&Tensor>],
        shape: &[usize],
    ) -> Result<Reduction, EvalError> {
        let axes = ints_input_or_attr(cx, inputs, 1, "axes")?;
        let noop = cx.int_attr("noop_with_empty_axes", 0)? != 0;
        let keep = cx.int_attr("keepdims", 1)? != 0;
        Reduction::new(cx, shape, axes, noop, keep)
    }

    /// `fold` of each group, in the output's shape; a group over an empty
    /// set gets `fold(&[])`.
    fn apply<T: Clone, R>(&self, x: &ArrayD<T>, fold: impl Fn(&[T]) -> R) -> ArrayD<R> {
        let values: Vec<R> = if self.count == 0 {
            (0..self.groups).map(|_| fold(&[])).collect()
        } else {
            let data: Vec<T> = x
                .view()
                .permuted_axes(IxDyn(&self.order))
                .iter()
                .cloned()
                .collect();
            data.chunks_exact(self.count).map(fold).collect()
        };
        array(&self.out_shape, values)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fold {
    Sum,
    Mean,
    Max,
    Min,
    Prod,
    L1,
    L2,
    LogSum,
    LogSumExp,
    SumSquare,
}

/// The sum of `f(x)` in f64.
fn sum_f64<T: Number>(xs: &[T], f: impl Fn(f64) -> f64) -> f64 {
    xs.iter().map(|x| f(x.to_f64())).sum()
}

/// A group folded as `op` says. Floats in f64, rounded once; integers in
/// their own type with wrapping, except where the result is a float
/// function of the values (L2, logs: in f64, truncated back).
fn fold_group<T: Number>(op: Fold, xs: &[T]) -> T {
    let wrapping_sum = |f: &dyn Fn(T) -> T| xs.iter().fold(T::zero(), |acc, &x| acc.add(f(x)));
    match op {
        Fold::Max => xs.iter().fold(T::lowest(), |acc, &x| acc.max_of(x)),
        Fold::Min => xs.iter().fold(T::highest(), |acc, &x| acc.min_of(x)),
        Fold::Sum if T::IS_FLOAT => T::from_f64(sum_f64(xs, |x| x)),
        Fold::Sum => wrapping_sum(&|x| x),
        Fold::SumSquare if T::IS_FLOAT => T::from_f64(sum_f64(xs, |x| x * x)),
        Fold::SumSquare => wrapping_sum(&|x| x.mul(x)),
        Fold::L1 if T::IS_FLOAT => T::from_f64(sum_f64(xs, f64::abs)),
        Fold::L1 => wrapping_sum(&|x| x.abs()),
        Fold::Prod if T::IS_FLOAT => T::from_f64(xs.iter().map(|x| x.to_f64()).product()),
        Fold::Prod => xs.iter().fold(T::one(), |acc, &x| acc.mul(x)),
        Fold::Mean if T::IS_FLOAT => T::from_f64(sum_f64(xs, |x| x) / xs.len() as f64),
        // Integer means divide the wrapped sum, truncating (numpy with the
        // input's dtype, ONNX Runtime); an empty mean is 0.
        Fold::Mean => wrapping_sum(&|x| x)
            .div(T::from_i64(xs.len() as i64))
            .unwrap_or(T::zero()),
        Fold::L2 => T::from_f64(sum_f64(xs, |x| x * x).sqrt()),
        Fold::LogSum => T::from_f64(sum_f64(xs, |x| x).ln()),
        Fold::LogSumExp => T::from_f64(log_sum_exp(xs.iter().map(|x| x.to_f64()))),
    }
}

/// log Σ exp(x), shifted by the largest finite value so that nothing
/// overflows; −inf over nothing (or only −inf), inf with any inf.
fn log_sum_exp(xs: impl Iterator<Item = f64> + Clone) -> f64 {
    let shift = xs
        .clone()
        .filter(|x| x.is_finite())
        .fold(f64::NEG_INFINITY, f64::max);
    let shift = if shift.is_finite() { shift } else { 0.0 };
    xs.map(|x| (x - shift).exp()).sum::<f64>().ln() + shift
}

fn reduce_typed<T: Number>(op: Fold, a: &ArrayD<T>, r: &Reduction) -> Tensor {
    T::wrap(r.apply(a, |xs| fold_group(op, xs)))
}

fn reduce(op: Fold, cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    let r = Reduction::of_node(cx, inputs, x.shape())?;
    if let Tensor::Bool(a) = x {
        // False < true: max is any, min is all (false and true over nothing).
        return match op {
            Fold::Max => Ok(vec![Tensor::Bool(r.apply(a, |xs| xs.iter().any(|&b| b)))]),
            Fold::Min => Ok(vec![Tensor::Bool(r.apply(a, |xs| xs.iter().all(|&b| b)))]),
            _ => cx.err("input 0 is bool, which only ReduceMax and ReduceMin take"),
        };
    }
    Ok(vec![numeric!(cx, x, "input 0", |a| reduce_typed(
        op, a, &r
    ))])
}

pub fn reduce_sum(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    reduce(Fold::Sum, cx, i)
}

/// f32 goes to the older kernel (whose backward training uses) except
/// over an empty axis, which it refuses; that mean is NaN here.
pub fn reduce_mean(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, i, 0)?;
    if matches!(x, Tensor::F32(_)) && !x.shape().contains(&0) {
        return super::pool::reduce_mean(cx, i);
    }
    reduce(Fold::Mean, cx, i)
}

pub fn reduce_max(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    reduce(Fold::Max, cx, i)
}

pub fn reduce_min(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    reduce(Fold::Min, cx, i)
}

pub fn reduce_prod(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    reduce(Fold::Prod, cx, i)
}

pub fn reduce_l1(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    reduce(Fold::L1, cx, i)
}

pub fn reduce_l2(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    reduce(Fold::L2, cx, i)
}

pub fn reduce_log_sum(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    reduce(Fold::LogSum, cx, i)
}

pub fn reduce_log_sum_exp(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    reduce(Fold::LogSumExp, cx, i)
}

pub fn reduce_sum_square(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    reduce(Fold::SumSquare, cx, i)
}

// ---------------------------------------------------------------------------
// Operators along one axis.

/// A tensor seen as (outer, len, inner): lanes of `len` values, `inner`
/// apart, one per (outer, inner) position.
#[derive(Clone, Copy, Debug)]
struct Lanes {
    outer: usize,
    len: usize,
    inner: usize,
}

impl Lanes {
    /// The lanes along `axis`.
    fn along(shape: &[usize], axis: usize) -> Lanes {
        Lanes {
            outer: shape[..axis].iter().product(),
            len: shape[axis],
            inner: shape[axis + 1..].iter().product(),
        }
    }

    /// The rows of the input flattened to 2-D at `axis` (the softmax
    /// family before opset 13).
    fn flattened_at(shape: &[usize], axis: usize) -> Lanes {
        Lanes {
            outer: shape[..axis].iter().product(),
            len: shape[axis..].iter().product(),
            inner: 1,
        }
    }

    /// `f(lane, out_lane)` for every lane, the output lanes `out_len` long,
    /// laid out as the input's.
    fn map<T: Clone, U: Clone>(
        self,
        data: &[T],
        out_len: usize,
        fill: U,
        mut f: impl FnMut(&[T], &mut [U]),
    ) -> Vec<U> {
        let Lanes { outer, len, inner } = self;
        let mut out = vec![fill.clone(); outer * out_len * inner];
        let mut lane = Vec::with_capacity(len);
        let mut out_lane = vec![fill; out_len];
        for o in 0..outer {
            for i in 0..inner {
                lane.clear();
                lane.extend((0..len).map(|k| data[(o * len + k) * inner + i].clone()));
                f(&lane, &mut out_lane);
                for (k, v) in out_lane.iter().enumerate() {
                    out[(o * out_len + k) * inner + i] = v.clone();
                }
            }
        }
        out
    }
}

/// The values of `a` in row-major order.
fn row_major<T: Clone>(a: &ArrayD<T>) -> Vec<T> {
    match a.as_slice() {
        Some(s) => s.to_vec(),
        None => a.iter().cloned().collect(),
    }
}

/// `a` with the dim at `axis` made `len` long.
fn with_dim(shape: &[usize], axis: usize, len: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    s[axis] = len;
    s
}

/// The index of the first largest (`max`) or smallest value in a lane, or
/// the last with `last`; a NaN wins over numbers, as numpy's argmax.
fn arg_best<T: Number>(lane: &[T], max: bool, last: bool) -> usize {
    let mut best = 0;
    for (k, &x) in lane.iter().enumerate().skip(1) {
        let b = lane[best];
        let better = if b.is_nan() {
            last && x.is_nan()
        } else if x.is_nan() {
            true
        } else {
            match (max, last) {
                (true, false) => x > b,
                (true, true) => x >= b,
                (false, false) => x < b,
                (false, true) => x <= b,
            }
        };
        if better {
            best = k;
        }
    }
    best
}

fn arg_typed<T: Number>(cx: &OpCtx, a: &ArrayD<T>, max: bool) -> Result<ArrayD<i64>, EvalError> {
    if a.ndim() == 0 {
        return cx.err("the input is a scalar, which has no axis");
    }
    let axis = cx.axis(cx.int_attr("axis", 0)?, a.ndim())?;
    let keep = cx.int_attr("keepdims", 1)? != 0;
    let last = cx.int_attr("select_last_index", 0)? != 0;
    let lanes = Lanes::along(a.shape(), axis);
    if lanes.len == 0 && lanes.outer * lanes.inner > 0 {
        return cx.err(format!(
            "axis {axis} is empty: there is nothing to choose from"
        ));
    }
    let data = row_major(a);
    let out = lanes.map(&data, 1, 0i64, |lane, out| {
        out[0] = arg_best(lane, max, last) as i64;
    });
    let mut shape = with_dim(a.shape(), axis, 1);
    if !keep {
        shape.remove(axis);
    }
    Ok(array(&shape, out))
}

fn arg(max: bool, cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    let out = numeric!(cx, x, "input 0", |a| arg_typed(cx, a, max)?);
    Ok(vec![Tensor::I64(out)])
}

pub fn arg_max(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    arg(true, cx, i)
}

pub fn arg_min(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    arg(false, cx, i)
}

/// The running sum or product along the axis input 1 names, in the
/// input's type (numpy's cumsum order, so f32 matches it exactly).
fn cumulative_typed<T: Number>(
    cx: &OpCtx,
    a: &ArrayD<T>,
    axis: i64,
    product: bool,
) -> Result<Tensor, EvalError> {
    if a.ndim() == 0 {
        return cx.err("the input is a scalar, which has no axis");
    }
    let axis = cx.axis(axis, a.ndim())?;
    let exclusive = cx.int_attr("exclusive", 0)? != 0;
    let reverse = cx.int_attr("reverse", 0)? != 0;
    let (identity, step): (T, fn(T, T) -> T) = if product {
        (T::one(), T::mul)
    } else {
        (T::zero(), T::add)
    };
    let lanes = Lanes::along(a.shape(), axis);
    let data = row_major(a);
    let out = lanes.map(&data, lanes.len, identity, |lane, out| {
        let n = lane.len();
        let mut acc = identity;
        for j in 0..n {
            let k = if reverse { n - 1 - j } else { j };
            if exclusive {
                out[k] = acc;
                acc = step(acc, lane[k]);
            } else {
                acc = step(acc, lane[k]);
                out[k] = acc;
            }
        }
    });
    Ok(T::wrap(array(a.shape(), out)))
}

fn cumulative(
    product: bool,
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    let axis = ints_of(cx, input(cx, inputs, 1)?, "axis")?;
    let [axis] = axis[..] else {
        return cx.err(format!("axis must hold one value, found {}", axis.len()));
    };
    Ok(vec![numeric!(cx, x, "input 0", |a| cumulative_typed(
        cx, a, axis, product
    )?)])
}

pub fn cum_sum(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    cumulative(false, cx, i)
}

pub fn cum_prod(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    cumulative(true, cx, i)
}

/// An order of numbers in which NaN is above everything (numpy's sort).
fn nan_last<T: Number>(a: T, b: T) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        _ => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
    }
}

fn top_k_typed<T: Number>(
    cx: &OpCtx,
    a: &ArrayD<T>,
    k: i64,
) -> Result<(Tensor, Tensor), EvalError> {
    if a.ndim() == 0 {
        return cx.err("the input is a scalar, which has no axis");
    }
    let axis = cx.axis(cx.int_attr("axis", -1)?, a.ndim())?;
    let largest = cx.int_attr("largest", 1)? != 0;
    let lanes = Lanes::along(a.shape(), axis);
    if k < 0 || k as u64 > lanes.len as u64 {
        return cx.err(format!(
            "k = {k} is outside 0..={} (the length of axis {axis})",
            lanes.len
        ));
    }
    let k = k as usize;
    let data = row_major(a);
    // Sorted whatever `sorted` says (its order is then unspecified); a
    // stable sort keeps equal values in index order, as the spec asks.
    let mut order: Vec<usize> = Vec::with_capacity(lanes.len);
    let picked = lanes.map(&data, k, (T::zero(), 0i64), |lane, out| {
        order.clear();
        order.extend(0..lane.len());
        if largest {
            order.sort_by(|&p, &q| nan_last(lane[q], lane[p]));
        } else {
            order.sort_by(|&p, &q| nan_last(lane[p], lane[q]));
        }
        for (o, &j) in out.iter_mut().zip(&order) {
            *o = (lane[j], j as i64);
        }
    });
    let shape = with_dim(a.shape(), axis, k);
    let (values, indices): (Vec<T>, Vec<i64>) = picked.into_iter().unzip();
    Ok((
        T::wrap(array(&shape, values)),
        Tensor::I64(array(&shape, indices)),
    ))
}

/// k an attribute before opset 10, input 1 from 10; `largest` and
/// `sorted` from 11.
pub fn top_k(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    let k = if cx.opset < 10 && inputs.get(1).copied().flatten().is_none() {
        match cx.int_attr("k", -1)? {
            -1 => return cx.err("attribute k is required"),
            k => k,
        }
    } else {
        let k = ints_of(cx, input(cx, inputs, 1)?, "k")?;
        match k[..] {
            [k] => k,
            _ => return cx.err(format!("k must hold one value, found {}", k.len())),
        }
    };
    let (values, indices) = numeric!(cx, x, "input 0", |a| top_k_typed(cx, a, k)?);
    Ok(vec![values, indices])
}

/// The softmax family's lanes: along `axis` (default −1) from opset 13,
/// over the input flattened to 2-D at `axis` (default 1) before.
fn softmax_lanes(cx: &OpCtx, shape: &[usize]) -> Result<Lanes, EvalError> {
    let rank = shape.len();
    if rank == 0 {
        return cx.err("the input is a scalar, which has no axis");
    }
    if cx.opset >= 13 {
        Ok(Lanes::along(
            shape,
            cx.axis(cx.int_attr("axis", -1)?, rank)?,
        ))
    } else {
        // Axis == rank is allowed here: one column per row.
        let axis = cx.int_attr("axis", 1)?;
        if axis == rank as i64 {
            return Ok(Lanes::flattened_at(shape, rank));
        }
        Ok(Lanes::flattened_at(shape, cx.axis(axis, rank)?))
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum SoftKind {
    Softmax,
    LogSoftmax,
    Hardmax,
}

/// One lane of the softmax family, in f64.
fn soft_lane(kind: SoftKind, lane: &[f64], out: &mut [f64]) {
    if lane.is_empty() {
        return;
    }
    if kind == SoftKind::Hardmax {
        out.fill(0.0);
        out[arg_best(lane, true, false)] = 1.0;
        return;
    }
    let max = lane.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = lane.iter().map(|&x| (x - max).exp()).sum();
    for (o, &x) in out.iter_mut().zip(lane) {
        *o = match kind {
            SoftKind::LogSoftmax => x - max - sum.ln(),
            _ => (x - max).exp() / sum,
        };
    }
}

fn soft_typed<T: Number>(kind: SoftKind, a: &ArrayD<T>, lanes: Lanes) -> Tensor {
    let data: Vec<f64> = a.iter().map(|x| x.to_f64()).collect();
    let out = lanes.map(&data, lanes.len, 0.0, |lane, out| {
        soft_lane(kind, lane, out)
    });
    T::wrap(array(
        a.shape(),
        out.into_iter().map(T::from_f64).collect::<Vec<T>>(),
    ))
}

fn soft(kind: SoftKind, cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    let lanes = softmax_lanes(cx, x.shape())?;
    Ok(vec![floating!(cx, x, "input 0", |a| soft_typed(
        kind, a, lanes
    ))])
}

/// f32 goes to the older kernel, whose backward training uses.
pub fn softmax(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    if let Some(Tensor::F32(_)) = i.first().copied().flatten() {
        return super::norm::softmax(cx, i);
    }
    soft(SoftKind::Softmax, cx, i)
}

pub fn log_softmax(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    soft(SoftKind::LogSoftmax, cx, i)
}

pub fn hardmax(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    soft(SoftKind::Hardmax, cx, i)
}

fn lp_normalize_typed<T: Number>(a: &ArrayD<T>, lanes: Lanes, p: i64) -> Tensor {
    let data: Vec<f64> = a.iter().map(|x| x.to_f64()).collect();
    let out = lanes.map(&data, lanes.len, T::zero(), |lane, out| {
        let norm = if p == 1 {
            lane.iter().map(|x| x.abs()).sum::<f64>()
        } else {
            lane.iter().map(|x| x * x).sum::<f64>().sqrt()
        };
        for (o, &x) in out.iter_mut().zip(lane) {
            // A zero norm gives zeros rather than 0/0 (opset 22's wording).
            *o = T::from_f64(if norm == 0.0 { 0.0 } else { x / norm });
        }
    });
    T::wrap(array(a.shape(), out))
}

/// `x / ‖x‖p` along `axis` (default −1), p 1 or 2.
pub fn lp_normalization(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    if x.shape().is_empty() {
        return cx.err("the input is a scalar, which has no axis");
    }
    let lanes = Lanes::along(
        x.shape(),
        cx.axis(cx.int_attr("axis", -1)?, x.shape().len())?,
    );
    let p = cx.int_attr("p", 2)?;
    if p != 1 && p != 2 {
        return cx.err(format!("p is {p}; only 1 and 2 are defined"));
    }
    Ok(vec![floating!(cx, x, "input 0", |a| lp_normalize_typed(
        a, lanes, p
    ))])
}

fn mvn_typed<T: Number>(cx: &OpCtx, a: &ArrayD<T>, r: &Reduction) -> Result<Tensor, EvalError> {
    let x: ArrayD<f64> = a.mapv(|v| v.to_f64());
    let stats = r.apply(&x, |xs| {
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let variance = xs.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
        (mean, variance.sqrt())
    });
    let Some(stats) = stats.broadcast(IxDyn(a.shape())) else {
        return cx.err("the statistics do not broadcast back over the input");
    };
    // The epsilon is the function body's.
    Ok(T::wrap(Zip::from(&x).and(&stats).map_collect(
        |&v, &(mean, std)| T::from_f64((v - mean) / (std + 1e-9)),
    )))
}

/// `(x − mean) / (std + 1e-9)` over `axes` (default [0, 2, 3]).
pub fn mean_variance_normalization(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    let axes = cx.ints_attr("axes")?.unwrap_or_else(|| vec![0, 2, 3]);
    if axes.is_empty() {
        return cx.err("axes is empty");
    }
    let r = Reduction::new(cx, x.shape(), Some(axes), false, true)?;
    Ok(vec![floating!(cx, x, "input 0", |a| mvn_typed(cx, a, &r)?)])
}

#[cfg(test)]
mod tests {
    use super::super::typed::Elem;
    use super::*;
    use qgraph_ir::{AttrValue, Graph, NewNode};

    /// Runs `op` at `opset` on `inputs` (`None`: absent) with `attrs`.
    fn run(
        op: &str,
        opset: i64,
        inputs: &[Option<Tensor>],
        attrs: &[(&str, AttrValue)],
        outputs: usize,
    ) -> Result<Vec<Tensor>, EvalError> {
        let mut g = Graph::new("test");
        let mut node = NewNode::new(op);
        for (k, t) in inputs.iter().enumerate() {
            node.inputs.push(
                t.as_ref()
                    .map(|_| g.add_input(format!("x{k}"), None).unwrap()),
            );
        }
        for k in 0..outputs {
            node.outputs
                .push(Some(g.add_value(format!("y{k}"), None).unwrap()));
        }
        for (name, value) in attrs {
            node = node.attr(*name, value.clone());
        }
        let id = g.add_node(node).unwrap();
        let refs: Vec<Option<&Tensor>> = inputs.iter().map(Option::as_ref).collect();
        crate::run_node(&g, id, opset, &refs)
    }

    fn one(op: &str, opset: i64, inputs: &[Option<Tensor>], attrs: &[(&str, AttrValue)]) -> Tensor {
        run(op, opset, inputs, attrs, 1).unwrap().remove(0)
    }

    fn t<T: Elem>(shape: &[usize], v: Vec<T>) -> Option<Tensor> {
        Some(T::wrap(array(shape, v)))
    }

    fn axes(v: &[i64]) -> Option<Tensor> {
        t(&[v.len()], v.to_vec())
    }

    fn ints(v: &[i64]) -> AttrValue {
        AttrValue::Ints(v.to_vec())
    }

    fn values<T: Elem + Clone>(t: &Tensor) -> (Vec<usize>, Vec<T>) {
        let a = T::unwrap(t).expect("the expected type");
        (a.shape().to_vec(), a.iter().cloned().collect())
    }

    #[test]
    fn integer_sums_wrap_and_means_truncate() {
        let x = t(&[2, 2], vec![i32::MAX, 1, -7, 2]);
        let y = one("ReduceSum", 13, &[x.clone(), axes(&[1])], &[]);
        assert_eq!(values::<i32>(&y), (vec![2, 1], vec![i32::MIN, -5]));
        let y = one(
            "ReduceMean",
            18,
            &[x, axes(&[1])],
            &[("keepdims", AttrValue::Int(0))],
        );
        // (i32::MAX + 1) wraps to MIN, halved; -5 / 2 truncates to -2.
        assert_eq!(values::<i32>(&y), (vec![2], vec![i32::MIN / 2, -2]));
    }

    #[test]
    fn f64_sums_stay_in_f64() {
        let v = vec![0.1f64, 0.2, 0.3, 1e-17];
        let y = one("ReduceSum", 13, &[t(&[4], v.clone()), None], &[]);
        let expected: f64 = v.iter().sum();
        assert_eq!(values::<f64>(&y), (vec![1], vec![expected]));
        let y = one("ReduceL2", 18, &[t(&[4], v.clone()), None], &[]);
        let expected = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert_eq!(values::<f64>(&y).1, vec![expected]);
    }

    #[test]
    fn axes_are_an_attribute_before_opset_13_or_18() {
        let x = t(&[2, 3], vec![1i64, 2, 3, 4, 5, 6]);
        let y = one(
            "ReduceProd",
            11,
            std::slice::from_ref(&x),
            &[("axes", ints(&[0]))],
        );
        assert_eq!(values::<i64>(&y), (vec![1, 3], vec![4, 10, 18]));
        let y = one(
            "ReduceMax",
            18,
            &[x, axes(&[-1])],
            &[("keepdims", AttrValue::Int(0))],
        );
        assert_eq!(values::<i64>(&y), (vec![2], vec![3, 6]));
    }

    #[test]
    fn empty_axes_with_noop_keep_the_elementwise_part() {
        let x = t(&[3], vec![1.0f32, -2.0, 3.0]);
        let noop = [("noop_with_empty_axes", AttrValue::Int(1))];
        let y = one("ReduceSumSquare", 18, &[x.clone(), axes(&[])], &noop);
        assert_eq!(values::<f32>(&y), (vec![3], vec![1.0, 4.0, 9.0]));
        let y = one("ReduceSum", 13, &[x.clone(), axes(&[])], &noop);
        assert_eq!(values::<f32>(&y).1, vec![1.0, -2.0, 3.0]);
        // Without noop, empty axes reduce everything.
        let y = one("ReduceSum", 13, &[x, axes(&[])], &[]);
        assert_eq!(values::<f32>(&y), (vec![1], vec![2.0]));
    }

    #[test]
    fn empty_sets_give_the_identity() {
        let x = t(&[2, 0], Vec::<f32>::new());
        let over = |op: &str| values::<f32>(&one(op, 18, &[x.clone(), axes(&[1])], &[])).1;
        assert_eq!(over("ReduceMax"), vec![f32::NEG_INFINITY; 2]);
        assert_eq!(over("ReduceMin"), vec![f32::INFINITY; 2]);
        assert_eq!(over("ReduceProd"), vec![1.0; 2]);
        assert_eq!(over("ReduceSum"), vec![0.0; 2]);
        assert_eq!(over("ReduceLogSumExp"), vec![f32::NEG_INFINITY; 2]);
        assert_eq!(over("ReduceLogSum"), vec![f32::NEG_INFINITY; 2]);
        assert!(over("ReduceMean").iter().all(|v| v.is_nan()));
        let xi = t(&[0, 3], Vec::<i64>::new());
        let y = one(
            "ReduceMax",
            18,
            &[xi, axes(&[0])],
            &[("keepdims", AttrValue::Int(0))],
        );
        assert_eq!(values::<i64>(&y), (vec![3], vec![i64::MIN; 3]));
        let xb = t(&[2, 0], Vec::<bool>::new());
        let y = one("ReduceMin", 20, &[xb, axes(&[1])], &[]);
        assert_eq!(values::<bool>(&y), (vec![2, 1], vec![true; 2]));
    }

    #[test]
    fn bool_max_is_any_and_min_is_all() {
        let x = t(&[2, 2], vec![true, false, true, true]);
        let y = one("ReduceMax", 20, &[x.clone(), axes(&[1])], &[]);
        assert_eq!(values::<bool>(&y).1, vec![true, true]);
        let y = one("ReduceMin", 20, &[x, axes(&[1])], &[]);
        assert_eq!(values::<bool>(&y).1, vec![false, true]);
    }

    #[test]
    fn log_sum_exp_does_not_overflow() {
        let y = one(
            "ReduceLogSumExp",
            18,
            &[t(&[2], vec![1000.0f64, 1000.0]), None],
            &[],
        );
        assert_eq!(values::<f64>(&y).1, vec![1000.0 + 2f64.ln()]);
    }

    #[test]
    fn f32_mean_and_softmax_are_the_older_kernels() {
        let data = super::super::test_values(4 * 5 * 6, 7);
        let x = t(&[4, 5, 6], data);
        let refs = [x.as_ref()];
        let attrs: &[(&str, AttrValue)] =
            &[("axes", ints(&[0, 2])), ("keepdims", AttrValue::Int(0))];
        let ours = one("ReduceMean", 13, std::slice::from_ref(&x), attrs);
        let mut g = Graph::new("old");
        let input = g.add_input("x", None).unwrap();
        let out = g.add_value("y", None).unwrap();
        let mut node = NewNode::new("ReduceMean").inputs([input]).outputs([out]);
        for (n, v) in attrs {
            node = node.attr(*n, v.clone());
        }
        let id = g.add_node(node).unwrap();
        let buffers = crate::pool::BufferPool::default();
        let cx = OpCtx {
            graph: &g,
            node: id,
            opset: 13,
            epilogue: &[],
            added: None,
            input_pads: [0; 4],
            buffers: &buffers,
            captures: &[],
            functions: &[],
        };
        let old = super::super::pool::reduce_mean(&cx, &refs).unwrap();
        assert_eq!(values::<f32>(&ours), values::<f32>(&old[0]));
        for opset in [11, 13] {
            let cx = OpCtx { opset, ..cx };
            let ours = one("Softmax", opset, std::slice::from_ref(&x), &[]);
            let old = super::super::norm::softmax(&cx, &refs).unwrap();
            assert_eq!(values::<f32>(&ours), values::<f32>(&old[0]));
        }
    }

    #[test]
    fn softmax_family_in_f64_and_half() {
        let x = t(&[2, 3], vec![1.0f64, 2.0, 3.0, -1.0, 0.0, 1.0]);
        let y = values::<f64>(&one("Softmax", 13, std::slice::from_ref(&x), &[])).1;
        // Shifted by the row's maximum, in f64 throughout.
        let e = [(-2f64).exp(), (-1f64).exp(), 1.0];
        let s: f64 = e.iter().sum();
        assert_eq!(y[..3], [e[0] / s, e[1] / s, e[2] / s]);
        assert_eq!(y[..3], y[3..]);
        let y = values::<f64>(&one("LogSoftmax", 13, std::slice::from_ref(&x), &[])).1;
        assert_eq!(y[..3], [-2.0 - s.ln(), -1.0 - s.ln(), -s.ln()]);
        // Before opset 13 the input is coerced to 2-D at axis (default 1):
        // with axis 0, one softmax over all six values.
        let y = values::<f64>(&one(
            "Softmax",
            11,
            std::slice::from_ref(&x),
            &[("axis", AttrValue::Int(0))],
        ))
        .1;
        assert!((y.iter().sum::<f64>() - 1.0).abs() < 1e-15);
        let h = one("Hardmax", 11, &[x], &[("axis", AttrValue::Int(0))]);
        assert_eq!(values::<f64>(&h).1, vec![0.0, 0.0, 1.0, 0.0, 0.0, 0.0]);
        use qgraph_ir::half::f16;
        let xh = t(&[2], vec![f16::from_f32(0.0), f16::from_f32(0.0)]);
        let y = one("Softmax", 13, &[xh], &[]);
        assert_eq!(values::<f16>(&y).1, vec![f16::from_f32(0.5); 2]);
    }

    #[test]
    fn hardmax_takes_the_first_maximum() {
        let x = t(&[1, 4], vec![1.0f32, 3.0, 3.0, 2.0]);
        let y = one("Hardmax", 13, &[x], &[]);
        assert_eq!(values::<f32>(&y).1, vec![0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn arg_max_and_min_choose_first_or_last() {
        let x = t(&[2, 3], vec![2i32, 5, 5, 1, 1, 0]);
        let y = one(
            "ArgMax",
            13,
            std::slice::from_ref(&x),
            &[("axis", AttrValue::Int(1))],
        );
        assert_eq!(values::<i64>(&y), (vec![2, 1], vec![1, 0]));
        let last = [
            ("axis", AttrValue::Int(-1)),
            ("select_last_index", AttrValue::Int(1)),
            ("keepdims", AttrValue::Int(0)),
        ];
        let y = one("ArgMax", 13, std::slice::from_ref(&x), &last);
        assert_eq!(values::<i64>(&y), (vec![2], vec![2, 1]));
        let y = one("ArgMin", 13, &[x], &last);
        assert_eq!(values::<i64>(&y), (vec![2], vec![0, 2]));
    }

    #[test]
    fn cumulative_sums_and_products() {
        let x = t(&[2, 3], vec![1i32, 2, 3, 4, 5, 6]);
        let y = one("CumSum", 14, &[x.clone(), t(&[], vec![1i32])], &[]);
        assert_eq!(values::<i32>(&y).1, vec![1, 3, 6, 4, 9, 15]);
        let both = [
            ("exclusive", AttrValue::Int(1)),
            ("reverse", AttrValue::Int(1)),
        ];
        let y = one("CumSum", 14, &[x.clone(), t(&[], vec![-1i64])], &both);
        assert_eq!(values::<i32>(&y).1, vec![5, 3, 0, 11, 6, 0]);
        let y = one("CumProd", 26, &[x, t(&[1], vec![0i64])], &[]);
        assert_eq!(values::<i32>(&y).1, vec![1, 2, 3, 4, 10, 18]);
        let xf = t(&[3], vec![0.1f64, 0.2, 0.3]);
        let y = one("CumSum", 14, &[xf, t(&[], vec![0i32])], &[]);
        assert_eq!(values::<f64>(&y).1, vec![0.1, 0.1 + 0.2, 0.1 + 0.2 + 0.3]);
    }

    #[test]
    fn top_k_breaks_ties_by_lower_index() {
        let x = t(&[1, 5], vec![3u64, 1, 3, 2, 1]);
        let outs = run("TopK", 11, &[x.clone(), t(&[1], vec![3i64])], &[], 2).unwrap();
        assert_eq!(values::<u64>(&outs[0]), (vec![1, 3], vec![3, 3, 2]));
        assert_eq!(values::<i64>(&outs[1]).1, vec![0, 2, 3]);
        let smallest = [("largest", AttrValue::Int(0))];
        let outs = run("TopK", 11, &[x.clone(), t(&[1], vec![2i64])], &smallest, 2).unwrap();
        assert_eq!(values::<u64>(&outs[0]).1, vec![1, 1]);
        assert_eq!(values::<i64>(&outs[1]).1, vec![1, 4]);
        // Opset 1: k is an attribute.
        let outs = run(
            "TopK",
            1,
            std::slice::from_ref(&x),
            &[("k", AttrValue::Int(1))],
            2,
        )
        .unwrap();
        assert_eq!(values::<u64>(&outs[0]).1, vec![3]);
        assert!(run("TopK", 11, &[x, t(&[1], vec![6i64])], &[], 2).is_err());
    }

    #[test]
    fn lp_normalization_gives_zero_for_a_zero_norm() {
        let x = t(&[2, 2], vec![3.0f64, -4.0, 0.0, 0.0]);
        let y = one("LpNormalization", 22, std::slice::from_ref(&x), &[]);
        assert_eq!(values::<f64>(&y).1, vec![0.6, -0.8, 0.0, 0.0]);
        let y = one("LpNormalization", 1, &[x], &[("p", AttrValue::Int(1))]);
        assert_eq!(values::<f64>(&y).1, vec![3.0 / 7.0, -4.0 / 7.0, 0.0, 0.0]);
    }

    #[test]
    fn mean_variance_normalization_per_channel() {
        let x = t(&[1, 2, 1, 2], vec![1.0f64, 3.0, 5.0, 5.0]);
        let y = one("MeanVarianceNormalization", 13, &[x], &[]);
        let (shape, v) = values::<f64>(&y);
        assert_eq!(shape, vec![1, 2, 1, 2]);
        assert!((v[0] + 1.0).abs() < 1e-8 && (v[1] - 1.0).abs() < 1e-8);
        assert_eq!(v[2..], [0.0, 0.0]);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let x = t(&[2], vec![1.0f32, 2.0]);
        assert!(run("ReduceSum", 13, &[x.clone(), axes(&[1])], &[], 1).is_err());
        assert!(run("ReduceL1", 18, &[t(&[], vec![1.0f32]), axes(&[0])], &[], 1).is_err());
        assert!(run(
            "ArgMax",
            13,
            &[t(&[2, 0], Vec::<f32>::new())],
            &[("axis", AttrValue::Int(1))],
            1
        )
        .is_err());
        assert!(run("ArgMax", 13, &[t(&[], vec![1.0f32])], &[], 1).is_err());
        assert!(run("CumSum", 14, &[x.clone(), t(&[2], vec![0i64, 0])], &[], 1).is_err());
        assert!(run("Softmax", 13, &[t(&[2], vec![1i32, 2])], &[], 1).is_err());
        assert!(run(
            "LpNormalization",
            22,
            std::slice::from_ref(&x),
            &[("p", AttrValue::Int(3))],
            1
        )
        .is_err());
        assert!(run("ReduceSum", 13, &[t(&[2], vec![true, false]), None], &[], 1).is_err());
        assert!(run("TopK", 11, &[x, t(&[1], vec![-1i64])], &[], 2).is_err());
    }
}
