//! Linear algebra and attention: MatMul, Gemm and Einsum in every numeric
//! type; ONNX's Attention and RotaryEmbedding; and ONNX Runtime's
//! `com.microsoft` attention operators (Attention, MultiHeadAttention,
//! GroupQueryAttention, RotaryEmbedding) and MatMulNBits.
//!
//! f32 MatMul and Gemm go to the fast gemm-crate kernels of `matmul.rs` (the
//! training tape's backward kernels assume their arithmetic); the other
//! types are computed here: f64 in f64, float16 and bfloat16 accumulating in
//! f32 and rounded once at the end (as ONNX Runtime's kernels do), integers
//! exactly, wrapping.

use super::typed::{numeric, same_type, Elem, Float, Number};
use super::{array, input, ints_of, matmul, Kernel};
use crate::{EvalError, OpCtx};
use qgraph_ir::half::{bf16, f16};
use qgraph_ir::ndarray::{ArrayD, ArrayViewD, Axis, IxDyn};
use qgraph_ir::Tensor;

pub const KERNELS: &[(&str, Kernel)] = &[
    ("MatMul", matmul_kernel),
    ("Gemm", gemm_kernel),
    ("Einsum", einsum),
    ("Attention", attention),
    ("RotaryEmbedding", rotary_embedding),
];

/// ONNX Runtime's `com.microsoft` operators of this family.
pub const MICROSOFT_KERNELS: &[(&str, Kernel)] = &[
    ("MatMulNBits", matmul_nbits),
    ("RotaryEmbedding", ms_rotary_embedding),
    ("Attention", ms_attention),
    ("MultiHeadAttention", multi_head_attention),
];

/// The most elements a kernel here allocates for one result: more is an
/// error, not an allocation failure.
const MAX_ELEMENTS: usize = 1 << 36;

/// The element count of `dims`, or an error when it overflows or is beyond
/// what a kernel allocates.
fn element_count(cx: &OpCtx, dims: &[usize], what: &str) -> Result<usize, EvalError> {
    let mut count: usize = 1;
    for &d in dims {
        count = match count.checked_mul(d) {
            Some(c) if c <= MAX_ELEMENTS => c,
            _ => return cx.err(format!("{what} of shape {dims:?} is too large")),
        };
    }
    Ok(count)
}

/// A number type and the type its sums accumulate in: itself, but f32 for
/// float16 and bfloat16 (rounded back once per result).
pub(crate) trait Accumulate: Number {
    type Acc: Number;
    fn widen(self) -> Self::Acc;
    fn narrow(a: Self::Acc) -> Self;
}

macro_rules! accumulate_in_itself {
    ($($t:ty),*) => {$(
        impl Accumulate for $t {
            type Acc = $t;
            #[inline(always)]
            fn widen(self) -> $t { self }
            #[inline(always)]
            fn narrow(a: $t) -> $t { a }
        }
    )*};
}
accumulate_in_itself!(f32, f64, i8, i16, i32, i64, u8, u16, u32, u64);

macro_rules! accumulate_in_f32 {
    ($($t:ty),*) => {$(
        impl Accumulate for $t {
            type Acc = f32;
            #[inline(always)]
            fn widen(self) -> f32 { self.to_f32() }
            #[inline(always)]
            fn narrow(a: f32) -> $t { <$t>::from_f32(a) }
        }
    )*};
}
accumulate_in_f32!(f16, bf16);

/// `out[m x n] = a[m x k] b[k x n]` (row-major slices), each result summed
/// in the accumulation type in order of `k` and rounded once.
fn matrix_product<T: Accumulate>(a: &[T], b: &[T], m: usize, k: usize, n: usize, out: &mut [T]) {
    let mut row = vec![T::Acc::zero(); n];
    for i in 0..m {
        row.fill(T::Acc::zero());
        for p in 0..k {
            let x = a[i * k + p].widen();
            for (r, &y) in row.iter_mut().zip(&b[p * n..(p + 1) * n]) {
                *r = r.add(x.mul(y.widen()));
            }
        }
        for (o, &r) in out[i * n..(i + 1) * n].iter_mut().zip(&row) {
            *o = T::narrow(r);
        }
    }
}

/// A view broadcast to `shape`, copied into a standard-layout vector.
fn broadcast_data<T: Clone>(
    cx: &OpCtx,
    a: &ArrayViewD<T>,
    shape: &[usize],
    what: &str,
) -> Result<Vec<T>, EvalError> {
    match a.broadcast(IxDyn(shape)) {
        Some(v) => Ok(v.iter().cloned().collect()),
        None => cx.err(format!(
            "{what} of shape {:?} does not broadcast to {shape:?}",
            a.shape()
        )),
    }
}

/// numpy's matmul in any numeric type: 1-D operands promoted (and the
/// added dim removed again), batch dims broadcast.
fn matmul_generic<T: Accumulate>(
    cx: &OpCtx,
    a: &ArrayD<T>,
    b: &ArrayD<T>,
) -> Result<ArrayD<T>, EvalError> {
    if a.ndim() == 0 || b.ndim() == 0 {
        return cx.err("MatMul operands must have rank 1 or more");
    }
    let a_vec = a.ndim() == 1;
    let b_vec = b.ndim() == 1;
    let av = if a_vec {
        a.view().insert_axis(Axis(0))
    } else {
        a.view()
    };
    let bv = if b_vec {
        b.view().insert_axis(Axis(1))
    } else {
        b.view()
    };
    let (ar, br) = (av.ndim(), bv.ndim());
    let (m, k) = (av.shape()[ar - 2], av.shape()[ar - 1]);
    let (k2, n) = (bv.shape()[br - 2], bv.shape()[br - 1]);
    if k != k2 {
        return cx.err(format!(
            "inner dimensions differ: {:?} x {:?}",
            a.shape(),
            b.shape()
        ));
    }
    let batch =
        super::typed::broadcast_shapes(cx, &[&av.shape()[..ar - 2], &bv.shape()[..br - 2]])?;
    let count = element_count(cx, &batch, "the batch")?;
    let full = |r: usize, c: usize| {
        let mut s = batch.clone();
        s.extend([r, c]);
        s
    };
    element_count(cx, &full(m, n), "the product")?;
    let a_data = broadcast_data(cx, &av, &full(m, k), "A")?;
    let b_data = broadcast_data(cx, &bv, &full(k, n), "B")?;
    let mut out = vec![T::zero(); count * m * n];
    for i in 0..count {
        matrix_product(
            &a_data[i * m * k..(i + 1) * m * k],
            &b_data[i * k * n..(i + 1) * k * n],
            m,
            k,
            n,
            &mut out[i * m * n..(i + 1) * m * n],
        );
    }
    let mut shape = batch;
    if !a_vec {
        shape.push(m);
    }
    if !b_vec {
        shape.push(n);
    }
    Ok(array(&shape, out))
}

/// MatMul: f32 through the gemm-crate kernel, other types here.
fn matmul_kernel(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let a = input(cx, inputs, 0)?;
    if let (Tensor::F32(_), Tensor::F32(_)) = (a, input(cx, inputs, 1)?) {
        return matmul::matmul(cx, inputs);
    }
    numeric!(cx, a, "A", |a| {
        let b = same_type(cx, inputs, 1)?;
        Ok(vec![Elem::wrap(matmul_generic(cx, a, b)?)])
    })
}

/// Gemm: `alpha op(A) op(B) + beta C`, C broadcast to the product's shape.
fn gemm_kernel(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let a = input(cx, inputs, 0)?;
    let c = inputs.get(2).copied().flatten();
    if let (Tensor::F32(_), Tensor::F32(_), None | Some(Tensor::F32(_))) =
        (a, input(cx, inputs, 1)?, c)
    {
        return matmul::gemm(cx, inputs);
    }
    numeric!(cx, a, "A", |a| {
        let b = same_type(cx, inputs, 1)?;
        let c = match c {
            Some(_) => Some(same_type(cx, inputs, 2)?),
            None => None,
        };
        Ok(vec![Elem::wrap(gemm_generic(cx, a, b, c)?)])
    })
}

fn gemm_generic<T: Accumulate>(
    cx: &OpCtx,
    a: &ArrayD<T>,
    b: &ArrayD<T>,
    c: Option<&ArrayD<T>>,
) -> Result<ArrayD<T>, EvalError> {
    if a.ndim() != 2 || b.ndim() != 2 {
        return cx.err(format!(
            "A and B must be 2-D, found {:?} and {:?}",
            a.shape(),
            b.shape()
        ));
    }
    let a = if cx.int_attr("transA", 0)? != 0 {
        a.t()
    } else {
        a.view()
    };
    let b = if cx.int_attr("transB", 0)? != 0 {
        b.t()
    } else {
        b.view()
    };
    let (m, k, k2, n) = (a.shape()[0], a.shape()[1], b.shape()[0], b.shape()[1]);
    if k != k2 {
        return cx.err(format!("op(A) is {m}x{k} but op(B) is {k2}x{n}"));
    }
    element_count(cx, &[m, n], "the product")?;
    let (alpha, beta) = (cx.float_attr("alpha", 1.0)?, cx.float_attr("beta", 1.0)?);
    let a_data: Vec<T> = a.iter().copied().collect();
    let b_data: Vec<T> = b.iter().copied().collect();
    let mut product = vec![T::zero(); m * n];
    let c_data = match c {
        Some(c) if beta != 0.0 => Some(broadcast_data(cx, &c.view(), &[m, n], "C")?),
        _ => None,
    };
    if T::IS_FLOAT {
        // In the accumulation type: alpha times the sum, plus beta C, one
        // rounding at the end.
        let (alpha_acc, beta_acc) = (
            T::Acc::from_f64(alpha as f64),
            T::Acc::from_f64(beta as f64),
        );
        let mut row = vec![T::Acc::zero(); n];
        for i in 0..m {
            row.fill(T::Acc::zero());
            for p in 0..k {
                let x = a_data[i * k + p].widen();
                for (r, &y) in row.iter_mut().zip(&b_data[p * n..(p + 1) * n]) {
                    *r = r.add(x.mul(y.widen()));
                }
            }
            for j in 0..n {
                let mut v = row[j];
                if alpha != 1.0 {
                    v = v.mul(alpha_acc);
                }
                if let Some(c) = &c_data {
                    let cv = c[i * n + j].widen();
                    v = v.add(if beta == 1.0 { cv } else { cv.mul(beta_acc) });
                }
                product[i * n + j] = T::narrow(v);
            }
        }
    } else {
        matrix_product(&a_data, &b_data, m, k, n, &mut product);
        // Integers: exact and wrapping when alpha and beta are 1; otherwise
        // scaled in f64 and converted back (truncating, as a C cast).
        for (i, v) in product.iter_mut().enumerate() {
            let cv = c_data.as_ref().map(|c| c[i]);
            *v = match cv {
                _ if alpha == 1.0 && (beta == 1.0 || cv.is_none()) => cv.map_or(*v, |c| v.add(c)),
                _ => T::from_f64(
                    v.to_f64() * alpha as f64 + cv.map_or(0.0, |c| c.to_f64() * beta as f64),
                ),
            };
        }
    }
    Ok(array(&[m, n], product))
}

