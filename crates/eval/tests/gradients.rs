//! Gradient checks: for every operator with a backward kernel, the tape's
//! gradient of `loss = sum(r * y)` (fixed pseudo-random `r`) against
//! central differences of the forward pass, at sampled elements of each
//! input and parameter. Inputs are drawn away from kinks (ReLU at 0, the
//! bounds of Clip, ties in MaxPool) so the differences are meaningful.
//! Fake quantization is piecewise constant, so its straight-through
//! gradients are checked against the papers' formulas instead.

use qgraph_eval::grad::Mode;
use qgraph_eval::Evaluator;
use qgraph_ir::ndarray::{ArrayD, IxDyn};
use qgraph_ir::{Graph, Model, Tensor, ValueId};
use std::collections::HashMap;

/// The encoder block's attention, feed-forward and pooling nodes, shared with
/// the other crate's test of the same block.
const ENCODER_BLOCK_NODES: &str = include_str!("../../../testdata/encoder_block_nodes.txt");

/// Deterministic values in [-1, 1).
fn values(count: usize, seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn tensor(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::F32(ArrayD::from_shape_vec(IxDyn(shape), values(n, seed)).unwrap())
}

fn f32s(t: &Tensor) -> &ArrayD<f32> {
    match t {
        Tensor::F32(a) => a,
        t => panic!("expected f32, found {}", t.dtype()),
    }
}

/// What the forward pass reads: graph inputs by position, parameters by
/// value.
struct Point {
    inputs: Vec<Tensor>,
    params: HashMap<ValueId, Tensor>,
}

fn loss(ev: &Evaluator, at: &Point, weights: &[Vec<f32>], mode: Mode) -> f64 {
    let tape = ev.record(at.inputs.clone(), &at.params, mode).unwrap();
    let outs = tape.outputs().unwrap();
    outs.iter()
        .zip(weights)
        .map(|(y, r)| {
            f32s(y)
                .iter()
                .zip(r)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>()
        })
        .sum()
}

/// The values named `names`.
fn named(g: &Graph, names: &[&str]) -> Vec<ValueId> {
    names
        .iter()
        .map(|p| g.value_by_name(p).unwrap_or_else(|| panic!("no value {p}")))
        .collect()
}

/// The named initializers as the tape's parameters, at their values.
fn at_initializers(g: &Graph, names: &[&str]) -> HashMap<ValueId, Tensor> {
    named(g, names)
        .into_iter()
        .map(|v| (v, g.initializer(v).unwrap().tensor.clone()))
        .collect()
}

/// Checks the gradients of every graph input and of the named
/// initializers of `text`, in `mode`; `inputs` are the graph's inputs.
fn check(text: &str, inputs: Vec<Tensor>, params: &[&str], mode: Mode) {
    let model: Model = qgraph_text::parse_model(text).unwrap();
    let g = &model.graph;
    let ev = Evaluator::new(&model).unwrap();
    let param_ids = named(g, params);
    let mut at = Point {
        inputs,
        params: at_initializers(g, params),
    };
    let outputs: Vec<Tensor> = ev
        .record(at.inputs.clone(), &at.params, mode)
        .unwrap()
        .outputs()
        .unwrap()
        .into_iter()
        .cloned()
        .collect();
    let weights: Vec<Vec<f32>> = outputs
        .iter()
        .enumerate()
        .map(|(k, y)| values(y.len(), 1000 + k as u64))
        .collect();
    let tape = ev.record(at.inputs.clone(), &at.params, mode).unwrap();
    let seeds = g
        .outputs()
        .iter()
        .zip(&outputs)
        .zip(&weights)
        .map(|((&v, y), r)| {
            (
                v,
                Tensor::F32(ArrayD::from_shape_vec(IxDyn(y.shape()), r.clone()).unwrap()),
            )
        })
        .collect();
    let input_ids = ev.required_inputs();
    // Only the float inputs have gradients (token ids, say, have none).
    let float_inputs: Vec<usize> = (0..input_ids.len())
        .filter(|&i| matches!(at.inputs[i], Tensor::F32(_)))
        .collect();
    let wrt: Vec<ValueId> = float_inputs
        .iter()
        .map(|&i| input_ids[i])
        .chain(param_ids.iter().copied())
        .collect();
    let grads = tape.backward(seeds, &wrt).unwrap();
    drop(tape);
    let eps = 1e-3f32;
    for (slot, &v) in wrt.iter().enumerate() {
        let name = g.value(v).name().to_string();
        let analytic = grads
            .get(&v)
            .unwrap_or_else(|| panic!("{text}\nno gradient for {name}"));
        let analytic = f32s(analytic).clone();
        let count = analytic.len();
        // Up to 24 elements, spread over the tensor.
        let step = count.div_ceil(24).max(1);
        for e in (0..count).step_by(step) {
            let mut shifted = |delta: f32| {
                let target = if slot < float_inputs.len() {
                    &mut at.inputs[float_inputs[slot]]
                } else {
                    at.params.get_mut(&v).unwrap()
                };
                let Tensor::F32(a) = target else { panic!() };
                let cell = a.iter_mut().nth(e).unwrap();
                let old = *cell;
                *cell = old + delta;
                let l = loss(&ev, &at, &weights, mode);
                let Tensor::F32(a) = (if slot < float_inputs.len() {
                    &mut at.inputs[float_inputs[slot]]
                } else {
                    at.params.get_mut(&v).unwrap()
                }) else {
                    panic!()
                };
                *a.iter_mut().nth(e).unwrap() = old;
                l
            };
            let numeric = (shifted(eps) - shifted(-eps)) / (2.0 * eps as f64);
            let got = analytic.iter().nth(e).copied().unwrap() as f64;
            let tolerance = 2e-2 * numeric.abs().max(got.abs()) + 5e-3;
            assert!(
                (got - numeric).abs() <= tolerance,
                "{text}\n{name}[{e}]: backward {got}, central difference {numeric}"
            );
        }
    }
}

/// A one-node graph around `node` (written with `%x`, `%y` and the given
/// initializers).
fn graph(opset: u32, x: &str, y: &str, inits: &str, node: &str) -> String {
    format!(
        "ir_version 8\nopset \"\" {opset}\n\ngraph main {{\n  input %x: f32{x}\n  output %y: f32{y}\n{inits}\n  {node}\n}}\n"
    )
}

fn init(name: &str, shape: &[usize], seed: u64) -> String {
    let n: usize = shape.iter().product();
    let vals: Vec<String> = values(n, seed).iter().map(|v| format!("{v:?}")).collect();
    format!("  init %{name} = f32{shape:?} [{}]", vals.join(", "))
}

/// Values away from 0 (at least 0.1 in magnitude): no ReLU kink nearby.
fn away_from_zero(shape: &[usize], seed: u64) -> Tensor {
    let Tensor::F32(mut a) = tensor(shape, seed) else {
        unreachable!()
    };
    a.mapv_inplace(|v| {
        if v.abs() < 0.1 {
            v.signum() * 0.1 + v
        } else {
            v
        }
    });
    Tensor::F32(a)
}

#[test]
fn convolutions() {
    let cases = [
        // Dense 3x3 with padding, stride 2 and dilation.
        (
            "[2,3,7,6]",
            "[2,4,3,3]",
            "[4,3,3,3]",
            "{pads = [1, 1, 1, 1], strides = [2, 2]}",
            "[2,4,4,3]",
            true,
        ),
        (
            "[1,2,8,8]",
            "[1,3,4,4]",
            "[3,2,3,3]",
            "{pads = [1, 0, 1, 2], dilations = [2, 2], strides = [1, 2]}",
            "[1,3,6,4]",
            true,
        ),
        // Grouped.
        (
            "[2,4,5,5]",
            "[2,6,5,5]",
            "[6,2,3,3]",
            "{group = 2, pads = [1, 1, 1, 1]}",
            "[2,6,5,5]",
            false,
        ),
        // Depthwise, stride 2.
        (
            "[2,3,7,7]",
            "[2,3,4,4]",
            "[3,1,3,3]",
            "{group = 3, pads = [1, 1, 1, 1], strides = [2, 2]}",
            "[2,3,4,4]",
            true,
        ),
        // 1x1 without padding.
        (
            "[2,3,4,5]",
            "[2,5,4,5]",
            "[5,3,1,1]",
            "{}",
            "[2,5,4,5]",
            true,
        ),
    ];
    for (x, y, w, attrs, _, bias) in cases {
        let wshape: Vec<usize> = w
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .map(|s| s.parse().unwrap())
            .collect();
        let mut inits = init("w", &wshape, 11);
        let mut params = vec!["w"];
        let node = if bias {
            inits.push('\n');
            inits.push_str(&init("b", &[wshape[0]], 12));
            params.push("b");
            format!("conv: %y = Conv(%x, %w, %b) {attrs}")
        } else {
            format!("conv: %y = Conv(%x, %w) {attrs}")
        };
        let xshape: Vec<usize> = x
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .map(|s| s.parse().unwrap())
            .collect();
        check(
            &graph(13, x, y, &inits, &node),
            vec![tensor(&xshape, 5)],
            &params,
            Mode::Inference,
        );
    }
}

#[test]
fn products() {
    let gemm = |attrs: &str, a: &[usize], b: &[usize], c: &[usize], y: &str| {
        let text = graph(
            13,
            &format!("{a:?}"),
            y,
            &format!("{}\n{}", init("b", b, 3), init("c", c, 4)),
            &format!("gemm: %y = Gemm(%x, %b, %c) {attrs}"),
        );
        check(&text, vec![tensor(a, 9)], &["b", "c"], Mode::Inference);
    };
    gemm("{}", &[3, 4], &[4, 5], &[5], "[3,5]");
    gemm(
        "{transA = 1, alpha = 0.5, beta = 2.0}",
        &[4, 3],
        &[4, 5],
        &[3, 1],
        "[3,5]",
    );
    gemm("{transB = 1}", &[3, 4], &[5, 4], &[3, 5], "[3,5]");
    gemm("{transA = 1, transB = 1}", &[4, 3], &[5, 4], &[1], "[3,5]");
    let matmul = |a: &[usize], b: &[usize], y: &str| {
        let text = graph(
            13,
            &format!("{a:?}"),
            y,
            &init("b", b, 6),
            "mm: %y = MatMul(%x, %b)",
        );
        check(&text, vec![tensor(a, 7)], &["b"], Mode::Inference);
    };
    matmul(&[2, 3, 4], &[4, 5], "[2,3,5]");
    matmul(&[3, 4], &[2, 4, 5], "[2,3,5]");
    matmul(&[2, 1, 3, 4], &[3, 4, 2], "[2,3,3,2]");
    matmul(&[4], &[4, 5], "[5]");
    matmul(&[3, 4], &[4], "[3]");
}

#[test]
fn batch_normalization_in_training_and_inference() {
    let inits = [
        init("s", &[3], 1),
        init("b", &[3], 2),
        init("m", &[3], 3),
        "  init %v = f32[3] [0.5, 1.5, 0.8]".to_string(),
    ]
    .join("\n");
    let text = graph(
        15,
        "[4,3,2,3]",
        "[4,3,2,3]",
        &inits,
        "bn: %y = BatchNormalization(%x, %s, %b, %m, %v) {epsilon = 0.001}",
    );
    for mode in [Mode::Training, Mode::Inference] {
        check(&text, vec![tensor(&[4, 3, 2, 3], 8)], &["s", "b"], mode);
    }
}

/// In training, a Relu or Clip that alone reads a BatchNormalization runs
/// fused into it (the normalised values are not kept): the same bits as the
/// two apart (an Identity between them keeps them apart), and gradients
/// that match central differences.
#[test]
fn a_clamp_fused_into_training_batch_normalization_changes_no_bit() {
    let inits = [
        init("s", &[3], 1),
        init("b", &[3], 2),
        init("m", &[3], 3),
        "  init %v = f32[3] [0.5, 1.5, 0.8]".to_string(),
        // Bounds at least 0.006 from every normalised value, so that the
        // central differences do not cross them.
        "  init %lo = f32[] [-0.45]".to_string(),
        "  init %hi = f32[] [0.55]".to_string(),
    ]
    .join("\n");
    let bn = "bn: %t = BatchNormalization(%x, %s, %b, %m, %v) {epsilon = 0.001}";
    for clamp in ["Clip(%t, %lo, %hi)", "Relu(%t)"] {
        let fused = graph(
            15,
            "[4,3,2,3]",
            "[4,3,2,3]",
            &inits,
            &format!("{bn}\n  act: %y = {clamp}"),
        );
        let apart = graph(
            15,
            "[4,3,2,3]",
            "[4,3,2,3]",
            &inits,
            &format!(
                "{bn}\n  keep: %u = Identity(%t)\n  act: %y = {}",
                clamp.replace("%t", "%u")
            ),
        );
        let x = tensor(&[4, 3, 2, 3], 8);
        let r = tensor(&[4, 3, 2, 3], 9);
        let run = |text: &str| {
            let model: Model = qgraph_text::parse_model(text).unwrap();
            let g = &model.graph;
            let ev = Evaluator::new(&model).unwrap();
            let params = at_initializers(g, &["s", "b"]);
            let tape = ev.record(vec![x.clone()], &params, Mode::Training).unwrap();
            let y = tape.outputs().unwrap()[0].clone();
            let bn = g.node_by_name("bn").unwrap();
            let stats = tape.saved(bn).unwrap().to_vec();
            let wrt = named(g, &["x", "s", "b"]);
            let grads = tape
                .backward(vec![(g.outputs()[0], r.clone())], &wrt)
                .unwrap();
            let grads: Vec<Tensor> = wrt.iter().map(|v| grads[v].clone()).collect();
            (y, stats, grads)
        };
        let (y, stats, grads) = run(&fused);
        // Some values on each side of the clamp, so both gradients occur.
        let clamped = f32s(&y)
            .iter()
            .filter(|&&v| v == 0.0 || v == -0.45 || v == 0.55);
        assert!(clamped.count() > 4, "{clamp}: too few values clamped");
        assert!(
            run(&apart) == (y, stats, grads),
            "{clamp}: fusion changed a bit"
        );
        check(&fused, vec![x], &["s", "b"], Mode::Training);
    }
}

/// A Relu that alone reads a Conv's output runs as its epilogue in the
/// tape (the Conv's output is not kept, the Relu's gradient comes from its
/// output): the same bits as the two apart, in both modes.
#[test]
fn a_relu_fused_into_its_convolution_changes_no_bit() {
    let inits = [init("w", &[4, 3, 3, 3], 11), init("b", &[4], 12)].join("\n");
    let conv = "conv: %t = Conv(%x, %w, %b) {pads = [1, 1, 1, 1]}";
    let fused = graph(
        13,
        "[2,3,5,5]",
        "[2,4,5,5]",
        &inits,
        &format!("{conv}\n  act: %y = Relu(%t)"),
    );
    let apart = graph(
        13,
        "[2,3,5,5]",
        "[2,4,5,5]",
        &inits,
        &format!("{conv}\n  keep: %u = Identity(%t)\n  act: %y = Relu(%u)"),
    );
    let x = tensor(&[2, 3, 5, 5], 5);
    let r = tensor(&[2, 4, 5, 5], 6);
    for mode in [Mode::Training, Mode::Inference] {
        let run = |text: &str| {
            let model: Model = qgraph_text::parse_model(text).unwrap();
            let g = &model.graph;
            let ev = Evaluator::new(&model).unwrap();
            let params = at_initializers(g, &["w", "b"]);
            let tape = ev.record(vec![x.clone()], &params, mode).unwrap();
            let y = tape.outputs().unwrap()[0].clone();
            let wrt = named(g, &["x", "w", "b"]);
            let grads = tape
                .backward(vec![(g.outputs()[0], r.clone())], &wrt)
                .unwrap();
            let grads: Vec<Tensor> = wrt.iter().map(|v| grads[v].clone()).collect();
            (y, grads)
        };
        let (y, grads) = run(&fused);
        let zeros = f32s(&y).iter().filter(|&&v| v == 0.0).count();
        assert!(zeros > 10 && zeros < y.len() - 10, "both sides of the kink");
        assert!(run(&apart) == (y, grads), "{mode:?}: fusion changed a bit");
        check(&fused, vec![x.clone()], &["w", "b"], mode);
    }
}

#[test]
fn activations() {
    let unary = [
        "Relu(%x)",
        "LeakyRelu(%x) {alpha = 0.1}",
        "Sigmoid(%x)",
        "HardSigmoid(%x) {alpha = 0.3, beta = 0.4}",
        "HardSwish(%x)",
        "Tanh(%x)",
        "Neg(%x)",
        "Exp(%x)",
        "Identity(%x)",
        "Softmax(%x) {axis = 1}",
        "Abs(%x)",
    ];
    for op in unary {
        let text = graph(14, "[2,3,4]", "[2,3,4]", "", &format!("n: %y = {op}"));
        // Scaled to [-4, 4]: HardSigmoid and HardSwish take both branches.
        let Tensor::F32(x) = away_from_zero(&[2, 3, 4], 21) else {
            unreachable!()
        };
        check(
            &text,
            vec![Tensor::F32(x.mapv(|v| v * 4.0))],
            &[],
            Mode::Inference,
        );
    }
    for op in ["Sqrt(%x)", "Log(%x)", "Reciprocal(%x)"] {
        let text = graph(14, "[2,5]", "[2,5]", "", &format!("n: %y = {op}"));
        let Tensor::F32(x) = tensor(&[2, 5], 22) else {
            unreachable!()
        };
        check(
            &text,
            vec![Tensor::F32(x.mapv(|v| v.abs() + 0.5))],
            &[],
            Mode::Inference,
        );
    }
    // Softmax before opset 13: over the input flattened at the axis.
    let text = graph(
        11,
        "[2,3,4]",
        "[2,3,4]",
        "",
        "n: %y = Softmax(%x) {axis = 1}",
    );
    check(&text, vec![tensor(&[2, 3, 4], 23)], &[], Mode::Inference);
    // Clip with bounds as inputs, values placed away from them.
    let text = graph(
        13,
        "[3,4]",
        "[3,4]",
        "  init %lo = f32[] [-0.5]\n  init %hi = f32[] [0.55]",
        "n: %y = Clip(%x, %lo, %hi)",
    );
    let x = Tensor::F32(
        ArrayD::from_shape_vec(
            IxDyn(&[3, 4]),
            vec![
                -0.9, -0.3, 0.1, 0.7, 0.2, -0.6, 0.52, 0.9, -0.1, 0.35, -0.45, 0.0,
            ],
        )
        .unwrap(),
    );
    check(&text, vec![x], &[], Mode::Inference);
}

#[test]
fn broadcasting_arithmetic() {
    for op in ["Add", "Sub", "Mul", "Div", "Pow"] {
        for shape in [[1usize, 3, 1], [2, 3, 4]] {
            let text = graph(
                13,
                "[2,3,4]",
                "[2,3,4]",
                &init("b", &shape, 31),
                &format!("n: %y = {op}(%x, %b)"),
            );
            let model: Model = qgraph_text::parse_model(&text).unwrap();
            drop(model);
            // Positive operands for Pow and away from zero for Div.
            let Tensor::F32(x) = tensor(&[2, 3, 4], 32) else {
                unreachable!()
            };
            let x = x.mapv(|v| v.abs() + 0.5);
            let text = if op == "Div" || op == "Pow" {
                text.replace(&init("b", &shape, 31), &{
                    let n: usize = shape.iter().product();
                    let vals: Vec<String> = values(n, 31)
                        .iter()
                        .map(|v| format!("{:?}", v.abs() + 0.5))
                        .collect();
                    format!("  init %b = f32{shape:?} [{}]", vals.join(", "))
                })
            } else {
                text
            };
            check(&text, vec![Tensor::F32(x)], &["b"], Mode::Inference);
        }
    }
}

#[test]
fn pooling_and_means() {
    let cases = [
        ("MaxPool(%x) {kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]}", "[2,2,4,4]"),
        ("AveragePool(%x) {kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]}", "[2,2,4,4]"),
        ("AveragePool(%x) {kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1], count_include_pad = 1}", "[2,2,4,4]"),
        // Windows wholly inside the input: the fixed-loop paths.
        ("MaxPool(%x) {kernel_shape = [2, 2], strides = [2, 2]}", "[2,2,3,3]"),
        ("MaxPool(%x) {kernel_shape = [3, 2], strides = [1, 2], dilations = [2, 1]}", "[2,2,3,3]"),
        ("AveragePool(%x) {kernel_shape = [2, 2], strides = [2, 2]}", "[2,2,3,3]"),
        ("GlobalAveragePool(%x)", "[2,2,1,1]"),
        ("ReduceMean(%x) {axes = [1, 3], keepdims = 0}", "[2,7]"),
        ("ReduceMean(%x) {axes = [2]}", "[2,2,1,7]"),
    ];
    for (op, y) in cases {
        let text = graph(13, "[2,2,7,7]", y, "", &format!("n: %y = {op}"));
        check(&text, vec![tensor(&[2, 2, 7, 7], 41)], &[], Mode::Inference);
    }
}

/// MaxPool's tape records each window's first maximum: with ties, NaN,
/// signed zeros and infinities its outputs are the evaluator's to the bit,
/// and each window's gradient goes to its first maximum by a strict
/// comparison in tap order (none for a window wholly in the padding).
#[test]
fn max_pool_sends_each_gradient_to_its_first_maximum() {
    let plane: [f32; 20] = [
        1.0,
        1.0,
        f32::NAN,
        2.0,
        -0.0, //
        0.0,
        1.0,
        2.0,
        f32::NAN,
        0.0, //
        f32::NEG_INFINITY,
        f32::NEG_INFINITY,
        3.0,
        3.0,
        0.0, //
        f32::NEG_INFINITY,
        f32::NEG_INFINITY,
        -1.0,
        3.0,
        -0.0,
    ];
    let x = Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[1, 1, 4, 5]), plane.to_vec()).unwrap());
    let cases = [
        // Windows inside: (kernel, strides, pads, output shape).
        ([2, 2], [2, 2], [0, 0, 0, 0], [2, 2]),
        ([2, 3], [1, 1], [0, 0, 0, 0], [3, 3]),
        // Padded, one window wholly in the padding below.
        ([2, 2], [2, 2], [1, 1, 3, 1], [4, 3]),
    ];
    for (kernel, strides, pads, [oh, ow]) in cases {
        let text = graph(
            13,
            "[1,1,4,5]",
            &format!("[1,1,{oh},{ow}]"),
            "",
            &format!(
                "n: %y = MaxPool(%x) {{kernel_shape = {kernel:?}, strides = {strides:?}, pads = {pads:?}}}"
            ),
        );
        let model: Model = qgraph_text::parse_model(&text).unwrap();
        let g = &model.graph;
        let ev = Evaluator::new(&model).unwrap();
        let run = ev.run(vec![x.clone()]).unwrap();
        let no_params = HashMap::new();
        let tape = ev
            .record(vec![x.clone()], &no_params, Mode::Training)
            .unwrap();
        let recorded = f32s(tape.outputs().unwrap()[0]);
        let bits = |a: &ArrayD<f32>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(recorded),
            bits(f32s(&run[0])),
            "{kernel:?} {strides:?} {pads:?}"
        );
        let seeds: Vec<f32> = (0..oh * ow).map(|k| 1.0 + k as f32).collect();
        let seed =
            Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[1, 1, oh, ow]), seeds.clone()).unwrap());
        let xv = g.value_by_name("x").unwrap();
        let grads = tape.backward(vec![(g.outputs()[0], seed)], &[xv]).unwrap();
        let mut want = [0f32; 20];
        for y in 0..oh {
            for xo in 0..ow {
                let mut first: Option<usize> = None;
                for i in 0..kernel[0] {
                    for j in 0..kernel[1] {
                        let r = (y * strides[0] + i) as isize - pads[0] as isize;
                        let c = (xo * strides[1] + j) as isize - pads[1] as isize;
                        if !(0..4).contains(&r) || !(0..5).contains(&c) {
                            continue;
                        }
                        let t = (r * 5 + c) as usize;
                        if first.is_none_or(|b| plane[t] > plane[b]) {
                            first = Some(t);
                        }
                    }
                }
                if let Some(t) = first {
                    want[t] += seeds[y * ow + xo];
                }
            }
        }
        let got: Vec<f32> = f32s(&grads[&xv]).iter().copied().collect();
        assert_eq!(got, want.to_vec(), "{kernel:?} {strides:?} {pads:?}");
    }
}

