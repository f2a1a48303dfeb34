//! Spatial operators over any number of spatial dims and in every type the
//! spec allows: convolution (plain, transposed, deformable), pooling and
//! unpooling, Col2Im, Resize and Upsample, GridSample, AffineGrid, RoiAlign,
//! MaxRoiPool and NonMaxSuppression.
//!
//! The 2-D f32 cases the older kernels (`conv.rs`, `pool.rs`, `resize.rs`)
//! handle go to them: they are fast, training's backward kernels rely on
//! their bits, and the fusion plan hands Conv its epilogue and padding
//! through them. The general code here computes f32, f16 and bf16 in f32
//! (each result rounded back once) and f64 in f64; Resize interpolates in
//! f64 as ONNX's reference does, integers rounded and saturated at the end.

use super::typed::{numeric, Elem, Number};
use super::{conv, input, ints_of, pool, resize, Kernel};
use crate::{EvalError, OpCtx};
use qgraph_ir::half::{bf16, f16};
use qgraph_ir::ndarray::{ArrayD, IxDyn};
use qgraph_ir::{DataType, Tensor};
use rayon::prelude::*;

pub const KERNELS: &[(&str, Kernel)] = &[
    ("Conv", conv_kernel),
    ("ConvTranspose", conv_transpose_kernel),
    ("DeformConv", deform_conv_kernel),
    ("MaxPool", max_pool_kernel),
    ("AveragePool", average_pool_kernel),
    ("LpPool", lp_pool_kernel),
    ("GlobalAveragePool", global_average_pool_kernel),
    ("GlobalMaxPool", global_max_pool_kernel),
    ("GlobalLpPool", global_lp_pool_kernel),
    ("MaxUnpool", max_unpool_kernel),
    ("Col2Im", col2im_kernel),
    ("Resize", resize_kernel),
    ("Upsample", upsample_kernel),
    ("GridSample", grid_sample_kernel),
    ("AffineGrid", affine_grid_kernel),
    ("RoiAlign", roi_align_kernel),
    ("MaxRoiPool", max_roi_pool_kernel),
    ("NonMaxSuppression", non_max_suppression_kernel),
];

/// The most spatial dims a window may have (the tap enumeration keeps its
/// counters on the stack).
const MAX_SPATIAL: usize = 8;

/// The most values one output may hold: a larger one is a malformed model
/// (or an attack), refused before allocating.
const MAX_VALUES: usize = 1 << 32;

// ---------------------------------------------------------------------------
// The float types the general code computes in.

/// A type to compute in: f32 (also for f16 and bf16) or f64.
pub(crate) trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Default
    + std::fmt::Debug
    + 'static
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
{
    fn of(v: f64) -> Self;
    fn get(self) -> f64;
    fn floor(self) -> Self;
    fn abs(self) -> Self;
    fn powf(self, p: Self) -> Self;
    /// The values of a tensor this type computes (f32 reads f16 and bf16
    /// too), in logical order; `None` for another type.
    fn read(t: &Tensor) -> Option<Vec<Self>>;
    /// A tensor of `dtype` (the input's type) from computed values.
    fn write(shape: &[usize], v: Vec<Self>, dtype: DataType) -> Tensor;
    fn zero() -> Self {
        Self::of(0.0)
    }
    fn one() -> Self {
        Self::of(1.0)
    }
}

macro_rules! impl_real {
    ($t:ty, $read:expr, $write:expr) => {
        impl Real for $t {
            fn of(v: f64) -> Self {
                v as $t
            }
            fn get(self) -> f64 {
                self as f64
            }
            fn floor(self) -> Self {
                <$t>::floor(self)
            }
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            fn powf(self, p: Self) -> Self {
                <$t>::powf(self, p)
            }
            fn read(t: &Tensor) -> Option<Vec<Self>> {
                $read(t)
            }
            fn write(shape: &[usize], v: Vec<Self>, dtype: DataType) -> Tensor {
                $write(shape, v, dtype)
            }
        }
    };
}

impl_real!(
    f32,
    |t: &Tensor| match t {
        Tensor::F32(a) => Some(a.iter().copied().collect()),
        Tensor::F16(a) => Some(a.iter().map(|v| v.to_f32()).collect()),
        Tensor::BF16(a) => Some(a.iter().map(|v| v.to_f32()).collect()),
        _ => None,
    },
    |shape: &[usize], v: Vec<f32>, dtype: DataType| match dtype {
        DataType::F16 => Tensor::F16(arr(shape, v.into_iter().map(f16::from_f32).collect())),
        DataType::BF16 => Tensor::BF16(arr(shape, v.into_iter().map(bf16::from_f32).collect())),
        _ => Tensor::F32(arr(shape, v)),
    }
);

impl_real!(
    f64,
    |t: &Tensor| match t {
        Tensor::F64(a) => Some(a.iter().copied().collect()),
        _ => None,
    },
    |shape: &[usize], v: Vec<f64>, _: DataType| Tensor::F64(arr(shape, v))
);

fn arr<T>(shape: &[usize], v: Vec<T>) -> ArrayD<T> {
    super::array(shape, v)
}

/// Runs `$f::<R>(cx, inputs, dtype)` with `R` the type input 0 computes in.
macro_rules! by_float {
    ($cx:expr, $inputs:expr, $f:ident) => {{
        let dtype = input($cx, $inputs, 0)?.dtype();
        match dtype {
            DataType::F64 => $f::<f64>($cx, $inputs, dtype),
            DataType::F32 | DataType::F16 | DataType::BF16 => $f::<f32>($cx, $inputs, dtype),
            other => $cx.err(format!(
                "input 0 is {other}, which this operator does not take (it takes floats)"
            )),
        }
    }};
}

/// Input `i` (which must have input 0's type `dtype`) as computed values.
fn reals<R: Real>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    i: usize,
    dtype: DataType,
) -> Result<Option<Vec<R>>, EvalError> {
    match inputs.get(i).copied().flatten() {
        None => Ok(None),
        Some(t) if t.dtype() == dtype => match R::read(t) {
            Some(v) => Ok(Some(v)),
            None => cx.err(format!("input {i} is {}, not a float type", t.dtype())),
        },
        Some(t) => cx.err(format!(
            "input {i} is {}, where {dtype} was expected (the type of input 0)",
            t.dtype()
        )),
    }
}

fn required<R: Real>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    i: usize,
    dtype: DataType,
) -> Result<Vec<R>, EvalError> {
    match reals(cx, inputs, i, dtype)? {
        Some(v) => Ok(v),
        None => cx.err(format!("input {i} is required")),
    }
}

/// Any float tensor's values as f64 (a grid, boxes, thresholds, whose type
/// may differ from the data's).
fn float_values(cx: &OpCtx, t: &Tensor, what: &str) -> Result<Vec<f64>, EvalError> {
    Ok(match t {
        Tensor::F32(a) => a.iter().map(|&v| v as f64).collect(),
        Tensor::F64(a) => a.iter().copied().collect(),
        Tensor::F16(a) => a.iter().map(|v| v.to_f64()).collect(),
        Tensor::BF16(a) => a.iter().map(|v| v.to_f64()).collect(),
        t => {
            return cx.err(format!(
                "{what} must be a float tensor, found {}",
                t.dtype()
            ))
        }
    })
}

/// The number of values of `shape`, refused when it is too large to hold.
fn volume(cx: &OpCtx, shape: &[usize]) -> Result<usize, EvalError> {
    match shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) {
        Some(n) if n <= MAX_VALUES => Ok(n),
        _ => cx.err(format!("an output of shape {shape:?} is too large")),
    }
}

/// Row-major strides of `shape`.
fn strides_of(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

/// Splits a flat row-major index into `idx` over `shape`.
fn unravel(mut flat: usize, shape: &[usize], idx: &mut [usize]) {
    for d in (0..shape.len()).rev() {
        let n = shape[d].max(1);
        idx[d] = flat % n;
        flat /= n;
    }
}

/// An attribute of `n` positive values (default all 1).
fn positive_attr(cx: &OpCtx, name: &str, n: usize) -> Result<Vec<usize>, EvalError> {
    let v = cx.ints_attr(name)?.unwrap_or(vec![1; n]);
    if v.len() != n || v.iter().any(|&x| x < 1) {
        return cx.err(format!("{name} must have {n} positive values, found {v:?}"));
    }
    Ok(v.into_iter().map(|x| x as usize).collect())
}

/// `pads` as (begin, end) per spatial dim (default zeros).
fn pads_attr(cx: &OpCtx, n: usize) -> Result<(Vec<i64>, Vec<i64>), EvalError> {
    let p = cx.ints_attr("pads")?.unwrap_or(vec![0; 2 * n]);
    if p.len() != 2 * n || p.iter().any(|&x| x < 0) {
        return cx.err(format!("pads must have {} non-negative values", 2 * n));
    }
    Ok((p[..n].to_vec(), p[n..].to_vec()))
}

// ---------------------------------------------------------------------------
// Windows: which input positions each output position reads.

/// One tap of a window: its index in the kernel, and the input position it
/// reads (row-major, and column-major for MaxPool's `storage_order`).
#[derive(Clone, Copy, Debug)]
struct Tap {
    kernel: usize,
    at: usize,
    column_major: usize,
}

/// Along one axis, for each position (output of a window, or input of a
/// scatter): the taps `(kernel index, position on the other side)` that
/// fall inside the other side's extent.
type AxisLists = Vec<Vec<(usize, usize)>>;

/// The taps of position `o` along one axis: kernel index `t` reaches
/// `o * stride + t * dilation - pad` on the other side, kept when in `0..len`.
fn axis_lists(
    count: usize,
    stride: usize,
    dilation: usize,
    pad: i64,
    kernel: usize,
    len: usize,
) -> AxisLists {
    (0..count)
        .map(|o| {
            (0..kernel)
                .filter_map(|t| {
                    let p = (o * stride + t * dilation) as i64 - pad;
                    (p >= 0 && p < len as i64).then_some((t, p as usize))
                })
                .collect()
        })
        .collect()
}

/// The product of one list per axis: every combination, row-major in the
/// kernel, as flat taps.
fn product_taps(
    lists: &[&[(usize, usize)]],
    kernel_strides: &[usize],
    strides: &[usize],
    column_strides: &[usize],
    taps: &mut Vec<Tap>,
) {
    taps.clear();
    if lists.iter().any(|l| l.is_empty()) {
        return;
    }
    let n = lists.len();
    let mut counter = [0usize; MAX_SPATIAL];
    loop {
        let mut tap = Tap {
            kernel: 0,
            at: 0,
            column_major: 0,
        };
        for d in 0..n {
            let (t, p) = lists[d][counter[d]];
            tap.kernel += t * kernel_strides[d];
            tap.at += p * strides[d];
            tap.column_major += p * column_strides[d];
        }
        taps.push(tap);
        let mut d = n;
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            counter[d] += 1;
            if counter[d] < lists[d].len() {
                break;
            }
            counter[d] = 0;
        }
    }
}

/// A sliding window over the spatial dims (convolution, pooling).
struct Grid {
    out: Vec<usize>,
    /// Per axis, per output index: taps inside the input.
    lists: Vec<AxisLists>,
    /// Per axis, per output index: taps inside the padded input.
    padded: Vec<Vec<usize>>,
    kernel_strides: Vec<usize>,
    strides: Vec<usize>,
    column_strides: Vec<usize>,
}

impl Grid {
    fn new(cx: &OpCtx, win: &conv::Window, input: &[usize]) -> Result<Grid, EvalError> {
        let n = input.len();
        if n == 0 || n > MAX_SPATIAL {
            return cx.err(format!(
                "{n} spatial dims: this operator takes 1 to {MAX_SPATIAL}"
            ));
        }
        let lists = (0..n)
            .map(|d| {
                axis_lists(
                    win.out[d],
                    win.strides[d],
                    win.dilations[d],
                    win.pad_begin[d] as i64,
                    win.kernel[d],
                    input[d],
                )
            })
            .collect();
        let padded = (0..n)
            .map(|d| {
                (0..win.out[d])
                    .map(|o| {
                        axis_lists(
                            1,
                            0,
                            win.dilations[d],
                            -((o * win.strides[d]) as i64),
                            win.kernel[d],
                            input[d] + win.pad_begin[d] + win.pad_end[d],
                        )[0]
                        .len()
                    })
                    .collect()
            })
            .collect();
        let mut column_strides = vec![1; n];
        for d in 1..n {
            column_strides[d] = column_strides[d - 1] * input[d - 1];
        }
        Ok(Grid {
            out: win.out.clone(),
            lists,
            padded,
            kernel_strides: strides_of(&win.kernel),
            strides: strides_of(input),
            column_strides,
        })
    }

