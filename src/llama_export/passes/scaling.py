"""Activation-aware input scaling before weight quantization (as in AWQ, Lin et al.): a matrix fed by an RMSNorm
has its input columns multiplied by s and the norm's weight divided by s, which leaves the float model unchanged
but moves quantization error away from the columns whose inputs carry the most energy.

s = sqrt(diag(X^T X)) ** alpha, with alpha searched per matrix for the smallest round-to-nearest output error
(weighted by X^T X, on a spread sample of the rows) at the layers' block size (the lm_head's and edge layers' own
finer blocks are not searched separately); alpha = 0 (no scaling) is one of the candidates. A lookup that shares
a tied lm_head's table divides its rows by s again (one Mul on the looked-up row).

Weights and statistics stay lazy: s is chosen when the quantizer or the writer first needs it (the calibration
statistics exist only once the layer-by-layer calibration reaches that layer), reading the matrix once to choose
it; its scaled form is computed again when the quantizer reads it. A site whose best s is no scaling keeps its
values as they are (the lookup's Mul then multiplies by ones)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from llama_export.names import INPUT_SCALE, ROW_READER
from llama_export.passes.base import GraphPass
from llama_export.passes.block_quantized import quantize_rtn

ALPHAS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
# Value.meta key: the LazyScale applied to a weight's input columns (the quantizer reads it)
_GAMMA_INPUT = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2, "RMSNormalization": 1}


SEARCH_ROWS = 1024  # the alpha search measures the error on at most this many output rows, evenly spread
SAMPLE_CHUNK = 16384  # rows read at a time to pick them from a large weight


def search_rows(n: int) -> np.ndarray:
    """The rows the alpha search measures: all of them, or SEARCH_ROWS evenly spread."""
    return np.arange(n) if n <= SEARCH_ROWS else np.linspace(0, n - 1, SEARCH_ROWS).astype(np.int64)


def choose_input_scale(w: np.ndarray, hessian: np.ndarray, block_size: int) -> np.ndarray | None:
    """w [N, K] (rows are outputs); the s [K] whose scaled weight loses least to 4-bit round-to-nearest, or None
    when no scaling does best. Rows are independent, so a spread sample of them ranks the candidates."""
    import torch

    w = w[search_rows(w.shape[0])]
    h = torch.from_numpy(np.asarray(hessian, np.float32))
    magnitude = np.sqrt(np.maximum(np.diag(hessian).astype(np.float64), 1e-12))
    best, best_error = None, np.inf
    for alpha in ALPHAS:
        s = magnitude ** alpha
        s = s / np.sqrt(s.max() * s.min())
        scaled = w * s
        error = torch.from_numpy((scaled - quantize_rtn(scaled, 4, block_size).dequantize()).astype(np.float32))
        weights = torch.from_numpy((1.0 / s).astype(np.float32))
        error = error * weights  # error @ (H / s s^T) @ error^T, as (error / s) @ H @ (error / s)^T
        total = float(((error @ h) * error).sum())
        if total < best_error:
            best, best_error = (None if alpha == 0 else s), total
    return best


class LazyScale:
    """A matrix's input scale, chosen when first asked for (by the quantizer, or by the writer for the norm's
    weight): its calibration statistics exist only once the quantizer's layer-by-layer calibration reaches it."""

    def __init__(self, weight: ir.TensorProtocol, hints, name: str, block_size: int, rows=None):
        self.weight, self.hints, self.name, self.block_size, self.rows = weight, hints, name, block_size, rows
        self.chosen, self.value = False, None

    def __call__(self) -> np.ndarray | None:
        """s [K] as float64, or None: no scaling did best."""
        if not self.chosen:
            self.value = choose_input_scale(self._sample(), self.hints.hessian(self.name), self.block_size)
            self.chosen = True
        return self.value

    def _sample(self) -> np.ndarray:
        """The rows (in [N, K] layout) the search measures, read in chunks where the source allows."""
        k, n = self.weight.shape
        wanted = search_rows(n)
        if self.rows is None:
            return np.ascontiguousarray(self.weight.numpy().T[wanted])
        sample = np.empty((len(wanted), k), np.float32)
        for start in range(0, n, SAMPLE_CHUNK):
            stop = min(start + SAMPLE_CHUNK, n)
            hit = (wanted >= start) & (wanted < stop)
            if hit.any():
                sample[hit] = self.rows(start, stop)[wanted[hit] - start]
        return sample


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
            weight, gamma, name, lookups = site
            scale = LazyScale(weight.const_value, self.hints, name, self.block_size, weight.meta.get(ROW_READER))
            _rescale(weight, lambda s=scale: None if s() is None else s()[:, None])
            _rescale_rows(weight, scale)
            _rescale(gamma, lambda s=scale: None if s() is None else 1.0 / s())
            weight.meta[INPUT_SCALE] = scale
            for gather in lookups:
                self._unscale_lookup(model.graph, gather, scale)
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
        if not self.hints.has_hessian(names[0]):
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
        return weight, gamma, names[0], lookups

    @staticmethod
    def _unscale_lookup(graph: ir.Graph, gather: ir.Node, scale: LazyScale) -> None:
        k = scale.weight.shape[0]
        name = f"{gather.inputs[0].name}.input_scale_inverse"
        inverse = ir.Value(name=name, const_value=ir.LazyTensor(
            lambda: ir.Tensor(np.ones(k, np.float32) if scale() is None else (1.0 / scale()).astype(np.float32)),
            dtype=ir.DataType.FLOAT, shape=ir.Shape([k]), name=name))
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


def _rescale_rows(weight: ir.Value, scale: LazyScale) -> None:
    """The weight's row reader (rows in [out, in] layout), scaled along its input columns as its tensor is."""
    reader = weight.meta.get(ROW_READER)
    if reader is not None:
        weight.meta[ROW_READER] = lambda start, stop: reader(start, stop) if scale() is None else \
            (reader(start, stop) * scale()[None, :]).astype(np.float32)


def _rescale(value: ir.Value, factor) -> None:
    """The value's lazy tensor times factor() (broadcast; None: unchanged), still read only when asked for."""
    tensor = value.const_value

    def load():
        f = factor()
        return tensor if f is None else ir.Tensor((tensor.numpy() * f).astype(np.float32))

    value.const_value = ir.LazyTensor(load, dtype=tensor.dtype, shape=tensor.shape, name=tensor.name)