// ---------------------------------------------------------------- Einsum

/// One term of an Einsum equation: its labels (letters as 0..52) and where
/// its ellipsis stands, if it has one.
struct Term {
    labels: Vec<usize>,
    ellipsis: Option<usize>,
}

fn letter_index(c: u8) -> Option<usize> {
    match c {
        b'A'..=b'Z' => Some((c - b'A') as usize),
        b'a'..=b'z' => Some((c - b'a') as usize + 26),
        _ => None,
    }
}

fn parse_term(cx: &OpCtx, s: &[u8]) -> Result<Term, EvalError> {
    let mut labels = Vec::new();
    let mut ellipsis = None;
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'.' {
            if ellipsis.is_some() || s.get(i..i + 3) != Some(b"...") {
                return cx.err(format!(
                    "bad ellipsis in einsum term '{}'",
                    String::from_utf8_lossy(s)
                ));
            }
            ellipsis = Some(labels.len());
            i += 3;
            continue;
        }
        match letter_index(s[i]) {
            Some(l) => labels.push(l),
            None => {
                return cx.err(format!(
                    "einsum term '{}' has the character '{}'",
                    String::from_utf8_lossy(s),
                    s[i] as char
                ))
            }
        }
        i += 1;
    }
    Ok(Term { labels, ellipsis })
}

/// Einsum, any equation: every label of the output and every summed label
/// is one loop; an input's stride for a label is the sum of the strides of
/// its axes with that label (so a repeated label walks the diagonal), zero
/// where the input broadcasts.
fn einsum(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let first = input(cx, inputs, 0)?;
    numeric!(cx, first, "input 0", |a| {
        let mut operands = vec![a];
        for i in 1..inputs.len() {
            operands.push(same_type(cx, inputs, i)?);
        }
        Ok(vec![Elem::wrap(einsum_generic(cx, &operands)?)])
    })
}

fn einsum_generic<T: Accumulate>(
    cx: &OpCtx,
    operands: &[&ArrayD<T>],
) -> Result<ArrayD<T>, EvalError> {
    let equation: Vec<u8> = cx
        .string_attr("equation", "")?
        .bytes()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let (lhs, rhs) = match equation.windows(2).position(|w| w == b"->") {
        Some(p) => (&equation[..p], Some(&equation[p + 2..])),
        None => (&equation[..], None),
    };
    let terms: Vec<Term> = lhs
        .split(|&c| c == b',')
        .map(|t| parse_term(cx, t))
        .collect::<Result<_, _>>()?;
    if terms.len() != operands.len() {
        return cx.err(format!(
            "the equation has {} input terms for {} inputs",
            terms.len(),
            operands.len()
        ));
    }
    // Each operand's axes as label ids; ellipsis dims get ids 52.., right
    // aligned across operands (numpy's broadcasting).
    const ELLIPSIS_BASE: usize = 52;
    let mut ellipsis_rank = 0;
    for (t, op) in terms.iter().zip(operands) {
        let own = op.ndim().checked_sub(t.labels.len());
        match (own, t.ellipsis) {
            (Some(r), Some(_)) => ellipsis_rank = ellipsis_rank.max(r),
            (Some(0), None) => {}
            _ => {
                return cx.err(format!(
                    "an operand of shape {:?} does not fit its term of {} labels",
                    op.shape(),
                    t.labels.len()
                ))
            }
        }
    }
    let axis_labels: Vec<Vec<usize>> = terms
        .iter()
        .zip(operands)
        .map(|(t, op)| {
            let mut ids = t.labels.clone();
            if let Some(at) = t.ellipsis {
                let own = op.ndim() - t.labels.len();
                let ell = (ellipsis_rank - own..ellipsis_rank).map(|e| ELLIPSIS_BASE + e);
                ids.splice(at..at, ell);
            }
            ids
        })
        .collect();
    let label_count = ELLIPSIS_BASE + ellipsis_rank;
    let mut sizes: Vec<Option<usize>> = vec![None; label_count];
    for (ids, op) in axis_labels.iter().zip(operands) {
        for (&l, &d) in ids.iter().zip(op.shape()) {
            sizes[l] = match sizes[l] {
                None => Some(d),
                Some(s) if s == d || d == 1 => Some(s),
                Some(1) => Some(d),
                Some(s) => {
                    return cx.err(format!(
                        "einsum label {} has sizes {s} and {d}",
                        label_name(l)
                    ))
                }
            };
        }
    }
    let output: Vec<usize> = match rhs {
        Some(r) => {
            let t = parse_term(cx, r)?;
            let mut ids = t.labels.clone();
            if let Some(at) = t.ellipsis {
                ids.splice(at..at, (0..ellipsis_rank).map(|e| ELLIPSIS_BASE + e));
            }
            for (i, &l) in ids.iter().enumerate() {
                if sizes[l].is_none() {
                    return cx.err(format!("output label {} is in no input", label_name(l)));
                }
                if ids[..i].contains(&l) {
                    return cx.err(format!("output label {} repeats", label_name(l)));
                }
            }
            ids
        }
        None => {
            // Implicit: the ellipsis dims, then the letters that appear once,
            // in alphabetical order (upper case first, as numpy).
            let mut ids: Vec<usize> = (0..ellipsis_rank).map(|e| ELLIPSIS_BASE + e).collect();
            for l in 0..ELLIPSIS_BASE {
                let uses: usize = terms
                    .iter()
                    .map(|t| t.labels.iter().filter(|&&x| x == l).count())
                    .sum();
                if uses == 1 {
                    ids.push(l);
                }
            }
            ids
        }
    };
    let summed: Vec<usize> = (0..label_count)
        .filter(|l| sizes[*l].is_some() && !output.contains(l))
        .collect();
    let size = |l: usize| sizes[l].unwrap_or(1);
    let out_shape: Vec<usize> = output.iter().map(|&l| size(l)).collect();
    let out_count = element_count(cx, &out_shape, "the output")?;
    let sum_shape: Vec<usize> = summed.iter().map(|&l| size(l)).collect();
    let sum_count = element_count(cx, &sum_shape, "the summed labels")?;
    if out_count
        .checked_mul(sum_count)
        .is_none_or(|w| w > MAX_ELEMENTS * 16)
    {
        return cx.err("the einsum is too large to compute");
    }
    // Per operand, its stride for each label (0 when absent or broadcast).
    let data: Vec<Vec<T>> = operands
        .iter()
        .map(|op| op.as_standard_layout().iter().copied().collect())
        .collect();
    let strides: Vec<Vec<usize>> = axis_labels
        .iter()
        .zip(operands)
        .map(|(ids, op)| {
            let mut per_label = vec![0usize; label_count];
            let mut step = 1;
            for (&l, &d) in ids.iter().zip(op.shape()).rev() {
                if d != 1 {
                    per_label[l] += step;
                }
                step *= d;
            }
            per_label
        })
        .collect();
    let out_strides: Vec<Vec<usize>> = strides
        .iter()
        .map(|s| output.iter().map(|&l| s[l]).collect())
        .collect();
    let sum_strides: Vec<Vec<usize>> = strides
        .iter()
        .map(|s| summed.iter().map(|&l| s[l]).collect())
        .collect();
    let mut out = Vec::with_capacity(out_count);
    let mut out_index = vec![0usize; output.len()];
    let mut sum_index = vec![0usize; summed.len()];
    let offset = |strides: &[usize], index: &[usize]| -> usize {
        strides.iter().zip(index).map(|(s, i)| s * i).sum()
    };
    for _ in 0..out_count {
        let bases: Vec<usize> = out_strides.iter().map(|s| offset(s, &out_index)).collect();
        let mut acc = T::Acc::zero();
        sum_index.fill(0);
        for _ in 0..sum_count {
            let mut product = T::Acc::one();
            for (o, d) in data.iter().enumerate() {
                let at = bases[o] + offset(&sum_strides[o], &sum_index);
                product = if o == 0 {
                    d[at].widen()
                } else {
                    product.mul(d[at].widen())
                };
            }
            acc = acc.add(product);
            advance(&mut sum_index, &sum_shape);
        }
        out.push(T::narrow(acc));
        advance(&mut out_index, &out_shape);
    }
    Ok(array(&out_shape, out))
}

fn label_name(l: usize) -> String {
    match l {
        0..=25 => ((b'A' + l as u8) as char).to_string(),
        26..=51 => ((b'a' + (l - 26) as u8) as char).to_string(),
        _ => format!("(ellipsis dim {})", l - 52),
    }
}

/// Steps a row-major multi-index by one.
fn advance(index: &mut [usize], shape: &[usize]) {
    for d in (0..index.len()).rev() {
        index[d] += 1;
        if index[d] < shape[d] {
            return;
        }
        index[d] = 0;
    }
}

// ------------------------------------------------------------- Attention

/// A 3-D `[batch, sequence, heads * size]` tensor as a standard-layout 4-D
/// `[batch, heads, sequence, size]` one.
fn split_heads<T: Clone>(
    cx: &OpCtx,
    x: &ArrayD<T>,
    heads: usize,
    what: &str,
) -> Result<ArrayD<T>, EvalError> {
    let (b, s, hidden) = (x.shape()[0], x.shape()[1], x.shape()[2]);
    if heads == 0 || hidden % heads != 0 {
        return cx.err(format!(
            "{what}'s hidden size {hidden} does not divide into {heads} heads"
        ));
    }
    let v = x
        .view()
        .into_shape_with_order(IxDyn(&[b, s, heads, hidden / heads]));
    match v {
        Ok(v) => Ok(v
            .permuted_axes(IxDyn(&[0, 2, 1, 3]))
            .as_standard_layout()
            .into_owned()),
        Err(_) => cx.err(format!("{what} could not be split into heads")),
    }
}

/// A 4-D `[batch, heads, sequence, size]` tensor as `[batch, sequence,
/// heads * size]`.
fn merge_heads<T: Clone>(x: ArrayD<T>) -> ArrayD<T> {
    let (b, h, s, d) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let t = x.permuted_axes(IxDyn(&[0, 2, 1, 3]));
    let data: Vec<T> = t.iter().cloned().collect();
    array(&[b, s, h * d], data)
}

/// The concatenation of `past` and `new` along axis 2 (the sequence).
fn concat_sequence<T: Clone>(
    cx: &OpCtx,
    past: Option<&ArrayD<T>>,
    new: &ArrayD<T>,
    what: &str,
) -> Result<ArrayD<T>, EvalError> {
    let Some(past) = past else {
        return Ok(new.as_standard_layout().into_owned());
    };
    let (ps, ns) = (past.shape(), new.shape());
    if ps.len() != 4 || ps[0] != ns[0] || ps[1] != ns[1] || ps[3] != ns[3] {
        return cx.err(format!(
            "past {what} of shape {ps:?} does not fit the new {what} of shape {ns:?}"
        ));
    }
    match qgraph_ir::ndarray::concatenate(Axis(2), &[past.view(), new.view()]) {
        Ok(c) => Ok(c.as_standard_layout().into_owned()),
        Err(_) => cx.err(format!("past and new {what} do not concatenate")),
    }
}

