//! Convolution: im2col + matrix product per group, a direct kernel for
//! depthwise convolution, and the window arithmetic shared with pooling.

use super::{array, f32_input};
use crate::{EvalError, OpCtx};
use qgraph_ir::ndarray::{Array2, ArrayView2};
use qgraph_ir::Tensor;
use rayon::prelude::*;

/// Window geometry over the spatial dims.
pub struct Window {
    pub kernel: Vec<usize>,
    pub strides: Vec<usize>,
    pub dilations: Vec<usize>,
    pub pad_begin: Vec<usize>,
    pub pad_end: Vec<usize>,
    pub out: Vec<usize>,
}

fn positive(cx: &OpCtx, v: Vec<i64>, what: &str) -> Result<Vec<usize>, EvalError> {
    v.into_iter()
        .map(|x| {
            if x >= 1 {
                Ok(x as usize)
            } else {
                cx.err(format!("{what} must be positive, found {x}"))
            }
        })
        .collect()
}

/// Reads kernel_shape (or takes `kernel`), strides, dilations, pads and
/// auto_pad, and computes the output size of each spatial dim.
pub fn window(
    cx: &OpCtx,
    input: &[usize],
    kernel: Option<Vec<usize>>,
    ceil_mode: bool,
) -> Result<Window, EvalError> {
    let n = input.len();
    let kernel = match kernel {
        Some(k) => k,
        None => match cx.ints_attr("kernel_shape")? {
            Some(k) => positive(cx, k, "kernel_shape")?,
            None => return cx.err("kernel_shape is required"),
        },
    };
    let strides = positive(
        cx,
        cx.ints_attr("strides")?.unwrap_or(vec![1; n]),
        "strides",
    )?;
    let dilations = positive(
        cx,
        cx.ints_attr("dilations")?.unwrap_or(vec![1; n]),
        "dilations",
    )?;
    if kernel.len() != n || strides.len() != n || dilations.len() != n {
        return cx.err(format!(
            "kernel, strides and dilations must have {n} values"
        ));
    }
    let auto_pad = cx.string_attr("auto_pad", "NOTSET")?;
    let mut pad_begin = vec![0; n];
    let mut pad_end = vec![0; n];
    let mut out = vec![0; n];
    for d in 0..n {
        let span = (kernel[d] - 1) * dilations[d] + 1;
        match auto_pad.as_str() {
            "SAME_UPPER" | "SAME_LOWER" => {
                out[d] = input[d].div_ceil(strides[d]);
                let total = ((out[d] - 1) * strides[d] + span).saturating_sub(input[d]);
                let small = total / 2;
                (pad_begin[d], pad_end[d]) = if auto_pad == "SAME_UPPER" {
                    (small, total - small)
                } else {
                    (total - small, small)
                };
            }
            "VALID" | "NOTSET" => {
                if auto_pad == "NOTSET" {
                    if let Some(p) = cx.ints_attr("pads")? {
                        if p.len() != 2 * n || p.iter().any(|&x| x < 0) {
                            return cx.err(format!("pads must have {} non-negative values", 2 * n));
                        }
                        pad_begin[d] = p[d] as usize;
                        pad_end[d] = p[d + n] as usize;
                    }
                }
                let padded = input[d] + pad_begin[d] + pad_end[d];
                if padded < span {
                    return cx.err(format!(
                        "the window ({span}) is larger than the padded input ({padded})"
                    ));
                }
                let steps = padded - span;
                out[d] = if ceil_mode {
                    steps.div_ceil(strides[d])
                } else {
                    steps / strides[d]
                } + 1;
                // A last window that would start in the end padding is dropped.
                if ceil_mode && (out[d] - 1) * strides[d] >= input[d] + pad_begin[d] {
                    out[d] -= 1;
                }
            }
            other => return cx.err(format!("auto_pad '{other}' is not an ONNX value")),
        }
    }
    Ok(Window {
        kernel,
        strides,
        dilations,
        pad_begin,
        pad_end,
        out,
    })
}

