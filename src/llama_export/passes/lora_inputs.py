"""Low-rank adapter inputs: a MatMul over a chosen weight gains the branch (X @ A) @ B added to its output, A and B
graph inputs whose defaults are empty (rank 0, so the package is the base model until a runtime binds an adapter's
matrices by name: ONNX Runtime's LoRA adapters, onnxruntime-genai's og.Adapters)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_ir as ir

from llama_export.names import SOURCE_NAMES
from llama_export.passes.base import GraphPass, replace_value


@dataclass
class AdaptedWeight:
    """A weight that takes an adapter: its A/B input names, sizes, and the checkpoint tensors it stacks (in column
    order: q, k, v for a packed attention projection)."""
    weight: str
    a_input: str
    b_input: str
    rows: int
    columns: int
    sources: list[str]


class AddLoraInputs(GraphPass):
    """`chosen(sources)` says which MatMul weights (by the checkpoint tensors they hold) take adapters."""

    name = "add-lora-inputs"

    def __init__(self, chosen: Callable[[list[str]], bool]):
        super().__init__()
        self.chosen = chosen
        self.adapted: list[AdaptedWeight] = []

    def apply(self, model: ir.Model) -> int:
        graph = model.graph
        self.adapted = []
        for node in list(graph):
            weight = node.inputs[1] if node.op_type == "MatMul" and node.domain == "" else None
            if weight is None or not weight.is_initializer() or weight.const_value is None \
                    or len(weight.const_value.shape) != 2:
                continue
            sources = weight.meta.get(SOURCE_NAMES) or [weight.name]
            if not self.chosen(sources):
                continue
            rows, columns = (int(d) for d in weight.const_value.shape)
            base = weight.name.removesuffix(".weight")
            rank = f"{base}.lora_rank"  # one per weight: an adapter leaves some layers at rank 0
            a = self._input(graph, f"{base}.lora_A", [rows, 0], [rows, rank], weight.const_value.dtype)
            b = self._input(graph, f"{base}.lora_B", [0, columns], [rank, columns], weight.const_value.dtype)
            low = ir.node("MatMul", [node.inputs[0], a], name=f"{node.name}.lora_A")
            delta = ir.node("MatMul", [low.outputs[0], b], name=f"{node.name}.lora_B")
            output = node.outputs[0]
            total = ir.node("Add", [output, delta.outputs[0]], name=f"{node.name}.lora_add")
            graph.insert_after(node, [low, delta, total])
            replace_value(output, total.outputs[0])
            total.replace_input_with(0, output)  # the Add reads the base output, not itself
            self.adapted.append(AdaptedWeight(weight.name, a.name, b.name, rows, columns, list(sources)))
        return len(self.adapted)

    @staticmethod
    def _input(graph: ir.Graph, name: str, empty: list[int], shape: list, dtype) -> ir.Value:
        """A graph input whose initializer (its default) is an empty matrix."""
        value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype),
                         const_value=ir.tensor(np.zeros(empty, dtype=dtype.numpy()), name=name))
        graph.inputs.append(value)
        graph.register_initializer(value)
        return value
