//! Running a batch as groups of samples. When every operator of a graph
//! computes each sample (index of the first dim) from that sample alone, a
//! batch can run as independent groups, one per thread, each through the
//! whole graph: a group's activations stay in cache from layer to layer,
//! and the threads never wait for each other between operators. Layer by
//! layer over the whole batch, each activation of a large model goes to
//! memory and back.
//!
//! The test is conservative: an operator is per-sample only when its
//! attributes and constant inputs show that it never reads or moves data
//! across the first dim; anything else (Shape, a Reshape that folds the
//! batch, a reduction over dim 0, an operator not listed) keeps whole
//! batches.

use crate::ops::concatenate_tensors;
use crate::shapes::{int_attr, ints_attr, Info};
use crate::{EvalError, Inputs};
use qgraph_ir::ndarray::Axis;
use qgraph_ir::{AttrValue, Dim, Graph, NodeId, Tensor, ValueId};
use std::collections::{HashMap, HashSet};

/// Input values per group (about 1 MiB of f32): a sample at least this
/// large runs on its own; smaller ones run together, so that a small
/// model keeps the efficiency of its batched matrix products.
const GROUP_INPUT_VALUES: usize = 1 << 18;

/// The samples per group for inputs of `per_sample` values each.
pub(crate) fn group_size(per_sample: usize) -> usize {
    (GROUP_INPUT_VALUES / per_sample.max(1)).max(1)
}

/// Whether every graph output is computed from its own sample alone.
pub(crate) fn independent(g: &Graph, opset: i64, info: &HashMap<ValueId, Info>) -> bool {
    let Ok(order) = g.topo_order() else {
        return false;
    };
    let mut batched: HashSet<ValueId> = g
        .inputs()
        .iter()
        .copied()
        .filter(|&v| g.value(v).initializer().is_none())
        .collect();
    if batched.is_empty() {
        return false;
    }
    // Small integer tensors computed from a batched value's shape: for each
    // element, whether it is the batch size (see `SizeFlags`).
    let mut sizes: HashMap<ValueId, SizeFlags> = HashMap::new();
    for n in order {
        let node = g.node(n);
        let reads_sizes = node
            .inputs()
            .iter()
            .flatten()
            .any(|v| sizes.contains_key(v));
        let shape_of_batch = node.op_type == "Shape"
            && node
                .inputs()
                .first()
                .copied()
                .flatten()
                .is_some_and(|v| batched.contains(&v));
        if reads_sizes || shape_of_batch {
            match size_node(g, n, &batched, &sizes, info) {
                Some(SizeUse::Sizes(flags)) => {
                    let Some(out) = node.outputs().first().copied().flatten() else {
                        return false;
                    };
                    sizes.insert(out, flags);
                }
                Some(SizeUse::Batched) => batched.extend(node.outputs().iter().flatten().copied()),
                None => return false,
            }
            continue;
        }
        let reads_batch = node.inputs().iter().flatten().any(|v| batched.contains(v));
        if !reads_batch {
            // Computed from constants only: the same for every sample.
            continue;
        }
        if !per_sample_node(g, opset, n, &batched, info) {
            return false;
        }
        batched.extend(node.outputs().iter().flatten().copied());
    }
    g.outputs().iter().all(|v| batched.contains(v))
}

/// For a small integer tensor computed from a batched value's shape: per
/// element, whether it is the batch size (the rest are sizes of one
/// sample, the same for a group as for the whole batch); `scalar` when it
/// has rank 0.
#[derive(Clone)]
struct SizeFlags {
    batch: Vec<bool>,
    scalar: bool,
}

enum SizeUse {
    /// The output is another such tensor.
    Sizes(SizeFlags),
    /// The output is batched data, computed per sample.
    Batched,
}

