"""The optimize pass: apply the clean-up rules round by round, then check the result.

Each round plans first (every rule looks at every node, matches that overlap an earlier match
wait for the next round) and then rewrites all planned matches. Rounds repeat until nothing
matches. Where a fused op needs a newer opset the model is upgraded once, with onnx's version
converter; where that fails, the matches are skipped with the converter's message.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import onnx_ir as ir

from onnxcomp import model as model_io
from onnxcomp.errors import OnnxcompError
from onnxcomp.graph import NameSource, annotated_values, drop_unused, strip_inferred_shapes
from onnxcomp.graph import label as _node_label
from onnxcomp.optimize import rules as rules_mod
from onnxcomp.optimize.check import Fault, Judge, check_data, find_fault
from onnxcomp.optimize.rules import NO_UPGRADE, Match, Rule
from onnxcomp.passes import Result

logger = logging.getLogger(__name__)

MAX_SKIPS_LISTED = 20
# At most this many rewrite instances are left out before the whole clean-up is.
MAX_LEFT_OUT = 8


@dataclasses.dataclass
class OptimizeOptions:
    """Options of the optimize pass (recipe keys; CLI flags of the same names)."""

    rules: list[str] | None = None  # run only these rules (default: every rule on by default)
    skip: list[str] = dataclasses.field(default_factory=list)  # rules not to run
    tolerance: float = 1e-4  # max relative output error of the self-check
    self_check: bool = True
    samples: int = 4  # random samples for the self-check when no data is given
    check_samples: int = 64  # at most this many samples of the given data in the self-check
    shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    upgrade_opset: bool = True
    fold_limit_bytes: int = 1 << 20
    max_rounds: int = 20

    def check(self, where: str) -> None:
        known = rules_mod.RULE_NAMES
        for name in [*(self.rules or []), *self.skip]:
            if name not in known:
                raise OnnxcompError(f"{where}: unknown rule {name!r} (rules: {', '.join(known)})")
        if not self.tolerance > 0:
            raise OnnxcompError(f"{where}: tolerance must be positive, got {self.tolerance}")
        if min(self.samples, self.check_samples, self.max_rounds) < 1 or self.fold_limit_bytes < 0:
            raise OnnxcompError(
                f"{where}: samples, check_samples and max_rounds must be at least 1"
            )

    def selected_rules(self) -> list[Rule]:
        chosen = []
        for rule in rules_mod.all_rules(self.fold_limit_bytes):
            wanted = rule.name in self.rules if self.rules is not None else rule.default
            if wanted and rule.name not in self.skip:
                chosen.append(rule)
        return chosen


# A rewrite instance, stable when the rules are applied again to the same input:
# (rule, anchor node name, anchor's first output name).
InstanceKey = tuple[str, str, str]


def instance_key(rule: Rule, node: ir.Node) -> InstanceKey:
    return rule.name, node.name or "", (node.outputs[0].name or "") if node.outputs else ""


@dataclasses.dataclass
class RuleLog:
    """What the rules did: applications in order, the last reason each near-miss gave."""

    applied: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (rule, node)
    keys: list[InstanceKey] = dataclasses.field(default_factory=list)  # one per applied entry
    skipped: dict[tuple[str, str], str] = dataclasses.field(default_factory=dict)
    opset_before: int = 0
    opset_after: int = 0
    rounds: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)

    def by_rule(self, rules: Sequence[Rule]) -> dict[str, Any]:
        applied = collections.Counter(rule for rule, _ in self.applied)
        report: dict[str, Any] = {}
        for rule in rules:
            skips = [
                {"node": node, "reason": reason}
                for (name, node), reason in self.skipped.items()
                if name == rule.name
            ]
            report[rule.name] = {
                "applied": applied.get(rule.name, 0),
                "skipped": len(skips),
                "reasons": dict(collections.Counter(s["reason"] for s in skips).most_common()),
                "skips": skips[:MAX_SKIPS_LISTED],
            }
        return report


def apply_rules(
    model: ir.Model,
    rules: Sequence[Rule],
    *,
    upgrade_opset: bool = True,
    max_rounds: int = 20,
    limit: tuple[str, int] | None = None,
    exclude: Mapping[InstanceKey, str] | None = None,
) -> tuple[ir.Model, RuleLog]:
    """Apply ``rules`` to a normalized model until nothing matches (in place, unless the opset
    is upgraded: then a new model is returned).

    ``limit=(rule, n)`` applies at most ``n`` matches of that rule (used to find a culprit);
    instances in ``exclude`` (see ``instance_key``) are left out.
    """
    log = RuleLog(opset_before=model_io.opset(model))
    names = NameSource(model)
    upgrade_failed: str | None = None
    counts: collections.Counter[str] = collections.Counter()
    for round_ in range(1, max_rounds + 1):
        current = model_io.opset(model)
        for rule in rules:
            rule.opset = current
        planned = _plan(model, rules, log, limit, counts, exclude)
        wanted = [
            r for r, _ in planned if r.target_opset > current and r.target_op not in NO_UPGRADE
        ]
        needed = max((rule.target_opset for rule in wanted), default=0)
        if needed > current and upgrade_opset and upgrade_failed is None:
            ops = sorted({r.target_op for r in wanted if r.target_op})
            try:
                model = model_io.ensure_opset(model, needed, f"{', '.join(ops)} (optimize)")
            except OnnxcompError as err:
                upgrade_failed = str(err)
            else:
                # The converter writes some attributes as Constant nodes (Squeeze axes, ...).
                model_io.normalize(model)
                names = NameSource(model)
                log.notes.append(f"opset upgraded {current} -> {needed} for {', '.join(ops)}")
                continue  # plan again on the upgraded model
        current = model_io.opset(model)
        kept = []
        for rule, match in planned:
            if rule.target_opset > current:
                why = f"{rule.target_op} needs opset {rule.target_opset}, the model is opset {current}"
                if rule.target_op in NO_UPGRADE:
                    why += f" and is not upgraded for it: {NO_UPGRADE[rule.target_op]}"
                elif not upgrade_opset:
                    why += " and opset upgrades are off"
                elif upgrade_failed:
                    why = upgrade_failed
                log.skipped[(rule.name, _node_label(match.anchor))] = why
                continue
            kept.append((rule, match))
        if not kept:
            break
        log.rounds = round_
        for rule, match in kept:
            key = instance_key(rule, match.anchor)
            rule.rewrite(match, names)
            counts[rule.name] += 1
            label = _node_label(match.anchor)
            log.applied.append((rule.name, label))
            log.keys.append(key)
            log.skipped.pop((rule.name, label), None)
        logger.info("optimize round %d: %d rewrites", round_, len(kept))
    else:
        log.notes.append(f"stopped after {max_rounds} rounds with rules still matching")
    drop_unused(model)
    # A near-miss at a node that a later rewrite removed is no longer news.
    alive = {_node_label(n) for n in ir.traversal.RecursiveGraphIterator(model.graph)}
    log.skipped = {key: why for key, why in log.skipped.items() if key[1] in alive}
    log.opset_after = model_io.opset(model)
    return model, log


def _plan(
    model: ir.Model,
    rules: Sequence[Rule],
    log: RuleLog,
    limit: tuple[str, int] | None,
    counts: collections.Counter[str],
    exclude: Mapping[InstanceKey, str] | None = None,
) -> list[tuple[Rule, Match]]:
    """Every rule at every anchor; the first match to claim a node wins this round."""
    exclude = exclude or {}
    # A match may neither touch a node another match changes, nor read a value whose producer
    # another match removes (that value would be stale): those wait for the next round.
    claimed: set[int] = set()
    relied: set[int] = set()
    planned: list[tuple[Rule, Match]] = []
    graphs = list(model.graphs())
    budget = dict(counts)
    for rule in rules:
        for graph in graphs:
            for node in list(graph):
                if rule.anchors and node.op_type not in rule.anchors:
                    continue
                if id(node) in claimed or node.domain not in ("", "ai.onnx"):
                    continue
                result = rule.match(node)
                if result is None:
                    continue
                if isinstance(result, str):
                    log.skipped[(rule.name, _node_label(node))] = result
                    continue
                left_out = exclude.get(instance_key(rule, node))
                if left_out is not None:
                    log.skipped[(rule.name, _node_label(node))] = left_out
                    continue
                inside = {id(n) for n in result.nodes}
                boundary = {
                    id(v.producer())
                    for v in result.data.values()
                    if isinstance(v, ir.Value)
                    and v.producer() is not None
                    and id(v.producer()) not in inside
                }
                if inside & (claimed | relied) or boundary & claimed:
                    continue
                if limit is not None and limit[0] == rule.name:
                    if budget.get(rule.name, 0) >= limit[1]:
                        continue
                budget[rule.name] = budget.get(rule.name, 0) + 1
                claimed |= inside
                relied |= boundary
                planned.append((rule, result))
    return planned


def op_histogram(model: ir.Model) -> dict[str, int]:
    """Node count by op type, subgraphs included."""
    counts = collections.Counter(
        (f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type)
        for n in ir.traversal.RecursiveGraphIterator(model.graph)
    )
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


# ---------------------------------------------------------------------------------------------
# The self-check


def self_check(reference: ir.Model, candidate: ir.Model, data: Any, options: OptimizeOptions):
    """Run both models in onnxruntime on ``data`` (or random inputs): (passed, report)."""
    verdict = Judge(
        reference, data, tolerance=options.tolerance, samples=options.samples, shapes=options.shapes
    )(candidate)
    return verdict.passed, verdict.report


def _prepared(model: ir.Model) -> ir.Model:
    work = model.clone()
    model_io.normalize(work)
    return work


# ---------------------------------------------------------------------------------------------
# The pass


class OptimizePass(ir.passes.FunctionalPass):
    """Fuse decomposed activations and norms, fold BatchNorm/bias/scales into weights, remove
    Identity/Dropout, fold constants; then check the outputs against the input model."""

    def __init__(self, options: OptimizeOptions | None = None, data: Any = None):
        super().__init__()
        self.options = options or OptimizeOptions()
        self.data = data

    def call(self, model: ir.Model) -> Result:
        options = self.options
        if options.self_check:  # inputs that cannot be made are refused before any work
            check_data(model, self.data, options.samples, options.shapes)
        rules = options.selected_rules()
        annotated = annotated_values(model)
        exclude: dict[InstanceKey, str] = {}
        faults: list[Fault] = []
        work, log, normalized = self._apply(model, rules, exclude, annotated)
        check = None
        # Nothing rewritten: the graph computes what the input does, so neither model is run
        # (a large model's self-check costs a session of its weights and minutes).
        changed = bool(log.applied) or log.opset_after != log.opset_before
        if options.self_check and not changed:
            log.notes.append("self-check skipped: no rewrite applied")
        elif options.self_check:
            judge = Judge(
                model,
                self.data,
                tolerance=options.tolerance,
                samples=options.samples,
                shapes=options.shapes,
                limit=options.check_samples,
            )
            verdict = judge(work)
            while not verdict.passed:
                fault = None
                if len(faults) < MAX_LEFT_OUT:
                    applied = [(r, lb, k) for (r, lb), k in zip(log.applied, log.keys, strict=True)]
                    fault = find_fault(
                        [r.name for r in rules],
                        self._applier(model, rules),
                        judge,
                        exclude,
                        failing=(verdict, applied),
                    )
                    if (
                        fault is not None and fault.key in exclude
                    ):  # not a single instance after all
                        fault = None
                if fault is None:
                    why = (
                        f"the cleaned model's output {verdict.report['worst_output']!r} differs by "
                        f"{verdict.error:.3g} (relative; tolerance {options.tolerance})"
                    )
                    why += (
                        " and no single rewrite is to blame"
                        if len(faults) < MAX_LEFT_OUT
                        else f" after {MAX_LEFT_OUT} rewrites were left out"
                    )
                    logger.warning("optimize: %s; the graph is kept as it was", why)
                    work, log, normalized = self._apply(model, [], {}, annotated)
                    log.notes.append(f"clean-up left out: {why}")
                    verdict = judge(work)
                    break
                logger.warning("optimize: %s", fault.note())
                faults.append(fault)
                exclude[fault.key] = fault.note()
                work, log, normalized = self._apply(model, rules, exclude, annotated)
                verdict = judge(work)
            check = verdict.report
        before, after = op_histogram(model), op_histogram(work)
        report: dict[str, Any] = {
            "rules": log.by_rule(rules),
            "applied": len(log.applied),
            "rounds": log.rounds,
            "opset": {"before": log.opset_before, "after": log.opset_after},
            "constants_lifted": normalized.get("constants_lifted", 0),
            "nodes": {"before": sum(before.values()), "after": sum(after.values())},
            "ops_before": before,
            "ops_after": after,
            "weight_bytes": {
                "before": model_io.weight_bytes(model),
                "after": model_io.weight_bytes(work),
            },
            "left_out": [f.to_json() for f in faults],
            "notes": [*(f.note() for f in faults), *log.notes],
        }
        if check is not None:
            report["check"] = check
        return Result(
            work,
            modified=bool(log.applied) or bool(normalized.get("constants_lifted")),
            report=report,
        )

    def _apply(self, model, rules, exclude, annotated):
        """The rules applied to a normalized copy of ``model``: (model, log, normalize report)."""
        options = self.options
        work = model.clone()
        normalized = model_io.normalize(work)
        work, log = apply_rules(
            work,
            rules,
            upgrade_opset=options.upgrade_opset,
            max_rounds=options.max_rounds,
            exclude=exclude,
        )
        # Inferred shapes are written out as value_info, and onnxruntime runs a model carrying
        # them slower: measured on all-MiniLM-L6-v2 at 1 thread, 1.13-1.15x.
        strip_inferred_shapes(work, annotated)
        return work, log, normalized

    def _applier(self, model, rules):
        """``apply(rule names, exclude, limit)`` for the fault search: (candidate, instances)."""
        by_name = {r.name: r for r in rules}
        options = self.options

        def apply(names, exclude, limit):
            candidate, log = apply_rules(
                _prepared(model),
                [by_name[n] for n in names],
                upgrade_opset=options.upgrade_opset,
                max_rounds=options.max_rounds,
                limit=limit,
                exclude=exclude,
            )
            return candidate, [(r, label, key) for (r, label), key in zip(log.applied, log.keys)]

        return apply


def optimize(
    model: ir.Model, options: OptimizeOptions | None = None, data: Any = None
) -> tuple[ir.Model, dict[str, Any]]:
    """Clean up ``model`` (a new model is returned; the input is left as it was) and report."""
    result = OptimizePass(options, data)(model)
    return result.model, result.report
