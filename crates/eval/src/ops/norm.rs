//! BatchNormalization (inference) and Softmax.

use super::f32_input;
use crate::{EvalError, OpCtx};
use qgraph_ir::ndarray::{ArrayD, Axis, IxDyn};
use qgraph_ir::Tensor;
use rayon::prelude::*;

pub fn batch_norm(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = f32_input(cx, inputs, 0)?;
    let eps = cx.float_attr("epsilon", 1e-5)?;
    if cx.int_attr("training_mode", 0)? != 0 {
        return cx.err("training_mode batch normalization is not evaluated (inference only)");
    }
    if x.ndim() < 2 {
        return cx.err("the input needs a channel axis");
    }
    let c = x.shape()[1];
    let mut params = Vec::with_capacity(4);
    for k in 1..5 {
        let p = f32_input(cx, inputs, k)?;
        if p.len() != c {
            return cx.err(format!("input {k} has {} values for {c} channels", p.len()));
        }
        params.push(p.iter().copied().collect::<Vec<f32>>());
    }
    let (scale, bias, mean, var) = (&params[0], &params[1], &params[2], &params[3]);
    let a: Vec<f32> = (0..c).map(|i| scale[i] / (var[i] + eps).sqrt()).collect();
    let b: Vec<f32> = (0..c).map(|i| bias[i] - mean[i] * a[i]).collect();
    let inner: usize = x.shape()[2..].iter().product();
    let src = x.as_standard_layout();
    let data = src.as_slice().expect("standard layout");
    let mut out = vec![0f32; data.len()];
    out.par_chunks_mut(inner.max(1))
        .zip(data.par_chunks(inner.max(1)))
        .enumerate()
        .for_each(|(block, (o, i))| {
            let ch = block % c;
            for (d, &v) in o.iter_mut().zip(i) {
                *d = v * a[ch] + b[ch];
            }
        });
    let y = ArrayD::from_shape_vec(IxDyn(x.shape()), out).expect("same element count");
    Ok(vec![Tensor::F32(y)])
}

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
    if cx.opset >= 13 {
        let axis = cx.axis(cx.int_attr("axis", -1)?, r)?;
        let mut y = x.clone();
        softmax_lanes(&mut y, axis);
        return Ok(vec![Tensor::F32(y)]);
    }
    let axis = cx.axis(cx.int_attr("axis", 1)?, r)?;
    let outer: usize = x.shape()[..axis].iter().product();
    let inner: usize = x.shape()[axis..].iter().product();
    let mut y = x
        .as_standard_layout()
        .into_owned()
        .into_shape_with_order(IxDyn(&[outer, inner]))
        .expect("same element count");
    softmax_lanes(&mut y, 1);
    let y = y
        .into_shape_with_order(IxDyn(x.shape()))
        .expect("same element count");
    Ok(vec![Tensor::F32(y)])
}
