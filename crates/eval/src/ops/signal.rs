//! Signal processing: DFT (opset 17's axis attribute, opset 20's axis
//! input), STFT, the Hann, Hamming and Blackman windows, and
//! MelWeightMatrix.
//!
//! Transforms run through `rustfft` (any length: mixed radix, Rader and
//! Bluestein for primes) in f64 for every input type, rounded back to the
//! input's type: the spectra of f32 signals keep their small bins, which an
//! f32 transform would bury under the large ones' rounding.

use super::typed::Number;
use super::{array, input, ints_of, Kernel};
use crate::{EvalError, OpCtx};
use qgraph_ir::half::{bf16, f16};
use qgraph_ir::{DataType, Tensor};
use rustfft::num_complex::Complex;
use rustfft::FftPlanner;

pub const KERNELS: &[(&str, Kernel)] = &[
    ("DFT", dft),
    ("STFT", stft),
    ("HannWindow", hann_window),
    ("HammingWindow", hamming_window),
    ("BlackmanWindow", blackman_window),
    ("MelWeightMatrix", mel_weight_matrix),
];

/// The most elements an output or work buffer may have.
const MAX_ELEMENTS: usize = 1 << 32;

fn checked_size(cx: &OpCtx, sizes: &[usize]) -> Result<usize, EvalError> {
    sizes
        .iter()
        .try_fold(1usize, |acc, &s| acc.checked_mul(s))
        .filter(|&n| n <= MAX_ELEMENTS)
        .map_or_else(
            || cx.err(format!("a buffer of {sizes:?} elements is too large")),
            Ok,
        )
}

/// A float tensor's values in logical order, as f64.
fn float_values(cx: &OpCtx, t: &Tensor, what: &str) -> Result<Vec<f64>, EvalError> {
    Ok(match t {
        Tensor::F32(a) => a.iter().map(|&v| v as f64).collect(),
        Tensor::F64(a) => a.iter().copied().collect(),
        Tensor::F16(a) => a.iter().map(|v| v.to_f64()).collect(),
        Tensor::BF16(a) => a.iter().map(|v| v.to_f64()).collect(),
        other => {
            return cx.err(format!(
                "{what} is {}, which this operator does not take (it takes floats)",
                other.dtype()
            ))
        }
    })
}

/// Values computed in f64 as a tensor of the float type `dtype`.
fn float_tensor(shape: &[usize], values: Vec<f64>, dtype: DataType) -> Tensor {
    match dtype {
        DataType::F64 => Tensor::F64(array(shape, values)),
        DataType::F16 => Tensor::F16(array(
            shape,
            values.into_iter().map(f16::from_f64).collect(),
        )),
        DataType::BF16 => Tensor::BF16(array(
            shape,
            values.into_iter().map(bf16::from_f64).collect(),
        )),
        _ => Tensor::F32(array(shape, values.into_iter().map(|v| v as f32).collect())),
    }
}

/// Values computed in f64 as a tensor of the ONNX type `code` (a numeric
/// type, rounded or truncated as a cast does).
fn typed_tensor(
    cx: &OpCtx,
    code: i64,
    shape: &[usize],
    values: &[f64],
) -> Result<Tensor, EvalError> {
    fn make<T: Number>(shape: &[usize], values: &[f64]) -> Tensor {
        T::wrap(array(
            shape,
            values.iter().map(|&v| T::from_f64(v)).collect(),
        ))
    }
    let dtype = i32::try_from(code).ok().and_then(DataType::from_onnx_code);
    Ok(match dtype {
        Some(DataType::F32) => make::<f32>(shape, values),
        Some(DataType::F64) => make::<f64>(shape, values),
        Some(DataType::F16) => make::<f16>(shape, values),
        Some(DataType::BF16) => make::<bf16>(shape, values),
        Some(DataType::I8) => make::<i8>(shape, values),
        Some(DataType::I16) => make::<i16>(shape, values),
        Some(DataType::I32) => make::<i32>(shape, values),
        Some(DataType::I64) => make::<i64>(shape, values),
        Some(DataType::U8) => make::<u8>(shape, values),
        Some(DataType::U16) => make::<u16>(shape, values),
        Some(DataType::U32) => make::<u32>(shape, values),
        Some(DataType::U64) => make::<u64>(shape, values),
        _ => {
            return cx.err(format!(
                "output_datatype {code} is not a numeric tensor type"
            ))
        }
    })
}

