//! `lower-to-integer`: turns `DequantizeLinear -> op -> QuantizeLinear`
//! groups into integer operators, so that values stay int8/uint8 from the
//! input's QuantizeLinear to the output.
//!
//! Each rule matches one float op whose data inputs are per-tensor
//! DequantizeLinear nodes (weights may be per channel) and whose output one
//! per-tensor QuantizeLinear alone reads, then replaces the group by the
//! operator that computes the same quantized result:
//! - Conv [-> Relu | Clip] -> Q: `QLinearConv` (int32 bias of scale
//!   `x_scale * w_scale`), then an integer `Clip` when the activation's
//!   bounds cut into the output grid (`Q(clip(y, a, b)) = clip(Q(y), Q(a),
//!   Q(b))`, since Q is monotone);
//! - Gemm [-> Relu | Clip] [-> Q]: `com.microsoft.QGemm` (and a Clip as for
//!   Conv), with a float output when nothing quantizes it (the model's
//!   output: that is its DequantizeLinear);
//! - MatMul -> Q with a 2-D weight: `QLinearMatMul`;
//! - Add, Mul -> Q: `com.microsoft.QLinearAdd`, `QLinearMul`;
//! - GlobalAveragePool -> Q: `com.microsoft.QLinearGlobalAveragePool`;
//! - Concat -> Q: `com.microsoft.QLinearConcat`;
//! - Sigmoid -> Q: `com.microsoft.QLinearSigmoid`.
//!
//! Anything else keeps its DequantizeLinear/QuantizeLinear boundary and
//! runs in float ([`float_ops`] lists what is left).
//!
//! With `ops=onnx` only operators of the ONNX standard are written, for
//! runtimes without the `com.microsoft` ones (tract): Gemm becomes a 1x1
//! `QLinearConv` between Reshapes, or `MatMulInteger` + int32 bias + an
//! int32 DequantizeLinear for a float output; the `com.microsoft` rules
//! do not apply.

use crate::{util, Pass, PassContext};
use qgraph_ir::{AttrValue, DataType, Graph, Model, NewNode, NodeId, Tensor, ValueId};

pub struct LowerToInteger {
    /// Only operators of the ONNX standard (QLinearConv, QLinearMatMul,
    /// MatMulInteger), for runtimes without ONNX Runtime's `com.microsoft`
    /// ones; what has no standard integer form keeps its Q/DQ boundary.
    pub standard_only: bool,
}

/// A DequantizeLinear feeding a value: its integer input, scale and zero
/// point.
#[derive(Clone, Copy)]
struct Dequantized {
    integer: ValueId,
    scale: ValueId,
    zero: Option<ValueId>,
}

fn f32s(g: &Graph, v: ValueId) -> Option<Vec<f32>> {
    match util::constant(g, Some(v))? {
        Tensor::F32(a) => Some(a.iter().copied().collect()),
        _ => None,
    }
}

fn ints(g: &Graph, v: ValueId) -> Option<Vec<i64>> {
    match util::constant(g, Some(v))? {
        Tensor::I8(a) => Some(a.iter().map(|&x| x as i64).collect()),
        Tensor::U8(a) => Some(a.iter().map(|&x| x as i64).collect()),
        Tensor::I32(a) => Some(a.iter().map(|&x| x as i64).collect()),
        _ => None,
    }
}

/// `v` as the output of a default-domain DequantizeLinear with constant
/// parameters; `per_tensor` asks for scalar ones.
fn dequantized(g: &Graph, v: ValueId, per_tensor: bool) -> Option<Dequantized> {
    let (d, _) = g.producer(v)?;
    let node = g.node(d);
    if !node.domain.is_empty() || node.op_type != "DequantizeLinear" {
        return None;
    }
    if node.attr("block_size").is_some() {
        return None;
    }
    let integer = node.inputs().first().copied().flatten()?;
    let scale = node.inputs().get(1).copied().flatten()?;
    let zero = node.inputs().get(2).copied().flatten();
    let s = f32s(g, scale)?;
    let z_ok = zero.is_none_or(|z| ints(g, z).is_some_and(|z| !per_tensor || z.len() == 1));
    (z_ok && (!per_tensor || s.len() == 1)).then_some(Dequantized {
        integer,
        scale,
        zero,
    })
}

