//! Control flow (If, Loop, Scan) and calls of model-local functions: each
//! runs a graph of its own in an evaluator prepared for it, the values it
//! reads from enclosing graphs handed over by name (`OpCtx::captures`).

use super::typed::any_elem;
use super::{input, DataKernel, Kernel};
use crate::{find_function, DataRef, EvalError, Evaluator, OpCtx};
use qgraph_ir::ndarray::{concatenate, ArrayD, Axis, IxDyn, Slice};
use qgraph_ir::{AttrValue, Data, Graph, Tensor};

pub const KERNELS: &[(&str, Kernel)] = &[("Scan", scan)];

/// If and Loop pass sequences and optionals through their subgraphs.
pub const DATA_KERNELS: &[(&str, DataKernel)] = &[("If", if_), ("Loop", loop_)];

type Out = Result<Vec<Tensor>, EvalError>;

pub(super) fn graph_attr<'a>(cx: &OpCtx<'a>, name: &str) -> Result<&'a Graph, EvalError> {
    match cx.graph.node(cx.node).attr(name) {
        Some(AttrValue::Graph(g)) => Ok(g),
        Some(_) => cx.err(format!("attribute '{name}' must be a graph")),
        None => cx.err(format!("attribute '{name}' (a graph) is missing")),
    }
}

/// A subgraph's evaluator, errors named after the node running it.
pub(super) fn prepare<'a>(
    cx: &OpCtx<'a>,
    g: &'a Graph,
    what: &str,
) -> Result<Evaluator<'a>, EvalError> {
    Evaluator::for_subgraph(g, cx.opset, cx.functions).map_err(|e| in_subgraph(cx, what, e))
}

pub(super) fn in_subgraph(cx: &OpCtx, what: &str, e: EvalError) -> EvalError {
    let inner = match e {
        EvalError::Unsupported { node, op } => {
            return EvalError::Unsupported {
                node: format!("{} {what}: {node}", cx.describe()),
                op,
            }
        }
        EvalError::Op { node, message } => format!("{node}: {message}"),
        EvalError::Input(m) => m,
    };
    EvalError::Op {
        node: cx.describe(),
        message: format!("{what}: {inner}"),
    }
}

fn scalar_bool(cx: &OpCtx, t: &Tensor, what: &str) -> Result<bool, EvalError> {
    match t {
        Tensor::Bool(a) if a.len() == 1 => Ok(*a.iter().next().expect("one element")),
        t => match t.to_f64_vec() {
            Some(v) if v.len() == 1 => Ok(v[0] != 0.0),
            _ => cx.err(format!(
                "{what} must be one bool, found {} of shape {:?}",
                t.dtype(),
                t.shape()
            )),
        },
    }
}

/// A control-flow input that must be a tensor (a trip count, a condition).
fn tensor_arg<'a>(
    cx: &OpCtx,
    inputs: &[Option<DataRef<'a>>],
    i: usize,
) -> Result<Option<&'a Tensor>, EvalError> {
    match inputs.get(i).copied().flatten() {
        None => Ok(None),
        Some(DataRef::Tensor(t)) => Ok(Some(t)),
        Some(d) => cx.err(format!("input {i} must be a tensor, found {}", d.kind())),
    }
}

/// If: runs one branch, its outputs the node's.
pub fn if_(cx: &OpCtx, inputs: &[Option<DataRef>]) -> Result<Vec<Data>, EvalError> {
    let Some(cond) = tensor_arg(cx, inputs, 0)? else {
        return cx.err("input 0 (the condition) is required");
    };
    let cond = scalar_bool(cx, cond, "the condition")?;
    let (name, what) = if cond {
        ("then_branch", "then branch")
    } else {
        ("else_branch", "else branch")
    };
    let g = graph_attr(cx, name)?;
    let ev = prepare(cx, g, what)?;
    ev.in_pool(|| ev.run_scoped_data(Vec::new(), cx.captures))
        .map_err(|e| in_subgraph(cx, what, e))
}

