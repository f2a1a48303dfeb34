//! Backward kernels of the operators transformers and detectors train
//! through: LayerNormalization, Erf, Gelu, LogSoftmax, Where, Expand,
//! ReduceSum, Gather (the embedding gradient), Resize and Upsample in
//! nearest mode, and Cast. Gradients are f32, as the tape trains in f32;
//! the forward kernels (in their families' modules) may run in any type.

use super::{f32_input, input, ints_of, sum_to_shape, Grads};
use crate::{EvalError, OpCtx};
use qgraph_ir::ndarray::{ArrayD, Axis, IxDyn, Zip};
use qgraph_ir::Tensor;
use rayon::prelude::*;

type Gradients = Result<Vec<Option<Tensor>>, EvalError>;

/// Output `k` of the forward pass, which must have been kept as f32.
fn f32_output<'t>(cx: &OpCtx, g: &Grads<'t>, k: usize) -> Result<&'t ArrayD<f32>, EvalError> {
    match g.outputs.get(k).copied().flatten() {
        Some(Tensor::F32(y)) => Ok(y),
        Some(t) => cx.err(format!(
            "output {k} is {}; gradients are computed in f32",
            t.dtype()
        )),
        None => cx.err(format!("output {k} was not kept for the backward pass")),
    }
}

/// `shape` with its leading 1s dropped (a parameter of shape [1, 1, 4]
/// broadcasts as one of shape [4], even against an input of rank 2).
fn without_leading_ones(shape: &[usize]) -> &[usize] {
    let first = shape.iter().position(|&d| d != 1).unwrap_or(shape.len());
    &shape[first..]
}

/// A gradient `d` of a broadcast result, summed back to the operand's
/// `shape` (numpy broadcasting, leading 1s of the operand allowed); an
/// error when the operand could not have been broadcast to `d`'s shape.
fn reduce_to(cx: &OpCtx, d: ArrayD<f32>, shape: &[usize]) -> Result<ArrayD<f32>, EvalError> {
    let core = without_leading_ones(shape);
    let fits = core.len() <= d.ndim()
        && core
            .iter()
            .zip(&d.shape()[d.ndim() - core.len()..])
            .all(|(&s, &n)| s == n || s == 1);
    if !fits {
        return cx.err(format!(
            "an operand of shape {shape:?} does not broadcast to the gradient's {:?}",
            d.shape()
        ));
    }
    let summed = sum_to_shape(d, core);
    match summed.into_shape_with_order(IxDyn(shape)) {
        Ok(s) => Ok(s),
        Err(e) => cx.err(format!("the gradient does not fit shape {shape:?}: {e}")),
    }
}

/// The gradient of a one-input elementwise operator: the output's gradient
/// times `derivative(x)` at each element.
fn elementwise(cx: &OpCtx, g: &Grads, derivative: impl Fn(f32) -> f32 + Sync) -> Gradients {
    let mut grads = vec![None; g.inputs.len()];
    if !g.wants(0) {
        return Ok(grads);
    }
    let x = f32_input(cx, g.inputs, 0)?;
    let mut d = g.d_output(cx, 0)?;
    if d.shape() != x.shape() {
        return cx.err(format!(
            "the output's gradient has shape {:?}, the input {:?}",
            d.shape(),
            x.shape()
        ));
    }
    Zip::from(&mut d)
        .and(x)
        .par_for_each(|d, &x| *d *= derivative(x));
    grads[0] = Some(Tensor::F32(d));
    Ok(grads)
}

/// `2 / sqrt(pi)`.
const TWO_OVER_SQRT_PI: f64 = std::f64::consts::FRAC_2_SQRT_PI;

/// `d erf(x) / dx = 2 / sqrt(pi) exp(-x^2)`.
pub fn erf_backward(cx: &OpCtx, g: &Grads) -> Gradients {
    elementwise(cx, g, |x| {
        let x = x as f64;
        (TWO_OVER_SQRT_PI * (-x * x).exp()) as f32
    })
}

