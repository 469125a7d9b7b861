"""Attention fusion for ONNX Runtime: the traced Attention block becomes one com.microsoft GroupQueryAttention.

Upstream of an opset-23 `Attention` the tracer leaves: rotary embedding of Q and K, the KV-cache Concat, the
repetition of K/V heads for grouped queries, and a mask built from `attention_mask`. GroupQueryAttention does all of
that in one kernel, with rotary tables indexed by position and the cache handled by the runtime. Nothing here trusts
node names: the structure is an onnxscript pattern, and what structure cannot show (the mask is causal with
padding, the head repetition is repeat-interleave, the rotary tables) the rule's check proves by running those
subgraphs on sample inputs. A site that fails any check is left as it was."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase
from onnxscript.rewriter.pattern import OrValue

from llama_export.names import MS_DOMAIN
from llama_export.passes.base import RulesPass, constant_scalar, replace_value
from llama_export.passes.subgraph import NotEvaluable, evaluate


class RotateHalf(RewriteRuleClassBase):
    """x * cos + rotate_half(x) * sin, as transformers traces LLaMA's rotary embedding: cos and sin of the
    frequencies repeated twice along the last axis, unsqueezed at the heads axis; rotate_half(x) the concatenation
    of minus the second half of each head and the first half."""

    def __init__(self):
        super().__init__(remove_nodes=False)  # the cos/sin tables also feed the other projection's rotation

    def pattern(self, op, x, freqs, start1, end1, start2, end2, axis1, axis2):
        repeated = op.Concat(freqs, freqs, axis=-1)
        cos, sin = op.Unsqueeze(op.Cos(repeated), axis1), op.Unsqueeze(op.Sin(repeated), axis2)
        first, second = op.Slice(x, start1, end1, [3], [1]), op.Slice(x, start2, end2, [3], [1])
        return op.Add(op.Mul(x, cos), op.Mul(op.Concat(op.Neg(second), first, axis=-1), sin))

    def check(self, op, x, start1, end1, start2, end2, axis1, axis2, **_) -> MatchResult:
        result = MatchResult()
        if constant_scalar(axis1) != 1 or constant_scalar(axis2) != 1:
            return result.fail("cos/sin are not unsqueezed at the heads axis", axis1)
        if x.shape is None or len(x.shape) != 4 or not all(isinstance(d, int) for d in (x.shape[1], x.shape[3])):
            return result.fail("x is not [batch, heads, sequence, head size] with static heads and head size", x)
        half = x.shape[3] // 2
        end = constant_scalar(end2)
        halves = (constant_scalar(start1), constant_scalar(end1), constant_scalar(start2)) == (0, half, half)
        if not halves or not isinstance(end, int) or end < x.shape[3]:
            return result.fail("x is not split into its two halves", x)
        return result

    def rewrite(self, op, x, freqs, **_):
        return op.RotaryEmbedding(x, op.Cos(freqs), op.Sin(freqs), interleaved=0, num_heads=x.shape[1])


class FuseRotary(RulesPass):
    """rotate-half arithmetic -> ONNX RotaryEmbedding (opset 23)."""

    name = "fuse-rotary"
    keep_names = True

    def rules(self, model: ir.Model) -> list:
        return [RotateHalf.rule()]


# Sample sizes for proving subgraphs: batch 2 (row 0 left-padded), 3 new tokens after 4 cached ones.
_B, _S, _P = 2, 3, 4


def _sample_feeds(graph: ir.Graph) -> dict[str, np.ndarray]:
    mask = np.ones((_B, _P + _S), dtype=np.int64)
    mask[0, :2] = 0
    feeds = {
        "input_ids": np.zeros((_B, _S), dtype=np.int64),
        "attention_mask": mask,
        "position_ids": np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, _P:],
    }
    for value in graph.inputs:
        if value.name not in feeds and value.shape is not None and len(value.shape) == 4:
            kv_heads, head_dim = value.shape[1], value.shape[3]
            feeds[value.name] = np.zeros((_B, kv_heads, _P, head_dim), dtype=np.float32)
    return feeds


def _mask_is_causal_with_padding(model: ir.Model, mask: ir.Value, feeds) -> bool:
    try:
        (mask,) = evaluate(model, [mask], feeds)
    except NotEvaluable:
        return False
    rows = np.arange(_S)[:, None] + _P
    allowed = (np.arange(_P + _S)[None, :] <= rows)[None, None] & (feeds["attention_mask"][:, None, None, :] == 1)
    if mask.dtype == bool:
        return mask.shape == allowed.shape and bool(np.array_equal(mask, allowed))
    mask = np.broadcast_to(mask, allowed.shape)
    return bool(np.all(mask[allowed] == 0) and np.all(mask[~allowed] < -1e4))


def _repeats_heads(model: ir.Model, cache: ir.Value, repeated: ir.Value, heads: int, feeds) -> bool:
    """What Attention reads is the cache with each KV head repeated heads/kv_heads times in place."""
    if not _static_dims(cache, 4, 1, 3):
        return False
    kv_heads, head_dim = cache.shape[1], cache.shape[3]
    sample = np.random.default_rng(0).standard_normal((_B, kv_heads, _P + _S, head_dim)).astype(np.float32)
    try:
        (result,) = evaluate(model, [repeated], {**feeds, cache.name: sample})
    except NotEvaluable:
        return False
    return bool(np.array_equal(result, np.repeat(sample, heads // kv_heads, axis=1)))


def _rotary_tables(model: ir.Model, rotary: ir.Node, positions: int) -> tuple[np.ndarray, np.ndarray] | None:
    """cos/sin tables [positions, head_dim/2] by running the position subgraph over 0..positions-1."""
    feeds = {"position_ids": np.arange(positions, dtype=np.int64)[None, :]}
    try:
        cos, sin = evaluate(model, [rotary.inputs[1], rotary.inputs[2]], feeds)
    except NotEvaluable:
        return None
    if cos.ndim != 3 or cos.shape[:2] != (1, positions) or cos.shape != sin.shape:
        return None
    return np.ascontiguousarray(cos[0], dtype=np.float32), np.ascontiguousarray(sin[0], dtype=np.float32)


def _static_dims(value: ir.Value, rank: int, *axes: int) -> bool:
    shape = value.shape
    return shape is not None and len(shape) == rank and all(isinstance(shape[axis], int) for axis in axes)


HEADS_FIRST = [0, 2, 1, 3]  # [B, S, N, D] <-> [B, N, S, D]


class GroupQueryAttentionRule(RewriteRuleClassBase):
    """Q/K/V projections split into heads, rotary on Q and K, the cache Concat, K/V heads repeated for grouped
    queries (absent when every query head has its own), Attention with a mask, heads merged back. The check proves
    by running the subgraphs what the pattern cannot show: the mask is causal with padding, the repetition is
    repeat-interleave, and Q's and K's rotary tables are equal. The rewrite reads the cos/sin caches and the
    sequence lengths the pass shares between sites.

    The pattern's one output is the merged heads; the cache Concats' outputs (graph outputs) are replaced by
    GroupQueryAttention's present outputs after the rewrite (`shared.presents`): with them among the pattern's
    outputs, onnxscript's matcher would try every pair of Concat nodes in the graph at every node."""

    def __init__(self, shared: GroupQueryAttentionInputs):
        # the matched nodes are removed once nothing reads them (the cache Concats feed graph outputs until then)
        super().__init__("group-query-attention", remove_nodes=False)
        self.shared = shared
        self.tables = None  # what the check proved for the site the rewrite follows

    def pattern(self, op, query, key, value, past_key, past_value, query_shape, key_shape, value_shape, q_cos,
                q_sin, k_cos, k_sin, key_axis, value_axis, mask, output_shape, key_unsqueeze, key_expand,
                key_repeat, value_unsqueeze, value_expand, value_repeat):
        q_heads = op.Transpose(op.Reshape(query, query_shape), perm=HEADS_FIRST)
        k_heads = op.Transpose(op.Reshape(key, key_shape), perm=HEADS_FIRST)
        v_heads = op.Transpose(op.Reshape(value, value_shape), perm=HEADS_FIRST)
        q_rotated = op.RotaryEmbedding(q_heads, q_cos, q_sin, _outputs=["q_rotated"])
        k_rotated = op.RotaryEmbedding(k_heads, k_cos, k_sin, _outputs=["k_rotated"])
        present_key = op.Concat(past_key, k_rotated, axis=key_axis, _outputs=["present_key"])
        present_value = op.Concat(past_value, v_heads, axis=value_axis, _outputs=["present_value"])
        keys = OrValue([op.Reshape(op.Expand(op.Unsqueeze(present_key, key_unsqueeze), key_expand), key_repeat),
                        present_key])
        values = OrValue([op.Reshape(op.Expand(op.Unsqueeze(present_value, value_unsqueeze), value_expand),
                                     value_repeat), present_value])
        attention = op.Attention(q_rotated, keys, values, mask, _outputs=["attention"])
        output = op.Reshape(op.Transpose(attention, perm=HEADS_FIRST), output_shape, _outputs=["output"])
        return output

    def check(self, context, query, key, value, past_key, past_value, key_axis, value_axis, mask, q_rotated,
              k_rotated, attention, output, present_key, present_value, **_) -> MatchResult:
        result = MatchResult()
        node = attention.producer()
        if node.attributes.get_int("is_causal", 0) or node.attributes.get_float("softcap", 0.0):
            return result.fail("causal flag or softcap on Attention (the mask input is what is proven)", attention)
        if node.attributes.get_int("qk_matmul_output_mode", 0):
            return result.fail("Attention outputs its scores", attention)
        if any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
            return result.fail("Attention's own cache or score outputs are read", attention)
        if not (past_key.is_graph_input() and past_value.is_graph_input()):
            return result.fail("the cache Concat does not start from a graph input", past_key)
        if key_axis.as_int() not in (2, -2) or value_axis.as_int() not in (2, -2):
            return result.fail("the cache Concat is not along the sequence axis", past_key)
        if not _static_dims(q_rotated, 4, 1, 3):
            return result.fail("Q is not [batch, heads, sequence, head size] with static heads and size", q_rotated)
        heads, head_dim = q_rotated.shape[1], q_rotated.shape[3]
        if not all(_static_dims(x, 3, 2) for x in (query, key, value, output)):
            return result.fail("a projection is not [batch, sequence, hidden] with static hidden", query)
        kv_heads = key.shape[2] // head_dim
        if (query.shape[2] != heads * head_dim or value.shape[2] != kv_heads * head_dim or kv_heads == 0
                or heads % kv_heads or output.shape[2] != heads * head_dim):
            return result.fail("the projections' widths do not divide into the attention's heads", key)
        for rotated in (q_rotated, k_rotated):
            rotary = rotated.producer()
            if rotary.attributes.get_int("interleaved", 0) != 0:
                return result.fail("interleaved rotary (GroupQueryAttention here takes the rotate-half form)", rotated)
            if rotary.attributes.get_int("rotary_embedding_dim", head_dim) not in (0, head_dim):
                return result.fail("rotary over part of the head", rotated)
        shared, model = self.shared, context.model
        if not shared.has_attention_mask():
            return result.fail("the graph has no attention_mask input to derive sequence lengths from")
        feeds = shared.feeds()
        if not _mask_is_causal_with_padding(model, mask, feeds):
            return result.fail("the mask is not causal with padding from attention_mask", mask)
        for cache, repeated in ((present_key, node.inputs[1]), (present_value, node.inputs[2])):
            if not _repeats_heads(model, cache, repeated, heads, feeds):
                return result.fail("the K/V heads are not repeated in place for the query heads", repeated)
        q_tables = _rotary_tables(model, q_rotated.producer(), shared.max_positions)
        k_tables = _rotary_tables(model, k_rotated.producer(), shared.max_positions)
        if q_tables is None or k_tables is None:
            return result.fail("the rotary tables do not follow from position_ids alone", q_rotated)
        if not all(np.array_equal(a, b) for a, b in zip(q_tables, k_tables)):
            return result.fail("Q and K are rotated by different tables", k_rotated)
        self.tables = q_tables
        return result

    def rewrite(self, op, query, key, value, past_key, past_value, q_rotated, attention, present_key,
                present_value, **_):
        heads, head_dim = q_rotated.shape[1], q_rotated.shape[3]
        cos_cache, sin_cache = self.shared.rotary_caches(*self.tables)
        seqlens_k, total_length = self.shared.lengths()
        scale = attention.producer().attributes.get_float("scale", 1.0 / math.sqrt(head_dim))
        output, new_key, new_value = op.GroupQueryAttention(
            query, key, value, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache,
            num_heads=heads, kv_num_heads=key.shape[2] // head_dim, do_rotary=1, rotary_interleaved=0, scale=scale,
            _domain=MS_DOMAIN, _outputs=3)
        self.shared.presents = [(present_key, new_key), (present_value, new_value)]
        return output


