//! Recurrent layers: RNN, GRU and LSTM, every opset's semantics (layout
//! came in opset 14; GRU's linear_before_reset in opset 3; the opset-1
//! `output_sequence` attribute changes nothing computed).
//!
//! f32 runs its matrix products through `gemm`, f64 is computed in f64, and
//! f16/bf16 are computed in f32 and rounded back at the end. Where the spec
//! is silent the behaviour is ONNX Runtime's: the alpha/beta lists are
//! consumed in order by the activations that take them (defaults: LeakyRelu
//! 0.01, HardSigmoid 0.2/0.5, Elu 1, others 0); activation names are
//! case-insensitive; a bidirectional node given one direction's activations
//! uses them for both; clip bounds every gate's pre-activation; with
//! `sequence_lens` the reverse direction runs over each sequence's own
//! steps, outputs past a sequence's end are zero, and Y_h/Y_c of an empty
//! sequence are zero.

use super::gemm::{gemm, MatRef, Threads};
use super::{array, ints_of, Kernel};
use crate::{EvalError, OpCtx};
use qgraph_ir::half::{bf16, f16};
use qgraph_ir::ndarray::{ArrayD, IxDyn};
use qgraph_ir::{AttrValue, DataType, Tensor};

pub const KERNELS: &[(&str, Kernel)] = &[("RNN", rnn), ("GRU", gru), ("LSTM", lstm)];

fn rnn(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    recurrent(cx, inputs, Cell::Rnn)
}

fn gru(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let linear_before_reset = cx.int_attr("linear_before_reset", 0)? != 0;
    recurrent(
        cx,
        inputs,
        Cell::Gru {
            linear_before_reset,
        },
    )
}

