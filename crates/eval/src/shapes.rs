//! Shape inference by abstract evaluation: each value gets its element type
//! and dims, known or symbolic (the batch `N` stays `N`), and small integer
//! tensors that compute shapes (Shape → Gather → Concat → Reshape chains)
//! get their elements, each known or symbolic. The rules follow the
//! kernels in `ops/`; an operator without a rule gives unknown results,
//! never an error: inference only ever adds knowledge.

use qgraph_ir::{AttrValue, DataType, Dim, Graph, Model, NodeId, Tensor, ValueId, ValueType};
use std::collections::HashMap;

/// What is known of a value before the model runs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Info {
    pub dtype: Option<DataType>,
    /// `None`: rank unknown.
    pub dims: Option<Vec<Dim>>,
    /// For a small integer tensor of rank 0 or 1: its elements.
    pub elements: Option<Vec<Dim>>,
}

impl Info {
    fn of_tensor(t: &Tensor) -> Info {
        let elements = match t {
            Tensor::I64(a) if a.len() <= 64 && a.ndim() <= 1 => {
                Some(a.iter().map(|&v| Dim::Known(v)).collect())
            }
            Tensor::I32(a) if a.len() <= 64 && a.ndim() <= 1 => {
                Some(a.iter().map(|&v| Dim::Known(v as i64)).collect())
            }
            _ => None,
        };
        Info {
            dtype: Some(t.dtype()),
            dims: Some(t.shape().iter().map(|&d| Dim::Known(d as i64)).collect()),
            elements,
        }
    }

    fn of_type(ty: Option<ValueType>) -> Info {
        match ty {
            Some(ValueType::Tensor(t)) => Info {
                dtype: t.dtype,
                dims: t.shape,
                elements: None,
            },
            _ => Info::default(),
        }
    }

    fn known_dims(&self) -> Option<Vec<i64>> {
        self.dims.as_ref()?.iter().map(known).collect()
    }

    /// The elements, all known (negative values included: axes, -1).
    pub(crate) fn ints(&self) -> Option<Vec<i64>> {
        self.elements
            .as_ref()?
            .iter()
            .map(|d| match d {
                Dim::Known(k) => Some(*k),
                _ => None,
            })
            .collect()
    }
}

fn known(d: &Dim) -> Option<i64> {
    match d {
        Dim::Known(k) if *k >= 0 => Some(*k),
        _ => None,
    }
}

/// Infers every value of the main graph.
pub fn infer(model: &Model) -> HashMap<ValueId, Info> {
    let g = &model.graph;
    let opset = model.opset_version("").unwrap_or(1);
    let mut info: HashMap<ValueId, Info> = HashMap::new();
    for v in g.value_ids() {
        let val = g.value(v);
        let i = match val.initializer() {
            Some(init) if !val.is_graph_input() && !init.tensor.is_elided() => {
                Info::of_tensor(&init.tensor)
            }
            _ => Info::of_type(val.effective_type()),
        };
        info.insert(v, i);
    }
    let Ok(order) = g.topo_order() else {
        return info;
    };
    for n in order {
        let node = g.node(n);
        let ins: Vec<Info> = node
            .inputs()
            .iter()
            .map(|v| v.and_then(|v| info.get(&v).cloned()).unwrap_or_default())
            .collect();
        let outs = if node.domain.is_empty() {
            rule(g, n, opset, &ins)
        } else {
            Vec::new()
        };
        for (slot, v) in node.outputs().iter().enumerate() {
            let Some(v) = v else { continue };
            let inferred = outs.get(slot).cloned().unwrap_or_default();
            let declared = info.remove(v).unwrap_or_default();
            info.insert(*v, merge(declared, inferred));
        }
    }
    info
}

/// Declared knowledge refined by inferred knowledge (a declared dim stays
/// where inference knows less).
fn merge(declared: Info, inferred: Info) -> Info {
    let dims = match (declared.dims, inferred.dims) {
        (Some(d), Some(i)) if d.len() == i.len() => Some(
            d.into_iter()
                .zip(i)
                .map(|(d, i)| match (&d, &i) {
                    (_, Dim::Known(_)) => i,
                    (Dim::Unknown, Dim::Symbol(_)) => i,
                    _ => d,
                })
                .collect(),
        ),
        (Some(d), _) => Some(d),
        (None, i) => i,
    };
    Info {
        dtype: inferred.dtype.or(declared.dtype),
        dims,
        elements: inferred.elements,
    }
}

pub(crate) fn int_attr(g: &Graph, n: NodeId, name: &str) -> Option<i64> {
    match g.node(n).attr(name) {
        Some(AttrValue::Int(i)) => Some(*i),
        _ => None,
    }
}

pub(crate) fn ints_attr(g: &Graph, n: NodeId, name: &str) -> Option<Vec<i64>> {
    match g.node(n).attr(name) {
        Some(AttrValue::Ints(v)) => Some(v.clone()),
        _ => None,
    }
}

fn axis(a: i64, rank: usize) -> Option<usize> {
    let r = rank as i64;
    let a = if a < 0 { a + r } else { a };
    (0..r.max(1)).contains(&a).then_some(a as usize)
}

/// numpy broadcasting of two dim lists.
fn broadcast(a: &[Dim], b: &[Dim]) -> Vec<Dim> {
    let n = a.len().max(b.len());
    (0..n)
        .map(|k| {
            let x = if k + a.len() >= n {
                a[k + a.len() - n].clone()
            } else {
                Dim::Known(1)
            };
            let y = if k + b.len() >= n {
                b[k + b.len() - n].clone()
            } else {
                Dim::Known(1)
            };
            match (&x, &y) {
                _ if x == y => x,
                (Dim::Known(1), _) => y,
                (_, Dim::Known(1)) => x,
                (Dim::Known(_), Dim::Known(_)) => Dim::Unknown,
                (Dim::Known(_), _) => x,
                (_, Dim::Known(_)) => y,
                _ => Dim::Unknown,
            }
        })
        .collect()
}

