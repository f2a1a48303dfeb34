//! The evaluator's plan: which nodes run as one kernel call.
//!
//! A Conv does the work of the nodes around it when nothing else needs the
//! values between them: a zero Pad before it becomes wider convolution
//! padding (decided per run, as the pads are often computed from shapes),
//! and elementwise nodes after it (activations, inference
//! BatchNormalization, and one Add of a tensor that already exists, as in a
//! residual connection) become its epilogue, applied to each output block
//! while it is in cache. This is how the evaluator avoids three passes over
//! memory where one does, without rewriting the graph. Fusing never changes
//! a value: the epilogue applies the very function the node's own kernel
//! applies (`ops::pointwise`), and padding with zeros inside the convolution
//! adds the same zeros (only the sign of an exact zero may differ). A run
//! that watches a hidden value runs that step's nodes one by one instead.

use crate::{ops, OpCtx};
use qgraph_ir::{AttrValue, Graph, NodeId, Tensor, ValueId};
use std::collections::{HashMap, HashSet};

/// One kernel call: `node`, with a Pad before it (when its pads turn out
/// to be zero padding of the spatial dims) and elementwise nodes after it.
pub struct Step {
    pub node: NodeId,
    pub pad: Option<NodeId>,
    pub fused: Vec<NodeId>,
    /// The maps of `fused`, applied to the output in order.
    pub epilogue: Vec<ops::Pointwise>,
    /// The values between the absorbed nodes, never materialised.
    pub hidden: Vec<ValueId>,
    /// The other input of a fused Add (`Pointwise::AddInput`).
    pub added: Option<ValueId>,
}

impl Step {
    pub fn single(node: NodeId) -> Step {
        Step {
            node,
            pad: None,
            fused: Vec::new(),
            epilogue: Vec::new(),
            hidden: Vec::new(),
            added: None,
        }
    }

    pub fn is_fused(&self) -> bool {
        self.pad.is_some() || !self.fused.is_empty()
    }

    /// The step's nodes in graph order.
    pub fn nodes(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.pad
            .into_iter()
            .chain(std::iter::once(self.node))
            .chain(self.fused.iter().copied())
    }

    /// The node whose outputs are the step's.
    pub fn last(&self) -> NodeId {
        *self.fused.last().unwrap_or(&self.node)
    }
}

/// Groups the nodes of `order` into steps. `uses` counts the readers of
/// each value (graph outputs included).
pub fn plan(
    graph: &Graph,
    opset: i64,
    order: &[NodeId],
    uses: &HashMap<ValueId, usize>,
) -> Vec<Step> {
    let position: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let mut absorbed = HashSet::new();
    let mut heads: HashMap<NodeId, Step> = HashMap::new();
    for &n in order {
        let head = graph.node(n);
        if !head.domain.is_empty() || !ops::accepts_fusion(&head.op_type) {
            continue;
        }
        // The fused kernel is the 2-D f32 convolution: a weight of another
        // rank or type (1-D, 3-D, f16 ...) runs node by node.
        if !may_be_planar_f32(graph, head.inputs().get(1).copied().flatten()) {
            continue;
        }
        let mut step = Step::single(n);
        if let Some((pad, value)) = fusable_pad(graph, n, uses) {
            step.pad = Some(pad);
            step.hidden.push(value);
            absorbed.insert(pad);
        }
        let mut current = n;
        // Nodes after the head run at its place, so what they read besides
        // its output must exist by then.
        let ready = |v: ValueId| match graph.producer(v) {
            Some((p, _)) => position[&p] < position[&n],
            None => true,
        };
        loop {
            let (next, value, map) = match fusable_successor(graph, opset, current, uses, &ready) {
                Some(found) => found,
                None if step.added.is_none() => match fusable_add(graph, current, uses, &ready) {
                    Some((next, value, other)) => {
                        step.added = Some(other);
                        (next, value, ops::Pointwise::AddInput)
                    }
                    None => break,
                },
                None => break,
            };
            step.fused.push(next);
            step.epilogue.push(map);
            step.hidden.push(value);
            absorbed.insert(next);
            current = next;
        }
        if step.is_fused() {
            heads.insert(n, step);
        }
    }
    order
        .iter()
        .filter(|n| !absorbed.contains(*n))
        .map(|&n| heads.remove(&n).unwrap_or_else(|| Step::single(n)))
        .collect()
}