/// Gelu (opset 20): with `approximate = "none"`, `x Phi(x)`, whose
/// derivative is `Phi(x) + x phi(x)`; with `"tanh"`, `x/2 (1 + tanh(u))`,
/// `u = sqrt(2/pi) (x + 0.044715 x^3)`, whose derivative is
/// `(1 + t)/2 + x/2 (1 - t^2) du/dx`. Computed in f64.
pub fn gelu_backward(cx: &OpCtx, g: &Grads) -> Gradients {
    match cx.string_attr("approximate", "none")?.as_str() {
        "none" => elementwise(cx, g, |x| {
            let x = x as f64;
            let cdf = 0.5 * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2));
            let pdf =
                (-0.5 * x * x).exp() * TWO_OVER_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2 * 0.5;
            (cdf + x * pdf) as f32
        }),
        "tanh" => elementwise(cx, g, |x| {
            let x = x as f64;
            let k = (2.0 / std::f64::consts::PI).sqrt();
            let t = (k * (x + 0.044715 * x * x * x)).tanh();
            let du = k * (1.0 + 3.0 * 0.044715 * x * x);
            (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du) as f32
        }),
        other => cx.err(format!("approximate '{other}' is not none or tanh")),
    }
}

/// LogSoftmax: `dx = dy - softmax(x) sum(dy)` along the same lanes as
/// Softmax (one axis from opset 13, the input flattened at the axis
/// before), with `softmax(x) = exp(y)`.
pub fn log_softmax_backward(cx: &OpCtx, g: &Grads) -> Gradients {
    let mut grads = vec![None; g.inputs.len()];
    if !g.wants(0) {
        return Ok(grads);
    }
    let y = f32_output(cx, g, 0)?.as_standard_layout();
    let mut d = g.d_output(cx, 0)?;
    super::norm::for_each_softmax_lane(cx, y.view(), &mut d, |ys, ds| {
        let total: f64 = ds.iter().map(|&d| d as f64).sum();
        for (d, &y) in ds.iter_mut().zip(ys) {
            *d -= (y as f64).exp() as f32 * total as f32;
        }
    })?;
    grads[0] = Some(Tensor::F32(d));
    Ok(grads)
}

