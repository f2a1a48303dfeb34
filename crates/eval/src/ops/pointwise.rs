//! Operators that map each element on its own, possibly with a per-channel
//! parameter: activations and inference batch normalization.
//!
//! Each is first turned into a [`Pointwise`], and one function applies it,
//! whether the operator runs as its own node or as the epilogue of the
//! convolution before it (see `Evaluator`'s plan). Both paths therefore give
//! the same bits: fusing saves memory traffic, never changes a result.

use super::{array, f32_input};
use crate::{EvalError, OpCtx};
use qgraph_ir::ndarray::ArrayD;
use qgraph_ir::Tensor;
use rayon::prelude::*;

#[derive(Clone, Debug, PartialEq)]
pub enum Pointwise {
    Relu,
    Clip {
        lo: f32,
        hi: f32,
    },
    LeakyRelu {
        alpha: f32,
    },
    Sigmoid,
    HardSigmoid {
        alpha: f32,
        beta: f32,
    },
    HardSwish,
    Tanh,
    /// Inference BatchNormalization, `x * scale[c] + shift[c]` on axis 1.
    ChannelAffine {
        scale: Vec<f32>,
        shift: Vec<f32>,
    },
    /// An Add of another tensor of the output's shape (a residual
    /// connection). Only an epilogue has it: the tensor's values come with
    /// the data (see [`apply_maps`]).
    AddInput,
}

impl Pointwise {
    /// The channel count a per-channel map needs on axis 1.
    pub fn channels(&self) -> Option<usize> {
        match self {
            Pointwise::ChannelAffine { scale, .. } => Some(scale.len()),
            _ => None,
        }
    }

    /// Applies the map to `xs`, all of which belong to channel `channel`.
    #[inline(always)]
    pub fn apply(&self, channel: usize, xs: &mut [f32]) {
        match self {
            Pointwise::Relu => xs
                .iter_mut()
                .for_each(|x| *x = clamp(*x, 0.0, f32::INFINITY)),
            Pointwise::Clip { lo, hi } => xs.iter_mut().for_each(|x| *x = clamp(*x, *lo, *hi)),
            Pointwise::LeakyRelu { alpha } => xs
                .iter_mut()
                .for_each(|x| *x = if *x >= 0.0 { *x } else { alpha * *x }),
            Pointwise::Sigmoid => xs.iter_mut().for_each(|x| *x = 1.0 / (1.0 + (-*x).exp())),
            Pointwise::HardSigmoid { alpha, beta } => xs
                .iter_mut()
                .for_each(|x| *x = (alpha * *x + beta).clamp(0.0, 1.0)),
            Pointwise::HardSwish => xs
                .iter_mut()
                .for_each(|x| *x = *x * (*x / 6.0 + 0.5).clamp(0.0, 1.0)),
            Pointwise::Tanh => xs.iter_mut().for_each(|x| *x = x.tanh()),
            Pointwise::ChannelAffine { scale, shift } => {
                let (a, b) = (scale[channel], shift[channel]);
                xs.iter_mut().for_each(|x| *x = *x * a + b);
            }
            // Needs the added values: see apply_maps.
            Pointwise::AddInput => {}
        }
    }
}

/// `x` limited to `[lo, hi]`, NaN kept (as ONNX's reference, `np.clip` and
/// `np.maximum`, keeps it). Written as comparisons, each is one vector
/// instruction (`maxps(lo, x)`, `minps(hi, x)`), where `f32::max` needs three
/// to turn NaN into the bound.
#[inline(always)]
pub fn clamp(x: f32, lo: f32, hi: f32) -> f32 {
    let x = if x < lo { lo } else { x };
    if x > hi {
        hi
    } else {
        x
    }
}

/// Relu or Clip as a kernel applies it fused into its own output (the
/// training batch normalization, see `norm.rs`): the clamp, and where its
/// gradient passes, as [`backward`] decides it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Clamp {
    lo: f32,
    hi: f32,
    /// Relu's gradient stops at 0 itself; Clip's passes at its bounds.
    open_below: bool,
}

impl Clamp {
    pub fn relu() -> Clamp {
        Clamp {
            lo: 0.0,
            hi: f32::INFINITY,
            open_below: true,
        }
    }

    pub fn clip(lo: f32, hi: f32) -> Clamp {
        Clamp {
            lo,
            hi,
            open_below: false,
        }
    }

