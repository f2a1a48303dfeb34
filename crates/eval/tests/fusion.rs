//! The plan's fused Add (a residual connection run as a convolution's
//! epilogue) gives the bits of the nodes run one by one: with the
//! convolution's output as either input, after a product and after a
//! depthwise kernel, before a Relu; and an Add that broadcasts, which cannot
//! be fused, still runs (node by node).

use qgraph_eval::Evaluator;

const MODEL: &str = r#"
ir_version 8
opset "" 13

graph main {
  input %x: f32[N,4,5,5]
  input %r: f32[N,4,5,5]
  input %s: f32[1,4,1,1]
  output %y1: f32[N,4,5,5]
  output %y2: f32[N,4,5,5]
  output %y3: f32[N,4,5,5]
  init %w = f32[4,4,1,1] [0.5, -1.0, 0.25, 2.0, 1.5, 0.75, -0.5, 0.1, -2.0, 0.3, 0.6, -0.9, 1.1, -1.2, 0.7, 0.2]
  init %b = f32[4] [0.1, -0.2, 0.3, -0.4]
  init %dw = f32[4,1,3,3] [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, -0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7, -0.8, -0.9, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, 0.3, 0.1, -0.2, 0.5, -0.7, 0.9, -0.4, 0.6, 0.8]
  init %g = f32[4] [1.5, 0.5, -1.0, 2.0]
  init %t = f32[4] [0.1, -0.3, 0.2, 0.0]
  init %m = f32[4] [0.2, -0.1, 0.0, 0.3]
  init %v = f32[4] [0.9, 1.1, 1.0, 0.5]
  conv1: %c1 = Conv(%x, %w, %b)
  bn1: %n1 = BatchNormalization(%c1, %g, %t, %m, %v)
  add1: %a1 = Add(%n1, %r)
  relu1: %y1 = Relu(%a1)
  conv2: %c2 = Conv(%x, %dw) {group = 4, pads = [1, 1, 1, 1]}
  add2: %y2 = Add(%r, %c2)
  conv3: %c3 = Conv(%x, %w)
  add3: %y3 = Add(%c3, %s)
}
"#;

fn inputs(batch: usize) -> Vec<qgraph_ir::Tensor> {
    let tensor = |shape: &[usize], seed: f32| {
        let count: usize = shape.iter().product();
        let values = (0..count)
            .map(|i| (i as f32 * 0.37 + seed).sin() * 3.0)
            .collect();
        qgraph_ir::Tensor::F32(
            qgraph_ir::ndarray::ArrayD::from_shape_vec(shape.to_vec(), values).unwrap(),
        )
    };
    vec![
        tensor(&[batch, 4, 5, 5], 0.1),
        tensor(&[batch, 4, 5, 5], 1.3),
        tensor(&[1, 4, 1, 1], 2.7),
    ]
}

#[test]
fn a_fused_residual_add_gives_the_bits_of_the_nodes_alone() {
    let model = qgraph_text::parse_model(MODEL).unwrap();
    let ev = Evaluator::new(&model).unwrap();
    for batch in [1, 3] {
        let fused = ev.run(inputs(batch)).unwrap();
        let every = model.graph.value_ids();
        let alone = ev
            .run_observed(inputs(batch), &every, &mut |_, _| {})
            .unwrap();
        assert!(fused == alone, "batch {batch}: fusion changed a value");
    }
    let names = |rows: Vec<(String, usize, f64)>| -> Vec<String> {
        rows.into_iter().map(|(name, _, _)| name).collect()
    };
    let steps = names(ev.profile(inputs(2)).unwrap());
    for want in [
        "Conv(1x1)+BatchNormalization+Add+Relu",
        "Conv(depthwise 3x3)+Add",
    ] {
        assert!(
            steps.iter().any(|s| s == want),
            "no step {want} in {steps:?}"
        );
    }
    // Per node, each step is named after its first node too.
    let rows = names(ev.profile_nodes(inputs(2)).unwrap());
    for want in [
        "Conv(1x1)+BatchNormalization+Add+Relu conv1",
        "Conv(depthwise 3x3)+Add conv2",
    ] {
        assert!(rows.iter().any(|s| s == want), "no row {want} in {rows:?}");
    }
}
