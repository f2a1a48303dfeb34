//! qgraph's evaluator: runs a model's main graph forward.
//!
//! Values live in an environment indexed by value id and are dropped after
//! their last use, so memory holds only the live tensors. An observer can
//! watch chosen values as they are computed (calibration), without the
//! evaluator keeping them. Each operator is a kernel function in `ops/`,
//! grouped by family, so a backward kernel can later sit beside each one.

mod attrs;
pub mod grad;
mod ops;
mod plan;
mod pool;
mod samples;
pub mod shapes;

use plan::Step;
use qgraph_ir::{Data, Function, Graph, Model, NodeId, Tensor, ValueDef, ValueId};
use rayon::prelude::*;
use std::collections::HashMap;

pub use ops::{differentiable_ops, supported_ops, SCALE_GRADIENT_KEY, TRAINING_DOMAIN};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvalError {
    #[error("{node}: the evaluator does not implement {op}")]
    Unsupported { node: String, op: String },
    #[error("{node}: {message}")]
    Op { node: String, message: String },
    #[error("{0}")]
    Input(String),
}

/// The model's inputs, by position (initializer-backed inputs may be left
/// out: their default is used).
pub type Inputs = Vec<Tensor>;

/// A value's data, borrowed: what kernels of sequences, optionals and
/// control flow read.
#[derive(Clone, Copy, Debug)]
pub enum DataRef<'a> {
    Tensor(&'a Tensor),
    Sequence(&'a [Tensor]),
    Optional(Option<&'a Data>),
}

impl<'a> DataRef<'a> {
    pub fn of(d: &'a Data) -> DataRef<'a> {
        match d {
            Data::Tensor(t) => DataRef::Tensor(t),
            Data::Sequence(items) => DataRef::Sequence(items),
            Data::Optional(inner) => DataRef::Optional(inner.as_deref()),
        }
    }

    pub fn to_data(self) -> Data {
        match self {
            DataRef::Tensor(t) => Data::Tensor(t.clone()),
            DataRef::Sequence(items) => Data::Sequence(items.to_vec()),
            DataRef::Optional(inner) => Data::Optional(inner.cloned().map(Box::new)),
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            DataRef::Tensor(_) => "a tensor",
            DataRef::Sequence(_) => "a sequence",
            DataRef::Optional(_) => "an optional",
        }
    }

    pub fn tensor(self) -> Option<&'a Tensor> {
        match self {
            DataRef::Tensor(t) => Some(t),
            _ => None,
        }
    }
}

/// The tensors of a run's outputs; an output that is a sequence or an
/// optional is an error naming it (see [`Evaluator::run_data`]).
fn tensors_of(g: &Graph, values: &[ValueId], data: Vec<Data>) -> Result<Vec<Tensor>, EvalError> {
    data.into_iter()
        .zip(values)
        .map(|(d, &v)| {
            d.into_tensor().map_err(|d| {
                EvalError::Input(format!(
                    "'{}' is {}, where a tensor is expected",
                    g.value(v).name(),
                    d.kind()
                ))
            })
        })
        .collect()
}

/// Evaluator settings.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Worker threads; 0 means one per core. Results do not depend on it:
    /// work is split only across independent outputs.
    pub threads: usize,
    /// Runs every batch layer by layer, never as groups of samples (see
    /// `samples`): for comparing kernels on the very same products.
    pub whole_batches: bool,
}

/// Runs one node of `graph` on the given inputs (`None` for absent optional
/// ones), with the default-domain `opset`: what constant folding needs.
pub fn run_node(
    graph: &Graph,
    node: NodeId,
    opset: i64,
    inputs: &[Option<&Tensor>],
) -> Result<Vec<Tensor>, EvalError> {
    let n = graph.node(node);
    let Some(kernel) = ops::kernel(&n.domain, &n.op_type) else {
        return Err(EvalError::Unsupported {
            node: graph.describe_node(node),
            op: n.op_type.clone(),
        });
    };
    let buffers = pool::BufferPool::default();
    let cx = OpCtx {
        graph,
        node,
        opset,
        epilogue: &[],
        added: None,
        input_pads: [0; 4],
        buffers: &buffers,
        captures: &[],
        functions: &[],
    };
    kernel(&cx, inputs)
}

/// A prepared model: the node order, each value's last use, the kernels.
pub struct Evaluator<'m> {
    /// Its own worker pool; none for a subgraph's evaluator, which runs in
    /// the pool of the evaluator that runs its node.
    threads: Option<rayon::ThreadPool>,
    /// The model's local functions: a node of their domain and name runs
    /// the function's body.
    functions: &'m [Function],
    /// Per node holding subgraphs: the values of this graph they capture,
    /// and every name they read from outside themselves.
    implicit: HashMap<NodeId, (Vec<ValueId>, Vec<String>)>,
    buffers: pool::BufferPool,
    graph: &'m Graph,
    plan: Vec<Step>,
    /// Every node, in the order the plan runs them (for the tape).
    order: Vec<NodeId>,
    opset: i64,
    /// For each value, how many node inputs and graph outputs read it.
    uses: HashMap<ValueId, usize>,
    /// Whether unobserved runs may take a batch as groups of samples.
    sample_groups: bool,
    /// The values of the steps that read only initializers and each other
    /// (constant folding): computed once here, as ONNX Runtime does when it
    /// prepares a session, instead of on every run.
    folded: HashMap<ValueId, Data>,
    /// Per step of `plan`, whether its values are in `folded`.
    step_folded: Vec<bool>,
}

