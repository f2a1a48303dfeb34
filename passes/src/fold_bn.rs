//! `fold-bn`: folds inference BatchNormalization, `y = x * s[c] + t[c]` with
//! `s = gamma / sqrt(var + eps)` and `t = beta - mean * s`, into the weighted
//! node before it: Conv and ConvTranspose (weights scaled per output
//! channel, bias `b * s + t`, created when missing), Gemm (columns of B, and
//! C), MatMul with a 2-D constant B and a 2-D output (columns of B, then an
//! Add of `t`). A BatchNormalization with nothing to fold into becomes
//! `Mul(x, s) + t` when the input's rank is known.
//!
//! Guards: the statistics are constant initializers (not graph inputs); the
//! weighted node's output is read only by the BatchNormalization and is no
//! graph output; its weights and bias are constant and read by it alone;
//! the BatchNormalization is in inference mode with its extra outputs
//! unused. The folded node takes over the BatchNormalization's output value,
//! so names (graph outputs included) stay. Arithmetic is in f64.

use crate::{Pass, PassContext};
use qgraph_ir::ndarray::{ArrayD, IxDyn};
use qgraph_ir::{AttrValue, Graph, Model, NewNode, NodeId, Tensor, ValueId, ValueType};

pub struct FoldBatchNorm;

/// The f32 tensor of a constant that is no graph input.
fn constant(g: &Graph, v: Option<ValueId>) -> Option<&ArrayD<f32>> {
    match crate::util::constant(g, v)? {
        Tensor::F32(a) => Some(a),
        _ => None,
    }
}

/// A constant read by `node` alone (so it may be rewritten in place).
fn own_constant(g: &Graph, node: NodeId, v: Option<ValueId>) -> Option<&ArrayD<f32>> {
    let a = constant(g, v)?;
    let v = v?;
    let only_here = g.consumers(v).iter().all(|&(n, _)| n == node) && !g.value(v).is_graph_output();
    only_here.then_some(a)
}

/// The per-channel scale and shift of an inference BatchNormalization.
fn affine(g: &Graph, bn: NodeId) -> Option<(Vec<f64>, Vec<f64>)> {
    let node = g.node(bn);
    if !node.domain.is_empty() || node.op_type != "BatchNormalization" {
        return None;
    }
    if matches!(node.attr("training_mode"), Some(AttrValue::Int(t)) if *t != 0) {
        return None;
    }
    if node
        .outputs()
        .iter()
        .skip(1)
        .flatten()
        .any(|&v| g.is_used(v) || g.value(v).is_graph_output())
    {
        return None;
    }
    node.outputs().first().copied().flatten()?;
    let eps = match node.attr("epsilon") {
        Some(AttrValue::Float(e)) => *e as f64,
        _ => 1e-5,
    };
    let p: Vec<Vec<f64>> = (1..5)
        .map(|i| {
            constant(g, node.inputs().get(i).copied().flatten())
                .map(|a| a.iter().map(|&x| x as f64).collect())
        })
        .collect::<Option<_>>()?;
    let c = p[0].len();
    if p.iter().any(|v| v.len() != c) {
        return None;
    }
    let scale: Vec<f64> = (0..c).map(|i| p[0][i] / (p[3][i] + eps).sqrt()).collect();
    let shift: Vec<f64> = (0..c).map(|i| p[1][i] - p[2][i] * scale[i]).collect();
    Some((scale, shift))
}

fn f32_tensor(shape: &[usize], data: Vec<f64>) -> Tensor {
    Tensor::F32(
        ArrayD::from_shape_vec(IxDyn(shape), data.into_iter().map(|v| v as f32).collect())
            .expect("shape and data agree"),
    )
}

/// New weights of a weighted node: `w` scaled, element by element, by
/// `scale[channel(i)]`, `i` being the element's position in row-major order.
fn scaled(w: &ArrayD<f32>, scale: &[f64], channel: impl Fn(usize) -> usize) -> Tensor {
    let w = w.as_standard_layout();
    let data: Vec<f32> = w
        .as_slice()
        .expect("standard layout")
        .iter()
        .enumerate()
        .map(|(i, &v)| (v as f64 * scale[channel(i)]) as f32)
        .collect();
    Tensor::F32(ArrayD::from_shape_vec(IxDyn(w.shape()), data).expect("same shape"))
}

/// What a fold writes: the node's new weights and bias (the bias slot and
/// whether it exists), plus an Add of `shift` when the node has no bias.
struct Fold {
    weights: Tensor,
    bias_slot: usize,
    bias: Option<Tensor>,
    add_shift: bool,
}