/// How a node uses sizes read from a batched value; `None` when it does
/// something with them that a group of samples would get wrong (arithmetic
/// on the batch size, a Reshape that folds the batch, any op not listed).
/// This follows the common export of `x.view(x.size(0), -1)`: Shape,
/// Gather, Unsqueeze, Concat, Reshape.
fn size_node(
    g: &Graph,
    n: NodeId,
    batched: &HashSet<ValueId>,
    sizes: &HashMap<ValueId, SizeFlags>,
    info: &HashMap<ValueId, Info>,
) -> Option<SizeUse> {
    let node = g.node(n);
    let inputs = node.inputs();
    let first = inputs.first().copied().flatten()?;
    let vector = |batch: Vec<bool>| SizeFlags {
        batch,
        scalar: false,
    };
    match node.op_type.as_str() {
        "Shape" => {
            let r = rank(info, first)? as i64;
            let clamp = |x: i64| (if x < 0 { x + r } else { x }).clamp(0, r) as usize;
            let start = clamp(int_attr(g, n, "start").unwrap_or(0));
            let end = clamp(int_attr(g, n, "end").unwrap_or(r));
            let flags: Vec<bool> = (0..r as usize).map(|d| d == 0).collect();
            Some(SizeUse::Sizes(vector(flags.get(start..end)?.to_vec())))
        }
        "Gather" => {
            let data = sizes.get(&first)?;
            let indices = constant(g, inputs.get(1).copied().flatten()?)?;
            if int_attr(g, n, "axis").unwrap_or(0) != 0 || data.scalar {
                return None;
            }
            let len = data.batch.len() as i64;
            let pick = |i: i64| {
                let i = if i < 0 { i + len } else { i };
                data.batch.get(usize::try_from(i).ok()?).copied()
            };
            let picked: Option<Vec<bool>> = integers(indices)?.into_iter().map(pick).collect();
            Some(SizeUse::Sizes(SizeFlags {
                batch: picked?,
                scalar: indices.shape().is_empty(),
            }))
        }
        "Unsqueeze" => {
            let data = sizes.get(&first)?;
            (data.scalar && axes(g, n, 1)? == [0])
                .then(|| SizeUse::Sizes(vector(data.batch.clone())))
        }
        "Cast" => Some(SizeUse::Sizes(sizes.get(&first)?.clone())),
        "Concat" => {
            if int_attr(g, n, "axis").unwrap_or(0) != 0 {
                return None;
            }
            let mut flags = Vec::new();
            for v in inputs.iter().flatten() {
                match sizes.get(v) {
                    Some(s) if !s.scalar => flags.extend(&s.batch),
                    Some(_) => return None,
                    None => {
                        let values = integers(constant(g, *v)?)?;
                        flags.extend(values.iter().map(|_| false));
                    }
                }
            }
            Some(SizeUse::Sizes(vector(flags)))
        }
        "Reshape" => {
            // Data reshaped to (batch size, sizes of one sample).
            let shape = sizes.get(&inputs.get(1).copied().flatten()?)?;
            let per_sample = batched.contains(&first)
                && !shape.scalar
                && shape.batch.first() == Some(&true)
                && !shape.batch[1..].contains(&true);
            per_sample.then_some(SizeUse::Batched)
        }
        _ => None,
    }
}

/// The tensor of a value every run gives the same: an initializer or a
/// Constant node's value.
fn constant(g: &Graph, v: ValueId) -> Option<&Tensor> {
    if let Some(init) = g.value(v).initializer() {
        return Some(&init.tensor);
    }
    let (p, _) = g.producer(v)?;
    let node = g.node(p);
    match (node.op_type.as_str(), node.attr("value")) {
        ("Constant", Some(AttrValue::Tensor(t))) => Some(t),
        _ => None,
    }
}

fn integers(t: &Tensor) -> Option<Vec<i64>> {
    match t {
        Tensor::I64(a) => Some(a.iter().copied().collect()),
        Tensor::I32(a) => Some(a.iter().map(|&x| x as i64).collect()),
        _ => None,
    }
}

/// The values of a small integer tensor, from the file or, when constants
/// compute it, from shape inference.
fn known_integers(g: &Graph, info: &HashMap<ValueId, Info>, v: ValueId) -> Option<Vec<i64>> {
    if let Some(t) = constant(g, v) {
        return integers(t);
    }
    info.get(&v)?.ints()
}

fn rank(info: &HashMap<ValueId, Info>, v: ValueId) -> Option<usize> {
    info.get(&v)?.dims.as_ref().map(Vec::len)
}

/// `axis` counted from the front in a tensor of `rank` dims.
fn normalized(axis: i64, rank: Option<usize>) -> Option<i64> {
    if axis >= 0 {
        Some(axis)
    } else {
        Some(axis + rank? as i64)
    }
}

/// Axes from an attribute or, in later opsets, a constant input.
fn axes(g: &Graph, n: NodeId, input: usize) -> Option<Vec<i64>> {
    ints_attr(g, n, "axes").or_else(|| {
        let v = g.node(n).inputs().get(input).copied().flatten()?;
        integers(constant(g, v)?)
    })
}

