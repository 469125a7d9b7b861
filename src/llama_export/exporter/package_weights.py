"""The weights a package computes with, read back from its own bytes: its quantized matrices dequantized from their
blocks, its norm weights (which input scaling changed), its embedding as its lookup returns it. They are named by
the checkpoint tensors they came from, so the PyTorch reference can run the package's very weights (verify's
exactness check) and a test can compare them with a source's values."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx_ir as ir

from llama_export.names import MS_DOMAIN
from llama_export.passes.block_quantized import BlockQuantized, unpack_codes
from llama_export.passes.experts import quantized_experts
from llama_export.passes.quantized_graph import HALF_SUFFIX

# A packed projection's initializer name (passes/packing.py) -> the checkpoint tensors stacked in it, in order.
_STACKED = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
            "self_attn.packed_proj": ("q_proj", "k_proj", "v_proj"),
            "mlp.gate_up_proj": ("gate_proj", "up_proj"),
            "mlp.packed_proj": ("gate_proj", "up_proj"),
            # LLaMA 4's dense feed-forward layers and its MoE layers' shared expert
            "feed_forward.gate_up_proj": ("gate_proj", "up_proj"),
            "feed_forward.packed_proj": ("gate_proj", "up_proj"),
            "shared_expert.gate_up_proj": ("gate_proj", "up_proj"),
            "shared_expert.packed_proj": ("gate_proj", "up_proj")}
# A lm_head split by rows (passes/quantize.py): its parts' name suffixes, first rows first.
_ROW_PARTS = (".frequent", ".rest")
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
EMBEDDING = "model.embed_tokens.weight"


def checkpoint_names(weight: str) -> list[str]:
    """The checkpoint tensors stacked along N in a package weight; a weight split by parts (NAME.partI, see
    passes/quantize.py) names its I-th."""
    whole, _, part = weight.rpartition(".part")
    if whole and part.isdigit():
        return [checkpoint_names(whole)[int(part)]]
    for packed, parts in _STACKED.items():
        if weight.endswith(f"{packed}.weight"):
            prefix = weight.removesuffix(f"{packed}.weight") + packed.split(".")[0]
            return [f"{prefix}.{p}.weight" for p in parts]
    return [weight]


def _stored_tensor(value: ir.Value):
    if value.const_value is not None:
        return value.const_value
    producer = value.producer()
    if producer is not None and producer.op_type == "Cast" and producer.inputs[0].const_value is not None:
        return producer.inputs[0].const_value
    raise ValueError(f"{value.name}: not a stored tensor")


def stored(value: ir.Value, index=slice(None)) -> np.ndarray:
    """A copy of part of an initializer's data as stored, or of the float16 initializer a Cast reads (block
    parameters kept in float16; convert to float32 after). A package's tensors are mapped from its weight file:
    the mapping is closed once the part is copied, or every page a verify reads would stay resident (at 8B, the
    whole file beside the reference's layers)."""
    tensor = _stored_tensor(value)
    part = np.array(tensor.numpy()[index])
    if isinstance(tensor, ir.ExternalTensor):
        try:
            tensor.release()
        except BufferError:  # a view of the mapping is still held elsewhere: leave it open
            pass
    return part


def stored_by_name(model: ir.Model, name: str, index=slice(None)) -> np.ndarray | None:
    """Part of the initializer NAME's data as stored, or NAME_fp16's (see `stored`); None when neither exists."""
    value = model.graph.initializers.get(name) or model.graph.initializers.get(name + HALF_SUFFIX)
    return None if value is None else stored(value, index)


def matmulnbits_blocks(model: ir.Model, node: ir.Node, rows: slice = slice(None)) -> BlockQuantized:
    """A MatMulNBits node's weight (its output rows `rows`) as blocks; a minimum term added after the node
    (w = d*q + m, its initializer NAME.minimums) is folded back in, so `.dequantize()` gives the weight [N, K] as
    the package computes it. Only the rows asked for are unpacked (the file's pages are mapped, not read)."""
    b, scales = stored(node.inputs[1], rows), stored(node.inputs[2], rows).astype(np.float32)
    has_zero_points = len(node.inputs) > 3 and node.inputs[3] is not None
    zero_points = stored(node.inputs[3], rows) if has_zero_points else None
    bits, block, k = (node.attributes.get_int(a) for a in ("bits", "block_size", "K"))
    codes = unpack_codes(b.reshape(b.shape[0], -1), bits)
    columns = 0 if k == codes.shape[1] else k
    minimums = stored_by_name(model, _base(node.inputs[1]) + ".minimums", (slice(None), rows))
    if minimums is not None:
        if zero_points is not None and zero_points.any():
            raise ValueError(f"{_base(node.inputs[1])}: a minimum term beside nonzero zero points")
        return BlockQuantized(codes, scales, None, bits, block, columns, minimums=minimums.T.astype(np.float32))
    unpacked = None if zero_points is None else unpack_codes(zero_points, bits)[:, :scales.shape[1]]
    return BlockQuantized(codes, scales, unpacked, bits, block, columns)


def matmulnbits_weights(model: ir.Model) -> Iterator[tuple[str, BlockQuantized]]:
    """(weight name, its blocks) for every MatMulNBits, read one node at a time."""
    for node in model.graph:
        if node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN:
            yield _base(node.inputs[1]), matmulnbits_blocks(model, node)


def _dequantizelinear_rows(model: ir.Model, node: ir.Node, rows: slice) -> np.ndarray:
    """Rows `rows` of a blockwise DequantizeLinear of a [K, N] weight (the TensorRT targets' INT4 form) as
    [rows, K] float32, with the minimum term added after its MatMul folded back in (w = d*q + m + midpoint*d, see
    passes/quantize.py)."""
    columns = (slice(None), rows)
    codes = np.asarray(stored(node.inputs[0], columns), np.float32)
    block = node.attributes.get_int("block_size")
    k = codes.shape[0]
    scales = np.repeat(np.asarray(stored(node.inputs[1], columns), np.float32), block, axis=0)[:k]
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        zero = np.asarray(stored(node.inputs[2], columns), np.float32).repeat(block, axis=0)[:k]
        codes = codes - zero
    weight = codes * scales
    minimums = stored_by_name(model, _base(node.inputs[0]) + ".minimums", columns)
    if minimums is not None:
        weight += np.repeat(np.asarray(minimums, np.float32), block, axis=0)[:k]
    return np.ascontiguousarray(weight.T)


def _base(value: ir.Value) -> str:
    return value.name.removesuffix(".qweight")


RowReader = tuple[int, Callable[[int, int], np.ndarray]]  # (rows, rows [start, stop) as float32 [n, K])


def quantized_matrices(model: ir.Model) -> dict[str, RowReader]:
    """Package weight name -> its row count and a reader of its dequantized rows, for every quantized matrix
    (MatMulNBits, or DequantizeLinear feeding a MatMul). Nothing is read until a reader is called."""
    readers = {}
    for node in model.graph:
        if node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN:
            readers[_base(node.inputs[1])] = (node.attributes.get_int("N"), lambda start, stop, node=node:
                                              matmulnbits_blocks(model, node, slice(start, stop)).dequantize())
        elif (node.op_type == "DequantizeLinear" and node.inputs[0].is_initializer()
              and any(use.node.op_type == "MatMul" for use in node.outputs[0].uses())):
            readers[_base(node.inputs[0])] = (node.inputs[0].shape[1], lambda start, stop, node=node:
                                              _dequantizelinear_rows(model, node, slice(start, stop)))
    return readers


def _stacked_rows(parts: list[RowReader]) -> RowReader:
    """Row parts one after the other, read as one matrix."""
    starts = np.cumsum([0] + [n for n, _ in parts])

    def rows(start: int, stop: int) -> np.ndarray:
        pieces = [read(max(start - first, 0), min(stop, last) - first)
                  for (_, read), first, last in zip(parts, starts[:-1], starts[1:]) if start < last and stop > first]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    return int(starts[-1]), rows


def checkpoint_matrices(model: ir.Model, row_counts: Callable[[str], int]) -> dict[str, RowReader]:
    """Checkpoint tensor name -> a reader of the package's dequantized rows of it: packed projections cut back
    into their parts by the checkpoint's row counts, a lm_head's row parts put back together, a matrix read
    through a tied embedding's name called the lm_head."""
    readers: dict[str, RowReader] = {}
    matrices = quantized_matrices(model)
    for name, reader in matrices.items():
        if name.endswith(_ROW_PARTS[1]):
            continue
        if name.endswith(_ROW_PARTS[0]):
            name = name.removesuffix(_ROW_PARTS[0])
            reader = _stacked_rows([reader, matrices[name + _ROW_PARTS[1]]])
        if name == EMBEDDING:  # a MatMul over the embedding's table: the tied lm_head
            name = "lm_head.weight"
        parts = checkpoint_names(name)
        starts = np.cumsum([0] + [row_counts(p) for p in parts]) if len(parts) > 1 else [0, reader[0]]
        for part, first, last in zip(parts, starts[:-1], starts[1:]):
            read = reader[1]
            readers[part] = (int(last - first), lambda start, stop, read=read, first=int(first):
                             read(first + start, first + stop))
    return readers


def norm_weights(model: ir.Model, names) -> dict[str, Callable[[], np.ndarray]]:
    """Loaders of the package's own values of the named 1-D float initializers (norm weights, which input scaling
    divides by the scale its matrices were multiplied by)."""
    held = {}
    for name in names:
        value = model.graph.initializers.get(name)
        if value is not None and value.const_value is not None and len(value.shape) == 1 and value.dtype in _FLOATS:
            held[name] = lambda value=value: np.asarray(value.const_value.numpy(), np.float32)
    return held


def _embedding_output(graph: ir.Graph) -> ir.Value | None:
    """The hidden state the lookup of the token ids hands the first layer: the first float value computed from
    input_ids that two nodes read (the first norm and the first residual add), whatever the lookup's form (a
    Gather, GatherBlockQuantized with its minimums and padding cut, a split table's Where, input scaling's Mul)."""
    from_ids = {v for v in graph.inputs if v.name == "input_ids"}
    for node in graph:
        if not any(v in from_ids for v in node.inputs if v is not None):
            continue
        for value in node.outputs:
            from_ids.add(value)
            if value.dtype in _FLOATS and len(value.uses()) >= 2:
                return value
    return None


class PackageEmbedding:
    """The rows the package's embedding lookup returns (dequantized, minimums added, input scaling undone, as the
    graph computes them), by running the part of the graph between the token ids and the first norm with ONNX
    Runtime on the ids asked for. That part is saved on its own to a temporary folder: only the table's data is
    copied, never the layers'."""

    def __init__(self, model_path: Path):
        import onnxruntime as ort

        model = ir.load(model_path)
        output = _embedding_output(model.graph)
        if output is None:
            raise ValueError(f"{model_path}: no embedding lookup of the token ids found")
        needed, stack = set(), [output.producer()]
        while stack:
            node = stack.pop()
            if node is not None and node not in needed:
                needed.add(node)
                stack.extend(v.producer() for v in node.inputs if v is not None)
        graph = model.graph
        for node in reversed(list(graph)):
            if node not in needed:
                graph.remove(node)
        graph.outputs.clear()
        graph.outputs.append(output)
        used = {v for node in needed for v in node.inputs if v is not None}
        ids = [v for v in graph.inputs if v in used]
        if len(ids) != 1:
            raise ValueError(f"{model_path}: the embedding depends on {len(ids)} graph inputs, not the token ids")
        graph.inputs.clear()
        graph.inputs.append(ids[0])
        for name in [n for n, v in graph.initializers.items() if v not in used]:
            graph.initializers.pop(name)
        self._folder = tempfile.TemporaryDirectory(prefix="llama-export-embedding-")
        path = Path(self._folder.name) / "embedding.onnx"
        ir.save(model, path, external_data="embedding.onnx.data")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._input = ids[0].name
        self._dtype = np.int32 if ids[0].dtype == ir.DataType.INT32 else np.int64

    def rows(self, start: int, stop: int) -> np.ndarray:
        ids = np.arange(start, stop, dtype=self._dtype)[None, :]
        return np.asarray(self._session.run(None, {self._input: ids})[0][0], np.float32)


def _norm_feeding(name: str) -> str | None:
    """The norm weight a matrix's input is multiplied by (input scaling moves a per-column scale between the two);
    None for matrices whose input is no norm's output."""
    layer, _, rest = name.rpartition(".self_attn.")
    if layer and rest in ("q_proj.weight", "k_proj.weight", "v_proj.weight"):
        return f"{layer}.input_layernorm.weight"
    layer, _, rest = name.rpartition(".mlp.")
    if layer and rest in ("gate_proj.weight", "up_proj.weight"):
        return f"{layer}.post_attention_layernorm.weight"
    return "model.norm.weight" if name == "lm_head.weight" else None


class RowCheck:
    """How far each quantized matrix read back from a package is from the source's: the largest relative distance
    of one row, |package row - source row| / |source row|, each matrix taken times the norm weight that feeds it."""

    def __init__(self, package, source):
        self.package, self.source = package, source
        self.worst: dict[str, tuple[float, int]] = {}  # tensor -> (largest relative row distance, its row)

    def note(self, name: str, ours: np.ndarray, start: int = 0, chunk: int = 4096) -> None:
        """Rows `start`... of tensor `name` as the package holds them, compared `chunk` rows at a time."""
        norm = _norm_feeding(name)
        scale_ours = None if norm is None else self.package.weight(norm).load()
        scale_theirs = None if norm is None else np.asarray(self.source.weight(norm).load(), np.float32)
        for first in range(0, len(ours), chunk):
            block = np.asarray(ours[first:first + chunk], np.float32)
            theirs = np.asarray(self.source.weight(name).rows(start + first, start + first + len(block)), np.float32)
            if norm is not None:
                block, theirs = block * scale_ours, theirs * scale_theirs
            distance = np.linalg.norm(block - theirs, axis=1) / np.maximum(np.linalg.norm(theirs, axis=1), 1e-30)
            distance[~np.isfinite(distance)] = np.inf
            row = int(np.argmax(distance))
            if distance.size and distance[row] >= self.worst.get(name, (-1.0, 0))[0]:
                self.worst[name] = (float(distance[row]), start + first + row)

    def largest(self) -> tuple[str, float, int] | None:
        """(tensor, distance, row) of the row furthest from the source's."""
        if not self.worst:
            return None
        name = max(self.worst, key=lambda n: self.worst[n][0])
        return name, *self.worst[name]


def _checked_reader(rows: RowCheck, name: str, read):
    """read(start, stop), each block of rows it returns compared with the source's by `rows`."""
    return lambda start, stop: _noted(rows, name, read(start, stop), start)


def package_checkpoint(folder: Path, source, check: bool = False):
    """The source checkpoint (exporter.sources.Checkpoint) with the package's own values in place of its
    quantized matrices, norm weights and embedding: transformers' model loaded from it computes what the package
    computes, up to the kernels' arithmetic. Tensors the package keeps in float (a TensorRT target's fp16 lm_head)
    stay the source's. With `check`, each quantized tensor is compared with the source's as it is loaded; the
    result is the checkpoint's `row_check` (a RowCheck)."""
    import dataclasses

    from llama_export.exporter.sources.base import WeightInfo

    model = ir.load(Path(folder) / "model.onnx")
    weights = dict(source.weights)
    if source.config.tie_word_embeddings and "lm_head.weight" not in weights:
        weights["lm_head.weight"] = source.weight(EMBEDDING)
    package = dataclasses.replace(source, name=f"{source.name} with the weights of {folder}", weights=weights)
    rows = RowCheck(package, source) if check else None
    for name, load in norm_weights(model, source.weights).items():
        weights[name] = WeightInfo(shape=source.weight(name).shape, load=load)
    experts: dict[str, dict[int, Callable]] = {}
    for name, (_, read) in checkpoint_matrices(model, lambda name: source.weight(name).shape[0]).items():
        stacked, _, expert = name.rpartition(".")
        if stacked in source.weights and expert.isdigit():  # one expert's matrix (passes/experts.py, sorted form)
            experts.setdefault(stacked, {})[int(expert)] = read
            continue
        shape = source.weight(name).shape
        if rows is not None:
            read = _checked_reader(rows, name, read)
        weights[name] = WeightInfo(shape=shape, load=lambda read=read, n=shape[0]: read(0, n), load_rows=read)
    for name, readers in experts.items():
        shape = source.weight(name).shape  # [experts, in, out]; each expert's reader gives its [out, in] rows
        weights[name] = WeightInfo(shape=shape, load=lambda readers=readers, n=shape[2]: np.stack(
            [readers[e](0, n).T for e in range(len(readers))]))
    for name, load in quantized_experts(model.graph).items():
        weights[name] = WeightInfo(shape=source.weight(name).shape, load=load)
    embedding = PackageEmbedding(Path(folder) / "model.onnx")
    shape = source.weight(EMBEDDING).shape

    def embedding_rows(start: int, stop: int) -> np.ndarray:
        values = embedding.rows(start, stop)
        return values if rows is None else _noted(rows, EMBEDDING, values, start)

    weights[EMBEDDING] = WeightInfo(shape=shape, load=lambda: embedding_rows(0, shape[0]), load_rows=embedding_rows)
    package.row_check = rows
    return package


def _noted(rows: RowCheck, name: str, values: np.ndarray, start: int = 0) -> np.ndarray:
    rows.note(name, values, start)
    return values


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal as float32 bit patterns (so -0.0 differs from 0.0, and NaNs compare)."""
    a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))