/// How `bn`'s scale and shift fold into the node producing its input.
fn plan_fold(g: &Graph, p: NodeId, scale: &[f64], shift: &[f64]) -> Option<Fold> {
    let node = g.node(p);
    if !node.domain.is_empty() {
        return None;
    }
    let c = scale.len();
    let input = |i: usize| node.inputs().get(i).copied().flatten();
    // The new bias `b * s + t / beta` (b absent: 0; one value: for all).
    let bias_with = |b: Option<&ArrayD<f32>>, beta: f64| -> Vec<f64> {
        let b: Vec<f64> = b.map_or(vec![0.0], |b| b.iter().map(|&v| v as f64).collect());
        (0..c)
            .map(|i| b[if b.len() == 1 { 0 } else { i }] * scale[i] + shift[i] / beta)
            .collect()
    };
    match node.op_type.as_str() {
        "Conv" | "ConvTranspose" => {
            let w = own_constant(g, p, input(1))?;
            if w.ndim() < 3 {
                return None;
            }
            let group = match node.attr("group") {
                Some(AttrValue::Int(gr)) if *gr >= 1 => *gr as usize,
                None => 1,
                _ => return None,
            };
            let inner: usize = w.shape()[2..].iter().product();
            let weights = if node.op_type == "Conv" {
                if w.shape()[0] != c {
                    return None;
                }
                let per_channel = w.len() / c.max(1);
                scaled(w, scale, |i| i / per_channel)
            } else {
                // [C_in, M / group, k...]: output channel g * (M / group) + o.
                let (cin, mg) = (w.shape()[0], w.shape()[1]);
                if mg * group != c || cin % group != 0 {
                    return None;
                }
                let per = cin / group;
                scaled(w, scale, |i| {
                    let (ic, o) = (i / (mg * inner), (i / inner) % mg);
                    (ic / per) * mg + o
                })
            };
            let bias = match input(2) {
                Some(_) => {
                    let b = own_constant(g, p, input(2))?;
                    if b.len() != c {
                        return None;
                    }
                    b
                }
                None if node.inputs().len() > 3 => return None,
                None => {
                    return Some(Fold {
                        weights,
                        bias_slot: 2,
                        bias: Some(f32_tensor(&[c], bias_with(None, 1.0))),
                        add_shift: false,
                    })
                }
            };
            Some(Fold {
                weights,
                bias_slot: 2,
                bias: Some(f32_tensor(&[c], bias_with(Some(bias), 1.0))),
                add_shift: false,
            })
        }
        "Gemm" => {
            let b = own_constant(g, p, input(1))?;
            if b.ndim() != 2 {
                return None;
            }
            let trans_b = matches!(node.attr("transB"), Some(AttrValue::Int(t)) if *t != 0);
            let n = if trans_b { b.shape()[0] } else { b.shape()[1] };
            if n != c {
                return None;
            }
            let cols = b.shape()[1];
            let weights = scaled(b, scale, |i| if trans_b { i / cols } else { i % cols });
            let beta = match node.attr("beta") {
                Some(AttrValue::Float(v)) => *v as f64,
                _ => 1.0,
            };
            if beta == 0.0 {
                return None;
            }
            let bias = match input(2) {
                None => bias_with(None, beta),
                Some(_) => {
                    let cur = own_constant(g, p, input(2))?;
                    // Per column, or one value for all.
                    let per_column = cur.len() == c && (cur.ndim() == 1 || cur.shape() == [1, c]);
                    if !(per_column || cur.len() == 1) || cur.ndim() > 2 {
                        return None;
                    }
                    bias_with(Some(cur), beta)
                }
            };
            Some(Fold {
                weights,
                bias_slot: 2,
                bias: Some(f32_tensor(&[c], bias)),
                add_shift: false,
            })
        }
        "MatMul" => {
            let b = own_constant(g, p, input(1))?;
            if b.ndim() != 2 || b.shape()[1] != c {
                return None;
            }
            // The BatchNormalization's channel axis 1 is B's column axis only
            // for a 2-D product.
            let rank = known_rank(g, input(0)?)?;
            if rank != 2 {
                return None;
            }
            Some(Fold {
                weights: scaled(b, scale, |i| i % c),
                bias_slot: 2,
                bias: None,
                add_shift: true,
            })
        }
        _ => None,
    }
}

fn known_rank(g: &Graph, v: ValueId) -> Option<usize> {
    match g.value(v).effective_type() {
        Some(ValueType::Tensor(t)) => t.shape.map(|s| s.len()),
        _ => None,
    }
}

