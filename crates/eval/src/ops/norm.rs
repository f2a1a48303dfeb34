//! Softmax and batch normalization's training forward; their gradients.

use super::fastmath;
use super::pointwise::Clamp;
use super::{array, f32_input, lane_dot, lane_sum, Grads};
use crate::{EvalError, OpCtx};
use qgraph_ir::ndarray::{ArrayD, ArrayViewD, Axis, IxDyn};
use qgraph_ir::Tensor;
use rayon::prelude::*;

fn softmax_lanes(y: &mut ArrayD<f32>, axis: usize) {
    for mut lane in y.lanes_mut(Axis(axis)) {
        let max = lane.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for v in lane.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        for v in lane.iter_mut() {
            *v /= sum;
        }
    }
}

/// From opset 13 along one axis (default -1); before, over the input
/// flattened to 2-D at `axis` (default 1).
pub fn softmax(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = f32_input(cx, inputs, 0)?;
    let r = x.ndim();
    let (outer, len, inner) = softmax_layout(cx, x.shape())?;
    if inner == 1 {
        // Rows contiguous in standard order (the last axis, or the input
        // flattened to 2-D): a transformer's attention scores.
        return Ok(vec![Tensor::F32(softmax_contiguous(cx, x, outer, len))]);
    }
    let axis = cx.axis(cx.int_attr("axis", -1)?, r)?;
    let mut y = x.clone();
    softmax_lanes(&mut y, axis);
    Ok(vec![Tensor::F32(y)])
}

/// Softmax of an input no one reads after it: in place when its rows are
/// contiguous (a transformer's attention scores), else by the kernel of
/// record (reduce.rs, any float type).
pub(crate) fn softmax_consuming(
    cx: &OpCtx,
    x: Tensor,
    inputs: &[Option<&Tensor>],
) -> Result<Vec<Tensor>, EvalError> {
    let x = match x {
        Tensor::F32(mut a) => {
            let (outer, len, inner) = softmax_layout(cx, a.shape())?;
            if let (1, Some(values)) = (inner, a.as_slice_mut()) {
                if len > 0 && outer > 0 {
                    let block = ((1 << 14) / len).max(1) * len;
                    values
                        .par_chunks_mut(block)
                        .for_each(|rows| fastmath::softmax_rows_in_place(rows, len));
                }
                return Ok(vec![Tensor::F32(a)]);
            }
            Tensor::F32(a)
        }
        other => other,
    };
    let mut with_x = inputs.to_vec();
    with_x[0] = Some(&x);
    super::reduce::softmax(cx, &with_x)
}

/// Softmax over rows of `len` contiguous values, `outer` of them, in
/// parallel blocks of rows, each row vectorized (see `fastmath`).
fn softmax_contiguous(cx: &OpCtx, x: &ArrayD<f32>, outer: usize, len: usize) -> ArrayD<f32> {
    let xs = x.as_standard_layout();
    let xs = xs.as_slice().expect("standard layout");
    let mut out = cx.buffers.take(x.len());
    if len > 0 && outer > 0 {
        // Blocks of about 16K values: enough to share out, few enough that
        // scheduling costs nothing.
        let block = ((1 << 14) / len).max(1) * len;
        out.par_chunks_mut(block)
            .zip(xs.par_chunks(block))
            .for_each(|(y, x)| fastmath::softmax_rows(x, y, len));
    }
    ArrayD::from_shape_vec(IxDyn(x.shape()), out).expect("same element count")
}

/// The Softmax axis as a 2-D view: (outer, axis length, inner) for opset 13
/// and later, (outer, flattened rest, 1) before.
pub(super) fn softmax_layout(
    cx: &OpCtx,
    shape: &[usize],
) -> Result<(usize, usize, usize), EvalError> {
    let r = shape.len();
    let (axis, flat) = if cx.opset >= 13 {
        (cx.axis(cx.int_attr("axis", -1)?, r)?, false)
    } else {
        (cx.axis(cx.int_attr("axis", 1)?, r)?, true)
    };
    let outer: usize = shape[..axis].iter().product();
    if flat {
        return Ok((outer, shape[axis..].iter().product(), 1));
    }
    Ok((outer, shape[axis], shape[axis + 1..].iter().product()))
}

