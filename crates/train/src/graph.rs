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
    /// The Relu or Clip before an activation quantizer that the
    /// FakeQuantize took over (attributes `clip_lo`, `clip_hi`): its bounds.
    /// `input` is then the value before it.
    pub clamp: Option<(f32, f32)>,
    /// For a weight under DoReFa (Zhou et al. 2016): the weight value is a
    /// latent `v`, and the quantizer sees `scale tanh(v) / max |tanh(v)|`
    /// (a `qgraph.train.TanhNormalize` node), `scale` the weight's largest
    /// |w| when training began, so the layer's magnitude stays.
    pub tanh_scale: Option<f32>,
    /// For a weight: the batch normalization folded into it during
    /// training (an index into [`TrainingGraph::folds`]); the quantizer then
    /// reads the weight times the fold's factor, not `input` itself.
    pub fold: Option<usize>,
}

/// A batch normalization folded into the convolution before it during
/// training (Jacob et al. 2018, section 3.2; PyTorch's ConvBn): the
/// quantizer sees the weight a deployed graph will hold, `w k` with
/// `k = gamma / sqrt(running_var + eps)` per output channel, the
/// convolution's output is divided by `k` again and the batch
/// normalization follows, on batch statistics until it freezes. Frozen, the
/// chain computes exactly the folded convolution; on export the weight
/// becomes `w k`, the bias `(b - mean) k + beta`, and the batch
/// normalization goes.
///
/// `k` is a constant of each step, recomputed from the current gamma and
/// running variance before it: without quantization it cancels, so gamma's
/// gradient comes through the batch normalization alone.
#[derive(Clone, Debug)]
pub struct BatchNormFold {
    pub conv: NodeId,
    pub batch_norm: NodeId,
    /// The quantizer of the convolution's weight (index into
    /// [`TrainingGraph::quantizers`]).
    pub quantizer: usize,
    /// The trainable weight, unfolded.
    pub weight: ValueId,
    /// The convolution's own bias, now added after the division by `k`.
    pub bias: Option<ValueId>,
    pub gamma: ValueId,
    pub beta: ValueId,
    pub mean: ValueId,
    pub var: ValueId,
    pub epsilon: f32,
    /// `k` shaped for the weight, `[C, 1, ...]`, and for the convolution's
    /// output, `[1, C, 1, ...]`: constants of the training graph that each
    /// step rewrites.
    pub weight_factor: ValueId,
    pub output_factor: ValueId,
}

/// Which form [`TrainingGraph::export`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportForm {
    /// What deploys: batch normalizations folded during training are folded
    /// into their convolutions.
    Deploy,
    /// What training resumes from: the graph as it came, its weight
    /// quantizers' scales those of the folded weights (recorded in the
    /// metadata as [`FOLDED_SCALES_KEY`]).
    Checkpoint,
}

/// Metadata of a checkpoint whose weight scales are already those of
/// folded weights, so resuming does not initialise them again.
pub const FOLDED_SCALES_KEY: &str = "qgraph.train.folded_weight_scales";

/// Settings of [`TrainingGraph::prepare_with`].
#[derive(Clone, Copy, Debug)]
pub struct PrepareOptions {
    /// Fold each batch normalization that follows a convolution with a
    /// quantized weight into it during training ([`BatchNormFold`]);
    /// otherwise it stays a layer of its own and the quantizer sees the
    /// unfolded weight.
    pub fold_batch_norm: bool,
}

impl Default for PrepareOptions {
    fn default() -> PrepareOptions {
        PrepareOptions {
            fold_batch_norm: true,
        }
    }
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
    /// A weight of Conv, ConvTranspose, Gemm or MatMul, or an embedding
    /// table (the data a Gather reads).
    Weight,
    /// A bias (also one added to a MatMul's output, as Linear layers
    /// export), or a batch or layer normalization's scale or shift.
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
    pub folds: Vec<BatchNormFold>,
}

