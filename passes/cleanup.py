"""Cleanup passes: constant folding on small values, lazy folding of weight transposes, dead-node removal."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.optimizer import fold_constants

from passes.base import GraphPass, count_nodes

# Folding reads its inputs; above this many elements a value is a weight, and weights are only touched lazily.
SMALL_VALUE_LIMIT = 8192


def _reads_weight(node: ir.Node) -> bool | None:
    """False (do not fold) for a node with a weight-sized constant input; None leaves the folder's own rules."""
    for value in node.inputs:
        if value is not None and value.const_value is not None and value.const_value.size > SMALL_VALUE_LIMIT:
            return False
    return None


class FoldConstants(GraphPass):
    """onnxscript's constant folder, kept off every node that reads a weight (it would load the weight; its
    Transpose rule ignores the size limits)."""

    name = "fold-constants"

    def apply(self, model: ir.Model) -> int:
        before = count_nodes(model)
        fold_constants(model, input_size_limit=SMALL_VALUE_LIMIT, output_size_limit=SMALL_VALUE_LIMIT * 32,
                       should_fold=_reads_weight)
        common.RemoveUnusedNodesPass()(model)
        return before - count_nodes(model)


class RemoveDeadNodes(GraphPass):
    name = "remove-dead-nodes"

    def apply(self, model: ir.Model) -> int:
        before = count_nodes(model)
        common.IdentityEliminationPass()(model)
        common.RemoveUnusedNodesPass()(model)
        common.RemoveUnusedOpsetsPass()(model)
        return before - count_nodes(model)


def lazy_transform(source: ir.TensorProtocol, fn, dtype: ir.DataType, shape, name: str) -> ir.LazyTensor:
    """A tensor computed from `source` only when it is written out."""

    def load() -> ir.Tensor:
        return ir.Tensor(np.ascontiguousarray(fn(source.numpy())), name=name)

    return ir.LazyTensor(load, dtype=dtype, shape=ir.Shape(shape), name=name)


class ShareTiedEmbedding(GraphPass):
    """A tied embedding feeds both a row Gather (lookup) and a Transpose (lm_head). Looking tokens up as columns of
    the transposed table, Gather(W^T, ids, axis=1) then a small activation transpose, leaves one weight to store."""

    name = "share-tied-embedding"

    def apply(self, model: ir.Model) -> int:
        sites = 0
        for weight in list(model.graph.initializers.values()):
            if weight.shape is None or len(weight.shape) != 2:
                continue
            users = [node for node, _ in weight.uses()]
            gathers = [n for n in users if n.op_type == "Gather" and n.inputs[0] is weight
                       and n.attributes.get_int("axis", 0) == 0]
            transposes = [n for n in users if n.op_type == "Transpose"
                          and list(n.attributes.get_ints("perm", [1, 0])) == [1, 0]]
            if not gathers or not transposes or len(gathers) + len(transposes) != len(users):
                continue
            if len({id(n) for n in transposes}) > 1:
                continue
            transposed = transposes[0].outputs[0]
            for gather in gathers:
                ids = gather.inputs[1]
                rank = len(ids.shape) if ids.shape is not None else None
                if rank is None:
                    break
                columns = ir.node("Gather", [transposed, ids], attributes={"axis": 1})
                # [hidden, *ids] -> [*ids, hidden]
                back = ir.node("Transpose", [columns.outputs[0]], attributes={"perm": [*range(1, rank + 1), 0]})
                model.graph.insert_before(gather, [columns, back])
                gather.outputs[0].replace_all_uses_with(back.outputs[0])
                back.outputs[0].shape, back.outputs[0].type = gather.outputs[0].shape, gather.outputs[0].type
                model.graph.remove(gather, safe=True)
                sites += 1
        return sites


class FoldWeightTransposes(GraphPass):
    """Transpose(weight) -> a transposed weight, computed lazily when the package is written, so MatMul reads
    its weight directly instead of transposing it on every run (or at session start)."""

    name = "fold-weight-transposes"

    def apply(self, model: ir.Model) -> int:
        graph, sites = model.graph, 0
        for node in list(graph):
            if node.op_type != "Transpose" or node.domain != "":
                continue
            weight = node.inputs[0]
            if weight is None or not weight.is_initializer() or weight.const_value is None:
                continue
            tensor = weight.const_value
            perm = node.attributes.get_ints("perm", list(reversed(range(len(tensor.shape)))))
            shape = [tensor.shape[i] for i in perm]
            sole_use = len(weight.uses()) == 1 and not weight.is_graph_output()
            name = weight.name if sole_use else f"{weight.name}.transposed"
            new_tensor = lazy_transform(tensor, lambda a, p=tuple(perm): a.transpose(p), tensor.dtype, shape, name)
            target = weight if sole_use else ir.Value(name=name)
            target.const_value = new_tensor
            target.shape, target.type = ir.Shape(shape), ir.TensorType(tensor.dtype)
            if not sole_use:
                graph.register_initializer(target)
            node.outputs[0].replace_all_uses_with(target)
            graph.remove(node, safe=True)
            sites += 1
        return sites