/// Which keys a query may attend, besides the mask input: causal,
/// a sliding window, and the valid (non-padding) length per batch.
struct KeyRange {
    causal: bool,
    left_window: i64,
    right_window: i64,
    /// The number of keys before the query block, per batch.
    offsets: Vec<i64>,
    /// Keys at or past this index are padding, per batch.
    valid_lengths: Option<Vec<i64>>,
}

impl KeyRange {
    fn allows(&self, batch: usize, query: usize, key: usize) -> bool {
        let position = query as i64 + self.offsets[batch];
        let key = key as i64;
        !(self.causal && key > position
            || self.left_window >= 0 && position - key > self.left_window
            || self.right_window >= 0 && key - position > self.right_window
            || self.valid_lengths.as_ref().is_some_and(|v| key >= v[batch]))
    }
}

/// Softmax of a row as the given precision computes it: the row converted
/// to `P`, each step in `P`'s arithmetic, the result converted back.
fn softmax_in<P: Float, T: Float>(row: &mut [T]) {
    let xs: Vec<P> = row.iter().map(|v| P::from_f64(v.to_f64())).collect();
    let mut max = P::lowest();
    for &x in &xs {
        max = max.max_of(x);
    }
    if max == P::lowest() {
        max = P::zero();
    }
    let exps: Vec<P> = xs
        .iter()
        .map(|&x| x.sub(max).map(f32::exp, f64::exp))
        .collect();
    // numpy sums float16 in f32 and rounds once (in f64 here, rounded to
    // P); bfloat16 (ml_dtypes) adds in bfloat16, one rounding per addition.
    let mut sum = if P::DTYPE == qgraph_ir::DataType::BF16 {
        exps.iter().fold(P::zero(), |s, &e| s.add(e))
    } else {
        P::from_f64(exps.iter().map(|e| e.to_f64()).sum())
    };
    if sum == P::zero() {
        sum = P::one();
    }
    for (r, e) in row.iter_mut().zip(exps) {
        *r = T::from_f64(e.div(sum).unwrap_or(P::zero()).to_f64());
    }
}

/// The softmax of a row in the precision an ONNX type code names (`0`:
/// the tensor's own type).
fn softmax_with_precision<T: Float>(
    cx: &OpCtx,
    row: &mut [T],
    precision: i64,
) -> Result<(), EvalError> {
    match precision {
        0 => softmax_in::<T, T>(row),
        1 => softmax_in::<f32, T>(row),
        10 => softmax_in::<f16, T>(row),
        11 => softmax_in::<f64, T>(row),
        16 => softmax_in::<bf16, T>(row),
        p => return cx.err(format!("softmax_precision {p} is not a float type")),
    }
    Ok(())
}

/// An attention mask as an additive bias of the query's type: a bool mask's
/// true is 0 and false -inf; a float mask as it is. Shorter than the keys,
/// it is padded with -inf (false), as the reference does.
fn mask_bias<T: Float>(cx: &OpCtx, mask: &Tensor, keys: usize) -> Result<ArrayD<T>, EvalError> {
    let bias: ArrayD<T> = match mask {
        Tensor::Bool(m) => m.mapv(|v| if v { T::zero() } else { T::lowest() }),
        other => match T::unwrap(other) {
            Some(m) => m.clone(),
            None => {
                return cx.err(format!(
                    "attn_mask is {}; it must be bool or {}, the type of Q",
                    other.dtype(),
                    T::DTYPE
                ))
            }
        },
    };
    if bias.ndim() == 0 {
        return cx.err("attn_mask must have rank 1 or more");
    }
    let last = bias.ndim() - 1;
    let have = bias.shape()[last];
    if have >= keys {
        return Ok(bias);
    }
    let mut shape = bias.shape().to_vec();
    shape[last] = keys - have;
    let pad = ArrayD::from_elem(IxDyn(&shape), T::lowest());
    match qgraph_ir::ndarray::concatenate(Axis(last), &[bias.view(), pad.view()]) {
        Ok(p) => Ok(p),
        Err(_) => cx.err("attn_mask could not be padded to the key length"),
    }
}

fn attention(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let q = input(cx, inputs, 0)?;
    super::typed::floating!(cx, q, "Q", |q| attention_typed(cx, inputs, q))
}

/// ONNX's Attention (opsets 23..25), as its reference computes it: Q and K
/// each scaled by the square root of the scale, the product rounded to the
/// type, softcap, the bias (mask, causal, window, padding) added, softmax
/// (in `softmax_precision`), a fully masked row zeroed, the product with V.
fn attention_typed<T: Float + Accumulate>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    q: &ArrayD<T>,
) -> Result<Vec<Tensor>, EvalError> {
    let k = same_type::<T>(cx, inputs, 1)?;
    let v = same_type::<T>(cx, inputs, 2)?;
    let rank = q.ndim();
    if !(rank == 3 || rank == 4) || k.ndim() != rank || v.ndim() != rank {
        return cx.err(format!(
            "Q, K and V must all be 3-D or all 4-D, found {:?}, {:?}, {:?}",
            q.shape(),
            k.shape(),
            v.shape()
        ));
    }
    let (q, k, v) = if rank == 3 {
        let heads = |name: &str| -> Result<usize, EvalError> {
            match cx.int_attr(name, 0)? {
                h if h > 0 => Ok(h as usize),
                _ => cx.err(format!("3-D inputs need the attribute {name}")),
            }
        };
        let (qh, kvh) = (heads("q_num_heads")?, heads("kv_num_heads")?);
        (
            split_heads(cx, q, qh, "Q")?,
            split_heads(cx, k, kvh, "K")?,
            split_heads(cx, v, kvh, "V")?,
        )
    } else {
        (
            q.as_standard_layout().into_owned(),
            k.as_standard_layout().into_owned(),
            v.as_standard_layout().into_owned(),
        )
    };
    let (batch, q_heads, q_len, head_size) =
        (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
    let kv_heads = k.shape()[1];
    if k.shape()[0] != batch
        || v.shape()[0] != batch
        || v.shape()[1] != kv_heads
        || k.shape()[3] != head_size
        || v.shape()[2] != k.shape()[2]
    {
        return cx.err(format!(
            "Q {:?}, K {:?} and V {:?} (as [batch, heads, sequence, size]) do not fit",
            q.shape(),
            k.shape(),
            v.shape()
        ));
    }
    if kv_heads == 0 || q_heads % kv_heads != 0 {
        return cx.err(format!(
            "{q_heads} query heads are not a multiple of {kv_heads} key/value heads"
        ));
    }
    let past_key = match inputs.get(4).copied().flatten() {
        Some(_) => Some(same_type::<T>(cx, inputs, 4)?),
        None => None,
    };
    let past_value = match inputs.get(5).copied().flatten() {
        Some(_) => Some(same_type::<T>(cx, inputs, 5)?),
        None => None,
    };
    if past_key.is_some() != past_value.is_some() {
        return cx.err("past_key and past_value must be given together");
    }
    let past_len = past_key.map_or(0, |p| p.shape().get(2).copied().unwrap_or(0));
    let present_key = concat_sequence(cx, past_key, &k, "key")?;
    let present_value = concat_sequence(cx, past_value, &v, "value")?;
    let keys = present_key.shape()[2];
    let v_size = present_value.shape()[3];
    let valid_lengths = match inputs.get(6).copied().flatten() {
        Some(t) => {
            let n = ints_of(cx, t, "nonpad_kv_seqlen")?;
            if n.len() != batch {
                return cx.err(format!(
                    "nonpad_kv_seqlen has {} values for a batch of {batch}",
                    n.len()
                ));
            }
            Some(n)
        }
        None => None,
    };
    let offsets: Vec<i64> = match (&valid_lengths, past_key) {
        (Some(n), None) => n.iter().map(|&l| l - q_len as i64).collect(),
        _ => vec![past_len as i64; batch],
    };
    let range = KeyRange {
        causal: cx.int_attr("is_causal", 0)? != 0,
        left_window: cx.int_attr("left_window_size", -1)?,
        right_window: cx.int_attr("right_window_size", -1)?,
        offsets,
        valid_lengths,
    };
    let scores_shape = [batch, q_heads, q_len, keys];
    element_count(cx, &scores_shape, "the attention scores")?;
    let mask = match inputs.get(3).copied().flatten() {
        Some(m) => {
            let bias = mask_bias::<T>(cx, m, keys)?;
            Some(broadcast_data(
                cx,
                &bias.view(),
                &scores_shape,
                "attn_mask",
            )?)
        }
        None => None,
    };
    let scale = match cx.graph.node(cx.node).attr("scale") {
        Some(_) => cx.float_attr("scale", 1.0)? as f64,
        None => 1.0 / (head_size as f64).sqrt(),
    };
    let root_scale = T::from_f64(scale.sqrt());
    let softcap = cx.float_attr("softcap", 0.0)?;
    let softcap_t = T::from_f64(softcap as f64);
    let mode = cx.int_attr("qk_matmul_output_mode", 0)?;
    let precision = cx.int_attr("softmax_precision", 0)?;

    let scaled_q: Vec<T> = q.iter().map(|&x| x.mul(root_scale)).collect();
    let scaled_k: Vec<T> = present_key.iter().map(|&x| x.mul(root_scale)).collect();
    let values = present_value.as_slice().unwrap_or(&[]);
    let group = q_heads / kv_heads;
    let mut y = vec![T::zero(); batch * q_heads * q_len * v_size];
    let mut qk_out = vec![T::zero(); batch * q_heads * q_len * keys];
    let mut row = vec![T::zero(); keys];
    for b in 0..batch {
        for h in 0..q_heads {
            let kvh = h / group;
            let k_base = (b * kv_heads + kvh) * keys;
            for i in 0..q_len {
                let q_row = &scaled_q[((b * q_heads + h) * q_len + i) * head_size..][..head_size];
                let out_at = ((b * q_heads + h) * q_len + i) * keys;
                let mut all_masked = true;
                for (j, r) in row.iter_mut().enumerate() {
                    let k_row = &scaled_k[(k_base + j) * head_size..][..head_size];
                    let mut acc = T::Acc::zero();
                    for (&x, &y) in q_row.iter().zip(k_row) {
                        acc = acc.add(x.widen().mul(y.widen()));
                    }
                    let raw = T::narrow(acc);
                    let capped = if softcap > 0.0 {
                        raw.div(softcap_t)
                            .unwrap_or(raw)
                            .map(f32::tanh, f64::tanh)
                            .mul(softcap_t)
                    } else {
                        raw
                    };
                    let mut bias = mask.as_ref().map_or(T::zero(), |m| m[out_at + j]);
                    if !range.allows(b, i, j) {
                        bias = bias.add(T::lowest());
                    }
                    if bias != T::lowest() {
                        all_masked = false;
                    }
                    *r = capped.add(bias);
                    qk_out[out_at + j] = match mode {
                        0 => raw,
                        1 => capped,
                        _ => *r,
                    };
                }
                softmax_with_precision(cx, &mut row, precision)?;
                if all_masked {
                    row.fill(T::zero());
                }
                if mode == 3 {
                    qk_out[out_at..out_at + keys].copy_from_slice(&row);
                }
                let y_at = ((b * q_heads + h) * q_len + i) * v_size;
                let mut acc = vec![T::Acc::zero(); v_size];
                for (j, &p) in row.iter().enumerate() {
                    let v_row = &values[(k_base + j) * v_size..][..v_size];
                    for (a, &x) in acc.iter_mut().zip(v_row) {
                        *a = a.add(p.widen().mul(x.widen()));
                    }
                }
                for (o, a) in y[y_at..y_at + v_size].iter_mut().zip(acc) {
                    *o = T::narrow(a);
                }
            }
        }
    }
    let y = array(&[batch, q_heads, q_len, v_size], y);
    let y = if rank == 3 { merge_heads(y) } else { y };
    Ok(vec![
        T::wrap(y),
        T::wrap(present_key),
        T::wrap(present_value),
        T::wrap(array(&scores_shape, qk_out)),
    ])
}

// ------------------------------------------------------- RotaryEmbedding

/// Rotates pairs of `x` (one head's vector, in place) by the angles whose
/// cosines and sines are given: halves (`x[i]`, `x[i + d/2]`) or, when
/// interleaved, neighbours (`x[2i]`, `x[2i + 1]`), over the first
/// `2 * cos.len()` elements; the rest stay.
fn rotate<T: Number>(x: &mut [T], cos: &[T], sin: &[T], interleaved: bool) {
    let half = cos.len();
    for i in 0..half {
        let (a, b) = if interleaved {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + half)
        };
        let (x1, x2) = (x[a], x[b]);
        x[a] = cos[i].mul(x1).sub(sin[i].mul(x2));
        x[b] = sin[i].mul(x1).add(cos[i].mul(x2));
    }
}

