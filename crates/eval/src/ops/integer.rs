//! Integer operators with ONNX reference semantics: ConvInteger,
//! MatMulInteger, QLinearConv, QLinearMatMul, DynamicQuantizeLinear.
//! Accumulation is int32 with wrap-around (as numpy's int32 arithmetic in
//! the reference); requantization multiplies the int32 result, in f64, by the
//! f32 multiplier `(scale_a * scale_b) / scale_y`, then rounds half to even
//! and saturates.

use super::conv::window;
use super::elementwise::broadcast_shape;
use super::{array, f32_input, input};
use crate::{EvalError, OpCtx};
use qgraph_ir::{DataType, Tensor};

pub(super) fn ints(cx: &OpCtx, t: &Tensor, what: &str) -> Result<Vec<i32>, EvalError> {
    Ok(match t {
        Tensor::I8(a) => a.iter().map(|&v| v as i32).collect(),
        Tensor::U8(a) => a.iter().map(|&v| v as i32).collect(),
        Tensor::I32(a) => a.iter().copied().collect(),
        t => return cx.err(format!("{what} must be int8 or uint8, found {}", t.dtype())),
    })
}

/// A zero point: absent (0), one value, or one per channel (`per` values).
pub(super) fn zero_points(
    cx: &OpCtx,
    t: Option<&Tensor>,
    per: usize,
    what: &str,
) -> Result<Vec<i32>, EvalError> {
    match t {
        None => Ok(vec![0]),
        Some(t) => {
            let v = ints(cx, t, what)?;
            if v.len() == 1 || v.len() == per {
                Ok(v)
            } else {
                cx.err(format!(
                    "{what} must have 1 or {per} values, found {}",
                    v.len()
                ))
            }
        }
    }
}

pub(super) fn scales(
    cx: &OpCtx,
    t: &Tensor,
    per: usize,
    what: &str,
) -> Result<Vec<f32>, EvalError> {
    // float16 and bfloat16 scales are exact in f32.
    let widened;
    let a = match t {
        Tensor::F32(a) => a,
        Tensor::F16(a) => {
            widened = a.mapv(f32::from);
            &widened
        }
        Tensor::BF16(a) => {
            widened = a.mapv(f32::from);
            &widened
        }
        t => return cx.err(format!("{what} must be a float, found {}", t.dtype())),
    };
    if a.len() == 1 || a.len() == per {
        Ok(a.iter().copied().collect())
    } else {
        cx.err(format!(
            "{what} must have 1 or {per} values, found {}",
            a.len()
        ))
    }
}

/// The tensor's values minus their zero point; `channel(e)` picks the zero
/// point of element `e` when there is one per channel.
fn centered(
    cx: &OpCtx,
    t: &Tensor,
    what: &str,
    zp: &[i32],
    channel: impl Fn(usize) -> usize,
) -> Result<Vec<i32>, EvalError> {
    Ok(ints(cx, t, what)?
        .into_iter()
        .enumerate()
        .map(|(e, v)| v - pick(zp, channel(e)))
        .collect())
}

fn pick<T: Copy>(v: &[T], i: usize) -> T {
    if v.len() == 1 {
        v[0]
    } else {
        v[i]
    }
}

