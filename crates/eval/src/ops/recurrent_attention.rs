//! The recurrent sequence-model operators of opset 27: LinearAttention (the
//! linear, gated, delta and gated-delta recurrences of linear-attention
//! models, with grouped-query heads) and CausalConvWithState (the stateful
//! causal depthwise 1-D convolution of Mamba and Gated DeltaNet).
//!
//! Both run token by token, as the specification states them. float16 and
//! bfloat16 accumulate in f32 and round once per result (as ONNX's reference
//! and ONNX Runtime do: the recurrent state is kept in f32 across tokens),
//! f32 in f32, f64 in f64.

use super::typed::{floating, same_type, Elem, Float, Number};
use super::{array, input, Kernel};
use crate::{EvalError, OpCtx};
use qgraph_ir::half::{bf16, f16};
use qgraph_ir::ndarray::ArrayD;
use qgraph_ir::Tensor;

pub const KERNELS: &[(&str, Kernel)] = &[
    ("LinearAttention", linear_attention),
    ("CausalConvWithState", causal_conv_with_state),
];

/// The most elements a kernel here allocates for one result: more is an
/// error, not an allocation failure.
const MAX_ELEMENTS: usize = 1 << 36;

/// A floating type and the type its arithmetic runs in: f32 for f32,
/// float16 and bfloat16; f64 for f64.
trait Wide: Float {
    type Acc: Float;
    fn widen(self) -> Self::Acc;
    fn narrow(a: Self::Acc) -> Self;
}

impl Wide for f32 {
    type Acc = f32;
    fn widen(self) -> f32 {
        self
    }
    fn narrow(a: f32) -> f32 {
        a
    }
}

impl Wide for f64 {
    type Acc = f64;
    fn widen(self) -> f64 {
        self
    }
    fn narrow(a: f64) -> f64 {
        a
    }
}

macro_rules! wide_in_f32 {
    ($($t:ty),*) => {$(
        impl Wide for $t {
            type Acc = f32;
            fn widen(self) -> f32 { self.to_f32() }
            fn narrow(a: f32) -> $t { <$t>::from_f32(a) }
        }
    )*};
}
wide_in_f32!(f16, bf16);

/// The product of `dims`, or an error naming `what` when it overflows or is
/// beyond what a kernel allocates.
fn element_count(cx: &OpCtx, dims: &[usize], what: &str) -> Result<usize, EvalError> {
    dims.iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= MAX_ELEMENTS)
        .map_or_else(
            || cx.err(format!("{what} of shape {dims:?} is too large")),
            Ok,
        )
}

/// The elements of `a` in logical (row-major) order, widened.
fn widened<T: Wide>(a: &ArrayD<T>) -> Vec<T::Acc> {
    a.iter().map(|&v| v.widen()).collect()
}

/// A shape check: `what` must have rank 3.
fn rank3<T>(cx: &OpCtx, a: &ArrayD<T>, what: &str) -> Result<[usize; 3], EvalError> {
    match a.shape() {
        &[x, y, z] => Ok([x, y, z]),
        other => cx.err(format!("{what} must be rank 3, got shape {other:?}")),
    }
}

fn sigmoid<A: Float>(x: A) -> A {
    let e = x.neg().map(f32::exp, f64::exp);
    match A::one().div(A::one().add(e)) {
        Some(s) => s,
        None => A::zero(),
    }
}

// ---------------------------------------------------------------------------
// LinearAttention
// ---------------------------------------------------------------------------

/// Which terms of the recurrence an `update_rule` has.
#[derive(Clone, Copy, Debug)]
struct UpdateRule {
    /// `S <- exp(g) * S` before the write.
    gating: bool,
    /// The written value is `beta * (v - S^T k)`, not `v`.
    delta: bool,
}

