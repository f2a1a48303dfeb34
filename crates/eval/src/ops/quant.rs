//! QuantizeLinear and DequantizeLinear with ONNX semantics (opsets 10, 13,
//! 19, 21): per-tensor, per-axis and blocked scales; int8, uint8, int16,
//! uint16, int32 (dequantize), int4 and uint4; round half to even and
//! saturation to the output type.

use super::{array, f32_input, input};
use crate::{EvalError, OpCtx};
use qgraph_ir::{DataType, PackedTensor, Tensor};
use rayon::prelude::*;

/// `x.round_ties_even()`, without the library call that the baseline
/// x86-64 target makes of it: below 2^22 in magnitude, adding and
/// subtracting 1.5 * 2^23 rounds to an integer in the default rounding mode
/// (half to even), exactly; larger values are already integers or take
/// the library's path.
#[inline(always)]
pub(crate) fn round_half_even(x: f32) -> f32 {
    if x.abs() < SMALL_ROUNDING_LIMIT {
        round_small_half_even(x)
    } else {
        x.round_ties_even()
    }
}

/// Below this magnitude [`round_small_half_even`] is exact.
const SMALL_ROUNDING_LIMIT: f32 = 4_194_304.0;

/// Round half to even of `|x| < 2^22`, without a branch.
#[inline(always)]
fn round_small_half_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    ((x.abs() + MAGIC) - MAGIC).copysign(x)
}

/// The zero points of `count` scales: the optional input's values, or
/// zeros.
fn zero_points(cx: &OpCtx, zp: Option<&Tensor>, count: usize) -> Result<Vec<i64>, EvalError> {
    let zps = match zp {
        Some(z) => int_values(cx, z, "zero point")?,
        None => vec![0; count],
    };
    if zps.len() != count {
        return cx.err("scale and zero point differ in size");
    }
    Ok(zps)
}

/// Integer values of a quantized tensor, in logical order.
fn int_values(cx: &OpCtx, t: &Tensor, what: &str) -> Result<Vec<i64>, EvalError> {
    Ok(match t {
        Tensor::I8(a) => a.iter().map(|&v| v as i64).collect(),
        Tensor::U8(a) => a.iter().map(|&v| v as i64).collect(),
        Tensor::I16(a) => a.iter().map(|&v| v as i64).collect(),
        Tensor::U16(a) => a.iter().map(|&v| v as i64).collect(),
        Tensor::I32(a) => a.iter().map(|&v| v as i64).collect(),
        Tensor::Packed(p) => match p.unpack_sub_byte_ints() {
            Some(v) => v.into_iter().map(i64::from).collect(),
            None => return cx.err(format!("{what} of type {} is not implemented", t.dtype())),
        },
        t => return cx.err(format!("{what} of type {} is not implemented", t.dtype())),
    })
}

fn f32_values(cx: &OpCtx, t: &Tensor, what: &str) -> Result<Vec<f32>, EvalError> {
    match t {
        // A copy of the memory when it is in order: ndarray's element
        // iterator over dynamic dims costs several nanoseconds an element.
        Tensor::F32(a) => Ok(match a.as_slice() {
            Some(s) => s.to_vec(),
            None => a.iter().copied().collect(),
        }),
        t => cx.err(format!("{what} must be f32, found {}", t.dtype())),
    }
}

/// Maps each element of a tensor of shape `shape` to its scale index, for a
/// scale of shape `scale_shape`: per-tensor (one value), per-axis (1-D along
/// `axis`) or blocked (same rank, `block` elements per scale along `axis`).
struct ScaleIndex {
    axis_dim: usize,
    inner: usize,
    scale_dim: usize,
    block: usize,
    per_tensor: bool,
}

