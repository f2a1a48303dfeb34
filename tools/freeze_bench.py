#!/usr/bin/env python3
"""qgraph freeze on every shared model, checked in ONNX Runtime; one table.

For each model: `qgraph insert --scheme int8` (TensorRT placement), then
`qgraph freeze --target tensorrt`, run in ONNX Runtime against the Q/DQ graph
(both with graph optimisations off: the same arithmetic), with the file size
against the float model; and `qgraph insert --scheme int8 --placement ort`,
then `qgraph freeze --target integer`, run in ONNX Runtime (default
optimisations: its integer kernels) against the Q/DQ graph (optimisations
off), with `qgraph verify` (qgraph's evaluator: the output difference in
quantization steps, end to end and op by op), once with free scales and once
with `--pow2-scales` (the integer graph then computes exactly what the Q/DQ
graph does; the table shows what the coarser grid costs against float). Last, MobileNetV2 at w4a8
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


def top1(a, b):
    return float((a.argmax(1) == b.argmax(1)).mean()) if a.ndim == 2 else float("nan")


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
        row = dict(model=name, trt_rel=trt_rel, size=size)
        f32 = run(model, xe, False)
        # Integer target, with free scales and with power-of-two scales.
        for tag, extra in (("free", []), ("pow2", ["--pow2-scales"])):
            qdq, frozen = base + f".{tag}.ort.onnx", base + f".{tag}.int.onnx"
            qgraph(a.qgraph, "insert", "--scheme", "int8", "--placement", "ort", model, *common, *extra,
                   "-o", qdq)
            log = qgraph(a.qgraph, "freeze", "--target", "integer", qdq, "-o", frozen)
            onnx.checker.check_model(onnx.load(frozen), full_check=True)
            still = re.search(r"still float, between DequantizeLinear and QuantizeLinear: (.*)", log)
            q = run(qdq, xe, False)
            i = run(frozen, xe, True)
            verify = qgraph(a.qgraph, "verify", qdq, frozen, "--data", evp, "--norm", norm)
            cells = verify.strip().splitlines()[1].split()
            row[tag] = dict(
                # What the scale policy costs: the Q/DQ graph against float.
                float_top1=top1(q, f32),
                ort_top1=top1(q, i),
                ort_rel=float(np.abs(q - i).max() / np.abs(q).max()),
                ort_equal=float((q == i).mean()),
                max_lsb=cells[2], within=cells[3], verify_top1=cells[5],
                float_ops=still.group(1) if still else "none")
            if tag == "free":
                # The noise floor: the Q/DQ graph against itself on inputs
                # perturbed by 1e-4 relative noise, far below one step of the
                # input's grid. With free scales the integer graph rounds exact
                # sums where the Q/DQ graph rounds f32 sums, a perturbation of
                # that size, so it cannot agree with the Q/DQ graph better.
                noisy = xe * (1 + 1e-4 * np.random.default_rng(0).standard_normal(xe.shape))
                row["noise_floor"] = top1(q, run(qdq, noisy.astype(np.float32), False))
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)
    print()
    print(f"evaluation: up to {a.limit} held-back samples per model; int8, percentile calibration")
    print("| model | tensorrt: max rel. diff to Q/DQ (ORT) | file size / float |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['trt_rel']:.2e} | {100 * r['size']:.1f}% |")
    print()
    print("integer target against its Q/DQ graph: ONNX Runtime's integer kernels (top-1, share of output elements "
          "equal, max rel. diff) and qgraph verify (max LSB, within 1 LSB, top-1); 'vs float' is the Q/DQ graph's "
          "top-1 agreement with the float model, what the scale policy costs")
    print("| model | scales | vs float | ORT top-1 | ORT equal | ORT max rel. | verify max LSB | within 1 LSB | "
          "verify top-1 | Q/DQ vs itself, 1e-4 noise | float ops left |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        for tag in ("free", "pow2"):
            c = r[tag]
            floor = f"{r['noise_floor']:.4f}" if tag == "free" else ""
            print(f"| {r['model']} | {tag} | {c['float_top1']:.4f} | {c['ort_top1']:.4f} | {100 * c['ort_equal']:.3f}% | "
                  f"{c['ort_rel']:.2e} | {c['max_lsb']} | {c['within']} | {c['verify_top1']} | {floor} | {c['float_ops']} |")
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
