#!/usr/bin/env python3
"""Fashion-MNIST: float training, then PTQ against QAT (PACT and LSQ) at W4A4 and W2A2, one table.

  python3 tools/qat_bench.py target/release/qgraph [--shared ../shared] [--float-epochs 3]
      [--qat-epochs 1] [--threads 2] [--workdir DIR]

1. tools/make_cnn.py writes a small ResNet-style CNN (untrained).
2. `qgraph train` trains it in float on fashion_mnist_train.npz (SGD, cosine schedule).
3. `qgraph insert` quantizes it with int8, w4a4 and w2a2 (post-training, 512 calibration
   samples); `qgraph insert --scheme pact-wNaN / lsq-wNaN` then `qgraph train` fine-tunes with
   fake quantization (QAT). Sub-8-bit schemes keep the first and last layers at 8 bits.
4. Every model is measured on the whole test set (fashion_mnist_test.npz, 10000 images).

Prints a markdown table: accuracy and the gap to float, and each step's wall time.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def run(cmd):
    started = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
    return p.stdout + p.stderr, time.time() - started


def accuracy(qgraph, model, test):
    out, _ = run([qgraph, "eval", model, "--data", test, "--batch", "256"])
    return float(re.search(r"accuracy\s+([0-9.]+)", out).group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("qgraph")
    ap.add_argument("--shared", default=os.path.join(HERE, "..", "..", "shared"))
    ap.add_argument("--float-epochs", type=int, default=3)
    ap.add_argument("--qat-epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir")
    # 2-bit grids diverge at the 4-bit rate (measured: W2A2 LSQ fell from 0.61 to 0.26 at 0.01).
    ap.add_argument("--qat-lr", default="w4a4:0.01,w2a2:0.001",
                    help="learning rate per scheme, BITS:LR,...")
    ap.add_argument("--float-model", help="skip float training: use this trained model")
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"],
                    help="the QAT optimizer (float training is SGD)")
    ap.add_argument("--methods", default="pact,lsq",
                    help="QAT methods: pact, lsq, dorefa, and lsq-fold (insert --keep-bn: batch "
                         "normalization folded while training, Jacob et al. 2018)")
    a = ap.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="qat_bench_")
    os.makedirs(work, exist_ok=True)
    train = os.path.join(a.shared, "data", "fashion_mnist_train.npz")
    test = os.path.join(a.shared, "data", "fashion_mnist_test.npz")
    q = a.qgraph
    threads = ["--threads", str(a.threads)]
    qat_lr = dict(item.split(":") for item in a.qat_lr.split(","))
    if a.float_model:
        flt, t_float = a.float_model, 0.0
    else:
        cnn = os.path.join(work, "cnn.onnx")
        run([sys.executable, os.path.join(HERE, "make_cnn.py"), cnn])
        flt = os.path.join(work, "float.onnx")
        log, t_float = run([q, "train", cnn, "--data", train, "--epochs", str(a.float_epochs),
                            "--batch", "64", "--lr", "0.1", "--schedule", "cosine",
                            "--weight-decay", "5e-4", "-o", flt] + threads)
        print(log.strip(), file=sys.stderr)
    acc_float = accuracy(q, flt, test)
    rows = [("float", "", acc_float, t_float)]
    for scheme in ["int8"] + list(qat_lr):
        out = os.path.join(work, f"ptq_{scheme}.onnx")
        _, t = run([q, "insert", flt, "--scheme", scheme, "--calib", train, "--calib-count", "512",
                    "-o", out])
        rows.append((scheme, "PTQ", accuracy(q, out, test), t))
    for bits in qat_lr:
        for method in a.methods.split(","):
            scheme, _, fold = method.partition("-")
            keep_bn = ["--keep-bn"] if fold == "fold" else []
            qdq = os.path.join(work, f"{method}_{bits}.onnx")
            _, t1 = run([q, "insert", flt, "--scheme", f"{scheme}-{bits}", "--calib", train,
                         "--calib-count", "512", "-o", qdq] + keep_bn)
            rows.append((bits, f"{method.upper()} init (no training)", accuracy(q, qdq, test), t1))
            out = os.path.join(work, f"qat_{method}_{bits}.onnx")
            log, t2 = run([q, "train", qdq, "--data", train, "--epochs", str(a.qat_epochs),
                           "--batch", "64", "--lr", qat_lr[bits], "--schedule", "cosine",
                           "--optimizer", a.optimizer,
                           "--weight-decay", "5e-4", "-o", out] + threads)
            print(log.strip(), file=sys.stderr)
            rows.append((bits, f"QAT {method.upper()}", accuracy(q, out, test), t1 + t2))
    print(f"Fashion-MNIST test set (10000 images); float {a.float_epochs} epochs, "
          f"QAT {a.qat_epochs} epoch(s), {a.optimizer}, lr {a.qat_lr}; {a.threads} threads; "
          f"files in {work}\n")
    print("| scheme | method | top-1 accuracy | vs float (pt) | seconds |")
    print("|---|---|---:|---:|---:|")
    for scheme, method, acc, t in rows:
        gap = "" if scheme == "float" else f"{100 * (acc - acc_float):+.2f}"
        print(f"| {scheme} | {method} | {acc:.4f} | {gap} | {t:.0f} |")


if __name__ == "__main__":
    main()
