#!/usr/bin/env python3
"""Times ONNX Runtime on one model: fastest and median seconds per run over REPEATS runs
after warm-up, with THREADS intra-op threads, on seeded random input of batch
BATCH (unknown non-batch dims become 64). Prints one JSON line.

usage: ort_time.py MODEL.onnx BATCH THREADS REPEATS
       ort_time.py MODEL.onnx BATCH THREADS serve

With `serve`, it prints "ready" after warm-up, then reads a count N per line
from stdin and answers each with a JSON list of N runs' seconds, until stdin
closes: a benchmark can then alternate short blocks of runs with its own, so
that both see the same spells of a shared machine.
"""
import json
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort


def main():
    path, batch, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    serve = sys.argv[4] == "serve"
    model = onnx.load(path, load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (batch if i == 0 else 64)
                for i, d in enumerate(vi.type.tensor_type.shape.dim)]
        feeds[vi.name] = rng.standard_normal(dims).astype(np.float32)
    for _ in range(3):
        sess.run(None, feeds)

    def timed(count):
        times = []
        for _ in range(count):
            t = time.perf_counter()
            sess.run(None, feeds)
            times.append(time.perf_counter() - t)
        return times

    if serve:
        print("ready", flush=True)
        for line in sys.stdin:
            print(json.dumps(timed(int(line))), flush=True)
        return
    times = sorted(timed(int(sys.argv[4])))
    print(json.dumps({"model": path, "batch": batch, "threads": threads,
                      "min_s": times[0], "median_s": times[len(times) // 2]}))


if __name__ == "__main__":
    main()
