#!/usr/bin/env python3
"""MobileNetV2 W4A8 without labels: post-training quantization, then QAT distilled from the float
model, top-1 agreement with float on held-back photos.

  python3 tools/distill_bench.py target/release/qgraph [--shared ../shared] [--epochs 2]
      [--schemes w4a8,lsq-w4a8] [--threads 2]

The photos of photos_calib_dev.npz are split by source photo as ../shared/peers/ort_ptq.py does
(every third photo held back): the other photos' views calibrate (200 of them, as ptq_bench.py)
and train, the held-back photos' views measure agreement. Training has no labels: the loss is
distillation from the float model (`qgraph train --teacher`).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def run(cmd):
    started = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
    return p.stdout + p.stderr, time.time() - started


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("qgraph")
    ap.add_argument("--shared", default=os.path.join(HERE, "..", "..", "shared"))
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", default="1e-5")
    ap.add_argument("--schemes", default="w4a8,lsq-w4a8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep-bn", action="store_true",
                    help="train from `insert --keep-bn`: batch normalization folded while "
                         "training (the PTQ column stays insert's default)")
    a = ap.parse_args()
    sys.path.insert(0, os.path.join(a.shared, "peers"))
    import ort_ptq  # the peer's own split

    photos = os.path.join(a.shared, "data", "photos_calib_dev.npz")
    raw = np.load(photos)
    cal_m, ev_m = ort_ptq.split(raw["src"])
    work = tempfile.mkdtemp(prefix="distill_bench_")
    train = os.path.join(work, "train.npz")
    held = os.path.join(work, "held_back.npz")
    np.savez(train, x_u8=raw["x_u8"][cal_m])
    np.savez(held, x_u8=raw["x_u8"][ev_m])
    flt = os.path.join(a.shared, "models", "mobilenetv2_bn.onnx")
    q = a.qgraph
    norm = ["--norm", "imagenet"]

    def agreement(model):
        out, _ = run([q, "eval", model, "--data", held, "--ref", flt] + norm)
        return float(re.search(r"agreement\s+([0-9.]+)", out).group(1))

    rows = []
    for scheme in a.schemes.split(","):
        ptq = os.path.join(work, f"{scheme}.onnx")
        _, t1 = run([q, "insert", flt, "--scheme", scheme, "--calib", train, "--calib-count",
                     "200"] + norm + ["-o", ptq])
        before = agreement(ptq)
        start = ptq
        if a.keep_bn:
            start = os.path.join(work, f"{scheme}_keep_bn.onnx")
            run([q, "insert", flt, "--scheme", scheme, "--calib", train, "--calib-count", "200",
                 "--keep-bn"] + norm + ["-o", start])
        qat = os.path.join(work, f"{scheme}_qat.onnx")
        log, t2 = run([q, "train", start, "--data", train, "--teacher", flt, "--epochs",
                       str(a.epochs), "--batch", "16", "--optimizer", "adam", "--lr", a.lr,
                       "--schedule", "sine", "--threads", str(a.threads), "-o", qat] + norm)
        print(log.strip(), file=sys.stderr)
        rows.append((scheme, before, agreement(qat), t1, t2))
    print(f"MobileNetV2, {int(cal_m.sum())} training views (200 of them calibrate), "
          f"{int(ev_m.sum())} held-back views; QAT {a.epochs} epochs, Adam lr {a.lr}, sine "
          f"schedule, distilled from float"
          f"{', batch normalization folded while training' if a.keep_bn else ''}; "
          f"{a.threads} threads\n")
    print("| scheme | PTQ agreement | QAT agreement | insert s | train s |")
    print("|---|---:|---:|---:|---:|")
    for scheme, before, after, t1, t2 in rows:
        print(f"| {scheme} | {before:.4f} | {after:.4f} | {t1:.0f} | {t2:.0f} |")


if __name__ == "__main__":
    main()