#[test]
fn data_movement() {
    let cases = [
        ("Reshape(%x, %s)", "  init %s = i64[2] [6, -1]", "[6,4]", 14),
        ("Flatten(%x) {axis = 2}", "", "[6,4]", 13),
        ("Transpose(%x) {perm = [2, 0, 1]}", "", "[4,2,3]", 13),
        ("Unsqueeze(%x, %a)", "  init %a = i64[1] [1]", "[2,1,3,4]", 13),
        ("Slice(%x, %st, %en, %ax, %sp)", "  init %st = i64[2] [3, 0]\n  init %en = i64[2] [0, 3]\n  init %ax = i64[2] [2, 1]\n  init %sp = i64[2] [-2, 2]", "[2,2,2]", 13),
        ("Pad(%x, %p)", "  init %p = i64[6] [0, 1, 2, 1, 0, 1]", "[3,4,7]", 13),
        ("Concat(%x, %x) {axis = 1}", "", "[2,6,4]", 13),
    ];
    for (op, inits, y, opset) in cases {
        let text = graph(opset, "[2,3,4]", y, inits, &format!("n: %y = {op}"));
        check(&text, vec![tensor(&[2, 3, 4], 51)], &[], Mode::Inference);
    }
    // Split into two outputs, both feeding the loss.
    let text = "ir_version 8\nopset \"\" 13\n\ngraph main {\n  input %x: f32[2,5]\n  output %a: f32[2,2]\n  output %b: f32[2,3]\n  init %s = i64[2] [2, 3]\n  n: %a, %b = Split(%x, %s) {axis = 1}\n}\n";
    check(text, vec![tensor(&[2, 5], 52)], &[], Mode::Inference);
}