/// One kernel call: a node, possibly reading another value as its first
/// input (a fused Pad's input), with fused work, defining the outputs of
/// `out_node` (itself, or the last node fused after it).
struct Call<'p> {
    node: NodeId,
    first_input: Option<ValueId>,
    epilogue: &'p [ops::Pointwise],
    /// What the epilogue's fused Add adds.
    added: Option<ValueId>,
    input_pads: [usize; 4],
    out_node: NodeId,
}

impl Call<'_> {
    fn single(node: NodeId) -> Call<'static> {
        Call {
            node,
            first_input: None,
            epilogue: &[],
            added: None,
            input_pads: [0; 4],
            out_node: node,
        }
    }
}

/// Where a profiled run adds up the seconds of its steps: per row name
/// (operator type and kind), or per node, the node's name after it.
#[derive(Default)]
struct Profile {
    times: HashMap<String, (usize, f64)>,
    by_node: bool,
}

/// Adds a kernel's seconds to a profile, when one is being taken.
fn record(profile: &mut Option<&mut Profile>, g: &Graph, n: NodeId, name: String, secs: f64) {
    if let Some(p) = profile.as_deref_mut() {
        let key = if p.by_node {
            format!("{name} {}", g.node(n).name())
        } else {
            name
        };
        let e = p.times.entry(key).or_default();
        e.0 += 1;
        e.1 += secs;
    }
}

/// A node's row in a profile: its op type, and for a convolution its kind
/// (depthwise, 1x1 or the kernel size), which cost very different amounts.
fn profile_name(g: &Graph, n: NodeId) -> String {
    let node = g.node(n);
    let weights = (node.op_type == "Conv")
        .then(|| node.inputs().get(1).copied().flatten())
        .flatten()
        .and_then(|w| g.initializer(w));
    match weights.map(|w| w.tensor.shape().to_vec()) {
        Some(s) if s.len() == 4 && s[1] == 1 && s[2] * s[3] > 1 => {
            format!("Conv(depthwise {}x{})", s[2], s[3])
        }
        Some(s) if s.len() == 4 => format!("Conv({}x{})", s[2], s[3]),
        _ => node.op_type.clone(),
    }
}

/// Runs `work` on the current rayon thread while the pool's other threads
/// wait for jobs awake instead of asleep. Layer by layer, each operator
/// shares its work out and ends; a worker idle between operators goes to
/// sleep within microseconds, and waking it again (a futex, on a virtual
/// machine an interrupt to another processor) took longer than a small
/// operator's share of the work, so at batch 1 two threads were barely
/// faster than one. The helpers steal and run the operators' jobs as they
/// appear (`rayon::yield_now`), spinning between them.
fn with_workers_awake<R>(work: impl FnOnce() -> R) -> R {
    let threads = rayon::current_num_threads();
    if threads < 2 {
        return work();
    }
    let done = std::sync::atomic::AtomicBool::new(false);
    let owner = rayon::current_thread_index();
    rayon::in_place_scope(|scope| {
        for _ in 1..threads {
            scope.spawn(|_| {
                // A helper the calling thread picks up itself (while it
                // waits inside a join) must not spin: it would wait for
                // its own work to finish.
                if rayon::current_thread_index() == owner {
                    return;
                }
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        std::hint::spin_loop();
                    }
                }
            });
        }
        // Set when `work` returns or unwinds: a panic in an operator must
        // reach the caller, not leave the helpers spinning and the scope
        // waiting for them.
        struct Release<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Release);
            }
        }
        let _release = Release(&done);
        work()
    })
}

/// The context a kernel sees: the node (for attributes and messages) and the
/// default-domain opset the model imports.
pub struct OpCtx<'a> {
    pub graph: &'a Graph,
    pub node: NodeId,
    pub opset: i64,
    /// Elementwise maps to apply to the output, and zero padding to add to
    /// the input: work of neighbouring nodes (see `plan`). Only kernels that
    /// accept fusion get anything but none.
    pub(crate) epilogue: &'a [ops::Pointwise],
    /// The tensor an `AddInput` map of the epilogue adds.
    pub(crate) added: Option<&'a Tensor>,
    pub(crate) input_pads: [usize; 4],
    /// Recycled buffers for large outputs.
    pub(crate) buffers: &'a pool::BufferPool,
    /// The values of enclosing scopes that the node's subgraphs read, by
    /// name (control flow).
    pub(crate) captures: &'a [(&'a str, DataRef<'a>)],
    /// The model's local functions, which subgraphs may call.
    pub(crate) functions: &'a [Function],
}

