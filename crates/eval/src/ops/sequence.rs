//! Sequences and optionals: the operators that make, take apart and pass
//! on ONNX's container values (`Data::Sequence`, `Data::Optional`), and
//! Identity, which passes any value on. Their kernels read and write
//! [`Data`] instead of tensors.

use super::control::{graph_attr, in_subgraph, prepare};
use super::typed::{any_elem, Elem};
use super::DataKernel;
use crate::{DataRef, EvalError, OpCtx};
use qgraph_ir::ndarray::{concatenate, ArrayD, Axis, IxDyn, Slice};
use qgraph_ir::{AttrValue, Data, Tensor};

pub const DATA_KERNELS: &[(&str, DataKernel)] = &[
    ("Identity", identity),
    ("SequenceEmpty", sequence_empty),
    ("SequenceConstruct", sequence_construct),
    ("SequenceAt", sequence_at),
    ("SequenceInsert", sequence_insert),
    ("SequenceErase", sequence_erase),
    ("SequenceLength", sequence_length),
    ("SplitToSequence", split_to_sequence),
    ("ConcatFromSequence", concat_from_sequence),
    ("SequenceMap", sequence_map),
    ("Optional", optional),
    ("OptionalHasElement", optional_has_element),
    ("OptionalGetElement", optional_get_element),
];

type Out = Result<Vec<Data>, EvalError>;

fn arg<'a>(cx: &OpCtx, inputs: &[Option<DataRef<'a>>], i: usize) -> Result<DataRef<'a>, EvalError> {
    match inputs.get(i).copied().flatten() {
        Some(d) => Ok(d),
        None => cx.err(format!("input {i} is required")),
    }
}

fn sequence<'a>(
    cx: &OpCtx,
    inputs: &[Option<DataRef<'a>>],
    i: usize,
) -> Result<&'a [Tensor], EvalError> {
    match arg(cx, inputs, i)? {
        DataRef::Sequence(items) => Ok(items),
        d => cx.err(format!("input {i} must be a sequence, found {}", d.kind())),
    }
}

fn tensor<'a>(
    cx: &OpCtx,
    inputs: &[Option<DataRef<'a>>],
    i: usize,
) -> Result<&'a Tensor, EvalError> {
    match arg(cx, inputs, i)? {
        DataRef::Tensor(t) => Ok(t),
        d => cx.err(format!("input {i} must be a tensor, found {}", d.kind())),
    }
}

fn scalar_bool(b: bool) -> Data {
    Data::Tensor(Tensor::Bool(ArrayD::from_elem(IxDyn(&[]), b)))
}

/// A position input (a scalar int32 or int64; negative counts from the
/// end) as an index in `0..=len` (`insert`: the end itself allowed) or
/// `0..len`.
fn position(cx: &OpCtx, t: &Tensor, len: usize, insert: bool) -> Result<usize, EvalError> {
    let p = match t {
        Tensor::I64(a) if a.len() == 1 => *a.iter().next().expect("one element"),
        Tensor::I32(a) if a.len() == 1 => *a.iter().next().expect("one element") as i64,
        t => {
            return cx.err(format!(
                "the position must be one int32 or int64, found {} of shape {:?}",
                t.dtype(),
                t.shape()
            ))
        }
    };
    let n = len as i64;
    let upper = if insert { n } else { n - 1 };
    if p < -n || p > upper {
        return cx.err(format!(
            "position {p} is out of range for a sequence of {len} tensors"
        ));
    }
    Ok(if p < 0 { (p + n) as usize } else { p as usize })
}

/// An element joining a sequence must have the sequence's element type.
fn check_same_type(cx: &OpCtx, items: &[Tensor], t: &Tensor) -> Result<(), EvalError> {
    match items.first() {
        Some(first) if first.dtype() != t.dtype() => cx.err(format!(
            "a {} tensor cannot join a sequence of {} tensors",
            t.dtype(),
            first.dtype()
        )),
        _ => Ok(()),
    }
}

/// Identity: any value, passed on unchanged.
fn identity(cx: &OpCtx, inputs: &[Option<DataRef>]) -> Out {
    Ok(vec![arg(cx, inputs, 0)?.to_data()])
}

fn sequence_empty(_cx: &OpCtx, _inputs: &[Option<DataRef>]) -> Out {
    Ok(vec![Data::Sequence(Vec::new())])
}

fn sequence_construct(cx: &OpCtx, inputs: &[Option<DataRef>]) -> Out {
    let mut items: Vec<Tensor> = Vec::with_capacity(inputs.len());
    for i in 0..inputs.len() {
        let t = tensor(cx, inputs, i)?;
        check_same_type(cx, &items, t)?;
        items.push(t.clone());
    }
    Ok(vec![Data::Sequence(items)])
}

