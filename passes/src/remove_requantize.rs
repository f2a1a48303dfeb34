//! `remove-requantize`: a QuantizeLinear that reads a DequantizeLinear with
//! the same scale, zero point, axis and integer type gives back the
//! DequantizeLinear's input exactly (`round((q - z) * s / s) + z = q` for
//! every integer a Q/DQ grid holds), so its readers read that input
//! instead. Such round trips appear when a pair was placed on both sides of
//! an op that a DequantizeLinear has since moved through, or when two
//! placements quantize the same tensor.

use crate::{util, Pass, PassContext};
use qgraph_ir::{AttrValue, Graph, Model, NodeId, ValueId};

pub struct RemoveRequantize;

/// Scale, zero point and axis of a Q or DQ node, when constant.
fn params(g: &Graph, n: NodeId) -> Option<(qgraph_ir::Tensor, Option<qgraph_ir::Tensor>, i64)> {
    let node = g.node(n);
    let scale = util::constant(g, node.inputs().get(1).copied().flatten())?.clone();
    let zero = match node.inputs().get(2).copied().flatten() {
        None => None,
        Some(z) => Some(util::constant(g, Some(z))?.clone()),
    };
    let axis = match node.attr("axis") {
        Some(AttrValue::Int(a)) => *a,
        _ => 1,
    };
    // Blocked quantization and saturation options: not handled here.
    if node.attr("block_size").is_some() || node.attr("output_dtype").is_some() {
        return None;
    }
    Some((scale, zero, axis))
}

/// A QuantizeLinear whose input a DequantizeLinear with equal parameters
/// produced: (the Q node, the integer value to read instead).
fn round_trip(g: &Graph, q: NodeId) -> Option<(NodeId, ValueId)> {
    let node = g.node(q);
    if !node.domain.is_empty() || node.op_type != "QuantizeLinear" {
        return None;
    }
    let x = node.inputs().first().copied().flatten()?;
    let (d, _) = g.producer(x)?;
    let dq = g.node(d);
    if !dq.domain.is_empty() || dq.op_type != "DequantizeLinear" {
        return None;
    }
    let integer = dq.inputs().first().copied().flatten()?;
    let (pq, pd) = (params(g, q)?, params(g, d)?);
    // Without a zero point, QuantizeLinear makes uint8: equal types need
    // equal zero point tensors (which carry the type).
    let scalar = |t: &qgraph_ir::Tensor| t.shape().iter().product::<usize>() == 1;
    let same_axis = pq.2 == pd.2 || (scalar(&pq.0) && pq.1.as_ref().is_none_or(scalar));
    (pq.0 == pd.0 && pq.1 == pd.1 && pq.1.is_some() && same_axis).then_some((q, integer))
}

impl Pass for RemoveRequantize {
    fn name(&self) -> &'static str {
        "remove-requantize"
    }

    fn run(&self, model: &mut Model, cx: &mut PassContext) -> Result<bool, String> {
        let g = &mut model.graph;
        let mut changed = false;
        for n in util::order(g)? {
            if !g.contains_node(n) {
                continue;
            }
            let Some((q, integer)) = round_trip(g, n) else {
                continue;
            };
            let Some(out) = g.node(q).outputs().first().copied().flatten() else {
                continue;
            };
            // A graph output keeps its name: left as it is.
            if g.value(out).is_graph_output() || !cx.allow_rewrite() {
                continue;
            }
            let err = |e: qgraph_ir::IrError| e.to_string();
            g.replace_uses(out, integer).map_err(err)?;
            g.remove_node(q).map_err(err)?;
            g.remove_value(out).map_err(err)?;
            changed = true;
        }
        Ok(changed)
    }
}
