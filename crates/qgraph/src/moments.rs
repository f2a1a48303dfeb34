//! The second moments `E[x x^T]` of the input vectors of weighted ops,
//! gathered during calibration for output-aware weight rounding
//! (`qgraph_quant::rounding`).
//!
//! An input vector is what one output value of one channel reads: the
//! im2col patch (channels of one group x kernel rows x kernel columns, in
//! the weight's own order) of a 2-D convolution at one output pixel, or a
//! row of a Gemm/MatMul's data input. Each batch's vectors are gathered
//! into a matrix and summed as one matrix product (in f32, added into the
//! f64 running sum per batch).

use ndarray::{Array2, ArrayView2};
use qgraph_ir::{AttrValue, Graph, NodeId};
use qgraph_quant::rounding::SecondMoment;

/// At most this many output pixels per image feed a convolution's moments,
/// evenly spaced (a 112x112 plane has 12544): neighbouring pixels add
/// little that their neighbours did not, and the products stay a small
/// part of calibration.
const PIXELS_PER_IMAGE: usize = 1024;

/// Moments come from at most this many calibration samples, spread evenly
/// over them: GPTQ's estimate of `E[x x^T]` needs far fewer samples than
/// activation ranges do (its paper calibrates on 128), and the products
/// cost more than the forward pass.
pub const MOMENT_SAMPLES: usize = 64;

/// How a weighted op reads its data input.
#[derive(Clone, Debug, PartialEq)]
pub enum Reader {
    /// A 2-D convolution (NCHW input, weight `[M, C/groups, kh, kw]`).
    Conv2d {
        groups: usize,
        channels_per_group: usize,
        kernel: [usize; 2],
        strides: [usize; 2],
        dilations: [usize; 2],
        /// pads as ONNX writes them: top, left, bottom, right; `None` for
        /// SAME_UPPER / SAME_LOWER, resolved per input size.
        pads: Option<[usize; 4]>,
        same_lower: bool,
    },
    /// Rows of length `k` (Gemm without transA; MatMul with a 2-D weight).
    Rows { k: usize },
}

impl Reader {
    /// How `node` reads its input 0, given its weight's shape; `None` when
    /// the rounding does not cover it (other ranks, transposed inputs).
    pub fn of(g: &Graph, node: NodeId, weight: &[usize]) -> Option<Reader> {
        let n = g.node(node);
        let ints = |name: &str| match n.attr(name) {
            Some(AttrValue::Ints(v)) => Some(v.clone()),
            _ => None,
        };
        let int = |name: &str, default: i64| match n.attr(name) {
            Some(AttrValue::Int(v)) => *v,
            _ => default,
        };
        let pair = |name: &str| -> Option<[usize; 2]> {
            match ints(name) {
                None => Some([1, 1]),
                Some(v) if v.len() == 2 && v.iter().all(|&x| x >= 1) => {
                    Some([v[0] as usize, v[1] as usize])
                }
                Some(_) => None,
            }
        };
        match n.op_type.as_str() {
            "Conv" if weight.len() == 4 => {
                let groups = int("group", 1);
                if groups < 1 {
                    return None;
                }
                let (pads, same_lower) = match n.attr("auto_pad") {
                    Some(AttrValue::String(s)) if s.as_slice() == b"SAME_UPPER" => (None, false),
                    Some(AttrValue::String(s)) if s.as_slice() == b"SAME_LOWER" => (None, true),
                    Some(AttrValue::String(s))
                        if s.as_slice() != b"NOTSET" && s.as_slice() != b"VALID" =>
                    {
                        return None
                    }
                    _ => match ints("pads") {
                        None => (Some([0; 4]), false),
                        Some(p) if p.len() == 4 && p.iter().all(|&x| x >= 0) => (
                            Some([p[0] as usize, p[1] as usize, p[2] as usize, p[3] as usize]),
                            false,
                        ),
                        Some(_) => return None,
                    },
                };
                Some(Reader::Conv2d {
                    groups: groups as usize,
                    channels_per_group: weight[1],
                    kernel: [weight[2], weight[3]],
                    strides: pair("strides")?,
                    dilations: pair("dilations")?,
                    pads,
                    same_lower,
                })
            }
            "Gemm" if weight.len() == 2 && int("transA", 0) == 0 => {
                let k = if int("transB", 0) != 0 {
                    weight[1]
                } else {
                    weight[0]
                };
                Some(Reader::Rows { k })
            }
            "MatMul" if weight.len() == 2 => Some(Reader::Rows { k: weight[0] }),
            _ => None,
        }
    }