fn lstm(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let input_forget = cx.int_attr("input_forget", 0)? != 0;
    recurrent(cx, inputs, Cell::Lstm { input_forget })
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Cell {
    Rnn,
    Gru { linear_before_reset: bool },
    Lstm { input_forget: bool },
}

impl Cell {
    /// Gates per direction: the row blocks of W and R.
    fn gates(self) -> usize {
        match self {
            Cell::Rnn => 1,
            Cell::Gru { .. } => 3,
            Cell::Lstm { .. } => 4,
        }
    }

    /// The activations one direction takes (f; f, g; f, g, h).
    fn default_activations(self) -> &'static [&'static str] {
        match self {
            Cell::Rnn => &["Tanh"],
            Cell::Gru { .. } => &["Sigmoid", "Tanh"],
            Cell::Lstm { .. } => &["Sigmoid", "Tanh", "Tanh"],
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ActivationKind {
    Relu,
    Tanh,
    Sigmoid,
    Affine,
    LeakyRelu,
    ThresholdedRelu,
    ScaledTanh,
    HardSigmoid,
    Elu,
    Softsign,
    Softplus,
}

#[derive(Clone, Copy, Debug)]
struct Activation {
    kind: ActivationKind,
    alpha: f32,
    beta: f32,
}

impl Activation {
    /// Parses a name; takes alpha and beta from the lists where the
    /// function has them.
    fn parse(
        name: &str,
        alphas: &mut impl Iterator<Item = f32>,
        betas: &mut impl Iterator<Item = f32>,
    ) -> Option<Activation> {
        use ActivationKind::*;
        // (kind, takes alpha, takes beta, default alpha, default beta)
        let (kind, takes_alpha, takes_beta, alpha, beta) = match name.to_ascii_lowercase().as_str()
        {
            "relu" => (Relu, false, false, 0.0, 0.0),
            "tanh" => (Tanh, false, false, 0.0, 0.0),
            "sigmoid" => (Sigmoid, false, false, 0.0, 0.0),
            "affine" => (Affine, true, true, 0.0, 0.0),
            "leakyrelu" => (LeakyRelu, true, false, 0.01, 0.0),
            "thresholdedrelu" => (ThresholdedRelu, true, false, 0.0, 0.0),
            "scaledtanh" => (ScaledTanh, true, true, 0.0, 0.0),
            "hardsigmoid" => (HardSigmoid, true, true, 0.2, 0.5),
            "elu" => (Elu, true, false, 1.0, 0.0),
            "softsign" => (Softsign, false, false, 0.0, 0.0),
            "softplus" => (Softplus, false, false, 0.0, 0.0),
            _ => return None,
        };
        let alpha = if takes_alpha {
            alphas.next().unwrap_or(alpha)
        } else {
            alpha
        };
        let beta = if takes_beta {
            betas.next().unwrap_or(beta)
        } else {
            beta
        };
        Some(Activation { kind, alpha, beta })
    }

    #[inline]
    fn apply<R: Real>(&self, x: R) -> R {
        use ActivationKind::*;
        let zero = R::of(0.0);
        let one = R::of(1.0);
        match self.kind {
            Relu => {
                if x > zero {
                    x
                } else {
                    zero
                }
            }
            Tanh => x.tanh(),
            Sigmoid => sigmoid(x),
            Affine => R::of(self.alpha) * x + R::of(self.beta),
            LeakyRelu => {
                if x >= zero {
                    x
                } else {
                    R::of(self.alpha) * x
                }
            }
            ThresholdedRelu => {
                if x > R::of(self.alpha) {
                    x
                } else {
                    zero
                }
            }
            ScaledTanh => R::of(self.alpha) * (R::of(self.beta) * x).tanh(),
            HardSigmoid => {
                let y = R::of(self.alpha) * x + R::of(self.beta);
                if y > one {
                    one
                } else if y > zero {
                    y
                } else {
                    zero
                }
            }
            Elu => {
                if x >= zero {
                    x
                } else {
                    R::of(self.alpha) * (x.exp() - one)
                }
            }
            Softsign => x / (one + x.abs()),
            // log(1 + e^x) without overflow for large x.
            Softplus => {
                if x > zero {
                    x + (-x).exp().ln_1p()
                } else {
                    x.exp().ln_1p()
                }
            }
        }
    }
}

#[inline]
fn sigmoid<R: Real>(x: R) -> R {
    let one = R::of(1.0);
    if x >= R::of(0.0) {
        one / (one + (-x).exp())
    } else {
        let e = x.exp();
        e / (one + e)
    }
}

/// The type a layer computes in: f32 (also for f16 and bf16) or f64.
trait Real:
    Copy
    + Default
    + PartialOrd
    + Send
    + Sync
    + std::fmt::Debug
    + 'static
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
{
    fn of(v: f32) -> Self;
    fn exp(self) -> Self;
    fn tanh(self) -> Self;
    fn ln_1p(self) -> Self;
    fn abs(self) -> Self;

    /// `dst = a bᵀ` (`+=` with `accumulate`): `a` is `m x k` and `b` is
    /// `n x k`, both row-major; `dst`'s rows are `dst_stride` apart.
    #[allow(clippy::too_many_arguments)]
    fn product(
        dst: &mut [Self],
        dst_stride: usize,
        a: &[Self],
        m: usize,
        k: usize,
        b: &[Self],
        n: usize,
        accumulate: bool,
        threads: Threads,
    );

    /// A tensor of the layer's input type as values of this type, in
    /// logical order; `None` when its type is not `dtype`.
    fn values(t: &Tensor, dtype: DataType) -> Option<ArrayD<Self>>;

    /// Values back as a tensor of `dtype` (the input's type).
    fn tensor(shape: &[usize], values: Vec<Self>, dtype: DataType) -> Tensor;
}

/// Below this many rows a product is computed by [`dot_rows`].
const FEW_ROWS: usize = 32;

/// `out[j] = a · b_j` for the `k`-long rows `b_j` of `b`: four rows at a
/// time sharing the loads of `a`, eight lanes each, which vectorises.
fn dot_rows(out: &mut [f32], a: &[f32], b: &[f32], k: usize) {
    let blocks = out.len() / 4;
    let (out4, out_rest) = out.split_at_mut(blocks * 4);
    let (b4, b_rest) = b.split_at(blocks * 4 * k);
    let split = k / 8 * 8;
    for (rows, out) in b4.chunks_exact(4 * k).zip(out4.chunks_exact_mut(4)) {
        let mut lanes = [[0f32; 8]; 4];
        let (r0, rest) = rows.split_at(k);
        let (r1, rest) = rest.split_at(k);
        let (r2, r3) = rest.split_at(k);
        let chunks = a[..split]
            .chunks_exact(8)
            .zip(r0.chunks_exact(8))
            .zip(r1.chunks_exact(8))
            .zip(r2.chunks_exact(8))
            .zip(r3.chunks_exact(8));
        for ((((x, p0), p1), p2), p3) in chunks {
            for l in 0..8 {
                lanes[0][l] += x[l] * p0[l];
                lanes[1][l] += x[l] * p1[l];
                lanes[2][l] += x[l] * p2[l];
                lanes[3][l] += x[l] * p3[l];
            }
        }
        for (r, (o, lanes)) in out.iter_mut().zip(&lanes).enumerate() {
            let row = &rows[r * k..(r + 1) * k];
            let tail: f32 = a[split..]
                .iter()
                .zip(&row[split..])
                .map(|(x, y)| x * y)
                .sum();
            *o = lanes.iter().sum::<f32>() + tail;
        }
    }
    for (row, o) in b_rest.chunks_exact(k).zip(out_rest) {
        *o = a.iter().zip(row).map(|(x, y)| x * y).sum();
    }
}

impl Real for f32 {
    fn of(v: f32) -> Self {
        v
    }
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn tanh(self) -> Self {
        f32::tanh(self)
    }
    fn ln_1p(self) -> Self {
        f32::ln_1p(self)
    }
    fn abs(self) -> Self {
        f32::abs(self)
    }

    fn product(
        dst: &mut [f32],
        dst_stride: usize,
        a: &[f32],
        m: usize,
        k: usize,
        b: &[f32],
        n: usize,
        accumulate: bool,
        threads: Threads,
    ) {
        // A few rows (a step of a small batch, a frame of audio): dot
        // products along b's rows, which the gemm crate's one-row kernels
        // are several times slower at than this loop.
        if m < FEW_ROWS && k > 0 {
            for (i, a_row) in a.chunks_exact(k).take(m).enumerate() {
                let d_row = &mut dst[i * dst_stride..i * dst_stride + n];
                if accumulate {
                    let mut row = vec![0.0; n];
                    dot_rows(&mut row, a_row, &b[..n * k], k);
                    for (d, r) in d_row.iter_mut().zip(row) {
                        *d += r;
                    }
                } else {
                    dot_rows(d_row, a_row, &b[..n * k], k);
                }
            }
            return;
        }
        gemm(
            dst,
            dst_stride,
            MatRef::row_major(a, m, k),
            MatRef::row_major(b, n, k).transposed(),
            1.0,
            accumulate,
            threads,
        );
    }

    fn values(t: &Tensor, dtype: DataType) -> Option<ArrayD<f32>> {
        if t.dtype() != dtype {
            return None;
        }
        match t {
            Tensor::F32(a) => Some(a.clone()),
            Tensor::F16(a) => Some(a.mapv(f16::to_f32)),
            Tensor::BF16(a) => Some(a.mapv(bf16::to_f32)),
            _ => None,
        }
    }

    fn tensor(shape: &[usize], values: Vec<f32>, dtype: DataType) -> Tensor {
        match dtype {
            DataType::F16 => Tensor::F16(array(
                shape,
                values.into_iter().map(f16::from_f32).collect(),
            )),
            DataType::BF16 => Tensor::BF16(array(
                shape,
                values.into_iter().map(bf16::from_f32).collect(),
            )),
            _ => Tensor::F32(array(shape, values)),
        }
    }
}

impl Real for f64 {
    fn of(v: f32) -> Self {
        v as f64
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
    fn ln_1p(self) -> Self {
        f64::ln_1p(self)
    }
    fn abs(self) -> Self {
        f64::abs(self)
    }

    fn product(
        dst: &mut [f64],
        dst_stride: usize,
        a: &[f64],
        m: usize,
        k: usize,
        b: &[f64],
        n: usize,
        accumulate: bool,
        _threads: Threads,
    ) {
        for i in 0..m {
            let a_row = &a[i * k..(i + 1) * k];
            let d_row = &mut dst[i * dst_stride..i * dst_stride + n];
            for (j, d) in d_row.iter_mut().enumerate() {
                let b_row = &b[j * k..(j + 1) * k];
                let dot: f64 = a_row.iter().zip(b_row).map(|(x, y)| x * y).sum();
                *d = if accumulate { *d + dot } else { dot };
            }
        }
    }

    fn values(t: &Tensor, _dtype: DataType) -> Option<ArrayD<f64>> {
        match t {
            Tensor::F64(a) => Some(a.clone()),
            _ => None,
        }
    }

    fn tensor(shape: &[usize], values: Vec<f64>, _dtype: DataType) -> Tensor {
        Tensor::F64(array(shape, values))
    }
}

fn recurrent(cx: &OpCtx, inputs: &[Option<&Tensor>], cell: Cell) -> Result<Vec<Tensor>, EvalError> {
    let x = super::input(cx, inputs, 0)?;
    match x.dtype() {
        DataType::F32 | DataType::F16 | DataType::BF16 => run::<f32>(cx, inputs, cell, x.dtype()),
        DataType::F64 => run::<f64>(cx, inputs, cell, x.dtype()),
        other => cx.err(format!("X is {other}; RNN, GRU and LSTM take floats")),
    }
}

/// The sizes of a layer.
#[derive(Clone, Copy, Debug)]
struct Dims {
    seq: usize,
    batch: usize,
    input: usize,
    hidden: usize,
}

/// One direction's weights and initial state, all in layout 0.
struct Direction<'a, R> {
    reverse: bool,
    /// `[gates * hidden, input]`.
    w: &'a [R],
    /// `[gates * hidden, hidden]`.
    r: &'a [R],
    /// `[2 * gates * hidden]`: Wb then Rb.
    bias: Option<&'a [R]>,
    /// `[3 * hidden]`: the input, output and forget peepholes.
    peepholes: Option<&'a [R]>,
    /// `[batch, hidden]`.
    initial_h: Option<&'a [R]>,
    initial_c: Option<&'a [R]>,
    activations: &'a [Activation],
}

/// One direction's results.
struct DirectionOutput<R> {
    /// `[seq, batch, hidden]`.
    y: Vec<R>,
    /// `[batch, hidden]`.
    y_h: Vec<R>,
    y_c: Vec<R>,
}

/// An optional float input of the layer's type, as values in logical order.
fn optional_values<R: Real>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    i: usize,
    name: &str,
    dtype: DataType,
) -> Result<Option<ArrayD<R>>, EvalError> {
    match inputs.get(i).copied().flatten() {
        None => Ok(None),
        Some(t) => match R::values(t, dtype) {
            Some(a) => Ok(Some(a)),
            None => cx.err(format!("{name} is {}, where X is {dtype}", t.dtype())),
        },
    }
}

fn check_shape(cx: &OpCtx, name: &str, got: &[usize], want: &[usize]) -> Result<(), EvalError> {
    if got == want {
        Ok(())
    } else {
        cx.err(format!("{name} has shape {got:?}, expected {want:?}"))
    }
}

/// A product of sizes, refused when it overflows or is beyond any memory.
fn checked_size(cx: &OpCtx, sizes: &[usize]) -> Result<usize, EvalError> {
    const LIMIT: usize = 1 << 34;
    sizes
        .iter()
        .try_fold(1usize, |acc, &s| acc.checked_mul(s))
        .filter(|&n| n <= LIMIT)
        .map_or_else(
            || cx.err(format!("a buffer of {sizes:?} elements is too large")),
            Ok,
        )
}

fn strings_attr(cx: &OpCtx, name: &str) -> Result<Option<Vec<String>>, EvalError> {
    match cx.graph.node(cx.node).attr(name) {
        None => Ok(None),
        Some(AttrValue::Strings(v)) => Ok(Some(
            v.iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect(),
        )),
        Some(_) => cx.err(format!("attribute '{name}' must be a list of strings")),
    }
}

/// The activations of every direction, `per_direction` each.
fn activations(cx: &OpCtx, cell: Cell, directions: usize) -> Result<Vec<Activation>, EvalError> {
    let defaults = cell.default_activations();
    let per_direction = defaults.len();
    let mut names = match strings_attr(cx, "activations")? {
        Some(names) if !names.is_empty() => names,
        _ => defaults
            .iter()
            .cycle()
            .take(per_direction * directions)
            .map(|s| s.to_string())
            .collect(),
    };
    if directions == 2 && names.len() == per_direction {
        names.extend_from_slice(&names.clone());
    }
    if names.len() != per_direction * directions {
        return cx.err(format!(
            "{} activations given, expected {} ({per_direction} per direction)",
            names.len(),
            per_direction * directions
        ));
    }
    let alphas = cx.floats_attr("activation_alpha")?.unwrap_or_default();
    let betas = cx.floats_attr("activation_beta")?.unwrap_or_default();
    let (mut alphas, mut betas) = (alphas.into_iter(), betas.into_iter());
    names
        .iter()
        .map(
            |name| match Activation::parse(name, &mut alphas, &mut betas) {
                Some(a) => Ok(a),
                None => cx.err(format!(
                "unknown activation '{name}' (expected Relu, Tanh, Sigmoid, Affine, LeakyRelu, \
                 ThresholdedRelu, ScaledTanh, HardSigmoid, Elu, Softsign or Softplus)"
            )),
            },
        )
        .collect()
}

/// Swaps the first two axes of a rank-3 array (layout 1 to layout 0 and
/// back), as values in logical order.
fn swap_leading<R: Clone>(a: ArrayD<R>) -> Vec<R> {
    a.permuted_axes(IxDyn(&[1, 0, 2])).iter().cloned().collect()
}

fn run<R: Real>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    cell: Cell,
    dtype: DataType,
) -> Result<Vec<Tensor>, EvalError> {
    let layout = cx.int_attr("layout", 0)?;
    if layout != 0 && layout != 1 {
        return cx.err(format!("layout must be 0 or 1, found {layout}"));
    }
    let batch_major = layout == 1;
    let direction = cx.string_attr("direction", "forward")?;
    let reverse: &[bool] = match direction.as_str() {
        "forward" => &[false],
        "reverse" => &[true],
        "bidirectional" => &[false, true],
        other => {
            return cx.err(format!(
                "direction must be forward, reverse or bidirectional, found '{other}'"
            ))
        }
    };
    let num_directions = reverse.len();
    let gates = cell.gates();

    let x = optional_values::<R>(cx, inputs, 0, "X", dtype)?;
    let Some(x) = x else {
        return cx.err("input 0 (X) is required");
    };
    if x.ndim() != 3 {
        return cx.err(format!("X must have rank 3, found shape {:?}", x.shape()));
    }
    let (seq, batch, input_size) = if batch_major {
        (x.shape()[1], x.shape()[0], x.shape()[2])
    } else {
        (x.shape()[0], x.shape()[1], x.shape()[2])
    };
    let Some(w) = optional_values::<R>(cx, inputs, 1, "W", dtype)? else {
        return cx.err("input 1 (W) is required");
    };
    let Some(r) = optional_values::<R>(cx, inputs, 2, "R", dtype)? else {
        return cx.err("input 2 (R) is required");
    };
    if r.ndim() != 3 {
        return cx.err(format!("R must have rank 3, found shape {:?}", r.shape()));
    }
    let hidden = r.shape()[2];
    let declared = cx.int_attr("hidden_size", hidden as i64)?;
    if declared != hidden as i64 {
        return cx.err(format!(
            "hidden_size is {declared}, but R has shape {:?}",
            r.shape()
        ));
    }
    let gate_rows = checked_size(cx, &[gates, hidden])?;
    check_shape(cx, "W", w.shape(), &[num_directions, gate_rows, input_size])?;
    check_shape(cx, "R", r.shape(), &[num_directions, gate_rows, hidden])?;
    let bias = optional_values::<R>(cx, inputs, 3, "B", dtype)?;
    if let Some(b) = &bias {
        check_shape(cx, "B", b.shape(), &[num_directions, 2 * gate_rows])?;
    }
    let lens: Vec<usize> = match inputs.get(4).copied().flatten() {
        None => vec![seq; batch],
        Some(t) => {
            if t.shape() != [batch] {
                return cx.err(format!(
                    "sequence_lens has shape {:?}, expected [{batch}]",
                    t.shape()
                ));
            }
            let mut lens = Vec::with_capacity(batch);
            for v in ints_of(cx, t, "sequence_lens")? {
                if v < 0 || v as u64 > seq as u64 {
                    return cx.err(format!(
                        "sequence_lens holds {v}, outside 0..={seq} (the sequence length)"
                    ));
                }
                lens.push(v as usize);
            }
            lens
        }
    };
    let state_shape = if batch_major {
        [batch, num_directions, hidden]
    } else {
        [num_directions, batch, hidden]
    };
    let state = |i: usize, name: &str| -> Result<Option<Vec<R>>, EvalError> {
        let Some(a) = optional_values::<R>(cx, inputs, i, name, dtype)? else {
            return Ok(None);
        };
        check_shape(cx, name, a.shape(), &state_shape)?;
        Ok(Some(if batch_major {
            swap_leading(a)
        } else {
            a.iter().copied().collect()
        }))
    };
    let initial_h = state(5, "initial_h")?;
    let (initial_c, peepholes) = match cell {
        Cell::Lstm { .. } => {
            let initial_c = state(6, "initial_c")?;
            let peepholes = optional_values::<R>(cx, inputs, 7, "P", dtype)?;
            if let Some(p) = &peepholes {
                check_shape(cx, "P", p.shape(), &[num_directions, 3 * hidden])?;
            }
            (initial_c, peepholes)
        }
        _ => (None, None),
    };
    let clip = match cx.graph.node(cx.node).attr("clip") {
        None => None,
        Some(_) => {
            let c = cx.float_attr("clip", 0.0)?;
            if c.is_nan() || c <= 0.0 {
                return cx.err(format!("clip must be positive, found {c}"));
            }
            Some(c)
        }
    };
    let activations = activations(cx, cell, num_directions)?;
    let per_direction = cell.default_activations().len();
    // Buffers the layer allocates: the input projection and the outputs.
    checked_size(cx, &[seq, batch, gate_rows])?;
    checked_size(cx, &[seq, num_directions, batch, hidden])?;

    let dims = Dims {
        seq,
        batch,
        input: input_size,
        hidden,
    };
    let x: Vec<R> = if batch_major {
        swap_leading(x)
    } else {
        x.iter().copied().collect()
    };
    let w: Vec<R> = w.iter().copied().collect();
    let r: Vec<R> = r.iter().copied().collect();
    let bias: Option<Vec<R>> = bias.map(|b| b.iter().copied().collect());
    let peepholes: Option<Vec<R>> = peepholes.map(|p| p.iter().copied().collect());

    fn part<R>(v: &Option<Vec<R>>, d: usize, len: usize) -> Option<&[R]> {
        v.as_ref().map(|v| &v[d * len..(d + 1) * len])
    }
    let direction = |d: usize| -> Direction<'_, R> {
        let slice = |v, len| part(v, d, len);
        Direction {
            reverse: reverse[d],
            w: &w[d * gate_rows * input_size..(d + 1) * gate_rows * input_size],
            r: &r[d * gate_rows * hidden..(d + 1) * gate_rows * hidden],
            bias: slice(&bias, 2 * gate_rows),
            peepholes: slice(&peepholes, 3 * hidden),
            initial_h: slice(&initial_h, batch * hidden),
            initial_c: slice(&initial_c, batch * hidden),
            activations: &activations[d * per_direction..(d + 1) * per_direction],
        }
    };
    let clip = clip.map(R::of);
    let results: Vec<DirectionOutput<R>> = if num_directions == 2 {
        let (forward, backward) = rayon::join(
            || run_direction(cell, dims, &x, &lens, clip, &direction(0)),
            || run_direction(cell, dims, &x, &lens, clip, &direction(1)),
        );
        vec![forward, backward]
    } else {
        vec![run_direction(cell, dims, &x, &lens, clip, &direction(0))]
    };

    // Interleave the directions into the outputs' layouts.
    let mut y = vec![R::default(); seq * num_directions * batch * hidden];
    let mut y_h = vec![R::default(); num_directions * batch * hidden];
    let mut y_c = vec![R::default(); num_directions * batch * hidden];
    for (d, out) in results.iter().enumerate() {
        for t in 0..seq {
            for b in 0..batch {
                let at = if batch_major {
                    ((b * seq + t) * num_directions + d) * hidden
                } else {
                    ((t * num_directions + d) * batch + b) * hidden
                };
                let from = (t * batch + b) * hidden;
                y[at..at + hidden].copy_from_slice(&out.y[from..from + hidden]);
            }
        }
        for b in 0..batch {
            let at = if batch_major {
                (b * num_directions + d) * hidden
            } else {
                (d * batch + b) * hidden
            };
            let from = b * hidden;
            y_h[at..at + hidden].copy_from_slice(&out.y_h[from..from + hidden]);
            y_c[at..at + hidden].copy_from_slice(&out.y_c[from..from + hidden]);
        }
    }
    let (y_shape, state_shape) = if batch_major {
        (
            [batch, seq, num_directions, hidden],
            [batch, num_directions, hidden],
        )
    } else {
        (
            [seq, num_directions, batch, hidden],
            [num_directions, batch, hidden],
        )
    };
    let mut outputs = vec![
        R::tensor(&y_shape, y, dtype),
        R::tensor(&state_shape, y_h, dtype),
    ];
    if let Cell::Lstm { .. } = cell {
        outputs.push(R::tensor(&state_shape, y_c, dtype));
    }
    Ok(outputs)
}