pub fn conv(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = f32_input(cx, inputs, 0)?;
    let w = f32_input(cx, inputs, 1)?;
    let bias = match inputs.get(2).copied().flatten() {
        Some(Tensor::F32(b)) => Some(b.iter().copied().collect::<Vec<f32>>()),
        Some(t) => return cx.err(format!("bias must be f32, found {}", t.dtype())),
        None => None,
    };
    if x.ndim() != 4 || w.ndim() != 4 {
        return cx.err(format!(
            "only 2-D convolution is implemented (input rank {})",
            x.ndim()
        ));
    }
    let (n, c, h, wd) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let (m, cg, kh, kw) = (w.shape()[0], w.shape()[1], w.shape()[2], w.shape()[3]);
    let group = cx.int_attr("group", 1)?;
    if group < 1 || c % group as usize != 0 || m % group as usize != 0 || c / group as usize != cg {
        return cx.err(format!(
            "group {group} does not fit {c} input channels, weights {:?}",
            w.shape()
        ));
    }
    let group = group as usize;
    let mg = m / group;
    let win = window(cx, &[h, wd], Some(vec![kh, kw]), false)?;
    let (oh, ow) = (win.out[0], win.out[1]);
    if bias.as_ref().is_some_and(|b| b.len() != m) {
        return cx.err(format!("bias must have {m} values"));
    }
    let x = x.as_standard_layout();
    let xs = x.as_slice().expect("standard layout");
    let w = w.as_standard_layout();
    let ws = w.as_slice().expect("standard layout");
    let mut out = vec![0f32; n * m * oh * ow];
    let (sh, sw) = (win.strides[0], win.strides[1]);
    let (dh, dw) = (win.dilations[0], win.dilations[1]);
    let (ph, pw) = (win.pad_begin[0] as isize, win.pad_begin[1] as isize);
    let depthwise = cg == 1 && mg == 1;
    let pointwise = kh == 1
        && kw == 1
        && sh == 1
        && sw == 1
        && win.pad_begin.iter().chain(&win.pad_end).all(|&p| p == 0);
    let k = cg * kh * kw;
    // One task per (image, group): their outputs are disjoint blocks, and each
    // is computed the same way whatever the number of threads.
    out.par_chunks_mut((mg * oh * ow).max(1))
        .enumerate()
        .for_each(|(task, dst)| {
            let (b, g) = (task / group, task % group);
            if depthwise {
                let plane = &xs[(b * c + g) * h * wd..][..h * wd];
                let ker = &ws[g * kh * kw..][..kh * kw];
                for i in 0..kh {
                    for j in 0..kw {
                        let wv = ker[i * kw + j];
                        for y in 0..oh {
                            let iy = (y * sh + i * dh) as isize - ph;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            let row = &plane[iy as usize * wd..][..wd];
                            let drow = &mut dst[y * ow..][..ow];
                            for (xo, d) in drow.iter_mut().enumerate() {
                                let ix = (xo * sw + j * dw) as isize - pw;
                                if ix >= 0 && ix < wd as isize {
                                    *d += wv * row[ix as usize];
                                }
                            }
                        }
                    }
                }
            } else if pointwise {
                // A 1x1 convolution without stride or padding is a product with
                // the input planes as they are.
                let xg = ArrayView2::from_shape(
                    (cg, h * wd),
                    &xs[(b * c + g * cg) * h * wd..][..cg * h * wd],
                )
                .expect("input block");
                let wg = ArrayView2::from_shape((mg, k), &ws[g * mg * k..][..mg * k])
                    .expect("weight block");
                let mut og = qgraph_ir::ndarray::ArrayViewMut2::from_shape((mg, oh * ow), dst)
                    .expect("output block");
                super::matmul::par_mat_mul_view(1.0, &wg, &xg, 0.0, &mut og);
            } else {
                // im2col: one row per (channel, ky, kx), one column per output pixel.
                let mut cols = Array2::<f32>::zeros((k, oh * ow));
                for ci in 0..cg {
                    let plane = &xs[(b * c + g * cg + ci) * h * wd..][..h * wd];
                    for i in 0..kh {
                        for j in 0..kw {
                            let mut row = cols.row_mut((ci * kh + i) * kw + j);
                            let row = row
                                .as_slice_mut()
                                .expect("rows of a standard array are contiguous");
                            for y in 0..oh {
                                let iy = (y * sh + i * dh) as isize - ph;
                                let dst = &mut row[y * ow..][..ow];
                                if iy < 0 || iy >= h as isize {
                                    continue;
                                }
                                let src = &plane[iy as usize * wd..][..wd];
                                for (xo, d) in dst.iter_mut().enumerate() {
                                    let ix = (xo * sw + j * dw) as isize - pw;
                                    if ix >= 0 && ix < wd as isize {
                                        *d = src[ix as usize];
                                    }
                                }
                            }
                        }
                    }
                }
                let wg = ArrayView2::from_shape((mg, k), &ws[g * mg * k..][..mg * k])
                    .expect("weight block");
                let mut og = qgraph_ir::ndarray::ArrayViewMut2::from_shape((mg, oh * ow), dst)
                    .expect("output block");
                super::matmul::par_mat_mul_view(1.0, &wg, &cols.view(), 0.0, &mut og);
            }
            if let Some(bias) = &bias {
                for (oc, plane) in dst.chunks_mut((oh * ow).max(1)).enumerate() {
                    let bv = bias[g * mg + oc];
                    for v in plane {
                        *v += bv;
                    }
                }
            }
        });
    Ok(vec![Tensor::F32(array(&[n, m, oh, ow], out))])
}

