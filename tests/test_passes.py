"""The passes: counts of what they rewrite, unchanged numbers, and weights never read during a pass."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from llama_export.passes import run_passes
from llama_export.passes.cleanup import FoldConstants, FoldWeightTransposes, RemoveDeadNodes


def _graph_with_weight(loads: list[str]):
    """y = x @ Transpose(W) + (Shape-based constant junk), W a lazy weight that records when it is read."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((96, 128)).astype(np.float32)

    def load():
        loads.append("W")
        return ir.Tensor(weight)

    x = ir.Value(name="x", shape=ir.Shape([2, 128]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(name="W", const_value=ir.LazyTensor(load, dtype=ir.DataType.FLOAT, shape=ir.Shape([96, 128])))
    w.shape, w.type = ir.Shape([96, 128]), ir.TensorType(ir.DataType.FLOAT)
    t = ir.node("Transpose", [w], attributes={"perm": [1, 0]})
    mm = ir.node("MatMul", [x, t.outputs[0]])
    one = ir.node("Constant", [], attributes={"value": ir.tensor(np.array([1.0], dtype=np.float32))})
    two = ir.node("Add", [one.outputs[0], one.outputs[0]])
    scaled = ir.node("Mul", [mm.outputs[0], two.outputs[0]])
    dead = ir.node("Neg", [x])
    nodes = [t, mm, one, two, scaled, dead]
    scaled.outputs[0].name = "y"
    graph = ir.Graph([x], [scaled.outputs[0]], nodes=nodes, initializers=[w], opset_imports={"": 23})
    return ir.Model(graph, ir_version=10), weight


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_cleanup_passes_count_sites_and_never_read_weights():
    loads: list[str] = []
    model, weight = _graph_with_weight(loads)
    x = np.random.default_rng(1).standard_normal((2, 128)).astype(np.float32)
    reports = run_passes(model, [FoldWeightTransposes(), FoldConstants(), RemoveDeadNodes()])
    assert loads == [], "a pass read a weight"
    sites = {r.name: r.sites for r in reports}
    assert sites["fold-weight-transposes"] == 1
    assert sites["fold-constants"] >= 1  # the Constant+Add feeding Mul
    assert sites["remove-dead-nodes"] >= 0
    ops = [n.op_type for n in model.graph]
    assert "Transpose" not in ops and "Neg" not in ops and ops.count("MatMul") == 1
    assert model.graph.initializers["W"].const_value.shape == ir.Shape([128, 96])
    np.testing.assert_allclose(_run(model, x), (x @ weight.T) * 2, rtol=1e-5, atol=1e-5)
    assert loads == ["W"]  # read once, when serialized


def test_weight_read_both_ways_is_stored_once():
    """A tied embedding: stored transposed for the MatMul, the Gather reads it through a load-time Transpose."""
    loads: list[str] = []
    model, weight = _graph_with_weight(loads)
    w = model.graph.initializers["W"]
    idx = ir.Value(name="idx", const_value=ir.tensor(np.array([0, 2], dtype=np.int64)))
    gather = ir.node("Gather", [w, idx])
    model.graph.append(gather)
    model.graph.outputs.append(gather.outputs[0])
    gather.outputs[0].name = "rows"
    model.graph.register_initializer(idx)
    assert FoldWeightTransposes().apply(model) == 1
    assert [v.name for v in model.graph.initializers.values() if v.const_value.size > 2] == ["W"]
    assert model.graph.initializers["W"].const_value.shape == ir.Shape([128, 96])
    assert gather.inputs[0].producer().op_type == "Transpose"
    assert loads == []
    x = np.random.default_rng(1).standard_normal((2, 128)).astype(np.float32)
    proto = ir.serde.serialize_model(model)
    y, rows = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(rows, weight[[0, 2]], rtol=0, atol=0)
    np.testing.assert_allclose(y, (x @ weight.T) * 2, rtol=1e-5, atol=1e-5)


def test_unrecognised_graph_is_unchanged():
    x = ir.Value(name="x", shape=ir.Shape([3]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.node("Relu", [x])
    node.outputs[0].name = "y"
    model = ir.Model(ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 23}), ir_version=10)
    reports = run_passes(model, [FoldWeightTransposes(), FoldConstants(), RemoveDeadNodes()])
    assert [r.sites for r in reports] == [0, 0, 0]
    assert [n.op_type for n in model.graph] == ["Relu"]