/// An integer input holding one value.
fn int_scalar(cx: &OpCtx, t: &Tensor, what: &str) -> Result<i64, EvalError> {
    match ints_of(cx, t, what)?.as_slice() {
        [v] => Ok(*v),
        other => cx.err(format!(
            "{what} must hold one value, found {} values",
            other.len()
        )),
    }
}

/// A float input holding one value.
fn float_scalar(cx: &OpCtx, t: &Tensor, what: &str) -> Result<f64, EvalError> {
    match float_values(cx, t, what)?.as_slice() {
        [v] => Ok(*v),
        other => cx.err(format!(
            "{what} must hold one value, found {} values",
            other.len()
        )),
    }
}

/// A length input (at least `min`), as usize.
fn length_scalar(cx: &OpCtx, t: &Tensor, what: &str, min: i64) -> Result<usize, EvalError> {
    let v = int_scalar(cx, t, what)?;
    if v < min {
        return cx.err(format!("{what} must be at least {min}, found {v}"));
    }
    match usize::try_from(v) {
        Ok(v) if v <= MAX_ELEMENTS => Ok(v),
        _ => cx.err(format!("{what} {v} is too large")),
    }
}

/// Transforms each `n`-long chunk of `buffer` in place (unnormalised).
fn transform(buffer: &mut [Complex<f64>], n: usize, inverse: bool) {
    if buffer.is_empty() || n == 0 {
        return;
    }
    let mut planner = FftPlanner::<f64>::new();
    let fft = if inverse {
        planner.plan_fft_inverse(n)
    } else {
        planner.plan_fft_forward(n)
    };
    fft.process(buffer);
}

fn dft(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let x = input(cx, inputs, 0)?;
    let shape = x.shape().to_vec();
    let rank = shape.len();
    if rank < 2 || !matches!(shape[rank - 1], 1 | 2) {
        return cx.err(format!(
            "input has shape {shape:?}; its last dimension (real, imaginary) must be 1 or 2"
        ));
    }
    let components = shape[rank - 1];
    let inverse = cx.int_attr("inverse", 0)? != 0;
    let onesided = cx.int_attr("onesided", 0)? != 0;
    // Opset 20 made the axis an input (default -2); before, an attribute
    // (default 1).
    let axis = if cx.opset >= 20 {
        match inputs.get(2).copied().flatten() {
            Some(t) => int_scalar(cx, t, "axis")?,
            None => -2,
        }
    } else {
        cx.int_attr("axis", 1)?
    };
    let r = rank as i64;
    let axis = if (0..=r - 2).contains(&axis) {
        axis as usize
    } else if (-r..=-2).contains(&axis) {
        (axis + r) as usize
    } else {
        return cx.err(format!(
            "axis {axis} is out of range for rank {rank} (the last dimension holds the components)"
        ));
    };
    let len = shape[axis];
    let irfft = inverse && onesided;
    let n = match inputs.get(1).copied().flatten() {
        Some(t) => length_scalar(cx, t, "dft_length", 1)?,
        None if irfft => {
            if len < 2 {
                return cx.err(format!(
                    "an inverse one-sided DFT of {len} bins needs dft_length"
                ));
            }
            2 * (len - 1)
        }
        None if len == 0 => return cx.err("the DFT axis is empty"),
        None => len,
    };
    let values = float_values(cx, x, "input")?;
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..rank - 1].iter().product();
    let out_len = if onesided && !inverse { n / 2 + 1 } else { n };
    let out_components = if irfft { 1 } else { 2 };
    checked_size(cx, &[outer, inner, n])?;
    checked_size(cx, &[outer, out_len, inner, out_components])?;

    let at = |o: usize, k: usize, i: usize| -> Complex<f64> {
        let base = ((o * len + k) * inner + i) * components;
        let im = if components == 2 {
            values[base + 1]
        } else {
            0.0
        };
        Complex::new(values[base], im)
    };
    let mut buffer = vec![Complex::new(0.0, 0.0); outer * inner * n];
    for o in 0..outer {
        for i in 0..inner {
            let signal = &mut buffer[(o * inner + i) * n..][..n];
            if irfft {
                // The full spectrum of a real signal from its first n/2 + 1
                // bins (missing ones zero); the real part of its inverse
                // drops the imaginary parts of the DC and Nyquist bins, as
                // numpy's irfft does.
                let bin = |k: usize| {
                    if k < len {
                        at(o, k, i)
                    } else {
                        Complex::new(0.0, 0.0)
                    }
                };
                let half = n / 2 + 1;
                for (k, v) in signal.iter_mut().enumerate() {
                    *v = if k < half { bin(k) } else { bin(n - k).conj() };
                }
            } else {
                for (k, v) in signal.iter_mut().enumerate().take(len) {
                    *v = at(o, k, i);
                }
            }
        }
    }
    transform(&mut buffer, n, inverse);
    let scale = if inverse { 1.0 / n as f64 } else { 1.0 };
    let mut out = vec![0.0; outer * out_len * inner * out_components];
    for o in 0..outer {
        for i in 0..inner {
            let spectrum = &buffer[(o * inner + i) * n..][..n];
            for (k, v) in spectrum.iter().enumerate().take(out_len) {
                let base = ((o * out_len + k) * inner + i) * out_components;
                out[base] = v.re * scale;
                if out_components == 2 {
                    out[base + 1] = v.im * scale;
                }
            }
        }
    }
    let mut out_shape = shape.clone();
    out_shape[axis] = out_len;
    out_shape[rank - 1] = out_components;
    Ok(vec![float_tensor(&out_shape, out, x.dtype())])
}