/// The one per-tensor QuantizeLinear reading `v` (alone), with the value it
/// defines.
fn sole_quantize(g: &Graph, v: ValueId) -> Option<(NodeId, Dequantized, ValueId)> {
    if g.value(v).is_graph_output() {
        return None;
    }
    let [(q, 0)] = g.consumers(v)[..] else {
        return None;
    };
    let node = g.node(q);
    if !node.domain.is_empty() || node.op_type != "QuantizeLinear" {
        return None;
    }
    let scale = node.inputs().get(1).copied().flatten()?;
    let zero = node.inputs().get(2).copied().flatten();
    let out = node.outputs().first().copied().flatten()?;
    (f32s(g, scale)?.len() == 1 && zero.is_none_or(|z| ints(g, z).is_some_and(|z| z.len() == 1)))
        .then_some((
            q,
            Dequantized {
                integer: out,
                scale,
                zero,
            },
            out,
        ))
}

/// The node reading `v` alone, when it is a Relu or a Clip with constant
/// bounds, and its bounds.
fn sole_activation(g: &Graph, v: ValueId, opset: i64) -> Option<(NodeId, f32, f32)> {
    if g.value(v).is_graph_output() {
        return None;
    }
    let [(a, 0)] = g.consumers(v)[..] else {
        return None;
    };
    let node = g.node(a);
    if !node.domain.is_empty() {
        return None;
    }
    match node.op_type.as_str() {
        "Relu" => Some((a, 0.0, f32::INFINITY)),
        "Clip" if opset < 11 => {
            let attr = |name, default| match node.attr(name) {
                Some(AttrValue::Float(v)) => *v,
                _ => default,
            };
            Some((
                a,
                attr("min", f32::NEG_INFINITY),
                attr("max", f32::INFINITY),
            ))
        }
        "Clip" => {
            let bound = |k: usize, default: f32| match node.inputs().get(k).copied().flatten() {
                None => Some(default),
                Some(b) => f32s(g, b).filter(|v| v.len() == 1).map(|v| v[0]),
            };
            Some((a, bound(1, f32::NEG_INFINITY)?, bound(2, f32::INFINITY)?))
        }
        _ => None,
    }
}

/// The integer type of a quantized value (its zero point's, else uint8).
fn int_type(g: &Graph, d: &Dequantized) -> DataType {
    d.zero
        .and_then(|z| util::constant(g, Some(z)))
        .map_or(DataType::U8, Tensor::dtype)
}

/// What a rule found: the nodes it replaces and the new ones' recipe.
struct Lowering {
    /// Nodes to remove (the float op, its activation, its QuantizeLinear).
    remove: Vec<NodeId>,
    /// The value the integer op (or the last of `post`) defines: the
    /// QuantizeLinear's output, or the float op's output when nothing
    /// quantizes it.
    output: ValueId,
    op: &'static str,
    domain: &'static str,
    inputs: Vec<Input>,
    attrs: Vec<(String, AttrValue)>,
    /// An input reshaped before the op: its index and the new shape.
    reshape_input: Option<(usize, Vec<i64>)>,
    /// What follows the op, in order.
    post: Vec<Post>,
}

/// A step after the integer op.
enum Post {
    /// An integer Clip: (low, high) on the output grid, of the grid's type.
    Clip(i64, i64, DataType),
    /// An Add of a value of the output's type (a bias).
    Add(Input),
    /// A Reshape to this shape (0 keeps a dimension).
    Reshape(Vec<i64>),
    /// A DequantizeLinear of an int32 output by this scale, per column
    /// (axis 1) when it has more than one element.
    Dequantize(Input),
}

/// An input of the new op: an existing value, a zero point to create (an
/// absent one), or a new initializer.
enum Input {
    Value(ValueId),
    Absent,
    New(String, Tensor),
}

fn zero_or_new(d: &Dequantized, g: &Graph) -> Input {
    match d.zero {
        Some(z) => Input::Value(z),
        None => Input::New(
            format!("{}_zero_point", g.value(d.integer).name()),
            Tensor::from_ints(DataType::U8, &[], &[0]).expect("a scalar"),
        ),
    }
}

