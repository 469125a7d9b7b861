"""Embedding lookups of block-quantized tables: Gather -> GatherBlockQuantized, sharing the lm_head's bytes where
the table is tied to it (a split lm_head's two parts included), or the table quantized on its own."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from llama_export.names import SOURCE_NAMES
from llama_export.passes.base import replace_value
from llama_export.passes.block_quantized import BlockQuantized, layout_template, quantize_rtn
from llama_export.passes.quantized_graph import (
    Once,
    add_initializer,
    dividing_block,
    float_matrix,
    gather_block_quantized,
    int64_constant,
    lazy_part,
    quantize_by_row_chunks,
)


@dataclass(frozen=True)
class SplitLayout:
    """A lm_head split by rows: its first `rows` and the rest, each (initializer base name, layout)."""

    rows: int
    frequent: tuple[str, BlockQuantized]
    rest: tuple[str, BlockQuantized]


class EmbeddingLookups:
    """The lookups of one QuantizeWeights pass: `apply` rewrites the graph's Gathers, given how the pass laid out
    the lm_head (`layouts`: weight -> BlockQuantized or SplitLayout)."""

    def __init__(self, options, hints, forms):
        self.options, self.hints, self.forms = options, hints, forms

    def apply(self, graph: ir.Graph, layouts: dict[int, BlockQuantized]) -> int:
        """Gather(table [V, H], ids) -> GatherBlockQuantized. A table tied to the lm_head (read here through a
        Transpose of the lm_head's [H, V] weight) shares the lm_head's packed data when the layouts allow."""
        sites = 0
        for node in list(graph):
            if node.op_type != "Gather" or node.domain != "" or node.attributes.get_int("axis", 0) != 0:
                continue
            transpose = node.inputs[0].producer()
            if transpose is not None and transpose.op_type == "Transpose":
                source = float_matrix(transpose, 0)
                if source is None or list(transpose.attributes.get_ints("perm", [1, 0])) != [1, 0]:
                    continue
            else:
                transpose, source = None, float_matrix(node, 0)
                if source is None:
                    continue
            layout = layouts.get(id(source)) if transpose is not None else None
            if isinstance(layout, SplitLayout):
                looked_up = self.split_lookup(graph, node, layout)
            else:
                minimums = None
                if layout is not None and self.shareable(layout):
                    data, scales, zero_points = self.shared_table(graph, source.name)
                else:
                    own = self.own_table(graph, source, transposed=transpose is not None)
                    if own is None:
                        continue
                    data, scales, zero_points, minimums, layout = own
                gather = gather_block_quantized(data, node.inputs[1], scales, zero_points, layout)
                graph.insert_before(node, gather)
                looked_up = gather.outputs[0]
                if minimums is not None:
                    looked_up = self.add_looked_up_minimums(graph, node, looked_up, minimums, layout)
                looked_up = self.unpadded(graph, node, looked_up, layout, source.name)
            looked_up.shape, looked_up.type = node.outputs[0].shape, node.outputs[0].type
            replace_value(node.outputs[0], looked_up)
            graph.remove(node, safe=True)
            if transpose is not None and not transpose.outputs[0].uses():
                graph.remove(transpose, safe=True)
            sites += 1
        return sites

    @staticmethod
    def shareable(layout: BlockQuantized) -> bool:
        """GatherBlockQuantized takes integer zero points only."""
        return layout.minimums is None and (layout.zero_points is None or layout.zero_points.dtype == np.uint8)

    def split_lookup(self, graph: ir.Graph, node: ir.Node, split: SplitLayout) -> ir.Value:
        """The rows of a table tied to a split lm_head, inserted before the Gather `node`: each token is looked up
        in the part holding its row (both lookups run on clamped ids, Where keeps the right one), sharing the
        lm_head's bytes."""
        ids = node.inputs[1]
        base = split.frequent[0]

        def constant(name, value):
            return int64_constant(graph, f"{base}.{name}", value)

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
            data, scales, zero_points = self.shared_table(graph, part_base)
            gather = gather_block_quantized(data, part_ids.outputs[0], scales, zero_points, layout)
            graph.insert_before(node, gather)
            table_rows = self.unpadded(graph, node, gather.outputs[0], layout, f"{base}.{label}")
            table_rows.type = node.outputs[0].type
            looked_up.append(table_rows)
        where = ir.node("Where", [mask.outputs[0], *looked_up])
        graph.insert_before(node, where)
        return where.outputs[0]

    @staticmethod
    def unpadded(graph: ir.Graph, node: ir.Node, rows: ir.Value, layout: BlockQuantized, base: str) -> ir.Value:
        """A lookup's rows cut to the table's width where its blocks are padded (the lookup returns whole
        blocks), inserted before `node`."""
        if layout.columns % layout.block_size == 0:
            return rows
        constants = [int64_constant(graph, f"{base}.cut_{name}", value)
                     for name, value in (("start", [0]), ("columns", [layout.columns]), ("axis", [-1]))]
        cut = ir.node("Slice", [rows, *constants])
        graph.insert_before(node, cut)
        cut.outputs[0].type = rows.type
        return cut.outputs[0]

    def shared_table(self, graph: ir.Graph, base: str):
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

    def own_table(self, graph: ir.Graph, weight: ir.Value, transposed: bool):
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
            once, layout = Once(lambda: self.hints.prequantized(names[0])), source
        elif h % block:
            return None  # no block size divides the rows: the table stays as it is
        else:
            once = Once(lambda: quantize_by_row_chunks(
                weight, None, lambda w: quantize_rtn(w, bits, block, symmetric=True), transposed=transposed))
            layout = layout_template(v, h, bits, block)
        blocks = layout.scales.shape[1]
        base = weight.name + ".gather"
        data = add_initializer(graph, base + ".qdata", lazy_part(
            once, BlockQuantized.gather_data, ir.DataType.UINT8, [v, blocks * layout.block_size * layout.bits // 8],
            base + ".qdata"))
        scales = add_initializer(graph, base + ".scales", lazy_part(
            once, lambda q: q.scales, ir.DataType.FLOAT, [v, blocks], base + ".scales"))
        zero_points = minimums = None
        if layout.minimums is not None:  # zero points 0: the lookup gives scale * q, the minimum is added after
            zero_points = self.forms.zero_points(graph, once, layout, base)
            minimums = self.forms.minimums_input(graph, base + ".minimums", once, lambda q: q.minimums, [v, blocks],
                                           layout.half_params and self.options.half_minimums)
        return data, scales, zero_points, minimums, layout

    @staticmethod
    def add_looked_up_minimums(graph: ir.Graph, node: ir.Node, rows: ir.Value, minimums: ir.Value,
                                layout: BlockQuantized) -> ir.Value:
        """rows [..., H] + each block's minimum, looked up by the same ids [..., blocks] and spread over its block:
        w = scale * q + minimum, in the order llama.cpp computes it."""
        blocks, base = layout.scales.shape[1], minimums.name

        def constant(name, value):
            return int64_constant(graph, f"{base}.{name}", value)

        looked_up = ir.node("Gather", [minimums, node.inputs[1]], attributes={"axis": 0})
        spread = ir.node("Unsqueeze", [looked_up.outputs[0], constant("last_axis", [-1])])
        by_block = ir.node("Reshape", [rows, constant("block_shape", [0, 0, blocks, layout.block_size])])
        added = ir.node("Add", [by_block.outputs[0], spread.outputs[0]])
        flat = ir.node("Reshape", [added.outputs[0], constant("row_shape", [0, 0, blocks * layout.block_size])])
        graph.insert_before(node, [looked_up, spread, by_block, added, flat])
        for step in (looked_up, spread, by_block, added, flat):
            step.outputs[0].type = rows.type
        return flat.outputs[0]
