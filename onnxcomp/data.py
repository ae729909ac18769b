"""Data sources: .npz files, folders of them, and random inputs; read one batch at a time.

An ``.npz`` file holds one array per model input, keyed by the input's name, first axis =
samples, and optionally a ``labels`` array; a 0-d array (a scalar input) goes with every batch,
and an array with one axis more than its input holds one whole feed per sample (a recurrent state
whose batch axis is not the first: [samples, layers, 1, hidden]). Arrays stored uncompressed
(``np.savez``) are memory-mapped, so a batch reads only its own rows; compressed ones are read one
array at a time.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import math
import os
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from onnxcomp.errors import OnnxcompError
from onnxcomp.model import InputSpec

logger = logging.getLogger(__name__)

LABELS = "labels"

# Random inputs of one sample may take at most this much memory (a declared input of
# [1, 100000, 100000] floats would be 37 GiB): beyond it, real data or a smaller --shape is asked for.
RANDOM_BUDGET_BYTES = 1 << 30


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 15] + f"... ({len(text)} chars)"


@dataclasses.dataclass
class Batch:
    """One batch: model inputs by name, and labels when the data has them."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        arrays = [a for a in self.inputs.values() if np.ndim(a) > 0]
        return len(arrays[0]) if arrays else 1


class DataSource(abc.ABC):
    """Something that yields batches of model inputs."""

    name: str = "data"

    @property
    @abc.abstractmethod
    def input_names(self) -> list[str]: ...

    @property
    @abc.abstractmethod
    def num_samples(self) -> int: ...

    @property
    def has_labels(self) -> bool:
        return False

    @abc.abstractmethod
    def batches(self, batch_size: int = 32, limit: int | None = None) -> Iterator[Batch]:
        """Yield batches of at most ``batch_size`` samples, ``limit`` samples in all."""

    def check(self, specs: Sequence[InputSpec]) -> None:
        """Raise OnnxcompError naming the input when the data does not fit the model."""
        wanted = {spec.name: spec for spec in specs}
        have = set(self.input_names)
        missing = [name for name in wanted if name not in have]
        unknown = sorted(have - set(wanted))
        if unknown:
            raise OnnxcompError(
                f"{self.name}: unknown input name {unknown[0]!r} "
                f"(the model's inputs are: {', '.join(wanted) or 'none'})"
            )
        if missing:
            raise OnnxcompError(
                f"{self.name}: no array for model input {missing[0]!r} "
                f"(the data has: {', '.join(sorted(have)) or 'nothing'})"
            )
        for name, (dtype, shape) in self.sample_signature().items():
            check_array_fits(self.name, wanted[name], dtype, shape)
        self.check_values()

    def check_values(self) -> None:
        """Raise OnnxcompError when an input holds NaN or infinity (sources read from files)."""
        return

    @abc.abstractmethod
    def sample_signature(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """dtype and full shape (samples first) of each input array."""

    def check_batch_size(self, batch_size: int) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise OnnxcompError(f"--batch-size {batch_size}: must be at least 1")


# Arrays are scanned for NaN and infinity this many bytes at a time (memory stays bounded).
_SCAN_BYTES = 64 << 20


def check_finite(array: np.ndarray, where: str) -> None:
    """Raise OnnxcompError naming the first sample that holds NaN or infinity."""
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(
        array.dtype, np.complexfloating
    ):
        return
    if array.ndim == 0:
        if not np.isfinite(array):
            raise OnnxcompError(f"{where}: holds {array.item()} (NaN or infinity)")
        return
    row_bytes = max(1, array[:1].nbytes)
    step = max(1, _SCAN_BYTES // row_bytes)
    for start in range(0, len(array), step):
        chunk = np.asarray(array[start : start + step])
        bad = ~np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1)
        if bad.any():
            first = start + int(np.argmax(bad))
            count = int(bad.sum())
            raise OnnxcompError(
                f"{where}: sample {first} holds NaN or infinity ({count} bad sample(s) in "
                f"samples {start}..{start + len(chunk) - 1}); clean the data first"
            )


def check_labels(labels: np.ndarray, where: str) -> None:
    """Labels are class indices: integers >= 0, one per sample."""
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise OnnxcompError(
            f"{where}: shape {list(labels.shape)} looks one-hot; labels are class indices, one "
            "per sample (e.g. labels.argmax(1))"
        )
    if labels.ndim not in (1, 2):
        raise OnnxcompError(
            f"{where}: shape {list(labels.shape)}; labels are class indices, one per sample"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        kind = "strings" if labels.dtype.kind in "USO" else str(labels.dtype)
        raise OnnxcompError(f"{where}: {kind}; labels are integer class indices (e.g. int64)")
    if labels.size and int(np.min(labels)) < 0:
        raise OnnxcompError(f"{where}: holds {int(np.min(labels))}; class indices start at 0")


def class_labels(labels: np.ndarray, scores: np.ndarray, source: str) -> np.ndarray:
    """``labels`` checked as class indices for the model output ``scores``, flattened.

    Accuracy against labels that are not class indices is silently 0 (any --max-drop passes),
    so one-hot, float, string, negative and out-of-range labels are refused naming the file.
    """
    where = f"{source}: labels"
    labels = np.asarray(labels)
    check_labels(labels, where)
    labels = labels.reshape(-1)
    classes = scores.shape[-1] if scores.ndim == 2 else None
    if classes is not None and labels.size and int(np.max(labels)) >= classes:
        raise OnnxcompError(
            f"{where}: label {int(np.max(labels))} is out of range: the model scores {classes} "
            f"classes (0..{classes - 1})"
        )
    return labels


def check_array_fits(source: str, spec: InputSpec, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    if spec.dtype != object and np.dtype(dtype) != spec.dtype:
        raise OnnxcompError(
            f"{source}: input {spec.name!r} is {np.dtype(dtype)}, the model wants {spec.dtype}"
        )
    if spec.shape is None:
        return
    if len(shape) != len(spec.shape):
        raise OnnxcompError(
            f"{source}: input {spec.name!r} has shape {list(shape)} (rank {len(shape)}), "
            f"the model wants rank {len(spec.shape)} ({spec.describe()})"
        )
    # The first axis is the sample axis; a model with a fixed batch of 1 is fed one row at a time.
    for axis, (have, want) in enumerate(zip(shape, spec.shape)):
        if axis == 0 or not isinstance(want, int):
            continue
        if have != want:
            raise OnnxcompError(
                f"{source}: input {spec.name!r} has shape {list(shape)}, the model wants "
                f"{spec.describe()} (axis {axis} differs)"
            )


def _npz_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path):
    """Open one .npy member: a read-only memmap when stored uncompressed, else the array."""
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        header_len = f.tell()
    if info.compress_type == zipfile.ZIP_STORED and not dtype.hasobject:
        # Data start = local file header (30 bytes + name + extra) + the .npy header.
        with open(path, "rb") as raw:
            raw.seek(info.header_offset + 26)
            name_len = int.from_bytes(raw.read(2), "little")
            extra_len = int.from_bytes(raw.read(2), "little")
        offset = info.header_offset + 30 + name_len + extra_len + header_len
        order = "F" if fortran else "C"
        if int(np.prod(shape)) == 0:
            return np.zeros(shape, dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)
    with zf.open(info) as f:
        return np.lib.format.read_array(f, allow_pickle=False)


class NpzData(DataSource):
    """One .npz file: arrays keyed by input name, first axis = samples, optional ``labels``; an
    array with one axis more than its input is one whole feed per sample, fed one at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = str(path)
        if not self.path.exists():
            raise OnnxcompError(f"{path}: no such data file")
        try:
            zf = zipfile.ZipFile(self.path)
            infos = {i.filename[:-4]: i for i in zf.infolist() if i.filename.endswith(".npy")}
            self._arrays = {key: _npz_member(zf, info, self.path) for key, info in infos.items()}
            zf.close()
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
            raise OnnxcompError(f"{path}: not a readable .npz file ({err})") from None
        if not self._arrays:
            raise OnnxcompError(f"{path}: the .npz file holds no arrays")
        # A 0-d array (a scalar input such as a sample rate) is fed as it is with every batch.
        self._constants = {key for key, a in self._arrays.items() if a.ndim == 0 and key != LABELS}
        counts = {
            key: (a.shape[0] if a.ndim else -1)
            for key, a in self._arrays.items()
            if key not in self._constants
        }
        if not counts:
            raise OnnxcompError(f"{path}: no array has a sample axis (all are scalars)")
        if len(set(counts.values())) != 1 or -1 in counts.values():
            detail = ", ".join(f"{k}: {v}" for k, v in counts.items())
            raise OnnxcompError(
                f"{path}: arrays disagree on the number of samples (first axis): {detail}"
            )
        self._count = next(iter(counts.values()))
        self._feeds: set[str] = set()  # arrays holding one whole feed per sample (see check)

    @property
    def input_names(self) -> list[str]:
        return [k for k in self._arrays if k != LABELS]

    @property
    def num_samples(self) -> int:
        return self._count

    @property
    def has_labels(self) -> bool:
        return LABELS in self._arrays

    def check(self, specs: Sequence[InputSpec]) -> None:
        # An array with one axis more than its model input holds one whole feed per sample: an
        # input whose first axis is fixed, so not the batch (a recurrent state [layers, batch,
        # hidden]), is stored [samples, layers, 1, hidden]; such data is fed one sample at a time.
        ranks = {
            s.name: len(s.shape)
            for s in specs
            if s.shape is not None and s.shape and isinstance(s.shape[0], int)
        }
        self._feeds = {
            k for k, a in self._arrays.items()
            if k in ranks and k not in self._constants and a.ndim == ranks[k] + 1
        }  # fmt: skip
        super().check(specs)

    def sample_signature(self):
        return {
            k: (a.dtype, a.shape[1:] if k in self._feeds else a.shape)
            for k, a in self._arrays.items()
            if k != LABELS
        }

    def check_values(self) -> None:
        for key in self.input_names:
            check_finite(self._arrays[key], f"{self.name}: input {key!r}")

    def batches(self, batch_size: int = 32, limit: int | None = None) -> Iterator[Batch]:
        self.check_batch_size(batch_size)
        total = self._count if limit is None else min(limit, self._count)
        step = 1 if self._feeds else batch_size
        for start in range(0, total, step):
            stop = min(start + step, total)
            rows = {k: start if k in self._feeds else slice(start, stop) for k in self.input_names}
            inputs = {
                k: np.asarray(self._arrays[k])
                if k in self._constants
                else np.ascontiguousarray(self._arrays[k][rows[k]])
                for k in self.input_names
            }
            labels = None
            if self.has_labels:
                labels = np.asarray(self._arrays[LABELS][start:stop])
            yield Batch(inputs, labels)


class FolderData(DataSource):
    """Every .npz file of a folder, in name order, as one stream."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = str(path)
        files = sorted(self.path.glob("*.npz"))
        if not files:
            raise OnnxcompError(f"{path}: the folder holds no .npz files")
        self.parts = [NpzData(f) for f in files]
        names = set(self.parts[0].input_names)
        for part in self.parts[1:]:
            if set(part.input_names) != names:
                raise OnnxcompError(
                    f"{part.path}: its arrays ({', '.join(part.input_names)}) differ from "
                    f"{self.parts[0].path} ({', '.join(sorted(names))})"
                )

    @property
    def input_names(self) -> list[str]:
        return self.parts[0].input_names

    @property
    def num_samples(self) -> int:
        return sum(p.num_samples for p in self.parts)

    @property
    def has_labels(self) -> bool:
        return all(p.has_labels for p in self.parts)

    def sample_signature(self):
        signature = dict(self.parts[0].sample_signature())
        for name in signature:
            dtype, shape = signature[name]
            signature[name] = (dtype, (self.num_samples, *shape[1:]))
        return signature

    def check(self, specs: Sequence[InputSpec]) -> None:
        for part in self.parts:
            part.check(specs)

    def batches(self, batch_size: int = 32, limit: int | None = None) -> Iterator[Batch]:
        self.check_batch_size(batch_size)
        left = self.num_samples if limit is None else limit
        for part in self.parts:
            if left <= 0:
                return
            for batch in part.batches(batch_size, limit=left):
                left -= len(batch)
                yield batch


class RandomData(DataSource):
    """Random inputs of the right dtype and shape, for latency-only work and self-checks.

    Floats are standard normal; integer inputs whose name mentions "mask" are ones, "type" or
    "segment" zeros, "position" 0..n-1; other integers are drawn from [0, ``int_high``) (token
    ids, indices); bools are random.
    Dynamic dims must be given in ``shapes`` unless they are the first (batch) axis, which
    defaults to 1.
    """

    def __init__(
        self,
        specs: Sequence[InputSpec],
        samples: int = 8,
        shapes: Mapping[str, Sequence[int]] | None = None,
        seed: int = 0,
        int_high: int = 100,
    ):
        self.name = "random inputs"
        self.specs = list(specs)
        self.samples = samples
        self.seed = seed
        self.int_high = int_high
        shapes = dict(shapes or {})
        unknown = sorted(set(shapes) - {s.name for s in self.specs})
        if unknown:
            names = ", ".join(s.name for s in self.specs)
            raise OnnxcompError(f"--shape: unknown input name {unknown[0]!r} (inputs: {names})")
        self.shapes: dict[str, tuple[int, ...]] = {}
        for spec in self.specs:
            self.shapes[spec.name] = self._resolve_shape(spec, shapes.get(spec.name))
        self._check_budget()

    def _check_budget(self) -> None:
        """Refuse random feeds that would not fit in memory, naming the option to give."""
        total = 0
        for spec in self.specs:
            shape = self.shapes[spec.name]
            itemsize = spec.dtype.itemsize if spec.dtype != object else 8
            size = math.prod(shape) * itemsize
            total += size
            if total > RANDOM_BUDGET_BYTES:
                dynamic = spec.shape is None or any(not isinstance(d, int) for d in spec.shape)
                hint = f", or a smaller shape with --shape {spec.name}=..." if dynamic else ""
                raise OnnxcompError(
                    f"random inputs: {spec.name!r} of shape {list(shape)} {spec.dtype} would take "
                    f"{size / 2**30:.1f} GiB per sample (budget {RANDOM_BUDGET_BYTES / 2**30:.0f} "
                    f"GiB); give real samples with --data{hint}"
                )

    @staticmethod
    def _resolve_shape(spec: InputSpec, given: Sequence[int] | None) -> tuple[int, ...]:
        if given is not None:
            given = tuple(int(d) for d in given)
            if any(d < 1 for d in given):
                raise OnnxcompError(
                    f"--shape {spec.name}: {list(given)}: every dim must be a positive integer"
                )
            if spec.shape is not None:
                if len(given) != len(spec.shape):
                    raise OnnxcompError(
                        f"--shape {spec.name}: rank {len(given)} given, the model wants "
                        f"{spec.describe()}"
                    )
                for have, want in zip(given[1:], spec.shape[1:]):
                    if isinstance(want, int) and have != want:
                        raise OnnxcompError(
                            f"--shape {spec.name}: {list(given)} does not fit {spec.describe()}"
                        )
            return given
        if spec.shape is None:
            raise OnnxcompError(
                f"input {spec.name!r} has unknown rank; give its shape, e.g. --shape {spec.name}=1x3x224x224"
            )
        dims = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int) and dim > 0:
                dims.append(dim)
            elif axis == 0:
                dims.append(1)
            else:
                raise OnnxcompError(
                    f"input {spec.name!r} has a dynamic dim {dim or '?'} at axis {axis} "
                    f"({spec.describe()}); give its shape, e.g. --shape {spec.name}="
                    + "x".join(str(d) if isinstance(d, int) and d > 0 else "N" for d in spec.shape)
                )
        return tuple(dims)

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def num_samples(self) -> int:
        return self.samples

    def sample_signature(self):
        return {
            s.name: (s.dtype, (self.samples * self.shapes[s.name][0], *self.shapes[s.name][1:]))
            for s in self.specs
        }

    def check_values(self) -> None:
        pass  # drawn finite

    def batches(self, batch_size: int = 32, limit: int | None = None) -> Iterator[Batch]:
        self.check_batch_size(batch_size)
        # Each "sample" is one feed of the resolved shape (its first axis may be > 1).
        rng = np.random.default_rng(self.seed)
        total = self.samples if limit is None else min(limit, self.samples)
        for _ in range(total):
            yield Batch({s.name: self._draw(rng, s) for s in self.specs})

    def _draw(self, rng: np.random.Generator, spec: InputSpec) -> np.ndarray:
        shape = self.shapes[spec.name]
        dtype = spec.dtype
        name = spec.name.lower()
        if dtype == np.bool_:
            return np.asarray(rng.random(shape) < 0.5)
        if np.issubdtype(dtype, np.integer):
            # Transformer-style side inputs need values a real tokenizer would give.
            if "mask" in name:
                return np.ones(shape, dtype)
            if "type" in name or "segment" in name:
                return np.zeros(shape, dtype)
            if "position" in name and shape:
                return np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
            return np.asarray(rng.integers(0, self.int_high, size=shape), dtype=dtype)
        if np.issubdtype(dtype, np.floating):
            return np.asarray(rng.standard_normal(shape), dtype=dtype)
        raise OnnxcompError(f"input {spec.name!r}: cannot make random data of type {dtype}")


def parse_shapes(values: Sequence[str]) -> dict[str, list[int]]:
    """Parse ``--shape NAME=1x3x224x224`` options."""
    shapes = {}
    for value in values:
        name, sep, dims = value.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.lower().split("x")]
            if any(d < 1 for d in shapes[name]):
                raise ValueError
        except ValueError:
            raise OnnxcompError(
                f"--shape {_short(value)}: expected NAME=1x3x224x224 (positive integer dims)"
            ) from None
    return shapes


