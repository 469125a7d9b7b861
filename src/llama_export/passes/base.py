"""The pass interface and the runner that times each pass and counts nodes around it."""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass

import onnx_ir as ir

# Value.meta key: f(start, stop) -> rows [start, stop) of the weight in its [out, in] layout, read alone (a source
# tensor that can be sliced); the quantizer then reads weights in row chunks instead of whole. A pass that changes
# a weight's values must wrap it too (passes/scaling.py does).
MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib operators
ROW_READER = "row_reader"


@dataclass
class PassReport:
    name: str
    sites: int
    nodes_before: int
    nodes_after: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


class GraphPass:
    """Subclasses set `name` and implement `apply`, returning how many sites they rewrote (0: unchanged)."""

    name = "pass"

    def apply(self, model: ir.Model) -> int:
        raise NotImplementedError


def replace_value(old: ir.Value, new: ir.Value) -> None:
    """Route every use of `old` to `new`; a graph output keeps its name, so the model's IO does not change."""
    new.shape, new.type = old.shape, old.type
    was_output, name = old.is_graph_output(), old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if was_output:
        old.name, new.name = f"{name}.replaced", name


def count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in model.graph.all_nodes())


def run_passes(model: ir.Model, passes: list[GraphPass], log=None) -> list[PassReport]:
    reports = []
    for graph_pass in passes:
        before, start = count_nodes(model), time.perf_counter()
        sites = graph_pass.apply(model)
        report = PassReport(graph_pass.name, sites, before, count_nodes(model), time.perf_counter() - start)
        reports.append(report)
        if log:
            log(f"  {report.name:<24} {report.sites:>5} sites  {report.nodes_before:>6} -> {report.nodes_after} nodes")
    return reports


def format_report(reports: list[PassReport]) -> str:
    lines = [f"{'pass':<24} {'sites':>6} {'nodes before':>13} {'nodes after':>12} {'seconds':>8}"]
    for r in reports:
        lines.append(f"{r.name:<24} {r.sites:>6} {r.nodes_before:>13} {r.nodes_after:>12} {r.seconds:>8.2f}")
    return "\n".join(lines)


def forget_rewriter_matches() -> int:
    """Clears what onnxscript's rewrite rules remember of their last match; returns how many matchers held one.
    The rules are module-level objects and each matcher keeps the graph, node and values it last matched: the
    exported graph, and through its lazy initializers the calibration statistics, would stay reachable after the
    package is written. (onnxscript has no public way to reset them; if its matchers change, nothing is done.)"""
    try:
        from onnxscript.rewriter import _basics, _matcher
    except ImportError:
        return 0
    kinds, pending = set(), [_matcher.PatternMatcher]
    while pending:  # the concrete classes: an isinstance check on every live object warns on some of torch's
        kind = pending.pop()
        kinds.add(kind)
        pending += kind.__subclasses__()
    cleared = 0
    for matcher in gc.get_objects():
        if type(matcher) in kinds:
            held = any(getattr(matcher, name, None) is not None for name in ("_current_node", "_graph"))
            for name, empty in (("_match", _basics.MatchResult), ("_current_node", None), ("_graph", None)):
                if hasattr(matcher, name):
                    setattr(matcher, name, empty() if empty else None)
            cleared += held
    return cleared
