"""Routed experts lowered for a runtime: the trace's RoutedExperts node (names.ROUTED_EXPERTS gives its meaning)
becomes ONNX Runtime's com.microsoft MoE (float experts) or QMoE (4-bit experts), or, for runtimes without those
kernels (TensorRT's parser), standard ops that group the tokens by expert and run each expert's matrices over its
group. No form computes the experts a token was not routed to.

ONNX Runtime's kernels pick the top-1 expert from the router logits and, with k=1 and normalized routing weights,
weigh its output by exactly 1: the sigmoid score transformers applies to the expert's input is already in the
node's input. The CPU kernels take the fused gate/up weight with gate and up rows interleaved (swiglu_fusion=1),
each expert's weights as [out, in]."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from llama_export.names import EXPORT_DOMAIN, MS_DOMAIN, ROUTED_EXPERTS, ROW_READER
from llama_export.passes.base import GraphPass

FORMS = ("moe", "qmoe", "sorted")


def routed_experts_nodes(graph: ir.Graph) -> list[ir.Node]:
    return [node for node in graph if node.domain == EXPORT_DOMAIN and node.op_type == ROUTED_EXPERTS]


class PerExpertTensor(ir.LazyTensor):
    """A tensor [experts, ...] computed from a stacked [experts, ...] weight one expert at a time: `fn` maps one
    expert's source values to its part. Written expert by expert (`tofile`), so no whole stack sits in memory;
    numpy() still builds it whole, for readers that need it."""

    __slots__ = ("experts", "fn", "read")

    def __init__(self, source: ir.Value, fn, dtype: ir.DataType, shape, name: str):
        super().__init__(self._whole, dtype=dtype, shape=ir.Shape(shape), name=name)
        self.read, self.experts, self.fn = _expert_reader(source), shape[0], fn

    def part(self, expert: int) -> np.ndarray:
        values = self.fn(np.asarray(self.read(expert), np.float32))
        return np.ascontiguousarray(values, dtype=self.dtype.numpy())

    def _whole(self) -> ir.Tensor:
        return ir.Tensor(np.stack([self.part(e) for e in range(self.experts)]), name=self.name)

    def tofile(self, file) -> None:
        for expert in range(self.experts):
            file.write(self.part(expert).view(np.uint8).data)


def _expert_reader(stacked: ir.Value):
    """expert -> its slice of a stacked weight, read alone where the source can read along its first axis."""
    read_rows = stacked.meta.get(ROW_READER)
    if read_rows is not None:
        return lambda expert: read_rows(expert, expert + 1)[0]
    tensor = stacked.const_value
    return lambda expert: tensor.numpy()[expert]


def interleaved_gate_up(gate_up: np.ndarray) -> np.ndarray:
    """One expert's [hidden, 2*inter] gate_up (gate columns, then up) as MoE's fc1: [2*inter, hidden], gate and up
    rows alternating."""
    hidden, double = gate_up.shape
    out = np.empty((double, hidden), np.float32)
    out[0::2], out[1::2] = gate_up[:, :double // 2].T, gate_up[:, double // 2:].T
    return out


def quantize_experts(weights: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """[..., out, in] float -> (packed uint8 [..., out, in/2], float32 scales [..., out, in/block]): symmetric
    4-bit, stored with an offset of 8, two per byte (low nibble first), as QMoE reads them."""
    blocks = weights.reshape(*weights.shape[:-1], weights.shape[-1] // block_size, block_size)
    peak = np.abs(blocks).max(axis=-1)
    scales = np.where(peak > 0, peak / 7.0, 1.0).astype(np.float32)
    values = np.clip(np.rint(blocks / scales[..., None]), -8, 7).astype(np.int16) + 8
    values = values.reshape(weights.shape).astype(np.uint8)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8), scales


def _weight(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype))
    graph.register_initializer(value)
    return value


def _expert_matrix(stacked: ir.Value, expert: int) -> ir.LazyTensor:
    """One expert's [in, out] matrix of a stacked [experts, in, out] weight."""
    read, name = _expert_reader(stacked), f"{stacked.name}.{expert}"

    def load() -> ir.Tensor:
        return ir.Tensor(np.ascontiguousarray(read(expert), np.float32), name=name)

    return ir.LazyTensor(load, dtype=ir.DataType.FLOAT, shape=ir.Shape(stacked.const_value.shape[1:]), name=name)


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
            lower = {"moe": self._moe, "qmoe": self._qmoe, "sorted": self._sorted}[self.form]
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
        experts, hidden, double = gate_up.const_value.shape
        fc1 = _weight(graph, f"{gate_up.name}.interleaved", PerExpertTensor(
            gate_up, interleaved_gate_up, ir.DataType.FLOAT, [experts, double, hidden], f"{gate_up.name}.interleaved"))
        fc2 = _weight(graph, f"{down.name}.transposed", PerExpertTensor(
            down, np.transpose, ir.DataType.FLOAT, [experts, hidden, double // 2], f"{down.name}.transposed"))
        moe = ir.node("MoE", [x, logits, fc1, None, fc2], attributes=self._attributes(), domain=MS_DOMAIN)
        return [moe], moe.outputs[0]

    def _qmoe(self, graph, x, logits, gate_up, down):
        experts, hidden, double = gate_up.const_value.shape
        inter, block = double // 2, self.block_size
        if hidden % block or inter % block:
            raise ValueError(f"{gate_up.name}: hidden {hidden} and expert width {inter} must be multiples of the "
                             f"block size {block}")
        weights = []
        for source, transform, rows, columns in ((gate_up, interleaved_gate_up, double, hidden),
                                                 (down, np.transpose, hidden, inter)):
            # the codes and the scales each read the source again, one expert at a time, rather than hold one
            # while the other is written
            def part(index, transform=transform):
                return lambda w: quantize_experts(transform(w), block)[index]
            weights.append(_weight(graph, f"{source.name}.q4", PerExpertTensor(
                source, part(0), ir.DataType.UINT8, [experts, rows, columns // 2], f"{source.name}.q4")))
            weights.append(_weight(graph, f"{source.name}.scales", PerExpertTensor(
                source, part(1), ir.DataType.FLOAT, [experts, rows, columns // block], f"{source.name}.scales")))
        fc1, fc1_scales, fc2, fc2_scales = weights
        qmoe = ir.node("QMoE", [x, logits, fc1, fc1_scales, None, fc2, fc2_scales],
                       attributes=self._attributes(expert_weight_bits=4, block_size=block), domain=MS_DOMAIN)
        return [qmoe], qmoe.outputs[0]

    def _sorted(self, graph, x, logits, gate_up, down):
        """Standard ops: the tokens reordered so each expert's are contiguous, every expert a MatMul pair over its
        slice (empty for an expert no token chose: its weights are not read), the results put back in order. Each
        expert's weights are initializers of their own, plain [in, out] matrices that quantize like any layer's."""
        experts, _, double = gate_up.const_value.shape
        inter = double // 2
        nodes = []

        def add(op, inputs, **attributes):
            node = ir.node(op, inputs, attributes=attributes)
            nodes.append(node)
            return node.outputs[0]

        def const(values):
            return add("Constant", [], value=ir.tensor(np.array(values, np.int64)))

        axis_0, axis_1, last = const([0]), const([1]), const([-1])
        scalar_0 = add("Constant", [], value=ir.tensor(np.array(0, np.int64)))  # CumSum's axis is a scalar
        chosen = add("ArgMax", [logits], axis=-1, keepdims=0)  # [tokens]
        one_hot = add("Cast", [add("Equal", [add("Unsqueeze", [chosen, axis_1]), const(list(range(experts)))])],
                      to=ir.DataType.INT64)  # [tokens, experts]
        counts = add("ReduceSum", [one_hot, axis_0], keepdims=0)  # [experts]
        ends = add("CumSum", [counts, scalar_0])
        starts = add("Sub", [ends, counts])
        # where each token goes: its expert's first slot plus how many tokens before it chose the same expert
        rank = add("Sub", [add("CumSum", [one_hot, scalar_0]), const([1])])
        slot = add("ReduceSum", [add("Mul", [add("Add", [rank, starts]), one_hot]), last], keepdims=0)
        slots = add("Unsqueeze", [slot, last])  # [tokens, 1]
        grouped = add("ScatterND", [x, slots, x])
        outputs = []
        for expert in range(experts):
            first = add("Slice", [starts, const([expert]), const([expert + 1])])
            stop = add("Slice", [ends, const([expert]), const([expert + 1])])
            rows = add("Slice", [grouped, first, stop, axis_0])
            w1 = _weight(graph, f"{gate_up.name}.{expert}", _expert_matrix(gate_up, expert))
            w2 = _weight(graph, f"{down.name}.{expert}", _expert_matrix(down, expert))
            both = add("MatMul", [rows, w1])
            gate = add("Slice", [both, const([0]), const([inter]), last])
            up = add("Slice", [both, const([inter]), const([double]), last])
            product = add("Mul", [add("Mul", [gate, add("Sigmoid", [gate])]), up])
            outputs.append(add("MatMul", [product, w2]))
        concatenated = add("Concat", outputs, axis=0)
        return nodes, add("Gather", [concatenated, slot], axis=0)


def dequantize_experts(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """quantize_experts' output back to float32 [experts, out, in]."""
    values = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.float32)
    values[..., 0::2] = packed & 0x0F
    values[..., 1::2] = packed >> 4
    block = values.shape[-1] // scales.shape[-1]
    return ((values - 8).reshape(*scales.shape, block) * scales[..., None]).reshape(values.shape)


def deinterleaved_gate_up(fc1: np.ndarray) -> np.ndarray:
    """interleaved_gate_up undone for every expert: [experts, 2*inter, hidden] -> [experts, hidden, 2*inter]."""
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
