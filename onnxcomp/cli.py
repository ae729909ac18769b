"""The ``onnxcomp`` command: parse options, call the library, print tables or JSON.

No logic lives here that the Python API lacks. A user's mistake (OnnxcompError) is printed as
one line on stderr with exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np

from onnxcomp.errors import (
    EXIT_CHECK_FAILED,
    EXIT_INTERNAL_ERROR,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_USER_ERROR,
    CheckFailed,
    OnnxcompError,
    Terminated,
)


class _Group(click.Group):
    """Turns every way a command can end into its documented exit code (see onnxcomp.errors).

    A user's mistake is one ``error:`` line (exit 2); a check that failed exits 1; anything else
    is an internal error: one line with where it happened (exit 3), the traceback with --debug.
    SIGTERM raises Terminated so temporary files are removed before exit 143; Ctrl-C exits 130.
    """

    def invoke(self, ctx: click.Context) -> Any:
        _TERMINATED.clear()
        previous = _install_sigterm()
        try:
            result = super().invoke(ctx)
            if _TERMINATED:  # the handler's exception was swallowed (e.g. in an at-fork hook)
                raise Terminated()
            return result
        except click.UsageError as err:
            # click's own usage errors as one line too, like every other mistake.
            message = err.format_message()
            message = message[:1].lower() + message[1:]
            sub = err.ctx.info_name if err.ctx is not None and err.ctx.parent is not None else None
            command = f"onnxcomp {sub} --help" if sub else "onnxcomp --help"
            click.echo(f"error: {' '.join(message.split())} (see {command})", err=True)
            ctx.exit(EXIT_USER_ERROR)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except CheckFailed as err:
            if _debug(ctx):
                raise
            click.echo(f"error: {err}", err=True)
            ctx.exit(EXIT_CHECK_FAILED)
        except OnnxcompError as err:
            if _debug(ctx):
                raise
            click.echo(f"error: {err}", err=True)
            ctx.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(EXIT_SIGINT)
        except Terminated:
            click.echo("error: terminated", err=True)
            ctx.exit(EXIT_SIGTERM)
        except MemoryError:
            if _debug(ctx):
                raise
            click.echo(
                "error: out of memory; use fewer or smaller samples (--batch-size, --limit, "
                "--calibration-samples) or a smaller --shape",
                err=True,
            )
            ctx.exit(EXIT_USER_ERROR)
        except Exception as err:
            if _debug(ctx):
                raise
            click.echo(f"internal error: {_where(err)}", err=True)
            click.echo("rerun with --debug for the traceback, and please report it", err=True)
            ctx.exit(EXIT_INTERNAL_ERROR)
        finally:
            _restore_sigterm(previous)


def _debug(ctx: click.Context) -> bool:
    return bool(ctx.obj and ctx.obj.get("debug"))


def _where(err: BaseException) -> str:
    """``Type: first line of the message (file.py:line in function)``, cut to one short line."""
    import traceback

    lines = str(err).strip().splitlines()
    message = lines[0][:200] if lines else ""
    frames = traceback.extract_tb(err.__traceback__)
    place = ""
    if frames:
        last = frames[-1]
        place = f" ({Path(last.filename).name}:{last.lineno} in {last.name})"
    return f"{type(err).__name__}: {message}{place}" if message else f"{type(err).__name__}{place}"


_TERMINATED: list[int] = []  # non-empty once SIGTERM arrived


def _on_sigterm(signum: int, frame: Any) -> None:
    _TERMINATED.append(signum)
    raise Terminated()


def _install_sigterm() -> Any:
    """Route SIGTERM through an exception (main thread only; None when not installed)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        return signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):
        return None


