//! Conv against a direct loop in f64, on shapes that exercise every way the
//! kernel cuts its work: products split into row tiles (large planes) and
//! channel tiles (small planes, many channels), im2col with strides,
//! padding and dilations, groups, and the depthwise kernel (3x3, 5x5, other
//! sizes, strides 1 and 2, channels that are not a whole vector); and the
//! gradients of the same convolutions against their definition, the same
//! bits on 1, 2 and 3 threads.

use qgraph_eval::grad::Mode;
use qgraph_eval::{Evaluator, Options};
use qgraph_ir::ndarray::ArrayD;
use qgraph_ir::Tensor;
use std::collections::HashMap;

struct Case {
    batch: usize,
    c: usize,
    h: usize,
    w: usize,
    m: usize,
    group: usize,
    kernel: [usize; 2],
    strides: [usize; 2],
    dilations: [usize; 2],
    /// top, left, bottom, right
    pads: [usize; 4],
}

impl Case {
    fn out(&self) -> (usize, usize) {
        let span = |k: usize, d: usize| (k - 1) * d + 1;
        let oh = (self.h + self.pads[0] + self.pads[2] - span(self.kernel[0], self.dilations[0]))
            / self.strides[0]
            + 1;
        let ow = (self.w + self.pads[1] + self.pads[3] - span(self.kernel[1], self.dilations[1]))
            / self.strides[1]
            + 1;
        (oh, ow)
    }

    fn model(&self) -> String {
        let (oh, ow) = self.out();
        let list = |v: &[usize]| {
            v.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            r#"
ir_version 8
opset "" 13

graph main {{
  input %x: f32[{n},{c},{h},{w}]
  input %wt: f32[{m},{cg},{kh},{kw}]
  input %b: f32[{m}]
  output %y: f32[{n},{m},{oh},{ow}]
  conv: %y = Conv(%x, %wt, %b) {{group = {group}, strides = [{s}], dilations = [{d}], pads = [{p}]}}
}}
"#,
            n = self.batch,
            c = self.c,
            h = self.h,
            w = self.w,
            m = self.m,
            cg = self.c / self.group,
            kh = self.kernel[0],
            kw = self.kernel[1],
            group = self.group,
            s = list(&self.strides),
            d = list(&self.dilations),
            p = list(&self.pads),
        )
    }

    /// The convolution by its definition, in f64, with each output's sum of
    /// the terms' magnitudes.
    fn direct(&self, x: &[f32], wt: &[f32], b: &[f32]) -> Vec<(f64, f64)> {
        let (oh, ow) = self.out();
        let (cg, mg) = (self.c / self.group, self.m / self.group);
        let [kh, kw] = self.kernel;
        let mut y = vec![(0f64, 0f64); self.batch * self.m * oh * ow];
        for n in 0..self.batch {
            for oc in 0..self.m {
                let g = oc / mg;
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut sum = b[oc] as f64;
                        let mut size = sum.abs();
                        for ic in 0..cg {
                            for i in 0..kh {
                                for j in 0..kw {
                                    let iy = (oy * self.strides[0] + i * self.dilations[0])
                                        as isize
                                        - self.pads[0] as isize;
                                    let ix = (ox * self.strides[1] + j * self.dilations[1])
                                        as isize
                                        - self.pads[1] as isize;
                                    if iy < 0
                                        || ix < 0
                                        || iy >= self.h as isize
                                        || ix >= self.w as isize
                                    {
                                        continue;
                                    }
                                    let xv = x[((n * self.c + g * cg + ic) * self.h + iy as usize)
                                        * self.w
                                        + ix as usize];
                                    let wv = wt[((oc * cg + ic) * kh + i) * kw + j];
                                    sum += xv as f64 * wv as f64;
                                    size += (xv as f64 * wv as f64).abs();
                                }
                            }
                        }
                        y[((n * self.m + oc) * oh + oy) * ow + ox] = (sum, size);
                    }
                }
            }
        }
        y
    }

    /// The gradients of `sum(r * y)` with respect to the input, the weights
    /// and the bias, by the definition in f64: each element as (sum, sum of
    /// the terms' magnitudes, number of terms).
    fn direct_gradients(&self, x: &[f32], wt: &[f32], r: &[f32]) -> [Vec<(f64, f64, usize)>; 3] {
        let (oh, ow) = self.out();
        let (cg, mg) = (self.c / self.group, self.m / self.group);
        let [kh, kw] = self.kernel;
        let mut dx = vec![(0f64, 0f64, 0usize); x.len()];
        let mut dw = vec![(0f64, 0f64, 0usize); wt.len()];
        let mut db = vec![(0f64, 0f64, 0usize); self.m];
        let add = |acc: &mut (f64, f64, usize), term: f64| {
            acc.0 += term;
            acc.1 += term.abs();
            acc.2 += 1;
        };
        for n in 0..self.batch {
            for oc in 0..self.m {
                let g = oc / mg;
                for oy in 0..oh {
                    for ox in 0..ow {
                        let rv = r[((n * self.m + oc) * oh + oy) * ow + ox] as f64;
                        add(&mut db[oc], rv);
                        for ic in 0..cg {
                            for i in 0..kh {
                                for j in 0..kw {
                                    let iy = (oy * self.strides[0] + i * self.dilations[0])
                                        as isize
                                        - self.pads[0] as isize;
                                    let ix = (ox * self.strides[1] + j * self.dilations[1])
                                        as isize
                                        - self.pads[1] as isize;
                                    if iy < 0
                                        || ix < 0
                                        || iy >= self.h as isize
                                        || ix >= self.w as isize
                                    {
                                        continue;
                                    }
                                    let xi = ((n * self.c + g * cg + ic) * self.h + iy as usize)
                                        * self.w
                                        + ix as usize;
                                    let wi = ((oc * cg + ic) * kh + i) * kw + j;
                                    add(&mut dx[xi], rv * wt[wi] as f64);
                                    add(&mut dw[wi], rv * x[xi] as f64);
                                }
                            }
                        }
                    }
                }
            }
        }
        [dx, dw, db]
    }
}

