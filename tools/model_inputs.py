"""Seeded random inputs for an ONNX model, shared by the check scripts:
declared dims are kept, open ones become `batch` (first dim) or `spatial`
(the others). Float inputs are standard normal; integer inputs are 0 or 1
(valid token ids, masks and segment ids); boolean inputs are random."""
import numpy as np
from onnx import helper


def random_feeds(model, batch, seed, spatial=64):
    inits = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        ty = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (batch if i == 0 else spatial)
                for i, d in enumerate(ty.shape.dim)]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(ty.elem_type)) if ty.elem_type else np.dtype(np.float32)
        if dtype.kind == "f":
            feeds[vi.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype.kind == "b":
            feeds[vi.name] = rng.integers(0, 2, dims).astype(bool)
        else:
            feeds[vi.name] = rng.integers(0, 2, dims).astype(dtype)
    return feeds
