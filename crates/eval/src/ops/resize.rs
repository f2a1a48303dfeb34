//! Resize: nearest and (multi)linear interpolation with the coordinate
//! transformations and nearest-rounding modes of the ONNX spec, computed
//! separably axis by axis in f64 as the reference does.

use super::{array, f32_input};
use crate::{EvalError, OpCtx};
use qgraph_ir::ndarray::{ArrayD, Axis, IxDyn};
use qgraph_ir::Tensor;

/// Source coordinate of output index `y` along one axis.
fn source_coordinate(
    mode: &str,
    y: f64,
    scale: f64,
    input: f64,
    output: f64,
) -> Result<f64, String> {
    Ok(match mode {
        "half_pixel" => (y + 0.5) / scale - 0.5,
        "pytorch_half_pixel" => {
            if output > 1.0 {
                (y + 0.5) / scale - 0.5
            } else {
                -0.5
            }
        }
        "asymmetric" => y / scale,
        "align_corners" => {
            if output == 1.0 {
                0.0
            } else {
                y * (input - 1.0) / (output - 1.0)
            }
        }
        "half_pixel_symmetric" => {
            let adjustment = output.floor() / (scale * input);
            let offset = input / 2.0 * (1.0 - adjustment);
            offset + (y + 0.5) / scale - 0.5
        }
        other => {
            return Err(format!(
                "coordinate_transformation_mode '{other}' is not implemented"
            ))
        }
    })
}

/// For each output index: (left index, right index, weight of the right one).
fn taps(
    cx: &OpCtx,
    n_in: usize,
    n_out: usize,
    scale: f64,
    linear: bool,
) -> Result<Vec<(usize, usize, f64)>, EvalError> {
    let coord_mode = if cx.opset < 11 {
        "asymmetric".to_string()
    } else {
        cx.string_attr("coordinate_transformation_mode", "half_pixel")?
    };
    let nearest_mode = if cx.opset < 11 {
        "floor".to_string()
    } else {
        cx.string_attr("nearest_mode", "round_prefer_floor")?
    };
    let last = n_in as i64 - 1;
    let clamp = |i: i64| i.clamp(0, last.max(0)) as usize;
    (0..n_out)
        .map(|y| {
            let x = source_coordinate(&coord_mode, y as f64, scale, n_in as f64, n_out as f64)
                .or_else(|m| cx.err(m))?;
            // The pixel left of x is preferred: an exact integer x is the
            // right neighbour with weight 1.
            let mut left = x.floor() as i64;
            let mut ratio = x - left as f64;
            if ratio == 0.0 {
                left -= 1;
                ratio = 1.0;
            }
            let (l, r) = (clamp(left), clamp(left + 1));
            if linear {
                return Ok((l, r, ratio));
            }
            let right = if ratio == 1.0 {
                true
            } else {
                match nearest_mode.as_str() {
                    "round_prefer_floor" => ratio > 0.5,
                    "round_prefer_ceil" => ratio >= 0.5,
                    "floor" => false,
                    "ceil" => true,
                    other => return cx.err(format!("nearest_mode '{other}' is not an ONNX value")),
                }
            };
            Ok((l, r, if right { 1.0 } else { 0.0 }))
        })
        .collect()
}

pub fn resize(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = f32_input(cx, inputs, 0)?;
    let r = x.ndim();
    let mode = cx.string_attr("mode", "nearest")?;
    let linear = match mode.as_str() {
        "nearest" => false,
        "linear" | "bilinear" | "trilinear" => true,
        other => return cx.err(format!("Resize mode '{other}' is not implemented")),
    };
    if cx.int_attr("antialias", 0)? != 0 {
        return cx.err("antialias is not implemented");
    }
    if cx.ints_attr("axes")?.is_some() {
        return cx.err("the axes attribute is not implemented");
    }
    let (scales_at, sizes_at) = if cx.opset < 11 {
        (1, usize::MAX)
    } else {
        (2, 3)
    };
    let scales: Option<Vec<f64>> = match inputs.get(scales_at).copied().flatten() {
        Some(Tensor::F32(s)) if !s.is_empty() => Some(s.iter().map(|&v| v as f64).collect()),
        Some(Tensor::F32(_)) | None => None,
        Some(t) => return cx.err(format!("scales must be f32, found {}", t.dtype())),
    };
    let sizes: Option<Vec<usize>> = match inputs.get(sizes_at).copied().flatten() {
        Some(Tensor::I64(s)) if !s.is_empty() => {
            Some(s.iter().map(|&v| v.max(0) as usize).collect())
        }
        Some(Tensor::I64(_)) | None => None,
        Some(t) => return cx.err(format!("sizes must be int64, found {}", t.dtype())),
    };
    let (out_shape, scale): (Vec<usize>, Vec<f64>) = match (scales, sizes) {
        (Some(s), None) if s.len() == r => (
            x.shape()
                .iter()
                .zip(&s)
                .map(|(&d, &f)| (d as f64 * f).floor() as usize)
                .collect(),
            s,
        ),
        (None, Some(z)) if z.len() == r => {
            let s = x
                .shape()
                .iter()
                .zip(&z)
                .map(|(&d, &o)| o as f64 / d as f64)
                .collect();
            (z, s)
        }
        _ => {
            return cx.err(format!(
                "exactly one of scales and sizes must be given, with {r} values"
            ))
        }
    };
    let mut y: ArrayD<f32> = x.clone();
    for axis in 0..r {
        let (n_in, n_out) = (x.shape()[axis], out_shape[axis]);
        if n_in == n_out && scale[axis] == 1.0 {
            continue;
        }
        if n_in == 0 {
            return cx.err("cannot resize an empty axis");
        }
        let taps = taps(cx, n_in, n_out, scale[axis], linear)?;
        let mut shape = y.shape().to_vec();
        shape[axis] = n_out;
        let mut next = ArrayD::<f32>::zeros(IxDyn(&shape));
        for (o, &(l, rt, w)) in taps.iter().enumerate() {
            let a = y.index_axis(Axis(axis), l);
            let b = y.index_axis(Axis(axis), rt);
            let mut dst = next.index_axis_mut(Axis(axis), o);
            qgraph_ir::ndarray::Zip::from(&mut dst)
                .and(&a)
                .and(&b)
                .for_each(|d, &p, &q| *d = ((1.0 - w) * p as f64 + w * q as f64) as f32);
        }
        y = next;
    }
    Ok(vec![Tensor::F32(if y.shape() == out_shape.as_slice() {
        y
    } else {
        array(&out_shape, y.iter().copied().collect())
    })])
}
