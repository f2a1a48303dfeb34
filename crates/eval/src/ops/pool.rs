//! Pooling and mean reduction, and their gradients.

use super::conv::window;
use super::{array, f32_input, ints_input_or_attr, lane_sum, Grads};
use crate::{EvalError, OpCtx};
use qgraph_ir::ndarray::{ArrayD, Axis, IxDyn};
use qgraph_ir::Tensor;
use rayon::prelude::*;

/// A pooling node's geometry over 2-D planes.
struct Pooling {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    win: super::conv::Window,
    include_pad: bool,
    /// Per output row (column): its taps inside the input, the input row
    /// (column) of its first tap, and how many taps lie inside the padded
    /// input.
    rows: Vec<Taps>,
    cols: Vec<Taps>,
}

/// The taps of one output row or column.
#[derive(Clone)]
struct Taps {
    inside: std::ops::Range<usize>,
    /// The input position of tap 0 (may lie in the padding).
    origin: isize,
    padded: usize,
}

fn axis_taps(
    out: usize,
    stride: usize,
    dilation: usize,
    pads: (usize, usize),
    kernel: usize,
    len: usize,
) -> Vec<Taps> {
    (0..out)
        .map(|o| Taps {
            inside: taps_inside(o, stride, dilation, pads.0, kernel, len),
            origin: (o * stride) as isize - pads.0 as isize,
            padded: taps_inside(o, stride, dilation, 0, kernel, len + pads.0 + pads.1).len(),
        })
        .collect()
}

