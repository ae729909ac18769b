"""The search space of ``onnxcomp tune``: a trial is a whole-model configuration, written as a
recipe (a list of steps the pass registry knows), so every trial can be replayed by
``onnxcomp run``.

A configuration is a flat dict of choices (what optuna's TPE and the random search draw)::

    {"prune": "none" | "structured" | "unstructured", "ratio": 0.1..0.5,
     "group0": 0 | 0.5 | 1 | 1.5, ...   # structured: the i-th most sensitive group's ratio
                                         # is the global ratio times this (0 = spared)
     "quantize": "none" | "static" | "dynamic", "calibration": "minmax" | ...,
     "keep_float": k,                    # the k most sensitive quantizable layers left float
     "cut": "auto" | tensor, "head": "linear" | "mlp", "hidden": 64..256}  # transfer fit only

Every recipe starts with ``optimize`` (deterministic: no timing in it) -- after ``transfer_fit``
for a transfer task -- and ``prune`` and ``quantize`` then run with ``optimize: false`` so that
the recipe rebuilds the very same model.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

PRUNE = ("none", "structured", "unstructured")
RATIOS = (0.1, 0.2, 0.3, 0.5)
QUANTIZE = ("none", "static", "dynamic")
CALIBRATIONS = ("minmax", "percentile", "entropy")
MAX_KEEP_FLOAT = 4
GROUP_SCALES = (0.0, 0.5, 1.0, 1.5)  # a group's ratio = the global ratio x this
MAX_GROUP_KEYS = 4  # the most sensitive groups get a key each; the others follow the global ratio
MAX_GROUP_RATIO = 0.8
HEADS = ("linear", "mlp")
HIDDEN = (64, 128, 256)
MAX_CUTS = 3  # transfer: the best candidate cuts the search may choose (beside "auto")


def key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)


@dataclasses.dataclass
class Space:
    """What may be chosen, narrowed by the command's options and the model."""

    prune: tuple[str, ...] = PRUNE
    ratios: tuple[float, ...] = RATIOS
    quantize: tuple[str, ...] = QUANTIZE
    calibrations: tuple[str, ...] = CALIBRATIONS
    layers: list[str] = dataclasses.field(default_factory=list)  # most sensitive first
    groups: list[str] = dataclasses.field(default_factory=list)  # structured groups, most sensitive first
    cuts: list[str] = dataclasses.field(default_factory=list)  # transfer: "auto" and candidate cuts
    max_keep_float: int = MAX_KEEP_FLOAT

    @property
    def keep_float_choices(self) -> list[int]:
        top = min(self.max_keep_float, max(0, len(self.layers) - 1))
        return list(range(top + 1))

    @property
    def group_keys(self) -> list[str]:
        if "structured" not in self.prune:
            return []
        return [f"group{i}" for i in range(min(MAX_GROUP_KEYS, len(self.groups)))]

    def choices(self) -> dict[str, list[Any]]:
        """Every key with its choices (categorical: TPE and random search draw the same way)."""
        out: dict[str, list[Any]] = {
            "prune": list(self.prune),
            "ratio": list(self.ratios),
            "quantize": list(self.quantize),
            "calibration": list(self.calibrations),
            "keep_float": self.keep_float_choices,
        }
        for k in self.group_keys:
            out[k] = list(GROUP_SCALES)
        if self.cuts:
            out.update(cut=list(self.cuts), head=list(HEADS), hidden=list(HIDDEN))
        return out

    def base(self) -> dict[str, Any]:
        """The configuration that compresses nothing (the cleaned-up graph)."""
        out: dict[str, Any] = {"prune": "none", "ratio": 0.0, "quantize": "none", "calibration": None, "keep_float": 0}
        if self.cuts:
            out.update(cut=self.cuts[0], head="linear", hidden=None)
        return out

    def canonical(self, config: dict[str, Any]) -> dict[str, Any]:
        """The configuration with choices that do not matter fixed (so duplicates are seen)."""
        c = {**self.base(), **{k: v for k, v in config.items() if not k.startswith("group")}}
        for k in self.group_keys:
            c[k] = float(config.get(k, 1.0)) if c["prune"] == "structured" else 1.0
        if c["prune"] == "none":
            c["ratio"] = 0.0
        if c["quantize"] != "static":
            c["calibration"] = None
        if c["quantize"] == "none":
            c["keep_float"] = 0
        c["keep_float"] = min(int(c.get("keep_float") or 0), max(self.keep_float_choices))
        if self.cuts and c["head"] != "mlp":
            c["hidden"] = None
        return c

    def group_ratios(self, config: dict[str, Any]) -> dict[str, float]:
        """The structured groups whose ratio is not the global one: name -> ratio."""
        out = {}
        for i, k in enumerate(self.group_keys):
            scale = float(config.get(k, 1.0))
            if scale != 1.0:
                out[self.groups[i]] = round(min(MAX_GROUP_RATIO, config["ratio"] * scale), 4)
        return out

    def greedy(self, tried: dict[str, dict[str, Any]], queued: set[str] | frozenset = frozenset()) -> list[dict[str, Any]]:
        """Every greedy seed that can be proposed now, given the trials so far (``tried``:
        canonical key -> record; ``queued``: keys of trials proposed but not done yet, never
        proposed again). It depends on which trials passed the budget and on nothing timed, so
        the same seed proposes the same trials whatever the number of workers:

        1. each lever alone: every quantize mode, the cleaned-up graph (or, when pruning is
           applied in every trial, unstructured at the largest ratio), the smallest structured
           ratio (and, for a transfer task, each candidate cut);
        2. the larger structured ratios up to the first that misses the budget;
        3. the largest passing ratio with each passing quantize mode; static with the most
           sensitive layer float when static missed;
        4. per group: the first ratio that missed, with the most sensitive group spared or
           halved (or, when every ratio passed, the largest with the least sensitive group cut
           harder)."""
        out: list[dict[str, Any]] = []

        def rec(config):
            return tried.get(key(self.canonical(config)))

        def want(config):
            c = self.canonical(config)
            if (c["prune"] in self.prune and c["quantize"] in self.quantize and rec(c) is None
                    and key(c) not in queued and c not in out):
                out.append(c)

        base = self.base()
        alone = [{**base, "quantize": q, "calibration": "minmax"} for q in self.quantize if q != "none"]
        for config in alone:
            want(config)
        want(base)
        q0 = "none" if "none" in self.quantize else self.quantize[0]
        p0 = "none" if "none" in self.prune else self.prune[0]
        for cut in self.cuts[1:]:
            want({**base, "cut": cut, "quantize": q0, "calibration": "minmax", "prune": p0, "ratio": self.ratios[0]})
        if "unstructured" in self.prune and "none" not in self.prune:  # prune is applied in every trial
            want({**base, "prune": "unstructured", "ratio": self.ratios[-1], "quantize": q0, "calibration": "minmax"})
        best_ratio, first_fail, pending = None, None, False
        if "structured" in self.prune:
            structured = {**base, "prune": "structured", "quantize": q0, "calibration": "minmax"}
            want({**structured, "ratio": self.ratios[0]})
            for r in self.ratios:
                record = rec({**structured, "ratio": r})
                if record is None:
                    pending = True
                    if best_ratio is not None or r == self.ratios[0]:
                        want({**structured, "ratio": r})  # above the largest passing one
                elif not record.get("passed"):
                    first_fail = r
                    break
                else:
                    best_ratio = r
            if pending and best_ratio is None:
                return out
        quant = [rec(c) for c in alone]
        if "static" in self.quantize and not pending:
            static = rec({**base, "quantize": "static", "calibration": "minmax"})
            if static is not None and not static.get("passed") and self.keep_float_choices[-1] > 0:
                want({**base, "quantize": "static", "calibration": "minmax", "keep_float": 1})
        if best_ratio is not None and not pending and "none" in self.quantize:
            for record in quant:
                if record is not None and record.get("passed"):
                    want({**record["config"], "prune": "structured", "ratio": best_ratio})
        if self.group_keys and not pending:
            structured = {**base, "prune": "structured", "quantize": q0, "calibration": "minmax"}
            if first_fail is not None:
                want({**structured, "ratio": first_fail, "group0": 0.0})
                want({**structured, "ratio": first_fail, "group0": 0.5})
            elif best_ratio is not None:
                want({**structured, "ratio": best_ratio, self.group_keys[-1]: 1.5})
        return out