    fn out_len(&self) -> usize {
        self.out.iter().product()
    }

    /// Fills `taps` with output position `o`'s taps inside the input;
    /// returns how many taps its window has inside the padded input.
    fn taps(&self, o: usize, taps: &mut Vec<Tap>) -> usize {
        let n = self.out.len();
        let mut idx = [0usize; MAX_SPATIAL];
        unravel(o, &self.out, &mut idx[..n]);
        let mut lists: [&[(usize, usize)]; MAX_SPATIAL] = [&[]; MAX_SPATIAL];
        let mut padded = 1;
        for d in 0..n {
            lists[d] = &self.lists[d][idx[d]];
            padded *= self.padded[d][idx[d]];
        }
        product_taps(
            &lists[..n],
            &self.kernel_strides,
            &self.strides,
            &self.column_strides,
            taps,
        );
        padded
    }
}

/// Input 0 and its (batch, channels, spatial dims), which must exist.
fn nc_spatial(cx: &OpCtx, shape: &[usize]) -> Result<(usize, usize), EvalError> {
    if shape.len() < 3 {
        return cx.err(format!(
            "the input {shape:?} needs a batch, a channel and spatial dims"
        ));
    }
    Ok((shape[0], shape[1]))
}

// ---------------------------------------------------------------------------
// Conv.

fn conv_kernel(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    // The plan's fused work (epilogue, added input, padding moved from a
    // Pad node) is done by the 2-D kernel only.
    let fused = !cx.epilogue.is_empty() || cx.added.is_some() || cx.input_pads != [0; 4];
    if fused || (x.dtype() == DataType::F32 && x.shape().len() == 4) {
        return conv::conv(cx, inputs);
    }
    by_float!(cx, inputs, conv_general)
}

fn conv_general<R: Real>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    dtype: DataType,
) -> Result<Vec<Tensor>, EvalError> {
    let xs = input(cx, inputs, 0)?.shape().to_vec();
    let ws = input(cx, inputs, 1)?.shape().to_vec();
    let (n, c) = nc_spatial(cx, &xs)?;
    if ws.len() != xs.len() {
        return cx.err(format!("weights {ws:?} do not fit the input {xs:?}"));
    }
    let (m, cg) = (ws[0], ws[1]);
    let group = cx.int_attr("group", 1)?;
    if group < 1 || c % group as usize != 0 || m % group as usize != 0 || c / group as usize != cg {
        return cx.err(format!(
            "group {group} does not fit {c} input channels, weights {ws:?}"
        ));
    }
    let mg = m / group as usize;
    let kernel = ws[2..].to_vec();
    if kernel.contains(&0) {
        return cx.err(format!("the kernel {ws:?} is empty"));
    }
    if let Some(k) = cx.ints_attr("kernel_shape")? {
        if k.iter().map(|&v| v as usize).ne(kernel.iter().copied()) {
            return cx.err(format!(
                "kernel_shape {k:?} differs from the weights {ws:?}"
            ));
        }
    }
    let win = conv::window(cx, &xs[2..], Some(kernel), false)?;
    let grid = Grid::new(cx, &win, &xs[2..])?;
    let x = required::<R>(cx, inputs, 0, dtype)?;
    let w = required::<R>(cx, inputs, 1, dtype)?;
    let bias = reals::<R>(cx, inputs, 2, dtype)?;
    if bias.as_ref().is_some_and(|b| b.len() != m) {
        return cx.err(format!("bias must have {m} values"));
    }
    let mut shape = vec![n, m];
    shape.extend(&grid.out);
    let mut out = vec![R::zero(); volume(cx, &shape)?];
    let in_plane: usize = xs[2..].iter().product();
    let k: usize = ws[2..].iter().product();
    let out_plane = grid.out_len();
    out.par_chunks_mut(out_plane.max(1))
        .enumerate()
        .for_each_init(Vec::new, |taps, (plane, dst)| {
            let (b, oc) = (plane / m, plane % m);
            let g = oc / mg;
            let start = bias.as_ref().map_or(R::zero(), |b| b[oc]);
            for (o, y) in dst.iter_mut().enumerate() {
                grid.taps(o, taps);
                let mut acc = start;
                for ci in 0..cg {
                    let src = &x[(b * c + g * cg + ci) * in_plane..][..in_plane];
                    let ker = &w[(oc * cg + ci) * k..][..k];
                    for t in taps.iter() {
                        acc += src[t.at] * ker[t.kernel];
                    }
                }
                *y = acc;
            }
        });
    Ok(vec![R::write(&shape, out, dtype)])
}

// ---------------------------------------------------------------------------
// ConvTranspose.

/// ConvTranspose's padding and output size per spatial dim.
struct TransposeGeometry {
    strides: Vec<usize>,
    dilations: Vec<usize>,
    pad_begin: Vec<i64>,
    out: Vec<usize>,
    /// Whether `output_shape` asks for more than the full output (ONNX
    /// Runtime runs it, the 2-D kernel refuses it).
    larger: bool,
}

fn transpose_geometry(
    cx: &OpCtx,
    input: &[usize],
    kernel: &[usize],
) -> Result<TransposeGeometry, EvalError> {
    let n = input.len();
    let strides = positive_attr(cx, "strides", n)?;
    let dilations = positive_attr(cx, "dilations", n)?;
    let out_pad = cx.ints_attr("output_padding")?.unwrap_or(vec![0; n]);
    if out_pad.len() != n || out_pad.iter().any(|&v| v < 0) {
        return cx.err(format!(
            "output_padding must have {n} non-negative values, found {out_pad:?}"
        ));
    }
    let full: Vec<i64> = (0..n)
        .map(|d| {
            strides[d] as i64 * (input[d] as i64 - 1)
                + out_pad[d]
                + (kernel[d] as i64 - 1) * dilations[d] as i64
                + 1
        })
        .collect();
    let auto_pad = cx.string_attr("auto_pad", "NOTSET")?;
    if !matches!(
        auto_pad.as_str(),
        "NOTSET" | "VALID" | "SAME_UPPER" | "SAME_LOWER"
    ) {
        return cx.err(format!("auto_pad '{auto_pad}' is not an ONNX value"));
    }
    let output_shape = cx.ints_attr("output_shape")?;
    let mut larger = false;
    let (pad_begin, out): (Vec<i64>, Vec<i64>) = if output_shape.is_some()
        || auto_pad.starts_with("SAME")
    {
        let target: Vec<i64> = match &output_shape {
            // The spatial sizes, with or without batch and channels.
            Some(s) if s.len() >= n => s[s.len() - n..].to_vec(),
            Some(s) => return cx.err(format!("output_shape {s:?} needs the {n} spatial sizes")),
            None => (0..n)
                .map(|d| input[d] as i64 * strides[d] as i64)
                .collect(),
        };
        let mut begin = vec![0; n];
        for d in 0..n {
            if target[d] < 0 {
                return cx.err(format!("output_shape {target:?} is negative"));
            }
            // A larger output than the full one has zeros (bias) at its
            // end, as in ONNX Runtime.
            let total = (full[d] - target[d]).max(0);
            larger |= full[d] < target[d];
            begin[d] = if auto_pad == "SAME_UPPER" {
                total / 2
            } else {
                total - total / 2
            };
        }
        (begin, target)
    } else {
        let (b, e) = if auto_pad == "VALID" {
            (vec![0; n], vec![0; n])
        } else {
            pads_attr(cx, n)?
        };
        let out = (0..n).map(|d| full[d] - b[d] - e[d]).collect();
        (b, out)
    };
    if out.iter().any(|&o| o < 0) {
        return cx.err(format!("the pads remove the whole output ({out:?})"));
    }
    Ok(TransposeGeometry {
        strides,
        dilations,
        pad_begin,
        out: out.into_iter().map(|o| o as usize).collect(),
        larger,
    })
}

fn conv_transpose_kernel(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    let w = input(cx, inputs, 1)?;
    if x.dtype() == DataType::F32 && x.shape().len() == 4 && w.shape().len() == 4 {
        let g = transpose_geometry(cx, &x.shape()[2..], &w.shape()[2..])?;
        if !g.larger {
            return conv::conv_transpose(cx, inputs);
        }
    }
    by_float!(cx, inputs, conv_transpose_general)
}

fn conv_transpose_general<R: Real>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    dtype: DataType,
) -> Result<Vec<Tensor>, EvalError> {
    let xs = input(cx, inputs, 0)?.shape().to_vec();
    let ws = input(cx, inputs, 1)?.shape().to_vec();
    let (n, c) = nc_spatial(cx, &xs)?;
    let spatial = xs.len() - 2;
    if ws.len() != xs.len() || ws[0] != c || spatial > MAX_SPATIAL {
        return cx.err(format!("weights {ws:?} do not fit the input {xs:?}"));
    }
    let group = cx.int_attr("group", 1)?;
    if group < 1 || c % group as usize != 0 {
        return cx.err(format!("group {group} does not fit {c} input channels"));
    }
    let group = group as usize;
    let (cg, mg) = (c / group, ws[1]);
    let m = mg * group;
    let kernel = &ws[2..];
    let g = transpose_geometry(cx, &xs[2..], kernel)?;
    let x = required::<R>(cx, inputs, 0, dtype)?;
    let w = required::<R>(cx, inputs, 1, dtype)?;
    let bias = reals::<R>(cx, inputs, 2, dtype)?;
    if bias.as_ref().is_some_and(|b| b.len() != m) {
        return cx.err(format!("bias must have {m} values"));
    }
    // Per axis, per input index: (kernel tap, output index) inside.
    let lists: Vec<AxisLists> = (0..spatial)
        .map(|d| {
            axis_lists(
                xs[2 + d],
                g.strides[d],
                g.dilations[d],
                g.pad_begin[d],
                kernel[d],
                g.out[d],
            )
        })
        .collect();
    let in_shape = &xs[2..];
    let (kernel_strides, out_strides) = (strides_of(kernel), strides_of(&g.out));
    let mut shape = vec![n, m];
    shape.extend(&g.out);
    let mut out = vec![R::zero(); volume(cx, &shape)?];
    let in_plane: usize = in_shape.iter().product();
    let out_plane: usize = g.out.iter().product();
    let k: usize = kernel.iter().product();
    out.par_chunks_mut(out_plane.max(1))
        .enumerate()
        .for_each_init(Vec::new, |taps, (plane, dst)| {
            let (b, oc) = (plane / m, plane % m);
            let (gi, o) = (oc / mg, oc % mg);
            let mut idx = [0usize; MAX_SPATIAL];
            for q in 0..in_plane {
                unravel(q, in_shape, &mut idx[..spatial]);
                let per_axis: Vec<&[(usize, usize)]> =
                    (0..spatial).map(|d| &lists[d][idx[d]][..]).collect();
                product_taps(&per_axis, &kernel_strides, &out_strides, &out_strides, taps);
                for ci in 0..cg {
                    let ic = gi * cg + ci;
                    let v = x[(b * c + ic) * in_plane + q];
                    let ker = &w[(ic * mg + o) * k..][..k];
                    for t in taps.iter() {
                        dst[t.at] += v * ker[t.kernel];
                    }
                }
            }
            if let Some(bias) = &bias {
                dst.iter_mut().for_each(|d| *d += bias[oc]);
            }
        });
    Ok(vec![R::write(&shape, out, dtype)])
}

// ---------------------------------------------------------------------------
// DeformConv.

/// The value of `plane` (of `shape`) at fractional position `pos`,
/// multilinear; corners outside the plane count zero.
fn sample_zero_padded<R: Real>(plane: &[R], shape: &[usize], strides: &[usize], pos: &[R]) -> R {
    let n = shape.len();
    let mut acc = R::zero();
    'corners: for corner in 0..(1usize << n) {
        let mut at = 0;
        let mut weight = R::one();
        for d in 0..n {
            let base = pos[d].floor();
            let frac = pos[d] - base;
            let high = corner >> d & 1 == 1;
            let i = base.get() as i64 + high as i64;
            if i < 0 || i >= shape[d] as i64 {
                continue 'corners;
            }
            at += i as usize * strides[d];
            weight = weight * if high { frac } else { R::one() - frac };
        }
        acc += weight * plane[at];
    }
    acc
}

fn deform_conv_kernel(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    by_float!(cx, inputs, deform_conv_general)
}

