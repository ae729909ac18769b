"""Features: pooled activations at cut tensors over a data source, cached on disk.

The model runs in onnxruntime one batch at a time through the shared activation capture
(``capture.accumulate``); each batch is pooled at once (``cuts.pool``), so memory is one batch of the cut tensors plus the
pooled features. Results are cached under ``~/.cache/onnxcomp/features/<hash>.npy`` (or
``$ONNXCOMP_FEATURE_CACHE``), keyed by the hash of the model, the tensor, the pooling and the data.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxcomp.capture import Each, accumulate
from onnxcomp.data import DataSource
from onnxcomp.transfer.cuts import Cut, pool

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    env = os.environ.get("ONNXCOMP_FEATURE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "onnxcomp" / "features"


def model_hash(model: ir.Model) -> str:
    return hashlib.sha256(ir.to_proto(model).SerializeToString()).hexdigest()


def data_hash(data: DataSource) -> str:
    digest = hashlib.sha256()
    for batch in data.batches(256):
        for name in sorted(batch.inputs):
            array = np.ascontiguousarray(batch.inputs[name])
            digest.update(name.encode() + str(array.dtype).encode() + str(array.shape).encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def labels_of(data: DataSource) -> np.ndarray | None:
    """The data's ``labels`` array in sample order, or None."""
    if not data.has_labels:
        return None
    parts = [b.labels for b in data.batches(256)]
    return np.concatenate(parts) if parts else None


def compute_features(
    model: ir.Model,
    cuts: Sequence[Cut],
    data: DataSource,
    *,
    batch_size: int = 32,
    threads: int = 1,
    cache: bool = True,
    model_key: str | None = None,
) -> dict[str, np.ndarray]:
    """{key(cut): float32 (samples, features)} for each cut, in one pass over the data."""
    keys = {key(c): c for c in cuts}
    found: dict[str, np.ndarray] = {}
    paths: dict[str, Path] = {}
    if cache:
        mkey = model_key or model_hash(model)
        dkey = data_hash(data)
        for k in keys:
            digest = hashlib.sha256(f"{mkey}|{k}|{dkey}".encode()).hexdigest()[:32]
            paths[k] = cache_dir() / f"{digest}.npy"
            if paths[k].exists():
                try:
                    found[k] = np.load(paths[k])
                    logger.info("features at %s: from the cache", k)
                except (OSError, ValueError):
                    pass
    wanted = [c for k, c in keys.items() if k not in found]
    if wanted:
        parts: dict[str, list[np.ndarray]] = {key(c): [] for c in wanted}
        watchers: dict[str, list[Each]] = {}
        for cut in wanted:
            watchers.setdefault(cut.tensor, []).append(
                Each(lambda a, c=cut: parts[key(c)].append(pool(a, c.pooling)))
            )
        logger.info("features: %d samples at %d tensors", data.num_samples, len(watchers))
        accumulate(model, watchers, data, batch_size=batch_size)
        for k, chunks in parts.items():
            found[k] = np.concatenate(chunks)
            if cache:
                paths[k].parent.mkdir(parents=True, exist_ok=True)
                tmp = paths[k].with_suffix(f".{os.getpid()}.tmp.npy")
                np.save(tmp, found[k])
                os.replace(tmp, paths[k])
    return found


def key(cut: Cut) -> str:
    return f"{cut.tensor}:{cut.pooling}"