impl ScaleIndex {
    fn new(cx: &OpCtx, shape: &[usize], scale_shape: &[usize]) -> Result<ScaleIndex, EvalError> {
        let count: usize = scale_shape.iter().product();
        if count == 1 && scale_shape.len() <= 1 {
            return Ok(ScaleIndex {
                axis_dim: 1,
                inner: 1,
                scale_dim: 1,
                block: 1,
                per_tensor: true,
            });
        }
        let axis = cx.axis(cx.int_attr("axis", 1)?, shape.len())?;
        let block = cx.int_attr("block_size", 0)?;
        let axis_dim = shape[axis];
        let inner: usize = shape[axis + 1..].iter().product();
        if block > 0 {
            let block = block as usize;
            let want: Vec<usize> = shape
                .iter()
                .enumerate()
                .map(|(d, &s)| if d == axis { s.div_ceil(block) } else { s })
                .collect();
            if scale_shape != want.as_slice() {
                return cx.err(format!(
                    "blocked scale must have shape {want:?}, found {scale_shape:?}"
                ));
            }
            return Ok(ScaleIndex {
                axis_dim,
                inner,
                scale_dim: want[axis],
                block,
                per_tensor: false,
            });
        }
        if scale_shape.len() != 1 || scale_shape[0] != axis_dim {
            return cx.err(format!(
                "per-axis scale must have {axis_dim} values (axis {axis}), found shape {scale_shape:?}"
            ));
        }
        Ok(ScaleIndex {
            axis_dim,
            inner,
            scale_dim: axis_dim,
            block: 1,
            per_tensor: false,
        })
    }

    fn of(&self, e: usize, blocked: bool) -> usize {
        if self.per_tensor {
            return 0;
        }
        let along = (e / self.inner) % self.axis_dim;
        if !blocked {
            return along;
        }
        let outer = e / (self.inner * self.axis_dim);
        (outer * self.scale_dim + along / self.block) * self.inner + e % self.inner
    }
}

pub fn dequantize_linear(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, i, 0)?;
    let scale_t = input(cx, i, 1)?;
    let values = int_values(cx, x, "input")?;
    let scales = f32_values(cx, scale_t, "the scale")?;
    let zp_t = i.get(2).copied().flatten();
    if let Some(z) = zp_t.filter(|z| z.dtype() != x.dtype()) {
        return cx.err(format!(
            "zero point is {} but the input is {}",
            z.dtype(),
            x.dtype()
        ));
    }
    let zps = zero_points(cx, zp_t, scales.len())?;
    let index = ScaleIndex::new(cx, x.shape(), scale_t.shape())?;
    let blocked = cx.int_attr("block_size", 0)? > 0;
    let out: Vec<f32> = values
        .iter()
        .enumerate()
        .map(|(e, &v)| {
            let k = index.of(e, blocked);
            // As the ONNX reference: (x - zero_point) in integers, times scale in f32.
            ((v - zps[k]) as f32) * scales[k]
        })
        .collect();
    Ok(vec![Tensor::F32(array(x.shape(), out))])
}

fn output_type(cx: &OpCtx, zp: Option<&Tensor>) -> Result<DataType, EvalError> {
    if let Some(z) = zp {
        return Ok(z.dtype());
    }
    Ok(match cx.int_attr("output_dtype", 0)? {
        0 | 2 => DataType::U8,
        3 => DataType::I8,
        4 => DataType::U16,
        5 => DataType::I16,
        21 => DataType::U4,
        22 => DataType::I4,
        t => return cx.err(format!("output_dtype {t} is not implemented")),
    })
}