fn deform_conv_general<R: Real>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    dtype: DataType,
) -> Result<Vec<Tensor>, EvalError> {
    let xs = input(cx, inputs, 0)?.shape().to_vec();
    let ws = input(cx, inputs, 1)?.shape().to_vec();
    let offset_shape = input(cx, inputs, 2)?.shape().to_vec();
    let (n, c) = nc_spatial(cx, &xs)?;
    let spatial = xs.len() - 2;
    if ws.len() != xs.len() || offset_shape.len() != xs.len() || spatial > MAX_SPATIAL {
        return cx.err(format!(
            "weights {ws:?} and offsets {offset_shape:?} do not fit the input {xs:?}"
        ));
    }
    let (m, cg) = (ws[0], ws[1]);
    let group = cx.int_attr("group", 1)?;
    let offset_group = cx.int_attr("offset_group", 1)?;
    if group < 1 || cg * group as usize != c || m % group as usize != 0 {
        return cx.err(format!(
            "group {group} does not fit {c} input channels, weights {ws:?}"
        ));
    }
    if offset_group < 1 || c % offset_group as usize != 0 {
        return cx.err(format!(
            "offset_group {offset_group} does not divide {c} channels"
        ));
    }
    let (group, offset_group) = (group as usize, offset_group as usize);
    let mg = m / group;
    let kernel = ws[2..].to_vec();
    let k: usize = kernel.iter().product();
    let strides = positive_attr(cx, "strides", spatial)?;
    let dilations = positive_attr(cx, "dilations", spatial)?;
    let (pad_begin, _) = pads_attr(cx, spatial)?;
    let out_shape = offset_shape[2..].to_vec();
    if offset_shape[0] != n || offset_shape[1] != offset_group * k * spatial {
        return cx.err(format!(
            "offsets {offset_shape:?} need {n} x {} channels",
            offset_group * k * spatial
        ));
    }
    let out_plane: usize = out_shape.iter().product();
    let in_plane: usize = xs[2..].iter().product();
    let x = required::<R>(cx, inputs, 0, dtype)?;
    let w = required::<R>(cx, inputs, 1, dtype)?;
    let offsets = required::<R>(cx, inputs, 2, dtype)?;
    let bias = reals::<R>(cx, inputs, 3, dtype)?;
    let mask = reals::<R>(cx, inputs, 4, dtype)?;
    if bias.as_ref().is_some_and(|b| b.len() != m) {
        return cx.err(format!("bias must have {m} values"));
    }
    if mask
        .as_ref()
        .is_some_and(|v| v.len() != n * offset_group * k * out_plane)
    {
        return cx.err(format!(
            "the mask must have {n} x {} x {out_shape:?} values",
            offset_group * k
        ));
    }
    let mut shape = vec![n, m];
    shape.extend(&out_shape);
    let total = volume(cx, &shape)?;
    volume(cx, &[c, k, out_plane])?;
    let (in_strides, kernel_shape) = (strides_of(&xs[2..]), kernel.clone());
    let mut out = vec![R::zero(); total];
    let per_offset_group = c / offset_group;
    for b in 0..n {
        // Deformed columns: for each channel and tap, the masked sample each
        // output position reads.
        let mut columns = vec![R::zero(); c * k * out_plane];
        columns
            .par_chunks_mut((k * out_plane).max(1))
            .enumerate()
            .for_each(|(ch, col)| {
                let og = ch / per_offset_group;
                let plane = &x[(b * c + ch) * in_plane..][..in_plane];
                let (mut oi, mut ti) = ([0usize; MAX_SPATIAL], [0usize; MAX_SPATIAL]);
                let mut pos = [R::zero(); MAX_SPATIAL];
                for t in 0..k {
                    unravel(t, &kernel_shape, &mut ti[..spatial]);
                    for o in 0..out_plane {
                        unravel(o, &out_shape, &mut oi[..spatial]);
                        for d in 0..spatial {
                            let shift =
                                offsets[((b * offset_group + og) * k * spatial + t * spatial + d)
                                    * out_plane
                                    + o];
                            pos[d] = R::of(
                                (oi[d] * strides[d]) as f64 - pad_begin[d] as f64
                                    + (ti[d] * dilations[d]) as f64,
                            ) + shift;
                        }
                        let mut v =
                            sample_zero_padded(plane, &xs[2..], &in_strides, &pos[..spatial]);
                        if let Some(mask) = &mask {
                            v = v * mask[((b * offset_group + og) * k + t) * out_plane + o];
                        }
                        col[t * out_plane + o] = v;
                    }
                }
            });
        out[b * m * out_plane..][..m * out_plane]
            .par_chunks_mut(out_plane.max(1))
            .enumerate()
            .for_each(|(oc, dst)| {
                let g = oc / mg;
                dst.fill(bias.as_ref().map_or(R::zero(), |b| b[oc]));
                for ci in 0..cg {
                    let ch = g * cg + ci;
                    for t in 0..k {
                        let wv = w[(oc * cg + ci) * k + t];
                        let col = &columns[(ch * k + t) * out_plane..][..out_plane];
                        for (d, &v) in dst.iter_mut().zip(col) {
                            *d += wv * v;
                        }
                    }
                }
            });
    }
    Ok(vec![R::write(&shape, out, dtype)])
}

// ---------------------------------------------------------------------------
// Pooling.

/// Whether the node's optional output `i` is wanted.
fn output_wanted(cx: &OpCtx, i: usize) -> bool {
    cx.graph
        .node(cx.node)
        .outputs()
        .get(i)
        .is_some_and(|o| o.is_some())
}

fn pool_grid(cx: &OpCtx, shape: &[usize]) -> Result<Grid, EvalError> {
    nc_spatial(cx, shape)?;
    let ceil_mode = cx.int_attr("ceil_mode", 0)? != 0;
    let win = conv::window(cx, &shape[2..], None, ceil_mode)?;
    Grid::new(cx, &win, &shape[2..])
}

fn max_pool_kernel(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    let old = x.shape().len() == 4
        && matches!(x.dtype(), DataType::F32 | DataType::I8 | DataType::U8)
        && !output_wanted(cx, 1)
        && cx.int_attr("storage_order", 0)? == 0;
    if old {
        return pool::max_pool(cx, inputs);
    }
    numeric!(cx, x, "input 0", |a| max_pool_general(cx, a))
}

/// MaxPool in the input's own type, with the Indices output (the first
/// maximum of each window, as a flat index into the input; its spatial
/// part column-major with `storage_order` 1).
fn max_pool_general<T: Number>(cx: &OpCtx, x: &ArrayD<T>) -> Result<Vec<Tensor>, EvalError> {
    let grid = pool_grid(cx, x.shape())?;
    let column_major = cx.int_attr("storage_order", 0)? != 0;
    let (n, c) = (x.shape()[0], x.shape()[1]);
    let mut shape = vec![n, c];
    shape.extend(&grid.out);
    let total = volume(cx, &shape)?;
    let xs: Vec<T> = x.iter().copied().collect();
    let in_plane: usize = x.shape()[2..].iter().product();
    let out_plane = grid.out_len();
    let mut values = vec![T::lowest(); total];
    let mut indices = vec![-1i64; total];
    values
        .par_chunks_mut(out_plane.max(1))
        .zip(indices.par_chunks_mut(out_plane.max(1)))
        .enumerate()
        .for_each_init(Vec::new, |taps, (plane, (vals, idxs))| {
            let src = &xs[plane * in_plane..][..in_plane];
            for o in 0..vals.len() {
                grid.taps(o, taps);
                let mut best: Option<(T, usize)> = None;
                for t in taps.iter() {
                    let v = src[t.at];
                    if best.is_none_or(|(b, _)| v > b) {
                        best = Some((v, if column_major { t.column_major } else { t.at }));
                    }
                }
                if let Some((v, at)) = best {
                    vals[o] = v;
                    idxs[o] = (plane * in_plane + at) as i64;
                }
            }
        });
    Ok(vec![
        T::wrap(arr(&shape, values)),
        Tensor::I64(arr(&shape, indices)),
    ])
}

fn average_pool_kernel(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    if x.dtype() == DataType::F32 && x.shape().len() == 4 {
        return pool::average_pool(cx, inputs);
    }
    by_float!(cx, inputs, average_pool_general)
}

fn average_pool_general<R: Real>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    dtype: DataType,
) -> Result<Vec<Tensor>, EvalError> {
    let include_pad = cx.int_attr("count_include_pad", 0)? != 0;
    window_reduce::<R>(cx, inputs, dtype, |src, taps, padded| {
        let sum = taps.iter().fold(R::zero(), |a, t| a + src[t.at]);
        let count = if include_pad { padded } else { taps.len() };
        sum / R::of(count as f64)
    })
}

/// The `p` of LpPool and GlobalLpPool: a float in opset 1, an int after.
fn p_attr(cx: &OpCtx) -> Result<f64, EvalError> {
    match cx.int_attr("p", 2) {
        Ok(p) => Ok(p as f64),
        Err(_) => Ok(cx.float_attr("p", 2.0)? as f64),
    }
}

fn lp_pool_kernel(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    by_float!(cx, inputs, lp_pool_general)
}

fn lp_pool_general<R: Real>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    dtype: DataType,
) -> Result<Vec<Tensor>, EvalError> {
    let p = R::of(p_attr(cx)?);
    window_reduce::<R>(cx, inputs, dtype, |src, taps, _| {
        let sum = taps
            .iter()
            .fold(R::zero(), |a, t| a + src[t.at].abs().powf(p));
        sum.powf(R::one() / p)
    })
}

/// A pooling of input 0's windows: `f(plane, taps, padded count)` gives
/// each output value.
fn window_reduce<R: Real>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    dtype: DataType,
    f: impl Fn(&[R], &[Tap], usize) -> R + Sync,
) -> Result<Vec<Tensor>, EvalError> {
    let xs = input(cx, inputs, 0)?.shape().to_vec();
    let grid = pool_grid(cx, &xs)?;
    let mut shape = vec![xs[0], xs[1]];
    shape.extend(&grid.out);
    let mut out = vec![R::zero(); volume(cx, &shape)?];
    let x = required::<R>(cx, inputs, 0, dtype)?;
    let in_plane: usize = xs[2..].iter().product();
    out.par_chunks_mut(grid.out_len().max(1))
        .enumerate()
        .for_each_init(Vec::new, |taps, (plane, dst)| {
            let src = &x[plane * in_plane..][..in_plane];
            for (o, y) in dst.iter_mut().enumerate() {
                let padded = grid.taps(o, taps);
                *y = f(src, taps, padded);
            }
        });
    Ok(vec![R::write(&shape, out, dtype)])
}

fn global_average_pool_kernel(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
) -> Result<Vec<Tensor>, EvalError> {
    if input(cx, inputs, 0)?.dtype() == DataType::F32 {
        return pool::global_average_pool(cx, inputs);
    }
    by_float!(cx, inputs, global_average_general)
}

fn global_max_pool_kernel(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
) -> Result<Vec<Tensor>, EvalError> {
    if input(cx, inputs, 0)?.dtype() == DataType::F32 {
        return pool::global_max_pool(cx, inputs);
    }
    by_float!(cx, inputs, global_max_general)
}

fn global_lp_pool_kernel(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    by_float!(cx, inputs, global_lp_general)
}

fn global_average_general<R: Real>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    dtype: DataType,
) -> Result<Vec<Tensor>, EvalError> {
    global_reduce::<R>(cx, inputs, dtype, |s| {
        s.iter().fold(R::zero(), |a, &v| a + v) / R::of(s.len() as f64)
    })
}

fn global_max_general<R: Real>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    dtype: DataType,
) -> Result<Vec<Tensor>, EvalError> {
    global_reduce::<R>(cx, inputs, dtype, |s| {
        s.iter()
            .fold(R::of(f64::NEG_INFINITY), |a, &v| if v > a { v } else { a })
    })
}

fn global_lp_general<R: Real>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    dtype: DataType,
) -> Result<Vec<Tensor>, EvalError> {
    let p = R::of(p_attr(cx)?);
    global_reduce::<R>(cx, inputs, dtype, |s| {
        s.iter()
            .fold(R::zero(), |a, &v| a + v.abs().powf(p))
            .powf(R::one() / p)
    })
}

/// One value per (batch, channel) plane, over all its spatial dims.
fn global_reduce<R: Real>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    dtype: DataType,
    f: impl Fn(&[R]) -> R + Sync,
) -> Result<Vec<Tensor>, EvalError> {
    let xs = input(cx, inputs, 0)?.shape().to_vec();
    let (n, c) = nc_spatial(cx, &xs)?;
    let x = required::<R>(cx, inputs, 0, dtype)?;
    let plane: usize = xs[2..].iter().product();
    let out: Vec<R> = (0..n * c)
        .into_par_iter()
        .map(|i| f(&x[i * plane..][..plane]))
        .collect();
    let mut shape = vec![n, c];
    shape.resize(xs.len(), 1);
    Ok(vec![R::write(&shape, out, dtype)])
}

