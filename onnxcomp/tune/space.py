"""The search space of ``onnxcomp tune``: a trial is a whole-model configuration, written as a
recipe (a list of steps the pass registry knows), so every trial can be replayed by
``onnxcomp run``.

A configuration is a flat dict of choices (what optuna's TPE and the random search draw)::

    {"prune": "none" | "structured" | "unstructured", "ratio": 0.1..0.5,
     "quantize": "none" | "static" | "dynamic", "calibration": "minmax" | ...,
     "keep_float": k}   # the k most sensitive quantizable layers left float

Every recipe starts with ``optimize`` (deterministic: no timing in it), and ``quantize`` then
runs with ``optimize: false`` so that the recipe rebuilds the very same model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

PRUNE = ("none", "structured", "unstructured")
RATIOS = (0.1, 0.2, 0.3, 0.5)
QUANTIZE = ("none", "static", "dynamic")
CALIBRATIONS = ("minmax", "percentile", "entropy")
MAX_KEEP_FLOAT = 4


@dataclasses.dataclass
class Space:
    """What may be chosen, narrowed by the command's options and the model."""

    prune: tuple[str, ...] = PRUNE
    ratios: tuple[float, ...] = RATIOS
    quantize: tuple[str, ...] = QUANTIZE
    calibrations: tuple[str, ...] = CALIBRATIONS
    layers: list[str] = dataclasses.field(default_factory=list)  # most sensitive first
    max_keep_float: int = MAX_KEEP_FLOAT

    @property
    def keep_float_choices(self) -> list[int]:
        top = min(self.max_keep_float, max(0, len(self.layers) - 1))
        return list(range(top + 1))

    def choices(self) -> dict[str, list[Any]]:
        """Every key with its choices (categorical: TPE and random search draw the same way)."""
        return {
            "prune": list(self.prune),
            "ratio": list(self.ratios),
            "quantize": list(self.quantize),
            "calibration": list(self.calibrations),
            "keep_float": self.keep_float_choices,
        }

    def canonical(self, config: dict[str, Any]) -> dict[str, Any]:
        """The configuration with choices that do not matter fixed (so duplicates are seen)."""
        c = dict(config)
        if c["prune"] == "none":
            c["ratio"] = 0.0
        if c["quantize"] != "static":
            c["calibration"] = None
        if c["quantize"] == "none":
            c["keep_float"] = 0
        c["keep_float"] = min(int(c.get("keep_float") or 0), max(self.keep_float_choices))
        return c

    def greedy(self, tried: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """The next greedy seeds, given the trials so far (``tried``: canonical key -> record):
        each lever alone (every quantize mode, the cleaned-up graph, structured ratios from
        small to large, stopping at the first that misses the budget), then the largest passing
        ratio combined with the fastest passing quantize mode, then static with the most
        sensitive layer float if static missed. [] when the seed is done."""
        import json

        def rec(config):
            return tried.get(json.dumps(self.canonical(config), sort_keys=True))

        base = {"prune": "none", "ratio": 0.0, "quantize": "none", "calibration": None, "keep_float": 0}
        alone = [
            {**base, "quantize": q, "calibration": "minmax"} for q in self.quantize if q != "none"
        ]
        if "none" in self.quantize:
            alone.append(dict(base))
        for config in alone:
            if config["prune"] in self.prune and config["quantize"] in self.quantize and rec(config) is None:
                return [self.canonical(config)]
        best_ratio = None
        if "structured" in self.prune:
            q0 = "none" if "none" in self.quantize else self.quantize[0]
            for r in self.ratios:
                config = {**base, "prune": "structured", "ratio": r, "quantize": q0, "calibration": "minmax"}
                record = rec(config)
                if record is None:
                    return [self.canonical(config)]
                if not record.get("passed"):
                    break
                best_ratio = r
        quant = [rec(c) for c in alone if c["quantize"] != "none"]
        quant = [r for r in quant if r and r.get("passed") and r.get("latency_ratio") is not None]
        if best_ratio is not None and quant and "none" in self.quantize:
            fastest = min(quant, key=lambda r: r["latency_ratio"])
            config = {**fastest["config"], "prune": "structured", "ratio": best_ratio}
            if rec(config) is None:
                return [self.canonical(config)]
        static = rec({**base, "quantize": "static", "calibration": "minmax"}) if "static" in self.quantize else None
        if static is not None and not static.get("passed") and self.keep_float_choices[-1] > 0:
            config = {**base, "quantize": "static", "calibration": "minmax", "keep_float": 1}
            if rec(config) is None:
                return [self.canonical(config)]
        return []


def steps(config: dict[str, Any], layers: list[str], seed: int = 0) -> list[dict[str, Any]]:
    """The recipe steps of a configuration (``layers``: most sensitive first)."""
    out: list[dict[str, Any]] = [{"pass": "optimize"}]
    if config["prune"] == "structured":
        out.append({"pass": "prune", "structured": True, "sparsity": config["ratio"], "optimize": False, "seed": seed})
    elif config["prune"] == "unstructured":
        out.append({"pass": "prune", "sparsity": config["ratio"], "optimize": False, "seed": seed})
    if config["quantize"] != "none":
        step: dict[str, Any] = {"pass": "quantize", "mode": config["quantize"], "optimize": False}
        if config["quantize"] == "static":
            step["calibration"] = config["calibration"]
        keep = layers[: int(config.get("keep_float") or 0)]
        if keep:
            step["exclude_nodes"] = list(keep)
        out.append(step)
    return out


def label(config: dict[str, Any]) -> str:
    """A short name: ``struct0.2+static-minmax-f1``."""
    parts = []
    if config["prune"] == "structured":
        parts.append(f"struct{config['ratio']:g}")
    elif config["prune"] == "unstructured":
        parts.append(f"sparse{config['ratio']:g}")
    if config["quantize"] == "static":
        parts.append(f"static-{config['calibration']}")
    elif config["quantize"] == "dynamic":
        parts.append("dynamic")
    if config.get("keep_float"):
        parts[-1] += f"-f{config['keep_float']}"
    return "+".join(parts) or "optimized"