impl UpdateRule {
    fn parse(cx: &OpCtx, name: &str) -> Result<Self, EvalError> {
        let (gating, delta) = match name {
            "linear" => (false, false),
            "gated" => (true, false),
            "delta" => (false, true),
            "gated_delta" => (true, true),
            other => {
                return cx.err(format!(
                    "update_rule '{other}' is not one of 'linear', 'gated', 'delta', \
                     'gated_delta'"
                ))
            }
        };
        Ok(UpdateRule { gating, delta })
    }
}

/// The sizes of one LinearAttention call.
#[derive(Clone, Copy, Debug)]
struct Heads {
    batch: usize,
    steps: usize,
    q_heads: usize,
    kv_heads: usize,
    key_dim: usize,
    value_dim: usize,
}

fn linear_attention(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let query = input(cx, inputs, 0)?;
    floating!(cx, query, "query (input 0)", |q| linear_attention_of(
        cx, inputs, q
    ))
}

fn linear_attention_of<T: Wide>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    query: &ArrayD<T>,
) -> Result<Vec<Tensor>, EvalError> {
    let rule = UpdateRule::parse(cx, &cx.string_attr("update_rule", "gated_delta")?)?;
    let q_heads = cx.int_attr("q_num_heads", 0)?;
    let kv_heads = cx.int_attr("kv_num_heads", 0)?;
    if q_heads <= 0 || kv_heads <= 0 || q_heads % kv_heads != 0 {
        return cx.err(format!(
            "q_num_heads ({q_heads}) must be a positive multiple of kv_num_heads ({kv_heads}); \
             both attributes are required"
        ));
    }
    let (q_heads, kv_heads) = (q_heads as usize, kv_heads as usize);
    let key = same_type::<T>(cx, inputs, 1)?;
    let value = same_type::<T>(cx, inputs, 2)?;
    let [batch, steps, q_width] = rank3(cx, query, "query")?;
    let [kb, kt, k_width] = rank3(cx, key, "key")?;
    let [vb, vt, v_width] = rank3(cx, value, "value")?;
    if (kb, kt) != (batch, steps) || (vb, vt) != (batch, steps) {
        return cx.err(format!(
            "query {:?}, key {:?} and value {:?} must agree in batch and sequence length",
            query.shape(),
            key.shape(),
            value.shape()
        ));
    }
    if q_width % q_heads != 0 || v_width % kv_heads != 0 {
        return cx.err(format!(
            "query's last dimension {q_width} must divide by q_num_heads {q_heads}, and value's \
             {v_width} by kv_num_heads {kv_heads}"
        ));
    }
    let heads = Heads {
        batch,
        steps,
        q_heads,
        kv_heads,
        key_dim: q_width / q_heads,
        value_dim: v_width / kv_heads,
    };
    if k_width != kv_heads * heads.key_dim {
        return cx.err(format!(
            "key's last dimension {k_width} must be kv_num_heads {kv_heads} times the query's \
             head size {}",
            heads.key_dim
        ));
    }
    let state_shape = [batch, kv_heads, heads.key_dim, heads.value_dim];
    let state_len = element_count(cx, &state_shape, "the recurrent state")?;
    element_count(cx, &[batch, steps, q_heads, heads.value_dim], "the output")?;

    let past_state = inputs.get(3).copied().flatten();
    let mut state: Vec<T::Acc> = match past_state {
        None => vec![T::Acc::zero(); state_len],
        Some(past) => {
            if past.shape() != state_shape {
                return cx.err(format!(
                    "past_state has shape {:?}, where (B, H_kv, d_k, d_v) = {state_shape:?} \
                     was expected",
                    past.shape()
                ));
            }
            // The state may be of another float type than the activations.
            floating!(cx, past, "past_state (input 3)", |s| s
                .iter()
                .map(|v| T::Acc::from_f64(v.to_f64()))
                .collect())
        }
    };

    let decay = optional_gate::<T>(cx, inputs, 4, "decay", rule.gating, rule)?;
    let decay_per_key = match decay {
        Some(d) => {
            let [db, dt, width] = rank3(cx, d, "decay")?;
            if (db, dt) != (batch, steps) {
                return cx.err(format!(
                    "decay has shape {:?}; its batch and sequence length must be the query's",
                    d.shape()
                ));
            }
            if width == kv_heads * heads.key_dim {
                true
            } else if width == kv_heads {
                false
            } else {
                return cx.err(format!(
                    "decay's last dimension {width} must be kv_num_heads ({kv_heads}) or \
                     kv_num_heads * d_k ({})",
                    kv_heads * heads.key_dim
                ));
            }
        }
        None => false,
    };
    let beta = optional_gate::<T>(cx, inputs, 5, "beta", rule.delta, rule)?;
    let beta_per_head = match beta {
        Some(b) => {
            let [bb, bt, width] = rank3(cx, b, "beta")?;
            if (bb, bt) != (batch, steps) || (width != kv_heads && width != 1) {
                return cx.err(format!(
                    "beta has shape {:?}, where (B, T, kv_num_heads) or (B, T, 1) was expected",
                    b.shape()
                ));
            }
            width == kv_heads
        }
        None => false,
    };

    let scale = match cx.float_attr("scale", 0.0)? {
        s if s == 0.0 => T::Acc::one()
            .div(T::Acc::from_f64(heads.key_dim as f64).map(f32::sqrt, f64::sqrt))
            .unwrap_or_else(T::Acc::zero),
        s => T::Acc::from_f32(s),
    };
    let gates = Gates {
        decay: decay.map(widened),
        decay_per_key,
        beta: beta.map(widened),
        beta_per_head,
    };
    let output = linear_recurrence(
        heads,
        rule,
        scale,
        &widened(query),
        &widened(key),
        &widened(value),
        &gates,
        &mut state,
    );
    let output = array(
        &[batch, steps, q_heads * heads.value_dim],
        output.into_iter().map(T::narrow).collect(),
    );
    // present_state takes past_state's type, or the query's without one.
    let present = match past_state {
        Some(past) => floating!(cx, past, "past_state (input 3)", |s| narrow_like(
            s,
            &state_shape,
            &state
        )),
        None => T::wrap(array(
            &state_shape,
            state.into_iter().map(T::narrow).collect(),
        )),
    };
    Ok(vec![T::wrap(output), present])
}