#[test]
fn a_small_network_end_to_end() {
    let text = r#"
ir_version 8
opset "" 13

graph main {
  input %x: f32[2,2,6,6]
  output %y: f32[2,3]
  init %w = f32[4,2,3,3] [W]
  init %s = f32[4] [0.9, 1.1, 1.0, 0.8]
  init %b = f32[4] [0.1, -0.1, 0.2, 0.0]
  init %m = f32[4] [0.0, 0.1, -0.1, 0.05]
  init %v = f32[4] [1.0, 0.9, 1.2, 1.1]
  init %fc = f32[3,4] [F]
  conv: %c = Conv(%x, %w) {pads = [1, 1, 1, 1]}
  bn: %n = BatchNormalization(%c, %s, %b, %m, %v)
  relu: %r = Relu(%n)
  res: %a = Add(%r, %c)
  pool: %p = GlobalAveragePool(%a)
  flat: %f = Flatten(%p)
  fc: %y = Gemm(%f, %fc) {transB = 1}
}
"#;
    let list = |n: usize, seed: u64| {
        values(n, seed)
            .iter()
            .map(|v| format!("{v:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let text = text
        .replace("[W]", &format!("[{}]", list(72, 61)))
        .replace("[F]", &format!("[{}]", list(12, 62)));
    for mode in [Mode::Training, Mode::Inference] {
        check(
            &text,
            vec![tensor(&[2, 2, 6, 6], 63)],
            &["w", "s", "b", "fc"],
            mode,
        );
    }
}

/// The derivative of a fake-quantized `x` by its scale `s` on the grid
/// `[lo, hi]` with zero point `zp`, in f64 from the papers: `qmin - z` or
/// `qmax - z` where `x` saturates, and inside LSQ's `round(x/s) - x/s`
/// (Esser et al. 2020, eq. 3) or PACT's 0 (Choi et al. 2018, eq. 3).
fn paper_scale_step(x: f32, s: f64, zp: i64, lo: f64, hi: f64, pact: bool) -> f64 {
    let v = x as f64 / s + zp as f64;
    if v < lo {
        lo - zp as f64
    } else if v > hi {
        hi - zp as f64
    } else if pact {
        0.0
    } else {
        (x as f64 / s).round_ties_even() - x as f64 / s
    }
}

/// Fake quantization (QuantizeLinear then DequantizeLinear): the
/// straight-through gradient of the input, and the scale's gradient by
/// LSQ's formula (Esser et al. 2020, eq. 3) or PACT's (Choi et al. 2018,
/// eq. 3), computed here in f64 from the definitions.
#[test]
fn fake_quantization_follows_the_papers() {
    for (pact, zp, dtype, lo, hi) in [
        (false, 0i64, "i8", -128f64, 127f64),
        (false, 10, "u8", 0.0, 255.0),
        (true, 0, "u8", 0.0, 255.0),
    ] {
        let meta = if pact {
            " meta \"qgraph.train.scale_gradient\" = \"pact\""
        } else {
            ""
        };
        let text = format!(
            "ir_version 8\nopset \"\" 13\n\ngraph main {{\n  input %x: f32[40]\n  output %y: f32[40]\n  init %s = f32[] [0.02]\n  init %z = {dtype}[] [{zp}]\n  q: %q = QuantizeLinear(%x, %s, %z){meta}\n  dq: %y = DequantizeLinear(%q, %s, %z)\n}}\n"
        );
        let model = qgraph_text::parse_model(&text).unwrap();
        let g = &model.graph;
        let ev = Evaluator::new(&model).unwrap();
        let s_id = g.value_by_name("s").unwrap();
        let params: HashMap<ValueId, Tensor> =
            [(s_id, Tensor::F32(ArrayD::from_elem(IxDyn(&[]), 0.02)))].into();
        // From far below the grid to far above it.
        let xs: Vec<f32> = (0..40).map(|i| (i as f32 - 14.0) * 0.2 + 0.013).collect();
        let x = Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[40]), xs.clone()).unwrap());
        let tape = ev.record(vec![x], &params, Mode::Training).unwrap();
        let r = values(40, 71);
        let seed = Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[40]), r.clone()).unwrap());
        let x_id = ev.required_inputs()[0];
        let grads = tape
            .backward(vec![(g.outputs()[0], seed)], &[x_id, s_id])
            .unwrap();
        let dx = f32s(&grads[&x_id]);
        let ds = f32s(&grads[&s_id]).iter().next().copied().unwrap() as f64;
        let s = 0.02f64;
        let mut want_ds = 0.0;
        for (e, (&xv, &rv)) in xs.iter().zip(&r).enumerate() {
            let v = xv as f64 / s + zp as f64;
            let inside = v >= lo && v <= hi;
            // dq = dy s, then dx = dq / s: equal to dy up to rounding.
            let want = if inside { rv } else { 0.0 };
            assert!(
                (dx[e] - want).abs() <= 1e-6 * want.abs(),
                "dx[{e}] at x = {xv}: {} against {want}",
                dx[e]
            );
            want_ds += rv as f64 * paper_scale_step(xv, s, zp, lo, hi, pact);
        }
        assert!(
            (ds - want_ds).abs() <= 1e-4 * want_ds.abs().max(1.0),
            "pact {pact}, zero point {zp}: ds {ds}, want {want_ds}"
        );
    }
}

