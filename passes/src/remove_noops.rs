//! `remove-noops`: removes nodes that pass their input through unchanged,
//! making their readers read the input: Identity, Dropout in inference
//! (its mask unused), Cast to the type the input already has, Reshape to
//! the shape the input already has, Pad by zeros, Transpose by the
//! identity permutation. Types and shapes come from declarations and
//! initializers; a node whose input type is unknown stays.
//!
//! A node whose output is a graph output stays too: removing it would
//! rename an output of the model.

use crate::{Pass, PassContext};
use qgraph_ir::{AttrValue, DataType, Dim, Graph, Model, NodeId, Tensor, ValueId, ValueType};

pub struct RemoveNoops;

/// A value's dtype and static dims, when declared or known from its data.
fn static_type(g: &Graph, v: ValueId) -> (Option<DataType>, Option<Vec<i64>>) {
    match g.value(v).effective_type() {
        Some(ValueType::Tensor(t)) => {
            let dims = t.shape.and_then(|s| {
                s.iter()
                    .map(|d| match d {
                        Dim::Known(k) => Some(*k),
                        _ => None,
                    })
                    .collect()
            });
            (t.dtype, dims)
        }
        _ => (None, None),
    }
}

/// The constant integers of an input (an initializer that is no graph input).
fn const_ints(g: &Graph, v: Option<ValueId>) -> Option<Vec<i64>> {
    match crate::util::constant(g, v)? {
        Tensor::I64(a) => Some(a.iter().copied().collect()),
        Tensor::I32(a) => Some(a.iter().map(|&x| x as i64).collect()),
        _ => None,
    }
}

fn is_noop(g: &Graph, n: NodeId, opset: i64) -> bool {
    let node = g.node(n);
    if !node.domain.is_empty() {
        return false;
    }
    let input = |i: usize| node.inputs().get(i).copied().flatten();
    let Some(x) = input(0) else { return false };
    let extra_outputs_unused = node
        .outputs()
        .iter()
        .skip(1)
        .flatten()
        .all(|&v| !g.is_used(v));
    match node.op_type.as_str() {
        "Identity" => true,
        "Dropout" => {
            // From opset 12 a training_mode input may turn dropout on.
            let training = match input(2) {
                None => false,
                Some(v) => match g.value(v).initializer().map(|i| &i.tensor) {
                    Some(Tensor::Bool(a)) if !g.value(v).is_graph_input() => a.iter().any(|&b| b),
                    _ => true,
                },
            };
            let legacy_training =
                opset < 7 && matches!(node.attr("is_test"), Some(AttrValue::Int(0)) | None);
            !training && !legacy_training && extra_outputs_unused
        }
        "Cast" => {
            let to = match node.attr("to") {
                Some(AttrValue::Int(t)) => {
                    i32::try_from(*t).ok().and_then(DataType::from_onnx_code)
                }
                _ => None,
            };
            let (dtype, _) = static_type(g, x);
            to.is_some() && dtype == to
        }
        "Reshape" => {
            let (_, dims) = static_type(g, x);
            let target = const_ints(g, input(1));
            let allowzero = matches!(node.attr("allowzero"), Some(AttrValue::Int(1)));
            match (dims, target) {
                (Some(d), Some(t)) if d.len() == t.len() => {
                    d.iter().zip(&t).enumerate().all(|(i, (&have, &want))| {
                        want == have || (want == 0 && !allowzero && d[i] == have) || {
                            // One -1 is the only unknown: every other dim matches.
                            want == -1 && t.iter().filter(|&&w| w == -1).count() == 1
                        }
                    })
                }
                _ => false,
            }
        }
        "Pad" => {
            let pads = if opset >= 11 {
                const_ints(g, input(1))
            } else {
                match node.attr("pads") {
                    Some(AttrValue::Ints(p)) => Some(p.clone()),
                    _ => None,
                }
            };
            pads.is_some_and(|p| p.iter().all(|&v| v == 0))
        }
        "Transpose" => match node.attr("perm") {
            Some(AttrValue::Ints(p)) => p.iter().enumerate().all(|(i, &v)| v == i as i64),
            _ => false,
        },
        _ => false,
    }
}

impl Pass for RemoveNoops {
    fn name(&self) -> &'static str {
        "remove-noops"
    }

    fn run(&self, model: &mut Model, cx: &mut PassContext) -> Result<bool, String> {
        let opset = model.opset_version("").unwrap_or(1);
        let g = &mut model.graph;
        let mut changed = false;
        let order = crate::util::order(g)?;
        for n in order {
            if !is_noop(g, n, opset) {
                continue;
            }
            let node = g.node(n);
            let Some(input) = node.inputs()[0] else {
                continue;
            };
            let Some(Some(output)) = node.outputs().first().copied() else {
                continue;
            };
            if g.value(output).is_graph_output() || !cx.allow_rewrite() {
                continue;
            }
            let outputs: Vec<ValueId> = node.outputs().iter().flatten().copied().collect();
            g.replace_uses(output, input).map_err(|e| e.to_string())?;
            g.remove_node(n).map_err(|e| e.to_string())?;
            for v in outputs {
                g.remove_value(v).map_err(|e| e.to_string())?;
            }
            changed = true;
        }
        Ok(changed)
    }
}
