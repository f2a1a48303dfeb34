//! Normalizations, Gelu and the classification losses, in every float type:
//! LayerNormalization, RMSNormalization, GroupNormalization,
//! InstanceNormalization, LRN, BatchNormalization (inference and training),
//! Gelu, SoftmaxCrossEntropyLoss and NegativeLogLikelihoodLoss; and the
//! `com.microsoft` fusions ONNX Runtime's transformer optimizer writes
//! (Gelu, FastGelu, BiasGelu, QuickGelu, BiasAdd, BiasSplitGelu,
//! SkipLayerNormalization, SkipSimplifiedLayerNormalization,
//! SimplifiedLayerNormalization, EmbedLayerNormalization).
//!
//! Elements are computed in f64 for f64 and in f32 for f32, f16 and bf16
//! (each output element computed in f32 and rounded once, as ONNX Runtime's
//! kernels do). Statistics (means, variances, loss sums) are accumulated in
//! f64 for every type, so that long reductions keep their precision.

use super::typed::{broadcast_to, floating, Float};
use super::{array, fastmath, input, ints_of};
use crate::{EvalError, OpCtx};
use qgraph_ir::half::{bf16, f16};
use qgraph_ir::ndarray::ArrayD;
use qgraph_ir::{DataType, Tensor};
use rayon::prelude::*;
use std::ops::{Add, Div, Mul, Neg, Sub};

use super::Kernel;

pub const KERNELS: &[(&str, Kernel)] = &[
    ("LayerNormalization", layer_normalization),
    ("RMSNormalization", rms_normalization),
    (
        "SimplifiedLayerNormalization",
        simplified_layer_normalization,
    ),
    ("GroupNormalization", group_normalization),
    ("InstanceNormalization", instance_normalization),
    ("LRN", lrn),
    ("BatchNormalization", batch_normalization),
    ("Gelu", gelu),
    ("NegativeLogLikelihoodLoss", negative_log_likelihood_loss),
    ("SoftmaxCrossEntropyLoss", softmax_cross_entropy_loss),
];

/// ONNX Runtime's `com.microsoft` operators of this family.
pub const MICROSOFT_KERNELS: &[(&str, Kernel)] = &[
    ("Gelu", ms_gelu),
    ("FastGelu", fast_gelu),
    ("BiasGelu", bias_gelu),
    ("QuickGelu", quick_gelu),
    ("BiasAdd", bias_add),
    ("BiasSplitGelu", bias_split_gelu),
    ("SkipLayerNormalization", skip_layer_normalization),
    (
        "SkipSimplifiedLayerNormalization",
        skip_simplified_layer_normalization,
    ),
    (
        "SimplifiedLayerNormalization",
        simplified_layer_normalization,
    ),
    ("EmbedLayerNormalization", embed_layer_normalization),
];

// ---------------------------------------------------------------------------
// The precision elements are computed in.

