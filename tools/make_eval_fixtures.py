#!/usr/bin/env python3
"""Writes testdata/eval/*.onnx: small models of quantization operators, each
carrying its own oracle. A model has no inputs; its input data is an
initializer, output 0 is the operator's result and output 1 is the result the
onnx package's ReferenceEvaluator computed (stored as an initializer). The
Rust test runs output 0 in qgraph's evaluator and requires it bit-equal to
output 1. Needs `pip install onnx numpy`. Rerun only to change the fixtures.
"""
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

OUT = Path(__file__).resolve().parent.parent / "testdata" / "eval"
rng = np.random.default_rng(7)


def tensor(name, array, dtype=None):
    if dtype in (TensorProto.INT4, TensorProto.UINT4):
        return helper.make_tensor(name, dtype, array.shape, array.flatten().tolist())
    return numpy_helper.from_array(array, name)


def fixture(name, op, inputs, attrs=None, opset=21, outputs=1):
    """inputs: list of (name, array, onnx dtype or None); absent optional
    inputs are (name, None, None). The model's outputs are the operator's
    outputs followed by the reference's results for each."""
    inits = [tensor(n, a, d) for n, a, d in inputs if a is not None]
    names = [n if a is not None else "" for n, a, _ in inputs]
    outs = [f"y{k}" for k in range(outputs)]
    node = helper.make_node(op, names, outs, **(attrs or {}))
    probe = helper.make_graph([node], name, [], [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outs], inits)
    m = helper.make_model(probe, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    results = ReferenceEvaluator(m).run(None, {})
    nodes, infos, refs = [node], [], []
    for k, expected in enumerate(results):
        expected = np.asarray(expected)
        exp_dtype = helper.np_dtype_to_tensor_dtype(expected.dtype)
        if op == "QuantizeLinear" and attrs and attrs.get("output_dtype") in (TensorProto.INT4, TensorProto.UINT4):
            exp_dtype = attrs["output_dtype"]
        elif op == "QuantizeLinear" and len(inputs) > 2 and inputs[2][2] in (TensorProto.INT4, TensorProto.UINT4):
            exp_dtype = inputs[2][2]
        if exp_dtype in (TensorProto.INT4, TensorProto.UINT4):
            refs.append(helper.make_tensor(f"expected{k}", exp_dtype, expected.shape, expected.astype(np.int8).flatten().tolist()))
        else:
            refs.append(numpy_helper.from_array(expected, f"expected{k}"))
        nodes.append(helper.make_node("Identity", [f"expected{k}"], [f"reference{k}"]))
        infos.append((exp_dtype, expected.shape))
    outputs_vi = [helper.make_tensor_value_info(o, d, s) for o, (d, s) in zip(outs, infos)]
    outputs_vi += [helper.make_tensor_value_info(f"reference{k}", d, s) for k, (d, s) in enumerate(infos)]
    g = helper.make_graph(nodes, name, [], outputs_vi, inits + refs)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(m)
    onnx.save(m, OUT / f"{name}.onnx")


x = (rng.standard_normal((2, 4, 3, 3)) * 3).astype(np.float32)
# Values at exact .5 multiples of the scale test round half to even.
halves = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 1000.0, -1000.0], dtype=np.float32)

