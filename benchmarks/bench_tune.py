"""onnxcomp tune beside the best fixed preset of quantize and of prune, and trial throughput.

    python benchmarks/bench_tune.py [--trials 10] [--max-drop 0.01] [--repeats 2]

Per model: every fixed preset (quantize static minmax/entropy, dynamic; prune structured
10/20/30/50 %, unstructured 50 %) built and judged the way tune builds a trial (same recipe
runner, same judge), then `tune` with --trials and the same --max-drop. The passing presets and
the tuned model are then timed side by side in one interleaved run (ratios to fp32 from
separate runs drift with the load of this shared machine), and the tuned model's recipe is run
again with `onnxcomp run` and its outputs compared with the tuned model's.

Throughput: a prune-only tune of the digits CNN with 1 and 2 local workers and with Ray (2
CPUs, started once), back to back, repeated; `uptime` before each. Reported: trials per minute
of the whole search, builds (trials and sensitivity probes) per minute once the workers are up,
and the CPU seconds per build of the workers -- what shows the parallel speed-up when other
processes take the cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from onnxcomp.tune import TuneOptions, tune
from onnxcomp.tune.api import Runner, Tuner

MODELS = Path(__file__).resolve().parent.parent / "models"
CASES = {
    "digits_cnn": ("digits_cnn.onnx", "digits_calib.npz", "digits_test.npz"),
    "digits_mlp": ("digits_mlp.onnx", "digits_calib_flat.npz", "digits_test_flat.npz"),
}
BASE = {"prune": "none", "ratio": 0.0, "quantize": "none", "calibration": None, "keep_float": 0}
QUANT = [
    {**BASE, "quantize": "static", "calibration": "minmax"},
    {**BASE, "quantize": "static", "calibration": "entropy"},
    {**BASE, "quantize": "dynamic"},
]
PRUNE = [
    *({**BASE, "prune": "structured", "ratio": r} for r in (0.1, 0.2, 0.3, 0.5)),
    {**BASE, "prune": "unstructured", "ratio": 0.5},
]


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip().split("load average:")[-1].strip()


def build_presets(model, calib, test, max_drop, tmp):
    """Every preset built and judged (not timed yet): records with path, passed, drop, metric."""
    start = time.perf_counter()
    tuner = Tuner(model, Path(tmp) / "preset.onnx", TuneOptions(eval_data=test, data=calib, max_drop=max_drop))
    tuner.runner = Runner(1, None, tuner.setup())
    tuner.options.objective = "size"  # build and judge only: the presets are timed below, together
    records = tuner.run_batch(QUANT + PRUNE)
    return tuner, records, time.perf_counter() - start


def outputs(path, x):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def compare_models(name, model, calib, test, args, tmp):
    from onnxcomp.recipe import read_recipe, run_recipe
    from onnxcomp.search import time_candidates

    tuner, presets, preset_seconds = build_presets(model, calib, test, args.max_drop, tmp)
    start = time.perf_counter()
    result = tune(model, Path(tmp) / f"{name}.tuned.onnx",
                  TuneOptions(eval_data=test, data=calib, max_drop=args.max_drop, trials=args.trials, seed=0))
    tune_seconds = time.perf_counter() - start
    # The recipe rebuilds the tuned model with identical outputs.
    recipe = read_recipe(result.recipe)
    recipe.output = Path(tmp) / f"{name}.rebuilt.onnx"
    run_recipe(recipe)
    x = np.load(test)[list(np.load(test).keys())[0]][:64]
    identical = all(np.array_equal(a, b) for a, b in zip(outputs(result.output, x), outputs(recipe.output, x)))
    # Side by side: the passing presets and the tuned model, one interleaved timing.
    passing = {f"p{r['trial']}": r for r in presets if r.get("passed")}
    models = {n: r["path"] for n, r in passing.items()}
    models["tuned"] = str(result.output)
    timings = time_candidates(model, models, data=tuner.timing_data(), min_rounds=8, max_rounds=16)
    rows = []
    for lever, configs in (("quantize preset", QUANT), ("prune preset", PRUNE)):
        mine = [n for n, r in passing.items() if r["config"] in configs]
        if not mine:
            rows.append((f"{name} {lever}", None, None, None, len(configs), None))
            continue
        best = min(mine, key=lambda n: timings[n].ratio)
        rows.append((f"{name} {lever}", passing[best]["name"], timings[best], passing[best], len(configs), preset_seconds))
    best = result.best
    rows.append((f"{name} tune ({result.search})", best["name"], timings["tuned"], best, len(result.trials), tune_seconds))
    fastest_preset = min((r[2].ratio for r in rows[:2] if r[2] is not None), default=None)
    verdict = {
        "tuned_ratio": timings["tuned"].ratio,
        "tuned_interval": [timings["tuned"].low, timings["tuned"].high],
        "best_preset_ratio": fastest_preset,
        "at_least_as_fast": fastest_preset is None or timings["tuned"].low <= fastest_preset,
        "recipe_rebuilds_identical": identical,
        "load": load(),
    }
    return rows, verdict


def row(what, name, timing, record, trials, seconds):
    if name is None:
        return f"| {what} | none within budget | - | {trials} | - |"
    return (f"| {what} | {name} | {timing.ratio:.2f}x [{timing.low:.2f}, {timing.high:.2f}], metric {record['metric']:.4f} "
            f"(drop {record['drop']:.4f}) | {trials} | {seconds:.0f} s |")


def throughput(args, tmp):
    model, calib, test = (str(MODELS / f) for f in CASES["digits_cnn"])
    runs = [("1 worker", {"workers": 1}), ("2 workers (pool)", {"workers": 2})]
    try:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        runs.append(("Ray, 2 actors", {"workers": 2, "ray": "auto"}))
    except ImportError:
        ray = None
    lines = ["| runner | repeat | load (1/5/15 min) | trials | wall | start-up | trials/min | builds/min after start-up "
             "| worker CPU s per trial | timing s | main-process CPU s (serial) | 2 free cores would give |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    sequences, chosen, per = {}, {}, {}
    for rep in range(args.repeats):
        for label, kw in runs:
            before = load()
            start = time.perf_counter()
            result = tune(model, Path(tmp) / f"tp{rep}{len(lines)}.onnx", TuneOptions(
                eval_data=test, data=calib, trials=args.throughput_trials, levers=["prune"], seed=0, **kw))
            wall = time.perf_counter() - start
            probes = result.group_sensitivity + result.sensitivity
            builds = len(result.trials) + len(probes)
            cpu = sum(t.get("cpu_seconds") or 0 for t in result.trials)
            # Amdahl on CPU seconds: the builds (trials and probes) run on the workers, the
            # timing in the main process while they wait: the speed-up 2 free cores would give.
            parallel = cpu + sum(p.get("cpu_seconds") or 0 for p in probes)
            serial = result.main_cpu_seconds - (parallel if kw["workers"] == 1 else 0)
            projected = (parallel + serial) / (parallel / 2 + serial)
            steady = builds / max(1e-9, wall - result.startup_seconds) * 60
            per.setdefault(label, []).append((60 * len(result.trials) / wall, steady, cpu / len(result.trials), projected))
            lines.append(f"| {label} | {rep + 1} | {before} | {len(result.trials)} | {wall:.0f} s | {result.startup_seconds:.0f} s | "
                         f"{60 * len(result.trials) / wall:.1f} | {steady:.1f} | {cpu / len(result.trials):.2f} | "
                         f"{result.timing_seconds:.1f} | {serial:.1f} | {projected:.2f}x |")
            sequences.setdefault(label, []).append([t["name"] for t in result.trials])
            chosen.setdefault(label, []).append(result.best["name"])
            print(lines[-1], flush=True)
    if ray is not None:
        ray.shutdown()
    summary = {label: {"trials_per_min": round(float(np.median([v[0] for v in vals])), 1),
                       "builds_per_min_after_startup": round(float(np.median([v[1] for v in vals])), 1),
                       "cpu_s_per_trial": round(float(np.median([v[2] for v in vals])), 2),
                       "projected_2_core_speedup": round(float(np.median([v[3] for v in vals])), 2)}
               for label, vals in per.items()}
    distinct = sorted({json.dumps(s) for seqs in sequences.values() for s in seqs})
    if len(distinct) > 1:  # where they part (timing noise told to the optimiser, see README)
        first = json.loads(distinct[0])
        for other in map(json.loads, distinct[1:]):
            at = next((i for i, (a, b) in enumerate(zip(first, other)) if a != b), None)
            print(f"sequences part at trial {at}: {first[at:]} vs {other[at:]}")
    return lines, summary, len(distinct) == 1, chosen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--max-drop", type=float, default=0.01)
    parser.add_argument("--throughput-trials", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models", default=",".join(CASES))
    parser.add_argument("--skip", default="", help="comma-separated: presets, throughput")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"cores: {os.cpu_count()}, load before: {load()}", flush=True)
    skip = set(args.skip.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        if "presets" not in skip:
            lines = ["| model / method | best within the budget | latency x fp32 [95 % interval], metric | trials | wall |",
                     "|---|---|---|---|---|"]
            for name in args.models.split(","):
                model, calib, test = (str(MODELS / f) for f in CASES[name])
                rows, verdict = compare_models(name, model, calib, test, args, tmp)
                lines += [row(*r) for r in rows]
                print("\n".join(lines[-3:]), flush=True)
                print(f"{name}: {json.dumps(verdict)}", flush=True)
            print("\n".join(lines))
        if "throughput" not in skip:
            lines, summary, same, chosen = throughput(args, tmp)
            print()
            print("\n".join(lines))
            print("medians:", json.dumps(summary))
            print("same trial sequence for the same seed (every runner, every repeat):", same)
            print("chosen:", json.dumps(chosen))


if __name__ == "__main__":
    main()
