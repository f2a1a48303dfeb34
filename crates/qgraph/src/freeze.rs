//! `qgraph freeze`: from a Q/DQ graph that simulates quantization to the
//! graph a runtime deploys, and `qgraph verify`, the proof that the two
//! compute the same.
//!
//! Freezing is a pass pipeline per target (see [`pipeline`]); every pass
//! keeps the graph's function, and the driver verifies the model after
//! each.

use crate::data::{Dataset, Norm};
use qgraph_eval::Evaluator;
use qgraph_ir::{AttrValue, Graph, Model, Tensor, ValueId};
use qgraph_passes::Driver;
use std::collections::HashMap;

/// The runtime a frozen graph is shaped for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// TensorRT: integer weights behind DequantizeLinear, activation Q/DQ
    /// pairs where TensorRT's rules put them, DequantizeLinear moved through
    /// data-movement ops, float biases.
    TensorRt,
    /// ONNX Runtime's QDQ fusions: the same steps; the placement (from
    /// `qgraph insert --placement ort`) decides what it fuses.
    Ort,
    /// Integer operators between the input's QuantizeLinear and the output's
    /// DequantizeLinear.
    Integer,
    /// The same with operators of the ONNX standard only (no
    /// `com.microsoft` ones), for other runtimes such as tract: Gemm as a 1x1
    /// QLinearConv or MatMulInteger; Add, pooling and the like stay float
    /// between Q/DQ.
    IntegerOnnx,
}

impl Target {
    pub fn parse(name: &str) -> Result<Target, String> {
        match name {
            "tensorrt" => Ok(Target::TensorRt),
            "ort" => Ok(Target::Ort),
            "integer" => Ok(Target::Integer),
            "integer-onnx" => Ok(Target::IntegerOnnx),
            other => Err(format!(
                "unknown target '{other}'; the targets are tensorrt, ort, integer, integer-onnx"
            )),
        }
    }
}

/// The passes that freeze for `target`; `int4` packs 4-bit weights.
pub fn pipeline(target: Target, int4: bool) -> String {
    let fold = if int4 {
        "fold-weight-quant(int4=true)"
    } else {
        "fold-weight-quant"
    };
    let common = format!("{fold},commute-dequantize,remove-requantize");
    match target {
        Target::TensorRt | Target::Ort => format!("{common},dce"),
        Target::Integer => format!("{common},lower-to-integer,dce"),
        Target::IntegerOnnx => format!("{common},lower-to-integer(ops=onnx),dce"),
    }
}

/// Whether the model's scheme (metadata `qgraph.scheme`, left by `qgraph
/// insert`) puts weights on grids of 4 bits or fewer.
pub fn scheme_has_int4_weights(model: &Model) -> bool {
    model
        .meta
        .iter()
        .find(|(k, _)| k == "qgraph.scheme")
        .and_then(|(_, v)| qgraph_quant::Scheme::parse(v).ok())
        .is_some_and(|s| s.weights.grid.bits <= 4)
}

/// What `freeze` did.
#[derive(Clone, Debug, Default)]
pub struct Frozen {
    /// The passes that changed the model.
    pub changed: Vec<String>,
    /// Ops still computing in float between a DequantizeLinear and a
    /// QuantizeLinear, by type, with counts (integer target).
    pub float_ops: Vec<(String, usize)>,
    /// Decisions a user should know about.
    pub notes: Vec<String>,
}

/// How 4-bit weights are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Int4 {
    /// Packed when the scheme has weights of 4 bits or fewer and the model
    /// can move to opset 21; int8 otherwise, with a note.
    Auto,
    /// Packed, or an error saying why not.
    Always,
    Never,
}

