#!/usr/bin/env python3
"""qgraph's evaluator against ONNX Runtime on a model's real inputs.

usage: data_check.py QGRAPH MODEL.onnx DATA.npz [--limit N] [--atol 1e-4]

DATA.npz holds one array per model input, named after it, batch on the
axis the model declares (an input whose declared rank matches the array's
without a batch axis, such as a scalar, is passed whole). The first N
samples (all by default) go through `qgraph infer` and through ONNX Runtime
(graph optimisations off); every output must agree within --atol (absolute)
or --rtol (relative), whichever is looser. Prints the largest differences
and exits 1 when an output disagrees, 2 when either runtime fails.
"""

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort


def batch_axis(model, name, array):
    """The axis of `array` that holds samples, or None (passed whole)."""
    for inp in model.graph.input:
        if inp.name != name:
            continue
        dims = inp.type.tensor_type.shape.dim
        if len(dims) != array.ndim or array.ndim == 0:
            return None
        # The first open (symbolic) dim is the batch.
        for k, d in enumerate(dims):
            if not d.HasField("dim_value"):
                return k
        return None
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("qgraph")
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--rtol", type=float, default=0.0)
    args = ap.parse_args()

    model = onnx.load(args.model, load_external_data=False)
    data = dict(np.load(args.data))
    if args.limit:
        for name, a in list(data.items()):
            axis = batch_axis(model, name, a)
            if axis is not None:
                data[name] = np.take(a, np.arange(min(args.limit, a.shape[axis])), axis=axis)

    with tempfile.TemporaryDirectory() as tmp:
        inputs = os.path.join(tmp, "inputs.npz")
        outputs = os.path.join(tmp, "outputs.npz")
        np.savez(inputs, **data)
        run = subprocess.run(
            [args.qgraph, "infer", args.model, "--inputs", inputs, "-o", outputs],
            capture_output=True,
            text=True,
        )
        if run.returncode != 0:
            print(f"{args.model}: qgraph infer failed: {run.stderr.strip()}")
            return 2
        ours = dict(np.load(outputs))

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    feeds = {i.name: data[i.name] for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    theirs = dict(zip(names, session.run(names, feeds)))

    worst = 0
    failed = False
    for name in names:
        a, b = theirs[name], ours.get(name)
        if b is None:
            print(f"{name}: missing from qgraph's outputs")
            failed = True
            continue
        if a.shape != b.shape:
            print(f"{name}: shape {b.shape}, ONNX Runtime {a.shape}")
            failed = True
            continue
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        allowed = np.maximum(args.atol, args.rtol * np.abs(a.astype(np.float64)))
        bad = int(np.sum(diff > allowed))
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
        print(
            f"{name}: {list(a.shape)} max |diff| {diff.max() if diff.size else 0:.3g}, "
            f"mean {diff.mean() if diff.size else 0:.3g}, {bad} of {diff.size} beyond tolerance"
        )
        failed |= bad > 0
    verdict = "DIFFERS" if failed else "agrees"
    print(f"{os.path.basename(args.model)}: qgraph {verdict} with ONNX Runtime "
          f"(atol {args.atol}, rtol {args.rtol}; largest difference {worst:.3g})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