#[inline]
fn clipped<R: Real>(x: R, clip: Option<R>) -> R {
    match clip {
        Some(c) if x > c => c,
        Some(c) if x < -c => -c,
        _ => x,
    }
}

/// Runs one direction over the whole sequence (x is `[seq, batch, input]`).
fn run_direction<R: Real>(
    cell: Cell,
    dims: Dims,
    x: &[R],
    lens: &[usize],
    clip: Option<R>,
    d: &Direction<R>,
) -> DirectionOutput<R> {
    let Dims {
        seq,
        batch,
        input,
        hidden: h_size,
    } = dims;
    let gate_rows = cell.gates() * h_size;
    let steps = lens.iter().copied().max().unwrap_or(0);
    let zero = R::of(0.0);
    let one = R::of(1.0);

    // Every step's input projection at once, with the biases that add to it.
    let mut projected = vec![zero; steps * batch * gate_rows];
    R::product(
        &mut projected,
        gate_rows,
        &x[..steps * batch * input],
        steps * batch,
        input,
        d.w,
        gate_rows,
        false,
        Threads::Pool,
    );
    // GRU with linear_before_reset adds Rb_h inside the reset product.
    let linear_before_reset = matches!(
        cell,
        Cell::Gru {
            linear_before_reset: true
        }
    );
    let mut recurrent_h_bias = vec![zero; h_size];
    if let (Some(b), true) = (d.bias, gate_rows > 0) {
        let (wb, rb) = b.split_at(gate_rows);
        let mut folded: Vec<R> = wb.iter().zip(rb).map(|(&w, &r)| w + r).collect();
        if linear_before_reset {
            let h_gate = 2 * h_size..3 * h_size;
            folded[h_gate.clone()].copy_from_slice(&wb[h_gate.clone()]);
            recurrent_h_bias.copy_from_slice(&rb[h_gate]);
        }
        for row in projected.chunks_exact_mut(gate_rows) {
            for (v, &b) in row.iter_mut().zip(&folded) {
                *v = *v + b;
            }
        }
    }

    let mut h: Vec<R> = d
        .initial_h
        .map_or_else(|| vec![zero; batch * h_size], <[R]>::to_vec);
    let mut c: Vec<R> = d
        .initial_c
        .map_or_else(|| vec![zero; batch * h_size], <[R]>::to_vec);
    let mut y = vec![zero; seq * batch * h_size];
    // The recurrent product of the step: H_{t-1} Rᵀ (for GRU without
    // linear_before_reset, of the z and r gates only).
    let recurrent_cols = match cell {
        Cell::Gru {
            linear_before_reset: false,
        } => 2 * h_size,
        _ => gate_rows,
    };
    let mut recurrent = vec![zero; batch * recurrent_cols];
    // GRU without linear_before_reset: z, then r ⊙ H_{t-1} and its product
    // with R_h.
    let mut update = vec![zero; batch * h_size];
    let mut reset_h = vec![zero; batch * h_size];
    let mut reset_product = vec![zero; batch * h_size];
    let no_peepholes = vec![zero; 3 * h_size];
    let peepholes = d.peepholes.unwrap_or(&no_peepholes);
    let (p_i, rest) = peepholes.split_at(h_size);
    let (p_o, p_f) = rest.split_at(h_size);
    let act = d.activations;

    for step in 0..steps {
        R::product(
            &mut recurrent,
            recurrent_cols,
            &h,
            batch,
            h_size,
            &d.r[..recurrent_cols * h_size],
            recurrent_cols,
            false,
            Threads::One,
        );
        // The time each batch row is at in this step.
        let time = |b: usize| -> Option<usize> {
            let len = lens[b];
            (step < len).then(|| if d.reverse { len - 1 - step } else { step })
        };
        if let Cell::Gru {
            linear_before_reset: false,
        } = cell
        {
            for b in 0..batch {
                let Some(t) = time(b) else { continue };
                let xg = &projected[(t * batch + b) * gate_rows..][..gate_rows];
                let hg = &recurrent[b * recurrent_cols..][..recurrent_cols];
                for j in 0..h_size {
                    let z = act[0].apply(clipped(xg[j] + hg[j], clip));
                    let r = act[0].apply(clipped(xg[h_size + j] + hg[h_size + j], clip));
                    update[b * h_size + j] = z;
                    reset_h[b * h_size + j] = r * h[b * h_size + j];
                }
            }
            R::product(
                &mut reset_product,
                h_size,
                &reset_h,
                batch,
                h_size,
                &d.r[2 * h_size * h_size..3 * h_size * h_size],
                h_size,
                false,
                Threads::One,
            );
        }
        for b in 0..batch {
            let Some(t) = time(b) else { continue };
            let xg = &projected[(t * batch + b) * gate_rows..][..gate_rows];
            let hg = &recurrent[b * recurrent_cols..][..recurrent_cols];
            let hb = &mut h[b * h_size..(b + 1) * h_size];
            match cell {
                Cell::Rnn => {
                    for j in 0..h_size {
                        hb[j] = act[0].apply(clipped(xg[j] + hg[j], clip));
                    }
                }
                Cell::Gru {
                    linear_before_reset: true,
                } => {
                    for j in 0..h_size {
                        let z = act[0].apply(clipped(xg[j] + hg[j], clip));
                        let r = act[0].apply(clipped(xg[h_size + j] + hg[h_size + j], clip));
                        let n = xg[2 * h_size + j] + r * (hg[2 * h_size + j] + recurrent_h_bias[j]);
                        let n = act[1].apply(clipped(n, clip));
                        hb[j] = (one - z) * n + z * hb[j];
                    }
                }
                Cell::Gru {
                    linear_before_reset: false,
                } => {
                    for j in 0..h_size {
                        let z = update[b * h_size + j];
                        let n = xg[2 * h_size + j] + reset_product[b * h_size + j];
                        let n = act[1].apply(clipped(n, clip));
                        hb[j] = (one - z) * n + z * hb[j];
                    }
                }
                Cell::Lstm { input_forget } => {
                    let cb = &mut c[b * h_size..(b + 1) * h_size];
                    for j in 0..h_size {
                        let gate = |g: usize| xg[g * h_size + j] + hg[g * h_size + j];
                        let c_prev = cb[j];
                        let i = act[0].apply(clipped(gate(0) + p_i[j] * c_prev, clip));
                        let f = if input_forget {
                            one - i
                        } else {
                            act[0].apply(clipped(gate(2) + p_f[j] * c_prev, clip))
                        };
                        let candidate = act[1].apply(clipped(gate(3), clip));
                        let c_new = f * c_prev + i * candidate;
                        let o = act[0].apply(clipped(gate(1) + p_o[j] * c_new, clip));
                        cb[j] = c_new;
                        hb[j] = o * act[2].apply(c_new);
                    }
                }
            }
            y[(t * batch + b) * h_size..][..h_size].copy_from_slice(hb);
        }
    }
    // An empty sequence's final state is zero (as ONNX Runtime gives).
    for (b, &len) in lens.iter().enumerate() {
        if len == 0 {
            h[b * h_size..(b + 1) * h_size].fill(zero);
            c[b * h_size..(b + 1) * h_size].fill(zero);
        }
    }
    DirectionOutput { y, y_h: h, y_c: c }
}

