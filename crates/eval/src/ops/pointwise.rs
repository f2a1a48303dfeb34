//! Operators that map each element on its own, possibly with a per-channel
//! parameter: activations and inference batch normalization.
//!
//! Each is first turned into a [`Pointwise`], and one function applies it,
//! whether the operator runs as its own node or as the epilogue of the
//! convolution before it (see `Evaluator`'s plan). Both paths therefore give
//! the same bits: fusing saves memory traffic, never changes a result.

use super::{array, f32_input};
use crate::{EvalError, OpCtx};
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
            Pointwise::Relu => xs.iter_mut().for_each(|x| *x = x.max(0.0)),
            Pointwise::Clip { lo, hi } => xs.iter_mut().for_each(|x| *x = x.max(*lo).min(*hi)),
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

/// Maps applied in order to values of one channel, as a `pulp` operation:
/// compiled once per vector unit and chosen at run time (the values do not
/// depend on the unit: no fused multiply-add is formed).
pub struct Epilogue<'a> {
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
        apply_maps(self.maps, self.channel, self.data, self.added);
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
                        channel: plane % c,
                        data: xs,
                        added: None,
                    })
                });
        }
        None => data.par_chunks_mut(1 << 14).for_each(|xs| {
            simd.dispatch(Epilogue {
                maps: std::slice::from_ref(&map),
                channel: 0,
                data: xs,
                added: None,
            })
        }),
    }
    Ok(vec![Tensor::F32(array(x.shape(), data))])
}