fn sequence_at(cx: &OpCtx, inputs: &[Option<DataRef>]) -> Out {
    let items = sequence(cx, inputs, 0)?;
    let at = position(cx, tensor(cx, inputs, 1)?, items.len(), false)?;
    Ok(vec![Data::Tensor(items[at].clone())])
}

fn sequence_insert(cx: &OpCtx, inputs: &[Option<DataRef>]) -> Out {
    let items = sequence(cx, inputs, 0)?;
    let t = tensor(cx, inputs, 1)?;
    check_same_type(cx, items, t)?;
    let at = match inputs.get(2).copied().flatten() {
        Some(_) => position(cx, tensor(cx, inputs, 2)?, items.len(), true)?,
        None => items.len(),
    };
    let mut out = items.to_vec();
    out.insert(at, t.clone());
    Ok(vec![Data::Sequence(out)])
}

fn sequence_erase(cx: &OpCtx, inputs: &[Option<DataRef>]) -> Out {
    let items = sequence(cx, inputs, 0)?;
    if items.is_empty() {
        return cx.err("cannot erase from an empty sequence");
    }
    let at = match inputs.get(1).copied().flatten() {
        Some(_) => position(cx, tensor(cx, inputs, 1)?, items.len(), false)?,
        None => items.len() - 1,
    };
    let mut out = items.to_vec();
    out.remove(at);
    Ok(vec![Data::Sequence(out)])
}

fn sequence_length(cx: &OpCtx, inputs: &[Option<DataRef>]) -> Out {
    let items = sequence(cx, inputs, 0)?;
    Ok(vec![Data::Tensor(Tensor::I64(ArrayD::from_elem(
        IxDyn(&[]),
        items.len() as i64,
    )))])
}

/// The piece `start..end` of `t` along `axis`, that axis dropped when
/// `squeeze` (a piece of length 1).
fn piece(
    cx: &OpCtx,
    t: &Tensor,
    axis: usize,
    start: usize,
    end: usize,
    squeeze: bool,
) -> Result<Tensor, EvalError> {
    Ok(any_elem!(cx, t, "the input", |a| {
        let p = a.slice_axis(Axis(axis), Slice::from(start..end));
        if squeeze {
            Elem::wrap(p.index_axis(Axis(axis), 0).to_owned())
        } else {
            Elem::wrap(p.to_owned())
        }
    }))
}

/// SplitToSequence: pieces along `axis` of the sizes `split` gives (a
/// scalar: equal pieces, the last one shorter; a list: each size), or of
/// length 1 without it, then without the axis unless `keepdims`.
fn split_to_sequence(cx: &OpCtx, inputs: &[Option<DataRef>]) -> Out {
    let x = tensor(cx, inputs, 0)?;
    let rank = x.shape().len();
    if rank == 0 {
        return cx.err("the input must have at least one dimension");
    }
    let axis = cx.axis(cx.int_attr("axis", 0)?, rank)?;
    let len = x.shape()[axis];
    let (sizes, squeeze) = match inputs.get(1).copied().flatten() {
        None => (vec![1; len], cx.int_attr("keepdims", 1)? == 0),
        Some(_) => {
            let split = tensor(cx, inputs, 1)?;
            let values = match split {
                Tensor::I64(a) => a.iter().copied().collect::<Vec<_>>(),
                Tensor::I32(a) => a.iter().map(|&v| v as i64).collect(),
                t => return cx.err(format!("split must be int32 or int64, found {}", t.dtype())),
            };
            let sizes: Vec<usize> = if split.shape().is_empty() {
                let each = values[0];
                if each <= 0 {
                    return cx.err(format!("split must be positive, found {each}"));
                }
                let each = each as usize;
                (0..len.div_ceil(each))
                    .map(|k| each.min(len - k * each))
                    .collect()
            } else {
                if values.iter().any(|&v| v < 0) {
                    return cx.err(format!("split sizes must not be negative: {values:?}"));
                }
                let sizes: Vec<usize> = values.iter().map(|&v| v as usize).collect();
                if sizes.iter().sum::<usize>() != len {
                    return cx.err(format!(
                        "split sizes {values:?} do not add up to the axis length {len}"
                    ));
                }
                sizes
            };
            (sizes, false)
        }
    };
    let mut items = Vec::with_capacity(sizes.len());
    let mut start = 0;
    for size in sizes {
        items.push(piece(cx, x, axis, start, start + size, squeeze)?);
        start += size;
    }
    Ok(vec![Data::Sequence(items)])
}