/// `update(y, dy)` on each lane of the softmax axis (Softmax's and
/// LogSoftmax's, whose layouts are the same) of the output `y` and its
/// gradient `d`, both in standard layout; a lane is gathered, updated and
/// written back, as its values lie `inner` apart.
pub(super) fn for_each_softmax_lane(
    cx: &OpCtx,
    y: ArrayViewD<f32>,
    d: &mut ArrayD<f32>,
    update: impl Fn(&[f32], &mut [f32]),
) -> Result<(), EvalError> {
    let (outer, len, inner) = softmax_layout(cx, y.shape())?;
    let ys = y.as_slice().expect("standard layout");
    let ds = d.as_slice_mut().expect("standard layout");
    let (mut y_lane, mut d_lane) = (vec![0f32; len], vec![0f32; len]);
    for o in 0..outer {
        for i in 0..inner {
            let at = |k: usize| (o * len + k) * inner + i;
            for k in 0..len {
                y_lane[k] = ys[at(k)];
                d_lane[k] = ds[at(k)];
            }
            update(&y_lane, &mut d_lane);
            for k in 0..len {
                ds[at(k)] = d_lane[k];
            }
        }
    }
    Ok(())
}

/// `dx = y * (dy - sum(dy * y))` along the softmax axis.
pub fn softmax_backward(cx: &OpCtx, g: &Grads) -> Result<Vec<Option<Tensor>>, EvalError> {
    let mut grads = vec![None; g.inputs.len()];
    if !g.wants(0) {
        return Ok(grads);
    }
    let y = match g.outputs.first().copied().flatten() {
        Some(Tensor::F32(y)) => y.as_standard_layout(),
        _ => return cx.err("the output was not kept for the backward pass"),
    };
    let mut d = g.d_output(cx, 0)?;
    for_each_softmax_lane(cx, y.view(), &mut d, |ys, ds| {
        let dot: f32 = ds.iter().zip(ys).map(|(d, y)| d * y).sum();
        for (d, &y) in ds.iter_mut().zip(ys) {
            *d = y * (*d - dot);
        }
    })?;
    grads[0] = Some(Tensor::F32(d));
    Ok(grads)
}

/// A BatchNormalization's per-channel parameters (scale, bias, mean,
/// variance) and epsilon, with the channel layout of its input.
struct BatchNorm {
    params: [Vec<f32>; 4],
    eps: f32,
    channels: usize,
    /// Elements per (image, channel) plane.
    inner: usize,
}

impl BatchNorm {
    fn read(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<BatchNorm, EvalError> {
        let x = f32_input(cx, inputs, 0)?;
        if x.ndim() < 2 {
            return cx.err("the input needs a channel axis");
        }
        let channels = x.shape()[1];
        let mut params: [Vec<f32>; 4] = Default::default();
        for (k, p) in params.iter_mut().enumerate() {
            *p = f32_input(cx, inputs, k + 1)?.iter().copied().collect();
            if p.len() != channels {
                return cx.err(format!(
                    "input {} has {} values for {channels} channels",
                    k + 1,
                    p.len()
                ));
            }
        }
        Ok(BatchNorm {
            params,
            eps: cx.float_attr("epsilon", 1e-5)?,
            channels,
            inner: x.shape()[2..].iter().product(),
        })
    }

    /// The planes of channel `c` in standard-layout data.
    fn planes<'d>(&self, data: &'d [f32], c: usize) -> impl Iterator<Item = &'d [f32]> + 'd {
        let (channels, inner) = (self.channels, self.inner);
        data.chunks(inner.max(1)).skip(c).step_by(channels.max(1))
    }
}

