//! Reverse-mode differentiation on the evaluator: a forward pass that keeps
//! every value (the tape), then a backward pass that runs each node's
//! backward kernel (in `ops/`, beside its forward kernel) in reverse order.
//!
//! Trainable values are usually initializers; the caller passes their
//! current tensors as `params`, which take the place of the initializers,
//! so one prepared evaluator serves every training step.

use crate::ops::{self, Grads};
use crate::{DataRef, EvalError, Evaluator, Inputs, OpCtx};
use qgraph_ir::{NodeId, Tensor, ValueId};
use std::collections::{HashMap, HashSet};

/// How the forward pass treats operators that behave differently in
/// training: BatchNormalization normalises with the batch's own statistics
/// in `Training`, with its running statistics in `Inference`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Inference,
    Training,
}

/// A recorded forward pass.
pub struct Tape<'e, 'm, 'p> {
    evaluator: &'e Evaluator<'m>,
    params: &'p HashMap<ValueId, Tensor>,
    values: HashMap<ValueId, Tensor>,
    /// What kernels kept for the backward pass, per node (see
    /// [`Grads::saved`](ops::Grads)).
    saved: HashMap<NodeId, Vec<Tensor>>,
    mode: Mode,
    /// Each Relu or Clip that runs fused into the node before it, whose
    /// output it alone reads and which is not kept: see [`fused_clamps`].
    producer_of_clamp: HashMap<NodeId, NodeId>,
    /// The producers above, with the clamp each applied once run.
    clamp_of_producer: HashMap<NodeId, Option<ops::Clamp>>,
    /// Seconds per operator type and direction, with call counts.
    times: std::sync::Mutex<HashMap<String, (usize, f64)>>,
}

impl<'m> Evaluator<'m> {
    /// Runs the graph node by node and keeps every value for a backward
    /// pass. `params` replace the initializers of the same values.
    pub fn record<'e, 'p>(
        &'e self,
        inputs: Inputs,
        params: &'p HashMap<ValueId, Tensor>,
        mode: Mode,
    ) -> Result<Tape<'e, 'm, 'p>, EvalError> {
        let producer_of_clamp = fused_clamps(self, mode);
        let mut tape = Tape {
            evaluator: self,
            params,
            values: self.bind_inputs(inputs)?.into_iter().collect(),
            saved: HashMap::new(),
            mode,
            clamp_of_producer: producer_of_clamp.values().map(|&p| (p, None)).collect(),
            producer_of_clamp,
            times: Default::default(),
        };
        self.in_pool(|| {
            for &n in &self.order {
                tape.run(n)?;
            }
            Ok::<_, EvalError>(())
        })?;
        Ok(tape)
    }
}

