//! The training loop: one step is a recorded forward pass, the loss on the
//! first output, the backward pass, the scale and statistics updates that
//! do not come from gradients, and an optimizer update.

use crate::graph::{
    fold_factor, tanh_normalized, ExportForm, ParamKind, PrepareOptions, Quantizer, ScaleRule,
    TrainingGraph, FOLDED_SCALES_KEY,
};
use crate::optim::{Moments, Optimizer, Schedule};
use crate::{loss, TrainError};
use qgraph_eval::grad::Mode;
use qgraph_eval::{Evaluator, Options};
use qgraph_ir::ndarray::{ArrayD, IxDyn};
use qgraph_ir::{Model, Tensor, ValueId};
use qgraph_quant::{Grid, Params, RangeMode};
use std::collections::HashMap;
use std::sync::Arc;

/// Training settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub batch: usize,
    pub lr: f32,
    pub optimizer: Optimizer,
    /// L2 weight decay on the weights of weighted ops (decoupled for Adam).
    pub weight_decay: f32,
    /// PACT's L2 decay on its clipping levels (the paper's lambda_alpha).
    pub pact_decay: f32,
    pub schedule: Schedule,
    /// The schedule's length in steps (epochs times steps per epoch).
    pub total_steps: usize,
    pub seed: u64,
    pub threads: usize,
    /// Batch normalization uses batch statistics (and updates its running
    /// ones) until this step, then its running statistics, frozen. `None`:
    /// never freezes, except when batch normalization folds into a
    /// convolution: then half-way through `total_steps`, since a folded,
    /// low-bit network trained on batch statistics throughout can lose most
    /// of its accuracy on the running ones it deploys with (measured: a
    /// W2A2 CNN on Fashion-MNIST, 0.84 in training, 0.34 deployed, 0.84
    /// deployed with a freeze half-way). `Some(usize::MAX)` never freezes.
    pub bn_freeze_step: Option<usize>,
    /// Fake quantization starts at this step; before, the graph runs float
    /// (MindSpore's quant_delay).
    pub quant_delay: usize,
    /// Online activation ranges: the weight of the old range in a moving
    /// average of the batches' extremes (Jacob et al. 2018; PyTorch uses
    /// 0.99). `None` (the default) keeps the calibrated ranges: a
    /// QuantizeLinear that took over a Relu or Clip clamps at its range's
    /// ends, and a range moved by the values before the clamp would stop
    /// clamping. An online range never moves below 0 when it starts there.
    pub range_decay: Option<f32>,
    /// Distillation temperature.
    pub temperature: f32,
    /// Fold each batch normalization after a convolution with a quantized
    /// weight into it during training (see `graph::BatchNormFold`), so the
    /// quantizer learns the weights a deployed graph holds; otherwise it
    /// stays a layer of its own.
    pub fold_batch_norm: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            batch: 32,
            lr: 0.01,
            optimizer: Optimizer::Sgd { momentum: 0.9 },
            weight_decay: 0.0,
            pact_decay: 2e-4,
            schedule: Schedule::Constant,
            total_steps: 1,
            seed: 0,
            threads: 0,
            bn_freeze_step: None,
            quant_delay: 0,
            range_decay: None,
            temperature: 1.0,
            fold_batch_norm: true,
        }
    }
}

/// What one step did.
#[derive(Clone, Debug)]
pub struct StepReport {
    pub step: usize,
    pub loss: f64,
    pub lr: f32,
    pub samples: usize,
    /// Correct top-1 predictions of the batch, with labels.
    pub correct: Option<usize>,
}