fn triple(d: &Dequantized, g: &Graph) -> [Input; 3] {
    [
        Input::Value(d.integer),
        Input::Value(d.scale),
        zero_or_new(d, g),
    ]
}

/// The bias of a weighted op as int32 on the grid of `x_scale * w_scale`:
/// an int32 DequantizeLinear of that scale as it is; a float bias rounded
/// onto it.
fn int32_bias(g: &Graph, bias: Option<ValueId>, step: &[f32], n: usize) -> Option<Input> {
    let b = match bias {
        None => return Some(Input::Absent),
        Some(b) => b,
    };
    let step_of = |c: usize| step[if step.len() == 1 { 0 } else { c }];
    let values: Vec<f64> = match dequantized(g, b, false) {
        Some(d) => {
            let q = ints(g, d.integer)?;
            let s = f32s(g, d.scale)?;
            let z = d.zero.map_or(Some(vec![0]), |z| ints(g, z))?;
            let pick = |v: &[f32], c| v[if v.len() == 1 { 0 } else { c }];
            let same_grid = z.iter().all(|&z| z == 0)
                && (0..q.len()).all(|c| pick(&s, c) == step_of(c))
                && matches!(util::constant(g, Some(d.integer)), Some(Tensor::I32(_)));
            if same_grid && q.len() == n {
                return Some(Input::Value(d.integer));
            }
            (0..q.len())
                .map(|c| (q[c] - z[if z.len() == 1 { 0 } else { c }]) as f64 * pick(&s, c) as f64)
                .collect()
        }
        None => f32s(g, b)?.into_iter().map(|v| v as f64).collect(),
    };
    if values.len() != n && values.len() != 1 {
        return None;
    }
    let q: Vec<i128> = (0..n)
        .map(|c| {
            let v = values[if values.len() == 1 { 0 } else { c }];
            (v / step_of(c) as f64)
                .round_ties_even()
                .clamp(i32::MIN as f64, i32::MAX as f64) as i128
        })
        .collect();
    let t = Tensor::from_ints(DataType::I32, &[n], &q).ok()?;
    Some(Input::New(format!("{}_int32", g.value(b).name()), t))
}

/// The integer bounds of an activation on the output grid, when they cut
/// into it (`None`: the grid's own saturation clamps the same).
fn clip_on_grid(
    g: &Graph,
    out: &Dequantized,
    lo: f32,
    hi: f32,
) -> Option<Option<(i64, i64, DataType)>> {
    let s = f32s(g, out.scale)?[0];
    let z = out.zero.map_or(Some(vec![0]), |z| ints(g, z))?[0];
    let (qmin, qmax) = match int_type(g, out) {
        DataType::I8 => (-128i64, 127i64),
        DataType::U8 => (0, 255),
        _ => return None,
    };
    let q = |v: f32| -> i64 {
        if v == f32::INFINITY {
            qmax
        } else if v == f32::NEG_INFINITY {
            qmin
        } else {
            ((v / s).round_ties_even() as i64 + z).clamp(qmin, qmax)
        }
    };
    let (a, b) = (q(lo), q(hi));
    Some((a > qmin || b < qmax).then_some((a, b, int_type(g, out))))
}

fn copied_attrs(g: &Graph, n: NodeId) -> Vec<(String, AttrValue)> {
    g.node(n)
        .attrs
        .iter()
        .map(|a| (a.name.clone(), a.value.clone()))
        .collect()
}