/// Whether a Conv weight may be 2-D and f32: false when its initializer or
/// Constant (or the initializer a DequantizeLinear dequantizes) says
/// otherwise, when its declared type does, or when nothing tells.
fn may_be_planar_f32(graph: &Graph, weight: Option<ValueId>) -> bool {
    let Some(w) = weight else { return false };
    let value = graph.value(w);
    if let Some(t) = constant_value(graph, w) {
        return matches!(t, Tensor::F32(a) if a.ndim() == 4);
    }
    if let Some(qgraph_ir::ValueType::Tensor(t)) = value.effective_type() {
        if t.dtype.is_some_and(|d| d != qgraph_ir::DataType::F32)
            || t.shape.as_ref().is_some_and(|s| s.len() != 4)
        {
            return false;
        }
        if t.dtype.is_some() && t.shape.is_some() {
            return true;
        }
    }
    match graph.producer(w) {
        Some((p, _)) if graph.node(p).op_type == "DequantizeLinear" => graph
            .node(p)
            .inputs()
            .first()
            .copied()
            .flatten()
            .and_then(|q| graph.value(q).initializer())
            .is_none_or(|i| i.tensor.shape().len() == 4),
        Some(_) => true,
        // A graph input or a value captured from an enclosing graph, of
        // unknown rank: run unfused.
        None => false,
    }
}

/// The single-output value of `node` when exactly one node reads it, at
/// one slot, and it is no graph output: the reader and the slot.
fn only_reader(
    graph: &Graph,
    value: ValueId,
    uses: &HashMap<ValueId, usize>,
) -> Option<(NodeId, usize)> {
    if uses.get(&value) != Some(&1) || graph.outputs().contains(&value) {
        return None;
    }
    match graph.consumers(value)[..] {
        [reader] => Some(reader),
        _ => None,
    }
}

/// A constant-mode Pad whose only reader is input 0 of `conv`, which pads
/// explicitly: the Pad and its output. Whether its pads are zeros on the
/// spatial dims is known only when it runs (see [`spatial_zero_pads`]).
fn fusable_pad(
    graph: &Graph,
    conv: NodeId,
    uses: &HashMap<ValueId, usize>,
) -> Option<(NodeId, ValueId)> {
    match graph.node(conv).attr("auto_pad") {
        None => {}
        Some(AttrValue::String(s)) if s == b"NOTSET" || s == b"VALID" => {}
        Some(_) => return None,
    }
    let value = graph.node(conv).inputs().first().copied().flatten()?;
    let (pad, _) = graph.producer(value)?;
    if only_reader(graph, value, uses) != Some((conv, 0)) {
        return None;
    }
    let node = graph.node(pad);
    if !node.domain.is_empty() || node.op_type != "Pad" || node.outputs().len() != 1 {
        return None;
    }
    node.inputs().first().copied().flatten()?;
    match node.attr("mode") {
        None => Some((pad, value)),
        Some(AttrValue::String(s)) if s == b"constant" => Some((pad, value)),
        Some(_) => None,
    }
}