def _restore_sigterm(previous: Any) -> None:
    import signal

    if previous is not None:
        try:
            signal.signal(signal.SIGTERM, previous)
        except (ValueError, OSError):
            pass


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxcomp")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug logs).")
@click.pass_context
def main(ctx: click.Context, debug: bool, verbose: int) -> None:
    """Compress and adapt ONNX models; onnxruntime checks every result."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    level = logging.WARNING - 10 * verbose if verbose else logging.WARNING
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        # onnx-ir and onnx log routine warnings (e.g. shape inference gaps) users cannot act on.
        logging.getLogger("onnx_ir").setLevel(logging.ERROR)
        if sys.stderr.isatty():
            # Progress for a person at a terminal: onnxcomp's steps, one line each, on stderr.
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("... %(message)s"))
            progress = logging.getLogger("onnxcomp")
            progress.setLevel(logging.INFO)
            progress.addHandler(handler)
            progress.propagate = False


# ---------------------------------------------------------------------------------------------
# Output helpers shared by the commands


def _clean(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, non-finite floats to null, paths to strings."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def emit_json(payload: Any) -> None:
    click.echo(json.dumps(_clean(payload), indent=2))


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain text table, columns padded, numbers right-aligned."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for row, raw in zip(cells, rows):
        lines.append(
            "  ".join(
                c.rjust(w) if isinstance(r, (int, float)) and not isinstance(r, bool) else c.ljust(w)
                for c, w, r in zip(row, widths, raw)
            )
        )
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
        if value == 0:
            return "0"
        if abs(value) >= 1000 or abs(value) < 0.001:
            return f"{value:.3g}"
        return f"{value:.4g}"
    return str(value)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


shape_option = click.option(
    "--shape",
    "shapes",
    multiple=True,
    metavar="NAME=1x3x224x224",
    help="Shape of an input with dynamic dims, for random inputs (repeatable).",
)


def _report_path(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value and not Path(value).resolve().parent.is_dir():
        raise OnnxcompError(f"--{param.name.removesuffix('_path')} {value}: folder {Path(value).parent} does not exist")
    return value


report_option = click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False),
    callback=_report_path,
    metavar="FILE.html",
    help="Also write an HTML report (adds onnxruntime's per-node profile of both models to the result).",
)


def html_report(
    result: dict[str, Any], path: str | None, models: list[Any], names: list[str], **inputs: Any
) -> None:
    """--report: put onnxruntime's per-op-type and slowest-node times of ``models`` (input
    first) in ``result["profile"]``, then write the HTML page of ``result`` to ``path``.
    ``inputs`` as for ``bench.profile`` (data, shapes, threads). Nothing happens without a path.
    """
    if not path:
        return
    from onnxcomp.bench import profile
    from onnxcomp.report import write_report

    try:
        result["profile"] = profile(models, names=names, **inputs)
    except OnnxcompError as err:
        result["profile"] = {"unavailable": str(err)}
    write_report(_clean(result), path)


class FromOptions(click.Option):
    """An option that mirrors a field of an options dataclass (a recipe key): its default is
    the dataclass's, read when help is shown, never re-declared here. When the flag is not
    given its value is None and the dataclass fills it in."""

    def __init__(self, *args: Any, field_of: str, **kwargs: Any):
        kwargs.setdefault("default", None)
        super().__init__(*args, **kwargs)
        self.options_path, _, self.field_name = field_of.rpartition(".")

    def dataclass_default(self) -> Any:
        import dataclasses
        import importlib

        module, _, name = self.options_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        field = {f.name: f for f in dataclasses.fields(cls)}[self.field_name]
        if field.default is not dataclasses.MISSING:
            return field.default
        if field.default_factory is not dataclasses.MISSING:
            return field.default_factory()
        return None

    def get_help_extra(self, ctx: click.Context) -> Any:
        extra = super().get_help_extra(ctx)
        value = self.dataclass_default()
        if isinstance(value, bool) and self.secondary_opts:
            extra["default"] = self.opts[0] if value else self.secondary_opts[0]
        elif isinstance(value, bool):
            extra["default"] = "on" if value else "off"
        elif value not in (None, [], {}):
            extra["default"] = str(value)
        return extra


def _from(cls: str) -> Any:
    """``@_from(QUANTIZE)("--block-size", type=int, help=...)``: an option backed by a field."""

    def option(*names: str, **kwargs: Any) -> Any:
        dest = next((n for n in names if not n.startswith("-")), None)
        flag = max((n for n in names if n.startswith("--")), key=len).split("/")[0]
        field = dest or flag.lstrip("-").replace("-", "_")
        return click.option(*names, cls=FromOptions, field_of=f"{cls}.{field}", **kwargs)

    return option


QUANTIZE = "onnxcomp.quantize.api.QuantizeOptions"
OPTIMIZE = "onnxcomp.optimize.OptimizeOptions"
quantize_option = _from(QUANTIZE)

METRIC_HELP = (
    "What --max-drop measures: auto (accuracy with labels, top-1 agreement for class scores, "
    "per position for [batch, time, classes], else cosine), accuracy, top1, cosine, or your "
    "function as module:function or path/to/file.py:function (see docs/quantize.md)."
)


# ---------------------------------------------------------------------------------------------
# validate


@main.command()
@click.argument("reference", type=click.Path(dir_okay=False))
@click.argument("candidate", type=click.Path(dir_okay=False))
@click.option("--data", type=click.Path(), help=".npz file or folder of them (default: random inputs).")
@shape_option
@click.option("--samples", default=16, show_default=True, help="Random samples when no --data.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--limit", type=int, help="Use at most this many samples of --data.")
@click.option("--max-drop", type=float, help="Exit 1 when the candidate is worse by more than this.")
@click.option("--metric", default="auto", show_default=True, metavar="NAME|module:function", help=METRIC_HELP)
@click.option("--threads", default=1, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def validate(
    reference, candidate, data, shapes, samples, batch_size, limit, max_drop, metric, threads, as_json
):
    """Run REFERENCE and CANDIDATE on the same inputs and compare their outputs.

    The drop held against --max-drop (see --metric) is your metric's drop when given, else the
    accuracy drop when the data has labels, else 1 - top-1 agreement for class-score outputs
    (per position for [batch, time, classes]), else 1 - the lowest mean cosine.

    Exit codes: 0 passed (or no --max-drop); 1 the drop exceeds --max-drop; 2 bad input.
    """
    from onnxcomp import inputs
    from onnxcomp import model as model_io
    from onnxcomp.data import open_data, parse_shapes
    from onnxcomp.evaluate import compare, load_metric

    inputs.check_numbers(samples=samples, batch_size=batch_size, limit=limit, max_drop=max_drop, threads=threads)
    ref = model_io.load(reference)
    model_io.load(candidate)  # fail early, with the file's name, on a bad candidate
    measure = load_metric(metric)
    source = open_data(data, model_io.input_specs(ref), shapes=parse_shapes(shapes), samples=samples)
    result = compare(
        reference, candidate, source, batch_size=batch_size, limit=limit, threads=threads,
        metric=measure,
    )
    verdict = result.verdict(measure, max_drop)
    payload = result.to_json(measure)
    passed = verdict.passed
    payload["max_drop"] = max_drop
    payload["passed"] = passed
    payload["verdict"] = verdict.to_json()
    if as_json:
        emit_json(payload)
    else:
        rows = []
        for out in payload["outputs"]:
            rows.append(
                [
                    out["output"],
                    out.get("max_abs_error"),
                    out.get("mean_abs_error"),
                    out.get("cosine_mean"),
                    out.get("cosine_min"),
                    out.get("snr_db"),
                    out.get("top1_agreement"),
                ]
            )
        click.echo(f"{result.samples} samples from {source.name}")
        click.echo(table(rows, ["output", "max abs", "mean abs", "cos mean", "cos min", "SNR dB", "top-1 agree"]))
        if result.accuracy_reference is not None:
            click.echo(
                f"accuracy: reference {result.accuracy_reference:.4f}, candidate "
                f"{result.accuracy_candidate:.4f}, drop {result.accuracy_drop:+.4f}"
            )
        if result.user_metric is not None:
            click.echo(
                f"{result.user_metric.name}: reference {result.user_reference:.4f}, candidate "
                f"{result.user_candidate:.4f}"
            )
        for name, why in result.skipped_outputs.items():
            click.echo(f"output {name} not compared: {why}")
        if max_drop is not None:
            click.echo(f"{'PASS' if passed else 'FAIL'}: {verdict.reason}")
    if not passed:
        sys.exit(EXIT_CHECK_FAILED)


# ---------------------------------------------------------------------------------------------
# run: a recipe end to end


@main.command("run")
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@click.option("-i", "--input", "input_path", type=click.Path(dir_okay=False), help="Overrides the recipe's input.")
@click.option("-o", "--output", "output_path", type=click.Path(dir_okay=False), help="Overrides the recipe's output.")
@click.option("--data", type=click.Path(), help="Overrides the recipe's default data.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def run_command(recipe_path, input_path, output_path, data, as_json):
    """Run a YAML/JSON RECIPE: load, run its passes, validate, save if it passes.

    Exit codes: 0 saved; 1 the result failed the recipe's validate.max_drop (nothing saved);
    2 a bad recipe, model or data.
    """
    from onnxcomp.recipe import read_recipe, run_recipe

    recipe = read_recipe(recipe_path)
    if input_path:
        recipe.input = Path(input_path).resolve()
    if output_path:
        recipe.output = Path(output_path).resolve()
    if data:
        recipe.data = Path(data).resolve()

    def progress(step: str) -> None:
        if not as_json and sys.stderr.isatty():
            click.echo(f"running {step} ...", err=True)

    result = run_recipe(recipe, progress=progress)
    if as_json:
        emit_json(result.to_json())
    else:
        rows = [[s.name, s.modified, round(s.seconds, 2), _summary(s.report)] for s in result.steps]
        click.echo(table(rows, ["step", "changed", "seconds", "summary"]))
        if result.validation is not None:
            v = result.validation
            click.echo(f"validation: {v['drop_metric']} {v['drop']:.4f} (max {v['max_drop']}) on {v['samples']} samples")
        if result.saved:
            after = human_bytes(result.size_after or 0)
            click.echo(f"saved {result.output} ({human_bytes(result.size_before)} -> {after})")
        else:
            click.echo(f"NOT saved: the result failed validation; {result.output} was not written")
    if not result.saved:
        sys.exit(EXIT_CHECK_FAILED)


@main.command()
@click.option("-o", "--output-dir", type=click.Path(file_okay=False), help="Keep the results here (default: a temporary folder).")
@click.option("--runs", default=300, show_default=True, help="Latency runs per model.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def demo(output_dir, runs, as_json):
    """The main job on the bundled digits CNN: compress, validate, benchmark, show before/after."""
    import tempfile

    from onnxcomp.demo import run_demo

    with tempfile.TemporaryDirectory(prefix="onnxcomp-demo-") as tmp:
        target = Path(output_dir) if output_dir else Path(tmp)

        def progress(message: str) -> None:
            if not as_json and sys.stderr.isatty():
                click.echo(message, err=True)

        result = run_demo(target, runs=runs, progress=progress)
        if as_json:
            emit_json(result)
            return
        click.echo(f"pipeline: {' -> '.join(result['steps'])} on {result['input']}")
        rows = [
            [
                m["name"],
                human_bytes(m["size_bytes"]),
                m["p50_ms"],
                m["ratio_p50"],
                m["accuracy"],
                m["integer_kernels"],
            ]
            for m in result["models"]
        ]
        click.echo(table(rows, ["model", "size", "p50 ms", "ratio", "accuracy", "int kernels"]))
        click.echo(
            f"accuracy on {result['test_samples']} held-out digits; latency at 1 thread, "
            f"batch 1, {runs} interleaved runs"
        )
        if output_dir:
            click.echo(f"saved {result['output']}")


def _summary(report: dict[str, Any], width: int = 70) -> str:
    """One line from a pass report: its scalar figures."""
    parts = [f"{k}={_fmt(v)}" for k, v in report.items() if isinstance(v, (int, float, str, bool))]
    text = ", ".join(parts)
    return text if len(text) <= width else text[: width - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Commands added by later capabilities go below, one section each.


# ---------------------------------------------------------------------------------------------
# inspect


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@shape_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(model, shapes, as_json):
    """Describe MODEL: opsets, inputs/outputs, ops, parameters, MACs, largest tensors.

    MACs are counted for Conv/ConvTranspose/Gemm/MatMul (and their integer forms) where shape
    inference knows the shapes; a dynamic first axis counts as 1 unless --shape fixes it.
    """
    from onnxcomp.data import parse_shapes
    from onnxcomp.summary import summarize

    report = summarize(model, shapes=parse_shapes(shapes))
    if as_json:
        emit_json(report)
    else:
        click.echo(_inspect_text(report))


def _count(n: int | None) -> str:
    return "unknown" if n is None else f"{n:,}"


def _dims_text(shape: Any) -> str:
    if shape is None:
        return "unknown rank"
    # exporters write symbolic dims like "floor(height/2 - 1/2) + 1": too long for a table
    return "[" + ", ".join("?" if d is None or len(str(d)) > 16 else str(d) for d in shape) + "]"


def _inspect_text(r: dict[str, Any]) -> str:
    lines = []
    head = r.get("file", "model")
    if r.get("file_bytes") is not None:
        head += f" ({human_bytes(r['file_bytes'])})"
    lines.append(head)
    opsets = ", ".join(f"{d} {v}" for d, v in r["opsets"].items()) or "none"
    producer = r["producer"] or "unknown"
    lines.append(f"IR version {r['ir_version']}, producer {producer}, opsets: {opsets}")
    for key in ("inputs", "outputs"):
        lines.append("")
        values = r[key]
        if isinstance(values, dict):
            lines.append(f"{key}: {values['unavailable']}")
            continue
        lines.append(f"{key}:")
        rows = [[v["name"], v["dtype"] or "unknown", _dims_text(v["shape"])] for v in values]
        lines.append(table(rows, ["name", "dtype", "shape"]) if rows else "  (none)")
    ops = r["operators"]
    lines.append("")
    if "unavailable" in ops:
        lines.append(f"operators: {ops['unavailable']}")
    else:
        extra = []
        extra.append(f"{ops['subgraphs']} subgraph(s)" if ops["subgraphs"] else "no subgraphs")
        if ops["functions"]:
            extra.append(f"{ops['functions']} model-local function(s), not expanded")
        if ops["custom_domains"]:
            extra.append("custom domains: " + ", ".join(ops["custom_domains"]))
        lines.append(f"operators: {ops['nodes']} nodes ({', '.join(extra)})")
        lines.append(table([[op, n] for op, n in ops["histogram"].items()], ["op", "count"]))
    params = r["parameters"]
    lines.append("")
    if "unavailable" in params:
        lines.append(f"parameters: {params['unavailable']}")
    else:
        init, const = params["initializers"], params["constant_nodes"]
        text = (
            f"parameters: {params['total']:,} ({human_bytes(params['bytes'])}): "
            f"{init['elements']:,} in {init['tensors']} initializers, "
            f"{const['elements']:,} in {const['tensors']} Constant nodes"
        )
        ml = params.get("ml_op_attributes") or {}
        if ml.get("nodes"):
            text += f", {ml['elements']:,} in attributes of {ml['nodes']} ai.onnx.ml nodes"
        lines.append(text)
    comp = r["compute"]
    lines.append("")
    if "unavailable" in comp:
        lines.append(f"compute: {comp['unavailable']}")
    else:
        total = comp["total_macs"]
        text = f"compute: {_count(total)} MACs"
        if total is not None and comp["uncounted_ops"]:
            text = f"compute: at least {total:,} MACs"
        if total is None:
            text += (
                f" ({comp['layers_unknown']} of {comp['layers_counted'] + comp['layers_unknown']}"
                f" layers unknown; {comp['known_macs']:,} in the others)"
            )
        if comp["assumed"]:
            text += "; assumed " + ", ".join(f"{k} = {v}" for k, v in comp["assumed"].items())
        lines.append(text)
        reasons = [layer.get("unknown", "") for layer in comp["layers"]]
        if any("dynamic" in why for why in reasons):
            lines.append("  dynamic dims: fix them with --shape NAME=1x3x224x224 to count all")
        lost = sum("unknown" in why and "dynamic" not in why for why in reasons)
        if lost:
            lines.append(
                f"  onnx shape inference cannot follow {lost} layer(s) (shapes computed at run time)"
            )
        if comp["shape_inference"] != "ok":
            lines.append(f"  shape inference {comp['shape_inference']}")
        if comp["uncounted_ops"]:
            lines.append(
                "  not counted (no MAC rule): "
                + ", ".join(f"{op} x{n}" for op, n in comp["uncounted_ops"].items())
            )
        rows = [
            [layer["node"], layer["op"], _dims_text(layer.get("output_shape")),
             _count(layer["macs"]) if layer["macs"] is not None else f"unknown: {layer['unknown']}"]
            for layer in comp["layers"]
        ]
        if rows:
            lines.append(table(rows, ["node", "op", "output shape", "MACs"]))
    largest = r["largest_tensors"]
    lines.append("")
    if isinstance(largest, dict):
        lines.append(f"largest tensors: {largest['unavailable']}")
    elif largest:
        lines.append("largest tensors:")
        rows = [
            [t["name"], t["source"], t["dtype"] or "?", _dims_text(t["shape"])]
            + [human_bytes(t["bytes"])]
            for t in largest
        ]
        lines.append(table(rows, ["name", "stored as", "dtype", "shape", "size"]))
    else:
        lines.append("largest tensors: none (the model stores no weights)")
    ext = r["external_data"]
    lines.append("")
    if isinstance(ext, dict):
        lines.append(f"external data: {ext['unavailable']}")
    elif ext:
        lines.append("external data files:")
        for f in ext:
            size = human_bytes(f["bytes"]) if f["bytes"] is not None else "missing"
            lines.append(f"  {f['path']} ({size})")
    else:
        lines.append("external data: none")
    for note in r["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# bench


@main.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--threads", default=1, show_default=True, help="onnxruntime intra-op threads.")
@click.option("--runs", default=100, show_default=True, help="Timed runs per model.")
@click.option("--warmup", default=10, show_default=True, help="Untimed runs per model first.")
@click.option(
    "--data", type=click.Path(), help=".npz file or folder: its first --batch-size samples are fed."
)
@click.option("--batch-size", default=1, show_default=True, help="Samples per run.")
@shape_option
@click.option("--no-memory", is_flag=True, help="Skip the peak-memory child processes.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def bench(models, threads, runs, warmup, data, batch_size, shapes, no_memory, as_json):
    """Latency (p50/p90/p99), throughput and peak memory of MODELS in onnxruntime (CPU).

    Runs are interleaved (one run of each model per round) so machine noise hits all alike;
    ratios are each model's p50 over the first model's. Peak memory is measured in a child
    process per model. The optimized-graph columns count what onnxruntime made of each graph:
    fused integer kernels, and DequantizeLinear "islands" that feed float compute.
    """
    import contextlib

    from onnxcomp import inputs
    from onnxcomp.bench import benchmark, progress_steps
    from onnxcomp.data import parse_shapes

    inputs.check_numbers(threads=threads, runs=runs, warmup=warmup, batch_size=batch_size)

    memory = not no_memory
    with contextlib.ExitStack() as stack:
        progress = None
        if sys.stderr.isatty():
            bar = stack.enter_context(
                click.progressbar(
                    length=progress_steps(len(models), runs, warmup, memory),
                    label="bench",
                    file=sys.stderr,
                )
            )
            progress = bar.update
        result = benchmark(
            list(models),
            threads=threads,
            runs=runs,
            warmup=warmup,
            data=data,
            shapes=parse_shapes(shapes),
            batch_size=batch_size,
            memory=memory,
            progress=progress,
        )
    payload = result.to_json()
    if as_json:
        emit_json(payload)
        return
    click.echo(
        f"{result.runs} runs interleaved after {result.warmup} warm-up, "
        f"{result.threads} thread(s), "
        f"batch {result.batch}, {payload['feeds_from']}"
    )
    rows = []
    for m in payload["models"]:
        lat = m["latency_ms"]
        peak = m["peak_memory_bytes"]
        rows.append(
            [m["model"], lat["p50"], lat["p90"], lat["p99"]]
            + [f"{m['throughput_samples_per_s']:,.0f}", f"{m['ratio_p50']:.2f}x"]
            + [human_bytes(peak) if peak is not None else ("failed" if memory else "-")]
        )
    header = ["model", "p50 ms", "p90 ms", "p99 ms", "samples/s", "p50 ratio", "peak mem"]
    click.echo(table(rows, header))
    click.echo("")
    click.echo("after onnxruntime's graph optimizations:")
    rows = []
    for m in payload["models"]:
        g = m["graph"]
        if not g or "unavailable" in g:
            why = g.get("unavailable", "-") if g else "-"
            rows.append([m["model"], "-", "-", "-", "-", "-", why])
            continue
        top = ", ".join(f"{op} {n}" for op, n in list(g["top_ops"].items())[:6])
        rows.append(
            [m["model"], f"{g['nodes_before']} -> {g['nodes']}", g["integer_kernels"],
             g["quantize_linear"], g["dequantize_linear"], g["islands"], top]
        )
    click.echo(table(rows, ["model", "nodes", "int kernels", "Q", "DQ", "DQ islands", "top ops"]))
    for m in payload["models"]:
        g = m["graph"]
        if g and g.get("islands"):
            fed = ", ".join(f"{op} x{n}" for op, n in g["island_consumers"].items())
            click.echo(
                f"note: {m['model']}: {g['islands']} DequantizeLinear node(s) feed float ops "
                f"({fed}): quantization that did not take"
            )
        if m["memory_error"]:
            click.echo(f"note: {m['model']}: peak memory not measured ({m['memory_error']})")


# ---------------------------------------------------------------------------------------------
# optimize


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the optimized model.")
@click.option("--data", type=click.Path(), help=".npz file or folder for the self-check (default: random inputs).")
@shape_option
@_from(OPTIMIZE)("--tolerance", type=float, help="Max relative output error of the self-check.")
@click.option("--rule", "only", multiple=True, metavar="NAME", help="Run only these rules (repeatable).")
@click.option("--skip", multiple=True, metavar="NAME", help="Do not run this rule (repeatable).")
@click.option("--no-upgrade-opset", is_flag=True, help="Never upgrade the opset (fusions that need it are skipped).")
@click.option("--runs", default=50, show_default=True, help="Latency runs of each model for the report.")
@click.option("--no-bench", is_flag=True, help="Skip the latency measurement.")
@report_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def optimize(model_path, output, data, shapes, tolerance, only, skip, no_upgrade_opset, runs, no_bench, report_path, as_json):
    """Fuse decomposed activations and norms, fold BatchNorm, biases and constants.

    The result is a plain ONNX model. Both models run in onnxruntime on --data (or random
    inputs); a rewrite that moves an output beyond --tolerance and beyond what fp32 noise explains
    (judged on a float64 run of the input) is left out and named in a note; the rest is kept.
    """
    from onnxcomp import inputs
    from onnxcomp import model as model_io
    from onnxcomp.data import open_data, parse_shapes
    from onnxcomp.optimize import OptimizeOptions
    from onnxcomp.optimize import optimize as run_optimize
    from onnxcomp.passes import parse_options

    inputs.check_numbers(tolerance=tolerance, runs=runs)
    model = model_io.load(model_path)
    parsed = parse_shapes(shapes)
    values: dict[str, Any] = {"skip": list(skip), "shapes": parsed}
    if tolerance is not None:
        values["tolerance"] = tolerance
    if only:
        values["rules"] = list(only)
    if no_upgrade_opset:
        values["upgrade_opset"] = False
    options = parse_options(OptimizeOptions, values, "optimize")
    inputs.check_output(output, reads=[model_path, data], model=model)
    if report_path:
        inputs.check_output(report_path, reads=[model_path, data, output], model=model, option="--report")
    source = open_data(data, model_io.input_specs(model), shapes=parsed) if data else None
    result, report = run_optimize(model, options, source)
    saved = model_io.save(result, output, inputs=[model_path, data])
    report["size_bytes"] = {"before": Path(model_path).stat().st_size, "after": saved.stat().st_size}
    report["output"] = str(saved)
    if not no_bench:
        from onnxcomp.bench import benchmark

        try:
            bench_result = benchmark(
                [model_path, str(saved)], runs=runs, memory=False, graph=False, shapes=parsed,
                data=source, names=["input", "optimized"],
            )
        except OnnxcompError as err:
            # The result is saved and checked; only the timing failed (e.g. onnxruntime refuses
            # the input file as written, while the cleaned model loads).
            report["notes"].append(f"latency not measured: {err}")
        else:
            report["latency_ms"] = {
                "input_p50": bench_result.models[0].p50_ms,
                "optimized_p50": bench_result.models[1].p50_ms,
                "ratio": bench_result.models[1].ratio_p50,
                "threads": bench_result.threads,
            }
    html_report(report, report_path, [model_path, str(saved)], ["input", "optimized"], data=source, shapes=parsed)
    if as_json:
        emit_json(report)
        return
    rows = []
    for name, entry in report["rules"].items():
        reason = next(iter(entry["reasons"]), None)
        rows.append([name, entry["applied"], entry["skipped"], reason])
    click.echo(table(rows, ["rule", "applied", "skipped", "first reason skipped"]))
    before, after = report["ops_before"], report["ops_after"]
    changed = [
        [op, before.get(op, 0), after.get(op, 0)]
        for op in sorted(set(before) | set(after), key=lambda o: -max(before.get(o, 0), after.get(o, 0)))
        if before.get(op, 0) != after.get(op, 0)
    ]
    if changed:
        click.echo()
        click.echo(table(changed, ["op", "before", "after"]))
    click.echo()
    nodes = report["nodes"]
    click.echo(f"nodes: {nodes['before']} -> {nodes['after']}; opset {report['opset']['before']} -> {report['opset']['after']}")
    size = report["size_bytes"]
    click.echo(f"size: {human_bytes(size['before'])} -> {human_bytes(size['after'])}")
    for note in report["notes"]:
        click.echo(f"note: {note}")
    check = report.get("check")
    if check:
        click.echo(
            f"check: max relative error {check['max_rel_error']:.3g} (tolerance {check['tolerance']:g}) "
            f"on {check['samples']} samples of {check['data']}"
        )
    latency = report.get("latency_ms")
    if latency:
        click.echo(
            f"latency p50 ({latency['threads']} thread): {latency['input_p50']:.3f} ms -> "
            f"{latency['optimized_p50']:.3f} ms ({latency['ratio']:.2f}x)"
        )
    click.echo(f"saved {saved}")
    if report_path:
        click.echo(f"report: {report_path}")


# ---------------------------------------------------------------------------------------------
# quantize


def _save_result(model: Any, report: dict[str, Any], model_path: str, output: str, inputs: list) -> Path:
    """Save a command's result model (never over one of ``inputs``); the report gets its path
    and both file sizes."""
    from onnxcomp import model as model_io

    saved = model_io.save(model, output, inputs=inputs)
    report["output"] = str(saved)
    report["size_bytes"] = {"input": Path(model_path).stat().st_size, "output": saved.stat().st_size}
    return saved


def _show_result(report: dict[str, Any], as_json: bool, text: Any, report_path: str | None = None) -> None:
    """Print a command's report as JSON or as ``text(report)`` (and where the HTML report went)."""
    if as_json:
        emit_json(report)
        return
    click.echo(text(report))
    if report_path:
        click.echo(f"report: {report_path}")