fn match_node(g: &Graph, n: NodeId, opset: i64, standard_only: bool) -> Option<Lowering> {
    let node = g.node(n);
    if !node.domain.is_empty() {
        return None;
    }
    let input = |k: usize| node.inputs().get(k).copied().flatten();
    let out = node.outputs().first().copied().flatten()?;
    if node.outputs().len() != 1 {
        return None;
    }
    match node.op_type.as_str() {
        "Conv" => {
            let x = dequantized(g, input(0)?, true)?;
            let w = dequantized(g, input(1)?, false)?;
            let m = util::constant(g, Some(w.integer))?
                .shape()
                .first()
                .copied()?;
            let (activation, quantized) = match sole_quantize(g, out) {
                Some(q) => (None, q),
                None => {
                    let (a, lo, hi) = sole_activation(g, out, opset)?;
                    let a_out = g.node(a).outputs().first().copied().flatten()?;
                    (Some((a, lo, hi)), sole_quantize(g, a_out)?)
                }
            };
            let (q, y, y_value) = quantized;
            let xs = f32s(g, x.scale)?[0];
            let ws = f32s(g, w.scale)?;
            let step: Vec<f32> = ws.iter().map(|w| xs * w).collect();
            let bias = int32_bias(g, input(2), &step, m)?;
            let clip = match activation {
                Some((_, lo, hi)) => clip_on_grid(g, &y, lo, hi)?,
                None => None,
            };
            // Clip takes integers from opset 12: before it, such a group
            // keeps its float activation.
            if clip.is_some() && opset < 12 {
                return None;
            }
            let [xi, xsc, xz] = triple(&x, g);
            let [wi, wsc, wz] = triple(&w, g);
            let mut remove = vec![n, q];
            remove.extend(activation.map(|a| a.0));
            Some(Lowering {
                remove,
                output: y_value,
                op: "QLinearConv",
                domain: "",
                inputs: vec![
                    xi,
                    xsc,
                    xz,
                    wi,
                    wsc,
                    wz,
                    Input::Value(y.scale),
                    zero_or_new(&y, g),
                    bias,
                ],
                attrs: copied_attrs(g, n),
                reshape_input: None,
                post: clip
                    .map(|(lo, hi, t)| Post::Clip(lo, hi, t))
                    .into_iter()
                    .collect(),
            })
        }
        "Gemm" if standard_only => gemm_as_standard_ops(g, n, opset),
        "Gemm" => gemm_as_qgemm(g, n, opset),
        "MatMul" => {
            let a = dequantized(g, input(0)?, true)?;
            let b = dequantized(g, input(1)?, false)?;
            if util::constant(g, Some(b.integer))?.shape().len() != 2 {
                return None;
            }
            let (q, y, y_value) = sole_quantize(g, out)?;
            let [ai, asc, az] = triple(&a, g);
            let [bi, bsc, bz] = triple(&b, g);
            Some(Lowering {
                remove: vec![n, q],
                output: y_value,
                op: "QLinearMatMul",
                domain: "",
                inputs: vec![
                    ai,
                    asc,
                    az,
                    bi,
                    bsc,
                    bz,
                    Input::Value(y.scale),
                    zero_or_new(&y, g),
                ],
                attrs: Vec::new(),
                reshape_input: None,
                post: Vec::new(),
            })
        }
        // No standard ONNX operator computes these on integers.
        "Add" | "Mul" | "GlobalAveragePool" | "Sigmoid" | "Concat" if standard_only => None,
        "Add" | "Mul" | "GlobalAveragePool" | "Sigmoid" | "Concat" => {
            let (q, y, y_value) = sole_quantize(g, out)?;
            let data: Vec<Dequantized> = node
                .inputs()
                .iter()
                .map(|v| dequantized(g, (*v)?, true))
                .collect::<Option<_>>()?;
            let (op, mut inputs, attrs) = match node.op_type.as_str() {
                "Add" | "Mul" if data.len() == 2 => {
                    let [a0, a1, a2] = triple(&data[0], g);
                    let [b0, b1, b2] = triple(&data[1], g);
                    let op = if node.op_type == "Add" {
                        "QLinearAdd"
                    } else {
                        "QLinearMul"
                    };
                    (op, vec![a0, a1, a2, b0, b1, b2], Vec::new())
                }
                "GlobalAveragePool" | "Sigmoid" if data.len() == 1 => {
                    let op = if node.op_type == "Sigmoid" {
                        "QLinearSigmoid"
                    } else {
                        "QLinearGlobalAveragePool"
                    };
                    let attrs = if op == "QLinearGlobalAveragePool" {
                        vec![("channels_last".to_string(), AttrValue::Int(0))]
                    } else {
                        Vec::new()
                    };
                    (op, triple(&data[0], g).into_iter().collect(), attrs)
                }
                "Concat" if !data.is_empty() => {
                    let mut inputs = vec![Input::Value(y.scale), zero_or_new(&y, g)];
                    for d in &data {
                        inputs.extend(triple(d, g));
                    }
                    ("QLinearConcat", inputs, copied_attrs(g, n))
                }
                _ => return None,
            };
            if op != "QLinearConcat" {
                inputs.push(Input::Value(y.scale));
                inputs.push(zero_or_new(&y, g));
            }
            // 8-bit inputs of one signedness, as ONNX Runtime's kernels take.
            let types: Vec<DataType> = data.iter().map(|d| int_type(g, d)).collect();
            if types.iter().any(|t| *t != int_type(g, &y)) {
                return None;
            }
            Some(Lowering {
                remove: vec![n, q],
                output: y_value,
                op,
                domain: "com.microsoft",
                inputs,
                attrs,
                reshape_input: None,
                post: Vec::new(),
            })
        }
        _ => None,
    }
}

