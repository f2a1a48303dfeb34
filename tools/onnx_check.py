#!/usr/bin/env python3
"""Checks models qgraph wrote: each passes the onnx checker and runs in ONNX
Runtime with outputs equal to the original model's.

usage: onnx_check.py QGRAPH_BINARY MODEL.onnx [MODEL.onnx ...]

For each model: `qgraph convert` it, `qgraph run` the standard pass
pipeline on it, and `qgraph insert` Q/DQ pairs (int8 and w4a8, no data)
then `qgraph freeze --target tensorrt` (and, for MNIST models, a calibrated
int8-asym insert frozen `--target integer`, and a pact-w4a4 insert trained one
epoch by `qgraph train`); run onnx.checker (full check) on both results, run the
original and each result in ONNX Runtime on the same seeded random input, and
require max |difference| == 0 for the conversion and <= 1e-4 relative (to the
largest output magnitude) for the pipeline. Prints one line per check and a
closing 'N passed, N failed, N skipped' line; exits 1 on any failure. A model
that ONNX Runtime cannot run as shipped on random inputs is skipped, with
the reason.
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


PIPELINE = "infer-shapes,fold-constants,fold-bn,fold-pad,fuse-matmul-add,fuse-conv-bn-act,cleanup"


def check(qgraph, model, workdir, pipeline=None):
    out = Path(workdir) / (model.stem + (".passes" if pipeline else "") + ".qgraph.onnx")
    cmd = [qgraph, "run", "--passes", pipeline] if pipeline else [qgraph, "convert"]
    proc = subprocess.run(cmd + [str(model), "-o", str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"qgraph {cmd[1]} failed: {proc.stderr.strip()}"
    onnx.checker.check_model(str(out), full_check=True)
    original = onnx.load(str(model))
    feeds = random_feeds(original, batch=1, seed=0)
    a, b = run(model, feeds), run(out, feeds)
    worst = max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) for x, y in zip(a, b))
    scale = max(float(np.max(np.abs(x.astype(np.float64)))) for x in a) or 1.0
    if pipeline is None and worst != 0.0:
        return f"outputs differ: max abs diff {worst}"
    if pipeline is not None and worst / scale > 1e-4:
        return f"outputs differ after the passes: max relative diff {worst / scale:.2e}"
    return None


def check_insert(qgraph, model, workdir, scheme):
    """`qgraph insert` without data (weights quantized): the result passes the
    checker and runs in ONNX Runtime, with its optimisations off and on, with
    finite outputs that agree between the two within 1e-3 relative."""
    out = Path(workdir) / f"{model.stem}.{scheme}.qgraph.onnx"
    proc = subprocess.run([qgraph, "insert", "--scheme", scheme, str(model), "-o", str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return f"qgraph insert failed: {proc.stderr.strip()}"
    onnx.checker.check_model(str(out), full_check=True)
    feeds = random_feeds(onnx.load(str(model)), batch=1, seed=0)
    plain = run(out, feeds)
    opts = ort.SessionOptions()
    # ONNX Runtime turns a DequantizeLinear weight feeding MatMul into
    # MatMulNBits, which by default (accuracy level 4) quantizes the float
    # activations to int8 as well: a lossy choice of its own. Level 1 computes
    # in float32, so the fused graph must then equal the plain one.
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    fused = ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b in zip(plain, fused):
        if not np.all(np.isfinite(a)):
            return "non-finite outputs"
        scale = float(np.max(np.abs(a))) or 1.0
        if float(np.max(np.abs(a - b))) / scale > 1e-3:
            return "ONNX Runtime's optimised session differs from the plain one"
    return None


MNIST = Path(__file__).resolve().parent.parent / "testdata" / "data" / "mnist64.npz"


def check_calibrated(qgraph, model, workdir, scheme, placement, extra=()):
    """For a model on 1x28x28 inputs: `qgraph insert` calibrated on the 64
    MNIST digits in testdata; ONNX Runtime (optimisations off) must agree
    with the float model's top-1 on at least 95% of them."""
    out = Path(workdir) / f"{model.stem}.{scheme}.{placement}{''.join(extra)}.onnx"
    proc = subprocess.run([qgraph, "insert", "--scheme", scheme, "--placement", placement, str(model),
                           "--calib", str(MNIST), "-o", str(out), *extra], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"qgraph insert failed: {proc.stderr.strip()}"
    onnx.checker.check_model(str(out), full_check=True)
    x = (np.load(MNIST)["x_u8"] / 255.0).astype(np.float32)
    name = onnx.load(str(model)).graph.input[0].name
    ref = run(model, {name: x})[0].argmax(1)
    got = run(out, {name: x})[0].argmax(1)
    agree = float((ref == got).mean())
    return None if agree >= 0.95 else f"top-1 agreement {agree:.3f} < 0.95"


def check_frozen(qgraph, qdq, workdir, target, feeds, exact=False):
    """`qgraph freeze` of a Q/DQ model qgraph wrote: the result passes the
    checker and runs in ONNX Runtime. The TensorRT form computes the same as
    the Q/DQ graph (optimisations off: the same arithmetic, within 1e-5
    relative); the integer form, in ONNX Runtime's integer kernels, agrees
    on top-1 with the Q/DQ graph on at least 95% of the rows, and with
    `exact` (power-of-two scales) equals it bit for bit."""
    out = Path(workdir) / f"{Path(qdq).stem}.{target}.onnx"
    proc = subprocess.run([qgraph, "freeze", "--target", target, str(qdq), "-o", str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return f"qgraph freeze failed: {proc.stderr.strip()}"
    onnx.checker.check_model(str(out), full_check=True)
    want = run(qdq, feeds)
    if target.startswith("integer"):
        got = ort.InferenceSession(str(out), ort.SessionOptions(),
                                   providers=["CPUExecutionProvider"]).run(None, feeds)
        if exact:
            for a, b in zip(want, got):
                if not np.array_equal(a, b):
                    return (f"{int((a != b).sum())} of {a.size} outputs differ from the Q/DQ graph "
                            f"(largest {float(np.max(np.abs(a - b))):.2e}); power-of-two scales promise none")
            return None
        agree = float((want[0].argmax(1) == got[0].argmax(1)).mean())
        return None if agree >= 0.95 else f"top-1 agreement with the Q/DQ graph {agree:.3f} < 0.95"
    got = run(out, feeds)
    for a, b in zip(want, got):
        scale = float(np.max(np.abs(a))) or 1.0
        if float(np.max(np.abs(a - b))) / scale > 1e-5:
            return f"differs from the Q/DQ graph by {float(np.max(np.abs(a - b))) / scale:.2e} relative"
    return None


def check_trained(qgraph, model, workdir):
    """For a model on 1x28x28 inputs: `qgraph insert --scheme pact-w4a4`
    calibrated on the 64 MNIST digits, then `qgraph train` one epoch on them.
    The trained model passes the checker; ONNX Runtime (optimisations off)
    computes what qgraph's evaluator computes (within 1e-5 relative) and
    agrees with the float model's top-1 on at least 95% of the digits; its
    TensorRT freeze computes the same as it."""
    qdq = Path(workdir) / f"{model.stem}.pact-w4a4.onnx"
    trained = Path(workdir) / f"{model.stem}.pact-w4a4.trained.onnx"
    for cmd in ([qgraph, "insert", "--scheme", "pact-w4a4", str(model), "--calib", str(MNIST), "-o", str(qdq)],
                [qgraph, "train", str(qdq), "--data", str(MNIST), "--epochs", "1", "--batch", "16",
                 "--lr", "0.001", "-o", str(trained)]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return f"qgraph {cmd[1]} failed: {proc.stderr.strip()}"
    onnx.checker.check_model(str(trained), full_check=True)
    x = (np.load(MNIST)["x_u8"] / 255.0).astype(np.float32)
    name = onnx.load(str(model)).graph.input[0].name
    inputs, outputs = Path(workdir) / "train_in.npz", Path(workdir) / "train_out.npz"
    np.savez(inputs, **{name: x})
    proc = subprocess.run([qgraph, "infer", str(trained), "--inputs", str(inputs), "-o", str(outputs)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return f"qgraph infer failed: {proc.stderr.strip()}"
    ours = np.load(outputs)[onnx.load(str(trained)).graph.output[0].name]
    got = run(trained, {name: x})[0]
    rel = float(np.max(np.abs(ours - got))) / (float(np.max(np.abs(got))) or 1.0)
    if rel > 1e-5:
        return f"ONNX Runtime and qgraph differ on the trained model by {rel:.2e} relative"
    agree = float((run(model, {name: x})[0].argmax(1) == got.argmax(1)).mean())
    if agree < 0.95:
        return f"top-1 agreement with float {agree:.3f} < 0.95"
    return check_frozen(qgraph, trained, workdir, "tensorrt", {name: x})


def takes_mnist(model):
    dims = onnx.load(str(model), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value for d in dims[1:]] == [1, 28, 28]


def runs_on_random_inputs(model):
    """None when ONNX Runtime runs the model as shipped on the random inputs,
    else why not: such a model (one whose inputs must be meaningful, as a
    sample rate that picks a branch) has nothing to compare against."""
    try:
        run(model, random_feeds(onnx.load(str(model)), batch=1, seed=0))
        return None
    except Exception as e:  # ORT raises many kinds
        return str(e).splitlines()[0][:200]


def main():
    qgraph, models = sys.argv[1], [Path(m) for m in sys.argv[2:]]
    passed = failed = skipped = 0
    with tempfile.TemporaryDirectory() as workdir:
        for m in models:
            why = runs_on_random_inputs(m)
            if why:
                skipped += 1
                print(f"skip {m.name}: ONNX Runtime cannot run it as shipped on random inputs: {why}")
                continue
            for pipeline in (None, PIPELINE):
                what = "passes" if pipeline else "convert"
                try:
                    problem = check(qgraph, m, workdir, pipeline)
                except Exception as e:  # the checker and ORT raise many kinds
                    problem = f"{type(e).__name__}: {e}"
                if problem:
                    failed += 1
                    print(f"FAIL {m.name} ({what}): {problem}")
                elif pipeline:
                    passed += 1
                    print(f"ok   {m.name} (passes): onnx checker passes, ONNX Runtime outputs within 1e-4")
                else:
                    passed += 1
                    print(f"ok   {m.name} (convert): onnx checker passes, ONNX Runtime outputs identical (max abs diff 0)")
            for scheme in ("int8", "w4a8"):
                try:
                    problem = check_insert(qgraph, m, workdir, scheme)
                except Exception as e:
                    problem = f"{type(e).__name__}: {e}"
                if problem:
                    failed += 1
                    print(f"FAIL {m.name} (insert {scheme}): {problem}")
                    continue
                passed += 1
                print(f"ok   {m.name} (insert {scheme}): onnx checker passes, runs in ONNX Runtime")
                qdq = Path(workdir) / f"{m.stem}.{scheme}.qgraph.onnx"
                try:
                    feeds = random_feeds(onnx.load(str(m)), batch=1, seed=0)
                    problem = check_frozen(qgraph, qdq, workdir, "tensorrt", feeds)
                except Exception as e:
                    problem = f"{type(e).__name__}: {e}"
                if problem:
                    failed += 1
                    print(f"FAIL {m.name} (insert {scheme}, freeze tensorrt): {problem}")
                else:
                    passed += 1
                    print(f"ok   {m.name} (insert {scheme}, freeze tensorrt): onnx checker passes, "
                          "ONNX Runtime outputs equal the Q/DQ graph's within 1e-5")
            if MNIST.exists() and takes_mnist(m):
                for scheme, placement, extra in (("int8", "tensorrt", ()), ("int8-asym", "ort", ()),
                                                 ("w4a4", "ort", ()), ("int8", "ort", ("--pow2-scales",))):
                    try:
                        problem = check_calibrated(qgraph, m, workdir, scheme, placement, extra)
                    except Exception as e:
                        problem = f"{type(e).__name__}: {e}"
                    what = f"insert {scheme} --placement {placement}{''.join(' ' + e for e in extra)}, calibrated"
                    if problem:
                        failed += 1
                        print(f"FAIL {m.name} ({what}): {problem}")
                        continue
                    passed += 1
                    print(f"ok   {m.name} ({what}): runs in ONNX Runtime, agrees with float on 95%+")
                    if placement != "ort" or scheme != "int8-asym" and not extra:
                        continue
                    exact = "--pow2-scales" in extra
                    qdq = Path(workdir) / f"{m.stem}.{scheme}.{placement}{''.join(extra)}.onnx"
                    x = (np.load(MNIST)["x_u8"] / 255.0).astype(np.float32)
                    feeds = {onnx.load(str(m)).graph.input[0].name: x}
                    # The standard-ops form too, for the power-of-two model.
                    for target in ("integer", "integer-onnx") if exact else ("integer",):
                        try:
                            problem = check_frozen(qgraph, qdq, workdir, target, feeds, exact)
                        except Exception as e:
                            problem = f"{type(e).__name__}: {e}"
                        if problem:
                            failed += 1
                            print(f"FAIL {m.name} ({what}, freeze {target}): {problem}")
                        else:
                            passed += 1
                            print(f"ok   {m.name} ({what}, freeze {target}): onnx checker passes, ONNX Runtime's "
                                  "integer kernels " + ("equal the Q/DQ graph bit for bit" if exact
                                                        else "agree with the Q/DQ graph on 95%+"))
            if MNIST.exists() and takes_mnist(m):
                try:
                    problem = check_trained(qgraph, m, workdir)
                except Exception as e:
                    problem = f"{type(e).__name__}: {e}"
                what = "insert pact-w4a4, train 1 epoch"
                if problem:
                    failed += 1
                    print(f"FAIL {m.name} ({what}): {problem}")
                else:
                    passed += 1
                    print(f"ok   {m.name} ({what}): onnx checker passes, ONNX Runtime computes what qgraph "
                          "does, agrees with float on 95%+, freezes for TensorRT unchanged")
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
