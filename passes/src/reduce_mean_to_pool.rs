//! `reduce-mean-to-pool`: a ReduceMean over the two spatial axes of a 4-D
//! (NCHW) tensor, keeping its dims, is GlobalAveragePool: the same mean of
//! each channel's plane, the same output shape. Exporters write either;
//! quantizers and integer targets know GlobalAveragePool (ONNX Runtime's
//! placement quantizes it, `com.microsoft.QLinearGlobalAveragePool` runs it
//! on integers), so one form is kept. The rank comes from declarations (run
//! `infer-shapes` first); axes from the attribute (before opset 18) or a
//! constant input.

use crate::{util, Pass, PassContext};
use qgraph_ir::{AttrValue, Graph, Model, NewNode, NodeId, Tensor, ValueType};

pub struct ReduceMeanToPool;

fn spatial_mean(g: &Graph, n: NodeId, opset: i64) -> bool {
    let node = g.node(n);
    if !node.domain.is_empty() || node.op_type != "ReduceMean" || node.outputs().len() != 1 {
        return false;
    }
    let Some(x) = node.inputs().first().copied().flatten() else {
        return false;
    };
    let rank = match g.value(x).effective_type() {
        Some(ValueType::Tensor(t)) => t.shape.map(|s| s.len()),
        _ => None,
    };
    if rank != Some(4) {
        return false;
    }
    let keepdims = match node.attr("keepdims") {
        None => true,
        Some(AttrValue::Int(k)) => *k != 0,
        Some(_) => false,
    };
    let axes: Option<Vec<i64>> = if opset < 18 {
        match node.attr("axes") {
            Some(AttrValue::Ints(a)) => Some(a.clone()),
            _ => None,
        }
    } else {
        match util::constant(g, node.inputs().get(1).copied().flatten()) {
            Some(Tensor::I64(a)) => Some(a.iter().copied().collect()),
            _ => None,
        }
    };
    let Some(mut axes) = axes else {
        return false;
    };
    for a in &mut axes {
        if *a < 0 {
            *a += 4;
        }
    }
    axes.sort();
    keepdims && axes == [2, 3]
}

impl Pass for ReduceMeanToPool {
    fn name(&self) -> &'static str {
        "reduce-mean-to-pool"
    }

    fn run(&self, model: &mut Model, cx: &mut PassContext) -> Result<bool, String> {
        let opset = model.opset_version("").unwrap_or(1);
        let g = &mut model.graph;
        let mut changed = false;
        for n in util::order(g)? {
            if !spatial_mean(g, n, opset) || !cx.allow_rewrite() {
                continue;
            }
            let err = |e: qgraph_ir::IrError| e.to_string();
            let node = g.remove_node(n).map_err(err)?;
            let (Some(x), Some(y)) = (node.inputs()[0], node.outputs()[0]) else {
                return Err("a ReduceMean without input or output".into());
            };
            let mut pool = NewNode::new("GlobalAveragePool")
                .named(node.name())
                .inputs([x])
                .outputs([y]);
            pool.doc = node.doc.clone();
            pool.meta = node.meta.clone();
            g.add_node(pool).map_err(err)?;
            // The axes constant, when nothing else reads it.
            if let Some(Some(axes)) = node.inputs().get(1) {
                let v = g.value(*axes);
                if g.consumers(*axes).is_empty() && !v.is_graph_input() && !v.is_graph_output() {
                    g.remove_value(*axes).map_err(err)?;
                }
            }
            changed = true;
        }
        Ok(changed)
    }
}