/// f32 or f64: the arithmetic an element is computed with.
pub(crate) trait Real:
    Copy
    + PartialOrd
    + Send
    + Sync
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
{
    fn of(v: f64) -> Self;
    fn wide(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn tanh(self) -> Self;
    fn powf(self, e: Self) -> Self;
    fn erf(self) -> Self;
}

impl Real for f32 {
    fn of(v: f64) -> Self {
        v as f32
    }
    fn wide(self) -> f64 {
        self as f64
    }
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
    fn tanh(self) -> Self {
        f32::tanh(self)
    }
    fn powf(self, e: Self) -> Self {
        f32::powf(self, e)
    }
    fn erf(self) -> Self {
        // Correctly rounded but for the f64 result's own error.
        erf_f64(self as f64) as f32
    }
}

impl Real for f64 {
    fn of(v: f64) -> Self {
        v
    }
    fn wide(self) -> f64 {
        self
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
    fn powf(self, e: Self) -> Self {
        f64::powf(self, e)
    }
    fn erf(self) -> Self {
        erf_f64(self)
    }
}

/// A float element type with the precision it is computed in.
pub(crate) trait Compute: Float {
    type C: Real;
    fn up(self) -> Self::C;
    fn down(v: Self::C) -> Self;
}

impl Compute for f32 {
    type C = f32;
    fn up(self) -> f32 {
        self
    }
    fn down(v: f32) -> Self {
        v
    }
}

impl Compute for f64 {
    type C = f64;
    fn up(self) -> f64 {
        self
    }
    fn down(v: f64) -> Self {
        v
    }
}

impl Compute for f16 {
    type C = f32;
    fn up(self) -> f32 {
        self.to_f32()
    }
    fn down(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl Compute for bf16 {
    type C = f32;
    fn up(self) -> f32 {
        self.to_f32()
    }
    fn down(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// erf in f64 (libm's, which std lacks).
pub(crate) fn erf_f64(x: f64) -> f64 {
    libm::erf(x)
}

// ---------------------------------------------------------------------------
// Shared helpers.

/// A float tensor of `dtype` from f64 values (rounded to the type).
fn float_tensor(
    cx: &OpCtx,
    dtype: DataType,
    shape: &[usize],
    values: Vec<f64>,
) -> Result<Tensor, EvalError> {
    Ok(match dtype {
        DataType::F32 => Tensor::F32(array(shape, values.iter().map(|&v| v as f32).collect())),
        DataType::F64 => Tensor::F64(array(shape, values)),
        DataType::F16 => Tensor::F16(array(
            shape,
            values.iter().map(|&v| f16::from_f64(v)).collect(),
        )),
        DataType::BF16 => Tensor::BF16(array(
            shape,
            values.iter().map(|&v| bf16::from_f64(v)).collect(),
        )),
        other => return cx.err(format!("{other} is not a float type")),
    })
}

/// A float tensor's values as f64 (exact for every float type).
fn floats_f64(cx: &OpCtx, t: &Tensor, what: &str) -> Result<Vec<f64>, EvalError> {
    floating!(cx, t, what, |a| Ok(a
        .iter()
        .map(|&v| Compute::up(v).wide())
        .collect()))
}

/// Input `i`, a float tensor of any float type, as f64 values.
fn float_input(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    i: usize,
    what: &str,
) -> Result<Vec<f64>, EvalError> {
    floats_f64(cx, input(cx, inputs, i)?, what)
}

/// Optional input `i` as `&ArrayD<T>`: `None` when absent, an error when
/// present with another type.
fn optional_same<'t, T: Compute>(
    cx: &OpCtx,
    inputs: &[Option<&'t Tensor>],
    i: usize,
    what: &str,
) -> Result<Option<&'t ArrayD<T>>, EvalError> {
    match inputs.get(i).copied().flatten() {
        None => Ok(None),
        Some(t) => match <T as super::typed::Elem>::unwrap(t) {
            Some(a) => Ok(Some(a)),
            None => cx.err(format!(
                "{what} is {}, where {} (the input's type) was expected",
                t.dtype(),
                <T as super::typed::Elem>::DTYPE
            )),
        },
    }
}

/// Required input `i` as `&ArrayD<T>`.
fn required_same<'t, T: Compute>(
    cx: &OpCtx,
    inputs: &[Option<&'t Tensor>],
    i: usize,
    what: &str,
) -> Result<&'t ArrayD<T>, EvalError> {
    match optional_same::<T>(cx, inputs, i, what)? {
        Some(a) => Ok(a),
        None => cx.err(format!("{what} (input {i}) is required")),
    }
}

/// The data of `a` in standard (row-major) order.
fn standard<T: Clone>(a: &ArrayD<T>) -> Vec<T> {
    match a.as_slice() {
        Some(s) => s.to_vec(),
        None => a.iter().cloned().collect(),
    }
}

/// A parameter broadcast (unidirectionally) over a tensor of `shape`, as
/// values in the compute type that repeat with their own length: element
/// `e` of the tensor (standard order) takes value `e % len`. A parameter
/// whose dimensions are the tensor's last ones repeats as it is; any other
/// broadcast is written out in full.
struct Cyclic<C> {
    values: Vec<C>,
}

impl<C: Copy> Cyclic<C> {
    fn of<T: Compute<C = C>>(
        cx: &OpCtx,
        p: &ArrayD<T>,
        shape: &[usize],
        what: &str,
    ) -> Result<Cyclic<C>, EvalError> {
        let first = p.shape().iter().position(|&d| d != 1).unwrap_or(p.ndim());
        let dims = &p.shape()[first..];
        if dims.len() <= shape.len() && shape.ends_with(dims) {
            return Ok(Cyclic {
                values: standard(p).into_iter().map(T::up).collect(),
            });
        }
        if p.ndim() > shape.len() {
            return cx.err(format!(
                "{what} of shape {:?} does not broadcast to the input's {shape:?}",
                p.shape()
            ));
        }
        let view = broadcast_to(cx, p, shape).or_else(|_| {
            cx.err(format!(
                "{what} of shape {:?} does not broadcast to the input's {shape:?}",
                p.shape()
            ))
        })?;
        Ok(Cyclic {
            values: view.iter().map(|&v| v.up()).collect(),
        })
    }

    /// The value for element `e` (the tensor is not empty when asked).
    fn at(&self, e: usize) -> C {
        self.values[e % self.values.len().max(1)]
    }
}

/// Per-channel parameters of a `[batch, channels, inner...]` tensor.
struct Channels<C> {
    values: Vec<C>,
    inner: usize,
}

impl<C: Real> Channels<C> {
    fn of(
        cx: &OpCtx,
        values: Vec<f64>,
        channels: usize,
        inner: usize,
        what: &str,
    ) -> Result<Channels<C>, EvalError> {
        if values.len() != channels {
            return cx.err(format!(
                "{what} has {} values for {channels} channels",
                values.len()
            ));
        }
        Ok(Channels {
            values: values.into_iter().map(C::of).collect(),
            inner: inner.max(1),
        })
    }

    /// The value for element `e` in standard order.
    fn at(&self, e: usize) -> C {
        self.values[(e / self.inner) % self.values.len().max(1)]
    }
}

/// Mean and inverse standard deviation (`1 / sqrt(var + eps)`, or with
/// `centered` false the inverse root mean square) of each row of `len`
/// elements; accumulated in f64.
fn row_stats<T: Compute>(
    xs: &[T],
    rows: usize,
    len: usize,
    eps: f64,
    centered: bool,
) -> Vec<(f64, f64)> {
    (0..rows)
        .into_par_iter()
        .map(|r| {
            let row = &xs[r * len..(r + 1) * len];
            let n = len as f64;
            let mean = row.iter().map(|v| v.up().wide()).sum::<f64>() / n;
            let center = if centered { mean } else { 0.0 };
            let var = row
                .iter()
                .map(|v| {
                    let d = v.up().wide() - center;
                    d * d
                })
                .sum::<f64>()
                / n;
            (mean, 1.0 / (var + eps).sqrt())
        })
        .collect()
}

/// The element type the statistics outputs (Mean, InvStdDev) take for a
/// `stash_type`.
fn stash_dtype(cx: &OpCtx) -> Result<DataType, EvalError> {
    match cx.int_attr("stash_type", 1)? {
        1 => Ok(DataType::F32),
        10 => Ok(DataType::F16),
        11 => Ok(DataType::F64),
        16 => Ok(DataType::BF16),
        other => cx.err(format!("stash_type {other} is not a float type")),
    }
}

/// `[rows, cols]` of a tensor normalized over the axes from `axis` on.
fn split_at_axis(shape: &[usize], axis: usize) -> (usize, usize, Vec<usize>) {
    let rows: usize = shape[..axis].iter().product();
    let cols: usize = shape[axis..].iter().product();
    let mut stats_shape = shape[..axis].to_vec();
    stats_shape.resize(shape.len(), 1);
    (rows, cols, stats_shape)
}

// ---------------------------------------------------------------------------
// LayerNormalization, RMSNormalization, SimplifiedLayerNormalization.

/// Inputs (X, Scale, B?); attributes axis (-1), epsilon (1e-5), stash_type;
/// outputs Y, Mean, InvStdDev (the statistics in the stash type).
pub fn layer_normalization(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    if let Tensor::F32(x) = x {
        if let Some(outs) = layer_norm_f32(cx, inputs, x)? {
            return Ok(outs);
        }
    }
    floating!(cx, x, "X", |x| layer_norm_typed(cx, inputs, x))
}

fn layer_norm_typed<T: Compute>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    x: &ArrayD<T>,
) -> Result<Vec<Tensor>, EvalError> {
    let axis = cx.axis(cx.int_attr("axis", -1)?, x.ndim())?;
    let eps = cx.float_attr("epsilon", 1e-5)? as f64;
    let stash = stash_dtype(cx)?;
    let scale = Cyclic::of(
        cx,
        required_same::<T>(cx, inputs, 1, "Scale")?,
        x.shape(),
        "Scale",
    )?;
    let bias = match optional_same::<T>(cx, inputs, 2, "B")? {
        Some(b) => Some(Cyclic::of(cx, b, x.shape(), "B")?),
        None => None,
    };
    let (rows, cols, stats_shape) = split_at_axis(x.shape(), axis);
    let xs = standard(x);
    let stats = row_stats(&xs, rows, cols, eps, true);
    let ys: Vec<T> = (0..xs.len())
        .into_par_iter()
        .map(|e| {
            let (mean, inv) = stats[e / cols];
            let n = (xs[e].up() - T::C::of(mean)) * T::C::of(inv);
            let y = n * scale.at(e);
            T::down(match &bias {
                Some(b) => y + b.at(e),
                None => y,
            })
        })
        .collect();
    let (means, invs): (Vec<f64>, Vec<f64>) = stats.into_iter().unzip();
    Ok(vec![
        T::wrap(array(x.shape(), ys)),
        float_tensor(cx, stash, &stats_shape, means)?,
        float_tensor(cx, stash, &stats_shape, invs)?,
    ])
}

/// LayerNormalization of f32 whose Scale and B hold one value per column of
/// the normalized rows (a transformer's, always): rows in parallel blocks,
/// each vectorized (see `fastmath`); the statistics only when the node has
/// those outputs. None for any other case, left to the general kernel.
fn layer_norm_f32(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    x: &ArrayD<f32>,
) -> Result<Option<Vec<Tensor>>, EvalError> {
    let axis = cx.axis(cx.int_attr("axis", -1)?, x.ndim())?;
    let eps = cx.float_attr("epsilon", 1e-5)?;
    let stash = stash_dtype(cx)?;
    let (_, cols, stats_shape) = split_at_axis(x.shape(), axis);
    let scale = Cyclic::of(
        cx,
        required_same::<f32>(cx, inputs, 1, "Scale")?,
        x.shape(),
        "Scale",
    )?;
    let bias = match optional_same::<f32>(cx, inputs, 2, "B")? {
        Some(b) => Some(Cyclic::of(cx, b, x.shape(), "B")?),
        None => None,
    };
    let per_column = |c: &Cyclic<f32>| c.values.len() == cols;
    if cols == 0 || !per_column(&scale) || bias.as_ref().is_some_and(|b| !per_column(b)) {
        return Ok(None);
    }
    let xs = x.as_standard_layout();
    let xs = xs.as_slice().expect("standard layout");
    let mut ys = cx.buffers.take(xs.len());
    let rows_per_block = ((1 << 14) / cols).max(1);
    let bias = bias.as_ref().map(|b| b.values.as_slice());
    let stats: Vec<(f32, f32)> = ys
        .par_chunks_mut(rows_per_block * cols)
        .zip(xs.par_chunks(rows_per_block * cols))
        .flat_map_iter(|(y, x)| fastmath::layer_norm_rows(x, y, &scale.values, bias, eps))
        .collect();
    let mut outs = vec![Tensor::F32(array(x.shape(), ys))];
    if cx.graph.node(cx.node).outputs().len() > 1 {
        let (means, invs): (Vec<f64>, Vec<f64>) =
            stats.into_iter().map(|(m, i)| (m as f64, i as f64)).unzip();
        outs.push(float_tensor(cx, stash, &stats_shape, means)?);
        outs.push(float_tensor(cx, stash, &stats_shape, invs)?);
    }
    Ok(Some(outs))
}

/// RMS normalization of X over the axes from `axis` on, scaled by `scale`
/// (of type V, which may differ from X's): Y of type V, and the inverse
/// root mean square per row.
fn rms_norm<T: Compute, V: Compute>(
    cx: &OpCtx,
    x: &ArrayD<T>,
    scale: &ArrayD<V>,
    axis: usize,
    eps: f64,
) -> Result<(Tensor, Vec<f64>, Vec<usize>), EvalError> {
    let scale = Cyclic::of(cx, scale, x.shape(), "scale")?;
    let (rows, cols, stats_shape) = split_at_axis(x.shape(), axis);
    let xs = standard(x);
    let stats = row_stats(&xs, rows, cols, eps, false);
    let ys: Vec<V> = (0..xs.len())
        .into_par_iter()
        .map(|e| {
            let n = xs[e].up() * T::C::of(stats[e / cols].1);
            V::down(V::C::of(n.wide()) * scale.at(e))
        })
        .collect();
    let invs = stats.into_iter().map(|s| s.1).collect();
    Ok((V::wrap(array(x.shape(), ys)), invs, stats_shape))
}

/// X and scale, each of any float type, dispatched to [`rms_norm`].
fn rms_norm_inputs(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
) -> Result<(Tensor, Vec<f64>, Vec<usize>), EvalError> {
    let x = input(cx, inputs, 0)?;
    let scale = input(cx, inputs, 1)?;
    let eps = cx.float_attr("epsilon", 1e-5)? as f64;
    let axis = cx.axis(cx.int_attr("axis", -1)?, x.shape().len())?;
    floating!(cx, x, "X", |x| {
        floating!(cx, scale, "scale", |s| rms_norm(cx, x, s, axis, eps))
    })
}

/// Inputs (X, scale); attributes axis, epsilon, stash_type; output Y.
pub fn rms_normalization(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    stash_dtype(cx)?;
    Ok(vec![rms_norm_inputs(cx, inputs)?.0])
}

/// ONNX Runtime's RMS normalization (default and `com.microsoft` domains):
/// inputs (X, scale); outputs Y and inv_std_var (in the stash type).
pub fn simplified_layer_normalization(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
) -> Result<Vec<Tensor>, EvalError> {
    let stash = stash_dtype(cx)?;
    let (y, invs, stats_shape) = rms_norm_inputs(cx, inputs)?;
    Ok(vec![y, float_tensor(cx, stash, &stats_shape, invs)?])
}

// ---------------------------------------------------------------------------
// GroupNormalization, InstanceNormalization.

/// Normalizes `x` (`[batch, channels, inner...]`) per (batch, group of
/// `channels / groups` channels), then applies `scale` and `bias`, which
/// give one value per channel (`per_channel`) or per group.
fn group_norm<T: Compute>(
    cx: &OpCtx,
    x: &ArrayD<T>,
    scale: Vec<f64>,
    bias: Vec<f64>,
    groups: usize,
    per_channel: bool,
    eps: f64,
) -> Result<Tensor, EvalError> {
    let shape = x.shape();
    if shape.len() < 2 {
        return cx.err(format!("the input of shape {shape:?} has no channel axis"));
    }
    let (batch, channels) = (shape[0], shape[1]);
    let inner: usize = shape[2..].iter().product();
    if groups == 0 || channels % groups != 0 {
        return cx.err(format!(
            "{channels} channels do not split into {groups} groups"
        ));
    }
    let group_len = channels / groups * inner;
    let (count, step) = if per_channel {
        (channels, inner)
    } else {
        (groups, group_len)
    };
    let scale = Channels::<T::C>::of(cx, scale, count, step, "scale")?;
    let bias = Channels::<T::C>::of(cx, bias, count, step, "bias")?;
    let xs = standard(x);
    let stats = row_stats(&xs, batch * groups, group_len, eps, true);
    let ys: Vec<T> = (0..xs.len())
        .into_par_iter()
        .map(|e| {
            let (mean, inv) = stats[e / group_len.max(1)];
            let n = (xs[e].up() - T::C::of(mean)) * T::C::of(inv);
            T::down(n * scale.at(e) + bias.at(e))
        })
        .collect();
    Ok(T::wrap(array(shape, ys)))
}

/// Inputs (X, scale, bias); attributes num_groups, epsilon, stash_type
/// (21). Opset 18 takes one scale and bias per group, opset 21 per channel.
pub fn group_normalization(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    let groups = cx.int_attr("num_groups", -1)?;
    if groups <= 0 {
        return cx.err("num_groups must be given and positive");
    }
    let eps = cx.float_attr("epsilon", 1e-5)? as f64;
    if cx.opset >= 21 {
        stash_dtype(cx)?;
    }
    let scale = float_input(cx, inputs, 1, "scale")?;
    let bias = float_input(cx, inputs, 2, "bias")?;
    let per_channel = cx.opset >= 21;
    floating!(cx, x, "X", |x| Ok(vec![group_norm(
        cx,
        x,
        scale,
        bias,
        groups as usize,
        per_channel,
        eps
    )?]))
}

/// Inputs (input, scale, B): per (batch, channel) statistics.
pub fn instance_normalization(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    let eps = cx.float_attr("epsilon", 1e-5)? as f64;
    let scale = float_input(cx, inputs, 1, "scale")?;
    let bias = float_input(cx, inputs, 2, "B")?;
    let channels = x.shape().get(1).copied().unwrap_or(0);
    floating!(cx, x, "input", |x| Ok(vec![group_norm(
        cx, x, scale, bias, channels, true, eps
    )?]))
}

// ---------------------------------------------------------------------------
// LRN.

/// `x / (bias + alpha / size * square_sum) ^ beta`, the square sum over the
/// channels `c - floor((size-1)/2) ..= c + ceil((size-1)/2)`.
pub fn lrn(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    let size = cx.int_attr("size", 0)?;
    if size <= 0 {
        return cx.err("size must be given and positive");
    }
    let alpha = cx.float_attr("alpha", 1e-4)? as f64;
    let beta = cx.float_attr("beta", 0.75)? as f64;
    let bias = cx.float_attr("bias", 1.0)? as f64;
    floating!(cx, x, "X", |x| Ok(vec![lrn_typed(
        cx,
        x,
        size as usize,
        alpha,
        beta,
        bias
    )?]))
}

fn lrn_typed<T: Compute>(
    cx: &OpCtx,
    x: &ArrayD<T>,
    size: usize,
    alpha: f64,
    beta: f64,
    bias: f64,
) -> Result<Tensor, EvalError> {
    let shape = x.shape();
    if shape.len() < 2 {
        return cx.err(format!("the input of shape {shape:?} has no channel axis"));
    }
    let channels = shape[1];
    let inner: usize = shape[2..].iter().product::<usize>().max(1);
    let (before, after) = ((size - 1) / 2, size / 2);
    let xs = standard(x);
    let (alpha, beta, bias) = (
        T::C::of(alpha / size as f64),
        T::C::of(beta),
        T::C::of(bias),
    );
    let ys: Vec<T> = (0..xs.len())
        .into_par_iter()
        .map(|e| {
            let c = (e / inner) % channels;
            let base = e - c * inner;
            let lo = c.saturating_sub(before);
            let hi = (c + after).min(channels - 1);
            let mut sum = T::C::of(0.0);
            for k in lo..=hi {
                let v = xs[base + k * inner].up();
                sum = sum + v * v;
            }
            let x = xs[e].up();
            T::down(x / (bias + alpha * sum).powf(beta))
        })
        .collect();
    Ok(T::wrap(array(shape, ys)))
}

// ---------------------------------------------------------------------------
// BatchNormalization.

/// Inference with the given statistics, or training mode (statistics of
/// the batch, running statistics updated with `momentum`). Training is
/// `training_mode` from opset 14; before, a node with more than one output
/// (as ONNX Runtime decides; opset 6's `is_test` = 1 forces inference). The
/// outputs of opsets 7 to 13 in training are Y, the running mean and
/// variance, the batch mean and the batch's inverse standard deviation
/// (ONNX Runtime's `saved_var`). f32 inference uses the fused f32 kernel.
pub fn batch_normalization(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
) -> Result<Vec<Tensor>, EvalError> {
    let outputs = cx.graph.node(cx.node).outputs().len();
    let training = if cx.opset >= 14 {
        cx.int_attr("training_mode", 0)? != 0
    } else {
        outputs > 1 && (cx.opset >= 7 || cx.int_attr("is_test", 0)? == 0)
    };
    let spatial = cx.opset >= 9 || cx.int_attr("spatial", 1)? != 0;
    let all_f32 = (0..5).all(|i| matches!(inputs.get(i).copied().flatten(), Some(Tensor::F32(_))));
    if !training && spatial && all_f32 {
        return super::pointwise::kernel(cx, inputs);
    }
    let x = input(cx, inputs, 0)?;
    floating!(cx, x, "X", |x| batch_norm_typed(
        cx, inputs, x, training, spatial, outputs
    ))
}

fn batch_norm_typed<T: Compute>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    x: &ArrayD<T>,
    training: bool,
    spatial: bool,
    outputs: usize,
) -> Result<Vec<Tensor>, EvalError> {
    let shape = x.shape();
    if shape.len() < 2 {
        return cx.err(format!("the input of shape {shape:?} has no channel axis"));
    }
    // Non-spatial (opsets before 9): one set of statistics per element of
    // an image.
    let (channels, inner) = if spatial {
        (shape[1], shape[2..].iter().product::<usize>())
    } else {
        (shape[1..].iter().product::<usize>(), 1)
    };
    let eps = cx.float_attr("epsilon", 1e-5)? as f64;
    let scale = float_input(cx, inputs, 1, "scale")?;
    let bias = float_input(cx, inputs, 2, "B")?;
    let mean_t = input(cx, inputs, 3)?;
    let input_mean = floats_f64(cx, mean_t, "input_mean")?;
    let input_var = float_input(cx, inputs, 4, "input_var")?;
    for (p, what) in [
        (&scale, "scale"),
        (&bias, "B"),
        (&input_mean, "input_mean"),
        (&input_var, "input_var"),
    ] {
        if p.len() != channels {
            return cx.err(format!(
                "{what} has {} values for {channels} channels",
                p.len()
            ));
        }
    }
    let xs = standard(x);
    let (mean, var) = if training {
        batch_statistics(&xs, channels, inner)
    } else {
        (input_mean.clone(), input_var.clone())
    };
    let stats_shape = [channels];
    let inv_std: Vec<f64> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let scale_c = Channels::<T::C>::of(cx, scale, channels, inner, "scale")?;
    let bias_c = Channels::<T::C>::of(cx, bias, channels, inner, "B")?;
    let mean_c = Channels::<T::C>::of(cx, mean.clone(), channels, inner, "mean")?;
    let std_c = Channels::<T::C>::of(
        cx,
        var.iter().map(|v| (v + eps).sqrt()).collect(),
        channels,
        inner,
        "variance",
    )?;
    let ys: Vec<T> = (0..xs.len())
        .into_par_iter()
        .map(|e| T::down((xs[e].up() - mean_c.at(e)) / std_c.at(e) * scale_c.at(e) + bias_c.at(e)))
        .collect();
    let mut out = vec![T::wrap(array(shape, ys))];
    if !training {
        return Ok(out);
    }
    let momentum = cx.float_attr("momentum", 0.9)? as f64;
    let running = |stat: &[f64], given: &[f64]| -> Vec<f64> {
        given
            .iter()
            .zip(stat)
            .map(|(g, s)| g * momentum + s * (1.0 - momentum))
            .collect()
    };
    let stat_type = mean_t.dtype();
    out.push(float_tensor(
        cx,
        stat_type,
        &stats_shape,
        running(&mean, &input_mean),
    )?);
    out.push(float_tensor(
        cx,
        stat_type,
        &stats_shape,
        running(&var, &input_var),
    )?);
    if cx.opset < 14 {
        out.push(float_tensor(cx, stat_type, &stats_shape, mean)?);
        out.push(float_tensor(cx, stat_type, &stats_shape, inv_std)?);
    }
    out.truncate(outputs.max(1));
    Ok(out)
}

/// The mean and population variance per channel of `[batch, channels,
/// inner]` data, in f64.
fn batch_statistics<T: Compute>(xs: &[T], channels: usize, inner: usize) -> (Vec<f64>, Vec<f64>) {
    let planes = xs.len() / (channels * inner).max(1);
    let count = (planes * inner) as f64;
    (0..channels)
        .into_par_iter()
        .map(|c| {
            let values = || {
                (0..planes).flat_map(move |p| {
                    let start = (p * channels + c) * inner;
                    xs[start..start + inner].iter().map(|v| v.up().wide())
                })
            };
            let mean = values().sum::<f64>() / count;
            let var = values().map(|v| (v - mean) * (v - mean)).sum::<f64>() / count;
            (mean, var)
        })
        .unzip()
}

// ---------------------------------------------------------------------------
// Gelu and its `com.microsoft` relatives.

fn gelu_erf<C: Real>(x: C) -> C {
    C::of(0.5) * x * (C::of(1.0) + (x * C::of(std::f64::consts::FRAC_1_SQRT_2)).erf())
}

fn gelu_tanh<C: Real>(x: C) -> C {
    // sqrt(2 / pi)
    let k = C::of(0.797_884_560_802_865_4);
    C::of(0.5) * x * (C::of(1.0) + (k * (x + C::of(0.044715) * x * x * x)).tanh())
}

/// `f` on every element of a float tensor, in the compute type.
fn unary(
    cx: &OpCtx,
    x: &Tensor,
    f32_fn: fn(f32) -> f32,
    f64_fn: fn(f64) -> f64,
) -> Result<Vec<Tensor>, EvalError> {
    fn map<T: Compute>(a: &ArrayD<T>, f: impl Fn(T::C) -> T::C + Sync) -> Tensor {
        let xs = standard(a);
        let ys: Vec<T> = xs.par_iter().map(|&v| T::down(f(v.up()))).collect();
        T::wrap(array(a.shape(), ys))
    }
    Ok(vec![match x {
        Tensor::F32(a) => map(a, f32_fn),
        Tensor::F64(a) => map(a, f64_fn),
        Tensor::F16(a) => map(a, f32_fn),
        Tensor::BF16(a) => map(a, f32_fn),
        other => {
            return cx.err(format!(
                "X is {}, which this operator does not take (it takes floats)",
                other.dtype()
            ))
        }
    }])
}

/// Attribute approximate: "none" (erf) or "tanh".
pub fn gelu(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    match cx.string_attr("approximate", "none")?.as_str() {
        "none" => unary(cx, x, gelu_erf, gelu_erf),
        "tanh" => unary(cx, x, gelu_tanh, gelu_tanh),
        other => cx.err(format!("approximate '{other}' is not none or tanh")),
    }
}

pub fn ms_gelu(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    unary(cx, input(cx, inputs, 0)?, gelu_erf, gelu_erf)
}

/// `x * sigmoid(alpha * x)`; alpha 1.702 by default.
pub fn quick_gelu(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let alpha = cx.float_attr("alpha", 1.702)? as f64;
    let x = input(cx, inputs, 0)?;
    floating!(cx, x, "X", |x| Ok(vec![quick_gelu_typed(cx, x, alpha)?]))
}

fn quick_gelu_typed<T: Compute>(
    cx: &OpCtx,
    x: &ArrayD<T>,
    alpha: f64,
) -> Result<Tensor, EvalError> {
    let a = T::C::of(alpha);
    map_biased(cx, x, None, |v| v / (T::C::of(1.0) + (-(a * v)).exp()))
}

/// `f(x + bias)` elementwise, `bias` (of x's type) broadcast over x.
fn map_biased<T: Compute>(
    cx: &OpCtx,
    x: &ArrayD<T>,
    bias: Option<&ArrayD<T>>,
    f: impl Fn(T::C) -> T::C + Sync,
) -> Result<Tensor, EvalError> {
    let bias = match bias {
        Some(b) => Some(Cyclic::of(cx, b, x.shape(), "bias")?),
        None => None,
    };
    let xs = standard(x);
    let ys: Vec<T> = (0..xs.len())
        .into_par_iter()
        .map(|e| {
            let v = xs[e].up();
            T::down(f(match &bias {
                Some(b) => v + b.at(e),
                None => v,
            }))
        })
        .collect();
    Ok(T::wrap(array(x.shape(), ys)))
}

/// Inputs (X, bias?): the tanh Gelu of `X + bias`.
pub fn fast_gelu(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    floating!(cx, x, "X", |x| Ok(vec![biased_typed(
        cx, inputs, x, false, gelu_tanh
    )?]))
}

/// `f(x + bias)`, bias input 1 (`required` or optional).
fn biased_typed<T: Compute>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    x: &ArrayD<T>,
    required: bool,
    f: fn(T::C) -> T::C,
) -> Result<Tensor, EvalError> {
    let bias = if required {
        Some(required_same::<T>(cx, inputs, 1, "bias")?)
    } else {
        optional_same::<T>(cx, inputs, 1, "bias")?
    };
    map_biased(cx, x, bias, f)
}

/// Inputs (A, B): the erf Gelu of `A + B`.
pub fn bias_gelu(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    floating!(cx, x, "A", |x| Ok(vec![biased_typed(
        cx, inputs, x, true, gelu_erf
    )?]))
}

/// Inputs (X, bias, skip): `X + bias + skip`.
pub fn bias_add(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    floating!(cx, x, "X", |x| Ok(vec![bias_add_typed(cx, inputs, x)?]))
}

fn bias_add_typed<T: Compute>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    x: &ArrayD<T>,
) -> Result<Tensor, EvalError> {
    let bias = Cyclic::of(
        cx,
        required_same::<T>(cx, inputs, 1, "bias")?,
        x.shape(),
        "bias",
    )?;
    let skip = Cyclic::of(
        cx,
        required_same::<T>(cx, inputs, 2, "skip")?,
        x.shape(),
        "skip",
    )?;
    let xs = standard(x);
    let ys: Vec<T> = (0..xs.len())
        .into_par_iter()
        .map(|e| T::down(xs[e].up() + bias.at(e) + skip.at(e)))
        .collect();
    Ok(T::wrap(array(x.shape(), ys)))
}