impl OpCtx<'_> {
    pub fn describe(&self) -> String {
        self.graph.describe_node(self.node)
    }

    pub fn err<T>(&self, message: impl Into<String>) -> Result<T, EvalError> {
        Err(EvalError::Op {
            node: self.describe(),
            message: message.into(),
        })
    }
}

impl<'m> Evaluator<'m> {
    /// Prepares the main graph of `model`; fails naming the first node whose
    /// operator has no kernel.
    pub fn new(model: &'m Model) -> Result<Evaluator<'m>, EvalError> {
        Evaluator::with_options(model, Options::default())
    }

    pub fn with_options(model: &'m Model, options: Options) -> Result<Evaluator<'m>, EvalError> {
        let threads = rayon::ThreadPoolBuilder::new()
            .num_threads(options.threads)
            .build()
            .map_err(|e| EvalError::Input(format!("cannot start worker threads: {e}")))?;
        let opset = model.opset_version("").unwrap_or(1);
        let mut ev = Evaluator::prepare(&model.graph, opset, &model.functions, Some(threads))?;
        ev.sample_groups = !options.whole_batches
            && ev.implicit.is_empty()
            && samples::independent(&model.graph, opset, &shapes::infer(model));
        Ok(ev)
    }

    /// An evaluator for a subgraph or a function body, run from within the
    /// pool of the evaluator running its node.
    pub(crate) fn for_subgraph(
        graph: &'m Graph,
        opset: i64,
        functions: &'m [Function],
    ) -> Result<Evaluator<'m>, EvalError> {
        Evaluator::prepare(graph, opset, functions, None)
    }

    fn prepare(
        graph: &'m Graph,
        opset: i64,
        functions: &'m [Function],
        threads: Option<rayon::ThreadPool>,
    ) -> Result<Evaluator<'m>, EvalError> {
        let mut order = graph
            .topo_order()
            .map_err(|_| EvalError::Input("the graph has a cycle".into()))?;
        // Nodes that read nothing (Constant) first: still a topological
        // order, and their values are then ready for any fused step.
        order.sort_by_key(|&n| !graph.node(n).inputs().iter().all(Option::is_none));
        for &n in &order {
            let node = graph.node(n);
            if ops::kernel(&node.domain, &node.op_type).is_none()
                && ops::data_kernel(&node.domain, &node.op_type).is_none()
                && find_function(functions, &node.domain, &node.op_type).is_none()
            {
                let mut op = if node.domain.is_empty() {
                    node.op_type.clone()
                } else {
                    format!("{}.{}", node.domain, node.op_type)
                };
                if let Some(why) = ops::why_refused(&node.domain, &node.op_type) {
                    op = format!("{op} ({why})");
                }
                return Err(EvalError::Unsupported {
                    node: graph.describe_node(n),
                    op,
                });
            }
        }
        let mut implicit = HashMap::new();
        for &n in &order {
            let names = graph.subgraph_captures(n);
            if names.is_empty() {
                continue;
            }
            let mut values: Vec<ValueId> = names
                .iter()
                .filter_map(|m| graph.value_by_name(m))
                .collect();
            values.sort();
            values.dedup();
            implicit.insert(n, (values, names));
        }
        let mut uses: HashMap<ValueId, usize> = HashMap::new();
        for &n in &order {
            for v in graph.node(n).inputs().iter().flatten() {
                *uses.entry(*v).or_default() += 1;
            }
            for v in implicit.get(&n).map(|(v, _)| v.as_slice()).unwrap_or(&[]) {
                *uses.entry(*v).or_default() += 1;
            }
        }
        for &v in graph.outputs() {
            *uses.entry(v).or_default() += 1;
        }
        let plan = plan::plan(graph, opset, &order, &uses);
        let mut ev = Evaluator {
            sample_groups: false,
            threads,
            functions,
            implicit,
            buffers: pool::BufferPool::default(),
            graph,
            plan,
            order,
            opset,
            uses,
            folded: HashMap::new(),
            step_folded: Vec::new(),
        };
        let (folded, step_folded) = ev.in_pool(|| ev.fold_constants());
        ev.folded = folded;
        ev.step_folded = step_folded;
        Ok(ev)
    }

