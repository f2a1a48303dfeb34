//! Data movement and shape arithmetic; these work on any element type.

use super::{array, input, ints_input_or_attr, ints_of, map_any, Grads};
use crate::{EvalError, OpCtx};
use qgraph_ir::ndarray::{ArrayD, ArrayViewMutD, Axis, IxDyn, Slice};
use qgraph_ir::{AttrValue, DataType, Tensor};
use rayon::prelude::*;

fn reshaped(cx: &OpCtx, t: &Tensor, shape: &[usize]) -> Result<Tensor, EvalError> {
    if qgraph_ir::element_count(shape) != Some(t.len()) {
        return cx.err(format!("cannot reshape {:?} to {shape:?}", t.shape()));
    }
    Ok(map_any!(cx, t, a => a
        .as_standard_layout()
        .into_owned()
        .into_shape_with_order(IxDyn(shape))
        .expect("element count checked")))
}

/// Kernels that only give their first input a new shape, as the shape of
/// their output from the inputs: the plain kernel copies the data, the
/// consuming one (when the input dies here) moves it.
type ViewShape = fn(&OpCtx, &[Option<&Tensor>]) -> Result<Vec<usize>, EvalError>;

/// The kernels of `VIEWS` that move a dead first input into their output.
pub(crate) const CONSUMING_KERNELS: &[(&str, super::ConsumingKernel)] = &[
    ("Flatten", |cx, x, i| consume_view(cx, x, i, flatten_shape)),
    ("Reshape", |cx, x, i| consume_view(cx, x, i, reshape_shape)),
    ("Squeeze", |cx, x, i| consume_view(cx, x, i, squeeze_shape)),
    ("Unsqueeze", |cx, x, i| {
        consume_view(cx, x, i, unsqueeze_shape)
    }),
];

fn view(cx: &OpCtx, i: &[Option<&Tensor>], shape: ViewShape) -> Result<Vec<Tensor>, EvalError> {
    let target = shape(cx, i)?;
    Ok(vec![reshaped(cx, input(cx, i, 0)?, &target)?])
}

/// `x`, which no one reads after this node, in its new shape: no copy
/// unless its layout is not the standard one.
fn consume_view(
    cx: &OpCtx,
    x: Tensor,
    i: &[Option<&Tensor>],
    shape: ViewShape,
) -> Result<Vec<Tensor>, EvalError> {
    let op = &cx.graph.node(cx.node).op_type;
    if matches!(x, Tensor::Packed(_)) || (op == "Reshape" && cx.opset < 5) {
        // Sub-byte codes, and the shape as an attribute: the kernel of
        // record (index.rs) handles them.
        let kernel = super::kernel("", op).expect("a registered operator");
        let mut with_x = i.to_vec();
        with_x[0] = Some(&x);
        return kernel(cx, &with_x);
    }
    let target = {
        let mut with_x = i.to_vec();
        with_x[0] = Some(&x);
        shape(cx, &with_x)?
    };
    if qgraph_ir::element_count(&target) != Some(x.len()) {
        return cx.err(format!("cannot reshape {:?} to {target:?}", x.shape()));
    }
    Ok(vec![map_any!(cx, x, a => {
        let a = if a.is_standard_layout() { a } else { a.as_standard_layout().into_owned() };
        a.into_shape_with_order(IxDyn(&target)).expect("element count checked")
    })])
}

pub fn flatten(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    view(cx, i, flatten_shape)
}

pub fn reshape(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    view(cx, i, reshape_shape)
}

pub fn squeeze(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    view(cx, i, squeeze_shape)
}

pub fn unsqueeze(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    view(cx, i, unsqueeze_shape)
}