/// LayerNormalization over the axes from `axis` on: with `n` the row
/// length, `xh = (x - mean) inv` and `gs = dY scale`,
/// `dX = inv (gs - mean(gs) - xh mean(gs xh))`, plus the gradients of the
/// Mean and InvStdDev outputs where they are used
/// (`d mean / dx = 1/n`, `d inv / dx = -inv^2 xh / n`);
/// `dScale = sum(dY xh)` and `dB = sum(dY)` over what they were broadcast
/// along. The statistics are recomputed in f64, as the forward does.
pub fn layer_norm_backward(cx: &OpCtx, g: &Grads) -> Gradients {
    let mut grads = vec![None; g.inputs.len()];
    if !(g.wants(0) || g.wants(1) || g.wants(2)) {
        return Ok(grads);
    }
    let x = f32_input(cx, g.inputs, 0)?;
    let scale = f32_input(cx, g.inputs, 1)?;
    let axis = cx.axis(cx.int_attr("axis", -1)?, x.ndim())?;
    let eps = cx.float_attr("epsilon", 1e-5)? as f64;
    let rows: usize = x.shape()[..axis].iter().product();
    let cols: usize = x.shape()[axis..].iter().product();
    let x = x.as_standard_layout();
    let xs = x.as_slice().expect("standard layout");
    let dy = g.d_output(cx, 0)?;
    if dy.shape() != x.shape() {
        return cx.err(format!(
            "the gradient of Y has shape {:?}, X {:?}",
            dy.shape(),
            x.shape()
        ));
    }
    let scale_core = without_leading_ones(scale.shape());
    let Some(scale_full) = scale
        .view()
        .into_shape_with_order(IxDyn(scale_core))
        .ok()
        .and_then(|s| s.broadcast(IxDyn(x.shape())).map(|b| b.to_owned()))
    else {
        return cx.err(format!(
            "Scale of shape {:?} does not broadcast to X's {:?}",
            scale.shape(),
            x.shape()
        ));
    };
    let scale_full = scale_full.as_standard_layout().into_owned();
    let ss = scale_full.as_slice().expect("standard layout");
    // The gradients of the statistics outputs, one per row, where kept.
    let stat_grad = |k: usize| -> Result<Option<Vec<f32>>, EvalError> {
        if g.outputs.get(k).copied().flatten().is_none() {
            return Ok(None);
        }
        let d = g.d_output(cx, k)?;
        if d.len() != rows {
            return cx.err(format!(
                "output {k}'s gradient has {} values for {rows} rows",
                d.len()
            ));
        }
        Ok(Some(d.iter().copied().collect()))
    };
    let (d_mean, d_inv) = (stat_grad(1)?, stat_grad(2)?);
    let ds = dy.as_slice().expect("standard layout");
    let n = cols.max(1) as f64;
    // Per row: the normalised values and the input's gradient.
    let per_row: Vec<(Vec<f32>, Vec<f32>)> = (0..rows)
        .into_par_iter()
        .map(|r| {
            let span = r * cols..(r + 1) * cols;
            let (row, dyr, sr) = (&xs[span.clone()], &ds[span.clone()], &ss[span]);
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = row
                .iter()
                .map(|&v| (v as f64 - mean) * (v as f64 - mean))
                .sum::<f64>()
                / n;
            let inv = 1.0 / (var + eps).sqrt();
            let xh: Vec<f64> = row.iter().map(|&v| (v as f64 - mean) * inv).collect();
            let gs: Vec<f64> = dyr
                .iter()
                .zip(sr)
                .map(|(&d, &s)| d as f64 * s as f64)
                .collect();
            let mean_gs = gs.iter().sum::<f64>() / n;
            let mean_gs_xh = gs.iter().zip(&xh).map(|(a, b)| a * b).sum::<f64>() / n;
            let dm = d_mean.as_ref().map_or(0.0, |d| d[r] as f64) / n;
            let di = d_inv.as_ref().map_or(0.0, |d| d[r] as f64) * inv * inv / n;
            let dx: Vec<f32> = gs
                .iter()
                .zip(&xh)
                .map(|(&gs, &xh)| (inv * (gs - mean_gs - xh * mean_gs_xh) + dm - di * xh) as f32)
                .collect();
            let xh = xh.into_iter().map(|v| v as f32).collect();
            (xh, dx)
        })
        .collect();
    if g.wants(0) {
        let dx: Vec<f32> = per_row
            .iter()
            .flat_map(|(_, dx)| dx.iter().copied())
            .collect();
        grads[0] = Some(Tensor::F32(super::array(x.shape(), dx)));
    }
    if g.wants(1) {
        let xh: Vec<f32> = per_row
            .iter()
            .flat_map(|(xh, _)| xh.iter().copied())
            .collect();
        let mut d_scale = super::array(x.shape(), xh);
        d_scale *= &dy;
        grads[1] = Some(Tensor::F32(reduce_to(cx, d_scale, scale.shape())?));
    }
    if g.wants(2) {
        let bias = f32_input(cx, g.inputs, 2)?;
        grads[2] = Some(Tensor::F32(reduce_to(cx, dy, bias.shape())?));
    }
    Ok(grads)
}

/// Where: the output's gradient goes to X where the condition holds, to Y
/// elsewhere, each summed back over what it was broadcast along; none to
/// the condition.
pub fn where_backward(cx: &OpCtx, g: &Grads) -> Gradients {
    let mut grads = vec![None; g.inputs.len()];
    if !g.wants(1) && !g.wants(2) {
        return Ok(grads);
    }
    let cond = match input(cx, g.inputs, 0)? {
        Tensor::Bool(c) => c,
        t => return cx.err(format!("the condition must be bool, found {}", t.dtype())),
    };
    let d = g.d_output(cx, 0)?;
    let Some(cond) = cond.broadcast(IxDyn(d.shape())) else {
        return cx.err(format!(
            "the condition of shape {:?} does not broadcast to the output's {:?}",
            cond.shape(),
            d.shape()
        ));
    };
    for (k, taken_where) in [(1, true), (2, false)] {
        if !g.wants(k) {
            continue;
        }
        let operand = input(cx, g.inputs, k)?;
        let mut dk = d.clone();
        Zip::from(&mut dk).and(&cond).for_each(|v, &c| {
            if c != taken_where {
                *v = 0.0;
            }
        });
        grads[k] = Some(Tensor::F32(reduce_to(cx, dk, operand.shape())?));
    }
    Ok(grads)
}