fn same(i: &Info, dtype: Option<DataType>) -> Info {
    Info {
        dtype: dtype.or(i.dtype),
        dims: i.dims.clone(),
        elements: None,
    }
}

fn shaped(dtype: Option<DataType>, dims: Vec<Dim>) -> Info {
    Info {
        dtype,
        dims: Some(dims),
        elements: None,
    }
}

/// Output size of a window over `size` (Conv and pooling), when known; the
/// same arithmetic as the kernels' `window`.
fn window_out(
    size: &Dim,
    kernel: i64,
    stride: i64,
    dilation: i64,
    pads: (i64, i64),
    auto_pad: &str,
    ceil: bool,
) -> Dim {
    let Some(s) = known(size) else {
        return Dim::Unknown;
    };
    if stride < 1 || kernel < 1 || dilation < 1 {
        return Dim::Unknown;
    }
    if auto_pad == "SAME_UPPER" || auto_pad == "SAME_LOWER" {
        return Dim::Known((s + stride - 1) / stride);
    }
    let (begin, end) = if auto_pad == "VALID" { (0, 0) } else { pads };
    let span = (kernel - 1) * dilation + 1;
    let padded = s + begin + end;
    if padded < span {
        return Dim::Unknown;
    }
    let steps = padded - span;
    let mut out = if ceil {
        (steps + stride - 1) / stride
    } else {
        steps / stride
    } + 1;
    if ceil && (out - 1) * stride >= s + begin {
        out -= 1;
    }
    Dim::Known(out)
}

fn windowed(g: &Graph, n: NodeId, x: &Info, channels: Dim, kernel: Option<Vec<i64>>) -> Info {
    let Some(dims) = &x.dims else {
        return same(x, None);
    };
    if dims.len() < 3 {
        return Info::default();
    }
    let sp = dims.len() - 2;
    let Some(kernel) = kernel.or_else(|| ints_attr(g, n, "kernel_shape")) else {
        return Info::default();
    };
    if kernel.len() != sp {
        return Info::default();
    }
    let strides = ints_attr(g, n, "strides").unwrap_or(vec![1; sp]);
    let dil = ints_attr(g, n, "dilations").unwrap_or(vec![1; sp]);
    let pads = ints_attr(g, n, "pads").unwrap_or(vec![0; 2 * sp]);
    let auto_pad = match g.node(n).attr("auto_pad") {
        Some(AttrValue::String(s)) => String::from_utf8_lossy(s).into_owned(),
        _ => "NOTSET".into(),
    };
    let ceil = int_attr(g, n, "ceil_mode").unwrap_or(0) != 0;
    if strides.len() != sp || dil.len() != sp || pads.len() != 2 * sp {
        return Info::default();
    }
    let mut out = vec![dims[0].clone(), channels];
    for d in 0..sp {
        out.push(window_out(
            &dims[d + 2],
            kernel[d],
            strides[d],
            dil[d],
            (pads[d], pads[d + sp]),
            &auto_pad,
            ceil,
        ));
    }
    shaped(x.dtype, out)
}

/// Product of dims, symbolic when exactly one is a symbol and the rest known.
fn product(dims: &[Dim]) -> Dim {
    let mut k = 1i64;
    let mut sym = None;
    for d in dims {
        match d {
            Dim::Known(v) if *v >= 0 => k = k.saturating_mul(*v),
            Dim::Symbol(s) if sym.is_none() => sym = Some(s.clone()),
            _ => return Dim::Unknown,
        }
    }
    match sym {
        None => Dim::Known(k),
        Some(s) if k == 1 => Dim::Symbol(s),
        Some(_) => Dim::Unknown,
    }
}

fn reshape(x: &[Dim], target: &[Dim], allowzero: bool) -> Option<Vec<Dim>> {
    let mut out: Vec<Dim> = target
        .iter()
        .enumerate()
        .map(|(i, d)| match d {
            Dim::Known(0) if !allowzero => x.get(i).cloned().unwrap_or(Dim::Unknown),
            other => other.clone(),
        })
        .collect();
    let holes: Vec<usize> = (0..out.len())
        .filter(|&i| out[i] == Dim::Known(-1))
        .collect();
    match holes[..] {
        [] => Some(out),
        [h] => {
            // Cancel the symbols the output keeps, then divide known sizes.
            let mut syms: Vec<&Dim> = x.iter().filter(|d| matches!(d, Dim::Symbol(_))).collect();
            let mut rest = 1i64;
            for (i, d) in out.iter().enumerate() {
                if i == h {
                    continue;
                }
                match d {
                    Dim::Known(v) if *v > 0 => rest *= v,
                    Dim::Symbol(_) => match syms.iter().position(|s| *s == d) {
                        Some(p) => {
                            syms.remove(p);
                        }
                        None => return Some(with_unknown(out, h)),
                    },
                    _ => return Some(with_unknown(out, h)),
                }
            }
            let total: i64 = x
                .iter()
                .filter(|d| !matches!(d, Dim::Symbol(_)))
                .map(known)
                .product::<Option<i64>>()?;
            out[h] = match syms.len() {
                0 if rest > 0 && total % rest == 0 => Dim::Known(total / rest),
                1 if rest > 0 && total == rest => syms[0].clone(),
                _ => Dim::Unknown,
            };
            Some(out)
        }
        _ => None,
    }
}

fn with_unknown(mut dims: Vec<Dim>, i: usize) -> Vec<Dim> {
    dims[i] = Dim::Unknown;
    dims
}

/// The constant integers of input `i` (from the abstract elements).
fn input_ints(ins: &[Info], i: usize) -> Option<Vec<i64>> {
    ins.get(i)?.ints()
}

