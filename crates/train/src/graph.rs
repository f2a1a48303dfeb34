//! The training graph: a copy of the model in which every
//! QuantizeLinear → DequantizeLinear pair (with the Clip that holds a
//! narrow grid's activations) is one `qgraph.train.FakeQuantize` node on
//! the pair's integer grid, so that gradients reach the input and the
//! scale. It lists what training changes: trainable values, the
//! quantizers and how their scales move, and the running statistics of
//! batch normalization. Exporting writes those values back into the
//! original model by name, so the result is the original graph with new
//! numbers.

use crate::TrainError;
use qgraph_eval::TRAINING_DOMAIN;
use qgraph_ir::{AttrValue, DataType, Graph, Model, NewNode, NodeId, Tensor, ValueId};
use qgraph_passes::GRID_KEY;

/// How a quantizer's scale changes during training.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleRule {
    /// Learned by gradient: LSQ's step size (Esser et al. 2020).
    Lsq,
    /// Learned by gradient: PACT's clipping level (Choi et al. 2018).
    Pact,
    /// Follows the values: a weight's scale from its current extremes, an
    /// activation's from an exponential moving average of the batches'
    /// extremes (Jacob et al. 2018).
    Track,
}

impl ScaleRule {
    pub fn learned(self) -> bool {
        self != ScaleRule::Track
    }
}

/// One fake quantization of the training graph.
#[derive(Clone, Debug)]
pub struct Quantizer {
    /// The FakeQuantize node (named as the QuantizeLinear it replaces).
    pub node: NodeId,
    /// The value it quantizes.
    pub input: ValueId,
    pub scale: ValueId,
    pub zero_point: Option<ValueId>,
    pub qmin: i64,
    pub qmax: i64,
    /// Per-channel along this axis, else one scale.
    pub axis: Option<usize>,
    /// Whether it quantizes a weight (a trainable initializer).
    pub weight: bool,
    pub rule: ScaleRule,
    /// The names of the Clip bounds that hold its grid in the original
    /// model, recomputed from the scale on export.
    pub clip_bounds: Option<(String, String)>,
}

/// The running statistics of a BatchNormalization.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    pub node: NodeId,
    pub mean: ValueId,
    pub var: ValueId,
    /// ONNX's momentum: `running = running * momentum + batch * (1 - momentum)`.
    pub momentum: f32,
}

/// What a trainable value is, for weight decay and learning rates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// A weight of Conv, ConvTranspose, Gemm or MatMul.
    Weight,
    /// A bias, or a batch normalization's scale or shift.
    Bias,
    /// A learned quantization scale.
    Scale,
}

#[derive(Clone, Debug)]
pub struct Param {
    pub value: ValueId,
    pub kind: ParamKind,
}

/// A model prepared for training.
pub struct TrainingGraph {
    pub model: Model,
    pub params: Vec<Param>,
    pub quantizers: Vec<Quantizer>,
    pub batch_norms: Vec<BatchNorm>,
}

/// How scales learn, from the scheme named in the model's metadata
/// (`qgraph.scheme`): `lsq-*` learns every scale by LSQ, `pact-*` the
/// activations' by PACT, everything else tracks the values.
pub fn scale_rules(model: &Model) -> (ScaleRule, ScaleRule) {
    let scheme = model
        .meta
        .iter()
        .find(|(k, _)| k == "qgraph.scheme")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    if scheme.starts_with("lsq-") {
        (ScaleRule::Lsq, ScaleRule::Lsq)
    } else if scheme.starts_with("pact-") {
        (ScaleRule::Track, ScaleRule::Pact)
    } else {
        (ScaleRule::Track, ScaleRule::Track)
    }
}

fn ir_err(e: qgraph_ir::IrError) -> TrainError {
    TrainError::Graph(e.to_string())
}

/// The integer range a QuantizeLinear saturates to: its `qgraph.grid`
/// metadata for grids below 8 bits, else its output type's range.
fn grid_of(g: &Graph, q: NodeId) -> Result<(i64, i64), TrainError> {
    let node = g.node(q);
    if let Some((_, text)) = node.meta.iter().find(|(k, _)| k == GRID_KEY) {
        let parsed = text
            .split_once(',')
            .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)));
        return parsed.ok_or_else(|| {
            TrainError::Graph(format!(
                "{}: {GRID_KEY} '{text}' is not 'qmin,qmax'",
                g.describe_node(q)
            ))
        });
    }
    let dtype = match node.inputs().get(2).copied().flatten() {
        Some(z) => g.initializer(z).map(|i| i.tensor.dtype()).ok_or_else(|| {
            TrainError::Graph(format!(
                "{}: the zero point is not a constant",
                g.describe_node(q)
            ))
        })?,
        None => DataType::U8,
    };
    dtype
        .int_range()
        .map(|(lo, hi)| (lo as i64, hi as i64))
        .ok_or_else(|| {
            TrainError::Graph(format!(
                "{}: quantizing to {dtype} is not supported in training",
                g.describe_node(q)
            ))
        })
}

