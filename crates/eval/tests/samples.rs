//! A batch runs as groups of samples only when the graph keeps samples
//! apart, and then gives each group's outputs exactly as the group alone
//! gives them, within 1e-5 of the batch run layer by layer.

use qgraph_eval::{Evaluator, Options};
use qgraph_ir::ndarray::{concatenate, ArrayD, Axis};
use qgraph_ir::Tensor;

/// A small network on 3x160x160 samples (76800 values: three to a group):
/// convolution, depthwise convolution, residual Add, pooling, a product.
const PER_SAMPLE: &str = r#"
ir_version 8
opset "" 13

graph main {
  input %x: f32[N,3,160,160]
  output %y: f32[N,5]
  init %w = f32[4,3,3,3] [0.5, -1.0, 0.25, 2.0, 1.5, 0.75, -0.5, 0.1, -2.0, 0.3, 0.6, -0.9, 1.1, -1.2, 0.7, 0.2, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, -0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7, -0.8, -0.9, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, 0.3, 0.1, -0.2, 0.5, -0.7, 0.9, -0.4, 0.6, 0.8, 0.5, -1.0, 0.25, 2.0, 1.5, 0.75, -0.5, 0.1, -2.0, 0.3, 0.6, -0.9, 1.1, -1.2, 0.7, 0.2, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, -0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7, -0.8, -0.9, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, 0.3, 0.1, -0.2, 0.5, -0.7, 0.9, -0.4, 0.6, 0.8, 0.3, -0.3, 0.2, 0.4]
  init %b = f32[4] [0.1, -0.2, 0.3, -0.4]
  init %dw = f32[4,1,3,3] [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, -0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7, -0.8, -0.9, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, 0.3, 0.1, -0.2, 0.5, -0.7, 0.9, -0.4, 0.6, 0.8]
  init %lo = f32[] [0.0]
  init %hi = f32[] [6.0]
  init %fc = f32[4,5] [0.5, -1.0, 0.25, 2.0, 1.5, 0.75, -0.5, 0.1, -2.0, 0.3, 0.6, -0.9, 1.1, -1.2, 0.7, 0.2, 0.1, 0.2, 0.3, 0.4]
  init %fb = f32[5] [0.1, -0.2, 0.3, -0.4, 0.5]
  conv: %c = Conv(%x, %w, %b) {pads = [1, 1, 1, 1], strides = [2, 2]}
  clip: %r = Clip(%c, %lo, %hi)
  depthwise: %d = Conv(%r, %dw) {group = 4, pads = [1, 1, 1, 1]}
  residual: %a = Add(%d, %r)
  pool: %p = GlobalAveragePool(%a)
  flatten: %f = Flatten(%p) {axis = 1}
  fc: %y = Gemm(%f, %fc, %fb)
}
"#;

fn images(batch: usize) -> Tensor {
    let shape = [batch, 3, 160, 160];
    let count: usize = shape.iter().product();
    let values = (0..count).map(|i| (i as f32 * 0.37).sin()).collect();
    Tensor::F32(ArrayD::from_shape_vec(shape.to_vec(), values).unwrap())
}

fn f32s(t: &Tensor) -> &ArrayD<f32> {
    match t {
        Tensor::F32(a) => a,
        t => panic!("expected f32, found {}", t.dtype()),
    }
}

