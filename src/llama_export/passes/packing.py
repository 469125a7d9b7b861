"""Packing projections that read the same activation into one MatMul: Q/K/V (straight into GroupQueryAttention's
packed input) and gate/up (split, then SiLU(gate) * up). The packed weight is concatenated lazily, when written."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from llama_export.names import MS_DOMAIN, ROW_READER, SOURCE_NAMES
from llama_export.passes.base import GraphPass, replace_value
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


def _packed_matmul(graph: ir.Graph, matmuls: list[ir.Node], name: str) -> ir.Value:
    """One MatMul over the concatenated weights, inserted before the first of `matmuls`."""
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
    graph.register_initializer(weight)
    packed = ir.node("MatMul", [matmuls[0].inputs[0], weight])
    order = {id(node): i for i, node in enumerate(graph)}
    graph.insert_before(min(matmuls, key=lambda m: order[id(m)]), packed)
    out_shape = matmuls[0].outputs[0].shape
    if out_shape is not None:
        packed.outputs[0].shape = ir.Shape([*list(out_shape)[:-1], columns])
    packed.outputs[0].type = matmuls[0].outputs[0].type
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
    for node in matmuls:
        weight = node.inputs[1]
        graph.remove(node, safe=True)
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


class PackGateUp(GraphPass):
    """gate/up projections of a SwiGLU MLP, SiLU(x @ Wg) * (x @ Wu) -> one MatMul, Split, SiLU(gate) * up."""

    name = "pack-gate-up"

    def apply(self, model: ir.Model) -> int:
        graph, sites = model.graph, 0
        for silu_mul in list(graph):
            match = self._match(silu_mul)
            if match is None:
                continue
            gate_mm, up_mm, product = match
            activation = gate_mm.inputs[0]
            if up_mm.inputs[0] is not activation or not {gate_mm, up_mm} <= set(_weight_matmuls(activation)):
                continue
            gate_columns = gate_mm.inputs[1].const_value.shape[1]
            up_columns = up_mm.inputs[1].const_value.shape[1]
            name = gate_mm.inputs[1].name.replace("gate_proj", "gate_up_proj")
            packed = _packed_matmul(graph, [gate_mm, up_mm], name)
            sizes = ir.tensor(np.array([gate_columns, up_columns], dtype=np.int64))
            split_sizes = ir.node("Constant", [], attributes={"value": sizes})
            split = ir.node("Split", [packed, split_sizes.outputs[0]], attributes={"axis": -1}, num_outputs=2)
            graph.insert_after(packed.producer(), [split_sizes, split])  # before SiLU(gate), which reads it
            for new, old in zip(split.outputs, (gate_mm.outputs[0], up_mm.outputs[0])):
                replace_value(old, new)
            _drop(graph, [gate_mm, up_mm])
            sites += 1
        return sites

    @staticmethod
    def _match(node: ir.Node):
        """node = Mul(Mul(g, Sigmoid(g)), u) with g and u from MatMuls (either operand order)."""
        if node.op_type != "Mul" or node.domain != "":
            return None
        for silu, up in (node.inputs, reversed(node.inputs)):
            silu_node = silu.producer() if silu is not None else None
            if silu_node is None or silu_node.op_type != "Mul" or len(silu.uses()) != 1:
                continue
            a, b = silu_node.inputs
            for gate, sig in ((a, b), (b, a)):
                sig_node = sig.producer() if sig is not None else None
                if sig_node is None or sig_node.op_type != "Sigmoid" or sig_node.inputs[0] is not gate:
                    continue
                gate_mm, up_mm = gate.producer(), up.producer() if up is not None else None
                if gate_mm is None or up_mm is None or gate_mm.op_type != "MatMul" or up_mm.op_type != "MatMul":
                    continue
                if len(gate.uses()) != 2 or len(up.uses()) != 1:
                    continue
                return gate_mm, up_mm, node
        return None


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