    /// Runs, in plan order, every step whose nodes read only initializers
    /// (which a run cannot replace: only inputs without one are bound) and
    /// values such steps compute, keeping all their values. The same
    /// kernels compute them as a run would, so a run's values are unchanged.
    /// A step that fails is left to each run, which reports the error then.
    fn fold_constants(&self) -> (HashMap<ValueId, Data>, Vec<bool>) {
        let g = self.graph;
        let mut env: HashMap<ValueId, Data> = HashMap::new();
        let mut step_folded = vec![false; self.plan.len()];
        let is_constant = |v: ValueId, env: &HashMap<ValueId, Data>| {
            env.contains_key(&v)
                || g.value(v)
                    .initializer()
                    .is_some_and(|init| !init.tensor.is_elided())
        };
        for (i, step) in self.plan.iter().enumerate() {
            let nodes: Vec<NodeId> = step.nodes().collect();
            // Inputs made inside the step count as constant too.
            let made: Vec<ValueId> = nodes
                .iter()
                .flat_map(|&n| g.node(n).outputs().iter().flatten().copied())
                .collect();
            let constant = nodes.iter().all(|&n| {
                g.node(n)
                    .inputs()
                    .iter()
                    .flatten()
                    .all(|&v| made.contains(&v) || is_constant(v, &env))
            });
            if !constant {
                continue;
            }
            // Each node on its own, every value kept: `left` never reaches
            // zero.
            let mut left: HashMap<ValueId, usize> = HashMap::new();
            for &n in &nodes {
                let node = g.node(n);
                for v in node.inputs().iter().chain(node.outputs()).flatten() {
                    left.insert(*v, usize::MAX);
                }
            }
            let failed = nodes.iter().any(|&n| {
                self.exec(
                    &Call::single(n),
                    &mut env,
                    &mut left,
                    &[],
                    &mut |_, _| {},
                    &[],
                )
                .is_err()
            });
            if failed {
                for v in &made {
                    env.remove(v);
                }
            } else {
                step_folded[i] = true;
            }
        }
        (env, step_folded)
    }

    /// Deterministic synthetic data for the inputs that need it: batch
    /// `batch` for the first dim, 64 for other dims the model leaves open,
    /// values in [-1, 1). For tests and benchmarks.
    pub fn example_inputs(&self, batch: usize) -> Result<Inputs, EvalError> {
        self.required_inputs()
            .into_iter()
            .map(|v| {
                let val = self.graph.value(v);
                let dims = match &val.ty {
                    Some(qgraph_ir::ValueType::Tensor(t))
                        if t.dtype == Some(qgraph_ir::DataType::F32) =>
                    {
                        t.shape.clone()
                    }
                    _ => None,
                };
                let Some(dims) = dims else {
                    return Err(EvalError::Input(format!(
                        "input '{}' is not a ranked f32 tensor",
                        val.name()
                    )));
                };
                let shape: Vec<usize> = dims
                    .iter()
                    .enumerate()
                    .map(|(i, d)| match d {
                        qgraph_ir::Dim::Known(k) if *k > 0 => *k as usize,
                        _ if i == 0 => batch,
                        _ => 64,
                    })
                    .collect();
                let n: usize = shape.iter().product();
                Tensor::f32(
                    &shape,
                    (0..n)
                        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                        .collect(),
                )
                .map_err(|e| EvalError::Input(e.to_string()))
            })
            .collect()
    }

    /// The given inputs paired with the graph inputs that need data.
    fn bind_inputs<T>(&self, inputs: Vec<T>) -> Result<Vec<(ValueId, T)>, EvalError> {
        let required = self.required_inputs();
        if inputs.len() != required.len() {
            return Err(EvalError::Input(format!(
                "the model takes {} inputs, {} were given",
                required.len(),
                inputs.len()
            )));
        }
        Ok(required.into_iter().zip(inputs).collect())
    }

    /// The graph inputs that need data (those without an initializer default).
    pub fn required_inputs(&self) -> Vec<ValueId> {
        self.graph
            .inputs()
            .iter()
            .copied()
            .filter(|&v| self.graph.value(v).initializer().is_none())
            .collect()
    }

    /// Runs the graph; returns its outputs in order.
    pub fn run(&self, inputs: Inputs) -> Result<Vec<Tensor>, EvalError> {
        self.run_observed(inputs, &[], &mut |_, _| {})
    }

    /// Runs the graph on inputs of any kind (tensors, sequences,
    /// optionals), as [`Evaluator::required_inputs`] lists them; returns
    /// its outputs, of any kind, in order.
    pub fn run_data(&self, inputs: Vec<Data>) -> Result<Vec<Data>, EvalError> {
        let bound = self.bind_inputs(inputs)?;
        let mut bound: Vec<(ValueId, Option<Data>)> =
            bound.into_iter().map(|(v, d)| (v, Some(d))).collect();
        let all: Vec<Option<Data>> = self
            .graph
            .inputs()
            .iter()
            .map(|v| {
                bound
                    .iter_mut()
                    .find(|(b, _)| b == v)
                    .and_then(|(_, d)| d.take())
            })
            .collect();
        self.in_pool(|| self.run_with(all, &[], &mut |_, _| {}, None, &[]))
    }

