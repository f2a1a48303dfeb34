#!/usr/bin/env python3
"""qgraph freeze on every shared model, checked in ONNX Runtime; one table.

For each model: `qgraph insert --scheme int8` (TensorRT placement), then
`qgraph freeze --target tensorrt`, run in ONNX Runtime against the Q/DQ graph
(both with graph optimisations off: the same arithmetic), with the file size
against the float model; and `qgraph insert --scheme int8 --placement ort`,
then `qgraph freeze --target integer`, run in ONNX Runtime (default
optimisations: its integer kernels) against the Q/DQ graph (optimisations
off), with `qgraph verify` (qgraph's evaluator: the output difference in
quantization steps, end to end and op by op). Last, MobileNetV2 at w4a8
frozen with int4 weights, loaded and run in ONNX Runtime.

Data: the photos (`photos_calib_dev.npz`, 200 calibration views, the
held-back photos for evaluation, as tools/ptq_bench.py splits them), MNIST
for LeNet-5, and for the text-direction classifier (48x192 input) 48x192
crops of the same photos.

usage: freeze_bench.py [--models a,b] [--qgraph PATH] [--limit N]
Needs `pip install onnxruntime onnx numpy` and a release build of qgraph.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")
sys.path.insert(0, os.path.join(SHARED, "peers"))
import ort_ptq  # noqa: E402  (the peer's split of the photos)

ort.set_default_logger_severity(3)

# model file, data kind, normalisation
MODELS = {
    "mobilenetv2_bn.onnx": ("photos", "imagenet"),
    "efficientnet_lite0_bn.onnx": ("photos", "tf"),
    "efficientnet_lite0_dyn18.onnx": ("photos", "tf"),
    "lenet5_mnist_clntrained.onnx": ("mnist", "none"),
    "ppocr_mobile_v2_cls.onnx": ("text_crops", "tf"),
}


def qgraph(exe, *args):
    proc = subprocess.run([exe, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"qgraph {' '.join(args)} failed:\n{proc.stderr}")
    return proc.stdout + proc.stderr


def datasets(kind, tmp, limit):
    """(calibration npz, evaluation npz, evaluation array normalised later)."""
    if kind == "mnist":
        d = np.load(os.path.join(SHARED, "data", "mnist_npm10k.npz"))
        x = d["x"].astype(np.float32)
        cal, ev = x[:200], x[200:200 + limit]
        key = "x"
    else:
        raw = np.load(os.path.join(SHARED, "data", "photos_calib_dev.npz"))
        _, _, src = ort_ptq.load(os.path.join(SHARED, "data", "photos_calib_dev.npz"), "none")
        cal_m, ev_m = ort_ptq.split(src)
        pick = np.random.default_rng(1).permutation(int(cal_m.sum()))[:200]
        x = raw["x_u8"]
        if kind == "text_crops":
            x = x[:, :, 88:136, 16:208]
        cal, ev = x[cal_m][pick], x[ev_m][:limit]
        key = "x_u8"
    paths = []
    for name, arr in (("calib", cal), ("eval", ev)):
        p = os.path.join(tmp, f"{kind}_{name}.npz")
        np.savez(p, **{key: arr})
        paths.append(p)
    return paths[0], paths[1], ev


def normalise(x, norm):
    x = x.astype(np.float32)
    if x.dtype == np.float32 and x.max() > 1.5:
        x = x / 255.0
    if norm == "imagenet":
        return ((x - ort_ptq.MEAN) / ort_ptq.STD).astype(np.float32)
    if norm == "tf":
        return ((x - 127.0 / 255.0) / (128.0 / 255.0)).astype(np.float32)
    return x


def run(path, x, optimized):
    s = ort_ptq.session(path, optimized)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + 32]})[0] for i in range(0, len(x), 32)])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--qgraph", default=os.path.join(ROOT, "target", "release", "qgraph"))
    ap.add_argument("--limit", type=int, default=160, help="evaluation samples per model")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp()
    rows = []
    for name in a.models.split(","):
        kind, norm = MODELS[name]
        model = os.path.join(SHARED, "models", name)
        cal, evp, ev = datasets(kind, tmp, a.limit)
        xe = normalise(ev, norm)
        base = os.path.join(tmp, name[:-5])
        common = ["--calib", cal, "--norm", norm, "--method", "percentile"]
        # TensorRT target.
        qgraph(a.qgraph, "insert", "--scheme", "int8", model, *common, "-o", base + ".qdq.onnx")
        qgraph(a.qgraph, "freeze", "--target", "tensorrt", base + ".qdq.onnx", "-o", base + ".trt.onnx")
        onnx.checker.check_model(onnx.load(base + ".trt.onnx"), full_check=True)
        q, f = run(base + ".qdq.onnx", xe, False), run(base + ".trt.onnx", xe, False)
        trt_rel = float(np.abs(q - f).max() / np.abs(q).max())
        size = os.path.getsize(base + ".trt.onnx") / os.path.getsize(model)
        # Integer target.
        qgraph(a.qgraph, "insert", "--scheme", "int8", "--placement", "ort", model, *common,
               "-o", base + ".ort.onnx")
        log = qgraph(a.qgraph, "freeze", "--target", "integer", base + ".ort.onnx", "-o", base + ".int.onnx")
        onnx.checker.check_model(onnx.load(base + ".int.onnx"), full_check=True)
        still = re.search(r"still float, between DequantizeLinear and QuantizeLinear: (.*)", log)
        q = run(base + ".ort.onnx", xe, False)
        i = run(base + ".int.onnx", xe, True)
        ort_top1 = float((q.argmax(1) == i.argmax(1)).mean()) if q.ndim == 2 else float("nan")
        ort_rel = float(np.abs(q - i).max() / np.abs(q).max())
        # The noise floor: the Q/DQ graph against itself on inputs perturbed
        # by 1e-4 relative noise, far below one step of the input's grid.
        # No faithful freeze can agree with the Q/DQ graph better than the
        # Q/DQ graph agrees with itself under such noise.
        noisy = xe * (1 + 1e-4 * np.random.default_rng(0).standard_normal(xe.shape))
        qn = run(base + ".ort.onnx", noisy.astype(np.float32), False)
        floor = float((q.argmax(1) == qn.argmax(1)).mean()) if q.ndim == 2 else float("nan")
        verify = qgraph(a.qgraph, "verify", base + ".ort.onnx", base + ".int.onnx", "--data", evp,
                        "--norm", norm)
        cells = verify.strip().splitlines()[1].split()
        rows.append(dict(model=name, trt_rel=trt_rel, size=size, int_float_ops=still.group(1) if still else "none",
                         ort_top1=ort_top1, noise_floor=floor, ort_rel=ort_rel, max_lsb=cells[2], within=cells[3],
                         verify_top1=cells[5]))
        print(json.dumps(rows[-1]), flush=True)
    print()
    print(f"evaluation: up to {a.limit} held-back samples per model; int8, percentile calibration")
    print("| model | tensorrt: max rel. diff to Q/DQ (ORT) | file size / float | integer: top-1 agreement "
          "(ORT int8 kernels vs Q/DQ) | Q/DQ vs itself, 1e-4 input noise | max rel. diff | qgraph verify: max LSB | within 1 LSB | top-1 | "
          "float ops left |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['model']} | {r['trt_rel']:.2e} | {100 * r['size']:.1f}% | {r['ort_top1']:.4f} | {r['noise_floor']:.4f} | "
              f"{r['ort_rel']:.2e} | {r['max_lsb']} | {r['within']} | {r['verify_top1']} | {r['int_float_ops']} |")
    # w4a8 MobileNetV2, int4 weights.
    name = "mobilenetv2_bn.onnx"
    cal, evp, ev = datasets("photos", tmp, a.limit)
    xe = normalise(ev, "imagenet")
    base = os.path.join(tmp, "mnv2_w4a8")
    qgraph(a.qgraph, "insert", "--scheme", "w4a8", os.path.join(SHARED, "models", name), "--calib", cal,
           "--norm", "imagenet", "-o", base + ".qdq.onnx")
    qgraph(a.qgraph, "freeze", "--target", "tensorrt", base + ".qdq.onnx", "-o", base + ".int4.onnx")
    m = onnx.load(base + ".int4.onnx")
    onnx.checker.check_model(m, full_check=True)
    int4 = sum(1 for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT4)
    q, f = run(base + ".qdq.onnx", xe, False), run(base + ".int4.onnx", xe, False)
    print()
    print(f"MobileNetV2 w4a8, frozen for TensorRT: {int4} int4 weights, opset "
          f"{[o.version for o in m.opset_import if o.domain in ('', 'ai.onnx')][0]}, "
          f"{os.path.getsize(base + '.int4.onnx') / 1e6:.2f} MB; runs in ONNX Runtime, max rel. diff to the Q/DQ "
          f"graph {np.abs(q - f).max() / np.abs(q).max():.2e}, top-1 agreement {(q.argmax(1) == f.argmax(1)).mean():.4f}")


if __name__ == "__main__":
    main()