/// A Gemm the integer rules lower: `A B (+ C)` (no transA, alpha and beta
/// both one) with a per-tensor dequantized A and a dequantized constant B,
/// per tensor or per output column; its output quantized after an optional
/// activation (folded as for Conv), or float.
struct GemmGroup {
    trans_b: bool,
    a: Dequantized,
    b: Dequantized,
    /// Output columns.
    columns: usize,
    bias: Option<ValueId>,
    /// `x_scale * w_scale`: one, or one per column.
    step: Vec<f32>,
    /// The Gemm's own output.
    out: ValueId,
    activation: Option<NodeId>,
    /// The QuantizeLinear of the output, its parameters and its output.
    quantized: Option<(NodeId, Dequantized, ValueId)>,
    clip: Option<(i64, i64, DataType)>,
}

fn match_gemm(g: &Graph, n: NodeId, opset: i64) -> Option<GemmGroup> {
    let node = g.node(n);
    let input = |k: usize| node.inputs().get(k).copied().flatten();
    let out = node.outputs().first().copied().flatten()?;
    let int = |name, default| match node.attr(name) {
        Some(AttrValue::Int(v)) => *v,
        _ => default,
    };
    let float = |name| match node.attr(name) {
        Some(AttrValue::Float(v)) => *v,
        _ => 1.0,
    };
    if int("transA", 0) != 0 || float("alpha") != 1.0 || float("beta") != 1.0 {
        return None;
    }
    let trans_b = int("transB", 0) != 0;
    let a = dequantized(g, input(0)?, true)?;
    let b = dequantized(g, input(1)?, false)?;
    let shape = util::constant(g, Some(b.integer))?.shape().to_vec();
    if shape.len() != 2 {
        return None;
    }
    let columns = if trans_b { shape[0] } else { shape[1] };
    // Per-channel weights must be per output column.
    let ws = f32s(g, b.scale)?;
    let axis = match g.node(g.producer(input(1)?)?.0).attr("axis") {
        Some(AttrValue::Int(a)) => *a,
        _ => 1,
    };
    if ws.len() != 1 && axis != if trans_b { 0 } else { 1 } {
        return None;
    }
    let xs = f32s(g, a.scale)?[0];
    let step: Vec<f32> = ws.iter().map(|w| xs * w).collect();
    let activated = sole_activation(g, out, opset).and_then(|(act, lo, hi)| {
        let act_out = g.node(act).outputs().first().copied().flatten()?;
        let q = sole_quantize(g, act_out)?;
        let clip = clip_on_grid(g, &q.1, lo, hi)?;
        (clip.is_none() || opset >= 12).then_some((act, q, clip))
    });
    let (activation, quantized, clip) = match activated {
        Some((act, q, clip)) => (Some(act), Some(q), clip),
        None => (None, sole_quantize(g, out), None),
    };
    Some(GemmGroup {
        trans_b,
        a,
        b,
        columns,
        bias: input(2),
        step,
        out,
        activation,
        quantized,
        clip,
    })
}

/// The int32 tensor a float Gemm output's bias already is, on the grid of
/// the sums (scale `step`, zero point 0): added to them exactly. Any other
/// bias stays float, added after the dequantization.
fn exact_int32_bias(g: &Graph, bias: ValueId, step: &[f32], columns: usize) -> Option<ValueId> {
    match int32_bias(g, Some(bias), step, columns)? {
        Input::Value(v) => Some(v),
        _ => None,
    }
}