impl Pass for FoldBatchNorm {
    fn name(&self) -> &'static str {
        "fold-bn"
    }

    fn run(&self, model: &mut Model, cx: &mut PassContext) -> Result<bool, String> {
        let g = &mut model.graph;
        let order = crate::util::order(g)?;
        let mut changed = false;
        for bn in order {
            if !g.contains_node(bn) {
                continue;
            }
            let Some((scale, shift)) = affine(g, bn) else {
                continue;
            };
            let Some(x) = g.node(bn).inputs()[0] else {
                continue;
            };
            let y = g.node(bn).outputs()[0].expect("affine checked output 0");
            let producer = g.producer(x).filter(|&(p, slot)| {
                slot == 0
                    && g.consumers(x).len() == 1
                    && !g.value(x).is_graph_output()
                    && g.node(p).outputs().iter().flatten().count() == 1
            });
            let fold = producer.and_then(|(p, _)| plan_fold(g, p, &scale, &shift).map(|f| (p, f)));
            if fold.is_none() && known_rank(g, x).is_none_or(|r| r < 2) {
                continue;
            }
            if !cx.allow_rewrite() {
                continue;
            }
            let bn_node = g.remove_node(bn).map_err(|e| e.to_string())?;
            for v in bn_node.outputs().iter().skip(1).flatten() {
                g.remove_value(*v).map_err(|e| e.to_string())?;
            }
            // The statistics, if nothing else reads them, go.
            for v in bn_node.inputs()[1..].iter().flatten() {
                if g.contains_value(*v)
                    && !g.is_used(*v)
                    && !g.value(*v).is_graph_input()
                    && !g.value(*v).is_graph_output()
                {
                    g.remove_value(*v).map_err(|e| e.to_string())?;
                }
            }
            let c = scale.len();
            match fold {
                Some((p, fold)) => {
                    let w = g.node(p).inputs()[1].expect("checked weights");
                    crate::util::set_constant(g, w, fold.weights)?;
                    if let Some(bias) = fold.bias {
                        match g.node(p).inputs().get(fold.bias_slot).copied().flatten() {
                            Some(b) => crate::util::set_constant(g, b, bias)?,
                            None => {
                                let name = g.unique_value_name(&format!("{}.bias", bn_node.name()));
                                let b = g.add_initializer(name, bias).map_err(|e| e.to_string())?;
                                while g.node(p).inputs().len() < fold.bias_slot {
                                    g.push_node_input(p, None).map_err(|e| e.to_string())?;
                                }
                                if g.node(p).inputs().len() == fold.bias_slot {
                                    g.push_node_input(p, Some(b)).map_err(|e| e.to_string())?;
                                } else {
                                    g.set_node_input(p, fold.bias_slot, Some(b))
                                        .map_err(|e| e.to_string())?;
                                }
                            }
                        }
                    }
                    if fold.add_shift {
                        let t = g
                            .add_initializer(
                                g.unique_value_name(&format!("{}.shift", bn_node.name())),
                                f32_tensor(&[c], shift.clone()),
                            )
                            .map_err(|e| e.to_string())?;
                        g.add_node(
                            NewNode::new("Add")
                                .named(bn_node.name())
                                .inputs([x, t])
                                .outputs([y]),
                        )
                        .map_err(|e| e.to_string())?;
                    } else {
                        // The folded node defines the normalised value itself.
                        g.set_node_output(p, 0, y).map_err(|e| e.to_string())?;
                        g.remove_value(x).map_err(|e| e.to_string())?;
                    }
                }
                None => {
                    let rank = known_rank(g, x).expect("checked above");
                    let mut shape = vec![c];
                    shape.extend(std::iter::repeat_n(1, rank - 2));
                    let s = g
                        .add_initializer(
                            g.unique_value_name(&format!("{}.scale", bn_node.name())),
                            f32_tensor(&shape, scale),
                        )
                        .map_err(|e| e.to_string())?;
                    let t = g
                        .add_initializer(
                            g.unique_value_name(&format!("{}.shift", bn_node.name())),
                            f32_tensor(&shape, shift),
                        )
                        .map_err(|e| e.to_string())?;
                    let scaled = g
                        .add_value(
                            g.unique_value_name(&format!("{}.scaled", bn_node.name())),
                            None,
                        )
                        .map_err(|e| e.to_string())?;
                    let mul_name = g.unique_node_name(&format!("{}/scale", bn_node.name()));
                    g.add_node(
                        NewNode::new("Mul")
                            .named(mul_name)
                            .inputs([x, s])
                            .outputs([scaled]),
                    )
                    .map_err(|e| e.to_string())?;
                    g.add_node(
                        NewNode::new("Add")
                            .named(bn_node.name())
                            .inputs([scaled, t])
                            .outputs([y]),
                    )
                    .map_err(|e| e.to_string())?;
                }
            }
            changed = true;
        }
        Ok(changed)
    }
}
