"""Run a small part of a graph with ONNX Runtime: used to prove what a subgraph computes (a causal mask, a
rotary table) before a pass relies on it. Refuses any part that would read a weight."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from llama_export.passes.cleanup import SMALL_VALUE_LIMIT


class NotEvaluable(Exception):
    """The subgraph reads a weight, an unexpected graph input, or does not run."""


def cone(outputs: list[ir.Value], given: set[str] = frozenset()) -> tuple[list[ir.Node], set[ir.Value], set[ir.Value]]:
    """Nodes that compute `outputs` (topological order) from graph inputs and `given` values, the inputs and
    given values they start from, and the initializers they read."""
    nodes, inputs, initializers, seen = [], set(), set(), set()

    def visit(value: ir.Value) -> None:
        if value is None or id(value) in seen:
            return
        seen.add(id(value))
        if value.is_graph_input() or value.name in given:
            inputs.add(value)
            return
        if value.is_initializer() or value.producer() is None:
            initializers.add(value)
            return
        node = value.producer()
        if id(node) in seen:
            return
        seen.add(id(node))
        for input_value in node.inputs:
            visit(input_value)
        nodes.append(node)

    for output in outputs:
        visit(output)
    return nodes, inputs, initializers


def evaluate(model: ir.Model, outputs: list[ir.Value], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Values of `outputs` computed from `feeds` (graph inputs or any intermediate values, by name)."""
    import onnxruntime as ort

    nodes, inputs, initializers = cone(outputs, set(feeds))
    if any(v.name not in feeds for v in inputs):
        raise NotEvaluable(f"depends on inputs {sorted(v.name for v in inputs if v.name not in feeds)}")
    tensors = []
    for value in initializers:
        tensor = value.const_value
        if tensor is None or tensor.size > SMALL_VALUE_LIMIT:
            raise NotEvaluable(f"reads {value.name}")
        proto = ir.serde.serialize_tensor(tensor)
        proto.name = value.name
        tensors.append(proto)
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(node) for node in nodes],
        "subgraph",
        [onnx.helper.make_tensor_value_info(v.name, v.dtype.value, None) for v in inputs],
        [onnx.helper.make_tensor_value_info(v.name, v.dtype.value, None) if v.dtype
         else onnx.helper.make_empty_tensor_value_info(v.name) for v in outputs],
        tensors,
    )
    opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()]
    proto = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=10)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return session.run([v.name for v in outputs], {v.name: feeds[v.name] for v in inputs})
    except Exception as exc:
        raise NotEvaluable(str(exc).splitlines()[0]) from None
