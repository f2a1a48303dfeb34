//! Kernels that take over their first input's buffer when no one reads it
//! afterwards (Softmax in place, Reshape and its kin without a copy) give
//! the bits of the ordinary kernels, and leave alone a value that a later
//! node reads (the Reshape of `x`, which Softmax reads after it: a move
//! there would leave Softmax without its input), or that the graph outputs
//! (`p`, `r`). Softmax consumes `x`, a caller's input, and `f`; Squeeze,
//! Unsqueeze and Flatten theirs.

use qgraph_eval::{run_node, Evaluator};
use qgraph_ir::ndarray::ArrayD;
use qgraph_ir::Tensor;

const MODEL: &str = r#"
ir_version 8
opset "" 13

graph main {
  input %x: f32[2,3,8]
  output %p: f32[2,3,8]
  output %r: f32[6,8]
  output %u: f32[2,1,3,8]
  output %z: f32[8,6]
  init %shape = i64[2] [6, 8]
  init %axes = i64[1] [1]
  rs1: %r = Reshape(%x, %shape)
  sm1: %p = Softmax(%x)
  sm2: %pp = Softmax(%p) {axis = 1}
  sq: %s = Squeeze(%pp)
  us: %u = Unsqueeze(%s, %axes)
  tr: %t = Transpose(%r) {perm = [1, 0]}
  fl: %f = Flatten(%t)
  sm3: %z = Softmax(%f)
}
"#;

fn input() -> Tensor {
    let values = (0..48).map(|i| (i as f32 * 0.61).sin() * 4.0).collect();
    Tensor::F32(ArrayD::from_shape_vec(vec![2, 3, 8], values).unwrap())
}

/// Each node by the ordinary kernels, in order, every value kept.
fn node_by_node(model: &qgraph_ir::Model, x: Tensor) -> Vec<Tensor> {
    let g = &model.graph;
    let mut values: std::collections::HashMap<qgraph_ir::ValueId, Tensor> = Default::default();
    values.insert(g.inputs()[0], x);
    for v in g.initializers() {
        values.insert(v, g.initializer(v).unwrap().tensor.clone());
    }
    for name in ["rs1", "sm1", "sm2", "sq", "us", "tr", "fl", "sm3"] {
        let n = g.node_by_name(name).unwrap();
        let ins: Vec<Option<&Tensor>> = g
            .node(n)
            .inputs()
            .iter()
            .map(|v| v.map(|v| &values[&v]))
            .collect();
        let outs = run_node(g, n, 13, &ins).unwrap();
        let out = g.node(n).outputs()[0].unwrap();
        values.insert(out, outs.into_iter().next().unwrap());
    }
    g.outputs().iter().map(|v| values[v].clone()).collect()
}

fn bits(t: &Tensor) -> (Vec<usize>, Vec<u32>) {
    let Tensor::F32(a) = t else {
        panic!("f32 expected")
    };
    (a.shape().to_vec(), a.iter().map(|v| v.to_bits()).collect())
}

#[test]
fn consuming_kernels_give_the_ordinary_kernels_bits() {
    let model = qgraph_text::parse_model(MODEL).unwrap();
    let want = node_by_node(&model, input());
    let ev = Evaluator::new(&model).unwrap();
    // Twice: the first run's moves must not change what the second sees.
    for _ in 0..2 {
        let got = ev.run(vec![input()]).unwrap();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(bits(g), bits(w));
        }
    }
}
