#!/usr/bin/env python3
"""How much top-1 agreement with float post-training int8 can reach on the held-back photos.

The agreement goal of tools/ptq_bench.py is judged on a few hundred views whose
float top-1 and top-2 logits are often very close. This script measures, on the
same split and calibration views as ptq_bench.py:

1. the float model's margins (top-1 logit minus top-2) on the evaluation views;
2. the agreement that output noise of a given SQNR allows: Gaussian noise added
   to the float logits (mean of 20 draws), a yardstick for the rows below;
3. qgraph insert with int8 weights and 16-bit activations (the model raised to
   opset 21, where int16 Q/DQ exists), so only the weights' quantization is
   left: with and without bias correction, nearest and GPTQ rounding; and the
   usual all-int8 schemes for comparison. Each row: SQNR of the logits against
   float and top-1 agreement, run in ONNX Runtime with optimisations off.

If int8 weights alone, rounded as well as qgraph can, stay below an agreement
goal, no choice of int8 activation ranges can reach it.

usage: ptq_headroom.py [--model mobilenetv2_bn.onnx --norm imagenet] [--qgraph PATH]
Needs `pip install onnxruntime onnx numpy` and a release build of qgraph.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnx
from onnx import version_converter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")
sys.path.insert(0, os.path.join(SHARED, "peers"))
import ort_ptq  # noqa: E402  (the peer's own split and loading)
import ptq_bench  # noqa: E402  (the same calibration views)

WIDE_ACTIVATIONS = """[[override]]
op = "Conv"
activation-bits = 16
[[override]]
op = "Gemm"
activation-bits = 16
"""


def logits(path, x):
    return ort_ptq.run(ort_ptq.session(path, False), x)


def sqnr(ref, got):
    return float(10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mobilenetv2_bn.onnx")
    ap.add_argument("--norm", default="imagenet")
    ap.add_argument("--data", default=os.path.join(SHARED, "data", "photos_calib_dev.npz"))
    ap.add_argument("--qgraph", default=os.path.join(ROOT, "target", "release", "qgraph"))
    ap.add_argument("--n-cal", type=int, default=200)
    a = ap.parse_args()
    model = a.model if os.path.isabs(a.model) else os.path.join(SHARED, "models", a.model)
    tmp = tempfile.mkdtemp()
    calib, _, ev_m = ptq_bench.calibration_views(a.data, a.n_cal, tmp)
    xe = ort_ptq.load(a.data, a.norm)[0][ev_m]
    ref = logits(model, xe)
    top = np.sort(ref, axis=1)
    margin = top[:, -1] - top[:, -2]
    rms = float(np.sqrt((ref ** 2).mean()))
    print(f"{os.path.basename(model)}: {len(xe)} evaluation views, logits rms {rms:.2f}")
    qs = [0.03, 0.05, 0.1, 0.25, 0.5]
    print("top-1 minus top-2 logit, quantiles " +
          ", ".join(f"{int(q * 100)}%: {v:.3f}" for q, v in zip(qs, np.quantile(margin, qs))))
    print()
    print("| output SQNR (Gaussian noise on the float logits) | top-1 agreement |")
    print("|---:|---:|")
    rng = np.random.default_rng(0)
    for db in (15, 20, 25, 30, 35, 40):
        sigma = rms / 10 ** (db / 20)
        agree = np.mean([((ref + rng.normal(0, sigma, ref.shape)).argmax(1) == ref.argmax(1)).mean()
                         for _ in range(20)])
        print(f"| {db} dB | {agree:.3f} |")
    print()
    wide = os.path.join(tmp, "opset21.onnx")
    onnx.save(version_converter.convert_version(onnx.load(model), 21), wide)
    overrides = os.path.join(tmp, "a16.toml")
    with open(overrides, "w") as f:
        f.write(WIDE_ACTIVATIONS)
    rows = [
        ("int8 weights, 16-bit activations, nearest, no bias correction", wide,
         ["--scheme", "int8", "--overrides", overrides, "--rounding", "nearest", "--no-bias-correction"]),
        ("int8 weights, 16-bit activations, nearest", wide,
         ["--scheme", "int8", "--overrides", overrides, "--rounding", "nearest"]),
        ("int8 weights, 16-bit activations, GPTQ", wide,
         ["--scheme", "int8", "--overrides", overrides, "--rounding", "gptq"]),
        ("int8-asym, percentile", model, ["--scheme", "int8-asym", "--method", "percentile"]),
        ("int8-asym, MSE", model, ["--scheme", "int8-asym", "--method", "mse"]),
        ("int8-asym, MSE, GPTQ", model, ["--scheme", "int8-asym", "--method", "mse", "--rounding", "gptq"]),
    ]
    print("| qgraph insert | output SQNR dB | top-1 agreement |")
    print("|---|---:|---:|")
    for i, (label, path, flags) in enumerate(rows):
        out = os.path.join(tmp, f"q{i}.onnx")
        proc = subprocess.run([a.qgraph, "insert", path, "--calib", calib, "--norm", a.norm, "-o", out] + flags,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"qgraph insert ({label}) failed:\n{proc.stderr}")
        got = logits(out, xe)
        print(f"| {label} | {sqnr(ref, got):.1f} | {(got.argmax(1) == ref.argmax(1)).mean():.4f} |", flush=True)


if __name__ == "__main__":
    main()
