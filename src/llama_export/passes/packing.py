"""Packing projections that read the same activation into one MatMul: Q/K/V (straight into GroupQueryAttention's
packed input) and gate/up (split, then SiLU(gate) * up). The packed weight is concatenated lazily, when written."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase

from llama_export.names import MS_DOMAIN, ROW_READER, SOURCE_NAMES
from llama_export.passes.base import GraphPass, RulesPass, replace_value
from llama_export.passes.cleanup import lazy_transform
from llama_export.passes.streamed import RowStreamedTensor


def _weight_matmuls(activation: ir.Value) -> list[ir.Node]:
    """MatMuls that multiply `activation` by a 2-D weight initializer."""
    found = []
    for node, index in activation.uses():
        if node.op_type != "MatMul" or node.domain != "" or index != 0:
            continue
        weight = node.inputs[1]
        if weight.is_initializer() and weight.const_value is not None and len(weight.const_value.shape) == 2:
            found.append(node)
    return found


def _packed_weight(matmuls: list[ir.Node], name: str) -> ir.Value:
    """The MatMuls' weights side by side, concatenated when the weight is written (not registered)."""
    tensors = [m.inputs[1].const_value for m in matmuls]
    rows = tensors[0].shape[0]
    columns = sum(t.shape[1] for t in tensors)

    readers = [m.inputs[1].meta.get(ROW_READER) for m in matmuls]
    stacked = _stacked_rows(readers, [t.shape[1] for t in tensors]) if all(readers) else None
    if stacked and all(isinstance(t, RowStreamedTensor) and t.transposed and t.convert is None for t in tensors):
        concatenated = RowStreamedTensor(stacked, columns, rows, name, transposed=True)
    else:
        concatenated = lazy_transform(tensors, lambda *arrays: np.concatenate(arrays, axis=1), tensors[0].dtype,
                                      [rows, columns], name)
    weight = ir.Value(name=name, const_value=concatenated)
    weight.shape, weight.type = ir.Shape([rows, columns]), ir.TensorType(tensors[0].dtype)
    sources = [m.inputs[1].meta.get(SOURCE_NAMES) for m in matmuls]
    if all(sources):  # which checkpoint tensors the packed weight stacks, for quantizers that use them
        weight.meta[SOURCE_NAMES] = [name for names in sources for name in names]
    if stacked:  # the stacked rows straight from the source: no transposed copy to build and undo
        weight.meta[ROW_READER] = stacked
    return weight


def _type_packed_output(packed: ir.Value, matmuls: list[ir.Node]) -> None:
    out_shape = matmuls[0].outputs[0].shape
    if out_shape is not None:
        packed.shape = ir.Shape([*list(out_shape)[:-1], packed.producer().inputs[1].shape[1]])
    packed.type = matmuls[0].outputs[0].type


def _packed_matmul(graph: ir.Graph, matmuls: list[ir.Node], name: str) -> ir.Value:
    """One MatMul over the concatenated weights, inserted before the first of `matmuls`."""
    weight = _packed_weight(matmuls, name)
    graph.register_initializer(weight)
    packed = ir.node("MatMul", [matmuls[0].inputs[0], weight])
    order = {id(node): i for i, node in enumerate(graph)}
    graph.insert_before(min(matmuls, key=lambda m: order[id(m)]), packed)
    _type_packed_output(packed.outputs[0], matmuls)
    return packed.outputs[0]


def _stacked_rows(readers, counts: list[int]):
    """A row reader over parts stacked along the output rows: rows [start, stop) of the stack, part by part."""
    offsets = np.cumsum([0, *counts])

    def read(start: int, stop: int) -> np.ndarray:
        pieces = [reader(max(start, first) - first, min(stop, last) - first)
                  for reader, first, last in zip(readers, offsets[:-1], offsets[1:]) if start < last and stop > first]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    return read


def _drop(graph: ir.Graph, matmuls: list[ir.Node]) -> None:
    weights = [node.inputs[1] for node in matmuls]  # before removal, which detaches a node's inputs
    for node in matmuls:
        graph.remove(node, safe=True)
    _drop_unread_weights(graph, weights)


def _drop_unread_weights(graph: ir.Graph, weights: list[ir.Value]) -> None:
    for weight in weights:
        if not weight.uses() and weight.name in graph.initializers:
            graph.initializers.pop(weight.name)


class PackQKV(GraphPass):
    """q/k/v projections feeding one GroupQueryAttention -> one MatMul into its packed QKV input."""

    name = "pack-qkv"

    def apply(self, model: ir.Model) -> int:
        graph, sites = model.graph, 0
        for gqa in list(graph):
            if gqa.op_type != "GroupQueryAttention" or gqa.domain != MS_DOMAIN:
                continue
            q, k, v = gqa.inputs[:3]
            producers = [x.producer() if x is not None else None for x in (q, k, v)]
            if any(p is None for p in producers) or len({id(p) for p in producers}) != 3:
                continue
            if any(len(x.uses()) != 1 or x.is_graph_output() for x in (q, k, v)):
                continue
            activation = producers[0].inputs[0]
            if any(p not in _weight_matmuls(activation) for p in producers):
                continue
            packed = _packed_matmul(graph, producers, producers[0].inputs[1].name.replace("q_proj", "qkv_proj"))
            gqa.replace_input_with(0, packed)
            gqa.replace_input_with(1, None)
            gqa.replace_input_with(2, None)
            _drop(graph, producers)
            sites += 1
        return sites


