#!/usr/bin/env python3
"""Writes a small untrained ResNet-style CNN for 1x28x28 images (Fashion-MNIST) as ONNX.

  python3 tools/make_cnn.py out.onnx [--width 16] [--seed 0]

Stem conv3x3 -> BN -> ReLU, a residual block, then two stages of (stride-2 conv3x3 -> BN -> ReLU,
residual block), global average pooling and a linear classifier to 10 classes. A residual block
is conv-BN-ReLU-conv-BN plus its input, then ReLU. Weights are He-initialised from the seed;
batch normalisations start at the identity (scale 1, shift 0, mean 0, variance 1). Opset 13,
input 'input' f32[N,1,28,28], output 'logits' f32[N,10]. Needs `pip install onnx numpy`.
"""
import argparse

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Builder:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []

    def init(self, name, array):
        self.inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def conv_bn(self, name, x, cin, cout, stride=1, relu=True):
        fan_in = cin * 9
        w = self.rng.normal(0.0, np.sqrt(2.0 / fan_in), (cout, cin, 3, 3))
        self.init(f"{name}.weight", w)
        self.nodes.append(helper.make_node(
            "Conv", [x, f"{name}.weight"], [f"{name}.conv"], name=f"{name}/Conv",
            kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[stride, stride]))
        for p, v in [("scale", 1.0), ("shift", 0.0), ("mean", 0.0), ("var", 1.0)]:
            self.init(f"{name}.bn.{p}", np.full(cout, v))
        self.nodes.append(helper.make_node(
            "BatchNormalization",
            [f"{name}.conv"] + [f"{name}.bn.{p}" for p in ("scale", "shift", "mean", "var")],
            [f"{name}.bn"], name=f"{name}/BatchNormalization", epsilon=1e-5, momentum=0.9))
        if not relu:
            return f"{name}.bn"
        self.nodes.append(helper.make_node("Relu", [f"{name}.bn"], [f"{name}.relu"],
                                           name=f"{name}/Relu"))
        return f"{name}.relu"

    def block(self, name, x, c):
        h = self.conv_bn(f"{name}.a", x, c, c)
        h = self.conv_bn(f"{name}.b", h, c, c, relu=False)
        self.nodes.append(helper.make_node("Add", [h, x], [f"{name}.sum"], name=f"{name}/Add"))
        self.nodes.append(helper.make_node("Relu", [f"{name}.sum"], [f"{name}.out"],
                                           name=f"{name}/Relu"))
        return f"{name}.out"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("output")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    b = Builder(a.seed)
    w = a.width
    x = b.conv_bn("stem", "input", 1, w)
    x = b.block("stage1", x, w)
    x = b.conv_bn("down2", x, w, 2 * w, stride=2)
    x = b.block("stage2", x, 2 * w)
    x = b.conv_bn("down3", x, 2 * w, 4 * w, stride=2)
    x = b.block("stage3", x, 4 * w)
    b.nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"], name="pool"))
    b.nodes.append(helper.make_node("Flatten", ["pooled"], ["features"], name="flatten", axis=1))
    fc = b.rng.normal(0.0, np.sqrt(1.0 / (4 * w)), (10, 4 * w))
    b.init("fc.weight", fc)
    b.init("fc.bias", np.zeros(10))
    b.nodes.append(helper.make_node("Gemm", ["features", "fc.weight", "fc.bias"], ["logits"],
                                    name="fc", transB=1))
    graph = helper.make_graph(
        b.nodes, "fashion_resnet",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="qgraph tools/make_cnn.py")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, a.output)


if __name__ == "__main__":
    main()
