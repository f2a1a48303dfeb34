#!/usr/bin/env python3
"""Training throughput: qgraph train against PyTorch (../shared/peers/torch_qat.py), same model,
batch and threads, float and with 8-bit fake quantization, in one run; prints a table of
samples/s and the ratio.

  python3 tools/train_bench.py target/release/qgraph [--shared ../shared] [--steps 30]
      [--threads 2] [--models lenet,mobilenetv2]

The peer needs `pip install torch onnx2torch onnx numpy`. Both sides train with cross-entropy
and SGD with momentum; PyTorch wraps every Conv/Linear with FakeQuantize on its weights
(per-channel) and input (per-tensor), qgraph trains the graph `qgraph insert --scheme int8`
writes (weights per channel, activations per tensor, TensorRT placement). qgraph's figure is its
epoch's samples/s, which includes cutting batches from the data set, as the peer's loop does.
MobileNetV2 trains on the 480 unlabelled photos with every label 0 (the peer's own choice for
data without labels), so both compute the same loss.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
    return p.stdout + p.stderr


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("qgraph")
    ap.add_argument("--shared", default=os.path.join(HERE, "..", "..", "shared"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="lenet,mobilenetv2")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="train_bench_")
    photos = os.path.join(work, "photos_labels0.npz")
    d = np.load(os.path.join(a.shared, "data", "photos_calib_dev.npz"))
    np.savez(photos, x_u8=d["x_u8"], y=np.zeros(len(d["x_u8"]), np.int64))
    configs = {
        "lenet": ("lenet5_mnist_clntrained.onnx",
                  os.path.join(a.shared, "data", "fashion_mnist_train.npz"), 64, "none"),
        "mobilenetv2": ("mobilenetv2_bn.onnx", photos, 32, "imagenet"),
    }
    rows = []
    for name in a.models.split(","):
        model_file, data, batch, norm = configs[name]
        model = os.path.join(a.shared, "models", model_file)
        qdq = os.path.join(work, f"{name}_int8.onnx")
        run([a.qgraph, "insert", model, "--scheme", "int8", "--calib", data, "--calib-count", "64",
             "--norm", norm, "-o", qdq])
        # Enough samples for the peer's warm-up (3 steps) and timed steps.
        limit = str(batch * (a.steps + 3))
        for quant, path in [(False, model), (True, qdq)]:
            out = os.path.join(work, f"{name}_{quant}_trained.onnx")
            log = run([a.qgraph, "train", path, "--data", data, "--norm", norm, "--batch",
                       str(batch), "--limit", limit, "--epochs", "1", "--lr", "1e-4",
                       "--threads", str(a.threads), "-o", out])
            ours = float(re.search(r"([0-9.]+) samples/s", log).group(1))
            peer_cmd = [sys.executable, os.path.join(a.shared, "peers", "torch_qat.py"),
                        "--model", model, "--data", data, "--batch", str(batch),
                        "--steps", str(a.steps), "--threads", str(a.threads)]
            if not quant:
                peer_cmd.append("--no-quant")
            peer_out = run(peer_cmd)
            peer = json.loads([ln for ln in peer_out.splitlines() if ln.startswith("{")][-1])
            rows.append((name, batch, "int8 fake quant" if quant else "float", ours,
                         peer["samples_per_s"]))
    print(f"{a.threads} threads; qgraph's epoch of {a.steps + 3} steps, PyTorch's {a.steps} steps "
          "after 3 warm-up steps\n")
    print("| model | batch | training | qgraph samples/s | PyTorch samples/s | qgraph / PyTorch |")
    print("|---|---:|---|---:|---:|---:|")
    for name, batch, kind, ours, peer in rows:
        print(f"| {name} | {batch} | {kind} | {ours:.1f} | {peer:.1f} | {ours / peer:.2f} |")


if __name__ == "__main__":
    main()