    /// One moment per group, empty.
    pub fn moments(&self) -> Vec<SecondMoment> {
        match self {
            Reader::Conv2d {
                groups,
                channels_per_group,
                kernel,
                ..
            } => vec![SecondMoment::new(channels_per_group * kernel[0] * kernel[1]); *groups],
            Reader::Rows { k } => vec![SecondMoment::new(*k)],
        }
    }

    /// Adds the input vectors of the samples `images` (indices along axis
    /// 0) of one batch (`x` of `shape`) to `moments`. Returns false (adding
    /// nothing) when the shape does not fit.
    pub fn observe(
        &self,
        shape: &[usize],
        x: &[f32],
        images: &[usize],
        moments: &mut [SecondMoment],
    ) -> bool {
        let n = shape.first().copied().unwrap_or(0);
        if images.iter().any(|&i| i >= n) {
            return false;
        }
        match self {
            Reader::Rows { k } => {
                let k = *k;
                if shape.len() < 2 || shape.last() != Some(&k) || x.is_empty() {
                    return false;
                }
                let per_image = x.len() / n;
                let rows: Vec<f32> = images
                    .iter()
                    .flat_map(|&i| &x[i * per_image..(i + 1) * per_image])
                    .copied()
                    .collect();
                let count = rows.len() / k;
                let a = ArrayView2::from_shape((count, k), &rows).expect("rows of k");
                add_gram(&mut moments[0], a.t(), count);
                true
            }
            Reader::Conv2d {
                groups,
                channels_per_group: cg,
                kernel: [kh, kw],
                strides: [sh, sw],
                dilations: [dh, dw],
                pads,
                same_lower,
            } => {
                let [c, h, w] = match shape {
                    &[_, c, h, w] => [c, h, w],
                    _ => return false,
                };
                if c != groups * cg || moments.len() != *groups {
                    return false;
                }
                let span = |k: usize, d: usize| (k - 1) * d + 1;
                let (top, left, oh, ow) = match pads {
                    Some([t, l, b, r]) => {
                        let (ph, pw) = (h + t + b, w + l + r);
                        if ph < span(*kh, *dh) || pw < span(*kw, *dw) {
                            return false;
                        }
                        (
                            *t,
                            *l,
                            (ph - span(*kh, *dh)) / sh + 1,
                            (pw - span(*kw, *dw)) / sw + 1,
                        )
                    }
                    None => {
                        let same = |size: usize, k, d, s: usize| {
                            let out = size.div_ceil(s);
                            let total = ((out - 1) * s + span(k, d)).saturating_sub(size);
                            let before = if *same_lower {
                                total - total / 2
                            } else {
                                total / 2
                            };
                            (before, out)
                        };
                        let (t, oh) = same(h, *kh, *dh, *sh);
                        let (l, ow) = same(w, *kw, *dw, *sw);
                        (t, l, oh, ow)
                    }
                };
                let pixels = oh * ow;
                if pixels == 0 {
                    return false;
                }
                let step = pixels.div_ceil(PIXELS_PER_IMAGE);
                let k = cg * kh * kw;
                for &image in images {
                    // Every step-th pixel, from an offset that moves with
                    // the image so that all pixels get their turn.
                    let chosen: Vec<usize> = (image % step..pixels).step_by(step).collect();
                    // Where each kernel tap reads, per chosen pixel, in a
                    // channel's plane (None: padding).
                    let taps: Vec<Vec<Option<usize>>> = (0..kh * kw)
                        .map(|t| {
                            let (i, j) = (t / kw, t % kw);
                            chosen
                                .iter()
                                .map(|&p| {
                                    let y = ((p / ow) * sh + i * dh).checked_sub(top)?;
                                    let x = ((p % ow) * sw + j * dw).checked_sub(left)?;
                                    (y < h && x < w).then_some(y * w + x)
                                })
                                .collect()
                        })
                        .collect();
                    let plane = &x[image * c * h * w..(image + 1) * c * h * w];
                    for (group, moment) in moments.iter_mut().enumerate() {
                        let mut cols = Array2::<f32>::zeros((k, chosen.len()));
                        for ci in 0..*cg {
                            let channel = &plane[(group * cg + ci) * h * w..][..h * w];
                            for (t, tap) in taps.iter().enumerate() {
                                let mut row = cols.row_mut(ci * kh * kw + t);
                                for (dst, src) in row.iter_mut().zip(tap) {
                                    if let Some(s) = src {
                                        *dst = channel[*s];
                                    }
                                }
                            }
                        }
                        add_gram(moment, cols.view(), chosen.len());
                    }
                }
                true
            }
        }
    }
}