    /// The clamp of a Relu or Clip map; `None` for any other.
    pub fn of(map: &Pointwise) -> Option<Clamp> {
        match *map {
            Pointwise::Relu => Some(Clamp::relu()),
            Pointwise::Clip { lo, hi } => Some(Clamp::clip(lo, hi)),
            _ => None,
        }
    }

    #[inline(always)]
    pub fn value(self, x: f32) -> f32 {
        clamp(x, self.lo, self.hi)
    }

    /// 1 where the gradient passes at input `x`, else 0 (NaN: 0).
    #[inline(always)]
    pub fn slope(self, x: f32) -> f32 {
        let above = if self.open_below {
            x > self.lo
        } else {
            x >= self.lo
        };
        if above && x <= self.hi {
            1.0
        } else {
            0.0
        }
    }
}

/// Applies `maps` in order to `data`, all of channel `channel`; `added` is
/// the slice of the tensor an [`Pointwise::AddInput`] adds, aligned with
/// `data`. `x + y` is the Add kernel's own arithmetic (and commutes
/// exactly), so the fused Add gives its bits.
#[inline(always)]
pub fn apply_maps(maps: &[Pointwise], channel: usize, data: &mut [f32], added: Option<&[f32]>) {
    for map in maps {
        match (map, added) {
            (Pointwise::AddInput, Some(added)) => {
                let added = &added[..data.len()];
                data.iter_mut().zip(added).for_each(|(x, y)| *x += *y);
            }
            (Pointwise::AddInput, None) => panic!("an epilogue Add without its input"),
            (map, _) => map.apply(channel, data),
        }
    }
}

/// A channel's bias and maps as one function of each value, for the
/// common epilogues: `x + bias`, then `x * scale + shift` (inference
/// batch normalization), then a clamp (Clip; Relu is the clamp to
/// `[0, inf]`). Each step is the very
/// operation its own kernel performs, so one pass gives the bits of several.
#[derive(Clone, Copy, Debug)]
pub struct ValueMap {
    bias: Option<f32>,
    affine: Option<(f32, f32)>,
    clamp: Option<(f32, f32)>,
}

impl ValueMap {
    /// The map of `bias` then `maps` for channel `channel`, when they have
    /// that form.
    pub fn new(bias: Option<f32>, maps: &[Pointwise], channel: usize) -> Option<ValueMap> {
        let mut map = ValueMap {
            bias,
            affine: None,
            clamp: None,
        };
        let mut rest = maps;
        if let [Pointwise::ChannelAffine { scale, shift }, tail @ ..] = rest {
            map.affine = Some((*scale.get(channel)?, *shift.get(channel)?));
            rest = tail;
        }
        match rest {
            [] => {}
            [Pointwise::Relu] => map.clamp = Some((0.0, f32::INFINITY)),
            [Pointwise::Clip { lo, hi }] => map.clamp = Some((*lo, *hi)),
            _ => return None,
        }
        Some(map)
    }

    /// Calls `op` with this map compiled for its form: the branches on the
    /// form are taken once here, not per value.
    #[inline(always)]
    pub fn dispatch<Op: WithValueMap>(self, op: Op) -> Op::Output {
        let b = self.bias.unwrap_or(0.0);
        let (s, t) = self.affine.unwrap_or((1.0, 0.0));
        let (lo, hi) = self.clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
        match (
            self.bias.is_some(),
            self.affine.is_some(),
            self.clamp.is_some(),
        ) {
            (false, false, false) => op.run(Steps::<false, false, false> { b, s, t, lo, hi }),
            (false, false, true) => op.run(Steps::<false, false, true> { b, s, t, lo, hi }),
            (false, true, false) => op.run(Steps::<false, true, false> { b, s, t, lo, hi }),
            (false, true, true) => op.run(Steps::<false, true, true> { b, s, t, lo, hi }),
            (true, false, false) => op.run(Steps::<true, false, false> { b, s, t, lo, hi }),
            (true, false, true) => op.run(Steps::<true, false, true> { b, s, t, lo, hi }),
            (true, true, false) => op.run(Steps::<true, true, false> { b, s, t, lo, hi }),
            (true, true, true) => op.run(Steps::<true, true, true> { b, s, t, lo, hi }),
        }
    }
}