fn flatten_shape(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<usize>, EvalError> {
    let x = input(cx, i, 0)?;
    let r = x.shape().len();
    let axis = cx.int_attr("axis", 1)?;
    let axis = if axis == r as i64 {
        r
    } else {
        cx.axis(axis, r)?
    };
    let outer: usize = x.shape()[..axis].iter().product();
    let inner: usize = x.shape()[axis..].iter().product();
    Ok(vec![outer, inner])
}

fn reshape_shape(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<usize>, EvalError> {
    let x = input(cx, i, 0)?;
    let spec = ints_of(cx, input(cx, i, 1)?, "shape")?;
    let allowzero = cx.int_attr("allowzero", 0)? != 0;
    let mut shape = Vec::with_capacity(spec.len());
    let mut infer = None;
    for (k, &d) in spec.iter().enumerate() {
        match d {
            -1 if infer.is_none() => {
                infer = Some(k);
                shape.push(1);
            }
            0 if !allowzero => match x.shape().get(k) {
                Some(&s) => shape.push(s),
                None => {
                    return cx.err(format!(
                        "shape {spec:?}: dim {k} copies a dim the input lacks"
                    ))
                }
            },
            d if d >= 0 => shape.push(d as usize),
            _ => return cx.err(format!("shape {spec:?} is not valid")),
        }
    }
    if let Some(k) = infer {
        let known: usize = shape.iter().product();
        if known == 0 || x.len() % known != 0 {
            return cx.err(format!(
                "cannot infer the -1 in {spec:?} for {} elements",
                x.len()
            ));
        }
        shape[k] = x.len() / known;
    }
    Ok(shape)
}

pub fn transpose(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, i, 0)?;
    let r = x.shape().len();
    let perm: Vec<usize> = match cx.ints_attr("perm")? {
        Some(p) => p.iter().map(|&a| cx.axis(a, r)).collect::<Result<_, _>>()?,
        None => (0..r).rev().collect(),
    };
    let mut seen = perm.clone();
    seen.sort_unstable();
    if seen != (0..r).collect::<Vec<_>>() {
        return cx.err(format!("perm {perm:?} is not a permutation of {r} axes"));
    }
    if let Tensor::F32(a) = x {
        return Ok(vec![Tensor::F32(transpose_f32(cx, a, &perm))]);
    }
    Ok(vec![
        // One copy, in the output's order (a clone first was a second).
        map_any!(cx, x, a => a.view().permuted_axes(IxDyn(&perm)).as_standard_layout().into_owned()),
    ])
}

/// An f32 Transpose into a recycled buffer, the output's first dim shared
/// out across the threads (a transformer moves its heads to and from
/// their own dim four times a layer; one thread copying element by element
/// took longer than the attention's products).
fn transpose_f32(cx: &OpCtx, a: &ArrayD<f32>, perm: &[usize]) -> ArrayD<f32> {
    let mut view = a.view().permuted_axes(IxDyn(perm));
    let shape = view.shape().to_vec();
    // Leading dims of 1 (a batch of one) share nothing out.
    while view.ndim() > 1 && view.shape()[0] == 1 {
        view = view.index_axis_move(Axis(0), 0);
    }
    let mut out = cx.buffers.take(a.len());
    match view.shape().first() {
        Some(&outer) if outer > 1 && a.len() >= 1 << 14 => {
            let block = a.len() / outer;
            out.par_chunks_mut(block.max(1))
                .zip(view.axis_iter(Axis(0)).into_par_iter())
                .for_each(|(dst, src)| {
                    ArrayViewMutD::from_shape(IxDyn(src.shape()), dst)
                        .expect("one block per index of the first dim")
                        .assign(&src)
                });
        }
        _ => out.iter_mut().zip(view.iter()).for_each(|(o, &v)| *o = v),
    }
    ArrayD::from_shape_vec(IxDyn(&shape), out).expect("same element count")
}

pub fn concat(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let parts: Vec<&Tensor> = i.iter().flatten().copied().collect();
    let Some(first) = parts.first() else {
        return cx.err("Concat needs inputs");
    };
    let axis = cx.axis(cx.int_attr("axis", 0)?, first.shape().len())?;
    match concatenate_tensors(&parts, axis) {
        Ok(t) => Ok(vec![t]),
        Err(message) => cx.err(message),
    }
}

/// `parts` laid end to end along `axis`: Concat's kernel, and how the
/// evaluator joins the outputs of groups of samples.
pub(crate) fn concatenate_tensors(parts: &[&Tensor], axis: usize) -> Result<Tensor, String> {
    let Some(first) = parts.first() else {
        return Err("nothing to concatenate".into());
    };
    macro_rules! cat {
        ($variant:ident) => {{
            let mut views = Vec::with_capacity(parts.len());
            for p in parts {
                match p {
                    Tensor::$variant(a) => views.push(a.view()),
                    t => return Err(format!("inputs mix {} and {}", first.dtype(), t.dtype())),
                }
            }
            match qgraph_ir::ndarray::concatenate(Axis(axis), &views) {
                Ok(a) => Tensor::$variant(a),
                Err(e) => return Err(format!("cannot concatenate: {e}")),
            }
        }};
    }
    Ok(match first {
        Tensor::F32(_) => cat!(F32),
        Tensor::F64(_) => cat!(F64),
        Tensor::I64(_) => cat!(I64),
        Tensor::I32(_) => cat!(I32),
        Tensor::I8(_) => cat!(I8),
        Tensor::U8(_) => cat!(U8),
        Tensor::Bool(_) => cat!(Bool),
        t => return Err(format!("Concat of {} is not implemented", t.dtype())),
    })
}

pub fn split(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, i, 0)?;
    let axis = cx.axis(cx.int_attr("axis", 0)?, x.shape().len())?;
    let len = x.shape()[axis];
    let outputs = cx.graph.node(cx.node).outputs().len();
    let sizes: Vec<usize> = match if cx.opset >= 13 {
        ints_input_or_attr(cx, i, 1, "split")?
    } else {
        cx.ints_attr("split")?
    } {
        Some(s) => s.iter().map(|&v| v.max(0) as usize).collect(),
        None => {
            let parts = cx.int_attr("num_outputs", outputs as i64)?.max(1) as usize;
            let each = len.div_ceil(parts);
            (0..parts)
                .map(|k| each.min(len.saturating_sub(k * each)))
                .collect()
        }
    };
    if sizes.iter().sum::<usize>() != len {
        return cx.err(format!("split sizes {sizes:?} do not add up to {len}"));
    }
    let mut start = 0;
    let mut out = Vec::with_capacity(sizes.len());
    for s in sizes {
        let range = Slice::from(start as isize..(start + s) as isize);
        out.push(map_any!(cx, x, a => a.slice_axis(Axis(axis), range).to_owned()));
        start += s;
    }
    Ok(out)
}

