"""Activation-aware input scaling (passes/scaling.py): the float graph computes the same outputs after it, it
lowers the quantized output error where inputs are uneven, and it leaves sites it cannot prove alone."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from llama_export.names import INPUT_SCALE, SOURCE_NAMES
from llama_export.passes.block_quantized import quantize_rtn
from llama_export.passes.scaling import ScaleNormedInputs, choose_input_scale

K, N, V = 64, 48, 40


class Hints:
    def __init__(self, hessian):
        self.h = hessian

    def hessian(self, name):
        return self.h

    def has_hessian(self, name):
        return True

    def prequantized_layout(self, name):
        return None


def _uneven_inputs(seed=0):
    rng = np.random.default_rng(seed)
    energy = np.exp(rng.normal(0, 1.5, K))  # a few input channels carry most of the energy
    x = rng.standard_normal((512, K)) * np.sqrt(energy)
    return rng, x, (x.T @ x / len(x)).astype(np.float32)


def _graph(rng, extra_norm_use=False):
    """ids -> Gather(Transpose(W)) -> RMSNorm -> MatMul(W): a tied lm_head over one norm."""
    w = rng.standard_normal((K, N)).astype(np.float32)
    table = rng.standard_normal((V, K)).astype(np.float32)
    gamma = (1 + 0.1 * rng.standard_normal(K)).astype(np.float32)
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1, 3]))
    head = ir.Value(name="head", const_value=ir.tensor(np.concatenate([w, table.T], axis=1)))
    head.meta[SOURCE_NAMES] = ["lm_head.weight"]
    g = ir.Value(name="gamma", const_value=ir.tensor(gamma))
    transpose = ir.node("Transpose", [head], attributes={"perm": [1, 0]})
    gather = ir.node("Gather", [transpose.outputs[0], ids], attributes={"axis": 0})
    norm = ir.node("SimplifiedLayerNormalization", [gather.outputs[0], g], domain="",
                   attributes={"axis": -1, "epsilon": 1e-5})
    matmul = ir.node("MatMul", [norm.outputs[0], head])
    nodes = [transpose, gather, norm, matmul]
    outputs = [matmul.outputs[0]]
    if extra_norm_use:
        other = ir.node("Relu", [norm.outputs[0]])
        nodes.append(other)
        outputs.append(other.outputs[0])
    for i, value in enumerate(outputs):
        value.name, value.type = f"out{i}", ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([ids], outputs, nodes=nodes, initializers=[head, g], opset_imports={"": 23})
    return ir.Model(graph, ir_version=10)


def _run(model, ids):
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"ids": ids})


def test_scaling_keeps_the_float_model_and_unscales_the_tied_lookup():
    rng, _, hessian = _uneven_inputs()
    model = _graph(rng)
    ids = np.array([[1, 7, 39]], dtype=np.int64)
    before = _run(model, ids)[0]
    sites = ScaleNormedInputs(Hints(hessian), 32, SOURCE_NAMES).apply(model)
    assert sites == 1
    assert INPUT_SCALE in model.graph.initializers["head"].meta
    assert [n.op_type for n in model.graph].count("Mul") == 1  # the lookup's rows divided by s again
    after = _run(model, ids)[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_a_norm_output_read_elsewhere_is_left_alone():
    rng, _, hessian = _uneven_inputs()
    model = _graph(rng, extra_norm_use=True)
    assert ScaleNormedInputs(Hints(hessian), 32, SOURCE_NAMES).apply(model) == 0
    assert INPUT_SCALE not in model.graph.initializers["head"].meta


def test_chosen_scale_lowers_the_output_error_of_round_to_nearest():
    rng, x, hessian = _uneven_inputs(1)
    w = rng.standard_normal((N, K)).astype(np.float32)
    s = choose_input_scale(w, hessian, 32)
    assert s is not None
    plain = x @ (w - quantize_rtn(w, 4, 32).dequantize()).T
    scaled = x @ (w - quantize_rtn(w * s, 4, 32).dequantize() / s).T
    assert (scaled ** 2).mean() < 0.9 * (plain ** 2).mean()
