"""fp16 conversion for GPU targets: weights, activations and the KV cache in fp16, with the numerically delicate
parts (rotary embedding, softmax, norm statistics, the position tables) left in fp32.

Which values become fp16 is decided by flow, not by name: the "hidden" values are those computed from the weights
or the KV cache. Values computed only from positions and the mask (rotary cos/sin tables, the causal mask) are
not hidden and stay fp32; where one meets a hidden value it is cast (or, if constant, stored) in fp16. Ops in
FP32_ISLANDS compute in fp32 between casts. The logits are handed out in fp32."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from llama_export.passes.base import GraphPass
from llama_export.passes.cleanup import lazy_transform
from llama_export.passes.streamed import RowStreamedTensor

FLOAT, HALF = ir.DataType.FLOAT, ir.DataType.FLOAT16
# RotaryEmbedding: positions times frequencies lose digits in fp16. Softmax: exponentials of large scores.
FP32_ISLANDS = {"RotaryEmbedding", "Softmax"}
# (op, input index) pairs whose float initializer is a weight: the sources of the hidden flow.
# A tied embedding is stored once, transposed for the lm_head, and read back through a Transpose for the lookup.
WEIGHT_INPUTS = {("MatMul", 1), ("Gather", 0), ("RMSNormalization", 1), ("DequantizeLinear", 1), ("Gemm", 1),
                 ("Transpose", 0)}


# Ops whose output is not a float computed from their inputs' values: an untyped output (the tracer leaves some)
# of any other op with a hidden input is hidden too
_NOT_FLOAT_OUT = {"Shape", "Size", "ArgMax", "ArgMin", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual",
                  "Not", "And", "Or", "NonZero", "Cast", "CastLike"}


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == FLOAT


def _constant_array(value: ir.Value) -> np.ndarray | None:
    """A small constant's data (initializer or Constant node), else None."""
    if value.const_value is not None and value.const_value.size <= 8192:
        return value.const_value.numpy()
    return None


def _typed(value: ir.Value, dtype: ir.DataType) -> None:
    value.type = ir.TensorType(dtype)


def _cast(graph: ir.Graph, value: ir.Value, dtype: ir.DataType, before: ir.Node | None = None) -> ir.Value:
    """Cast `value` right before `before`, or right after its producer (at the top for a graph input)."""
    node = ir.node("Cast", [value], attributes={"to": dtype})
    producer = value.producer()
    if before is not None:
        graph.insert_before(before, node)
    elif producer is not None:
        graph.insert_after(producer, node)
    else:
        graph.insert_before(next(iter(graph)), node)
    node.outputs[0].shape = value.shape
    _typed(node.outputs[0], dtype)
    return node.outputs[0]


class ConvertToFloat16(GraphPass):
    name = "convert-fp16"

    def apply(self, model: ir.Model) -> int:
        graph = model.graph
        hidden: set[int] = set()
        converted = 0
        for value in graph.inputs:
            if _is_float(value):
                _typed(value, HALF)
                hidden.add(id(value))
        for value in list(graph.initializers.values()):
            if _is_float(value) and value.uses() and all((u.op_type, i) in WEIGHT_INPUTS for u, i in value.uses()):
                tensor = value.const_value
                if isinstance(tensor, RowStreamedTensor):
                    value.const_value = tensor.converted(lambda a: a.astype(np.float16), HALF)
                else:
                    value.const_value = lazy_transform([tensor], lambda a: a.astype(np.float16), HALF,
                                                       list(tensor.shape), value.name)
                _typed(value, HALF)
                hidden.add(id(value))
                converted += 1
        half_constants: dict[int, ir.Value] = {}
        for node in list(graph):
            if not any(id(v) in hidden for v in node.inputs if v is not None):
                continue
            if node.op_type in FP32_ISLANDS and node.domain == "":
                self._island(graph, node, hidden)
                continue
            for index, value in enumerate(node.inputs):
                if _is_float(value) and id(value) not in hidden:
                    node.replace_input_with(index, self._half(graph, value, half_constants))
            if node.op_type == "Cast" and node.attributes.get_int("to") == FLOAT:
                node.attributes["to"] = ir.AttrInt64("to", HALF)
            for out in node.outputs:
                if _is_float(out):
                    _typed(out, HALF)
                    hidden.add(id(out))
                elif out.dtype is None and node.op_type not in _NOT_FLOAT_OUT:
                    hidden.add(id(out))  # an untyped view of a hidden value is hidden too
            converted += 1
        self._float_logits(graph)
        return converted

    @staticmethod
    def _half(graph: ir.Graph, value: ir.Value, cache: dict) -> ir.Value:
        """`value` in fp16: a small constant is stored again in fp16, anything else is cast."""
        if id(value) in cache:
            return cache[id(value)]
        array = _constant_array(value)
        if array is not None:
            half = ir.Value(name=f"{value.name}.fp16", const_value=ir.tensor(array.astype(np.float16)),
                            shape=value.shape, type=ir.TensorType(HALF))
            graph.register_initializer(half)
        else:
            half = _cast(graph, value, HALF)
        cache[id(value)] = half
        return half

    @staticmethod
    def _island(graph: ir.Graph, node: ir.Node, hidden: set[int]) -> None:
        for index, value in enumerate(node.inputs):
            if value is not None and id(value) in hidden:
                node.replace_input_with(index, _cast(graph, value, FLOAT, node))
        for out in node.outputs:
            if not _is_float(out):
                continue
            uses = list(out.uses())
            half = _cast(graph, out, HALF)
            for user, index in uses:
                user.replace_input_with(index, half)
            hidden.add(id(half))

    @staticmethod
    def _float_logits(graph: ir.Graph) -> None:
        for position, out in enumerate(list(graph.outputs)):
            if out.name != "logits" or out.dtype != HALF:
                continue
            cast = ir.node("Cast", [out], attributes={"to": FLOAT})
            graph.append(cast)
            cast.outputs[0].shape = out.shape
            _typed(cast.outputs[0], FLOAT)
            out.name = "logits.fp16"
            cast.outputs[0].name = "logits"
            graph.outputs[position] = cast.outputs[0]