/// How scales learn, from the scheme named in the model's metadata
/// (`qgraph.scheme`): `lsq-*` learns every scale by LSQ, `pact-*` the
/// activations' by PACT, everything else tracks the values.
pub fn scale_rules(model: &Model) -> (ScaleRule, ScaleRule) {
    let scheme = scheme_name(model);
    if scheme.starts_with("lsq-") {
        (ScaleRule::Lsq, ScaleRule::Lsq)
    } else if scheme.starts_with("pact-") {
        (ScaleRule::Track, ScaleRule::Pact)
    } else {
        (ScaleRule::Track, ScaleRule::Track)
    }
}

/// Whether `insert --pow2-scales` made every scale a power of two
/// (metadata `qgraph.scales`): training keeps them so, or the integer graph
/// `freeze` makes would no longer compute exactly what the Q/DQ graph does.
pub fn pow2_scales(model: &Model) -> bool {
    model
        .meta
        .iter()
        .any(|(k, v)| k == "qgraph.scales" && v == "powers of two")
}

/// The scheme `insert` recorded in the model's metadata, or "".
fn scheme_name(model: &Model) -> &str {
    model
        .meta
        .iter()
        .find(|(k, _)| k == "qgraph.scheme")
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
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
    /// [`TrainingGraph::prepare_with`] with the default options (batch
    /// normalization folded).
    pub fn prepare(model: &Model) -> Result<TrainingGraph, TrainError> {
        TrainingGraph::prepare_with(model, PrepareOptions::default())
    }

    /// Prepares `model` for training: Q/DQ pairs become FakeQuantize
    /// nodes, and every f32 initializer that is a weight or bias of a
    /// weighted op, or a scale or shift of a batch normalization, becomes
    /// trainable, as do the scales the scheme learns.
    pub fn prepare_with(
        model: &Model,
        options: PrepareOptions,
    ) -> Result<TrainingGraph, TrainError> {
        let g = &model.graph;
        if let Some(v) = g
            .initializers()
            .into_iter()
            .find(|&v| matches!(g.initializer(v).map(|i| &i.tensor), Some(Tensor::Elided(_))))
        {
            return Err(TrainError::Graph(format!(
                "initializer '{}': its values were left out (a text form printed without \
                 all data); training needs them",
                g.value(v).name()
            )));
        }
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
        for q in &mut quantizers {
            take_over_clamp(&mut model.graph, q)?;
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
                "Gather" => add(trainable(through_quantizer(input(0))), ParamKind::Weight),
                "LayerNormalization" => {
                    add(trainable(input(1)), ParamKind::Bias);
                    add(trainable(input(2)), ParamKind::Bias);
                }
                "Add" => {
                    let after_matmul = |k: usize| {
                        input(k)
                            .and_then(|v| g.producer(v))
                            .is_some_and(|(p, _)| g.node(p).op_type == "MatMul")
                    };
                    for (bias, other) in [(1, 0), (0, 1)] {
                        if after_matmul(other) {
                            add(trainable(input(bias)), ParamKind::Bias);
                        }
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
            node.attrs.push(qgraph_ir::Attribute::new(
                "method",
                AttrValue::String(method.as_bytes().to_vec()),
            ));
        }
        if scheme_name(&model).starts_with("dorefa-") {
            for q in quantizers.iter_mut().filter(|q| q.weight) {
                q.tanh_scale = normalize_by_tanh(&mut model.graph, q)?;
            }
        }
        let mut folds = Vec::new();
        if options.fold_batch_norm {
            for bn in &batch_norms {
                if let Some(fold) = fold_into_conv(&mut model.graph, bn, &quantizers)? {
                    quantizers[fold.quantizer].fold = Some(folds.len());
                    folds.push(fold);
                }
            }
        }
        Ok(TrainingGraph {
            model,
            params,
            quantizers,
            batch_norms,
            folds,
        })
    }

    /// The original model with the trained values: every value of the
    /// training graph in `values` is written to the initializer of the
    /// same name, and the Clip bounds of narrow grids follow their scales.
    /// In the [`ExportForm::Deploy`] form, batch normalizations folded
    /// during training are folded into their convolutions.
    pub fn export(
        &self,
        original: &Model,
        values: &std::collections::HashMap<ValueId, Tensor>,
        form: ExportForm,
    ) -> Result<Model, TrainError> {
        let mut out = original.clone();
        out.meta.retain(|(k, _)| k != FOLDED_SCALES_KEY);
        if form == ExportForm::Checkpoint && !self.folds.is_empty() {
            out.meta.push((FOLDED_SCALES_KEY.into(), "1".into()));
        }
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
            let latent = self
                .quantizers
                .iter()
                .find(|q| q.input == *v)
                .and_then(|q| q.tanh_scale);
            let value = match (latent, &values[v]) {
                (Some(scale), Tensor::F32(latent)) => Tensor::F32(tanh_normalized(latent, scale)),
                (_, t) => t.clone(),
            };
            set(g, tg.value(*v).name(), value)?;
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
        if form == ExportForm::Deploy {
            for fold in &self.folds {
                self.export_fold(&mut out.graph, fold, values)?;
            }
            for q in self.quantizers.iter().filter(|q| q.weight) {
                self.clip_weight_to_grid(&mut out.graph, q)?;
            }
        }
        Ok(out)
    }

    /// Clamps an exported weight to what its grid represents,
    /// `[(qmin - z) s, (qmax - z) s]` per scale: a grid narrower than the
    /// storage type (2 or 4 bits in int8) saturates in FakeQuantize but not
    /// in QuantizeLinear, and a learned step size or a folded weight leaves
    /// values beyond it.
    fn clip_weight_to_grid(&self, g: &mut Graph, q: &Quantizer) -> Result<(), TrainError> {
        let tg = &self.model.graph;
        let read = |g: &Graph, v: Option<ValueId>| -> Option<Vec<f64>> {
            let v = g.value_by_name(tg.value(v?).name())?;
            g.initializer(v)?.tensor.to_f64_vec()
        };
        let Some(scales) = read(g, Some(q.scale)) else {
            return Ok(());
        };
        let zeros = read(g, q.zero_point).unwrap_or_else(|| vec![0.0; scales.len()]);
        let Some(weight) = g.value_by_name(tg.value(q.input).name()) else {
            return Ok(());
        };
        let Some(init) = g.initializer_mut(weight).map_err(ir_err)? else {
            return Ok(());
        };
        let Tensor::F32(w) = &mut init.tensor else {
            return Ok(());
        };
        let bounds = |k: usize| {
            let (s, z) = (
                scales[k] as f32,
                zeros.get(k).copied().unwrap_or(0.0) as i64,
            );
            (((q.qmin - z) as f32) * s, ((q.qmax - z) as f32) * s)
        };
        match q.axis {
            Some(axis) if scales.len() > 1 && axis < w.ndim() => {
                for (k, mut lane) in w.axis_iter_mut(qgraph_ir::ndarray::Axis(axis)).enumerate() {
                    let (lo, hi) = bounds(k.min(scales.len() - 1));
                    lane.mapv_inplace(|v| v.clamp(lo, hi));
                }
            }
            _ => {
                let (lo, hi) = bounds(0);
                w.mapv_inplace(|v| v.clamp(lo, hi));
            }
        }
        Ok(())
    }

    /// Folds one batch normalization into its convolution in the exported
    /// graph: weight `w k`, bias `(b - mean) k + beta`, and the
    /// convolution takes over the batch normalization's output.
    fn export_fold(
        &self,
        g: &mut Graph,
        fold: &BatchNormFold,
        values: &std::collections::HashMap<ValueId, Tensor>,
    ) -> Result<(), TrainError> {
        let tg = &self.model.graph;
        let current = |v: ValueId| -> Result<Vec<f32>, TrainError> {
            match values
                .get(&v)
                .or_else(|| tg.initializer(v).map(|i| &i.tensor))
            {
                Some(Tensor::F32(a)) => Ok(a.iter().copied().collect()),
                _ => Err(TrainError::Graph(format!(
                    "'{}': no f32 value to fold",
                    tg.value(v).name()
                ))),
            }
        };
        let conv_name = tg.node(fold.conv).name();
        let bn_name = tg.node(fold.batch_norm).name();
        let (Some(conv), Some(bn)) = (g.node_by_name(conv_name), g.node_by_name(bn_name)) else {
            return Err(TrainError::Graph(format!(
                "the exported model has no '{conv_name}' or '{bn_name}' to fold"
            )));
        };
        let k = fold_factor(&current(fold.gamma)?, &current(fold.var)?, fold.epsilon);
        let (beta, mean) = (current(fold.beta)?, current(fold.mean)?);
        let bias = match fold.bias {
            Some(b) => current(b)?,
            None => vec![0.0; k.len()],
        };
        let folded_bias: Vec<f32> = (0..k.len())
            .map(|c| ((bias[c] as f64 - mean[c] as f64) * k[c] as f64 + beta[c] as f64) as f32)
            .collect();
        let weight_name = tg.value(fold.weight).name();
        let weight = g.value_by_name(weight_name).ok_or_else(|| {
            TrainError::Graph(format!("the exported model has no weight '{weight_name}'"))
        })?;
        if let Some(init) = g.initializer_mut(weight).map_err(ir_err)? {
            if let Tensor::F32(w) = &mut init.tensor {
                let per_channel = w.len() / k.len().max(1);
                for (i, v) in w.iter_mut().enumerate() {
                    *v = (*v as f64 * k[i / per_channel] as f64) as f32;
                }
            }
        }
        let bias_tensor = Tensor::F32(
            qgraph_ir::ndarray::ArrayD::from_shape_vec(
                qgraph_ir::ndarray::IxDyn(&[k.len()]),
                folded_bias,
            )
            .expect("one bias per channel"),
        );
        match g.node(conv).inputs().get(2).copied().flatten() {
            Some(b) => {
                if let Some(init) = g.initializer_mut(b).map_err(ir_err)? {
                    init.tensor = bias_tensor;
                }
            }
            None => {
                let name = g.unique_value_name(&format!("{conv_name}.bias"));
                let b = g.add_initializer(name, bias_tensor).map_err(ir_err)?;
                while g.node(conv).inputs().len() < 2 {
                    g.push_node_input(conv, None).map_err(ir_err)?;
                }
                g.push_node_input(conv, Some(b)).map_err(ir_err)?;
            }
        }
        let bn_node = g.remove_node(bn).map_err(ir_err)?;
        let conv_output = g.node(conv).outputs()[0];
        let Some(bn_output) = bn_node.outputs()[0] else {
            return Err(TrainError::Graph(format!("'{bn_name}' has no output")));
        };
        if let Some(old) = conv_output {
            g.set_node_output(conv, 0, bn_output).map_err(ir_err)?;
            g.remove_value(old).map_err(ir_err)?;
        }
        for v in bn_node
            .inputs()
            .iter()
            .skip(1)
            .flatten()
            .chain(bn_node.outputs().iter().skip(1).flatten())
        {
            let value = g.value(*v);
            if !g.is_used(*v)
                && !value.is_graph_output()
                && !value.is_graph_input()
                && g.producer(*v).is_none()
            {
                g.remove_value(*v).map_err(ir_err)?;
            }
        }
        Ok(())
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
        clamp: None,
        tanh_scale: None,
        fold: None,
    }))
}