fn join_like<T: Elem>(
    cx: &OpCtx,
    _like: &ArrayD<T>,
    parts: &[Tensor],
    axis: usize,
    new_axis: bool,
) -> Result<Tensor, EvalError> {
    let mut views = Vec::with_capacity(parts.len());
    for p in parts {
        match T::unwrap(p) {
            Some(a) if new_axis => views.push(a.view().insert_axis(Axis(axis))),
            Some(a) => views.push(a.view()),
            None => return cx.err(format!("the sequence mixes {} and {}", T::DTYPE, p.dtype())),
        }
    }
    concatenate(Axis(axis), &views)
        .map(T::wrap)
        .or_else(|e| cx.err(format!("the tensors do not join along axis {axis}: {e}")))
}

/// ConcatFromSequence: the sequence's tensors joined along `axis`, or
/// stacked along a new one (`new_axis`).
fn concat_from_sequence(cx: &OpCtx, inputs: &[Option<DataRef>]) -> Out {
    let items = sequence(cx, inputs, 0)?;
    let Some(first) = items.first() else {
        return cx.err("cannot concatenate an empty sequence");
    };
    let new_axis = cx.int_attr("new_axis", 0)? == 1;
    let rank = first.shape().len() + usize::from(new_axis);
    if rank == 0 {
        return cx.err("cannot concatenate scalars without new_axis");
    }
    let axis = cx.axis(cx.int_attr("axis", 0)?, rank)?;
    let joined = any_elem!(cx, first, "the sequence's tensors", |a| join_like(
        cx, a, items, axis, new_axis
    )?);
    Ok(vec![Data::Tensor(joined)])
}

/// SequenceMap: the body once per element of the input sequence, given
/// that element and, per additional input, its element of the same index
/// (a sequence) or the whole tensor; each body output collected into a
/// sequence.
fn sequence_map(cx: &OpCtx, inputs: &[Option<DataRef>]) -> Out {
    let body = graph_attr(cx, "body")?;
    let first = sequence(cx, inputs, 0)?;
    let count = first.len();
    for i in 1..inputs.len() {
        if let DataRef::Sequence(s) = arg(cx, inputs, i)? {
            if s.len() != count {
                return cx.err(format!(
                    "additional input {i} is a sequence of {} tensors, the input sequence has {count}",
                    s.len()
                ));
            }
        }
    }
    let ev = prepare(cx, body, "body")?;
    let mut outputs: Vec<Vec<Tensor>> = vec![Vec::new(); body.outputs().len()];
    ev.in_pool(|| {
        for k in 0..count {
            let mut args: Vec<Option<Tensor>> = vec![Some(first[k].clone())];
            for i in 1..inputs.len() {
                args.push(Some(match arg(cx, inputs, i)? {
                    DataRef::Sequence(s) => s[k].clone(),
                    DataRef::Tensor(t) => t.clone(),
                    d => return cx.err(format!("additional input {i} is {}", d.kind())),
                }));
            }
            let outs = ev
                .run_scoped(args, cx.captures)
                .map_err(|e| in_subgraph(cx, &format!("body, element {k}"), e))?;
            for (acc, t) in outputs.iter_mut().zip(outs) {
                acc.push(t);
            }
        }
        Ok::<_, EvalError>(())
    })?;
    Ok(outputs.into_iter().map(Data::Sequence).collect())
}

/// Optional: the input wrapped, or an empty optional of the `type`
/// attribute's type.
fn optional(cx: &OpCtx, inputs: &[Option<DataRef>]) -> Out {
    match inputs.first().copied().flatten() {
        Some(d) => Ok(vec![Data::Optional(Some(Box::new(d.to_data())))]),
        None => match cx.graph.node(cx.node).attr("type") {
            Some(AttrValue::Type(_)) => Ok(vec![Data::Optional(None)]),
            _ => cx.err("an Optional without an input needs the 'type' attribute"),
        },
    }
}

/// OptionalHasElement: whether the optional holds a value (from opset 18 a
/// tensor or sequence counts as one, an absent input as none).
fn optional_has_element(cx: &OpCtx, inputs: &[Option<DataRef>]) -> Out {
    let has = match inputs.first().copied().flatten() {
        None if cx.opset >= 18 => false,
        None => return cx.err("input 0 is required before opset 18"),
        Some(DataRef::Optional(inner)) => inner.is_some(),
        Some(_) if cx.opset >= 18 => true,
        Some(d) => return cx.err(format!("input 0 must be an optional, found {}", d.kind())),
    };
    Ok(vec![scalar_bool(has)])
}