class GateUpProjections(RewriteRuleClassBase):
    """SiLU(x @ Wg) * (x @ Wu), the SwiGLU MLP as traced (SiLU written out as g * Sigmoid(g)) -> one MatMul over
    [Wg | Wu], Split, SiLU(gate) * up. (The gate and up projections alone do not say which is which: a pattern of
    the two MatMuls would match any pair reading the same activation, so the pattern runs to their product.)"""

    def pattern(self, op, x, gate_weight, up_weight):
        gate = op.MatMul(x, gate_weight, _outputs=["gate"])
        up = op.MatMul(x, up_weight, _outputs=["up"])
        silu = op.Mul(gate, op.Sigmoid(gate, _outputs=["sigmoid"]), _outputs=["silu"])
        return op.Mul(silu, up, _outputs=["product"])

    def check(self, context, gate_weight, up_weight, **_) -> MatchResult:
        result = MatchResult()
        for weight in (gate_weight, up_weight):
            if not weight.is_initializer() or weight.const_value is None or len(weight.const_value.shape) != 2:
                return result.fail("a projection's weight is not a 2-D initializer", weight)
        if gate_weight.const_value.dtype != up_weight.const_value.dtype:
            return result.fail("the two weights differ in type", up_weight)
        return result

    def rewrite(self, op, x, gate_weight, up_weight, gate, up, sigmoid, silu, product, **_):
        matmuls = [gate.producer(), up.producer()]
        packed_weight = _packed_weight(matmuls, gate_weight.name.replace("gate_proj", "gate_up_proj"))
        weight = op.initializer(packed_weight.const_value, packed_weight.name)
        weight.meta.update(packed_weight.meta)
        packed = op.MatMul(x, weight)
        _type_packed_output(packed, matmuls)
        sizes = ir.tensor(np.array([gate_weight.shape[1], up_weight.shape[1]], dtype=np.int64))
        new_gate, new_up = op.Split(packed, op.Constant(value=sizes), axis=-1, _outputs=2)
        for new, old in ((new_gate, gate), (new_up, up)):
            new.shape, new.type = old.shape, old.type
        # SiLU(gate) * up again, on the split, as it was: operand order, names and types (the same computation)
        renamed = {gate: new_gate, up: new_up}
        new_sigmoid = _same_as(op.Sigmoid(new_gate), sigmoid)
        renamed[sigmoid] = new_sigmoid
        new_silu = _same_as(op.Mul(*(renamed[v] for v in silu.producer().inputs)), silu)
        renamed[silu] = new_silu
        return _same_as(op.Mul(*(renamed[v] for v in product.producer().inputs)), product)


def _same_as(new: ir.Value, old: ir.Value) -> ir.Value:
    """`new` named, typed and shaped as `old`, its node named as old's: a rebuilt node of the same computation."""
    new.name, new.shape, new.type = old.name, old.shape, old.type
    new.producer().name = old.producer().name
    return new


class PackGateUp(RulesPass):
    """gate/up projections of a SwiGLU MLP -> one MatMul, Split, SiLU(gate) * up."""

    name = "pack-gate-up"
    commute = True  # either operand order of both Muls

    def rules(self, model: ir.Model) -> list:
        return [GateUpProjections.rule()]

    def replaced(self, graph: ir.Graph, replacement) -> None:
        """The separate weights, read by nothing now."""
        _drop_unread_weights(graph, [replacement.match.bindings[name] for name in ("gate_weight", "up_weight")])


class RemoveUnusedInputs(GraphPass):
    """Graph inputs nothing reads any more (position_ids once rotary runs inside attention)."""

    name = "remove-unused-inputs"
    keep = ("input_ids", "attention_mask")

    def apply(self, model: ir.Model) -> int:
        graph = model.graph
        unused = [v for v in graph.inputs if not v.uses() and v.name not in self.keep and not v.is_graph_output()]
        for value in unused:
            graph.inputs.remove(value)
        return len(unused)


class PackSiblingMatMuls(GraphPass):
    """Weight MatMuls that read the same activation (q/k/v, gate/up) -> one MatMul over the concatenated weights
    and a Split: one larger GEMM instead of several small ones, for runtimes without a packed-attention kernel."""

    name = "pack-sibling-matmuls"

    def apply(self, model: ir.Model) -> int:
        graph, sites = model.graph, 0
        activations = {}
        for node in graph:
            if node.op_type == "MatMul" and node.domain == "" and node.inputs[0] is not None:
                activations.setdefault(id(node.inputs[0]), node.inputs[0])
        for activation in activations.values():
            matmuls = [m for m in _weight_matmuls(activation) if not m.outputs[0].is_graph_output()]
            if len(matmuls) < 2 or len({m.inputs[1].const_value.dtype for m in matmuls}) != 1:
                continue
            columns = [m.inputs[1].const_value.shape[1] for m in matmuls]
            name = matmuls[0].inputs[1].name.rsplit(".", 2)[0] + ".packed_proj.weight"
            packed = _packed_matmul(graph, matmuls, name)
            sizes = ir.Value(name=f"{name}.split", const_value=ir.tensor(np.array(columns, dtype=np.int64)))
            sizes.shape, sizes.type = ir.Shape([len(columns)]), ir.TensorType(ir.DataType.INT64)
            graph.register_initializer(sizes)
            split = ir.node("Split", [packed, sizes], attributes={"axis": -1}, num_outputs=len(matmuls))
            graph.insert_after(packed.producer(), split)
            for new, old in zip(split.outputs, [m.outputs[0] for m in matmuls]):
                replace_value(old, new)
            _drop(graph, matmuls)
            sites += 1
        return sites