/// Loop: the body runs while the trip count and the condition allow,
/// carrying its state; each iteration's scan outputs are stacked.
pub fn loop_(cx: &OpCtx, inputs: &[Option<DataRef>]) -> Result<Vec<Data>, EvalError> {
    let body = graph_attr(cx, "body")?;
    let max_trips = match tensor_arg(cx, inputs, 0)? {
        Some(t) => match t.to_f64_vec() {
            Some(v) if v.len() == 1 => Some(v[0] as i64),
            _ => return cx.err("the trip count M must be one integer"),
        },
        None => None,
    };
    let mut cond = match tensor_arg(cx, inputs, 1)? {
        Some(t) => scalar_bool(cx, t, "the condition")?,
        None => true,
    };
    let mut carried: Vec<Data> = Vec::new();
    for (k, d) in inputs.iter().enumerate().skip(2) {
        match d {
            Some(d) => carried.push(d.to_data()),
            None => return cx.err(format!("loop-carried input {k} is absent")),
        }
    }
    let n_carried = carried.len();
    let body_outputs = body.outputs().len();
    if body_outputs < 1 + n_carried {
        return cx.err(format!(
            "the body has {body_outputs} outputs, fewer than the condition and {n_carried} \
             loop-carried values"
        ));
    }
    let n_scan = body_outputs - 1 - n_carried;
    let ev = prepare(cx, body, "body")?;
    let mut scans: Vec<Vec<Tensor>> = vec![Vec::new(); n_scan];
    let mut i: i64 = 0;
    ev.in_pool(|| {
        while cond && max_trips.is_none_or(|m| i < m) {
            let mut args: Vec<Option<Data>> = Vec::with_capacity(2 + n_carried);
            args.push(Some(Data::Tensor(Tensor::I64(ArrayD::from_elem(
                IxDyn(&[]),
                i,
            )))));
            args.push(Some(Data::Tensor(Tensor::Bool(ArrayD::from_elem(
                IxDyn(&[]),
                cond,
            )))));
            args.extend(carried.drain(..).map(Some));
            let mut outs = ev
                .run_scoped_data(args, cx.captures)
                .map_err(|e| in_subgraph(cx, &format!("body, iteration {i}"), e))?;
            let rest = outs.split_off(1 + n_carried);
            cond = match &outs[0] {
                Data::Tensor(t) => scalar_bool(cx, t, "the body's condition output")?,
                d => return cx.err(format!("the body's condition output is {}", d.kind())),
            };
            carried = outs.split_off(1);
            for (acc, d) in scans.iter_mut().zip(rest) {
                match d {
                    Data::Tensor(t) => acc.push(t),
                    d => return cx.err(format!("a scan output of the body is {}", d.kind())),
                }
            }
            i += 1;
        }
        Ok::<_, EvalError>(())
    })?;
    let mut results = carried;
    for (k, acc) in scans.into_iter().enumerate() {
        if acc.is_empty() {
            // No iteration: an empty stack of the body output's declared type.
            let dtype = body
                .value(body.outputs()[1 + n_carried + k])
                .effective_type()
                .and_then(|t| match t {
                    qgraph_ir::ValueType::Tensor(t) => t.dtype,
                    _ => None,
                })
                .unwrap_or(qgraph_ir::DataType::F32);
            results.push(Data::Tensor(empty_of(cx, dtype)?));
            continue;
        }
        results.push(Data::Tensor(stack(cx, &acc, 0)?));
    }
    Ok(results)
}

fn empty_of(cx: &OpCtx, dtype: qgraph_ir::DataType) -> Result<Tensor, EvalError> {
    Tensor::from_le_bytes(dtype, &[0], &[]).map_err(|e| EvalError::Op {
        node: cx.describe(),
        message: e.to_string(),
    })
}