#[test]
fn an_operator_without_a_gradient_is_named() {
    let text = graph(13, "[2,3]", "[2,3]", "", "fl: %y = Floor(%x)");
    let model = qgraph_text::parse_model(&text).unwrap();
    let ev = Evaluator::new(&model).unwrap();
    let params = HashMap::new();
    let tape = ev
        .record(vec![tensor(&[2, 3], 1)], &params, Mode::Inference)
        .unwrap();
    let x = ev.required_inputs()[0];
    let seed = tensor(&[2, 3], 2);
    let err = tape
        .backward(vec![(model.graph.outputs()[0], seed)], &[x])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("fl") && err.contains("gradient of Floor"),
        "{err}"
    );
}

/// The training graph's FakeQuantize on a 4-bit grid held in uint8: its
/// outputs are the bits of Clip + QuantizeLinear + DequantizeLinear, and its
/// gradients follow LSQ and PACT.
#[test]
fn fake_quantize_matches_its_q_dq_pair_and_the_papers() {
    let xs: Vec<f32> = (0..40).map(|i| (i as f32 - 14.0) * 0.05 + 0.013).collect();
    let (s, zp, qmin, qmax) = (0.07f64, 3i64, 0i64, 15i64);
    let (lo, hi) = (
        ((qmin - zp) as f64 * s) as f32,
        ((qmax - zp) as f64 * s) as f32,
    );
    let pair = format!(
        "ir_version 8\nopset \"\" 13\n\ngraph main {{\n  input %x: f32[40]\n  output %y: f32[40]\n  init %s = f32[] [0.07]\n  init %z = u8[] [3]\n  init %lo = f32[] [{lo:?}]\n  init %hi = f32[] [{hi:?}]\n  c: %c = Clip(%x, %lo, %hi)\n  q: %q = QuantizeLinear(%c, %s, %z)\n  dq: %y = DequantizeLinear(%q, %s, %z)\n}}\n"
    );
    let x = Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[40]), xs.clone()).unwrap());
    let pair = qgraph_text::parse_model(&pair).unwrap();
    let want = Evaluator::new(&pair).unwrap().run(vec![x.clone()]).unwrap();
    for method in ["lsq", "pact"] {
        let text = format!(
            "ir_version 8\nopset \"\" 13\nopset \"qgraph.train\" 1\n\ngraph main {{\n  input %x: f32[40]\n  output %y: f32[40]\n  init %s = f32[] [0.07]\n  init %z = u8[] [3]\n  fq: %y = qgraph.train.FakeQuantize(%x, %s, %z) {{qmin = 0, qmax = 15, method = \"{method}\"}}\n}}\n"
        );
        let model = qgraph_text::parse_model(&text).unwrap();
        let ev = Evaluator::new(&model).unwrap();
        let got = ev.run(vec![x.clone()]).unwrap();
        let bits = |t: &Tensor| f32s(t).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got[0]), bits(&want[0]), "{method}");
        let g = &model.graph;
        let s_id = g.value_by_name("s").unwrap();
        let params = HashMap::new();
        let tape = ev.record(vec![x.clone()], &params, Mode::Training).unwrap();
        let r = values(40, 72);
        let seed = Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[40]), r.clone()).unwrap());
        let x_id = ev.required_inputs()[0];
        let grads = tape
            .backward(vec![(g.outputs()[0], seed)], &[x_id, s_id])
            .unwrap();
        let dx = f32s(&grads[&x_id]);
        let mut want_ds = 0.0;
        for (e, (&xv, &rv)) in xs.iter().zip(&r).enumerate() {
            let v = xv as f64 / s + zp as f64;
            let inside = v >= qmin as f64 && v <= qmax as f64;
            assert_eq!(dx[e], if inside { rv } else { 0.0 });
            want_ds +=
                rv as f64 * paper_scale_step(xv, s, zp, qmin as f64, qmax as f64, method == "pact");
        }
        let ds = f32s(&grads[&s_id]).iter().next().copied().unwrap() as f64;
        assert!(
            (ds - want_ds).abs() <= 1e-4 * want_ds.abs().max(1.0),
            "{method}: {ds} against {want_ds}"
        );
    }
}

