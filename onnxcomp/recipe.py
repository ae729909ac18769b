"""Recipes: a pipeline written down in YAML or JSON, and running one end to end.

    version: 1
    input: model.onnx
    output: model.int8.onnx
    steps:
      - pass: optimize
      - pass: quantize
        mode: static
        data: calib.npz
    validate: {data: eval.npz, max_drop: 0.01}

Keys are the CLI flags' names (``max_drop`` is ``--max-drop``). Relative paths are read from
the recipe's folder. A step's ``data`` key is the data source that step calibrates on; a
top-level ``data`` is the default for every step. The result is saved only if it passes
``validate``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from onnxcomp import model as model_io
from onnxcomp.data import DataSource, open_data, parse_shapes
from onnxcomp.errors import OnnxcompError
from onnxcomp.inputs import check_output
from onnxcomp.passes import Context, StepReport, get_pass, parse_options, run_pass

logger = logging.getLogger(__name__)

TOP_LEVEL_KEYS = {"version", "input", "output", "data", "shape", "steps", "validate", "threads"}
VALIDATE_KEYS = {"data", "max_drop", "metric", "limit", "samples"}


@dataclasses.dataclass
class Recipe:
    """A parsed, checked recipe; paths are absolute."""

    input: Path | None
    output: Path | None
    steps: list[dict[str, Any]]
    data: Path | None = None
    shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    validate: dict[str, Any] | None = None
    threads: int = 1
    source: str = "recipe"
    path: Path | None = None  # the recipe file, when read from one

    def reads(self) -> list[Path]:
        """Every file the recipe reads: itself, the input model, every data file."""
        paths = [self.path, self.input, self.data]
        for step in self.steps:
            paths.append(step["data"])
            options = step["options"]
            for field in dataclasses.fields(options) if dataclasses.is_dataclass(options) else ():
                value = getattr(options, field.name)
                if field.name.endswith("data") and isinstance(value, (str, Path)):
                    paths.append(value)
        if self.validate is not None:
            paths.append(self.validate.get("data"))
        return [Path(p) for p in paths if p is not None]


def read_recipe(path: str | Path) -> Recipe:
    """Read a YAML or JSON recipe file and check its keys."""
    path = Path(path)
    if not path.exists():
        raise OnnxcompError(f"{path}: no such recipe file")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        first = str(err).strip().splitlines()[0]
        raise OnnxcompError(
            f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({first})"
        ) from None
    recipe = parse_recipe(raw, base_dir=path.parent, source=str(path))
    recipe.path = path.resolve()
    return recipe


def parse_recipe(raw: Any, base_dir: str | Path = ".", source: str = "recipe") -> Recipe:
    """Check a recipe given as a mapping (already parsed YAML/JSON)."""
    base_dir = Path(base_dir)
    if not isinstance(raw, Mapping):
        raise OnnxcompError(f"{source}: a recipe is a mapping with a 'steps' list")
    unknown = sorted(set(raw) - TOP_LEVEL_KEYS)
    if unknown:
        raise OnnxcompError(
            f"{source}: unknown key {unknown[0]!r} (known keys: {', '.join(sorted(TOP_LEVEL_KEYS))})"
        )
    version = raw.get("version", 1)
    if version != 1:
        raise OnnxcompError(
            f"{source}: version {version!r} is not supported (this onnxcomp reads version 1)"
        )
    steps = raw.get("steps")
    if not isinstance(steps, list) or not steps:
        raise OnnxcompError(f"{source}: 'steps' must be a non-empty list of passes")

    def resolve(value: Any, key: str) -> Path | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise OnnxcompError(f"{source}: {key} must be a path, got {value!r}")
        return (base_dir / value).resolve() if not Path(value).is_absolute() else Path(value)

    checked_steps = []
    for index, step in enumerate(steps, start=1):
        if not isinstance(step, Mapping) or "pass" not in step:
            raise OnnxcompError(f"{source}: step {index} must be a mapping with a 'pass' key")
        step = dict(step)
        name = step.pop("pass")
        spec = get_pass(name)
        data = resolve(step.pop("data", None), f"step {index} ({name}): data")
        # Paths inside options (e.g. eval_data) are relative to the recipe too.
        for key, value in list(step.items()):
            if key.replace("-", "_").endswith("_data") and isinstance(value, str):
                step[key] = str(resolve(value, f"step {index} ({name}): {key}"))
        options = parse_options(spec.options, step, f"{source}: step {index} ({name})")
        checked_steps.append({"pass": name, "options": options, "data": data})

    validate = raw.get("validate")
    if validate is not None:
        if not isinstance(validate, Mapping):
            raise OnnxcompError(f"{source}: validate must be a mapping (data, max_drop)")
        unknown = sorted(set(validate) - VALIDATE_KEYS)
        if unknown:
            raise OnnxcompError(
                f"{source}: validate: unknown key {unknown[0]!r} (known keys: {', '.join(sorted(VALIDATE_KEYS))})"
            )
        validate = dict(validate)
        validate["data"] = resolve(validate.get("data"), "validate: data")
        if validate.get("metric", "auto") not in ("auto", "accuracy", "top1", "cosine"):
            raise OnnxcompError(
                f"{source}: validate: metric {validate['metric']!r} is not one of auto, accuracy, top1, cosine"
            )
        if validate.get("max_drop") is not None:
            try:
                validate["max_drop"] = float(validate["max_drop"])
            except (TypeError, ValueError):
                raise OnnxcompError(f"{source}: validate: max_drop must be a number") from None
    shape_values = raw.get("shape") or []
    if isinstance(shape_values, Mapping):
        shapes = {k: [int(d) for d in str(v).split("x")] for k, v in shape_values.items()}
    else:
        shapes = parse_shapes(shape_values)
    return Recipe(
        input=resolve(raw.get("input"), "input"),
        output=resolve(raw.get("output"), "output"),
        steps=checked_steps,
        data=resolve(raw.get("data"), "data"),
        shapes=shapes,
        validate=validate,
        threads=int(raw.get("threads", 1)),
        source=source,
    )


@dataclasses.dataclass
class RunResult:
    """What running a recipe did."""

    input: Path
    output: Path | None
    steps: list[StepReport]
    validation: dict[str, Any] | None
    saved: bool
    seconds: float
    size_before: int
    size_after: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "input": str(self.input),
            "output": str(self.output) if self.output else None,
            "saved": self.saved,
            "seconds": round(self.seconds, 3),
            "size_bytes_before": self.size_before,
            "size_bytes_after": self.size_after,
            "steps": [s.to_json() for s in self.steps],
            "validation": self.validation,
        }


def run_recipe(
    recipe: Recipe,
    *,
    progress: Callable[[str], None] | None = None,
) -> RunResult:
    """Load the input, run every step, validate, and save the result if it passes."""
    from onnxcomp.validate import compare

    if recipe.input is None:
        raise OnnxcompError(f"{recipe.source}: no input model (set 'input' or pass --input)")
    if recipe.output is None:
        raise OnnxcompError(f"{recipe.source}: no output path (set 'output' or pass --output)")
    start = time.perf_counter()
    model = model_io.load(recipe.input)
    check_output(recipe.output, reads=recipe.reads(), model=model, option="output")
    model_io.normalize(model)
    specs = model_io.input_specs(model)

    def source_for(path: Path | None) -> DataSource | None:
        return open_data(path, specs, shapes=recipe.shapes) if path else None

    default_data = source_for(recipe.data)
    reports = []
    for step in recipe.steps:
        spec = get_pass(step["pass"])
        data = source_for(step["data"]) if step["data"] else default_data
        context = Context(data=data, model_path=str(recipe.input), threads=recipe.threads)
        if progress:
            progress(step["pass"])
        pass_ = spec.build(step["options"], context)
        model, report = run_pass(pass_, model, step["pass"])
        reports.append(report)

    validation = None
    passed = True
    if recipe.validate is not None:
        check = recipe.validate
        source = open_data(
            check.get("data"), specs, shapes=recipe.shapes, samples=int(check.get("samples", 16))
        )
        comparison = compare(
            str(recipe.input), model, source, limit=check.get("limit"), threads=recipe.threads
        )
        validation = comparison.to_json()
        metric = check.get("metric", "auto")
        validation["drop"] = comparison.drop(metric)
        validation["drop_metric"] = comparison.drop_metric(metric)
        max_drop = check.get("max_drop")
        passed = max_drop is None or validation["drop"] <= max_drop
        validation["max_drop"] = max_drop
        validation["passed"] = passed
    size_after = None
    if passed:
        model_io.save(model, recipe.output, inputs=recipe.reads())
        size_after = recipe.output.stat().st_size
        data_file = recipe.output.with_name(recipe.output.name + ".data")
        if data_file.exists():
            size_after += data_file.stat().st_size
    size_before = recipe.input.stat().st_size
    return RunResult(
        input=recipe.input,
        output=recipe.output,
        steps=reports,
        validation=validation,
        saved=passed,
        seconds=time.perf_counter() - start,
        size_before=size_before,
        size_after=size_after,
    )