pub fn quantize_linear(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, i, 0)?;
    let scale_t = input(cx, i, 1)?;
    let xs = f32_values(cx, x, "the input")?;
    let scales = f32_values(cx, scale_t, "the scale")?;
    let zp_t = i.get(2).copied().flatten();
    let target = output_type(cx, zp_t)?;
    let Some((lo, hi)) = target.int_range().filter(|_| {
        !matches!(
            target,
            DataType::I32 | DataType::U32 | DataType::I64 | DataType::U64
        )
    }) else {
        return cx.err(format!("quantizing to {target} is not implemented"));
    };
    let zps = zero_points(cx, zp_t, scales.len())?;
    let index = ScaleIndex::new(cx, x.shape(), scale_t.shape())?;
    let blocked = cx.int_attr("block_size", 0)? > 0;
    let (lo, hi) = (lo as f64, hi as f64);
    let q: Vec<i128> = xs
        .iter()
        .enumerate()
        .map(|(e, &v)| {
            let k = index.of(e, blocked);
            // f32 division, then round half to even, as the ONNX reference.
            let r = round_half_even(v / scales[k]) as f64 + zps[k] as f64;
            (if r.is_nan() {
                zps[k] as f64
            } else {
                r.clamp(lo, hi)
            }) as i128
        })
        .collect();
    let shape = x.shape();
    Ok(vec![match target {
        DataType::I4 | DataType::U4 => {
            let small: Vec<i8> = q.iter().map(|&v| v as i8).collect();
            Tensor::Packed(
                PackedTensor::from_sub_byte_ints(target, shape, &small).map_err(|e| {
                    EvalError::Op {
                        node: cx.describe(),
                        message: e.to_string(),
                    }
                })?,
            )
        }
        _ => Tensor::from_ints(target, shape, &q).map_err(|e| EvalError::Op {
            node: cx.describe(),
            message: e.to_string(),
        })?,
    }])
}

/// Node metadata naming how a QuantizeLinear passes gradient to its scale
/// in training: `lsq` (the default) or `pact`.
pub const SCALE_GRADIENT_KEY: &str = "qgraph.train.scale_gradient";

/// A scale's gradient summed per scale element.
fn scale_gradient(
    shape: &[usize],
    index: &ScaleIndex,
    blocked: bool,
    scale_shape: &[usize],
    per_element: impl Fn(usize) -> f32,
) -> Tensor {
    let mut sums = vec![0f64; scale_shape.iter().product()];
    for e in 0..shape.iter().product::<usize>() {
        sums[index.of(e, blocked)] += per_element(e) as f64;
    }
    let sums: Vec<f32> = sums.into_iter().map(|v| v as f32).collect();
    Tensor::F32(array(scale_shape, sums))
}

/// QuantizeLinear's gradient, treating its integer output as real: the
/// rounding passes gradient straight through (STE) and saturation stops it,
/// so `dx = dq / s` where `x / s + z` lies on the grid's range. The scale's
/// gradient inside that range is `-dq x / s^2` (LSQ's, Esser et al. 2020:
/// with DequantizeLinear's `dq (q - z)` it sums to `round(x/s) - x/s`), or,
/// with `pact` in the node's metadata, `-dq (q - z) / s`, which cancels
/// DequantizeLinear's term inside the range (PACT, Choi et al. 2018: the
/// clipping level learns only from clipped values). Zero points get none.
pub fn quantize_linear_backward(
    cx: &OpCtx,
    g: &super::Grads,
) -> Result<Vec<Option<Tensor>>, EvalError> {
    let mut grads = vec![None; g.inputs.len()];
    if !g.wants(0) && !g.wants(1) {
        return Ok(grads);
    }
    let x = input(cx, g.inputs, 0)?;
    let scale_t = input(cx, g.inputs, 1)?;
    let xs = f32_values(cx, x, "the input")?;
    let scales = f32_values(cx, scale_t, "the scale")?;
    let zp_t = g.inputs.get(2).copied().flatten();
    let target = output_type(cx, zp_t)?;
    let Some((lo, hi)) = target.int_range() else {
        return cx.err(format!("quantizing to {target} is not implemented"));
    };
    let zps = zero_points(cx, zp_t, scales.len())?;
    let q = match g.outputs.first().copied().flatten() {
        Some(t) => int_values(cx, t, "the output")?,
        None => return cx.err("the output was not kept for the backward pass"),
    };
    let d = g.d_output(cx, 0)?;
    let d = d.as_slice().expect("standard layout");
    let index = ScaleIndex::new(cx, x.shape(), scale_t.shape())?;
    let blocked = cx.int_attr("block_size", 0)? > 0;
    let (lo, hi) = (lo as f32, hi as f32);
    let in_range = |e: usize| {
        let k = index.of(e, blocked);
        let r = xs[e] / scales[k] + zps[k] as f32;
        r >= lo && r <= hi
    };
    if g.wants(0) {
        let dx: Vec<f32> = (0..xs.len())
            .map(|e| {
                if in_range(e) {
                    d[e] / scales[index.of(e, blocked)]
                } else {
                    0.0
                }
            })
            .collect();
        grads[0] = Some(Tensor::F32(array(x.shape(), dx)));
    }
    if g.wants(1) {
        let meta = &cx.graph.node(cx.node).meta;
        let pact = meta
            .iter()
            .any(|(k, v)| k == SCALE_GRADIENT_KEY && v == "pact");
        grads[1] = Some(scale_gradient(
            x.shape(),
            &index,
            blocked,
            scale_t.shape(),
            |e| {
                if !in_range(e) {
                    return 0.0;
                }
                let k = index.of(e, blocked);
                let s = scales[k];
                if pact {
                    -d[e] * (q[e] - zps[k]) as f32 / s
                } else {
                    -d[e] * xs[e] / (s * s)
                }
            },
        ));
    }
    Ok(grads)
}