#[cfg(test)]
// ONNX Runtime's values are written out to f32's round-trip precision.
#[allow(clippy::excessive_precision)]
mod tests {
    use super::*;

    /// Runs one node of `op` with the given attributes, at opset 22.
    fn run_op(
        op: &str,
        attrs: Vec<(&str, AttrValue)>,
        inputs: &[Option<&Tensor>],
    ) -> Result<Vec<Tensor>, EvalError> {
        crate::ops::run_test_op(op, 22, attrs, inputs)
    }

    /// Test data (the same formula as the script that asked ONNX Runtime
    /// for the expected values).
    fn pattern(shape: &[usize], seed: usize) -> Tensor {
        let n: usize = shape.iter().product();
        let values = (0..n)
            .map(|i| ((i * 37 + seed * 11) % 23) as f32 / 10.0 - 1.1)
            .collect();
        Tensor::F32(array(shape, values))
    }

    fn f32s(t: &Tensor) -> (Vec<usize>, Vec<f32>) {
        match t {
            Tensor::F32(a) => (a.shape().to_vec(), a.iter().copied().collect()),
            other => panic!("expected f32, found {}", other.dtype()),
        }
    }

    fn assert_close(got: &Tensor, shape: &[usize], want: &[f32], tolerance: f32) {
        let (got_shape, got) = f32s(got);
        assert_eq!(got_shape, shape);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tolerance, "element {i}: {g} vs {w}");
        }
    }

    fn text(s: &str) -> AttrValue {
        AttrValue::String(s.as_bytes().to_vec())
    }

    // Expected values from ONNX Runtime 1.32 (the script is described in
    // the branch's report: the same inputs, one-node models).
    // LSTM_Y [3, 2, 2, 2]
    const LSTM_Y: [f32; 24] = [
        -5.14221303e-02,
        -2.86064416e-01,
        -5.42492718e-02,
        -2.33736094e-02,
        -7.78168321e-01,
        1.02923274e-01,
        -4.32627499e-01,
        -5.49759492e-02,
        -2.76311282e-02,
        -4.01270151e-01,
        0.00000000e+00,
        0.00000000e+00,
        -5.55965960e-01,
        2.53349781e-01,
        0.00000000e+00,
        0.00000000e+00,
        3.17524411e-02,
        -5.54410398e-01,
        0.00000000e+00,
        0.00000000e+00,
        -2.06319138e-01,
        3.73285294e-01,
        0.00000000e+00,
        0.00000000e+00,
    ];
    // LSTM_Y_H [2, 2, 2]
    const LSTM_Y_H: [f32; 8] = [
        3.17524411e-02,
        -5.54410398e-01,
        -5.42492718e-02,
        -2.33736094e-02,
        -7.78168321e-01,
        1.02923274e-01,
        -4.32627499e-01,
        -5.49759492e-02,
    ];
    // LSTM_Y_C [2, 2, 2]
    const LSTM_Y_C: [f32; 8] = [
        7.33651578e-01,
        -1.13252330e+00,
        -2.68465281e-01,
        -3.44930291e-02,
        -1.65700603e+00,
        5.38462281e-01,
        -7.46923268e-01,
        -6.70026243e-01,
    ];
    // GRU0_Y [3, 2, 2, 2]
    const GRU0_Y: [f32; 24] = [
        -3.13734472e-01,
        1.36062890e-01,
        1.56792521e-01,
        4.81368273e-01,
        1.47621661e-01,
        2.43268281e-01,
        1.77946001e-01,
        4.42234933e-01,
        -3.25177670e-01,
        7.80550897e-01,
        7.09764808e-02,
        5.02528369e-01,
        7.87960887e-01,
        2.52296597e-01,
        -7.86053419e-01,
        -1.77276626e-01,
        0.00000000e+00,
        0.00000000e+00,
        -3.47495615e-01,
        2.49799192e-01,
        0.00000000e+00,
        0.00000000e+00,
        -8.58092725e-01,
        8.68943781e-02,
    ];
    // GRU0_Y_H [2, 2, 2]
    const GRU0_Y_H: [f32; 8] = [
        -3.25177670e-01,
        7.80550897e-01,
        -3.47495615e-01,
        2.49799192e-01,
        1.47621661e-01,
        2.43268281e-01,
        1.77946001e-01,
        4.42234933e-01,
    ];
    // GRU1_Y [3, 2, 2, 2]
    const GRU1_Y: [f32; 24] = [
        -3.12571883e-01,
        1.25285298e-01,
        2.62243658e-01,
        4.74362642e-01,
        2.75314808e-01,
        1.76356792e-01,
        2.28334218e-01,
        7.04803765e-02,
        -4.59154248e-02,
        7.73423553e-01,
        1.80239096e-01,
        4.61841285e-01,
        8.34425211e-01,
        2.03569293e-01,
        -7.29643881e-01,
        -4.27704722e-01,
        0.00000000e+00,
        0.00000000e+00,
        -2.65287548e-01,
        2.30083346e-01,
        0.00000000e+00,
        0.00000000e+00,
        -8.43282223e-01,
        6.19673729e-02,
    ];
    // GRU1_Y_H [2, 2, 2]
    const GRU1_Y_H: [f32; 8] = [
        -4.59154248e-02,
        7.73423553e-01,
        -2.65287548e-01,
        2.30083346e-01,
        2.75314808e-01,
        1.76356792e-01,
        2.28334218e-01,
        7.04803765e-02,
    ];
    // RNN_Y [3, 1, 2, 3]
    const RNN_Y: [f32; 18] = [
        8.00000012e-01,
        -2.40000010e-01,
        5.20079970e-01,
        8.00000012e-01,
        -2.40000010e-01,
        9.79999900e-02,
        8.00000012e-01,
        -1.58400044e-01,
        -7.31999949e-02,
        8.00000012e-01,
        1.63999975e-01,
        -2.40000010e-01,
        8.00000012e-01,
        7.79999971e-01,
        -2.40000010e-01,
        8.00000012e-01,
        -2.40000010e-01,
        8.00000012e-01,
    ];
    // RNN_Y_H [1, 2, 3]
    const RNN_Y_H: [f32; 6] = [
        8.00000012e-01,
        -2.40000010e-01,
        5.20079970e-01,
        8.00000012e-01,
        -2.40000010e-01,
        9.79999900e-02,
    ];

    #[test]
    fn lstm_bidirectional_with_lengths_and_peepholes_matches_onnx_runtime() {
        let (s, b, i, h, d) = (3, 2, 2, 2, 2);
        let lens = Tensor::I32(array(&[2], vec![3, 1]));
        let inputs = [
            pattern(&[s, b, i], 1),
            pattern(&[d, 4 * h, i], 2),
            pattern(&[d, 4 * h, h], 3),
            pattern(&[d, 8 * h], 4),
            lens,
            pattern(&[d, b, h], 5),
            pattern(&[d, b, h], 6),
            pattern(&[d, 3 * h], 7),
        ];
        let inputs: Vec<Option<&Tensor>> = inputs.iter().map(Some).collect();
        let out = run_op(
            "LSTM",
            vec![
                ("hidden_size", AttrValue::Int(2)),
                ("direction", text("bidirectional")),
            ],
            &inputs,
        )
        .unwrap();
        assert_close(&out[0], &[s, d, b, h], &LSTM_Y, 1e-5);
        assert_close(&out[1], &[d, b, h], &LSTM_Y_H, 1e-5);
        assert_close(&out[2], &[d, b, h], &LSTM_Y_C, 1e-5);
    }

    #[test]
    fn gru_both_reset_forms_match_onnx_runtime() {
        let (s, b, i, h, d) = (3, 2, 3, 2, 2);
        let lens = Tensor::I32(array(&[2], vec![2, 3]));
        let inputs = [
            pattern(&[s, b, i], 1),
            pattern(&[d, 3 * h, i], 2),
            pattern(&[d, 3 * h, h], 3),
            pattern(&[d, 6 * h], 4),
            lens,
            pattern(&[d, b, h], 5),
        ];
        let inputs: Vec<Option<&Tensor>> = inputs.iter().map(Some).collect();
        for (linear_before_reset, y, y_h) in [(0, &GRU0_Y, &GRU0_Y_H), (1, &GRU1_Y, &GRU1_Y_H)] {
            let out = run_op(
                "GRU",
                vec![
                    ("hidden_size", AttrValue::Int(2)),
                    ("direction", text("bidirectional")),
                    ("linear_before_reset", AttrValue::Int(linear_before_reset)),
                ],
                &inputs,
            )
            .unwrap();
            assert_close(&out[0], &[s, d, b, h], y, 1e-5);
            assert_close(&out[1], &[d, b, h], y_h, 1e-5);
        }
    }

    #[test]
    fn rnn_reverse_with_alpha_and_clip_matches_onnx_runtime() {
        let (s, b, i, h) = (3, 2, 2, 3);
        let inputs = [
            pattern(&[s, b, i], 1),
            pattern(&[1, h, i], 2),
            pattern(&[1, h, h], 3),
            pattern(&[1, 2 * h], 4),
        ];
        let inputs: Vec<Option<&Tensor>> = inputs.iter().map(Some).collect();
        let out = run_op(
            "RNN",
            vec![
                ("hidden_size", AttrValue::Int(3)),
                ("direction", text("reverse")),
                (
                    "activations",
                    AttrValue::Strings(vec![b"LeakyRelu".to_vec()]),
                ),
                ("activation_alpha", AttrValue::Floats(vec![0.3])),
                ("clip", AttrValue::Float(0.8)),
            ],
            &inputs,
        )
        .unwrap();
        assert_close(&out[0], &[s, 1, b, h], &RNN_Y, 1e-5);
        assert_close(&out[1], &[1, b, h], &RNN_Y_H, 1e-5);
    }

    /// A linear recurrence (Affine 1, 0) on values whose sums are exact:
    /// f64 must give the exact results, in f64.
    #[test]
    fn rnn_f64_is_exact() {
        let f = |shape: &[usize], v: Vec<f64>| Tensor::F64(array(shape, v));
        let x = f(&[3, 1, 1], vec![1.0, 2.0, 3.0]);
        let w = f(&[1, 1, 1], vec![2.0]);
        let r = f(&[1, 1, 1], vec![0.5]);
        let b = f(&[1, 2], vec![0.25, 0.25]);
        let h0 = f(&[1, 1, 1], vec![1.0]);
        let out = run_op(
            "RNN",
            vec![
                ("activations", AttrValue::Strings(vec![b"affine".to_vec()])),
                ("activation_alpha", AttrValue::Floats(vec![1.0])),
                ("activation_beta", AttrValue::Floats(vec![0.0])),
            ],
            &[Some(&x), Some(&w), Some(&r), Some(&b), None, Some(&h0)],
        )
        .unwrap();
        // h1 = 2 + 0.5 + 0.5, h2 = 4 + 1.5 + 0.5, h3 = 6 + 3 + 0.5
        match (&out[0], &out[1]) {
            (Tensor::F64(y), Tensor::F64(y_h)) => {
                assert_eq!(y.shape(), [3, 1, 1, 1]);
                assert_eq!(y.iter().copied().collect::<Vec<_>>(), [3.0, 6.0, 9.5]);
                assert_eq!(y_h.iter().copied().collect::<Vec<_>>(), [9.5]);
            }
            other => panic!("expected f64 outputs, found {other:?}"),
        }
    }

    /// Batch-major layout gives the sequence-major results transposed; an
    /// f16 layer gives f16 results near the f32 ones.
    #[test]
    fn layout_and_half_precision() {
        let (s, b, i, h) = (3, 2, 2, 2);
        let x = pattern(&[s, b, i], 1);
        let (w, r) = (pattern(&[1, 4 * h, i], 2), pattern(&[1, 4 * h, h], 3));
        let sequence_major = run_op(
            "LSTM",
            vec![("hidden_size", AttrValue::Int(2))],
            &[Some(&x), Some(&w), Some(&r)],
        )
        .unwrap();
        let Tensor::F32(xa) = &x else { unreachable!() };
        let x_batch_major = Tensor::F32(
            xa.clone()
                .permuted_axes(IxDyn(&[1, 0, 2]))
                .as_standard_layout()
                .into_owned(),
        );
        let batch_major = run_op(
            "LSTM",
            vec![
                ("hidden_size", AttrValue::Int(2)),
                ("layout", AttrValue::Int(1)),
            ],
            &[Some(&x_batch_major), Some(&w), Some(&r)],
        )
        .unwrap();
        let (Tensor::F32(y0), Tensor::F32(y1)) = (&sequence_major[0], &batch_major[0]) else {
            panic!("f32 outputs expected")
        };
        // [seq, dirs, batch, hidden] against [batch, seq, dirs, hidden]
        assert_eq!(y1.shape(), [b, s, 1, h]);
        assert_eq!(y0.clone().permuted_axes(IxDyn(&[2, 0, 1, 3])), y1);
        let (Tensor::F32(c0), Tensor::F32(c1)) = (&sequence_major[2], &batch_major[2]) else {
            panic!("f32 outputs expected")
        };
        assert_eq!(c0.clone().permuted_axes(IxDyn(&[1, 0, 2])), c1);

        let half = |t: &Tensor| match t {
            Tensor::F32(a) => Tensor::F16(a.mapv(f16::from_f32)),
            _ => unreachable!(),
        };
        let out = run_op(
            "LSTM",
            vec![("hidden_size", AttrValue::Int(2))],
            &[Some(&half(&x)), Some(&half(&w)), Some(&half(&r))],
        )
        .unwrap();
        let Tensor::F16(y) = &out[0] else {
            panic!("an f16 output expected")
        };
        for (a, b) in y.iter().zip(y0.iter()) {
            assert!((a.to_f32() - b).abs() < 2e-3, "{a} vs {b}");
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let x = pattern(&[3, 2, 2], 1);
        let w = pattern(&[1, 4, 2], 2);
        let r = pattern(&[1, 4, 4], 3);
        let gru = |attrs, extra: &[Option<&Tensor>]| {
            let mut inputs = vec![Some(&x), Some(&w), Some(&r)];
            inputs.extend_from_slice(extra);
            run_op("GRU", attrs, &inputs)
        };
        // 4 rows are not 3 gates of hidden size 4.
        assert!(gru(vec![], &[]).is_err());
        let w3 = pattern(&[1, 3, 2], 2);
        let r3 = pattern(&[1, 3, 1], 3);
        let ok = |attrs, extra: &[Option<&Tensor>]| {
            let mut inputs = vec![Some(&x), Some(&w3), Some(&r3)];
            inputs.extend_from_slice(extra);
            run_op("GRU", attrs, &inputs)
        };
        assert!(ok(vec![], &[]).is_ok());
        assert!(ok(vec![("hidden_size", AttrValue::Int(2))], &[]).is_err());
        assert!(ok(vec![("direction", text("sideways"))], &[]).is_err());
        assert!(ok(vec![("direction", text("bidirectional"))], &[]).is_err());
        assert!(ok(
            vec![(
                "activations",
                AttrValue::Strings(vec![b"Sigmoid".to_vec(), b"Gelu".to_vec()])
            )],
            &[]
        )
        .is_err());
        let too_long = Tensor::I32(array(&[2], vec![3, 4]));
        assert!(ok(vec![], &[None, Some(&too_long)]).is_err());
        let wrong_count = Tensor::I32(array(&[3], vec![1, 1, 1]));
        assert!(ok(vec![], &[None, Some(&wrong_count)]).is_err());
        let wrong_h0 = pattern(&[1, 3, 1], 5);
        assert!(ok(vec![], &[None, None, Some(&wrong_h0)]).is_err());
        let ints = Tensor::I32(array(&[3, 2, 2], vec![0; 12]));
        assert!(run_op("GRU", vec![], &[Some(&ints), Some(&w3), Some(&r3)]).is_err());
        let x64 = Tensor::F64(array(&[3, 2, 2], vec![0.0; 12]));
        assert!(run_op("GRU", vec![], &[Some(&x64), Some(&w3), Some(&r3)]).is_err());
        assert!(run_op("GRU", vec![], &[Some(&x), None, Some(&r3)]).is_err());
    }

    /// Degenerate sizes give empty or zero outputs, not a panic.
    #[test]
    fn empty_sizes() {
        for (x_shape, hidden, input) in [
            ([2, 1, 2], 0, 2),
            ([0, 1, 2], 2, 2),
            ([2, 0, 2], 2, 2),
            ([2, 1, 0], 2, 0),
        ] {
            let x = pattern(&x_shape, 1);
            let w = pattern(&[1, 4 * hidden, input], 2);
            let r = pattern(&[1, 4 * hidden, hidden], 3);
            let b = pattern(&[1, 8 * hidden], 4);
            let out = run_op("LSTM", vec![], &[Some(&x), Some(&w), Some(&r), Some(&b)]).unwrap();
            let (shape, _) = f32s(&out[0]);
            assert_eq!(shape, [x_shape[0], 1, x_shape[1], hidden]);
        }
    }

    /// Empty sequences: zero outputs and zero final states.
    #[test]
    fn empty_sequences_give_zero_states() {
        let (s, b, i, h) = (2, 2, 2, 2);
        let lens = Tensor::I64(array(&[2], vec![0, 2]));
        let inputs = [
            pattern(&[s, b, i], 1),
            pattern(&[1, 4 * h, i], 2),
            pattern(&[1, 4 * h, h], 3),
            pattern(&[1, 8 * h], 4),
            lens,
            pattern(&[1, b, h], 5),
            pattern(&[1, b, h], 6),
        ];
        let inputs: Vec<Option<&Tensor>> = inputs.iter().map(Some).collect();
        let out = run_op("LSTM", vec![("direction", text("reverse"))], &inputs).unwrap();
        let (_, y) = f32s(&out[0]);
        let (_, y_h) = f32s(&out[1]);
        let (_, y_c) = f32s(&out[2]);
        // Batch row 0 is empty: its outputs and states are zero.
        for t in 0..s {
            assert_eq!(&y[(t * b) * h..(t * b + 1) * h], &[0.0, 0.0]);
            assert!(y[(t * b + 1) * h..(t * b + 2) * h]
                .iter()
                .any(|&v| v != 0.0));
        }
        assert_eq!(&y_h[..h], &[0.0, 0.0]);
        assert_eq!(&y_c[..h], &[0.0, 0.0]);
        // The reverse direction ends at time 0.
        assert_eq!(&y_h[h..], &y[h..2 * h]);
    }
}