/// Moves the Relu or Clip whose output only this quantizer reads into the
/// FakeQuantize (attributes `clip_lo`, `clip_hi`, `clip_lo_open`), which
/// clamps with the same bits and gradient in one pass over memory instead
/// of two. The exported model keeps its Relu or Clip: only the training
/// graph changes.
fn take_over_clamp(g: &mut Graph, q: &mut Quantizer) -> Result<(), TrainError> {
    let Some((p, 0)) = g.producer(q.input) else {
        return Ok(());
    };
    let node = g.node(p).clone();
    if !node.domain.is_empty()
        || g.consumers(q.input).len() != 1
        || g.value(q.input).is_graph_output()
        || node.outputs().len() != 1
    {
        return Ok(());
    }
    let Some(x) = node.inputs().first().copied().flatten() else {
        return Ok(());
    };
    let (lo, hi, lo_open) = match node.op_type.as_str() {
        "Relu" => (0.0, f32::INFINITY, true),
        // Bounds as inputs (opset 11 and later), constant scalars or absent.
        "Clip" if node.attr("min").is_none() && node.attr("max").is_none() => {
            let bound = |k: usize, default: f32| match node.inputs().get(k).copied().flatten() {
                None => Some(default),
                Some(v) => constant_scalar(g, Some(v)).filter(|_| !g.value(v).is_graph_input()),
            };
            match (bound(1, f32::NEG_INFINITY), bound(2, f32::INFINITY)) {
                (Some(lo), Some(hi)) => (lo, hi, false),
                _ => return Ok(()),
            }
        }
        _ => return Ok(()),
    };
    let clipped = q.input;
    g.set_node_input(q.node, 0, Some(x)).map_err(ir_err)?;
    g.remove_node(p).map_err(ir_err)?;
    g.remove_value(clipped).map_err(ir_err)?;
    for b in node.inputs().iter().skip(1).flatten() {
        if !g.is_used(*b) && !g.value(*b).is_graph_output() && !g.value(*b).is_graph_input() {
            g.remove_value(*b).map_err(ir_err)?;
        }
    }
    let fake = g.node_mut(q.node).map_err(ir_err)?;
    let mut attrs = vec![("clip_lo_open", AttrValue::Int(lo_open as i64))];
    // Infinite bounds are the defaults (and have no text form).
    if lo.is_finite() {
        attrs.push(("clip_lo", AttrValue::Float(lo)));
    }
    if hi.is_finite() {
        attrs.push(("clip_hi", AttrValue::Float(hi)));
    }
    fake.attrs.extend(
        attrs
            .into_iter()
            .map(|(name, value)| qgraph_ir::Attribute::new(name, value)),
    );
    q.input = x;
    q.clamp = Some((lo, hi));
    Ok(())
}

