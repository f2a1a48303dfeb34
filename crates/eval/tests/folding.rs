//! Constant folding in the evaluator: the steps that read only
//! initializers and each other run once, when the evaluator is prepared.
//! A run then gives the values of the graph's nodes run one by one
//! (`run_node`, which neither plans nor folds), observers still see the
//! folded values they watch, a graph output may be folded, and a constant
//! step that fails is reported by each run, naming its node.

use qgraph_eval::{run_node, Evaluator};
use qgraph_ir::{Model, Tensor, ValueId};
use std::collections::HashMap;

/// PyTorch's export of TensorFlow's 'same' padding (pads computed from
/// constants, as in EfficientNet-Lite0), before a depthwise convolution,
/// whose output gets a constant product added.
const MODEL: &str = r#"
ir_version 8
opset "" 13

graph main {
  input %x: f32[N,2,4,4]
  output %y: f32[N,2,4,4]
  output %scale: f32[1,2,1,1]
  init %w = f32[2,1,2,2] [0.5, -1.0, 0.25, 2.0, 1.5, 0.75, -0.5, 0.1]
  init %a = f32[1,2,1,1] [1.5, -0.5]
  init %b = f32[1,2,1,1] [2.0, 0.25]
  c4: %four = Constant() {value = i64[1] [4]}
  c1: %base = Constant() {value = i64[4] [0, 1, 0, 1]}
  zeros: %rest = ConstantOfShape(%four) {value = i64[1] [0]}
  cat: %all = Concat(%rest, %base) {axis = 0}
  shape: %pairs_shape = Constant() {value = i64[2] [-1, 2]}
  pairs: %pairs = Reshape(%all, %pairs_shape)
  flip: %flipped = Transpose(%pairs) {perm = [1, 0]}
  flat_shape: %minus1 = Constant() {value = i64[1] [-1]}
  flat: %pads = Reshape(%flipped, %minus1)
  zero: %zero = Constant() {value = f32[] [0.0]}
  pad: %padded = Pad(%x, %pads, %zero) {mode = "constant"}
  conv: %c = Conv(%padded, %w) {group = 2}
  product: %scale = Mul(%a, %b)
  add: %y = Add(%c, %scale)
}
"#;

fn input(batch: usize) -> Tensor {
    let values = (0..batch * 32)
        .map(|i| (i as f32 * 0.37).sin() * 3.0)
        .collect();
    Tensor::F32(qgraph_ir::ndarray::ArrayD::from_shape_vec(vec![batch, 2, 4, 4], values).unwrap())
}

/// Every node run alone in graph order: the values a run must give.
fn node_by_node(model: &Model, x: Tensor) -> HashMap<ValueId, Tensor> {
    let g = &model.graph;
    let mut values: HashMap<ValueId, Tensor> = HashMap::new();
    values.insert(g.inputs()[0], x);
    for n in g.topo_order().unwrap() {
        let args: Vec<Option<Tensor>> = g
            .node(n)
            .inputs()
            .iter()
            .map(|v| {
                v.map(|v| {
                    values
                        .get(&v)
                        .cloned()
                        .unwrap_or_else(|| g.initializer(v).unwrap().tensor.clone())
                })
            })
            .collect();
        let refs: Vec<Option<&Tensor>> = args.iter().map(Option::as_ref).collect();
        let outs = run_node(g, n, 13, &refs).unwrap();
        for (v, t) in g.node(n).outputs().iter().zip(outs) {
            values.insert(v.unwrap(), t);
        }
    }
    values
}

#[test]
fn folded_constants_give_the_values_of_the_nodes_run_alone() {
    let model = qgraph_text::parse_model(MODEL).unwrap();
    let g = &model.graph;
    let ev = Evaluator::new(&model).unwrap();
    for batch in [1, 3] {
        let want = node_by_node(&model, input(batch));
        let got = ev.run(vec![input(batch)]).unwrap();
        for (i, v) in g.outputs().iter().enumerate() {
            assert!(got[i] == want[v], "batch {batch}: output {i} differs");
        }
        // Watched folded values reach the observer, with their values.
        let pads = g.value_by_name("pads").unwrap();
        let scale = g.value_by_name("scale").unwrap();
        let mut seen = Vec::new();
        ev.run_observed(vec![input(batch)], &[pads, scale], &mut |v, t| {
            seen.push((v, t.clone()))
        })
        .unwrap();
        assert_eq!(seen.len(), 2, "batch {batch}: {seen:?}");
        for (v, t) in seen {
            assert!(t == want[&v], "batch {batch}: observed value differs");
        }
    }
    // Only the steps that read the input run: the padding is computed
    // once, and the Pad still becomes the convolution's padding.
    let mut rows: Vec<String> = ev
        .profile(vec![input(2)])
        .unwrap()
        .into_iter()
        .map(|r| r.0)
        .collect();
    rows.sort();
    assert_eq!(rows, ["Add", "Pad+Conv(depthwise 2x2)"]);
}

#[test]
fn a_constant_step_that_fails_is_reported_by_the_run() {
    let text = MODEL.replace("[-1, 2]}", "[-1, 3]}");
    let model = qgraph_text::parse_model(&text).unwrap();
    let ev = Evaluator::new(&model).expect("preparing does not run the failing step");
    let err = ev.run(vec![input(1)]).unwrap_err().to_string();
    assert!(err.contains("pairs"), "{err}");
}