/// Tensors of one shape and type stacked along a new `axis`.
fn stack(cx: &OpCtx, parts: &[Tensor], axis: usize) -> Result<Tensor, EvalError> {
    let first = &parts[0];
    let shape = first.shape().to_vec();
    if parts.iter().any(|p| p.shape() != shape.as_slice()) {
        return cx.err("the iterations' scan outputs differ in shape");
    }
    Ok(any_elem!(cx, first, "a scan output", |a| stack_like(
        cx, a, parts, axis
    )?))
}

fn stack_like<T: super::typed::Elem>(
    cx: &OpCtx,
    _like: &ArrayD<T>,
    parts: &[Tensor],
    axis: usize,
) -> Result<Tensor, EvalError> {
    let mut views = Vec::with_capacity(parts.len());
    for p in parts {
        match T::unwrap(p) {
            Some(b) => views.push(b.view().insert_axis(Axis(axis))),
            None => return cx.err("the iterations' scan outputs differ in type"),
        }
    }
    let stacked = concatenate(Axis(axis), &views).map_err(|e| EvalError::Op {
        node: cx.describe(),
        message: e.to_string(),
    })?;
    Ok(T::wrap(stacked))
}

/// The `k`th slice of `t` along `axis`, without that axis.
fn slice_at(cx: &OpCtx, t: &Tensor, axis: usize, k: usize) -> Result<Tensor, EvalError> {
    Ok(any_elem!(cx, t, "a scan input", |a| {
        super::typed::Elem::wrap(a.index_axis(Axis(axis), k).to_owned())
    }))
}

fn reversed(cx: &OpCtx, t: &Tensor, axis: usize) -> Result<Tensor, EvalError> {
    Ok(any_elem!(cx, t, "a scan output", |a| {
        super::typed::Elem::wrap(a.slice_axis(Axis(axis), Slice::new(0, None, -1)).to_owned())
    }))
}

/// Scan (opset 9 and later): the body runs once per slice of the scan
/// inputs, carrying state; its scan outputs are stacked.
pub fn scan(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
    if cx.opset < 9 {
        return scan_v8(cx, inputs);
    }
    let body = graph_attr(cx, "body")?;
    let n_scan_in = cx.int_attr("num_scan_inputs", -1)?;
    if n_scan_in < 1 || n_scan_in as usize > inputs.len() {
        return cx.err("num_scan_inputs must be between 1 and the number of inputs");
    }
    let n_scan_in = n_scan_in as usize;
    let n_state = inputs.len() - n_scan_in;
    let mut state: Vec<Tensor> = Vec::with_capacity(n_state);
    for k in 0..n_state {
        state.push(input(cx, inputs, k)?.clone());
    }
    let scan_inputs: Vec<&Tensor> = (n_state..inputs.len())
        .map(|k| input(cx, inputs, k))
        .collect::<Result<_, _>>()?;
    let list = |name: &str, n: usize| -> Result<Vec<i64>, EvalError> {
        Ok(cx.ints_attr(name)?.unwrap_or_else(|| vec![0; n]))
    };
    let in_dirs = list("scan_input_directions", n_scan_in)?;
    let in_axes = list("scan_input_axes", n_scan_in)?;
    let n_scan_out = body.outputs().len().saturating_sub(n_state);
    let out_dirs = list("scan_output_directions", n_scan_out)?;
    let out_axes = list("scan_output_axes", n_scan_out)?;
    if in_dirs.len() != n_scan_in || in_axes.len() != n_scan_in {
        return cx.err("scan_input_directions/axes must have one entry per scan input");
    }
    if out_dirs.len() != n_scan_out || out_axes.len() != n_scan_out {
        return cx.err("scan_output_directions/axes must have one entry per scan output");
    }
    let mut axes = Vec::with_capacity(n_scan_in);
    for (t, &a) in scan_inputs.iter().zip(&in_axes) {
        axes.push(cx.axis(a, t.shape().len())?);
    }
    let length = scan_inputs[0].shape()[axes[0]];
    for (t, &a) in scan_inputs.iter().zip(&axes) {
        if t.shape()[a] != length {
            return cx.err("the scan inputs differ in length along their scan axes");
        }
    }
    let ev = prepare(cx, body, "body")?;
    let mut scans: Vec<Vec<Tensor>> = vec![Vec::new(); n_scan_out];
    ev.in_pool(|| {
        for step in 0..length {
            let mut args: Vec<Option<Tensor>> = state.iter().cloned().map(Some).collect();
            for ((t, &axis), &dir) in scan_inputs.iter().zip(&axes).zip(&in_dirs) {
                let k = if dir == 1 { length - 1 - step } else { step };
                args.push(Some(slice_at(cx, t, axis, k)?));
            }
            let mut outs = ev
                .run_scoped(args, cx.captures)
                .map_err(|e| in_subgraph(cx, &format!("body, step {step}"), e))?;
            let rest = outs.split_off(n_state);
            state = outs;
            for (acc, t) in scans.iter_mut().zip(rest) {
                acc.push(t);
            }
        }
        Ok::<_, EvalError>(())
    })?;
    let mut results = state;
    for (k, acc) in scans.into_iter().enumerate() {
        if acc.is_empty() {
            return cx.err("Scan over zero steps has scan outputs of unknown shape");
        }
        let rank = acc[0].shape().len() + 1;
        let axis = cx.axis(out_axes[k], rank)?;
        let stacked = stack(cx, &acc, axis)?;
        results.push(if out_dirs[k] == 1 {
            reversed(cx, &stacked, axis)?
        } else {
            stacked
        });
    }
    Ok(results)
}