// ---------------------------------------------------------------------------
// MaxUnpool and Col2Im.

fn max_unpool_kernel(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    let indices = ints_of(cx, input(cx, inputs, 1)?, "the indices")?;
    if input(cx, inputs, 1)?.shape() != x.shape() {
        return cx.err("the indices must have the input's shape");
    }
    let xs = x.shape().to_vec();
    nc_spatial(cx, &xs)?;
    let spatial = xs.len() - 2;
    let kernel = match cx.ints_attr("kernel_shape")? {
        Some(k) if k.len() == spatial && k.iter().all(|&v| v >= 1) => k,
        _ => return cx.err(format!("kernel_shape must have {spatial} positive values")),
    };
    let strides = positive_attr(cx, "strides", spatial)?;
    let (begin, end) = pads_attr(cx, spatial)?;
    let mut shape = xs[..2].to_vec();
    for d in 0..spatial {
        let o = (xs[2 + d] as i64 - 1) * strides[d] as i64 - begin[d] - end[d] + kernel[d];
        if o < 0 {
            return cx.err("the pads remove the whole output");
        }
        shape.push(o as usize);
    }
    // The indices address the inferred output; a given output_shape pads
    // it at the end of each dim (as ONNX's reference does).
    let target = match inputs.get(2).copied().flatten() {
        Some(t) => {
            let s = ints_of(cx, t, "output_shape")?;
            if s.len() != xs.len() || s.iter().zip(&shape).any(|(&o, &i)| o < i as i64) {
                return cx.err(format!(
                    "output_shape {s:?} is smaller than the unpooled {shape:?}"
                ));
            }
            s.into_iter().map(|v| v as usize).collect()
        }
        None => shape.clone(),
    };
    let total = volume(cx, &shape)?;
    volume(cx, &target)?;
    numeric!(cx, x, "input 0", |a| {
        let mut out = vec![Number::zero(); total];
        for (&v, &i) in a.iter().zip(&indices) {
            match usize::try_from(i).ok().filter(|&i| i < total) {
                Some(i) => out[i] = v,
                None => return cx.err(format!("index {i} is outside the output {shape:?}")),
            }
        }
        let unpooled = arr(&shape, out);
        let y = if target == shape {
            unpooled
        } else {
            let mut y = ArrayD::from_elem(IxDyn(&target), Number::zero());
            y.slice_each_axis_mut(|ax| qgraph_ir::ndarray::Slice::from(0..shape[ax.axis.index()]))
                .assign(&unpooled);
            y
        };
        Ok(vec![Elem::wrap(y)])
    })
}

fn col2im_kernel(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    by_float!(cx, inputs, col2im_general)
}

fn col2im_general<R: Real>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    dtype: DataType,
) -> Result<Vec<Tensor>, EvalError> {
    let xs = input(cx, inputs, 0)?.shape().to_vec();
    let image = ints_of(cx, input(cx, inputs, 1)?, "image_shape")?;
    let block = ints_of(cx, input(cx, inputs, 2)?, "block_shape")?;
    let spatial = image.len();
    if xs.len() != 3
        || block.len() != spatial
        || spatial == 0
        || spatial > MAX_SPATIAL
        || image.iter().chain(&block).any(|&v| v < 1)
    {
        return cx.err(format!(
            "input {xs:?}, image_shape {image:?} and block_shape {block:?} do not fit"
        ));
    }
    let image: Vec<usize> = image.into_iter().map(|v| v as usize).collect();
    let block: Vec<usize> = block.into_iter().map(|v| v as usize).collect();
    let k: usize = block.iter().product();
    let (n, ck, l) = (xs[0], xs[1], xs[2]);
    if ck % k != 0 {
        return cx.err(format!(
            "{ck} columns are not a multiple of the block {block:?}"
        ));
    }
    let c = ck / k;
    let strides = positive_attr(cx, "strides", spatial)?;
    let dilations = positive_attr(cx, "dilations", spatial)?;
    let (begin, end) = pads_attr(cx, spatial)?;
    // The grid of block positions.
    let mut blocks = Vec::with_capacity(spatial);
    for d in 0..spatial {
        let span = (block[d] - 1) * dilations[d] + 1;
        let padded = image[d] as i64 + begin[d] + end[d];
        if padded < span as i64 {
            return cx.err("the block is larger than the padded image");
        }
        blocks.push((padded as usize - span) / strides[d] + 1);
    }
    if blocks.iter().product::<usize>() != l {
        return cx.err(format!(
            "{l} blocks were given, the image holds {blocks:?} of them"
        ));
    }
    let lists: Vec<AxisLists> = (0..spatial)
        .map(|d| {
            axis_lists(
                blocks[d],
                strides[d],
                dilations[d],
                begin[d],
                block[d],
                image[d],
            )
        })
        .collect();
    let mut shape = vec![n, c];
    shape.extend(&image);
    let mut out = vec![R::zero(); volume(cx, &shape)?];
    let x = required::<R>(cx, inputs, 0, dtype)?;
    let (block_strides, image_strides) = (strides_of(&block), strides_of(&image));
    let plane: usize = image.iter().product();
    out.par_chunks_mut(plane.max(1))
        .enumerate()
        .for_each_init(Vec::new, |taps, (bc, dst)| {
            let (b, ch) = (bc / c, bc % c);
            let mut idx = [0usize; MAX_SPATIAL];
            for q in 0..l {
                unravel(q, &blocks, &mut idx[..spatial]);
                let per_axis: Vec<&[(usize, usize)]> =
                    (0..spatial).map(|d| &lists[d][idx[d]][..]).collect();
                product_taps(
                    &per_axis,
                    &block_strides,
                    &image_strides,
                    &image_strides,
                    taps,
                );
                for t in taps.iter() {
                    dst[t.at] += x[(b * ck + ch * k + t.kernel) * l + q];
                }
            }
        });
    Ok(vec![R::write(&shape, out, dtype)])
}

// ---------------------------------------------------------------------------
// Resize and Upsample.

#[derive(Clone, Copy, PartialEq)]
enum Interpolation {
    Nearest,
    Linear,
    Cubic,
}

/// How one axis is resized: per output index, the input indices it reads
/// with their weights, or the extrapolation value (tf_crop_and_resize).
struct AxisResize {
    axis: usize,
    out: usize,
    taps: Vec<Vec<(usize, f64)>>,
    extrapolated: Vec<bool>,
}

struct ResizePlan {
    out_shape: Vec<usize>,
    axes: Vec<AxisResize>,
    extrapolation: f64,
}

/// The attributes that pick each output's taps.
struct ResizeMode {
    interpolation: Interpolation,
    /// Resize-10 and Upsample: ONNX Runtime's nearest pixel (floor when
    /// upsampling, ceil when downsampling) and asymmetric coordinates.
    legacy: bool,
    coordinates: String,
    nearest: String,
    cubic_a: f64,
    exclude_outside: bool,
    antialias: bool,
}

/// The source coordinate of output index `y` of an axis.
fn source_coordinate(
    mode: &str,
    y: f64,
    scale: f64,
    input: usize,
    out: usize,
    roi: (f64, f64),
) -> Option<f64> {
    let (len, resized) = (input as f64, scale * input as f64);
    Some(match mode {
        "half_pixel" => (y + 0.5) / scale - 0.5,
        "pytorch_half_pixel" => {
            if resized == 1.0 {
                -0.5
            } else {
                (y + 0.5) / scale - 0.5
            }
        }
        "asymmetric" => y / scale,
        "tf_half_pixel_for_nn" => (y + 0.5) / scale,
        // The length `scale * input` here, not the integer output length
        // (as ONNX's reference and node tests have it; ONNX Runtime and
        // the 2-D kernel take the integer length).
        "align_corners" => {
            if resized == 1.0 {
                0.0
            } else {
                y * (len - 1.0) / (resized - 1.0)
            }
        }
        "half_pixel_symmetric" => {
            let adjustment = out as f64 / resized;
            let offset = len / 2.0 * (1.0 - adjustment);
            offset + (y + 0.5) / scale - 0.5
        }
        "tf_crop_and_resize" => {
            let x = if resized == 1.0 {
                (roi.1 - roi.0) * (len - 1.0) / 2.0
            } else {
                y * (roi.1 - roi.0) * (len - 1.0) / (resized - 1.0)
            };
            x + roi.0 * (len - 1.0)
        }
        _ => return None,
    })
}

/// Keys' cubic convolution weights of the 4 pixels around a point at
/// `ratio` (in (0, 1]) past the second.
fn cubic_weights(ratio: f64, a: f64) -> Vec<f64> {
    let r = ratio;
    vec![
        ((a * (r + 1.0) - 5.0 * a) * (r + 1.0) + 8.0 * a) * (r + 1.0) - 4.0 * a,
        ((a + 2.0) * r - (a + 3.0)) * r * r + 1.0,
        ((a + 2.0) * (1.0 - r) - (a + 3.0)) * (1.0 - r) * (1.0 - r) + 1.0,
        ((a * (2.0 - r) - 5.0 * a) * (2.0 - r) + 8.0 * a) * (2.0 - r) - 4.0 * a,
    ]
}

/// Antialiased cubic weights: the kernel stretched by 1 / scale when
/// downsampling, normalised.
fn cubic_weights_antialias(ratio: f64, scale: f64, a: f64) -> Vec<f64> {
    let scale = scale.min(1.0);
    let weight = |x: f64| {
        let x = x.abs();
        let (x2, x3) = (x * x, x * x * x);
        if x <= 1.0 {
            (a + 2.0) * x3 - (a + 3.0) * x2 + 1.0
        } else if x < 2.0 {
            a * x3 - 5.0 * a * x2 + 8.0 * a * x - 4.0 * a
        } else {
            0.0
        }
    };
    let start = (-2.0 / scale).floor() as i64 + 1;
    let w: Vec<f64> = (start..2 - start)
        .map(|i| weight(scale * (i as f64 - ratio)))
        .collect();
    let sum: f64 = w.iter().sum();
    w.into_iter().map(|v| v / sum).collect()
}

/// Antialiased linear weights (a triangle stretched by 1 / scale).
fn linear_weights_antialias(ratio: f64, scale: f64) -> Vec<f64> {
    let scale = scale.min(1.0);
    let start = (-1.0 / scale).floor() as i64 + 1;
    let w: Vec<f64> = (start..2 - start)
        .map(|i| (1.0 - ((i as f64 - ratio) * scale).abs()).clamp(0.0, 1.0))
        .collect();
    let sum: f64 = w.iter().sum();
    w.into_iter().map(|v| v / sum).collect()
}

impl ResizeMode {
    /// The taps of one axis, as ONNX's reference computes them: the weights
    /// of the pixels nearest the source coordinate (the left one preferred,
    /// so an exact coordinate has ratio 1), edge-clamped.
    fn axis(
        &self,
        cx: &OpCtx,
        axis: usize,
        input: usize,
        out: usize,
        scale: f64,
        roi: (f64, f64),
    ) -> Result<AxisResize, EvalError> {
        if input == 0 && out > 0 {
            return cx.err(format!("axis {axis} is empty and cannot be resized"));
        }
        let last = input as i64 - 1;
        let mut taps = Vec::with_capacity(out);
        let mut extrapolated = Vec::with_capacity(out);
        for y in 0..out {
            let Some(x) = source_coordinate(&self.coordinates, y as f64, scale, input, out, roi)
            else {
                return cx.err(format!(
                    "coordinate_transformation_mode '{}' is not an ONNX value",
                    self.coordinates
                ));
            };
            extrapolated
                .push(self.coordinates == "tf_crop_and_resize" && (x < 0.0 || x > last as f64));
            if self.legacy && self.interpolation == Interpolation::Nearest {
                let i = if scale < 1.0 { x.ceil() } else { x.floor() };
                taps.push(vec![((i as i64).clamp(0, last) as usize, 1.0)]);
                continue;
            }
            let ratio = if x == x.floor() { 1.0 } else { x - x.floor() };
            let mut weights = match self.interpolation {
                Interpolation::Nearest => {
                    let right = ratio == 1.0
                        || match self.nearest.as_str() {
                            "round_prefer_floor" => ratio > 0.5,
                            "round_prefer_ceil" => ratio >= 0.5,
                            "floor" => false,
                            "ceil" => true,
                            other => {
                                return cx
                                    .err(format!("nearest_mode '{other}' is not an ONNX value"))
                            }
                        };
                    if right {
                        vec![0.0, 1.0]
                    } else {
                        vec![1.0, 0.0]
                    }
                }
                Interpolation::Linear if self.antialias => linear_weights_antialias(ratio, scale),
                Interpolation::Linear => vec![1.0 - ratio, ratio],
                Interpolation::Cubic if self.antialias => {
                    cubic_weights_antialias(ratio, scale, self.cubic_a)
                }
                Interpolation::Cubic => cubic_weights(ratio, self.cubic_a),
            };
            let n = weights.len() as i64;
            let pad = (n + 1) / 2;
            let padded = x + pad as f64;
            let p = padded.floor();
            let frac = padded - p;
            let offset = if n % 2 == 0 {
                if frac == 0.0 {
                    -(n / 2)
                } else {
                    -(n / 2) + 1
                }
            } else {
                -((n - 1) / 2) + (frac > 0.5) as i64
            };
            let start = p as i64 + offset - pad;
            if self.exclude_outside {
                for (i, w) in weights.iter_mut().enumerate() {
                    let at = start + i as i64;
                    if at < 0 || at > last {
                        *w = 0.0;
                    }
                }
                let sum: f64 = weights.iter().sum();
                let sum = if sum == 0.0 { 1.0 } else { sum };
                weights.iter_mut().for_each(|w| *w /= sum);
            }
            taps.push(
                weights
                    .into_iter()
                    .enumerate()
                    .map(|(i, w)| ((start + i as i64).clamp(0, last.max(0)) as usize, w))
                    .collect(),
            );
        }
        Ok(AxisResize {
            axis,
            out,
            taps,
            extrapolated,
        })
    }
}