/// The elements Slice keeps: per sliced axis, the indices along it, in
/// order. Starts/ends/axes/steps are inputs from opset 10, attributes
/// before.
fn slice_selection(
    cx: &OpCtx,
    i: &[Option<&Tensor>],
    shape: &[usize],
) -> Result<Vec<(usize, Vec<usize>)>, EvalError> {
    let r = shape.len();
    let (starts, ends, axes, steps) = if cx.opset >= 10 {
        (
            ints_of(cx, input(cx, i, 1)?, "starts")?,
            ints_of(cx, input(cx, i, 2)?, "ends")?,
            i.get(3)
                .copied()
                .flatten()
                .map(|t| ints_of(cx, t, "axes"))
                .transpose()?,
            i.get(4)
                .copied()
                .flatten()
                .map(|t| ints_of(cx, t, "steps"))
                .transpose()?,
        )
    } else {
        (
            cx.ints_attr("starts")?.unwrap_or_default(),
            cx.ints_attr("ends")?.unwrap_or_default(),
            cx.ints_attr("axes")?,
            None,
        )
    };
    let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return cx.err("starts, ends, axes and steps must have the same length");
    }
    let mut selection = Vec::with_capacity(starts.len());
    for k in 0..starts.len() {
        let axis = cx.axis(axes[k], r)?;
        let dim = shape[axis] as i64;
        let step = steps[k];
        if step == 0 {
            return cx.err("a step is 0");
        }
        let clamp = |v: i64, lo: i64, hi: i64| v.max(lo).min(hi);
        let norm = |v: i64| if v < 0 { v + dim } else { v };
        let (s, e) = if step > 0 {
            (clamp(norm(starts[k]), 0, dim), clamp(norm(ends[k]), 0, dim))
        } else {
            (
                clamp(norm(starts[k]), 0, dim - 1),
                clamp(norm(ends[k]), -1, dim - 1),
            )
        };
        // Element indices s, s+step, ... before e.
        let idx: Vec<usize> = if step > 0 {
            (s..e).step_by(step as usize).map(|v| v as usize).collect()
        } else {
            let mut v = Vec::new();
            let mut p = s;
            while p > e {
                v.push(p as usize);
                p += step;
            }
            v
        };
        selection.push((axis, idx));
    }
    Ok(selection)
}

