#!/usr/bin/env python3
"""Times ONNX Runtime on one model: fastest and median seconds per run over REPEATS runs
after warm-up, with THREADS intra-op threads, on seeded random input of batch
BATCH (unknown non-batch dims become 64). Prints one JSON line.

usage: ort_time.py MODEL.onnx BATCH THREADS REPEATS [--inputs FEEDS.npz]
       ort_time.py MODEL.onnx BATCH THREADS serve [--inputs FEEDS.npz]

With `--inputs`, the model runs on the arrays of FEEDS.npz, one per input by
name (a transformer's int64 token ids and mask, say: the very feeds the
caller gives its own runtime); BATCH is then only reported.

With `profile` (REPEATS then follows: `profile 5`), it prints a line
`OP NODES SECONDS` per operator type of the session's optimized graph (ONNX
Runtime fuses nodes: FusedMatMul, BiasGelu...), each type's fastest run's
seconds by ONNX Runtime's own profiler.

With `serve`, it prints "ready" after warm-up, then reads a count N per line
from stdin and answers each with a JSON list of N runs' seconds, until stdin
closes: a benchmark can then alternate short blocks of runs with its own, so
that both see the same spells of a shared machine.
"""
import json
import os
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort


def main():
    args = sys.argv[1:]
    feeds_path = None
    if "--inputs" in args:
        at = args.index("--inputs")
        feeds_path = args[at + 1]
        del args[at:at + 2]
    path, batch, threads = args[0], int(args[1]), int(args[2])
    serve = args[3] == "serve"
    profiling = args[3] == "profile"
    model = onnx.load(path, load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if profiling:
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort_profile")
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    if feeds_path is not None:
        with np.load(feeds_path) as archive:
            given = {name: archive[name] for name in archive.files}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        if feeds_path is not None:
            if vi.name not in given:
                sys.exit(f"{feeds_path} has no array for input '{vi.name}'")
            feeds[vi.name] = given[vi.name]
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

    if profiling:
        timed(int(args[4]) if len(args) > 4 else 3)
        for op, (nodes, secs) in operator_times(sess.end_profiling()).items():
            print(op, nodes, secs)
        return
    if serve:
        print("ready", flush=True)
        for line in sys.stdin:
            print(json.dumps(timed(int(line))), flush=True)
        return
    times = sorted(timed(int(args[3])))
    print(json.dumps({"model": path, "batch": batch, "threads": threads,
                      "min_s": times[0], "median_s": times[len(times) // 2]}))


def operator_times(trace_path):
    """Per operator type, (nodes, seconds): the fastest run's seconds (the
    3 warm-up runs left out)."""
    with open(trace_path) as f:
        events = json.load(f)
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")[3:]
    per_run = [dict() for _ in runs]
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        op = e.get("args", {}).get("op_name", "?")
        for i, (start, end) in enumerate(runs):
            if start <= e["ts"] <= end:
                nodes, secs = per_run[i].get(op, (0, 0.0))
                per_run[i][op] = (nodes + 1, secs + e["dur"] * 1e-6)
                break
    ops = {}
    for run in per_run:
        for op, (nodes, secs) in run.items():
            if op not in ops or secs < ops[op][1]:
                ops[op] = (nodes, secs)
    os.remove(trace_path)
    return ops


if __name__ == "__main__":
    main()