/// A constant scalar f32 input of a node.
fn constant_scalar(g: &Graph, v: Option<ValueId>) -> Option<f32> {
    match &g.initializer(v?)?.tensor {
        Tensor::F32(a) if a.len() == 1 => a.iter().next().copied(),
        _ => None,
    }
}

impl TrainingGraph {
    /// Prepares `model` for training: Q/DQ pairs become FakeQuantize
    /// nodes, and every f32 initializer that is a weight or bias of a
    /// weighted op, or a scale or shift of a batch normalization, becomes
    /// trainable, as do the scales the scheme learns.
    pub fn prepare(model: &Model) -> Result<TrainingGraph, TrainError> {
        let (weight_rule, activation_rule) = scale_rules(model);
        let mut model = model.clone();
        model.set_opset_version(TRAINING_DOMAIN, 1);
        let g = &mut model.graph;
        let order = g
            .topo_order()
            .map_err(|_| TrainError::Graph("the graph has a cycle".into()))?;
        let mut quantizers = Vec::new();
        for &q in &order {
            if !g.contains_node(q) {
                continue;
            }
            let node = g.node(q);
            if node.op_type != "QuantizeLinear" || !node.domain.is_empty() {
                continue;
            }
            quantizers.extend(fake_quantizer(g, q)?);
        }
        let g = &model.graph;
        let trainable = |v: Option<ValueId>| {
            v.filter(|&v| matches!(g.initializer(v).map(|i| &i.tensor), Some(Tensor::F32(_))))
        };
        let mut params: Vec<Param> = Vec::new();
        let mut add = |v: Option<ValueId>, kind: ParamKind| {
            if let Some(v) = v {
                if !params.iter().any(|p| p.value == v) {
                    params.push(Param { value: v, kind });
                }
            }
        };
        // A weight may reach its op through a FakeQuantize.
        let through_quantizer = |v: Option<ValueId>| -> Option<ValueId> {
            let v = v?;
            match g.producer(v) {
                Some((p, _)) if g.node(p).op_type == "FakeQuantize" => g.node(p).inputs()[0],
                _ => Some(v),
            }
        };
        let mut batch_norms = Vec::new();
        // The rewrite above replaced only Q/DQ pairs (and Clips): the
        // weighted ops are where they were in the order.
        for n in order.into_iter().filter(|&n| g.contains_node(n)) {
            let node = g.node(n);
            if !node.domain.is_empty() {
                continue;
            }
            let input = |k: usize| node.inputs().get(k).copied().flatten();
            match node.op_type.as_str() {
                "Conv" | "ConvTranspose" | "Gemm" | "MatMul" => {
                    add(trainable(through_quantizer(input(1))), ParamKind::Weight);
                    if node.op_type != "MatMul" {
                        add(trainable(through_quantizer(input(2))), ParamKind::Bias);
                    }
                }
                "BatchNormalization" => {
                    add(trainable(input(1)), ParamKind::Bias);
                    add(trainable(input(2)), ParamKind::Bias);
                    if let (Some(mean), Some(var)) = (trainable(input(3)), trainable(input(4))) {
                        let momentum = match node.attr("momentum") {
                            Some(AttrValue::Float(m)) => *m,
                            _ => 0.9,
                        };
                        batch_norms.push(BatchNorm {
                            node: n,
                            mean,
                            var,
                            momentum,
                        });
                    }
                }
                _ => {}
            }
        }
        for q in &mut quantizers {
            q.weight = params
                .iter()
                .any(|p| p.value == q.input && p.kind == ParamKind::Weight);
            q.rule = if q.weight {
                weight_rule
            } else {
                activation_rule
            };
        }
        for q in &quantizers {
            if q.rule.learned() && !params.iter().any(|p| p.value == q.scale) {
                params.push(Param {
                    value: q.scale,
                    kind: ParamKind::Scale,
                });
            }
        }
        // The method attribute follows the final rule.
        for q in &quantizers {
            let method = if q.rule == ScaleRule::Pact {
                "pact"
            } else {
                "lsq"
            };
            let node = model.graph.node_mut(q.node).map_err(ir_err)?;
            node.attrs.push(qgraph_ir::Attribute {
                name: "method".into(),
                value: AttrValue::String(method.as_bytes().to_vec()),
                doc: String::new(),
            });
        }
        Ok(TrainingGraph {
            model,
            params,
            quantizers,
            batch_norms,
        })
    }