pub fn slice(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, i, 0)?;
    let mut result = x.clone();
    for (axis, idx) in slice_selection(cx, i, x.shape())? {
        result = map_any!(cx, &result, a => a.select(Axis(axis), &idx));
    }
    Ok(vec![result])
}

/// The pads of a Pad node before and after each of the `r` axes; pads are
/// an attribute before opset 11, and may name their axes from opset 18.
fn pad_amounts(
    cx: &OpCtx,
    i: &[Option<&Tensor>],
    r: usize,
) -> Result<(Vec<i64>, Vec<i64>), EvalError> {
    let pads = if cx.opset >= 11 {
        ints_of(cx, input(cx, i, 1)?, "pads")?
    } else {
        cx.ints_attr("pads")?.unwrap_or_default()
    };
    let axes: Vec<usize> = match i.get(3).copied().flatten() {
        Some(t) => ints_of(cx, t, "axes")?
            .iter()
            .map(|&a| cx.axis(a, r))
            .collect::<Result<_, _>>()?,
        None => (0..r).collect(),
    };
    if pads.len() != 2 * axes.len() {
        return cx.err(format!(
            "pads has {} values for {} axes",
            pads.len(),
            axes.len()
        ));
    }
    let mut before = vec![0i64; r];
    let mut after = vec![0i64; r];
    for (k, &ax) in axes.iter().enumerate() {
        before[ax] = pads[k];
        after[ax] = pads[k + axes.len()];
    }
    Ok((before, after))
}

/// Pad (constant, reflect, edge).
pub fn pad(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, i, 0)?;
    let r = x.shape().len();
    let (before, after) = pad_amounts(cx, i, r)?;
    let mode = cx.string_attr("mode", "constant")?;
    let Tensor::F32(a) = x else {
        if before.iter().chain(&after).all(|&p| p == 0) {
            return Ok(vec![x.clone()]);
        }
        return cx.err(format!("padding {} tensors is not implemented", x.dtype()));
    };
    let value = if cx.opset >= 11 {
        match i.get(2).copied().flatten() {
            Some(Tensor::F32(v)) => v.iter().next().copied().unwrap_or(0.0),
            Some(t) => return cx.err(format!("constant_value must be f32, found {}", t.dtype())),
            None => 0.0,
        }
    } else {
        cx.float_attr("value", 0.0)?
    };
    let mut out_shape = Vec::with_capacity(r);
    for d in 0..r {
        let s = a.shape()[d] as i64 + before[d] + after[d];
        if s < 0 {
            return cx.err("negative pads remove more than the input has");
        }
        out_shape.push(s as usize);
    }
    if !matches!(mode.as_str(), "constant" | "edge" | "reflect") {
        return cx.err(format!("pad mode '{mode}' is not implemented"));
    }
    // Constant padding without cropping: fill, then copy the input block.
    if mode == "constant" && before.iter().chain(&after).all(|&p| p >= 0) {
        let mut out = ArrayD::from_elem(IxDyn(&out_shape), value);
        let region: Vec<qgraph_ir::ndarray::SliceInfoElem> = (0..r)
            .map(|d| qgraph_ir::ndarray::SliceInfoElem::Slice {
                start: before[d] as isize,
                end: Some(before[d] as isize + a.shape()[d] as isize),
                step: 1,
            })
            .collect();
        out.slice_mut(region.as_slice()).assign(a);
        return Ok(vec![Tensor::F32(out)]);
    }
    let src = a.as_standard_layout();
    let out = ArrayD::from_shape_fn(IxDyn(&out_shape), |idx| {
        let mut at = Vec::with_capacity(r);
        for d in 0..r {
            let n = a.shape()[d] as i64;
            let p = idx[d] as i64 - before[d];
            let q = if (0..n).contains(&p) {
                p
            } else {
                match mode.as_str() {
                    "edge" => p.clamp(0, n - 1),
                    "reflect" if n > 1 => {
                        let period = 2 * (n - 1);
                        let m = p.rem_euclid(period);
                        if m < n {
                            m
                        } else {
                            period - m
                        }
                    }
                    _ => return value,
                }
            };
            at.push(q as usize);
        }
        src[IxDyn(&at)]
    });
    Ok(vec![Tensor::F32(out)])
}

