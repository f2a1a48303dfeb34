//! Gemm and MatMul, and their gradients.

use super::elementwise::broadcast_shape;
use super::gemm::{gemm as gemm_kernel, MatRef, Threads};
use super::{array, f32_input, sum_to_shape, Grads};
use crate::{EvalError, OpCtx};
use qgraph_ir::ndarray::{ArrayBase, Axis, Data, IxDyn};
use qgraph_ir::Tensor;
use rayon::prelude::*;

/// A 2-D f32 input as a matrix over its data, transposed when `flag` is set.
fn matrix<'a, S: Data<Elem = f32>>(
    cx: &OpCtx,
    a: &'a ArrayBase<S, IxDyn>,
    what: &str,
    transposed: bool,
) -> Result<MatRef<'a>, EvalError> {
    if a.ndim() != 2 {
        return cx.err(format!("{what} must be 2-D, found shape {:?}", a.shape()));
    }
    let Some(data) = a.as_slice() else {
        return cx.err(format!("{what} is not in standard layout"));
    };
    let m = MatRef::row_major(data, a.shape()[0], a.shape()[1]);
    Ok(if transposed { m.transposed() } else { m })
}

pub fn gemm(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let a = f32_input(cx, inputs, 0)?.as_standard_layout();
    let b = f32_input(cx, inputs, 1)?.as_standard_layout();
    let a = matrix(cx, &a, "A", cx.int_attr("transA", 0)? != 0)?;
    let b = matrix(cx, &b, "B", cx.int_attr("transB", 0)? != 0)?;
    let (alpha, beta) = (cx.float_attr("alpha", 1.0)?, cx.float_attr("beta", 1.0)?);
    let (m, k, k2, n) = (a.rows(), a.cols(), b.rows(), b.cols());
    if k != k2 {
        return cx.err(format!("A is {m}x{k} but B is {k2}x{n}"));
    }
    let mut y = vec![0f32; m * n];
    let c_present = inputs.get(2).copied().flatten().is_some();
    if let Some(c) = inputs.get(2).copied().flatten() {
        let Tensor::F32(c) = c else {
            return cx.err(format!("C must be f32, found {}", c.dtype()));
        };
        let Some(cb) = c.broadcast(IxDyn(&[m, n])) else {
            return cx.err(format!(
                "C of shape {:?} does not broadcast to [{m}, {n}]",
                c.shape()
            ));
        };
        for (d, &v) in y.iter_mut().zip(cb.iter()) {
            *d = if beta == 1.0 { v } else { v * beta };
        }
    }
    gemm_kernel(&mut y, n, a, b, alpha, c_present, Threads::Pool);
    Ok(vec![Tensor::F32(array(&[m, n], y))])
}