    /// Runs the graph, calling `observe(value, tensor)` for each value in
    /// `watch` as soon as it is computed (graph inputs included).
    pub fn run_observed(
        &self,
        inputs: Inputs,
        watch: &[ValueId],
        observe: &mut (dyn FnMut(ValueId, &Tensor) + Send),
    ) -> Result<Vec<Tensor>, EvalError> {
        if watch.is_empty() && self.sample_groups {
            if let Some(groups) = self.groups_of_samples(&inputs) {
                // Each group through the whole graph, one per thread; the
                // group size comes from the input's size alone, so results
                // do not depend on the thread count. (Observed runs keep
                // whole batches: observers see values in batch order.)
                let outputs = self.in_pool(|| {
                    groups
                        .into_par_iter()
                        .map(|g| {
                            let outs = self.run_timed(g, &[], &mut |_, _| {}, None)?;
                            tensors_of(self.graph, self.graph.outputs(), outs)
                        })
                        .collect::<Result<Vec<_>, _>>()
                })?;
                return samples::join(outputs);
            }
        }
        let outs = self.in_pool(|| self.run_in_pool(inputs, watch, observe))?;
        tensors_of(self.graph, self.graph.outputs(), outs)
    }

    /// Runs `work` in this evaluator's pool, the other workers awake until
    /// it ends (see [`with_workers_awake`]): for work that goes operator by
    /// operator.
    pub(crate) fn in_pool<R: Send>(&self, work: impl FnOnce() -> R + Send) -> R {
        match &self.threads {
            Some(pool) => pool.install(|| with_workers_awake(work)),
            None => work(),
        }
    }

    /// Whether the graph computes each sample from that sample alone, so
    /// that unobserved runs take a large batch as groups of samples.
    pub fn runs_sample_groups(&self) -> bool {
        self.sample_groups
    }

    /// The inputs cut into groups of samples, when the batch is larger than
    /// one group.
    fn groups_of_samples(&self, inputs: &Inputs) -> Option<Vec<Inputs>> {
        let batch = *inputs.first()?.shape().first()?;
        let per_sample: usize = inputs.iter().map(|t| t.len() / batch.max(1)).sum();
        samples::split(inputs, samples::group_size(per_sample))
    }

    /// Runs the graph once and returns, per operator type, how many nodes ran
    /// and the seconds they took, slowest first.
    pub fn profile(&self, inputs: Inputs) -> Result<Vec<(String, usize, f64)>, EvalError> {
        self.profile_rows(inputs, false)
    }

    /// As [`Evaluator::profile`], a row per step: its operator type and
    /// kind, then the name of its node.
    pub fn profile_nodes(&self, inputs: Inputs) -> Result<Vec<(String, usize, f64)>, EvalError> {
        self.profile_rows(inputs, true)
    }