fn rule(g: &Graph, n: NodeId, opset: i64, ins: &[Info]) -> Vec<Info> {
    let node = g.node(n);
    let x = ins.first().cloned().unwrap_or_default();
    let op = node.op_type.as_str();
    let one = |i: Info| vec![i];
    match op {
        "Relu"
        | "LeakyRelu"
        | "Clip"
        | "Sigmoid"
        | "HardSigmoid"
        | "HardSwish"
        | "Tanh"
        | "Neg"
        | "Abs"
        | "Sqrt"
        | "Exp"
        | "Log"
        | "Reciprocal"
        | "Floor"
        | "Ceil"
        | "Softmax"
        | "BatchNormalization"
        | "Erf"
        | "Elu"
        | "Selu"
        | "Softplus"
        | "Gelu"
        | "LRN"
        | "InstanceNormalization"
        | "LayerNormalization"
        | "Sin"
        | "Cos"
        | "Tan"
        | "Asin"
        | "Acos"
        | "Atan"
        | "Sinh"
        | "Cosh"
        | "Asinh"
        | "Acosh"
        | "Atanh"
        | "Sign"
        | "Round"
        | "Celu"
        | "Mish"
        | "Swish"
        | "Softsign"
        | "ThresholdedRelu"
        | "Shrink"
        | "Not"
        | "BitwiseNot"
        | "LogSoftmax"
        | "Hardmax"
        | "CumSum"
        | "CumProd"
        | "RMSNormalization"
        | "GroupNormalization"
        | "MeanVarianceNormalization"
        | "LpNormalization" => one(same(&x, None)),
        "IsNaN" | "IsInf" => one(same(&x, Some(DataType::Bool))),
        "Identity" => one(x.clone()),
        "Dropout" => vec![same(&x, None), same(&x, Some(DataType::Bool))],
        "Cast" => {
            let to = int_attr(g, n, "to")
                .and_then(|t| i32::try_from(t).ok())
                .and_then(DataType::from_onnx_code);
            let mut out = same(&x, to);
            if matches!(to, Some(DataType::I64 | DataType::I32)) {
                out.elements = x.elements.clone();
            }
            one(out)
        }
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Max" | "Min" | "Equal" | "Less" | "Greater"
        | "And" | "Or" | "Where" | "PRelu" | "LessOrEqual" | "GreaterOrEqual" | "Xor" | "Mod"
        | "BitShift" | "BitwiseAnd" | "BitwiseOr" | "BitwiseXor" | "Sum" | "Mean" => {
            let dims = ins
                .iter()
                .map(|i| i.dims.clone())
                .collect::<Option<Vec<_>>>()
                .map(|all| all.iter().fold(Vec::new(), |acc, d| broadcast(&acc, d)));
            let dtype = match op {
                "Equal" | "Less" | "Greater" | "And" | "Or" | "LessOrEqual" | "GreaterOrEqual"
                | "Xor" => Some(DataType::Bool),
                "Where" => ins.get(1).and_then(|i| i.dtype),
                _ => x.dtype,
            };
            let mut out = Info {
                dtype,
                dims,
                elements: None,
            };
            // Known integer arithmetic on shape vectors.
            if let (Some(a), Some(b)) = (input_ints(ins, 0), input_ints(ins, 1)) {
                if a.len() == b.len() || b.len() == 1 || a.len() == 1 {
                    let len = a.len().max(b.len());
                    let at = |v: &Vec<i64>, i: usize| v[if v.len() == 1 { 0 } else { i }];
                    let vals: Option<Vec<Dim>> = (0..len)
                        .map(|i| {
                            let (p, q) = (at(&a, i), at(&b, i));
                            match op {
                                "Add" => p.checked_add(q),
                                "Sub" => p.checked_sub(q),
                                "Mul" => p.checked_mul(q),
                                "Div" if q != 0 => Some(p.div_euclid(q)),
                                _ => None,
                            }
                            .map(Dim::Known)
                        })
                        .collect();
                    out.elements = vals;
                }
            }
            one(out)
        }
        "Conv" => {
            // Weights [M, C/group, k...]: a malformed rank gives no shape.
            let w = ins
                .get(1)
                .and_then(|w| w.known_dims())
                .filter(|w| w.len() >= 3);
            let Some(w) = w else {
                return one(Info {
                    dtype: x.dtype,
                    ..Info::default()
                });
            };
            let channels = Dim::Known(w[0]);
            one(windowed(g, n, &x, channels, Some(w[2..].to_vec())))
        }
        "MaxPool" | "AveragePool" | "LpPool" => {
            let c = x
                .dims
                .as_ref()
                .and_then(|d| d.get(1).cloned())
                .unwrap_or(Dim::Unknown);
            let out = windowed(g, n, &x, c, None);
            vec![out.clone(), same(&out, Some(DataType::I64))]
        }
        "GlobalAveragePool" | "GlobalMaxPool" => one(match &x.dims {
            Some(d) if d.len() >= 2 => {
                let mut out = d[..2].to_vec();
                out.extend(std::iter::repeat_n(Dim::Known(1), d.len() - 2));
                shaped(x.dtype, out)
            }
            _ => same(&x, None),
        }),
        "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" => {
            let Some(d) = &x.dims else {
                return one(same(&x, None));
            };
            let axes = if opset >= 18 || (op == "ReduceSum" && opset >= 13) {
                match ins.get(1) {
                    Some(i) if i.dims.is_some() => i.ints(),
                    _ => None,
                }
            } else {
                ints_attr(g, n, "axes")
            };
            let keep = int_attr(g, n, "keepdims").unwrap_or(1) != 0;
            match reduced(d, axes, keep) {
                Some(out) => one(shaped(x.dtype, out)),
                None => one(Info::default()),
            }
        }
        "Gemm" => {
            let (Some(a), Some(b)) = (&x.dims, ins.get(1).and_then(|b| b.dims.clone())) else {
                return one(same(&x, None));
            };
            if a.len() != 2 || b.len() != 2 {
                return one(Info::default());
            }
            let ta = int_attr(g, n, "transA").unwrap_or(0) != 0;
            let tb = int_attr(g, n, "transB").unwrap_or(0) != 0;
            let m = if ta { a[1].clone() } else { a[0].clone() };
            let nn = if tb { b[0].clone() } else { b[1].clone() };
            one(shaped(x.dtype, vec![m, nn]))
        }
        "MatMul" => {
            let (Some(a), Some(b)) = (&x.dims, ins.get(1).and_then(|b| b.dims.clone())) else {
                return one(same(&x, None));
            };
            if a.is_empty() || b.is_empty() {
                return one(Info::default());
            }
            let (a_vec, b_vec) = (a.len() == 1, b.len() == 1);
            let a2: Vec<Dim> = if a_vec {
                vec![Dim::Known(1), a[0].clone()]
            } else {
                a.clone()
            };
            let b2: Vec<Dim> = if b_vec {
                vec![b[0].clone(), Dim::Known(1)]
            } else {
                b.clone()
            };
            let mut out = broadcast(&a2[..a2.len() - 2], &b2[..b2.len() - 2]);
            if !a_vec {
                out.push(a2[a2.len() - 2].clone());
            }
            if !b_vec {
                out.push(b2[b2.len() - 1].clone());
            }
            one(shaped(x.dtype, out))
        }
        "Flatten" => {
            let Some(d) = &x.dims else {
                return one(same(&x, None));
            };
            let Some(a) = axis(int_attr(g, n, "axis").unwrap_or(1), d.len() + 1) else {
                return one(Info::default());
            };
            one(shaped(x.dtype, vec![product(&d[..a]), product(&d[a..])]))
        }
        "Reshape" => {
            let allowzero = int_attr(g, n, "allowzero").unwrap_or(0) != 0;
            let target = ins.get(1).and_then(|i| i.elements.clone());
            let dims = match (&x.dims, target) {
                (Some(d), Some(t)) => reshape(d, &t, allowzero),
                (None, Some(t)) if !t.iter().any(|d| matches!(d, Dim::Known(0 | -1))) => Some(t),
                _ => None,
            };
            let mut out = Info {
                dtype: x.dtype,
                dims,
                elements: None,
            };
            out.elements = x
                .elements
                .clone()
                .filter(|_| out.dims.as_ref().is_some_and(|d| d.len() <= 1));
            one(out)
        }
        "Transpose" => {
            let Some(d) = &x.dims else {
                return one(same(&x, None));
            };
            let perm =
                ints_attr(g, n, "perm").unwrap_or_else(|| (0..d.len() as i64).rev().collect());
            let dims: Option<Vec<Dim>> = perm
                .iter()
                .map(|&p| axis(p, d.len()).map(|a| d[a].clone()))
                .collect();
            one(Info {
                dtype: x.dtype,
                dims,
                elements: None,
            })
        }
        "Concat" => {
            let all: Option<Vec<Vec<Dim>>> = ins.iter().map(|i| i.dims.clone()).collect();
            let Some(all) = all.filter(|a| !a.is_empty()) else {
                return one(Info {
                    dtype: x.dtype,
                    ..Info::default()
                });
            };
            let r = all[0].len();
            let Some(a) = int_attr(g, n, "axis").and_then(|a| axis(a, r)) else {
                return one(Info::default());
            };
            let mut out = all[0].clone();
            out[a] = product_sum(
                all.iter()
                    .map(|d| d.get(a).cloned().unwrap_or(Dim::Unknown)),
            );
            let elements = if r == 1 {
                ins.iter()
                    .map(|i| i.elements.clone())
                    .collect::<Option<Vec<_>>>()
                    .map(|v| v.concat())
            } else {
                None
            };
            one(Info {
                dtype: x.dtype,
                dims: Some(out),
                elements,
            })
        }
        "Shape" => {
            let Some(d) = &x.dims else {
                return one(shaped(Some(DataType::I64), vec![Dim::Unknown]));
            };
            let r = d.len() as i64;
            let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let start = clamp(int_attr(g, n, "start").unwrap_or(0));
            let end = clamp(int_attr(g, n, "end").unwrap_or(r));
            let picked: Vec<Dim> = d[start..end.max(start)].to_vec();
            one(Info {
                dtype: Some(DataType::I64),
                dims: Some(vec![Dim::Known(picked.len() as i64)]),
                elements: Some(picked),
            })
        }
        "Gather" => {
            let idx = ins.get(1).cloned().unwrap_or_default();
            let Some(d) = &x.dims else {
                return one(same(&x, None));
            };
            let Some(a) = axis(int_attr(g, n, "axis").unwrap_or(0), d.len()) else {
                return one(Info::default());
            };
            let Some(id) = &idx.dims else {
                return one(Info {
                    dtype: x.dtype,
                    ..Info::default()
                });
            };
            let mut out = d[..a].to_vec();
            out.extend(id.iter().cloned());
            out.extend(d[a + 1..].iter().cloned());
            let elements = match (&x.elements, idx.ints()) {
                (Some(e), Some(ix)) if d.len() == 1 => ix
                    .iter()
                    .map(|&i| {
                        let i = if i < 0 { i + e.len() as i64 } else { i };
                        e.get(usize::try_from(i).ok()?).cloned()
                    })
                    .collect(),
                _ => None,
            };
            one(Info {
                dtype: x.dtype,
                dims: Some(out),
                elements,
            })
        }
        "Unsqueeze" | "Squeeze" => {
            let axes = if opset >= 13 {
                match ins.get(1) {
                    Some(i) if i.dims.is_some() => i.ints(),
                    _ if op == "Squeeze" => None,
                    _ => return one(Info::default()),
                }
            } else {
                ints_attr(g, n, "axes")
            };
            let Some(d) = &x.dims else {
                return one(same(&x, None));
            };
            let dims = if op == "Unsqueeze" {
                let Some(axes) = axes else {
                    return one(Info::default());
                };
                let r = d.len() + axes.len();
                let axes: Option<Vec<usize>> = axes.iter().map(|&a| axis(a, r)).collect();
                axes.map(|axes| {
                    let mut src = d.iter();
                    (0..r)
                        .map(|i| {
                            if axes.contains(&i) {
                                Dim::Known(1)
                            } else {
                                src.next().cloned().unwrap_or(Dim::Unknown)
                            }
                        })
                        .collect()
                })
            } else {
                match axes {
                    Some(axes) => {
                        let axes: Option<Vec<usize>> =
                            axes.iter().map(|&a| axis(a, d.len())).collect();
                        axes.map(|axes| {
                            d.iter()
                                .enumerate()
                                .filter(|(i, _)| !axes.contains(i))
                                .map(|(_, dim)| dim.clone())
                                .collect()
                        })
                    }
                    None if d.iter().all(|dim| known(dim).is_some()) => Some(
                        d.iter()
                            .filter(|dim| **dim != Dim::Known(1))
                            .cloned()
                            .collect(),
                    ),
                    None => None,
                }
            };
            let elements = x
                .elements
                .clone()
                .filter(|_| dims.as_ref().is_some_and(|d: &Vec<Dim>| d.len() <= 1));
            one(Info {
                dtype: x.dtype,
                dims,
                elements,
            })
        }
        "ConstantOfShape" => {
            let dtype = match node.attr("value") {
                Some(AttrValue::Tensor(t)) => Some(t.dtype()),
                _ => Some(DataType::F32),
            };
            let dims = ins.first().and_then(|i| i.elements.clone());
            let mut out = Info {
                dtype,
                dims,
                elements: None,
            };
            if let (Some(d), Some(AttrValue::Tensor(t))) = (&out.dims, node.attr("value")) {
                let v = Info::of_tensor(t).ints();
                if let (Some(v), Some(len)) = (v, d.first().and_then(known)) {
                    if d.len() == 1 && len <= 64 && v.len() == 1 {
                        out.elements = Some(vec![Dim::Known(v[0]); len as usize]);
                    }
                }
            }
            one(out)
        }
        "Constant" => match node.attr("value") {
            Some(AttrValue::Tensor(t)) if !t.is_elided() => one(Info::of_tensor(t)),
            _ => one(Info::default()),
        },
        "Slice" => {
            let Some(d) = &x.dims else {
                return one(same(&x, None));
            };
            let (starts, ends, axes, steps) = if opset >= 10 {
                (
                    input_ints(ins, 1),
                    input_ints(ins, 2),
                    match ins.get(3) {
                        Some(i) if i.dims.is_some() => i.ints(),
                        _ => Some((0..d.len() as i64).collect()),
                    },
                    match ins.get(4) {
                        Some(i) if i.dims.is_some() => i.ints(),
                        _ => None,
                    },
                )
            } else {
                (
                    ints_attr(g, n, "starts"),
                    ints_attr(g, n, "ends"),
                    ints_attr(g, n, "axes").or_else(|| Some((0..d.len() as i64).collect())),
                    None,
                )
            };
            let (Some(starts), Some(ends), Some(axes)) = (starts, ends, axes) else {
                return one(Info {
                    dtype: x.dtype,
                    dims: Some(vec![Dim::Unknown; d.len()]),
                    elements: None,
                });
            };
            let steps = steps.unwrap_or(vec![1; starts.len()]);
            let mut out = d.clone();
            let mut picked_elements = x.elements.clone();
            for k in 0..starts
                .len()
                .min(ends.len())
                .min(axes.len())
                .min(steps.len())
            {
                let Some(a) = axis(axes[k], d.len()) else {
                    return one(Info::default());
                };
                let Some(size) = known(&d[a]) else {
                    out[a] = Dim::Unknown;
                    picked_elements = None;
                    continue;
                };
                let idx = slice_indices(size, starts[k], ends[k], steps[k]);
                out[a] = Dim::Known(idx.len() as i64);
                if d.len() == 1 {
                    picked_elements = picked_elements
                        .map(|e| idx.iter().filter_map(|&i| e.get(i).cloned()).collect());
                }
            }
            one(Info {
                dtype: x.dtype,
                dims: Some(out),
                elements: picked_elements.filter(|_| d.len() == 1),
            })
        }
        "Pad" => {
            let Some(d) = &x.dims else {
                return one(same(&x, None));
            };
            let pads = if opset >= 11 {
                input_ints(ins, 1)
            } else {
                ints_attr(g, n, "pads")
            };
            let axes: Option<Vec<usize>> = match ins.get(3) {
                Some(i) if opset >= 18 && i.dims.is_some() => i
                    .ints()
                    .and_then(|a| a.iter().map(|&a| axis(a, d.len())).collect()),
                _ => Some((0..d.len()).collect()),
            };
            let (Some(pads), Some(axes)) = (pads, axes) else {
                return one(Info {
                    dtype: x.dtype,
                    dims: Some(vec![Dim::Unknown; d.len()]),
                    elements: None,
                });
            };
            if pads.len() != 2 * axes.len() {
                return one(Info::default());
            }
            let mut out = d.clone();
            for (k, &a) in axes.iter().enumerate() {
                out[a] = match known(&d[a]) {
                    Some(s) => Dim::Known(s + pads[k] + pads[k + axes.len()]),
                    None if pads[k] == 0 && pads[k + axes.len()] == 0 => d[a].clone(),
                    None => Dim::Unknown,
                };
            }
            one(shaped(x.dtype, out))
        }
        "QuantizeLinear" => {
            let dtype = ins
                .get(2)
                .and_then(|z| z.dtype)
                .or_else(|| {
                    int_attr(g, n, "output_dtype")
                        .and_then(|t| i32::try_from(t).ok())
                        .and_then(DataType::from_onnx_code)
                })
                .or(Some(DataType::U8));
            one(same(&x, dtype))
        }
        "DequantizeLinear" => {
            let dtype = ins.get(1).and_then(|s| s.dtype).or(Some(DataType::F32));
            one(same(&x, dtype))
        }
        "ArgMax" | "ArgMin" => {
            let c = constant_rule(g, n, opset, ins);
            if !c.is_empty() {
                return c;
            }
            let Some(d) = &x.dims else {
                return one(Info {
                    dtype: Some(DataType::I64),
                    ..Info::default()
                });
            };
            let Some(a) = axis(int_attr(g, n, "axis").unwrap_or(0), d.len()) else {
                return one(Info::default());
            };
            let keep = int_attr(g, n, "keepdims").unwrap_or(1) != 0;
            one(shaped(
                Some(DataType::I64),
                replace_axis(d, a, keep.then_some(Dim::Known(1))),
            ))
        }
        "TopK" => {
            let k = if opset >= 10 {
                input_ints(ins, 1).and_then(|k| k.first().copied())
            } else {
                int_attr(g, n, "k")
            };
            let dims = x.dims.as_ref().and_then(|d| {
                let a = axis(int_attr(g, n, "axis").unwrap_or(-1), d.len())?;
                Some(replace_axis(d, a, Some(k.map_or(Dim::Unknown, Dim::Known))))
            });
            let values = Info {
                dtype: x.dtype,
                dims: dims.clone(),
                elements: None,
            };
            let indices = Info {
                dtype: Some(DataType::I64),
                dims,
                elements: None,
            };
            vec![values, indices]
        }
        "Split" => {
            let outputs = node.outputs().len();
            let Some(d) = &x.dims else {
                return vec![same(&x, None); outputs];
            };
            let Some(a) = axis(int_attr(g, n, "axis").unwrap_or(0), d.len()) else {
                return Vec::new();
            };
            let sizes = if opset >= 13 {
                input_ints(ins, 1)
            } else {
                ints_attr(g, n, "split")
            };
            let sizes: Vec<Dim> = match (sizes, known(&d[a])) {
                (Some(s), _) if s.len() == outputs => s.into_iter().map(Dim::Known).collect(),
                (None, Some(len)) if outputs > 0 => {
                    let parts = int_attr(g, n, "num_outputs")
                        .unwrap_or(outputs as i64)
                        .max(1);
                    let each = (len + parts - 1) / parts;
                    (0..outputs as i64)
                        .map(|k| Dim::Known(each.min(len - k * each).max(0)))
                        .collect()
                }
                _ => vec![Dim::Unknown; outputs],
            };
            sizes
                .into_iter()
                .map(|size| shaped(x.dtype, replace_axis(d, a, Some(size))))
                .collect()
        }
        "Tile" => match (&x.dims, input_ints(ins, 1)) {
            (Some(d), Some(r)) if r.len() == d.len() => one(shaped(
                x.dtype,
                d.iter()
                    .zip(r)
                    .map(|(dim, r)| match (dim, r) {
                        (dim, 1) => dim.clone(),
                        (Dim::Known(k), r) => k.checked_mul(r).map_or(Dim::Unknown, Dim::Known),
                        _ => Dim::Unknown,
                    })
                    .collect(),
            )),
            _ => one(Info {
                dtype: x.dtype,
                dims: x.dims.as_ref().map(|d| vec![Dim::Unknown; d.len()]),
                elements: None,
            }),
        },
        "Expand" => {
            let c = constant_rule(g, n, opset, ins);
            if !c.is_empty() {
                return c;
            }
            match (&x.dims, input_ints(ins, 1)) {
                (Some(d), Some(shape)) => {
                    let target: Vec<Dim> = shape.into_iter().map(Dim::Known).collect();
                    one(shaped(x.dtype, broadcast(d, &target)))
                }
                _ => one(Info {
                    dtype: x.dtype,
                    ..Info::default()
                }),
            }
        }
        "Trilu" | "ScatterND" | "ScatterElements" | "Scatter" | "ReverseSequence" => {
            one(same(&x, None))
        }
        "CastLike" => one(same(&x, ins.get(1).and_then(|i| i.dtype))),
        "EyeLike" => {
            let to = int_attr(g, n, "dtype")
                .and_then(|t| i32::try_from(t).ok())
                .and_then(DataType::from_onnx_code);
            one(same(&x, to.or(x.dtype)))
        }
        "GatherElements" => {
            let idx = ins.get(1).cloned().unwrap_or_default();
            one(Info {
                dtype: x.dtype,
                dims: idx.dims,
                elements: None,
            })
        }
        "Size" => one(shaped(Some(DataType::I64), Vec::new())),
        "NonZero" => one(shaped(
            Some(DataType::I64),
            vec![
                x.dims
                    .as_ref()
                    .map_or(Dim::Unknown, |d| Dim::Known(d.len() as i64)),
                Dim::Unknown,
            ],
        )),
        "NonMaxSuppression" => one(shaped(
            Some(DataType::I64),
            vec![Dim::Unknown, Dim::Known(3)],
        )),
        "DepthToSpace" | "SpaceToDepth" => {
            let b = int_attr(g, n, "blocksize").unwrap_or(0);
            match &x.dims {
                Some(d) if d.len() == 4 && b > 0 => {
                    let scale = |dim: &Dim, up: bool| match known(dim) {
                        Some(k) if up => Dim::Known(k * b),
                        Some(k) if k % b == 0 => Dim::Known(k / b),
                        _ => Dim::Unknown,
                    };
                    let (c, hw_up) = match (op, known(&d[1])) {
                        ("DepthToSpace", Some(c)) if c % (b * b) == 0 => {
                            (Dim::Known(c / (b * b)), true)
                        }
                        ("DepthToSpace", _) => (Dim::Unknown, true),
                        (_, Some(c)) => (Dim::Known(c * b * b), false),
                        _ => (Dim::Unknown, false),
                    };
                    one(shaped(
                        x.dtype,
                        vec![d[0].clone(), c, scale(&d[2], hw_up), scale(&d[3], hw_up)],
                    ))
                }
                _ => one(same(&x, None)),
            }
        }
        "RoiAlign" => {
            let rois = ins.get(1).and_then(|r| r.dims.clone());
            let channels = x.dims.as_ref().and_then(|d| d.get(1).cloned());
            one(shaped(
                x.dtype,
                vec![
                    rois.and_then(|r| r.first().cloned())
                        .unwrap_or(Dim::Unknown),
                    channels.unwrap_or(Dim::Unknown),
                    Dim::Known(int_attr(g, n, "output_height").unwrap_or(1)),
                    Dim::Known(int_attr(g, n, "output_width").unwrap_or(1)),
                ],
            ))
        }
        "GridSample" => {
            let grid = ins.get(1).and_then(|r| r.dims.clone());
            match (&x.dims, grid) {
                (Some(d), Some(grid)) if d.len() >= 3 && grid.len() == d.len() => {
                    let mut out = vec![d[0].clone(), d[1].clone()];
                    out.extend(grid[1..grid.len() - 1].iter().cloned());
                    one(shaped(x.dtype, out))
                }
                _ => one(Info {
                    dtype: x.dtype,
                    ..Info::default()
                }),
            }
        }
        "RNN" | "GRU" | "LSTM" => {
            let hidden = int_attr(g, n, "hidden_size").map_or(Dim::Unknown, Dim::Known);
            let dirs = match node.attr("direction") {
                Some(AttrValue::String(s)) if s.as_slice() == b"bidirectional" => 2,
                _ => 1,
            };
            let batch_first = int_attr(g, n, "layout").unwrap_or(0) == 1;
            let Some(d) = x.dims.as_ref().filter(|d| d.len() == 3) else {
                return Vec::new();
            };
            let (seq, batch) = if batch_first {
                (d[1].clone(), d[0].clone())
            } else {
                (d[0].clone(), d[1].clone())
            };
            let dirs = Dim::Known(dirs);
            let y = if batch_first {
                vec![batch.clone(), seq, dirs.clone(), hidden.clone()]
            } else {
                vec![seq, dirs.clone(), batch.clone(), hidden.clone()]
            };
            let state = if batch_first {
                vec![batch, dirs, hidden]
            } else {
                vec![dirs, batch, hidden]
            };
            let mut outs = vec![shaped(x.dtype, y), shaped(x.dtype, state.clone())];
            if op == "LSTM" {
                outs.push(shaped(x.dtype, state));
            }
            outs
        }
        "ReduceProd" | "ReduceL1" | "ReduceL2" | "ReduceLogSum" | "ReduceLogSumExp"
        | "ReduceSumSquare" => {
            let c = constant_rule(g, n, opset, ins);
            if !c.is_empty() {
                return c;
            }
            let Some(d) = &x.dims else {
                return one(same(&x, None));
            };
            let axes = if opset >= 18 {
                input_ints(ins, 1)
            } else {
                ints_attr(g, n, "axes")
            };
            let keep = int_attr(g, n, "keepdims").unwrap_or(1) != 0;
            // Empty axes reduce everything here (no noop_with_empty_axes).
            match reduced(d, axes.filter(|a| !a.is_empty()), keep) {
                Some(out) => one(shaped(x.dtype, out)),
                None => one(Info::default()),
            }
        }
        _ => constant_rule(g, n, opset, ins),
    }
}