/// Expand: the output's gradient summed back to the input's shape; none
/// to the shape.
pub fn expand_backward(cx: &OpCtx, g: &Grads) -> Gradients {
    let mut grads = vec![None; g.inputs.len()];
    if !g.wants(0) {
        return Ok(grads);
    }
    let x = input(cx, g.inputs, 0)?;
    let d = g.d_output(cx, 0)?;
    grads[0] = Some(Tensor::F32(reduce_to(cx, d, x.shape())?));
    Ok(grads)
}

/// ReduceSum: the output's gradient spread over the summed axes. The axes
/// are an attribute before opset 13, an optional input from 13 (with
/// `noop_with_empty_axes`); no axes sum over all.
pub fn reduce_sum_backward(cx: &OpCtx, g: &Grads) -> Gradients {
    let mut grads = vec![None; g.inputs.len()];
    if !g.wants(0) {
        return Ok(grads);
    }
    let x = input(cx, g.inputs, 0)?;
    let rank = x.shape().len();
    let axes = if cx.opset >= 13 {
        match g.inputs.get(1).copied().flatten() {
            Some(t) => Some(ints_of(cx, t, "axes")?),
            None => None,
        }
    } else {
        cx.ints_attr("axes")?
    };
    let mut d = g.d_output(cx, 0)?;
    let axes: Vec<usize> = match axes {
        Some(a) if !a.is_empty() => a
            .iter()
            .map(|&v| cx.axis(v, rank))
            .collect::<Result<_, _>>()?,
        _ if cx.opset >= 13 && cx.int_attr("noop_with_empty_axes", 0)? != 0 => {
            grads[0] = Some(Tensor::F32(d));
            return Ok(grads);
        }
        _ => (0..rank).collect(),
    };
    let mut axes = axes;
    axes.sort_unstable();
    axes.dedup();
    if cx.int_attr("keepdims", 1)? == 0 {
        for &a in &axes {
            if a > d.ndim() {
                return cx.err(format!("the output's gradient has no place for axis {a}"));
            }
            d = d.insert_axis(Axis(a));
        }
    }
    let Some(spread) = d.broadcast(IxDyn(x.shape())) else {
        return cx.err(format!(
            "the output's gradient of shape {:?} does not spread over the input's {:?}",
            d.shape(),
            x.shape()
        ));
    };
    grads[0] = Some(Tensor::F32(spread.to_owned()));
    Ok(grads)
}

/// Gather: each output row's gradient added into the data row it was
/// read from (an embedding's gradient), negative indices counted from the
/// end; none to the indices.
pub fn gather_backward(cx: &OpCtx, g: &Grads) -> Gradients {
    let mut grads = vec![None; g.inputs.len()];
    if !g.wants(0) {
        return Ok(grads);
    }
    let data = input(cx, g.inputs, 0)?;
    let shape = data.shape();
    if shape.is_empty() {
        return cx.err("Gather needs data of rank 1 or more");
    }
    let axis = cx.axis(cx.int_attr("axis", 0)?, shape.len())?;
    let dim = shape[axis];
    let indices = ints_of(cx, input(cx, g.inputs, 1)?, "indices")?;
    let picked: Vec<usize> = indices
        .iter()
        .map(|&v| {
            let k = if v < 0 { v + dim as i64 } else { v };
            if (0..dim as i64).contains(&k) {
                Ok(k as usize)
            } else {
                cx.err(format!("index {v} is out of range for {dim} rows"))
            }
        })
        .collect::<Result<_, _>>()?;
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let d = g.d_output(cx, 0)?;
    if d.len() != outer * picked.len() * inner {
        return cx.err(format!(
            "the output's gradient has {} values, {} expected",
            d.len(),
            outer * picked.len() * inner
        ));
    }
    let ds = d.as_slice().expect("standard layout");
    let mut dx = vec![0f32; outer * dim * inner];
    // Each outer block is its own slice of the data: in parallel over them.
    dx.par_chunks_mut((dim * inner).max(1))
        .enumerate()
        .for_each(|(o, block)| {
            for (j, &k) in picked.iter().enumerate() {
                let from = &ds[(o * picked.len() + j) * inner..][..inner];
                for (t, &f) in block[k * inner..][..inner].iter_mut().zip(from) {
                    *t += f;
                }
            }
        });
    grads[0] = Some(Tensor::F32(super::array(shape, dx)));
    Ok(grads)
}