    /// The original model with the trained values: every value of the
    /// training graph in `values` is written to the initializer of the
    /// same name, and the Clip bounds of narrow grids follow their scales.
    pub fn export(
        &self,
        original: &Model,
        values: &std::collections::HashMap<ValueId, Tensor>,
    ) -> Result<Model, TrainError> {
        let mut out = original.clone();
        let tg = &self.model.graph;
        let g = &mut out.graph;
        let set = |g: &mut Graph, name: &str, t: Tensor| -> Result<(), TrainError> {
            let Some(v) = g.value_by_name(name) else {
                return Ok(());
            };
            let Some(init) = g.initializer_mut(v).map_err(ir_err)? else {
                return Ok(());
            };
            if init.tensor.dtype() != t.dtype() || init.tensor.shape() != t.shape() {
                return Err(TrainError::Graph(format!(
                    "'{name}': the trained value is {} {:?}, the model's {} {:?}",
                    t.dtype(),
                    t.shape(),
                    init.tensor.dtype(),
                    init.tensor.shape()
                )));
            }
            init.tensor = t;
            Ok(())
        };
        let mut ids: Vec<&ValueId> = values.keys().collect();
        ids.sort();
        for v in ids {
            set(g, tg.value(*v).name(), values[v].clone())?;
        }
        for q in &self.quantizers {
            let Some((lo_name, hi_name)) = &q.clip_bounds else {
                continue;
            };
            let scale = values
                .get(&q.scale)
                .or_else(|| tg.initializer(q.scale).map(|i| &i.tensor));
            let zero = q.zero_point.and_then(|z| {
                values
                    .get(&z)
                    .or_else(|| tg.initializer(z).map(|i| &i.tensor))
            });
            let s = scale
                .and_then(|t| t.to_f64_vec())
                .and_then(|v| v.first().copied());
            let z = zero
                .and_then(|t| t.to_f64_vec())
                .and_then(|v| v.first().copied())
                .unwrap_or(0.0);
            let Some(s) = s else { continue };
            // As QuantizeLinear's grid ends dequantize: (q - z) * s in f32.
            let lo = ((q.qmin - z as i64) as f32) * s as f32;
            let hi = ((q.qmax - z as i64) as f32) * s as f32;
            set(g, lo_name, Tensor::scalar_f32(lo))?;
            set(g, hi_name, Tensor::scalar_f32(hi))?;
        }
        Ok(out)
    }
}

