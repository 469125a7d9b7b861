"""Weight-only quantization of the linear layers (and optionally the embedding) into the forms the targets run:
com.microsoft MatMulNBits / GatherBlockQuantized for ONNX Runtime, INT4 DequantizeLinear (blocked, symmetric)
feeding MatMul for TensorRT. This module chooses the values (the source's own blocks, or a method's on the
source's floats) and the layout of each weight; quantized_graph.py writes the ops, quantized_lookup.py the
embedding lookups, block_quantized.py holds the block format and the methods' numerics.

Weights stay lazy: each quantized weight is computed when the package writer first asks for one of its parts
(codes, scales, zero points) and dropped once all parts are written, so one weight is in memory at a time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx_ir as ir

from llama_export.names import INPUT_SCALE, SOURCE_NAMES
from llama_export.passes.base import GraphPass, replace_value
from llama_export.passes.block_quantized import (
    BlockQuantized,
    concatenate_rows,
    layout_template,
    prepare_gptq,
    quantize_clip,
    quantize_gptq,
    quantize_rtn,
)
from llama_export.passes.quantized_graph import (
    Once,
    QuantizedForms,
    dividing_block,
    float_matrix,
    quantize_by_row_chunks,
)
from llama_export.passes.quantized_lookup import EmbeddingLookups, SplitLayout

METHODS = ("rtn", "clip", "gptq")
DEFAULT_METHOD = "gptq"  # best measured on the default model (README, INT4)


class WeightHints(Protocol):
    """What the source knows about a weight, by checkpoint tensor name."""

    def prequantized(self, name: str) -> BlockQuantized | None: ...  # the source's own blocks (GGUF)

    def prequantized_layout(self, name: str) -> BlockQuantized | None: ...  # their layout_template, nothing read

    def hessian(self, name: str) -> np.ndarray | None: ...  # X^T X of the weight's input on calibration text

    def has_hessian(self, name: str) -> bool: ...  # whether hessian(name) has one, known without computing it


@dataclass(frozen=True)
class QuantOptions:
    bits: int = 4
    block_size: int = 32
    symmetric: bool = False
    method: str = DEFAULT_METHOD
    form: str = "matmulnbits"  # or "dequantizelinear"
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 activations on CPU
    lm_head_bits: int | None = 4  # None: the lm_head keeps its float weights
    # The lm_head (and a tied embedding) in finer blocks than the layers: about 0.2 bit a weight of one matrix for
    # a large part of a 4-bit head's loss (README, INT4: layout measurements).
    lm_head_block_size: int | None = 32  # None: the layers' block size
    # An 8-bit lm_head in 64-blocks: as good as 32-blocks, and faster (fewer scales for MatMulNBits to apply; README,
    # INT4: layout measurements).
    lm_head_8bit_block_size: int = 64
    # > 0: the lm_head's first rows at 8 bits (64-blocks), the rest at 4 bits in 128-blocks (see _split_lm_head).
    lm_head_frequent_rows: int = 0
    quantize_embedding: bool = True
    # Minimums that are float16 values stored so, cast to float32 in the graph (see _parameters_of)
    half_minimums: bool = True
    # Float zero points fit any block range, but ONNX Runtime's CPU MatMulNBits runs far slower with them (README,
    # INT4: zero points): integer ones, packed into 4 bits, are the default.
    float_zero_points: bool = False
    # GPTQ: diagonal loading, in units of the mean input energy; each the best measured over the held-out kinds
    # (README, INT4: methods)
    damp: float = 0.1
    lm_head_damp: float = 1.0
    # Checkpoint tensors (by name) that the MatMulNBits form quantizes in `sensitive_block_size`-blocks when the
    # layers' blocks are larger: the caller names the matrices whose error costs the most (see the pipeline).
    sensitive_weights: frozenset[str] = frozenset()
    sensitive_block_size: int = 32
    # Checkpoint tensors (by name) that the MatMulNBits form keeps at 8 bits (symmetric, in the blocks they would
    # have at 4 bits): the caller names the matrices whose 4-bit error costs the most (exporter/sensitivity.py).
    eight_bit_weights: frozenset[str] = frozenset()
    # The source's own blocks (a GGUF's) are carried over when they are in `block_size`-blocks; with this, in
    # blocks of any size (no block size was asked for: a K-quant file's 16- and 32-blocks are kept as they are).
    carry_any_source_blocks: bool = False

    def head_block_size(self, bits: int) -> int | None:
        """The lm_head's own block size at this bit width (None: the layers')."""
        return self.lm_head_8bit_block_size if bits == 8 else self.lm_head_block_size

    def __post_init__(self):
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block size {self.block_size} is not a power of two >= 16")
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization method '{self.method}' (choose from {', '.join(METHODS)})")
        if self.form == "dequantizelinear" and not self.symmetric:
            raise ValueError("the DequantizeLinear form is symmetric only")


SPLIT_REST_BLOCK = 128


class RequantizationErrors:
    """Per tensor, the relative RMS difference between a source's own blocks (as floats) and the blocks they were
    quantized into again, accumulated over the row chunks as the package is written."""

    def __init__(self):
        self._sums: dict[str, list[float]] = {}

    def add(self, name: str, source: np.ndarray, quantized: np.ndarray) -> None:
        sums = self._sums.setdefault(name, [0.0, 0.0])
        sums[0] += float(np.square(quantized - source, dtype=np.float64).sum())
        sums[1] += float(np.square(source, dtype=np.float64).sum())

    def relative_rms(self) -> dict[str, float]:
        return {name: (error / total) ** 0.5 if total > 0 else 0.0 for name, (error, total) in self._sums.items()}


class QuantizeWeights(GraphPass):
    """MatMul(x, W[K, N]) -> MatMulNBits or DequantizeLinear+MatMul; Gather on the embedding table ->
    GatherBlockQuantized (sharing the lm_head's data when the two are tied and quantized alike)."""

    name = "quantize-weights"

    def __init__(self, options: QuantOptions, hints: WeightHints | None = None):
        self.options, self.hints = options, hints
        self.forms = QuantizedForms(options)
        self.requantized = RequantizationErrors()

    def apply(self, model: ir.Model) -> int:
        graph, sites = model.graph, 0
        self.forms = QuantizedForms(self.options)
        outputs = {id(v) for v in graph.outputs}
        layouts: dict[int, BlockQuantized] = {}  # weight -> how it was quantized, for the embedding to share
        for node in list(graph):
            if node.op_type != "MatMul" or node.domain != "":
                continue
            weight = float_matrix(node, 1)
            if weight is None:
                continue
            k, n = weight.const_value.shape
            lm_head = id(node.outputs[0]) in outputs
            bits = self.options.lm_head_bits if lm_head else self._layer_bits(weight)
            if bits is None:
                continue
            mixed = self._mixed_source_parts(list(weight.meta.get(SOURCE_NAMES, [])), bits, (n, k))
            if lm_head and self._splits(weight, bits, n, k):
                layouts[id(weight)], new = self._split_lm_head(graph, node, weight, k, n)
            elif mixed is not None:
                new = self._matmulnbits_by_parts(graph, node, weight, mixed, k)
            else:
                once, layout = self._plan(weight, bits, lm_head)
                layouts[id(weight)] = layout
                new = (self.forms.matmulnbits if self.options.form == "matmulnbits" else self.forms.dequantizelinear)(
                    graph, node, weight, once, layout, k, n)
            replace_value(node.outputs[0], new)
            graph.remove(node, safe=True)
            sites += 1
        if self.options.quantize_embedding and self.options.form == "matmulnbits":
            sites += EmbeddingLookups(self.options, self.hints, self.forms).apply(graph, layouts)
        for value in list(graph.initializers.values()):
            if not value.uses() and not value.is_graph_output():
                graph.initializers.pop(value.name)
        return sites

    # -- choosing the values -------------------------------------------------------------------------------------
    def _plan(self, weight: ir.Value, bits: int, lm_head: bool, rows: slice | None = None, block: int | None = None,
              symmetric: bool | None = None) -> tuple[Once, BlockQuantized]:
        """A lazy quantized weight (or the output rows `rows` of it, in `block`-blocks, `symmetric` or not), and a
        template of its layout (shapes and zero-point kind, no data)."""
        names = list(weight.meta.get(SOURCE_NAMES, []))
        tensor = weight.const_value
        k, n = tensor.shape
        template = None if rows is not None else self._source_layout(names, bits, (n, k))
        if template is not None:  # the source's own blocks, read when the package is written
            compute = lambda: self._source_blocks(names)  # noqa: E731
        else:
            opts = self.options
            hessian_name = names[0] if names else None
            if block is None:
                block = opts.block_size
                if self._sensitive(names, lm_head):
                    block = min(block, opts.sensitive_block_size)
                if lm_head and opts.head_block_size(bits) is not None:
                    # The lm_head's own finer blocks tile its rows exactly (no padding for the lookup to cut).
                    block = min(block, opts.head_block_size(bits))
                    if opts.quantize_embedding:
                        block = dividing_block(block, k)
            if symmetric is None:
                symmetric = opts.symmetric or (bits == 8 and (not lm_head or opts.quantize_embedding))
            if rows is not None:
                n = len(range(n)[rows])

            input_scale = weight.meta.get(INPUT_SCALE)
            # the source's own blocks that this form cannot carry (TensorRT's symmetric INT4): the error is reported
            from_blocks = self.hints is not None and any(self.hints.prequantized_layout(n) is not None for n in names)

            def compute():
                hessian = self.hints.hessian(hessian_name) if self.hints and hessian_name else None
                s = input_scale() if input_scale is not None else None
                if hessian is not None and s is not None:  # the input is x / s now
                    s = s.astype(np.float32)
                    hessian = np.divide(hessian, s[:, None], dtype=np.float32)
                    hessian /= s[None, :]
                integer = not opts.float_zero_points
                if opts.method == "gptq" and hessian is not None:  # once for all row chunks
                    hessian = prepare_gptq(hessian, block, opts.lm_head_damp if lm_head else opts.damp,
                                           act_order=True)

                def quantize(w):
                    if opts.method == "gptq" and hessian is not None:
                        q = quantize_gptq(w, hessian, bits, block, symmetric, integer)
                    elif opts.method in ("gptq", "clip"):
                        importance = None if hessian is None else np.diag(hessian)
                        q = quantize_clip(w, importance, bits, block, symmetric, integer)
                    else:
                        q = quantize_rtn(w, bits, block, symmetric, integer)
                    if from_blocks:
                        self.requantized.add(" + ".join(names), w, q.dequantize())
                    return q

                return quantize_by_row_chunks(weight, rows, quantize)

            zero_dtype = None if symmetric else np.float32 if opts.float_zero_points else np.uint8
            template = layout_template(n, k, bits, block, zero_dtype)
        return Once(compute), template

    def _layer_bits(self, weight: ir.Value) -> int:
        """8 for a layer matrix whose every stacked part the caller named (MatMulNBits form only), else the
        layers' bits."""
        names = weight.meta.get(SOURCE_NAMES, [])
        return 8 if self._all_named(names, self.options.eight_bit_weights) else self.options.bits

    def _sensitive(self, names: list[str], lm_head: bool) -> bool:
        """A layer matrix whose every stacked part the caller named for finer blocks (MatMulNBits form only)."""
        return not lm_head and self._all_named(names, self.options.sensitive_weights)

    def _all_named(self, names: list[str], wanted: frozenset[str]) -> bool:
        """Every stacked part of a weight is in `wanted`, and the form (MatMulNBits) can give it its own layout."""
        return bool(names) and all(n in wanted for n in names) and self.options.form == "matmulnbits"

    def _carried_part(self, name: str, bits: int) -> BlockQuantized | None:
        """The layout of one checkpoint tensor's own blocks (nothing read), when they can be carried over."""
        part = self.hints.prequantized_layout(name) if self.hints is not None else None
        if part is None or part.bits < bits:
            return None
        if part.block_size != self.options.block_size and not self.options.carry_any_source_blocks:
            return None
        if self.options.form == "dequantizelinear" and (part.zero_points is not None or part.bits != 4):
            return None  # TensorRT takes symmetric INT4 blocks (Q4_0; Q4_1 with its minimum term): requantize
        return part

    def _carried_parts(self, names: list[str], bits: int, shape) -> list[BlockQuantized] | None:
        """Each stacked part's own blocks, when every one of them can be carried over and they stack to `shape`."""
        parts = [self._carried_part(name, bits) for name in names]
        if not names or any(p is None for p in parts):
            return None
        columns = parts[0].columns
        if (sum(p.shape[0] for p in parts), columns) != tuple(shape) or any(p.columns != columns for p in parts):
            return None
        return parts

    @staticmethod
    def _kind(part: BlockQuantized) -> tuple:
        return part.bits, part.block_size, part.minimums is not None

    def _source_layout(self, names: list[str], bits: int, shape) -> BlockQuantized | None:
        """The layout of the source's own blocks (nothing read), when every stacked part has them, all alike, and
        they can be carried over."""
        parts = self._carried_parts(names, bits, shape)
        if parts is None or len({self._kind(p) for p in parts}) != 1:
            return None
        zero_kinds = {None if p.zero_points is None else p.zero_points.dtype for p in parts}
        zero_dtype = zero_kinds.pop() if len(zero_kinds) == 1 else np.float32  # mixed: spelled out as floats
        first = parts[0]
        return layout_template(shape[0], shape[1], first.bits, first.block_size, zero_dtype, first.minimums is not None,
                               all(p.half_params for p in parts))

    def _mixed_source_parts(self, names: list[str], bits: int, shape) -> list[BlockQuantized] | None:
        """Stacked parts (packed q/k/v, gate/up) whose own blocks are carried over but differ in kind (a Q4_K_M
        file's Q4_K query and Q6_K value): each gets its own MatMulNBits."""
        if len(names) < 2 or self.options.form != "matmulnbits":
            return None
        parts = self._carried_parts(names, bits, shape)
        return parts if parts is not None and len({self._kind(p) for p in parts}) > 1 else None

    def _source_blocks(self, names: list[str]) -> BlockQuantized:
        """The source's own blocks, read now, of a weight whose _source_layout said they are carried over."""
        parts = [self.hints.prequantized(name) for name in names]
        return concatenate_rows(parts) if len(parts) > 1 else parts[0]

    # -- the split lm_head ---------------------------------------------------------------------------------------
    def _splits(self, weight: ir.Value, bits: int, n: int, k: int) -> bool:
        """Split only a 4-bit lm_head that is computed here (not carried from the source) into MatMulNBits."""
        rows = self.options.lm_head_frequent_rows
        if not rows or bits != 4 or n <= rows or self.options.form != "matmulnbits":
            return False
        return self._source_layout(list(weight.meta.get(SOURCE_NAMES, [])), bits, (n, k)) is None

    def _split_lm_head(self, graph, node, weight, k, n) -> tuple[SplitLayout, ir.Value]:
        """logits = Concat(x @ W[:rows] at 8 bits, x @ W[rows:] at 4 bits). BPE vocabularies number tokens in merge
        order, so the first rows are the frequent tokens: 8 bits there keeps most of the quality an 8-bit head has,
        and 128-blocks are ONNX Runtime's fastest MatMulNBits form for the rest (README, INT4: layout
        measurements)."""
        rows = self.options.lm_head_frequent_rows
        parts = (("frequent", slice(0, rows), 8, dividing_block(64, k), True),
                 ("rest", slice(rows, n), 4, SPLIT_REST_BLOCK, self.options.symmetric))
        outputs, layouts = [], []
        for name, part, bits, block, symmetric in parts:
            once, layout = self._plan(weight, bits, True, rows=part, block=block, symmetric=symmetric)
            base = f"{weight.name}.{name}"
            outputs.append(self.forms.matmulnbits(graph, node, weight, once, layout, k, layout.scales.shape[0], base))
            layouts.append((base, layout))
        concat = ir.node("Concat", outputs, attributes={"axis": -1})
        graph.insert_before(node, concat)
        concat.outputs[0].shape, concat.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
        return SplitLayout(rows, *layouts), concat.outputs[0]

    def _matmulnbits_by_parts(self, graph, node, weight, parts: list[BlockQuantized], k) -> ir.Value:
        """A Concat of one MatMulNBits per stacked part, each with the source's own blocks."""
        outputs = []
        for index, (name, layout) in enumerate(zip(weight.meta[SOURCE_NAMES], parts)):
            once = Once(lambda name=name: self.hints.prequantized(name))
            outputs.append(self.forms.matmulnbits(graph, node, weight, once, layout, k, layout.shape[0],
                                             f"{weight.name}.part{index}"))
        concat = ir.node("Concat", outputs, attributes={"axis": -1})
        graph.insert_before(node, concat)
        concat.outputs[0].shape, concat.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
        return concat.outputs[0]