fn values(count: usize, seed: f32) -> Vec<f32> {
    (0..count)
        .map(|i| ((i as f32 * 0.618 + seed).sin() * 43758.547).rem_euclid(1.0) * 2.0 - 1.0)
        .collect()
}

fn case(
    batch: usize,
    (c, h, w): (usize, usize, usize),
    (m, group): (usize, usize),
    kernel: [usize; 2],
    strides: [usize; 2],
    dilations: [usize; 2],
    pads: [usize; 4],
) -> Case {
    Case {
        batch,
        c,
        h,
        w,
        m,
        group,
        kernel,
        strides,
        dilations,
        pads,
    }
}

/// Shapes that exercise every way the kernels cut their work.
fn cases() -> Vec<Case> {
    #[rustfmt::skip]
    let cases = vec![
        // 1x1 on a large plane: several row tiles, all channels each.
        case(1, (64, 56, 56), (64, 1), [1, 1], [1, 1], [1, 1], [0; 4]),
        // 1x1 on a small plane with many channels: channel tiles.
        case(2, (160, 7, 7), (960, 1), [1, 1], [1, 1], [1, 1], [0; 4]),
        // 1x1 whose last column panel has 1 or 4 columns (the narrow
        // product's dot products), an odd channel count and a depth that is
        // not a whole vector.
        case(1, (13, 7, 7), (7, 1), [1, 1], [1, 1], [1, 1], [0; 4]),
        case(2, (21, 14, 14), (9, 1), [1, 1], [1, 1], [1, 1], [0; 4]),
        // Few input channels: channel tiles of a whole-plane row tile.
        case(1, (16, 30, 30), (96, 1), [1, 1], [1, 1], [1, 1], [0; 4]),
        // A network's first convolution: im2col, stride 2, padding.
        case(1, (3, 64, 64), (32, 1), [3, 3], [2, 2], [1, 1], [1, 1, 1, 1]),
        // 1x1 with a stride (im2col, not the plain product).
        case(2, (24, 20, 18), (40, 1), [1, 1], [2, 2], [1, 1], [0; 4]),
        // Groups, dilation, asymmetric padding and strides.
        case(2, (8, 13, 11), (6, 2), [3, 3], [1, 2], [2, 1], [2, 1, 0, 3]),
        // A rectangular kernel.
        case(1, (5, 9, 12), (7, 1), [2, 4], [1, 1], [1, 1], [1, 2, 0, 1]),
        // Depthwise: 3x3 and 5x5, strides 1 and 2, channels not a whole
        // vector, planes not square, and a size with no unrolled kernel.
        case(2, (20, 15, 17), (20, 20), [3, 3], [1, 1], [1, 1], [1, 1, 1, 1]),
        case(1, (20, 15, 17), (20, 20), [3, 3], [2, 2], [1, 1], [1, 1, 1, 1]),
        case(1, (36, 28, 28), (36, 36), [5, 5], [1, 1], [1, 1], [2, 2, 2, 2]),
        case(1, (36, 28, 28), (36, 36), [5, 5], [2, 2], [1, 1], [1, 1, 2, 2]),
        case(2, (48, 7, 7), (48, 48), [3, 3], [1, 1], [1, 1], [1, 1, 1, 1]),
        case(1, (4, 10, 9), (4, 4), [7, 7], [1, 1], [1, 1], [3, 3, 3, 3]),
        // The same size out as in, padded unevenly.
        case(1, (5, 9, 10), (5, 5), [4, 4], [1, 1], [1, 1], [1, 2, 2, 1]),
        case(1, (17, 3, 40), (17, 17), [3, 3], [1, 1], [1, 1], [1, 1, 1, 1]),
        case(1, (6, 11, 11), (6, 6), [3, 3], [3, 3], [2, 2], [0, 1, 2, 0]),
        // Depthwise with a different stride per axis, and a stride with a
        // dilation that puts two taps in one phase.
        case(1, (9, 12, 13), (9, 9), [3, 3], [2, 1], [2, 3], [2, 1, 0, 3]),
        case(1, (7, 16, 15), (7, 7), [5, 3], [2, 3], [2, 1], [4, 1, 4, 1]),
        // Stride 2 padded only after, as a Pad in front of TensorFlow's
        // convolutions leaves it, on small planes (one and two outputs).
        case(1, (40, 14, 14), (40, 40), [3, 3], [2, 2], [1, 1], [0, 0, 1, 1]),
        case(1, (3, 2, 3), (3, 3), [3, 3], [2, 2], [1, 1], [0, 0, 1, 1]),
        case(1, (3, 1, 1), (3, 3), [3, 3], [2, 2], [1, 1], [1, 1, 1, 1]),
    ];
    cases
}