/// A tensor of `like`'s shape and type filled with zeros (false, empty
/// strings).
fn zeros_like(cx: &OpCtx, like: &Tensor) -> Result<Tensor, EvalError> {
    fn zeros<T: super::typed::Elem + Default>(a: &ArrayD<T>) -> Tensor {
        T::wrap(ArrayD::from_elem(a.raw_dim(), T::default()))
    }
    Ok(any_elem!(cx, like, "a scan output", |a| zeros(a)))
}

/// Scan of opset 8: every state and scan input has a leading batch axis,
/// the scan axis is axis 1, and the optional first input `sequence_lens`
/// gives each batch entry's length. The body runs per batch entry, from
/// that entry's initial states, over its first `sequence_lens[b]` steps
/// (the last first, for a scan input of direction 1); the final states
/// are stacked along the batch axis and the scan outputs along axes 0
/// (batch) and 1 (step), padded with zeros past each entry's length (as
/// ONNX Runtime does; the spec leaves those values undefined).
fn scan_v8(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
    let body = graph_attr(cx, "body")?;
    let n_scan_in = cx.int_attr("num_scan_inputs", -1)?;
    if n_scan_in < 1 || n_scan_in as usize > inputs.len().saturating_sub(1) {
        return cx.err(
            "Scan-8: num_scan_inputs must be between 1 and the number of inputs after \
             sequence_lens",
        );
    }
    let n_scan_in = n_scan_in as usize;
    let n_state = inputs.len() - 1 - n_scan_in;
    let all: Vec<&Tensor> = (1..inputs.len())
        .map(|k| input(cx, inputs, k))
        .collect::<Result<_, _>>()?;
    let (states, scan_inputs) = all.split_at(n_state);
    let directions = cx
        .ints_attr("directions")?
        .unwrap_or_else(|| vec![0; n_scan_in]);
    if directions.len() != n_scan_in {
        return cx.err("Scan-8: directions must have one entry per scan input");
    }
    let first = scan_inputs[0].shape();
    if first.len() < 2 {
        return cx.err(format!(
            "Scan-8: a scan input needs a batch and a sequence axis, found shape {first:?}"
        ));
    }
    let (batch, max_len) = (first[0], first[1]);
    for t in scan_inputs {
        let s = t.shape();
        if s.len() < 2 || s[0] != batch || s[1] != max_len {
            return cx.err(format!(
                "Scan-8: the scan inputs differ in batch size or sequence length ({first:?} \
                 and {s:?})"
            ));
        }
    }
    for t in states {
        if t.shape().first() != Some(&batch) {
            return cx.err(format!(
                "Scan-8: an initial state of shape {:?} lacks the batch axis of size {batch}",
                t.shape()
            ));
        }
    }
    let lengths: Vec<usize> = match inputs.first().copied().flatten() {
        None => vec![max_len; batch],
        Some(t) => match t.to_f64_vec() {
            Some(v)
                if v.len() == batch && v.iter().all(|&n| (0.0..=max_len as f64).contains(&n)) =>
            {
                v.iter().map(|&n| n as usize).collect()
            }
            _ => {
                return cx.err(format!(
                    "Scan-8: sequence_lens must hold {batch} lengths between 0 and {max_len}, \
                     found shape {:?}",
                    t.shape()
                ))
            }
        },
    };
    if body.outputs().len() < n_state {
        return cx.err(format!(
            "Scan-8: the body has {} outputs, fewer than the {n_state} states",
            body.outputs().len()
        ));
    }
    let n_scan_out = body.outputs().len() - n_state;
    let ev = prepare(cx, body, "body")?;
    // Per batch entry: the final states, and each scan output's steps.
    let mut final_states: Vec<Vec<Tensor>> = vec![Vec::with_capacity(batch); n_state];
    let mut scans: Vec<Vec<Vec<Tensor>>> = vec![Vec::with_capacity(batch); n_scan_out];
    ev.in_pool(|| {
        for (b, &length) in lengths.iter().enumerate() {
            let mut state: Vec<Tensor> = states
                .iter()
                .map(|t| slice_at(cx, t, 0, b))
                .collect::<Result<_, _>>()?;
            let entries: Vec<Tensor> = scan_inputs
                .iter()
                .map(|t| slice_at(cx, t, 0, b))
                .collect::<Result<_, _>>()?;
            let mut steps: Vec<Vec<Tensor>> = vec![Vec::with_capacity(length); n_scan_out];
            for step in 0..length {
                let mut args: Vec<Option<Tensor>> = state.iter().cloned().map(Some).collect();
                for (t, &dir) in entries.iter().zip(&directions) {
                    let k = if dir == 1 { length - 1 - step } else { step };
                    args.push(Some(slice_at(cx, t, 0, k)?));
                }
                let mut outs = ev
                    .run_scoped(args, cx.captures)
                    .map_err(|e| in_subgraph(cx, &format!("body, batch {b}, step {step}"), e))?;
                let rest = outs.split_off(n_state);
                state = outs;
                for (acc, t) in steps.iter_mut().zip(rest) {
                    acc.push(t);
                }
            }
            for (acc, t) in final_states.iter_mut().zip(state) {
                acc.push(t);
            }
            for (acc, s) in scans.iter_mut().zip(steps) {
                acc.push(s);
            }
        }
        Ok::<_, EvalError>(())
    })?;
    let mut results = Vec::with_capacity(n_state + n_scan_out);
    for per_batch in &final_states {
        if per_batch.is_empty() {
            return cx.err("Scan-8 over a batch of size 0 has final states of unknown shape");
        }
        results.push(stack(cx, per_batch, 0)?);
    }
    for per_batch in scans {
        let Some(like) = per_batch.iter().flatten().next() else {
            return cx.err("Scan-8 over zero steps has scan outputs of unknown shape");
        };
        let zero = zeros_like(cx, like)?;
        let mut rows = Vec::with_capacity(batch);
        for mut steps in per_batch {
            steps.resize(max_len, zero.clone());
            rows.push(stack(cx, &steps, 0)?);
        }
        results.push(stack(cx, &rows, 0)?);
    }
    Ok(results)
}

