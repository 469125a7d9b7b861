"""What TensorRT's ONNX parser accepts, per TensorRT version, and the check that holds a graph to it.

The tables come from onnx-tensorrt's published operator list (docs/operators.md, the "Supported = Y" rows) for
TensorRT 10.15. TensorRT 10.3 (JetPack 6) is that list less the ops its changelog dates later: `Attention`
(10.14), `RMSNormalization`, `RotaryEmbedding` and `TensorScatter` (10.15). Ops that never occur in a LLaMA graph
are listed for completeness only. Restrictions the parser documents for the ops a LLaMA graph uses are checked
too (zero zero-points, 4-D Attention without a cache, constant axes)."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

_SUPPORTED_10_15 = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization BlackmanWindow
Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv
DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If ImageScaler
InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM
LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression
NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin
ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign
RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin
Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter
ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

_ADDED_AFTER_10_3 = frozenset({"Attention", "RMSNormalization", "RotaryEmbedding", "TensorScatter"})


@dataclass(frozen=True)
class ParserSupport:
    version: str
    ops: frozenset[str]
    # The opset the package's ONNX file declares: the lowest that carries every op the flavour emits
    # (DequantizeLinear's block_size needs 21; the native LLM ops need 23).
    opset: int
    max_opset: int  # 10.15: documented (9 to 24); 10.3: the file this project writes for it


TENSORRT_10_15 = ParserSupport("10.15", _SUPPORTED_10_15, opset=23, max_opset=24)
TENSORRT_10_3 = ParserSupport("10.3", _SUPPORTED_10_15 - _ADDED_AFTER_10_3, opset=21, max_opset=21)

# Inputs that must be constants for the parser (axes and similar).
_CONSTANT_INPUTS = {"ReduceMean": 1, "ReduceSum": 1, "ReduceMax": 1, "Squeeze": 1, "Unsqueeze": 1}


def _is_constant(value: ir.Value | None) -> bool:
    if value is None:
        return True
    if value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def _node_problem(node: ir.Node, support: ParserSupport) -> str | None:
    if node.domain not in ("", "ai.onnx"):
        return f"{node.domain}::{node.op_type} (custom domain)"
    if node.op_type not in support.ops:
        return node.op_type
    if node.op_type == "DequantizeLinear" and len(node.inputs) > 2 and node.inputs[2] is not None:
        zero = node.inputs[2].const_value
        if zero is None or zero.numpy().any():
            return "DequantizeLinear with a non-zero zero point"
    if node.op_type == "Attention":
        if len(node.inputs) > 4 or any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
            return "Attention with past/present KV inputs or outputs"
        if any(x is not None and (x.shape is None or len(x.shape) != 4) for x in node.inputs):
            return "Attention with inputs that are not 4-D"
    position = _CONSTANT_INPUTS.get(node.op_type)
    if position is not None and len(node.inputs) > position and not _is_constant(node.inputs[position]):
        return f"{node.op_type} with computed axes"
    return None


def parser_problems(model: ir.Model, support: ParserSupport) -> list[str]:
    """Every op (with its count) the given TensorRT's ONNX parser cannot take, empty when it takes them all."""
    counts: dict[str, int] = {}
    for node in model.graph.all_nodes():
        problem = _node_problem(node, support)
        if problem is not None:
            counts[problem] = counts.get(problem, 0) + 1
    opset = model.opset_imports.get("", None)
    problems = [f"{name} ({count}x)" for name, count in sorted(counts.items())]
    if opset is not None and opset > support.max_opset:
        problems.append(f"opset {opset}")
    return problems