/// Inputs (X `[.., D]`, bias `[D]`): with `h = X + bias` split in halves
/// along the last axis, `left * gelu(right)` (erf Gelu), shape `[.., D/2]`.
pub fn bias_split_gelu(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    floating!(cx, x, "X", |x| Ok(vec![bias_split_gelu_typed(
        cx, inputs, x
    )?]))
}

fn bias_split_gelu_typed<T: Compute>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    x: &ArrayD<T>,
) -> Result<Tensor, EvalError> {
    let bias = required_same::<T>(cx, inputs, 1, "bias")?;
    let d = x.shape().last().copied().unwrap_or(0);
    if x.ndim() == 0 || d % 2 != 0 || bias.len() != d {
        return cx.err(format!(
            "X of shape {:?} needs an even last dimension, and bias (of shape {:?}) as many values",
            x.shape(),
            bias.shape()
        ));
    }
    let half = d / 2;
    let xs = standard(x);
    let bs: Vec<_> = bias.iter().map(|v| v.up()).collect();
    let rows = xs.len() / d.max(1);
    let ys: Vec<T> = (0..rows * half)
        .into_par_iter()
        .map(|e| {
            let (r, k) = (e / half, e % half);
            let left = xs[r * d + k].up() + bs[k];
            let right = xs[r * d + half + k].up() + bs[half + k];
            T::down(left * gelu_erf(right))
        })
        .collect();
    let mut shape = x.shape().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = half;
    }
    Ok(T::wrap(array(&shape, ys)))
}