#[test]
fn convolutions_match_the_definition_whatever_the_tiling() {
    for (i, case) in cases().iter().enumerate() {
        let model = qgraph_text::parse_model(&case.model()).unwrap();
        let ev = Evaluator::new(&model).unwrap();
        let x = values(case.batch * case.c * case.h * case.w, i as f32);
        let k = case.kernel[0] * case.kernel[1] * case.c / case.group;
        let wt = values(case.m * k, 100.0 + i as f32);
        let b = values(case.m, 200.0 + i as f32);
        let tensor = |shape: Vec<usize>, v: &[f32]| {
            Tensor::F32(ArrayD::from_shape_vec(shape, v.to_vec()).unwrap())
        };
        let inputs = vec![
            tensor(vec![case.batch, case.c, case.h, case.w], &x),
            tensor(
                vec![case.m, case.c / case.group, case.kernel[0], case.kernel[1]],
                &wt,
            ),
            tensor(vec![case.m], &b),
        ];
        let Tensor::F32(y) = ev.run(inputs).unwrap().remove(0) else {
            panic!("case {i}: the output is not f32");
        };
        let want = case.direct(&x, &wt, &b);
        assert_eq!(y.len(), want.len(), "case {i}: output size");
        // Each output is a sum of k + 1 terms: f32 rounding leaves it within
        // (k + 1) 2^-24 of the exact sum, relative to the terms' magnitudes
        // added up (twice that, for the last rounding of each partial sum).
        for (at, (&got, &(want, size))) in y.iter().zip(&want).enumerate() {
            let tolerance = (k + 2) as f64 * 2f64.powi(-23) * size;
            assert!(
                (got as f64 - want).abs() <= tolerance,
                "case {i}: output {at} is {got}, the definition gives {want}"
            );
        }
    }
}

#[test]
fn convolution_gradients_match_the_definition() {
    for (i, case) in cases().iter().enumerate() {
        let model = qgraph_text::parse_model(&case.model()).unwrap();
        let g = &model.graph;
        let (oh, ow) = case.out();
        let x = values(case.batch * case.c * case.h * case.w, i as f32);
        let k = case.kernel[0] * case.kernel[1] * case.c / case.group;
        let wt = values(case.m * k, 100.0 + i as f32);
        let b = values(case.m, 200.0 + i as f32);
        let r = values(case.batch * case.m * oh * ow, 300.0 + i as f32);
        let tensor = |shape: Vec<usize>, v: &[f32]| {
            Tensor::F32(ArrayD::from_shape_vec(shape, v.to_vec()).unwrap())
        };
        let inputs = vec![
            tensor(vec![case.batch, case.c, case.h, case.w], &x),
            tensor(
                vec![case.m, case.c / case.group, case.kernel[0], case.kernel[1]],
                &wt,
            ),
            tensor(vec![case.m], &b),
        ];
        let wrt: Vec<_> = ["x", "wt", "b"]
            .iter()
            .map(|name| g.value_by_name(name).unwrap())
            .collect();
        let gradients = |threads: usize| {
            let options = Options {
                threads,
                ..Default::default()
            };
            let ev = Evaluator::with_options(&model, options).unwrap();
            let no_params = HashMap::new();
            let tape = ev
                .record(inputs.clone(), &no_params, Mode::Inference)
                .unwrap();
            let seed = tensor(vec![case.batch, case.m, oh, ow], &r);
            tape.backward(vec![(g.outputs()[0], seed)], &wrt).unwrap()
        };
        let grads = gradients(2);
        for threads in [1, 3] {
            assert!(
                gradients(threads) == grads,
                "case {i}: gradients on {threads} threads differ from those on 2"
            );
        }
        let want = case.direct_gradients(&x, &wt, &r);
        for (name, (v, want)) in ["x", "wt", "b"].iter().zip(wrt.iter().zip(&want)) {
            let Some(Tensor::F32(got)) = grads.get(v) else {
                panic!("case {i}: no f32 gradient for {name}");
            };
            assert_eq!(got.len(), want.len(), "case {i}: gradient size of {name}");
            // A sum of `terms` f32 products: within (terms + 1) 2^-23 of the
            // exact sum, relative to the terms' magnitudes added up.
            for (at, (&got, &(want, size, terms))) in got.iter().zip(want).enumerate() {
                let tolerance = (terms + 1) as f64 * 2f64.powi(-23) * size;
                assert!(
                    (got as f64 - want).abs() <= tolerance,
                    "case {i}: d{name}[{at}] is {got}, the definition gives {want}"
                );
            }
        }
    }
}
