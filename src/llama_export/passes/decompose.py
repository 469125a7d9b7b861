"""Decompositions for runtimes whose ONNX parser predates the opset-23 LLM ops (TensorRT 10.3 on JetPack 6):
RMSNormalization, RotaryEmbedding and Attention become the primitive ops they are defined by. Norm statistics,
rotary arithmetic and softmax are computed in fp32 whatever the activations' type. A node outside what a
decomposition covers (partial or interleaved rotary, causal flag without a mask, cache inputs) is left as it is,
and the target's op check names it. Each decomposition is an onnxscript rewrite rule.

Also here: the attribute tidy a native TensorRT `Attention` needs (the parser refuses some attributes even at
their default values), with softmax pinned to fp32."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase

from llama_export.passes.base import GraphPass, RulesPass

FLOAT = ir.DataType.FLOAT


class _Builder:
    """The rewriter's op builder, typing each output as it goes (the package records every value's type) and
    naming constants after the node they replace."""

    def __init__(self, op, anchor: ir.Node):
        self.rewriter, self.anchor = op, anchor

    def op(self, op_type: str, inputs: list, dtype: ir.DataType, shape=None, **attributes) -> ir.Value:
        out = getattr(self.rewriter, op_type)(*inputs, **attributes)
        out.shape = shape
        if dtype is not None:
            out.type = ir.TensorType(dtype)
        return out

    def const(self, array: np.ndarray, name: str) -> ir.Value:
        return self.rewriter.initializer(ir.tensor(array), f"{self.anchor.name or 'node'}.{name}")

    def cast(self, value: ir.Value, dtype: ir.DataType) -> ir.Value:
        if value.dtype == dtype:
            return value
        return self.op("Cast", [value], dtype, value.shape, to=dtype)


def _last_dim(value: ir.Value) -> int | None:
    if value.shape is None or len(value.shape) == 0 or not isinstance(value.shape[-1], int):
        return None
    return value.shape[-1]


class RMSNormAsPrimitives(RewriteRuleClassBase):
    """RMSNormalization(x, scale) -> x / sqrt(mean(x*x) + eps) in fp32, cast back, times scale."""

    def pattern(self, op, x, scale):
        return op.RMSNormalization(x, scale, _outputs=["normalized"])

    def check(self, context, x, normalized, **_) -> MatchResult:
        axis = normalized.producer().attributes.get_int("axis", -1)
        if x.shape is None or axis not in (-1, len(x.shape) - 1):
            return MatchResult().fail("the norm is not over the last axis of a known rank", x)
        return MatchResult()

    def rewrite(self, op, x, scale, normalized, **_):
        eps = normalized.producer().attributes.get_float("epsilon", 1e-5)
        b = _Builder(op, normalized.producer())
        x32 = b.cast(x, FLOAT)
        squares = b.op("Mul", [x32, x32], FLOAT, x.shape)
        axes = b.const(np.array([-1], dtype=np.int64), "axes")
        mean = b.op("ReduceMean", [squares, axes], FLOAT, None, keepdims=1)
        rms = b.op("Sqrt", [b.op("Add", [mean, b.const(np.array(eps, dtype=np.float32), "epsilon")], FLOAT)], FLOAT)
        normalized_x = b.cast(b.op("Div", [x32, rms], FLOAT, x.shape), x.dtype)
        return b.op("Mul", [normalized_x, scale], x.dtype, x.shape)


class DecomposeRMSNorm(RulesPass):
    name = "decompose-rms-norm"

    def rules(self, model: ir.Model) -> list:
        return [RMSNormAsPrimitives.rule()]


class RotaryAsPrimitives(RewriteRuleClassBase):
    """RotaryEmbedding (non-interleaved, full head, 4-D [B, N, S, H]) -> x*cos + rotate_half(x)*sin on the halves;
    with a position input, the tables are gathered at those positions first."""

    def pattern(self, op, x, cos, sin):
        return op.RotaryEmbedding(x, cos, sin, _allow_other_inputs=True, _outputs=["rotated"])

    def check(self, context, x, rotated, **_) -> MatchResult:
        node, head = rotated.producer(), _last_dim(x)
        if x.shape is None or len(x.shape) != 4 or head is None or head % 2:
            return MatchResult().fail("x is not [batch, heads, sequence, head size] with an even static head", x)
        if node.attributes.get_int("interleaved", 0) != 0:
            return MatchResult().fail("interleaved rotary", rotated)
        if node.attributes.get_int("rotary_embedding_dim", 0) not in (0, head):
            return MatchResult().fail("rotary over part of the head", rotated)
        return MatchResult()

    def rewrite(self, op, x, cos, sin, rotated, **_):
        node = rotated.producer()
        positions = node.inputs[3] if len(node.inputs) > 3 else None
        head = _last_dim(x)
        half = head // 2
        b = _Builder(op, node)
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
        return b.op("Concat", [first, second], x.dtype, x.shape, axis=3)


class DecomposeRotary(RulesPass):
    name = "decompose-rotary"

    def rules(self, model: ir.Model) -> list:
        return [RotaryAsPrimitives.rule()]


class AttentionAsPrimitives(RewriteRuleClassBase):
    """Attention(Q, K, V, mask) with the cache outside it -> softmax(Q*scale @ K^T + mask) @ V, softmax in fp32."""

    def pattern(self, op, q, k, v):
        return op.Attention(q, k, v, _allow_other_inputs=True, _outputs=["attention"])

    def check(self, context, attention, **_) -> MatchResult:
        node = attention.producer()
        inputs = list(node.inputs)
        q, k, v = inputs[:3]
        if len(inputs) > 4 or any(x is None or x.shape is None or len(x.shape) != 4 for x in (q, k, v)):
            return MatchResult().fail("not 4-D Q, K, V with at most a mask besides", attention)
        if _last_dim(q) is None or q.shape[1] != k.shape[1] or not isinstance(q.shape[1], int):
            return MatchResult().fail("grouped heads must arrive repeated (the traced graph repeats them)", k)
        if node.attributes.get_int("is_causal", 0) or node.attributes.get_float("softcap", 0.0):
            return MatchResult().fail("causal flag or softcap", attention)
        if node.attributes.get_int("qk_matmul_output_mode", 0):
            return MatchResult().fail("Attention outputs its scores", attention)
        if any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
            return MatchResult().fail("Attention's cache or score outputs are read", attention)
        return MatchResult()

    def rewrite(self, op, q, k, v, attention, **_):
        node = attention.producer()
        mask = node.inputs[3] if len(node.inputs) > 3 else None
        scale = node.attributes.get_float("scale", 1.0 / float(np.sqrt(_last_dim(q))))
        dtype = q.dtype
        b = _Builder(op, node)
        scaled = b.op("Mul", [q, b.const(np.array(scale, dtype=dtype.numpy()), "scale")], dtype, q.shape)
        keys_t = b.op("Transpose", [k], dtype, None, perm=[0, 1, 3, 2])
        scores = b.cast(b.op("MatMul", [scaled, keys_t], dtype), FLOAT)
        if mask is not None and mask.dtype == ir.DataType.BOOL:
            lowest = b.const(np.array(np.finfo(np.float32).min, dtype=np.float32), "masked")
            scores = b.op("Where", [mask, scores, lowest], FLOAT)
        elif mask is not None:
            scores = b.op("Add", [scores, b.cast(mask, FLOAT)], FLOAT)
        probs = b.cast(b.op("Softmax", [scores], FLOAT, None, axis=-1), dtype)
        return b.op("MatMul", [probs, v], dtype, attention.shape)


class DecomposeAttention(RulesPass):
    name = "decompose-attention"

    def rules(self, model: ir.Model) -> list:
        return [AttentionAsPrimitives.rule()]


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
