//! `fuse-conv-bn-act`: marks a weighted node (Conv, ConvTranspose, Gemm,
//! MatMul), an optional BatchNormalization after it, and an activation
//! after those (Relu, Clip, LeakyRelu, HardSigmoid, HardSwish, Sigmoid) as
//! one fusion group, which quantization treats as one unit: no Q/DQ between
//! its members, as TensorRT and ONNX Runtime fuse them. The graph computes
//! the same; only node metadata changes, so the grouping survives writing
//! and reading ONNX (`NodeProto.metadata_props`):
//!
//! - `qgraph.fusion.group` = the weighted node's name, on every member;
//! - `qgraph.fusion.role` = `weighted`, `normalization` or `activation`.
//!
//! A member's output must be read only by the next member and be no graph
//! output. Nodes already in a group are left as they are.

use crate::{Pass, PassContext};
use qgraph_ir::{Graph, Model, NodeId};

pub struct FuseConvBnAct;

pub const GROUP_KEY: &str = "qgraph.fusion.group";
pub const ROLE_KEY: &str = "qgraph.fusion.role";

const WEIGHTED: &[&str] = &["Conv", "ConvTranspose", "Gemm", "MatMul"];
const ACTIVATIONS: &[&str] = &[
    "Relu",
    "Clip",
    "LeakyRelu",
    "HardSigmoid",
    "HardSwish",
    "Sigmoid",
];

/// The only node reading `node`'s single output, when that output is no
/// graph output.
fn sole_successor(g: &Graph, node: NodeId) -> Option<NodeId> {
    let [Some(out)] = g.node(node).outputs() else {
        return None;
    };
    if g.value(*out).is_graph_output() {
        return None;
    }
    match g.consumers(*out)[..] {
        [(next, 0)] if g.node(next).domain.is_empty() => Some(next),
        _ => None,
    }
}

fn grouped(g: &Graph, n: NodeId) -> bool {
    g.node(n).meta.iter().any(|(k, _)| k == GROUP_KEY)
}

impl Pass for FuseConvBnAct {
    fn name(&self) -> &'static str {
        "fuse-conv-bn-act"
    }

    fn run(&self, model: &mut Model, cx: &mut PassContext) -> Result<bool, String> {
        let g = &mut model.graph;
        let order = crate::util::order(g)?;
        let mut changed = false;
        for head in order {
            let node = g.node(head);
            if !node.domain.is_empty()
                || !WEIGHTED.contains(&node.op_type.as_str())
                || grouped(g, head)
            {
                continue;
            }
            let mut members = vec![(head, "weighted")];
            let mut last = head;
            if let Some(next) = sole_successor(g, last) {
                if g.node(next).op_type == "BatchNormalization" && !grouped(g, next) {
                    members.push((next, "normalization"));
                    last = next;
                }
            }
            let Some(act) = sole_successor(g, last) else {
                continue;
            };
            if !ACTIVATIONS.contains(&g.node(act).op_type.as_str()) || grouped(g, act) {
                continue;
            }
            members.push((act, "activation"));
            if !cx.allow_rewrite() {
                continue;
            }
            let group = g.node(head).name().to_string();
            let group = if group.is_empty() {
                g.describe_node(head)
            } else {
                group
            };
            for (n, role) in members {
                let meta = &mut g.node_mut(n).map_err(|e| e.to_string())?.meta;
                meta.retain(|(k, _)| k != GROUP_KEY && k != ROLE_KEY);
                meta.push((GROUP_KEY.to_string(), group.clone()));
                meta.push((ROLE_KEY.to_string(), role.to_string()));
            }
            changed = true;
        }
        Ok(changed)
    }
}