/// DequantizeLinear's gradient: `dq = dy s` for its (real-valued) integer
/// input, and `ds = dy (q - z)` summed per scale element.
pub fn dequantize_linear_backward(
    cx: &OpCtx,
    g: &super::Grads,
) -> Result<Vec<Option<Tensor>>, EvalError> {
    let mut grads = vec![None; g.inputs.len()];
    if !g.wants(0) && !g.wants(1) {
        return Ok(grads);
    }
    let x = input(cx, g.inputs, 0)?;
    let scale_t = input(cx, g.inputs, 1)?;
    let scales = f32_values(cx, scale_t, "the scale")?;
    let q = int_values(cx, x, "input")?;
    let zps = zero_points(cx, g.inputs.get(2).copied().flatten(), scales.len())?;
    let d = g.d_output(cx, 0)?;
    let ds = d.as_slice().expect("standard layout");
    let index = ScaleIndex::new(cx, x.shape(), scale_t.shape())?;
    let blocked = cx.int_attr("block_size", 0)? > 0;
    if g.wants(0) {
        let dq: Vec<f32> = (0..q.len())
            .map(|e| ds[e] * scales[index.of(e, blocked)])
            .collect();
        grads[0] = Some(Tensor::F32(array(x.shape(), dq)));
    }
    if g.wants(1) {
        grads[1] = Some(scale_gradient(
            x.shape(),
            &index,
            blocked,
            scale_t.shape(),
            |e| {
                let k = index.of(e, blocked);
                ds[e] * (q[e] - zps[k]) as f32
            },
        ));
    }
    Ok(grads)
}

/// The training graph's fake quantization (domain `qgraph.train`): a
/// QuantizeLinear then DequantizeLinear on the integer range
/// `[qmin, qmax]` of attributes, which may be narrower than any storage
/// type (a 4-bit or 2-bit grid held in int8). The forward gives the bits of
/// the Q/DQ pair (with the Clip that holds a narrow grid's activations)
/// it stands for; `method` (`lsq` or `pact`) picks the scale's gradient.
///
/// With `clip_lo`/`clip_hi` it first clamps its input as the Relu or Clip
/// it took over did (one pass over memory instead of two, with the same
/// bits); `bypass = 1` leaves only that clamp (training before quant
/// delay ends).
pub fn fake_quantize(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let clip = Clamp::read(cx)?;
    if cx.int_attr("bypass", 0)? != 0 {
        let a = f32_input(cx, i, 0)?;
        return Ok(vec![Tensor::F32(a.mapv(|v| clip.apply(v)))]);
    }
    let fq = FakeQuant::read(cx, i)?;
    let mut out = vec![0f32; fq.x.len()];
    let run = fq.run_length();
    out.par_chunks_mut(run)
        .zip(fq.x.par_chunks(run))
        .enumerate()
        .for_each(|(c, (dst, src))| {
            if fq.blocked {
                for (e, (d, &x)) in dst.iter_mut().zip(src).enumerate() {
                    let k = fq.scale_of(c, run, e);
                    let (s, z) = (fq.scales[k], fq.zps[k] as f32);
                    *d = (fq.level(clip.apply(x), s, z) - z) * s;
                }
                return;
            }
            // One scale for the whole run: a loop the compiler vectorises.
            let k = fq.scale_of(c, run, 0);
            let (s, z) = (fq.scales[k], fq.zps[k] as f32);
            for (d, &x) in dst.iter_mut().zip(src) {
                *d = (fq.level(clip.apply(x), s, z) - z) * s;
            }
        });
    Ok(vec![Tensor::F32(array(&fq.shape, out))])
}