/// The targets of a step: labels, or the teacher's logits.
pub enum Targets<'a> {
    Labels(&'a [i64]),
    Teacher(&'a [f32]),
}

/// Training state: the current values of everything training changes.
pub struct Trainer {
    graph: TrainingGraph,
    /// The training graph, shared with the caller's evaluators.
    model: Arc<Model>,
    /// The training graph with FakeQuantize as Identity (quant delay).
    float_model: Arc<Model>,
    config: Config,
    /// Current parameters, tracked scales and zero points, and running
    /// statistics, in place of the initializers.
    values: HashMap<ValueId, Tensor>,
    moments: HashMap<ValueId, Moments>,
    /// Moving-average ranges of tracked activation quantizers.
    ranges: HashMap<ValueId, (f32, f32)>,
    /// Values per sample of each LSQ activation quantizer's input (LSQ's N),
    /// by its scale, from the first step that ran it.
    sample_sizes: HashMap<ValueId, usize>,
    step: usize,
    /// Seconds per operator and direction over all steps, and per phase.
    profile: HashMap<String, (usize, f64)>,
}

fn f32_data(t: &Tensor) -> Option<&ArrayD<f32>> {
    match t {
        Tensor::F32(a) => Some(a),
        _ => None,
    }
}

impl Trainer {
    pub fn new(model: &Model, config: Config) -> Result<Trainer, TrainError> {
        let graph = TrainingGraph::prepare_with(
            model,
            PrepareOptions {
                fold_batch_norm: config.fold_batch_norm,
            },
        )?;
        let mut config = config;
        if config.bn_freeze_step.is_none() && !graph.folds.is_empty() {
            config.bn_freeze_step = Some(config.total_steps / 2);
        }
        let mut float_graph = graph.model.clone();
        for q in &graph.quantizers {
            let g = &mut float_graph.graph;
            let inputs = g.node(q.node).inputs().len();
            for slot in 1..inputs {
                g.set_node_input(q.node, slot, None)
                    .map_err(|e| TrainError::Graph(e.to_string()))?;
            }
            let node = g
                .node_mut(q.node)
                .map_err(|e| TrainError::Graph(e.to_string()))?;
            if q.clamp.is_some() {
                // Only the Relu or Clip it took over.
                node.attrs.push(qgraph_ir::Attribute::new(
                    "bypass",
                    qgraph_ir::AttrValue::Int(1),
                ));
            } else {
                node.op_type = "Identity".into();
                node.domain = String::new();
                node.attrs.clear();
            }
        }
        let g = &graph.model.graph;
        let mut values = HashMap::new();
        let mut keep = |v: ValueId| {
            if let Some(init) = g.initializer(v) {
                values.insert(v, init.tensor.clone());
            }
        };
        for p in &graph.params {
            keep(p.value);
        }
        for q in &graph.quantizers {
            keep(q.scale);
            if let Some(z) = q.zero_point {
                keep(z);
            }
            keep(q.input);
        }
        for bn in &graph.batch_norms {
            keep(bn.mean);
            keep(bn.var);
        }
        for fold in &graph.folds {
            keep(fold.weight_factor);
            keep(fold.output_factor);
        }
        let scales_folded = model.meta.iter().any(|(k, _)| k == FOLDED_SCALES_KEY);
        let mut trainer = Trainer {
            model: Arc::new(graph.model.clone()),
            float_model: Arc::new(float_graph),
            graph,
            config,
            values,
            moments: HashMap::new(),
            ranges: HashMap::new(),
            sample_sizes: HashMap::new(),
            step: 0,
            profile: HashMap::new(),
        };
        refresh_fold_factors(&trainer.graph, &mut trainer.values);
        if !scales_folded {
            trainer.initialise_folded_lsq_scales();
        }
        Ok(trainer)
    }

    /// LSQ's initial step sizes, `2 <|w k|> / sqrt(Qp)`, for weights whose
    /// batch normalization is folded in: `insert` set them for the unfolded
    /// weights.
    fn initialise_folded_lsq_scales(&mut self) {
        let mut updates = Vec::new();
        for q in &self.graph.quantizers {
            if q.fold.is_none() || q.rule != ScaleRule::Lsq {
                continue;
            }
            let (Some(w), Some(s)) = (
                quantized_weight(&self.graph, &self.values, q),
                self.values.get(&q.scale),
            ) else {
                continue;
            };
            let positive_levels = (q.qmax as f32).max(1.0);
            let channels = s.len().max(1);
            let per_channel = w.len() / channels;
            let flat: Vec<f32> = w.iter().copied().collect();
            let scales: Vec<f32> = flat
                .chunks(per_channel.max(1))
                .take(channels)
                .map(|c| {
                    let mean = c.iter().map(|v| v.abs()).sum::<f32>() / c.len().max(1) as f32;
                    (2.0 * mean / positive_levels.sqrt()).max(1e-8)
                })
                .collect();
            // A scale that does not divide its weight evenly stays.
            if scales.len() != channels || per_channel * channels != w.len() {
                continue;
            }
            let shape = s.shape().to_vec();
            updates.push((
                q.scale,
                Tensor::F32(ArrayD::from_shape_vec(IxDyn(&shape), scales).expect("same size")),
            ));
        }
        self.values.extend(updates);
    }

    pub fn graph(&self) -> &TrainingGraph {
        &self.graph
    }

    /// Seconds per operator and direction (and the optimizer's updates)
    /// over the steps so far, slowest first.
    pub fn profile(&self) -> Vec<(String, usize, f64)> {
        let mut rows: Vec<(String, usize, f64)> = self
            .profile
            .iter()
            .map(|(k, &(n, t))| (k.clone(), n, t))
            .collect();
        rows.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)));
        rows
    }

    pub fn steps_done(&self) -> usize {
        self.step
    }

    /// Continues a schedule from step `step` (after `--resume`).
    pub fn set_steps_done(&mut self, step: usize) {
        self.step = step;
    }

    /// The graphs a step runs: the training graph, and the float variant
    /// while fake quantization is delayed. Evaluators of these go to
    /// [`Trainer::step`].
    pub fn models(&self) -> (Arc<Model>, Option<Arc<Model>>) {
        (
            self.model.clone(),
            (self.step < self.config.quant_delay).then(|| self.float_model.clone()),
        )
    }

    /// Evaluator settings for the training graphs.
    pub fn evaluator_options(&self) -> Options {
        Options {
            threads: self.config.threads,
            whole_batches: true,
        }
    }

    /// The original model with the trained values, in the deployable form
    /// or the form training resumes from.
    pub fn export(&self, original: &Model, form: ExportForm) -> Result<Model, TrainError> {
        self.graph.export(original, &self.current_values(), form)
    }

    /// The training graph's values as the next step would start with them:
    /// parameters, statistics, and what follows from them (the folds'
    /// factors, scales that follow their weights).
    pub fn current_values(&self) -> HashMap<ValueId, Tensor> {
        let mut values = self.values.clone();
        refresh_fold_factors(&self.graph, &mut values);
        let tracked = tracked_weight_scales(&self.graph, &values);
        values.extend(tracked);
        values
    }

    /// One training step on a batch; `quantized` and `float` from
    /// [`Trainer::evaluators`].
    pub fn step(
        &mut self,
        quantized: &Evaluator,
        float: Option<&Evaluator>,
        x: Tensor,
        targets: Targets,
    ) -> Result<StepReport, TrainError> {
        let config = self.config.clone();
        let rows = x.shape().first().copied().unwrap_or(1);
        refresh_fold_factors(&self.graph, &mut self.values);
        let tracked = tracked_weight_scales(&self.graph, &self.values);
        self.values.extend(tracked);
        let ev = match float {
            Some(f) if self.step < config.quant_delay => f,
            _ => quantized,
        };
        let mode = match config.bn_freeze_step {
            Some(s) if self.step >= s => Mode::Inference,
            _ => Mode::Training,
        };
        let g = &self.graph.model.graph;
        let wrt: Vec<ValueId> = self.graph.params.iter().map(|p| p.value).collect();
        let (loss, correct, grads, observed, stats) = {
            let tape = ev.record(vec![x], &self.values, mode)?;
            let out = tape.outputs()?;
            let logits = out
                .first()
                .and_then(|t| f32_data(t))
                .ok_or_else(|| TrainError::Data("the model's first output is not f32".into()))?;
            let logits_shape = logits.shape().to_vec();
            let flat: Vec<f32> = logits.iter().copied().collect();
            let (loss, d) = match targets {
                Targets::Labels(labels) => {
                    loss::cross_entropy(&flat, rows, labels).map_err(TrainError::Data)?
                }
                Targets::Teacher(t) => loss::distillation(&flat, t, rows, config.temperature)
                    .map_err(TrainError::Data)?,
            };
            let correct = match targets {
                Targets::Labels(labels) => Some(loss::correct_top1(&flat, rows, labels)),
                Targets::Teacher(_) => None,
            };
            let seed = Tensor::F32(
                ArrayD::from_shape_vec(IxDyn(&logits_shape), d).expect("one gradient per logit"),
            );
            let grads = tape.backward(vec![(g.outputs()[0], seed)], &wrt)?;
            for (name, calls, secs) in tape.profile() {
                let e = self.profile.entry(name).or_default();
                e.0 += calls;
                e.1 += secs;
            }
            // What the non-gradient updates read: tracked activations'
            // extremes and the batch statistics.
            let mut observed = Vec::new();
            if std::ptr::eq(ev, quantized) {
                for q in &self.graph.quantizers {
                    if q.weight {
                        continue;
                    }
                    if q.rule == ScaleRule::Lsq && !self.sample_sizes.contains_key(&q.scale) {
                        if let Ok(x) = tape.value(q.input) {
                            self.sample_sizes.insert(q.scale, x.len() / rows.max(1));
                        }
                    }
                    if q.rule != ScaleRule::Track {
                        continue;
                    }
                    if let Some(x) = tape.value(q.input).ok().and_then(f32_data) {
                        let (mut lo, mut hi) = x
                            .iter()
                            .filter(|v| v.is_finite())
                            .fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
                        // What the quantizer sees, after its clamp.
                        if let Some((a, b)) = q.clamp {
                            (lo, hi) = (lo.clamp(a, b), hi.clamp(a, b));
                        }
                        observed.push((q.scale, lo, hi));
                    }
                }
            }
            let mut stats = Vec::new();
            if mode == Mode::Training {
                for (k, bn) in self.graph.batch_norms.iter().enumerate() {
                    let input = g.node(bn.node).inputs()[0];
                    if let (Some([Tensor::F32(m), Tensor::F32(v)]), Some(x)) =
                        (tape.saved(bn.node), input.and_then(|x| tape.value(x).ok()))
                    {
                        let count = x.len() / m.len().max(1);
                        stats.push((k, m.clone(), v.clone(), count));
                    }
                }
            }
            (loss, correct, grads, observed, stats)
        };
        let lr = config.lr * config.schedule.factor(self.step, config.total_steps);
        self.update_ranges(&observed);
        for (k, m, v, count) in stats {
            let bn = &self.graph.batch_norms[k];
            let unbiased = count as f32 / (count.max(2) - 1) as f32;
            for (value, batch, correction) in [(bn.mean, m, 1.0), (bn.var, v, unbiased)] {
                if let Some(Tensor::F32(run)) = self.values.get_mut(&value) {
                    for (r, b) in run.iter_mut().zip(batch.iter()) {
                        *r = *r * bn.momentum + b * correction * (1.0 - bn.momentum);
                    }
                }
            }
        }
        let started = std::time::Instant::now();
        self.apply_gradients(grads, lr)?;
        let e = self.profile.entry("optimizer update".into()).or_default();
        e.0 += 1;
        e.1 += started.elapsed().as_secs_f64();
        self.step += 1;
        Ok(StepReport {
            step: self.step,
            loss,
            lr,
            samples: rows,
            correct,
        })
    }

    /// Moving averages of tracked activation ranges, and the scale and
    /// zero point each range gives on its grid.
    fn update_ranges(&mut self, observed: &[(ValueId, f32, f32)]) {
        let Some(decay) = self.config.range_decay else {
            return;
        };
        let pow2 = crate::graph::pow2_scales(&self.graph.model);
        for &(scale, lo, hi) in observed {
            let Some(q) = self.graph.quantizers.iter().find(|q| q.scale == scale) else {
                continue;
            };
            let s = self.first_value(Some(q.scale)).unwrap_or(1.0) as f32;
            let z = self.first_value(q.zero_point).unwrap_or(0.0) as i64;
            // Starts from the calibrated range the scale stands for.
            let start = (((q.qmin - z) as f32) * s, ((q.qmax - z) as f32) * s);
            let range = self.ranges.entry(scale).or_insert(start);
            let floor = if start.0 == 0.0 {
                0.0
            } else {
                f32::NEG_INFINITY
            };
            range.0 = (decay * range.0 + (1.0 - decay) * lo).max(floor);
            range.1 = decay * range.1 + (1.0 - decay) * hi;
            let Some((grid, mode)) = grid_of(q.qmin, q.qmax, z) else {
                continue;
            };
            let p = if pow2 {
                Params::from_range_pow2(range.0, range.1, grid, mode, |_| 0.0)
            } else {
                Params::from_range(range.0, range.1, grid, mode)
            };
            let Ok(p) = p else {
                continue;
            };
            self.values.insert(q.scale, Tensor::scalar_f32(p.scale));
            if let Some(zv) = q.zero_point {
                if let Some(t) = self.values.get(&zv) {
                    let dtype = t.dtype();
                    if let Ok(t) = Tensor::from_ints(dtype, &[], &[p.zero_point as i128]) {
                        self.values.insert(zv, t);
                    }
                }
            }
        }
    }

    /// The first element of a value's current tensor (a scalar scale or
    /// zero point).
    fn first_value(&self, v: Option<ValueId>) -> Option<f64> {
        self.values
            .get(&v?)
            .and_then(|t| t.to_f64_vec())
            .and_then(|v| v.first().copied())
    }

    fn apply_gradients(
        &mut self,
        mut grads: HashMap<ValueId, Tensor>,
        lr: f32,
    ) -> Result<(), TrainError> {
        let config = &self.config;
        for p in &self.graph.params {
            let Some(Tensor::F32(grad)) = grads.remove(&p.value) else {
                continue;
            };
            let grad = if grad.is_standard_layout() {
                grad
            } else {
                grad.as_standard_layout().into_owned()
            };
            let mut grad = grad.into_raw_vec_and_offset().0;
            let mut decay = 0.0;
            match p.kind {
                ParamKind::Weight => decay = config.weight_decay,
                ParamKind::Bias => {}
                ParamKind::Scale => {
                    let Some(q) = self.graph.quantizers.iter().find(|q| q.scale == p.value) else {
                        continue;
                    };
                    let z = self.first_value(q.zero_point).unwrap_or(0.0);
                    let positive_levels = (q.qmax as f64 - z).max(1.0);
                    match q.rule {
                        // LSQ's gradient scale 1/sqrt(N Qp), N the values
                        // per step size (per sample for activations).
                        ScaleRule::Lsq => {
                            // A weight's values are here; an activation's
                            // size per sample was taken from the tape.
                            let values = match self.values.get(&q.input) {
                                Some(w) => w.len(),
                                None => self.sample_sizes.get(&q.scale).copied().unwrap_or(1),
                            };
                            let per_scale = values / grad.len().max(1);
                            let g = 1.0 / ((per_scale.max(1) as f64) * positive_levels).sqrt();
                            grad.iter_mut().for_each(|v| *v = (*v as f64 * g) as f32);
                        }
                        // PACT learns alpha = s Qp: the step on alpha
                        // carried back to s. Its L2 decay on alpha, in s's
                        // units, is the optimizer's weight decay: added to
                        // the gradient under SGD (the paper's), decoupled
                        // under Adam, whose normalised step would otherwise
                        // let the decay alone shrink every level at the
                        // learning rate's pace (W2A2 PACT under Adam fell
                        // to chance accuracy that way).
                        ScaleRule::Pact => {
                            let q2 = positive_levels * positive_levels;
                            grad.iter_mut().for_each(|v| *v = (*v as f64 / q2) as f32);
                            decay = config.pact_decay;
                        }
                        ScaleRule::Track => {}
                    }
                }
            }
            let Some(Tensor::F32(value)) = self.values.get_mut(&p.value) else {
                continue;
            };
            if !value.is_standard_layout() {
                *value = value.as_standard_layout().into_owned();
            }
            let slice = value.as_slice_mut().expect("standard layout");
            self.moments.entry(p.value).or_default().update(
                config.optimizer,
                slice,
                &grad,
                lr,
                decay,
            );
            if p.kind == ParamKind::Scale {
                slice.iter_mut().for_each(|s| *s = s.max(1e-8));
            }
        }
        Ok(())
    }
}