/// Gemm as `com.microsoft.QGemm`.
fn gemm_as_qgemm(g: &Graph, n: NodeId, opset: i64) -> Option<Lowering> {
    let GemmGroup {
        trans_b,
        a,
        b,
        columns,
        bias,
        step,
        out,
        activation,
        quantized,
        clip,
    } = match_gemm(g, n, opset)?;
    // A float output keeps a float bias exactly, added after; a quantized
    // one takes it as int32.
    let (bias, float_bias) = match (bias, &quantized) {
        (Some(b), None) if exact_int32_bias(g, b, &step, columns).is_none() => {
            (Input::Absent, Some(b))
        }
        (b, _) => (int32_bias(g, b, &step, columns)?, None),
    };
    let [ai, asc, az] = triple(&a, g);
    let [bi, bsc, bz] = triple(&b, g);
    let mut inputs = vec![ai, asc, az, bi, bsc, bz, bias];
    let (mut remove, output) = match quantized {
        Some((q, y, y_value)) => {
            inputs.push(Input::Value(y.scale));
            inputs.push(zero_or_new(&y, g));
            (vec![n, q], y_value)
        }
        None => (vec![n], out),
    };
    remove.extend(activation);
    Some(Lowering {
        remove,
        output,
        op: "QGemm",
        domain: "com.microsoft",
        inputs,
        attrs: vec![("transB".into(), AttrValue::Int(trans_b as i64))],
        reshape_input: None,
        post: clip
            .map(|(lo, hi, t)| Post::Clip(lo, hi, t))
            .into_iter()
            .chain(float_bias.map(|b| Post::Add(Input::Value(b))))
            .collect(),
    })
}

/// A 2-D integer tensor, transposed when `transpose`, as a tensor of its
/// type with `shape` (as many elements).
fn ints_as(t: &Tensor, transpose: bool, shape: &[usize]) -> Option<Tensor> {
    let (r, c) = (t.shape()[0], t.shape()[1]);
    let v = t.to_f64_vec()?;
    let values: Vec<i128> = if transpose {
        // Element (j, i) of the r x c input lands at j * r + i.
        (0..r * c).map(|o| v[(o % r) * c + o / r] as i128).collect()
    } else {
        v.iter().map(|&x| x as i128).collect()
    };
    Tensor::from_ints(t.dtype(), shape, &values).ok()
}

/// Gemm in operators of the ONNX standard alone (for runtimes without
/// ONNX Runtime's `com.microsoft` ops, such as tract). A quantized output
/// becomes a 1x1 `QLinearConv` on the input reshaped to `[N, K, 1, 1]`
/// (it takes the int32 bias and per-channel weight scales QLinearMatMul
/// lacks), reshaped back; a float output becomes `MatMulInteger`, the int32
/// bias added, and a DequantizeLinear of the int32 sums by `x_scale *
/// w_scale` per column.
fn gemm_as_standard_ops(g: &Graph, n: NodeId, opset: i64) -> Option<Lowering> {
    let GemmGroup {
        trans_b,
        a,
        b,
        columns: m,
        bias,
        step,
        out,
        activation,
        quantized,
        clip,
    } = match_gemm(g, n, opset)?;
    if step.len() != 1 && step.len() != m {
        return None;
    }
    let weight = util::constant(g, Some(b.integer))?;
    let k = weight.shape()[if trans_b { 1 } else { 0 }];
    let base = g.value(b.integer).name().to_string();
    let [ai, asc, az] = triple(&a, g);
    let weight_zero = zero_or_new(&b, g);
    match quantized {
        Some((q, y, y_value)) => {
            let bias = int32_bias(g, bias, &step, m)?;
            let kernel = ints_as(weight, !trans_b, &[m, k, 1, 1])?;
            let mut remove = vec![n, q];
            remove.extend(activation);
            let mut post: Vec<Post> = clip
                .map(|(lo, hi, t)| Post::Clip(lo, hi, t))
                .into_iter()
                .collect();
            post.push(Post::Reshape(vec![0, m as i64]));
            Some(Lowering {
                remove,
                output: y_value,
                op: "QLinearConv",
                domain: "",
                inputs: vec![
                    ai,
                    asc,
                    az,
                    Input::New(format!("{base}_1x1"), kernel),
                    Input::Value(b.scale),
                    weight_zero,
                    Input::Value(y.scale),
                    zero_or_new(&y, g),
                    bias,
                ],
                attrs: Vec::new(),
                reshape_input: Some((0, vec![0, k as i64, 1, 1])),
                post,
            })
        }
        None => {
            // Per-column scales need DequantizeLinear's axis (opset 13).
            if step.len() > 1 && opset < 13 {
                return None;
            }
            let columns = ints_as(weight, trans_b, &[k, m])?;
            let mut post = Vec::new();
            // An int32 bias on the sums' grid is added exactly; any other
            // stays float, added after.
            let exact = bias.and_then(|b| exact_int32_bias(g, b, &step, m));
            if let Some(bias) = exact {
                post.push(Post::Add(Input::Value(bias)));
            }
            let scale_shape: &[usize] = if step.len() == 1 { &[] } else { &[m] };
            let scale = Tensor::f32(scale_shape, step.clone()).ok()?;
            post.push(Post::Dequantize(Input::New(
                format!("{base}_sum_scale"),
                scale,
            )));
            if let (Some(b), None) = (bias, exact) {
                post.push(Post::Add(Input::Value(b)));
            }
            Some(Lowering {
                remove: vec![n],
                output: out,
                op: "MatMulInteger",
                domain: "",
                inputs: vec![
                    ai,
                    Input::New(format!("{base}_columns"), columns),
                    az,
                    weight_zero,
                ],
                attrs: Vec::new(),
                reshape_input: None,
                post,
            })
        }
    }
}