def open_data(
    path: str | Path | None,
    specs: Sequence[InputSpec],
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    samples: int = 8,
    seed: int = 0,
) -> DataSource:
    """A data source for ``path`` (an .npz file or a folder of them), or random inputs when
    ``path`` is None; checked against the model's inputs."""
    if path is None:
        return RandomData(specs, samples=samples, shapes=shapes, seed=seed)
    path = Path(path)
    if path.is_dir():
        source: DataSource = FolderData(path)
    else:
        source = NpzData(path)
    source.check(specs)
    return source


def open_given(
    source: DataSource | str | os.PathLike | None, specs: Sequence[InputSpec], what: str
) -> DataSource | None:
    """A command's data argument as a source checked against the model's inputs ``specs``: None
    stays None, a source is checked, a path is opened; errors name the flag ``what``."""
    if source is None or isinstance(source, DataSource):
        if isinstance(source, DataSource):
            source.check(specs)
        return source
    try:
        return open_data(Path(source), specs)
    except OnnxcompError as err:
        raise OnnxcompError(f"{what}: {err}") from None


def open_given_pair(specs: Sequence[InputSpec], options, data=None, eval_data=None):
    """(data, eval_data) of a command: the arguments, else ``options.data`` / ``options.eval_data``,
    opened by :func:`open_given`; ``options.max_drop`` needs one of them to measure on."""
    data = open_given(data if data is not None else options.data, specs, "--data")
    eval_data = open_given(eval_data if eval_data is not None else options.eval_data, specs, "--eval-data")
    if options.max_drop is not None and eval_data is None and data is None:
        raise OnnxcompError("--max-drop needs --eval-data (or --data) to measure the drop on")
    return data, eval_data
