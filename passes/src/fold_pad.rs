//! `fold-pad`: moves a zero Pad of the spatial dims into the `pads` of the
//! Conv (or AveragePool) that alone reads it. PyTorch exports TensorFlow's
//! 'same' padding this way (`static_padding` in EfficientNet).
//!
//! Legal when the Pad is constant-mode with value 0, pads nothing on the
//! batch and channel axes, removes nothing (no negative pads), and its
//! output is read only by input 0 of the consumer and is no graph output;
//! the consumer pads explicitly (`auto_pad` absent, NOTSET or VALID). An
//! AveragePool must count padding (`count_include_pad=1`, since the Pad's
//! zeros were counted) and not use `ceil_mode` (which treats windows
//! starting in padding differently from windows over real zeros).

use crate::{Pass, PassContext};
use qgraph_ir::{AttrValue, Graph, Model, NodeId, Tensor};

pub struct FoldPad;

/// The spatial pads of a Pad node (begin..., end...), when it is a zero pad
/// of the spatial axes only.
fn spatial_zero_pads(g: &Graph, pad: NodeId, opset: i64) -> Option<Vec<i64>> {
    let node = g.node(pad);
    if !node.domain.is_empty() || node.op_type != "Pad" {
        return None;
    }
    match node.attr("mode") {
        None => {}
        Some(AttrValue::String(m)) if m == b"constant" => {}
        _ => return None,
    }
    let input = |i: usize| node.inputs().get(i).copied().flatten();
    let (pads, zero) = if opset >= 11 {
        if input(3).is_some() {
            return None;
        }
        let pads: Vec<i64> = match crate::util::constant(g, input(1))? {
            Tensor::I64(a) => a.iter().copied().collect(),
            _ => return None,
        };
        let zero = match input(2) {
            None => true,
            Some(_) => match crate::util::constant(g, input(2))? {
                Tensor::F32(a) => a.iter().all(|&x| x == 0.0),
                _ => false,
            },
        };
        (pads, zero)
    } else {
        let pads = match node.attr("pads") {
            Some(AttrValue::Ints(p)) => p.clone(),
            _ => return None,
        };
        let zero = match node.attr("value") {
            None => true,
            Some(AttrValue::Float(v)) => *v == 0.0,
            _ => false,
        };
        (pads, zero)
    };
    let rank = pads.len() / 2;
    if !zero || rank < 3 || pads.len() % 2 != 0 || pads.iter().any(|&p| p < 0) {
        return None;
    }
    if pads[0] != 0 || pads[1] != 0 || pads[rank] != 0 || pads[rank + 1] != 0 {
        return None;
    }
    let mut spatial = pads[2..rank].to_vec();
    spatial.extend_from_slice(&pads[rank + 2..]);
    Some(spatial)
}

/// Whether `consumer` can take `spatial` extra padding on its input.
fn accepts_pads(g: &Graph, consumer: NodeId, dims: usize) -> Option<Vec<i64>> {
    let node = g.node(consumer);
    if !node.domain.is_empty() {
        return None;
    }
    match node.op_type.as_str() {
        "Conv" => {}
        "AveragePool" => {
            let counts = matches!(node.attr("count_include_pad"), Some(AttrValue::Int(1)));
            let ceil = matches!(node.attr("ceil_mode"), Some(AttrValue::Int(c)) if *c != 0);
            if !counts || ceil {
                return None;
            }
        }
        _ => return None,
    }
    let explicit = match node.attr("auto_pad") {
        None => true,
        Some(AttrValue::String(s)) => s == b"NOTSET",
        _ => false,
    };
    let valid = matches!(node.attr("auto_pad"), Some(AttrValue::String(s)) if s == b"VALID");
    match node.attr("pads") {
        _ if valid => Some(vec![0; 2 * dims]),
        Some(AttrValue::Ints(p)) if explicit && p.len() == 2 * dims => Some(p.clone()),
        None if explicit => Some(vec![0; 2 * dims]),
        _ => None,
    }
}

impl Pass for FoldPad {
    fn name(&self) -> &'static str {
        "fold-pad"
    }

    fn run(&self, model: &mut Model, cx: &mut PassContext) -> Result<bool, String> {
        let opset = model.opset_version("").unwrap_or(1);
        let g = &mut model.graph;
        let order = crate::util::order(g)?;
        let mut changed = false;
        for pad in order {
            let Some(spatial) = spatial_zero_pads(g, pad, opset) else {
                continue;
            };
            let node = g.node(pad);
            let (Some(x), [Some(out)]) = (node.inputs().first().copied().flatten(), node.outputs())
            else {
                continue;
            };
            let out = *out;
            if g.value(out).is_graph_output() {
                continue;
            }
            let [(consumer, 0)] = g.consumers(out)[..] else {
                continue;
            };
            let dims = spatial.len() / 2;
            let Some(mut pads) = accepts_pads(g, consumer, dims) else {
                continue;
            };
            if !cx.allow_rewrite() {
                continue;
            }
            for d in 0..dims {
                pads[d] += spatial[d];
                pads[d + dims] += spatial[d + dims];
            }
            let node = g.node_mut(consumer).map_err(|e| e.to_string())?;
            node.attrs
                .retain(|a| a.name != "auto_pad" && a.name != "pads");
            node.attrs.push(qgraph_ir::Attribute {
                name: "pads".into(),
                value: AttrValue::Ints(pads),
                doc: String::new(),
            });
            g.set_node_input(consumer, 0, Some(x))
                .map_err(|e| e.to_string())?;
            let removed = g.remove_node(pad).map_err(|e| e.to_string())?;
            g.remove_value(out).map_err(|e| e.to_string())?;
            // The pads and value inputs, if nothing else reads them.
            for v in removed.inputs()[1..].iter().flatten() {
                if !g.contains_value(*v) {
                    continue;
                }
                let val = g.value(*v);
                if !g.is_used(*v) && !val.is_graph_input() && !val.is_graph_output() {
                    if let Some((p, _)) = g.producer(*v) {
                        // A Constant node feeding only this Pad goes too.
                        if g.node(p).op_type == "Constant" && g.node(p).outputs().len() == 1 {
                            g.remove_node(p).map_err(|e| e.to_string())?;
                        } else {
                            continue;
                        }
                    }
                    g.remove_value(*v).map_err(|e| e.to_string())?;
                }
            }
            changed = true;
        }
        Ok(changed)
    }
}
