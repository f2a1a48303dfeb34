#!/usr/bin/env python3
"""Runs models in ONNX Runtime and in qgraph's evaluator (`qgraph infer`) on
the same seeded random input and compares every output: the largest
absolute difference over the largest reference magnitude must be at most
1e-4. Prints one line per model and a closing 'N passed, N failed' line;
exits 1 on any failure.

usage: ort_check.py QGRAPH_BINARY MODEL.onnx [MODEL.onnx ...]
"""
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

TOLERANCE = 1e-4


def inputs_for(model, batch=2, spatial=64):
    inits = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(1)
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (batch if i == 0 else spatial)
                for i, d in enumerate(vi.type.tensor_type.shape.dim)]
        feeds[vi.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def check(qgraph, path, workdir):
    model = onnx.load(str(path))
    feeds = inputs_for(model)
    inp, out = Path(workdir) / "inputs.npz", Path(workdir) / "outputs.npz"
    np.savez(inp, **feeds)
    proc = subprocess.run([qgraph, "infer", str(path), "--inputs", str(inp), "-o", str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        return None, f"qgraph infer failed: {proc.stderr.strip()}"
    ours = np.load(out)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    theirs = sess.run(None, feeds)
    worst = 0.0
    for name, ref in zip(names, theirs):
        got = ours[name]
        if got.shape != ref.shape:
            return None, f"output '{name}': shape {got.shape} vs ONNX Runtime's {ref.shape}"
        scale = max(float(np.max(np.abs(ref))), 1e-30)
        worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)))) / scale)
    if worst > TOLERANCE:
        return worst, f"relative difference {worst:.3e} > {TOLERANCE}"
    return worst, None


def main():
    qgraph, models = sys.argv[1], [Path(m) for m in sys.argv[2:]]
    passed = failed = 0
    with tempfile.TemporaryDirectory() as workdir:
        for m in models:
            try:
                worst, problem = check(qgraph, m, workdir)
            except Exception as e:  # onnx and ORT raise many kinds
                worst, problem = None, f"{type(e).__name__}: {e}"
            if problem:
                failed += 1
                print(f"FAIL {m.name}: {problem}")
            else:
                passed += 1
                print(f"ok   {m.name}: qgraph's evaluator matches ONNX Runtime (max relative difference {worst:.2e})")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
