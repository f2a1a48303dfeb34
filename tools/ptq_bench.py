#!/usr/bin/env python3
"""qgraph insert against ONNX Runtime's quantize_static, one table.

Both tools get the same calibration views and are judged on the same held-back
views: the split and the choice of calibration samples are those of
../shared/peers/ort_ptq.py (photos split by source photo, every third photo
held back; 200 calibration views drawn with seed 1). For each model, each
qgraph method and each ONNX Runtime method, the quantized model's top-1
agreement with the float model is measured in ONNX Runtime with graph
optimisations off ('sim': exact Q/DQ arithmetic) and with its default
optimisations ('int8': its integer kernels), with wall time and peak memory
of the quantization run.

Each model is named with the input normalisation it was trained with
(`model.onnx:imagenet`, `model.onnx:tf`); both tools get the same.

usage: ptq_bench.py [--models a.onnx:imagenet,b.onnx:tf] [--configs int8/tensorrt,int8-asym/ort] [--methods minmax,mse]
                    [--ort-methods MinMax,Entropy,Percentile] [--qgraph PATH]
Needs `pip install onnxruntime onnx numpy` and a release build of qgraph.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")
sys.path.insert(0, os.path.join(SHARED, "peers"))
import ort_ptq  # noqa: E402  (the peer's own split and loading)


def peak_gb(cmd):
    """Runs cmd under /usr/bin/time; returns (seconds, peak RSS GB, stdout)."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    kb = int(proc.stderr.strip().splitlines()[-1])
    return seconds, kb / 2**20, proc.stdout


def calibration_views(data, n_cal, tmp):
    """Writes the peer's calibration views (split by photo, n_cal drawn with
    seed 1), before normalisation (qgraph normalises), to tmp/calib.npz;
    returns its path, the number of views and the mask of the evaluation
    views."""
    _, _, src = ort_ptq.load(data, "none")
    cal_m, ev_m = ort_ptq.split(src)
    pick = np.random.default_rng(1).permutation(int(cal_m.sum()))[:n_cal]
    raw = np.load(data)
    key = "x_u8" if "x_u8" in raw.files else "x"
    calib = os.path.join(tmp, "calib.npz")
    np.savez(calib, **{key: raw[key][cal_m][pick]})
    return calib, len(pick), ev_m


def agreement(path, xe, ref_top1):
    out = {}
    for tag, opt in (("sim", False), ("int8", True)):
        q = ort_ptq.run(ort_ptq.session(path, opt), xe)
        out[tag] = float((q.argmax(1) == ref_top1).mean())
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mobilenetv2_bn.onnx:imagenet,efficientnet_lite0_bn.onnx:tf")
    ap.add_argument("--data", default=os.path.join(SHARED, "data", "photos_calib_dev.npz"))
    # scheme/placement[/extra insert flags]; w7a8 with --low-bit-ends is
    # int8-asym with 7-bit weights, which ONNX Runtime's u8 x s8 kernels
    # compute without saturating on CPUs without VNNI.
    ap.add_argument("--configs", default="int8/tensorrt,int8-asym/tensorrt,int8-asym/ort,"
                                          "w7a8/ort/--low-bit-ends")
    ap.add_argument("--methods", default="minmax,percentile,entropy,mse")
    ap.add_argument("--ort-methods", default="MinMax,Entropy,Percentile")
    ap.add_argument("--n-cal", type=int, default=200)
    ap.add_argument("--qgraph", default=os.path.join(ROOT, "target", "release", "qgraph"))
    a = ap.parse_args()

    tmp = tempfile.mkdtemp()
    calib, count, ev_m = calibration_views(a.data, a.n_cal, tmp)
    print(f"calibration: {count} views; evaluation: {int(ev_m.sum())} views of held-back photos")
    print("| model | tool | method | agree sim | agree int8 | time s | peak GB |")
    print("|---|---|---|---:|---:|---:|---:|")
    for spec in a.models.split(","):
        name, _, norm = spec.partition(":")
        norm = norm or "imagenet"
        xe = ort_ptq.load(a.data, norm)[0][ev_m]
        model = name if os.path.isabs(name) else os.path.join(SHARED, "models", name)
        ref_top1 = ort_ptq.run(ort_ptq.session(model, True), xe).argmax(1)
        for config in filter(None, a.configs.split(",")):
            scheme, placement, *flags = config.split("/")
            for method in filter(None, a.methods.split(",")):
                out = os.path.join(tmp, f"{os.path.basename(model)}.{scheme}.{placement}.{method}.onnx")
                cmd = [a.qgraph, "insert", "--scheme", scheme, "--placement", placement, model,
                       "--calib", calib, "--norm", norm, "--method", method, "-o", out] + flags
                secs, gb, _ = peak_gb(cmd)
                ag = agreement(out, xe, ref_top1)
                label = " ".join([scheme, placement] + flags)
                print(f"| {os.path.basename(model)} | qgraph {label} | {method} | {ag['sim']:.4f} | "
                      f"{ag['int8']:.4f} | {secs:.1f} | {gb:.2f} |", flush=True)
        for method in filter(None, a.ort_methods.split(",")):
            cmd = [sys.executable, os.path.join(SHARED, "peers", "ort_ptq.py"), "--model", model,
                   "--data", a.data, "--norm", norm, "--method", method, "--per-channel",
                   "--n-cal", str(a.n_cal)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"| {os.path.basename(model)} | onnxruntime | {method} | failed: "
                      f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else '?'} | | | |")
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            secs = row["pre_process_s"] + row["quantize_static_s"]
            print(f"| {os.path.basename(model)} | onnxruntime u8/s8 per-channel | {method} | "
                  f"{row['agree_sim']:.4f} | {row['agree_int8']:.4f} | {secs:.1f} | "
                  f"{row['peak_rss_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