/// Multiply-adds up to which a product of a batch runs whole on one thread
/// (a 128-token head's scores: 128 x 64 x 128 = 1M).
const SMALL_PRODUCT: usize = 1 << 21;

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
        a.view().insert_axis(Axis(0))
    } else {
        a.view()
    };
    let b = if b_vec {
        b.view().insert_axis(Axis(1))
    } else {
        b.view()
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
    let count: usize = batch.iter().product();
    // Each operand as a stack of matrices; a batch dim of 1 on one side is
    // read again for every matrix of the other (stride 0, no copy).
    // (Copied only when not already in standard layout.)
    let (ad, bd) = (a.as_standard_layout(), b.as_standard_layout());
    let (a_dims, b_dims) = (&a.shape()[..ar - 2], &b.shape()[..br - 2]);
    let (a_size, b_size) = (m * k, k * n);
    let (a_data, b_data) = (
        ad.as_slice().expect("standard layout"),
        bd.as_slice().expect("standard layout"),
    );
    let offset = |dims: &[usize], size: usize, mut i: usize| -> usize {
        // Index of matrix i of the broadcast batch within an operand's own stack.
        let mut index = 0;
        let mut step = 1;
        for (d, &full) in batch.iter().enumerate().rev() {
            let coord = i % full;
            i /= full;
            let own = (d + dims.len()).checked_sub(batch.len()).map(|e| dims[e]);
            if let Some(own) = own {
                if own != 1 {
                    index += coord * step;
                }
                step *= own;
            }
        }
        index * size
    };
    let mut out = cx.buffers.take(count * m * n);
    let b_count: usize = b_dims.iter().product();
    if b_count == 1 {
        // One right matrix for the whole stack (a layer's weights): the
        // left stack is one tall matrix, its rows one after another, and a
        // single product of `count * m` rows packs the weights once and
        // gives the threads large blocks, where a product per matrix
        // (a transformer's batch of sequences) split each small one.
        let am = MatRef::row_major(a_data, count * m, k);
        let bm = MatRef::row_major(b_data, k, n);
        gemm_kernel(&mut out, n, am, bm, 1.0, false, Threads::Pool);
    } else if count >= 2 * rayon::current_num_threads() && m * n * k <= SMALL_PRODUCT {
        // Many small products (attention's scores and mixing, per head):
        // one per task, each on one thread, rather than each split across
        // the threads, whose hand-offs cost more than such a product.
        out.par_chunks_mut((m * n).max(1))
            .enumerate()
            .take(count)
            .for_each(|(i, chunk)| {
                let am = MatRef::row_major(&a_data[offset(a_dims, a_size, i)..], m, k);
                let bm = MatRef::row_major(&b_data[offset(b_dims, b_size, i)..], k, n);
                gemm_kernel(chunk, n, am, bm, 1.0, false, Threads::One);
            });
    } else {
        for (i, chunk) in out.chunks_mut((m * n).max(1)).enumerate().take(count) {
            let am = MatRef::row_major(&a_data[offset(a_dims, a_size, i)..], m, k);
            let bm = MatRef::row_major(&b_data[offset(b_dims, b_size, i)..], k, n);
            gemm_kernel(chunk, n, am, bm, 1.0, false, Threads::Pool);
        }
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

/// Gemm's gradient: with `A' = op(A)`, `B' = op(B)` and `Y = alpha A'B' +
/// beta C`, `dA' = alpha dY B'^T`, `dB' = alpha A'^T dY` (each computed
/// directly in its operand's own orientation) and `dC = beta dY`, summed
/// over the dims C was broadcast along.
pub fn gemm_backward(cx: &OpCtx, g: &Grads) -> Result<Vec<Option<Tensor>>, EvalError> {
    let mut grads = vec![None; g.inputs.len()];
    let (trans_a, trans_b) = (
        cx.int_attr("transA", 0)? != 0,
        cx.int_attr("transB", 0)? != 0,
    );
    let (alpha, beta) = (cx.float_attr("alpha", 1.0)?, cx.float_attr("beta", 1.0)?);
    let a_arr = f32_input(cx, g.inputs, 0)?.as_standard_layout();
    let b_arr = f32_input(cx, g.inputs, 1)?.as_standard_layout();
    let a = matrix(cx, &a_arr, "A", trans_a)?;
    let b = matrix(cx, &b_arr, "B", trans_b)?;
    let d = g.d_output(cx, 0)?;
    let dy = matrix(cx, &d, "the output's gradient", false)?;
    let (m, k, n) = (a.rows(), a.cols(), b.cols());
    if g.wants(0) {
        let mut da = vec![0f32; m * k];
        if trans_a {
            gemm_kernel(&mut da, m, b, dy.transposed(), alpha, false, Threads::Pool);
        } else {
            gemm_kernel(&mut da, k, dy, b.transposed(), alpha, false, Threads::Pool);
        }
        grads[0] = Some(Tensor::F32(array(a_arr.shape(), da)));
    }
    if g.wants(1) {
        let mut db = vec![0f32; k * n];
        if trans_b {
            gemm_kernel(&mut db, k, dy.transposed(), a, alpha, false, Threads::Pool);
        } else {
            gemm_kernel(&mut db, n, a.transposed(), dy, alpha, false, Threads::Pool);
        }
        grads[1] = Some(Tensor::F32(array(b_arr.shape(), db)));
    }
    if g.wants(2) {
        let c = f32_input(cx, g.inputs, 2)?;
        let dc = sum_to_shape(d.mapv(|v| v * beta), c.shape());
        grads[2] = Some(Tensor::F32(dc));
    }
    Ok(grads)
}

/// MatMul's gradient: `dA = dY B^T` and `dB = A^T dY` per matrix of the
/// broadcast batch, summed back over the batch dims each operand was
/// broadcast along (1-D operands as numpy promotes them).
pub fn matmul_backward(cx: &OpCtx, g: &Grads) -> Result<Vec<Option<Tensor>>, EvalError> {
    let mut grads = vec![None; g.inputs.len()];
    if !g.wants(0) && !g.wants(1) {
        return Ok(grads);
    }
    let a0 = f32_input(cx, g.inputs, 0)?;
    let b0 = f32_input(cx, g.inputs, 1)?;
    let a = if a0.ndim() == 1 {
        a0.view().insert_axis(Axis(0))
    } else {
        a0.view()
    };
    let b = if b0.ndim() == 1 {
        b0.view().insert_axis(Axis(1))
    } else {
        b0.view()
    };
    let (ar, br) = (a.ndim(), b.ndim());
    let (m, k, n) = (a.shape()[ar - 2], a.shape()[ar - 1], b.shape()[br - 1]);
    let Some(batch) = broadcast_shape(&a.shape()[..ar - 2], &b.shape()[..br - 2]) else {
        return cx.err("batch dims do not broadcast");
    };
    let full = |rows: usize, cols: usize| -> Vec<usize> {
        let mut s = batch.clone();
        s.extend([rows, cols]);
        s
    };
    let (Some(ab), Some(bb)) = (
        a.broadcast(IxDyn(&full(m, k))),
        b.broadcast(IxDyn(&full(k, n))),
    ) else {
        return cx.err("operands do not broadcast to the batch");
    };
    let (ab, bb) = (ab.as_standard_layout(), bb.as_standard_layout());
    let (a_data, b_data) = (
        ab.as_slice().expect("standard"),
        bb.as_slice().expect("standard"),
    );
    let d = g.d_output(cx, 0)?;
    let ds = d.as_slice().expect("standard layout");
    let count: usize = batch.iter().product();
    if g.wants(0) {
        let mut da = vec![0f32; count * m * k];
        for (i, chunk) in da.chunks_mut((m * k).max(1)).enumerate().take(count) {
            let dy = MatRef::row_major(&ds[i * m * n..], m, n);
            let bm = MatRef::row_major(&b_data[i * k * n..], k, n);
            gemm_kernel(chunk, k, dy, bm.transposed(), 1.0, false, Threads::Pool);
        }
        let da = sum_to_shape(array(&full(m, k), da), a.shape());
        let da = da
            .into_shape_with_order(IxDyn(a0.shape()))
            .expect("same element count");
        grads[0] = Some(Tensor::F32(da));
    }
    if g.wants(1) {
        let mut db = vec![0f32; count * k * n];
        for (i, chunk) in db.chunks_mut((k * n).max(1)).enumerate().take(count) {
            let am = MatRef::row_major(&a_data[i * m * k..], m, k);
            let dy = MatRef::row_major(&ds[i * m * n..], m, n);
            gemm_kernel(chunk, n, am.transposed(), dy, 1.0, false, Threads::Pool);
        }
        let db = sum_to_shape(array(&full(k, n), db), b.shape());
        let db = db
            .into_shape_with_order(IxDyn(b0.shape()))
            .expect("same element count");
        grads[1] = Some(Tensor::F32(db));
    }
    Ok(grads)
}