/// The clamp a FakeQuantize applies first (attributes `clip_lo`,
/// `clip_hi`; `clip_lo_open = 1` for a Relu, whose gradient is 0 at 0).
#[derive(Clone, Copy)]
struct Clamp {
    lo: f32,
    hi: f32,
    lo_open: bool,
}

impl Clamp {
    fn read(cx: &OpCtx) -> Result<Clamp, EvalError> {
        Ok(Clamp {
            lo: cx.float_attr("clip_lo", f32::NEG_INFINITY)?,
            hi: cx.float_attr("clip_hi", f32::INFINITY)?,
            lo_open: cx.int_attr("clip_lo_open", 0)? != 0,
        })
    }

    /// As the Relu and Clip kernels clamp (NaN becomes the lower bound).
    #[inline(always)]
    fn apply(self, x: f32) -> f32 {
        super::pointwise::clamp(x, self.lo, self.hi)
    }

    /// Whether the clamp passes the gradient at `x`, as Relu's and Clip's
    /// backward kernels decide.
    #[inline(always)]
    fn passes(self, x: f32) -> bool {
        let above = if self.lo_open {
            x > self.lo
        } else {
            x >= self.lo
        };
        above && x <= self.hi
    }
}

/// FakeQuantize's gradient, the straight-through estimator with clipping:
/// `dx = dy` where `x / s + z` lies in `[qmin, qmax]`, else 0. The scale's
/// (summed per scale element): LSQ's `round(x/s) - x/s` inside the range
/// and `qmin - z` / `qmax - z` outside (Esser et al. 2020, eq. 3), or
/// PACT's, the same with 0 inside (Choi et al. 2018, eq. 3).
pub fn fake_quantize_backward(
    cx: &OpCtx,
    g: &super::Grads,
) -> Result<Vec<Option<Tensor>>, EvalError> {
    let mut grads = vec![None; g.inputs.len()];
    if !g.wants(0) && !g.wants(1) {
        return Ok(grads);
    }
    let clip = Clamp::read(cx)?;
    // The output's gradient, owned: masked in place into the input's.
    let mut d = g.d_output(cx, 0)?;
    if cx.int_attr("bypass", 0)? != 0 {
        if g.wants(0) {
            let a = f32_input(cx, g.inputs, 0)?;
            d.zip_mut_with(a, |d, &x| {
                if !clip.passes(x) {
                    *d = 0.0;
                }
            });
            grads[0] = Some(Tensor::F32(d));
        }
        return Ok(grads);
    }
    let fq = FakeQuant::read(cx, g.inputs)?;
    let pact = cx.string_attr("method", "lsq")? == "pact";
    let run = fq.run_length();
    let (qmin, qmax) = (fq.qmin as f32, fq.qmax as f32);
    if g.wants(1) {
        let ds = d.as_slice().expect("standard layout");
        // Per chunk, sums per scale element; then the chunks in order.
        let count = fq.scales.len();
        let partial: Vec<Vec<f64>> =
            fq.x.par_chunks(run)
                .zip(ds.par_chunks(run))
                .enumerate()
                .map(|(c, (xs, dys))| {
                    let mut sums = vec![0f64; count];
                    for (e, (&x, &dy)) in xs.iter().zip(dys).enumerate() {
                        let k = fq.scale_of(c, run, e);
                        let (s, z) = (fq.scales[k], fq.zps[k] as f32);
                        let x = clip.apply(x);
                        let r = x / s + z;
                        let step = if r < qmin || r > qmax {
                            fq.level(x, s, z) - z
                        } else if pact {
                            0.0
                        } else {
                            fq.level(x, s, z) - z - x / s
                        };
                        sums[k] += (dy * step) as f64;
                    }
                    sums
                })
                .collect();
        let mut sums = vec![0f64; count];
        for p in partial {
            for (t, v) in sums.iter_mut().zip(p) {
                *t += v;
            }
        }
        let sums: Vec<f32> = sums.into_iter().map(|v| v as f32).collect();
        grads[1] = Some(Tensor::F32(array(&fq.scale_shape, sums)));
    }
    if g.wants(0) {
        let ds = d.as_slice_mut().expect("standard layout");
        ds.par_chunks_mut(run)
            .zip(fq.x.par_chunks(run))
            .enumerate()
            .for_each(|(c, (dys, xs))| {
                let inside = |x: f32, k: usize| {
                    let r = clip.apply(x) / fq.scales[k] + fq.zps[k] as f32;
                    r >= qmin && r <= qmax && clip.passes(x)
                };
                if fq.blocked {
                    for (e, (d, &x)) in dys.iter_mut().zip(xs).enumerate() {
                        if !inside(x, fq.scale_of(c, run, e)) {
                            *d = 0.0;
                        }
                    }
                    return;
                }
                // One scale for the whole run.
                let k = fq.scale_of(c, run, 0);
                for (d, &x) in dys.iter_mut().zip(xs) {
                    if !inside(x, k) {
                        *d = 0.0;
                    }
                }
            });
        grads[0] = Some(Tensor::F32(d));
    }
    Ok(grads)
}

