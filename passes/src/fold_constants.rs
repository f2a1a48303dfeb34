//! `fold-constants`: evaluates every node whose inputs are all known before
//! the model runs, with qgraph's evaluator, and stores its outputs as
//! initializers under the same names. Constant nodes become initializers;
//! chains that compute pads or shapes from constants collapse. Then shape
//! computations are folded through shape inference (`qgraph_eval::shapes`):
//! an integer vector whose every element is known becomes a constant (a
//! Gather of a static dim out of a Shape), and a Reshape whose target is
//! known up to symbols that equal the input's dims at the same positions
//! (`[N, -1]` for an `[N, 1280, 1, 1]` input) gets the constant target with
//! 0 there (copy the input's dim), so the Shape chain that computed it dies
//! (run `dce` after).
//!
//! Not folded: QuantizeLinear and DequantizeLinear (they are what a QDQ
//! graph is made of), nodes reading a graph input (an initializer that is also a
//! graph input is a default the caller may override), nodes of other
//! domains or with subgraphs, random operators, operators the evaluator
//! does not run (left as they are), and outputs that would be larger than
//! `max-elements` and than the node's inputs together (a ConstantOfShape of
//! a large shape is cheaper to keep than to store).

use crate::{Params, Pass, PassContext};
use qgraph_ir::{AttrValue, Dim, Graph, Model, NodeId, Tensor, ValueType};

pub struct FoldConstants {
    pub max_elements: usize,
}

impl Default for FoldConstants {
    fn default() -> Self {
        FoldConstants {
            max_elements: 1 << 16,
        }
    }
}

impl FoldConstants {
    pub fn from_params(mut p: Params) -> Result<Box<dyn Pass>, String> {
        let max_elements = p.take_usize("max-elements", FoldConstants::default().max_elements)?;
        p.finish(&["max-elements"])?;
        Ok(Box::new(FoldConstants { max_elements }))
    }
}

/// Quantization nodes on constants are what a QDQ graph is made of (a
/// weight stored as integers behind a DequantizeLinear is what TensorRT and
/// ONNX Runtime fuse), so they are kept, as ONNX Runtime's folding keeps them.
const KEPT: &[&str] = &[
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
];

const RANDOM: &[&str] = &[
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
];