/// A function of each value, compiled for one form of [`ValueMap`].
pub trait MapValue: Copy {
    fn map(self, x: f32) -> f32;
}

/// What runs with a [`ValueMap`] compiled for its form.
pub trait WithValueMap {
    type Output;
    fn run<M: MapValue>(self, map: M) -> Self::Output;
}

/// The steps of a [`ValueMap`], those that are off removed at compile time.
#[derive(Clone, Copy)]
pub struct Steps<const BIAS: bool, const AFFINE: bool, const CLAMP: bool> {
    b: f32,
    s: f32,
    t: f32,
    lo: f32,
    hi: f32,
}

impl<const BIAS: bool, const AFFINE: bool, const CLAMP: bool> MapValue
    for Steps<BIAS, AFFINE, CLAMP>
{
    #[inline(always)]
    fn map(self, mut x: f32) -> f32 {
        if BIAS {
            x += self.b;
        }
        if AFFINE {
            x = x * self.s + self.t;
        }
        if CLAMP {
            x = clamp(x, self.lo, self.hi);
        }
        x
    }
}

/// A map that leaves values unchanged.
#[derive(Clone, Copy)]
pub struct Unchanged;

impl MapValue for Unchanged {
    #[inline(always)]
    fn map(self, x: f32) -> f32 {
        x
    }
}

/// Maps every value of a slice in place.
struct MapSlice<'a>(&'a mut [f32]);

impl WithValueMap for MapSlice<'_> {
    type Output = ();

    #[inline(always)]
    fn run<M: MapValue>(self, map: M) {
        self.0.iter_mut().for_each(|x| *x = map.map(*x));
    }
}

/// A bias, then maps applied in order, to values of one channel, as a
/// `pulp` operation: compiled once per vector unit and chosen at run time
/// (the values do not depend on the unit: no fused multiply-add is formed).
/// The common forms run as one pass (see [`ValueMap`]).
pub struct Epilogue<'a> {
    pub bias: Option<f32>,
    pub maps: &'a [Pointwise],
    pub channel: usize,
    pub data: &'a mut [f32],
    /// For [`Pointwise::AddInput`]: the added values, aligned with `data`.
    pub added: Option<&'a [f32]>,
}

impl pulp::WithSimd for Epilogue<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        match ValueMap::new(self.bias, self.maps, self.channel) {
            Some(map) => map.dispatch(MapSlice(self.data)),
            None => {
                if let Some(b) = self.bias {
                    self.data.iter_mut().for_each(|x| *x += b);
                }
                apply_maps(self.maps, self.channel, self.data, self.added);
            }
        }
    }
}

/// Whether `op` (default domain) is one of the maps above.
pub fn is_pointwise(op: &str) -> bool {
    matches!(
        op,
        "Relu"
            | "Clip"
            | "LeakyRelu"
            | "Sigmoid"
            | "HardSigmoid"
            | "HardSwish"
            | "Tanh"
            | "BatchNormalization"
    )
}

fn clip_bound(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    k: usize,
    default: f32,
) -> Result<f32, EvalError> {
    match inputs.get(k).copied().flatten() {
        None => Ok(default),
        Some(Tensor::F32(a)) if a.len() == 1 => Ok(a.iter().next().copied().unwrap_or(default)),
        Some(t) => cx.err(format!(
            "bound {k} must be an f32 scalar, found {}",
            t.dtype()
        )),
    }
}