fn rotary_embedding(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    super::typed::floating!(cx, x, "input", |x| {
        let cos = same_type(cx, inputs, 1)?;
        let sin = same_type(cx, inputs, 2)?;
        let positions = match inputs.get(3).copied().flatten() {
            Some(t) => Some((t.shape().to_vec(), ints_of(cx, t, "position_ids")?)),
            None => None,
        };
        Ok(vec![Elem::wrap(rotary_onnx(cx, x, cos, sin, positions)?)])
    })
}

/// ONNX's RotaryEmbedding: input `[batch, heads, sequence, size]` or
/// `[batch, sequence, hidden]` (with `num_heads`); the caches
/// `[positions, rotary/2]` indexed by `position_ids [batch, sequence]`, or
/// `[batch, sequence, rotary/2]` without them.
fn rotary_onnx<T: Float>(
    cx: &OpCtx,
    x: &ArrayD<T>,
    cos: &ArrayD<T>,
    sin: &ArrayD<T>,
    positions: Option<(Vec<usize>, Vec<i64>)>,
) -> Result<ArrayD<T>, EvalError> {
    // As [batch, sequence, heads, size].
    let (x4, batch, seq, heads, size) = match x.ndim() {
        4 => {
            let s = x.shape();
            let t = x.view().permuted_axes(IxDyn(&[0, 2, 1, 3]));
            (t.as_standard_layout().into_owned(), s[0], s[2], s[1], s[3])
        }
        3 => {
            let s = x.shape();
            let heads = cx.int_attr("num_heads", 0)?;
            if heads <= 0 || s[2] % heads as usize != 0 {
                return cx.err(format!(
                    "a 3-D input needs num_heads dividing its hidden size {}",
                    s[2]
                ));
            }
            let heads = heads as usize;
            (
                x.as_standard_layout().into_owned(),
                s[0],
                s[1],
                heads,
                s[2] / heads,
            )
        }
        _ => {
            return cx.err(format!(
                "the input must be 3-D or 4-D, found {:?}",
                x.shape()
            ))
        }
    };
    let rotary = match cx.int_attr("rotary_embedding_dim", 0)? {
        0 => size,
        r if r > 0 && r as usize <= size && r % 2 == 0 => r as usize,
        r => {
            return cx.err(format!(
                "rotary_embedding_dim {r} does not fit head size {size}"
            ))
        }
    };
    if size % 2 != 0 && rotary == size {
        return cx.err(format!("the head size {size} is odd"));
    }
    let half = rotary / 2;
    let interleaved = cx.int_attr("interleaved", 0)? != 0;
    let (cos_d, sin_d) = (cos.as_standard_layout(), sin.as_standard_layout());
    let (cos_d, sin_d) = (
        cos_d.as_slice().unwrap_or(&[]),
        sin_d.as_slice().unwrap_or(&[]),
    );
    if cos.shape().last() != Some(&half) || sin.shape() != cos.shape() {
        return cx.err(format!(
            "the caches {:?} and {:?} must end in rotary_embedding_dim / 2 = {half}",
            cos.shape(),
            sin.shape()
        ));
    }
    // The cache row of each (batch, position).
    let rows: Vec<usize> = match &positions {
        Some((shape, ids)) => {
            if shape.as_slice() != [batch, seq] || cos.ndim() != 2 {
                return cx.err(format!(
                    "position_ids {shape:?} must be [batch, sequence] = [{batch}, {seq}], with 2-D caches"
                ));
            }
            let limit = cos.shape()[0];
            ids.iter()
                .map(|&p| match usize::try_from(p) {
                    Ok(p) if p < limit => Ok(p),
                    _ => cx.err(format!("position id {p} is outside the cache of {limit}")),
                })
                .collect::<Result<_, _>>()?
        }
        None => {
            if cos.shape() != [batch, seq, half] {
                return cx.err(format!(
                    "without position_ids the caches must be [batch, sequence, rotary/2], found {:?}",
                    cos.shape()
                ));
            }
            (0..batch * seq).collect()
        }
    };
    let mut data: Vec<T> = x4.iter().copied().collect();
    for (bs, row) in rows.iter().enumerate() {
        let (c, s) = (&cos_d[row * half..][..half], &sin_d[row * half..][..half]);
        for h in 0..heads {
            let at = (bs * heads + h) * size;
            rotate(&mut data[at..at + size], c, s, interleaved);
        }
    }
    Ok(if x.ndim() == 4 {
        array(&[batch, seq, heads, size], data)
            .permuted_axes(IxDyn(&[0, 2, 1, 3]))
            .as_standard_layout()
            .into_owned()
    } else {
        array(x.shape(), data)
    })
}

// ------------------------------------------------- com.microsoft kernels

/// An `int32` (or int64) input as values, or none when absent.
fn optional_ints(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    i: usize,
    what: &str,
) -> Result<Option<(Vec<usize>, Vec<i64>)>, EvalError> {
    match inputs.get(i).copied().flatten() {
        Some(t) => Ok(Some((t.shape().to_vec(), ints_of(cx, t, what)?))),
        None => Ok(None),
    }
}

/// An optional input of the kernel's type `T`.
fn optional_same<'t, T: Elem>(
    cx: &OpCtx,
    inputs: &[Option<&'t Tensor>],
    i: usize,
) -> Result<Option<&'t ArrayD<T>>, EvalError> {
    match inputs.get(i).copied().flatten() {
        Some(_) => Ok(Some(same_type::<T>(cx, inputs, i)?)),
        None => Ok(None),
    }
}

/// com.microsoft RotaryEmbedding: inputs (input, position_ids, cos_cache,
/// sin_cache); position_ids `[batch, sequence]`, or one value: the position
/// of the first token.
fn ms_rotary_embedding(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    super::typed::floating!(cx, x, "input", |x| {
        let positions = ints_of(cx, input(cx, inputs, 1)?, "position_ids")?;
        let cos = same_type(cx, inputs, 2)?;
        let sin = same_type(cx, inputs, 3)?;
        Ok(vec![Elem::wrap(rotary_ms(cx, x, &positions, cos, sin)?)])
    })
}

fn rotary_ms<T: Float>(
    cx: &OpCtx,
    x: &ArrayD<T>,
    positions: &[i64],
    cos: &ArrayD<T>,
    sin: &ArrayD<T>,
) -> Result<ArrayD<T>, EvalError> {
    if cos.ndim() != 2 || sin.shape() != cos.shape() {
        return cx.err(format!(
            "cos_cache {:?} and sin_cache {:?} must be the same 2-D shape",
            cos.shape(),
            sin.shape()
        ));
    }
    let (cache_rows, half) = (cos.shape()[0], cos.shape()[1]);
    let rotary_attr = cx.int_attr("rotary_embedding_dim", 0)?.max(0) as usize;
    // As [batch, sequence, heads, size] (3-D) or [batch, heads, sequence,
    // size] (4-D): the order the data is in.
    let (batch, seq, heads, size, heads_first) = match x.ndim() {
        3 => {
            let s = x.shape();
            let heads = match cx.int_attr("num_heads", 0)? {
                h if h > 0 => h as usize,
                _ if rotary_attr == 0 && half > 0 => s[2] / (2 * half),
                _ => return cx.err("a 3-D input with rotary_embedding_dim needs num_heads"),
            };
            if heads == 0 || s[2] % heads != 0 {
                return cx.err(format!("hidden size {} does not divide into heads", s[2]));
            }
            (s[0], s[1], heads, s[2] / heads, false)
        }
        4 => {
            let s = x.shape();
            (s[0], s[2], s[1], s[3], true)
        }
        _ => {
            return cx.err(format!(
                "the input must be 3-D or 4-D, found {:?}",
                x.shape()
            ))
        }
    };
    let rotary = if rotary_attr == 0 { size } else { rotary_attr };
    if rotary > size || rotary != 2 * half {
        return cx.err(format!(
            "rotary dim {rotary} (head size {size}) does not fit caches of {half} columns"
        ));
    }
    let position = |b: usize, s: usize| -> Result<usize, EvalError> {
        let p = match positions.len() {
            1 => positions[0] + s as i64,
            n if n == batch * seq => positions[b * seq + s],
            n => return cx.err(format!("position_ids has {n} values for [{batch}, {seq}]")),
        };
        match usize::try_from(p) {
            Ok(p) if p < cache_rows => Ok(p),
            _ => cx.err(format!("position {p} is outside the cache of {cache_rows}")),
        }
    };
    let interleaved = cx.int_attr("interleaved", 0)? != 0;
    let (cos_d, sin_d) = (cos.as_standard_layout(), sin.as_standard_layout());
    let (cos_d, sin_d) = (
        cos_d.as_slice().unwrap_or(&[]),
        sin_d.as_slice().unwrap_or(&[]),
    );
    let mut data: Vec<T> = x.as_standard_layout().iter().copied().collect();
    for b in 0..batch {
        for s in 0..seq {
            let p = position(b, s)?;
            let (c, si) = (&cos_d[p * half..][..half], &sin_d[p * half..][..half]);
            for h in 0..heads {
                let at = if heads_first {
                    ((b * heads + h) * seq + s) * size
                } else {
                    ((b * seq + s) * heads + h) * size
                };
                rotate_f32(&mut data[at..at + size], c, si, interleaved);
            }
        }
    }
    Ok(array(x.shape(), data))
}