// ---------------------------------------------------------------------------
// SkipLayerNormalization, SkipSimplifiedLayerNormalization.

/// Inputs (input, skip, gamma, beta?, bias?); outputs output, mean,
/// inv_std_var (f32, shape `[.., 1]`), input_skip_bias_sum.
pub fn skip_layer_normalization(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
) -> Result<Vec<Tensor>, EvalError> {
    skip_norm(cx, inputs, false)
}

/// Inputs (input, skip, gamma, bias?): as SkipLayerNormalization, RMS
/// normalized (its mean output is zeros, as ONNX Runtime leaves it).
pub fn skip_simplified_layer_normalization(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
) -> Result<Vec<Tensor>, EvalError> {
    skip_norm(cx, inputs, true)
}

fn skip_norm(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    simplified: bool,
) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    floating!(cx, x, "input", |x| skip_norm_typed(
        cx, inputs, x, simplified
    ))
}

fn skip_norm_typed<T: Compute>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    x: &ArrayD<T>,
    simplified: bool,
) -> Result<Vec<Tensor>, EvalError> {
    let eps = cx.float_attr("epsilon", 1e-12)? as f64;
    let shape = x.shape();
    let Some(&hidden) = shape.last() else {
        return cx.err("the input is a scalar; it needs a hidden axis");
    };
    let skip = Cyclic::of(
        cx,
        required_same::<T>(cx, inputs, 1, "skip")?,
        shape,
        "skip",
    )?;
    let param = |i: usize, what: &str| -> Result<Option<Vec<T::C>>, EvalError> {
        match optional_same::<T>(cx, inputs, i, what)? {
            None => Ok(None),
            Some(p) if p.len() == hidden => Ok(Some(p.iter().map(|v| v.up()).collect())),
            Some(p) => cx.err(format!(
                "{what} has shape {:?}, where {hidden} values were expected",
                p.shape()
            )),
        }
    };
    let Some(gamma) = param(2, "gamma")? else {
        return cx.err("gamma (input 2) is required");
    };
    let (beta, bias) = if simplified {
        (None, param(3, "bias")?)
    } else {
        (param(3, "beta")?, param(4, "bias")?)
    };
    let xs = standard(x);
    let sums: Vec<T::C> = (0..xs.len())
        .map(|e| {
            let v = xs[e].up() + skip.at(e);
            match &bias {
                Some(b) => v + b[e % hidden],
                None => v,
            }
        })
        .collect();
    let rows = xs.len() / hidden.max(1);
    let stats = row_stats_c::<T>(&sums, rows, hidden, eps, !simplified);
    let ys: Vec<T> = (0..sums.len())
        .into_par_iter()
        .map(|e| {
            let (mean, inv) = stats[e / hidden];
            let h = e % hidden;
            let n = (sums[e] - T::C::of(mean)) * T::C::of(inv) * gamma[h];
            T::down(match &beta {
                Some(b) => n + b[h],
                None => n,
            })
        })
        .collect();
    let mut stats_shape = shape.to_vec();
    if let Some(last) = stats_shape.last_mut() {
        *last = 1;
    }
    let (means, invs): (Vec<f64>, Vec<f64>) = stats.into_iter().unzip();
    let means = if simplified {
        vec![0.0; means.len()]
    } else {
        means
    };
    Ok(vec![
        T::wrap(array(shape, ys)),
        float_tensor(cx, DataType::F32, &stats_shape, means)?,
        float_tensor(cx, DataType::F32, &stats_shape, invs)?,
        T::wrap(array(shape, sums.into_iter().map(T::down).collect())),
    ])
}