/// The normalization of channel `c` as `x * scale + shift`, computed the
/// same way by the forward and backward passes, so that the backward
/// recomputes the forward's outputs to the bit.
#[inline(always)]
fn affine(bn: &BatchNorm, mean: &[f32], var: &[f32], c: usize) -> (f32, f32) {
    let [gamma, beta, _, _] = &bn.params;
    let scale = gamma[c] / (var[c] + bn.eps).sqrt();
    (scale, beta[c] - mean[c] * scale)
}

/// BatchNormalization in training mode: normalised with the batch's own
/// mean and (biased) variance per channel, then clamped by `clamp` when
/// the Relu or Clip after it is fused (the tape then keeps only the clamped
/// output). Returns the output and the statistics `[mean, variance]`, which
/// the backward pass reads and from which a trainer updates the running
/// averages.
pub fn batch_norm_training(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    clamp: Option<Clamp>,
) -> Result<(Tensor, Vec<Tensor>), EvalError> {
    let bn = BatchNorm::read(cx, inputs)?;
    let x = f32_input(cx, inputs, 0)?.as_standard_layout();
    let xs = x.as_slice().expect("standard layout");
    let count = (xs.len() / bn.channels.max(1)).max(1) as f64;
    let (mean, var): (Vec<f32>, Vec<f32>) = (0..bn.channels)
        .into_par_iter()
        .map(|c| {
            let sum: f64 = bn.planes(xs, c).map(|p| lane_sum(p, |v| v)).sum();
            let mean = sum / count;
            let m = mean as f32;
            let var: f64 = bn
                .planes(xs, c)
                .map(|p| lane_sum(p, |v| (v - m) * (v - m)))
                .sum::<f64>()
                / count;
            (mean as f32, var as f32)
        })
        .unzip();
    // Written from x in one pass.
    let mut ys = vec![0f32; xs.len()];
    ys.par_chunks_mut(bn.inner.max(1))
        .zip(xs.par_chunks(bn.inner.max(1)))
        .enumerate()
        .for_each(|(plane, (out, src))| {
            let (scale, shift) = affine(&bn, &mean, &var, plane % bn.channels);
            let values = out.iter_mut().zip(src);
            match clamp {
                None => values.for_each(|(o, &v)| *o = v * scale + shift),
                Some(clamp) => values.for_each(|(o, &v)| *o = clamp.value(v * scale + shift)),
            }
        });
    let y = array(x.shape(), ys);
    let c = bn.channels;
    Ok((
        Tensor::F32(y),
        vec![
            Tensor::F32(array(&[c], mean)),
            Tensor::F32(array(&[c], var)),
        ],
    ))
}

/// The gradient of BatchNormalization: with the batch statistics the
/// training forward saved (their own dependence on x included), or with
/// the running statistics as constants (inference mode). Gradients flow to
/// x, scale and bias; the statistics inputs get none.
pub fn batch_norm_backward(cx: &OpCtx, g: &Grads) -> Result<Vec<Option<Tensor>>, EvalError> {
    let d = g.d_output(cx, 0)?;
    batch_norm_gradients(cx, g, d, None)
}

/// The gradient of a training BatchNormalization whose Relu or Clip
/// `clamp` was fused into it: `d` is the clamped output's gradient, which
/// passes where the clamp's does at the normalised value, recomputed from
/// x and the saved statistics. This saves the clamp's own pass over the
/// gradient and the unclamped output's memory.
pub fn batch_norm_backward_through(
    cx: &OpCtx,
    g: &Grads,
    clamp: Clamp,
) -> Result<Vec<Option<Tensor>>, EvalError> {
    let d = g.d_output(cx, 0)?;
    if d.shape() != f32_input(cx, g.inputs, 0)?.shape() {
        return cx.err("the output's gradient does not have the input's shape");
    }
    batch_norm_gradients(cx, g, d, Some(clamp))
}