/// Freezes `model` for `target`.
pub fn freeze(model: &mut Model, target: Target, int4: Int4) -> Result<Frozen, String> {
    let mut notes = Vec::new();
    let blocker = qgraph_passes::opset_upgrade::opset_raise_blocker(model, 21);
    let int4 = match (int4, blocker) {
        (Int4::Never, _) => false,
        (Int4::Always, None) => true,
        (Int4::Always, Some(why)) => return Err(format!("int4 weights: {why}")),
        (Int4::Auto, _) if !scheme_has_int4_weights(model) => false,
        (Int4::Auto, None) => true,
        (Int4::Auto, Some(why)) => {
            notes.push(format!("4-bit weights stay in int8: int4 storage {why}"));
            false
        }
    };
    let report = Driver::from_pipeline(&pipeline(target, int4))?
        .run(model)
        .map_err(|e| e.to_string())?;
    let target_name = match target {
        Target::TensorRt => "tensorrt",
        Target::Ort => "ort",
        Target::Integer => "integer",
        Target::IntegerOnnx => "integer-onnx",
    };
    model.meta.retain(|(k, _)| k != "qgraph.frozen");
    model
        .meta
        .push(("qgraph.frozen".to_string(), target_name.to_string()));
    Ok(Frozen {
        changed: report
            .runs
            .iter()
            .filter(|(_, changed)| *changed)
            .map(|(name, _)| name.to_string())
            .collect(),
        float_ops: if matches!(target, Target::Integer | Target::IntegerOnnx) {
            qgraph_passes::float_ops(&model.graph)
        } else {
            Vec::new()
        },
        notes,
    })
}

/// How one output of two models compares.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OutputAgreement {
    pub name: String,
    pub elements: usize,
    /// The largest difference in units of the output's quantization step
    /// (`None` when the output has no step to measure in).
    pub max_lsb: Option<f64>,
    /// The share of elements within one step.
    pub within_one_lsb: Option<f64>,
    /// The largest difference relative to the reference's largest |value|.
    pub max_relative: f64,
    /// Top-1 agreement over rows, for outputs of rank 2.
    pub top1: Option<f64>,
}

/// The quantization step of each element of output `v` of `g`, when it has
/// one: the scale of the DequantizeLinear producing it, or the product of
/// the input and weight scales of a Conv/Gemm/MatMul whose inputs are
/// dequantized (the step of its integer accumulator).
fn output_steps(g: &Graph, v: ValueId, shape: &[usize]) -> Option<Vec<f32>> {
    let (p, _) = g.producer(v)?;
    let node = g.node(p);
    let constant = |v: Option<ValueId>| -> Option<Vec<f32>> {
        let t = &g.value(v?).initializer()?.tensor;
        match t {
            Tensor::F32(a) => Some(a.iter().copied().collect()),
            _ => None,
        }
    };
    let dq_scale = |v: Option<ValueId>| -> Option<Vec<f32>> {
        let (d, _) = g.producer(v?)?;
        let dn = g.node(d);
        (dn.op_type == "DequantizeLinear").then_some(())?;
        constant(dn.inputs().get(1).copied().flatten())
    };
    let count: usize = shape.iter().product();
    let spread = |steps: Vec<f32>, axis: usize| -> Option<Vec<f32>> {
        if steps.len() == 1 {
            return Some(vec![steps[0]; count]);
        }
        let inner: usize = shape.get(axis + 1..)?.iter().product();
        let len = *shape.get(axis)?;
        (steps.len() == len).then(|| (0..count).map(|e| steps[(e / inner) % len]).collect())
    };
    match node.op_type.as_str() {
        "DequantizeLinear" => {
            let s = constant(node.inputs().get(1).copied().flatten())?;
            let axis = match node.attr("axis") {
                Some(AttrValue::Int(a)) if *a >= 0 => *a as usize,
                Some(AttrValue::Int(a)) => (shape.len() as i64 + a) as usize,
                _ => 1,
            };
            spread(s, axis)
        }
        "Conv" | "Gemm" | "MatMul" => {
            let xs = dq_scale(node.inputs().first().copied().flatten())?;
            let ws = dq_scale(node.inputs().get(1).copied().flatten())?;
            let x = *xs.first()?;
            spread(ws.iter().map(|w| w * x).collect(), 1)
        }
        _ => None,
    }
}

/// What `verify` found: each output end to end, and the quantized tensors
/// op by op.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Verification {
    pub outputs: Vec<OutputAgreement>,
    pub ops: OpAgreement,
}