/// 2-D convolution of int32 data (zero points already subtracted), with
/// wrap-around accumulation. Returns the output and its shape.
///
/// Per image and group: the input's patches gathered into a `K x P` matrix
/// (im2col; padding reads 0, the zero point once centred), then each output
/// channel's row is a sum of `K` scaled rows of it, an inner loop over
/// pixels that the compiler vectorises. Images and groups run in parallel;
/// integer sums do not depend on the order, so neither does the result.
fn conv_i32(
    cx: &OpCtx,
    x: &[i32],
    xs: &[usize],
    w: &[i32],
    ws: &[usize],
) -> Result<(Vec<i32>, Vec<usize>), EvalError> {
    use rayon::prelude::*;
    if xs.len() != 4 || ws.len() != 4 {
        return cx.err("only 2-D convolution is implemented");
    }
    let (n, c, h, wd) = (xs[0], xs[1], xs[2], xs[3]);
    let (m, cg, kh, kw) = (ws[0], ws[1], ws[2], ws[3]);
    let group = cx.int_attr("group", 1)?;
    if group < 1 || c % group as usize != 0 || m % group as usize != 0 || c / group as usize != cg {
        return cx.err(format!(
            "group {group} does not fit {c} input channels, weights {ws:?}"
        ));
    }
    let groups = group as usize;
    let mg = m / groups;
    let win = window(cx, &[h, wd], Some(vec![kh, kw]), false)?;
    let (oh, ow) = (win.out[0], win.out[1]);
    let pixels = oh * ow;
    let k = cg * kh * kw;
    // Where each tap reads for each output pixel (None: padding).
    let taps: Vec<Vec<Option<usize>>> = (0..kh * kw)
        .map(|t| {
            let (i, j) = (t / kw, t % kw);
            (0..pixels)
                .map(|p| {
                    let iy = ((p / ow) * win.strides[0] + i * win.dilations[0])
                        .checked_sub(win.pad_begin[0])?;
                    let ix = ((p % ow) * win.strides[1] + j * win.dilations[1])
                        .checked_sub(win.pad_begin[1])?;
                    (iy < h && ix < wd).then_some(iy * wd + ix)
                })
                .collect()
        })
        .collect();
    let mut out = vec![0i32; n * m * pixels];
    out.par_chunks_mut((mg * pixels).max(1))
        .enumerate()
        .for_each(|(block, dst)| {
            let (b, g) = (block / groups, block % groups);
            let mut cols = vec![0i32; k * pixels];
            for ci in 0..cg {
                let plane = &x[(b * c + g * cg + ci) * h * wd..][..h * wd];
                for (t, tap) in taps.iter().enumerate() {
                    let row = &mut cols[(ci * kh * kw + t) * pixels..][..pixels];
                    for (d, src) in row.iter_mut().zip(tap) {
                        *d = src.map_or(0, |s| plane[s]);
                    }
                }
            }
            for (o, acc) in dst.chunks_mut(pixels.max(1)).enumerate() {
                let ker = &w[(g * mg + o) * k..][..k];
                for (kk, &wv) in ker.iter().enumerate() {
                    if wv == 0 {
                        continue;
                    }
                    let row = &cols[kk * pixels..][..pixels];
                    for (a, &v) in acc.iter_mut().zip(row) {
                        *a = a.wrapping_add(v.wrapping_mul(wv));
                    }
                }
            }
        });
    Ok((out, vec![n, m, oh, ow]))
}

/// Batched int32 matmul with numpy broadcasting of batch dims (2-D and up).
fn matmul_i32(
    cx: &OpCtx,
    a: &[i32],
    ash: &[usize],
    b: &[i32],
    bsh: &[usize],
) -> Result<(Vec<i32>, Vec<usize>), EvalError> {
    if ash.len() < 2 || bsh.len() < 2 {
        return cx.err("operands must have rank 2 or more");
    }
    let (m, k) = (ash[ash.len() - 2], ash[ash.len() - 1]);
    let (k2, n) = (bsh[bsh.len() - 2], bsh[bsh.len() - 1]);
    if k != k2 {
        return cx.err(format!("inner dimensions differ: {ash:?} x {bsh:?}"));
    }
    let (ab, bb) = (&ash[..ash.len() - 2], &bsh[..bsh.len() - 2]);
    let Some(batch) = broadcast_shape(ab, bb) else {
        return cx.err(format!(
            "batch dims of {ash:?} and {bsh:?} do not broadcast"
        ));
    };
    let count: usize = batch.iter().product();
    // Offset of batch item `i` in an operand with batch dims `dims`.
    let offset = |i: usize, dims: &[usize], block: usize| -> usize {
        let mut rem = i;
        let mut idx = 0;
        let mut stride = 1;
        for (d, &full) in batch.iter().enumerate().rev() {
            let coord = rem % full;
            rem /= full;
            let k = d as isize - (batch.len() as isize - dims.len() as isize);
            if k >= 0 {
                let size = dims[k as usize];
                idx += if size == 1 { 0 } else { coord } * stride;
                stride *= size;
            }
        }
        idx * block
    };
    let mut out = vec![0i32; count * m * n];
    // Each output row is a sum of scaled rows of b: an inner loop over
    // columns that vectorises; rows in parallel (integer sums, so the result
    // does not depend on the split).
    use rayon::prelude::*;
    out.par_chunks_mut(n.max(1))
        .enumerate()
        .for_each(|(row, dst)| {
            let (bi, r) = (row / m.max(1), row % m.max(1));
            let (ao, bo) = (offset(bi, ab, m * k), offset(bi, bb, k * n));
            for t in 0..k {
                let av = a[ao + r * k + t];
                if av == 0 {
                    continue;
                }
                let brow = &b[bo + t * n..][..n];
                for (d, &bv) in dst.iter_mut().zip(brow) {
                    *d = d.wrapping_add(av.wrapping_mul(bv));
                }
            }
        });
    let mut shape = batch;
    shape.extend([m, n]);
    Ok((out, shape))
}

