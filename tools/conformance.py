#!/usr/bin/env python3
"""ONNX backend conformance: qgraph's evaluator (`qgraph infer`) against ONNX's
own backend test suite, with ONNX Runtime run on the same cases beside it.

usage: conformance.py QGRAPH_BINARY [--suite S[,S...]] [--filter REGEX] [-j N]
                      [--timeout SECONDS] [--json FILE] [--round-trip]
                      [--update] [--expected FILE] [--cache DIR] [--no-ort]
                      [--io auto|dir|npz] [-v]

Suites (all run by default):
  node               the operator tests, generated from the installed onnx
                     package (onnx.backend.test.case.node.collect_testcases())
                     into CACHE/node/<test>/ exactly as `backend-test-tools
                     generate-data` writes them; regenerated only when the
                     stamp CACHE/STAMP names another onnx version (~10 s).
  simple, pytorch-converted, pytorch-operator
                     the data suites shipped in onnx/backend/test/data/.
  light              the nine light real models (onnx/backend/test/data/light;
                     the `real` suite of onnx >= 1.16 points at them). They
                     come without inputs: as onnx's backend runner does, each
                     input is arange(n).reshape(shape) / n in float32 (open
                     dims become 1) and the expected output is the shipped
                     light_<name>_output_0.pb (or, were it missing, the
                     output of onnx.reference.ReferenceEvaluator), with the
                     rtol/atol of data/real/<test>/data.json. They are written
                     to CACHE/light/<test>/ beside a copy of the model.
CACHE defaults to target/conformance/ in this repository.

Every test data set of every case is run as
    qgraph infer CASE/model.onnx --inputs CASE/test_data_set_N -o OUTDIR
(OUTDIR receives output_0.pb, ... one TensorProto per graph output), under
--timeout (30 s; four times that for the light models), and each output is compared with the expected one the way
onnx's backend runner does (Runner.assert_similar_outputs): the output count,
then per output the shape, the dtype, and values within the case's rtol/atol
(defaults 1e-3 / 1e-7; NaN equals NaN; string arrays exactly; bfloat16 with
rtol at least 2**-6). A case is classified by its worst data set:
  pass         every data set ran and matched;
  fail         it ran but an output is wrong (values, shape, dtype, count),
               or qgraph refused it (exit 2) for a reason other than an
               operator it does not run: an unsupported data type, a
               sequence, a malformed model... (the message is recorded);
  unsupported  exit 2 with `does not implement` in stderr: the evaluator
               does not run one of the model's operators (recorded);
  crash        a panic (`panicked` in stderr), a signal, any exit code but
               0 and 2;
  hang         it did not finish within --timeout.
With --io npz (chosen by --io auto while `qgraph infer --help` does not
mention test data set directories) the inputs go in as an .npz file instead,
which passes only tensors: a case with a sequence input then fails.

ONNX Runtime (CPUExecutionProvider, graph optimisations off, one thread) runs
the same data sets in worker processes, one per -j slot, each guarded by the
same timeout; an ORT error, a wrong output or a timeout is an ORT fail.

The FAIR RATE is the share of the node tests that qgraph passes, among those
whose nodes (subgraphs included) are all default-domain operators (domain ""
or "ai.onnx": no ai.onnx.ml, no training or preview operators) and that ONNX
Runtime passes: the tests a complete standard ONNX runtime is expected to
pass. It is printed as `fair rate: P of N (xx.x%)`.

A node test's OPERATOR, for the per-operator table, is the op type of its
node (each generated node test has one node; a domain other than the default
one is prefixed, e.g. `ai.onnx.ml:LabelEncoder`). An `_expanded` test holds
the operator's function body instead: it is counted under the operator of the
test it was expanded from (its name less `_expanded` / `_expanded_verN`).

--round-trip also runs `qgraph convert CASE/model.onnx -o OUT.onnx` on every
case and requires ONNX Runtime's outputs on OUT.onnx to equal (within the
case's tolerances) its outputs on the original model; cases ORT cannot run
are not judged.

Expected passes: tools/conformance_expected.txt lists one `suite/test` per
line, sorted, for every case that passed (all of its data sets) when it was
last updated. The run exits 1 if a listed case that ran no longer passes
(printed as REGRESSIONS) or if any case crashed or hung (in --round-trip, the
conversion too); cases that pass but are not listed are printed with a hint
to run with --update, which rewrites the list from this run (entries of
cases outside --suite/--filter are kept). Exit 0 otherwise.

Examples:
  python3 tools/conformance.py target/debug/qgraph
  python3 tools/conformance.py target/debug/qgraph --suite node --filter 'conv|pool'
  python3 tools/conformance.py target/debug/qgraph --json conformance.json --update
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import ctypes
import glob
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

REPO = Path(__file__).resolve().parent.parent
ONNX_TEST_DIR = Path(onnx.__file__).resolve().parent / "backend" / "test"
DATA_DIR = ONNX_TEST_DIR / "data"
SUITES = ["node", "simple", "pytorch-converted", "pytorch-operator", "light"]
STATUSES = ["pass", "fail", "unsupported", "crash", "hang"]
# The worst data set decides a case's status.
SEVERITY = {"pass": 0, "unsupported": 1, "fail": 2, "hang": 3, "crash": 4}
DEFAULT_RTOL, DEFAULT_ATOL = 1e-3, 1e-7
CACHE_FORMAT = 1  # bump when the cache layout changes
MESSAGE_LIMIT = 400
LIGHT_TIMEOUT_FACTOR = 4  # the light models get 4 x --timeout


@dataclass
class Case:
    """One test model and its data sets."""

    suite: str
    name: str
    model: str  # path of model.onnx
    datasets: list[str]  # test_data_set_N directories, in order
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    op: str = ""  # node suite: the operator the test is about
    default_domain: bool = True  # every node (subgraphs too) in "" / ai.onnx

    @property
    def key(self) -> str:
        return f"{self.suite}/{self.name}"


@dataclass
class Result:
    """What qgraph (and ONNX Runtime) made of one case."""

    suite: str
    name: str
    status: str
    message: str = ""
    unsupported_op: str = ""
    op: str = ""
    default_domain: bool = True
    ort_pass: bool | None = None  # None: ORT not run (--no-ort)
    ort_message: str = ""
    round_trip: str = ""  # "", pass, fail, refused, crash, hang, n/a
    round_trip_message: str = ""
    seconds: float = 0.0
    datasets: list[dict] = field(default_factory=list)
    model: str = ""

    @property
    def key(self) -> str:
        return f"{self.suite}/{self.name}"


def one_line(text: str, limit: int = MESSAGE_LIMIT) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- the cache


def graph_domains(graph: onnx.GraphProto) -> set[str]:
    """The domains of every node in a graph and its subgraphs."""
    domains = set()
    for node in graph.node:
        domains.add(node.domain)
        for attr in node.attribute:
            if attr.HasField("g"):
                domains |= graph_domains(attr.g)
            for g in attr.graphs:
                domains |= graph_domains(g)
    return domains


def is_default_domain(domains: set[str]) -> bool:
    return domains <= {"", "ai.onnx"}


def op_label(node: onnx.NodeProto) -> str:
    if node.domain in ("", "ai.onnx"):
        return node.op_type
    return f"{node.domain}:{node.op_type}"


def write_value(path: Path, value, type_proto: onnx.TypeProto, name: str) -> None:
    """One input or output file, as onnx's generate_data writes it."""
    which = type_proto.WhichOneof("value")
    if which == "map_type":
        proto = numpy_helper.from_dict(value, name)
    elif which == "sequence_type":
        proto = numpy_helper.from_list(value, name)
    elif which == "optional_type":
        proto = numpy_helper.from_optional(value, name)
    elif isinstance(value, onnx.TensorProto):
        proto = value
    else:
        proto = numpy_helper.from_array(value, name)
    path.write_bytes(proto.SerializeToString())