/// The map of the node in `cx`, from its attributes and its inputs after
/// the first (`inputs[0]`, the data, is not read).
pub fn build(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Pointwise, EvalError> {
    let op = cx.graph.node(cx.node).op_type.as_str();
    Ok(match op {
        "Relu" => Pointwise::Relu,
        // Bounds are attributes before opset 11, optional inputs after.
        "Clip" if cx.opset < 11 => Pointwise::Clip {
            lo: cx.float_attr("min", f32::NEG_INFINITY)?,
            hi: cx.float_attr("max", f32::INFINITY)?,
        },
        "Clip" => Pointwise::Clip {
            lo: clip_bound(cx, inputs, 1, f32::NEG_INFINITY)?,
            hi: clip_bound(cx, inputs, 2, f32::INFINITY)?,
        },
        "LeakyRelu" => Pointwise::LeakyRelu {
            alpha: cx.float_attr("alpha", 0.01)?,
        },
        "Sigmoid" => Pointwise::Sigmoid,
        "HardSigmoid" => Pointwise::HardSigmoid {
            alpha: cx.float_attr("alpha", 0.2)?,
            beta: cx.float_attr("beta", 0.5)?,
        },
        "HardSwish" => Pointwise::HardSwish,
        "Tanh" => Pointwise::Tanh,
        "BatchNormalization" => {
            if cx.int_attr("training_mode", 0)? != 0 {
                return cx
                    .err("training_mode batch normalization is not evaluated (inference only)");
            }
            let eps = cx.float_attr("epsilon", 1e-5)?;
            let mut params = Vec::with_capacity(4);
            for k in 1..5 {
                let p = f32_input(cx, inputs, k)?;
                params.push(p.iter().copied().collect::<Vec<f32>>());
            }
            let c = params[0].len();
            if let Some(k) = (1..4).find(|&k| params[k].len() != c) {
                return cx.err(format!(
                    "input {} has {} values, the scale has {c}",
                    k + 1,
                    params[k].len()
                ));
            }
            let (gamma, beta, mean, var) = (&params[0], &params[1], &params[2], &params[3]);
            let scale: Vec<f32> = (0..c).map(|i| gamma[i] / (var[i] + eps).sqrt()).collect();
            let shift: Vec<f32> = (0..c).map(|i| beta[i] - mean[i] * scale[i]).collect();
            Pointwise::ChannelAffine { scale, shift }
        }
        other => return cx.err(format!("{other} is not an elementwise map")),
    })
}

/// The kernel of every operator above run as its own node.
pub fn kernel(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let map = build(cx, inputs)?;
    let x = f32_input(cx, inputs, 0)?;
    let mut data = cx.buffers.take(x.len());
    match x.as_slice() {
        Some(src) => data.copy_from_slice(src),
        None => data.iter_mut().zip(x.iter()).for_each(|(d, &v)| *d = v),
    }
    let simd = pulp::Arch::new();
    match map.channels() {
        Some(c) => {
            if x.ndim() < 2 || x.shape()[1] != c {
                return cx.err(format!(
                    "input of shape {:?} does not have {c} channels on axis 1",
                    x.shape()
                ));
            }
            let inner: usize = x.shape()[2..].iter().product();
            data.par_chunks_mut(inner.max(1))
                .enumerate()
                .for_each(|(plane, xs)| {
                    simd.dispatch(Epilogue {
                        maps: std::slice::from_ref(&map),
                        bias: None,
                        channel: plane % c,
                        data: xs,
                        added: None,
                    })
                });
        }
        None => data.par_chunks_mut(1 << 14).for_each(|xs| {
            simd.dispatch(Epilogue {
                maps: std::slice::from_ref(&map),
                bias: None,
                channel: 0,
                data: xs,
                added: None,
            })
        }),
    }
    Ok(vec![Tensor::F32(array(x.shape(), data))])
}

/// A Relu's gradient from its output `y` rather than its input (they are
/// positive at the same places, NaN included): `d` times 1 where `y > 0`,
/// else times 0, as [`backward`] multiplies.
pub fn relu_gradient_from_output(y: &ArrayD<f32>, d: &mut ArrayD<f32>) -> Result<(), &'static str> {
    if y.shape() != d.shape() {
        return Err("the gradient does not have the output's shape");
    }
    let y = y.as_standard_layout();
    let ys = y.as_slice().expect("standard layout");
    let ds = d
        .as_slice_mut()
        .ok_or("the gradient is not in standard layout")?;
    ds.par_chunks_mut(1 << 14)
        .zip(ys.par_chunks(1 << 14))
        .for_each(|(d, y)| {
            d.iter_mut()
                .zip(y)
                .for_each(|(d, &v)| *d *= Clamp::relu().slope(v))
        });
    Ok(())
}

