"""The boundary: what a command reads and where it writes, checked before any work starts.

Every command that writes a file calls :func:`check_output` with every path it reads (the
model, the model's external data files, data files or folders, the recipe), so an output can
never replace one of its inputs, whatever the spelling: relative or absolute paths, symlinks,
hard links (same inode). The output's folder is probed for writing up front, so an unwritable
path is one ``error:`` line before minutes of calibration, not a traceback after them.

    from onnxcomp import inputs
    inputs.check_output("out.onnx", reads=["model.onnx", "calib.npz"], model=model)
"""

from __future__ import annotations

import errno
import os
import reprlib
import tempfile
from collections.abc import Iterable
from pathlib import Path

import onnx_ir as ir

from onnxcomp.errors import OnnxcompError

# Pseudo filesystems: writing there is never what a user meant, and their write errors are odd.
_SYSTEM_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))

# Longest stretch of a user value an error message repeats (a value may be megabytes long).
MAX_SHOWN = 80


_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = _REPR.maxother = MAX_SHOWN
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6


def shorten(value: object, limit: int = MAX_SHOWN) -> str:
    """A bounded ``repr(value)``: nested and long values are cut before they are expanded, so an
    error line stays one short line whatever the user gave (e.g. a YAML alias bomb)."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def data_companion(output: str | os.PathLike) -> Path:
    """Where ``model.save`` puts the external weights of ``output``."""
    output = Path(output)
    return output.with_name(output.name + ".data")


def _files_of(path: Path) -> list[Path]:
    """``path`` itself, and the files inside it when it is a folder (a data folder)."""
    files = [path]
    if path.is_dir():
        try:
            files += [p for p in path.iterdir() if p.is_file()]
        except OSError:
            pass
    return files


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name one file: same resolved path, or same inode (hard link)."""
    a, b = Path(a), Path(b)
    try:
        if a.resolve() == b.resolve():
            return True
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop
        return False
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def external_data_files(model: ir.Model) -> set[Path]:
    """The external data files the model's tensors are read from."""
    files = set()
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                files.add(Path(tensor.path).resolve())
    return files


def check_output(
    output: str | os.PathLike,
    *,
    reads: Iterable[str | os.PathLike | None] = (),
    model: ir.Model | None = None,
    option: str = "-o",
) -> Path:
    """Refuse an output that would replace something read, or that cannot be written.

    reads: every path the command reads (None entries are skipped); folders protect their files.
    model: the loaded input model, whose external data files are protected too.
    option: how the user gave the output, for the message (``-o``, ``output:``).
    Returns the output path, absolute.
    """
    output = Path(output)
    protected: list[Path] = []
    for path in reads:
        if path is not None:
            protected += _files_of(Path(path))
    if model is not None:
        protected += sorted(external_data_files(model))
    for candidate in (output, data_companion(output)):
        for path in protected:
            if same_file(candidate, path):
                what = "" if candidate == output else f" (its weights file {candidate.name})"
                raise OnnxcompError(
                    f"{option} {output}{what}: refusing to overwrite an input file ({path}); "
                    "choose another output path"
                )
    check_writable(output, option=option)
    return output.absolute()