/// As [`rotate`], each result computed in f32 and rounded once (ONNX
/// Runtime's kernels for float16).
fn rotate_f32<T: Float>(x: &mut [T], cos: &[T], sin: &[T], interleaved: bool) {
    let half = cos.len();
    for i in 0..half {
        let (a, b) = if interleaved {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + half)
        };
        let (x1, x2) = (x[a].to_f64(), x[b].to_f64());
        let (c, s) = (cos[i].to_f64(), sin[i].to_f64());
        if T::DTYPE == qgraph_ir::DataType::F64 {
            x[a] = T::from_f64(x1 * c - x2 * s);
            x[b] = T::from_f64(x2 * c + x1 * s);
        } else {
            let (x1, x2, c, s) = (x1 as f32, x2 as f32, c as f32, s as f32);
            x[a] = T::from_f32(x1 * c - x2 * s);
            x[b] = T::from_f32(x2 * c + x1 * s);
        }
    }
}

/// MatMulNBits: `Y = A W^T + bias`, W `[N, K]` dequantized from `bits`-bit
/// codes in blocks of `block_size` along K: `(code - zero_point) * scale`.
fn matmul_nbits(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let a = input(cx, inputs, 0)?;
    super::typed::floating!(cx, a, "A", |a| Ok(vec![Elem::wrap(matmul_nbits_typed(
        cx, inputs, a
    )?)]))
}

fn matmul_nbits_typed<T: Float + Accumulate>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    a: &ArrayD<T>,
) -> Result<ArrayD<T>, EvalError> {
    let positive = |name: &str, default: i64| -> Result<usize, EvalError> {
        match cx.int_attr(name, default)? {
            v if v > 0 => Ok(v as usize),
            v => cx.err(format!("attribute {name} = {v} must be positive")),
        }
    };
    let (k, n) = (positive("K", 0)?, positive("N", 0)?);
    let bits = positive("bits", 4)?;
    let block = positive("block_size", 0)?;
    if !(2..=8).contains(&bits) || block < 16 || !block.is_power_of_two() {
        return cx.err(format!(
            "bits {bits} / block_size {block} are not supported"
        ));
    }
    if a.ndim() == 0 || a.shape()[a.ndim() - 1] != k {
        return cx.err(format!("A {:?} does not end in K = {k}", a.shape()));
    }
    let blocks = k.div_ceil(block);
    let blob = block * bits / 8;
    let Tensor::U8(b) = input(cx, inputs, 1)? else {
        return cx.err("B must be uint8");
    };
    let b = b.as_standard_layout();
    let b = b.as_slice().unwrap_or(&[]);
    let rows_out: usize = a.shape()[..a.ndim() - 1].iter().product();
    let mut out_shape = a.shape().to_vec();
    *out_shape.last_mut().unwrap_or(&mut 0) = n;
    let bias = optional_same::<T>(cx, inputs, 5)?;
    if let Some(bias) = bias {
        if bias.len() != n {
            return cx.err(format!("bias has {} values for N = {n}", bias.len()));
        }
    }
    element_count(cx, &out_shape, "Y")?;
    element_count(cx, &[k, n], "the weights")?;
    if b.len() != n * blocks * blob {
        if b.is_empty() {
            // An omitted projection: zeros, or the bias.
            let bias: Vec<T> = bias.map_or(vec![T::zero(); n], |v| v.iter().copied().collect());
            let data = (0..rows_out).flat_map(|_| bias.iter().copied()).collect();
            return Ok(array(&out_shape, data));
        }
        return cx.err(format!(
            "B has {} bytes for [N, k_blocks, blob] = [{n}, {blocks}, {blob}]",
            b.len()
        ));
    }
    let scales: Vec<f32> = same_type::<T>(cx, inputs, 2)?
        .iter()
        .map(|v| v.to_f32())
        .collect();
    if scales.len() != n * blocks {
        return cx.err(format!(
            "scales has {} values for {n} x {blocks}",
            scales.len()
        ));
    }
    // Zero points: packed codes (uint8), or values of A's type; absent, the
    // middle code.
    let middle = (1u32 << (bits - 1)) as f32;
    let zero_points: Vec<f32> = match inputs.get(3).copied().flatten() {
        None => vec![middle; n * blocks],
        Some(Tensor::U8(z)) => {
            let z: Vec<u8> = z.iter().copied().collect();
            let per_row = (blocks * bits).div_ceil(8);
            if z.len() != n * per_row {
                return cx.err(format!(
                    "packed zero_points has {} bytes for {n} x {per_row}",
                    z.len()
                ));
            }
            (0..n)
                .flat_map(|r| {
                    let z = &z[r * per_row..(r + 1) * per_row];
                    (0..blocks).map(move |i| code_at(z, i, bits) as f32)
                })
                .collect()
        }
        Some(_) => {
            let z: Vec<f32> = same_type::<T>(cx, inputs, 3)?
                .iter()
                .map(|v| v.to_f32())
                .collect();
            if z.len() != n * blocks {
                return cx.err(format!(
                    "zero_points has {} values for {n} x {blocks}",
                    z.len()
                ));
            }
            z
        }
    };
    // The block of each k: its index / block_size, or g_idx.
    let block_of: Vec<usize> = match optional_ints(cx, inputs, 4, "g_idx")? {
        Some((_, g)) if !g.is_empty() => {
            if g.len() != k {
                return cx.err(format!("g_idx has {} values for K = {k}", g.len()));
            }
            g.iter()
                .map(|&v| match usize::try_from(v) {
                    Ok(v) if v < blocks => Ok(v),
                    _ => cx.err(format!("g_idx value {v} is not a block index")),
                })
                .collect::<Result<_, _>>()?
        }
        _ => (0..k).map(|i| i / block).collect(),
    };
    // The dequantized weights, transposed to [K, N] for the product.
    let mut w = vec![0f32; k * n];
    for r in 0..n {
        let row = &b[r * blocks * blob..(r + 1) * blocks * blob];
        for (i, &blk) in block_of.iter().enumerate() {
            let code = code_at(&row[(i / block) * blob..], i % block, bits) as f32;
            let at = r * blocks + blk;
            w[i * n + r] = (code - zero_points[at]) * scales[at];
        }
    }
    let a32: Vec<f32> = a.as_standard_layout().iter().map(|v| v.to_f32()).collect();
    let mut y = vec![0f32; rows_out * n];
    super::gemm::gemm(
        &mut y,
        n,
        super::gemm::MatRef::row_major(&a32, rows_out, k),
        super::gemm::MatRef::row_major(&w, k, n),
        1.0,
        false,
        super::gemm::Threads::Pool,
    );
    if let Some(bias) = bias {
        let bias: Vec<f32> = bias.iter().map(|v| v.to_f32()).collect();
        for row in y.chunks_mut(n.max(1)) {
            for (v, b) in row.iter_mut().zip(&bias) {
                *v += b;
            }
        }
    }
    Ok(array(&out_shape, y.into_iter().map(T::from_f32).collect()))
}

/// Code `i` of `bits` bits packed low bits first into `bytes`.
fn code_at(bytes: &[u8], i: usize, bits: usize) -> u32 {
    let bit = i * bits;
    let (byte, shift) = (bit / 8, bit % 8);
    let lo = bytes.get(byte).copied().unwrap_or(0) as u32;
    let hi = bytes.get(byte + 1).copied().unwrap_or(0) as u32;
    ((lo | hi << 8) >> shift) & ((1 << bits) - 1)
}

/// Scaled dot-product attention as ONNX Runtime's contrib CPU kernels
/// compute it, in f32: `scale Q K^T + mask + bias`, softmax, times V.
/// `q` is `[batch, heads, q_len, head]`, `k` and `v` `[batch, kv_heads,
/// keys, .]` (a query head reads key head `h / (heads / kv_heads)`); the
/// mask is `[batch, q_len, keys]`, the bias broadcast to `[batch, heads,
/// q_len, keys]`. The result is `[batch, q_len, heads * v_size]`.
struct ContribAttention<'a> {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    q_len: usize,
    keys: usize,
    head_size: usize,
    v_size: usize,
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    scale: f32,
    mask: Option<&'a [f32]>,
    bias: Option<&'a [f32]>,
    softcap: f32,
}

impl ContribAttention<'_> {
    fn run(&self) -> Vec<f32> {
        let (s, t, h, hv) = (self.q_len, self.keys, self.head_size, self.v_size);
        let group = self.heads / self.kv_heads.max(1);
        let mut out = vec![0f32; self.batch * s * self.heads * hv];
        let mut row = vec![0f32; t];
        for b in 0..self.batch {
            for n in 0..self.heads {
                let kvn = n / group.max(1);
                let kv_at = (b * self.kv_heads + kvn) * t;
                for i in 0..s {
                    let q_row = &self.q[((b * self.heads + n) * s + i) * h..][..h];
                    for (j, r) in row.iter_mut().enumerate() {
                        let k_row = &self.k[(kv_at + j) * h..][..h];
                        let dot: f32 = q_row.iter().zip(k_row).map(|(a, b)| a * b).sum();
                        let mut x = dot * self.scale;
                        if self.softcap > 0.0 {
                            x = (x / self.softcap).tanh() * self.softcap;
                        }
                        if let Some(m) = self.mask {
                            x += m[(b * s + i) * t + j];
                        }
                        if let Some(bias) = self.bias {
                            x += bias[((b * self.heads + n) * s + i) * t + j];
                        }
                        *r = x;
                    }
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f32;
                    for r in row.iter_mut() {
                        *r = (*r - max).exp();
                        sum += *r;
                    }
                    let o = &mut out[((b * s + i) * self.heads + n) * hv..][..hv];
                    for (j, &p) in row.iter().enumerate() {
                        let p = p / sum;
                        for (o, &x) in o.iter_mut().zip(&self.v[(kv_at + j) * hv..][..hv]) {
                            *o += p * x;
                        }
                    }
                }
            }
        }
        out
    }
}