/// `moment += cols cols^T` for the column vectors `cols` (`k x count`).
fn add_gram(moment: &mut SecondMoment, cols: ArrayView2<f32>, count: usize) {
    let k = moment.k;
    let mut gram = Array2::<f32>::zeros((k, k));
    ndarray::linalg::general_mat_mul(1.0, &cols, &cols.t(), 0.0, &mut gram);
    moment.add_gram(gram.as_slice().expect("standard layout"), count as u64);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(pads: Option<[usize; 4]>, strides: [usize; 2]) -> Reader {
        Reader::Conv2d {
            groups: 1,
            channels_per_group: 1,
            kernel: [2, 2],
            strides,
            dilations: [1, 1],
            pads,
            same_lower: false,
        }
    }

    #[test]
    fn conv_patches_read_the_weights_order_with_zero_padding() {
        // A 1x1x2x2 input [1 2; 3 4], 2x2 kernel, one pixel of padding at
        // the bottom and right: output pixels read [1 2 3 4], [2 0 4 0],
        // [3 4 0 0], [4 0 0 0].
        let reader = conv(Some([0, 0, 1, 1]), [1, 1]);
        let mut m = reader.moments();
        assert!(reader.observe(&[1, 1, 2, 2], &[1.0, 2.0, 3.0, 4.0], &[0], &mut m));
        let patches = [
            [1.0, 2.0, 3.0, 4.0],
            [2.0, 0.0, 4.0, 0.0],
            [3.0, 4.0, 0.0, 0.0],
            [4.0, 0.0, 0.0, 0.0],
        ];
        let mut want = vec![0f64; 16];
        for p in patches {
            for i in 0..4 {
                for j in 0..4 {
                    want[i * 4 + j] += p[i] * p[j];
                }
            }
        }
        assert_eq!(m[0].sum, want);
        assert_eq!(m[0].count, 4);
        // Shapes that do not fit add nothing.
        assert!(!reader.observe(&[1, 2, 2, 2], &[0.0; 8], &[0], &mut m));
        assert_eq!(m[0].count, 4);
    }

    #[test]
    fn same_padding_and_groups_and_rows() {
        // SAME_UPPER, stride 2 on 3x3: 2x2 outputs, padding at the end.
        let reader = conv(None, [2, 2]);
        let mut m = reader.moments();
        let x: Vec<f32> = (1..=9).map(|v| v as f32).collect();
        assert!(reader.observe(&[1, 1, 3, 3], &x, &[0], &mut m));
        assert_eq!(m[0].count, 4);
        // The first patch is [1 2 4 5].
        let last_pixel_patch = [9.0, 0.0, 0.0, 0.0];
        let first = [1.0, 2.0, 4.0, 5.0];
        let second = [3.0, 0.0, 6.0, 0.0];
        let third = [7.0, 8.0, 0.0, 0.0];
        let diag0: f64 = [first[0], second[0], third[0], last_pixel_patch[0]]
            .iter()
            .map(|v: &f64| v * v)
            .sum();
        assert_eq!(m[0].sum[0], diag0);
        // Depthwise: one moment per channel, each from its own plane.
        let dw = Reader::Conv2d {
            groups: 2,
            channels_per_group: 1,
            kernel: [1, 1],
            strides: [1, 1],
            dilations: [1, 1],
            pads: Some([0; 4]),
            same_lower: false,
        };
        let mut m = dw.moments();
        assert!(dw.observe(&[1, 2, 1, 2], &[1.0, 2.0, 3.0, 4.0], &[0], &mut m));
        assert_eq!((m[0].sum[0], m[1].sum[0]), (5.0, 25.0));
        // Rows: a [2, 3] input.
        let rows = Reader::Rows { k: 3 };
        let mut m = rows.moments();
        assert!(rows.observe(&[2, 3], &[1.0, 0.0, 2.0, 0.0, 1.0, 1.0], &[0, 1], &mut m));
        assert_eq!(m[0].sum, vec![1.0, 0.0, 2.0, 0.0, 1.0, 1.0, 2.0, 1.0, 5.0]);
        // Only the chosen samples count.
        let mut m = rows.moments();
        assert!(rows.observe(&[2, 3], &[1.0, 0.0, 2.0, 0.0, 1.0, 1.0], &[1], &mut m));
        assert_eq!(m[0].sum, vec![0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]);
        assert!(!rows.observe(&[2, 3], &[0.0; 6], &[2], &mut m));
    }
}
