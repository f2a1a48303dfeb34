"""Seeded random float32 inputs for an ONNX model, shared by the check
scripts: declared dims are kept, open ones become `batch` (first dim) or
`spatial` (the others)."""
import numpy as np


def random_feeds(model, batch, seed, spatial=64):
    inits = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (batch if i == 0 else spatial)
                for i, d in enumerate(vi.type.tensor_type.shape.dim)]
        feeds[vi.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds
