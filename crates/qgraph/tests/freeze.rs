//! `qgraph freeze` as a library, on LeNet-5 calibrated on 64 digits: each
//! target keeps the Q/DQ graph's function (the evaluator as oracle, and
//! tract for the TensorRT form), stores integer weights, and the integer
//! form computes every quantized tensor within one step of the Q/DQ graph.

mod common;

use qgraph::freeze::{freeze, verify, Int4, Target};
use qgraph::insert::{insert, Calibration, Method, Prepare, Rounding};
use qgraph::ir::{DataType, Model, Tensor};
use qgraph::passes::{InsertOptions, Placement};
use qgraph::quant::Scheme;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn digits() -> qgraph::data::Dataset {
    qgraph::data::Dataset::load_npz(&root().join("testdata/data/mnist64.npz"), None, Some(""))
        .unwrap()
}

fn quantized(scheme: &str, placement: Placement) -> Model {
    quantized_with(scheme, placement, Method::MinMax, false)
}

/// `scheme` calibrated by `method`, scales powers of two with `pow2`.
fn quantized_with(scheme: &str, placement: Placement, method: Method, pow2: bool) -> Model {
    let mut model = qgraph::load(&root().join("testdata/models/lenet5_mnist_clntrained.onnx"))
        .unwrap()
        .model;
    let data = digits();
    let calibration = Calibration {
        data: &data,
        samples: (0..data.len()).collect(),
        norm: qgraph::data::Norm::None,
        batch: 16,
        method,
        rounding: Rounding::Nearest,
    };
    insert_calibrated(&mut model, scheme, placement, &calibration, pow2);
    model
}

/// `qgraph insert` of `scheme` into `model`, calibrated by `calibration`.
fn insert_calibrated(
    model: &mut Model,
    scheme: &str,
    placement: Placement,
    calibration: &Calibration,
    pow2: bool,
) {
    let mut scheme = Scheme::parse(scheme).unwrap();
    scheme.weights.pow2 = pow2;
    scheme.activations.pow2 = pow2;
    let options = InsertOptions {
        scheme,
        placement,
        ends_at_8_bits: false,
        overrides: Vec::new(),
    };
    insert(
        model,
        &options,
        Prepare::Deploy,
        true,
        Some(calibration),
        |_| {},
    )
    .unwrap();
}

/// tract's first output for `model` on the batch `x`.
fn tract_output(model: &Model, x: &Tensor) -> Vec<f32> {
    let Tensor::F32(xa) = x else { panic!("f32") };
    let input = (
        xa.shape().to_vec(),
        xa.iter().copied().collect::<Vec<f32>>(),
    );
    let bytes = qgraph::onnx::encode_model(model).unwrap();
    let out = common::run_tract(&bytes, &common::to_tract(&[input])).unwrap();
    out[0]
        .to_plain_array_view::<f32>()
        .unwrap()
        .iter()
        .copied()
        .collect()
}

fn outputs(model: &Model) -> Vec<Tensor> {
    let x = digits().batch(0, 64, qgraph::data::Norm::None).unwrap();
    qgraph::eval::Evaluator::new(model)
        .unwrap()
        .run(vec![x])
        .unwrap()
}

/// The graph's operator types, in node order.
fn op_types(g: &qgraph::ir::Graph) -> Vec<String> {
    g.node_ids()
        .into_iter()
        .map(|n| g.node(n).op_type.clone())
        .collect()
}

fn dtypes(model: &Model) -> Vec<DataType> {
    let g = &model.graph;
    g.initializers()
        .iter()
        .filter_map(|&v| g.initializer(v))
        .map(|i| i.tensor.dtype())
        .collect()
}

