"""Weight-only quantization of the linear layers (and optionally the embedding) into the forms the targets run:
com.microsoft MatMulNBits / GatherBlockQuantized for ONNX Runtime, INT4 DequantizeLinear (blocked, symmetric)
feeding MatMul for TensorRT.

Weights stay lazy: each quantized weight is computed when the package writer first asks for one of its parts
(codes, scales, zero points) and dropped once all parts are written, so one weight is in memory at a time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import onnx_ir as ir

from llama_export.names import INPUT_SCALE, MS_DOMAIN, ROW_READER
from llama_export.passes.base import GraphPass, replace_value
from llama_export.passes.quantization import (
    BlockQuantized,
    concatenate_rows,
    layout_template,
    prepare_gptq,
    quantize_clip,
    quantize_gptq,
    quantize_rtn,
)

METHODS = ("rtn", "clip", "gptq")
DEFAULT_METHOD = "gptq"  # best measured on the default model (README, INT4)
SOURCE_NAMES = "checkpoint_names"  # Value.meta key: the checkpoint tensors a weight holds, stacked along N
CHUNK_ROWS = 16384  # weights with more output rows than this are read and quantized this many rows at a time


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
    damp: float = 1.0  # GPTQ: diagonal loading, in units of the mean input energy (measured best on a short text)
    # Checkpoint tensors (by name) that the MatMulNBits form quantizes in `sensitive_block_size`-blocks when the
    # layers' blocks are larger: the caller names the matrices whose error costs the most (see the pipeline).
    sensitive_weights: frozenset[str] = frozenset()
    sensitive_block_size: int = 32
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
HALF_SUFFIX = "_fp16"  # a float16 initializer holding block parameters that a Cast turns into NAME


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


@dataclass(frozen=True)
class SplitLayout:
    """A lm_head split by rows: its first `rows` and the rest, each (initializer base name, layout)."""

    rows: int
    frequent: tuple[str, BlockQuantized]
    rest: tuple[str, BlockQuantized]


class _Once:
    """Computes a quantized weight on first use and forgets it once every part made from it (each `_lazy`
    tensor) has been read."""

    def __init__(self, compute: Callable[[], BlockQuantized]):
        self._compute, self.parts, self._read, self._value = compute, 0, 0, None

    def get(self) -> BlockQuantized:
        if self._value is None:
            self._value = self._compute()
        self._read += 1
        value = self._value
        if self._read >= self.parts:
            self._value, self._read = None, 0
        return value


def _lazy(once: _Once, pick: Callable[[BlockQuantized], np.ndarray], dtype, shape, name) -> ir.LazyTensor:
    once.parts += 1

    def load():
        array = pick(once.get())
        if tuple(array.shape) != tuple(shape) or (dtype != ir.DataType.INT4 and array.dtype != dtype.numpy()):
            raise AssertionError(f"{name}: computed {array.dtype}{list(array.shape)}, declared {dtype}{list(shape)}")
        if dtype == ir.DataType.INT4:
            return ir.Tensor(array.astype(np.int8), dtype=ir.DataType.INT4, name=name)
        return ir.Tensor(np.ascontiguousarray(array), name=name)

    return ir.LazyTensor(load, dtype=dtype, shape=ir.Shape(shape), name=name)


def _initializer(graph: ir.Graph, name: str, tensor: ir.LazyTensor) -> ir.Value:
    value = ir.Value(name=name, const_value=tensor, shape=tensor.shape, type=ir.TensorType(tensor.dtype))
    graph.register_initializer(value)
    return value


def _int64_constant(graph: ir.Graph, name: str, value) -> ir.Value:
    """A small int64 initializer (shapes, axes, indices) for the nodes this pass inserts."""
    constant = ir.Value(name=name, const_value=ir.tensor(np.array(value, dtype=np.int64)))
    graph.register_initializer(constant)
    return constant


def dividing_block(block: int, k: int) -> int:
    """The largest power-of-two block <= `block` (and >= 16) that divides k, else `block`."""
    candidate = block
    while k % candidate and candidate > 16:
        candidate //= 2
    return candidate if k % candidate == 0 else block


def _by_row_chunks(weight: ir.Value, rows: slice | None, quantize, transposed: bool = True) -> BlockQuantized:
    """quantize(W[rows]) over the weight's rows in [out, in] layout (all of them when `rows` is None), CHUNK_ROWS
    rows at a time where the source reads them alone (a quantized row depends only on itself). The weight's
    tensor is [in, out] when `transposed` (a MatMul's B), else [out, in] (a lookup table)."""
    tensor, reader = weight.const_value, weight.meta.get(ROW_READER)
    first, last, _ = (rows or slice(None)).indices(tensor.shape[1] if transposed else tensor.shape[0])
    if reader is None:
        w = tensor.numpy().T if transposed else tensor.numpy()
        return quantize(w[first:last])
    parts = [quantize(reader(start, min(start + CHUNK_ROWS, last))) for start in range(first, last, CHUNK_ROWS)]
    return parts[0] if len(parts) == 1 else concatenate_rows(parts)


def _weight_of(node: ir.Node, position: int) -> ir.Value | None:
    value = node.inputs[position] if len(node.inputs) > position else None
    if value is None or not value.is_initializer() or value.const_value is None:
        return None
    tensor = value.const_value
    if tensor.dtype != ir.DataType.FLOAT or len(tensor.shape) != 2:
        return None
    return value


def _gather_block_quantized(data: ir.Value, ids: ir.Value, scales: ir.Value, zero_points: ir.Value | None,
                            layout: BlockQuantized) -> ir.Node:
    inputs = [data, ids, scales] + ([zero_points] if zero_points is not None else [])
    return ir.node("GatherBlockQuantized", inputs, domain=MS_DOMAIN,
                   attributes={"bits": layout.bits, "block_size": layout.block_size, "gather_axis": 0,
                               "quantize_axis": 1})


class QuantizeWeights(GraphPass):
    """MatMul(x, W[K, N]) -> MatMulNBits or DequantizeLinear+MatMul; Gather on the embedding table ->
    GatherBlockQuantized (sharing the lm_head's data when the two are tied and quantized alike)."""

    name = "quantize-weights"

    def __init__(self, options: QuantOptions, hints: WeightHints | None = None):
        self.options, self.hints = options, hints
        self._block_sums: dict = {}  # (activation, block) -> its per-block sums, shared by the Q4_1 terms
        self.requantized = RequantizationErrors()

    def apply(self, model: ir.Model) -> int:
        graph, sites = model.graph, 0
        self._block_sums = {}
        outputs = {id(v) for v in graph.outputs}
        layouts: dict[int, BlockQuantized] = {}  # weight -> how it was quantized, for the embedding to share
        for node in list(graph):
            if node.op_type != "MatMul" or node.domain != "":
                continue
            weight = _weight_of(node, 1)
            if weight is None:
                continue
            k, n = weight.const_value.shape
            lm_head = id(node.outputs[0]) in outputs
            bits = self.options.lm_head_bits if lm_head else self.options.bits
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
                new = (self._matmulnbits if self.options.form == "matmulnbits" else self._dequantizelinear)(
                    graph, node, weight, once, layout, k, n)
            replace_value(node.outputs[0], new)
            graph.remove(node, safe=True)
            sites += 1
        if self.options.quantize_embedding and self.options.form == "matmulnbits":
            sites += self._embeddings(graph, layouts)
        for value in list(graph.initializers.values()):
            if not value.uses() and not value.is_graph_output():
                graph.initializers.pop(value.name)
        return sites

    # -- choosing the values -------------------------------------------------------------------------------------
    def _plan(self, weight: ir.Value, bits: int, lm_head: bool, rows: slice | None = None, block: int | None = None,
              symmetric: bool | None = None) -> tuple[_Once, BlockQuantized]:
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
                symmetric = opts.symmetric or (lm_head and self.options.quantize_embedding and bits == 8)
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
                    hessian = prepare_gptq(hessian, block, opts.damp, act_order=True)

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

                return _by_row_chunks(weight, rows, quantize)

            zero_dtype = None if symmetric else np.float32 if opts.float_zero_points else np.uint8
            template = layout_template(n, k, bits, block, zero_dtype)
        return _Once(compute), template

    def _sensitive(self, names: list[str], lm_head: bool) -> bool:
        """A layer matrix whose every stacked part the caller named for finer blocks (MatMulNBits form only)."""
        wanted = self.options.sensitive_weights
        return (not lm_head and bool(names) and all(n in wanted for n in names)
                and self.options.form == "matmulnbits")

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
            outputs.append(self._matmulnbits(graph, node, weight, once, layout, k, layout.scales.shape[0], base))
            layouts.append((base, layout))
        concat = ir.node("Concat", outputs, attributes={"axis": -1})
        graph.insert_before(node, concat)
        concat.outputs[0].shape, concat.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
        return SplitLayout(rows, *layouts), concat.outputs[0]

    def _matmulnbits_by_parts(self, graph, node, weight, parts: list[BlockQuantized], k) -> ir.Value:
        """A Concat of one MatMulNBits per stacked part, each with the source's own blocks."""
        outputs = []
        for index, (name, layout) in enumerate(zip(weight.meta[SOURCE_NAMES], parts)):
            once = _Once(lambda name=name: self.hints.prequantized(name))
            outputs.append(self._matmulnbits(graph, node, weight, once, layout, k, layout.shape[0],
                                             f"{weight.name}.part{index}"))
        concat = ir.node("Concat", outputs, attributes={"axis": -1})
        graph.insert_before(node, concat)
        concat.outputs[0].shape, concat.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
        return concat.outputs[0]

    # -- graph forms ---------------------------------------------------------------------------------------------
    def _matmulnbits(self, graph, node, weight, once, layout: BlockQuantized, k, n, base: str | None = None
                     ) -> ir.Value:
        """`base` names a part of the weight's rows (its own initializers; the output then has N = n)."""
        blocks = layout.scales.shape[1]
        blob = layout.block_size * layout.bits // 8
        part, base = base is not None, base or weight.name
        inputs = [node.inputs[0],
                  _initializer(graph, base + ".qweight", _lazy(once, BlockQuantized.matmulnbits_b, ir.DataType.UINT8,
                                                              [n, blocks, blob], base + ".qweight")),
                  _initializer(graph, base + ".scales", _lazy(once, lambda q: q.scales, ir.DataType.FLOAT,
                                                             [n, blocks], base + ".scales"))]
        if layout.zero_points is not None or layout.minimums is not None:
            inputs.append(self._zero_points(graph, once, layout, base))
        new = ir.node("MatMulNBits", inputs, domain=MS_DOMAIN,
                      attributes={"K": k, "N": n, "bits": layout.bits, "block_size": layout.block_size,
                                  "accuracy_level": self.options.accuracy_level})
        graph.insert_before(node, new)
        new.outputs[0].shape, new.outputs[0].type = None if part else node.outputs[0].shape, node.outputs[0].type
        if layout.minimums is None:
            return new.outputs[0]
        total = self._add_minimums(graph, node, new.outputs[0], once, layout, base,
                                   half=layout.half_params and self.options.half_minimums)
        total.shape = new.outputs[0].shape  # a part's N is its own
        return total

    def _add_minimums(self, graph, node, product: ir.Value, once, layout: BlockQuantized, base: str,
                      offsets=lambda q: q.minimums.T.copy(), half: bool = False) -> ir.Value:
        """w = scale*q + minimum (GGUF Q4_1): MatMulNBits computes x @ (scale*q); the minimums add
        sum over blocks of (x summed within the block) * minimum, a small [K/block, N] MatMul. ONNX Runtime
        accepts float zero points instead, but its CPU kernel then runs far slower (README, INT4: zero points)."""
        x = node.inputs[0]
        n, blocks = layout.scales.shape
        key = (id(x), layout.block_size)
        if key not in self._block_sums:
            shape = _int64_constant(graph, f"{base}.block_shape", [0, 0, blocks, layout.block_size])
            axes = _int64_constant(graph, f"{base}.block_axis", [-1])
            reshape = ir.node("Reshape", [x, shape])
            summed = ir.node("ReduceSum", [reshape.outputs[0], axes], attributes={"keepdims": 0})
            graph.insert_before(node, [reshape, summed])
            reshape.outputs[0].type = summed.outputs[0].type = x.type
            self._block_sums[key] = summed.outputs[0]
        minimums = self._parameters_of(graph, base + ".minimums", once, offsets, [blocks, n], half)
        offset = ir.node("MatMul", [self._block_sums[key], minimums])
        total = ir.node("Add", [product, offset.outputs[0]])
        graph.insert_before(node, [offset, total])
        offset.outputs[0].type = total.outputs[0].type = node.outputs[0].type
        total.outputs[0].shape = node.outputs[0].shape
        return total.outputs[0]

    @staticmethod
    def _zero_points(graph, once, layout: BlockQuantized, base: str) -> ir.Value:
        n, blocks = layout.scales.shape
        if layout.minimums is not None or layout.zero_points.dtype == np.uint8:
            shape, dtype = [n, -(-blocks * layout.bits // 8)], ir.DataType.UINT8
        else:
            shape, dtype = [n, blocks], ir.DataType.FLOAT
        return _initializer(graph, base + ".zero_points",
                            _lazy(once, BlockQuantized.ort_zero_points, dtype, shape, base + ".zero_points"))

    def _dequantizelinear(self, graph, node, weight, once, layout: BlockQuantized, k, n) -> ir.Value:
        base = weight.name
        blocks = layout.scales.shape[1]
        dtype = ir.DataType.INT4 if layout.bits == 4 else ir.DataType.INT8
        codes = _initializer(graph, base + ".qweight", _lazy(once, lambda q: q.signed_codes()[:, :k].T, dtype,
                                                             [k, n], base + ".qweight"))
        scales = _initializer(graph, base + ".scales", _lazy(once, lambda q: q.scales.T, ir.DataType.FLOAT,
                                                             [blocks, n], base + ".scales"))
        dq = ir.node("DequantizeLinear", [codes, scales], attributes={"axis": 0, "block_size": layout.block_size})
        matmul = ir.node("MatMul", [node.inputs[0], dq.outputs[0]])
        graph.insert_before(node, [dq, matmul])
        dq.outputs[0].shape, dq.outputs[0].type = ir.Shape([k, n]), ir.TensorType(ir.DataType.FLOAT)
        matmul.outputs[0].shape, matmul.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
        if layout.minimums is None:
            return matmul.outputs[0]
        # Q4_1, w = d*q + m with q in [0, 15]: the signed codes give d*(q - 8), so each block adds m + 8d.
        midpoint = 1 << (layout.bits - 1)
        return self._add_minimums(graph, node, matmul.outputs[0], once, layout, base,
                                  lambda q: (q.minimums + midpoint * q.scales).T.copy())

    def _embeddings(self, graph: ir.Graph, layouts: dict[int, BlockQuantized]) -> int:
        """Gather(table [V, H], ids) -> GatherBlockQuantized. A table tied to the lm_head (read here through a
        Transpose of the lm_head's [H, V] weight) shares the lm_head's packed data when the layouts allow."""
        sites = 0
        for node in list(graph):
            if node.op_type != "Gather" or node.domain != "" or node.attributes.get_int("axis", 0) != 0:
                continue
            transpose = node.inputs[0].producer()
            if transpose is not None and transpose.op_type == "Transpose":
                source = _weight_of(transpose, 0)
                if source is None or list(transpose.attributes.get_ints("perm", [1, 0])) != [1, 0]:
                    continue
            else:
                transpose, source = None, _weight_of(node, 0)
                if source is None:
                    continue
            layout = layouts.get(id(source)) if transpose is not None else None
            if isinstance(layout, SplitLayout):
                looked_up = self._split_lookup(graph, node, layout)
            else:
                minimums = None
                if layout is not None and self._shareable(layout):
                    data, scales, zero_points = self._shared_table(graph, source.name)
                else:
                    own = self._own_table(graph, source, transposed=transpose is not None)
                    if own is None:
                        continue
                    data, scales, zero_points, minimums, layout = own
                gather = _gather_block_quantized(data, node.inputs[1], scales, zero_points, layout)
                graph.insert_before(node, gather)
                looked_up = gather.outputs[0]
                if minimums is not None:
                    looked_up = self._add_looked_up_minimums(graph, node, looked_up, minimums, layout)
                looked_up = self._unpadded(graph, node, looked_up, layout, source.name)
            looked_up.shape, looked_up.type = node.outputs[0].shape, node.outputs[0].type
            replace_value(node.outputs[0], looked_up)
            graph.remove(node, safe=True)
            if transpose is not None and not transpose.outputs[0].uses():
                graph.remove(transpose, safe=True)
            sites += 1
        return sites

    @staticmethod
    def _shareable(layout: BlockQuantized) -> bool:
        """GatherBlockQuantized takes integer zero points only."""
        return layout.minimums is None and (layout.zero_points is None or layout.zero_points.dtype == np.uint8)

    def _split_lookup(self, graph: ir.Graph, node: ir.Node, split: SplitLayout) -> ir.Value:
        """The rows of a table tied to a split lm_head, inserted before the Gather `node`: each token is looked up
        in the part holding its row (both lookups run on clamped ids, Where keeps the right one), sharing the
        lm_head's bytes."""
        ids = node.inputs[1]
        base = split.frequent[0]

        def constant(name, value):
            return _int64_constant(graph, f"{base}.{name}", value)

        rows, last_axis = constant("rows", split.rows), constant("last_axis", [-1])
        frequent_ids = ir.node("Min", [ids, constant("last_row", split.rows - 1)])
        shifted = ir.node("Sub", [ids, rows])
        rest_ids = ir.node("Max", [shifted.outputs[0], constant("zero", 0)])
        is_frequent = ir.node("Less", [ids, rows])
        mask = ir.node("Unsqueeze", [is_frequent.outputs[0], last_axis])
        for index_node in (frequent_ids, shifted, rest_ids):
            index_node.outputs[0].type = ids.type
        is_frequent.outputs[0].type = mask.outputs[0].type = ir.TensorType(ir.DataType.BOOL)
        graph.insert_before(node, [frequent_ids, shifted, rest_ids, is_frequent, mask])
        looked_up = []
        for label, (part_base, layout), part_ids in (("frequent", split.frequent, frequent_ids),
                                                     ("rest", split.rest, rest_ids)):
            data, scales, zero_points = self._shared_table(graph, part_base)
            gather = _gather_block_quantized(data, part_ids.outputs[0], scales, zero_points, layout)
            graph.insert_before(node, gather)
            table_rows = self._unpadded(graph, node, gather.outputs[0], layout, f"{base}.{label}")
            table_rows.type = node.outputs[0].type
            looked_up.append(table_rows)
        where = ir.node("Where", [mask.outputs[0], *looked_up])
        graph.insert_before(node, where)
        return where.outputs[0]

    @staticmethod
    def _unpadded(graph: ir.Graph, node: ir.Node, rows: ir.Value, layout: BlockQuantized, base: str) -> ir.Value:
        """A lookup's rows cut to the table's width where its blocks are padded (the lookup returns whole
        blocks), inserted before `node`."""
        if layout.columns % layout.block_size == 0:
            return rows
        constants = [_int64_constant(graph, f"{base}.cut_{name}", value)
                     for name, value in (("start", [0]), ("columns", [layout.columns]), ("axis", [-1]))]
        cut = ir.node("Slice", [rows, *constants])
        graph.insert_before(node, cut)
        cut.outputs[0].type = rows.type
        return cut.outputs[0]

    def _parameters_of(self, graph: ir.Graph, name: str, once: _Once, pick, shape: list[int], half: bool
                       ) -> ir.Value:
        """Float32 block minimums named `name`. Where they are float16 values (a GGUF's), they are stored as float16
        (NAME_fp16) and cast back; ONNX Runtime folds the Cast into a float32 initializer when it optimizes the
        graph and runs it otherwise (a minimal build on a phone). Only for what a MatMul, Gather or Add reads:
        MatMulNBits and GatherBlockQuantized prepack their scales and must find them as initializers (measured:
        with graph optimizations off, MatMulNBits with cast scales outputs zeros)."""
        if not half:
            value = _initializer(graph, name, _lazy(once, pick, ir.DataType.FLOAT, shape, name))
        else:
            stored = _initializer(graph, name + HALF_SUFFIX, _lazy(once, lambda q: pick(q).astype(np.float16),
                                                                   ir.DataType.FLOAT16, shape, name + HALF_SUFFIX))
            cast = ir.node("Cast", [stored], attributes={"to": int(ir.DataType.FLOAT)})
            graph.insert_before(graph.node(0), cast)
            value = cast.outputs[0]
            value.name, value.shape, value.type = name, ir.Shape(shape), ir.TensorType(ir.DataType.FLOAT)
        return value

    def _shared_table(self, graph: ir.Graph, base: str):
        """The lm_head's MatMulNBits inputs, reshaped to GatherBlockQuantized's [V, H*bits/8] (same bytes; ONNX
        Runtime folds the Reshape when the session loads)."""
        qweight, scales = graph.initializers[base + ".qweight"], graph.initializers[base + ".scales"]
        n, blocks, blob = qweight.shape
        shape = ir.Value(name=base + ".gather_shape",
                         const_value=ir.tensor(np.array([n, blocks * blob], dtype=np.int64)))
        graph.register_initializer(shape)
        reshape = ir.node("Reshape", [qweight, shape])
        graph.insert_before(graph.node(0), reshape)
        reshape.outputs[0].shape, reshape.outputs[0].type = ir.Shape([n, blocks * blob]), qweight.type
        return reshape.outputs[0], scales, graph.initializers.get(base + ".zero_points")

    def _own_table(self, graph: ir.Graph, weight: ir.Value, transposed: bool):
        """The table quantized on its own: the source's own blocks where it has them (GGUF; a minimum term, as
        Q4_K's, is looked up beside the blocks), else symmetric round-to-nearest at the lm_head's bit width (a lookup
        has no activations to calibrate against), blocks along H that divide it."""
        tensor = weight.const_value
        v, h = reversed(tensor.shape) if transposed else tensor.shape
        bits = self.options.lm_head_bits
        block = min(self.options.block_size, self.options.head_block_size(bits) or self.options.block_size)
        block = dividing_block(block, h)
        names = list(weight.meta.get(SOURCE_NAMES, []))
        source = self.hints.prequantized_layout(names[0]) if self.hints is not None and len(names) == 1 else None
        if source is not None and source.zero_points is None and h % source.block_size == 0:
            # the source's own blocks (GGUF Q8_0/Q4_0 symmetric, Q4_1/Q4_K with minimums)
            once, layout = _Once(lambda: self.hints.prequantized(names[0])), source
        elif h % block:
            return None  # no block size divides the rows: the table stays as it is
        else:
            once = _Once(lambda: _by_row_chunks(
                weight, None, lambda w: quantize_rtn(w, bits, block, symmetric=True), transposed=transposed))
            layout = layout_template(v, h, bits, block)
        blocks = layout.scales.shape[1]
        base = weight.name + ".gather"
        data = _initializer(graph, base + ".qdata", _lazy(
            once, BlockQuantized.gather_data, ir.DataType.UINT8, [v, blocks * layout.block_size * layout.bits // 8],
            base + ".qdata"))
        scales = _initializer(graph, base + ".scales", _lazy(once, lambda q: q.scales, ir.DataType.FLOAT,
                                                            [v, blocks], base + ".scales"))
        zero_points = minimums = None
        if layout.minimums is not None:  # zero points 0: the lookup gives scale * q, the minimum is added after
            zero_points = self._zero_points(graph, once, layout, base)
            minimums = self._parameters_of(graph, base + ".minimums", once, lambda q: q.minimums, [v, blocks],
                                           layout.half_params and self.options.half_minimums)
        return data, scales, zero_points, minimums, layout

    @staticmethod
    def _add_looked_up_minimums(graph: ir.Graph, node: ir.Node, rows: ir.Value, minimums: ir.Value,
                                layout: BlockQuantized) -> ir.Value:
        """rows [..., H] + each block's minimum, looked up by the same ids [..., blocks] and spread over its block:
        w = scale * q + minimum, in the order llama.cpp computes it."""
        blocks, base = layout.scales.shape[1], minimums.name

        def constant(name, value):
            return _int64_constant(graph, f"{base}.{name}", value)

        looked_up = ir.node("Gather", [minimums, node.inputs[1]], attributes={"axis": 0})
        spread = ir.node("Unsqueeze", [looked_up.outputs[0], constant("last_axis", [-1])])
        by_block = ir.node("Reshape", [rows, constant("block_shape", [0, 0, blocks, layout.block_size])])
        added = ir.node("Add", [by_block.outputs[0], spread.outputs[0]])
        flat = ir.node("Reshape", [added.outputs[0], constant("row_shape", [0, 0, blocks * layout.block_size])])
        graph.insert_before(node, [looked_up, spread, by_block, added, flat])
        for step in (looked_up, spread, by_block, added, flat):
            step.outputs[0].type = rows.type
        return flat.outputs[0]
