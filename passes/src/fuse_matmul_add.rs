//! `fuse-matmul-add`: `Add(MatMul(A, B), C)` becomes `Gemm(A, B, C)` where
//! Gemm computes the same: A and B are 2-D (ranks from declarations or
//! initializers; run `infer-shapes` first to know them), C is a constant of
//! shape [N] or [1, N] (or a scalar), and the MatMul's output is read only by
//! the Add and is no graph output. The Gemm takes over the Add's output
//! value and the MatMul's name.

use crate::{Pass, PassContext};
use qgraph_ir::{Graph, Model, NewNode, NodeId, ValueId, ValueType};

pub struct FuseMatMulAdd;

fn dims(g: &Graph, v: ValueId) -> Option<Vec<Option<i64>>> {
    match g.value(v).effective_type() {
        Some(ValueType::Tensor(t)) => t.shape.map(|s| {
            s.iter()
                .map(|d| match d {
                    qgraph_ir::Dim::Known(k) => Some(*k),
                    _ => None,
                })
                .collect()
        }),
        _ => None,
    }
}

/// The Add reading `matmul`'s output and the bias it adds, when the pair
/// is a Gemm.
fn gemm_parts(g: &Graph, matmul: NodeId) -> Option<(NodeId, ValueId)> {
    let node = g.node(matmul);
    if !node.domain.is_empty() || node.op_type != "MatMul" {
        return None;
    }
    let (Some(a), Some(b)) = (
        node.inputs().first().copied().flatten(),
        node.inputs().get(1).copied().flatten(),
    ) else {
        return None;
    };
    let [Some(y)] = node.outputs() else {
        return None;
    };
    if g.value(*y).is_graph_output() {
        return None;
    }
    let (a_dims, b_dims) = (dims(g, a)?, dims(g, b)?);
    if a_dims.len() != 2 || b_dims.len() != 2 {
        return None;
    }
    let n = b_dims[1]?;
    let [(add, slot)] = g.consumers(*y)[..] else {
        return None;
    };
    let add_node = g.node(add);
    if !add_node.domain.is_empty() || add_node.op_type != "Add" || add_node.inputs().len() != 2 {
        return None;
    }
    let c = add_node.inputs()[1 - slot]?;
    let cv = g.value(c);
    if cv.is_graph_input() {
        return None;
    }
    let shape = cv.initializer()?.tensor.shape().to_vec();
    let fits = match shape[..] {
        [] | [1] => true,
        [k] => k as i64 == n,
        [1, k] => k as i64 == n,
        _ => false,
    };
    fits.then_some((add, c))
}

impl Pass for FuseMatMulAdd {
    fn name(&self) -> &'static str {
        "fuse-matmul-add"
    }

    fn run(&self, model: &mut Model, cx: &mut PassContext) -> Result<bool, String> {
        let g = &mut model.graph;
        let order = crate::util::order(g)?;
        let mut changed = false;
        for mm in order {
            if !g.contains_node(mm) {
                continue;
            }
            let Some((add, c)) = gemm_parts(g, mm) else {
                continue;
            };
            if !cx.allow_rewrite() {
                continue;
            }
            let matmul = g.remove_node(mm).map_err(|e| e.to_string())?;
            let add_node = g.remove_node(add).map_err(|e| e.to_string())?;
            let (a, b) = (matmul.inputs()[0], matmul.inputs()[1]);
            let (Some(a), Some(b)) = (a, b) else {
                unreachable!("checked by gemm_parts")
            };
            let out = add_node.outputs()[0].ok_or("the Add has no output")?;
            let mut new = NewNode::new("Gemm")
                .named(matmul.name())
                .inputs([a, b, c])
                .outputs([out]);
            new.doc = matmul.doc.clone();
            new.meta = matmul.meta.clone();
            g.add_node(new).map_err(|e| e.to_string())?;
            if let Some(y) = matmul.outputs()[0] {
                g.remove_value(y).map_err(|e| e.to_string())?;
            }
            changed = true;
        }
        Ok(changed)
    }
}