/// OptionalGetElement: the optional's value (from opset 18 a tensor or
/// sequence passes through); an empty optional is an error.
fn optional_get_element(cx: &OpCtx, inputs: &[Option<DataRef>]) -> Out {
    match arg(cx, inputs, 0)? {
        DataRef::Optional(Some(d)) => Ok(vec![d.clone()]),
        DataRef::Optional(None) => cx.err("the optional is empty"),
        d if cx.opset >= 18 => Ok(vec![d.to_data()]),
        d => cx.err(format!("input 0 must be an optional, found {}", d.kind())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Evaluator;
    use qgraph_ir::{Graph, Model, NewNode, ValueId};

    fn node(g: &mut Graph, op: &str, inputs: &[Option<ValueId>], out: &str) -> ValueId {
        let v = g.add_value(out, None).unwrap();
        let mut n = NewNode::new(op);
        n.inputs = inputs.to_vec();
        n.outputs = vec![Some(v)];
        if op == "SplitToSequence" {
            n = n.attr("axis", AttrValue::Int(1));
        }
        if op == "ConcatFromSequence" {
            n = n.attr("axis", AttrValue::Int(1));
        }
        g.add_node(n).unwrap();
        v
    }

    /// A chain through every kind of value: a tensor split into a
    /// sequence, taken apart, joined again and wrapped in an optional,
    /// run by the evaluator itself (values of every kind in its
    /// environment, sequences and optionals as graph outputs).
    #[test]
    fn sequences_and_optionals_flow_through_a_graph() {
        let mut g = Graph::new("seq");
        let x = g.add_input("x", None).unwrap();
        let pos = g.add_input("pos", None).unwrap();
        let s = node(&mut g, "SplitToSequence", &[Some(x)], "s");
        let n = node(&mut g, "SequenceLength", &[Some(s)], "n");
        let last = node(&mut g, "SequenceAt", &[Some(s), Some(pos)], "last");
        let grown = node(&mut g, "SequenceInsert", &[Some(s), Some(x)], "grown");
        let shrunk = node(&mut g, "SequenceErase", &[Some(grown)], "shrunk");
        let joined = node(&mut g, "ConcatFromSequence", &[Some(shrunk)], "joined");
        let opt = node(&mut g, "Optional", &[Some(s)], "opt");
        let has = node(&mut g, "OptionalHasElement", &[Some(opt)], "has");
        let back = node(&mut g, "OptionalGetElement", &[Some(opt)], "back");
        g.set_outputs(vec![n, last, joined, has, back, opt])
            .unwrap();
        let model = Model::new(g, 18);
        let ev = Evaluator::new(&model).unwrap();
        let xs = Tensor::f32(&[2, 3], vec![1., 2., 3., 4., 5., 6.]).unwrap();
        let outs = ev
            .run_data(vec![
                Data::Tensor(xs.clone()),
                Data::Tensor(Tensor::i64_vector(vec![-1])),
            ])
            .unwrap();
        let column = |a: f32, b: f32| Tensor::f32(&[2, 1], vec![a, b]).unwrap();
        let pieces = vec![column(1., 4.), column(2., 5.), column(3., 6.)];
        assert_eq!(
            outs[0],
            Data::Tensor(Tensor::I64(ArrayD::from_elem(IxDyn(&[]), 3)))
        );
        assert_eq!(outs[1], Data::Tensor(column(3., 6.)));
        assert_eq!(outs[2], Data::Tensor(xs));
        assert_eq!(outs[3], scalar_bool(true));
        assert_eq!(outs[4], Data::Sequence(pieces.clone()));
        assert_eq!(
            outs[5],
            Data::Optional(Some(Box::new(Data::Sequence(pieces))))
        );
        // A tensor kernel given a sequence names the value.
        let mut g = Graph::new("wrong");
        let x = g.add_input("x", None).unwrap();
        let s = node(&mut g, "SplitToSequence", &[Some(x)], "s");
        let y = node(&mut g, "Relu", &[Some(s)], "y");
        g.set_outputs(vec![y]).unwrap();
        let model = Model::new(g, 18);
        let ev = Evaluator::new(&model).unwrap();
        let e = ev
            .run_data(vec![Data::Tensor(
                Tensor::f32(&[1, 2], vec![1., 2.]).unwrap(),
            )])
            .unwrap_err();
        assert!(e.to_string().contains("'s' is a sequence"), "{e}");
    }

    #[test]
    fn positions_out_of_range_are_errors() {
        let mut g = Graph::new("seq");
        let x = g.add_input("x", None).unwrap();
        let pos = g.add_input("pos", None).unwrap();
        let s = node(&mut g, "SplitToSequence", &[Some(x)], "s");
        let at = node(&mut g, "SequenceAt", &[Some(s), Some(pos)], "at");
        g.set_outputs(vec![at]).unwrap();
        let model = Model::new(g, 18);
        let ev = Evaluator::new(&model).unwrap();
        for p in [3, -4] {
            let e = ev
                .run_data(vec![
                    Data::Tensor(Tensor::f32(&[1, 3], vec![1., 2., 3.]).unwrap()),
                    Data::Tensor(Tensor::i64_vector(vec![p])),
                ])
                .unwrap_err();
            assert!(e.to_string().contains("out of range"), "{e}");
        }
    }
}
