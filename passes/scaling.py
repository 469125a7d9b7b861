"""Activation-aware input scaling before weight quantization (as in AWQ, Lin et al.): a matrix fed by an RMSNorm
has its input columns multiplied by s and the norm's weight divided by s, which leaves the float model unchanged
but moves quantization error away from the columns whose inputs carry the most energy.

s = sqrt(diag(X^T X)) ** alpha, with alpha searched per matrix for the smallest round-to-nearest output error
(weighted by X^T X) at the layers' block size (the lm_head's and edge layers' own finer blocks are not searched
separately); alpha = 0 (no scaling) is one of the candidates. A lookup that
shares a tied lm_head's table divides its rows by s again (one Mul on the looked-up row).

Weights stay lazy: each matrix is read once here to choose s (then dropped), and its scaled form is computed
again when the quantizer reads it."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from passes.base import GraphPass
from passes.quantization import quantize_rtn

ALPHAS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
INPUT_SCALE = "input_scale"  # Value.meta key: s [K] applied to a weight's input columns (the quantizer reads it)
_GAMMA_INPUT = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2, "RMSNormalization": 1}


def choose_input_scale(w: np.ndarray, hessian: np.ndarray, block_size: int) -> np.ndarray | None:
    """w [N, K] (rows are outputs); the s [K] whose scaled weight loses least to 4-bit round-to-nearest, or None
    when no scaling does best."""
    h = hessian.astype(np.float64)
    magnitude = np.sqrt(np.maximum(np.diag(h), 1e-12))
    best, best_error = None, np.inf
    for alpha in ALPHAS:
        s = magnitude ** alpha
        s = s / np.sqrt(s.max() * s.min())
        scaled = w * s
        error = scaled - quantize_rtn(scaled, 4, block_size).dequantize()
        h_scaled = h / np.outer(s, s)
        total = float(((error @ h_scaled) * error).sum())
        if total < best_error:
            best, best_error = (None if alpha == 0 else s), total
    return best


class ScaleNormedInputs(GraphPass):
    """Norm -> MatMul(x, W[K, N]) with a calibration X^T X for W: W's rows (input columns) times s, the norm's
    weight divided by s. Only where the norm's output and weight feed nothing else, and W is not carried over
    from the source's own quantized blocks."""

    name = "scale-normed-inputs"

    def __init__(self, hints, block_size: int, names_key: str):
        self.hints, self.block_size, self.names_key = hints, block_size, names_key

    def apply(self, model: ir.Model) -> int:
        if self.hints is None:
            return 0
        sites = 0
        for node in list(model.graph):
            if node.op_type != "MatMul" or node.domain != "":
                continue
            site = self._site(node)
            if site is None:
                continue
            weight, gamma, hessian, lookups = site
            w = weight.const_value.numpy()  # [K, N]
            s = choose_input_scale(np.ascontiguousarray(w.T), hessian, self.block_size)
            del w
            if s is None:
                continue
            _rescale(weight, s[:, None].astype(np.float32))
            _rescale(gamma, (1.0 / s).astype(np.float32))
            weight.meta[INPUT_SCALE] = s
            for gather in lookups:
                self._unscale_lookup(model.graph, gather, s)
            sites += 1
        return sites

    def _site(self, node: ir.Node):
        x, weight = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
        if weight is None or not _is_float_constant(weight, 2) or INPUT_SCALE in weight.meta:
            return None
        norm = x.producer()
        if norm is None or norm.op_type not in _GAMMA_INPUT or x is not norm.outputs[0] or len(x.uses()) != 1:
            return None
        gamma = norm.inputs[_GAMMA_INPUT[norm.op_type]]
        if gamma is None or not _is_float_constant(gamma, 1) or len(gamma.uses()) != 1:
            return None
        names = list(weight.meta.get(self.names_key, []))
        if not names or any(self.hints.prequantized_layout(n) is not None for n in names):
            return None
        hessian = self.hints.hessian(names[0])
        if hessian is None or hessian.shape[0] != weight.const_value.shape[0]:
            return None
        lookups = []
        for use in weight.uses():
            user = use.node
            if user is node:
                continue
            if user.op_type != "Transpose" or list(user.attributes.get_ints("perm", [1, 0])) != [1, 0]:
                return None  # the weight is read some other way: leave it
            gathers = [u.node for u in user.outputs[0].uses()]
            if not gathers or any(g.op_type != "Gather" or g.inputs[0] is not user.outputs[0] for g in gathers):
                return None
            lookups += gathers
        return weight, gamma, hessian, lookups

    @staticmethod
    def _unscale_lookup(graph: ir.Graph, gather: ir.Node, s: np.ndarray) -> None:
        inverse = ir.Value(name=f"{gather.inputs[0].name}.input_scale_inverse",
                           const_value=ir.tensor((1.0 / s).astype(np.float32)))
        graph.register_initializer(inverse)
        looked_up = gather.outputs[0]
        mul = ir.node("Mul", [looked_up, inverse])
        graph.insert_after(gather, mul)
        mul.outputs[0].shape, mul.outputs[0].type = looked_up.shape, looked_up.type
        looked_up.replace_all_uses_with(mul.outputs[0])
        mul.replace_input_with(0, looked_up)  # the Mul itself still reads the lookup


def _is_float_constant(value: ir.Value, rank: int) -> bool:
    tensor = value.const_value if value.is_initializer() else None
    return tensor is not None and tensor.dtype == ir.DataType.FLOAT and len(tensor.shape) == rank


def _rescale(value: ir.Value, factor: np.ndarray) -> None:
    """The value's lazy tensor times `factor` (broadcast), still read only when asked for."""
    tensor = value.const_value
    value.const_value = ir.LazyTensor(lambda: ir.Tensor((tensor.numpy() * factor).astype(np.float32)),
                                      dtype=tensor.dtype, shape=tensor.shape, name=tensor.name)