fn stft(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let signal = input(cx, inputs, 0)?;
    let shape = signal.shape().to_vec();
    if shape.len() != 3 || !matches!(shape[2], 1 | 2) {
        return cx.err(format!(
            "signal has shape {shape:?}, expected [batch, length, 1 or 2]"
        ));
    }
    let (batch, length, components) = (shape[0], shape[1], shape[2]);
    let step = length_scalar(cx, input(cx, inputs, 1)?, "frame_step", 1)?;
    let window = match inputs.get(2).copied().flatten() {
        None => None,
        Some(w) => {
            if w.dtype() != signal.dtype() {
                return cx.err(format!(
                    "window is {}, where the signal is {}",
                    w.dtype(),
                    signal.dtype()
                ));
            }
            if w.shape().len() != 1 {
                return cx.err(format!("window must be 1-D, found shape {:?}", w.shape()));
            }
            Some(float_values(cx, w, "window")?)
        }
    };
    let frame_length = match inputs.get(3).copied().flatten() {
        Some(t) => Some(length_scalar(cx, t, "frame_length", 1)?),
        None => None,
    };
    let frame = match (frame_length, &window) {
        (Some(f), Some(w)) if w.len() != f => {
            return cx.err(format!(
                "frame_length is {f}, but the window has {} values",
                w.len()
            ))
        }
        (Some(f), _) => f,
        (None, Some(w)) => w.len(),
        (None, None) => length,
    };
    if frame == 0 || frame > length {
        return cx.err(format!(
            "frame length {frame} must be between 1 and the signal length {length}"
        ));
    }
    let onesided = cx.int_attr("onesided", 1)? != 0;
    let frames = (length - frame) / step + 1;
    let bins = if onesided { frame / 2 + 1 } else { frame };
    checked_size(cx, &[batch, frames, frame])?;
    let values = float_values(cx, signal, "signal")?;

    let mut buffer = vec![Complex::new(0.0, 0.0); batch * frames * frame];
    for b in 0..batch {
        for f in 0..frames {
            let chunk = &mut buffer[(b * frames + f) * frame..][..frame];
            for (k, v) in chunk.iter_mut().enumerate() {
                let base = (b * length + f * step + k) * components;
                let im = if components == 2 {
                    values[base + 1]
                } else {
                    0.0
                };
                let weight = window.as_ref().map_or(1.0, |w| w[k]);
                *v = Complex::new(values[base] * weight, im * weight);
            }
        }
    }
    transform(&mut buffer, frame, false);
    let mut out = Vec::with_capacity(batch * frames * bins * 2);
    for chunk in buffer.chunks_exact(frame) {
        for v in &chunk[..bins] {
            out.push(v.re);
            out.push(v.im);
        }
    }
    Ok(vec![float_tensor(
        &[batch, frames, bins, 2],
        out,
        signal.dtype(),
    )])
}

/// A window of the length input 0 asks for: `f(n, N)` at each n, where N
/// is the length (periodic) or the length less one (symmetric).
fn window(
    cx: &OpCtx,
    inputs: &[Option<&Tensor>],
    f: fn(f64, f64) -> f64,
) -> Result<Vec<Tensor>, EvalError> {
    let size = length_scalar(cx, input(cx, inputs, 0)?, "size", 0)?;
    let periodic = cx.int_attr("periodic", 1)? != 0;
    let code = cx.int_attr("output_datatype", 1)?;
    let period = if periodic {
        size
    } else {
        size.saturating_sub(1)
    };
    // A symmetric window of one point is that point, 1 (as numpy's and
    // torch's are), not 0/0.
    let values: Vec<f64> = (0..size)
        .map(|n| {
            if period == 0 {
                1.0
            } else {
                f(n as f64, period as f64)
            }
        })
        .collect();
    Ok(vec![typed_tensor(cx, code, &[size], &values)?])
}