/// The gradient of the activations above (BatchNormalization has its own,
/// in `norm`): the derivative at each input element times the output's
/// gradient. At a kink the side the forward's comparison takes is used
/// (Relu: 0 at 0; Clip passes its bounds, as PyTorch's clamp).
pub fn backward(cx: &OpCtx, g: &super::Grads) -> Result<Vec<Option<Tensor>>, EvalError> {
    let mut grads = vec![None; g.inputs.len()];
    if !g.wants(0) {
        return Ok(grads);
    }
    let map = build(cx, g.inputs)?;
    let x = f32_input(cx, g.inputs, 0)?.as_standard_layout();
    let mut d = g.d_output(cx, 0)?;
    let xs = x.as_slice().expect("standard layout");
    let ds = d.as_slice_mut().expect("standard layout");
    // One loop per map, so that each is compiled (and vectorised) alone.
    fn scale_by(ds: &mut [f32], xs: &[f32], derivative: impl Fn(f32) -> f32 + Sync) {
        ds.par_chunks_mut(1 << 14)
            .zip(xs.par_chunks(1 << 14))
            .for_each(|(d, x)| d.iter_mut().zip(x).for_each(|(d, &v)| *d *= derivative(v)));
    }
    match map {
        Pointwise::Relu => scale_by(ds, xs, |v| Clamp::relu().slope(v)),
        Pointwise::Clip { lo, hi } => {
            let clamp = Clamp::clip(lo, hi);
            scale_by(ds, xs, |v| clamp.slope(v))
        }
        Pointwise::LeakyRelu { alpha } => scale_by(ds, xs, |v| if v >= 0.0 { 1.0 } else { alpha }),
        Pointwise::Sigmoid => scale_by(ds, xs, |v| {
            let s = 1.0 / (1.0 + (-v).exp());
            s * (1.0 - s)
        }),
        Pointwise::HardSigmoid { alpha, beta } => scale_by(ds, xs, |v| {
            let t = alpha * v + beta;
            if t > 0.0 && t < 1.0 {
                alpha
            } else {
                0.0
            }
        }),
        Pointwise::HardSwish => scale_by(ds, xs, |v| {
            if v <= -3.0 {
                0.0
            } else if v >= 3.0 {
                1.0
            } else {
                v / 3.0 + 0.5
            }
        }),
        Pointwise::Tanh => scale_by(ds, xs, |v| 1.0 - v.tanh().powi(2)),
        Pointwise::ChannelAffine { .. } | Pointwise::AddInput => {}
    }
    grads[0] = Some(Tensor::F32(d));
    Ok(grads)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> Vec<f32> {
        let mut v: Vec<f32> = (0..203).map(|i| (i as f32 * 0.731).sin() * 9.0).collect();
        v.extend([
            f32::NAN,
            -0.0,
            0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            6.0,
            -1.0,
        ]);
        v
    }

    #[test]
    fn clip_and_relu_keep_nan_as_the_onnx_reference_does() {
        let mut xs = vec![f32::NAN, -2.0, 0.5, 9.0];
        Pointwise::Clip { lo: -1.0, hi: 6.0 }.apply(0, &mut xs);
        assert!(xs[0].is_nan());
        assert_eq!(&xs[1..], &[-1.0, 0.5, 6.0]);
        let mut xs = vec![f32::NAN, -2.0, 3.0];
        Pointwise::Relu.apply(0, &mut xs);
        assert!(xs[0].is_nan());
        assert_eq!(&xs[1..], &[0.0, 3.0]);
    }

    #[test]
    fn a_value_map_gives_the_bits_of_its_steps_one_by_one() {
        let affine = Pointwise::ChannelAffine {
            scale: vec![1.0, 0.37],
            shift: vec![0.0, -1.25],
        };
        let cases: Vec<(Option<f32>, Vec<Pointwise>)> = vec![
            (None, vec![]),
            (Some(0.3), vec![]),
            (None, vec![Pointwise::Relu]),
            (Some(-0.7), vec![affine.clone()]),
            (
                Some(0.1),
                vec![affine.clone(), Pointwise::Clip { lo: 0.0, hi: 6.0 }],
            ),
            (None, vec![affine.clone(), Pointwise::Relu]),
        ];
        for (bias, maps) in cases {
            let map = ValueMap::new(bias, &maps, 1).expect("a common form");
            let mut fused = values();
            map.dispatch(MapSlice(&mut fused));
            let mut steps = values();
            if let Some(b) = bias {
                steps.iter_mut().for_each(|x| *x += b);
            }
            apply_maps(&maps, 1, &mut steps, None);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fused), bits(&steps), "{bias:?} {maps:?}");
        }
        assert!(ValueMap::new(None, &[Pointwise::Sigmoid], 0).is_none());
        assert!(ValueMap::new(None, &[Pointwise::AddInput], 0).is_none());
    }
}