def _check_line(check: dict, comparison: dict) -> str:
    """The self-check in one line (quantize and prune): the drop the verdict judged, then the
    weakest output's cosine and top-1 agreement, and the accuracy when the data has labels."""
    from onnxcomp.evaluate import weakest_output

    out = weakest_output(comparison.get("outputs") or [])
    text = f"check on {check.get('data')}: {check.get('drop_metric')} {check.get('drop', 0):.4f}"
    if out.get("cosine_mean") is not None:
        text += f", cosine {out['cosine_mean']:.5f} mean / {out['cosine_min']:.5f} min ({out['output']})"
    if out.get("top1_agreement") is not None:
        text += f", top-1 agreement {out['top1_agreement']:.4f}"
    if comparison.get("accuracy_reference") is not None:
        text += f", accuracy {comparison['accuracy_reference']:.4f} -> {comparison['accuracy_candidate']:.4f}"
    return text


def _wrote_line(report: dict[str, Any]) -> str | None:
    size = report.get("size_bytes")
    if not size:
        return None
    return f"wrote {report['output']}: {human_bytes(size['output'])} (input {human_bytes(size['input'])})"


def _split_names(values: tuple[str, ...]) -> list[str]:
    return [name for value in values for name in value.split(",") if name]


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the result.")
@quantize_option(
    "--mode",
    metavar="auto|static|dynamic|weight-only",
    help="auto measures static, dynamic, the cleaned-up fp32 graph and the input in onnxruntime and keeps the fastest within --max-drop.",
)
@quantize_option("--data", type=click.Path(), help="Calibration samples: .npz file or folder of them.")
@quantize_option(
    "--calibration",
    metavar="minmax|percentile|entropy|mse",
    help="How activation ranges are chosen from the calibration samples.",
)
@quantize_option("--per-channel/--per-tensor", help="Weight scales.")
@quantize_option("--bits", type=int, help="8, or 4 with --mode weight-only (its default).")
@quantize_option("--block-size", type=int, help="Weight-only: MatMulNBits block size (32, 64, 128).")
@quantize_option("--symmetric/--asymmetric", help="Weight-only: symmetric blocks (no zero points).")
@quantize_option("--accuracy-level", type=int, help="Weight-only: MatMulNBits compute type (4: int8 activations).")
@quantize_option("--activation-type", metavar="uint8|int8")
@quantize_option(
    "--target-cpu",
    metavar="any|auto|avx2|avx512|vnni|arm64",
    help="CPU the model will run on. any: 7-bit int8 weights, exact on every x86 path (onnxruntime's "
    "u8s8 kernels saturate 8-bit weights on AVX2/AVX-512 without VNNI); vnni, arm64, or auto on such a "
    "machine: full 8-bit weights.",
)
@quantize_option(
    "--contrib-ops/--standard-ops",
    help="Dynamic and weight-only: write onnxruntime's com.microsoft kernels (DynamicQuantizeMatMul, MatMulNBits, "
    "GatherBlockQuantized) instead of the standard ONNX it fuses into them (the default, readable by any runtime).",
)
@quantize_option("--exclude-nodes", multiple=True, metavar="NAME[,NAME]", help="Nodes to keep float (repeatable).")
@quantize_option("--exclude-ops", multiple=True, metavar="OP[,OP]", help="Op types to keep float (repeatable).")
@quantize_option(
    "--op-types",
    multiple=True,
    metavar="OP[,OP]",
    help="Dynamic and weight-only: op types to quantize (default: MatMul,Gemm; weight-only also Gather). Conv,MatMul,Gemm writes ConvInteger.",
)
@quantize_option("--max-drop", type=float, help="Largest accepted drop on --eval-data (see --metric).")
@quantize_option("--eval-data", type=click.Path(), help="Samples the drop and self-check are measured on.")
@quantize_option("--metric", metavar="NAME|module:function", help=METRIC_HELP)
@quantize_option("--calibration-samples", type=int, help="Use at most this many calibration samples.")
@quantize_option("--check-samples", type=int, help="Samples of the self-check and of the drop.")
@quantize_option("--batch-size", type=int, help="Samples per onnxruntime run (calibration, checks).")
@quantize_option("--optimize/--no-optimize", help="The graph clean-up before quantizing.")
@quantize_option(
    "--bias-correction/--no-bias-correction",
    help="Add the mean output error of each quantized layer to its bias (default: off for static, on for dynamic).",
)
@quantize_option("--gptq/--no-gptq", help="Static (Conv, Gemm, MatMul) and weight-only: GPTQ rounding of weights on the calibration data.")
@quantize_option("--allow-random-calibration/--no-allow-random-calibration", help="Let --mode static calibrate on random inputs.")
@shape_option
@quantize_option("--threads", type=int, help="Threads for the latency measurements.")
@click.option(
    "--recipe-out",
    type=click.Path(dir_okay=False),
    help="Also write a recipe that replays this run's decision (mode, layers kept float, clean-up "
    "rules) with `onnxcomp run`, without timing anything again.",
)
@click.option("--force", is_flag=True, help="Write the result even when the self-check finds it broken.")
@report_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def quantize(model_path, output, shapes, recipe_out, force, report_path, as_json, **flags):
    """Quantize MODEL to int8 and write it to OUTPUT, with a per-layer report.

    Static QDQ places Q/DQ only where onnxruntime runs integer kernels; --mode auto (the default)
    also tries dynamic quantization and the cleaned-up fp32 graph, and keeps whichever is fastest
    within --max-drop (default 0.01; 0.005 of cosine), or the input model when nothing is faster.
    Timings under load can tie: --recipe-out pins the decision for `onnxcomp run`.

    Exit codes: 0 written; 1 --max-drop cannot be met or the self-check finds the result broken
    (nothing written; --force writes it anyway); 2 bad input; 3 internal error.
    """
    from onnxcomp import inputs
    from onnxcomp import model as model_io
    from onnxcomp.data import parse_shapes
    from onnxcomp.passes import parse_options
    from onnxcomp.quantize.api import QuantizeOptions, quantize_built
    from onnxcomp.quantize.auto import BudgetError
    from onnxcomp.recipe import decision_recipe, write_recipe

    inputs.check_numbers(
        **{k: flags.get(k) for k in ("threads", "max_drop", "calibration_samples", "batch_size")}
    )
    # Only the flags given: the dataclass holds every default. Parsed like a recipe step, so a
    # bad value gets the same one-line error naming the flag.
    values = {k: v for k, v in flags.items() if v is not None}
    for key in ("exclude_nodes", "exclude_ops", "op_types"):
        values[key] = _split_names(values.get(key, ()))
    if shapes:
        values["shapes"] = parse_shapes(shapes)
    options = parse_options(QuantizeOptions, values, "quantize")
    model = model_io.load(model_path)
    inputs.check_not_quantized(model, model_path)
    reads = [model_path, flags.get("data"), flags.get("eval_data")]
    inputs.check_output(output, reads=reads, model=model)
    for option, path in (("--recipe-out", recipe_out), ("--report", report_path)):
        if path:
            inputs.check_output(path, reads=[*reads, output], model=model, option=option)
    try:
        built = quantize_built(model, options)
    except BudgetError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_CHECK_FAILED)
    report = built.report
    broken = inputs.broken_reason(report.get("check"))
    if broken and not force:
        raise CheckFailed(
            f"the result is broken by onnxcomp's own check: {broken}; nothing written "
            "(--force writes it anyway)"
        )
    if broken:
        report.setdefault("warnings", []).append(f"written with --force although broken: {broken}")
        click.echo(f"warning: written with --force although broken: {broken}", err=True)
    saved = _save_result(built.model, report, model_path, output, inputs=reads)
    if recipe_out:
        recipe = decision_recipe(report, options, input=model_path, output=output)
        report["recipe"] = str(write_recipe(recipe, recipe_out, protect=[model_path, output]))
    html_report(
        report, report_path, [model_path, str(saved)], ["input", "quantized"],
        data=options.eval_data or options.data, shapes=options.shapes, threads=options.threads,
    )
    _show_result(report, as_json, _quantize_text, report_path)


