"""Routed experts lowered for a runtime: the trace's RoutedExperts node (names.ROUTED_EXPERTS gives its meaning)
becomes ONNX Runtime's com.microsoft MoE (float experts) or QMoE (4-bit experts), or, for runtimes without those
kernels (TensorRT's parser), standard ops that gather the chosen expert's weights per token. No form computes the
experts a token was not routed to.

ONNX Runtime's kernels pick the top-1 expert from the router logits and, with k=1 and normalized routing weights,
weigh its output by exactly 1: the sigmoid score transformers applies to the expert's input is already in the
node's input. The CPU kernels take the fused gate/up weight with gate and up rows interleaved (swiglu_fusion=1),
each expert's weights as [out, in]."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from llama_export.names import EXPORT_DOMAIN, MS_DOMAIN, ROUTED_EXPERTS
from llama_export.passes.base import GraphPass
from llama_export.passes.cleanup import lazy_transform

FORMS = ("moe", "qmoe", "gather")


def routed_experts_nodes(graph: ir.Graph) -> list[ir.Node]:
    return [node for node in graph if node.domain == EXPORT_DOMAIN and node.op_type == ROUTED_EXPERTS]


def interleaved_gate_up(gate_up: np.ndarray) -> np.ndarray:
    """[experts, hidden, 2*inter] (gate columns, then up) -> [experts, 2*inter, hidden], gate and up rows
    alternating."""
    experts, hidden, double = gate_up.shape
    inter = double // 2
    out = np.empty((experts, double, hidden), np.float32)
    out[:, 0::2] = gate_up[:, :, :inter].transpose(0, 2, 1)
    out[:, 1::2] = gate_up[:, :, inter:].transpose(0, 2, 1)
    return out


def quantize_experts(weights: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """[experts, out, in] float -> (packed uint8 [experts, out, in/2], float32 scales [experts, out, in/block]):
    symmetric 4-bit, stored with an offset of 8, two per byte (low nibble first), as QMoE reads them."""
    experts, rows, columns = weights.shape
    blocks = weights.reshape(experts, rows, columns // block_size, block_size)
    peak = np.abs(blocks).max(axis=-1)
    scales = np.where(peak > 0, peak / 7.0, 1.0).astype(np.float32)
    values = np.clip(np.rint(blocks / scales[..., None]), -8, 7).astype(np.int16) + 8
    values = values.reshape(experts, rows, columns).astype(np.uint8)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8), scales


def _weight(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype))
    graph.register_initializer(value)
    return value


def _unregister_unread(graph: ir.Graph, values: list[ir.Value]) -> None:
    for value in values:
        if value.is_initializer() and not value.uses():
            graph.initializers.pop(value.name)


class LowerRoutedExperts(GraphPass):
    """Every RoutedExperts node -> the form's ops. `block_size` is QMoE's (weights per scale along the input)."""

    name = "lower-routed-experts"

    def __init__(self, form: str, block_size: int = 32):
        if form not in FORMS:
            raise ValueError(f"routed experts form {form!r}: one of {', '.join(FORMS)}")
        self.form, self.block_size = form, block_size

    def apply(self, model: ir.Model) -> int:
        graph = model.graph
        nodes = routed_experts_nodes(graph)
        for node in nodes:
            x, logits, gate_up, down = node.inputs
            if gate_up.const_value is None or down.const_value is None:
                raise ValueError(f"{node.name}: the experts' weights are not initializers")
            lower = {"moe": self._moe, "qmoe": self._qmoe, "gather": self._gather}[self.form]
            new_nodes, out = lower(graph, x, logits, gate_up, down)
            out.shape, out.type = node.outputs[0].shape, node.outputs[0].type
            graph.insert_after(node, new_nodes)
            node.outputs[0].replace_all_uses_with(out)
            if node.outputs[0].is_graph_output():
                raise ValueError(f"{node.name}: a routed-experts output is a graph output")
            graph.remove(node, safe=True)
            _unregister_unread(graph, [gate_up, down])
        return len(nodes)

    @staticmethod
    def _attributes(**more) -> dict:
        return {"k": 1, "normalize_routing_weights": 1, "activation_type": "swiglu", "swiglu_fusion": 1,
                "activation_alpha": 1.0, "activation_beta": 0.0, **more}

    def _moe(self, graph, x, logits, gate_up, down):
        source_up, source_down = gate_up.const_value, down.const_value
        experts, hidden, double = source_up.shape
        name = f"{gate_up.name}.interleaved"
        fc1 = _weight(graph, name, lazy_transform([source_up], interleaved_gate_up, ir.DataType.FLOAT,
                                                  [experts, double, hidden], name))
        fc2 = _weight(graph, f"{down.name}.transposed", lazy_transform(
            [source_down], lambda w: w.transpose(0, 2, 1), ir.DataType.FLOAT, [experts, hidden, double // 2],
            f"{down.name}.transposed"))
        moe = ir.node("MoE", [x, logits, fc1, None, fc2], attributes=self._attributes(), domain=MS_DOMAIN)
        return [moe], moe.outputs[0]

    def _qmoe(self, graph, x, logits, gate_up, down):
        source_up, source_down = gate_up.const_value, down.const_value
        experts, hidden, double = source_up.shape
        inter = double // 2
        block = self.block_size
        if hidden % block or inter % block:
            raise ValueError(f"{gate_up.name}: hidden {hidden} and expert width {inter} must be multiples of the "
                             f"block size {block}")
        weights = []
        for source, name, transform, rows, columns in (
                (source_up, gate_up.name, interleaved_gate_up, double, hidden),
                (source_down, down.name, lambda w: w.transpose(0, 2, 1), hidden, inter)):
            def part(index, source=source, transform=transform):
                return lambda w: quantize_experts(transform(w), block)[index]
            weights.append(_weight(graph, f"{name}.q4", lazy_transform(
                [source], part(0), ir.DataType.UINT8, [experts, rows, columns // 2], f"{name}.q4")))
            weights.append(_weight(graph, f"{name}.scales", lazy_transform(
                [source], part(1), ir.DataType.FLOAT, [experts, rows, columns // block], f"{name}.scales")))
        fc1, fc1_scales, fc2, fc2_scales = weights
        qmoe = ir.node("QMoE", [x, logits, fc1, fc1_scales, None, fc2, fc2_scales],
                       attributes=self._attributes(expert_weight_bits=4, block_size=block), domain=MS_DOMAIN)
        return [qmoe], qmoe.outputs[0]

    def _gather(self, graph, x, logits, gate_up, down):
        """Standard ops: the chosen expert index per token, that expert's weights gathered, batched MatMuls."""
        inter = gate_up.const_value.shape[2] // 2

        def const(values):
            return ir.node("Constant", [], attributes={"value": ir.tensor(np.array(values, np.int64))})

        axes_1, starts, middles, ends, last = const([1]), const([0]), const([inter]), const([2 * inter]), const([2])
        chosen = ir.node("ArgMax", [logits], attributes={"axis": -1, "keepdims": 0})
        rows = ir.node("Unsqueeze", [x, axes_1.outputs[0]])  # [tokens, 1, hidden]
        w1 = ir.node("Gather", [gate_up, chosen.outputs[0]], attributes={"axis": 0})  # [tokens, hidden, 2*inter]
        both = ir.node("MatMul", [rows.outputs[0], w1.outputs[0]])
        gate = ir.node("Slice", [both.outputs[0], starts.outputs[0], middles.outputs[0], last.outputs[0]])
        up = ir.node("Slice", [both.outputs[0], middles.outputs[0], ends.outputs[0], last.outputs[0]])
        sigmoid = ir.node("Sigmoid", [gate.outputs[0]])
        silu = ir.node("Mul", [gate.outputs[0], sigmoid.outputs[0]])
        product = ir.node("Mul", [silu.outputs[0], up.outputs[0]])
        w2 = ir.node("Gather", [down, chosen.outputs[0]], attributes={"axis": 0})  # [tokens, inter, hidden]
        out = ir.node("MatMul", [product.outputs[0], w2.outputs[0]])
        flat = ir.node("Squeeze", [out.outputs[0], axes_1.outputs[0]])
        new_nodes = [axes_1, starts, middles, ends, last, chosen, rows, w1, both, gate, up, sigmoid, silu, product,
                     w2, out, flat]
        return new_nodes, flat.outputs[0]