/// Applies one lowering.
fn apply(g: &mut Graph, lowering: Lowering) -> Result<(), String> {
    let err = |e: qgraph_ir::IrError| e.to_string();
    let first = lowering.remove[0];
    let name = g.node(first).name().to_string();
    // Removing the group leaves its inner values unproduced and unread.
    let mut inner: Vec<ValueId> = Vec::new();
    for &n in &lowering.remove {
        for v in g.node(n).outputs().iter().flatten() {
            if *v != lowering.output {
                inner.push(*v);
            }
        }
    }
    for &n in &lowering.remove {
        g.remove_node(n).map_err(err)?;
    }
    for v in inner {
        if g.consumers(v).is_empty() && !g.value(v).is_graph_output() {
            g.remove_value(v).map_err(err)?;
        }
    }
    let mut inputs: Vec<Option<ValueId>> = Vec::new();
    for i in lowering.inputs {
        inputs.push(resolve(g, i)?);
    }
    while inputs.last() == Some(&None) {
        inputs.pop();
    }
    if let Some((k, shape)) = lowering.reshape_input {
        let source = inputs[k].ok_or("a reshaped input is absent")?;
        inputs[k] = Some(reshape(g, &name, source, shape, None)?);
    }
    // The op, then each step after it; the last defines the group's output.
    let steps = lowering.post.len();
    let mut current = if steps == 0 {
        lowering.output
    } else {
        g.add_value(g.unique_value_name(&format!("{name}_integer")), None)
            .map_err(err)?
    };
    let mut new = NewNode::new(lowering.op)
        .named(g.unique_node_name(&format!("{name}_{}", lowering.op)))
        .domain(lowering.domain)
        .outputs([current]);
    new.inputs = inputs;
    for (k, v) in lowering.attrs {
        new = new.attr(k, v);
    }
    g.add_node(new).map_err(err)?;
    for (i, step) in lowering.post.into_iter().enumerate() {
        let last = i + 1 == steps;
        let out = if last {
            lowering.output
        } else {
            g.add_value(g.unique_value_name(&format!("{name}_step{i}")), None)
                .map_err(err)?
        };
        match step {
            Post::Clip(lo, hi, dtype) => {
                let bound = |g: &mut Graph, v: i64, what: &str| {
                    let t =
                        Tensor::from_ints(dtype, &[], &[v as i128]).map_err(|e| e.to_string())?;
                    g.add_initializer(g.unique_value_name(&format!("{name}_{what}")), t)
                        .map_err(err)
                };
                let lo = bound(g, lo, "clip_min")?;
                let hi = bound(g, hi, "clip_max")?;
                g.add_node(
                    NewNode::new("Clip")
                        .named(g.unique_node_name(&format!("{name}_Clip")))
                        .inputs([current, lo, hi])
                        .outputs([out]),
                )
                .map_err(err)?;
            }
            Post::Add(value) => {
                let value = resolve(g, value)?.ok_or("an absent addend")?;
                g.add_node(
                    NewNode::new("Add")
                        .named(g.unique_node_name(&format!("{name}_bias")))
                        .inputs([current, value])
                        .outputs([out]),
                )
                .map_err(err)?;
            }
            Post::Reshape(shape) => {
                reshape(g, &name, current, shape, Some(out))?;
            }
            Post::Dequantize(scale) => {
                let scale = resolve(g, scale)?.ok_or("an absent scale")?;
                let per_column = util::constant(g, Some(scale)).is_some_and(|t| t.len() > 1);
                let mut dq = NewNode::new("DequantizeLinear")
                    .named(g.unique_node_name(&format!("{name}_DequantizeLinear")))
                    .inputs([current, scale])
                    .outputs([out]);
                if per_column {
                    dq = dq.attr("axis", AttrValue::Int(1));
                }
                g.add_node(dq).map_err(err)?;
            }
        }
        current = out;
    }
    Ok(())
}