/// A FakeQuantize node's operands.
struct FakeQuant<'a> {
    /// The input's elements in order: borrowed when its memory is.
    x: std::borrow::Cow<'a, [f32]>,
    shape: Vec<usize>,
    scales: Vec<f32>,
    scale_shape: Vec<usize>,
    zps: Vec<i64>,
    qmin: i64,
    qmax: i64,
    index: ScaleIndex,
    blocked: bool,
}

impl<'a> FakeQuant<'a> {
    fn read(cx: &OpCtx, i: &[Option<&'a Tensor>]) -> Result<FakeQuant<'a>, EvalError> {
        let x = input(cx, i, 0)?;
        let scale_t = input(cx, i, 1)?;
        let scales = f32_values(cx, scale_t, "the scale")?;
        let zps = zero_points(cx, i.get(2).copied().flatten(), scales.len())?;
        let (qmin, qmax) = (cx.int_attr("qmin", -128)?, cx.int_attr("qmax", 127)?);
        if qmin > qmax {
            return cx.err(format!("the grid [{qmin}, {qmax}] is empty"));
        }
        let a = f32_input(cx, i, 0)?;
        let x_values = match a.as_slice() {
            Some(s) => std::borrow::Cow::Borrowed(s),
            None => std::borrow::Cow::Owned(a.iter().copied().collect()),
        };
        Ok(FakeQuant {
            x: x_values,
            shape: x.shape().to_vec(),
            index: ScaleIndex::new(cx, x.shape(), scale_t.shape())?,
            blocked: cx.int_attr("block_size", 0)? > 0,
            scale_shape: scale_t.shape().to_vec(),
            scales,
            zps,
            qmin,
            qmax,
        })
    }

    /// Elements per run of one scale: a per-axis scale's inner size, or
    /// parallel chunks of a per-tensor one (1 for blocked scales).
    fn run_length(&self) -> usize {
        if self.index.per_tensor {
            1 << 14
        } else if self.blocked {
            1
        } else {
            self.index.inner.max(1)
        }
    }

    /// The scale index of element `e` of run `c`.
    #[inline(always)]
    fn scale_of(&self, c: usize, run: usize, e: usize) -> usize {
        if self.index.per_tensor {
            0
        } else if self.blocked {
            self.index.of(c * run + e, true)
        } else {
            c % self.index.axis_dim
        }
    }

    /// The integer level of `x` on this grid, as QuantizeLinear computes it
    /// (f32 division, round half to even, saturation; NaN gives the zero
    /// point); exact in f32, as levels are small integers. Quotients are
    /// first limited to +-2^22, which saturates them the same way and lets
    /// the rounding go without a branch.
    #[inline(always)]
    fn level(&self, x: f32, s: f32, z: f32) -> f32 {
        let v = (x / s).clamp(-SMALL_ROUNDING_LIMIT, SMALL_ROUNDING_LIMIT);
        let r = round_small_half_even(v) + z;
        let q = r.clamp(self.qmin as f32, self.qmax as f32);
        if q.is_nan() {
            z
        } else {
            q
        }
    }
}

/// DoReFa's weight normalisation (Zhou et al. 2016, eq. 9), a training op
/// (domain `qgraph.train`): `y = scale tanh(v) / max |tanh(v)|` over the
/// whole tensor, so the quantizer after it sees values in
/// `[-scale, scale]` with the largest at an end, and the latent `v` is
/// what trains.
pub fn tanh_normalize(cx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let v = input(cx, i, 0)?;
    let t = f32_values(cx, v, "the input")?;
    let scale = cx.float_attr("scale", 1.0)?;
    let tanh: Vec<f32> = t.iter().map(|v| v.tanh()).collect();
    let largest = tanh.iter().fold(0f32, |m, t| m.max(t.abs()));
    let factor = if largest > 0.0 { scale / largest } else { 0.0 };
    let y: Vec<f32> = tanh.iter().map(|t| t * factor).collect();
    Ok(vec![Tensor::F32(array(v.shape(), y))])
}

/// TanhNormalize's gradient: with `t = tanh(v)` and `M = max |t|` at
/// element `m`, `dv_j = scale (1 - t_j^2) dy_j / M`, and at `m` also
/// `- scale (1 - t_m^2) sign(t_m) sum_i dy_i t_i / M^2` (the maximum moves
/// with `v_m`).
pub fn tanh_normalize_backward(
    cx: &OpCtx,
    g: &super::Grads,
) -> Result<Vec<Option<Tensor>>, EvalError> {
    let mut grads = vec![None; g.inputs.len()];
    if !g.wants(0) {
        return Ok(grads);
    }
    let v = input(cx, g.inputs, 0)?;
    let t: Vec<f32> = f32_values(cx, v, "the input")?
        .iter()
        .map(|v| v.tanh())
        .collect();
    let scale = cx.float_attr("scale", 1.0)?;
    let d = g.d_output(cx, 0)?;
    let dy = d.as_slice().expect("standard layout");
    // The first largest |t|, as the forward's fold finds it.
    let (argmax, largest) =
        t.iter().enumerate().fold(
            (0, 0f32),
            |(k, m), (i, t)| if t.abs() > m { (i, t.abs()) } else { (k, m) },
        );
    let mut dv = vec![0f32; t.len()];
    if largest > 0.0 {
        for ((dv, &t), &dy) in dv.iter_mut().zip(&t).zip(dy) {
            *dv = scale * (1.0 - t * t) * dy / largest;
        }
        let weighted: f64 = t.iter().zip(dy).map(|(&t, &d)| (t * d) as f64).sum();
        let tm = t[argmax];
        dv[argmax] -= (scale as f64 * (1.0 - (tm * tm) as f64) * tm.signum() as f64 * weighted
            / (largest as f64 * largest as f64)) as f32;
    }
    grads[0] = Some(Tensor::F32(array(v.shape(), dv)));
    Ok(grads)
}