def _quantize_text(report: dict[str, Any]) -> str:
    lines = []
    auto = report.get("auto")
    if auto:
        lines.append(f"mode auto -> {auto['chosen']}: {auto['why']}")
        rows = [
            [c["mode"], c.get("latency_ms"), c.get("ratio_to_float"), c.get("drop"), c.get("integer_kernels"),
             c.get("islands"), c.get("within_budget")]
            for c in auto["candidates"]
        ]
        lines.append(table(rows, ["candidate", "p50 ms", "x fp32", "drop", "int kernels", "islands", "within"]))
        for c in auto["candidates"]:
            if c.get("note"):
                lines.append(f"{c['mode']}: {c['note']}")
            if c.get("float_layers"):
                lines.append(f"{c['mode']}: {c['float_layers']} most sensitive layers put back to float")
        for mode, why in auto.get("skipped", {}).items():
            lines.append(f"{mode} not tried: {why}")
        decision = auto.get("decision") or {}
        if decision.get("margin") is not None:
            against = decision.get("runner_up") or "float"
            if against == "float":
                against = "the 0.97x bar"
            note = " (re-measured)" if decision.get("remeasured") else ""
            noise = "; still within noise" if decision.get("within_noise") else ""
            lines.append(f"margin to {against}: {decision['margin']:.3f}x fp32{note}{noise}")
        lines.append("")
    else:
        lines.append(f"mode {report.get('mode')}")
    cpu = report.get("cpu")
    if cpu:
        lines.append(
            f"cpu: measured on {cpu['isa_measured']}; target {cpu['target_cpu']}: int8 weights "
            f"{cpu['weight_range']}"
        )
    opset = report.get("prepare", {}).get("opset")
    if opset:
        lines.append(f"opset {opset['from']} -> {opset['to']}: {opset['reason']}")
    tensors = report.get("tensors") or []
    if tensors:
        rows = []
        for t in tensors:
            scale = t["scale"]
            scale_text = f"{scale[0]:.3g}..{scale[1]:.3g}" if isinstance(scale, list) else f"{scale:.4g}"
            rows.append([t["tensor"], t["kind"], t.get("type"), scale_text, t.get("zero_point"), t.get("sqnr_db")])
        lines.append(table(rows, ["tensor", "kind", "type", "scale", "zero point", "SQNR dB"]))
        lines.append("")
    plan = report.get("plan")
    if plan:
        kernels: dict[str, int] = {}
        for d in plan["quantized_nodes"]:
            kernels[d["kernel"]] = kernels.get(d["kernel"], 0) + 1
        lines.append("integer: " + ", ".join(f"{k} x{v}" for k, v in kernels.items()))
        reasons: dict[str, list[str]] = {}
        for d in plan["float_nodes"]:
            reasons.setdefault(d["reason"], []).append(d["node"] or d["op"])
        for reason, nodes in reasons.items():
            shown = ", ".join(nodes[:4]) + (f" (+{len(nodes) - 4})" if len(nodes) > 4 else "")
            lines.append(f"float: {shown}: {reason}")
    fallback = (report.get("budget") or {}).get("fallback_to_float") or []
    for f in fallback:
        lines.append(f"float: {f['node']}: {f['reason']} (SQNR {f['sqnr_db']:.1f} dB)")
    check = report.get("check")
    if check:
        lines.append(_check_line(check, check.get("comparison", {})))
        graph = check.get("graph") or {}
        if "integer_kernels" in graph:
            ops = ", ".join(f"{k} x{v}" for k, v in graph["integer_kernel_ops"].items())
            lines.append(f"onnxruntime runs {graph['integer_kernels']} integer kernels ({ops}); "
                         f"{graph['islands']} DequantizeLinear feeding float ops")
    if _wrote_line(report):
        lines.append(_wrote_line(report))
    if report.get("recipe"):
        lines.append(f"wrote {report['recipe']}: `onnxcomp run {report['recipe']}` replays this decision")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# report