fn per_sample_node(
    g: &Graph,
    opset: i64,
    n: NodeId,
    batched: &HashSet<ValueId>,
    info: &HashMap<ValueId, Info>,
) -> bool {
    let node = g.node(n);
    let inputs = node.inputs();
    let first = inputs.first().copied().flatten();
    let first_batched = first.is_some_and(|v| batched.contains(&v));
    let first_rank = first.and_then(|v| rank(info, v));
    // Every input but the first is constant.
    let rest_constant = || inputs[1..].iter().flatten().all(|&v| !batched.contains(&v));
    let out_rank = node
        .outputs()
        .first()
        .copied()
        .flatten()
        .and_then(|v| rank(info, v));
    // A constant broadcast against batched operands must not have a first
    // dim of its own: a lower rank, or a first dim of 1.
    let broadcasts_per_sample = |operands: &[Option<ValueId>]| {
        operands.iter().flatten().all(|&v| {
            if batched.contains(&v) {
                return true;
            }
            // The same in every group; its shape from the file or from
            // shape inference.
            let shape: Option<Vec<Option<usize>>> = match constant(g, v) {
                Some(t) => Some(t.shape().iter().map(|&d| Some(d)).collect()),
                None => info.get(&v).and_then(|i| i.dims.as_ref()).map(|dims| {
                    dims.iter()
                        .map(|d| match d {
                            Dim::Known(k) if *k >= 0 => Some(*k as usize),
                            _ => None,
                        })
                        .collect()
                }),
            };
            match (shape, out_rank) {
                (Some(s), Some(r)) => s.len() < r || s.first() == Some(&Some(1)),
                (Some(s), None) => s.len() <= 1 && s.first().is_none_or(|&d| d == Some(1)),
                _ => false,
            }
        })
    };
    let not_axis_zero = |axis: i64| normalized(axis, first_rank).is_some_and(|a| a != 0);
    match node.op_type.as_str() {
        "Relu" | "LeakyRelu" | "Sigmoid" | "HardSigmoid" | "HardSwish" | "Tanh" | "Exp" | "Log"
        | "Sqrt" | "Abs" | "Neg" | "Erf" | "Softplus" | "Elu" | "Selu" | "Identity" | "Dropout"
        | "Cast" | "Floor" | "Ceil" | "Round" | "Reciprocal" | "Not" | "Sign" | "Clip" => {
            first_batched && broadcasts_per_sample(inputs)
        }
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Max" | "Min" | "Sum" | "Mean" | "Equal"
        | "Less" | "Greater" | "And" | "Or" | "Where" | "PRelu" => broadcasts_per_sample(inputs),
        "Conv"
        | "ConvTranspose"
        | "ConvInteger"
        | "QLinearConv"
        | "MaxPool"
        | "AveragePool"
        | "GlobalAveragePool"
        | "GlobalMaxPool"
        | "LpPool"
        | "InstanceNormalization"
        | "LRN"
        | "QLinearGlobalAveragePool"
        | "QLinearSigmoid"
        | "QLinearLeakyRelu" => first_batched && rest_constant(),
        "BatchNormalization" => {
            first_batched && rest_constant() && int_attr(g, n, "training_mode").unwrap_or(0) == 0
        }
        "QuantizeLinear" | "DequantizeLinear" => {
            let per_axis = inputs
                .get(1)
                .copied()
                .flatten()
                .and_then(|s| constant(g, s))
                .is_none_or(|s| s.len() > 1);
            first_batched
                && rest_constant()
                && (!per_axis || not_axis_zero(int_attr(g, n, "axis").unwrap_or(1)))
        }
        "QLinearAdd" | "QLinearMul" => {
            let operands = [
                inputs.first().copied().flatten(),
                inputs.get(3).copied().flatten(),
            ];
            let others = [1, 2, 4, 5, 6, 7].iter().all(|&i| {
                inputs
                    .get(i)
                    .copied()
                    .flatten()
                    .is_none_or(|v| !batched.contains(&v))
            });
            others && broadcasts_per_sample(&operands)
        }
        "Gemm" | "QGemm" => {
            first_batched && rest_constant() && int_attr(g, n, "transA").unwrap_or(0) == 0
        }
        "MatMul" | "MatMulInteger" | "QLinearMatMul" => {
            first_batched && rest_constant() && first_rank.is_some_and(|r| r >= 2)
        }
        "Flatten" => first_batched && not_axis_zero(int_attr(g, n, "axis").unwrap_or(1)),
        "Reshape" => {
            // A first dim copied (0) or inferred (-1, which then counts
            // whole rows of samples): per-sample results laid end to end
            // are the batch's.
            let shape = inputs
                .get(1)
                .copied()
                .flatten()
                .and_then(|v| constant(g, v));
            first_batched
                && shape
                    .and_then(integers)
                    .is_some_and(|s| s.len() >= 2 && (s[0] == 0 || s[0] == -1))
        }
        "Transpose" => {
            first_batched && ints_attr(g, n, "perm").is_some_and(|p| p.first() == Some(&0))
        }
        "Softmax" | "LogSoftmax" | "Hardmax" => {
            let default = if opset >= 13 { -1 } else { 1 };
            first_batched && not_axis_zero(int_attr(g, n, "axis").unwrap_or(default))
        }
        "Concat" | "QLinearConcat" => {
            let data: Vec<ValueId> = if node.op_type == "Concat" {
                inputs.iter().flatten().copied().collect()
            } else {
                // y_scale, y_zero_point, then (x, scale, zero point) triples.
                inputs
                    .iter()
                    .skip(2)
                    .step_by(3)
                    .flatten()
                    .copied()
                    .collect()
            };
            data.iter().all(|v| batched.contains(v))
                && normalized(int_attr(g, n, "axis").unwrap_or(0), out_rank).is_some_and(|a| a != 0)
        }
        "Split" => first_batched && not_axis_zero(int_attr(g, n, "axis").unwrap_or(0)),
        "Slice" => {
            let axes = if opset >= 10 {
                inputs
                    .get(3)
                    .copied()
                    .flatten()
                    .and_then(|v| constant(g, v))
                    .and_then(integers)
            } else {
                ints_attr(g, n, "axes")
            };
            first_batched
                && rest_constant()
                && axes.is_some_and(|a| a.iter().all(|&x| not_axis_zero(x)))
        }
        "Squeeze" => {
            first_batched && axes(g, n, 1).is_some_and(|a| a.iter().all(|&x| not_axis_zero(x)))
        }
        "Unsqueeze" => {
            first_batched
                && axes(g, n, 1).is_some_and(|a| {
                    a.iter()
                        .all(|&x| normalized(x, out_rank).is_some_and(|x| x != 0))
                })
        }
        "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" | "ReduceProd" | "ReduceL1"
        | "ReduceL2" | "ReduceLogSumExp" | "ReduceSumSquare" => {
            first_batched
                && axes(g, n, 1)
                    .is_some_and(|a| !a.is_empty() && a.iter().all(|&x| not_axis_zero(x)))
        }
        "Pad" => {
            let pads = ints_attr(g, n, "pads").or_else(|| {
                let v = inputs.get(1).copied().flatten()?;
                known_integers(g, info, v)
            });
            let axes_given = inputs.get(3).copied().flatten().is_some();
            first_batched
                && !axes_given
                && rest_constant()
                && pads.is_some_and(|p| {
                    let r = p.len() / 2;
                    r >= 1 && p[0] == 0 && p[r] == 0
                })
        }
        "Resize" | "Upsample" => {
            // Scales that keep the first dim; sizes name a batch size.
            let scales_at = if node.op_type == "Upsample" { 1 } else { 2 };
            let sizes_given =
                node.op_type == "Resize" && inputs.get(3).copied().flatten().is_some();
            let scales = inputs
                .get(scales_at)
                .copied()
                .flatten()
                .and_then(|v| constant(g, v))
                .and_then(|t| match t {
                    Tensor::F32(a) => a.iter().next().copied(),
                    _ => None,
                });
            first_batched && !sizes_given && rest_constant() && scales == Some(1.0)
        }
        "Gather" => {
            first_batched && rest_constant() && not_axis_zero(int_attr(g, n, "axis").unwrap_or(0))
        }
        _ => false,
    }
}