/// DoReFa's weight normalisation: central differences reach the maximum's
/// own element too (its gradient has the extra term of the moving maximum).
#[test]
fn tanh_normalization_of_weights() {
    let text = "ir_version 8\nopset \"\" 13\nopset \"qgraph.train\" 1\n\ngraph main {\n  input %x: f32[3,4]\n  output %y: f32[3,4]\n  n: %y = qgraph.train.TanhNormalize(%x) {scale = 0.7}\n}\n";
    // One clear maximum (|1.6|), so small shifts do not move it elsewhere.
    let mut x = values(12, 41);
    x[5] = -1.6;
    check(
        text,
        vec![Tensor::F32(
            ArrayD::from_shape_vec(IxDyn(&[3, 4]), x.clone()).unwrap(),
        )],
        &[],
        Mode::Inference,
    );
    let model: Model = qgraph_text::parse_model(text).unwrap();
    let out = Evaluator::new(&model)
        .unwrap()
        .run(vec![Tensor::F32(
            ArrayD::from_shape_vec(IxDyn(&[3, 4]), x.clone()).unwrap(),
        )])
        .unwrap();
    let y = f32s(&out[0]);
    let m = 1.6f32.tanh();
    for (y, x) in y.iter().zip(&x) {
        assert!((y - 0.7 * x.tanh() / m).abs() < 1e-6);
    }
    assert_eq!(y.iter().nth(5).copied(), Some(-0.7));
}