def generate_node(out: Path) -> dict:
    """The node tests, as `backend-test-tools generate-data` writes them, and
    a manifest: per test its tolerances, operator and default-domain flag."""
    import onnx.backend.test.case.node as node_cases

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        cases = node_cases.collect_testcases()
    ops = {}
    for case in cases:
        if "_expanded" not in case.name:
            ops[case.name] = "+".join(sorted({op_label(n) for n in case.model.graph.node}))
    manifest = {}
    for case in cases:
        base = re.sub(r"_expanded(_ver\d+)?$", "", case.name)
        op = ops.get(base) or "+".join(sorted({op_label(n) for n in case.model.graph.node}))
        case_dir = out / case.name
        case_dir.mkdir(parents=True)
        (case_dir / "model.onnx").write_bytes(case.model.SerializeToString())
        graph = case.model.graph
        for i, (inputs, outputs) in enumerate(case.data_sets):
            ds = case_dir / f"test_data_set_{i}"
            ds.mkdir()
            for j, value in enumerate(inputs):
                write_value(ds / f"input_{j}.pb", value, graph.input[j].type, graph.input[j].name)
            for j, value in enumerate(outputs):
                write_value(ds / f"output_{j}.pb", value, graph.output[j].type, graph.output[j].name)
        manifest[case.name] = {
            "rtol": case.rtol,
            "atol": case.atol,
            "op": op,
            "default_domain": is_default_domain(graph_domains(graph)),
            "data_sets": len(case.data_sets),
        }
    return manifest


def dummy_input(vi: onnx.ValueInfoProto) -> np.ndarray:
    """onnx's Runner.generate_dummy_data(random=False): float32 only."""
    if vi.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise NotImplementedError(f"light model input '{vi.name}' is not float32")
    shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim)
    n = np.prod(shape)
    return (np.arange(n).reshape(shape) / n).astype(np.float32)


def generate_light(out: Path) -> dict:
    """The light models with the inputs and expected outputs onnx's backend
    runner gives them (see the module docstring)."""
    manifest = {}
    for data_json in sorted((DATA_DIR / "real").glob("*/data.json")):
        info = json.loads(data_json.read_text())
        url = info.get("url", "")
        if not url.startswith("onnx/backend/test/data/light/"):
            continue  # a real model that needs a download
        src = DATA_DIR / "light" / Path(url).name
        if not src.exists():
            continue
        case_dir = out / data_json.parent.name
        ds = case_dir / "test_data_set_0"
        ds.mkdir(parents=True)
        shutil.copyfile(src, case_dir / "model.onnx")
        model = onnx.load(str(src))
        inits = {t.name for t in model.graph.initializer}
        feeds = {}
        for vi in model.graph.input:
            if vi.name in inits:
                continue
            value = dummy_input(vi)
            feeds[vi.name] = value
            (ds / f"input_{len(feeds) - 1}.pb").write_bytes(numpy_helper.from_array(value).SerializeToString())
        prefix = src.with_suffix("")
        shipped = [Path(f"{prefix}_output_{i}.pb") for i in range(len(model.graph.output))]
        if all(p.exists() for p in shipped):
            for i, p in enumerate(shipped):
                shutil.copyfile(p, ds / f"output_{i}.pb")
        else:
            from onnx.reference import ReferenceEvaluator

            for i, o in enumerate(ReferenceEvaluator(model).run(None, feeds)):
                (ds / f"output_{i}.pb").write_bytes(numpy_helper.from_array(o).SerializeToString())
        manifest[data_json.parent.name] = {
            "rtol": info.get("rtol", DEFAULT_RTOL),
            "atol": info.get("atol", DEFAULT_ATOL),
            "data_sets": 1,
        }
    return manifest