/// Writes each fold's `k = gamma / sqrt(running_var + eps)`, from the
/// current gamma and variance, into its two constants.
fn refresh_fold_factors(graph: &TrainingGraph, values: &mut HashMap<ValueId, Tensor>) {
    for fold in &graph.folds {
        let (Some(Tensor::F32(gamma)), Some(Tensor::F32(var))) =
            (values.get(&fold.gamma), values.get(&fold.var))
        else {
            continue;
        };
        let gamma: Vec<f32> = gamma.iter().copied().collect();
        let var: Vec<f32> = var.iter().copied().collect();
        let k = fold_factor(&gamma, &var, fold.epsilon);
        for factor in [fold.weight_factor, fold.output_factor] {
            if let Some(Tensor::F32(t)) = values.get_mut(&factor) {
                if t.len() == k.len() {
                    t.iter_mut().zip(&k).for_each(|(t, k)| *t = *k);
                }
            }
        }
    }
}

/// The values a weight quantizer quantizes: its weight, times the
/// folded batch normalization's factor per output channel.
fn quantized_weight<'a>(
    graph: &TrainingGraph,
    values: &'a HashMap<ValueId, Tensor>,
    q: &Quantizer,
) -> Option<std::borrow::Cow<'a, ArrayD<f32>>> {
    let w = f32_data(values.get(&q.input)?)?;
    let w = match q.tanh_scale {
        Some(scale) => std::borrow::Cow::Owned(tanh_normalized(w, scale)),
        None => std::borrow::Cow::Borrowed(w),
    };
    let Some(fold) = q.fold.and_then(|f| graph.folds.get(f)) else {
        return Some(w);
    };
    let k = f32_data(values.get(&fold.weight_factor)?)?;
    let per_channel = w.len() / k.len().max(1);
    let k: Vec<f32> = k.iter().copied().collect();
    let mut folded = w.as_standard_layout().into_owned();
    folded
        .iter_mut()
        .enumerate()
        .for_each(|(i, v)| *v *= k[i / per_channel]);
    Some(std::borrow::Cow::Owned(folded))
}