/// The additive mask of ONNX Runtime's contrib attention (`[batch, q_len,
/// keys]`), from a `mask_index` / `key_padding_mask` and causality: a key
/// masked by the input gets `mask_filter_value`; one after the query (causal)
/// the lowest f32. None when nothing is masked.
#[allow(clippy::too_many_arguments)]
fn contrib_mask(
    cx: &OpCtx,
    mask: Option<(Vec<usize>, Vec<i64>)>,
    causal: bool,
    batch: usize,
    q_len: usize,
    past: usize,
    keys: usize,
    filter: f32,
) -> Result<Option<Vec<f32>>, EvalError> {
    if mask.is_none() && !causal {
        return Ok(None);
    }
    let mut m = vec![0f32; batch * q_len * keys];
    if let Some((shape, values)) = &mask {
        let masked = |v: i64| if v > 0 { 0.0 } else { filter };
        match shape.as_slice() {
            [b, s, t] if *b == batch && *s == q_len && *t == keys => {
                for (d, &v) in m.iter_mut().zip(values) {
                    *d = masked(v);
                }
            }
            [b, t] if *b == batch && *t == keys => {
                for (bi, row) in m.chunks_mut(q_len * keys).enumerate() {
                    for line in row.chunks_mut(keys) {
                        for (d, &v) in line.iter_mut().zip(&values[bi * keys..]) {
                            *d = masked(v);
                        }
                    }
                }
            }
            [l] if *l == batch || *l == 2 * batch => {
                for (bi, row) in m.chunks_mut(q_len * keys).enumerate() {
                    let end = values[bi].clamp(0, keys as i64) as usize;
                    let start = if *l == 2 * batch {
                        values[bi + batch].clamp(0, keys as i64) as usize
                    } else {
                        0
                    };
                    for line in row.chunks_mut(keys) {
                        for (j, d) in line.iter_mut().enumerate() {
                            if j >= end || j < start {
                                *d = filter;
                            }
                        }
                    }
                }
            }
            other => {
                return cx.err(format!(
                    "a mask of shape {other:?} is not supported here (batch {batch}, \
                     sequence {q_len}, total sequence {keys})"
                ))
            }
        }
    }
    if causal {
        for row in m.chunks_mut(q_len * keys) {
            for (i, line) in row.chunks_mut(keys).enumerate() {
                for d in line.iter_mut().skip(past + i + 1) {
                    *d = f32::MIN;
                }
            }
        }
    }
    Ok(Some(m))
}

/// An attention bias `[batch or 1, heads or 1, q_len, keys]` broadcast to
/// `[batch, heads, q_len, keys]`, in f32.
fn contrib_bias<T: Float>(
    cx: &OpCtx,
    bias: Option<&ArrayD<T>>,
    shape: [usize; 4],
) -> Result<Option<Vec<f32>>, EvalError> {
    let Some(bias) = bias else { return Ok(None) };
    let b32 = bias.mapv(|v| v.to_f32());
    Ok(Some(broadcast_data(
        cx,
        &b32.view(),
        &shape,
        "attention_bias",
    )?))
}

/// `[batch, seq, heads * size]` f32 data as `[batch, heads, seq, size]`.
fn to_bnsh(data: &[f32], batch: usize, seq: usize, heads: usize, size: usize) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    for b in 0..batch {
        for s in 0..seq {
            for h in 0..heads {
                let from = ((b * seq + s) * heads + h) * size;
                let to = ((b * heads + h) * seq + s) * size;
                out[to..to + size].copy_from_slice(&data[from..from + size]);
            }
        }
    }
    out
}

/// The concatenation along the sequence of `[batch, heads, past, size]` and
/// `[batch, heads, new, size]` data.
fn concat_bnsh(
    past: &[f32],
    new: &[f32],
    rows: usize,
    past_len: usize,
    new_len: usize,
    size: usize,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(past.len() + new.len());
    for r in 0..rows {
        out.extend_from_slice(&past[r * past_len * size..(r + 1) * past_len * size]);
        out.extend_from_slice(&new[r * new_len * size..(r + 1) * new_len * size]);
    }
    out
}

fn f32_data<T: Float>(a: &ArrayD<T>) -> Vec<f32> {
    a.iter().map(|v| v.to_f32()).collect()
}

fn from_f32_data<T: Float>(shape: &[usize], data: Vec<f32>) -> ArrayD<T> {
    array(shape, data.into_iter().map(T::from_f32).collect())
}

fn num_heads(cx: &OpCtx, name: &str) -> Result<usize, EvalError> {
    match cx.int_attr(name, 0)? {
        h if h > 0 => Ok(h as usize),
        h => cx.err(format!("attribute {name} = {h} must be positive")),
    }
}

/// com.microsoft Attention: the input projected to Q, K and V by one weight
/// matrix (and bias), the past key and value (`[2, batch, heads, past,
/// size]`) before the new ones, a mask index, an attention bias.
fn ms_attention(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    super::typed::floating!(cx, x, "input", |x| ms_attention_typed(cx, inputs, x))
}

fn ms_attention_typed<T: Float>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    x: &ArrayD<T>,
) -> Result<Vec<Tensor>, EvalError> {
    let w = same_type::<T>(cx, inputs, 1)?;
    if x.ndim() != 3 || w.ndim() != 2 || w.shape()[0] != x.shape()[2] {
        return cx.err(format!(
            "input {:?} and weights {:?} must be [batch, sequence, in] and [in, out]",
            x.shape(),
            w.shape()
        ));
    }
    if cx.int_attr("past_present_share_buffer", 0)? != 0 || cx.int_attr("do_rotary", 0)? != 0 {
        return cx.err("past_present_share_buffer and do_rotary are not supported");
    }
    let (batch, seq, d_in) = (x.shape()[0], x.shape()[1], x.shape()[2]);
    let total_out = w.shape()[1];
    let sizes = match cx.ints_attr("qkv_hidden_sizes")? {
        Some(s) if s.len() == 3 && s.iter().all(|&v| v > 0) => {
            [s[0] as usize, s[1] as usize, s[2] as usize]
        }
        Some(s) => return cx.err(format!("qkv_hidden_sizes {s:?} must be 3 positive sizes")),
        None => [total_out / 3; 3],
    };
    let heads = num_heads(cx, "num_heads")?;
    if sizes.iter().sum::<usize>() != total_out
        || sizes[0] != sizes[1]
        || sizes[0] % heads != 0
        || sizes[2] % heads != 0
    {
        return cx.err(format!(
            "hidden sizes {sizes:?} do not fit weights {:?} and {heads} heads",
            w.shape()
        ));
    }
    let (head, v_head) = (sizes[0] / heads, sizes[2] / heads);
    element_count(cx, &[batch, seq, total_out], "the projection")?;
    let x32 = f32_data(&x.as_standard_layout().into_owned());
    let w32 = f32_data(&w.as_standard_layout().into_owned());
    let mut qkv = vec![0f32; batch * seq * total_out];
    if let Some(bias) = optional_same::<T>(cx, inputs, 2)? {
        if bias.len() != total_out {
            return cx.err(format!("bias has {} values for {total_out}", bias.len()));
        }
        let bias = f32_data(bias);
        for row in qkv.chunks_mut(total_out) {
            row.copy_from_slice(&bias);
        }
    }
    let accumulate = inputs.get(2).copied().flatten().is_some();
    super::gemm::gemm(
        &mut qkv,
        total_out,
        super::gemm::MatRef::row_major(&x32, batch * seq, d_in),
        super::gemm::MatRef::row_major(&w32, d_in, total_out),
        1.0,
        accumulate,
        super::gemm::Threads::Pool,
    );
    let part = |from: usize, width: usize| -> Vec<f32> {
        qkv.chunks(total_out)
            .flat_map(|r| r[from..from + width].iter().copied())
            .collect()
    };
    let q = to_bnsh(&part(0, sizes[0]), batch, seq, heads, head);
    let mut k = to_bnsh(&part(sizes[0], sizes[1]), batch, seq, heads, head);
    let mut v = to_bnsh(&part(2 * sizes[0], sizes[2]), batch, seq, heads, v_head);
    let mut past_len = 0;
    if let Some(past) = optional_same::<T>(cx, inputs, 4)? {
        let s = past.shape();
        if s.len() != 5
            || s[0] != 2
            || s[1] != batch
            || s[2] != heads
            || s[4] != head
            || head != v_head
        {
            return cx.err(format!(
                "past {s:?} must be [2, {batch}, {heads}, past, {head}] (and V's head size the same)"
            ));
        }
        past_len = s[3];
        let p = f32_data(&past.as_standard_layout().into_owned());
        let half = p.len() / 2;
        k = concat_bnsh(&p[..half], &k, batch * heads, past_len, seq, head);
        v = concat_bnsh(&p[half..], &v, batch * heads, past_len, seq, v_head);
    }
    let keys = past_len + seq;
    let scale = match cx.float_attr("scale", 0.0)? {
        s if s != 0.0 => s,
        _ => 1.0 / (head as f32).sqrt(),
    };
    let mask = contrib_mask(
        cx,
        optional_ints(cx, inputs, 3, "mask_index")?,
        cx.int_attr("unidirectional", 0)? != 0,
        batch,
        seq,
        past_len,
        keys,
        cx.float_attr("mask_filter_value", -10000.0)?,
    )?;
    let bias = contrib_bias(
        cx,
        optional_same::<T>(cx, inputs, 5)?,
        [batch, heads, seq, keys],
    )?;
    let out = ContribAttention {
        batch,
        heads,
        kv_heads: heads,
        q_len: seq,
        keys,
        head_size: head,
        v_size: v_head,
        q: &q,
        k: &k,
        v: &v,
        scale,
        mask: mask.as_deref(),
        bias: bias.as_deref(),
        softcap: 0.0,
    }
    .run();
    let output = T::wrap(from_f32_data(&[batch, seq, heads * v_head], out));
    if head != v_head {
        // No present state: its one tensor holds keys and values alike.
        return Ok(vec![output]);
    }
    let mut present = k;
    present.extend_from_slice(&v);
    Ok(vec![
        output,
        T::wrap(from_f32_data(&[2, batch, heads, keys, head], present)),
    ])
}

/// com.microsoft MultiHeadAttention: query `[batch, seq, hidden]` (or packed
/// QKV `[batch, seq, heads, 3, size]`); key and value `[batch, kv_seq,
/// hidden]`, `[batch, heads, kv_seq, size]` (already projected and split),
/// or packed KV in key `[batch, kv_seq, heads, 2, size]`; the bias of the
/// input projection; a key padding mask; an attention bias; past key and
/// value `[batch, heads, past, size]`.
fn multi_head_attention(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    super::typed::floating!(cx, x, "query", |x| mha_typed(cx, inputs, x))
}