impl<'e, 'm, 'p> Tape<'e, 'm, 'p> {
    fn context(&self, node: NodeId) -> OpCtx<'_> {
        OpCtx {
            graph: self.evaluator.graph,
            node,
            opset: self.evaluator.opset,
            epilogue: &[],
            added: None,
            input_pads: [0; 4],
            buffers: &self.evaluator.buffers,
            captures: &[],
            functions: self.evaluator.functions,
        }
    }

    /// The tensor of a value: computed, a parameter, or an initializer.
    pub fn value(&self, v: ValueId) -> Result<&Tensor, EvalError> {
        if let Some(t) = self.values.get(&v).or_else(|| self.params.get(&v)) {
            return Ok(t);
        }
        self.evaluator.lookup_tensor(&self.values, v)
    }

    fn lookup_all(&self, values: &[Option<ValueId>]) -> Result<Vec<Option<&Tensor>>, EvalError> {
        values
            .iter()
            .map(|v| v.map(|v| self.value(v)).transpose())
            .collect()
    }

    fn time(&self, op: &str, direction: &str, started: std::time::Instant) {
        let secs = started.elapsed().as_secs_f64();
        let mut times = self.times.lock().unwrap_or_else(|e| e.into_inner());
        let entry = times.entry(format!("{op} {direction}")).or_default();
        entry.0 += 1;
        entry.1 += secs;
    }

    /// Seconds spent per operator type, forward and backward, with call
    /// counts, slowest first.
    pub fn profile(&self) -> Vec<(String, usize, f64)> {
        let times = self.times.lock().unwrap_or_else(|e| e.into_inner());
        let mut rows: Vec<(String, usize, f64)> =
            times.iter().map(|(k, &(n, t))| (k.clone(), n, t)).collect();
        rows.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)));
        rows
    }

    fn run(&mut self, n: NodeId) -> Result<(), EvalError> {
        if self.clamp_of_producer.contains_key(&n) {
            // Runs with its clamp.
            return Ok(());
        }
        if let Some(&producer) = self.producer_of_clamp.get(&n) {
            return self.run_fused(producer, n);
        }
        let g = self.evaluator.graph;
        let node = g.node(n);
        let started = std::time::Instant::now();
        let (results, saved) = {
            let args = self.lookup_all(node.inputs())?;
            let cx = self.context(n);
            let default_domain = node.domain.is_empty();
            match (self.mode, node.op_type.as_str()) {
                (Mode::Training, "BatchNormalization") if default_domain => {
                    let (y, stats) = ops::batch_norm_training(&cx, &args, None)?;
                    (vec![y], Some(stats))
                }
                (_, "MaxPool") if default_domain => {
                    let (ys, firsts) = ops::max_pool_recording(&cx, &args)?;
                    (ys, Some(firsts))
                }
                _ => match (
                    ops::kernel(&node.domain, &node.op_type),
                    ops::data_kernel(&node.domain, &node.op_type),
                ) {
                    (Some(kernel), _) => (kernel(&cx, &args)?, None),
                    // Control flow on tensors: the tape keeps tensors only.
                    (None, Some(kernel)) => {
                        let data: Vec<_> = args.iter().map(|a| a.map(DataRef::Tensor)).collect();
                        let mut outs = Vec::new();
                        for d in kernel(&cx, &data)? {
                            match d.into_tensor() {
                                Ok(t) => outs.push(t),
                                Err(d) => {
                                    return cx.err(format!(
                                        "produced {}: training keeps tensors only",
                                        d.kind()
                                    ))
                                }
                            }
                        }
                        (outs, None)
                    }
                    (None, None) => (ops::call_function(&cx, &args)?, None),
                },
            }
        };
        self.time(&node.op_type, "forward", started);
        if let Some(stats) = saved {
            self.saved.insert(n, stats);
        }
        for (v, t) in node.outputs().iter().zip(results) {
            if let Some(v) = v {
                self.values.insert(*v, t);
            }
        }
        Ok(())
    }

    /// A node and the Relu or Clip after it as one kernel, the clamp applied
    /// as each value is written: a training BatchNormalization, or a Conv
    /// (then a Relu, its epilogue).
    fn run_fused(&mut self, producer: NodeId, clamp_node: NodeId) -> Result<(), EvalError> {
        let g = self.evaluator.graph;
        let node = g.node(clamp_node);
        let started = std::time::Instant::now();
        let (y, stats, clamp) = {
            // The clamp's bounds; its data input (the producer's output) is
            // not kept, and not read.
            let bounds: Vec<Option<&Tensor>> = node
                .inputs()
                .iter()
                .enumerate()
                .map(|(i, v)| match (i, v) {
                    (0, _) | (_, None) => Ok(None),
                    (_, Some(v)) => self.value(*v).map(Some),
                })
                .collect::<Result<_, _>>()?;
            let map = ops::build_pointwise(&self.context(clamp_node), &bounds)?;
            let Some(clamp) = ops::Clamp::of(&map) else {
                return Err(EvalError::Op {
                    node: g.describe_node(clamp_node),
                    message: format!("{map:?} is not a clamp"),
                });
            };
            let first = g.node(producer);
            let args = self.lookup_all(first.inputs())?;
            let mut cx = self.context(producer);
            if first.op_type == "Conv" {
                cx.epilogue = std::slice::from_ref(&map);
                let kernel =
                    ops::kernel(&first.domain, &first.op_type).expect("checked in Evaluator::new");
                let y = kernel(&cx, &args)?;
                (y.into_iter().next(), None, clamp)
            } else {
                let (y, stats) = ops::batch_norm_training(&cx, &args, Some(clamp))?;
                (Some(y), Some(stats), clamp)
            }
        };
        self.time(
            &format!("{}+{}", g.node(producer).op_type, node.op_type),
            "forward",
            started,
        );
        if let Some(stats) = stats {
            self.saved.insert(producer, stats);
        }
        self.clamp_of_producer.insert(producer, Some(clamp));
        if let (Some(Some(v)), Some(y)) = (node.outputs().first(), y) {
            self.values.insert(*v, y);
        }
        Ok(())
    }

    /// The graph's outputs, in order.
    pub fn outputs(&self) -> Result<Vec<&Tensor>, EvalError> {
        let g = self.evaluator.graph;
        g.outputs().iter().map(|&v| self.value(v)).collect()
    }

    /// What a kernel kept for `node`: for BatchNormalization in training,
    /// the batch mean and (biased) variance per channel; for MaxPool, where
    /// each window's first maximum is.
    pub fn saved(&self, node: NodeId) -> Option<&[Tensor]> {
        self.saved.get(&node).map(Vec::as_slice)
    }

    /// Gradients of a scalar loss with respect to the values `wrt`, given
    /// the loss gradient of some values (`seeds`, usually the outputs).
    /// A value in `wrt` that the seeds do not depend on gets no entry.
    /// Fails naming the first node on the way whose operator has no
    /// backward kernel.
    pub fn backward(
        &self,
        seeds: Vec<(ValueId, Tensor)>,
        wrt: &[ValueId],
    ) -> Result<HashMap<ValueId, Tensor>, EvalError> {
        let g = self.evaluator.graph;
        let order = &self.evaluator.order;
        // The values that depend on something in `wrt`: only those carry
        // gradient.
        let mut reaches: HashSet<ValueId> = wrt.iter().copied().collect();
        for &n in order {
            let node = g.node(n);
            if node.inputs().iter().flatten().any(|v| reaches.contains(v)) {
                reaches.extend(node.outputs().iter().flatten());
            }
        }
        let wanted_out: HashSet<ValueId> = wrt.iter().copied().collect();
        let mut grads: HashMap<ValueId, Tensor> = HashMap::new();
        for (v, t) in seeds {
            accumulate(&mut grads, v, t).map_err(|m| EvalError::Input(m.to_string()))?;
        }
        self.evaluator.in_pool(|| {
            for &n in order.iter().rev() {
                let node = g.node(n);
                let outs = node.outputs();
                if !outs.iter().flatten().any(|v| grads.contains_key(v)) {
                    continue;
                }
                let wanted: Vec<bool> = node
                    .inputs()
                    .iter()
                    .map(|v| v.is_some_and(|v| reaches.contains(&v)))
                    .collect();
                if !wanted.contains(&true) {
                    continue;
                }
                if let Some(&producer) = self.producer_of_clamp.get(&n) {
                    // The clamp ran inside its producer. A BatchNormalization's
                    // backward applies the clamp's gradient; a Conv's Relu's
                    // is applied here, from the Relu's output (positive
                    // exactly where its input is).
                    let (Some(Some(out)), Some(Some(before))) =
                        (outs.first(), node.inputs().first())
                    else {
                        continue;
                    };
                    let d = if wanted_out.contains(out) {
                        grads.get(out).cloned()
                    } else {
                        grads.remove(out)
                    };
                    let started = std::time::Instant::now();
                    let d = match (d, g.node(producer).op_type.as_str()) {
                        (Some(Tensor::F32(mut d)), "Conv") => {
                            let failed = |m: &str| EvalError::Op {
                                node: g.describe_node(n),
                                message: m.to_string(),
                            };
                            let Some(Tensor::F32(y)) = self.values.get(out) else {
                                return Err(failed("its output was not kept as f32"));
                            };
                            ops::relu_gradient_from_output(y, &mut d).map_err(failed)?;
                            Some(Tensor::F32(d))
                        }
                        (d, _) => d,
                    };
                    self.time(&node.op_type, "backward", started);
                    if let Some(d) = d {
                        accumulate(&mut grads, *before, d).map_err(|m| EvalError::Op {
                            node: g.describe_node(n),
                            message: m.to_string(),
                        })?;
                    }
                    continue;
                }
                let clamp = self.clamp_of_producer.get(&n).copied();
                let Some(kernel) = ops::backward_kernel(&node.domain, &node.op_type) else {
                    return Err(EvalError::Unsupported {
                        node: g.describe_node(n),
                        op: format!("the gradient of {}", node.op_type),
                    });
                };
                let started = std::time::Instant::now();
                let results = {
                    let inputs = self.lookup_all(node.inputs())?;
                    // A node fused with its clamp kept no output of its own.
                    let outputs = match clamp {
                        Some(_) => vec![None; outs.len()],
                        None => self.lookup_all(outs)?,
                    };
                    // Handed over, copied only when the caller wants them.
                    let d_outputs: Vec<Option<Tensor>> = outs
                        .iter()
                        .map(|v| {
                            v.and_then(|v| {
                                if wanted_out.contains(&v) {
                                    grads.get(&v).cloned()
                                } else {
                                    grads.remove(&v)
                                }
                            })
                        })
                        .collect();
                    let cx = self.context(n);
                    let grads_in = Grads {
                        inputs: &inputs,
                        outputs: &outputs,
                        d_outputs: std::sync::Mutex::new(d_outputs),
                        wanted: &wanted,
                        training: self.mode == Mode::Training,
                        saved: self.saved(n).unwrap_or(&[]),
                    };
                    match clamp {
                        Some(Some(clamp)) if node.op_type == "BatchNormalization" => {
                            ops::batch_norm_backward_through(&cx, &grads_in, clamp)?
                        }
                        Some(Some(_)) => kernel(&cx, &grads_in)?,
                        Some(None) => {
                            return Err(EvalError::Op {
                                node: g.describe_node(n),
                                message: "the forward pass did not run it".into(),
                            })
                        }
                        None => kernel(&cx, &grads_in)?,
                    }
                };
                self.time(&node.op_type, "backward", started);
                for v in outs.iter().flatten() {
                    if !wanted_out.contains(v) {
                        grads.remove(v);
                    }
                }
                for ((v, t), want) in node.inputs().iter().zip(results).zip(&wanted) {
                    if let (Some(v), Some(t), true) = (v, t, want) {
                        accumulate(&mut grads, *v, t).map_err(|m| EvalError::Op {
                            node: g.describe_node(n),
                            message: m.to_string(),
                        })?;
                    }
                }
            }
            Ok(())
        })?;
        grads.retain(|v, _| wanted_out.contains(v));
        Ok(grads)
    }
}