def dequantize_experts(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """quantize_experts' output back to float32 [experts, out, in]."""
    values = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.float32)
    values[..., 0::2] = packed & 0x0F
    values[..., 1::2] = packed >> 4
    block = values.shape[-1] // scales.shape[-1]
    return ((values - 8).reshape(*scales.shape, block) * scales[..., None]).reshape(values.shape)


def deinterleaved_gate_up(fc1: np.ndarray) -> np.ndarray:
    """interleaved_gate_up undone: [experts, 2*inter, hidden] -> [experts, hidden, 2*inter]."""
    return np.concatenate([fc1[:, 0::2], fc1[:, 1::2]], axis=1).transpose(0, 2, 1)


def quantized_experts(graph: ir.Graph) -> dict[str, callable]:
    """Checkpoint name of each QMoE's expert tensor -> a loader of its dequantized values in the checkpoint's layout
    (what the package computes with)."""
    loaders = {}
    for node in graph:
        if node.op_type != "QMoE" or node.domain != MS_DOMAIN:
            continue
        fc1, fc1_scales, fc2, fc2_scales = (node.inputs[i] for i in (2, 3, 5, 6))
        loaders[fc1.name.removesuffix(".q4")] = lambda a=fc1, b=fc1_scales: deinterleaved_gate_up(
            dequantize_experts(a.const_value.numpy(), b.const_value.numpy()))
        loaders[fc2.name.removesuffix(".q4")] = lambda a=fc2, b=fc2_scales: dequantize_experts(
            a.const_value.numpy(), b.const_value.numpy()).transpose(0, 2, 1)
    return loaders