/// When a Pad with these inputs (after the data) pads only the two spatial
/// dims of a 4-D tensor, with zeros: (top, left, bottom, right).
pub fn spatial_zero_pads(
    graph: &Graph,
    opset: i64,
    pad: NodeId,
    inputs: &[Option<&Tensor>],
) -> Option<[usize; 4]> {
    let node = graph.node(pad);
    let input = |k: usize| inputs.get(k).copied().flatten();
    let (pads, zero) = if opset >= 11 {
        if input(3).is_some() {
            return None;
        }
        let pads = match input(1)? {
            Tensor::I64(a) => a.iter().copied().collect::<Vec<i64>>(),
            _ => return None,
        };
        let zero = match input(2) {
            None => true,
            Some(Tensor::F32(a)) => a.len() == 1 && a.iter().all(|&x| x == 0.0),
            Some(_) => false,
        };
        (pads, zero)
    } else {
        let pads = match node.attr("pads") {
            Some(AttrValue::Ints(p)) => p.clone(),
            _ => return None,
        };
        let zero = match node.attr("value") {
            None => true,
            Some(AttrValue::Float(x)) => *x == 0.0,
            Some(_) => false,
        };
        (pads, zero)
    };
    let [0, 0, top, left, 0, 0, bottom, right] = pads[..] else {
        return None;
    };
    let all = [top, left, bottom, right];
    if !zero || all.iter().any(|&p| p < 0) {
        return None;
    }
    Some(all.map(|p| p as usize))
}

/// The elementwise node that can run as the epilogue of `node`, with the
/// value between them and its map.
fn fusable_successor(
    graph: &Graph,
    opset: i64,
    node: NodeId,
    uses: &HashMap<ValueId, usize>,
    ready: &dyn Fn(ValueId) -> bool,
) -> Option<(NodeId, ValueId, ops::Pointwise)> {
    let [Some(value)] = graph.node(node).outputs() else {
        return None;
    };
    let (next, 0) = only_reader(graph, *value, uses)? else {
        return None;
    };
    let consumer = graph.node(next);
    if !consumer.domain.is_empty()
        || !ops::is_pointwise(&consumer.op_type)
        || consumer.outputs().iter().flatten().count() != 1
        || consumer.outputs().first().copied().flatten().is_none()
    {
        return None;
    }
    let mut args: Vec<Option<&Tensor>> = vec![None];
    for v in &consumer.inputs()[1..] {
        match v {
            None => args.push(None),
            Some(v) if ready(*v) => args.push(Some(constant_value(graph, *v)?)),
            Some(_) => return None,
        }
    }
    let pool = crate::pool::BufferPool::default();
    let cx = OpCtx {
        graph,
        node: next,
        opset,
        epilogue: &[],
        added: None,
        input_pads: [0; 4],
        buffers: &pool,
        captures: &[],
        functions: &[],
    };
    let map = ops::build_pointwise(&cx, &args).ok()?;
    Some((next, *value, map))
}

/// An Add reading the output of `node` and a value that exists before the
/// step runs (a residual connection): the Add, the value between them and
/// the other value. Whether the other value has the output's shape is
/// known only when it runs; when it does not, the step runs node by node.
fn fusable_add(
    graph: &Graph,
    node: NodeId,
    uses: &HashMap<ValueId, usize>,
    ready: &dyn Fn(ValueId) -> bool,
) -> Option<(NodeId, ValueId, ValueId)> {
    let [Some(value)] = graph.node(node).outputs() else {
        return None;
    };
    let (next, slot) = only_reader(graph, *value, uses)?;
    let add = graph.node(next);
    if !add.domain.is_empty() || add.op_type != "Add" || add.outputs().len() != 1 {
        return None;
    }
    let [Some(a), Some(b)] = add.inputs()[..] else {
        return None;
    };
    let other = if slot == 0 { b } else { a };
    add.outputs()[0]?;
    (other != *value && ready(other)).then_some((next, *value, other))
}

/// The tensor of a value known before the run: an initializer, or the
/// output of a Constant node holding a tensor.
fn constant_value(graph: &Graph, v: ValueId) -> Option<&Tensor> {
    if let Some(init) = graph.value(v).initializer() {
        return (!init.tensor.is_elided()).then_some(&init.tensor);
    }
    let (producer, _) = graph.producer(v)?;
    let node = graph.node(producer);
    if !node.domain.is_empty() || node.op_type != "Constant" {
        return None;
    }
    match node.attr("value") {
        Some(AttrValue::Tensor(t)) if !t.is_elided() => Some(t),
        _ => None,
    }
}
