//! `qgraph freeze`: from a Q/DQ graph that simulates quantization to the
//! graph a runtime deploys, and `qgraph verify`, the proof that the two
//! compute the same.
//!
//! Freezing is a pass pipeline per target (see [`pipeline`]); every pass
//! keeps the graph's function, and the driver verifies the model after
//! each.

use crate::data::{Dataset, Norm};
use qgraph_eval::Evaluator;
use qgraph_ir::{AttrValue, Graph, Model, Tensor, TensorType, ValueId, ValueType};
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

/// The metadata key under which `qgraph insert` records its placement.
pub const PLACEMENT_KEY: &str = "qgraph.placement";

/// What to tell a user whose model cannot become integer.
const INTEGER_FIX: &str = "insert with ONNX Runtime's placement, which quantizes the outputs \
     of weighted ops too: `qgraph insert --placement ort ...`, then freeze that model";

/// Freezes `model` for `target`. A float model (no QuantizeLinear or
/// DequantizeLinear), and a model that an integer target cannot make
/// integer (TensorRT's placement quantizes only the inputs of weighted
/// ops), are refused with the fix; the latter is found after the passes
/// ran, so `model` may then be changed.
pub fn freeze(model: &mut Model, target: Target, int4: Int4) -> Result<Frozen, crate::Error> {
    let g = &model.graph;
    let quantized = g.node_ids().into_iter().any(|n| {
        matches!(
            g.node(n).op_type.as_str(),
            "QuantizeLinear" | "DequantizeLinear"
        )
    });
    if !quantized {
        return Err(
            "has no QuantizeLinear or DequantizeLinear: nothing to freeze (quantize it first: \
             `qgraph insert --scheme int8 MODEL --calib DATA`)"
                .into(),
        );
    }
    let integer = matches!(target, Target::Integer | Target::IntegerOnnx);
    if integer && crate::meta_value(model, PLACEMENT_KEY) == Some("tensorrt") {
        return Err(format!(
            "was inserted with TensorRT's placement, which an integer target cannot freeze: \
             {INTEGER_FIX}"
        )
        .into());
    }
    let mut notes = Vec::new();
    let blocker = qgraph_passes::opset_upgrade::opset_raise_blocker(model, 21);
    let int4 = match (int4, blocker) {
        (Int4::Never, _) => false,
        (Int4::Always, None) => true,
        (Int4::Always, Some(why)) => return Err(format!("int4 weights: {why}").into()),
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
    let lowered = report
        .runs
        .iter()
        .any(|&(name, changed)| name == "lower-to-integer" && changed);
    if integer && !lowered {
        return Err(format!(
            "no operator could be made integer (no weighted op has quantized inputs, weights \
             and output): {INTEGER_FIX}"
        )
        .into());
    }
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

/// Runs `reference` and `frozen` on `samples` of `data`, `batch` at a time,
/// and compares each output, and each quantized tensor op by op (see
/// [`OpAgreement`]). Per batch, three runs of the evaluator, each as it
/// runs any batch (groups of samples in parallel when the graph keeps
/// samples apart): the reference, returning its quantized tensors too; the
/// frozen model; the frozen model's ops on those tensors. Memory holds one
/// batch's quantized tensors, whatever the number of samples.
pub fn verify(
    reference: &Model,
    frozen: &Model,
    data: &Dataset,
    samples: &[usize],
    norm: Norm,
    batch: usize,
    mut progress: impl FnMut(usize),
) -> Result<Verification, crate::Error> {
    data.check_norm(norm)?;
    let (rg, fg) = (&reference.graph, &frozen.graph);
    if rg.outputs().len() != fg.outputs().len() {
        return Err(format!(
            "the models have {} and {} outputs",
            rg.outputs().len(),
            fg.outputs().len()
        )
        .into());
    }
    let ops_check = OpCheck::new(reference, frozen)?;
    let rev = Evaluator::new(&ops_check.reference).map_err(|e| format!("reference: {e}"))?;
    let fev = Evaluator::new(frozen).map_err(|e| format!("frozen model: {e}"))?;
    let oev = ops_check
        .fed
        .as_ref()
        .map(Evaluator::new)
        .transpose()
        .map_err(|e| format!("frozen model: {e}"))?;
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
    let mut ops = OpAgreement::default();
    let mut done = 0;
    for (b, chunk) in samples.chunks(batch.max(1)).enumerate() {
        let x = data.select(chunk, norm)?;
        let mut r = rev
            .run(vec![x.clone()])
            .map_err(|e| format!("reference: {e}"))?;
        // The reference's quantized tensors follow its outputs.
        let known = r.split_off(rg.outputs().len());
        let f = fev
            .run(vec![x.clone()])
            .map_err(|e| format!("frozen model: {e}"))?;
        if let Some(oev) = &oev {
            ops_check.compare(oev, x, known, b == 0, &mut ops)?;
        }
        for (i, (a, b)) in r.iter().zip(&f).enumerate() {
            let (Tensor::F32(a), Tensor::F32(b)) = (a, b) else {
                return Err(format!("output {i} is not f32 in both models").into());
            };
            if a.shape() != b.shape() {
                return Err(
                    format!("output {i} has shape {:?} and {:?}", a.shape(), b.shape()).into(),
                );
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

/// How one integer tensor compares with another of the same length.
struct Tally {
    equal: usize,
    within_one: usize,
    max_steps: i64,
}

fn tally<A, B>(a: &qgraph_ir::ndarray::ArrayD<A>, b: &qgraph_ir::ndarray::ArrayD<B>) -> Tally
where
    A: Copy + Into<i64>,
    B: Copy + Into<i64>,
{
    let mut t = Tally {
        equal: 0,
        within_one: 0,
        max_steps: 0,
    };
    let mut add = |x: A, y: B| {
        let d = (x.into() - y.into()).abs();
        t.equal += (d == 0) as usize;
        t.within_one += (d <= 1) as usize;
        t.max_steps = t.max_steps.max(d);
    };
    match (a.as_slice(), b.as_slice()) {
        (Some(a), Some(b)) => a.iter().zip(b).for_each(|(&x, &y)| add(x, y)),
        _ => a.iter().zip(b.iter()).for_each(|(&x, &y)| add(x, y)),
    }
    t
}

/// `want` and `got` compared element by element (in order), when both hold
/// 8- or 16-bit integers and as many of them.
fn compare_integers(want: &Tensor, got: &Tensor) -> Option<Tally> {
    macro_rules! integers {
        ($t:expr, $a:ident => $body:expr) => {
            match $t {
                Tensor::I8($a) => $body,
                Tensor::U8($a) => $body,
                Tensor::I16($a) => $body,
                Tensor::U16($a) => $body,
                _ => None,
            }
        };
    }
    if want.len() != got.len() {
        return None;
    }
    integers!(want, a => integers!(got, b => Some(tally(a, b))))
}

/// The op-by-op check: the frozen graph with each tensor the reference also
/// quantizes (same name) read from the reference instead (a graph input of
/// `fed`), and each such tensor it computes itself returned, so the
/// evaluator runs the frozen ops on the reference's tensors as it runs any
/// model.
struct OpCheck {
    /// The reference, returning after its outputs the tensors `fed` reads.
    reference: Model,
    /// The frozen graph cut at the shared tensors; `None` when no tensor
    /// is compared.
    fed: Option<Model>,
    /// Per required input of `fed`: the data (`None`), or the reference's
    /// extra output `k`.
    feeds: Vec<Option<usize>>,
    /// Per output of `fed`: its name and the reference's extra output it
    /// is compared with.
    compared: Vec<(String, usize)>,
}

impl OpCheck {
    fn new(reference: &Model, frozen: &Model) -> Result<OpCheck, String> {
        let (rg, fg) = (&reference.graph, &frozen.graph);
        let broken = |e: qgraph_ir::IrError| format!("frozen model: {e}");
        // The reference's quantized tensors that the frozen graph computes
        // too.
        let mut shared: Vec<String> = Vec::new();
        for n in rg.node_ids() {
            let node = rg.node(n);
            let Some(rv) = node.outputs().first().copied().flatten() else {
                continue;
            };
            if node.op_type != "QuantizeLinear" {
                continue;
            }
            let name = rg.value(rv).name();
            let computed = fg.value_by_name(name).is_some_and(|fv| {
                let val = fg.value(fv);
                val.initializer().is_none() && !val.is_graph_input() && fg.producer(fv).is_some()
            });
            if computed {
                shared.push(name.to_string());
            }
        }
        let index: HashMap<&str, usize> = shared
            .iter()
            .enumerate()
            .map(|(k, s)| (s.as_str(), k))
            .collect();
        // Those the frozen graph computes by an op of its own, in its order.
        let order = fg
            .topo_order()
            .map_err(|_| "the frozen model has a cycle".to_string())?;
        let mut compared: Vec<(String, usize)> = Vec::new();
        for n in order {
            let node = fg.node(n);
            if node.op_type == "QuantizeLinear" {
                continue;
            }
            for &v in node.outputs().iter().flatten() {
                let name = fg.value(v).name();
                if let Some(&k) = index.get(name) {
                    compared.push((name.to_string(), k));
                }
            }
        }
        let mut extended = reference.clone();
        if compared.is_empty() {
            return Ok(OpCheck {
                reference: extended,
                fed: None,
                feeds: Vec::new(),
                compared,
            });
        }
        let g = &mut extended.graph;
        let mut outputs = g.outputs().to_vec();
        outputs.extend(shared.iter().filter_map(|s| g.value_by_name(s)));
        g.set_outputs(outputs)
            .map_err(|e| format!("reference: {e}"))?;

        let info = qgraph_eval::shapes::infer(reference);
        let data_input = fg
            .inputs()
            .iter()
            .copied()
            .find(|&v| fg.value(v).initializer().is_none())
            .map(|v| fg.value(v).name().to_string());
        let mut fed = frozen.clone();
        let g = &mut fed.graph;
        let mut input_of: HashMap<String, usize> = HashMap::new();
        for (k, name) in shared.iter().enumerate() {
            let rv = rg.value_by_name(name).expect("listed from the reference");
            let ty = info
                .get(&rv)
                .map(|i| {
                    ValueType::Tensor(TensorType {
                        dtype: i.dtype,
                        shape: i.dims.clone(),
                    })
                })
                .or_else(|| rg.value(rv).effective_type());
            let v = g.value_by_name(name).expect("listed from the frozen graph");
            let input_name = g.unique_value_name(&format!("{name}.reference"));
            let input = g.add_input(input_name.clone(), ty).map_err(broken)?;
            g.replace_uses(v, input).map_err(broken)?;
            input_of.insert(input_name, k);
        }
        let outputs = compared
            .iter()
            .map(|(name, _)| g.value_by_name(name).expect("listed from the frozen graph"))
            .collect();
        g.set_outputs(outputs).map_err(broken)?;
        // Nodes nothing compared depends on need not run.
        Driver::new()
            .add(qgraph_passes::DeadCodeElimination)
            .run(&mut fed)
            .map_err(|e| format!("frozen model: {e}"))?;
        let g = &mut fed.graph;
        let (inputs, unused): (Vec<ValueId>, Vec<ValueId>) = g
            .inputs()
            .iter()
            .partition(|&&v| g.value(v).initializer().is_some() || g.is_used(v));
        g.set_inputs(inputs).map_err(broken)?;
        for v in unused {
            g.remove_value(v).map_err(broken)?;
        }
        let feeds = g
            .inputs()
            .iter()
            .filter(|&&v| g.value(v).initializer().is_none())
            .map(|&v| {
                let name = g.value(v).name();
                match input_of.get(name) {
                    Some(&k) => Ok(Some(k)),
                    None if Some(name) == data_input.as_deref() => Ok(None),
                    None => Err(format!("frozen model: input '{name}' has no data")),
                }
            })
            .collect::<Result<_, String>>()?;
        Ok(OpCheck {
            reference: extended,
            fed: Some(fed),
            feeds,
            compared,
        })
    }

    /// Adds one batch (input `x`, the reference's extra outputs `known`)
    /// to `result`; tensors are counted on the `first` batch.
    fn compare(
        &self,
        fed: &Evaluator,
        x: Tensor,
        known: Vec<Tensor>,
        first: bool,
        result: &mut OpAgreement,
    ) -> Result<(), String> {
        let mut known: Vec<Option<Tensor>> = known.into_iter().map(Some).collect();
        let mut x = Some(x);
        let mut inputs = Vec::with_capacity(self.feeds.len());
        for feed in &self.feeds {
            let t = match *feed {
                None => x.take(),
                // Kept when it is also compared.
                Some(k) if self.compared.iter().any(|c| c.1 == k) => known[k].clone(),
                Some(k) => known[k].take(),
            };
            inputs.push(t.ok_or("the data input is read twice")?);
        }
        let got = fed.run(inputs).map_err(|e| format!("frozen model: {e}"))?;
        for ((name, k), got) in self.compared.iter().zip(&got) {
            let Some(want) = &known[*k] else { continue };
            let Some(t) = compare_integers(want, got) else {
                continue;
            };
            result.tensors += first as usize;
            result.elements += want.len();
            result.equal += t.equal;
            result.within_one += t.within_one;
            if t.max_steps > result.max_steps {
                result.max_steps = t.max_steps;
                result.worst = name.clone();
            }
        }
        Ok(())
    }
}

/// `found` as a table (each output end to end, then the op-by-op line),
/// followed by what the figures mean, what is normal, and a verdict: the
/// text `qgraph verify` prints.
pub fn verify_table(found: &Verification) -> String {
    let mut text = format!(
        "{:<24} {:>10} {:>10} {:>12} {:>14} {:>8}\n",
        "output", "elements", "max LSB", "within 1 LSB", "max relative", "top-1"
    );
    let opt =
        |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
    for row in &found.outputs {
        text.push_str(&format!(
            "{:<24} {:>10} {:>10} {:>12} {:>14.3e} {:>8}\n",
            row.name,
            row.elements,
            opt(row.max_lsb, 2),
            row.within_one_lsb
                .map_or("-".to_string(), |v| format!("{:.3}%", v * 100.0)),
            row.max_relative,
            opt(row.top1, 4)
        ));
    }
    let ops = &found.ops;
    let share = |k: usize| 100.0 * k as f64 / ops.elements.max(1) as f64;
    if ops.tensors > 0 {
        text.push_str(&format!(
            "\nop by op (each op on the reference's own integer inputs): {} quantized tensors, \
             {:.4}% of elements equal, {:.4}% within 1 LSB, largest difference {} LSB{}\n",
            ops.tensors,
            share(ops.equal),
            share(ops.within_one),
            ops.max_steps,
            if ops.max_steps > 0 {
                format!(" ('{}')", ops.worst)
            } else {
                String::new()
            }
        ));
    }
    text.push_str(
        "\nWhat the figures mean
  End to end, both models run on the same samples and each output is compared:
    elements      values compared (samples x values per sample)
    max LSB       the largest difference, in steps (LSB) of the output's quantization grid:
                  the scale of the DequantizeLinear producing it, or, for a Conv/Gemm/MatMul
                  reading dequantized values (a classifier's logits), the step of its integer
                  sum, input scale x weight scale, far finer than an activation's step
    within 1 LSB  the share of elements at most one step apart
    max relative  the largest difference over the reference's largest |value|
    top-1         the share of samples whose highest-scoring class is the same in both
  Op by op, each quantized tensor that an op of the frozen model computes (the reference's
  tensor of the same name) is computed from the reference's own integer inputs instead of
  the frozen model's, and compared in steps of its integer grid (an op with a float
  output, such as a last Gemm giving logits, is not in it).

What is normal
  Op by op: every element equal or 1 LSB apart. The Q/DQ model sums in float and rounds
  once, at its next QuantizeLinear; the frozen model sums exact integers and requantizes.
  A value near a rounding boundary can go to neighbouring integers; more than 1 LSB means
  the frozen op computes something else.
  End to end: each one-step difference is an input of the next layer, where it moves more
  values across rounding boundaries, and so on through every later layer. In a deep network
  (tens of quantized layers) the last layers can differ in most elements, and an output by
  many steps (thousands when the step is an integer sum's) while every op is exact: this
  measures how far the quantized model moves under single rounding steps, not the freeze.
  For a classifier, top-1 agreement is what counts: near 1 when the model decides with
  margins wider than that drift. If many classes change, compare the Q/DQ model with the
  float one (`qgraph eval Q.onnx --ref FLOAT.onnx`): when that agreement is low too, the
  quantization itself is fragile, and its calibration or training is what to improve.
",
    );
    text.push('\n');
    if ops.tensors == 0 {
        text.push_str(
            "verdict: no op-by-op check (no op of the frozen model computes a tensor the \
             reference quantizes, under the same name); judge by the end-to-end figures\n",
        );
    } else if ops.max_steps <= 1 {
        text.push_str(&format!(
            "verdict: the frozen model computes what the Q/DQ model does, op by op ({} \
             quantized tensors, all within 1 LSB)\n",
            ops.tensors
        ));
        for row in &found.outputs {
            if let Some(t) = row.top1.filter(|&t| t < 1.0) {
                text.push_str(&format!(
                    "note: the top-1 class of '{}' differs on {:.2}% of samples; with every \
                     quantized tensor within 1 LSB op by op, that points to the quantized \
                     model's sensitivity to rounding rather than to the freeze\n",
                    row.name,
                    100.0 * (1.0 - t)
                ));
            }
        }
    } else {
        let over = ops.elements - ops.within_one;
        text.push_str(&format!(
            "warning: op by op, {over} elements ({:.4}%) differ by more than 1 LSB, up to {} \
             LSB in '{}': given the reference's inputs, the frozen model's op computes \
             something else there; a correct freeze stays within 1 LSB\n",
            share(over),
            ops.max_steps,
            ops.worst
        ));
    }
    text
}
