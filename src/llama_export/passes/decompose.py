"""Decompositions for runtimes whose ONNX parser predates the opset-23 LLM ops (TensorRT 10.3 on JetPack 6):
RMSNormalization, RotaryEmbedding and Attention become the primitive ops they are defined by. Norm statistics,
rotary arithmetic and softmax are computed in fp32 whatever the activations' type. A node outside what a
decomposition covers (partial or interleaved rotary, causal flag without a mask, cache inputs) is left as it is,
and the target's op check names it.

Also here: the attribute tidy a native TensorRT `Attention` needs (the parser refuses some attributes even at
their default values), with softmax pinned to fp32."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from llama_export.passes.base import GraphPass, replace_value

FLOAT = ir.DataType.FLOAT


class _Builder:
    """Inserts nodes before `anchor`, typing each output as it goes."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node):
        self.graph, self.anchor, self.count = graph, anchor, 0

    def op(self, op_type: str, inputs: list, dtype: ir.DataType, shape=None, **attributes) -> ir.Value:
        node = ir.node(op_type, inputs, attributes=attributes)
        self.graph.insert_before(self.anchor, node)
        out = node.outputs[0]
        out.shape = shape
        if dtype is not None:
            out.type = ir.TensorType(dtype)
        self.count += 1
        return out

    def const(self, array: np.ndarray, name: str) -> ir.Value:
        value = ir.Value(name=f"{self.anchor.name or 'node'}.{name}", const_value=ir.tensor(array),
                         shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
        self.graph.register_initializer(value)
        return value

    def cast(self, value: ir.Value, dtype: ir.DataType) -> ir.Value:
        if value.dtype == dtype:
            return value
        return self.op("Cast", [value], dtype, value.shape, to=dtype)


def _last_dim(value: ir.Value) -> int | None:
    if value.shape is None or len(value.shape) == 0 or not isinstance(value.shape[-1], int):
        return None
    return value.shape[-1]


class DecomposeRMSNorm(GraphPass):
    """RMSNormalization(x, scale) -> x / sqrt(mean(x*x) + eps) in fp32, cast back, times scale."""

    name = "decompose-rms-norm"

    def apply(self, model: ir.Model) -> int:
        graph, sites = model.graph, 0
        for node in list(graph):
            if node.op_type != "RMSNormalization" or node.domain != "" or len(node.inputs) != 2:
                continue
            x, scale = node.inputs
            rank = len(x.shape) if x.shape is not None else None
            axis = node.attributes.get_int("axis", -1)
            if rank is None or axis not in (-1, rank - 1) or scale is None:
                continue
            eps = node.attributes.get_float("epsilon", 1e-5)
            b = _Builder(graph, node)
            x32 = b.cast(x, FLOAT)
            squares = b.op("Mul", [x32, x32], FLOAT, x.shape)
            axes = b.const(np.array([-1], dtype=np.int64), "axes")
            mean = b.op("ReduceMean", [squares, axes], FLOAT, None, keepdims=1)
            rms = b.op("Sqrt", [b.op("Add", [mean, b.const(np.array(eps, dtype=np.float32), "epsilon")], FLOAT)],
                       FLOAT)
            normalized = b.cast(b.op("Div", [x32, rms], FLOAT, x.shape), x.dtype)
            result = b.op("Mul", [normalized, scale], x.dtype, x.shape)
            replace_value(node.outputs[0], result)
            graph.remove(node, safe=True)
            sites += 1
        return sites


class DecomposeRotary(GraphPass):
    """RotaryEmbedding (non-interleaved, full head, 4-D [B, N, S, H]) -> x*cos + rotate_half(x)*sin on the halves."""

    name = "decompose-rotary"

    def apply(self, model: ir.Model) -> int:
        graph, sites = model.graph, 0
        for node in list(graph):
            if node.op_type != "RotaryEmbedding" or node.domain != "":
                continue
            x, cos, sin = node.inputs[:3]
            positions = node.inputs[3] if len(node.inputs) > 3 else None
            head = _last_dim(x)
            if (x.shape is None or len(x.shape) != 4 or head is None or head % 2
                    or node.attributes.get_int("interleaved", 0) != 0
                    or node.attributes.get_int("rotary_embedding_dim", 0) not in (0, head)):
                continue
            half = head // 2
            b = _Builder(graph, node)
            if positions is not None:  # tables indexed by position: [max, H/2] -> [B, S, H/2]
                cos = b.op("Gather", [cos, positions], cos.dtype, None, axis=0)
                sin = b.op("Gather", [sin, positions], sin.dtype, None, axis=0)
            heads_axis = b.const(np.array([1], dtype=np.int64), "heads_axis")
            cos = b.cast(b.op("Unsqueeze", [cos, heads_axis], cos.dtype), x.dtype)
            sin = b.cast(b.op("Unsqueeze", [sin, heads_axis], sin.dtype), x.dtype)
            last = b.const(np.array([3], dtype=np.int64), "last_axis")
            bounds = [b.const(np.array([v], dtype=np.int64), f"bound{v}") for v in (0, half, head)]
            x1 = b.op("Slice", [x, bounds[0], bounds[1], last], x.dtype)
            x2 = b.op("Slice", [x, bounds[1], bounds[2], last], x.dtype)
            first = b.op("Sub", [b.op("Mul", [x1, cos], x.dtype), b.op("Mul", [x2, sin], x.dtype)], x.dtype)
            second = b.op("Add", [b.op("Mul", [x2, cos], x.dtype), b.op("Mul", [x1, sin], x.dtype)], x.dtype)
            result = b.op("Concat", [first, second], x.dtype, x.shape, axis=3)
            replace_value(node.outputs[0], result)
            graph.remove(node, safe=True)
            sites += 1
        return sites


class DecomposeAttention(GraphPass):
    """Attention(Q, K, V, mask) with the cache outside it -> softmax(Q*scale @ K^T + mask) @ V, softmax in fp32."""

    name = "decompose-attention"

    def apply(self, model: ir.Model) -> int:
        graph, sites = model.graph, 0
        for node in list(graph):
            if node.op_type != "Attention" or node.domain != "" or not self._covered(node):
                continue
            q, k, v = node.inputs[:3]
            mask = node.inputs[3] if len(node.inputs) > 3 else None
            scale = node.attributes.get_float("scale", 1.0 / float(np.sqrt(_last_dim(q))))
            dtype = q.dtype
            b = _Builder(graph, node)
            scaled = b.op("Mul", [q, b.const(np.array(scale, dtype=dtype.numpy()), "scale")], dtype, q.shape)
            keys_t = b.op("Transpose", [k], dtype, None, perm=[0, 1, 3, 2])
            scores = b.cast(b.op("MatMul", [scaled, keys_t], dtype), FLOAT)
            if mask is not None and mask.dtype == ir.DataType.BOOL:
                lowest = b.const(np.array(np.finfo(np.float32).min, dtype=np.float32), "masked")
                scores = b.op("Where", [mask, scores, lowest], FLOAT)
            elif mask is not None:
                scores = b.op("Add", [scores, b.cast(mask, FLOAT)], FLOAT)
            probs = b.cast(b.op("Softmax", [scores], FLOAT, None, axis=-1), dtype)
            result = b.op("MatMul", [probs, v], dtype, node.outputs[0].shape)
            replace_value(node.outputs[0], result)
            graph.remove(node, safe=True)
            sites += 1
        return sites

    @staticmethod
    def _covered(node: ir.Node) -> bool:
        inputs = list(node.inputs)
        q, k, v = (inputs + [None] * 3)[:3]
        if len(inputs) > 4 or any(x is None or x.shape is None or len(x.shape) != 4 for x in (q, k, v)):
            return False
        if _last_dim(q) is None or q.shape[1] != k.shape[1] or not isinstance(q.shape[1], int):
            return False  # grouped heads must arrive repeated (the traced graph repeats them)
        if node.attributes.get_int("is_causal", 0) or node.attributes.get_float("softcap", 0.0):
            return False
        if node.attributes.get_int("qk_matmul_output_mode", 0):
            return False
        return all(not out.uses() and not out.is_graph_output() for out in node.outputs[1:])


class PrepareNativeAttention(GraphPass):
    """Attention for TensorRT >= 10.14's parser: drop the attributes it refuses (qk_matmul_output_mode, softcap)
    when they hold their defaults, and ask for softmax in fp32."""

    name = "native-attention"

    def apply(self, model: ir.Model) -> int:
        sites = 0
        for node in model.graph:
            if node.op_type != "Attention" or node.domain != "":
                continue
            for name in ("qk_matmul_output_mode", "softcap"):
                attribute = node.attributes.get(name)
                if attribute is not None and not attribute.value:
                    del node.attributes[name]
            node.attributes["softmax_precision"] = ir.AttrInt64("softmax_precision", int(FLOAT))
            sites += 1
        return sites