@main.command("report")
@click.argument("result_path", metavar="RESULT.json", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), callback=_report_path, help="The HTML file to write.")
@click.option("--title", help="Page title (default: from the command that made the result).")
def report_command(result_path, output, title):
    """Render a saved --json result (of optimize, quantize, ...) as one self-contained HTML page.

    RESULT.json may be "-" for standard input: onnxcomp quantize ... --json | onnxcomp report - -o r.html
    """
    from onnxcomp.report import read_result, write_report

    if result_path == "-":
        try:
            result = json.loads(sys.stdin.read())
        except json.JSONDecodeError as err:
            raise OnnxcompError(f"standard input: not JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(result, dict):
            raise OnnxcompError("standard input: expected a JSON object (a command's --json result)")
    else:
        result = read_result(result_path)
    click.echo(f"wrote {write_report(result, output, title=title)}")


# ---------------------------------------------------------------------------------------------
# transfer, distill


@main.group()
def transfer() -> None:
    """Reuse a pretrained model: cut it, train a new head in numpy, copy or reset weights."""


def _head_values(head, task, hidden, epochs, lr, weight_decay, patience, seed, batch_size) -> dict[str, Any]:
    return {
        "head": head, "task": task, "hidden": hidden, "epochs": epochs, "lr": lr,
        "weight_decay": weight_decay, "patience": patience, "seed": seed, "batch_size": batch_size,
    }


def _head_options(f):
    for option in reversed([
        click.option("--head", type=click.Choice(["linear", "mlp"]), default="linear", show_default=True, help="Head trained on the features."),
        click.option("--hidden", default=128, show_default=True, help="MLP hidden units."),
        click.option("--epochs", default=300, show_default=True, help="Most training epochs (early stopping on validation)."),
        click.option("--lr", default=3e-3, show_default=True, help="Adam learning rate."),
        click.option("--weight-decay", default=1e-4, show_default=True, help="Decoupled weight decay."),
        click.option("--patience", default=30, show_default=True, help="Epochs without a better validation loss before stopping."),
        click.option("--batch-size", default=64, show_default=True, help="Samples per training step."),
        click.option("--seed", default=0, show_default=True),
        click.option("--no-cache", is_flag=True, help="Do not read or write the feature cache."),
    ]):
        f = option(f)
    return f


@transfer.command("cuts")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--shape", "shapes", multiple=True, metavar="NAME=1x3x224x224", help="Sizes for dynamic input dims, so feature maps get shapes (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def transfer_cuts(model_path, shapes, as_json):
    """List candidate feature tensors, best first."""
    from onnxcomp import model as model_io
    from onnxcomp.data import parse_shapes
    from onnxcomp.transfer import find_cuts
    from onnxcomp.transfer.cuts import fix_input_shapes

    model = model_io.load(model_path)
    fix_input_shapes(model, parse_shapes(shapes))
    cuts = [c.to_json() for c in find_cuts(model)]
    if as_json:
        emit_json(cuts)
        return
    rows = [[c["rank"], c["tensor"], _dims_text(c["shape"]), c["pooling"], c["features"], c["kind"]] for c in cuts]
    click.echo(table(rows, ["rank", "tensor", "shape", "pooling", "features", "why"]))


@transfer.command("extract")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--at", required=True, metavar="TENSOR", help="The tensor that becomes the output.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def transfer_extract(model_path, at, output, as_json):
    """Cut out the backbone: inputs unchanged, TENSOR the only output."""
    from onnxcomp import model as model_io
    from onnxcomp.transfer import extract

    model = model_io.load(model_path)
    model_io.normalize(model)
    before = len(model.graph)
    extract(model, at)
    saved = model_io.save(model, output, inputs=[model_path])
    out = model.graph.outputs[0]
    report = {"output": str(saved), "tensor": at, "shape": _shape_list(out), "nodes_before": before, "nodes_after": len(model.graph)}
    if as_json:
        emit_json(report)
        return
    click.echo(f"{at} {_dims_text(report['shape'])}: {before} -> {len(model.graph)} nodes; saved {saved}")


def _shape_list(value) -> list | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else (d.value or None) for d in value.shape]


def _epoch_printer():
    if not sys.stderr.isatty():
        return None

    def show(tensor: str, row: dict[str, float]) -> None:
        if row["epoch"] % 10 == 0 or row["epoch"] == 1:
            click.echo(
                f"\r... {tensor}: epoch {row['epoch']} train loss {row['train_loss']:.4f} "
                f"val loss {row['val_loss']:.4f} val {row['val_metric']:.4f}   ",
                err=True, nl=False,
            )

    return show


@transfer.command("fit")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(), help="Training samples with labels (.npz or folder).")
@click.option("--val", "val_path", type=click.Path(), help="Validation samples (default: a split held out of --data).")
@click.option("--at", metavar="TENSOR", help="Cut tensor (default: try the best --tries candidates).")
@click.option("--pooling", type=click.Choice(["none", "flatten", "avgpool", "mean_tokens", "first_token"]), help="Override the cut's pooling.")
@click.option("--tries", default=3, show_default=True, help="Candidate cuts tried without --at.")
@click.option("--task", type=click.Choice(["classify", "regress"]), default="classify", show_default=True)
@click.option("--val-fraction", default=0.2, show_default=True, help="Share of --data held out when no --val.")
@_head_options
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@click.option("--threads", default=1, show_default=True)
@report_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def transfer_fit(model_path, data, val_path, at, pooling, tries, task, val_fraction, head, hidden, epochs, lr,
                 weight_decay, patience, batch_size, seed, no_cache, output, threads, report_path, as_json):
    """Train a new head on MODEL's features (numpy) and splice it on as ONNX nodes.

    The output model gives `probabilities` [N, K] and `label` (int64) for --task classify, or
    `prediction` for --task regress.
    """
    from onnxcomp import model as model_io
    from onnxcomp.data import open_data
    from onnxcomp.passes import parse_options
    from onnxcomp.transfer import FitOptions, fit

    model = model_io.load(model_path)
    from onnxcomp import inputs

    inputs.check_output(output, reads=[model_path, data, val_path], model=model)
    values = _head_values(head, task, hidden, epochs, lr, weight_decay, patience, seed, batch_size)
    values.update({"at": at, "pooling": pooling, "tries": tries, "val_fraction": val_fraction, "cache": not no_cache})
    options = parse_options(FitOptions, values, "transfer fit")
    specs = model_io.input_specs(model)
    source = open_data(data, specs)
    val_source = open_data(val_path, specs) if val_path else None
    progress = _epoch_printer()
    result = fit(model, source, options, val_data=val_source, threads=threads, progress=progress)
    if progress:
        click.echo(err=True)
    saved = model_io.save(result.model, output, inputs=[model_path, data, val_path])
    report = dict(result.report, output=str(saved))
    html_report(report, report_path, [model_path, str(saved)], ["input", "fitted"], data=source, threads=threads)
    if as_json:
        emit_json(report)
        return
    if len(report["tried"]) > 1:
        rows = [[t["tensor"], t["pooling"], t["features"], t["val_metric"], t["val_loss"], t["epochs"]] for t in report["tried"]]
        click.echo(table(rows, ["cut", "pooling", "features", f"val {report['metric']}", "val loss", "epochs"]))
        click.echo()
    cut = report["cut"]
    click.echo(f"cut: {cut['tensor']} ({cut['pooling']}, {cut['features']} features): {report['why']}")
    click.echo(
        f"head: {report['head']['kind']}, {report['head']['parameters']} parameters; "
        f"{report['metric']} train {report['train_metric']:.4f} ({report['train_samples']} samples), "
        f"validation {report['val_metric']:.4f} ({report['val_samples']} samples, {report['val_source']})"
    )
    click.echo(f"saved {saved}")