/// [`row_stats`] of values already in the compute type (with `centered`
/// false, the mean is reported as 0).
fn row_stats_c<T: Compute>(
    xs: &[T::C],
    rows: usize,
    len: usize,
    eps: f64,
    centered: bool,
) -> Vec<(f64, f64)> {
    (0..rows)
        .into_par_iter()
        .map(|r| {
            let row = &xs[r * len..(r + 1) * len];
            let n = len as f64;
            let mean = if centered {
                row.iter().map(|v| v.wide()).sum::<f64>() / n
            } else {
                0.0
            };
            let var = row
                .iter()
                .map(|v| (v.wide() - mean) * (v.wide() - mean))
                .sum::<f64>()
                / n;
            (mean, 1.0 / (var + eps).sqrt())
        })
        .collect()
}

// ---------------------------------------------------------------------------
// EmbedLayerNormalization.

/// Inputs (input_ids, segment_ids?, word_embedding, position_embedding,
/// segment_embedding?, gamma, beta, mask?, position_ids?): the sum of the
/// embeddings, layer normalized over the hidden axis. Outputs output,
/// mask_index (per batch, how many mask values are 1; zeros without a
/// mask) and embedding_sum.
pub fn embed_layer_normalization(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
) -> Result<Vec<Tensor>, EvalError> {
    let word = input(cx, inputs, 2)?;
    floating!(cx, word, "word_embedding", |w| embed_typed(cx, inputs, w))
}

fn embed_typed<T: Compute>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    word: &ArrayD<T>,
) -> Result<Vec<Tensor>, EvalError> {
    let eps = cx.float_attr("epsilon", 1e-12)? as f64;
    let ids_t = input(cx, inputs, 0)?;
    let &[batch, seq] = ids_t.shape() else {
        return cx.err(format!(
            "input_ids must be 2-D (batch, sequence), found {:?}",
            ids_t.shape()
        ));
    };
    let ids = ints_of(cx, ids_t, "input_ids")?;
    let table = |t: &ArrayD<T>, what: &str| -> Result<(Vec<T::C>, usize), EvalError> {
        match t.shape() {
            &[rows, _] => Ok((standard(t).into_iter().map(T::up).collect(), rows)),
            s => cx.err(format!("{what} must be 2-D, found {s:?}")),
        }
    };
    let hidden = word.shape().get(1).copied().unwrap_or(0);
    let (word_v, word_rows) = table(word, "word_embedding")?;
    let position = required_same::<T>(cx, inputs, 3, "position_embedding")?;
    let (pos_v, pos_rows) = table(position, "position_embedding")?;
    let segment = match optional_same::<T>(cx, inputs, 4, "segment_embedding")? {
        Some(s) => Some(table(s, "segment_embedding")?),
        None => None,
    };
    for (t, what) in [(position, "position_embedding")].into_iter().chain(
        optional_same::<T>(cx, inputs, 4, "segment_embedding")?.map(|s| (s, "segment_embedding")),
    ) {
        if t.shape()[1] != hidden {
            return cx.err(format!(
                "{what} has {} columns, word_embedding {hidden}",
                t.shape()[1]
            ));
        }
    }
    let vector = |i: usize, what: &str| -> Result<Vec<T::C>, EvalError> {
        let p = required_same::<T>(cx, inputs, i, what)?;
        if p.len() != hidden {
            return cx.err(format!(
                "{what} has {} values for hidden size {hidden}",
                p.len()
            ));
        }
        Ok(p.iter().map(|v| v.up()).collect())
    };
    let gamma = vector(5, "gamma")?;
    let beta = vector(6, "beta")?;
    let per_token = |i: usize, what: &str| -> Result<Option<Vec<i64>>, EvalError> {
        match inputs.get(i).copied().flatten() {
            None => Ok(None),
            Some(t) if t.shape() == [batch, seq] => Ok(Some(ints_of(cx, t, what)?)),
            // Position ids may be shared by the batch.
            Some(t) if i == 8 && t.shape() == [1, seq] => {
                let one = ints_of(cx, t, what)?;
                Ok(Some((0..batch).flat_map(|_| one.iter().copied()).collect()))
            }
            Some(t) => cx.err(format!(
                "{what} has shape {:?}, input_ids [{batch}, {seq}]",
                t.shape()
            )),
        }
    };
    let segment_ids = per_token(1, "segment_ids")?;
    let mask = per_token(7, "mask")?;
    let position_ids = per_token(8, "position_ids")?;
    if segment.is_some() != segment_ids.is_some() {
        return cx.err("segment_ids and segment_embedding go together");
    }
    let row = |what: &str, id: i64, rows: usize| -> Result<usize, EvalError> {
        if id < 0 || id as u64 >= rows as u64 {
            return cx.err(format!("{what} {id} is out of range for {rows} rows"));
        }
        Ok(id as usize)
    };
    let tokens = batch * seq;
    let mut sums: Vec<T::C> = Vec::with_capacity(tokens * hidden);
    for t in 0..tokens {
        let w = row("input id", ids[t], word_rows)?;
        let pid = match &position_ids {
            Some(p) => p[t],
            None => (t % seq.max(1)) as i64,
        };
        let p = row("position id", pid, pos_rows)?;
        let s = match (&segment, &segment_ids) {
            (Some((_, rows)), Some(ids)) => Some(row("segment id", ids[t], *rows)?),
            _ => None,
        };
        for h in 0..hidden {
            let mut v = word_v[w * hidden + h] + pos_v[p * hidden + h];
            if let (Some(s), Some((seg_v, _))) = (s, &segment) {
                v = v + seg_v[s * hidden + h];
            }
            sums.push(v);
        }
    }
    let stats = row_stats_c::<T>(&sums, tokens, hidden, eps, true);
    let ys: Vec<T> = (0..sums.len())
        .map(|e| {
            let (mean, inv) = stats[e / hidden.max(1)];
            let h = e % hidden;
            T::down((sums[e] - T::C::of(mean)) * T::C::of(inv) * gamma[h] + beta[h])
        })
        .collect();
    let mask_index: Vec<i32> = (0..batch)
        .map(|b| match &mask {
            Some(m) => m[b * seq..(b + 1) * seq]
                .iter()
                .filter(|&&v| v == 1)
                .count() as i32,
            None => 0,
        })
        .collect();
    Ok(vec![
        T::wrap(array(&[batch, seq, hidden], ys)),
        Tensor::I32(array(&[batch], mask_index)),
        T::wrap(array(
            &[batch, seq, hidden],
            sums.into_iter().map(T::down).collect(),
        )),
    ])
}