fn mha_typed<T: Float>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    query: &ArrayD<T>,
) -> Result<Vec<Tensor>, EvalError> {
    let heads = num_heads(cx, "num_heads")?;
    let key = optional_same::<T>(cx, inputs, 1)?;
    let value = optional_same::<T>(cx, inputs, 2)?;
    let bias = optional_same::<T>(cx, inputs, 3)?.map(f32_data);
    let qs = query.shape().to_vec();
    let batch = qs[0];
    let seq = *qs.get(1).unwrap_or(&0);
    // Q, K, V as [batch, seq, hidden] rows, or K/V already [batch, heads,
    // kv_seq, size].
    let std = |a: &ArrayD<T>| f32_data(&a.as_standard_layout().into_owned());
    let split_packed = |data: Vec<f32>, rows: usize, parts: usize, size: usize| -> Vec<Vec<f32>> {
        // [rows, heads, parts, size] into `parts` arrays of [rows, heads * size].
        (0..parts)
            .map(|p| {
                (0..rows * heads)
                    .flat_map(|rh| data[(rh * parts + p) * size..][..size].iter().copied())
                    .collect()
            })
            .collect()
    };
    enum Kv {
        Rows(Vec<f32>, usize, usize),
        Bnsh(Vec<f32>, usize, usize),
    }
    let (q_rows, q_hidden, k_in, v_in) = match (qs.len(), key, value) {
        (3, Some(k), Some(v)) => {
            let (ks, vs) = (k.shape(), v.shape());
            let kv = match (ks.len(), vs.len()) {
                (3, 3) if ks[0] == batch && vs[0] == batch && ks[1] == vs[1] => (
                    Kv::Rows(std(k), ks[1], ks[2]),
                    Kv::Rows(std(v), vs[1], vs[2]),
                ),
                (4, 4)
                    if ks[0] == batch
                        && vs[0] == batch
                        && ks[1] == heads
                        && vs[1] == heads
                        && ks[2] == vs[2] =>
                {
                    (
                        Kv::Bnsh(std(k), ks[2], ks[3]),
                        Kv::Bnsh(std(v), vs[2], vs[3]),
                    )
                }
                _ => {
                    return cx.err(format!(
                        "key {ks:?} and value {vs:?} do not fit query {qs:?}"
                    ))
                }
            };
            (std(query), qs[2], kv.0, kv.1)
        }
        (3, Some(k), None) if k.ndim() == 5 && k.shape()[3] == 2 && k.shape()[2] == heads => {
            let ks = k.shape();
            let size = ks[4];
            let mut parts = split_packed(std(k), batch * ks[1], 2, size);
            let v = parts.pop().unwrap_or_default();
            let k = parts.pop().unwrap_or_default();
            (
                std(query),
                qs[2],
                Kv::Rows(k, ks[1], heads * size),
                Kv::Rows(v, ks[1], heads * size),
            )
        }
        (5, None, None) if qs[3] == 3 && qs[2] == heads => {
            let size = qs[4];
            let mut parts = split_packed(std(query), batch * seq, 3, size);
            let v = parts.pop().unwrap_or_default();
            let k = parts.pop().unwrap_or_default();
            let q = parts.pop().unwrap_or_default();
            let hidden = heads * size;
            (
                q,
                hidden,
                Kv::Rows(k, seq, hidden),
                Kv::Rows(v, seq, hidden),
            )
        }
        _ => {
            return cx.err(format!(
                "query {qs:?} with key {:?} and value {:?} is not a supported layout",
                key.map(|k| k.shape().to_vec()),
                value.map(|v| v.shape().to_vec())
            ))
        }
    };
    if q_hidden % heads != 0 {
        return cx.err(format!(
            "hidden size {q_hidden} does not divide into {heads} heads"
        ));
    }
    let head = q_hidden / heads;
    let add_bias = |rows: &mut [f32], from: usize, width: usize| {
        if let Some(b) = &bias {
            for r in rows.chunks_mut(width.max(1)) {
                for (v, bv) in r.iter_mut().zip(&b[from..from + width]) {
                    *v += bv;
                }
            }
        }
    };
    let mut q_rows = q_rows;
    let (k_hidden, v_hidden) = match (&k_in, &v_in) {
        (Kv::Rows(_, _, kh), Kv::Rows(_, _, vh)) => (*kh, *vh),
        (Kv::Bnsh(_, _, ks), Kv::Bnsh(_, _, vs)) => (heads * ks, heads * vs),
        _ => (0, 0),
    };
    if let Some(b) = &bias {
        if b.len() != q_hidden + k_hidden + v_hidden {
            return cx.err(format!(
                "bias has {} values for {q_hidden} + {k_hidden} + {v_hidden}",
                b.len()
            ));
        }
    }
    add_bias(&mut q_rows, 0, q_hidden);
    let q = to_bnsh(&q_rows, batch, seq, heads, head);
    let to_heads = |kv: Kv, from: usize| -> Result<(Vec<f32>, usize, usize), EvalError> {
        match kv {
            Kv::Rows(mut rows, len, hidden) => {
                if hidden % heads != 0 {
                    return cx.err(format!(
                        "hidden size {hidden} does not divide into {heads} heads"
                    ));
                }
                add_bias(&mut rows, from, hidden);
                Ok((
                    to_bnsh(&rows, batch, len, heads, hidden / heads),
                    len,
                    hidden / heads,
                ))
            }
            Kv::Bnsh(data, len, size) => Ok((data, len, size)),
        }
    };
    let (mut k, kv_len, k_size) = to_heads(k_in, q_hidden)?;
    let (mut v, _, v_size) = to_heads(v_in, q_hidden + k_hidden)?;
    if k_size != head {
        return cx.err(format!(
            "key head size {k_size} differs from the query's {head}"
        ));
    }
    let past_key = optional_same::<T>(cx, inputs, 6)?;
    let past_value = optional_same::<T>(cx, inputs, 7)?;
    let mut past_len = 0;
    if let (Some(pk), Some(pv)) = (past_key, past_value) {
        let (ps, vs) = (pk.shape(), pv.shape());
        if ps.len() != 4
            || vs.len() != 4
            || ps[0] != batch
            || ps[1] != heads
            || ps[3] != head
            || vs[..3] != ps[..3]
            || vs[3] != v_size
        {
            return cx.err(format!("past_key {ps:?} / past_value {vs:?} do not fit"));
        }
        past_len = ps[2];
        k = concat_bnsh(&std(pk), &k, batch * heads, past_len, kv_len, head);
        v = concat_bnsh(&std(pv), &v, batch * heads, past_len, kv_len, v_size);
    }
    let keys = past_len + kv_len;
    let scale = match cx.float_attr("scale", 0.0)? {
        s if s != 0.0 => s,
        _ => 1.0 / (head as f32).sqrt(),
    };
    let mask = contrib_mask(
        cx,
        optional_ints(cx, inputs, 4, "key_padding_mask")?,
        cx.int_attr("unidirectional", 0)? != 0,
        batch,
        seq,
        past_len,
        keys,
        cx.float_attr("mask_filter_value", -10000.0)?,
    )?;
    let attn_bias = contrib_bias(
        cx,
        optional_same::<T>(cx, inputs, 5)?,
        [batch, heads, seq, keys],
    )?;
    let out = ContribAttention {
        batch,
        heads,
        kv_heads: heads,
        q_len: seq,
        keys,
        head_size: head,
        v_size,
        q: &q,
        k: &k,
        v: &v,
        scale,
        mask: mask.as_deref(),
        bias: attn_bias.as_deref(),
        softcap: 0.0,
    }
    .run();
    Ok(vec![
        T::wrap(from_f32_data(&[batch, seq, heads * v_size], out)),
        T::wrap(from_f32_data(&[batch, heads, keys, head], k)),
        T::wrap(from_f32_data(&[batch, heads, keys, v_size], v)),
    ])
}

#[cfg(test)]
mod tests {
    use qgraph_ir::{AttrValue, Graph, NewNode, Tensor};

    use super::*;

    /// Runs one node of `op` (in `domain`) on `inputs`, at `opset`.
    fn run(
        op: &str,
        domain: &str,
        attrs: Vec<(&str, AttrValue)>,
        inputs: &[Option<Tensor>],
        outputs: usize,
    ) -> Result<Vec<Tensor>, EvalError> {
        let mut g = Graph::new("test");
        let mut node = NewNode::new(op).domain(domain);
        for (i, t) in inputs.iter().enumerate() {
            node.inputs.push(match t {
                Some(_) => Some(g.add_input(format!("in{i}"), None).unwrap()),
                None => None,
            });
        }
        for o in 0..outputs {
            node.outputs
                .push(Some(g.add_value(format!("out{o}"), None).unwrap()));
        }
        for (name, value) in attrs {
            node = node.attr(name, value);
        }
        let n = g.add_node(node).unwrap();
        let refs: Vec<Option<&Tensor>> = inputs.iter().map(Option::as_ref).collect();
        crate::run_node(&g, n, 23, &refs)
    }

    fn tensor<T: Elem>(shape: &[usize], data: Vec<T>) -> Option<Tensor> {
        Some(T::wrap(array(shape, data)))
    }

    fn values<T: Elem + Clone>(t: &Tensor) -> Vec<T> {
        T::unwrap(t)
            .expect("the expected type")
            .iter()
            .cloned()
            .collect()
    }