def kernels(config: dict[str, Any]) -> tuple:
    """What decides which kernels run: quantize mode, layers left float, head. A trial's MACs
    and size compare only within the same kernels (its "kernel class")."""
    return (config.get("quantize"), int(config.get("keep_float") or 0), config.get("head"), config.get("hidden"))


def dominated(record: dict[str, Any], others: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A passing trial with the same kernels, no more MACs and no larger file (the earlier one
    on a tie): ``record`` cannot be faster, so it needs no timing."""
    if record.get("macs") is None:
        return None
    for o in others:
        if o is record or o.get("trial") == record.get("trial") or not o.get("passed") or o.get("macs") is None or "error" in o:
            continue
        if kernels(o["config"]) != kernels(record["config"]):
            continue
        if o["macs"] <= record["macs"] and o["size_bytes"] <= record["size_bytes"]:
            if o["macs"] < record["macs"] or o["size_bytes"] < record["size_bytes"] or o["trial"] < record["trial"]:
                return o
    return None


def steps(config: dict[str, Any], space: Space, seed: int = 0) -> list[dict[str, Any]]:
    """The recipe steps of a configuration."""
    out: list[dict[str, Any]] = []
    if space.cuts:
        fit: dict[str, Any] = {"pass": "transfer_fit", "head": config["head"], "seed": seed}
        if config["cut"] != "auto":
            fit["at"] = config["cut"]
        if config["head"] == "mlp":
            fit["hidden"] = int(config["hidden"])
        out.append(fit)
    out.append({"pass": "optimize"})
    if config["prune"] == "structured":
        step = {"pass": "prune", "structured": True, "sparsity": config["ratio"], "optimize": False, "seed": seed}
        ratios = space.group_ratios(config)
        if ratios:
            step["group_ratios"] = ratios
        out.append(step)
    elif config["prune"] == "unstructured":
        out.append({"pass": "prune", "sparsity": config["ratio"], "optimize": False, "seed": seed})
    if config["quantize"] != "none":
        step = {"pass": "quantize", "mode": config["quantize"], "optimize": False}
        if config["quantize"] == "static":
            step["calibration"] = config["calibration"]
        keep = space.layers[: int(config.get("keep_float") or 0)]
        if keep:
            step["exclude_nodes"] = list(keep)
        out.append(step)
    return out


def label(config: dict[str, Any]) -> str:
    """A short name: ``struct0.2[g0x0.5]+static-minmax-f1``."""
    parts = []
    if config.get("cut") not in (None, "auto") or config.get("head") == "mlp":
        head = f"mlp{config['hidden']}" if config.get("head") == "mlp" else "linear"
        parts.append(f"{head}@{config.get('cut')}")
    if config["prune"] == "structured":
        scaled = "".join(
            f"[g{k[5:]}x{v:g}]" for k, v in sorted(config.items()) if k.startswith("group") and v != 1.0
        )
        parts.append(f"struct{config['ratio']:g}{scaled}")
    elif config["prune"] == "unstructured":
        parts.append(f"sparse{config['ratio']:g}")
    if config["quantize"] == "static":
        parts.append(f"static-{config['calibration']}")
    elif config["quantize"] == "dynamic":
        parts.append("dynamic")
    if config.get("keep_float"):
        parts[-1] += f"-f{config['keep_float']}"
    return "+".join(parts) or "optimized"