/// Resize and Upsample in nearest mode: each output's gradient added into
/// the source pixel it copies. Which pixel that is comes from the forward
/// kernel itself, run on the pixels' own flat indices (exact in f32 below
/// 2^24; larger inputs in two runs, high and low parts), so the gradient
/// follows the forward's coordinate mapping and rounding in every mode.
pub fn resize_nearest_backward(cx: &OpCtx, g: &Grads) -> Gradients {
    let mut grads = vec![None; g.inputs.len()];
    if !g.wants(0) {
        return Ok(grads);
    }
    let node = cx.graph.node(cx.node);
    if cx.string_attr("mode", "nearest")? != "nearest" {
        return cx.err("the gradient of Resize is implemented for mode nearest only");
    }
    if cx.opset >= 11
        && cx.string_attr("coordinate_transformation_mode", "")? == "tf_crop_and_resize"
    {
        return cx.err("the gradient of Resize with tf_crop_and_resize is not implemented");
    }
    let Some(forward) = super::kernel(&node.domain, &node.op_type) else {
        return cx.err(format!("{} has no forward kernel", node.op_type));
    };
    let x = input(cx, g.inputs, 0)?;
    let shape = x.shape().to_vec();
    let count = x.len();
    const PART: usize = 1 << 24;
    let d = g.d_output(cx, 0)?;
    // The source index of every output element, built up part by part.
    let mut sources: Vec<usize> = vec![0; d.len()];
    let mut place = 1usize;
    let mut rest = count;
    loop {
        let digit: Vec<f32> = (0..count).map(|i| ((i / place) % PART) as f32).collect();
        let digits = Tensor::F32(super::array(&shape, digit));
        let mut args: Vec<Option<&Tensor>> = g.inputs.to_vec();
        args[0] = Some(&digits);
        let out = forward(cx, &args)?;
        let Some(Tensor::F32(read)) = out.first() else {
            return cx.err("the forward kernel gave no f32 output on indices");
        };
        if read.len() != sources.len() {
            return cx.err(format!(
                "the forward gives {} outputs, the gradient has {}",
                read.len(),
                sources.len()
            ));
        }
        for (s, &v) in sources.iter_mut().zip(read.iter()) {
            if !(v >= 0.0 && (v as usize) < PART && v.fract() == 0.0) {
                return cx.err(format!("the forward read no single pixel ({v})"));
            }
            *s += v as usize * place;
        }
        rest /= PART;
        if rest == 0 {
            break;
        }
        place *= PART;
    }
    let mut dx = vec![0f32; count];
    for (&s, &v) in sources.iter().zip(d.iter()) {
        match dx.get_mut(s) {
            Some(t) => *t += v,
            None => return cx.err(format!("the forward read pixel {s} of {count}")),
        }
    }
    grads[0] = Some(Tensor::F32(super::array(&shape, dx)));
    Ok(grads)
}

/// Cast between float types: the gradient passes unchanged (in f32); none
/// when the input or the output is not a float.
pub fn cast_backward(cx: &OpCtx, g: &Grads) -> Gradients {
    let mut grads = vec![None; g.inputs.len()];
    if !g.wants(0) {
        return Ok(grads);
    }
    let x = input(cx, g.inputs, 0)?;
    let y_is_float = g
        .outputs
        .first()
        .copied()
        .flatten()
        .is_some_and(|y| y.dtype().is_float());
    if !x.dtype().is_float() || !y_is_float {
        return Ok(grads);
    }
    let d = g.d_output(cx, 0)?;
    if d.shape() != x.shape() {
        return cx.err(format!(
            "the output's gradient has shape {:?}, the input {:?}",
            d.shape(),
            x.shape()
        ));
    }
    grads[0] = Some(Tensor::F32(d));
    Ok(grads)
}