/// The f32 initializer of `v` with `len` elements.
fn vector(g: &Graph, v: Option<ValueId>, len: usize) -> Option<ValueId> {
    let v = v?;
    match &g.initializer(v)?.tensor {
        Tensor::F32(a) if a.len() == len => Some(v),
        _ => None,
    }
}

/// Rewrites `Conv(x, FakeQuantize(w), b) -> BatchNormalization` into the
/// training chain of [`BatchNormFold`], when the convolution's output and
/// weight serve only this chain and the quantizer is per output channel or
/// per tensor.
fn fold_into_conv(
    g: &mut Graph,
    bn: &BatchNorm,
    quantizers: &[Quantizer],
) -> Result<Option<BatchNormFold>, TrainError> {
    let node = g.node(bn.node).clone();
    let extra_outputs_used = node
        .outputs()
        .iter()
        .skip(1)
        .flatten()
        .any(|&v| g.is_used(v) || g.value(v).is_graph_output());
    if !node.domain.is_empty() || extra_outputs_used {
        return Ok(None);
    }
    let input = |k: usize| node.inputs().get(k).copied().flatten();
    let Some(y) = input(0) else { return Ok(None) };
    let Some((conv, 0)) = g.producer(y) else {
        return Ok(None);
    };
    let cn = g.node(conv).clone();
    if cn.op_type != "Conv"
        || !cn.domain.is_empty()
        || g.consumers(y).len() != 1
        || g.value(y).is_graph_output()
    {
        return Ok(None);
    }
    let Some(quantized_weight) = cn.inputs().get(1).copied().flatten() else {
        return Ok(None);
    };
    let Some((fake, _)) = g.producer(quantized_weight) else {
        return Ok(None);
    };
    let Some(qi) = quantizers.iter().position(|q| q.node == fake && q.weight) else {
        return Ok(None);
    };
    let q = &quantizers[qi];
    let (channels, rank) = match g.initializer(q.input).map(|i| &i.tensor) {
        Some(Tensor::F32(w)) if w.ndim() >= 3 => (w.shape()[0], w.ndim()),
        _ => return Ok(None),
    };
    if !matches!(q.axis, None | Some(0))
        || g.consumers(quantized_weight).len() != 1
        || g.consumers(q.input).len() != 1
    {
        return Ok(None);
    }
    let (Some(gamma), Some(beta)) = (vector(g, input(1), channels), vector(g, input(2), channels))
    else {
        return Ok(None);
    };
    if vector(g, Some(bn.mean), channels).is_none() || vector(g, Some(bn.var), channels).is_none() {
        return Ok(None);
    }
    let bias = cn.inputs().get(2).copied().flatten();
    if let Some(b) = bias {
        if vector(g, Some(b), channels).is_none() || g.consumers(b).len() != 1 {
            return Ok(None);
        }
    }
    let epsilon = match node.attr("epsilon") {
        Some(AttrValue::Float(e)) => *e,
        _ => 1e-5,
    };
    let base = cn.name().to_string();
    let ones = |shape: &[usize]| {
        Tensor::F32(qgraph_ir::ndarray::ArrayD::ones(qgraph_ir::ndarray::IxDyn(
            shape,
        )))
    };
    let mut weight_shape = vec![1; rank];
    weight_shape[0] = channels;
    let mut output_shape = vec![1; rank];
    output_shape[1] = channels;
    let name = g.unique_value_name(&format!("{base}.bn_fold.weight_factor"));
    let weight_factor = g
        .add_initializer(name, ones(&weight_shape))
        .map_err(ir_err)?;
    let name = g.unique_value_name(&format!("{base}.bn_fold.output_factor"));
    let output_factor = g
        .add_initializer(name, ones(&output_shape))
        .map_err(ir_err)?;
    // The weight, or its DoReFa normalisation.
    let weight_source = g.node(fake).inputs()[0].unwrap_or(q.input);
    let folded_weight = new_value(g, &format!("{base}.bn_fold.weight"))?;
    add_op(
        g,
        NewNode::new("Mul")
            .named(format!("{base}/bn_fold/scale_weight"))
            .inputs([weight_source, weight_factor])
            .outputs([folded_weight]),
    )?;
    g.set_node_input(fake, 0, Some(folded_weight))
        .map_err(ir_err)?;
    let scaled = new_value(g, &format!("{base}.bn_fold.scaled_output"))?;
    g.set_node_output(conv, 0, scaled).map_err(ir_err)?;
    if bias.is_some() {
        g.set_node_input(conv, 2, None).map_err(ir_err)?;
    }
    let unscaled = match bias {
        Some(_) => new_value(g, &format!("{base}.bn_fold.output"))?,
        None => y,
    };
    add_op(
        g,
        NewNode::new("Div")
            .named(format!("{base}/bn_fold/unscale_output"))
            .inputs([scaled, output_factor])
            .outputs([unscaled]),
    )?;
    if let Some(b) = bias {
        let shape: Vec<i128> = output_shape.iter().map(|&d| d as i128).collect();
        let name = g.unique_value_name(&format!("{base}.bn_fold.bias_shape"));
        let shape = g
            .add_initializer(
                name,
                Tensor::from_ints(DataType::I64, &[rank], &shape)
                    .map_err(|e| TrainError::Graph(e.to_string()))?,
            )
            .map_err(ir_err)?;
        let shaped_bias = new_value(g, &format!("{base}.bn_fold.bias"))?;
        add_op(
            g,
            NewNode::new("Reshape")
                .named(format!("{base}/bn_fold/shape_bias"))
                .inputs([b, shape])
                .outputs([shaped_bias]),
        )?;
        add_op(
            g,
            NewNode::new("Add")
                .named(format!("{base}/bn_fold/add_bias"))
                .inputs([unscaled, shaped_bias])
                .outputs([y]),
        )?;
    }
    Ok(Some(BatchNormFold {
        conv,
        batch_norm: bn.node,
        quantizer: qi,
        weight: q.input,
        bias,
        gamma,
        beta,
        mean: bn.mean,
        var: bn.var,
        epsilon,
        weight_factor,
        output_factor,
    }))
}