/// `values` as a tensor of `_like`'s element type.
fn narrow_like<S: Float, A: Float>(_like: &ArrayD<S>, shape: &[usize], values: &[A]) -> Tensor {
    S::wrap(array(
        shape,
        values.iter().map(|v| S::from_f64(v.to_f64())).collect(),
    ))
}

/// The decay or beta input, which the update rule requires (`wanted`) or
/// forbids.
fn optional_gate<'t, T: Elem>(
    cx: &OpCtx,
    inputs: &[Option<&'t Tensor>],
    i: usize,
    name: &str,
    wanted: bool,
    rule: UpdateRule,
) -> Result<Option<&'t ArrayD<T>>, EvalError> {
    let given = inputs.get(i).copied().flatten().is_some();
    match (wanted, given) {
        (true, true) => same_type::<T>(cx, inputs, i).map(Some),
        (false, false) => Ok(None),
        (true, false) => cx.err(format!(
            "this update_rule ({rule:?}) requires the {name} input (input {i})"
        )),
        (false, true) => cx.err(format!(
            "this update_rule ({rule:?}) takes no {name} input (input {i})"
        )),
    }
}

/// The widened decay and beta inputs and their layouts.
struct Gates<A> {
    /// (B, T, H_kv * d_k) when `decay_per_key`, else (B, T, H_kv).
    decay: Option<Vec<A>>,
    decay_per_key: bool,
    /// (B, T, H_kv) when `beta_per_head`, else (B, T, 1).
    beta: Option<Vec<A>>,
    beta_per_head: bool,
}