fn hann_window(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    window(cx, inputs, |n, period| {
        (std::f64::consts::PI * n / period).sin().powi(2)
    })
}

fn hamming_window(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    window(cx, inputs, |n, period| {
        let alpha = 25.0 / 46.0;
        alpha - (n * std::f64::consts::PI * 2.0 / period).cos() * (1.0 - alpha)
    })
}

fn blackman_window(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    // Summed in the reference's order, so that the peak of a symmetric
    // window of odd length is exactly 1 (which matters to integer outputs).
    window(cx, inputs, |n, period| {
        let pi = std::f64::consts::PI;
        let y = (n * (pi * 2.0) / period).cos() * -0.5 + (n * (pi * 4.0) / period).cos() * 0.08;
        y + 0.42
    })
}

fn mel_weight_matrix(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let mel_bins = length_scalar(cx, input(cx, inputs, 0)?, "num_mel_bins", 0)?;
    let dft_length = length_scalar(cx, input(cx, inputs, 1)?, "dft_length", 1)?;
    let sample_rate = length_scalar(cx, input(cx, inputs, 2)?, "sample_rate", 1)?;
    let lower = float_scalar(cx, input(cx, inputs, 3)?, "lower_edge_hertz")?;
    let upper = float_scalar(cx, input(cx, inputs, 4)?, "upper_edge_hertz")?;
    let code = cx.int_attr("output_datatype", 1)?;
    let spectrogram_bins = dft_length / 2 + 1;
    checked_size(cx, &[spectrogram_bins, mel_bins])?;

    let hz_to_mel = |hz: f64| 2595.0 * (1.0 + hz / 700.0).log10();
    let mel_to_hz = |mel: f64| 700.0 * (10f64.powf(mel / 2595.0) - 1.0);
    let (low_mel, high_mel) = (hz_to_mel(lower), hz_to_mel(upper));
    // The band edges, as spectrogram bins: num_mel_bins + 2 points, spaced
    // by the range over their count (as the reference and ONNX Runtime do).
    let points = mel_bins + 2;
    let step = (high_mel - low_mel) / points as f64;
    let mut edges = Vec::with_capacity(points);
    for i in 0..points {
        let hz = mel_to_hz(low_mel + step * i as f64);
        let bin = ((dft_length + 1) as f64 * hz / sample_rate as f64).floor();
        if !(0.0..spectrogram_bins as f64).contains(&bin) {
            return cx.err(format!(
                "the band edge at {hz} Hz falls outside the {spectrogram_bins} spectrogram bins \
                 (check lower_edge_hertz {lower} and upper_edge_hertz {upper} against the \
                 sample rate {sample_rate})"
            ));
        }
        edges.push(bin as usize);
    }
    let mut out = vec![0.0; spectrogram_bins * mel_bins];
    for m in 0..mel_bins {
        let (low, center, high) = (edges[m], edges[m + 1], edges[m + 2]);
        if center == low {
            out[center * mel_bins + m] = 1.0;
        } else {
            for j in low..=center {
                out[j * mel_bins + m] = (j - low) as f64 / (center - low) as f64;
            }
        }
        if high > center {
            for j in center..high {
                out[j * mel_bins + m] = (high - j) as f64 / (high - center) as f64;
            }
        }
    }
    Ok(vec![typed_tensor(
        cx,
        code,
        &[spectrogram_bins, mel_bins],
        &out,
    )?])
}

#[cfg(test)]
// ONNX Runtime's values are written out to f32's round-trip precision.
#[allow(clippy::excessive_precision)]
mod tests {
    use super::*;
    use qgraph_ir::AttrValue;

    use crate::ops::run_test_op as run_op;

    fn f64s(t: &Tensor) -> (Vec<usize>, Vec<f64>) {
        match t {
            Tensor::F64(a) => (a.shape().to_vec(), a.iter().copied().collect()),
            other => panic!("expected f64, found {}", other.dtype()),
        }
    }