/// A new value named `base` (made unique), for a node to define.
fn new_value(g: &mut Graph, base: &str) -> Result<ValueId, TrainError> {
    let name = g.unique_value_name(base);
    g.add_value(name, None).map_err(ir_err)
}

/// Adds a training graph's node, its name (already set) made unique.
fn add_op(g: &mut Graph, node: NewNode) -> Result<NodeId, TrainError> {
    let name = g.unique_node_name(&node.name);
    g.add_node(node.named(name)).map_err(ir_err)
}

/// DoReFa's reparametrisation of a weight quantizer's input: the weight's
/// initializer becomes the latent `v = atanh(tanh(1) w / max|w|)`, and a
/// TanhNormalize with `scale = max|w|` gives `w` back from it. Returns the
/// scale, or `None` for an all-zero weight (left as it is).
fn normalize_by_tanh(g: &mut Graph, q: &Quantizer) -> Result<Option<f32>, TrainError> {
    let largest = match g.initializer(q.input).map(|i| &i.tensor) {
        Some(Tensor::F32(w)) => w.iter().fold(0f32, |m, v| m.max(v.abs())),
        _ => return Ok(None),
    };
    if !(largest > 0.0 && largest.is_finite()) {
        return Ok(None);
    }
    let edge = 1f32.tanh();
    if let Some(init) = g.initializer_mut(q.input).map_err(ir_err)? {
        if let Tensor::F32(w) = &mut init.tensor {
            w.mapv_inplace(|v| (edge * v / largest).atanh());
        }
    }
    let base = g.node(q.node).name().to_string();
    let normalized = new_value(g, &format!("{base}.tanh_normalized"))?;
    add_op(
        g,
        NewNode::new("TanhNormalize")
            .named(format!("{base}/tanh_normalize"))
            .domain(TRAINING_DOMAIN)
            .inputs([q.input])
            .outputs([normalized])
            .attr("scale", AttrValue::Float(largest)),
    )?;
    g.set_node_input(q.node, 0, Some(normalized))
        .map_err(ir_err)?;
    Ok(Some(largest))
}

/// What TanhNormalize computes: `scale tanh(v) / max |tanh(v)|`.
pub fn tanh_normalized(
    v: &qgraph_ir::ndarray::ArrayD<f32>,
    scale: f32,
) -> qgraph_ir::ndarray::ArrayD<f32> {
    let tanh = v.mapv(f32::tanh);
    let largest = tanh.iter().fold(0f32, |m, t| m.max(t.abs()));
    let factor = if largest > 0.0 { scale / largest } else { 0.0 };
    tanh.mapv(|t| t * factor)
}

/// `k = gamma / sqrt(var + eps)` per channel, kept away from 0 (a zero
/// gamma would make the output's division infinite).
pub fn fold_factor(gamma: &[f32], var: &[f32], epsilon: f32) -> Vec<f32> {
    gamma
        .iter()
        .zip(var)
        .map(|(&g, &v)| {
            let k = g / (v.max(0.0) + epsilon).sqrt();
            if k.abs() < 1e-12 {
                1e-12f32.copysign(k)
            } else {
                k
            }
        })
        .collect()
}