/// Splits each input into groups of `size` samples along the first dim;
/// `None` when there is nothing to split or the inputs disagree on it.
pub(crate) fn split(inputs: &Inputs, size: usize) -> Option<Vec<Inputs>> {
    let batch = *inputs.first()?.shape().first()?;
    if batch <= size || inputs.iter().any(|t| t.shape().first() != Some(&batch)) {
        return None;
    }
    let mut groups: Vec<Inputs> = (0..batch.div_ceil(size)).map(|_| Vec::new()).collect();
    for t in inputs {
        macro_rules! cut {
            ($variant:ident, $a:expr) => {
                for (group, part) in groups.iter_mut().zip($a.axis_chunks_iter(Axis(0), size)) {
                    group.push(Tensor::$variant(part.to_owned()));
                }
            };
        }
        match t {
            Tensor::F32(a) => cut!(F32, a),
            Tensor::F64(a) => cut!(F64, a),
            Tensor::I64(a) => cut!(I64, a),
            Tensor::I32(a) => cut!(I32, a),
            Tensor::I8(a) => cut!(I8, a),
            Tensor::U8(a) => cut!(U8, a),
            Tensor::Bool(a) => cut!(Bool, a),
            _ => return None,
        }
    }
    Some(groups)
}

/// The groups' outputs laid end to end along the first dim.
pub(crate) fn join(groups: Vec<Vec<Tensor>>) -> Result<Vec<Tensor>, EvalError> {
    let count = groups.first().map_or(0, Vec::len);
    (0..count)
        .map(|i| {
            let parts: Vec<&Tensor> = groups.iter().map(|g| &g[i]).collect();
            concatenate_tensors(&parts, 0)
                .map_err(|e| EvalError::Input(format!("output {i}: groups do not join: {e}")))
        })
        .collect()
}
