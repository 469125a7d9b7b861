"""Attention fusion for ONNX Runtime: the traced Attention block becomes one com.microsoft GroupQueryAttention.

Upstream of an opset-23 `Attention` the tracer leaves: rotary embedding of Q and K, the KV-cache Concat, the
repetition of K/V heads for grouped queries, and a mask built from `attention_mask`. GroupQueryAttention does all of
that in one kernel, with rotary tables indexed by position and the cache handled by the runtime. Nothing here trusts
node names: structure is matched by walking producers, and what structure cannot show (the mask is causal with
padding, the head repetition is repeat-interleave, the rotary tables) is proven by running those subgraphs on sample
inputs. A site that fails any check is left as it was."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase

from llama_export.names import MS_DOMAIN
from llama_export.passes.base import GraphPass, RulesPass, constant_scalar, replace_value
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

    def rules(self) -> list:
        return [RotateHalf.rule()]


def _producer(value: ir.Value | None, op_type: str, domain: str = "") -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is not None and node.op_type == op_type and node.domain == domain:
        return node
    return None


def _sole_consumer(value: ir.Value, op_type: str) -> ir.Node | None:
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None
    node = uses[0][0]
    return node if node.op_type == op_type and node.domain == "" else None


def _perm(node: ir.Node) -> list[int]:
    return list(node.attributes.get_ints("perm", []))


def _heads_projection(value: ir.Value) -> ir.Value | None:
    """[B,S,N*D] -> Reshape [B,S,N,D] -> Transpose [B,N,S,D]: the projection's output, or None."""
    transpose = _producer(value, "Transpose")
    if transpose is None or _perm(transpose) != [0, 2, 1, 3]:
        return None
    reshape = _producer(transpose.inputs[0], "Reshape")
    if reshape is None:
        return None
    flat = reshape.inputs[0]
    if flat.shape is None or len(flat.shape) != 3 or not isinstance(flat.shape[2], int):
        return None
    return flat


def _rotary(value: ir.Value, head_dim: int) -> ir.Node | None:
    node = _producer(value, "RotaryEmbedding")
    if node is None or len(node.inputs) != 3 or node.attributes.get_int("interleaved", 0) != 0:
        return None
    if node.attributes.get_int("rotary_embedding_dim", head_dim) not in (0, head_dim):
        return None
    return node


def _cache_concat(value: ir.Value) -> ir.Node | None:
    """The KV-cache Concat(past, new, axis=2) behind a head-repetition chain of shape-only ops."""
    while True:
        concat = _producer(value, "Concat")
        if concat is not None:
            break
        node = value.producer()
        if node is None or node.domain != "" or node.op_type not in ("Reshape", "Expand", "Unsqueeze", "Slice"):
            return None
        value = node.inputs[0]
    axis = concat.attributes.get_int("axis", 0)
    if len(concat.inputs) != 2 or axis not in (2, -2) or not concat.inputs[0].is_graph_input():
        return None
    return concat


@dataclass
class AttentionSite:
    attention: ir.Node
    query: ir.Value  # [B,S,H*D]
    key: ir.Value  # [B,S,Hkv*D]
    value: ir.Value
    key_concat: ir.Node
    value_concat: ir.Node
    rotary: ir.Node  # the query's; the key's uses the same tables (checked)
    output: ir.Value  # [B,S,H*D], what the attention block hands to o_proj
    num_heads: int
    kv_heads: int
    head_dim: int


def _match(node: ir.Node) -> AttentionSite | None:
    if node.op_type != "Attention" or node.domain != "" or len(node.inputs) not in (3, 4):
        return None
    if any(len(o.uses()) or o.is_graph_output() for o in node.outputs[1:]):
        return None
    if node.attributes.get_int("is_causal", 0) or node.attributes.get_float("softcap", 0.0):
        return None
    if node.attributes.get_int("qk_matmul_output_mode", 0):
        return None
    q_rotated, k_repeated, v_repeated = node.inputs[:3]
    if q_rotated.shape is None or len(q_rotated.shape) != 4:
        return None
    num_heads, head_dim = q_rotated.shape[1], q_rotated.shape[3]
    if not isinstance(num_heads, int) or not isinstance(head_dim, int):
        return None
    q_rotary = _rotary(q_rotated, head_dim)
    key_concat, value_concat = _cache_concat(k_repeated), _cache_concat(v_repeated)
    if q_rotary is None or key_concat is None or value_concat is None:
        return None
    k_rotary = _rotary(key_concat.inputs[1], head_dim)
    if k_rotary is None:
        return None
    query = _heads_projection(q_rotary.inputs[0])
    key = _heads_projection(k_rotary.inputs[0])
    value = _heads_projection(value_concat.inputs[1])
    if query is None or key is None or value is None:
        return None
    kv_heads = key.shape[2] // head_dim
    if query.shape[2] != num_heads * head_dim or value.shape[2] != kv_heads * head_dim or num_heads % kv_heads:
        return None
    out_transpose = _sole_consumer(node.outputs[0], "Transpose")
    if out_transpose is None or _perm(out_transpose) != [0, 2, 1, 3]:
        return None
    out_reshape = _sole_consumer(out_transpose.outputs[0], "Reshape")
    if out_reshape is None:
        return None
    output = out_reshape.outputs[0]
    if output.shape is None or len(output.shape) != 3 or output.shape[2] != num_heads * head_dim:
        return None
    return AttentionSite(node, query, key, value, key_concat, value_concat, q_rotary, output, num_heads, kv_heads,
                         head_dim)


# Sample sizes for proving subgraphs: batch 2 (row 0 left-padded), 3 new tokens after 4 cached ones.
_B, _S, _P = 2, 3, 4