    fn profile_rows(
        &self,
        inputs: Inputs,
        by_node: bool,
    ) -> Result<Vec<(String, usize, f64)>, EvalError> {
        let mut profile = Profile {
            by_node,
            ..Profile::default()
        };
        self.in_pool(|| self.run_timed(inputs, &[], &mut |_, _| {}, Some(&mut profile)))?;
        let mut rows: Vec<(String, usize, f64)> = profile
            .times
            .into_iter()
            .map(|(k, (n, t))| (k, n, t))
            .collect();
        rows.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)));
        Ok(rows)
    }

    fn run_in_pool(
        &self,
        inputs: Inputs,
        watch: &[ValueId],
        observe: &mut (dyn FnMut(ValueId, &Tensor) + Send),
    ) -> Result<Vec<Data>, EvalError> {
        self.run_timed(inputs, watch, observe, None)
    }

    /// Runs a subgraph: `inputs` bound to its graph inputs in order (an
    /// absent one, `None`, keeps its initializer or stays unbound), the
    /// values it captures looked up in `outer` by name.
    pub(crate) fn run_scoped(
        &self,
        inputs: Vec<Option<Tensor>>,
        outer: &[(&str, DataRef)],
    ) -> Result<Vec<Tensor>, EvalError> {
        let inputs = inputs.into_iter().map(|t| t.map(Data::Tensor)).collect();
        let outs = self.run_scoped_data(inputs, outer)?;
        tensors_of(self.graph, self.graph.outputs(), outs)
    }

    /// As [`Evaluator::run_scoped`], with values of any kind.
    pub(crate) fn run_scoped_data(
        &self,
        inputs: Vec<Option<Data>>,
        outer: &[(&str, DataRef)],
    ) -> Result<Vec<Data>, EvalError> {
        self.run_with(inputs, &[], &mut |_, _| {}, None, outer)
    }

    fn run_timed(
        &self,
        inputs: Inputs,
        watch: &[ValueId],
        observe: &mut (dyn FnMut(ValueId, &Tensor) + Send),
        profile: Option<&mut Profile>,
    ) -> Result<Vec<Data>, EvalError> {
        let bound = self.bind_inputs(inputs)?;
        let g = self.graph;
        let all: Vec<Option<Data>> = g
            .inputs()
            .iter()
            .map(|v| {
                bound
                    .iter()
                    .find(|(b, _)| b == v)
                    .map(|(_, t)| Data::Tensor(t.clone()))
            })
            .collect();
        drop(bound);
        self.run_with(all, watch, observe, profile, &[])
    }

    fn run_with(
        &self,
        inputs: Vec<Option<Data>>,
        watch: &[ValueId],
        observe: &mut (dyn FnMut(ValueId, &Tensor) + Send),
        mut profile: Option<&mut Profile>,
        outer: &[(&str, DataRef)],
    ) -> Result<Vec<Data>, EvalError> {
        let g = self.graph;
        let mut env: HashMap<ValueId, Data> = HashMap::new();
        let mut left = self.uses.clone();
        if inputs.len() > g.inputs().len() {
            return Err(EvalError::Input(format!(
                "the graph takes {} inputs, {} were given",
                g.inputs().len(),
                inputs.len()
            )));
        }
        for (&v, t) in g.inputs().iter().zip(inputs) {
            let Some(mut t) = t else { continue };
            // A tensor or sequence given for an input declared optional is
            // an optional holding it (a Loop body's carried optional, fed
            // the sequence the previous iteration made).
            if !matches!(t, Data::Optional(_))
                && matches!(g.value(v).ty, Some(qgraph_ir::ValueType::Optional(_)))
            {
                t = Data::Optional(Some(Box::new(t)));
            }
            if let (true, Data::Tensor(t)) = (watch.contains(&v), &t) {
                observe(v, t);
            }
            env.insert(v, t);
        }
        for v in watch {
            if let Some(Data::Tensor(t)) = self.folded.get(v) {
                observe(*v, t);
            }
        }
        let unfolded = self
            .plan
            .iter()
            .zip(&self.step_folded)
            .filter(|(_, &folded)| !folded)
            .map(|(step, _)| step);
        for step in unfolded {
            if !step.is_fused() || step.hidden.iter().any(|v| watch.contains(v)) {
                // Each node on its own (a watched value must exist).
                for n in step.nodes() {
                    let call = Call::single(n);
                    let secs = self.exec(&call, &mut env, &mut left, watch, observe, outer)?;
                    record(&mut profile, g, n, profile_name(g, n), secs);
                }
                continue;
            }
            let mut call = Call {
                node: step.node,
                first_input: None,
                epilogue: &step.epilogue,
                added: step.added,
                input_pads: [0; 4],
                out_node: step.last(),
            };
            let mut name = String::new();
            if let Some(pad) = step.pad {
                let padded = self.lookup_tensors(g.node(pad), g.node(pad).inputs(), &env, outer)?;
                match plan::spatial_zero_pads(g, self.opset, pad, &padded) {
                    Some(pads) => {
                        call.input_pads = pads;
                        call.first_input = g.node(pad).inputs()[0];
                        name.push_str("Pad+");
                    }
                    None => {
                        let secs = self.exec(
                            &Call::single(pad),
                            &mut env,
                            &mut left,
                            watch,
                            observe,
                            outer,
                        )?;
                        record(&mut profile, g, pad, "Pad".into(), secs);
                    }
                }
            }
            let secs = match self.exec(&call, &mut env, &mut left, watch, observe, outer) {
                Ok(secs) => secs,
                // A fused Add whose other input turns out not to have the
                // output's shape (it broadcasts): the nodes one by one give
                // the result, or the error.
                Err(_) if step.added.is_some() => {
                    let mut secs = 0.0;
                    // (A Pad that ran on its own above does not run again.)
                    let again = |&n: &NodeId| Some(n) != step.pad || call.first_input.is_some();
                    for n in step.nodes().filter(again) {
                        secs += self.exec(
                            &Call::single(n),
                            &mut env,
                            &mut left,
                            watch,
                            observe,
                            outer,
                        )?;
                    }
                    secs
                }
                Err(e) => return Err(e),
            };
            name.push_str(&profile_name(g, step.node));
            for &f in &step.fused {
                name = format!("{name}+{}", g.node(f).op_type);
            }
            record(&mut profile, g, step.node, name, secs);
        }
        let mut outs = Vec::with_capacity(g.outputs().len());
        for (i, &v) in g.outputs().iter().enumerate() {
            // Moved out unless a later output is the same value.
            let again = g.outputs()[i + 1..].contains(&v);
            match env.remove(&v) {
                Some(t) if again => {
                    outs.push(t.clone());
                    env.insert(v, t);
                }
                Some(t) => outs.push(t),
                None => outs.push(self.lookup(&env, v, outer)?.to_data()),
            }
        }
        Ok(outs)
    }

    /// The data of `values` (absent optional inputs stay `None`).
    fn lookup_inputs<'e>(
        &'e self,
        values: &[Option<ValueId>],
        env: &'e HashMap<ValueId, Data>,
        outer: &'e [(&'e str, DataRef<'e>)],
    ) -> Result<Vec<Option<DataRef<'e>>>, EvalError> {
        values
            .iter()
            .map(|v| v.map(|v| self.lookup(env, v, outer)).transpose())
            .collect()
    }

    /// The tensors of `values`, which `node` reads: a sequence or an
    /// optional there is an error naming the value.
    fn lookup_tensors<'e>(
        &'e self,
        node: &qgraph_ir::Node,
        values: &[Option<ValueId>],
        env: &'e HashMap<ValueId, Data>,
        outer: &'e [(&'e str, DataRef<'e>)],
    ) -> Result<Vec<Option<&'e Tensor>>, EvalError> {
        let data = self.lookup_inputs(values, env, outer)?;
        Self::only_tensors(self.graph, node, values, data)
    }

    fn only_tensors<'e>(
        g: &Graph,
        node: &qgraph_ir::Node,
        values: &[Option<ValueId>],
        data: Vec<Option<DataRef<'e>>>,
    ) -> Result<Vec<Option<&'e Tensor>>, EvalError> {
        data.into_iter()
            .zip(values)
            .map(|(d, v)| match (d, v) {
                (None, _) => Ok(None),
                (Some(DataRef::Tensor(t)), _) => Ok(Some(t)),
                (Some(d), v) => Err(EvalError::Input(format!(
                    "'{}' is {}, which {} does not take",
                    v.map(|v| g.value(v).name()).unwrap_or(""),
                    d.kind(),
                    node.op_type
                ))),
            })
            .collect()
    }

    /// What the subgraphs of node `n` read from outside themselves: values
    /// of this graph, or of the scopes around it.
    fn captures_of<'e>(
        &'e self,
        n: NodeId,
        env: &'e HashMap<ValueId, Data>,
        outer: &'e [(&'e str, DataRef<'e>)],
    ) -> Result<Vec<(&'e str, DataRef<'e>)>, EvalError> {
        let Some((_, names)) = self.implicit.get(&n) else {
            return Ok(Vec::new());
        };
        let mut found = Vec::with_capacity(names.len());
        for name in names {
            let t = match self.graph.value_by_name(name) {
                Some(v) => self.lookup(env, v, outer)?,
                None => match outer.iter().find(|(m, _)| m == name) {
                    Some((_, t)) => *t,
                    None => {
                        return Err(EvalError::Input(format!(
                            "value '{name}', which a subgraph reads, is defined nowhere"
                        )))
                    }
                },
            };
            found.push((name.as_str(), t));
        }
        Ok(found)
    }

    /// Runs a kernel, stores its results as the outputs of `call.out_node`,
    /// and drops the inputs no later node reads. Returns the kernel's seconds.
    fn exec(
        &self,
        call: &Call,
        env: &mut HashMap<ValueId, Data>,
        left: &mut HashMap<ValueId, usize>,
        watch: &[ValueId],
        observe: &mut (dyn FnMut(ValueId, &Tensor) + Send),
        outer: &[(&str, DataRef)],
    ) -> Result<f64, EvalError> {
        let g = self.graph;
        let node = g.node(call.node);
        let mut reads = node.inputs().to_vec();
        if let Some(first) = call.first_input {
            reads[0] = Some(first);
        }
        // Read after the node's own inputs, and released with them.
        let arity = reads.len();
        reads.extend(call.added.map(Some));
        let consuming = ops::consuming_kernel(&node.domain, &node.op_type).filter(|_| {
            call.epilogue.is_empty() && call.added.is_none() && call.first_input.is_none()
        });
        // The first input, moved out of the environment when this node is
        // its last reader (not a graph output, not watched, not read twice
        // here) and the kernel can work in its buffer rather than copy it.
        let owned_first = match (consuming, reads.first().copied().flatten()) {
            (Some(kernel), Some(v)) if left.get(&v) == Some(&1) && !watch.contains(&v) => {
                match env.remove(&v) {
                    Some(Data::Tensor(t)) => Some((kernel, t)),
                    Some(other) => {
                        env.insert(v, other);
                        None
                    }
                    None => None,
                }
            }
            _ => None,
        };
        let started = std::time::Instant::now();
        let results = {
            let mut looked_up = reads.clone();
            if owned_first.is_some() {
                looked_up[0] = None;
            }
            let data = self.lookup_inputs(&looked_up, env, outer)?;
            let captures = self.captures_of(call.node, env, outer)?;
            let data_kernel = ops::data_kernel(&node.domain, &node.op_type);
            let args = match data_kernel {
                Some(_) => Vec::new(),
                None => Self::only_tensors(g, node, &reads, data.clone())?,
            };
            let cx = OpCtx {
                graph: g,
                node: call.node,
                opset: self.opset,
                epilogue: call.epilogue,
                added: data.get(arity).copied().flatten().and_then(DataRef::tensor),
                input_pads: call.input_pads,
                buffers: &self.buffers,
                captures: &captures,
                functions: self.functions,
            };
            let tensors = |ts: Vec<Tensor>| ts.into_iter().map(Data::Tensor).collect::<Vec<_>>();
            match (
                owned_first,
                data_kernel,
                ops::kernel(&node.domain, &node.op_type),
            ) {
                (Some((kernel, first)), _, _) => tensors(kernel(&cx, first, &args[..arity])?),
                (None, Some(kernel), _) => kernel(&cx, &data[..arity])?,
                (None, None, Some(kernel)) => tensors(kernel(&cx, &args[..arity])?),
                (None, None, None) => tensors(ops::call_function(&cx, &args[..arity])?),
            }
        };
        // The values the node's subgraphs captured are released with its
        // inputs.
        if let Some((values, _)) = self.implicit.get(&call.node) {
            reads.extend(values.iter().map(|&v| Some(v)));
        }
        let secs = started.elapsed().as_secs_f64();
        for v in reads.iter().flatten() {
            let count = left.entry(*v).or_default();
            *count = count.saturating_sub(1);
            if *count == 0 {
                if let Some(Data::Tensor(t)) = env.remove(v) {
                    // A graph input's buffer came from the caller, a new one
                    // each run: kept, the pool would grow by one per run.
                    if !g.value(*v).is_graph_input() {
                        self.buffers.recycle(t);
                    }
                }
            }
        }
        let outputs = g.node(call.out_node).outputs();
        if results.len() < outputs.len() {
            return Err(EvalError::Op {
                node: g.describe_node(call.node),
                message: format!(
                    "produced {} outputs for {} slots",
                    results.len(),
                    outputs.len()
                ),
            });
        }
        for (v, t) in outputs.iter().zip(results) {
            let Some(v) = v else { continue };
            if let (true, Data::Tensor(t)) = (watch.contains(v), &t) {
                observe(*v, t);
            }
            if left.get(v).copied().unwrap_or(0) > 0 {
                env.insert(*v, t);
            }
        }
        Ok(secs)
    }

    /// The data of a value: computed, given, or an initializer.
    fn lookup<'e>(
        &'e self,
        env: &'e HashMap<ValueId, Data>,
        v: ValueId,
        outer: &'e [(&'e str, DataRef<'e>)],
    ) -> Result<DataRef<'e>, EvalError> {
        if let Some(d) = env.get(&v) {
            return Ok(DataRef::of(d));
        }
        self.lookup_beyond(v, outer)
    }

    /// The tensor of a value, for the tape (which keeps tensors only).
    pub(crate) fn lookup_tensor<'e>(
        &'e self,
        env: &'e HashMap<ValueId, Tensor>,
        v: ValueId,
    ) -> Result<&'e Tensor, EvalError> {
        if let Some(t) = env.get(&v) {
            return Ok(t);
        }
        let d = self.lookup_beyond(v, &[])?;
        d.tensor().ok_or_else(|| {
            EvalError::Input(format!(
                "'{}' is {}, where a tensor is expected",
                self.graph.value(v).name(),
                d.kind()
            ))
        })
    }

    /// The data of a value not computed in this run: an initializer, a
    /// folded constant, or a value of an enclosing scope.
    fn lookup_beyond<'e>(
        &'e self,
        v: ValueId,
        outer: &'e [(&'e str, DataRef<'e>)],
    ) -> Result<DataRef<'e>, EvalError> {
        let g = self.graph;
        if let Some(init) = g.value(v).initializer() {
            if init.tensor.is_elided() {
                return Err(EvalError::Input(format!(
                    "initializer '{}' has no values (elided in the text form it came from)",
                    g.value(v).name()
                )));
            }
            return Ok(DataRef::Tensor(&init.tensor));
        }
        if let Some(d) = self.folded.get(&v) {
            return Ok(DataRef::of(d));
        }
        let name = g.value(v).name();
        if let Some((_, d)) = outer.iter().find(|(m, _)| *m == name) {
            return Ok(*d);
        }
        match g.definition(v) {
            ValueDef::Captured => Err(EvalError::Input(format!(
                "value '{name}' comes from an enclosing graph, which does not define it"
            ))),
            _ => Err(EvalError::Input(format!(
                "value '{}' has no data",
                g.value(v).name()
            ))),
        }
    }
}

/// The model-local function a node of `domain` and `op` calls.
pub(crate) fn find_function<'f>(
    functions: &'f [Function],
    domain: &str,
    op: &str,
) -> Option<&'f Function> {
    functions.iter().find(|f| {
        f.name == op
            && qgraph_ir::canonical_domain(&f.domain) == qgraph_ir::canonical_domain(domain)
    })
}