/// A float input (scales, roi) as f64, `None` when absent or empty.
fn optional_floats(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    i: usize,
    what: &str,
) -> Result<Option<Vec<f64>>, EvalError> {
    match inputs.get(i).copied().flatten() {
        Some(t) if t.len() > 0 => Ok(Some(float_values(cx, t, what)?)),
        _ => Ok(None),
    }
}

impl ResizePlan {
    fn read(cx: &OpCtx, inputs: &[Option<&Tensor>], upsample: bool) -> Result<Self, EvalError> {
        let shape = input(cx, inputs, 0)?.shape().to_vec();
        let rank = shape.len();
        let legacy = upsample || cx.opset < 11;
        let interpolation = match cx.string_attr("mode", "nearest")?.as_str() {
            "nearest" => Interpolation::Nearest,
            "linear" | "bilinear" | "trilinear" => Interpolation::Linear,
            "cubic" if !legacy => Interpolation::Cubic,
            other => return cx.err(format!("mode '{other}' is not an ONNX value here")),
        };
        let mode = if legacy {
            ResizeMode {
                interpolation,
                legacy,
                coordinates: "asymmetric".into(),
                nearest: "floor".into(),
                cubic_a: -0.75,
                exclude_outside: false,
                antialias: false,
            }
        } else {
            ResizeMode {
                interpolation,
                legacy,
                coordinates: cx.string_attr("coordinate_transformation_mode", "half_pixel")?,
                nearest: cx.string_attr("nearest_mode", "round_prefer_floor")?,
                cubic_a: cx.float_attr("cubic_coeff_a", -0.75)? as f64,
                exclude_outside: cx.int_attr("exclude_outside", 0)? != 0,
                antialias: cx.int_attr("antialias", 0)? != 0,
            }
        };
        if mode.antialias && interpolation == Interpolation::Nearest {
            return cx.err("antialias is not defined for nearest interpolation");
        }
        let axes: Vec<usize> = match cx.ints_attr("axes")? {
            Some(a) if !legacy => {
                let mut axes = Vec::new();
                for v in a {
                    let d = cx.axis(v, rank)?;
                    if axes.contains(&d) {
                        return cx.err(format!("axis {v} is repeated"));
                    }
                    axes.push(d);
                }
                axes
            }
            _ => (0..rank).collect(),
        };
        let (scales, sizes, roi) = if legacy {
            let scales = if upsample && cx.opset < 7 {
                let h = cx.float_attr("height_scale", 1.0)? as f64;
                let w = cx.float_attr("width_scale", 1.0)? as f64;
                if rank != 4 {
                    return cx.err("Upsample-1 takes 4-D inputs");
                }
                Some(vec![1.0, 1.0, h, w])
            } else if upsample && cx.opset < 9 {
                cx.floats_attr("scales")?
                    .map(|v| v.into_iter().map(|s| s as f64).collect())
            } else {
                optional_floats(cx, inputs, 1, "scales")?
            };
            (scales, None, None)
        } else {
            let sizes = match inputs.get(3).copied().flatten() {
                Some(t) if t.len() > 0 => Some(ints_of(cx, t, "sizes")?),
                _ => None,
            };
            (
                optional_floats(cx, inputs, 2, "scales")?,
                sizes,
                optional_floats(cx, inputs, 1, "roi")?,
            )
        };
        let k = axes.len();
        let mut roi_full = vec![(0.0, 1.0); rank];
        if mode.coordinates == "tf_crop_and_resize" {
            match &roi {
                Some(r) if r.len() == 2 * k => {
                    for (i, &d) in axes.iter().enumerate() {
                        roi_full[d] = (r[i], r[k + i]);
                    }
                }
                _ => return cx.err(format!("roi must have {} values", 2 * k)),
            }
        }
        let mut scale = vec![1.0; rank];
        let mut out_shape = shape.clone();
        match (scales, sizes) {
            (Some(s), None) if s.len() == k => {
                for (i, &d) in axes.iter().enumerate() {
                    if !(s[i] > 0.0) {
                        return cx.err(format!("scales must be positive, found {s:?}"));
                    }
                    scale[d] = s[i];
                    let o = (s[i] * shape[d] as f64).floor();
                    if o > MAX_VALUES as f64 {
                        return cx.err(format!("scales {s:?} make too large an output"));
                    }
                    out_shape[d] = o as usize;
                }
            }
            (None, Some(z)) if z.len() == k => {
                if z.iter().any(|&v| v < 0) {
                    return cx.err(format!("sizes must not be negative, found {z:?}"));
                }
                for (i, &d) in axes.iter().enumerate() {
                    out_shape[d] = z[i] as usize;
                    scale[d] = z[i] as f64 / shape[d] as f64;
                }
                let policy = if legacy {
                    "stretch".to_string()
                } else {
                    cx.string_attr("keep_aspect_ratio_policy", "stretch")?
                };
                let common = match policy.as_str() {
                    "stretch" => None,
                    "not_larger" => axes.iter().map(|&d| scale[d]).reduce(f64::min),
                    "not_smaller" => axes.iter().map(|&d| scale[d]).reduce(f64::max),
                    other => {
                        return cx.err(format!(
                            "keep_aspect_ratio_policy '{other}' is not an ONNX value"
                        ))
                    }
                };
                if let Some(s) = common {
                    for &d in &axes {
                        scale[d] = s;
                        out_shape[d] = (s * shape[d] as f64 + 0.5) as usize;
                    }
                }
            }
            _ => {
                return cx.err(format!(
                    "exactly one of scales and sizes must be given, with {k} values"
                ))
            }
        }
        volume(cx, &out_shape)?;
        let mut plans = Vec::new();
        for &d in &axes {
            let identity = scale[d] == 1.0 && out_shape[d] == shape[d] && roi_full[d] == (0.0, 1.0);
            if !identity {
                plans.push(mode.axis(cx, d, shape[d], out_shape[d], scale[d], roi_full[d])?);
            }
        }
        Ok(ResizePlan {
            out_shape,
            axes: plans,
            extrapolation: if legacy {
                0.0
            } else {
                cx.float_attr("extrapolation_value", 0.0)? as f64
            },
        })
    }

    /// Resizes axis by axis in f64; integers are rounded half to even and
    /// saturated at the end, as ONNX's reference does.
    fn apply<T: Number>(&self, x: &ArrayD<T>) -> ArrayD<T> {
        let mut shape = x.shape().to_vec();
        let mut data: Vec<f64> = x.iter().map(|v| v.to_f64()).collect();
        for a in &self.axes {
            let outer: usize = shape[..a.axis].iter().product();
            let inner: usize = shape[a.axis + 1..].iter().product();
            let len = shape[a.axis];
            let mut next = vec![0.0; outer * a.out * inner];
            for o in 0..outer {
                let src = &data[o * len * inner..][..len * inner];
                for (y, taps) in a.taps.iter().enumerate() {
                    let dst = &mut next[(o * a.out + y) * inner..][..inner];
                    if a.extrapolated[y] {
                        dst.fill(self.extrapolation);
                        continue;
                    }
                    for &(i, w) in taps {
                        for (d, &s) in dst.iter_mut().zip(&src[i * inner..][..inner]) {
                            *d += w * s;
                        }
                    }
                }
            }
            shape[a.axis] = a.out;
            data = next;
        }
        debug_assert_eq!(shape, self.out_shape);
        let values = data
            .into_iter()
            .map(|v| {
                if T::IS_FLOAT {
                    T::from_f64(v)
                } else {
                    let r = v.round_ties_even();
                    if r.is_nan() {
                        T::zero()
                    } else if r <= T::lowest().to_f64() {
                        T::lowest()
                    } else if r >= T::highest().to_f64() {
                        T::highest()
                    } else {
                        T::from_f64(r)
                    }
                }
            })
            .collect();
        arr(&self.out_shape, values)
    }
}

/// Whether the 2-D-era f32 kernel in `resize.rs` computes this Resize.
fn old_resize_handles(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<bool, EvalError> {
    let x = input(cx, inputs, 0)?;
    let typed = |i: usize, dtype: DataType| {
        inputs
            .get(i)
            .copied()
            .flatten()
            .is_none_or(|t| t.dtype() == dtype)
    };
    let coordinates = cx.string_attr("coordinate_transformation_mode", "half_pixel")?;
    // align_corners differs where `scale * input` is not the output length:
    // with sizes it is.
    let sizes_given = inputs
        .get(3)
        .copied()
        .flatten()
        .is_some_and(|t| t.len() > 0);
    if coordinates == "align_corners" && !sizes_given {
        return Ok(false);
    }
    Ok(x.dtype() == DataType::F32
        && cx.opset >= 11
        && matches!(
            cx.string_attr("mode", "nearest")?.as_str(),
            "nearest" | "linear"
        )
        && matches!(
            cx.string_attr("coordinate_transformation_mode", "half_pixel")?
                .as_str(),
            "half_pixel"
                | "pytorch_half_pixel"
                | "asymmetric"
                | "align_corners"
                | "half_pixel_symmetric"
        )
        && cx.int_attr("antialias", 0)? == 0
        && cx.int_attr("exclude_outside", 0)? == 0
        && cx.ints_attr("axes")?.is_none()
        && cx.string_attr("keep_aspect_ratio_policy", "stretch")? == "stretch"
        && typed(2, DataType::F32)
        && typed(3, DataType::I64))
}

fn resize_kernel(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    if old_resize_handles(cx, inputs)? {
        return resize::resize(cx, inputs);
    }
    let plan = ResizePlan::read(cx, inputs, false)?;
    numeric!(cx, input(cx, inputs, 0)?, "input 0", |a| Ok(vec![
        Elem::wrap(plan.apply(a))
    ]))
}

fn upsample_kernel(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let plan = ResizePlan::read(cx, inputs, true)?;
    numeric!(cx, input(cx, inputs, 0)?, "input 0", |a| Ok(vec![
        Elem::wrap(plan.apply(a))
    ]))
}

// ---------------------------------------------------------------------------
// GridSample and AffineGrid.

#[derive(Clone, Copy, PartialEq)]
enum Padding {
    Zeros,
    Border,
    Reflection,
}

/// Reflects `x` at the borders `lo` and `hi` until it lies between them.
fn reflect(x: f64, lo: f64, hi: f64) -> f64 {
    let range = hi - lo;
    if range <= 0.0 {
        return lo;
    }
    let fold = |dx: f64| {
        let n = (dx / range).trunc();
        (n as i64 % 2 == 0, dx - n * range)
    };
    if x < lo {
        let (even, r) = fold(lo - x);
        if even {
            lo + r
        } else {
            hi - r
        }
    } else if x > hi {
        let (even, r) = fold(x - hi);
        if even {
            hi - r
        } else {
            lo + r
        }
    } else {
        x
    }
}

/// GridSample's sampling of one (batch, channel) plane.
struct Sampler<'a, R> {
    plane: &'a [R],
    dims: &'a [usize],
    strides: &'a [usize],
    padding: Padding,
    /// Per axis, the borders reflection folds at.
    borders: &'a [(f64, f64)],
}