#[test]
fn tensorrt_target_stores_int8_weights_and_computes_the_same() {
    let qdq = quantized("int8", Placement::TensorRt);
    let mut frozen = qdq.clone();
    let report = freeze(&mut frozen, Target::TensorRt, Int4::Never).unwrap();
    assert!(report.changed.contains(&"fold-weight-quant".to_string()));
    qgraph::ir::verify_model(&frozen).unwrap();
    // No weight QuantizeLinear left; weights int8; no float weight left.
    let g = &frozen.graph;
    let quantize_of_constant = g.node_ids().into_iter().any(|n| {
        let node = g.node(n);
        node.op_type == "QuantizeLinear"
            && node.inputs()[0].is_some_and(|v| g.value(v).initializer().is_some())
    });
    assert!(!quantize_of_constant);
    let int8 = dtypes(&frozen)
        .iter()
        .filter(|d| **d == DataType::I8)
        .count();
    assert!(int8 >= 4, "{:?}", dtypes(&frozen));
    assert_eq!(outputs(&frozen), outputs(&qdq));
    // Smaller than a quarter of the float weights plus their scales.
    let bytes = |m: &Model| qgraph::onnx::encode_model(m).unwrap().len();
    let float = qgraph::load(&root().join("testdata/models/lenet5_mnist_clntrained.onnx"))
        .unwrap()
        .model;
    assert!(
        bytes(&frozen) * 10 < bytes(&float) * 3,
        "{} vs {}",
        bytes(&frozen),
        bytes(&float)
    );
    // tract runs the frozen file and agrees.
    let x = digits().batch(0, 64, qgraph::data::Norm::None).unwrap();
    let tract = tract_output(&frozen, &x);
    let Tensor::F32(ours) = &outputs(&frozen)[0] else {
        panic!("f32")
    };
    let scale = ours.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = ours
        .iter()
        .zip(tract.iter())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        diff <= 1e-4 * scale,
        "tract differs by {diff} (scale {scale})"
    );
}

#[test]
fn four_bit_weights_are_packed_as_int4_at_opset_21() {
    let qdq = quantized("w4a8", Placement::TensorRt);
    let mut frozen = qdq.clone();
    freeze(&mut frozen, Target::TensorRt, Int4::Auto).unwrap();
    assert_eq!(frozen.opset_version(""), Some(21));
    let int4 = dtypes(&frozen)
        .iter()
        .filter(|d| **d == DataType::I4)
        .count();
    assert!(int4 >= 4, "{:?}", dtypes(&frozen));
    assert_eq!(outputs(&frozen), outputs(&qdq));
    // The packed file reads back to the same model.
    let bytes = qgraph::onnx::encode_model(&frozen).unwrap();
    let back = qgraph::onnx::decode_model(&bytes).unwrap().model;
    assert_eq!(outputs(&back), outputs(&qdq));
}

#[test]
fn integer_target_is_integer_and_within_one_step_op_by_op() {
    let qdq = quantized("int8", Placement::Ort);
    let mut frozen = qdq.clone();
    let report = freeze(&mut frozen, Target::Integer, Int4::Auto).unwrap();
    assert!(report.float_ops.is_empty(), "{:?}", report.float_ops);
    let g = &frozen.graph;
    let ops = op_types(g);
    assert_eq!(ops.iter().filter(|o| *o == "QLinearConv").count(), 2);
    assert!(ops.contains(&"QGemm".to_string()), "{ops:?}");
    // The only float ops: the input's QuantizeLinear and the output's
    // float QGemm (its dequantize); no Conv/Gemm/Relu left.
    for op in ["Conv", "Gemm", "Relu", "DequantizeLinear"] {
        assert!(!ops.contains(&op.to_string()), "{op} left: {ops:?}");
    }
    let data = digits();
    let samples: Vec<usize> = (0..data.len()).collect();
    let norm = qgraph::data::Norm::None;
    let found = verify(&qdq, &frozen, &data, &samples, norm, 16, |_| {}).unwrap();
    let rows = &found.outputs;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].top1, Some(1.0));
    assert!(rows[0].within_one_lsb.unwrap() >= 0.999, "{rows:?}");
    let by_op = &found.ops;
    // Both convolutions and the first Gemm (the last one's output is float).
    assert_eq!(by_op.tensors, 3, "{by_op:?}");
    assert_eq!(by_op.within_one, by_op.elements, "{by_op:?}");
}

#[test]
fn power_of_two_scales_make_the_integer_target_exact() {
    for method in [Method::MinMax, Method::Mse] {
        let qdq = quantized_with("int8", Placement::Ort, method, true);
        let g = &qdq.graph;
        let mut scales = 0;
        for n in g.node_ids() {
            let node = g.node(n);
            if !node.op_type.ends_with("QuantizeLinear") {
                continue;
            }
            let scale = node.inputs()[1].unwrap();
            let Some(Tensor::F32(s)) = g.initializer(scale).map(|i| &i.tensor) else {
                panic!("{}: no constant scale", node.name());
            };
            for &s in s.iter() {
                assert_eq!(
                    qgraph::quant::pow2_neighbours(s).0,
                    s,
                    "{}: scale {s}",
                    node.name()
                );
                scales += 1;
            }
        }
        assert!(scales > 40, "{scales} scales");
        let mut frozen = qdq.clone();
        let report = freeze(&mut frozen, Target::Integer, Int4::Auto).unwrap();
        assert!(report.float_ops.is_empty(), "{:?}", report.float_ops);
        // Bit for bit: every dequantized product and sum is exact in f32, so
        // the Q/DQ graph rounds the same exact values the integer graph does.
        assert_eq!(outputs(&qdq), outputs(&frozen), "{method:?}");
    }
}

