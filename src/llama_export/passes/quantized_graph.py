"""The graph forms of block-quantized weights: MatMulNBits (with a minimum term for Q4_1-style blocks),
DequantizeLinear feeding MatMul, and the lazy initializers they read. Weights stay lazy: each quantized weight is
computed when the package writer first asks for one of its parts and dropped once all are written."""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_ir as ir

from llama_export.names import MS_DOMAIN, ROW_READER
from llama_export.passes.block_quantized import BlockQuantized, concatenate_rows

CHUNK_ROWS = 16384  # weights with more output rows than this are read and quantized this many rows at a time
HALF_SUFFIX = "_fp16"  # a float16 initializer holding block parameters that a Cast turns into NAME


class Once:
    """Computes a quantized weight on first use and forgets it once every part made from it (each `lazy_part`
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


def lazy_part(once: Once, pick: Callable[[BlockQuantized], np.ndarray], dtype, shape, name) -> ir.LazyTensor:
    once.parts += 1

    def load():
        array = pick(once.get())
        if tuple(array.shape) != tuple(shape) or (dtype != ir.DataType.INT4 and array.dtype != dtype.numpy()):
            raise AssertionError(f"{name}: computed {array.dtype}{list(array.shape)}, declared {dtype}{list(shape)}")
        if dtype == ir.DataType.INT4:
            return ir.Tensor(array.astype(np.int8), dtype=ir.DataType.INT4, name=name)
        return ir.Tensor(np.ascontiguousarray(array), name=name)

    return ir.LazyTensor(load, dtype=dtype, shape=ir.Shape(shape), name=name)


def add_initializer(graph: ir.Graph, name: str, tensor: ir.LazyTensor) -> ir.Value:
    value = ir.Value(name=name, const_value=tensor, shape=tensor.shape, type=ir.TensorType(tensor.dtype))
    graph.register_initializer(value)
    return value


def int64_constant(graph: ir.Graph, name: str, value) -> ir.Value:
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


def quantize_by_row_chunks(weight: ir.Value, rows: slice | None, quantize, transposed: bool = True
                           ) -> BlockQuantized:
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


def float_matrix(node: ir.Node, position: int) -> ir.Value | None:
    value = node.inputs[position] if len(node.inputs) > position else None
    if value is None or not value.is_initializer() or value.const_value is None:
        return None
    tensor = value.const_value
    if tensor.dtype != ir.DataType.FLOAT or len(tensor.shape) != 2:
        return None
    return value


def gather_block_quantized(data: ir.Value, ids: ir.Value, scales: ir.Value, zero_points: ir.Value | None,
                           layout: BlockQuantized) -> ir.Node:
    inputs = [data, ids, scales] + ([zero_points] if zero_points is not None else [])
    return ir.node("GatherBlockQuantized", inputs, domain=MS_DOMAIN,
                   attributes={"bits": layout.bits, "block_size": layout.block_size, "gather_axis": 0,
                               "quantize_axis": 1})


class QuantizedForms:
    """Writes a quantized weight's ops into the graph, before the MatMul they replace. The per-block sums of an
    activation (the minimum term's input) are computed once and shared by every weight that reads it."""

    def __init__(self, options):
        self.options = options
        self.block_sums: dict = {}  # (activation, block) -> its per-block sums, shared by the Q4_1 terms

    def matmulnbits(self, graph, node, weight, once, layout: BlockQuantized, k, n, base: str | None = None
                     ) -> ir.Value:
        """`base` names a part of the weight's rows (its own initializers; the output then has N = n)."""
        blocks = layout.scales.shape[1]
        blob = layout.block_size * layout.bits // 8
        part, base = base is not None, base or weight.name
        qweight = lazy_part(once, BlockQuantized.matmulnbits_b, ir.DataType.UINT8, [n, blocks, blob],
                            base + ".qweight")
        scales = lazy_part(once, lambda q: q.scales, ir.DataType.FLOAT, [n, blocks], base + ".scales")
        inputs = [node.inputs[0], add_initializer(graph, base + ".qweight", qweight),
                  add_initializer(graph, base + ".scales", scales)]
        if layout.zero_points is not None or layout.minimums is not None:
            inputs.append(self.zero_points(graph, once, layout, base))
        new = ir.node("MatMulNBits", inputs, domain=MS_DOMAIN,
                      attributes={"K": k, "N": n, "bits": layout.bits, "block_size": layout.block_size,
                                  "accuracy_level": self.options.accuracy_level})
        graph.insert_before(node, new)
        new.outputs[0].shape, new.outputs[0].type = None if part else node.outputs[0].shape, node.outputs[0].type
        if layout.minimums is None:
            return new.outputs[0]
        total = self.add_minimums(graph, node, new.outputs[0], once, layout, base,
                                   half=layout.half_params and self.options.half_minimums)
        total.shape = new.outputs[0].shape  # a part's N is its own
        return total

    def add_minimums(self, graph, node, product: ir.Value, once, layout: BlockQuantized, base: str,
                      offsets=lambda q: q.minimums.T.copy(), half: bool = False) -> ir.Value:
        """w = scale*q + minimum (GGUF Q4_1): MatMulNBits computes x @ (scale*q); the minimums add
        sum over blocks of (x summed within the block) * minimum, a small [K/block, N] MatMul. ONNX Runtime
        accepts float zero points instead, but its CPU kernel then runs far slower (README, INT4: zero points)."""
        x = node.inputs[0]
        n, blocks = layout.scales.shape
        key = (id(x), layout.block_size)
        if key not in self.block_sums:
            shape = int64_constant(graph, f"{base}.block_shape", [0, 0, blocks, layout.block_size])
            axes = int64_constant(graph, f"{base}.block_axis", [-1])
            reshape = ir.node("Reshape", [x, shape])
            summed = ir.node("ReduceSum", [reshape.outputs[0], axes], attributes={"keepdims": 0})
            graph.insert_before(node, [reshape, summed])
            reshape.outputs[0].type = summed.outputs[0].type = x.type
            self.block_sums[key] = summed.outputs[0]
        minimums = self.minimums_input(graph, base + ".minimums", once, offsets, [blocks, n], half)
        offset = ir.node("MatMul", [self.block_sums[key], minimums])
        total = ir.node("Add", [product, offset.outputs[0]])
        graph.insert_before(node, [offset, total])
        offset.outputs[0].type = total.outputs[0].type = node.outputs[0].type
        total.outputs[0].shape = node.outputs[0].shape
        return total.outputs[0]

    @staticmethod
    def zero_points(graph, once, layout: BlockQuantized, base: str) -> ir.Value:
        n, blocks = layout.scales.shape
        if layout.minimums is not None or layout.zero_points.dtype == np.uint8:
            shape, dtype = [n, -(-blocks * layout.bits // 8)], ir.DataType.UINT8
        else:
            shape, dtype = [n, blocks], ir.DataType.FLOAT
        return add_initializer(graph, base + ".zero_points",
                               lazy_part(once, BlockQuantized.ort_zero_points, dtype, shape, base + ".zero_points"))

    def dequantizelinear(self, graph, node, weight, once, layout: BlockQuantized, k, n) -> ir.Value:
        base = weight.name
        blocks = layout.scales.shape[1]
        dtype = ir.DataType.INT4 if layout.bits == 4 else ir.DataType.INT8
        codes = add_initializer(graph, base + ".qweight", lazy_part(
            once, lambda q: q.signed_codes()[:, :k].T, dtype, [k, n], base + ".qweight"))
        scales = add_initializer(graph, base + ".scales", lazy_part(
            once, lambda q: q.scales.T, ir.DataType.FLOAT, [blocks, n], base + ".scales"))
        dq = ir.node("DequantizeLinear", [codes, scales], attributes={"axis": 0, "block_size": layout.block_size})
        matmul = ir.node("MatMul", [node.inputs[0], dq.outputs[0]])
        graph.insert_before(node, [dq, matmul])
        dq.outputs[0].shape, dq.outputs[0].type = ir.Shape([k, n]), ir.TensorType(ir.DataType.FLOAT)
        matmul.outputs[0].shape, matmul.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
        if layout.minimums is None:
            return matmul.outputs[0]
        # Q4_1, w = d*q + m with q in [0, 15]: the signed codes give d*(q - 8), so each block adds m + 8d.
        midpoint = 1 << (layout.bits - 1)
        return self.add_minimums(graph, node, matmul.outputs[0], once, layout, base,
                                  lambda q: (q.minimums + midpoint * q.scales).T.copy())

    def minimums_input(self, graph: ir.Graph, name: str, once: Once, pick, shape: list[int], half: bool
                       ) -> ir.Value:
        """Float32 block minimums named `name`. Where they are float16 values (a GGUF's), they are stored as float16
        (NAME_fp16) and cast back; ONNX Runtime folds the Cast into a float32 initializer when it optimizes the
        graph and runs it otherwise (a minimal build on a phone). Only for what a MatMul, Gather or Add reads:
        MatMulNBits and GatherBlockQuantized prepack their scales and must find them as initializers (measured:
        with graph optimizations off, MatMulNBits with cast scales outputs zeros)."""
        if not half:
            value = add_initializer(graph, name, lazy_part(once, pick, ir.DataType.FLOAT, shape, name))
        else:
            stored = add_initializer(graph, name + HALF_SUFFIX, lazy_part(
                once, lambda q: pick(q).astype(np.float16), ir.DataType.FLOAT16, shape, name + HALF_SUFFIX))
            cast = ir.node("Cast", [stored], attributes={"to": int(ir.DataType.FLOAT)})
            graph.insert_before(graph.node(0), cast)
            value = cast.outputs[0]
            value.name, value.shape, value.type = name, ir.Shape(shape), ir.TensorType(ir.DataType.FLOAT)
        return value