impl<R: Real> Sampler<'_, R> {
    /// The pixel at integer position `idx`, padded as the mode says.
    fn pixel(&self, idx: &[i64]) -> R {
        let mut at = 0;
        for (d, &i) in idx.iter().enumerate() {
            let len = self.dims[d] as i64;
            let i = match self.padding {
                Padding::Zeros if i < 0 || i >= len => return R::zero(),
                Padding::Zeros => i,
                Padding::Border => i.clamp(0, len - 1),
                Padding::Reflection => (reflect(i as f64, self.borders[d].0, self.borders[d].1)
                    as i64)
                    .clamp(0, len - 1),
            };
            at += i as usize * self.strides[d];
        }
        self.plane[at]
    }

    /// The sum over the product of per-axis taps `(position, weight)`.
    fn weighted(&self, taps: &[Vec<(i64, f64)>]) -> R {
        let n = taps.len();
        let mut counter = [0usize; MAX_SPATIAL];
        let mut idx = [0i64; MAX_SPATIAL];
        let mut acc = R::zero();
        loop {
            let mut w = 1.0;
            for d in 0..n {
                let (i, wd) = taps[d][counter[d]];
                idx[d] = i;
                w *= wd;
            }
            if w != 0.0 {
                acc += R::of(w) * self.pixel(&idx[..n]);
            }
            let mut d = n;
            loop {
                if d == 0 {
                    return acc;
                }
                d -= 1;
                counter[d] += 1;
                if counter[d] < taps[d].len() {
                    break;
                }
                counter[d] = 0;
            }
        }
    }
}

fn grid_sample_kernel(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    by_float!(cx, inputs, grid_sample_general)
}

fn grid_sample_general<R: Real>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    dtype: DataType,
) -> Result<Vec<Tensor>, EvalError> {
    let xs = input(cx, inputs, 0)?.shape().to_vec();
    let grid_t = input(cx, inputs, 1)?;
    let gs = grid_t.shape().to_vec();
    let (n, c) = nc_spatial(cx, &xs)?;
    let k = xs.len() - 2;
    if gs.len() != xs.len() || gs[0] != n || gs[k + 1] != k || k > MAX_SPATIAL {
        return cx.err(format!("the grid {gs:?} does not fit the input {xs:?}"));
    }
    if cx.opset < 20 && k != 2 {
        return cx.err("GridSample before opset 20 takes 4-D inputs");
    }
    let interpolation = match cx
        .string_attr("mode", if cx.opset < 20 { "bilinear" } else { "linear" })?
        .as_str()
    {
        "bilinear" | "linear" => Interpolation::Linear,
        "nearest" => Interpolation::Nearest,
        "bicubic" | "cubic" => Interpolation::Cubic,
        other => return cx.err(format!("mode '{other}' is not an ONNX value")),
    };
    let padding = match cx.string_attr("padding_mode", "zeros")?.as_str() {
        "zeros" => Padding::Zeros,
        "border" => Padding::Border,
        "reflection" => Padding::Reflection,
        other => return cx.err(format!("padding_mode '{other}' is not an ONNX value")),
    };
    let align = cx.int_attr("align_corners", 0)? != 0;
    let dims = xs[2..].to_vec();
    let borders: Vec<(f64, f64)> = dims
        .iter()
        .map(|&d| {
            if align {
                (0.0, d as f64 - 1.0)
            } else {
                (-0.5, d as f64 - 0.5)
            }
        })
        .collect();
    let x = required::<R>(cx, inputs, 0, dtype)?;
    let grid = float_values(cx, grid_t, "the grid")?;
    let out_points: usize = gs[1..=k].iter().product();
    let mut shape = vec![n, c];
    shape.extend(&gs[1..=k]);
    let mut out = vec![R::zero(); volume(cx, &shape)?];
    let in_plane: usize = dims.iter().product();
    let strides = strides_of(&dims);
    out.par_chunks_mut(out_points.max(1))
        .enumerate()
        .for_each(|(plane, dst)| {
            let b = plane / c;
            let sampler = Sampler {
                plane: &x[plane * in_plane..][..in_plane],
                dims: &dims,
                strides: &strides,
                padding,
                borders: &borders,
            };
            let mut taps: Vec<Vec<(i64, f64)>> = vec![Vec::new(); k];
            for (o, y) in dst.iter_mut().enumerate() {
                let point = &grid[(b * out_points + o) * k..][..k];
                for d in 0..k {
                    // The grid's last dim is (x, y, z...): innermost axis first.
                    let g = point[k - 1 - d];
                    let len = dims[d] as f64;
                    let mut v = if align {
                        (g + 1.0) / 2.0 * (len - 1.0)
                    } else {
                        ((g + 1.0) * len - 1.0) / 2.0
                    };
                    if interpolation == Interpolation::Nearest {
                        v = v.round_ties_even();
                    }
                    let (lo, hi) = borders[d];
                    if v < lo || v > hi {
                        match padding {
                            // Cubic taps are clamped one by one (as in
                            // ONNX Runtime and PyTorch), not the point.
                            Padding::Border if interpolation == Interpolation::Cubic => {}
                            Padding::Border => v = v.clamp(0.0, len - 1.0),
                            Padding::Reflection => v = reflect(v, lo, hi),
                            Padding::Zeros => {}
                        }
                    }
                    let base = v.floor();
                    let f = v - base;
                    let base = if base.is_finite() {
                        base as i64
                    } else {
                        i64::MIN / 2
                    };
                    taps[d].clear();
                    match interpolation {
                        Interpolation::Nearest => taps[d].push((v as i64, 1.0)),
                        Interpolation::Linear => {
                            taps[d].extend([(base, 1.0 - f), (base + 1, f)]);
                        }
                        Interpolation::Cubic => {
                            let w = cubic_weights(f, -0.75);
                            taps[d].extend((0..4).map(|i| (base - 1 + i as i64, w[i])));
                        }
                    }
                }
                *y = sampler.weighted(&taps);
            }
        });
    Ok(vec![R::write(&shape, out, dtype)])
}

fn affine_grid_kernel(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    by_float!(cx, inputs, affine_grid_general)
}

fn affine_grid_general<R: Real>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    dtype: DataType,
) -> Result<Vec<Tensor>, EvalError> {
    let ts = input(cx, inputs, 0)?.shape().to_vec();
    let size = ints_of(cx, input(cx, inputs, 1)?, "size")?;
    let k = size.len().saturating_sub(2);
    if !(k == 2 || k == 3)
        || ts != [size[0].max(0) as usize, k, k + 1]
        || size.iter().any(|&v| v < 0)
    {
        return cx.err(format!(
            "theta {ts:?} and size {size:?} must be (N, 2, 3) and 4 values, or (N, 3, 4) and 5"
        ));
    }
    let align = cx.int_attr("align_corners", 0)? != 0;
    let theta = required::<R>(cx, inputs, 0, dtype)?;
    let dims: Vec<usize> = size[2..].iter().map(|&v| v as usize).collect();
    let n = ts[0];
    let coordinate = |i: usize, len: usize| -> f64 {
        if align {
            if len <= 1 {
                -1.0
            } else {
                -1.0 + 2.0 * i as f64 / (len - 1) as f64
            }
        } else {
            -1.0 + (2 * i + 1) as f64 / len as f64
        }
    };
    let points: usize = dims.iter().product();
    let mut shape = vec![n];
    shape.extend(&dims);
    shape.push(k);
    let mut out = vec![R::zero(); volume(cx, &shape)?];
    let mut idx = [0usize; 3];
    for b in 0..n {
        let t = &theta[b * k * (k + 1)..][..k * (k + 1)];
        for p in 0..points {
            unravel(p, &dims, &mut idx[..k]);
            // The homogeneous base point (x, y[, z], 1), x along the last dim.
            let mut base = [R::one(); 4];
            for d in 0..k {
                base[d] = R::of(coordinate(idx[k - 1 - d], dims[k - 1 - d]));
            }
            for r in 0..k {
                let mut acc = R::zero();
                for j in 0..=k {
                    acc += t[r * (k + 1) + j] * base[j];
                }
                out[(b * points + p) * k + r] = acc;
            }
        }
    }
    Ok(vec![R::write(&shape, out, dtype)])
}

// ---------------------------------------------------------------------------
// RoiAlign and MaxRoiPool.

fn roi_align_kernel(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    by_float!(cx, inputs, roi_align_general)
}

/// Checks rois against (num, cols) and reads the batch index of each.
fn roi_batches(
    cx: &OpCtx,
    rois: &[usize],
    cols: usize,
    batches: Vec<i64>,
    n: usize,
) -> Result<Vec<usize>, EvalError> {
    if rois.len() != 2 || rois[1] != cols || batches.len() != rois[0] {
        return cx.err(format!(
            "rois {rois:?} must be (num_rois, {cols}), one batch index each"
        ));
    }
    batches
        .into_iter()
        .map(|b| match usize::try_from(b).ok().filter(|&b| b < n) {
            Some(b) => Ok(b),
            None => cx.err(format!("batch index {b} is outside the batch of {n}")),
        })
        .collect()
}

fn roi_align_general<R: Real>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    dtype: DataType,
) -> Result<Vec<Tensor>, EvalError> {
    let xs = input(cx, inputs, 0)?.shape().to_vec();
    if xs.len() != 4 {
        return cx.err(format!("the input {xs:?} must be 4-D"));
    }
    let (n, c, height, width) = (xs[0], xs[1], xs[2], xs[3]);
    let rs = input(cx, inputs, 1)?.shape().to_vec();
    let batches = ints_of(cx, input(cx, inputs, 2)?, "batch_indices")?;
    let batches = roi_batches(cx, &rs, 4, batches, n)?;
    let max_mode = match cx.string_attr("mode", "avg")?.as_str() {
        "avg" => false,
        "max" => true,
        other => return cx.err(format!("mode '{other}' is not an ONNX value")),
    };
    let (ph, pw) = (
        cx.int_attr("output_height", 1)?,
        cx.int_attr("output_width", 1)?,
    );
    let sampling = cx.int_attr("sampling_ratio", 0)?;
    if ph < 1 || pw < 1 || sampling < 0 {
        return cx
            .err("output_height and output_width must be positive, sampling_ratio not negative");
    }
    let (ph, pw) = (ph as usize, pw as usize);
    let scale = cx.float_attr("spatial_scale", 1.0)? as f64;
    let half_pixel = if cx.opset < 16 {
        false
    } else {
        match cx
            .string_attr("coordinate_transformation_mode", "half_pixel")?
            .as_str()
        {
            "half_pixel" => true,
            "output_half_pixel" => false,
            other => {
                return cx.err(format!(
                    "coordinate_transformation_mode '{other}' is not an ONNX value"
                ))
            }
        }
    };
    let x = required::<R>(cx, inputs, 0, dtype)?;
    let rois: Vec<f64> = required::<R>(cx, inputs, 1, dtype)?
        .into_iter()
        .map(R::get)
        .collect();
    let shape = [rs[0], c, ph, pw];
    let mut out = vec![R::zero(); volume(cx, &shape)?];
    let plane = height * width;
    out.par_chunks_mut(c * ph * pw)
        .enumerate()
        .for_each(|(r, dst)| {
            let offset = if half_pixel { 0.5 } else { 0.0 };
            let roi = &rois[r * 4..][..4];
            let (start_w, start_h) = (roi[0] * scale - offset, roi[1] * scale - offset);
            let (end_w, end_h) = (roi[2] * scale - offset, roi[3] * scale - offset);
            let (mut roi_w, mut roi_h) = (end_w - start_w, end_h - start_h);
            if !half_pixel {
                roi_w = roi_w.max(1.0);
                roi_h = roi_h.max(1.0);
            }
            let (bin_h, bin_w) = (roi_h / ph as f64, roi_w / pw as f64);
            let grid_h = if sampling > 0 {
                sampling as usize
            } else {
                (roi_h / ph as f64).ceil().max(0.0) as usize
            };
            let grid_w = if sampling > 0 {
                sampling as usize
            } else {
                (roi_w / pw as f64).ceil().max(0.0) as usize
            };
            let count = (grid_h * grid_w).max(1) as f64;
            // Per output pixel, its samples: 4 positions and weights each.
            let mut samples: Vec<Vec<([usize; 4], [f64; 4])>> = Vec::with_capacity(ph * pw);
            for py in 0..ph {
                for px in 0..pw {
                    let mut s = Vec::with_capacity(grid_h * grid_w);
                    for iy in 0..grid_h {
                        let yy =
                            start_h + py as f64 * bin_h + (iy as f64 + 0.5) * bin_h / grid_h as f64;
                        for ix in 0..grid_w {
                            let xx = start_w
                                + px as f64 * bin_w
                                + (ix as f64 + 0.5) * bin_w / grid_w as f64;
                            s.push(bilinear_corners(yy, xx, height, width));
                        }
                    }
                    samples.push(s);
                }
            }
            let b = batches[r];
            for (ch, out_plane) in dst.chunks_mut(ph * pw).enumerate() {
                let src = &x[(b * c + ch) * plane..][..plane];
                for (y, s) in out_plane.iter_mut().zip(&samples) {
                    let term = |(pos, w): &([usize; 4], [f64; 4]), i: usize| {
                        R::of(w[i]) * src.get(pos[i]).copied().unwrap_or_default()
                    };
                    *y = if max_mode {
                        let mut best: Option<R> = None;
                        for p in s {
                            let mut v = term(p, 0);
                            for i in 1..4 {
                                let t = term(p, i);
                                if t > v {
                                    v = t;
                                }
                            }
                            if best.is_none_or(|b| v > b) {
                                best = Some(v);
                            }
                        }
                        best.unwrap_or_default()
                    } else {
                        let mut acc = R::zero();
                        for p in s {
                            for i in 0..4 {
                                acc += term(p, i);
                            }
                        }
                        acc / R::of(count)
                    };
                }
            }
        });
    Ok(vec![R::write(&shape, out, dtype)])
}