fn batch_norm_gradients(
    cx: &OpCtx,
    g: &Grads,
    d: ArrayD<f32>,
    clamp: Option<Clamp>,
) -> Result<Vec<Option<Tensor>>, EvalError> {
    let mut grads = vec![None; g.inputs.len()];
    let bn = BatchNorm::read(cx, g.inputs)?;
    let x = f32_input(cx, g.inputs, 0)?.as_standard_layout();
    let xs = x.as_slice().expect("standard layout");
    let [gamma, _, running_mean, running_var] = &bn.params;
    let (mean, var): (Vec<f32>, Vec<f32>) = if g.training {
        match g.saved {
            [Tensor::F32(m), Tensor::F32(v)] => {
                (m.iter().copied().collect(), v.iter().copied().collect())
            }
            _ => return cx.err("the batch statistics of the training forward are missing"),
        }
    } else {
        (running_mean.clone(), running_var.clone())
    };
    let inner = bn.inner.max(1);
    let ds = d.as_slice().expect("standard layout");
    let count = (xs.len() / bn.channels.max(1)).max(1) as f32;
    // With a fused clamp, the normalised output's gradient at (x, d) of
    // channel c: `d` where the clamp's gradient passes at the recomputed
    // output, else 0.
    let through = |c: usize, clamp: Clamp| {
        let (scale, shift) = affine(&bn, &mean, &var, c);
        move |x: f32, d: f32| d * clamp.slope(x * scale + shift)
    };
    // Per channel: sum(dy) and sum(dy * x_hat).
    let sums: Vec<(f32, f32)> = (0..bn.channels)
        .into_par_iter()
        .map(|c| {
            let inv = 1.0 / (var[c] + bn.eps).sqrt();
            let mean = mean[c];
            let mut sum_d = 0f64;
            let mut sum_dx = 0f64;
            // Compiled once without the clamp and once with it.
            match clamp {
                None => {
                    for (xp, dp) in bn.planes(xs, c).zip(bn.planes(ds, c)) {
                        sum_d += lane_dot(xp, dp, |_, d| d);
                        sum_dx += lane_dot(xp, dp, |x, d| d * (x - mean) * inv);
                    }
                }
                Some(clamp) => {
                    let dy = through(c, clamp);
                    for (xp, dp) in bn.planes(xs, c).zip(bn.planes(ds, c)) {
                        sum_d += lane_dot(xp, dp, dy);
                        sum_dx += lane_dot(xp, dp, |x, d| dy(x, d) * (x - mean) * inv);
                    }
                }
            }
            (sum_d as f32, sum_dx as f32)
        })
        .collect();
    if g.wants(0) {
        // The output's gradient is ours: overwritten with the input's.
        let mut dx = d;
        let dxs = dx.as_slice_mut().expect("standard layout");
        dxs.par_chunks_mut(inner)
            .zip(xs.par_chunks(inner))
            .enumerate()
            .for_each(|(plane, (out, xp))| {
                let c = plane % bn.channels;
                let inv = 1.0 / (var[c] + bn.eps).sqrt();
                let k = gamma[c] * inv;
                if !g.training {
                    out.iter_mut().for_each(|o| *o *= k);
                    return;
                }
                let (sum_d, sum_dx) = sums[c];
                let mean = mean[c];
                let dx = |dy: f32, xv: f32| {
                    let x_hat = (xv - mean) * inv;
                    k * (dy - sum_d / count - x_hat * sum_dx / count)
                };
                match clamp {
                    None => {
                        for (o, &xv) in out.iter_mut().zip(xp) {
                            *o = dx(*o, xv);
                        }
                    }
                    Some(clamp) => {
                        let dy = through(c, clamp);
                        for (o, &xv) in out.iter_mut().zip(xp) {
                            *o = dx(dy(xv, *o), xv);
                        }
                    }
                }
            });
        grads[0] = Some(Tensor::F32(dx));
    }
    let c = bn.channels;
    if g.wants(1) {
        let v = sums.iter().map(|s| s.1).collect();
        grads[1] = Some(Tensor::F32(array(&[c], v)));
    }
    if g.wants(2) {
        let v = sums.iter().map(|s| s.0).collect();
        grads[2] = Some(Tensor::F32(array(&[c], v)));
    }
    Ok(grads)
}
