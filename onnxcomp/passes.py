"""The pass shape, pass reports, the registry of passes recipes can name, and the pipeline.

A pass is an onnx-ir pass (``ir.passes.InPlacePass``) whose ``call`` returns a :class:`Result`:
the model plus a ``report`` dict saying what changed, with figures. Passes that need calibration
data or other run-time inputs get them through a :class:`Context` given to their builder.

onnx-ir's ``PassManager`` returns a plain ``PassResult`` and drops our reports, so
:func:`run_pipeline` runs the steps itself and keeps each report.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import onnx_ir as ir

from onnxcomp.errors import OnnxcompError

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Result(ir.passes.PassResult):
    """What a pass returns: the model, whether it changed, and a report of what it did."""

    report: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Context:
    """What a pass may need beyond its options: calibration data, where the model came from."""

    data: Any = None  # an onnxcomp.data.DataSource, or None for random inputs
    model_path: str | None = None
    threads: int = 1


@dataclasses.dataclass
class PassSpec:
    """A pass that recipes and the CLI can name: its options type and how to build it."""

    name: str
    options: type
    build: Callable[[Any, Context], ir.passes.PassBase]
    help: str = ""


PASSES: dict[str, PassSpec] = {}


def register(name: str, options: type, help: str = ""):
    """Decorator: register ``build(options, context) -> pass`` under a recipe name."""

    def decorate(build: Callable[[Any, Context], ir.passes.PassBase]):
        PASSES[name] = PassSpec(name=name, options=options, build=build, help=help)
        return build

    return decorate


def _load_builtin_passes() -> None:
    # Importing a pass module registers its passes; done lazily so `import onnxcomp` stays light.
    import importlib

    for module in ("onnxcomp.optimize", "onnxcomp.quantize", "onnxcomp.prune", "onnxcomp.transfer"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise


def get_pass(name: str) -> PassSpec:
    _load_builtin_passes()
    if name not in PASSES:
        known = ", ".join(sorted(PASSES)) or "none"
        raise OnnxcompError(f"unknown pass {name!r} (known passes: {known})")
    return PASSES[name]


# ---------------------------------------------------------------------------------------------
# Typed options: one parser used by recipes and the CLI, so a bad key or value is named once.


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except OnnxcompError as err:
                errors.append(str(err))
        raise OnnxcompError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise OnnxcompError(f"{where}: {value!r} is not one of {choices}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise OnnxcompError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return [_coerce(v, item, where) for v in value]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise OnnxcompError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in hint)
            raise OnnxcompError(f"{where}: {value!r} is not one of {choices}") from None
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise OnnxcompError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise OnnxcompError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise OnnxcompError(f"{where}: expected an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool):
            raise OnnxcompError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise OnnxcompError(f"{where}: expected a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, str):
            raise OnnxcompError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def parse_options(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """Build the options dataclass ``cls`` from a mapping, naming any unknown key or bad value.

    Keys may use dashes or underscores (``max-drop`` and ``max_drop`` are the same key).
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise OnnxcompError(f"{where}: unknown key {key!r} (known keys: {known})")
        kwargs[name] = _coerce(value, hints[name], f"{where}: {name}")
    try:
        options = cls(**kwargs)
    except TypeError as err:
        raise OnnxcompError(f"{where}: {err}") from None
    check = getattr(options, "check", None)
    if check is not None:
        check(where)
    return options


# ---------------------------------------------------------------------------------------------
# The pipeline


@dataclasses.dataclass
class StepReport:
    """One pipeline step's outcome, as shown in tables and JSON."""

    name: str
    modified: bool
    seconds: float
    report: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "pass": self.name,
            "modified": self.modified,
            "seconds": round(self.seconds, 3),
            "report": self.report,
        }


def run_pass(pass_: ir.passes.PassBase, model: ir.Model, name: str | None = None):
    """Run one pass and return ``(model, StepReport)``, keeping the pass's report."""
    name = name or type(pass_).__name__
    logger.info("running %s", name)
    start = time.perf_counter()
    result = pass_(model)
    seconds = time.perf_counter() - start
    report = getattr(result, "report", {}) or {}
    logger.info("%s: modified=%s in %.2fs", name, result.modified, seconds)
    return result.model, StepReport(name, bool(result.modified), seconds, dict(report))


def run_pipeline(
    model: ir.Model,
    steps: list[tuple[str, Mapping[str, Any]]],
    context: Context | None = None,
) -> tuple[ir.Model, list[StepReport]]:
    """Run the named steps in order (``[(pass name, options mapping), ...]``).

    All options are parsed and all passes built before the first one runs, so a bad key in
    step 3 fails before step 1 has spent any time.
    """
    context = context or Context()
    built = []
    for index, (name, values) in enumerate(steps, start=1):
        spec = get_pass(name)
        options = parse_options(spec.options, values, f"step {index} ({name})")
        built.append((name, spec.build(options, context)))
    reports = []
    for name, pass_ in built:
        model, report = run_pass(pass_, model, name)
        reports.append(report)
    return model, reports


# ---------------------------------------------------------------------------------------------
# The built-in normalising pass: what every command does on load, as a recipe step too.


@dataclasses.dataclass
class NormalizeOptions:
    """Options of the ``normalize`` step."""

    opset: int | None = None  # upgrade the default-domain opset to at least this
    infer_shapes: bool = True

    def check(self, where: str) -> None:
        if self.opset is not None and not 7 <= self.opset <= 25:
            raise OnnxcompError(f"{where}: opset {self.opset} is out of range (7..25)")


class NormalizePass(ir.passes.PassBase):
    """Lift Constant-node weights into initializers, infer shapes, optionally upgrade the opset.

    In place, except with ``opset``: onnx's version converter returns a new model.
    """

    def __init__(self, options: NormalizeOptions | None = None):
        super().__init__()
        self.options = options or NormalizeOptions()

    @property
    def in_place(self) -> bool:
        return self.options.opset is None

    @property
    def changes_input(self) -> bool:
        return self.in_place

    def call(self, model: ir.Model) -> Result:
        from onnxcomp import model as model_io

        before = model_io.opset(model)
        if self.options.opset is not None:
            upgraded = model_io.ensure_opset(model, self.options.opset, "the normalize step")
            model = upgraded if upgraded is not model else model_io.copy_model(model)
        report = model_io.normalize(model, infer_shapes=self.options.infer_shapes)
        report["opset_before"] = before
        report["opset_after"] = model_io.opset(model)
        modified = bool(report["constants_lifted"]) or before != report["opset_after"]
        return Result(model, modified=modified, report=report)


register("normalize", NormalizeOptions, help="lift Constant weights, infer shapes, upgrade opset")(
    lambda options, context: NormalizePass(options)
)