    fn assert_close(actual: &[f32], expected: &[f32], tolerance: f32) {
        assert_eq!(actual.len(), expected.len());
        for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
            assert!(
                (a - e).abs() <= tolerance * (1.0 + e.abs()),
                "element {i}: {a} vs {e}"
            );
        }
    }

    #[test]
    fn integer_matmul_is_exact_and_wraps() {
        let a = tensor::<i32>(&[1, 2], vec![i32::MAX, 3]);
        let b = tensor::<i32>(&[2, 2], vec![2, 1, 5, -1]);
        let y = run("MatMul", "", vec![], &[a, b], 1).unwrap();
        assert_eq!(y[0].shape(), &[1, 2]);
        assert_eq!(
            values::<i32>(&y[0]),
            vec![i32::MAX.wrapping_mul(2).wrapping_add(15), i32::MAX - 3]
        );
        // 1-D operands: the added dims are removed again; batch dims
        // broadcast.
        let a = tensor::<u8>(&[2], vec![200, 100]);
        let b = tensor::<u8>(&[3, 2, 1], vec![1, 1, 2, 0, 0, 3]);
        let y = run("MatMul", "", vec![], &[a, b], 1).unwrap();
        assert_eq!(y[0].shape(), &[3, 1]);
        assert_eq!(values::<u8>(&y[0]), vec![44, 144, 44]);
    }

    #[test]
    fn f64_matmul_and_gemm_compute_in_f64() {
        // 2^52 + 2 - 1: exact in f64, far beyond f32's precision.
        let big = 4503599627370496.0f64;
        let a = tensor::<f64>(&[1, 3], vec![big, 2.0, -1.0]);
        let b = tensor::<f64>(&[3, 1], vec![1.0, 1.0, 1.0]);
        let y = run("MatMul", "", vec![], &[a.clone(), b.clone()], 1).unwrap();
        assert_eq!(values::<f64>(&y[0]), vec![big + 1.0]);
        let c = tensor::<f64>(&[1], vec![0.5]);
        let y = run(
            "Gemm",
            "",
            vec![
                ("alpha", AttrValue::Float(2.0)),
                ("beta", AttrValue::Float(4.0)),
            ],
            &[a, b, c],
            1,
        )
        .unwrap();
        assert_eq!(values::<f64>(&y[0]), vec![2.0 * big + 4.0]);
    }

    #[test]
    fn half_matmul_accumulates_in_f32() {
        // 2048 + 1 + 1 in float16 steps would stay 2048; in f32, 2050.
        let a = tensor::<f16>(&[1, 3], [2048.0, 1.0, 1.0].map(f16::from_f32).to_vec());
        let b = tensor::<f16>(&[3, 1], [1.0; 3].map(f16::from_f32).to_vec());
        let y = run("MatMul", "", vec![], &[a, b], 1).unwrap();
        assert_eq!(values::<f16>(&y[0]), vec![f16::from_f32(2050.0)]);
    }

    #[test]
    fn integer_gemm_transposes_and_broadcasts_c() {
        let a = tensor::<i64>(&[2, 1], vec![3, 4]);
        let b = tensor::<i64>(&[2, 2], vec![1, 2, 3, 4]);
        let c = tensor::<i64>(&[2], vec![10, 20]);
        let y = run(
            "Gemm",
            "",
            vec![("transA", AttrValue::Int(1)), ("transB", AttrValue::Int(1))],
            &[a, b, c],
            1,
        )
        .unwrap();
        // A^T = [3 4], B^T = [[1 3] [2 4]]: [3 + 8, 9 + 16] + C.
        assert_eq!(values::<i64>(&y[0]), vec![21, 45]);
    }

    #[test]
    fn einsum_takes_diagonals_ellipses_and_implicit_outputs() {
        let eq = |e: &str| vec![("equation", AttrValue::String(e.as_bytes().to_vec()))];
        let x = tensor::<i64>(&[2, 2, 2], (1..=8).collect());
        let y = run("Einsum", "", eq("...ii->...i"), &[x.clone()], 1).unwrap();
        assert_eq!(y[0].shape(), &[2, 2]);
        assert_eq!(values::<i64>(&y[0]), vec![1, 4, 5, 8]);
        let y = run("Einsum", "", eq("ijk"), &[x.clone()], 1).unwrap();
        assert_eq!(values::<i64>(&y[0]), (1..=8).collect::<Vec<_>>());
        // Implicit: the labels used once, alphabetically (j k).
        let m = tensor::<i64>(&[2, 2], vec![1, 2, 3, 4]);
        let eye = tensor::<i64>(&[2, 2], vec![1, 0, 0, 1]);
        let y = run("Einsum", "", eq("ij,ik"), &[m, eye], 1).unwrap();
        assert_eq!(values::<i64>(&y[0]), vec![1, 3, 2, 4]);
        let y = run("Einsum", "", eq("bij,bjk->bik"), &[x.clone(), x], 1).unwrap();
        assert_eq!(values::<i64>(&y[0]), vec![7, 10, 15, 22, 67, 78, 91, 106]);
        let v = tensor::<f64>(&[3], vec![1.0, 2.0, 3.0]);
        let y = run("Einsum", "", eq("i,i"), &[v.clone(), v], 1).unwrap();
        assert_eq!(y[0].shape(), &[] as &[usize]);
        assert_eq!(values::<f64>(&y[0]), vec![14.0]);
        let bad = tensor::<f64>(&[3], vec![1.0, 2.0, 3.0]);
        assert!(run("Einsum", "", eq("ij->i"), &[bad], 1).is_err());
    }

    #[test]
    fn attention_in_f64_averages_values_under_a_causal_mask() {
        // Q = 0: every allowed key weighs the same, so row i of Y is the
        // mean of the first i + 1 value rows (exact in f64).
        let q = tensor::<f64>(&[1, 1, 2, 2], vec![0.0; 4]);
        let k = tensor::<f64>(&[1, 1, 2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        let v = tensor::<f64>(&[1, 1, 2, 2], vec![1.0, 2.0, 3.0, 6.0]);
        let y = run(
            "Attention",
            "",
            vec![("is_causal", AttrValue::Int(1))],
            &[q, k, v],
            1,
        )
        .unwrap();
        assert_eq!(values::<f64>(&y[0]), vec![1.0, 2.0, 2.0, 4.0]);
    }

    #[test]
    fn attention_zeroes_a_fully_masked_row() {
        let q = tensor::<f32>(&[1, 1, 2, 2], vec![1.0; 4]);
        let kv = tensor::<f32>(&[1, 1, 2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        let mask = Some(Tensor::Bool(array(&[2, 2], vec![false, false, true, true])));
        let y = run(
            "Attention",
            "",
            vec![("qk_matmul_output_mode", AttrValue::Int(3))],
            &[q, kv.clone(), kv, mask],
            4,
        )
        .unwrap();
        let y0 = values::<f32>(&y[0]);
        assert_eq!(&y0[..2], &[0.0, 0.0]);
        assert_eq!(&values::<f32>(&y[3])[..2], &[0.0, 0.0]);
    }

    #[test]
    fn rotary_embedding_by_a_quarter_turn() {
        // cos 0, sin 1: (x1, x2) becomes (-x2, x1).
        let x = tensor::<f64>(&[1, 1, 1, 4], vec![1.0, 2.0, 3.0, 4.0]);
        let cos = tensor::<f64>(&[1, 1, 2], vec![0.0, 0.0]);
        let sin = tensor::<f64>(&[1, 1, 2], vec![1.0, 1.0]);
        let y = run(
            "RotaryEmbedding",
            "",
            vec![],
            &[x.clone(), cos.clone(), sin.clone()],
            1,
        )
        .unwrap();
        assert_eq!(values::<f64>(&y[0]), vec![-3.0, -4.0, 1.0, 2.0]);
        let y = run(
            "RotaryEmbedding",
            "",
            vec![("interleaved", AttrValue::Int(1))],
            &[x, cos, sin],
            1,
        )
        .unwrap();
        assert_eq!(values::<f64>(&y[0]), vec![-2.0, 1.0, -4.0, 3.0]);
    }

    // Expected values below were computed by ONNX Runtime 1.32 (CPU).

    #[test]
    fn matmul_nbits_matches_onnx_runtime() {
        let a: Vec<f32> = (0..16).map(|i| (i as f32 - 7.5) / 4.0).collect();
        let b: Vec<u8> = vec![
            0, 37, 74, 111, 148, 185, 222, 3, 11, 48, 85, 122, 159, 196, 233, 14,
        ];
        let y = run(
            "MatMulNBits",
            "com.microsoft",
            vec![
                ("K", AttrValue::Int(16)),
                ("N", AttrValue::Int(2)),
                ("bits", AttrValue::Int(4)),
                ("block_size", AttrValue::Int(16)),
            ],
            &[
                tensor(&[1, 16], a),
                tensor(&[2, 1, 8], b),
                tensor::<f32>(&[2, 1], vec![0.5, 0.25]),
                tensor::<u8>(&[2, 1], vec![3, 12]),
            ],
            1,
        )
        .unwrap();
        assert_close(&values::<f32>(&y[0]), &[15.4375, 8.5625], 1e-6);
    }

    #[test]
    fn contrib_rotary_embedding_matches_onnx_runtime() {
        let x: Vec<f32> = (0..16).map(|i| (i as f32 - 8.0) / 3.0).collect();
        let angles = [0.1f32, 0.2, 0.5, -0.7, 1.0, 2.0];
        let y = run(
            "RotaryEmbedding",
            "com.microsoft",
            vec![("num_heads", AttrValue::Int(2))],
            &[
                tensor(&[1, 2, 8], x),
                tensor::<i64>(&[1, 2], vec![1, 0]),
                tensor(&[3, 2], angles.map(f32::cos).to_vec()),
                tensor(&[3, 2], angles.map(f32::sin).to_vec()),
            ],
            1,
        )
        .unwrap();
        let expected = [
            -1.3813691,
            -2.8583279,
            -3.0336332,
            0.22843751,
            -0.85049307,
            -0.97958148,
            -1.2242892,
            0.38927025,
            -0.06655562,
            0.12801954,
            0.66333616,
            1.0462897,
            1.1270055,
            1.1698825,
            2.1231196,
            2.6179376,
        ];
        assert_close(&values::<f32>(&y[0]), &expected, 1e-5);
    }

    #[test]
    fn contrib_attention_matches_onnx_runtime() {
        let x: Vec<f32> = (0..12).map(|i| (i as f32).sin()).collect();
        let w: Vec<f32> = (0..48).map(|i| (i as f32).cos() * 0.5).collect();
        let b: Vec<f32> = (0..12).map(|i| -0.3 + 0.6 * i as f32 / 11.0).collect();
        let y = run(
            "Attention",
            "com.microsoft",
            vec![
                ("num_heads", AttrValue::Int(2)),
                ("unidirectional", AttrValue::Int(1)),
            ],
            &[
                tensor(&[1, 3, 4], x),
                tensor(&[4, 12], w),
                tensor(&[12], b),
                tensor::<i32>(&[1, 3], vec![1, 0, 1]),
            ],
            1,
        )
        .unwrap();
        let expected = [
            0.75788575,
            -0.00850958,
            -0.5915603,
            -0.40506345,
            0.75788575,
            -0.00850958,
            -0.5915603,
            -0.40506345,
            0.15432575,
            -0.29000378,
            -0.23358965,
            0.31835014,
        ];
        assert_close(&values::<f32>(&y[0]), &expected, 1e-5);
    }

    #[test]
    fn multi_head_attention_matches_onnx_runtime() {
        let q: Vec<f32> = (0..8).map(|i| (i as f32 * 0.7).sin()).collect();
        let k: Vec<f32> = (0..12).map(|i| (i as f32 * 0.3).cos()).collect();
        let v: Vec<f32> = (0..12).map(|i| i as f32 / 10.0).collect();
        let y = run(
            "MultiHeadAttention",
            "com.microsoft",
            vec![("num_heads", AttrValue::Int(2))],
            &[
                tensor(&[1, 2, 4], q),
                tensor(&[1, 3, 4], k),
                tensor(&[1, 3, 4], v),
                tensor::<f32>(&[12], vec![0.0; 12]),
                tensor::<i32>(&[1], vec![2]),
            ],
            1,
        )
        .unwrap();
        let expected = [
            0.16024035, 0.26024035, 0.27780229, 0.37780228, 0.20683506, 0.30683506, 0.5228368,
            0.62283677,
        ];
        assert_close(&values::<f32>(&y[0]), &expected, 1e-5);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let a = tensor::<i32>(&[2, 3], vec![0; 6]);
        let b = tensor::<i32>(&[2, 3], vec![0; 6]);
        assert!(run("MatMul", "", vec![], &[a.clone(), b], 1).is_err());
        let f = tensor::<f32>(&[3, 2], vec![0.0; 6]);
        assert!(run("MatMul", "", vec![], &[a, f], 1).is_err());
        let q = tensor::<f32>(&[1, 2, 3], vec![0.0; 6]);
        assert!(run("Attention", "", vec![], &[q.clone(), q.clone(), q], 1).is_err());
    }
}