/// A Shape node's output when its input's declared shape is fully static.
fn static_shape(g: &Graph, n: NodeId) -> Option<Tensor> {
    let node = g.node(n);
    let input = node.inputs().first().copied().flatten()?;
    let Some(ValueType::Tensor(t)) = g.value(input).effective_type() else {
        return None;
    };
    let dims: Vec<i64> = t
        .shape?
        .iter()
        .map(|d| match d {
            Dim::Known(k) => Some(*k),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let r = dims.len() as i64;
    let bound = |name: &str, default: i64| -> i64 {
        let v = match node.attr(name) {
            Some(AttrValue::Int(i)) => *i,
            _ => default,
        };
        (if v < 0 { v + r } else { v }).clamp(0, r)
    };
    let (start, end) = (bound("start", 0), bound("end", r));
    let picked: Vec<i128> = dims[start as usize..end.max(start) as usize]
        .iter()
        .map(|&d| d as i128)
        .collect();
    Tensor::from_ints(qgraph_ir::DataType::I64, &[picked.len()], &picked).ok()
}

impl Pass for FoldConstants {
    fn name(&self) -> &'static str {
        "fold-constants"
    }

    fn run(&self, model: &mut Model, cx: &mut PassContext) -> Result<bool, String> {
        let opset = model.opset_version("").unwrap_or(1);
        let g = &mut model.graph;
        let order = crate::util::order(g)?;
        let mut changed = false;
        for n in order {
            let node = g.node(n);
            if !node.domain.is_empty()
                || RANDOM.contains(&node.op_type.as_str())
                || KEPT.contains(&node.op_type.as_str())
                || node
                    .attrs
                    .iter()
                    .any(|a| matches!(a.value, AttrValue::Graph(_) | AttrValue::Graphs(_)))
                || node.outputs().iter().all(Option::is_none)
            {
                continue;
            }
            let results = if node.op_type == "Shape" {
                match static_shape(g, n) {
                    Some(t) => vec![t],
                    None => continue,
                }
            } else {
                let args: Option<Vec<Option<&Tensor>>> = node
                    .inputs()
                    .iter()
                    .map(|v| match v {
                        None => Some(None),
                        Some(v) => crate::util::constant(g, Some(*v)).map(Some),
                    })
                    .collect();
                let Some(args) = args else { continue };
                let Ok(results) = qgraph_eval::run_node(g, n, opset, &args) else {
                    continue;
                };
                let input_size: usize = args.iter().flatten().map(|t| t.len()).sum();
                let limit = self.max_elements.max(input_size);
                if results.iter().any(|t| t.len() > limit) {
                    continue;
                }
                results
            };
            if results.len() < node.outputs().len() || !cx.allow_rewrite() {
                continue;
            }
            let outputs = node.outputs().to_vec();
            let removed = g.remove_node(n).map_err(|e| e.to_string())?;
            remove_orphaned_constants(g, removed.inputs())?;
            for (v, tensor) in outputs.iter().zip(results) {
                let Some(v) = *v else { continue };
                crate::util::set_constant(g, v, tensor)?;
            }
            changed = true;
        }
        changed |= fold_shape_computations(model, cx)?;
        Ok(changed)
    }
}

/// Removes the initializers among `inputs` (of a folded node) that nothing
/// reads any more: their values live on in the folded outputs.
fn remove_orphaned_constants(
    g: &mut Graph,
    inputs: &[Option<qgraph_ir::ValueId>],
) -> Result<(), String> {
    for v in inputs.iter().flatten() {
        if !g.contains_value(*v) {
            continue; // read twice, already gone
        }
        let val = g.value(*v);
        if !g.is_used(*v)
            && !val.is_graph_input()
            && !val.is_graph_output()
            && val.initializer().is_some()
        {
            g.remove_value(*v).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

fn new_initializer(
    g: &mut Graph,
    base: &str,
    tensor: Tensor,
) -> Result<qgraph_ir::ValueId, String> {
    let name = g.unique_value_name(base);
    g.add_initializer(name, tensor).map_err(|e| e.to_string())
}

fn int_vector(values: &[i64], scalar: bool) -> Option<Tensor> {
    let v: Vec<i128> = values.iter().map(|&x| x as i128).collect();
    let shape: &[usize] = if scalar { &[] } else { &[v.len()] };
    Tensor::from_ints(qgraph_ir::DataType::I64, shape, &v).ok()
}

/// The symbolic half of the pass (see the module doc).
fn fold_shape_computations(model: &mut Model, cx: &mut PassContext) -> Result<bool, String> {
    let info = qgraph_eval::shapes::infer(model);
    let g = &mut model.graph;
    let order = crate::util::order(g)?;
    let mut changed = false;
    for n in order {
        let node = g.node(n);
        if !node.domain.is_empty() {
            continue;
        }
        // A Reshape whose target is known up to the input's own symbols.
        if node.op_type == "Reshape" && !matches!(node.attr("allowzero"), Some(AttrValue::Int(1))) {
            let (Some(x), Some(t)) = (
                node.inputs().first().copied().flatten(),
                node.inputs().get(1).copied().flatten(),
            ) else {
                continue;
            };
            if g.producer(t).is_none() {
                continue;
            }
            let (Some(target), Some(dims)) = (
                info.get(&t).and_then(|i| i.elements.clone()),
                info.get(&x).and_then(|i| i.dims.clone()),
            ) else {
                continue;
            };
            let fixed: Option<Vec<i64>> = target
                .iter()
                .enumerate()
                .map(|(i, d)| match d {
                    Dim::Known(k) => Some(*k),
                    Dim::Symbol(_) if dims.get(i) == Some(d) => Some(0),
                    _ => None,
                })
                .collect();
            let Some(fixed) = fixed else { continue };
            // A target of all-known values is folded below with the others.
            if target.iter().all(|d| matches!(d, Dim::Known(_))) || !cx.allow_rewrite() {
                continue;
            }
            let tensor = int_vector(&fixed, false).ok_or("cannot build a shape tensor")?;
            let base = format!("{}.shape", g.node(n).name());
            let c = new_initializer(g, &base, tensor)?;
            g.set_node_input(n, 1, Some(c)).map_err(|e| e.to_string())?;
            changed = true;
            continue;
        }
        // An integer vector computed from shapes, every element known.
        let [Some(v)] = node.outputs() else { continue };
        let v = *v;
        let Some(i) = info.get(&v) else { continue };
        let (Some(elements), Some(dims)) = (&i.elements, &i.dims) else {
            continue;
        };
        if dims.len() > 1 || !matches!(i.dtype, Some(qgraph_ir::DataType::I64)) {
            continue;
        }
        let Some(values) = elements
            .iter()
            .map(|d| match d {
                Dim::Known(k) => Some(*k),
                _ => None,
            })
            .collect::<Option<Vec<i64>>>()
        else {
            continue;
        };
        if node.op_type == "Constant" || !cx.allow_rewrite() {
            continue;
        }
        let tensor = int_vector(&values, dims.is_empty()).ok_or("cannot build a shape tensor")?;
        let removed = g.remove_node(n).map_err(|e| e.to_string())?;
        remove_orphaned_constants(g, removed.inputs())?;
        crate::util::set_constant(g, v, tensor)?;
        changed = true;
    }
    Ok(changed)
}