/// Runs the recurrence token by token over packed (B, T, H * D) inputs,
/// updating `state` (B, H_kv, d_k, d_v); returns the output (B, T, H_q * d_v).
/// Query head `j` reads the state of key/value head `j / (H_q / H_kv)`.
#[allow(clippy::too_many_arguments)]
fn linear_recurrence<A: Float>(
    heads: Heads,
    rule: UpdateRule,
    scale: A,
    query: &[A],
    key: &[A],
    value: &[A],
    gates: &Gates<A>,
    state: &mut [A],
) -> Vec<A> {
    let Heads {
        batch,
        steps,
        q_heads,
        kv_heads,
        key_dim,
        value_dim,
    } = heads;
    let group = q_heads / kv_heads;
    let mut output = vec![A::zero(); batch * steps * q_heads * value_dim];
    let mut written = vec![A::zero(); value_dim];
    let mut read = vec![A::zero(); value_dim];
    for b in 0..batch {
        for h in 0..kv_heads {
            let s = &mut state[(b * kv_heads + h) * key_dim * value_dim..][..key_dim * value_dim];
            for t in 0..steps {
                let token = b * steps + t;
                let k = &key[(token * kv_heads + h) * key_dim..][..key_dim];
                let v = &value[(token * kv_heads + h) * value_dim..][..value_dim];
                if let Some(decay) = &gates.decay {
                    for (d, row) in s.chunks_exact_mut(value_dim).enumerate() {
                        let g = if gates.decay_per_key {
                            decay[(token * kv_heads + h) * key_dim + d]
                        } else {
                            decay[token * kv_heads + h]
                        };
                        let factor = g.map(f32::exp, f64::exp);
                        row.iter_mut().for_each(|x| *x = x.mul(factor));
                    }
                }
                written.copy_from_slice(v);
                if rule.delta {
                    if let Some(beta) = &gates.beta {
                        let rate = if gates.beta_per_head {
                            beta[token * kv_heads + h]
                        } else {
                            beta[token]
                        };
                        // written = beta * (v - S^T k)
                        for (m, w) in written.iter_mut().enumerate() {
                            let retrieved = (0..key_dim)
                                .fold(A::zero(), |acc, d| acc.add(s[d * value_dim + m].mul(k[d])));
                            *w = rate.mul(w.sub(retrieved));
                        }
                    }
                }
                for (d, row) in s.chunks_exact_mut(value_dim).enumerate() {
                    for (x, &w) in row.iter_mut().zip(&written) {
                        *x = x.add(k[d].mul(w));
                    }
                }
                for j in h * group..(h + 1) * group {
                    let q = &query[(token * q_heads + j) * key_dim..][..key_dim];
                    read.fill(A::zero());
                    for (d, row) in s.chunks_exact(value_dim).enumerate() {
                        for (r, &x) in read.iter_mut().zip(row) {
                            *r = r.add(q[d].mul(x));
                        }
                    }
                    let out = &mut output[(token * q_heads + j) * value_dim..][..value_dim];
                    for (o, &r) in out.iter_mut().zip(&read) {
                        *o = scale.mul(r);
                    }
                }
            }
        }
    }
    output
}

// ---------------------------------------------------------------------------
// CausalConvWithState
// ---------------------------------------------------------------------------

fn causal_conv_with_state(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    floating!(cx, x, "input 0", |a| causal_conv_of(cx, inputs, a))
}

