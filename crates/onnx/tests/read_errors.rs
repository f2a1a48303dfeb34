//! Read errors are one line of reasonable length, whatever the file.

#[path = "support/nested_ifs.rs"]
mod support;

use qgraph_ir::{AttrValue, DataType, Graph, Model, NewNode, TensorType, ValueType};
use support::nested_ifs;

fn assert_one_short_line(message: &str) {
    assert!(!message.contains('\n'), "more than one line: {message}");
    assert!(
        message.len() < 300,
        "{} characters: {message}",
        message.len()
    );
}

#[test]
fn ifs_nested_32_deep_are_read() {
    let bytes = qgraph_onnx::encode_model(&nested_ifs(32)).unwrap();
    let loaded = qgraph_onnx::decode_model(&bytes).unwrap();
    assert_eq!(loaded.model, nested_ifs(32));
}

#[test]
fn ifs_nested_33_deep_are_refused_in_one_line() {
    let bytes = qgraph_onnx::encode_model(&nested_ifs(33)).unwrap();
    let e = qgraph_onnx::decode_model(&bytes).unwrap_err().to_string();
    assert_eq!(
        e,
        "unsupported: subgraphs nested more than 32 levels deep, deeper than protobuf decoding \
         allows (prost's recursion limit of 100 nested messages)"
    );
    assert_one_short_line(&e);
}

#[test]
fn decoding_errors_are_one_short_line() {
    // prost's own message names every enclosing field, here up to a hundred
    // of them. Break the file anywhere: cut it, or set a byte to a tag of
    // wire type 7, which does not exist.
    let bytes = qgraph_onnx::encode_model(&nested_ifs(30)).unwrap();
    let mut errors = Vec::new();
    for at in (0..bytes.len()).step_by(13) {
        let mut bad = bytes.clone();
        bad[at] = 0x0f;
        errors.extend(qgraph_onnx::decode_model(&bad).err());
        errors.extend(qgraph_onnx::decode_model(&bytes[..at]).err());
    }
    for e in &errors {
        let e = e.to_string();
        assert_one_short_line(&e);
        if e.contains("protobuf decoding failed") {
            assert!(!e.contains("[..."), "nothing cut from the middle: {e}");
        }
    }
    // The innermost node (the first Identity in the file: then-branches come
    // before else-branches), its op_type: NodeProto field 4, tag 0x22.
    let mut bad = bytes.clone();
    let at = bad
        .windows(10)
        .position(|w| w == b"\x22\x08Identity")
        .unwrap();
    bad[at] = 0x27;
    let e = qgraph_onnx::decode_model(&bad).unwrap_err().to_string();
    assert_eq!(
        e,
        "not a valid ONNX file: protobuf decoding failed (failed to decode Protobuf message: \
         GraphProto.node: (90 more): ModelProto.graph: invalid wire type \
         value: 7); the file is truncated, corrupt, or not an ONNX model"
    );
    // A short path is kept as prost writes it.
    let mut bad = bytes.clone();
    bad[0] = 0x0a; // field 1 (ir_version, a varint) as length-delimited
    let e = qgraph_onnx::decode_model(&bad).unwrap_err().to_string();
    assert!(
        e.contains("failed to decode Protobuf message: ModelProto.ir_version: invalid wire type"),
        "{e}"
    );
    assert_one_short_line(&e);
}

#[test]
fn model_errors_deep_in_subgraphs_are_one_short_line() {
    // An error in the innermost graph is prefixed with every enclosing node
    // and attribute: give its node an attribute of type 99, which no ONNX
    // version has (AttributeProto.type is field 20: tag bytes a0 01).
    let mut model = nested_ifs(30);
    let mut g = &mut model.graph;
    loop {
        let n = g.node_ids()[0];
        let node = g.node_mut(n).unwrap();
        if node.op_type == "Identity" {
            node.attrs
                .push(qgraph_ir::Attribute::new("marker", AttrValue::Int(5)));
            break;
        }
        g = match &mut node.attrs[0].value {
            AttrValue::Graph(b) => b,
            _ => unreachable!("then_branch comes first"),
        };
    }
    let mut bytes = qgraph_onnx::encode_model(&model).unwrap();
    let at = bytes
        .windows(6)
        .position(|w| w == b"marker")
        .expect("the attribute is in the file");
    let ty = at
        + bytes[at..]
            .windows(3)
            .position(|w| w == [0xa0, 0x01, 0x02])
            .expect("its type follows");
    bytes[ty + 2] = 99;
    let e = qgraph_onnx::decode_model(&bytes).unwrap_err().to_string();
    assert!(e.contains("unknown attribute type 99"), "{e}");
    assert!(
        e.starts_with("node 'if1' (If), attribute 'then_branch'"),
        "{e}"
    );
    assert!(!e.contains('\n'), "{e}");
    assert!(e.chars().count() < 500, "{} characters: {e}", e.len());
}

#[test]
fn types_nested_past_the_recursion_limit_are_refused_in_one_line() {
    let mut ty = ValueType::Tensor(TensorType::new(DataType::F32, vec![]));
    for _ in 0..60 {
        ty = ValueType::Sequence(Box::new(ty));
    }
    let mut g = Graph::new("g");
    let x = g.add_input("x", Some(ty)).unwrap();
    let y = g.add_value("y", None).unwrap();
    g.add_node(NewNode::new("Identity").inputs([x]).outputs([y]))
        .unwrap();
    g.set_outputs(vec![y]).unwrap();
    let bytes = qgraph_onnx::encode_model(&Model::new(g, 17)).unwrap();
    let e = qgraph_onnx::decode_model(&bytes).unwrap_err().to_string();
    assert_eq!(
        e,
        "unsupported: messages nested deeper than protobuf decoding allows (prost's recursion \
         limit of 100 nested messages)"
    );
}
