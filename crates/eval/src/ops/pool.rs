//! Pooling and mean reduction.

use super::conv::window;
use super::{array, f32_input, ints_input_or_attr};
use crate::{EvalError, OpCtx};
use qgraph_ir::Tensor;

fn pool(cx: &OpCtx, inputs: &[Option<&Tensor>], max: bool) -> Result<Vec<Tensor>, EvalError> {
    let x = f32_input(cx, inputs, 0)?;
    if x.ndim() != 4 {
        return cx.err(format!(
            "only 2-D pooling is implemented (input rank {})",
            x.ndim()
        ));
    }
    let (n, c, h, w) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let ceil_mode = cx.int_attr("ceil_mode", 0)? != 0;
    let win = window(cx, &[h, w], None, ceil_mode)?;
    let include_pad = cx.int_attr("count_include_pad", 0)? != 0;
    let (oh, ow) = (win.out[0], win.out[1]);
    let x = x.as_standard_layout();
    let xs = x.as_slice().expect("standard layout");
    let mut out = vec![0f32; n * c * oh * ow];
    let (ph, pw) = (win.pad_begin[0] as isize, win.pad_begin[1] as isize);
    for (plane_i, dst) in out.chunks_mut((oh * ow).max(1)).enumerate().take(n * c) {
        let plane = &xs[plane_i * h * w..][..h * w];
        for y in 0..oh {
            for xo in 0..ow {
                let mut acc = if max { f32::NEG_INFINITY } else { 0.0 };
                let mut count = 0usize;
                let mut padded_count = 0usize;
                for i in 0..win.kernel[0] {
                    let iy = (y * win.strides[0] + i * win.dilations[0]) as isize - ph;
                    for j in 0..win.kernel[1] {
                        let ix = (xo * win.strides[1] + j * win.dilations[1]) as isize - pw;
                        let inside_padded = iy < (h + win.pad_end[0]) as isize
                            && ix < (w + win.pad_end[1]) as isize;
                        if inside_padded {
                            padded_count += 1;
                        }
                        if iy >= 0 && iy < h as isize && ix >= 0 && ix < w as isize {
                            let v = plane[iy as usize * w + ix as usize];
                            if max {
                                acc = acc.max(v);
                            } else {
                                acc += v;
                            }
                            count += 1;
                        }
                    }
                }
                dst[y * ow + xo] = if max {
                    acc
                } else {
                    let d = if include_pad { padded_count } else { count };
                    if d == 0 {
                        0.0
                    } else {
                        acc / d as f32
                    }
                };
            }
        }
    }
    Ok(vec![Tensor::F32(array(&[n, c, oh, ow], out))])
}

pub fn max_pool(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    if cx.graph.node(cx.node).outputs().iter().flatten().count() > 1 {
        return cx.err("the Indices output of MaxPool is not implemented");
    }
    if cx.int_attr("storage_order", 0)? != 0 {
        return cx.err("storage_order 1 is not implemented");
    }
    // 8-bit integers (MaxPool takes them from opset 12): every one is exact
    // in f32, and a maximum picks one of them.
    let narrow = |t: &[Tensor]| -> Vec<f32> {
        match &t[0] {
            Tensor::F32(a) => a.iter().copied().collect(),
            _ => Vec::new(),
        }
    };
    match super::input(cx, i, 0)? {
        Tensor::I8(a) => {
            let f = Tensor::F32(a.mapv(|v| v as f32));
            let out = pool(cx, &[Some(&f)], true)?;
            let shape = out[0].shape().to_vec();
            let v: Vec<i8> = narrow(&out).into_iter().map(|v| v as i8).collect();
            Ok(vec![Tensor::I8(array(&shape, v))])
        }
        Tensor::U8(a) => {
            let f = Tensor::F32(a.mapv(|v| v as f32));
            let out = pool(cx, &[Some(&f)], true)?;
            let shape = out[0].shape().to_vec();
            let v: Vec<u8> = narrow(&out).into_iter().map(|v| v as u8).collect();
            Ok(vec![Tensor::U8(array(&shape, v))])
        }
        _ => pool(cx, i, true),
    }
}

pub fn average_pool(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    pool(cx, i, false)
}

fn global(cx: &OpCtx, inputs: &[Option<&Tensor>], max: bool) -> Result<Vec<Tensor>, EvalError> {
    let x = f32_input(cx, inputs, 0)?;
    if x.ndim() < 3 {
        return cx.err("the input needs spatial dims");
    }
    let (n, c) = (x.shape()[0], x.shape()[1]);
    let inner: usize = x.shape()[2..].iter().product();
    let x = x.as_standard_layout();
    let xs = x.as_slice().expect("standard layout");
    let out: Vec<f32> = (0..n * c)
        .map(|p| {
            let s = &xs[p * inner..][..inner];
            if max {
                s.iter().copied().fold(f32::NEG_INFINITY, f32::max)
            } else {
                s.iter().sum::<f32>() / inner as f32
            }
        })
        .collect();
    let mut shape = vec![n, c];
    shape.extend(std::iter::repeat_n(1, x.ndim() - 2));
    Ok(vec![Tensor::F32(array(&shape, out))])
}

pub fn global_average_pool(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    global(cx, i, false)
}

pub fn global_max_pool(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    global(cx, i, true)
}

/// Axes are an attribute before opset 18, an optional input from 18.
pub fn reduce_mean(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = f32_input(cx, inputs, 0)?;
    let keep = cx.int_attr("keepdims", 1)? != 0;
    let axes = if cx.opset >= 18 {
        ints_input_or_attr(cx, inputs, 1, "axes")?
    } else {
        cx.ints_attr("axes")?
    };
    let mut axes: Vec<usize> = match axes {
        Some(a) if !a.is_empty() => a
            .iter()
            .map(|&v| cx.axis(v, x.ndim()))
            .collect::<Result<_, _>>()?,
        _ if cx.int_attr("noop_with_empty_axes", 0)? != 0 => {
            return Ok(vec![Tensor::F32(x.clone())])
        }
        _ => (0..x.ndim()).collect(),
    };
    axes.sort_unstable();
    axes.dedup();
    let mut y = x.clone();
    for &a in axes.iter().rev() {
        y = match y.mean_axis(qgraph_ir::ndarray::Axis(a)) {
            Some(m) => m,
            None => return cx.err(format!("cannot average over the empty axis {a}")),
        };
        if keep {
            y = y.insert_axis(qgraph_ir::ndarray::Axis(a));
        }
    }
    Ok(vec![Tensor::F32(y)])
}