// ---------------------------------------------------------------------------
// NegativeLogLikelihoodLoss, SoftmaxCrossEntropyLoss.

#[derive(Clone, Copy, PartialEq)]
enum Reduction {
    None,
    Sum,
    Mean,
}

/// The loss's layout: input `[N, C, d1..dk]` seen as `[N, C, D]`, the
/// target `[N, d1..dk]`, and its attributes.
struct LossSetup {
    n: usize,
    classes: usize,
    d: usize,
    target: Vec<i64>,
    target_shape: Vec<usize>,
    ignore: Option<i64>,
    reduction: Reduction,
}

fn loss_setup(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    shape: &[usize],
) -> Result<LossSetup, EvalError> {
    if shape.len() < 2 {
        return cx.err(format!(
            "the input of shape {shape:?} needs a batch and a class axis"
        ));
    }
    let target_t = input(cx, inputs, 1)?;
    let mut want = vec![shape[0]];
    want.extend_from_slice(&shape[2..]);
    if target_t.shape() != want.as_slice() {
        return cx.err(format!(
            "the target's shape {:?} is not the input's {shape:?} without its class axis",
            target_t.shape()
        ));
    }
    let reduction = match cx.string_attr("reduction", "mean")?.as_str() {
        "none" => Reduction::None,
        "sum" => Reduction::Sum,
        "mean" => Reduction::Mean,
        other => return cx.err(format!("reduction '{other}' is not none, sum or mean")),
    };
    let ignore = match cx.graph.node(cx.node).attr("ignore_index") {
        Some(_) => Some(cx.int_attr("ignore_index", 0)?),
        None => None,
    };
    Ok(LossSetup {
        n: shape[0],
        classes: shape[1],
        d: shape[2..].iter().product(),
        target: ints_of(cx, target_t, "the target")?,
        target_shape: want,
        ignore,
        reduction,
    })
}

/// `-logp[n, target, d] * weight[target]` per target element, reduced:
/// `mean` divides by the sum of the weights of the elements not ignored.
/// `logp` is in the compute type, `[N, C, D]` in standard order.
fn nll<T: Compute>(
    cx: &OpCtx,
    setup: &LossSetup,
    logp: &[T::C],
    weight: Option<&ArrayD<T>>,
) -> Result<Tensor, EvalError> {
    let weight: Option<Vec<T::C>> = match weight {
        None => None,
        Some(w) if w.shape() == [setup.classes] => Some(w.iter().map(|v| v.up()).collect()),
        Some(w) => {
            return cx.err(format!(
                "the weights have shape {:?}, where [{}] was expected",
                w.shape(),
                setup.classes
            ))
        }
    };
    let (classes, d) = (setup.classes, setup.d);
    let mut losses: Vec<T::C> = Vec::with_capacity(setup.target.len());
    let mut weight_sum = 0f64;
    for (i, &t) in setup.target.iter().enumerate() {
        if setup.ignore == Some(t) {
            losses.push(T::C::of(0.0));
            continue;
        }
        if t < 0 || t as u64 >= classes as u64 {
            return cx.err(format!(
                "target value {t} is out of range for {classes} classes"
            ));
        }
        let (n, k) = (i / d.max(1), i % d.max(1));
        let v = -logp[(n * classes + t as usize) * d + k];
        let w = weight.as_ref().map_or(T::C::of(1.0), |w| w[t as usize]);
        weight_sum += w.wide();
        losses.push(v * w);
    }
    Ok(match setup.reduction {
        Reduction::None => T::wrap(array(
            &setup.target_shape,
            losses.into_iter().map(T::down).collect(),
        )),
        Reduction::Sum | Reduction::Mean => {
            let sum: f64 = losses.iter().map(|v| v.wide()).sum();
            let value = if setup.reduction == Reduction::Mean {
                sum / weight_sum
            } else {
                sum
            };
            T::wrap(array(&[], vec![T::down(T::C::of(value))]))
        }
    })
}

/// Inputs (input: log-probabilities `[N, C, d..]`, target `[N, d..]`,
/// weight?); attributes ignore_index, reduction (mean).
pub fn negative_log_likelihood_loss(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    let setup = loss_setup(cx, inputs, x.shape())?;
    floating!(cx, x, "input", |x| Ok(vec![nll_typed(
        cx, inputs, &setup, x
    )?]))
}

fn nll_typed<T: Compute>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    setup: &LossSetup,
    x: &ArrayD<T>,
) -> Result<Tensor, EvalError> {
    let logp: Vec<T::C> = standard(x).into_iter().map(T::up).collect();
    let weight = optional_same::<T>(cx, inputs, 2, "weight")?;
    nll::<T>(cx, setup, &logp, weight)
}

/// Inputs (scores `[N, C, d..]`, labels `[N, d..]`, weights?): the negative
/// log likelihood of log-softmax(scores) over the class axis; outputs the
/// loss and, when asked, the log-probabilities.
pub fn softmax_cross_entropy_loss(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    let setup = loss_setup(cx, inputs, x.shape())?;
    let outputs = cx.graph.node(cx.node).outputs().len();
    floating!(cx, x, "scores", |x| sce_typed(
        cx,
        inputs,
        &setup,
        x,
        outputs > 1
    ))
}

fn sce_typed<T: Compute>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    setup: &LossSetup,
    x: &ArrayD<T>,
    with_log_prob: bool,
) -> Result<Vec<Tensor>, EvalError> {
    let logp = log_softmax_classes(&standard(x), setup.n, setup.classes, setup.d);
    let weight = optional_same::<T>(cx, inputs, 2, "weights")?;
    let mut out = vec![nll::<T>(cx, setup, &logp, weight)?];
    if with_log_prob {
        let lp: Vec<T> = logp.into_iter().map(T::down).collect();
        out.push(T::wrap(array(x.shape(), lp)));
    }
    Ok(out)
}