/// An input of a new node as a value: an existing one, none, or a new
/// initializer.
fn resolve(g: &mut Graph, input: Input) -> Result<Option<ValueId>, String> {
    Ok(match input {
        Input::Value(v) => Some(v),
        Input::Absent => None,
        Input::New(base, t) => Some(
            g.add_initializer(g.unique_value_name(&base), t)
                .map_err(|e| e.to_string())?,
        ),
    })
}

/// A Reshape of `source` to `shape` (0 keeps a dimension) into `out`, or
/// into a new value; returns the reshaped value.
fn reshape(
    g: &mut Graph,
    name: &str,
    source: ValueId,
    shape: Vec<i64>,
    out: Option<ValueId>,
) -> Result<ValueId, String> {
    let err = |e: qgraph_ir::IrError| e.to_string();
    let shape = g
        .add_initializer(
            g.unique_value_name(&format!("{name}_shape")),
            Tensor::i64_vector(shape),
        )
        .map_err(err)?;
    let out = match out {
        Some(v) => v,
        None => g
            .add_value(g.unique_value_name(&format!("{name}_reshaped")), None)
            .map_err(err)?,
    };
    g.add_node(
        NewNode::new("Reshape")
            .named(g.unique_node_name(&format!("{name}_Reshape")))
            .inputs([source, shape])
            .outputs([out]),
    )
    .map_err(err)?;
    Ok(out)
}

impl Pass for LowerToInteger {
    fn name(&self) -> &'static str {
        "lower-to-integer"
    }

    fn run(&self, model: &mut Model, cx: &mut PassContext) -> Result<bool, String> {
        let opset = model.opset_version("").unwrap_or(1);
        let mut changed = false;
        let mut microsoft = false;
        for n in util::order(&model.graph)? {
            let g = &model.graph;
            if !g.contains_node(n) {
                continue;
            }
            let Some(lowering) = match_node(g, n, opset, self.standard_only) else {
                continue;
            };
            if !cx.allow_rewrite() {
                break;
            }
            microsoft |= lowering.domain == "com.microsoft";
            apply(&mut model.graph, lowering)?;
            changed = true;
        }
        if microsoft && model.opset_version("com.microsoft").is_none() {
            model.set_opset_version("com.microsoft", 1);
        }
        Ok(changed)
    }
}

/// The ops of a lowered graph that still compute in float between a
/// DequantizeLinear and a QuantizeLinear, by type, with counts.
pub fn float_ops(g: &Graph) -> Vec<(String, usize)> {
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for n in g.node_ids() {
        let node = g.node(n);
        if matches!(node.op_type.as_str(), "QuantizeLinear" | "DequantizeLinear") {
            continue;
        }
        let reads_dequantized = node.inputs().iter().flatten().any(|&v| {
            g.producer(v)
                .is_some_and(|(p, _)| g.node(p).op_type == "DequantizeLinear")
        });
        if reads_dequantized {
            *counts.entry(node.op_type.clone()).or_default() += 1;
        }
    }
    counts.into_iter().collect()
}