fixture("q_u8_per_tensor", "QuantizeLinear", [("x", x, None), ("s", np.float32(0.05), None), ("z", np.uint8(128), None)], opset=19)
fixture("q_i8_round_half_even", "QuantizeLinear", [("x", halves, None), ("s", np.float32(1.0), None), ("z", np.int8(0), None)], opset=19)
fixture("q_i8_per_axis", "QuantizeLinear", [("x", x, None), ("s", np.array([0.01, 0.02, 0.05, 0.1], np.float32), None), ("z", np.array([0, 1, -2, 3], np.int8), None)], {"axis": 1}, opset=19)
fixture("q_i16", "QuantizeLinear", [("x", x, None), ("s", np.float32(0.001), None), ("z", np.int16(-7), None)])
fixture("q_u16_per_axis", "QuantizeLinear", [("x", x, None), ("s", np.array([0.001, 0.002, 0.003, 0.004], np.float32), None), ("z", np.array([30000, 0, 100, 65535], np.uint16), None)], {"axis": 1})
fixture("q_i4_blocked", "QuantizeLinear", [("x", x.reshape(2, 12, 3), None), ("s", np.array(rng.uniform(0.2, 1.0, (2, 3, 3)), np.float32), None), ("z", np.zeros((2, 3, 3), np.int8), TensorProto.INT4)], {"axis": 1, "block_size": 4})
fixture("q_u4_per_tensor", "QuantizeLinear", [("x", x, None), ("s", np.float32(0.5), None), ("z", np.array(8, np.uint8), TensorProto.UINT4)])
fixture("q_default_uint8_no_zp", "QuantizeLinear", [("x", x, None), ("s", np.float32(0.02), None)], opset=19)
fixture("dq_u8_per_tensor", "DequantizeLinear", [("x", rng.integers(0, 256, (3, 5), dtype=np.uint8), None), ("s", np.float32(0.05), None), ("z", np.uint8(128), None)], opset=19)
fixture("dq_i8_per_axis", "DequantizeLinear", [("x", rng.integers(-128, 128, (4, 3, 2, 2), dtype=np.int8), None), ("s", np.array([0.1, 0.2, 0.3, 0.4], np.float32), None), ("z", np.array([0, -1, 2, 5], np.int8), None)], {"axis": 0}, opset=19)
fixture("dq_i32_bias", "DequantizeLinear", [("x", rng.integers(-100000, 100000, (8,), dtype=np.int32), None), ("s", np.float32(0.0003), None)], opset=19)
fixture("dq_i16", "DequantizeLinear", [("x", rng.integers(-32768, 32768, (6, 2), dtype=np.int16), None), ("s", np.float32(0.001), None), ("z", np.int16(12), None)])
fixture("dq_i4_blocked", "DequantizeLinear", [("x", rng.integers(-8, 8, (6, 8), dtype=np.int8), TensorProto.INT4), ("s", np.array(rng.uniform(0.01, 0.1, (6, 2)), np.float32), None), ("z", rng.integers(-8, 8, (6, 2), dtype=np.int8), TensorProto.INT4)], {"axis": 1, "block_size": 4})
fixture("dq_u4_per_axis", "DequantizeLinear", [("x", rng.integers(0, 16, (3, 5), dtype=np.uint8), TensorProto.UINT4), ("s", np.array([0.1, 0.2, 0.3], np.float32), None), ("z", np.array([8, 0, 15], np.uint8), TensorProto.UINT4)], {"axis": 0})

