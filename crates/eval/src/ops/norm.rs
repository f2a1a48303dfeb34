//! Softmax.

use super::f32_input;
use crate::{EvalError, OpCtx};
use qgraph_ir::ndarray::{ArrayD, Axis, IxDyn};
use qgraph_ir::Tensor;

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
