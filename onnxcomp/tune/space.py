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

    def greedy(self) -> list[dict[str, Any]]:
        """The seed: the cheap, usually good configurations first, then each lever alone."""
        seeds = []
        for q in self.quantize:
            if q != "none":
                seeds.append({"prune": "none", "ratio": 0.0, "quantize": q, "calibration": "minmax", "keep_float": 0})
        seeds.append({"prune": "none", "ratio": 0.0, "quantize": "none", "calibration": None, "keep_float": 0})
        if "structured" in self.prune:
            for r in self.ratios[:2]:
                seeds.append({"prune": "structured", "ratio": r, "quantize": "none", "calibration": None, "keep_float": 0})
        if "static" in self.quantize and self.keep_float_choices[-1] > 0:
            seeds.append({"prune": "none", "ratio": 0.0, "quantize": "static", "calibration": "minmax", "keep_float": 1})
        return [self.canonical(s) for s in seeds if s["prune"] in self.prune and s["quantize"] in self.quantize]


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