/// `tensor` times `k`.
fn scaled(shape: &[usize], seed: u64, k: f32) -> Tensor {
    let Tensor::F32(a) = tensor(shape, seed) else {
        unreachable!()
    };
    Tensor::F32(a.mapv(|v| v * k))
}

/// An initializer of values in [-k, k).
fn init_scaled(name: &str, shape: &[usize], seed: u64, k: f32) -> String {
    let n: usize = shape.iter().product();
    let vals: Vec<String> = values(n, seed)
        .iter()
        .map(|v| format!("{:?}", v * k))
        .collect();
    format!("  init %{name} = f32{shape:?} [{}]", vals.join(", "))
}

#[test]
fn layer_normalization() {
    let x = || scaled(&[2, 3, 4], 81, 2.0);
    // Over the last axis, with a bias.
    let inits = [init("s", &[4], 82), init("b", &[4], 83)].join("\n");
    let text = graph(
        17,
        "[2,3,4]",
        "[2,3,4]",
        &inits,
        "n: %y = LayerNormalization(%x, %s, %b)",
    );
    check(&text, vec![x()], &["s", "b"], Mode::Inference);
    // Over the last two axes, without a bias.
    let text = graph(
        17,
        "[2,3,4]",
        "[2,3,4]",
        &init("s", &[3, 4], 84),
        "n: %y = LayerNormalization(%x, %s) {axis = 1, epsilon = 0.001}",
    );
    check(&text, vec![x()], &["s"], Mode::Inference);
    // A scale broadcast along the normalised axes, leading 1s, over all
    // axes.
    for (axis, s) in [(-2i64, vec![3usize, 1]), (0, vec![1, 1, 1, 4])] {
        let text = graph(
            17,
            "[2,3,4]",
            "[2,3,4]",
            &[init("s", &s, 85), init("b", &[4], 86)].join("\n"),
            &format!("n: %y = LayerNormalization(%x, %s, %b) {{axis = {axis}}}"),
        );
        check(&text, vec![x()], &["s", "b"], Mode::Inference);
    }
    // With the Mean and InvStdDev outputs in the loss too.
    let text = format!(
        "ir_version 8\nopset \"\" 17\n\ngraph main {{\n  input %x: f32[2,3,4]\n  output %y: f32[2,3,4]\n  output %m: f32[2,1,1]\n  output %v: f32[2,1,1]\n{}\n{}\n  n: %y, %m, %v = LayerNormalization(%x, %s, %b) {{axis = 1}}\n}}\n",
        init("s", &[3, 4], 87),
        init("b", &[3, 4], 88)
    );
    check(&text, vec![x()], &["s", "b"], Mode::Inference);
}

#[test]
fn erf_and_gelu() {
    let text = graph(13, "[2,3,4]", "[2,3,4]", "", "n: %y = Erf(%x)");
    check(
        &text,
        vec![scaled(&[2, 3, 4], 91, 2.0)],
        &[],
        Mode::Inference,
    );
    for approximate in ["none", "tanh"] {
        let text = graph(
            20,
            "[2,3,4]",
            "[2,3,4]",
            "",
            &format!("n: %y = Gelu(%x) {{approximate = \"{approximate}\"}}"),
        );
        check(
            &text,
            vec![scaled(&[2, 3, 4], 92, 3.0)],
            &[],
            Mode::Inference,
        );
    }
}

/// Softmax and LogSoftmax over every axis: one axis from opset 13, the
/// input flattened at the axis before.
#[test]
fn softmax_family_over_every_axis() {
    for op in ["Softmax", "LogSoftmax"] {
        for opset in [11, 13] {
            for axis in [0i64, 1, 2, -1, -3] {
                let text = graph(
                    opset,
                    "[2,3,4]",
                    "[2,3,4]",
                    "",
                    &format!("n: %y = {op}(%x) {{axis = {axis}}}"),
                );
                check(
                    &text,
                    vec![scaled(&[2, 3, 4], 93, 3.0)],
                    &[],
                    Mode::Inference,
                );
            }
            // The default axis: 1 before opset 13, -1 from 13.
            let text = graph(
                opset,
                "[2,3,4]",
                "[2,3,4]",
                "",
                &format!("n: %y = {op}(%x)"),
            );
            check(
                &text,
                vec![scaled(&[2, 3, 4], 94, 3.0)],
                &[],
                Mode::Inference,
            );
        }
    }
}