/// Runs `reference` and `frozen` on `samples` of `data` and compares each
/// output, and each quantized tensor op by op (see [`OpAgreement`]); the
/// reference runs once per batch for both.
pub fn verify(
    reference: &Model,
    frozen: &Model,
    data: &Dataset,
    samples: &[usize],
    norm: Norm,
    batch: usize,
    mut progress: impl FnMut(usize),
) -> Result<Verification, String> {
    data.check_norm(norm)?;
    let rev = Evaluator::new(reference).map_err(|e| format!("reference: {e}"))?;
    let fev = Evaluator::new(frozen).map_err(|e| format!("frozen model: {e}"))?;
    let (rg, fg) = (&reference.graph, &frozen.graph);
    if rg.outputs().len() != fg.outputs().len() {
        return Err(format!(
            "the models have {} and {} outputs",
            rg.outputs().len(),
            fg.outputs().len()
        ));
    }
    struct Acc {
        elements: usize,
        max_lsb: Option<f64>,
        within: usize,
        max_diff: f64,
        max_ref: f64,
        rows: usize,
        agree: usize,
    }
    let mut acc: Vec<Acc> = rg
        .outputs()
        .iter()
        .map(|_| Acc {
            elements: 0,
            max_lsb: None,
            within: 0,
            max_diff: 0.0,
            max_ref: 0.0,
            rows: 0,
            agree: 0,
        })
        .collect();
    let mut has_steps = vec![true; acc.len()];
    let ops_check = OpCheck::new(reference, frozen)?;
    let mut ops = OpAgreement::default();
    let mut done = 0;
    for (b, chunk) in samples.chunks(batch.max(1)).enumerate() {
        let x = data.select(chunk, norm)?;
        // The reference's quantized tensors, by name, as it computes them.
        let mut known: HashMap<String, Tensor> = HashMap::new();
        let r = rev
            .run_observed(vec![x.clone()], &ops_check.watch, &mut |v, t| {
                known.insert(rg.value(v).name().to_string(), t.clone());
            })
            .map_err(|e| format!("reference: {e}"))?;
        let f = fev
            .run(vec![x.clone()])
            .map_err(|e| format!("frozen model: {e}"))?;
        ops_check.compare(&known, x, b == 0, &mut ops)?;
        for (i, (a, b)) in r.iter().zip(&f).enumerate() {
            let (Tensor::F32(a), Tensor::F32(b)) = (a, b) else {
                return Err(format!("output {i} is not f32 in both models"));
            };
            if a.shape() != b.shape() {
                return Err(format!(
                    "output {i} has shape {:?} and {:?}",
                    a.shape(),
                    b.shape()
                ));
            }
            let steps = output_steps(rg, rg.outputs()[i], a.shape())
                .or_else(|| output_steps(fg, fg.outputs()[i], a.shape()));
            has_steps[i] &= steps.is_some();
            let acc = &mut acc[i];
            for (e, (&x, &y)) in a.iter().zip(b.iter()).enumerate() {
                let d = (x as f64 - y as f64).abs();
                acc.max_diff = acc.max_diff.max(d);
                acc.max_ref = acc.max_ref.max((x as f64).abs());
                if let Some(s) = &steps {
                    let lsb = d / s[e] as f64;
                    acc.max_lsb = Some(acc.max_lsb.unwrap_or(0.0).max(lsb));
                    acc.within += (lsb <= 1.0 + 1e-6) as usize;
                }
            }
            acc.elements += a.len();
            if a.ndim() == 2 && a.shape()[1] > 1 {
                let rows = a.shape()[0];
                let (a, b) = (a.as_standard_layout(), b.as_standard_layout());
                let (a, b) = (
                    a.as_slice().expect("standard layout"),
                    b.as_slice().expect("standard layout"),
                );
                let (pa, pb) = (
                    crate::data::argmax_rows(rows, a),
                    crate::data::argmax_rows(rows, b),
                );
                acc.rows += rows;
                acc.agree += pa.iter().zip(&pb).filter(|(x, y)| x == y).count();
            }
        }
        done += chunk.len();
        progress(done);
    }
    let outputs = acc
        .into_iter()
        .enumerate()
        .map(|(i, a)| OutputAgreement {
            name: rg.value(rg.outputs()[i]).name().to_string(),
            elements: a.elements,
            max_lsb: a.max_lsb.filter(|_| has_steps[i]),
            within_one_lsb: (has_steps[i] && a.elements > 0)
                .then(|| a.within as f64 / a.elements as f64),
            max_relative: if a.max_ref > 0.0 {
                a.max_diff / a.max_ref
            } else {
                a.max_diff
            },
            top1: (a.rows > 0).then(|| a.agree as f64 / a.rows as f64),
        })
        .collect();
    Ok(Verification { outputs, ops })
}

