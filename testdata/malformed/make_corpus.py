#!/usr/bin/env python3
"""Writes the malformed-model corpus in this folder (checked in; rerun only to
change it). Each file is one kind of bad input; EXPECTED.tsv says what
`qgraph convert` must say about it. Needs `pip install onnx`.
"""
from pathlib import Path

import onnx
from onnx import TensorProto, helper

HERE = Path(__file__).parent
LENET = HERE.parent / "models" / "lenet5_mnist_clntrained.onnx"


def model(nodes, inputs, outputs, initializers=(), opset=13, **graph_kw):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(initializers), **graph_kw)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def save(name, m_or_bytes):
    data = m_or_bytes if isinstance(m_or_bytes, bytes) else m_or_bytes.SerializeToString()
    (HERE / name).write_bytes(data)


X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
lenet = LENET.read_bytes()

save("empty.onnx", b"")
save("truncated.onnx", lenet[: len(lenet) // 3])
save("not_protobuf.onnx", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR this is a picture, not a model")
# Field 1 (ir_version, a varint) encoded as a length-delimited string.
save("wrong_field_type.onnx", b"\x0a\x03abc" + model([helper.make_node("Relu", ["x"], ["y"])], [X], [Y]).SerializeToString())
save("no_graph.onnx", onnx.ModelProto(ir_version=8).SerializeToString())
save("undefined_input.onnx", model([helper.make_node("Add", ["x", "ghost"], ["y"], name="add")], [X], [Y]))
save("undefined_output.onnx", model([helper.make_node("Relu", ["x"], ["t"], name="relu")], [X], [Y]))
save("cycle.onnx", model([
    helper.make_node("Add", ["x", "b"], ["a"], name="first"),
    helper.make_node("Relu", ["a"], ["b"], name="second"),
    helper.make_node("Identity", ["a"], ["y"], name="out"),
], [X], [Y]))
save("duplicate_value.onnx", model([
    helper.make_node("Relu", ["x"], ["y"], name="one"),
    helper.make_node("Neg", ["x"], ["y"], name="two"),
], [X], [Y]))
save("duplicate_node_name.onnx", model([
    helper.make_node("Relu", ["x"], ["t"], name="twin"),
    helper.make_node("Neg", ["t"], ["y"], name="twin"),
], [X], [Y]))
bad_type = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
bad_type.data_type = 99
save("unsupported_dtype.onnx", model([helper.make_node("Add", ["x", "w"], ["y"])], [X], [Y], [bad_type]))
short = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2, 3], raw_data=b"\x00" * 20)
save("raw_data_length.onnx", model([helper.make_node("Add", ["x", "w"], ["y"])], [X], [Y], [short]))
neg = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
del neg.dims[:]
neg.dims.extend([-2])
save("negative_dim.onnx", model([helper.make_node("Add", ["x", "w"], ["y"])], [X], [Y], [neg]))
huge = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1 << 40, 1 << 40, 1 << 40], raw_data=b"\x00" * 8)
save("huge_dims.onnx", model([helper.make_node("Add", ["x", "w"], ["y"])], [X], [Y], [huge]))
sparse = helper.make_sparse_tensor(
    helper.make_tensor("s", TensorProto.FLOAT, [1], [1.0]),
    helper.make_tensor("s_idx", TensorProto.INT64, [1], [0]),
    [2],
)
save("sparse_initializer.onnx", model([helper.make_node("Add", ["x", "s"], ["y"])], [X], [Y], sparse_initializer=[sparse]))
escape = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2], data_location=TensorProto.EXTERNAL)
escape.external_data.add(key="location", value="../../etc/passwd")
save("external_escape.onnx", model([helper.make_node("Add", ["x", "w"], ["y"])], [X], [Y], [escape]))
missing = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2], data_location=TensorProto.EXTERNAL)
missing.external_data.add(key="location", value="no_such_weights.bin")
save("external_missing.onnx", model([helper.make_node("Add", ["x", "w"], ["y"])], [X], [Y], [missing]))
save("domain_not_imported.onnx", model([helper.make_node("Gelu", ["x"], ["y"], name="gelu", domain="com.acme")], [X], [Y]))
odd = helper.make_node("Relu", ["x"], ["y"], name="relu")
odd.attribute.add(name="alpha", type=onnx.AttributeProto.INT, i=7)
# The type enum is field 20 (varint): INT (2) becomes 99, which no ONNX
# version defines.
odd_bytes = model([odd], [X], [Y]).SerializeToString()
assert odd_bytes.count(b"\xa0\x01\x02") == 1
save("unknown_attribute_type.onnx", odd_bytes.replace(b"\xa0\x01\x02", b"\xa0\x01\x63"))
# A node name that is not UTF-8 (protobuf strings must be).
m = model([helper.make_node("Relu", ["x"], ["y"], name="NAME")], [X], [Y]).SerializeToString()
save("bad_utf8.onnx", m.replace(b"NAME", b"N\xffME"))
print("corpus written to", HERE)