def ensure_cache(cache: Path) -> None:
    """(Re)generate CACHE/node and CACHE/light unless the stamp matches."""
    stamp = {"onnx": onnx.__version__, "format": CACHE_FORMAT}
    stamp_file = cache / "STAMP"
    with contextlib.suppress(OSError, ValueError):
        if (
            json.loads(stamp_file.read_text()) == stamp
            and (cache / "node" / "manifest.json").exists()
            and (cache / "light" / "manifest.json").exists()
        ):
            return
    t0 = time.monotonic()
    print(f"generating the node tests of onnx {onnx.__version__} into {cache} ...", file=sys.stderr, flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gen-", dir=cache))
    try:
        for suite, gen in (("node", generate_node), ("light", generate_light)):
            manifest = gen(tmp / suite)
            (tmp / suite / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        for suite in ("node", "light"):
            if (cache / suite).exists():
                shutil.rmtree(cache / suite)
            (tmp / suite).rename(cache / suite)
        stamp_file.write_text(json.dumps(stamp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"generated in {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)


def data_sets(case_dir: Path) -> list[str]:
    found = glob.glob(str(case_dir / "test_data_set*"))
    return sorted(found, key=lambda p: int(re.sub(r"\D", "", Path(p).name) or 0))


def collect(cache: Path, suites: list[str], pattern: re.Pattern | None) -> list[Case]:
    cases = []
    for suite in suites:
        if suite in ("node", "light"):
            manifest = json.loads((cache / suite / "manifest.json").read_text())
            for name, info in sorted(manifest.items()):
                case_dir = cache / suite / name
                cases.append(
                    Case(
                        suite,
                        name,
                        str(case_dir / "model.onnx"),
                        data_sets(case_dir),
                        info["rtol"],
                        info["atol"],
                        info.get("op", ""),
                        info.get("default_domain", True),
                    )
                )
        else:
            for case_dir in sorted((DATA_DIR / suite).iterdir()):
                if not (case_dir / "model.onnx").exists():
                    continue
                rtol, atol = DEFAULT_RTOL, DEFAULT_ATOL
                if (case_dir / "data.json").exists():
                    info = json.loads((case_dir / "data.json").read_text())
                    rtol, atol = info.get("rtol", rtol), info.get("atol", atol)
                cases.append(Case(suite, case_dir.name, str(case_dir / "model.onnx"), data_sets(case_dir), rtol, atol))
    if pattern:
        cases = [c for c in cases if pattern.search(c.key)]
    return cases


# ------------------------------------------------------- values and compare


def graph_io(model_path: str) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    """The graph inputs that data sets feed (no initializer) and its outputs."""
    model = onnx.load(model_path, load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits], list(model.graph.output)


def read_value(path: str, type_proto: onnx.TypeProto):
    """(name, value) of a .pb file, parsed by the graph's type for it, as
    onnx's Runner._load_proto does (maps too)."""
    data = Path(path).read_bytes()
    which = type_proto.WhichOneof("value")
    if which == "sequence_type":
        proto = onnx.SequenceProto()
        proto.ParseFromString(data)
        return proto.name, numpy_helper.to_list(proto)
    if which == "optional_type":
        proto = onnx.OptionalProto()
        proto.ParseFromString(data)
        return proto.name, numpy_helper.to_optional(proto)
    if which == "map_type":
        proto = onnx.MapProto()
        proto.ParseFromString(data)
        return proto.name, numpy_helper.to_dict(proto)
    proto = onnx.TensorProto()
    proto.ParseFromString(data)
    return proto.name, numpy_helper.to_array(proto)


def read_data_set(ds: str, inputs, outputs):
    """The inputs (name -> value) and expected outputs of a data set."""
    n_in = len(glob.glob(os.path.join(ds, "input_*.pb")))
    n_out = len(glob.glob(os.path.join(ds, "output_*.pb")))
    feeds = {inputs[i].name: read_value(os.path.join(ds, f"input_{i}.pb"), inputs[i].type)[1] for i in range(n_in)}
    refs = [read_value(os.path.join(ds, f"output_{i}.pb"), outputs[i].type)[1] for i in range(n_out)]
    return feeds, refs


def _is_ml_dtype(dtype: np.dtype) -> bool:
    return type(dtype).__module__.startswith("ml_dtypes") or dtype.type.__module__.startswith("ml_dtypes")


def compare(got, ref, rtol: float, atol: float, what: str = "output") -> str | None:
    """None when `got` matches `ref` as onnx's Runner.assert_similar_outputs
    would have it, else a one-line description of the first difference."""
    if isinstance(ref, (list, tuple)):
        if not isinstance(got, (list, tuple)):
            return f"{what}: a {type(got).__name__}, expected a sequence"
        if len(got) != len(ref):
            return f"{what}: a sequence of {len(got)}, expected {len(ref)}"
        for j, (g, r) in enumerate(zip(got, ref)):
            if (m := compare(g, r, rtol, atol, f"{what}[{j}]")) is not None:
                return m
        return None
    if isinstance(ref, dict):
        if not isinstance(got, dict) or set(got) != set(ref):
            return f"{what}: map keys differ"
        for k in ref:
            if (m := compare(got[k], ref[k], rtol, atol, f"{what}[{k!r}]")) is not None:
                return m
        return None
    if ref is None or got is None:
        return None if got is ref else f"{what}: {'empty' if got is None else 'a value'}, expected {'empty' if ref is None else 'a value'} (optional)"
    got, ref = np.asarray(got), np.asarray(ref)
    if got.shape != ref.shape:
        return f"{what}: shape {list(got.shape)}, expected {list(ref.shape)}"
    if ref.dtype == object or got.dtype == object:
        if not np.array_equal(got, ref):
            return f"{what}: strings differ: got {one_line(got.ravel()[:4], 120)}, expected {one_line(ref.ravel()[:4], 120)}"
        return None
    if got.dtype != ref.dtype:
        return f"{what}: dtype {got.dtype}, expected {ref.dtype}"
    if ref.dtype.name == "bfloat16":
        rtol = max(rtol, 2**-6)
    if _is_ml_dtype(ref.dtype):
        got, ref = got.astype(np.float32), ref.astype(np.float32)
    if ref.dtype == bool:
        bad = got != ref
    else:
        with np.errstate(all="ignore"):
            g, r = got.astype(np.float64), ref.astype(np.float64)
            bad = ~np.isclose(g, r, rtol=rtol, atol=atol, equal_nan=True)
    if not bad.any():
        return None
    idx = np.unravel_index(int(np.argmax(bad)), bad.shape) if bad.ndim else ()
    at = list(map(int, idx))
    msg = f"{what}: {int(bad.sum())} of {bad.size} values differ; first at {at}: got {got[idx]!r}, expected {ref[idx]!r}"
    if ref.dtype.kind == "f" or _is_ml_dtype(ref.dtype):
        with np.errstate(all="ignore"):
            diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
            diff = diff[np.isfinite(diff)]
        if diff.size:
            msg += f"; max abs diff {float(diff.max()):.3g}"
    return one_line(msg)


def compare_all(got: list, refs: list, names: list[str], rtol: float, atol: float) -> str | None:
    if len(got) != len(refs):
        return f"{len(got)} outputs, expected {len(refs)}"
    for g, r, name in zip(got, refs, names):
        if (m := compare(g, r, rtol, atol, f"output '{name}'")) is not None:
            return m
    return None


# ------------------------------------------------------------------- qgraph


def run_process(cmd: list[str], timeout: float) -> subprocess.CompletedProcess | None:
    """Run a command, capturing its output; None when it outlives `timeout`,
    after killing it and anything it started (its own process group)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None
    except BaseException:  # Ctrl-C: leave nothing behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def infer_help_mentions_directories(qgraph: str) -> bool:
    proc = subprocess.run([qgraph, "infer", "--help"], capture_output=True, text=True, timeout=30)
    text = (proc.stdout + proc.stderr).lower()
    return any(w in text for w in ("test_data_set", "test data set", "director"))


def tidy(stderr: str, case_dir: str) -> str:
    """qgraph's stderr less what every message repeats: the `qgraph: error: `
    prefix, the case directory in the paths it names, a leading `model.onnx: `."""
    text = stderr.replace(case_dir + os.sep, "").replace("qgraph: error: ", "")
    return re.sub(r"^model\.onnx: ", "", text, flags=re.M)


def classify_exit(proc_rc: int, stderr: str) -> tuple[str, str, str]:
    """(status, message, unsupported op) of a qgraph run that did not exit 0."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    last = one_line(lines[-1]) if lines else ""
    if "panicked" in stderr:
        panic = next((line for line in lines if "panicked" in line), last)
        i = lines.index(panic) if panic in lines else -1
        detail = lines[i + 1] if 0 <= i < len(lines) - 1 and "panicked at" in panic else ""
        return "crash", one_line(f"{panic} {detail}"), ""
    if proc_rc < 0:
        try:
            sig = signal.Signals(-proc_rc).name
        except ValueError:
            sig = f"signal {-proc_rc}"
        return "crash", one_line(f"killed by {sig}" + (f"; {last}" if last else "")), ""
    if proc_rc != 2:
        return "crash", one_line(f"exit code {proc_rc}" + (f"; {last}" if last else "")), ""
    if "does not implement" in stderr:
        m = re.search(r"does not implement ([^\s,;:]+)", stderr)
        return "unsupported", last, (m.group(1).strip("'\".") if m else "?")
    return "fail", last or "exit 2 with no message", ""


def run_qgraph(qgraph: str, case: Case, ds: str, inputs, outputs, io: str, timeout: float) -> dict:
    """One data set through `qgraph infer`: {status, message, unsupported_op, seconds}."""
    t0 = time.monotonic()
    res = {"data_set": Path(ds).name, "status": "pass", "message": "", "unsupported_op": ""}
    with tempfile.TemporaryDirectory(prefix="qgconf-") as tmp:
        feeds, refs = read_data_set(ds, inputs, outputs)
        if io == "npz":
            bad = [n for n, v in feeds.items() if not isinstance(v, np.ndarray)]
            if bad:
                res.update(status="fail", message=f"runner: --io npz cannot pass the non-tensor input '{bad[0]}'")
                return res
            src, dst = os.path.join(tmp, "inputs.npz"), os.path.join(tmp, "outputs.npz")
            np.savez(src, **feeds)
        else:
            src, dst = ds, os.path.join(tmp, "out")
        cmd = [qgraph, "infer", case.model, "--inputs", src, "-o", dst]
        proc = run_process(cmd, timeout)
        if proc is None:
            res.update(status="hang", message=f"no result within {timeout:g} s")
            res["seconds"] = round(time.monotonic() - t0, 3)
            return res
        res["seconds"] = round(time.monotonic() - t0, 3)
        if proc.returncode != 0 or "panicked" in proc.stderr:
            status, message, op = classify_exit(proc.returncode, tidy(proc.stderr, os.path.dirname(case.model)))
            res.update(status=status, message=message, unsupported_op=op)
            return res
        names = [o.name for o in outputs]
        try:
            if io == "npz":
                arrays = np.load(dst, allow_pickle=False)
                missing = [n for n in names if n not in arrays.files]
                if missing:
                    res.update(status="fail", message=f"no array for output '{missing[0]}' in the .npz output; it holds {arrays.files}")
                    return res
                got = [arrays[n] for n in names]
            else:
                files = glob.glob(os.path.join(dst, "output_*.pb"))
                if len(files) != len(outputs):
                    res.update(status="fail", message=f"wrote {len(files)} output files, expected {len(outputs)}")
                    return res
                got = []
                for j, vi in enumerate(outputs):
                    pb = os.path.join(dst, f"output_{j}.pb")
                    if not os.path.exists(pb):
                        res.update(status="fail", message=f"no output_{j}.pb")
                        return res
                    name, value = read_value(pb, vi.type)
                    if name != vi.name:
                        res.update(status="fail", message=f"output_{j}.pb is named '{name}', expected '{vi.name}'")
                        return res
                    got.append(value)
        except Exception as e:  # unreadable output: a wrong result
            res.update(status="fail", message=one_line(f"unreadable output: {type(e).__name__}: {e}"))
            return res
        problem = compare_all(got, refs, names, case.rtol, case.atol)
        if problem:
            res.update(status="fail", message=problem)
    return res


def run_convert(qgraph: str, case: Case, out: str, timeout: float) -> tuple[str, str]:
    """`qgraph convert` for --round-trip: (status, message); status '' on success."""
    proc = run_process([qgraph, "convert", case.model, "-o", out], timeout)
    if proc is None:
        return "hang", f"qgraph convert: no result within {timeout:g} s"
    if proc.returncode == 0 and "panicked" not in proc.stderr:
        return "", ""
    status, message, _ = classify_exit(proc.returncode, tidy(proc.stderr, os.path.dirname(case.model)))
    return ("refused" if status in ("fail", "unsupported") else status), "qgraph convert: " + message


# ------------------------------------------------------------ ONNX Runtime


def _ort_session(ort, path: str):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _is_ml_elem_type(elem_type: int) -> bool:
    """An ONNX element type numpy has no dtype for (bfloat16, float8, int4...):
    onnx maps it to an ml_dtypes dtype, which ORT's Python binding refuses."""
    try:
        return _is_ml_dtype(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)))
    except (KeyError, TypeError, ValueError):
        return False


def _to_ortvalue(ort, value):
    """A feed as an OrtValue, the bytes of an ml_dtypes array copied in as the
    TensorProto packs them (ORT's own layout, 4-bit and 2-bit types too)."""
    if not (isinstance(value, np.ndarray) and _is_ml_dtype(value.dtype)):
        return ort.OrtValue.ortvalue_from_numpy(value)
    proto = numpy_helper.from_array(value)
    v = ort.OrtValue.ortvalue_from_shape_and_type(list(value.shape), proto.data_type)
    raw = proto.raw_data
    if v.tensor_size_in_bytes() != len(raw):
        raise ValueError(f"{len(raw)} bytes for an ORT tensor of {v.tensor_size_in_bytes()}")
    if raw:
        ctypes.memmove(v.data_ptr(), raw, len(raw))
    return v


def _from_ortvalue(v):
    if not v.is_tensor():
        raise NotImplementedError("runner: only tensor outputs are read back from OrtValues")
    elem_type = v.element_type()
    if not _is_ml_elem_type(elem_type):
        return v.numpy()
    proto = onnx.TensorProto()
    proto.data_type = elem_type
    proto.dims.extend(v.shape())
    size = v.tensor_size_in_bytes()
    proto.raw_data = ctypes.string_at(v.data_ptr(), size) if size else b""
    return numpy_helper.to_array(proto)


def _ort_run(ort, sess, feeds: dict, ml_outputs: bool) -> list:
    """sess.run, except that ml_dtypes values (which the Python binding cannot
    convert) go in and come out as OrtValues holding their bytes."""
    ml_inputs = any(isinstance(v, np.ndarray) and _is_ml_dtype(v.dtype) for v in feeds.values())
    if not (ml_inputs or ml_outputs):
        return sess.run(None, feeds)
    values = {k: _to_ortvalue(ort, v) for k, v in feeds.items()}
    return [_from_ortvalue(v) for v in sess.run_with_ort_values(None, values)]


def _ort_job(ort, req: dict) -> dict:
    """ORT on a case's data sets, and on its converted form for --round-trip."""
    inputs, outputs = graph_io(req["model"])
    names = [o.name for o in outputs]
    ml_outputs = any(_is_ml_elem_type(o.type.tensor_type.elem_type) for o in outputs if o.type.HasField("tensor_type"))
    res = {"ok": True, "message": "", "rt": None}
    ort_outs = []
    try:
        sess = _ort_session(ort, req["model"])
        for ds in req["datasets"]:
            feeds, refs = read_data_set(ds, inputs, outputs)
            got = _ort_run(ort, sess, feeds, ml_outputs)
            ort_outs.append((feeds, got))
            problem = compare_all(got, refs, names, req["rtol"], req["atol"])
            if problem:
                res.update(ok=False, message=f"{Path(ds).name}: {problem}")
                break
    except Exception as e:
        res.update(ok=False, message=one_line(f"{type(e).__name__}: {e}"))
    if req.get("rt_model"):
        if not res["ok"] or len(ort_outs) != len(req["datasets"]):
            res["rt"] = ("n/a", "ONNX Runtime does not pass the original")
        else:
            try:
                sess2 = _ort_session(ort, req["rt_model"])
                res["rt"] = ("pass", "")
                for feeds, first in ort_outs:
                    problem = compare_all(_ort_run(ort, sess2, feeds, ml_outputs), first, names, req["rtol"], req["atol"])
                    if problem:
                        res["rt"] = ("fail", "ORT on the converted model: " + problem)
                        break
            except Exception as e:
                res["rt"] = ("fail", one_line(f"ORT on the converted model: {type(e).__name__}: {e}"))
    return res


def _ort_worker_main(conn) -> None:
    """A worker process: runs _ort_job requests until it receives None."""
    warnings.simplefilter("ignore")
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    while True:
        try:
            req = conn.recv()
        except EOFError:
            return
        if req is None:
            return
        try:
            res = _ort_job(ort, req)
        except BaseException as e:  # keep the worker alive
            res = {"ok": False, "message": one_line(f"{type(e).__name__}: {e}"), "rt": None}
        conn.send(res)


class OrtWorker:
    """An ORT worker process that a request can time out on: then the process
    is killed and the next request starts a fresh one."""

    def __init__(self, ctx):
        self.ctx, self.proc, self.conn = ctx, None, None

    def _start(self) -> None:
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_ort_worker_main, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent

    def _kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join(5)
        self.proc = None

    def run(self, req: dict, timeout: float) -> dict:
        if self.proc is None or not self.proc.is_alive():
            self._start()
        # A fresh worker spends its first seconds importing onnxruntime.
        self.conn.send(req)
        if self.conn.poll(timeout + 10):
            try:
                return self.conn.recv()
            except (EOFError, OSError):
                code = self.proc.exitcode if self.proc else None
                self._kill()
                return {"ok": False, "message": f"ONNX Runtime crashed (exit code {code})", "rt": None}
        self._kill()
        return {"ok": False, "message": f"ONNX Runtime gave no result within {timeout:g} s", "rt": None}

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send(None)
            self.proc.join(5)
            if self.proc.is_alive():
                self._kill()


# --------------------------------------------------------------- one case


def run_case(case: Case, args, io: str, ort_worker: OrtWorker | None) -> Result:
    t0 = time.monotonic()
    # Whole models in a debug build on a busy machine: room to finish.
    timeout = args.timeout * (LIGHT_TIMEOUT_FACTOR if case.suite == "light" else 1)
    res = Result(case.suite, case.name, "pass", op=case.op, default_domain=case.default_domain, model=case.model)
    try:
        inputs, outputs = graph_io(case.model)
    except Exception as e:
        res.status, res.message = "fail", one_line(f"runner: the model does not load: {e}")
        return res
    for ds in case.datasets:
        r = run_qgraph(args.qgraph, case, ds, inputs, outputs, io, timeout)
        res.datasets.append(r)
        if SEVERITY[r["status"]] > SEVERITY[res.status]:
            res.status, res.message, res.unsupported_op = r["status"], r["message"], r["unsupported_op"]
            if len(case.datasets) > 1 and r["message"]:
                res.message = f"{r['data_set']}: {r['message']}"
        if r["status"] == "unsupported":
            break  # the model, not the data, is refused
    if not case.datasets:
        res.status, res.message = "fail", "runner: the case has no test data set"
    tmp = None
    req = {"model": case.model, "datasets": case.datasets, "rtol": case.rtol, "atol": case.atol}
    if args.round_trip:
        tmp = tempfile.TemporaryDirectory(prefix="qgconf-rt-")
        out = os.path.join(tmp.name, "converted.onnx")
        status, message = run_convert(args.qgraph, case, out, timeout)
        if status:
            res.round_trip, res.round_trip_message = status, message
        else:
            req["rt_model"] = out
    try:
        if ort_worker is not None:
            o = ort_worker.run(req, timeout)
            res.ort_pass, res.ort_message = o["ok"], o["message"]
            if o.get("rt"):
                res.round_trip, res.round_trip_message = o["rt"]
            elif args.round_trip and not res.round_trip:
                res.round_trip, res.round_trip_message = "n/a", "ONNX Runtime did not run"
    finally:
        if tmp is not None:
            tmp.cleanup()
    res.seconds = round(time.monotonic() - t0, 3)
    return res


def run_all(cases: list[Case], args, io: str) -> list[Result]:
    ctx = multiprocessing.get_context("spawn")
    local = threading.local()
    workers: list[OrtWorker] = []
    lock = threading.Lock()

    def task(case: Case) -> Result:
        worker = None
        if not args.no_ort:
            worker = getattr(local, "worker", None)
            if worker is None:
                worker = local.worker = OrtWorker(ctx)
                with lock:
                    workers.append(worker)
        return run_case(case, args, io, worker)

    # Slow cases (big models, several data sets) first, for a balanced finish.
    order = sorted(cases, key=lambda c: (c.suite not in ("light", "pytorch-converted"), -os.path.getsize(c.model)))
    results = []
    done = 0
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {pool.submit(task, c): c for c in order}
            for fut in concurrent.futures.as_completed(futures):
                r = fut.result()
                results.append(r)
                done += 1
                if args.verbose:
                    ort_note = "" if r.ort_pass is None else (" (ORT pass)" if r.ort_pass else " (ORT fail)")
                    print(f"{r.status:<11} {r.key}{ort_note} {r.message}", file=sys.stderr, flush=True)
                elif done % 250 == 0 or done == len(cases):
                    print(f"  {done}/{len(cases)} cases", file=sys.stderr, flush=True)
    finally:
        for w in workers:
            w.close()
    return sorted(results, key=lambda r: (SUITES.index(r.suite), r.name))


# ------------------------------------------------------------------ report


def pct(p: int, n: int) -> str:
    return f"{100.0 * p / n:.1f}%" if n else "n/a"


def report(results: list[Result], args) -> dict:
    by_suite = defaultdict(list)
    for r in results:
        by_suite[r.suite].append(r)
    ort_on = not args.no_ort
    summary = {"suites": {}}

    print("\n== per suite")
    head = f"{'suite':<18} {'cases':>6} {'pass':>6} {'fail':>6} {'unsup':>6} {'crash':>6} {'hang':>6}"
    if ort_on:
        head += f" {'ORT pass':>9} {'both':>6}"
    print(head)
    for suite in SUITES:
        rs = by_suite.get(suite)
        if not rs:
            continue
        c = Counter(r.status for r in rs)
        row = f"{suite:<18} {len(rs):>6} " + " ".join(f"{c[s]:>6}" for s in STATUSES)
        entry = {"cases": len(rs), **{s: c[s] for s in STATUSES}}
        if ort_on:
            ort_pass = sum(1 for r in rs if r.ort_pass)
            both = sum(1 for r in rs if r.ort_pass and r.status == "pass")
            row += f" {ort_pass:>9} {both:>6}"
            entry.update(ort_pass=ort_pass, both_pass=both)
        print(row)
        summary["suites"][suite] = entry

    node = by_suite.get("node", [])
    if node:
        print("\n== per operator (node suite), by non-passing cases")
        ops = defaultdict(list)
        for r in node:
            ops[r.op].append(r)
        rows = []
        for op, rs in ops.items():
            bad = [r for r in rs if r.status != "pass"]
            # The first failure ONNX Runtime passes says most about qgraph.
            first = next((r for r in bad if r.ort_pass), bad[0]) if bad else None
            rows.append((len(bad), op, rs, first))
        rows.sort(key=lambda t: (-t[0], t[1]))
        print(f"{'operator':<34} {'cases':>5} {'pass':>5} {'!pass':>5}" + (f" {'ORT':>5}" if ort_on else "") + "  first failure")
        limit = None if args.all_ops else 60
        summary["operators"] = {}
        for i, (nbad, op, rs, first) in enumerate(rows):
            ort_pass = sum(1 for r in rs if r.ort_pass)
            summary["operators"][op] = {
                "cases": len(rs),
                "pass": len(rs) - nbad,
                "not_pass": nbad,
                "ort_pass": ort_pass,
                "first_failure": f"{first.name}: {first.status}: {first.message}" if first else "",
            }
            if nbad == 0 or (limit is not None and i >= limit):
                continue
            msg = one_line(f"{first.name}: {first.status}: {first.message}", 150)
            print(f"{op:<34} {len(rs):>5} {len(rs) - nbad:>5} {nbad:>5}" + (f" {ort_pass:>5}" if ort_on else "") + f"  {msg}")
        shown = sum(1 for t in rows if t[0])
        if limit is not None and shown > limit:
            print(f"... {shown - limit} more operators with non-passing cases (--all-ops lists them)")
        print(f"{sum(1 for t in rows if t[0] == 0)} of {len(rows)} operators pass every case")

        wanted = Counter(r.unsupported_op for r in node if r.status == "unsupported")
        if wanted:
            print("\n== operators the evaluator refuses, by node cases refused")
            print(", ".join(f"{op} {n}" for op, n in wanted.most_common(40)))
        summary["unsupported_ops"] = dict(wanted.most_common())

        if ort_on:
            fair = [r for r in node if r.default_domain and r.ort_pass]
            p = sum(1 for r in fair if r.status == "pass")
            print(f"\nfair rate: {p} of {len(fair)} ({pct(p, len(fair))})")
            print("  (node tests of default-domain operators that ONNX Runtime passes; qgraph's share of them)")
            summary["fair_rate"] = {"pass": p, "of": len(fair)}

    light = by_suite.get("light", [])
    if light:
        print("\n== light models")
        for r in light:
            ort_note = "" if r.ort_pass is None else (" ORT pass" if r.ort_pass else " ORT FAIL")
            print(f"{r.status.upper() if r.status != 'pass' else 'pass':<11} {r.name:<22}{ort_note:<10} {one_line(r.message, 150)}")

    for suite in ("simple", "pytorch-converted", "pytorch-operator"):
        rs = by_suite.get(suite)
        if rs and ort_on:
            q = sum(1 for r in rs if r.status == "pass")
            o = sum(1 for r in rs if r.ort_pass)
            extra = sum(1 for r in rs if r.status == "pass" and not r.ort_pass)
            print(f"{suite}: qgraph passes {q} of {len(rs)}, ONNX Runtime {o} ({extra} that ORT fails)")

    if args.round_trip:
        c = Counter(r.round_trip for r in results)
        print("\n== round trip (qgraph convert, then ORT on both)")
        print(", ".join(f"{k} {v}" for k, v in sorted(c.items())))
        for r in results:
            if r.round_trip in ("fail", "crash", "hang"):
                print(f"  {r.round_trip:<6} {r.key}: {one_line(r.round_trip_message, 200)}")
        summary["round_trip"] = dict(c)

    crashes = [r for r in results if r.status == "crash" or r.round_trip == "crash"]
    hangs = [r for r in results if r.status == "hang" or r.round_trip == "hang"]
    print(f"\ncrash: {len(crashes)}, hang: {len(hangs)}")
    for r in crashes + hangs:
        ds = r.datasets[-1]["data_set"] if r.datasets else "test_data_set_0"
        print(f"  {r.status if r.status in ('crash', 'hang') else 'round trip ' + r.round_trip} {r.key}: {one_line(r.message or r.round_trip_message, 200)}")
        print(f"    {args.qgraph} infer {r.model} --inputs {Path(r.model).parent / ds} -o /tmp/out")
    summary["crash"], summary["hang"] = len(crashes), len(hangs)
    return summary


# ---------------------------------------------------------- expected passes


def read_expected(path: Path) -> set[str]:
    if not path.exists():
        return set()
    return {line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")}


def write_expected(path: Path, entries: set[str]) -> None:
    header = (
        "# Cases qgraph's evaluator passes in ONNX's backend tests (suite/test),\n"
        "# checked by tools/conformance.py; rewrite with: tools/conformance.py QGRAPH --update\n"
    )
    path.write_text(header + "".join(f"{e}\n" for e in sorted(entries)))


# -------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog="See the module docstring (tools/conformance.py) for the details.")
    p.add_argument("qgraph", help="the qgraph binary, e.g. target/debug/qgraph")
    p.add_argument("--suite", action="append", help=f"suites to run (repeatable or comma-separated; default all: {','.join(SUITES)})")
    p.add_argument("--filter", help="run only cases whose 'suite/test' matches this regular expression (re.search)")
    p.add_argument("-j", "--jobs", type=int, default=2, help="cases run at once (default 2)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per qgraph run and per ORT case (default 30)")
    p.add_argument("--json", help="also write every case's result to this file")
    p.add_argument("--round-trip", action="store_true", help="also check `qgraph convert` keeps ORT's outputs")
    p.add_argument("--update", action="store_true", help="rewrite the expected-pass list from this run")
    p.add_argument("--expected", default=str(REPO / "tools" / "conformance_expected.txt"), help="the expected-pass list (default tools/conformance_expected.txt)")
    p.add_argument("--cache", default=str(REPO / "target" / "conformance"), help="where generated tests go (default target/conformance)")
    p.add_argument("--no-ort", action="store_true", help="do not run ONNX Runtime (no fair rate)")
    p.add_argument("--io", choices=["auto", "dir", "npz"], default="auto", help="how inputs reach qgraph infer: a test data set directory, or an .npz file (auto: dir when `qgraph infer --help` mentions it)")
    p.add_argument("--all-ops", action="store_true", help="list every operator with non-passing cases, not the first 60")
    p.add_argument("-v", "--verbose", action="store_true", help="print each case's result as it finishes")
    args = p.parse_args(argv)
    suites = []
    for s in args.suite or SUITES:
        suites += [x for x in s.split(",") if x]
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        p.error(f"unknown suite {unknown[0]!r}; the suites are {', '.join(SUITES)}")
    args.suites = [s for s in SUITES if s in suites]
    if args.jobs < 1:
        p.error("-j must be at least 1")
    return args


def main(argv=None) -> int:
    t0 = time.monotonic()
    args = parse_args(argv)
    if not os.access(args.qgraph, os.X_OK):
        print(f"error: {args.qgraph} is not an executable (build it: cargo build -p qgraph-cli)", file=sys.stderr)
        return 2
    args.qgraph = str(Path(args.qgraph).resolve())
    io = args.io
    if io == "auto":
        io = "dir" if infer_help_mentions_directories(args.qgraph) else "npz"
        if io == "npz":
            print("note: `qgraph infer --help` mentions no test data set directory: feeding .npz files (tensors only)", file=sys.stderr)
    cache = Path(args.cache)
    if any(s in ("node", "light") for s in args.suites):
        ensure_cache(cache)
    pattern = re.compile(args.filter) if args.filter else None
    cases = collect(cache, args.suites, pattern)
    if not cases:
        print("no case matches", file=sys.stderr)
        return 2
    print(f"{len(cases)} cases ({', '.join(args.suites)}), onnx {onnx.__version__}, {args.jobs} jobs, inputs as {io}", file=sys.stderr, flush=True)
    results = run_all(cases, args, io)
    summary = report(results, args)

    # Expected passes.
    expected_path = Path(args.expected)
    expected = read_expected(expected_path)
    ran = {r.key for r in results}
    passing = {r.key for r in results if r.status == "pass"}
    in_scope = {e for e in expected if e.split("/", 1)[0] in args.suites and (pattern is None or pattern.search(e))}
    regressions = sorted(e for e in in_scope if e in ran and e not in passing)
    vanished = sorted(e for e in in_scope if e not in ran)
    new = sorted(passing - expected)
    if vanished:
        print(f"\nnote: {len(vanished)} listed cases no longer exist (another onnx version?): {', '.join(vanished[:10])}{' ...' if len(vanished) > 10 else ''}")
    if args.update:
        write_expected(expected_path, (expected - in_scope) | passing)
        print(f"\nwrote {expected_path} ({len((expected - in_scope) | passing)} cases; {len(new)} added, {len(regressions)} removed)")
    else:
        if new:
            print(f"\nnewly passing ({len(new)}): {', '.join(new[:50])}{' ...' if len(new) > 50 else ''}")
            print(f"  to list them: python3 {Path(sys.argv[0]).as_posix()} {args.qgraph} --update")
        if regressions:
            print(f"\nREGRESSIONS ({len(regressions)} listed cases no longer pass):")
            for e in regressions:
                r = next(x for x in results if x.key == e)
                print(f"  {e}: {r.status}: {one_line(r.message, 200)}")

    elapsed = time.monotonic() - t0
    summary["elapsed_s"] = round(elapsed, 1)
    if args.json:
        import importlib.metadata

        try:
            ort_version = importlib.metadata.version("onnxruntime")
        except importlib.metadata.PackageNotFoundError:
            ort_version = None
        doc = {
            "onnx": onnx.__version__,
            "onnxruntime": ort_version,
            "qgraph": args.qgraph,
            "io": io,
            "summary": summary,
            "regressions": regressions,
            "newly_passing": new,
            "cases": [asdict(r) for r in results],
        }
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str))
    failed = bool(summary["crash"] or summary["hang"] or (regressions and not args.update))
    print(f"\n{len(results)} cases in {elapsed:.0f} s: {'FAILED' if failed else 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