/// Op by op: each quantized tensor of the frozen graph that the reference
/// also quantizes (same name), computed by the frozen graph's ops from the
/// reference's own integer inputs. End to end, a one-step difference at a
/// rounding tie (an integer op rounds its exact sum, the Q/DQ graph its f32
/// sum) travels and grows through the layers after it; this shows what each
/// op itself does.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OpAgreement {
    /// Quantized tensors compared.
    pub tensors: usize,
    pub elements: usize,
    /// Elements equal, and within one step.
    pub equal: usize,
    pub within_one: usize,
    /// The largest difference, in steps, and the tensor it is in.
    pub max_steps: i64,
    pub worst: String,
}

fn integers(t: &Tensor) -> Option<Vec<i64>> {
    match t {
        Tensor::I8(a) => Some(a.iter().map(|&v| v as i64).collect()),
        Tensor::U8(a) => Some(a.iter().map(|&v| v as i64).collect()),
        Tensor::I16(a) => Some(a.iter().map(|&v| v as i64).collect()),
        Tensor::U16(a) => Some(a.iter().map(|&v| v as i64).collect()),
        _ => None,
    }
}

/// The op-by-op check: the frozen graph run node by node, each input the
/// reference computed (same name) taken from the reference.
struct OpCheck<'m> {
    frozen: &'m Graph,
    opset: i64,
    order: Vec<qgraph_ir::NodeId>,
    /// The reference's quantized tensors.
    watch: Vec<ValueId>,
}

impl<'m> OpCheck<'m> {
    fn new(reference: &Model, frozen: &'m Model) -> Result<OpCheck<'m>, String> {
        let rg = &reference.graph;
        let watch = rg
            .node_ids()
            .into_iter()
            .filter(|&n| rg.node(n).op_type == "QuantizeLinear")
            .filter_map(|n| rg.node(n).outputs().first().copied().flatten())
            .collect();
        let order = frozen
            .graph
            .topo_order()
            .map_err(|_| "the frozen model has a cycle".to_string())?;
        Ok(OpCheck {
            frozen: &frozen.graph,
            opset: frozen.opset_version("").unwrap_or(1),
            order,
            watch,
        })
    }

    /// Adds one batch (input `x`, the reference's quantized tensors
    /// `known`) to `result`; tensors are counted on the `first` batch.
    fn compare(
        &self,
        known: &HashMap<String, Tensor>,
        x: Tensor,
        first: bool,
        result: &mut OpAgreement,
    ) -> Result<(), String> {
        let fg = self.frozen;
        let mut env: HashMap<ValueId, Tensor> = HashMap::new();
        if let Some(&input) = fg.inputs().first() {
            env.insert(input, x);
        }
        for &n in &self.order {
            let node = fg.node(n);
            let mut inputs: Vec<Option<Tensor>> = Vec::new();
            let mut ready = true;
            for v in node.inputs() {
                let Some(v) = *v else {
                    inputs.push(None);
                    continue;
                };
                let value = fg.value(v);
                let t = if let Some(i) = value.initializer() {
                    Some(i.tensor.clone())
                } else if let Some(t) = known.get(value.name()) {
                    Some(t.clone())
                } else {
                    env.get(&v).cloned()
                };
                ready &= t.is_some();
                inputs.push(t);
            }
            if !ready {
                continue;
            }
            let refs: Vec<Option<&Tensor>> = inputs.iter().map(Option::as_ref).collect();
            let outs = qgraph_eval::run_node(fg, n, self.opset, &refs)
                .map_err(|e| format!("frozen model: {e}"))?;
            for (v, t) in node.outputs().iter().zip(outs) {
                let Some(v) = *v else { continue };
                let name = fg.value(v).name();
                let want = known.get(name).and_then(integers);
                let got = integers(&t);
                if let (Some(want), Some(got)) = (want, got) {
                    if want.len() == got.len() && node.op_type != "QuantizeLinear" {
                        result.tensors += first as usize;
                        for (a, b) in want.iter().zip(&got) {
                            let d = (a - b).abs();
                            result.elements += 1;
                            result.equal += (d == 0) as usize;
                            result.within_one += (d <= 1) as usize;
                            if d > result.max_steps {
                                result.max_steps = d;
                                result.worst = name.to_string();
                            }
                        }
                    }
                }
                env.insert(v, t);
            }
        }
        Ok(())
    }
}