/// The dims a reduction over `axes` (all of them when none) leaves: each
/// reduced dim 1 with `keep`, else dropped. None when an axis is out of
/// range.
fn reduced(d: &[Dim], axes: Option<Vec<i64>>, keep: bool) -> Option<Vec<Dim>> {
    let axes: Vec<usize> = match axes {
        Some(a) => a.iter().map(|&a| axis(a, d.len())).collect::<Option<_>>()?,
        None => (0..d.len()).collect(),
    };
    Some(
        d.iter()
            .enumerate()
            .filter_map(|(i, dim)| match (axes.contains(&i), keep) {
                (true, true) => Some(Dim::Known(1)),
                (true, false) => None,
                (false, _) => Some(dim.clone()),
            })
            .collect(),
    )
}

/// `d` with dim `a` replaced by `by`, or dropped when `by` is none.
fn replace_axis(d: &[Dim], a: usize, by: Option<Dim>) -> Vec<Dim> {
    let mut out = d[..a].to_vec();
    out.extend(by);
    out.extend(d[a + 1..].iter().cloned());
    out
}

/// An operator without a rule of its own, whose inputs are all known small
/// integer tensors (shape arithmetic: Range, Expand's shape, ...): its
/// kernel computes the exact outputs.
fn constant_rule(g: &Graph, n: NodeId, opset: i64, ins: &[Info]) -> Vec<Info> {
    let node = g.node(n);
    // Only operators whose outputs are no larger than their inputs, and
    // the two that build vectors, when the vectors stay small: inference
    // must never allocate what a hostile file asks for.
    let small = |i: usize| ins.get(i).and_then(Info::ints);
    let bounded = match node.op_type.as_str() {
        "Where" | "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "Not"
        | "And" | "Or" | "Xor" | "Abs" | "Neg" | "Sign" | "Mod" | "Max" | "Min" | "Sum"
        | "Size" | "ReduceProd" | "ReduceSum" | "ReduceMax" | "ReduceMin" | "CumSum" | "ArgMax"
        | "ArgMin" => true,
        "Range" => match (small(0), small(1), small(2)) {
            (Some(s), Some(l), Some(d)) if s.len() == 1 && l.len() == 1 && d.len() == 1 => {
                d[0] != 0 && (l[0].saturating_sub(s[0]) / d[0]).abs() <= 64
            }
            _ => false,
        },
        "Expand" => small(1).is_some_and(|shape| {
            shape.len() <= 8
                && shape.iter().all(|&d| (0..=64).contains(&d))
                && shape.iter().product::<i64>() <= 64
        }),
        _ => false,
    };
    if !bounded {
        return Vec::new();
    }
    let mut tensors: Vec<Option<Tensor>> = Vec::with_capacity(ins.len());
    for (slot, v) in node.inputs().iter().enumerate() {
        if v.is_none() {
            tensors.push(None);
            continue;
        }
        let Some(info) = ins.get(slot) else {
            return Vec::new();
        };
        let (Some(values), Some(dims)) = (info.ints(), info.known_dims()) else {
            return Vec::new();
        };
        let shape: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
        let values: Vec<i128> = values.iter().map(|&v| v as i128).collect();
        let t = match info.dtype {
            Some(DataType::I64) => Tensor::from_ints(DataType::I64, &shape, &values),
            Some(DataType::I32) => Tensor::from_ints(DataType::I32, &shape, &values),
            _ => return Vec::new(),
        };
        match t {
            Ok(t) => tensors.push(Some(t)),
            Err(_) => return Vec::new(),
        }
    }
    if tensors.iter().all(Option::is_none) {
        return Vec::new();
    }
    let args: Vec<Option<&Tensor>> = tensors.iter().map(Option::as_ref).collect();
    match crate::run_node(g, n, opset, &args) {
        Ok(outs) => outs.iter().map(Info::of_tensor).collect(),
        Err(_) => Vec::new(),
    }
}