impl Pooling {
    fn read(cx: &OpCtx, shape: &[usize]) -> Result<Pooling, EvalError> {
        if shape.len() != 4 {
            return cx.err(format!(
                "only 2-D pooling is implemented (input rank {})",
                shape.len()
            ));
        }
        let (n, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
        let ceil_mode = cx.int_attr("ceil_mode", 0)? != 0;
        let win = window(cx, &[h, w], None, ceil_mode)?;
        let along = |d: usize, len: usize| {
            axis_taps(
                win.out[d],
                win.strides[d],
                win.dilations[d],
                (win.pad_begin[d], win.pad_end[d]),
                win.kernel[d],
                len,
            )
        };
        Ok(Pooling {
            n,
            c,
            h,
            w,
            rows: along(0, h),
            cols: along(1, w),
            win,
            include_pad: cx.int_attr("count_include_pad", 0)? != 0,
        })
    }

    fn out_plane(&self) -> usize {
        self.win.out[0] * self.win.out[1]
    }

    /// Calls `f` with each input position (within a plane) that the
    /// window of output pixel `(y, x)` reads, in the order the forward
    /// visits them; returns how many it read and the window's size counting
    /// the explicit padding (`count_include_pad`).
    #[inline(always)]
    fn window(&self, y: usize, x: usize, mut f: impl FnMut(usize)) -> (usize, usize) {
        let (rows, cols) = (&self.rows[y], &self.cols[x]);
        let (dh, dw) = (self.win.dilations[0], self.win.dilations[1]);
        for i in rows.inside.clone() {
            let iy = (rows.origin + (i * dh) as isize) as usize;
            for j in cols.inside.clone() {
                f(iy * self.w + (cols.origin + (j * dw) as isize) as usize);
            }
        }
        (
            rows.inside.len() * cols.inside.len(),
            rows.padded * cols.padded,
        )
    }

    /// Whether every window lies wholly inside the input (no padding, no
    /// partial window at the end from `ceil_mode`): then fixed loops over
    /// the kernel's taps, which the compiler vectorises along a row, do
    /// what [`Pooling::window`] does, in the same order.
    fn windows_inside(&self) -> bool {
        self.rows
            .iter()
            .all(|t| t.inside == (0..self.win.kernel[0]))
            && self
                .cols
                .iter()
                .all(|t| t.inside == (0..self.win.kernel[1]))
    }

    /// Where tap `(i, j)` of output row `y`, column 0, reads (windows
    /// inside); column `x` reads `x * strides[1]` further on.
    #[inline(always)]
    fn tap_start(&self, y: usize, i: usize, j: usize) -> usize {
        let iy = self.rows[y].origin as usize + i * self.win.dilations[0];
        iy * self.w + self.cols[0].origin as usize + j * self.win.dilations[1]
    }

    /// The divisor of an average window.
    fn divisor(&self, taps: usize, padded_count: usize) -> usize {
        if self.include_pad {
            padded_count
        } else {
            taps
        }
    }
}

/// The kernel taps `t` of an output position `o` whose input position
/// `o * stride + t * dilation - pad` lies in `0..len`, as a range.
#[inline(always)]
fn taps_inside(
    o: usize,
    stride: usize,
    dilation: usize,
    pad: usize,
    kernel: usize,
    len: usize,
) -> std::ops::Range<usize> {
    let start = o * stride;
    // t * dilation >= pad - start, and start + t * dilation - pad < len.
    let first = pad.saturating_sub(start).div_ceil(dilation);
    let end = (len + pad).saturating_sub(start).div_ceil(dilation);
    first.min(kernel)..end.min(kernel).max(first.min(kernel))
}

fn pool(cx: &OpCtx, inputs: &[Option<&Tensor>], max: bool) -> Result<Vec<Tensor>, EvalError> {
    let x = f32_input(cx, inputs, 0)?;
    let p = Pooling::read(cx, x.shape())?;
    let (oh, ow) = (p.win.out[0], p.win.out[1]);
    let x = x.as_standard_layout();
    let xs = x.as_slice().expect("standard layout");
    let mut out = vec![0f32; p.n * p.c * oh * ow];
    let in_plane = p.h * p.w;
    let inside = p.windows_inside();
    let (kh, kw, sw) = (p.win.kernel[0], p.win.kernel[1], p.win.strides[1]);
    out.par_chunks_mut((oh * ow).max(1))
        .enumerate()
        .take(p.n * p.c)
        .for_each(|(plane_i, dst)| {
            let plane = &xs[plane_i * in_plane..][..in_plane];
            if inside {
                // Each output row takes its taps one at a time across the
                // row: the same folds as below, in the same tap order.
                for (y, row) in dst.chunks_exact_mut(ow.max(1)).enumerate() {
                    row.fill(if max { f32::NEG_INFINITY } else { 0.0 });
                    for i in 0..kh {
                        for j in 0..kw {
                            let taps = &plane[p.tap_start(y, i, j)..];
                            if max {
                                for (o, v) in row.iter_mut().zip(taps.iter().step_by(sw)) {
                                    *o = o.max(*v);
                                }
                            } else {
                                for (o, v) in row.iter_mut().zip(taps.iter().step_by(sw)) {
                                    *o += *v;
                                }
                            }
                        }
                    }
                    if !max {
                        let d = (kh * kw) as f32;
                        row.iter_mut().for_each(|o| *o /= d);
                    }
                }
                return;
            }
            for y in 0..oh {
                for xo in 0..ow {
                    dst[y * ow + xo] = if max {
                        let mut best = f32::NEG_INFINITY;
                        p.window(y, xo, |t| best = best.max(plane[t]));
                        best
                    } else {
                        let mut sum = 0f32;
                        let (count, padded) = p.window(y, xo, |t| sum += plane[t]);
                        match p.divisor(count, padded) {
                            0 => 0.0,
                            d => sum / d as f32,
                        }
                    };
                }
            }
        });
    Ok(vec![Tensor::F32(array(&[p.n, p.c, oh, ow], out))])
}

/// MaxPool for the tape: its output, and for each output the position in
/// its input plane of its window's first maximum (-1 for a window wholly
/// in the padding), where the backward sends its gradient. When every
/// window lies inside the input, one pass finds both: each window's taps in
/// the forward's order, folded with `f32::max` from -inf as [`pool`] folds
/// them (the same bits), while a strict comparison keeps the first maximum.
pub fn max_pool_recording(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
) -> Result<(Vec<Tensor>, Vec<Tensor>), EvalError> {
    // Integer pools have no gradient.
    let Some(Tensor::F32(x)) = inputs.first().copied().flatten() else {
        return Ok((max_pool(cx, inputs)?, Vec::new()));
    };
    check_max_pool(cx)?;
    let p = Pooling::read(cx, x.shape())?;
    let x = x.as_standard_layout();
    let xs = x.as_slice().expect("standard layout");
    let (oh, ow) = (p.win.out[0], p.win.out[1]);
    let (in_plane, out_plane) = (p.h * p.w, (oh * ow).max(1));
    if in_plane > i32::MAX as usize {
        return cx.err(format!("input planes of {in_plane} values are too large"));
    }
    let shape = [p.n, p.c, oh, ow];
    let mut firsts = vec![-1i32; p.n * p.c * oh * ow];
    if !p.windows_inside() {
        firsts
            .par_chunks_mut(out_plane)
            .enumerate()
            .for_each(|(plane_i, dst)| {
                let src = &xs[plane_i * in_plane..][..in_plane];
                for (o, first) in dst.iter_mut().enumerate() {
                    let mut at: Option<usize> = None;
                    p.window(o / ow, o % ow, |t| {
                        if at.is_none_or(|b| src[t] > src[b]) {
                            at = Some(t);
                        }
                    });
                    *first = at.map_or(-1, |t| t as i32);
                }
            });
        let outputs = pool(cx, inputs, true)?;
        return Ok((outputs, vec![Tensor::I32(array(&shape, firsts))]));
    }
    // Tap (i, j) from the window's tap (0, 0), in the forward's order.
    let (kh, kw, sw) = (p.win.kernel[0], p.win.kernel[1], p.win.strides[1]);
    let offsets: Vec<usize> = (0..kh)
        .flat_map(|i| (0..kw).map(move |j| (i, j)))
        .map(|(i, j)| p.tap_start(0, i, j) - p.tap_start(0, 0, 0))
        .collect();
    let mut values = vec![0f32; firsts.len()];
    values
        .par_chunks_mut(out_plane)
        .zip(firsts.par_chunks_mut(out_plane))
        .enumerate()
        .for_each(|(plane_i, (values, firsts))| {
            let src = &xs[plane_i * in_plane..][..in_plane];
            let rows = values.chunks_exact_mut(ow.max(1));
            for (y, (values, firsts)) in rows.zip(firsts.chunks_exact_mut(ow.max(1))).enumerate() {
                let start = p.tap_start(y, 0, 0);
                for (x, (value, first)) in values.iter_mut().zip(firsts).enumerate() {
                    let base = start + x * sw;
                    let mut max = f32::NEG_INFINITY;
                    let (mut at, mut best) = (base, src[base]);
                    for &offset in &offsets {
                        let v = src[base + offset];
                        max = max.max(v);
                        if v > best {
                            (at, best) = (base + offset, v);
                        }
                    }
                    *value = max;
                    *first = at as i32;
                }
            }
        });
    Ok((
        vec![Tensor::F32(array(&shape, values))],
        vec![Tensor::I32(array(&shape, firsts))],
    ))
}

/// MaxPool's gradient: each window's goes to its first maximum, where the
/// tape recorded it (see [`max_pool_recording`]). Planes are independent,
/// so they run in parallel.
pub fn max_pool_backward(cx: &OpCtx, g: &Grads) -> Result<Vec<Option<Tensor>>, EvalError> {
    let mut grads = vec![None; g.inputs.len()];
    if !g.wants(0) {
        return Ok(grads);
    }
    let x = f32_input(cx, g.inputs, 0)?;
    let [Tensor::I32(firsts)] = g.saved else {
        return cx.err("the forward pass did not record where the maxima are");
    };
    let d = g.d_output(cx, 0)?;
    let ds = d.as_slice().expect("standard layout");
    if firsts.shape() != d.shape() || x.ndim() < 2 {
        return cx.err("the recorded maxima do not match the output");
    }
    let firsts = firsts.as_standard_layout();
    let firsts = firsts.as_slice().expect("standard layout");
    let in_plane: usize = x.shape()[2..].iter().product();
    let out_plane: usize = d.shape()[2..].iter().product();
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(in_plane.max(1))
        .zip(ds.par_chunks(out_plane.max(1)))
        .zip(firsts.par_chunks(out_plane.max(1)))
        .for_each(|((dst, dy), at)| {
            for (&dv, &t) in dy.iter().zip(at) {
                if let Some(d) = usize::try_from(t).ok().and_then(|t| dst.get_mut(t)) {
                    *d += dv;
                }
            }
        });
    grads[0] = Some(Tensor::F32(array(x.shape(), dx)));
    Ok(grads)
}

/// AveragePool's gradient: each window's shared by its taps. Planes are
/// independent, so they run in parallel.
pub fn average_pool_backward(cx: &OpCtx, g: &Grads) -> Result<Vec<Option<Tensor>>, EvalError> {
    let mut grads = vec![None; g.inputs.len()];
    if !g.wants(0) {
        return Ok(grads);
    }
    let x = f32_input(cx, g.inputs, 0)?;
    let p = Pooling::read(cx, x.shape())?;
    let d = g.d_output(cx, 0)?;
    let ds = d.as_slice().expect("standard layout");
    let (in_plane, out_plane, ow) = (p.h * p.w, p.out_plane(), p.win.out[1]);
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(in_plane.max(1))
        .zip(ds.par_chunks(out_plane.max(1)))
        .for_each(|(dst, dy)| {
            for (o, &dv) in dy.iter().enumerate() {
                let (y, xo) = (o / ow.max(1), o % ow.max(1));
                let (count, padded) = p.window(y, xo, |_| {});
                let divisor = p.divisor(count, padded);
                if divisor > 0 {
                    let share = dv / divisor as f32;
                    p.window(y, xo, |t| dst[t] += share);
                }
            }
        });
    grads[0] = Some(Tensor::F32(array(x.shape(), dx)));
    Ok(grads)
}

/// What MaxPool does not implement.
fn check_max_pool(cx: &OpCtx) -> Result<(), EvalError> {
    if cx.graph.node(cx.node).outputs().iter().flatten().count() > 1 {
        return cx.err("the Indices output of MaxPool is not implemented");
    }
    if cx.int_attr("storage_order", 0)? != 0 {
        return cx.err("storage_order 1 is not implemented");
    }
    Ok(())
}

pub fn max_pool(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    check_max_pool(cx)?;
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
    // Planes in parallel; each plane's value is computed on its own, so
    // the thread count does not change it.
    let out: Vec<f32> = (0..n * c)
        .into_par_iter()
        .with_min_len((16384 / inner.max(1)).max(1))
        .map(|p| {
            let s = &xs[p * inner..][..inner];
            if max {
                s.iter().copied().fold(f32::NEG_INFINITY, f32::max)
            } else {
                // Summed in vector lanes, not one long chain of dependent adds.
                (lane_sum(s, |v| v) / inner as f64) as f32
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

/// The axes ReduceMean averages over, sorted (`None`: it is a no-op).
/// Axes are an attribute before opset 18, an optional input from 18.
fn mean_axes(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    rank: usize,
) -> Result<Option<Vec<usize>>, EvalError> {
    let axes = if cx.opset >= 18 {
        ints_input_or_attr(cx, inputs, 1, "axes")?
    } else {
        cx.ints_attr("axes")?
    };
    let mut axes: Vec<usize> = match axes {
        Some(a) if !a.is_empty() => a
            .iter()
            .map(|&v| cx.axis(v, rank))
            .collect::<Result<_, _>>()?,
        _ if cx.int_attr("noop_with_empty_axes", 0)? != 0 => return Ok(None),
        _ => (0..rank).collect(),
    };
    axes.sort_unstable();
    axes.dedup();
    Ok(Some(axes))
}

pub fn reduce_mean(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = f32_input(cx, inputs, 0)?;
    let keep = cx.int_attr("keepdims", 1)? != 0;
    let Some(axes) = mean_axes(cx, inputs, x.ndim())? else {
        return Ok(vec![Tensor::F32(x.clone())]);
    };
    let mut y = x.clone();
    for &a in axes.iter().rev() {
        y = match y.mean_axis(Axis(a)) {
            Some(m) => m,
            None => return cx.err(format!("cannot average over the empty axis {a}")),
        };
        if keep {
            y = y.insert_axis(Axis(a));
        }
    }
    Ok(vec![Tensor::F32(y)])
}

/// A mean's gradient: the output's gradient, spread evenly over the
/// averaged axes.
fn spread_mean(d: ArrayD<f32>, axes: &[usize], shape: &[usize], keep: bool) -> ArrayD<f32> {
    let mut d = d;
    if !keep {
        for &a in axes {
            d = d.insert_axis(Axis(a));
        }
    }
    let count: usize = axes.iter().map(|&a| shape[a]).product();
    let scale = 1.0 / count.max(1) as f32;
    d.broadcast(IxDyn(shape))
        .expect("a mean's output broadcasts back over its axes")
        .mapv(|v| v * scale)
}

pub fn reduce_mean_backward(cx: &OpCtx, g: &Grads) -> Result<Vec<Option<Tensor>>, EvalError> {
    let mut grads = vec![None; g.inputs.len()];
    if !g.wants(0) {
        return Ok(grads);
    }
    let x = f32_input(cx, g.inputs, 0)?;
    let d = g.d_output(cx, 0)?;
    grads[0] = Some(Tensor::F32(match mean_axes(cx, g.inputs, x.ndim())? {
        None => d,
        Some(axes) => spread_mean(d, &axes, x.shape(), cx.int_attr("keepdims", 1)? != 0),
    }));
    Ok(grads)
}

pub fn global_average_pool_backward(
    cx: &OpCtx,
    g: &Grads,
) -> Result<Vec<Option<Tensor>>, EvalError> {
    let mut grads = vec![None; g.inputs.len()];
    if !g.wants(0) {
        return Ok(grads);
    }
    let x = f32_input(cx, g.inputs, 0)?;
    let axes: Vec<usize> = (2..x.ndim()).collect();
    let d = g.d_output(cx, 0)?;
    grads[0] = Some(Tensor::F32(spread_mean(d, &axes, x.shape(), true)));
    Ok(grads)
}