# Integer operators (opset 10 semantics; the reference implements them there).
xu8 = rng.integers(0, 256, (1, 4, 6, 6), dtype=np.uint8)
wi8 = rng.integers(-128, 128, (6, 2, 3, 3), dtype=np.int8)
fixture("convinteger_u8_grouped", "ConvInteger", [("x", xu8, None), ("w", rng.integers(0, 256, (6, 2, 3, 3), dtype=np.uint8), None), ("xz", np.uint8(100), None), ("wz", np.uint8(7), None)], {"group": 2, "pads": [1, 0, 1, 2], "strides": [2, 1]}, opset=10)
fixture("convinteger_i8_per_channel_zp", "ConvInteger", [("x", rng.integers(-128, 128, (2, 4, 5, 5), dtype=np.int8), None), ("w", rng.integers(-128, 128, (3, 4, 2, 2), dtype=np.int8), None), ("xz", np.int8(-3), None), ("wz", np.array([1, -2, 0], np.int8), None)], {"dilations": [2, 2]}, opset=10)
fixture("matmulinteger_u8_i8", "MatMulInteger", [("a", rng.integers(0, 256, (5, 7), dtype=np.uint8), None), ("b", rng.integers(-128, 128, (7, 3), dtype=np.int8), None), ("az", np.uint8(128), None), ("bz", np.int8(-2), None)], opset=10)
fixture("matmulinteger_batched_per_column", "MatMulInteger", [("a", rng.integers(0, 256, (2, 3, 4), dtype=np.uint8), None), ("b", rng.integers(0, 256, (4, 5), dtype=np.uint8), None), ("az", np.uint8(3), None), ("bz", rng.integers(0, 256, (5,), dtype=np.uint8), None)], opset=10)
fixture("qlinearconv_u8_i8_per_channel", "QLinearConv", [
    ("x", xu8, None), ("xs", np.float32(0.02), None), ("xz", np.uint8(120), None),
    ("w", wi8, None), ("ws", np.array(rng.uniform(0.001, 0.01, 6), np.float32), None), ("wz", np.zeros(6, np.int8), None),
    ("ys", np.float32(0.07), None), ("yz", np.uint8(110), None), ("b", rng.integers(-5000, 5000, (6,), dtype=np.int32), None),
], {"group": 2, "pads": [1, 1, 1, 1], "strides": [1, 2]}, opset=10)
fixture("qlinearconv_i8_depthwise", "QLinearConv", [
    ("x", rng.integers(-128, 128, (1, 3, 5, 5), dtype=np.int8), None), ("xs", np.float32(0.05), None), ("xz", np.int8(-1), None),
    ("w", rng.integers(-127, 128, (3, 1, 3, 3), dtype=np.int8), None), ("ws", np.float32(0.004), None), ("wz", np.int8(0), None),
    ("ys", np.float32(0.03), None), ("yz", np.int8(5), None),
], {"group": 3, "auto_pad": "SAME_UPPER"}, opset=10)
fixture("qlinearmatmul_u8_i8_per_column", "QLinearMatMul", [
    ("a", rng.integers(0, 256, (4, 6), dtype=np.uint8), None), ("as", np.float32(0.02), None), ("az", np.uint8(128), None),
    ("b", rng.integers(-128, 128, (6, 3), dtype=np.int8), None), ("bs", np.array([0.01, 0.02, 0.005], np.float32), None), ("bz", np.zeros(3, np.int8), None),
    ("ys", np.float32(0.05), None), ("yz", np.uint8(100), None),
], opset=10)
fixture("dynamicquantizelinear", "DynamicQuantizeLinear", [("x", x, None)], opset=11, outputs=3)

# Float operators: files named float_* are compared within 1e-5 relative
# (the reference computes in float64, qgraph in float32 where the ONNX
# types say so).
img = rng.standard_normal((1, 2, 5, 7)).astype(np.float32)
empty = np.zeros((0,), np.float32)
fixture("float_resize_nearest_half_pixel", "Resize", [("x", img, None), ("roi", None, None), ("scales", np.array([1, 1, 2.0, 1.5], np.float32), None)], {"mode": "nearest"}, opset=19)
fixture("float_resize_nearest_asymmetric_sizes", "Resize", [("x", img, None), ("roi", None, None), ("scales", None, None), ("sizes", np.array([1, 2, 9, 4], np.int64), None)], {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "ceil"}, opset=19)
fixture("float_resize_linear_half_pixel_down", "Resize", [("x", img, None), ("roi", None, None), ("scales", np.array([1, 1, 0.6, 0.5], np.float32), None)], {"mode": "linear"}, opset=19)
fixture("float_resize_linear_align_corners", "Resize", [("x", img, None), ("roi", None, None), ("scales", None, None), ("sizes", np.array([1, 2, 8, 11], np.int64), None)], {"mode": "linear", "coordinate_transformation_mode": "align_corners"}, opset=19)
fixture("float_resize_linear_pytorch_half_pixel", "Resize", [("x", img, None), ("roi", None, None), ("scales", np.array([1, 1, 3.0, 2.0], np.float32), None)], {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}, opset=19)
fixture("float_convtranspose_strided", "ConvTranspose", [("x", rng.standard_normal((2, 4, 3, 4)).astype(np.float32), None), ("w", rng.standard_normal((4, 3, 3, 2)).astype(np.float32), None), ("b", rng.standard_normal(3).astype(np.float32), None)], {"strides": [2, 3], "pads": [1, 0, 0, 1], "output_padding": [1, 0]}, opset=19)
fixture("float_convtranspose_dilated", "ConvTranspose", [("x", rng.standard_normal((1, 3, 4, 4)).astype(np.float32), None), ("w", rng.standard_normal((3, 2, 3, 3)).astype(np.float32), None)], {"strides": [2, 2], "dilations": [2, 1], "pads": [1, 1, 2, 0]}, opset=19)
print("fixtures written to", OUT)
