//! `fold-weight-quant`: stores quantized weights as integers. A
//! QuantizeLinear whose input, scale and zero point are constants is run
//! once, here, and replaced by its integer output as an initializer, which
//! the DequantizeLinear after it then reads: the Q/DQ graph computes the same
//! values (the same QuantizeLinear arithmetic, done ahead of time), and the
//! file holds int8 weights instead of float ones (the float initializer goes
//! when nothing else reads it).
//!
//! With `int4=true`, a weight whose integers all lie on a 4-bit grid (int8
//! holding [-8, 7], uint8 holding [0, 15]) and whose zero point is a
//! constant becomes int4/uint4, packed two to a byte, low nibble first; its
//! DequantizeLinear then needs opset 21, and the model's default-domain
//! import is raised to 21 when every operator in it reads the same at both
//! versions (see `opset_upgrade`), or the pass fails naming the one that
//! does not.

use crate::{util, Params, Pass, PassContext};
use qgraph_ir::{DataType, Graph, Model, NodeId, Tensor};

pub struct FoldWeightQuant {
    pub int4: bool,
}

impl FoldWeightQuant {
    pub fn from_params(mut p: Params) -> Result<Box<dyn Pass>, String> {
        let int4 = match p.take("int4").as_deref() {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => return Err(format!("int4 must be true or false, not '{other}'")),
        };
        p.finish(&["int4"])?;
        Ok(Box::new(FoldWeightQuant { int4 }))
    }
}

/// A QuantizeLinear of the default domain with constant input, scale and
/// zero point.
fn constant_quantize(g: &Graph, n: NodeId) -> bool {
    let node = g.node(n);
    node.domain.is_empty()
        && node.op_type == "QuantizeLinear"
        && node.inputs().len() >= 2
        && node
            .inputs()
            .iter()
            .all(|v| v.is_none_or(|v| util::constant(g, Some(v)).is_some()))
        && node.inputs()[0].is_some()
}

/// The integers of `t` as int4/uint4 when they fit 4 bits.
fn narrowed(t: &Tensor) -> Option<Tensor> {
    let (values, dtype): (Vec<i128>, DataType) = match t {
        Tensor::I8(a) if a.iter().all(|&v| (-8..=7).contains(&v)) => {
            (a.iter().map(|&v| v as i128).collect(), DataType::I4)
        }
        Tensor::U8(a) if a.iter().all(|&v| v <= 15) => {
            (a.iter().map(|&v| v as i128).collect(), DataType::U4)
        }
        _ => return None,
    };
    Tensor::from_ints(dtype, t.shape(), &values).ok()
}

impl Pass for FoldWeightQuant {
    fn name(&self) -> &'static str {
        "fold-weight-quant"
    }

    fn run(&self, model: &mut Model, cx: &mut PassContext) -> Result<bool, String> {
        let opset = model.opset_version("").unwrap_or(1);
        let order = util::order(&model.graph)?;
        let mut changed = false;
        let mut packed_any = false;
        for n in order {
            let g = &model.graph;
            if !constant_quantize(g, n) {
                continue;
            }
            let node = g.node(n);
            let Some(Some(out)) = node.outputs().first().copied() else {
                continue;
            };
            if g.value(out).is_graph_output() {
                continue;
            }
            let inputs: Vec<Option<&Tensor>> = node
                .inputs()
                .iter()
                .map(|v| v.and_then(|v| util::constant(g, Some(v))))
                .collect();
            let result = qgraph_eval::run_node(g, n, opset, &inputs)
                .map_err(|e| format!("{}: {e}", g.describe_node(n)))?;
            let Some(mut q) = result.into_iter().next() else {
                continue;
            };
            // int4 also needs the zero point stored as int4 by every reader.
            let zero = node.inputs().get(2).copied().flatten();
            let readers = g.consumers(out);
            let repack_zero = self.int4
                && readers.iter().all(|&(c, slot)| {
                    let r = g.node(c);
                    slot == 0
                        && r.domain.is_empty()
                        && r.op_type == "DequantizeLinear"
                        && r.inputs().get(2).copied().flatten() == zero
                });
            let mut packed = None;
            if repack_zero {
                let zero_t = zero.and_then(|z| util::constant(g, Some(z)));
                if let (Some(nq), Some(nz)) = (narrowed(&q), zero_t.and_then(narrowed)) {
                    packed = Some((nq, nz));
                }
            }
            if !cx.allow_rewrite() {
                break;
            }
            let g = &mut model.graph;
            if let Some((nq, nz)) = packed {
                q = nq;
                // A zero point read by other nodes too (besides this
                // QuantizeLinear, which goes) gets its own copy.
                let z = zero.ok_or("an int4 weight without zero point")?;
                let others = g
                    .consumers(z)
                    .iter()
                    .any(|(c, _)| *c != n && !readers.iter().any(|(r, _)| r == c));
                if others {
                    let name = g.unique_value_name(&format!("{}_int4", g.value(z).name()));
                    let copy = g.add_initializer(name, nz).map_err(|e| e.to_string())?;
                    for &(c, _) in &readers {
                        g.set_node_input(c, 2, Some(copy))
                            .map_err(|e| e.to_string())?;
                    }
                } else {
                    util::set_constant(g, z, nz)?;
                }
                packed_any = true;
            }
            g.remove_node(n).map_err(|e| e.to_string())?;
            util::set_constant(g, out, q)?;
            changed = true;
        }
        if packed_any && opset < 21 {
            crate::opset_upgrade::raise_default_opset(model, 21)?;
        }
        Ok(changed)
    }
}