pub fn shape(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, i, 0)?;
    let r = x.shape().len() as i64;
    let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
    let start = clamp(cx.int_attr("start", 0)?);
    let end = clamp(cx.int_attr("end", r)?);
    let dims: Vec<i64> = x.shape()[start..end.max(start)]
        .iter()
        .map(|&d| d as i64)
        .collect();
    Ok(vec![Tensor::i64_vector(dims)])
}

pub fn gather(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, i, 0)?;
    let idx_t = input(cx, i, 1)?;
    let r = x.shape().len();
    let axis = cx.axis(cx.int_attr("axis", 0)?, r)?;
    let dim = x.shape()[axis] as i64;
    let idx: Vec<usize> = ints_of(cx, idx_t, "indices")?
        .into_iter()
        .map(|v| {
            let p = if v < 0 { v + dim } else { v };
            if (0..dim).contains(&p) {
                Ok(p as usize)
            } else {
                cx.err(format!("index {v} is out of range for a dim of {dim}"))
            }
        })
        .collect::<Result<_, _>>()?;
    let mut shape: Vec<usize> = x.shape()[..axis].to_vec();
    shape.extend_from_slice(idx_t.shape());
    shape.extend_from_slice(&x.shape()[axis + 1..]);
    let picked = map_any!(cx, x, a => a.select(Axis(axis), &idx));
    Ok(vec![reshaped(cx, &picked, &shape)?])
}

pub fn cast(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, i, 0)?;
    let to = cx.int_attr("to", 0)?;
    let target = match i32::try_from(to).ok().and_then(DataType::from_onnx_code) {
        Some(
            t @ (DataType::F32
            | DataType::U8
            | DataType::I8
            | DataType::I32
            | DataType::I64
            | DataType::Bool
            | DataType::F64),
        ) => t,
        Some(t) => return cx.err(format!("Cast to {t} is not implemented")),
        None => return cx.err(format!("Cast to type code {to}: not an ONNX type")),
    };
    if x.dtype() == target {
        return Ok(vec![x.clone()]);
    }
    let Some(values) = x.to_f64_vec() else {
        return cx.err(format!("Cast from {} is not implemented", x.dtype()));
    };
    let shape = x.shape().to_vec();
    let out = match target {
        DataType::F32 => Tensor::F32(array(&shape, values.iter().map(|&v| v as f32).collect())),
        DataType::F64 => Tensor::F64(array(&shape, values)),
        DataType::Bool => Tensor::Bool(array(&shape, values.iter().map(|&v| v != 0.0).collect())),
        // Float to integer truncates toward zero, saturating (Rust `as`).
        DataType::I64 => Tensor::I64(array(&shape, values.iter().map(|&v| v as i64).collect())),
        DataType::I32 => Tensor::I32(array(&shape, values.iter().map(|&v| v as i32).collect())),
        DataType::I8 => Tensor::I8(array(&shape, values.iter().map(|&v| v as i8).collect())),
        DataType::U8 => Tensor::U8(array(&shape, values.iter().map(|&v| v as u8).collect())),
        _ => unreachable!("targets listed above"),
    };
    Ok(vec![out])
}