pub fn conv_integer(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let (x, w) = (input(cx, i, 0)?, input(cx, i, 1)?);
    let m = w.shape().first().copied().unwrap_or(0);
    let xzp = zero_points(cx, i.get(2).copied().flatten(), 1, "x_zero_point")?;
    let wzp = zero_points(cx, i.get(3).copied().flatten(), m, "w_zero_point")?;
    let xv = centered(cx, x, "x", &xzp, |_| 0)?;
    let per_oc = w.shape()[1..].iter().product::<usize>().max(1);
    let wv = centered(cx, w, "w", &wzp, |e| e / per_oc)?;
    let (out, shape) = conv_i32(cx, &xv, x.shape(), &wv, w.shape())?;
    Ok(vec![Tensor::I32(array(&shape, out))])
}

pub fn matmul_integer(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let (a, b) = (input(cx, i, 0)?, input(cx, i, 1)?);
    let n = b.shape().last().copied().unwrap_or(1);
    let azp = zero_points(cx, i.get(2).copied().flatten(), 1, "a_zero_point")?;
    let bzp = zero_points(cx, i.get(3).copied().flatten(), n, "b_zero_point")?;
    let av = centered(cx, a, "A", &azp, |_| 0)?;
    let bv = centered(cx, b, "B", &bzp, |e| e % n.max(1))?;
    let (out, shape) = matmul_i32(cx, &av, a.shape(), &bv, b.shape())?;
    Ok(vec![Tensor::I32(array(&shape, out))])
}

/// Requantizes int32 accumulators: `acc * m` in f64 with `m` an f32
/// multiplier per channel, plus the output zero point, saturated, rounded
/// half to even.
fn requantize(
    cx: &OpCtx,
    acc: &[i32],
    channel_of: impl Fn(usize) -> usize,
    mult: &[f32],
    zp: i32,
    out_type: DataType,
    shape: &[usize],
) -> Result<Tensor, EvalError> {
    let (lo, hi) = match out_type {
        DataType::I8 => (-128.0, 127.0),
        DataType::U8 => (0.0, 255.0),
        t => return cx.err(format!("output type {t} is not int8 or uint8")),
    };
    let q: Vec<i128> = acc
        .iter()
        .enumerate()
        .map(|(e, &a)| {
            let r = a as f64 * pick(mult, channel_of(e)) as f64 + zp as f64;
            r.clamp(lo, hi).round_ties_even() as i128
        })
        .collect();
    Tensor::from_ints(out_type, shape, &q).map_err(|e| EvalError::Op {
        node: cx.describe(),
        message: e.to_string(),
    })
}

