#!/usr/bin/env python3
"""Checks models qgraph wrote: each passes the onnx checker and runs in ONNX
Runtime with outputs bit-identical to the original model's.

usage: onnx_check.py QGRAPH_BINARY MODEL.onnx [MODEL.onnx ...]

For each model: `qgraph convert` it, run onnx.checker (full check) on the
result, run original and result in ONNX Runtime on the same seeded random
input, and require max |difference| == 0. Prints one line per model and a
closing 'N passed, N failed' line; exits 1 on any failure.
"""
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from model_inputs import random_feeds


def run(path, feeds):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def check(qgraph, model, workdir):
    out = Path(workdir) / (model.stem + ".qgraph.onnx")
    proc = subprocess.run([qgraph, "convert", str(model), "-o", str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"qgraph convert failed: {proc.stderr.strip()}"
    onnx.checker.check_model(str(out), full_check=True)
    original = onnx.load(str(model))
    feeds = random_feeds(original, batch=1, seed=0)
    a, b = run(model, feeds), run(out, feeds)
    worst = max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) for x, y in zip(a, b))
    if worst != 0.0:
        return f"outputs differ: max abs diff {worst}"
    return None


def main():
    qgraph, models = sys.argv[1], [Path(m) for m in sys.argv[2:]]
    passed = failed = 0
    with tempfile.TemporaryDirectory() as workdir:
        for m in models:
            try:
                problem = check(qgraph, m, workdir)
            except Exception as e:  # the checker and ORT raise many kinds
                problem = f"{type(e).__name__}: {e}"
            if problem:
                failed += 1
                print(f"FAIL {m.name}: {problem}")
            else:
                passed += 1
                print(f"ok   {m.name}: onnx checker passes, ONNX Runtime outputs identical (max abs diff 0)")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