/// ConvTranspose (2-D): each input pixel scatters its kernel into the output.
/// With `output_shape`, the pads follow from it as the spec says.
pub fn conv_transpose(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = f32_input(cx, inputs, 0)?;
    let w = f32_input(cx, inputs, 1)?;
    if x.ndim() != 4 || w.ndim() != 4 {
        return cx.err(format!(
            "only 2-D transposed convolution is implemented (input rank {})",
            x.ndim()
        ));
    }
    let (n, c, h, wd) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let (cw, mg, kh, kw) = (w.shape()[0], w.shape()[1], w.shape()[2], w.shape()[3]);
    let group = cx.int_attr("group", 1)?;
    if group < 1 || cw != c || c % group as usize != 0 {
        return cx.err(format!(
            "weights {:?} do not fit {c} input channels and group {group}",
            w.shape()
        ));
    }
    let group = group as usize;
    let (cg, m) = (c / group, mg * group);
    let ints = |name: &str, default: i64| -> Result<Vec<i64>, EvalError> {
        Ok(cx.ints_attr(name)?.unwrap_or(vec![default; 2]))
    };
    let strides = ints("strides", 1)?;
    let dilations = ints("dilations", 1)?;
    let out_pad = ints("output_padding", 0)?;
    if strides.len() != 2
        || dilations.len() != 2
        || out_pad.len() != 2
        || strides.iter().chain(&dilations).any(|&v| v < 1)
    {
        return cx.err(
            "strides, dilations and output_padding need 2 values (strides and dilations positive)",
        );
    }
    let input = [h as i64, wd as i64];
    let kernel = [kh as i64, kw as i64];
    let full: Vec<i64> = (0..2)
        .map(|d| strides[d] * (input[d] - 1) + out_pad[d] + (kernel[d] - 1) * dilations[d] + 1)
        .collect();
    let auto_pad = cx.string_attr("auto_pad", "NOTSET")?;
    let (mut begin, mut end) = (vec![0i64; 2], vec![0i64; 2]);
    let output_shape = cx.ints_attr("output_shape")?;
    if output_shape.is_some() || auto_pad == "SAME_UPPER" || auto_pad == "SAME_LOWER" {
        let target: Vec<i64> = match &output_shape {
            Some(s) if s.len() >= 2 => s[s.len() - 2..].to_vec(),
            Some(_) => return cx.err("output_shape needs the 2 spatial sizes"),
            None => (0..2).map(|d| input[d] * strides[d]).collect(),
        };
        for d in 0..2 {
            let total = full[d] - target[d];
            if total < 0 {
                return cx.err(format!(
                    "output_shape {target:?} is larger than the full output {full:?}"
                ));
            }
            (begin[d], end[d]) = if auto_pad == "SAME_UPPER" {
                (total / 2, total - total / 2)
            } else {
                (total - total / 2, total / 2)
            };
        }
    } else if let Some(p) = cx.ints_attr("pads")? {
        if p.len() != 4 || p.iter().any(|&v| v < 0) {
            return cx.err("pads need 4 non-negative values");
        }
        (begin, end) = (vec![p[0], p[1]], vec![p[2], p[3]]);
    }
    let (oh, ow) = (full[0] - begin[0] - end[0], full[1] - begin[1] - end[1]);
    if oh <= 0 || ow <= 0 {
        return cx.err("the pads remove the whole output");
    }
    let (oh, ow) = (oh as usize, ow as usize);
    let bias = match inputs.get(2).copied().flatten() {
        Some(Tensor::F32(b)) if b.len() == m => Some(b.iter().copied().collect::<Vec<f32>>()),
        Some(t) => {
            return cx.err(format!(
                "bias must be f32 with {m} values, found {}{:?}",
                t.dtype(),
                t.shape()
            ))
        }
        None => None,
    };
    let xs = x.as_standard_layout();
    let xs = xs.as_slice().expect("standard layout");
    let ws = w.as_standard_layout();
    let ws = ws.as_slice().expect("standard layout");
    let mut out = vec![0f32; n * m * oh * ow];
    out.par_chunks_mut((oh * ow).max(1))
        .enumerate()
        .for_each(|(plane_i, dst)| {
            let (b, oc) = (plane_i / m, plane_i % m);
            let (g, o) = (oc / mg, oc % mg);
            for ci in 0..cg {
                let ic = g * cg + ci;
                let src = &xs[(b * c + ic) * h * wd..][..h * wd];
                let ker = &ws[(ic * mg + o) * kh * kw..][..kh * kw];
                for iy in 0..h {
                    for ix in 0..wd {
                        let v = src[iy * wd + ix];
                        for ky in 0..kh {
                            let y =
                                (iy as i64) * strides[0] + (ky as i64) * dilations[0] - begin[0];
                            if y < 0 || y >= oh as i64 {
                                continue;
                            }
                            for kx in 0..kw {
                                let xo = (ix as i64) * strides[1] + (kx as i64) * dilations[1]
                                    - begin[1];
                                if xo >= 0 && xo < ow as i64 {
                                    dst[y as usize * ow + xo as usize] += v * ker[ky * kw + kx];
                                }
                            }
                        }
                    }
                }
            }
            if let Some(bias) = &bias {
                dst.iter_mut().for_each(|d| *d += bias[oc]);
            }
        });
    Ok(vec![Tensor::F32(array(&[n, m, oh, ow], out))])
}