/// RoiAlign's bilinear sample at (y, x): four plane positions and their
/// weights (all zero outside the plane's margin of one pixel).
fn bilinear_corners(y: f64, x: f64, height: usize, width: usize) -> ([usize; 4], [f64; 4]) {
    if y < -1.0 || y > height as f64 || x < -1.0 || x > width as f64 || height == 0 || width == 0 {
        return ([0; 4], [0.0; 4]);
    }
    let (mut y, mut x) = (y.max(0.0), x.max(0.0));
    let (mut y_low, mut x_low) = (y as usize, x as usize);
    let (y_high, x_high);
    if y_low >= height - 1 {
        y_low = height - 1;
        y_high = y_low;
        y = y_low as f64;
    } else {
        y_high = y_low + 1;
    }
    if x_low >= width - 1 {
        x_low = width - 1;
        x_high = x_low;
        x = x_low as f64;
    } else {
        x_high = x_low + 1;
    }
    let (ly, lx) = (y - y_low as f64, x - x_low as f64);
    let (hy, hx) = (1.0 - ly, 1.0 - lx);
    (
        [
            y_low * width + x_low,
            y_low * width + x_high,
            y_high * width + x_low,
            y_high * width + x_high,
        ],
        [hy * hx, hy * lx, ly * hx, ly * lx],
    )
}

fn max_roi_pool_kernel(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    by_float!(cx, inputs, max_roi_pool_general)
}

fn max_roi_pool_general<R: Real>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    dtype: DataType,
) -> Result<Vec<Tensor>, EvalError> {
    let xs = input(cx, inputs, 0)?.shape().to_vec();
    if xs.len() != 4 {
        return cx.err(format!("the input {xs:?} must be 4-D"));
    }
    let (n, c, height, width) = (xs[0], xs[1], xs[2], xs[3]);
    let rs = input(cx, inputs, 1)?.shape().to_vec();
    let rois: Vec<f64> = required::<R>(cx, inputs, 1, dtype)?
        .into_iter()
        .map(R::get)
        .collect();
    let batches: Vec<i64> = rois.chunks(5).map(|r| r[0] as i64).collect();
    let batches = roi_batches(cx, &rs, 5, batches, n)?;
    let (ph, pw) = match cx.ints_attr("pooled_shape")?.as_deref() {
        Some(&[h, w]) if h >= 1 && w >= 1 => (h as usize, w as usize),
        _ => return cx.err("pooled_shape must be 2 positive values"),
    };
    let scale = cx.float_attr("spatial_scale", 1.0)? as f64;
    let x = required::<R>(cx, inputs, 0, dtype)?;
    let shape = [rs[0], c, ph, pw];
    let mut out = vec![R::zero(); volume(cx, &shape)?];
    let plane = height * width;
    for (r, dst) in out.chunks_mut((c * ph * pw).max(1)).enumerate() {
        let roi = &rois[r * 5..][..5];
        // In f32, as ONNX Runtime computes the bins.
        let scale = scale as f32;
        let corner = |v: f64| (v as f32 * scale).round() as i64;
        let (start_w, start_h) = (corner(roi[1]), corner(roi[2]));
        let (end_w, end_h) = (corner(roi[3]), corner(roi[4]));
        let roi_h = (end_h - start_h + 1).max(1) as f32;
        let roi_w = (end_w - start_w + 1).max(1) as f32;
        let (bin_h, bin_w) = (roi_h / ph as f32, roi_w / pw as f32);
        let b = batches[r];
        let edge = |i: usize, bin: f32, start: i64, len: usize, end: bool| {
            let v = i as f32 * bin;
            let v = if end { v.ceil() } else { v.floor() };
            (v as i64 + start).clamp(0, len as i64)
        };
        for ch in 0..c {
            let src = &x[(b * c + ch) * plane..][..plane];
            for py in 0..ph {
                let h0 = edge(py, bin_h, start_h, height, false);
                let h1 = edge(py + 1, bin_h, start_h, height, true);
                for px in 0..pw {
                    let w0 = edge(px, bin_w, start_w, width, false);
                    let w1 = edge(px + 1, bin_w, start_w, width, true);
                    let mut best: Option<R> = None;
                    for yy in h0..h1 {
                        for xx in w0..w1 {
                            let v = src[yy as usize * width + xx as usize];
                            if best.is_none_or(|b| v > b) {
                                best = Some(v);
                            }
                        }
                    }
                    dst[(ch * ph + py) * pw + px] = best.unwrap_or_default();
                }
            }
        }
    }
    Ok(vec![R::write(&shape, out, dtype)])
}

// ---------------------------------------------------------------------------
// NonMaxSuppression.

/// Whether two boxes overlap by more than `threshold` (intersection over
/// union); boxes without area never do.
fn suppresses(a: &[f64], b: &[f64], center: bool, threshold: f64) -> bool {
    // Each box as (y min, x min, y max, x max).
    let corners = |v: &[f64]| -> [f64; 4] {
        if center {
            let (xc, yc, w, h) = (v[0], v[1], v[2], v[3]);
            [yc - h / 2.0, xc - w / 2.0, yc + h / 2.0, xc + w / 2.0]
        } else {
            [
                v[0].min(v[2]),
                v[1].min(v[3]),
                v[0].max(v[2]),
                v[1].max(v[3]),
            ]
        }
    };
    let (p, q) = (corners(a), corners(b));
    let (y0, x0) = (p[0].max(q[0]), p[1].max(q[1]));
    let (y1, x1) = (p[2].min(q[2]), p[3].min(q[3]));
    if x1 <= x0 || y1 <= y0 {
        return false;
    }
    let inter = (y1 - y0) * (x1 - x0);
    let area = |v: [f64; 4]| (v[2] - v[0]) * (v[3] - v[1]);
    let (area_p, area_q) = (area(p), area(q));
    let union = area_p + area_q - inter;
    if area_p <= 0.0 || area_q <= 0.0 || union <= 0.0 {
        return false;
    }
    inter / union > threshold
}