#[test]
fn batched_matmul_with_broadcasting() {
    // (x shape, b shape, y shape, whether x is the first operand)
    let cases: [(&[usize], &[usize], &str, bool); 6] = [
        (&[2, 3, 4, 5], &[5, 6], "[2,3,4,6]", true),
        (&[2, 1, 4, 5], &[3, 5, 6], "[2,3,4,6]", true),
        (&[3, 5, 6], &[2, 1, 4, 5], "[2,3,4,6]", false),
        (&[5, 6], &[2, 3, 4, 5], "[2,3,4,6]", false),
        (&[2, 3, 4, 5], &[2, 3, 5, 4], "[2,3,4,4]", true),
        (&[1, 3, 4, 5], &[2, 1, 5, 2], "[2,3,4,2]", true),
    ];
    for (x, b, y, x_first) in cases {
        let node = if x_first {
            "mm: %y = MatMul(%x, %b)"
        } else {
            "mm: %y = MatMul(%b, %x)"
        };
        let text = graph(13, &format!("{x:?}"), y, &init("b", b, 101), node);
        check(&text, vec![tensor(x, 102)], &["b"], Mode::Inference);
    }
}

#[test]
fn where_and_expand_with_broadcasting() {
    let cond = "  init %c = bool[3,1] [true, false, true]";
    for node in ["n: %y = Where(%c, %x, %b)", "n: %y = Where(%c, %b, %x)"] {
        let text = graph(
            16,
            "[2,3,4]",
            "[2,3,4]",
            &format!("{cond}\n{}", init("b", &[4], 111)),
            node,
        );
        check(
            &text,
            vec![tensor(&[2, 3, 4], 112)],
            &["b"],
            Mode::Inference,
        );
    }
    // A scalar operand, a condition of higher rank than both.
    let text = graph(
        16,
        "[4]",
        "[2,3,4]",
        "  init %c = bool[2,3,1] [true, false, false, true, true, false]\n  init %b = f32[] [0.25]",
        "n: %y = Where(%c, %x, %b)",
    );
    check(&text, vec![tensor(&[4], 113)], &["b"], Mode::Inference);
    for (x, shape, y) in [
        ("[3,1]", "[2,3,4]", "[2,3,4]"),
        ("[1,4]", "[3,1]", "[3,4]"),
        ("[2,3]", "[2,3]", "[2,3]"),
    ] {
        let dims: Vec<usize> = x
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .map(|s| s.parse().unwrap())
            .collect();
        let sv: Vec<usize> = shape
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .map(|s| s.parse().unwrap())
            .collect();
        let text = graph(
            13,
            x,
            y,
            &format!("  init %s = i64[{}] {shape}", sv.len()),
            "n: %y = Expand(%x, %s)",
        );
        check(&text, vec![tensor(&dims, 114)], &[], Mode::Inference);
    }
}

#[test]
fn reduce_sum_and_mean_in_every_opset() {
    let cases = [
        (11, "ReduceSum(%x) {axes = [1], keepdims = 0}", "", "[2,4]"),
        (11, "ReduceSum(%x) {axes = [-1, 0]}", "", "[1,3,1]"),
        (11, "ReduceSum(%x) {keepdims = 0}", "", "[]"),
        (
            13,
            "ReduceSum(%x, %a) {keepdims = 0}",
            "  init %a = i64[2] [-1, 0]",
            "[3]",
        ),
        (13, "ReduceSum(%x, %a)", "  init %a = i64[1] [1]", "[2,1,4]"),
        (13, "ReduceSum(%x)", "", "[1,1,1]"),
        (
            13,
            "ReduceSum(%x) {noop_with_empty_axes = 1}",
            "",
            "[2,3,4]",
        ),
        (
            13,
            "ReduceSum(%x, %a) {noop_with_empty_axes = 1}",
            "  init %a = i64[0] []",
            "[2,3,4]",
        ),
        (
            18,
            "ReduceMean(%x, %a) {keepdims = 0}",
            "  init %a = i64[2] [1, -1]",
            "[2]",
        ),
        (
            18,
            "ReduceMean(%x, %a)",
            "  init %a = i64[1] [0]",
            "[1,3,4]",
        ),
        (18, "ReduceMean(%x) {keepdims = 0}", "", "[]"),
        (
            18,
            "ReduceMean(%x) {noop_with_empty_axes = 1}",
            "",
            "[2,3,4]",
        ),
        (
            13,
            "ReduceMean(%x) {axes = [2, 0], keepdims = 0}",
            "",
            "[3]",
        ),
    ];
    for (opset, op, inits, y) in cases {
        let text = graph(opset, "[2,3,4]", y, inits, &format!("n: %y = {op}"));
        check(&text, vec![tensor(&[2, 3, 4], 121)], &[], Mode::Inference);
    }
}

/// The embedding gradient: rows read twice get both gradients, negative
/// indices count from the end, any axis.
#[test]
fn gather_scatters_its_gradient_back() {
    let cases = [
        (
            "[5,4]",
            "  init %i = i64[2,3] [0, -1, 2, 2, 4, -5]",
            "{}",
            "[2,3,4]",
        ),
        (
            "[5,4]",
            "  init %i = i64[3] [-1, 0, -1]",
            "{axis = 1}",
            "[5,3]",
        ),
        (
            "[2,5,3]",
            "  init %i = i32[2,2] [1, 1, -2, 0]",
            "{axis = -2}",
            "[2,2,2,3]",
        ),
        ("[5,4]", "  init %i = i64[] [3]", "{}", "[4]"),
    ];
    for (x, inits, attrs, y) in cases {
        let dims: Vec<usize> = x
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .map(|s| s.parse().unwrap())
            .collect();
        let text = graph(13, x, y, inits, &format!("n: %y = Gather(%x, %i) {attrs}"));
        check(&text, vec![tensor(&dims, 131)], &[], Mode::Inference);
    }
}

/// Nearest Resize (and Upsample): each output's gradient goes to the
/// pixel it copies, in the forward's coordinate mapping and rounding.
#[test]
fn nearest_resize_sums_into_the_pixels_read() {
    let cases = [
        (13, "[1,2,3,4]", "Resize(%x, _, %s)", "  init %s = f32[4] [1.0, 1.0, 2.0, 2.0]", "[1,2,6,8]"),
        (13, "[1,2,4,6]", "Resize(%x, _, %s)", "  init %s = f32[4] [1.0, 1.0, 0.5, 0.5]", "[1,2,2,3]"),
        (
            13,
            "[1,2,3,4]",
            "Resize(%x, _, _, %z) {coordinate_transformation_mode = \"asymmetric\", nearest_mode = \"floor\"}",
            "  init %z = i64[4] [1, 2, 5, 7]",
            "[1,2,5,7]",
        ),
        (
            19,
            "[1,2,3,4]",
            "Resize(%x, _, _, %z) {coordinate_transformation_mode = \"align_corners\", nearest_mode = \"round_prefer_ceil\"}",
            "  init %z = i64[4] [2, 2, 5, 3]",
            "[2,2,5,3]",
        ),
        (
            18,
            "[1,2,3,4]",
            "Resize(%x, _, _, %z) {axes = [3, 2], coordinate_transformation_mode = \"pytorch_half_pixel\"}",
            "  init %z = i64[2] [9, 1]",
            "[1,2,1,9]",
        ),
        (10, "[1,2,3,4]", "Resize(%x, %s)", "  init %s = f32[4] [1.0, 1.0, 1.5, 2.5]", "[1,2,4,10]"),
        (9, "[1,2,3,4]", "Upsample(%x, %s)", "  init %s = f32[4] [1.0, 1.0, 2.0, 3.0]", "[1,2,6,12]"),
    ];
    for (opset, x, op, inits, y) in cases {
        let dims: Vec<usize> = x
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .map(|s| s.parse().unwrap())
            .collect();
        let text = graph(opset, x, y, inits, &format!("n: %y = {op}"));
        check(&text, vec![tensor(&dims, 141)], &[], Mode::Inference);
    }
}