/// Axes are an attribute before opset 13, an input from 13.
fn axes_of(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Option<Vec<i64>>, EvalError> {
    if cx.opset >= 13 {
        ints_input_or_attr(cx, i, 1, "axes")
    } else {
        cx.ints_attr("axes")
    }
}

fn squeeze_shape(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<usize>, EvalError> {
    let x = input(cx, i, 0)?;
    let r = x.shape().len();
    let axes: Vec<usize> = match axes_of(cx, i)? {
        Some(a) => a.iter().map(|&v| cx.axis(v, r)).collect::<Result<_, _>>()?,
        None => (0..r).filter(|&d| x.shape()[d] == 1).collect(),
    };
    if let Some(&d) = axes.iter().find(|&&d| x.shape()[d] != 1) {
        return cx.err(format!("cannot squeeze axis {d} of size {}", x.shape()[d]));
    }
    let shape: Vec<usize> = (0..r)
        .filter(|d| !axes.contains(d))
        .map(|d| x.shape()[d])
        .collect();
    Ok(shape)
}

fn unsqueeze_shape(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<usize>, EvalError> {
    let x = input(cx, i, 0)?;
    let Some(axes) = axes_of(cx, i)? else {
        return cx.err("axes are required");
    };
    let r = x.shape().len() + axes.len();
    let mut axes: Vec<usize> = axes
        .iter()
        .map(|&v| cx.axis(v, r))
        .collect::<Result<_, _>>()?;
    axes.sort_unstable();
    if axes.windows(2).any(|w| w[0] == w[1]) {
        return cx.err(format!("axes {axes:?} name an axis twice"));
    }
    let mut shape = Vec::with_capacity(r);
    let mut src = x.shape().iter();
    for d in 0..r {
        if axes.contains(&d) {
            shape.push(1);
        } else {
            shape.push(*src.next().unwrap_or(&1));
        }
    }
    Ok(shape)
}

pub fn constant_of_shape(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let dims = ints_of(cx, input(cx, i, 0)?, "shape")?;
    if dims.iter().any(|&d| d < 0) {
        return cx.err(format!("shape {dims:?} has a negative dim"));
    }
    let shape: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
    if qgraph_ir::element_count(&shape).is_none() {
        return cx.err(format!("shape {dims:?} is too large"));
    }
    let value = cx.tensor_attr("value")?;
    Ok(vec![match value {
        None => Tensor::F32(ArrayD::zeros(IxDyn(&shape))),
        Some(v) => map_any!(cx, v, a => {
            let Some(fill) = a.iter().next().cloned() else {
                return cx.err("value is empty");
            };
            ArrayD::from_elem(IxDyn(&shape), fill)
        }),
    }])
}

pub fn constant(cx: &OpCtx, _: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let node = cx.graph.node(cx.node);
    let Some(a) = node.attrs.first() else {
        return cx.err("Constant has no value attribute");
    };
    Ok(vec![match (&a.name[..], &a.value) {
        ("value", AttrValue::Tensor(t)) => {
            if t.is_elided() {
                return cx.err("the constant's data was elided in the text form it came from");
            }
            t.clone()
        }
        ("value_float", AttrValue::Float(f)) => Tensor::scalar_f32(*f),
        ("value_floats", AttrValue::Floats(f)) => Tensor::F32(array(&[f.len()], f.clone())),
        ("value_int", AttrValue::Int(v)) => Tensor::I64(array(&[], vec![*v])),
        ("value_ints", AttrValue::Ints(v)) => Tensor::i64_vector(v.clone()),
        (name, _) => return cx.err(format!("Constant attribute '{name}' is not implemented")),
    }])
}

/// The gradient of an op that only reshapes (Reshape, Flatten, Squeeze,
/// Unsqueeze): the output's gradient in the input's shape.
pub fn reshape_backward(cx: &OpCtx, g: &Grads) -> Result<Vec<Option<Tensor>>, EvalError> {
    let mut grads = vec![None; g.inputs.len()];
    if g.wants(0) {
        let x = input(cx, g.inputs, 0)?;
        let d = Tensor::F32(g.d_output(cx, 0)?);
        grads[0] = Some(reshaped(cx, &d, x.shape())?);
    }
    Ok(grads)
}

pub fn transpose_backward(cx: &OpCtx, g: &Grads) -> Result<Vec<Option<Tensor>>, EvalError> {
    let mut grads = vec![None; g.inputs.len()];
    if g.wants(0) {
        let r = input(cx, g.inputs, 0)?.shape().len();
        let perm: Vec<usize> = match cx.ints_attr("perm")? {
            Some(p) => p.iter().map(|&a| cx.axis(a, r)).collect::<Result<_, _>>()?,
            None => (0..r).rev().collect(),
        };
        let mut inverse = vec![0; r];
        for (k, &p) in perm.iter().enumerate() {
            inverse[p] = k;
        }
        let d = g.d_output(cx, 0)?;
        grads[0] = Some(Tensor::F32(
            d.permuted_axes(IxDyn(&inverse))
                .as_standard_layout()
                .into_owned(),
        ));
    }
    Ok(grads)
}

/// Each input gets its own stretch of the output's gradient.
pub fn concat_backward(cx: &OpCtx, g: &Grads) -> Result<Vec<Option<Tensor>>, EvalError> {
    let mut grads = vec![None; g.inputs.len()];
    let d = g.d_output(cx, 0)?;
    let axis = cx.axis(cx.int_attr("axis", 0)?, d.ndim())?;
    let mut start = 0;
    for (k, t) in g.inputs.iter().enumerate() {
        let Some(t) = t else { continue };
        let len = t.shape()[axis];
        if g.wants(k) {
            let range = Slice::from(start as isize..(start + len) as isize);
            grads[k] = Some(Tensor::F32(d.slice_axis(Axis(axis), range).to_owned()));
        }
        start += len;
    }
    Ok(grads)
}

/// The outputs' gradients laid end to end (zeros for an output none
/// reaches).
pub fn split_backward(cx: &OpCtx, g: &Grads) -> Result<Vec<Option<Tensor>>, EvalError> {
    let mut grads = vec![None; g.inputs.len()];
    if !g.wants(0) {
        return Ok(grads);
    }
    let x = input(cx, g.inputs, 0)?;
    let axis = cx.axis(cx.int_attr("axis", 0)?, x.shape().len())?;
    let parts = (0..g.outputs.len())
        .map(|k| g.d_output(cx, k))
        .collect::<Result<Vec<_>, _>>()?;
    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
    match qgraph_ir::ndarray::concatenate(Axis(axis), &views) {
        Ok(a) => grads[0] = Some(Tensor::F32(a)),
        Err(e) => return cx.err(format!("cannot join the outputs' gradients: {e}")),
    }
    Ok(grads)
}

/// The output's gradient scattered back to the elements Slice kept.
pub fn slice_backward(cx: &OpCtx, g: &Grads) -> Result<Vec<Option<Tensor>>, EvalError> {
    let mut grads = vec![None; g.inputs.len()];
    if !g.wants(0) {
        return Ok(grads);
    }
    let shape = input(cx, g.inputs, 0)?.shape().to_vec();
    let selection = slice_selection(cx, g.inputs, &shape)?;
    // Undo one axis at a time, last first: each step widens that axis back
    // to the shape it had before its selection.
    let mut d = g.d_output(cx, 0)?;
    let mut widths = Vec::with_capacity(selection.len());
    let mut current = shape.clone();
    for (axis, idx) in &selection {
        widths.push(current[*axis]);
        current[*axis] = idx.len();
    }
    for ((axis, idx), width) in selection.iter().zip(widths).rev() {
        let mut wide_shape = d.shape().to_vec();
        wide_shape[*axis] = width;
        let mut wide = ArrayD::<f32>::zeros(IxDyn(&wide_shape));
        for (k, &at) in idx.iter().enumerate() {
            let mut lane = wide.index_axis_mut(Axis(*axis), at);
            lane += &d.index_axis(Axis(*axis), k);
        }
        d = wide;
    }
    grads[0] = Some(Tensor::F32(d));
    Ok(grads)
}

/// Constant padding's gradient: the part of the output's gradient over the
/// input (cropping pads are not differentiated here).
pub fn pad_backward(cx: &OpCtx, g: &Grads) -> Result<Vec<Option<Tensor>>, EvalError> {
    let mut grads = vec![None; g.inputs.len()];
    if !g.wants(0) {
        return Ok(grads);
    }
    if cx.string_attr("mode", "constant")? != "constant" {
        return cx.err("only constant padding has a gradient here");
    }
    let x = input(cx, g.inputs, 0)?;
    let d = g.d_output(cx, 0)?;
    let (pads_before, _) = pad_amounts(cx, g.inputs, d.ndim())?;
    let mut region = Vec::with_capacity(d.ndim());
    for ((&full, &inner), &before) in d.shape().iter().zip(x.shape()).zip(&pads_before) {
        if before < 0 || before as usize + inner > full {
            return cx.err("cropping (negative) pads have no gradient here");
        }
        region.push(qgraph_ir::ndarray::SliceInfoElem::Slice {
            start: before as isize,
            end: Some(before as isize + inner as isize),
            step: 1,
        });
    }
    grads[0] = Some(Tensor::F32(d.slice(region.as_slice()).to_owned()));
    Ok(grads)
}