#[test]
fn groups_give_what_each_group_gives_alone_and_about_what_the_whole_batch_gives() {
    let model = qgraph_text::parse_model(PER_SAMPLE).unwrap();
    let ev = Evaluator::new(&model).unwrap();
    assert!(ev.runs_sample_groups());
    let x = images(7);
    let grouped = ev.run(vec![x.clone()]).unwrap();
    let grouped = f32s(&grouped[0]);
    assert_eq!(grouped.shape(), &[7, 5]);
    // Groups of three: samples 0-2, 3-5, 6.
    let xs = f32s(&x);
    let alone: Vec<ArrayD<f32>> = [0..3, 3..6, 6..7]
        .into_iter()
        .map(|r| {
            let part = xs.slice_axis(Axis(0), r.into()).to_owned();
            let out = ev.run(vec![Tensor::F32(part)]).unwrap();
            f32s(&out[0]).clone()
        })
        .collect();
    let views: Vec<_> = alone.iter().map(|a| a.view()).collect();
    assert!(concatenate(Axis(0), &views).unwrap() == grouped);
    let whole = Evaluator::with_options(
        &model,
        Options {
            whole_batches: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(!whole.runs_sample_groups());
    let layered = whole.run(vec![x]).unwrap();
    let scale = grouped.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (a, b) in grouped.iter().zip(f32s(&layered[0]).iter()) {
        assert!((a - b).abs() <= 1e-5 * scale, "{a} vs {b}");
    }
}

/// The same network with one node replaced by `node`, which mixes samples.
fn with(node_from: &str, node_to: &str) -> bool {
    let text = PER_SAMPLE.replace(node_from, node_to);
    assert_ne!(text, PER_SAMPLE, "the replacement must apply");
    let model = qgraph_text::parse_model(&text).unwrap();
    Evaluator::new(&model).unwrap().runs_sample_groups()
}

#[test]
fn graphs_that_mix_samples_run_whole_batches() {
    let flatten = "flatten: %f = Flatten(%p) {axis = 1}";
    // Flattening from axis 0 folds the batch into one row.
    assert!(!with(flatten, "flatten: %f = Flatten(%p) {axis = 0}"));
    // A mean over the batch.
    assert!(!with(
        "pool: %p = GlobalAveragePool(%a)",
        "pool: %p = ReduceMean(%a) {axes = [0, 2, 3]}"
    ));
    // Arithmetic on the batch's size read from the data.
    let text = PER_SAMPLE
        .replace(
            "init %fb = f32[5] [0.1, -0.2, 0.3, -0.4, 0.5]",
            "init %fb = f32[5] [0.1, -0.2, 0.3, -0.4, 0.5]\n  init %zero = i64[] [0]",
        )
        .replace(
            flatten,
            "shape: %s = Shape(%p)\n  \
             gather: %n = Gather(%s, %zero) {axis = 0}\n  \
             cast: %nf = Cast(%n) {to = 1}\n  \
             share: %q = Div(%p, %nf)\n  \
             flatten: %f = Flatten(%q) {axis = 1}",
        );
    let model = qgraph_text::parse_model(&text).unwrap();
    assert!(!Evaluator::new(&model).unwrap().runs_sample_groups());
    // Axis 1 is kept: still per sample.
    assert!(with(
        "pool: %p = GlobalAveragePool(%a)",
        "pool: %p = ReduceMean(%a) {axes = [2, 3]}"
    ));
}

#[test]
fn a_reshape_to_the_batch_size_read_from_the_data_keeps_samples_apart() {
    let flatten = "flatten: %f = Flatten(%p) {axis = 1}";
    // What `x.view(x.size(0), -1)` exports to.
    let view = |index: &str| {
        format!(
            "shape: %s = Shape(%p)\n  \
             gather: %n = Gather(%s, %{index}) {{axis = 0}}\n  \
             unsqueeze: %u = Unsqueeze(%n, %zeros)\n  \
             concat: %t = Concat(%u, %rest) {{axis = 0}}\n  \
             flatten: %f = Reshape(%p, %t)"
        )
    };
    let constants = "init %fb = f32[5] [0.1, -0.2, 0.3, -0.4, 0.5]\n  \
                     init %zero = i64[] [0]\n  init %one = i64[] [1]\n  \
                     init %zeros = i64[1] [0]\n  init %rest = i64[1] [-1]";
    let text = PER_SAMPLE
        .replace("init %fb = f32[5] [0.1, -0.2, 0.3, -0.4, 0.5]", constants)
        .replace(flatten, &view("zero"));
    let model = qgraph_text::parse_model(&text).unwrap();
    let ev = Evaluator::new(&model).unwrap();
    assert!(ev.runs_sample_groups());
    let whole = Evaluator::with_options(
        &model,
        Options {
            whole_batches: true,
            ..Default::default()
        },
    )
    .unwrap();
    let (a, b) = (
        ev.run(vec![images(7)]).unwrap(),
        whole.run(vec![images(7)]).unwrap(),
    );
    assert_eq!(f32s(&a[0]).shape(), f32s(&b[0]).shape());
    // The size of dim 1 instead folds the batch into the rows.
    let text = text.replace(&view("zero"), &view("one"));
    let model = qgraph_text::parse_model(&text).unwrap();
    assert!(!Evaluator::new(&model).unwrap().runs_sample_groups());
}
