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
from onnxcomp.evaluate import check_metric
from onnxcomp.inputs import check_numbers, check_output, shorten
from onnxcomp.passes import Context, StepReport, get_pass, parse_options, run_pass

logger = logging.getLogger(__name__)

TOP_LEVEL_KEYS = {"version", "input", "output", "data", "shape", "steps", "validate", "threads"}
VALIDATE_KEYS = {"data", "max_drop", "metric", "limit", "samples", "reference"}
# Numeric options of any step checked for range (threads >= 1, max_drop in [0, 1], ...).
NUMBER_KEYS = {
    "threads",
    "batch_size",
    "runs",
    "warmup",
    "samples",
    "limit",
    "calibration_samples",
    "max_drop",
    "tolerance",
}


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
            paths += [self.validate.get("data"), self.validate.get("reference")]
        return [Path(p) for p in paths if p is not None]


def read_recipe(path: str | Path) -> Recipe:
    """Read a YAML or JSON recipe file and check its keys."""
    path = Path(path)
    if not path.exists():
        raise OnnxcompError(f"{path}: no such recipe file")
    if path.is_dir():
        raise OnnxcompError(f"{path}: is a directory, not a recipe file")
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise OnnxcompError(
                f"{path}: {size:,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,} bytes"
            )
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise OnnxcompError(f"{path}: cannot read ({err.strerror})") from None
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        raw = json.loads(text) if path.suffix == ".json" else load_yaml(text)
    except (json.JSONDecodeError, yaml.YAMLError, RecursionError) as err:
        lines = str(err).strip().splitlines() or [type(err).__name__]
        raise OnnxcompError(f"{path}: not valid {kind} ({shorten(lines[0], 200)[1:-1]})") from None
    _check_size(raw, f"{path}")
    recipe = parse_recipe(raw, base_dir=path.parent, source=str(path))
    recipe.path = path.resolve()
    return recipe


