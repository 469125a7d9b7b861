"""The pass interface and the runner that times each pass and counts nodes around it."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import onnx_ir as ir
import onnx_ir.passes.common as common


@dataclass
class PassReport:
    name: str
    sites: int
    nodes_before: int
    nodes_after: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class SitesResult(ir.passes.PassResult):
    """onnx-ir's pass result, with how many sites the pass rewrote."""

    sites: int = 0


class GraphPass(ir.passes.InPlacePass):
    """An onnx-ir in-place pass (PassBase: `requires`/`ensures` checked around each call; PassResult). Subclasses
    set `name` and implement `apply`, returning how many sites they rewrote (0: unchanged)."""

    name = "pass"

    def apply(self, model: ir.Model) -> int:
        raise NotImplementedError

    def call(self, model: ir.Model) -> SitesResult:
        sites = self.apply(model)
        return SitesResult(model, modified=sites > 0, sites=sites)


class RulesPass(GraphPass):
    """A pass stated as onnxscript rewrite rules (a pattern, a check that says why a match fails, a rewrite). The
    rules are built afresh on each run, for the model at hand: a rule's matcher keeps the graph it last looked at,
    and a module-level rule would keep every exported graph reachable. `commute` also tries the swapped inputs of
    Add and Mul.

    onnxscript finds and checks each match and builds its replacement (`RewriteRule.try_rewrite`); the
    replacement is put in here, as the hand-written passes did it: new values are named by the graph as they are
    added, a replaced graph output keeps its name, and the traced ops' debug metadata is not copied onto the fused
    node. `keep_names` gives a replacement the replaced value's name instead, as onnxscript's own loop does (set
    where the pass used that loop before, so packages stay byte-identical: bench/same_packages.py)."""

    commute = False
    keep_names = False

    def rules(self, model: ir.Model) -> list:
        raise NotImplementedError

    def replaced(self, graph: ir.Graph, replacement) -> None:
        """Called after each replacement (onnxscript's ReplacementSubgraph) is in the graph: for a rewrite that
        replaces more than its pattern's outputs or leaves something to tidy."""

    def apply(self, model: ir.Model) -> int:
        rules = self.rules(model)
        if self.commute:
            rules = [variant for rule in rules for variant in rule.commute()]
        graph, sites = model.graph, 0
        for node in graph:
            for rule in rules:
                replacement = rule.try_rewrite(model, graph, node)
                if replacement is None:
                    continue
                for initializer in replacement.new_initializers:
                    graph.register_initializer(initializer)
                if self.keep_names:
                    for old, new in zip(replacement.match.outputs, replacement.new_outputs):
                        new.name = old.name if old.name is not None else new.name
                graph.insert_after(node, replacement.new_nodes)
                for old, new in zip(replacement.match.outputs, replacement.new_outputs):
                    replace_value(old, new)
                if rule.remove_nodes:
                    graph.remove(replacement.match.nodes, safe=True)
                self.replaced(graph, replacement)
                sites += 1
                break
        if sites and not all(rule.remove_nodes for rule in rules):  # matched nodes left for this
            common.RemoveUnusedNodesPass()(model)
        return sites


def constant_scalar(value: ir.Value | None) -> int | float | None:
    """The single element of a constant (initializer or Constant node's output), else None."""
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None or tensor.size != 1:
        return None
    return tensor.numpy().item()


class ReportingPassManager(ir.passes.PassManager):
    """onnx-ir's PassManager, run once, keeping a report per pass (sites, nodes before and after, seconds). A
    pass's own error (a user's model the pass must refuse) propagates as it was raised, not wrapped."""

    def __init__(self, passes: list[GraphPass], log=None):
        super().__init__(passes, steps=1)
        self.log = log
        self.reports: list[PassReport] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for graph_pass in self.passes:
            before, start = count_nodes(model), time.perf_counter()
            result = graph_pass(model)
            report = PassReport(graph_pass.name, getattr(result, "sites", int(result.modified)), before,
                                count_nodes(model), time.perf_counter() - start)
            self.reports.append(report)
            modified = modified or result.modified
            if self.log:
                self.log(f"  {report.name:<24} {report.sites:>5} sites  {report.nodes_before:>6} -> "
                         f"{report.nodes_after} nodes")
        return ir.passes.PassResult(model, modified)


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
    manager = ReportingPassManager(passes, log=log)
    manager(model)
    return manager.reports


def format_report(reports: list[PassReport]) -> str:
    lines = [f"{'pass':<24} {'sites':>6} {'nodes before':>13} {'nodes after':>12} {'seconds':>8}"]
    for r in reports:
        lines.append(f"{r.name:<24} {r.sites:>6} {r.nodes_before:>13} {r.nodes_after:>12} {r.seconds:>8.2f}")
    return "\n".join(lines)