def check_writable(output: str | os.PathLike, *, option: str = "-o") -> None:
    """Probe that a file can be created at ``output`` (its folder may not exist yet)."""
    output = Path(output)
    if output.is_dir():
        raise OnnxcompError(f"{option} {output}: is a directory; give a file name")
    absolute = output.absolute()
    if any(absolute == root or root in absolute.parents for root in _SYSTEM_ROOTS):
        raise OnnxcompError(f"{option} {output}: cannot write under {absolute.parts[1]!r}")
    folder = absolute.parent
    # The nearest folder that exists is where a file (or the missing folders) gets created.
    existing = folder
    while not existing.exists():
        if existing.is_symlink():
            raise OnnxcompError(f"{option} {output}: {existing} is a broken symlink")
        existing = existing.parent
    if not existing.is_dir():
        raise OnnxcompError(f"{option} {output}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".onnxcomp-probe-", dir=existing)
    except OSError as err:
        raise OnnxcompError(
            f"{option} {output}: cannot write in {existing} ({_reason(err)})"
        ) from None
    os.close(fd)
    os.unlink(probe)


def _reason(err: OSError) -> str:
    if err.errno == errno.EROFS:
        return "read-only filesystem"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if err.errno == errno.ENOSPC:
        return "no space left on the device"
    return err.strerror or type(err).__name__


def os_error(path: str | os.PathLike, err: OSError, doing: str = "cannot write") -> OnnxcompError:
    """A user-facing error for an OSError met while writing ``path``."""
    return OnnxcompError(f"{path}: {doing} ({_reason(err)})")


# ---------------------------------------------------------------------------------------------
# The outgoing side: a result onnxcomp itself measured as broken is not written.

# Below these, a quantized or rewritten model no longer computes what its input computes: a
# healthy int8 model keeps a mean cosine above 0.98 and most top-1 decisions. The bar is low on
# purpose: it catches broken results, --max-drop is the quality budget.
BROKEN_COSINE = 0.9
BROKEN_TOP1 = 0.5


def broken_reason(check: dict | None) -> str | None:
    """Why a self-check (``report["check"]``: drop and comparison) shows a broken result, or None.

    Broken: an output's mean cosine to the input model's below 0.9 or not a number, top-1
    agreement below 0.5, or an accuracy drop more than half the input model's accuracy.
    """
    if not check:
        return None
    comparison = check.get("comparison") or {}
    for out in comparison.get("outputs") or []:
        name = out.get("output")
        cosine = out.get("cosine_mean")
        if cosine is not None and not cosine >= BROKEN_COSINE:  # NaN fails too
            return f"output {name!r} has mean cosine {cosine:.4g} to the input model's (below {BROKEN_COSINE})"
        top1 = out.get("top1_agreement")
        if top1 is not None and top1 < BROKEN_TOP1:
            return f"output {name!r} agrees on top-1 for {top1:.1%} of samples (below {BROKEN_TOP1:.0%})"
    reference = comparison.get("accuracy_reference")
    candidate = comparison.get("accuracy_candidate")
    if reference and candidate is not None and candidate < reference / 2:
        return f"accuracy fell from {reference:.4f} to {candidate:.4f}"
    drop = check.get("drop")
    if drop is not None and drop != drop:
        return f"the measured drop ({check.get('drop_metric', 'drop')}) is not a number"
    return None


# ---------------------------------------------------------------------------------------------
# Numbers given as options or recipe keys

# name -> (lowest value, highest value); None: unbounded. Integers unless the name is in _REAL.
_NUMBER_RULES: dict[str, tuple[float | None, float | None]] = {
    "threads": (1, None),
    "batch_size": (1, None),
    "runs": (1, None),
    "warmup": (0, None),
    "samples": (1, None),
    "limit": (1, None),
    "calibration_samples": (1, None),
    "max_drop": (0.0, 1.0),
    "tolerance": (0.0, None),
}
_REAL = {"max_drop", "tolerance"}


def check_numbers(where: str = "", *, recipe: bool = False, **values: object) -> None:
    """Refuse option values out of range: ``check_numbers(threads=0)`` names ``--threads``.

    where: prefix of the message (a recipe file and section); recipe: name keys as recipe keys
    (``max_drop``) instead of flags (``--max-drop``). None values are not checked.
    """
    for name, value in values.items():
        if value is None:
            continue
        low, high = _NUMBER_RULES[name]
        label = name if recipe else "--" + name.replace("_", "-")
        prefix = f"{where}: " if where else ""
        real = name in _REAL
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            kind = "a number" if real else "an integer"
            raise OnnxcompError(f"{prefix}{label}: expected {kind}, got {shorten(value)}")
        if not real and value != int(value):
            raise OnnxcompError(f"{prefix}{label}: expected an integer, got {value}")
        if value != value or value in (float("inf"), float("-inf")):
            raise OnnxcompError(f"{prefix}{label}: expected a finite number, got {value}")
        if (low is not None and value < low) or (high is not None and value > high):
            if high is None:
                wanted = f"at least {low}"
            else:
                wanted = f"between {low} and {high}"
            raise OnnxcompError(f"{prefix}{label} {value}: must be {wanted}")


# Ops that only a quantized model holds.
_QUANTIZED_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    "QGemm",
    "QLinearAdd",
    "QLinearMul",
    "DynamicQuantizeMatMul",
    "MatMulNBits",
    "QAttention",
    "DynamicQuantizeLSTM",
}


def check_not_quantized(model: ir.Model, path: str | os.PathLike) -> None:
    """Refuse to quantize a model that is already quantized (it would be done twice, silently)."""
    found: dict[str, int] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type in _QUANTIZED_OPS:
            found[node.op_type] = found.get(node.op_type, 0) + 1
    if found:
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(found.items(), key=lambda i: -i[1])[:4])
        raise OnnxcompError(
            f"{path}: already quantized ({ops}); quantize the float model it came from"
        )