@transfer.command("params")
@click.argument("source_path", metavar="SOURCE", type=click.Path(dir_okay=False))
@click.argument("target_path", metavar="TARGET", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def transfer_params_command(source_path, target_path, output, as_json):
    """Copy SOURCE's weights into TARGET where they correspond (name, else position + shape)."""
    from onnxcomp import model as model_io
    from onnxcomp.transfer.params import transfer_params

    model, report = transfer_params(model_io.load(source_path), model_io.load(target_path))
    saved = model_io.save(model, output, inputs=[source_path, target_path])
    report["output"] = str(saved)
    if as_json:
        emit_json(report)
        return
    rows = [[c["tensor"], "copied", f"from {c['from']} (by {c['by']})"] for c in report["copied"]]
    rows += [[s["tensor"], "skipped", s["reason"]] for s in report["skipped"]]
    click.echo(table(rows, ["tensor", "", "how / why"]))
    click.echo(
        f"copied {report['copied_tensors']} tensors ({report['copied_parameters']} of "
        f"{report['parameters']} parameters), skipped {report['skipped_tensors']}; saved {saved}"
    )


@transfer.command("structure")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--classes", type=int, help="Outputs of the last layer (default: unchanged).")
@click.option("--reinit", type=click.Choice(["head", "all"]), default="all", show_default=True, help="Fresh weights everywhere, or in the last layer only.")
@click.option("--seed", default=0, show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def transfer_structure(model_path, classes, reinit, seed, output, as_json):
    """Same architecture, fresh weights (He/Glorot, norms reset), last layer resized."""
    from onnxcomp import model as model_io
    from onnxcomp.transfer.structure import fresh_structure

    model, report = fresh_structure(model_io.load(model_path), classes, reinit, seed)
    saved = model_io.save(model, output, inputs=[model_path])
    report["output"] = str(saved)
    if as_json:
        emit_json(report)
        return
    click.echo(
        f"re-initialised {report['reset_layers']} layers ({reinit}); last layer {report['last_layer']}: "
        f"{report['outputs_before']} -> {report['outputs_after']} outputs; saved {saved}"
    )


@main.command("distill")
@click.argument("teacher_path", metavar="TEACHER", type=click.Path(dir_okay=False))
@click.option("--student", "student_path", required=True, type=click.Path(dir_okay=False), help="The model whose head is trained.")
@click.option("--data", required=True, multiple=True, type=click.Path(), help="Samples, labelled or not (repeatable).")
@click.option("--val", "val_path", type=click.Path(), help="Validation samples (default: a split held out of --data).")
@click.option("--at", metavar="TENSOR", help="The student's cut (default: its best-ranked candidate).")
@click.option("--temperature", default=4.0, show_default=True, help="Softmax temperature of the soft targets.")
@click.option("--labels-weight", default=0.5, show_default=True, help="Weight of cross-entropy on labelled samples.")
@click.option("--teacher-output", metavar="NAME", help="The teacher's class-score output (default: the first [N, K]).")
@_head_options
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@click.option("--threads", default=1, show_default=True)
@report_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def distill_command(teacher_path, student_path, data, val_path, at, temperature, labels_weight, teacher_output,
                    head, hidden, epochs, lr, weight_decay, patience, batch_size, seed, no_cache, output, threads,
                    report_path, as_json):
    """Train the student's head on the teacher's soft outputs (KL at T + CE on labels)."""
    from onnxcomp import model as model_io
    from onnxcomp.data import open_data
    from onnxcomp.passes import parse_options
    from onnxcomp.transfer.distill import DistillOptions, distill

    teacher = model_io.load(teacher_path)
    student = model_io.load(student_path)
    from onnxcomp import inputs

    inputs.check_output(output, reads=[teacher_path, student_path, *data, val_path], model=student)
    values = _head_values(head, "classify", hidden, epochs, lr, weight_decay, patience, seed, batch_size)
    values.update({"at": at, "temperature": temperature, "labels_weight": labels_weight,
                   "teacher_output": teacher_output, "cache": not no_cache})
    options = parse_options(DistillOptions, values, "distill")
    specs = model_io.input_specs(teacher)
    sources = [open_data(path, specs) for path in data]
    val_source = open_data(val_path, specs) if val_path else None
    result = distill(teacher, student, sources, options, val_data=val_source, threads=threads)
    saved = model_io.save(result.model, output, inputs=[teacher_path, student_path, *data, val_path])
    report = dict(result.report, output=str(saved))
    html_report(
        report, report_path, [student_path, str(saved)], ["student", "distilled"], data=sources[0],
        threads=threads,
    )
    if as_json:
        emit_json(report)
        return
    cut = report["cut"]
    click.echo(
        f"student cut: {cut['tensor']} ({cut['pooling']}); teacher output {report['teacher_output']}, "
        f"T={report['temperature']:g}, labels weight {report['labels_weight']:g}"
    )
    click.echo(
        f"{report['samples']} samples ({report['labelled_samples']} labelled); validation agreement with "
        f"the teacher {report['val_agreement']:.4f}, metric {report['val_metric']:.4f} ({report['val_samples']} samples)"
    )
    click.echo(f"saved {saved}")


# ---------------------------------------------------------------------------------------------
# prune


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the result.")
@click.option("--sparsity", type=float, default=0.5, show_default=True, help="Fraction of weights zeroed; with --structured, of channels removed.")
@click.option(
    "--method",
    default="auto",
    show_default=True,
    metavar="auto|magnitude|threshold|random|wanda|sparsegpt|admm",
    help="Weight scores; sparsegpt: OBS mask and update; admm: mask searched by ADMM on each layer's "
    "outputs, kept weights solved exactly (slower, less error); auto: admm with --data, else magnitude.",
)
@click.option("--scope", default="layer", show_default=True, metavar="layer|global|channel", help="Where the sparsity is counted: each tensor, the whole model, each output channel.")
@click.option("--pattern", default="unstructured", show_default=True, metavar="unstructured|N:M", help="N:M keeps N of every M consecutive inputs (2:4).")
@click.option("--threshold", type=float, help="--method threshold: zero the weights with |w| <= this.")
@click.option("--structured", is_flag=True, help="Remove whole channels (dependency groups): smaller, faster tensors.")
@click.option("--importance", default="l2", show_default=True, metavar="l1|l2|bn|activation", help="--structured: how channels are ranked.")
@click.option("--sparsity-of", default="channels", show_default=True, metavar="channels|macs", help="--structured: what --sparsity counts (macs: cut the channels with the lowest score per MAC, model-wide).")
@click.option("--reconstruct/--no-reconstruct", default=None, help="Solve the kept weights layer by layer on --data (default: on with --data).")
@click.option("--data", type=click.Path(), help="Calibration samples (.npz or folder) for Wanda, reconstruction and activation importance.")
@click.option("--exclude-nodes", multiple=True, metavar="NAME[,NAME]", help="Nodes left dense (repeatable).")
@click.option("--min-size", type=int, default=512, show_default=True, help="Weights with fewer elements are left alone.")
@click.option("--max-drop", type=float, help="Largest accepted drop on --eval-data; the most sensitive layers/groups are spared until it holds.")
@click.option("--eval-data", type=click.Path(), help="Samples the drop and the self-check are measured on.")
@click.option("--metric", default="auto", show_default=True, metavar="NAME|module:function", help="What --max-drop measures (onnxcomp.evaluate:yolo_boxes: detectors' boxes; --allocate sensitivity then ranks groups by its smooth loss).")
@click.option("--allocate", default="scores", show_default=True, metavar="scores|sensitivity|error", help="--sparsity-of macs: scores: lowest channel score per MAC, at most 20%% of a group; sensitivity: each group cut alone on --data, the MACs taken where the outputs change least. Unstructured: error: each weight pruned alone at --sparsity +-10%% on --data, the zeros placed where its output error grows least.")
@click.option("--samples", type=int, default=256, show_default=True, help="Calibration samples used.")
@click.option("--no-optimize", is_flag=True, help="Skip the graph clean-up before pruning.")
@shape_option
@click.option("--threads", default=1, show_default=True)
@report_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def prune(
    model_path, output, sparsity, method, scope, pattern, threshold, structured, importance, sparsity_of, reconstruct,
    data, exclude_nodes, min_size, max_drop, eval_data, metric, allocate, samples, no_optimize, shapes, threads,
    report_path, as_json,
):
    """Prune MODEL and write it to OUTPUT, with a per-tensor (or per-group) report.

    Unstructured pruning zeroes weights of Conv/Gemm/MatMul (the file zips smaller; onnxruntime's
    dense kernels run as fast as before); with --data the kept weights are solved layer by layer
    so each layer reproduces its outputs. --structured removes whole channels through their
    dependency groups (BatchNorm, residual Add, Concat, depthwise Conv, Flatten into Gemm), so
    the model gets smaller and faster; groups that cannot be cut safely are named with why.

    Exit codes: 0 written; 1 --max-drop cannot be met (nothing written); 2 bad input.
    """
    from onnxcomp import model as model_io
    from onnxcomp.data import parse_shapes
    from onnxcomp.passes import parse_options
    from onnxcomp.prune.api import PruneOptions
    from onnxcomp.prune.api import prune as run_prune
    from onnxcomp.prune.budget import BudgetError

    values = dict(
        sparsity=sparsity, method=method, scope=scope, pattern=pattern, threshold=threshold,
        structured=structured, importance=importance, sparsity_of=sparsity_of, reconstruct=reconstruct,
        exclude_nodes=_split_names(exclude_nodes), min_size=min_size, max_drop=max_drop, metric=metric,
        allocate=allocate, samples=samples, optimize=not no_optimize, threads=threads, shapes=parse_shapes(shapes),
    )  # fmt: skip
    options = parse_options(PruneOptions, {k: v for k, v in values.items() if v is not None}, "prune")
    model = model_io.load(model_path)
    from onnxcomp import inputs

    inputs.check_output(output, reads=[model_path, data, eval_data], model=model)
    try:
        result, report = run_prune(model, options, data=data, eval_data=eval_data)
    except BudgetError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_CHECK_FAILED)
    saved = _save_result(result, report, model_path, output, inputs=[model_path, data, eval_data])
    html_report(
        report, report_path, [model_path, str(saved)], ["input", "pruned"], data=eval_data or data,
        shapes=options.shapes, threads=threads,
    )
    _show_result(report, as_json, _prune_text, report_path)


def _prune_text(report: dict[str, Any]) -> str:
    lines = []
    if report.get("kind") == "structured":
        rows = [
            [g.get("group"), g.get("kind"), g.get("channels"), g.get("removed"), g.get("skipped", "")]
            for g in report.get("groups", [])
        ]
        lines.append(table(rows, ["group", "kind", "channels", "removed", "skipped because"]))
    else:
        lines.append(
            f"{report.get('method')} ({report.get('scope')}, {report.get('pattern')}), "
            f"reconstruct={report.get('reconstruct')}"
        )
        rows = [
            [t.get("node"), t.get("op"), t.get("sparsity"), t.get("relative_error"), t.get("skipped", "")]
            for t in report.get("tensors", [])
        ]
        lines.append(table(rows, ["node", "op", "sparsity", "rel. error", "skipped because"]))
    before, after = report.get("before", {}), report.get("after", {})
    rows = [
        [key, before.get(key), after.get(key)]
        for key in ("parameters", "sparsity", "macs", "file_bytes", "zip_bytes")
    ]
    lines.append(table(rows, ["", "before", "after"]))
    check = report.get("check") or {}
    if check:
        lines.append(_check_line(check, check))
    if _wrote_line(report):
        lines.append(_wrote_line(report))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# tune


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the best model.")
@click.option("--eval-data", required=True, type=click.Path(), help="Samples the metric is measured on (every trial).")
@click.option("--data", type=click.Path(), help="Calibration samples (default: --eval-data).")
@click.option("--metric", default="auto", show_default=True, metavar="NAME|module:function", help=METRIC_HELP)
@click.option("--max-drop", type=float, default=0.01, show_default=True, help="Largest accepted drop of the metric.")
@click.option("--objective", type=click.Choice(["latency", "size"]), default="latency", show_default=True)
@click.option("--space", "levers", default="prune,quantize", show_default=True, help="Levers searched: prune, quantize (comma-separated).")
@click.option("--trials", type=int, default=20, show_default=True, help="Trials in all (a resumed run counts its old ones).")
@click.option("--time-budget", metavar="20m", help="Stop starting trials after this long (90s, 20m, 1.5h); running ones finish.")
@click.option("--workers", type=int, default=1, show_default=True, help="Trials built, evaluated and timed in parallel: this process and N-1 more (a local process pool, or Ray actors with --ray).")
@click.option("--ray", "ray_address", metavar="auto|ADDRESS", help="The other workers as Ray actors: auto starts a local Ray with --workers CPUs; an address joins a cluster.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", type=click.Path(file_okay=False), help="A run folder (with trials.jsonl) to continue.")
@click.option("--run-dir", type=click.Path(file_okay=False), help="Where the trial log and models go (default: OUTPUT's name + .tune/).")
@click.option("--limit", type=int, default=1000, show_default=True, help="Evaluation samples per trial.")
@click.option("--threads", type=int, default=1, show_default=True, help="Threads for the latency measurements.")
@click.option("--batch", type=int, default=4, show_default=True, help="Trials proposed together (fixed, so results do not depend on --workers).")
@click.option("--transfer-fit", is_flag=True, help="MODEL is a backbone: every trial fits a head on --data (labelled) first; the search also chooses the cut and the head.")
@click.option("--recipe-out", type=click.Path(dir_okay=False), help="Also copy the chosen recipe here (one is always written beside OUTPUT).")
@report_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (with every trial).")
def tune(model_path, output, time_budget, levers, recipe_out, report_path, as_json, ray_address, **flags):
    """Search compression recipes (prune, quantize, layers left float) for the fastest (or
    smallest) model within --max-drop, each trial built and measured in onnxruntime.

    Builds, the metric and latency run in parallel on long-lived workers (--workers, --ray),
    each pinned to a core of its own while it times; the optimiser is told MAC (or size)
    ratios, never timings, so the same seed gives the same result whatever the number of
    workers; the final choice times each kernel class's best. Sensitivity first (the drop when only one
    layer is quantized or one channel group pruned, cached in the run folder), greedy seeds,
    then optuna's TPE when installed (else a seeded random search).

    Exit codes: 0 best model written; 1 no trial met --max-drop (the closest written as
    OUTPUT.closest.onnx); 2 bad input; 130 interrupted (the best so far written).
    """
    from onnxcomp.tune import NoSolution, TuneOptions, pareto_table, parse_duration, plot
    from onnxcomp.tune import tune as run_tune

    options = TuneOptions(
        **flags,
        time_budget=parse_duration(time_budget),
        levers=[v for v in levers.split(",") if v],
        ray=ray_address,
    )
    exit_code = 0
    try:
        result = run_tune(model_path, output, options)
    except NoSolution as err:
        click.echo(f"error: {err}", err=True)
        result, exit_code = err.result, EXIT_CHECK_FAILED
    if result.stopped == "interrupted":
        exit_code = 130
    report = result.to_json()
    if recipe_out and result.recipe:
        text = Path(result.recipe).read_text(encoding="utf-8")
        Path(recipe_out).write_text(
            text.replace(f"onnxcomp run {Path(result.recipe).name}", f"onnxcomp run {Path(recipe_out).name}"),
            encoding="utf-8",
        )
        report["recipe"] = str(recipe_out)
    png = plot(result, result.run_dir / "pareto.png")
    report["plot"] = str(png) if png else None
    if report_path:
        from onnxcomp.report import write_report

        write_report(_clean(report), report_path)
    if as_json:
        emit_json(report)
    else:
        header, rows = pareto_table(result)
        click.echo(table(rows, header))
        best = result.best or {}
        what = "best" if result.passed else "closest (over budget)"
        click.echo(
            f"{len(result.trials)} trials ({result.search}, stopped: {result.stopped}) in {result.seconds:.0f}s; "
            f"{what}: {best.get('name')} ({best.get('latency_ratio', math.nan):.2f}x fp32 latency, "
            f"drop {best.get('drop', math.nan):.4f})"
        )
        click.echo(f"wrote {result.output or result.closest}; recipe {report['recipe']}")
        if png:
            click.echo(f"plot: {png}")
    if exit_code:
        sys.exit(exit_code)


if __name__ == "__main__":
    main()
