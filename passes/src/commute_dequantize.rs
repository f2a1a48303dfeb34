//! `commute-dequantize`: moves a DequantizeLinear below the data-movement
//! op that reads it, so that the op runs on the integers and the runtime
//! sees DequantizeLinear right before the op that consumes real values
//! (TensorRT fuses Q/DQ pairs into the weighted op after them; ONNX
//! Runtime's QDQ fusions match DequantizeLinear -> op -> QuantizeLinear).
//!
//! Only per-tensor DequantizeLinear (scalar scale and zero point) moves,
//! and only through the ops of [`COMMUTES`], each of which computes the same
//! thing before and after the move for the reason given there.

use crate::{util, Pass, PassContext};
use qgraph_ir::{Graph, Model, NodeId, Tensor, ValueId};

/// The ops a per-tensor DequantizeLinear commutes with, the opset from
/// which they take 8-bit integers, and why the move keeps the function.
pub const COMMUTES: &[(&str, i64, &str)] = &[
    (
        "Reshape",
        5,
        "moves elements, never changes one; one scale applies to all",
    ),
    ("Flatten", 9, "moves elements, never changes one"),
    ("Squeeze", 1, "moves elements, never changes one"),
    ("Unsqueeze", 1, "moves elements, never changes one"),
    ("Transpose", 1, "moves elements, never changes one"),
    (
        "MaxPool",
        12,
        "a maximum commutes with an increasing map, and (q - zero) * scale increases with q \
         for a positive scale",
    ),
    (
        "Concat",
        4,
        "when every input is dequantized with the same scale and zero point, one \
         DequantizeLinear after joining equals one per input",
    ),
];

pub struct CommuteDequantize;

/// The scalar scale and zero point (and the zero point's value id) of a
/// per-tensor DequantizeLinear of the default domain.
fn per_tensor_dq(g: &Graph, n: NodeId) -> Option<(Tensor, Option<Tensor>)> {
    let node = g.node(n);
    if !node.domain.is_empty() || node.op_type != "DequantizeLinear" {
        return None;
    }
    let scale = util::constant(g, node.inputs().get(1).copied().flatten())?;
    let zero = match node.inputs().get(2).copied().flatten() {
        None => None,
        Some(z) => Some(util::constant(g, Some(z))?.clone()),
    };
    let scalar = |t: &Tensor| t.shape().iter().product::<usize>() == 1;
    let positive = match scale {
        Tensor::F32(a) => a.iter().all(|&s| s > 0.0),
        _ => false,
    };
    (scalar(scale) && zero.as_ref().is_none_or(scalar) && positive).then(|| (scale.clone(), zero))
}

/// The DequantizeLinear producing `v`, when `v` feeds nothing else and is
/// no graph output.
fn sole_dq(g: &Graph, v: ValueId) -> Option<NodeId> {
    let (p, _) = g.producer(v)?;
    (g.consumers(v).len() == 1 && !g.value(v).is_graph_output() && per_tensor_dq(g, p).is_some())
        .then_some(p)
}

/// The DequantizeLinear nodes that op `n` can be moved above, or `None`.
fn movable(g: &Graph, n: NodeId, opset: i64) -> Option<Vec<NodeId>> {
    let node = g.node(n);
    if !node.domain.is_empty()
        || !COMMUTES
            .iter()
            .any(|(op, since, _)| *op == node.op_type && opset >= *since)
    {
        return None;
    }
    // One output read (MaxPool's Indices must be unused).
    let outs: Vec<ValueId> = node.outputs().iter().flatten().copied().collect();
    if outs.len() != 1 && outs[1..].iter().any(|&v| g.is_used(v)) {
        return None;
    }
    let data_slots: Vec<usize> = match node.op_type.as_str() {
        "Concat" => (0..node.inputs().len()).collect(),
        _ => vec![0],
    };
    let mut dqs = Vec::new();
    for slot in data_slots {
        let v = node.inputs().get(slot).copied().flatten()?;
        dqs.push(sole_dq(g, v)?);
    }
    // Concat: all inputs with the same scale and zero point; the zero
    // point tensors, being equal, carry the same integer type.
    let first = per_tensor_dq(g, dqs[0])?;
    if dqs.len() > 1 && first.1.is_none() {
        return None;
    }
    for &d in &dqs[1..] {
        if per_tensor_dq(g, d)? != first {
            return None;
        }
    }
    Some(dqs)
}

impl Pass for CommuteDequantize {
    fn name(&self) -> &'static str {
        "commute-dequantize"
    }

    fn run(&self, model: &mut Model, cx: &mut PassContext) -> Result<bool, String> {
        let mut changed = false;
        let opset = model.opset_version("").unwrap_or(1);
        let err = |e: qgraph_ir::IrError| e.to_string();
        // Repeated until nothing moves: a DequantizeLinear may pass several
        // ops in a row.
        loop {
            let g = &model.graph;
            let order = util::order(g)?;
            let Some((n, dqs)) = order
                .iter()
                .find_map(|&n| movable(g, n, opset).map(|d| (n, d)))
            else {
                break;
            };
            if !cx.allow_rewrite() {
                break;
            }
            let g = &mut model.graph;
            // The op reads the integers; the first DequantizeLinear moves
            // after it and defines the op's old output.
            let out = g.node(n).outputs()[0].ok_or("an op without output")?;
            let inputs: Vec<(usize, ValueId)> = g
                .node(n)
                .inputs()
                .iter()
                .enumerate()
                .filter_map(|(slot, v)| v.map(|v| (slot, v)))
                .collect();
            for (slot, v) in inputs {
                let Some(&d) = dqs.iter().find(|&&d| g.node(d).outputs()[0] == Some(v)) else {
                    continue;
                };
                let integer = g.node(d).inputs()[0].ok_or("a DequantizeLinear without input")?;
                g.set_node_input(n, slot, Some(integer)).map_err(err)?;
            }
            let moved = dqs[0];
            let integer_out = g
                .add_value(
                    g.unique_value_name(&format!("{}_quantized", g.value(out).name())),
                    None,
                )
                .map_err(err)?;
            let old_dq_out =
                g.node(moved).outputs()[0].ok_or("a DequantizeLinear without output")?;
            g.set_node_output(n, 0, integer_out).map_err(err)?;
            g.set_node_input(moved, 0, Some(integer_out)).map_err(err)?;
            g.set_node_output(moved, 0, out).map_err(err)?;
            g.remove_value(old_dq_out).map_err(err)?;
            // The other inputs' DequantizeLinear nodes are left unread.
            for &d in &dqs[1..] {
                let o = g.node(d).outputs()[0].ok_or("a DequantizeLinear without output")?;
                g.remove_node(d).map_err(err)?;
                g.remove_value(o).map_err(err)?;
            }
            changed = true;
        }
        Ok(changed)
    }
}
