"""onnxcomp tune beside the best fixed preset of quantize and of prune, and trial throughput.

    python benchmarks/bench_tune.py [--trials 10] [--max-drop 0.01] [--repeats 2]

Per model: every fixed preset (quantize static minmax/entropy, dynamic; prune structured
10/20/30/50 %, unstructured 50 %) built and judged the way tune builds a trial (same recipe
runner, same judge), then `tune` with --trials and the same --max-drop. The passing presets and
the tuned model are then timed side by side in one interleaved run (ratios to fp32 from
separate runs drift with the load of this shared machine), and the tuned model's recipe is run
again with `onnxcomp run` and its outputs compared with the tuned model's.

Throughput: the same seeded prune-only tune of the digits CNN (--objective latency) with 1 and
2 local workers and with Ray (2 CPUs, started once), interleaved (one of each per repeat);
`uptime` before each. Reported: trials per minute of the whole search INCLUDING the workers'
start-up, builds (trials and sensitivity probes) per minute AFTER start-up (wall minus
start-up), the share of that time the workers were busy, CPU seconds per trial, and whether
every run gave the same trial sequence, chosen trial and output model.

Timing check (unless --skip timing): four of the built models timed against fp32 serially in
this process (no worker running), then at the same time in two pool workers pinned to a core
each (as tune times trials), then the same unpinned: ratios and 95 % intervals side by side.

    python benchmarks/bench_tune.py --skip presets --throughput-trials 24 --repeats 3
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


def _burn(seconds, queue):
    start, end = time.process_time(), time.time() + seconds
    while time.time() < end:
        pass
    queue.put(time.process_time() - start)


def obtainable_cores(seconds=3.0):
    """CPU seconds per wall second this session gets with 1 and with 2 busy processes: on a
    shared machine that groups processes by session (sched_autogroup) two processes may get no
    more than one, and no number of workers can then be faster."""
    import multiprocessing

    out = {}
    context = multiprocessing.get_context("spawn")
    for n in (1, 2):
        queue = context.Queue()
        procs = [context.Process(target=_burn, args=(seconds, queue)) for _ in range(n)]
        for p in procs:
            p.start()
        got = sum(queue.get() for _ in procs)
        for p in procs:
            p.join()
        out[n] = round(got / seconds, 2)
    return out


def busy_share(result, workers):
    """The share of the time after start-up the workers spent on builds (trials and probes)."""
    spans = [(t["started_at"], t["ended_at"]) for t in result.trials if t.get("started_at")]
    spans += [(p["started_at"], p["ended_at"]) for p in result.group_sensitivity + result.sensitivity if p.get("started_at")]
    if not spans:
        return None
    first, last = min(a for a, _ in spans), max(b for _, b in spans)
    return sum(b - a for a, b in spans) / (workers * max(1e-9, last - first))


def throughput(args, tmp):
    """1 worker, 2 pool workers and 2 Ray actors, interleaved (one of each per repeat), the
    same seeded search each time (prune-only digits CNN, --objective latency)."""
    import hashlib

    model, calib, test = (str(MODELS / f) for f in CASES["digits_cnn"])
    runs = [("1 worker", {"workers": 1}), ("2 workers (pool)", {"workers": 2})]
    try:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        runs.append(("Ray, 2 actors", {"workers": 2, "ray": "auto"}))
    except ImportError:
        ray = None
    lines = ["| runner | repeat | load (1/5/15 min) | trials + probes | wall | start-up | trials/min incl. start-up "
             "| builds/min after start-up | workers busy | worker CPU s per trial | main-process CPU s besides builds | sequence | chosen |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    per, outcome, last = {}, {}, None
    workers = {label: kw["workers"] for label, kw in runs}
    cores = []
    for rep in range(args.repeats):
        cores.append(obtainable_cores())
        print(f"repeat {rep + 1}: cores this session obtains with 1 / 2 busy processes: {cores[-1][1]} / {cores[-1][2]}", flush=True)
        for label, kw in runs:
            before = load()
            start = time.perf_counter()
            result = tune(model, Path(tmp) / f"tp{rep}{len(lines)}.onnx", TuneOptions(
                eval_data=test, data=calib, trials=args.throughput_trials, levers=["prune"], seed=0, **kw))
            wall = time.perf_counter() - start
            probes = result.group_sensitivity + result.sensitivity
            builds = len(result.trials) + len(probes)
            cpu = sum(t.get("cpu_seconds") or 0 for t in result.trials)
            here = os.getpid()  # this process is worker 0: its own builds are not the serial part
            serial = result.main_cpu_seconds - sum(t.get("cpu_seconds") or 0 for t in result.trials + probes
                                                   if t.get("worker") == here)
            whole = 60 * len(result.trials) / wall
            steady = 60 * builds / max(1e-9, wall - result.startup_seconds)
            busy = busy_share(result, kw["workers"])
            sequence = hashlib.sha256(json.dumps([t["name"] for t in result.trials]).encode()).hexdigest()[:8]
            chosen = result.best["name"]
            output = hashlib.sha256(Path(result.output).read_bytes()).hexdigest()[:8]
            per.setdefault(label, []).append((whole, steady, busy))
            outcome.setdefault(label, []).append((sequence, chosen, output))
            lines.append(f"| {label} | {rep + 1} | {before} | {len(result.trials)} + {len(probes)} | {wall:.1f} s | "
                         f"{result.startup_seconds:.1f} s | {whole:.1f} | {steady:.1f} | {busy:.0%} | "
                         f"{cpu / len(result.trials):.2f} | {serial:.1f} | {sequence} | {chosen} ({output}) |")
            print(lines[-1], flush=True)
            if kw["workers"] == 1:
                last = result
    if ray is not None:
        ray.shutdown()
    summary = {label: {"trials_per_min_incl_startup": round(float(np.median([v[0] for v in vals])), 1),
                       "builds_per_min_after_startup": round(float(np.median([v[1] for v in vals])), 1),
                       "workers_busy": round(float(np.median([v[2] for v in vals])), 2)}
               for label, vals in per.items()}
    summary["cores obtained with 1 / 2 busy processes"] = cores
    one = summary["1 worker"]
    for label, row in summary.items():
        if label not in per:
            continue
        # the after-start-up speed-up 2 free cores would give: workers x busy share (the work
        # per build does not grow with the workers: see the CPU s per trial column)
        row["projected_on_free_cores"] = round(workers[label] * row["workers_busy"] / one["workers_busy"], 2)
        row["speedup_incl_startup"] = round(row["trials_per_min_incl_startup"] / one["trials_per_min_incl_startup"], 2)
        row["speedup_after_startup"] = round(row["builds_per_min_after_startup"] / one["builds_per_min_after_startup"], 2)
    same = len({o for outs in outcome.values() for o in outs}) == 1
    return lines, summary, same, outcome, last


def timing_check(result, rounds):
    """The same models timed (a) serially in this process while no worker runs, (b) at the same
    time in two pool workers each pinned to a core of its own (what tune does), and (c) at the
    same time unpinned: each one's ratio to fp32 (interleaved rounds) with its 95 % interval."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from onnxcomp.data import open_data
    from onnxcomp.model import input_specs
    from onnxcomp.model import load as load_model
    from onnxcomp.search import Timer
    from onnxcomp.tune import worker as worker_mod

    model, _, test = (str(MODELS / f) for f in CASES["digits_cnn"])
    passing = sorted({t["macs"]: t for t in result.trials if t.get("passed") and t.get("macs")}.values(),
                     key=lambda t: t["macs"])
    picked = [passing[i * (len(passing) - 1) // 3] for i in range(4)] if len(passing) >= 4 else passing
    models = {f"t{t['trial']}": t["path"] for t in picked}
    source = open_data(test, input_specs(load_model(model)))
    before = load()
    with worker_mod.pinned(worker_mod.core_for(0, 1)):
        timer = Timer(model, models, data=source, threads=1)
        timer.run(rounds)
        serial = {n: [t.ratio, t.low, t.high] for n, t in timer.timings().items() if n != "float"}
    setup = {"reference": model, "eval_data": test, "metric": "auto", "max_drop": 0.01, "limit": 300,
             "threads": 1, "workers": 2}
    out = {"serial (workers idle)": [serial]}
    for label, pin in (("2 at once, pinned", True), ("2 at once, unpinned", False)):
        context = multiprocessing.get_context("spawn")
        slots = None
        if pin:
            slots = context.Queue()
            for i in range(2):
                slots.put(i)
        with ProcessPoolExecutor(2, mp_context=context, initializer=worker_mod.start_process,
                                 initargs=(setup, slots)) as pool:
            pids = set()
            while len(pids) < 2:  # both processes set up
                pids |= {f.result()["pid"] for f in [pool.submit(worker_mod.ping) for _ in range(2)]}
                time.sleep(0.1)
            at = time.time() + 2
            results = [f.result() for f in [pool.submit(worker_mod.time_models, {"models": models, "rounds": rounds, "at": at})
                                            for _ in range(2)]]
        overlap = min(r["ended"] for r in results) - max(r["started"] for r in results)
        assert len({r["pid"] for r in results}) == 2, "one process took both timings"
        out[f"{label} (cores {[r['core'] for r in results]}, overlap {overlap:.1f} s)"] = [r["ratios"] for r in results]
    lines = ["| model | MACs | " + " | ".join(out) + " |", "|---|---|" + "---|" * len(out)]
    for t in picked:
        n = f"t{t['trial']}"
        cells = ["; ".join(f"{r[n][0]:.3f} [{r[n][1]:.3f}, {r[n][2]:.3f}]" for r in runs) for runs in out.values()]
        lines.append(f"| {n} {t['name']} | {t['macs'] / 1e6:.2f} M | " + " | ".join(cells) + " |")
    spread = {label: round(max(abs(r[n][0] - serial[n][0]) / serial[n][0] for r in runs for n in serial), 3)
              for label, runs in out.items() if not label.startswith("serial")}
    return lines, spread, before


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--max-drop", type=float, default=0.01)
    parser.add_argument("--throughput-trials", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models", default=",".join(CASES))
    parser.add_argument("--timing-rounds", type=int, default=40)
    parser.add_argument("--skip", default="", help="comma-separated: presets, throughput, timing")
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
            lines, summary, same, outcome, last = throughput(args, tmp)
            print()
            print("Throughput: trials/min over the whole search INCLUDING the workers' start-up, and builds")
            print("(trials + sensitivity probes) per minute AFTER start-up (wall minus start-up).")
            print("\n".join(lines))
            print("medians and speed-ups over 1 worker:", json.dumps(summary))
            print("same trial sequence, chosen trial and output model for the same seed (every runner, every repeat):", same)
            if not same:
                print(json.dumps(outcome))
            if "timing" not in skip and last is not None:
                lines, spread, before = timing_check(last, args.timing_rounds)
                print()
                print(f"Timing the same models serially vs two at once ({args.timing_rounds} interleaved rounds, load {before}):")
                print("\n".join(lines))
                print("largest relative difference of a ratio from the serial one:", json.dumps(spread))


if __name__ == "__main__":
    main()