/// Each Relu or Clip (default domain) that runs fused into the node before
/// it, with that node: the clamp is the only reader of the node's output,
/// and that node is a BatchNormalization in training (whose other outputs
/// are unused), or a Conv when the clamp is a Relu. Both give the bits
/// they give apart; the values before the clamp are not kept (MobileNetV2
/// at batch 32: 3.5 GB at the peak became 2.5), and neither the clamp's
/// pass over them nor its gradient's is made (a Relu's gradient is taken
/// from its output instead).
fn fused_clamps(ev: &Evaluator, mode: Mode) -> HashMap<NodeId, NodeId> {
    let g = ev.graph;
    let uses = |v: &ValueId| ev.uses.get(v).copied().unwrap_or(0);
    let mut pairs = HashMap::new();
    for &n in &ev.order {
        let node = g.node(n);
        let producer = match node.op_type.as_str() {
            "BatchNormalization" => mode == Mode::Training,
            "Conv" => true,
            _ => false,
        };
        if !producer || !node.domain.is_empty() {
            continue;
        }
        let Some((Some(y), rest)) = node.outputs().split_first() else {
            continue;
        };
        if uses(y) != 1 || rest.iter().flatten().any(|v| uses(v) > 0) {
            continue;
        }
        let [(reader, 0)] = g.consumers(*y)[..] else {
            continue;
        };
        let clamp = g.node(reader);
        let fits = match clamp.op_type.as_str() {
            "Relu" => true,
            "Clip" => node.op_type == "BatchNormalization",
            _ => false,
        };
        if clamp.domain.is_empty() && fits {
            pairs.insert(reader, n);
        }
    }
    pairs
}

/// Adds `t` to the gradient of `v`.
fn accumulate(
    grads: &mut HashMap<ValueId, Tensor>,
    v: ValueId,
    t: Tensor,
) -> Result<(), &'static str> {
    match grads.get_mut(&v) {
        None => {
            grads.insert(v, t);
        }
        Some(Tensor::F32(acc)) => match t {
            Tensor::F32(t) if t.shape() == acc.shape() => *acc += &t,
            _ => return Err("two gradients of one value differ in shape or type"),
        },
        Some(_) => return Err("gradients must be f32"),
    }
    Ok(())
}