#[test]
fn casts_pass_float_gradients_only() {
    // Float to float and back: the identity.
    let text = graph(
        13,
        "[2,3]",
        "[2,3]",
        "",
        "a: %d = Cast(%x) {to = 11}\n  b: %y = Cast(%d) {to = 1}",
    );
    check(&text, vec![tensor(&[2, 3], 151)], &[], Mode::Inference);
    // Through an integer: no gradient on that path (x times its own
    // truncation, values away from integers).
    let text = graph(
        13,
        "[2,3]",
        "[2,3]",
        "",
        "a: %i = Cast(%x) {to = 6}\n  b: %f = Cast(%i) {to = 1}\n  c: %y = Mul(%x, %f)",
    );
    let x = Tensor::F32(
        ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![-2.5, -1.3, 0.4, 1.7, 2.2, 3.6]).unwrap(),
    );
    check(&text, vec![x], &[], Mode::Inference);
}

/// The arithmetic of a layer normalization written out, and the other
/// elementwise operators, on a transformer's shapes.
#[test]
fn elementwise_operators_on_transformer_shapes() {
    let text = r#"
ir_version 8
opset "" 13

graph main {
  input %x: f32[2,4,8]
  output %y: f32[2,4,8]
  init %two = f32[] [2.0]
  init %eps = f32[] [0.00001]
  init %g = f32[8] [G]
  m: %m = ReduceMean(%x) {axes = [-1]}
  d: %d = Sub(%x, %m)
  p: %p = Pow(%d, %two)
  v: %v = ReduceMean(%p) {axes = [-1]}
  ve: %ve = Add(%v, %eps)
  s: %s = Sqrt(%ve)
  n: %n = Div(%d, %s)
  ng: %ng = Mul(%n, %g)
  t: %t = Tanh(%ng)
  sg: %sg = Sigmoid(%ng)
  y: %y = Mul(%t, %sg)
}
"#
    .replace(
        "[G]",
        &format!(
            "[{}]",
            values(8, 161)
                .iter()
                .map(|v| format!("{:?}", v + 1.0))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    check(
        &text,
        vec![scaled(&[2, 4, 8], 162, 2.0)],
        &["g"],
        Mode::Inference,
    );
}

/// A transformer encoder block as PyTorch exports it: token embeddings
/// (Gather from int64 ids) plus positions (Expand), LayerNormalization,
/// two-head attention with a padding mask (Where), the Erf form of GELU,
/// residual Adds, mean pooling and a classifier Gemm.
fn encoder_block(batch: &str) -> String {
    let mut inits = vec![
        init_scaled("emb", &[7, 8], 201, 1.0),
        init_scaled("pos", &[4, 8], 202, 0.5),
        init_scaled("ln1_s", &[8], 203, 0.2),
        init_scaled("ln1_b", &[8], 204, 0.1),
        init_scaled("wq", &[8, 8], 205, 0.5),
        init_scaled("bq", &[8], 206, 0.1),
        init_scaled("wk", &[8, 8], 207, 0.5),
        init_scaled("wv", &[8, 8], 208, 0.5),
        init_scaled("wo", &[8, 8], 209, 0.5),
        init_scaled("ln2_s", &[8], 210, 0.2),
        init_scaled("ln2_b", &[8], 211, 0.1),
        init_scaled("w1", &[8, 16], 212, 0.5),
        init_scaled("b1", &[16], 213, 0.1),
        init_scaled("w2", &[16, 8], 214, 0.3),
        init_scaled("wc", &[3, 8], 215, 0.5),
        init_scaled("bc", &[3], 216, 0.1),
    ];
    // Layer norm scales around 1.
    for name in ["ln1_s", "ln2_s"] {
        let line = inits
            .iter_mut()
            .find(|l| l.contains(&format!("%{name} ")))
            .unwrap();
        let n: Vec<String> = values(8, name.len() as u64 + 300)
            .iter()
            .map(|v| format!("{:?}", 1.0 + 0.2 * v))
            .collect();
        *line = format!("  init %{name} = f32[8] [{}]", n.join(", "));
    }
    let nodes = ENCODER_BLOCK_NODES;
    format!(
        r#"ir_version 8
opset "" 18

graph main {{
  input %ids: i64[{batch},4]
  output %logits: f32[{batch},3]
{inits}
{nodes}"#,
        inits = inits.join("\n"),
    )
}

#[test]
fn a_transformer_encoder_block_end_to_end() {
    let text = encoder_block("2");
    // Token 0 pads the ends of both sequences.
    let ids =
        Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[2, 4]), vec![3, 1, 5, 0, 6, 2, 0, 0]).unwrap());
    let params = [
        "emb", "pos", "ln1_s", "ln1_b", "wq", "bq", "wk", "wv", "wo", "ln2_s", "ln2_b", "w1", "b1",
        "w2", "wc", "bc",
    ];
    for mode in [Mode::Training, Mode::Inference] {
        check(&text, vec![ids.clone()], &params, mode);
    }
}

/// A linear Resize has no gradient here: an error naming the node, not a
/// panic or a wrong gradient.
#[test]
fn a_linear_resize_is_refused_by_name() {
    let text = graph(
        13,
        "[1,1,2,2]",
        "[1,1,4,4]",
        "  init %s = f32[4] [1.0, 1.0, 2.0, 2.0]",
        "up: %y = Resize(%x, _, %s) {mode = \"linear\"}",
    );
    let model = qgraph_text::parse_model(&text).unwrap();
    let ev = Evaluator::new(&model).unwrap();
    let params = HashMap::new();
    let tape = ev
        .record(vec![tensor(&[1, 1, 2, 2], 1)], &params, Mode::Inference)
        .unwrap();
    let x = ev.required_inputs()[0];
    let err = tape
        .backward(
            vec![(model.graph.outputs()[0], tensor(&[1, 1, 4, 4], 2))],
            &[x],
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("up") && err.contains("nearest"), "{err}");
}