/// Weight scales that follow their weights: the symmetric scale of each
/// channel's current extremes.
fn tracked_weight_scales(
    graph: &TrainingGraph,
    values: &HashMap<ValueId, Tensor>,
) -> Vec<(ValueId, Tensor)> {
    let mut out = Vec::new();
    let pow2 = crate::graph::pow2_scales(&graph.model);
    for q in &graph.quantizers {
        if !(q.weight && q.rule == ScaleRule::Track) {
            continue;
        }
        let (Some(w), Some(s)) = (quantized_weight(graph, values, q), values.get(&q.scale)) else {
            continue;
        };
        let Some(s) = f32_data(s) else {
            continue;
        };
        let levels = q.qmax.min(-q.qmin).max(1) as f32;
        let mut scales: Vec<f32> = s.iter().copied().collect();
        let channels: Vec<_> = match q.axis {
            Some(axis) if scales.len() > 1 => w.axis_iter(qgraph_ir::ndarray::Axis(axis)).collect(),
            _ => vec![w.view()],
        };
        if channels.len() != scales.len() {
            continue;
        }
        let grid = grid_of(q.qmin, q.qmax, 0).map(|(grid, _)| grid);
        for (s, c) in scales.iter_mut().zip(channels) {
            let a = c.iter().fold(0f32, |m, v| m.max(v.abs()));
            if a <= 0.0 {
                continue;
            }
            *s = match grid.filter(|_| pow2) {
                // The power of two next to the scale that quantizes the
                // channel with less error, as `insert` chose it.
                Some(grid) => Params::from_range_pow2(-a, a, grid, RangeMode::Symmetric, |p| {
                    p.squared_error(c.iter().copied(), grid)
                })
                .map_or(*s, |p| p.scale),
                None => (a / levels).max(f32::MIN_POSITIVE),
            };
        }
        let shape = s.shape().to_vec();
        out.push((
            q.scale,
            Tensor::F32(ArrayD::from_shape_vec(IxDyn(&shape), scales).expect("same size")),
        ));
    }
    out
}

/// The qgraph-quant grid of an integer range, with the range mode a
/// quantizer with zero point `z` on it uses.
fn grid_of(qmin: i64, qmax: i64, z: i64) -> Option<(Grid, RangeMode)> {
    let signed = qmin < 0;
    let levels = (qmax - qmin + 1) as u64;
    let narrow = signed && qmin == -qmax;
    let bits = (levels + narrow as u64)
        .next_power_of_two()
        .trailing_zeros() as u8;
    let grid = Grid::new(bits, signed, narrow).ok()?;
    if grid.qmin() as i64 != qmin || grid.qmax() as i64 != qmax {
        return None;
    }
    let mode = if signed && z == 0 {
        RangeMode::Symmetric
    } else {
        RangeMode::Asymmetric
    };
    Some((grid, mode))
}