class GroupQueryAttentionInputs:
    """What every fused site of one graph reads: the sequence lengths derived from attention_mask, and the cos/sin
    caches (one pair per distinct table), each made when the first site needs it."""

    def __init__(self, graph: ir.Graph, max_positions: int):
        self.graph, self.max_positions = graph, max_positions
        self._feeds, self._lengths, self._caches = None, None, {}
        self.presents: list[tuple[ir.Value, ir.Value]] = []  # (cache Concat's output, GQA's) of the last rewrite

    def has_attention_mask(self) -> bool:
        return any(v.name == "attention_mask" for v in self.graph.inputs)

    def feeds(self) -> dict[str, np.ndarray]:
        if self._feeds is None:
            self._feeds = _sample_feeds(self.graph)
        return self._feeds

    def rotary_caches(self, cos: np.ndarray, sin: np.ndarray) -> tuple[ir.Value, ir.Value]:
        key = (cos.tobytes(), sin.tobytes())
        if key not in self._caches:
            suffix = "" if not self._caches else f"_{len(self._caches)}"
            self._caches[key] = (self._initializer(f"cos_cache{suffix}", cos),
                                 self._initializer(f"sin_cache{suffix}", sin))
        return self._caches[key]

    def _initializer(self, name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        value.shape, value.type = ir.Shape(array.shape), ir.TensorType(ir.DataType.FLOAT)
        self.graph.register_initializer(value)
        return value

    def lengths(self) -> tuple[ir.Value, ir.Value]:
        """seqlens_k = sum(attention_mask) - 1 per row, total_sequence_length = attention_mask's width (int32),
        computed at the top of the graph."""
        if self._lengths is None:
            mask = next(v for v in self.graph.inputs if v.name == "attention_mask")
            axis = ir.tensor(np.array([1], dtype=np.int64))
            one = ir.tensor(np.array(1, dtype=np.int64))
            nodes = [
                axes := ir.node("Constant", [], attributes={"value": axis}),
                total := ir.node("ReduceSum", [mask, axes.outputs[0]], attributes={"keepdims": 0}),
                unit := ir.node("Constant", [], attributes={"value": one}),
                last := ir.node("Sub", [total.outputs[0], unit.outputs[0]]),
                seqlens := ir.node("Cast", [last.outputs[0]], attributes={"to": ir.DataType.INT32}),
                shape := ir.node("Shape", [mask], attributes={"start": 1, "end": 2}),
                width := ir.node("Cast", [shape.outputs[0]], attributes={"to": ir.DataType.INT32}),
            ]
            self.graph.insert_before(next(iter(self.graph)), nodes)
            seqlens.outputs[0].name, width.outputs[0].name = "seqlens_k", "total_sequence_length"
            seqlens.outputs[0].dtype = width.outputs[0].dtype = ir.DataType.INT32
            self._lengths = seqlens.outputs[0], width.outputs[0]
        return self._lengths


class FuseGroupQueryAttention(RulesPass):
    name = "fuse-gqa"

    def __init__(self, max_positions: int):
        self.max_positions = max_positions

    def rules(self, model: ir.Model) -> list:
        self.shared = GroupQueryAttentionInputs(model.graph, self.max_positions)
        return [GroupQueryAttentionRule.rule(self.shared)]

    def replaced(self, graph: ir.Graph, replacement) -> None:
        for old, new in self.shared.presents:
            replace_value(old, new)
        self.shared.presents = []

    def apply(self, model: ir.Model) -> int:
        sites = super().apply(model)  # which also removes what nothing reads now (the rule keeps matched nodes)
        self.shared = None  # the graph is not kept reachable through the pass
        return sites