fn product_sum(dims: impl Iterator<Item = Dim>) -> Dim {
    let mut total = 0i64;
    for d in dims {
        match known(&d) {
            Some(k) => total += k,
            None => return Dim::Unknown,
        }
    }
    Dim::Known(total)
}

/// Slice's element indices along one axis of `size`.
fn slice_indices(size: i64, start: i64, end: i64, step: i64) -> Vec<usize> {
    if step == 0 {
        return Vec::new();
    }
    let norm = |v: i64| if v < 0 { v + size } else { v };
    let mut out = Vec::new();
    if step > 0 {
        let (s, e) = (norm(start).clamp(0, size), norm(end).clamp(0, size));
        let mut i = s;
        while i < e {
            out.push(i as usize);
            i += step;
        }
    } else {
        let (s, e) = (
            norm(start).clamp(-1, size - 1),
            norm(end).clamp(-1, size - 1),
        );
        let mut i = s;
        while i > e {
            out.push(i as usize);
            i += step;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reshape_keeps_the_batch_symbol_and_solves_the_hole() {
        let n = Dim::Symbol("N".into());
        let x = vec![n.clone(), Dim::Known(1280), Dim::Known(1), Dim::Known(1)];
        assert_eq!(
            reshape(&x, &[n.clone(), Dim::Known(-1)], false),
            Some(vec![n.clone(), Dim::Known(1280)])
        );
        assert_eq!(
            reshape(&x, &[Dim::Known(0), Dim::Known(-1)], false),
            Some(vec![n.clone(), Dim::Known(1280)])
        );
        assert_eq!(
            reshape(&x, &[Dim::Known(-1), Dim::Known(1280)], false),
            Some(vec![n, Dim::Known(1280)])
        );
    }

    /// Shapes inferred for a one-node model with the given declared
    /// inputs, by the rules (not by running anything).
    fn infer_one(text: &str) -> Vec<Option<Vec<Dim>>> {
        let model = qgraph_text::parse_model(text).expect("parses");
        let shapes = infer(&model);
        model
            .graph
            .outputs()
            .iter()
            .map(|v| shapes.get(v).and_then(|i| i.dims.clone()))
            .collect()
    }

    #[test]
    fn rules_of_the_sequence_and_detection_operators_keep_symbols() {
        let k = |v: i64| Dim::Known(v);
        let n = Dim::Symbol("N".into());
        let outs = infer_one(
            "ir_version 8\nopset \"\" 18\n\ngraph main {\n  input %x: f32[5,N,3]\n  \
             input %w: f32[2,16,3]\n  input %r: f32[2,16,4]\n  output %y\n  output %yh\n  \
             output %yc\n  lstm: %y, %yh, %yc = LSTM(%x, %w, %r) {hidden_size = 4, \
             direction = \"bidirectional\"}\n}\n",
        );
        assert_eq!(outs[0], Some(vec![k(5), k(2), n.clone(), k(4)]));
        assert_eq!(outs[1], Some(vec![k(2), n.clone(), k(4)]));
        assert_eq!(outs[2], outs[1]);
        let outs = infer_one(
            "ir_version 8\nopset \"\" 18\n\ngraph main {\n  input %x: f32[N,10]\n  \
             output %v\n  output %i\n  output %a\n  output %b\n  output %c\n  output %t\n  \
             output %m\n  init %k = i64[1] [2]\n  init %reps = i64[2] [1, 3]\n  \
             top: %v, %i = TopK(%x, %k)\n  \
             split: %a, %b, %c = Split(%x) {axis = 1, num_outputs = 3}\n  \
             tile: %t = Tile(%x, %reps)\n  arg: %m = ArgMax(%x) {axis = 1, keepdims = 0}\n}\n",
        );
        assert_eq!(outs[0], Some(vec![n.clone(), k(2)]));
        assert_eq!(outs[1], outs[0]);
        assert_eq!(outs[2], Some(vec![n.clone(), k(4)]));
        assert_eq!(outs[3], Some(vec![n.clone(), k(4)]));
        assert_eq!(outs[4], Some(vec![n.clone(), k(2)]));
        assert_eq!(outs[5], Some(vec![n.clone(), k(30)]));
        assert_eq!(outs[6], Some(vec![n]));
    }

    #[test]
    fn broadcasting_follows_numpy() {
        let n = Dim::Symbol("N".into());
        assert_eq!(
            broadcast(&[n.clone(), Dim::Known(3)], &[Dim::Known(1), Dim::Known(3)]),
            vec![n, Dim::Known(3)]
        );
        assert_eq!(
            broadcast(&[Dim::Known(2)], &[Dim::Known(3)]),
            vec![Dim::Unknown]
        );
    }
}
