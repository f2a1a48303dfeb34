//! `qgraph verify` as a library, on LeNet-5 calibrated on 64 digits: the
//! integer freeze is exact op by op and agrees end to end, the table says
//! so in its verdict, and a frozen model with one weight changed is caught
//! op by op and warned about.

use qgraph::freeze::{freeze, verify, verify_table, Int4, Target, Verification};
use qgraph::insert::{insert, Calibration, Rounding};
use qgraph::ir::{Model, Tensor};
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

/// LeNet-5 with int8 Q/DQ pairs where ONNX Runtime puts them, calibrated
/// on the 64 digits, and its integer freeze.
fn quantized_and_frozen() -> (Model, Model) {
    let mut qdq = qgraph::load(&root().join("testdata/models/lenet5_mnist_clntrained.onnx"))
        .unwrap()
        .model;
    let data = digits();
    let calibration = Calibration {
        batch: 16,
        rounding: Rounding::Nearest,
        ..Calibration::new(&data)
    };
    let options = InsertOptions {
        placement: Placement::Ort,
        ends_at_8_bits: false,
        ..InsertOptions::new(Scheme::parse("int8").unwrap())
    };
    insert(
        &mut qdq,
        &options,
        qgraph::insert::Prepare::Deploy,
        true,
        Some(&calibration),
        |_| {},
    )
    .unwrap();
    let mut frozen = qdq.clone();
    freeze(&mut frozen, Target::Integer, Int4::Auto).unwrap();
    (qdq, frozen)
}

fn verify_on_digits(reference: &Model, frozen: &Model, batch: usize) -> Verification {
    let data = digits();
    let samples: Vec<usize> = (0..data.len()).collect();
    let mut done = Vec::new();
    let found = verify(
        reference,
        frozen,
        &data,
        &samples,
        qgraph::data::Norm::None,
        batch,
        |n| done.push(n),
    )
    .unwrap();
    // Progress after each batch, ending at every sample.
    assert_eq!(done.last(), Some(&samples.len()), "{done:?}");
    found
}

#[test]
fn integer_freeze_is_within_one_step_op_by_op_and_the_verdict_says_so() {
    let (qdq, frozen) = quantized_and_frozen();
    let found = verify_on_digits(&qdq, &frozen, 16);
    let ops = &found.ops;
    // Both convolutions and the first Gemm (the last one's output is float).
    assert_eq!(ops.tensors, 3, "{ops:?}");
    assert_eq!(ops.within_one, ops.elements, "{ops:?}");
    assert!(ops.max_steps <= 1, "{ops:?}");
    assert!(ops.equal > 0 && ops.elements >= 64 * 10, "{ops:?}");
    assert_eq!(found.outputs.len(), 1);
    let top1 = found.outputs[0].top1.unwrap();
    assert!(top1 >= 0.95, "{:?}", found.outputs);
    // On this model, the figures do not depend on the batch size.
    assert_eq!(verify_on_digits(&qdq, &frozen, 7), found);

    let text = verify_table(&found);
    assert!(text.starts_with("output "), "{text}");
    assert!(
        text.contains(
            "verdict: the frozen model computes what the Q/DQ model does, op by op (3 \
             quantized tensors, all within 1 LSB)"
        ),
        "{text}"
    );
    assert!(text.contains("op by op (each op on the reference's own integer inputs): 3"));
    assert!(text.contains("What is normal"), "{text}");
    assert!(!text.contains("warning"), "{text}");
    // A note on top-1 only when some class changed.
    assert_eq!(text.contains("note: the top-1 class"), top1 < 1.0, "{text}");
}

#[test]
fn a_changed_weight_is_caught_op_by_op_and_warned_about() {
    let (qdq, mut frozen) = quantized_and_frozen();
    // One integer weight of the first QLinearConv, 20 steps off.
    let g = &mut frozen.graph;
    let conv = g
        .topo_order()
        .unwrap()
        .into_iter()
        .find(|&n| g.node(n).op_type == "QLinearConv")
        .expect("the integer freeze has QLinearConv");
    let w = g.node(conv).inputs()[3].unwrap();
    let init = g.initializer_mut(w).unwrap().expect("integer weights");
    let Tensor::I8(weights) = &mut init.tensor else {
        panic!("int8 weights expected, found {}", init.tensor.dtype());
    };
    let first = weights.iter_mut().next().unwrap();
    *first = if *first > 100 {
        *first - 20
    } else {
        *first + 20
    };

    let found = verify_on_digits(&qdq, &frozen, 16);
    let ops = &found.ops;
    assert!(ops.max_steps > 1, "{ops:?}");
    assert!(ops.within_one < ops.elements, "{ops:?}");
    assert_eq!(ops.worst, g_output_name(&frozen, conv), "{ops:?}");
    let text = verify_table(&found);
    assert!(text.contains("warning: op by op, "), "{text}");
    assert!(
        text.contains(&format!("up to {} LSB", ops.max_steps)),
        "{text}"
    );
    assert!(
        !text.contains("verdict: the frozen model computes"),
        "{text}"
    );
}

/// The quantized tensor the Clip after `conv` makes (what the reference
/// quantizes), or the QLinearConv's own output when none follows.
fn g_output_name(model: &Model, conv: qgraph::ir::NodeId) -> String {
    let g = &model.graph;
    let out = g.node(conv).outputs()[0].unwrap();
    let next = g
        .consumers(out)
        .into_iter()
        .map(|(n, _)| n)
        .find(|&n| g.node(n).op_type == "Clip");
    let v = next.map_or(out, |n| g.node(n).outputs()[0].unwrap());
    g.value(v).name().to_string()
}

#[test]
fn a_model_against_itself_has_no_op_by_op_check_and_the_verdict_says_so() {
    let (qdq, _) = quantized_and_frozen();
    let found = verify_on_digits(&qdq, &qdq, 16);
    assert_eq!(found.ops.tensors, 0, "{:?}", found.ops);
    let row = &found.outputs[0];
    assert_eq!(row.max_relative, 0.0, "{row:?}");
    assert_eq!(row.top1, Some(1.0), "{row:?}");
    let text = verify_table(&found);
    assert!(text.contains("verdict: no op-by-op check"), "{text}");
    assert!(!text.contains("op by op (each op"), "{text}");
}
