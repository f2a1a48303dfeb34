#!/usr/bin/env python3
"""Runs models in ONNX Runtime and in qgraph's evaluator (`qgraph infer`) on
the same seeded random input and compares every output: the largest
absolute difference over the largest reference magnitude must be at most
1e-4. Prints one line per model and a closing 'N passed, N failed, N skipped'
line; exits 1 on any failure. A model with an operator the evaluator does
not implement yet is skipped, with the operator named, not failed: the
evaluator refuses it cleanly, and which operators it runs is tracked by
ONNX's backend tests.

usage: ort_check.py QGRAPH_BINARY MODEL.onnx [MODEL.onnx ...]
"""
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from model_inputs import random_feeds

TOLERANCE = 1e-4


class Unsupported(Exception):
    """The evaluator refused the model for an operator it does not run."""


def check(qgraph, path, workdir):
    model = onnx.load(str(path))
    feeds = random_feeds(model, batch=2, seed=1)
    inp, out = Path(workdir) / "inputs.npz", Path(workdir) / "outputs.npz"
    np.savez(inp, **feeds)
    proc = subprocess.run([qgraph, "infer", str(path), "--inputs", str(inp), "-o", str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        if "the evaluator does not implement" in proc.stderr:
            raise Unsupported(proc.stderr.strip().splitlines()[-1])
        # Random inputs a model cannot take (Silero's flag 0 picks a branch
        # that needs longer audio): skipped when ONNX Runtime refuses too.
        try:
            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
        except Exception as e:  # ORT raises many kinds
            raise Unsupported(
                f"neither runtime runs it on random inputs (ONNX Runtime: {str(e).splitlines()[0][:120]})"
            )
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
    passed = failed = skipped = 0
    with tempfile.TemporaryDirectory() as workdir:
        for m in models:
            try:
                worst, problem = check(qgraph, m, workdir)
            except Unsupported as e:
                skipped += 1
                print(f"skip {m.name}: {e}")
                continue
            except Exception as e:  # onnx and ORT raise many kinds
                worst, problem = None, f"{type(e).__name__}: {e}"
            if problem:
                failed += 1
                print(f"FAIL {m.name}: {problem}")
            else:
                passed += 1
                print(f"ok   {m.name}: qgraph's evaluator matches ONNX Runtime (max relative difference {worst:.2e})")
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