    fn assert_near(got: &[f64], want: &[f64], tolerance: f64) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tolerance, "element {i}: {g} vs {w}");
        }
    }

    fn scalar(v: i64) -> Tensor {
        Tensor::I64(array(&[], vec![v]))
    }

    /// [1, 2, 3, 4] as a real signal, [1, 4, 1].
    fn ramp() -> Tensor {
        Tensor::F64(array(&[1, 4, 1], vec![1.0, 2.0, 3.0, 4.0]))
    }

    #[test]
    fn dft_of_a_ramp_in_f64() {
        // Opset 17: the axis attribute (default 1).
        let out = run_op("DFT", 17, vec![], &[Some(&ramp())]).unwrap();
        let (shape, values) = f64s(&out[0]);
        assert_eq!(shape, [1, 4, 2]);
        assert_near(
            &values,
            &[10.0, 0.0, -2.0, 2.0, -2.0, 0.0, -2.0, -2.0],
            1e-12,
        );
        // Opset 20: the axis input (default -2), one-sided.
        let out = run_op(
            "DFT",
            20,
            vec![("onesided", AttrValue::Int(1))],
            &[Some(&ramp())],
        )
        .unwrap();
        let (shape, values) = f64s(&out[0]);
        assert_eq!(shape, [1, 3, 2]);
        assert_near(&values, &[10.0, 0.0, -2.0, 2.0, -2.0, 0.0], 1e-12);
        // dft_length pads with zeros: the DFT of [1, 2, 3, 4, 0, 0, 0, 0]
        // at bin 4 is 1 - 2 + 3 - 4.
        let out = run_op("DFT", 20, vec![], &[Some(&ramp()), Some(&scalar(8))]).unwrap();
        let (shape, values) = f64s(&out[0]);
        assert_eq!(shape, [1, 8, 2]);
        assert_near(&values[8..10], &[-2.0, 0.0], 1e-12);
        // An axis input in opset 20 is honoured; the last axis is refused.
        assert!(run_op("DFT", 20, vec![], &[Some(&ramp()), None, Some(&scalar(-1))]).is_err());
        assert!(run_op(
            "DFT",
            17,
            vec![("axis", AttrValue::Int(2))],
            &[Some(&ramp())]
        )
        .is_err());
    }

    #[test]
    fn inverse_transforms_undo_the_forward_ones() {
        let spectrum = run_op("DFT", 20, vec![], &[Some(&ramp())]).unwrap();
        let back = run_op(
            "DFT",
            20,
            vec![("inverse", AttrValue::Int(1))],
            &[Some(&spectrum[0])],
        )
        .unwrap();
        let (shape, values) = f64s(&back[0]);
        assert_eq!(shape, [1, 4, 2]);
        assert_near(&values, &[1.0, 0.0, 2.0, 0.0, 3.0, 0.0, 4.0, 0.0], 1e-12);
        // One-sided forward, then the inverse real transform (its default
        // length is 2 * (3 - 1) = 4).
        let half = run_op(
            "DFT",
            20,
            vec![("onesided", AttrValue::Int(1))],
            &[Some(&ramp())],
        )
        .unwrap();
        let real = run_op(
            "DFT",
            20,
            vec![
                ("onesided", AttrValue::Int(1)),
                ("inverse", AttrValue::Int(1)),
            ],
            &[Some(&half[0])],
        )
        .unwrap();
        let (shape, values) = f64s(&real[0]);
        assert_eq!(shape, [1, 4, 1]);
        assert_near(&values, &[1.0, 2.0, 3.0, 4.0], 1e-12);
    }

    #[test]
    fn f32_spectra_keep_their_small_bins() {
        // A constant signal: every bin but DC is exactly zero, which an f32
        // transform would leave as rounding noise of the large DC value.
        let signal = Tensor::F32(array(&[1, 10, 1], vec![1234.5; 10]));
        let out = run_op("DFT", 20, vec![], &[Some(&signal)]).unwrap();
        let Tensor::F32(y) = &out[0] else {
            panic!("an f32 output expected")
        };
        assert_eq!(y[[0, 0, 0]], 12345.0);
        assert!(y.iter().skip(2).all(|&v| v.abs() < 1e-9));
    }

    #[test]
    fn stft_frames_match_dfts_of_each_frame() {
        let signal = Tensor::F64(array(&[1, 6, 1], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
        let window = Tensor::F64(array(&[4], vec![0.0, 1.0, 1.0, 0.0]));
        let out = run_op(
            "STFT",
            17,
            vec![],
            &[Some(&signal), Some(&scalar(2)), Some(&window)],
        )
        .unwrap();
        let (shape, values) = f64s(&out[0]);
        // Frames [1 2 3 4] and [3 4 5 6], windowed to [0 2 3 0], [0 4 5 0];
        // bins 0..=2: sum, -i(x1) + -(x2)... written out:
        // X[k] = x1 e^{-iπk/2} + x2 e^{-iπk}.
        assert_eq!(shape, [1, 2, 3, 2]);
        assert_near(
            &values,
            &[
                5.0, 0.0, -3.0, -2.0, 1.0, 0.0, 9.0, 0.0, -5.0, -4.0, 1.0, 0.0,
            ],
            1e-12,
        );
        // frame_length disagreeing with the window, or longer than the
        // signal, is an error.
        assert!(run_op(
            "STFT",
            17,
            vec![],
            &[
                Some(&signal),
                Some(&scalar(2)),
                Some(&window),
                Some(&scalar(3))
            ]
        )
        .is_err());
        assert!(run_op(
            "STFT",
            17,
            vec![],
            &[Some(&signal), Some(&scalar(2)), None, Some(&scalar(7))]
        )
        .is_err());
        assert!(run_op("STFT", 17, vec![], &[Some(&signal), Some(&scalar(0))]).is_err());
    }

    #[test]
    fn windows_in_any_type() {
        let four = scalar(4);
        let hann = run_op("HannWindow", 17, vec![], &[Some(&four)]).unwrap();
        let Tensor::F32(h) = &hann[0] else {
            panic!("f32 by default")
        };
        let h: Vec<f32> = h.iter().copied().collect();
        assert!(h
            .iter()
            .zip([0.0, 0.5, 1.0, 0.5])
            .all(|(a, b)| (a - b).abs() < 1e-7));
        let f64_code = AttrValue::Int(11);
        let symmetric = run_op(
            "HammingWindow",
            17,
            vec![
                ("periodic", AttrValue::Int(0)),
                ("output_datatype", f64_code),
            ],
            &[Some(&scalar(3))],
        )
        .unwrap();
        let (_, hamming) = f64s(&symmetric[0]);
        assert_near(&hamming, &[4.0 / 46.0, 1.0, 4.0 / 46.0], 1e-15);
        // Integer outputs truncate, as a cast does: only the peak is 1.
        let ints = run_op(
            "BlackmanWindow",
            17,
            vec![
                ("periodic", AttrValue::Int(0)),
                ("output_datatype", AttrValue::Int(6)),
            ],
            &[Some(&scalar(5))],
        )
        .unwrap();
        let Tensor::I32(b) = &ints[0] else {
            panic!("int32 asked for")
        };
        assert_eq!(b.iter().copied().collect::<Vec<_>>(), [0, 0, 1, 0, 0]);
        assert!(run_op("HannWindow", 17, vec![], &[Some(&scalar(-1))]).is_err());
        assert!(run_op(
            "HannWindow",
            17,
            vec![("output_datatype", AttrValue::Int(9))],
            &[Some(&four)]
        )
        .is_err());
    }

    // MelWeightMatrix(8, 16, 8192, 0, 4096) from ONNX Runtime 1.32.
    // MEL [9, 8]
    const MEL: [f32; 72] = [
        1.00000000e+00,
        1.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        1.00000000e+00,
        1.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        1.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        1.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        1.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        1.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
        0.00000000e+00,
    ];

    #[test]
    fn mel_weight_matrix_matches_onnx_runtime() {
        let hertz = |v: f32| Tensor::F32(array(&[], vec![v]));
        let out = run_op(
            "MelWeightMatrix",
            17,
            vec![],
            &[
                Some(&scalar(8)),
                Some(&scalar(16)),
                Some(&scalar(8192)),
                Some(&hertz(0.0)),
                Some(&hertz(4096.0)),
            ],
        )
        .unwrap();
        let Tensor::F32(m) = &out[0] else {
            panic!("f32 by default")
        };
        assert_eq!(m.shape(), [9, 8]);
        assert_eq!(m.iter().copied().collect::<Vec<_>>(), MEL);
        // Band edges past the spectrum are an error, not an index out of
        // range.
        assert!(run_op(
            "MelWeightMatrix",
            17,
            vec![],
            &[
                Some(&scalar(8)),
                Some(&scalar(16)),
                Some(&scalar(8192)),
                Some(&hertz(0.0)),
                Some(&hertz(9000.0)),
            ],
        )
        .is_err());
    }
}