# Limits of the YAML reader: a recipe is a few hundred bytes; these stop alias bombs and
# pathological nesting long before they cost time or memory.
MAX_RECIPE_BYTES = 1 << 20
MAX_ALIASES = 100
MAX_DEPTH = 20
MAX_VALUES = 100_000


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses more than MAX_ALIASES aliases and nesting deeper than
    MAX_DEPTH (a 600-byte alias bomb otherwise expands to gigabytes when walked)."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent, index):  # noqa: D102 - PyYAML's hook
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                event = self.peek_event()
                raise yaml.YAMLError(
                    f"more than {MAX_ALIASES} aliases (line {event.start_mark.line + 1}); "
                    "refused as a possible alias bomb"
                )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.YAMLError(f"nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_yaml(text: str) -> Any:
    """Parse a YAML recipe with alias, depth and size limits (safe types only)."""
    if len(text) > MAX_RECIPE_BYTES:
        raise yaml.YAMLError(f"longer than {MAX_RECIPE_BYTES:,} characters")
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _check_size(value: Any, where: str) -> None:
    """Refuse documents nested deeper than MAX_DEPTH or expanding (aliases followed) to more
    than MAX_VALUES values; shared nodes are counted once per use but visited once."""
    sizes: dict[int, int] = {}

    def size(item: Any, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise OnnxcompError(f"{where}: nested deeper than {MAX_DEPTH} levels")
        if not isinstance(item, (Mapping, list)):
            return 1
        if id(item) in sizes:
            return sizes[id(item)]
        children = item.values() if isinstance(item, Mapping) else item
        total = 1
        for child in children:
            total += size(child, depth + 1)
            if total > MAX_VALUES:
                raise OnnxcompError(
                    f"{where}: expands to more than {MAX_VALUES:,} values (aliases followed); "
                    "refused as a possible alias bomb"
                )
        sizes[id(item)] = total
        return total

    size(value, 0)


def _string_keys(mapping: Mapping, where: str) -> None:
    for key in mapping:
        if not isinstance(key, str):
            raise OnnxcompError(f"{where}: key {shorten(key)} is not a name (keys are strings)")


def parse_recipe(raw: Any, base_dir: str | Path = ".", source: str = "recipe") -> Recipe:
    """Check a recipe given as a mapping (already parsed YAML/JSON)."""
    base_dir = Path(base_dir)
    if not isinstance(raw, Mapping):
        raise OnnxcompError(f"{source}: a recipe is a mapping with a 'steps' list")
    _string_keys(raw, source)
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
        if not isinstance(value, str) or not value:
            raise OnnxcompError(f"{source}: {key} must be a path, got {shorten(value)}")
        return (base_dir / value).resolve() if not Path(value).is_absolute() else Path(value)

    checked_steps = []
    for index, step in enumerate(steps, start=1):
        if not isinstance(step, Mapping) or "pass" not in step:
            raise OnnxcompError(f"{source}: step {index} must be a mapping with a 'pass' key")
        _string_keys(step, f"{source}: step {index}")
        step = dict(step)
        name = step.pop("pass")
        if not isinstance(name, str):
            raise OnnxcompError(
                f"{source}: step {index}: pass must be a pass name, got {shorten(name)}"
            )
        spec = get_pass(name)
        data = resolve(step.pop("data", None), f"step {index} ({name}): data")
        # Paths inside options (e.g. eval_data, teacher_model, a metric file) are relative to the recipe too.
        for key, value in list(step.items()):
            if key.replace("-", "_").endswith(("_data", "_model")) and isinstance(value, str):
                step[key] = str(resolve(value, f"step {index} ({name}): {key}"))
            if key == "metric" and isinstance(value, str):
                step[key] = metric_path(value, base_dir)
        where = f"{source}: step {index} ({name})"
        options = parse_options(spec.options, step, where)
        if dataclasses.is_dataclass(options):
            numbers = {
                f.name: getattr(options, f.name)
                for f in dataclasses.fields(options)
                if f.name in NUMBER_KEYS
            }
            check_numbers(where, recipe=True, **numbers)
        checked_steps.append({"pass": name, "options": options, "data": data})

    validate = raw.get("validate")
    if validate is not None:
        if not isinstance(validate, Mapping):
            raise OnnxcompError(f"{source}: validate must be a mapping (data, max_drop)")
        _string_keys(validate, f"{source}: validate")
        unknown = sorted(set(validate) - VALIDATE_KEYS)
        if unknown:
            raise OnnxcompError(
                f"{source}: validate: unknown key {unknown[0]!r} (known keys: {', '.join(sorted(VALIDATE_KEYS))})"
            )
        validate = dict(validate)
        validate["data"] = resolve(validate.get("data"), "validate: data")
        if validate.get("reference"):
            validate["reference"] = resolve(validate["reference"], "validate: reference")
        check_metric(validate.get("metric", "auto"), f"{source}: validate: metric")
        validate["metric"] = metric_path(validate.get("metric", "auto"), base_dir)
        if isinstance(validate.get("max_drop"), str):
            try:
                validate["max_drop"] = float(validate["max_drop"])
            except ValueError:
                raise OnnxcompError(
                    f"{source}: validate: max_drop must be a number, got {shorten(validate['max_drop'])}"
                ) from None
        numbers = {k: validate.get(k) for k in ("max_drop", "limit", "samples")}
        check_numbers(f"{source}: validate", recipe=True, **numbers)
    shapes = _parse_shape_key(raw.get("shape"), source)
    threads = raw.get("threads", 1)
    check_numbers(source, recipe=True, threads=threads)
    return Recipe(
        input=resolve(raw.get("input"), "input"),
        output=resolve(raw.get("output"), "output"),
        steps=checked_steps,
        data=resolve(raw.get("data"), "data"),
        shapes=shapes,
        validate=validate,
        threads=int(threads),
        source=source,
    )


def _parse_shape_key(value: Any, source: str) -> dict[str, list[int]]:
    """``shape: {input: 1x3x224x224}`` or ``shape: [input=1x3x224x224]``."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        _string_keys(value, f"{source}: shape")
        items = [f"{name}={dims}" for name, dims in value.items()]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = value
    else:
        raise OnnxcompError(
            f"{source}: shape must map input names to dims (shape: {{input: 1x3x224x224}}), "
            f"got {shorten(value)}"
        )
    try:
        return parse_shapes(items)
    except OnnxcompError as err:
        raise OnnxcompError(f"{source}: shape: {err}") from None


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
    from onnxcomp.evaluate import compare, load_metric

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
        measure = load_metric(check.get("metric", "auto"))
        comparison = compare(
            str(check.get("reference") or recipe.input),  # a reference other than the input: tune's transfer fit
            model,
            source,
            limit=check.get("limit"),
            threads=recipe.threads,
            metric=measure,
        )
        verdict = comparison.verdict(measure, check.get("max_drop"))
        validation = comparison.to_json(measure)
        passed = verdict.passed
        validation["max_drop"] = verdict.budget
        validation["passed"] = passed
        validation["verdict"] = verdict.to_json()
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


def metric_path(spec: str, base_dir: str | Path) -> str:
    """``file.py:function`` with a relative file is read from the recipe's folder."""
    where, colon, attr = spec.rpartition(":")
    if colon and (where.endswith(".py") or "/" in where) and not Path(where).is_absolute():
        return f"{(Path(base_dir) / where).resolve()}:{attr}"
    return spec


# ---------------------------------------------------------------------------------------------
# A recipe that replays a decision


def decision_recipe(
    report: dict[str, Any],
    options: Any,
    *,
    input: str | Path,
    output: str | Path,
) -> dict[str, Any]:
    """A recipe replaying what a ``quantize`` run decided, without timing anything: the chosen
    mode pinned, the layers auto put back to float listed, the clean-up's rules pinned, and the
    drop checked again by ``validate`` when there was evaluation data.

    report/options: what ``quantize`` returned and was given.
    """
    from onnxcomp.quantize.api import QuantizeOptions

    chosen = report.get("mode")
    prepare = report.get("prepare") or {}
    rules = prepare.get("optimize_rules")
    defaults = QuantizeOptions()
    given = {
        f.name: getattr(options, f.name)
        for f in dataclasses.fields(QuantizeOptions)
        if getattr(options, f.name) != getattr(defaults, f.name)
        and f.name not in ("mode", "data", "eval_data", "max_drop", "metric", "threads")
    }
    data = str(Path(options.data).resolve()) if options.data else None
    steps: list[dict[str, Any]] = []
    if chosen in ("static", "dynamic", "weight-only"):
        step: dict[str, Any] = {"pass": "quantize", **given, "mode": chosen}
        fallback = (report.get("budget") or {}).get("fallback_to_float") or []
        if fallback:
            step["exclude_nodes"] = [*options.exclude_nodes, *(f["node"] for f in fallback)]
        if options.optimize and rules is not None:
            step["optimize_rules"] = rules
        if data:
            step["data"] = data
        steps.append(step)
    elif chosen == "optimized":
        values: dict[str, Any] = {"pass": "optimize"}
        if rules is not None:
            values["rules"] = rules
        if options.shapes:
            values["shapes"] = options.shapes
        if data:
            values["data"] = data  # what the clean-up checked itself on
        steps.append(values)
        opset = prepare.get("opset") or {}
        if opset.get("to") and opset.get("to") != opset.get("from"):
            steps.append({"pass": "normalize", "opset": opset["to"]})
    else:  # float: the input as it is (normalize only lifts Constant weights, as loading does)
        steps.append({"pass": "normalize", "infer_shapes": False})
    recipe: dict[str, Any] = {
        "version": 1,
        "input": str(Path(input).resolve()),
        "output": str(Path(output).resolve()),
        "steps": steps,
    }
    if options.shapes:
        recipe["shape"] = {k: "x".join(map(str, v)) for k, v in options.shapes.items()}
    judge = options.eval_data or options.data
    if judge:
        budget = (report.get("auto") or {}).get("max_drop", options.max_drop)
        metric = metric_path(options.metric, Path.cwd())
        recipe["validate"] = {"data": str(Path(judge).resolve()), "metric": metric}
        if budget is not None:
            recipe["validate"]["max_drop"] = budget
        recipe["validate"]["limit"] = options.check_samples
    auto = report.get("auto")
    if auto:
        recipe["_decision"] = {
            "chosen": auto["chosen"],
            "why": auto["why"],
            **(auto.get("decision") or {}),
        }
    return recipe


def _against(runner_up: str | None) -> str:
    return "the 0.97x bar" if runner_up in (None, "float") else runner_up


def write_recipe(
    recipe: dict[str, Any], path: str | Path, protect: list[str | Path] = ()
) -> Path:
    """Write ``recipe`` as YAML; a ``_decision`` entry becomes a comment block on top."""
    path = Path(path)
    for other in protect:
        if path.resolve() == Path(other).resolve():
            raise OnnxcompError(f"--recipe-out {path}: that is the model or output path")
    recipe = dict(recipe)
    decision = recipe.pop("_decision", None)
    lines = []
    if decision:
        lines.append("# Replays a decision of `onnxcomp quantize --mode auto`, timing nothing:")
        lines.append(f"#   chose {decision['chosen']}: {decision['why']}")
        if decision.get("margin") is not None:
            lines.append(
                f"#   margin to {_against(decision.get('runner_up'))}: "
                f"{decision['margin']:.3f}x fp32"
                + (" (within timing noise)" if decision.get("within_noise") else "")
            )
        lines.append("# Run it with: onnxcomp run " + path.name)
    text = "\n".join(lines) + ("\n" if lines else "")
    text += yaml.safe_dump(recipe, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path