/// A call of a model-local function: its body, with the calling node's
/// attributes in place of the body's references to them, run on the
/// node's inputs.
pub fn call_function(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Out {
    let node = cx.graph.node(cx.node);
    let Some(f) = find_function(cx.functions, &node.domain, &node.op_type) else {
        return Err(EvalError::Unsupported {
            node: cx.describe(),
            op: node.op_type.clone(),
        });
    };
    let mut body = f.body.clone();
    resolve_refs(cx, &mut body, f)?;
    let opset = f
        .opset_imports
        .iter()
        .find(|o| qgraph_ir::canonical_domain(&o.domain).is_empty())
        .map(|o| o.version)
        .unwrap_or(cx.opset);
    let ev = Evaluator::for_subgraph(&body, opset, cx.functions)
        .map_err(|e| in_subgraph(cx, &format!("function {}", f.name), e))?;
    let args: Vec<Option<Tensor>> = inputs.iter().map(|t| t.cloned()).collect();
    ev.in_pool(|| ev.run_scoped(args, &[]))
        .map_err(|e| in_subgraph(cx, &format!("function {}", f.name), e))
}

/// Replaces each attribute reference (`ref_attr_name`) in `body` by the
/// calling node's attribute, or the function's default; a reference with
/// neither drops the attribute (the operator's own default applies).
fn resolve_refs(cx: &OpCtx, body: &mut Graph, f: &qgraph_ir::Function) -> Result<(), EvalError> {
    let caller = cx.graph.node(cx.node);
    for n in body.node_ids() {
        let Ok(node) = body.node_mut(n) else { continue };
        let mut attrs = std::mem::take(&mut node.attrs);
        attrs.retain_mut(|a| {
            let AttrValue::Ref { name, .. } = &a.value else {
                return true;
            };
            let value = caller.attr(name).cloned().or_else(|| {
                f.attribute_defaults
                    .iter()
                    .find(|d| &d.name == name)
                    .map(|d| d.value.clone())
            });
            match value {
                Some(v) => {
                    a.value = v;
                    true
                }
                None => false,
            }
        });
        node.attrs = attrs;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use qgraph_ir::{NewNode, ValueId};

    /// The body of onnx's test_scan_sum: a running sum as state, each
    /// partial sum also a scan output.
    fn running_sum() -> Graph {
        let mut g = Graph::new("body");
        let state = g.add_input("sum_in", None).unwrap();
        let item = g.add_input("next", None).unwrap();
        let sum = g.add_value("sum_out", None).unwrap();
        let partial = g.add_value("scan_out", None).unwrap();
        g.add_node(NewNode::new("Add").inputs([state, item]).outputs([sum]))
            .unwrap();
        g.add_node(NewNode::new("Identity").inputs([sum]).outputs([partial]))
            .unwrap();
        g.set_outputs(vec![sum, partial]).unwrap();
        g
    }

    /// Runs a Scan node of `opset` over `inputs` (None: absent).
    fn run_scan(
        opset: i64,
        attrs: Vec<(&str, AttrValue)>,
        inputs: &[Option<&Tensor>],
    ) -> Result<Vec<Tensor>, EvalError> {
        let mut g = Graph::new("test");
        let ins: Vec<Option<ValueId>> = inputs
            .iter()
            .enumerate()
            .map(|(k, t)| t.map(|_| g.add_input(format!("in{k}"), None).unwrap()))
            .collect();
        let outs: Vec<ValueId> = (0..2)
            .map(|k| g.add_value(format!("out{k}"), None).unwrap())
            .collect();
        let mut node = NewNode::new("Scan")
            .outputs(outs)
            .attr("body", AttrValue::Graph(Box::new(running_sum())))
            .attr("num_scan_inputs", AttrValue::Int(1));
        node.inputs = ins;
        for (name, value) in attrs {
            node = node.attr(name, value);
        }
        let id = g.add_node(node).unwrap();
        crate::run_node(&g, id, opset, inputs)
    }

    fn f64s(t: &Tensor) -> (Vec<usize>, Vec<f64>) {
        match t {
            Tensor::F64(a) => (a.shape().to_vec(), a.iter().copied().collect()),
            t => panic!("expected double, found {}", t.dtype()),
        }
    }

    fn doubles(shape: &[usize], v: &[f64]) -> Tensor {
        Tensor::F64(ArrayD::from_shape_vec(IxDyn(shape), v.to_vec()).unwrap())
    }

    #[test]
    fn scan8_runs_each_batch_entry_from_its_own_state() {
        let init = doubles(&[2, 2], &[0.0, 0.0, 10.0, 20.0]);
        let x = doubles(
            &[2, 3, 2],
            &[1., 2., 3., 4., 5., 6., 0.5, 0.25, 1., 1., 2., 2.],
        );
        let outs = run_scan(8, vec![], &[None, Some(&init), Some(&x)]).unwrap();
        assert_eq!(f64s(&outs[0]), (vec![2, 2], vec![9., 12., 13.5, 23.25]));
        assert_eq!(
            f64s(&outs[1]),
            (
                vec![2, 3, 2],
                vec![1., 2., 4., 6., 9., 12., 10.5, 20.25, 11.5, 21.25, 13.5, 23.25]
            )
        );
    }

    #[test]
    fn scan8_stops_at_sequence_lens_and_pads_with_zeros() {
        let init = doubles(&[2, 1], &[0.0, 100.0]);
        let x = doubles(&[2, 3, 1], &[1., 2., 3., 4., 5., 6.]);
        let lens = Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[2]), vec![3, 1]).unwrap());
        let outs = run_scan(8, vec![], &[Some(&lens), Some(&init), Some(&x)]).unwrap();
        assert_eq!(f64s(&outs[0]), (vec![2, 1], vec![6., 104.]));
        assert_eq!(
            f64s(&outs[1]),
            (vec![2, 3, 1], vec![1., 3., 6., 104., 0., 0.])
        );
        // Reversed: each entry's own first `len` items, last first.
        let reverse = vec![("directions", AttrValue::Ints(vec![1]))];
        let lens = Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[2]), vec![2, 3]).unwrap());
        let outs = run_scan(8, reverse, &[Some(&lens), Some(&init), Some(&x)]).unwrap();
        assert_eq!(f64s(&outs[0]), (vec![2, 1], vec![3., 115.]));
        assert_eq!(
            f64s(&outs[1]),
            (vec![2, 3, 1], vec![2., 3., 0., 106., 111., 115.])
        );
    }

    #[test]
    fn scan8_sums_integers_exactly() {
        let init =
            Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[1, 1]), vec![i64::MAX - 10]).unwrap());
        let x = Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[1, 2, 1]), vec![3, 4]).unwrap());
        let outs = run_scan(8, vec![], &[None, Some(&init), Some(&x)]).unwrap();
        assert_eq!(
            outs[0],
            Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[1, 1]), vec![i64::MAX - 3]).unwrap())
        );
    }

    #[test]
    fn scan8_refuses_bad_shapes_and_lengths() {
        let init = doubles(&[1, 1], &[0.0]);
        let flat = doubles(&[3], &[1., 2., 3.]);
        let e = run_scan(8, vec![], &[None, Some(&init), Some(&flat)]).unwrap_err();
        assert!(e.to_string().contains("batch"), "{e}");
        let x = doubles(&[2, 3, 1], &[1., 2., 3., 4., 5., 6.]);
        let e = run_scan(8, vec![], &[None, Some(&init), Some(&x)]).unwrap_err();
        assert!(e.to_string().contains("batch axis"), "{e}");
        let init2 = doubles(&[2, 1], &[0.0, 0.0]);
        let lens = Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[2]), vec![4, 1]).unwrap());
        let e = run_scan(8, vec![], &[Some(&lens), Some(&init2), Some(&x)]).unwrap_err();
        assert!(e.to_string().contains("sequence_lens"), "{e}");
    }

    #[test]
    fn scan9_still_scans_without_a_batch_axis() {
        let init = doubles(&[1], &[0.0]);
        let x = doubles(&[3, 1], &[1., 2., 3.]);
        let outs = run_scan(9, vec![], &[Some(&init), Some(&x)]).unwrap();
        assert_eq!(f64s(&outs[0]), (vec![1], vec![6.]));
        assert_eq!(f64s(&outs[1]), (vec![3, 1], vec![1., 3., 6.]));
    }
}