fn causal_conv_of<T: Wide>(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    x: &ArrayD<T>,
) -> Result<Vec<Tensor>, EvalError> {
    let silu = match cx.string_attr("activation", "none")?.as_str() {
        "none" => false,
        "silu" | "swish" => true,
        other => {
            return cx.err(format!(
                "activation '{other}' is not one of 'silu', 'swish', 'none'"
            ))
        }
    };
    let [batch, channels, length] = rank3(cx, x, "input")?;
    let weight = same_type::<T>(cx, inputs, 1)?;
    let taps = match weight.shape() {
        &[c, 1, k] if c == channels && k > 0 => k,
        other => {
            return cx.err(format!(
                "weight has shape {other:?}, where (channels, 1, k) = ({channels}, 1, k >= 1) \
                 was expected"
            ))
        }
    };
    let carry = taps - 1;
    let bias = match inputs.get(2).copied().flatten() {
        Some(_) => {
            let b = same_type::<T>(cx, inputs, 2)?;
            if b.shape() != [channels] {
                return cx.err(format!(
                    "bias has shape {:?}, where ({channels}) was expected",
                    b.shape()
                ));
            }
            Some(widened(b))
        }
        None => None,
    };
    let past = match inputs.get(3).copied().flatten() {
        Some(_) => {
            let p = same_type::<T>(cx, inputs, 3)?;
            if p.shape() != [batch, channels, carry] {
                return cx.err(format!(
                    "past_state has shape {:?}, where (batch, channels, k - 1) = \
                     ({batch}, {channels}, {carry}) was expected",
                    p.shape()
                ));
            }
            Some(p.iter().copied().collect::<Vec<T>>())
        }
        None => None,
    };
    let Some(padded_length) = length.checked_add(carry) else {
        return cx.err("the padded input is too large");
    };
    element_count(cx, &[batch, channels, padded_length], "the padded input")?;
    let data: Vec<T> = x.iter().copied().collect();
    let weights = widened(weight);
    let mut output = Vec::with_capacity(batch * channels * length);
    let mut present = Vec::with_capacity(batch * channels * carry);
    let mut padded: Vec<T> = Vec::with_capacity(padded_length);
    for b in 0..batch {
        for c in 0..channels {
            let row = b * channels + c;
            padded.clear();
            match &past {
                Some(p) => padded.extend_from_slice(&p[row * carry..][..carry]),
                None => padded.resize(carry, T::zero()),
            }
            padded.extend_from_slice(&data[row * length..][..length]);
            let w = &weights[c * taps..][..taps];
            let start = bias.as_ref().map_or(T::Acc::zero(), |bias| bias[c]);
            for window in padded.windows(taps) {
                let sum = window
                    .iter()
                    .zip(w)
                    .fold(start, |acc, (&v, &wt)| acc.add(v.widen().mul(wt)));
                // The convolution rounds to the input type before the
                // activation, as the reference does.
                let y = T::narrow(sum);
                output.push(if silu {
                    let y = y.widen();
                    T::narrow(y.mul(sigmoid(y)))
                } else {
                    y
                });
            }
            present.extend_from_slice(&padded[padded_length - carry..]);
        }
    }
    Ok(vec![
        T::wrap(array(&[batch, channels, length], output)),
        T::wrap(array(&[batch, channels, carry], present)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_values;
    use qgraph_ir::AttrValue;

    /// One node of `op` at opset 27, where both operators appear.
    fn run_op(
        op: &str,
        attrs: Vec<(&str, AttrValue)>,
        inputs: &[Option<&Tensor>],
    ) -> Result<Vec<Tensor>, EvalError> {
        crate::ops::run_test_op(op, 27, attrs, inputs)
    }

    fn f64s(t: &Tensor) -> (Vec<usize>, Vec<f64>) {
        match t {
            Tensor::F64(a) => (a.shape().to_vec(), a.iter().copied().collect()),
            other => panic!("expected f64, found {}", other.dtype()),
        }
    }

    fn f32s(t: &Tensor) -> Vec<f32> {
        match t {
            Tensor::F32(a) => a.iter().copied().collect(),
            other => panic!("expected f32, found {}", other.dtype()),
        }
    }

    fn text(s: &str) -> AttrValue {
        AttrValue::String(s.as_bytes().to_vec())
    }

    fn f64_tensor(shape: &[usize], data: Vec<f64>) -> Tensor {
        Tensor::F64(array(shape, data))
    }

    fn heads(q: i64, kv: i64) -> Vec<(&'static str, AttrValue)> {
        vec![
            ("q_num_heads", AttrValue::Int(q)),
            ("kv_num_heads", AttrValue::Int(kv)),
        ]
    }

    #[test]
    fn linear_rule_accumulates_outer_products_exactly() {
        // One head, d_k = d_v = 2, two tokens, scale 1.
        let q = f64_tensor(&[1, 2, 2], vec![1.0, 0.0, 1.0, 1.0]);
        let k = f64_tensor(&[1, 2, 2], vec![1.0, 2.0, 0.0, 1.0]);
        let v = f64_tensor(&[1, 2, 2], vec![3.0, 4.0, 5.0, 6.0]);
        let mut attrs = heads(1, 1);
        attrs.push(("update_rule", text("linear")));
        attrs.push(("scale", AttrValue::Float(1.0)));
        let out = run_op("LinearAttention", attrs, &[Some(&q), Some(&k), Some(&v)]).unwrap();
        // S1 = k1 v1^T = [[3,4],[6,8]]; o1 = q1 S1 = [3,4].
        // S2 = S1 + [[0,0],[5,6]] = [[3,4],[11,14]]; o2 = [14,18].
        assert_eq!(f64s(&out[0]), (vec![1, 2, 2], vec![3.0, 4.0, 14.0, 18.0]));
        assert_eq!(
            f64s(&out[1]),
            (vec![1, 1, 2, 2], vec![3.0, 4.0, 11.0, 14.0])
        );
    }

    #[test]
    fn delta_rule_with_past_state_and_default_scale() {
        // d_k = 1 (scale 1/sqrt(1) = 1), d_v = 2, past S = [[1, 2]], beta 0.5.
        let q = f64_tensor(&[1, 1, 1], vec![2.0]);
        let k = f64_tensor(&[1, 1, 1], vec![1.0]);
        let v = f64_tensor(&[1, 1, 2], vec![5.0, 6.0]);
        let past = f64_tensor(&[1, 1, 1, 2], vec![1.0, 2.0]);
        let beta = f64_tensor(&[1, 1, 1], vec![0.5]);
        let mut attrs = heads(1, 1);
        attrs.push(("update_rule", text("delta")));
        let out = run_op(
            "LinearAttention",
            attrs,
            &[Some(&q), Some(&k), Some(&v), Some(&past), None, Some(&beta)],
        )
        .unwrap();
        // written = 0.5 * ([5,6] - [1,2]) = [2,2]; S = [3,4]; o = 2 * S.
        assert_eq!(f64s(&out[1]).1, vec![3.0, 4.0]);
        assert_eq!(f64s(&out[0]).1, vec![6.0, 8.0]);
    }

    #[test]
    fn gated_delta_gqa_matches_a_direct_evaluation() {
        // B=1, T=3, H_q=4, H_kv=2, d_k=2, d_v=3 in f32 against an f64
        // transcription of the reference's formulas.
        let (b, t, hq, hkv, dk, dv) = (1, 3, 4, 2, 2, 3);
        let q = test_values(b * t * hq * dk, 1);
        let k = test_values(b * t * hkv * dk, 2);
        let v = test_values(b * t * hkv * dv, 3);
        let decay: Vec<f32> = test_values(b * t * hkv, 4)
            .iter()
            .map(|x| -x.abs() * 0.5)
            .collect();
        let beta: Vec<f32> = test_values(b * t * hkv, 5)
            .iter()
            .map(|x| x.abs())
            .collect();
        let tensor = |shape: &[usize], d: &Vec<f32>| Tensor::F32(array(shape, d.clone()));
        let inputs = [
            tensor(&[b, t, hq * dk], &q),
            tensor(&[b, t, hkv * dk], &k),
            tensor(&[b, t, hkv * dv], &v),
            tensor(&[b, t, hkv], &decay),
            tensor(&[b, t, hkv], &beta),
        ];
        let out = run_op(
            "LinearAttention",
            heads(hq as i64, hkv as i64),
            &[
                Some(&inputs[0]),
                Some(&inputs[1]),
                Some(&inputs[2]),
                None,
                Some(&inputs[3]),
                Some(&inputs[4]),
            ],
        )
        .unwrap();
        let mut state = vec![vec![vec![0f64; dv]; dk]; hkv];
        let mut want = vec![0f64; t * hq * dv];
        let scale = 1.0 / (dk as f64).sqrt();
        for step in 0..t {
            for h in 0..hkv {
                let g = (decay[step * hkv + h] as f64).exp();
                let kk: Vec<f64> = (0..dk)
                    .map(|d| k[(step * hkv + h) * dk + d] as f64)
                    .collect();
                for row in state[h].iter_mut() {
                    row.iter_mut().for_each(|x| *x *= g);
                }
                for m in 0..dv {
                    let retrieved: f64 = (0..dk).map(|d| state[h][d][m] * kk[d]).sum();
                    let w = beta[step * hkv + h] as f64
                        * (v[(step * hkv + h) * dv + m] as f64 - retrieved);
                    for d in 0..dk {
                        state[h][d][m] += kk[d] * w;
                    }
                }
            }
            for j in 0..hq {
                let h = j / (hq / hkv);
                for m in 0..dv {
                    let o: f64 = (0..dk)
                        .map(|d| q[(step * hq + j) * dk + d] as f64 * state[h][d][m])
                        .sum();
                    want[(step * hq + j) * dv + m] = scale * o;
                }
            }
        }
        for (g, w) in f32s(&out[0]).iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
        }
        assert_eq!(out[1].shape(), &[1, 2, 2, 3]);
    }

    #[test]
    fn half_inputs_keep_their_type_and_state_takes_past_type() {
        let q = Tensor::F16(array(&[1, 1, 2], vec![f16::from_f32(1.0); 2]));
        let past = f64_tensor(&[1, 1, 2, 2], vec![0.0; 4]);
        let mut attrs = heads(1, 1);
        attrs.push(("update_rule", text("linear")));
        let out = run_op(
            "LinearAttention",
            attrs,
            &[Some(&q), Some(&q), Some(&q), Some(&past)],
        )
        .unwrap();
        assert_eq!(out[0].dtype(), q.dtype());
        // o = (1/sqrt 2) * [2, 2]
        match &out[0] {
            Tensor::F16(a) => assert!(a
                .iter()
                .all(|x| (x.to_f32() - std::f32::consts::SQRT_2).abs() < 1e-3)),
            _ => unreachable!(),
        }
        assert_eq!(f64s(&out[1]).1, vec![1.0; 4]);
    }

    #[test]
    fn linear_attention_rejects_bad_arguments() {
        let q = f64_tensor(&[1, 1, 4], vec![0.0; 4]);
        let gate = f64_tensor(&[1, 1, 2], vec![0.0; 2]);
        // Missing heads; heads not dividing; decay forbidden; decay missing.
        assert!(run_op("LinearAttention", vec![], &[Some(&q), Some(&q), Some(&q)]).is_err());
        assert!(run_op(
            "LinearAttention",
            heads(3, 2),
            &[Some(&q), Some(&q), Some(&q)]
        )
        .is_err());
        let mut linear = heads(2, 2);
        linear.push(("update_rule", text("linear")));
        assert!(run_op(
            "LinearAttention",
            linear,
            &[Some(&q), Some(&q), Some(&q), None, Some(&gate)]
        )
        .is_err());
        assert!(run_op(
            "LinearAttention",
            heads(2, 2),
            &[Some(&q), Some(&q), Some(&q)]
        )
        .is_err());
        // A past state of the wrong shape.
        let mut linear = heads(2, 2);
        linear.push(("update_rule", text("linear")));
        assert!(run_op(
            "LinearAttention",
            linear,
            &[Some(&q), Some(&q), Some(&q), Some(&gate)]
        )
        .is_err());
    }

    #[test]
    fn causal_conv_with_past_state_and_bias_is_exact() {
        // B=1, C=2, L=3, k=3.
        let x = f64_tensor(&[1, 2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let w = f64_tensor(&[2, 1, 3], vec![1.0, 10.0, 100.0, 0.0, 0.0, 1.0]);
        let bias = f64_tensor(&[2], vec![0.5, -1.0]);
        let past = f64_tensor(&[1, 2, 2], vec![7.0, 8.0, 9.0, 10.0]);
        let out = run_op(
            "CausalConvWithState",
            vec![],
            &[Some(&x), Some(&w), Some(&bias), Some(&past)],
        )
        .unwrap();
        // Channel 0 padded [7, 8, 1, 2, 3]: 7+80+100, 8+10+200, 1+20+300.
        // Channel 1 is the input shifted by nothing, minus 1.
        assert_eq!(
            f64s(&out[0]),
            (vec![1, 2, 3], vec![187.5, 218.5, 321.5, 3.0, 4.0, 5.0])
        );
        assert_eq!(f64s(&out[1]), (vec![1, 2, 2], vec![2.0, 3.0, 5.0, 6.0]));
    }

    #[test]
    fn causal_conv_short_input_keeps_zero_padding_in_state() {
        // L=1 < k-1=2: the state holds a zero of the padding and the input.
        let x = f64_tensor(&[1, 1, 1], vec![3.0]);
        let w = f64_tensor(&[1, 1, 3], vec![1.0, 1.0, 2.0]);
        let out = run_op("CausalConvWithState", vec![], &[Some(&x), Some(&w)]).unwrap();
        assert_eq!(f64s(&out[0]).1, vec![6.0]);
        assert_eq!(f64s(&out[1]), (vec![1, 1, 2], vec![0.0, 3.0]));
        // Kernel size one: an empty state.
        let w1 = f64_tensor(&[1, 1, 1], vec![2.0]);
        let out = run_op("CausalConvWithState", vec![], &[Some(&x), Some(&w1)]).unwrap();
        assert_eq!(f64s(&out[1]).0, vec![1, 1, 0]);
    }

    #[test]
    fn causal_conv_silu_in_f32_and_bf16() {
        let x = Tensor::F32(array(&[1, 1, 2], vec![1.0, -2.0]));
        let w = Tensor::F32(array(&[1, 1, 1], vec![1.0]));
        let out = run_op(
            "CausalConvWithState",
            vec![("activation", text("swish"))],
            &[Some(&x), Some(&w)],
        )
        .unwrap();
        let silu = |v: f32| v / (1.0 + (-v).exp());
        assert_eq!(f32s(&out[0]), vec![silu(1.0), silu(-2.0)]);
        let xb = Tensor::BF16(array(&[1, 1, 1], vec![bf16::from_f32(1.0)]));
        let wb = Tensor::BF16(array(&[1, 1, 1], vec![bf16::from_f32(1.0)]));
        let out = run_op(
            "CausalConvWithState",
            vec![("activation", text("silu"))],
            &[Some(&xb), Some(&wb)],
        )
        .unwrap();
        match &out[0] {
            Tensor::BF16(a) => assert_eq!(a[[0, 0, 0]], bf16::from_f32(silu(1.0))),
            other => panic!("expected bfloat16, found {}", other.dtype()),
        }
    }

    #[test]
    fn causal_conv_rejects_bad_shapes_and_types() {
        let x = f64_tensor(&[1, 2, 3], vec![0.0; 6]);
        let w_bad = f64_tensor(&[3, 1, 2], vec![0.0; 6]);
        let w_empty = f64_tensor(&[2, 1, 0], vec![]);
        let w = f64_tensor(&[2, 1, 2], vec![0.0; 4]);
        let past_bad = f64_tensor(&[1, 2, 2], vec![0.0; 4]);
        let ints = Tensor::I64(array(&[1, 2, 3], vec![0; 6]));
        let run = |i: &[Option<&Tensor>]| run_op("CausalConvWithState", vec![], i);
        assert!(run(&[Some(&x), Some(&w_bad)]).is_err());
        assert!(run(&[Some(&x), Some(&w_empty)]).is_err());
        assert!(run(&[Some(&x), Some(&w), None, Some(&past_bad)]).is_err());
        assert!(run(&[Some(&ints), Some(&w)]).is_err());
        assert!(run_op(
            "CausalConvWithState",
            vec![("activation", text("relu"))],
            &[Some(&x), Some(&w)]
        )
        .is_err());
    }
}