pub fn qlinear_conv(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let (x, w) = (input(cx, i, 0)?, input(cx, i, 3)?);
    let m = w.shape().first().copied().unwrap_or(0);
    let xs = scales(cx, input(cx, i, 1)?, 1, "x_scale")?;
    let xzp = zero_points(cx, i.get(2).copied().flatten(), 1, "x_zero_point")?;
    let wsc = scales(cx, input(cx, i, 4)?, m, "w_scale")?;
    let wzp = zero_points(cx, i.get(5).copied().flatten(), m, "w_zero_point")?;
    let ys = scales(cx, input(cx, i, 6)?, 1, "y_scale")?;
    let y_zp_t = i.get(7).copied().flatten();
    let yzp = zero_points(cx, y_zp_t, 1, "y_zero_point")?;
    let xv = centered(cx, x, "x", &xzp, |_| 0)?;
    let per_oc = w.shape()[1..].iter().product::<usize>().max(1);
    let wv = centered(cx, w, "w", &wzp, |e| e / per_oc)?;
    let (mut acc, shape) = conv_i32(cx, &xv, x.shape(), &wv, w.shape())?;
    let plane = shape[2] * shape[3];
    if let Some(b) = i.get(8).copied().flatten() {
        let Tensor::I32(b) = b else {
            return cx.err(format!("B must be int32, found {}", b.dtype()));
        };
        let bias: Vec<i32> = b.iter().copied().collect();
        if bias.len() != m && bias.len() != 1 {
            return cx.err(format!("B must have {m} values"));
        }
        for (e, a) in acc.iter_mut().enumerate() {
            *a = a.wrapping_add(pick(&bias, (e / plane) % m));
        }
    }
    let mult: Vec<f32> = (0..wsc.len()).map(|c| xs[0] * wsc[c] / ys[0]).collect();
    let out_type = y_zp_t.map_or(x.dtype(), Tensor::dtype);
    Ok(vec![requantize(
        cx,
        &acc,
        |e| (e / plane) % m,
        &mult,
        yzp[0],
        out_type,
        &shape,
    )?])
}

pub fn qlinear_matmul(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let (a, b) = (input(cx, i, 0)?, input(cx, i, 3)?);
    let n = b.shape().last().copied().unwrap_or(1);
    let asc = scales(cx, input(cx, i, 1)?, 1, "a_scale")?;
    let azp = zero_points(cx, i.get(2).copied().flatten(), 1, "a_zero_point")?;
    let bsc = scales(cx, input(cx, i, 4)?, n, "b_scale")?;
    let bzp = zero_points(cx, i.get(5).copied().flatten(), n, "b_zero_point")?;
    let ys = scales(cx, input(cx, i, 6)?, 1, "y_scale")?;
    let y_zp_t = i.get(7).copied().flatten();
    let yzp = zero_points(cx, y_zp_t, 1, "y_zero_point")?;
    let av = centered(cx, a, "a", &azp, |_| 0)?;
    let bv = centered(cx, b, "b", &bzp, |e| e % n.max(1))?;
    let (acc, shape) = matmul_i32(cx, &av, a.shape(), &bv, b.shape())?;
    let mult: Vec<f32> = (0..bsc.len()).map(|c| asc[0] * bsc[c] / ys[0]).collect();
    let out_type = y_zp_t.map_or(a.dtype(), Tensor::dtype);
    Ok(vec![requantize(
        cx,
        &acc,
        |e| e % n.max(1),
        &mult,
        yzp[0],
        out_type,
        &shape,
    )?])
}

/// uint8 quantization with a scale and zero point computed from the data,
/// in f32 as the reference does.
pub fn dynamic_quantize_linear(
    cx: &OpCtx,
    i: &[Option<&Tensor>],
) -> Result<Vec<Tensor>, EvalError> {
    let x = f32_input(cx, i, 0)?;
    let maxx = x.iter().copied().fold(0f32, f32::max);
    let minx = x.iter().copied().fold(0f32, f32::min);
    let scale = (if maxx == minx { 1.0 } else { maxx - minx }) / 255f32;
    let initial = 0f32 - minx / scale;
    let zp = initial.clamp(0.0, 255.0).round_ties_even();
    let q: Vec<i128> = x
        .iter()
        .map(|&v| ((v / scale).round_ties_even() + zp).clamp(0.0, 255.0) as i128)
        .collect();
    let y = Tensor::from_ints(DataType::U8, x.shape(), &q).map_err(|e| EvalError::Op {
        node: cx.describe(),
        message: e.to_string(),
    })?;
    Ok(vec![
        y,
        Tensor::scalar_f32(scale),
        Tensor::U8(array(&[], vec![zp as u8])),
    ])
}