/// log-softmax along axis 1 of `[n, classes, d]` data, in the compute type.
fn log_softmax_classes<T: Compute>(xs: &[T], n: usize, classes: usize, d: usize) -> Vec<T::C> {
    let mut out: Vec<T::C> = xs.iter().map(|v| v.up()).collect();
    for b in 0..n {
        for k in 0..d {
            let at = |c: usize| (b * classes + c) * d + k;
            let max = (0..classes)
                .map(|c| out[at(c)])
                .fold(None, |m: Option<T::C>, v| match m {
                    Some(m) if !(v > m) => Some(m),
                    _ => Some(v),
                });
            let Some(max) = max else { continue };
            let sum = (0..classes).fold(T::C::of(0.0), |s, c| s + (out[at(c)] - max).exp());
            let log_sum = sum.ln();
            for c in 0..classes {
                out[at(c)] = out[at(c)] - max - log_sum;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use qgraph_ir::{AttrValue, Graph, NewNode};

    /// Runs one node of `op` on `inputs` (`None`: an absent optional input).
    fn run(
        op: &str,
        domain: &str,
        opset: i64,
        inputs: &[Option<Tensor>],
        outputs: usize,
        attrs: &[(&str, AttrValue)],
    ) -> Result<Vec<Tensor>, EvalError> {
        let mut g = Graph::new("test");
        let mut node = NewNode::new(op).domain(domain);
        for (i, t) in inputs.iter().enumerate() {
            let id = match t {
                Some(_) => Some(g.add_input(format!("in{i}"), None).expect("fresh name")),
                None => None,
            };
            node.inputs.push(id);
        }
        for k in 0..outputs {
            node.outputs.push(Some(
                g.add_value(format!("out{k}"), None).expect("fresh name"),
            ));
        }
        for (name, value) in attrs {
            node = node.attr(*name, value.clone());
        }
        let id = g.add_node(node).expect("a valid node");
        let refs: Vec<Option<&Tensor>> = inputs.iter().map(Option::as_ref).collect();
        crate::run_node(&g, id, opset, &refs)
    }

    fn f32s(shape: &[usize], v: &[f32]) -> Option<Tensor> {
        Some(Tensor::F32(array(shape, v.to_vec())))
    }

    fn f64s(shape: &[usize], v: &[f64]) -> Option<Tensor> {
        Some(Tensor::F64(array(shape, v.to_vec())))
    }

    fn values_f32(t: &Tensor) -> Vec<f32> {
        match t {
            Tensor::F32(a) => a.iter().copied().collect(),
            t => panic!("expected f32, found {}", t.dtype()),
        }
    }

    fn values_f64(t: &Tensor) -> Vec<f64> {
        match t {
            Tensor::F64(a) => a.iter().copied().collect(),
            t => panic!("expected f64, found {}", t.dtype()),
        }
    }

    fn assert_close(got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol * (1.0 + w.abs()),
                "element {i}: {g} vs {w}\n{got:?}\n{want:?}"
            );
        }
    }

    const X: [f32; 8] = [0.5, -1.25, 2.0, 0.75, -0.5, 1.5, -2.25, 0.25];
    const SKIP: [f32; 8] = [0.25, 0.5, -0.75, 1.0, 1.25, -0.5, 0.5, -1.5];
    const GAMMA: [f32; 4] = [1.5, -0.5, 0.75, 2.0];
    const BETA: [f32; 4] = [0.1, 0.2, -0.3, 0.4];
    const BIAS: [f32; 4] = [-0.25, 0.125, 0.5, 0.0];

    fn eps(v: f32) -> (&'static str, AttrValue) {
        ("epsilon", AttrValue::Float(v))
    }

    #[test]
    fn erf_matches_known_values() {
        let cases = [
            (0.0, 0.0),
            (1e-30, 1.1283791670955126e-30),
            (-0.1, -0.1124629160182849),
            (0.5, 0.5204998778130465),
            (1.0, 0.8427007929497149),
            (2.0, 0.9953222650189527),
            (3.0, 0.9999779095030014),
            (-4.5, -0.9999999998033839),
            (7.0, 1.0),
            (f64::INFINITY, 1.0),
        ];
        for (x, want) in cases {
            let got = erf_f64(x);
            assert!(
                (got - want).abs() <= 2e-16 * want.abs().max(1e-300),
                "erf({x}) = {got}, not {want}"
            );
        }
        assert!(erf_f64(f64::NAN).is_nan());
    }

    // Expected values below are ONNX Runtime 1.32's outputs (CPU).

    #[test]
    fn skip_layer_normalization_matches_onnx_runtime() {
        let out = run(
            "SkipLayerNormalization",
            "com.microsoft",
            17,
            &[
                f32s(&[1, 2, 4], &X),
                f32s(&[1, 2, 4], &SKIP),
                f32s(&[4], &GAMMA),
                f32s(&[4], &BETA),
                f32s(&[4], &BIAS),
            ],
            4,
            &[eps(1e-5)],
        )
        .expect("runs");
        assert_close(
            &values_f32(&out[0]),
            &[
                -0.420_992_3,
                0.942_019_3,
                0.386_762_56,
                2.231_366_9,
                1.122_245_7,
                -0.437_051_65,
                -1.033_350_2,
                -1.555_600_4,
            ],
            1e-6,
        );
        assert_eq!(out[1].shape(), &[1, 2, 1]);
        assert_close(&values_f32(&out[1]), &[0.84375, -0.21875], 1e-7);
        assert_close(&values_f32(&out[2]), &[1.010_409_2, 0.948_169_9], 1e-6);
        assert_close(
            &values_f32(&out[3]),
            &[0.5, -0.625, 1.75, 1.75, 0.5, 1.125, -1.25, -1.25],
            0.0,
        );
    }

    #[test]
    fn skip_simplified_layer_normalization_matches_onnx_runtime() {
        let out = run(
            "SkipSimplifiedLayerNormalization",
            "com.microsoft",
            17,
            &[
                f32s(&[1, 2, 4], &X),
                f32s(&[1, 2, 4], &SKIP),
                f32s(&[4], &GAMMA),
                f32s(&[4], &BIAS),
            ],
            4,
            &[eps(1e-5)],
        )
        .expect("runs");
        assert_close(
            &values_f32(&out[0]),
            &[
                0.576_681_5,
                0.240_283_95,
                1.009_192_6,
                2.691_180_2,
                0.696_307_6,
                -0.522_230_7,
                -0.870_384_5,
                -2.321_025_4,
            ],
            1e-6,
        );
        assert_close(&values_f32(&out[1]), &[0.0, 0.0], 0.0);
        assert_close(&values_f32(&out[2]), &[0.768_908_6, 0.928_410_1], 1e-6);
    }

    #[test]
    fn simplified_layer_normalization_matches_onnx_runtime() {
        for domain in ["", "com.microsoft"] {
            let out = run(
                "SimplifiedLayerNormalization",
                domain,
                17,
                &[f32s(&[1, 2, 4], &X), f32s(&[4], &GAMMA)],
                2,
                &[eps(1e-5)],
            )
            .expect("runs");
            assert_close(
                &values_f32(&out[0]),
                &[
                    0.594_086_6,
                    0.495_072_2,
                    1.188_173_3,
                    1.188_173_3,
                    -0.543_213,
                    -0.543_213,
                    -1.222_229_4,
                    0.362_142,
                ],
                1e-6,
            );
            assert_eq!(out[1].shape(), &[1, 2, 1]);
            assert_close(&values_f32(&out[1]), &[0.792_115_5, 0.724_284_05], 1e-6);
        }
    }

    #[test]
    fn gelu_family_matches_onnx_runtime() {
        let x = [-3.0, -1.5, -0.25, 0.0, 0.5, 1.0, 2.5, 4.0];
        let gelu = run("Gelu", "com.microsoft", 17, &[f32s(&[8], &x)], 1, &[]).expect("runs");
        let want_gelu = [
            -0.004_049_688_6,
            -0.100_210_816,
            -0.100_323_416,
            0.0,
            0.345_731_23,
            0.841_344_7,
            2.484_476,
            3.999_873_2,
        ];
        assert_close(&values_f32(&gelu[0]), &want_gelu, 1e-6);
        let standard = run("Gelu", "", 20, &[f32s(&[8], &x)], 1, &[]).expect("runs");
        assert_close(&values_f32(&standard[0]), &want_gelu, 1e-6);
        let bias_gelu = run(
            "BiasGelu",
            "com.microsoft",
            17,
            &[f32s(&[2, 4], &x), f32s(&[4], &BETA)],
            1,
            &[],
        )
        .expect("runs");
        assert_close(
            &values_f32(&bias_gelu[0]),
            &[
                -0.005_410_832_4,
                -0.125_840_65,
                -0.160_137_84,
                0.262_168_7,
                0.435_448_14,
                1.061_916_5,
                2.169_412_4,
                4.399_976,
            ],
            1e-6,
        );
        let quick = run("QuickGelu", "com.microsoft", 17, &[f32s(&[8], &x)], 1, &[]).expect("runs");
        assert_close(
            &values_f32(&quick[0]),
            &[
                -0.018_071_294,
                -0.108_337_775,
                -0.098_800_354,
                0.0,
                0.350_388_4,
                0.845_795_75,
                2.465_014,
                3.995_585_4,
            ],
            1e-6,
        );
    }

    #[test]
    fn embed_layer_normalization_matches_onnx_runtime() {
        let ids = Some(Tensor::I32(array(&[2, 3], vec![1, 0, 2, 2, 2, 1])));
        let segments = Some(Tensor::I32(array(&[2, 3], vec![0, 1, 1, 1, 0, 0])));
        let mask = Some(Tensor::I32(array(&[2, 3], vec![1, 1, 0, 1, 0, 1])));
        let out = run(
            "EmbedLayerNormalization",
            "com.microsoft",
            17,
            &[
                ids,
                segments,
                f32s(&[3, 2], &[0.5, -1.0, 1.5, 0.25, -0.75, 2.0]),
                f32s(&[3, 2], &[0.1, 0.2, 0.3, -0.4, 0.5, 0.6]),
                f32s(&[2, 2], &[1.0, -1.0, 0.0, 0.5]),
                f32s(&[2], &[1.0, 2.0]),
                f32s(&[2], &[0.5, -0.5]),
                mask,
            ],
            3,
            &[eps(1e-5)],
        )
        .expect("runs");
        assert_close(
            &values_f32(&out[0]),
            &[
                1.499_998,
                -2.499_996_2,
                1.499_993_1,
                -2.499_986_2,
                -0.499_998_2,
                1.499_996_4,
                -0.499_998_27,
                1.499_996_4,
                -0.492_095_83,
                1.484_187,
                1.499_998_1,
                -2.499_996,
            ],
            1e-6,
        );
        match &out[1] {
            Tensor::I32(a) => assert_eq!(a.iter().copied().collect::<Vec<_>>(), vec![2, 2]),
            t => panic!("mask_index is {}", t.dtype()),
        }
        assert_close(
            &values_f32(&out[2]),
            &[
                2.6, -0.55, 0.8, -0.9, -0.25, 3.1, -0.65, 2.7, 0.55, 0.6, 3.0, -0.15,
            ],
            1e-6,
        );
        // An id past the table is an error, not a panic.
        let bad = run(
            "EmbedLayerNormalization",
            "com.microsoft",
            17,
            &[
                Some(Tensor::I32(array(&[1, 1], vec![3]))),
                None,
                f32s(&[3, 2], &[0.0; 6]),
                f32s(&[3, 2], &[0.0; 6]),
                None,
                f32s(&[2], &[1.0, 1.0]),
                f32s(&[2], &[0.0, 0.0]),
            ],
            1,
            &[],
        );
        assert!(bad.is_err());
    }

    #[test]
    fn layer_normalization_f16_matches_onnx_runtime() {
        let half = |v: &[f32]| v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>();
        let out = run(
            "LayerNormalization",
            "",
            17,
            &[
                Some(Tensor::F16(array(&[1, 2, 4], half(&X)))),
                Some(Tensor::F16(array(&[4], half(&GAMMA)))),
                Some(Tensor::F16(array(&[4], half(&BETA)))),
            ],
            3,
            &[eps(1e-5)],
        )
        .expect("runs");
        let Tensor::F16(y) = &out[0] else {
            panic!("Y is {}", out[0].dtype())
        };
        let want = [
            0.099_975_586,
            0.954_589_84,
            0.670_410_16,
            0.831_054_7,
            -0.176_147_46,
            -0.444_335_94,
            -1.404_296_9,
            1.136_718_8,
        ];
        for (g, w) in y.iter().zip(want) {
            // Within one f16 step.
            assert!(
                (g.to_f32() - w).abs() <= 2e-3 * (1.0 + w.abs()),
                "{g} vs {w}"
            );
        }
        // The statistics are f32 (stash_type 1).
        assert_close(&values_f32(&out[1]), &[0.5, -0.25], 0.0);
        assert_close(&values_f32(&out[2]), &[0.862_658_98, 0.736_457_7], 1e-6);
    }

    #[test]
    fn layer_normalization_f64_is_exact_where_the_values_are() {
        // Rows [1, 3] and [-2, 2]: means 2 and 0, variances 1 and 4.
        let out = run(
            "LayerNormalization",
            "",
            17,
            &[
                f64s(&[2, 2], &[1.0, 3.0, -2.0, 2.0]),
                f64s(&[2], &[2.0, 0.5]),
                f64s(&[2], &[0.25, -1.0]),
            ],
            3,
            &[eps(0.0)],
        )
        .expect("runs");
        assert_eq!(values_f64(&out[0]), vec![-1.75, -0.5, -1.75, -0.5]);
        assert_eq!(values_f32(&out[1]), vec![2.0, 0.0]);
        assert_eq!(values_f32(&out[2]), vec![1.0, 0.5]);
        // f64 is not computed through f32: a difference below f32's
        // resolution survives.
        let tiny = 1e-12;
        let out = run(
            "LayerNormalization",
            "",
            17,
            &[f64s(&[2], &[1.0, 1.0 + tiny]), f64s(&[2], &[1.0, 1.0])],
            1,
            &[eps(0.0)],
        )
        .expect("runs");
        let y = values_f64(&out[0]);
        assert!(
            (y[0] + 1.0).abs() < 1e-3 && (y[1] - 1.0).abs() < 1e-3,
            "{y:?}"
        );
    }

    #[test]
    fn batch_normalization_training_f64_updates_the_running_statistics() {
        // Two images, one channel of two values: batch mean 2.5, variance 1.25.
        let out = run(
            "BatchNormalization",
            "",
            15,
            &[
                f64s(&[2, 1, 2], &[1.0, 2.0, 3.0, 4.0]),
                f64s(&[1], &[1.0]),
                f64s(&[1], &[0.0]),
                f64s(&[1], &[0.5]),
                f64s(&[1], &[2.0]),
            ],
            3,
            &[
                ("training_mode", AttrValue::Int(1)),
                ("momentum", AttrValue::Float(0.5)),
                eps(0.0),
            ],
        )
        .expect("runs");
        let inv = 1.0 / 1.25f64.sqrt();
        let want: Vec<f64> = [1.0, 2.0, 3.0, 4.0]
            .iter()
            .map(|v| (v - 2.5) * inv)
            .collect();
        let y = values_f64(&out[0]);
        for (g, w) in y.iter().zip(&want) {
            assert!((g - w).abs() < 1e-15, "{y:?} vs {want:?}");
        }
        assert_eq!(values_f64(&out[1]), vec![1.5]);
        assert_eq!(values_f64(&out[2]), vec![1.625]);
        // Inference in f64 with the given statistics.
        let out = run(
            "BatchNormalization",
            "",
            15,
            &[
                f64s(&[1, 2], &[3.0, -1.0]),
                f64s(&[2], &[2.0, 1.0]),
                f64s(&[2], &[0.5, 0.0]),
                f64s(&[2], &[1.0, 1.0]),
                f64s(&[2], &[4.0, 0.25]),
            ],
            1,
            &[eps(0.0)],
        )
        .expect("runs");
        assert_eq!(values_f64(&out[0]), vec![2.5, -4.0]);
    }

    #[test]
    fn negative_log_likelihood_loss_f64_is_exact() {
        // input [N=2, C=3], targets 2 and 0 (ignored: ignore_index 0).
        let input = f64s(&[2, 3], &[-0.5, -1.5, -2.25, -3.0, -0.125, -1.0]);
        let target = Some(Tensor::I64(array(&[2], vec![2, 0])));
        let weight = f64s(&[3], &[4.0, 1.0, 2.0]);
        let loss = |reduction: &str, ignore: bool| {
            let mut attrs = vec![("reduction", AttrValue::String(reduction.into()))];
            if ignore {
                attrs.push(("ignore_index", AttrValue::Int(0)));
            }
            let out = run(
                "NegativeLogLikelihoodLoss",
                "",
                13,
                &[input.clone(), target.clone(), weight.clone()],
                1,
                &attrs,
            )
            .expect("runs");
            values_f64(&out[0])
        };
        assert_eq!(loss("none", false), vec![4.5, 12.0]);
        assert_eq!(loss("sum", false), vec![16.5]);
        assert_eq!(loss("mean", false), vec![16.5 / 6.0]);
        assert_eq!(loss("none", true), vec![4.5, 0.0]);
        assert_eq!(loss("mean", true), vec![2.25]);
        // A target outside the classes is an error.
        let bad = run(
            "NegativeLogLikelihoodLoss",
            "",
            13,
            &[input, Some(Tensor::I64(array(&[2], vec![3, 0])))],
            1,
            &[],
        );
        assert!(bad.is_err());
    }

    #[test]
    fn softmax_cross_entropy_gives_log_probabilities() {
        // Scores equal across 4 classes: log p = -ln 4 for every class.
        let out = run(
            "SoftmaxCrossEntropyLoss",
            "",
            13,
            &[
                f64s(&[1, 4], &[0.5; 4]),
                Some(Tensor::I32(array(&[1], vec![1]))),
            ],
            2,
            &[],
        )
        .expect("runs");
        let ln4 = 4f64.ln();
        assert!((values_f64(&out[0])[0] - ln4).abs() < 1e-15);
        for v in values_f64(&out[1]) {
            assert!((v + ln4).abs() < 1e-15);
        }
    }

    #[test]
    fn group_normalization_opsets_take_their_own_scales() {
        // One image, 4 channels of one value each, 2 groups.
        let x = f32s(&[1, 4, 1], &[1.0, 3.0, 10.0, 14.0]);
        // Opset 18: one scale and bias per group.
        let out = run(
            "GroupNormalization",
            "",
            18,
            &[x.clone(), f32s(&[2], &[2.0, 3.0]), f32s(&[2], &[0.0, 1.0])],
            1,
            &[("num_groups", AttrValue::Int(2)), eps(0.0)],
        )
        .expect("runs");
        assert_eq!(values_f32(&out[0]), vec![-2.0, 2.0, -2.0, 4.0]);
        // Opset 21: one per channel.
        let out = run(
            "GroupNormalization",
            "",
            21,
            &[
                x.clone(),
                f32s(&[4], &[1.0, 2.0, 3.0, 4.0]),
                f32s(&[4], &[0.0; 4]),
            ],
            1,
            &[("num_groups", AttrValue::Int(2)), eps(0.0)],
        )
        .expect("runs");
        assert_eq!(values_f32(&out[0]), vec![-1.0, 2.0, -3.0, 4.0]);
        // Channels that do not split into the groups: an error.
        let bad = run(
            "GroupNormalization",
            "",
            21,
            &[x, f32s(&[4], &[1.0; 4]), f32s(&[4], &[0.0; 4])],
            1,
            &[("num_groups", AttrValue::Int(3))],
        );
        assert!(bad.is_err());
    }

    #[test]
    fn lrn_sums_the_channel_window() {
        // size 2: window c - 0 ..= c + 1; alpha/size = 1, beta = 1, bias = 0.
        let out = run(
            "LRN",
            "",
            13,
            &[f64s(&[1, 3, 1, 1], &[1.0, 2.0, 4.0])],
            1,
            &[
                ("size", AttrValue::Int(2)),
                ("alpha", AttrValue::Float(2.0)),
                ("beta", AttrValue::Float(1.0)),
                ("bias", AttrValue::Float(0.0)),
            ],
        )
        .expect("runs");
        assert_eq!(values_f64(&out[0]), vec![1.0 / 5.0, 2.0 / 20.0, 4.0 / 16.0]);
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let scalar = f32s(&[], &[1.0]);
        for op in ["LRN", "InstanceNormalization", "BatchNormalization"] {
            let inputs = vec![scalar.clone(); 5];
            assert!(run(op, "", 15, &inputs, 1, &[("size", AttrValue::Int(1))]).is_err());
        }
        // Empty tensors run.
        let empty = f32s(&[0, 4], &[]);
        let out = run(
            "LayerNormalization",
            "",
            17,
            &[empty.clone(), f32s(&[4], &[1.0; 4])],
            1,
            &[],
        )
        .expect("runs");
        assert_eq!(out[0].shape(), &[0, 4]);
        assert!(run(
            "Gelu",
            "",
            20,
            &[Some(Tensor::I32(array(&[1], vec![1])))],
            1,
            &[]
        )
        .is_err());
        // A skip that does not broadcast.
        assert!(run(
            "SkipLayerNormalization",
            "com.microsoft",
            17,
            &[
                f32s(&[1, 2, 4], &X),
                f32s(&[3, 4], &[0.0; 12]),
                f32s(&[4], &GAMMA)
            ],
            1,
            &[],
        )
        .is_err());
    }
}
