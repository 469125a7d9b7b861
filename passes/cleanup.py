"""Cleanup passes: constant folding on small values, lazy folding of weight transposes, dead-node removal."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.optimizer import fold_constants

from passes.base import GraphPass, count_nodes, replace_value

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
    """A tied embedding feeds a row Gather (lookup) and, transposed, the lm_head MatMul. Folding that transpose would
    store the table twice; instead the lm_head becomes Gemm(x, W, transB=1) on the same [vocab, hidden] tensor
    (flattened to 2-D around it), so one copy serves both and the lookup stays a contiguous row Gather."""

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
            if not gathers or len(transposes) != 1 or len(gathers) + 1 != len(users):
                continue
            matmuls = [n for n, i in transposes[0].outputs[0].uses() if n.op_type == "MatMul" and i == 1]
            if not matmuls or len(matmuls) != len(transposes[0].outputs[0].uses()):
                continue
            for matmul in matmuls:
                self._to_gemm(model.graph, matmul, weight)
                sites += 1
            model.graph.remove(transposes[0], safe=True)
        return sites

    @staticmethod
    def _to_gemm(graph: ir.Graph, matmul: ir.Node, weight: ir.Value) -> None:
        x = matmul.inputs[0]
        vocab, hidden = weight.shape
        consts = {
            "flat": ir.tensor(np.array([-1, hidden], dtype=np.int64)),
            "vocab": ir.tensor(np.array([vocab], dtype=np.int64)),
        }
        flat_shape = ir.node("Constant", [], attributes={"value": consts["flat"]})
        vocab_dim = ir.node("Constant", [], attributes={"value": consts["vocab"]})
        lead = ir.node("Shape", [x], attributes={"end": -1})
        out_shape = ir.node("Concat", [lead.outputs[0], vocab_dim.outputs[0]], attributes={"axis": 0})
        flat = ir.node("Reshape", [x, flat_shape.outputs[0]])
        gemm = ir.node("Gemm", [flat.outputs[0], weight], attributes={"transB": 1})
        logits = ir.node("Reshape", [gemm.outputs[0], out_shape.outputs[0]])
        graph.insert_before(matmul, [flat_shape, vocab_dim, lead, out_shape, flat, gemm, logits])
        replace_value(matmul.outputs[0], logits.outputs[0])
        graph.remove(matmul, safe=True)


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