#[test]
fn integer_onnx_target_uses_standard_ops_and_runs_in_tract() {
    let qdq = quantized_with("int8", Placement::Ort, Method::MinMax, true);
    let mut frozen = qdq.clone();
    let report = freeze(&mut frozen, Target::IntegerOnnx, Int4::Auto).unwrap();
    assert!(report.float_ops.is_empty(), "{:?}", report.float_ops);
    let g = &frozen.graph;
    let ops = op_types(g);
    assert!(
        g.node_ids()
            .into_iter()
            .all(|n| g.node(n).domain.is_empty()),
        "{ops:?}"
    );
    // Two convolutions and the first Gemm (as a 1x1 convolution); the last
    // Gemm, whose output is float, as MatMulInteger.
    assert_eq!(
        ops.iter().filter(|o| *o == "QLinearConv").count(),
        3,
        "{ops:?}"
    );
    assert_eq!(
        ops.iter().filter(|o| *o == "MatMulInteger").count(),
        1,
        "{ops:?}"
    );
    for op in ["Conv", "Gemm", "QGemm"] {
        assert!(!ops.contains(&op.to_string()), "{op} left: {ops:?}");
    }
    // Power-of-two scales: the same values as the Q/DQ graph, bit for bit.
    assert_eq!(outputs(&qdq), outputs(&frozen));
    // tract loads and runs it, and computes the same values (its integer
    // requantization rounds exact values as ONNX says).
    let tract = tract_output(
        &frozen,
        &digits().batch(0, 64, qgraph::data::Norm::None).unwrap(),
    );
    let Tensor::F32(ours) = &outputs(&frozen)[0] else {
        panic!("f32")
    };
    let equal = ours
        .iter()
        .zip(tract.iter())
        .filter(|(a, b)| a == b)
        .count();
    assert_eq!(
        equal,
        ours.len(),
        "tract equals qgraph on {equal} of {} outputs",
        ours.len()
    );
}

#[test]
fn integer_onnx_target_runs_in_tract_on_mobilenet_v2() {
    let Some(models) = common::shared_models() else {
        return;
    };
    let Some(path) = models.iter().find(|p| p.ends_with("mobilenetv2_bn.onnx")) else {
        eprintln!("SKIPPED: mobilenetv2_bn.onnx is absent");
        return;
    };
    let photos = path.parent().unwrap().join("../data/photos_calib_dev.npz");
    let data = qgraph::data::Dataset::load_npz(&photos, Some("x_u8"), Some("")).unwrap();
    let norm = qgraph::data::Norm::Imagenet;
    let mut model = qgraph::load(path).unwrap().model;
    let calibration = Calibration {
        data: &data,
        samples: vec![0, 100, 200, 300],
        norm,
        batch: 4,
        method: Method::MinMax,
        rounding: Rounding::Nearest,
    };
    insert_calibrated(&mut model, "int8", Placement::Ort, &calibration, true);
    let qdq = model.clone();
    let report = freeze(&mut model, Target::IntegerOnnx, Int4::Auto).unwrap();
    let g = &model.graph;
    assert!(g
        .node_ids()
        .into_iter()
        .all(|n| g.node(n).domain.is_empty()));
    // What has no standard integer operator stays float between Q/DQ.
    let left: Vec<&str> = report.float_ops.iter().map(|(op, _)| op.as_str()).collect();
    assert_eq!(left, ["Add", "GlobalAveragePool"], "{:?}", report.float_ops);
    let x = data.batch(50, 52, norm).unwrap();
    let run = |m: &Model| {
        let out = qgraph::eval::Evaluator::new(m)
            .unwrap()
            .run(vec![x.clone()])
            .unwrap();
        let Tensor::F32(a) = &out[0] else {
            panic!("f32")
        };
        a.iter().copied().collect::<Vec<f32>>()
    };
    let ours = run(&model);
    assert_eq!(
        ours,
        run(&qdq),
        "power-of-two scales: the Q/DQ graph's values"
    );
    let tract = tract_output(&model, &x);
    let equal = ours.iter().zip(&tract).filter(|(a, b)| a == b).count();
    let diff = ours
        .iter()
        .zip(&tract)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    eprintln!(
        "tract: {equal} of {} equal, largest difference {diff}",
        ours.len()
    );
    assert_eq!(equal, ours.len(), "largest difference {diff}");
}