fn non_max_suppression_kernel(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
) -> Result<Vec<Tensor>, EvalError> {
    let boxes_t = input(cx, inputs, 0)?;
    let scores_t = input(cx, inputs, 1)?;
    let (bs, ss) = (boxes_t.shape(), scores_t.shape());
    if bs.len() != 3 || bs[2] != 4 || ss.len() != 3 || ss[0] != bs[0] || ss[2] != bs[1] {
        return cx.err(format!(
            "boxes {bs:?} must be (batch, boxes, 4), scores {ss:?} (batch, classes, boxes)"
        ));
    }
    let (batches, count, classes) = (bs[0], bs[1], ss[1]);
    let boxes = float_values(cx, boxes_t, "boxes")?;
    let scores = float_values(cx, scores_t, "scores")?;
    let scalar = |i: usize, what: &str| -> Result<Option<f64>, EvalError> {
        match inputs.get(i).copied().flatten() {
            Some(t) if t.len() > 0 => Ok(Some(float_values(cx, t, what)?[0])),
            _ => Ok(None),
        }
    };
    let max_boxes = match inputs.get(2).copied().flatten() {
        Some(t) if t.len() > 0 => ints_of(cx, t, "max_output_boxes_per_class")?[0].max(0) as usize,
        _ => 0,
    };
    let iou_threshold = scalar(3, "iou_threshold")?.unwrap_or(0.0);
    let score_threshold = scalar(4, "score_threshold")?;
    let center = cx.int_attr("center_point_box", 0)? != 0;
    let mut selected: Vec<i64> = Vec::new();
    for b in 0..batches {
        for class in 0..classes {
            let class_scores = &scores[(b * classes + class) * count..][..count];
            let mut candidates: Vec<usize> = (0..count)
                .filter(|&i| score_threshold.is_none_or(|t| class_scores[i] > t))
                .collect();
            // Highest score first; equal scores by index.
            candidates.sort_by(|&i, &j| {
                class_scores[j]
                    .partial_cmp(&class_scores[i])
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then(i.cmp(&j))
            });
            let mut kept: Vec<usize> = Vec::new();
            for i in candidates {
                if kept.len() >= max_boxes {
                    break;
                }
                let bi = &boxes[(b * count + i) * 4..][..4];
                if kept.iter().all(|&k| {
                    !suppresses(
                        &boxes[(b * count + k) * 4..][..4],
                        bi,
                        center,
                        iou_threshold,
                    )
                }) {
                    kept.push(i);
                    selected.extend([b as i64, class as i64, i as i64]);
                }
            }
        }
    }
    let rows = selected.len() / 3;
    Ok(vec![Tensor::I64(arr(&[rows, 3], selected))])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run_node;

    /// Runs one node, written as in the text form with inputs `%a`, `%b`...
    /// (`_` for absent ones), at `opset`.
    fn run(node: &str, opset: i64, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>, EvalError> {
        let names = ["a", "b", "c", "d", "e"];
        let decls: String = (0..inputs.len())
            .map(|i| format!("  input %{}\n", names[i]))
            .collect();
        let text = format!(
            "ir_version 8\nopset \"\" {opset}\n\ngraph main {{\n{decls}  output %y\n  n: {node}\n}}\n"
        );
        let model = qgraph_text::parse_model(&text).expect("the test model parses");
        let g = &model.graph;
        let id = g.topo_order().expect("a graph")[0];
        let refs: Vec<Option<&Tensor>> = inputs.iter().map(Option::as_ref).collect();
        run_node(g, id, opset, &refs)
    }

    fn f64s(shape: &[usize], v: &[f64]) -> Option<Tensor> {
        Some(Tensor::F64(arr(shape, v.to_vec())))
    }

    fn f32s(shape: &[usize], v: Vec<f32>) -> Option<Tensor> {
        Some(Tensor::F32(arr(shape, v)))
    }

    fn i64s(shape: &[usize], v: &[i64]) -> Option<Tensor> {
        Some(Tensor::I64(arr(shape, v.to_vec())))
    }

    fn values_f64(t: &Tensor) -> (Vec<usize>, Vec<f64>) {
        match t {
            Tensor::F64(a) => (a.shape().to_vec(), a.iter().copied().collect()),
            t => panic!("expected f64, found {}", t.dtype()),
        }
    }

    fn values_f32(t: &Tensor) -> (Vec<usize>, Vec<f32>) {
        match t {
            Tensor::F32(a) => (a.shape().to_vec(), a.iter().copied().collect()),
            t => panic!("expected f32, found {}", t.dtype()),
        }
    }

    #[test]
    fn conv_1d_in_f64_is_exact() {
        let x = f64s(&[1, 1, 5], &[1.0, 2.0, 3.0, 4.0, 5.0]);
        let w = f64s(&[2, 1, 2], &[1.0, 0.5, -1.0, 2.0]);
        let b = f64s(&[2], &[0.25, 0.0]);
        let out = run(
            "%y = Conv(%a, %b, %c) {pads = [1, 0], strides = [2]}",
            17,
            &[x, w, b],
        )
        .unwrap();
        let (shape, v) = values_f64(&out[0]);
        assert_eq!(shape, [1, 2, 3]);
        // Windows start at -1, 1, 3.
        assert_eq!(
            v,
            [
                0.5 + 0.25,
                2.0 + 1.5 + 0.25,
                4.0 + 2.5 + 0.25,
                2.0,
                4.0,
                6.0
            ]
        );
    }

    #[test]
    fn conv_3d_with_a_flat_kernel_is_the_2d_convolution_of_each_slice() {
        let (c, m, d, h, w) = (4, 4, 3, 6, 5);
        let x = super::super::test_values(2 * c * d * h * w, 1);
        let k = super::super::test_values(m * 2 * 3 * 3, 2);
        let attrs =
            "{group = 2, pads = [0, 1, 0, 0, 1, 1], strides = [1, 2, 1], dilations = [1, 1, 2]}";
        let out3 = run(
            &format!("%y = Conv(%a, %b) {attrs}"),
            17,
            &[
                f32s(&[2, c, d, h, w], x.clone()),
                f32s(&[m, 2, 1, 3, 3], k.clone()),
            ],
        )
        .unwrap();
        let (shape3, v3) = values_f32(&out3[0]);
        assert_eq!(shape3, [2, m, d, 3, 2]);
        for z in 0..d {
            // Slice z of the input as a 2-D batch.
            let slice: Vec<f32> = (0..2 * c)
                .flat_map(|p| x[(p * d + z) * h * w..][..h * w].to_vec())
                .collect();
            let out2 = run(
                "%y = Conv(%a, %b) {group = 2, pads = [1, 0, 1, 1], strides = [2, 1], dilations = [1, 2]}",
                17,
                &[f32s(&[2, c, h, w], slice), f32s(&[m, 2, 3, 3], k.clone())],
            )
            .unwrap();
            let (_, v2) = values_f32(&out2[0]);
            for p in 0..2 * m {
                for i in 0..6 {
                    let a = v3[(p * d + z) * 6 + i];
                    let b = v2[p * 6 + i];
                    assert!((a - b).abs() <= 1e-5, "{a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn conv_transpose_1d_and_a_larger_output_shape() {
        let x = f64s(&[1, 1, 3], &[1.0, 2.0, 3.0]);
        let w = f64s(&[1, 1, 2], &[1.0, 10.0]);
        let out = run(
            "%y = ConvTranspose(%a, %b) {strides = [2]}",
            17,
            &[x.clone(), w.clone()],
        )
        .unwrap();
        assert_eq!(values_f64(&out[0]).1, [1.0, 10.0, 2.0, 20.0, 3.0, 30.0]);
        let out = run(
            "%y = ConvTranspose(%a, %b) {strides = [2], output_shape = [8]}",
            17,
            &[x, w],
        )
        .unwrap();
        assert_eq!(
            values_f64(&out[0]).1,
            [1.0, 10.0, 2.0, 20.0, 3.0, 30.0, 0.0, 0.0]
        );
    }

    #[test]
    fn conv_transpose_2d_larger_output_matches_the_natural_one() {
        let x = super::super::test_values(2 * 3 * 3, 5);
        let w = super::super::test_values(2 * 3 * 3 * 3, 6);
        let run2 = |attrs: &str| {
            let out = run(
                &format!("%y = ConvTranspose(%a, %b) {attrs}"),
                17,
                &[
                    f32s(&[1, 2, 3, 3], x.clone()),
                    f32s(&[2, 3, 3, 3], w.clone()),
                ],
            )
            .unwrap();
            values_f32(&out[0])
        };
        let (s7, v7) = run2("{strides = [2, 2]}");
        let (s8, v8) = run2("{strides = [2, 2], output_shape = [8, 8]}");
        assert_eq!((s7, s8), (vec![1, 3, 7, 7], vec![1, 3, 8, 8]));
        for p in 0..3 {
            for y in 0..8 {
                for xx in 0..8 {
                    let got = v8[(p * 8 + y) * 8 + xx];
                    let want = if y < 7 && xx < 7 {
                        v7[(p * 7 + y) * 7 + xx]
                    } else {
                        0.0
                    };
                    assert!((got - want).abs() <= 1e-6);
                }
            }
        }
    }

    #[test]
    fn max_pool_of_integers_with_indices_in_both_orders() {
        let x = Some(Tensor::I32(arr(&[1, 1, 2, 3], vec![1, 9, 3, 7, 5, 9])));
        let out = run(
            "%y, %i = MaxPool(%a) {kernel_shape = [2, 2]}",
            12,
            std::slice::from_ref(&x),
        )
        .unwrap();
        match &out[0] {
            Tensor::I32(a) => assert_eq!(a.iter().copied().collect::<Vec<_>>(), [9, 9]),
            t => panic!("{}", t.dtype()),
        }
        match &out[1] {
            Tensor::I64(a) => assert_eq!(a.iter().copied().collect::<Vec<_>>(), [1, 1]),
            t => panic!("{}", t.dtype()),
        }
        let out = run(
            "%y = MaxPool(%a) {kernel_shape = [2, 2], storage_order = 1}",
            12,
            &[x],
        )
        .unwrap();
        match &out[1] {
            // Column-major: (row 0, column 1) is 0 + 1 * 2.
            Tensor::I64(a) => assert_eq!(a.iter().copied().collect::<Vec<_>>(), [2, 2]),
            t => panic!("{}", t.dtype()),
        }
    }

    #[test]
    fn average_pool_1d_counts_padding_when_asked() {
        let x = f64s(&[1, 1, 4], &[1.0, 2.0, 3.0, 4.0]);
        let excl = run(
            "%y = AveragePool(%a) {kernel_shape = [3], pads = [1, 1]}",
            19,
            std::slice::from_ref(&x),
        )
        .unwrap();
        assert_eq!(values_f64(&excl[0]).1, [1.5, 2.0, 3.0, 3.5]);
        let incl = run(
            "%y = AveragePool(%a) {kernel_shape = [3], pads = [1, 1], count_include_pad = 1}",
            19,
            &[x],
        )
        .unwrap();
        assert_eq!(values_f64(&incl[0]).1, [1.0, 2.0, 3.0, 7.0 / 3.0]);
    }

    #[test]
    fn lp_pool_and_global_pools_in_f64() {
        let x = f64s(&[1, 1, 2, 2], &[3.0, 4.0, 0.0, 0.0]);
        let lp = run(
            "%y = LpPool(%a) {kernel_shape = [1, 2]}",
            18,
            std::slice::from_ref(&x),
        )
        .unwrap();
        assert_eq!(values_f64(&lp[0]).1, [5.0, 0.0]);
        let g = run("%y = GlobalLpPool(%a)", 18, std::slice::from_ref(&x)).unwrap();
        assert_eq!(values_f64(&g[0]), (vec![1, 1, 1, 1], vec![5.0]));
        let g = run("%y = GlobalAveragePool(%a)", 18, std::slice::from_ref(&x)).unwrap();
        assert_eq!(values_f64(&g[0]).1, [1.75]);
        let g = run("%y = GlobalMaxPool(%a)", 18, &[x]).unwrap();
        assert_eq!(values_f64(&g[0]).1, [4.0]);
    }

    #[test]
    fn max_unpool_and_col2im_scatter() {
        let x = f64s(&[1, 1, 1, 2], &[5.0, 6.0]);
        let i = i64s(&[1, 1, 1, 2], &[2, 1]);
        let out = run(
            "%y = MaxUnpool(%a, %b) {kernel_shape = [2, 2], strides = [2, 2]}",
            11,
            &[x, i],
        )
        .unwrap();
        assert_eq!(
            values_f64(&out[0]),
            (
                vec![1, 1, 2, 4],
                vec![0.0, 6.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0]
            )
        );
        // Two overlapping 1x2 blocks over a 1x3 image.
        let cols = f64s(&[1, 2, 2], &[1.0, 2.0, 10.0, 20.0]);
        let out = run(
            "%y = Col2Im(%a, %b, %c)",
            18,
            &[cols, i64s(&[2], &[1, 3]), i64s(&[2], &[1, 2])],
        )
        .unwrap();
        assert_eq!(values_f64(&out[0]).1, [1.0, 12.0, 20.0]);
    }

    #[test]
    fn resize_rounds_and_saturates_integers() {
        let x = Some(Tensor::U8(arr(&[1, 2], vec![0, 255])));
        let scales = f32s(&[2], vec![1.0, 2.0]);
        let out = run(
            "%y = Resize(%a, _, %c) {mode = \"linear\", coordinate_transformation_mode = \"align_corners\"}",
            13,
            &[x, None, scales],
        )
        .unwrap();
        match &out[0] {
            // 255 / 3 = 85, 170.
            Tensor::U8(a) => assert_eq!(a.iter().copied().collect::<Vec<_>>(), [0, 85, 170, 255]),
            t => panic!("{}", t.dtype()),
        }
        let x = Some(Tensor::I8(arr(&[1, 2], vec![-3, 100])));
        let out = run(
            "%y = Resize(%a, _, %c) {mode = \"cubic\"}",
            13,
            &[x, None, f32s(&[2], vec![1.0, 2.0])],
        )
        .unwrap();
        match &out[0] {
            // Cubic overshoot past 100 saturates, never wraps.
            Tensor::I8(a) => assert!(a.iter().all(|&v| v >= -30)),
            t => panic!("{}", t.dtype()),
        }
    }

    #[test]
    fn grid_sample_identity_grid_returns_the_input() {
        let x: Vec<f64> = (0..12).map(|v| v as f64 * 0.5).collect();
        let (h, w) = (3, 4);
        let mut grid = Vec::new();
        for y in 0..h {
            for xx in 0..w {
                grid.push(-1.0 + 2.0 * xx as f64 / (w - 1) as f64);
                grid.push(-1.0 + 2.0 * y as f64 / (h - 1) as f64);
            }
        }
        for mode in ["bilinear", "nearest", "bicubic"] {
            let out = run(
                &format!("%y = GridSample(%a, %b) {{align_corners = 1, mode = \"{mode}\"}}"),
                16,
                &[f64s(&[1, 1, h, w], &x), f64s(&[1, h, w, 2], &grid)],
            )
            .unwrap();
            let (_, v) = values_f64(&out[0]);
            for (a, b) in v.iter().zip(&x) {
                assert!((a - b).abs() < 1e-12, "{mode}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn affine_grid_identity_is_the_base_grid() {
        let theta = f64s(&[1, 2, 3], &[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
        let out = run(
            "%y = AffineGrid(%a, %b) {align_corners = 1}",
            20,
            &[theta, i64s(&[4], &[1, 1, 2, 3])],
        )
        .unwrap();
        let (shape, v) = values_f64(&out[0]);
        assert_eq!(shape, [1, 2, 3, 2]);
        assert_eq!(
            v,
            [-1.0, -1.0, 0.0, -1.0, 1.0, -1.0, -1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
        );
    }

    #[test]
    fn non_max_suppression_keeps_the_best_of_overlapping_boxes() {
        let boxes = f32s(
            &[1, 3, 4],
            vec![0.0, 0.0, 1.0, 1.0, 0.0, 0.1, 1.0, 1.1, 0.0, 10.0, 1.0, 11.0],
        );
        let scores = f32s(&[1, 1, 3], vec![0.9, 0.95, 0.3]);
        let out = run(
            "%y = NonMaxSuppression(%a, %b, %c, %d)",
            11,
            &[boxes, scores, i64s(&[1], &[3]), f32s(&[1], vec![0.5])],
        )
        .unwrap();
        match &out[0] {
            Tensor::I64(a) => {
                assert_eq!(a.shape(), [2, 3]);
                assert_eq!(a.iter().copied().collect::<Vec<_>>(), [0, 0, 1, 0, 0, 2]);
            }
            t => panic!("{}", t.dtype()),
        }
    }

    #[test]
    fn malformed_inputs_are_errors_not_panics() {
        let x = f64s(&[1, 1, 4], &[1.0, 2.0, 3.0, 4.0]);
        assert!(run(
            "%y = Conv(%a, %b)",
            17,
            &[x.clone(), f64s(&[1, 2, 2], &[0.0; 4])]
        )
        .is_err());
        assert!(run(
            "%y = MaxUnpool(%a, %b) {kernel_shape = [2]}",
            11,
            &[x.clone(), i64s(&[1, 1, 4], &[0, 1, 99, 2])]
        )
        .is_err());
        assert!(run(
            "%y = Resize(%a, _, %c)",
            13,
            &[x.clone(), None, f32s(&[3], vec![1.0, 1.0, 1e30])]
        )
        .is_err());
        assert!(run(
            "%y = Col2Im(%a, %b, %c)",
            18,
            &[x, i64s(&[1], &[4]), i64s(&[1], &[3])]
        )
        .is_err());
    }
}