def _sample_feeds(model: ir.Model) -> dict[str, np.ndarray]:
    mask = np.ones((_B, _P + _S), dtype=np.int64)
    mask[0, :2] = 0
    feeds = {
        "input_ids": np.zeros((_B, _S), dtype=np.int64),
        "attention_mask": mask,
        "position_ids": np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, _P:],
    }
    for value in model.graph.inputs:
        if value.name not in feeds and value.shape is not None and len(value.shape) == 4:
            kv_heads, head_dim = value.shape[1], value.shape[3]
            feeds[value.name] = np.zeros((_B, kv_heads, _P, head_dim), dtype=np.float32)
    return feeds


def _mask_is_causal_with_padding(model: ir.Model, site: AttentionSite, feeds) -> bool:
    if len(site.attention.inputs) < 4 or site.attention.inputs[3] is None:
        return False
    try:
        (mask,) = evaluate(model, [site.attention.inputs[3]], feeds)
    except NotEvaluable:
        return False
    rows = np.arange(_S)[:, None] + _P
    allowed = (np.arange(_P + _S)[None, :] <= rows)[None, None] & (feeds["attention_mask"][:, None, None, :] == 1)
    if mask.dtype == bool:
        return mask.shape == allowed.shape and bool(np.array_equal(mask, allowed))
    mask = np.broadcast_to(mask, allowed.shape)
    return bool(np.all(mask[allowed] == 0) and np.all(mask[~allowed] < -1e4))


def _repeats_heads(model: ir.Model, site: AttentionSite, feeds) -> bool:
    """The K/V fed to Attention are the cache with each KV head repeated num_heads/kv_heads times in place."""
    group = site.num_heads // site.kv_heads
    rng = np.random.default_rng(0)
    pairs = ((site.key_concat, site.attention.inputs[1]), (site.value_concat, site.attention.inputs[2]))
    for concat, repeated in pairs:
        cache = rng.standard_normal((_B, site.kv_heads, _P + _S, site.head_dim)).astype(np.float32)
        try:
            (result,) = evaluate(model, [repeated], {**feeds, concat.outputs[0].name: cache})
        except NotEvaluable:
            return False
        if not np.array_equal(result, np.repeat(cache, group, axis=1)):
            return False
    return True


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


class FuseGroupQueryAttention(GraphPass):
    name = "fuse-gqa"

    def __init__(self, max_positions: int):
        self.max_positions = max_positions

    def apply(self, model: ir.Model) -> int:
        graph = model.graph
        sites = [site for node in list(graph) if (site := _match(node)) is not None]
        if not sites or "attention_mask" not in {v.name for v in graph.inputs}:
            return 0
        feeds = _sample_feeds(model)
        proven, tables = [], {}
        for site in sites:
            if not (_mask_is_causal_with_padding(model, site, feeds) and _repeats_heads(model, site, feeds)):
                continue
            k_rotary = site.key_concat.inputs[1].producer()
            both = [_rotary_tables(model, r, self.max_positions) for r in (site.rotary, k_rotary)]
            if both[0] is None or both[1] is None or not all(np.array_equal(a, b) for a, b in zip(*both)):
                continue
            key = (both[0][0].tobytes(), both[0][1].tobytes())
            tables.setdefault(key, both[0])
            proven.append((site, key))
        if not proven:
            return 0
        seqlens_k, total_length = self._length_inputs(graph)
        caches = {}
        for i, (key, (cos, sin)) in enumerate(tables.items()):
            suffix = "" if i == 0 else f"_{i}"
            caches[key] = (self._initializer(graph, f"cos_cache{suffix}", cos),
                           self._initializer(graph, f"sin_cache{suffix}", sin))
        for site, key in proven:
            self._rewrite(graph, site, seqlens_k, total_length, *caches[key])
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        common.RemoveUnusedNodesPass()(model)
        return len(proven)

    @staticmethod
    def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        value.shape, value.type = ir.Shape(array.shape), ir.TensorType(ir.DataType.FLOAT)
        graph.register_initializer(value)
        return value

    @staticmethod
    def _length_inputs(graph: ir.Graph) -> tuple[ir.Value, ir.Value]:
        """seqlens_k = sum(attention_mask) - 1 per row, total_sequence_length = attention_mask's width (int32)."""
        mask = next(v for v in graph.inputs if v.name == "attention_mask")
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
        graph.insert_before(next(iter(graph)), nodes)
        seqlens.outputs[0].name, width.outputs[0].name = "seqlens_k", "total_sequence_length"
        seqlens.outputs[0].dtype = width.outputs[0].dtype = ir.DataType.INT32
        return seqlens.outputs[0], width.outputs[0]

    @staticmethod
    def _rewrite(graph, site: AttentionSite, seqlens_k, total_length, cos_cache, sin_cache) -> None:
        scale = site.attention.attributes.get_float("scale", 1.0 / math.sqrt(site.head_dim))
        past_key, past_value = site.key_concat.inputs[0], site.value_concat.inputs[0]
        gqa = ir.node(
            "GroupQueryAttention",
            [site.query, site.key, site.value, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache],
            attributes={"num_heads": site.num_heads, "kv_num_heads": site.kv_heads, "do_rotary": 1,
                        "rotary_interleaved": 0, "scale": scale},
            domain=MS_DOMAIN,
            num_outputs=3,
        )
        graph.insert_before(site.attention, gqa)
        output, present_key, present_value = gqa.outputs
        replace_value(site.output, output)
        replace_value(site.key_concat.outputs[0], present_key)
        replace_value(site.value_concat.outputs[0], present_value)
