//! Gemm and MatMul.

use super::elementwise::broadcast_shape;
use super::{array, f32_input};
use crate::{EvalError, OpCtx};
use qgraph_ir::ndarray::{
    linalg::general_mat_mul, s, Array2, ArrayView2, ArrayViewMut2, Axis, Ix2, IxDyn,
};
use qgraph_ir::Tensor;
use rayon::prelude::*;

fn as_2d<'a>(
    cx: &OpCtx,
    a: &'a qgraph_ir::ndarray::ArrayD<f32>,
    what: &str,
) -> Result<ArrayView2<'a, f32>, EvalError> {
    match a.view().into_dimensionality::<Ix2>() {
        Ok(v) => Ok(v),
        Err(_) => cx.err(format!("{what} must be 2-D, found shape {:?}", a.shape())),
    }
}

pub fn gemm(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let a = as_2d(cx, f32_input(cx, inputs, 0)?, "A")?;
    let b = as_2d(cx, f32_input(cx, inputs, 1)?, "B")?;
    let a = if cx.int_attr("transA", 0)? != 0 {
        a.reversed_axes()
    } else {
        a
    };
    let b = if cx.int_attr("transB", 0)? != 0 {
        b.reversed_axes()
    } else {
        b
    };
    let (alpha, beta) = (cx.float_attr("alpha", 1.0)?, cx.float_attr("beta", 1.0)?);
    let (m, k) = a.dim();
    let (k2, n) = b.dim();
    if k != k2 {
        return cx.err(format!("A is {m}x{k} but B is {k2}x{n}"));
    }
    let mut y = Array2::<f32>::zeros((m, n));
    let c_present = inputs.get(2).copied().flatten().is_some();
    if let Some(c) = inputs.get(2).copied().flatten() {
        let Tensor::F32(c) = c else {
            return cx.err(format!("C must be f32, found {}", c.dtype()));
        };
        match c.broadcast(IxDyn(&[m, n])) {
            Some(cb) => y.assign(&cb.into_dimensionality::<Ix2>().expect("broadcast to 2-D")),
            None => {
                return cx.err(format!(
                    "C of shape {:?} does not broadcast to [{m}, {n}]",
                    c.shape()
                ))
            }
        }
        if beta != 1.0 {
            y.mapv_inplace(|v| v * beta);
        }
    }
    par_mat_mul(alpha, &a, &b, if c_present { 1.0 } else { 0.0 }, &mut y);
    Ok(vec![Tensor::F32(y.into_dyn())])
}

/// `y = alpha * a b + beta * y`, with the rows of `y` split across threads
/// (nested inside other parallel work, rayon balances the two). Each element
/// is computed as a single-threaded product computes it, so the result does
/// not depend on the number of threads.
pub fn par_mat_mul_view(
    alpha: f32,
    a: &ArrayView2<f32>,
    b: &ArrayView2<f32>,
    beta: f32,
    y: &mut ArrayViewMut2<f32>,
) {
    let (m, n) = y.dim();
    let threads = rayon::current_num_threads().max(1);
    let rows = m.div_ceil(threads).max(8);
    if rows >= m || n == 0 || a.ncols() * n < 4096 {
        general_mat_mul(alpha, a, b, beta, y);
        return;
    }
    let blocks: Vec<(usize, ArrayViewMut2<f32>)> = y
        .axis_chunks_iter_mut(Axis(0), rows)
        .enumerate()
        .map(|(i, c)| (i * rows, c))
        .collect();
    blocks.into_par_iter().for_each(|(r0, mut yv)| {
        let r = yv.nrows();
        general_mat_mul(alpha, &a.slice(s![r0..r0 + r, ..]), b, beta, &mut yv);
    });
}

fn par_mat_mul(
    alpha: f32,
    a: &ArrayView2<f32>,
    b: &ArrayView2<f32>,
    beta: f32,
    y: &mut Array2<f32>,
) {
    par_mat_mul_view(alpha, a, b, beta, &mut y.view_mut());
}

/// numpy matmul: 1-D operands are promoted, batch dims broadcast.
pub fn matmul(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let a = f32_input(cx, inputs, 0)?;
    let b = f32_input(cx, inputs, 1)?;
    if a.ndim() == 0 || b.ndim() == 0 {
        return cx.err("MatMul operands must have rank 1 or more");
    }
    let a_vec = a.ndim() == 1;
    let b_vec = b.ndim() == 1;
    let a = if a_vec {
        a.clone().insert_axis(Axis(0))
    } else {
        a.clone()
    };
    let b = if b_vec {
        b.clone().insert_axis(Axis(1))
    } else {
        b.clone()
    };
    let (ar, br) = (a.ndim(), b.ndim());
    let (m, k) = (a.shape()[ar - 2], a.shape()[ar - 1]);
    let (k2, n) = (b.shape()[br - 2], b.shape()[br - 1]);
    if k != k2 {
        return cx.err(format!(
            "inner dimensions differ: {:?} x {:?}",
            a.shape(),
            b.shape()
        ));
    }
    let Some(batch) = broadcast_shape(&a.shape()[..ar - 2], &b.shape()[..br - 2]) else {
        return cx.err(format!(
            "batch dims of {:?} and {:?} do not broadcast",
            a.shape(),
            b.shape()
        ));
    };
    let mut full_a = batch.clone();
    full_a.extend([m, k]);
    let mut full_b = batch.clone();
    full_b.extend([k, n]);
    let (av, bv) = match (a.broadcast(IxDyn(&full_a)), b.broadcast(IxDyn(&full_b))) {
        (Some(x), Some(y)) => (x, y),
        _ => return cx.err("operands do not broadcast"),
    };
    let count: usize = batch.iter().product();
    let av = av
        .to_shape((count, m, k))
        .map_err(|e| crate::EvalError::Op {
            node: cx.describe(),
            message: e.to_string(),
        })?;
    let bv = bv
        .to_shape((count, k, n))
        .map_err(|e| crate::EvalError::Op {
            node: cx.describe(),
            message: e.to_string(),
        })?;
    let mut out = vec![0f32; count * m * n];
    for (i, chunk) in out.chunks_mut((m * n).max(1)).enumerate().take(count) {
        let mut o =
            qgraph_ir::ndarray::ArrayViewMut2::from_shape((m, n), chunk).expect("output block");
        general_mat_mul(
            1.0,
            &av.index_axis(Axis(0), i),
            &bv.index_axis(Axis(0), i),
            0.0,
            &mut o,
        );
    }
    let mut shape = batch;
    if !a_vec {
        shape.push(m);
    }
    if !b_vec {
        shape.push(n);
    }
    Ok(vec![Tensor::F32(array(&shape, out))])
}