/// Replaces the Q/DQ pair starting at `q` by a FakeQuantize, when `q`'s
/// output goes to one DequantizeLinear with the same scale and zero point.
fn fake_quantizer(g: &mut Graph, q: NodeId) -> Result<Option<Quantizer>, TrainError> {
    let node = g.node(q).clone();
    let (Some(source), Some(scale)) = (node.inputs()[0], node.inputs().get(1).copied().flatten())
    else {
        return Ok(None);
    };
    let zero_point = node.inputs().get(2).copied().flatten();
    let Some(quantized) = node.outputs()[0] else {
        return Ok(None);
    };
    let readers = g.consumers(quantized);
    let [(dq, _)] = readers.as_slice() else {
        return Ok(None);
    };
    let dq = *dq;
    let dq_node = g.node(dq).clone();
    if dq_node.op_type != "DequantizeLinear"
        || g.value(quantized).is_graph_output()
        || dq_node.inputs().get(1).copied().flatten() != Some(scale)
        || dq_node.inputs().get(2).copied().flatten() != zero_point
        || dq_node.attr("block_size").is_some()
    {
        return Ok(None);
    }
    if g.initializer(scale).is_none() {
        return Err(TrainError::Graph(format!(
            "{}: the scale is not a constant",
            g.describe_node(q)
        )));
    }
    let (qmin, qmax) = grid_of(g, q)?;
    let axis = match (
        node.attr("axis"),
        &g.initializer(scale).map(|i| i.tensor.len()),
    ) {
        (_, Some(1)) => None,
        (Some(AttrValue::Int(a)), _) => Some(*a),
        (None, _) => Some(1),
        _ => None,
    };
    let rank = match g.value(source).effective_type() {
        Some(qgraph_ir::ValueType::Tensor(t)) => t.shape.as_ref().map(|s| s.len()),
        _ => None,
    };
    let axis = match (axis, rank) {
        (Some(a), Some(r)) if a < 0 => Some((a + r as i64) as usize),
        (Some(a), _) if a < 0 => {
            return Err(TrainError::Graph(format!(
                "{}: a negative axis on a value of unknown rank",
                g.describe_node(q)
            )))
        }
        (Some(a), _) => Some(a as usize),
        (None, _) => None,
    };
    // The Clip that holds a narrow grid's activations, when it serves only
    // this quantizer: the FakeQuantize saturates there itself.
    let mut input = source;
    let mut clip = None;
    if let Some((c, _)) = g.producer(source) {
        let cn = g.node(c);
        let bounds = (
            cn.inputs().get(1).copied().flatten(),
            cn.inputs().get(2).copied().flatten(),
        );
        // Only a Clip to the grid's own ends: any other clamps more than
        // the quantizer and stays.
        let s = constant_scalar(g, Some(scale));
        let z = zero_point
            .and_then(|z| g.initializer(z))
            .and_then(|i| i.tensor.to_f64_vec())
            .and_then(|v| v.first().copied())
            .unwrap_or(0.0);
        let level = |b: Option<f32>| b.zip(s).map(|(b, s)| (b / s).round_ties_even() as f64 + z);
        // Only the Clip `insert` adds for a narrow grid (its Q carries the
        // grid), with bounds of its own: a model's own Relu6 whose bounds
        // happen to be the grid's ends stays, as do bounds other nodes read.
        let own_bounds = [bounds.0, bounds.1]
            .iter()
            .all(|b| b.is_some_and(|b| g.consumers(b).len() == 1));
        if node.meta.iter().any(|(k, _)| k == GRID_KEY)
            && own_bounds
            && cn.op_type == "Clip"
            && cn.domain.is_empty()
            && g.consumers(source).len() == 1
            && !g.value(source).is_graph_output()
            && level(constant_scalar(g, bounds.0)) == Some(qmin as f64)
            && level(constant_scalar(g, bounds.1)) == Some(qmax as f64)
        {
            if let (Some(x), Some(lo), Some(hi)) = (cn.inputs()[0], bounds.0, bounds.1) {
                clip = Some((c, lo, hi));
                input = x;
            }
        }
    }
    let output = dq_node.outputs()[0]
        .ok_or_else(|| TrainError::Graph(format!("{}: no output", g.describe_node(dq))))?;
    let name = node.name().to_string();
    g.remove_node(dq).map_err(ir_err)?;
    g.remove_node(q).map_err(ir_err)?;
    g.remove_value(quantized).map_err(ir_err)?;
    let mut clip_bounds = None;
    if let Some((c, lo, hi)) = clip {
        clip_bounds = Some((
            g.value(lo).name().to_string(),
            g.value(hi).name().to_string(),
        ));
        g.remove_node(c).map_err(ir_err)?;
        g.remove_value(source).map_err(ir_err)?;
        for b in [lo, hi] {
            if g.consumers(b).is_empty() && !g.value(b).is_graph_output() {
                g.remove_value(b).map_err(ir_err)?;
            }
        }
    }
    let mut inputs = vec![input, scale];
    inputs.extend(zero_point);
    let mut fake = NewNode::new("FakeQuantize")
        .named(name)
        .domain(TRAINING_DOMAIN)
        .inputs(inputs)
        .outputs([output])
        .attr("qmin", AttrValue::Int(qmin))
        .attr("qmax", AttrValue::Int(qmax));
    if let Some(a) = axis {
        fake = fake.attr("axis", AttrValue::Int(a as i64));
    }
    let fake = g.add_node(fake).map_err(ir_err)?;
    Ok(Some(Quantizer {
        node: fake,
        input,
        scale,
        zero_point,
        qmin,
        qmax,
        axis,
        // Set by `prepare` once the weights are known.
        weight: false,
        rule: ScaleRule::Track,
        clip_bounds,
    }))
}
