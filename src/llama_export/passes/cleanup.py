"""Cleanup passes: constant folding on small values, lazy folding of weight transposes, dead-node removal,
unread optional outputs left unnamed."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.optimizer import fold_constants
from onnxscript.rewriter import rewrite

from llama_export.names import MS_DOMAIN
from llama_export.passes.base import GraphPass, count_nodes
from llama_export.passes.streamed import RowStreamedTensor

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


# onnxscript's default rewrite rules (what `onnxscript.rewriter.rewrite` applies when given none), in its order,
# from its public rules module.
DEFAULT_RULE_NAMES = (
    "sub_0_rule", "div_by_1_rule", "dropout_zero_rule", "dropout_inference_rule", "two_reshapes_matmul_reshape_rule",
    "one_reshape_matmul_reshape_rule", "cast_constant_of_shape_rule", "cast_constant_of_shape_without_value_rule",
    "collapse_slice_rule", "collapse_slice2_rule", "materialize_reshape_shape_rule", "min_min_rule", "max_max_rule",
    "min_max_rule", "max_min_rule", "successive_clip_relu_rule", "successive_relu_clip_rule", "successive_relu_rule",
    "successive_clip_rule", "cast_cast_rule", "no_op_cast_rule", "no_op_expand_rule", "flatten_to_reshape_rule",
    "reshape_reshape_rule", "slice_split_rule", "no_op_transpose_rule", "transpose_transpose_rule",
    "unsqueeze_unsqueeze_rule", "squeeze_reshape_1d_rule", "no_op_dynamic_scatter_nd_rule",
    "no_op_static_scatter_nd_rule", "normalize_pad_format_conv_rule", "normalize_pad_format_conv_integer_rule",
    "fuse_pad_into_conv_rule", "fuse_pad_into_conv_integer_rule", "fuse_batchnorm_into_conv_rule",
    "fuse_batchnorm_into_conv_transpose_rule", "fuse_batchnorm_into_gemm_rule", "remove_optional_bias_from_conv_rule",
    "remove_optional_bias_from_conv_transpose_rule", "remove_optional_bias_from_qlinear_conv_rule",
    "remove_optional_bias_from_gemm_rule",
)


def default_rules() -> list | None:
    """Copies of onnxscript's default rules, made per run: a rule's matcher keeps the graph it last looked at, and
    the module's own rule objects would keep the exported graph (and through its lazy weights the calibration
    stream) reachable after the package is written. None where a module rule already holds a graph (something
    else in this process ran them): copying would copy that graph; the module's rules are used then."""
    import copy

    from onnxscript.rewriter.rules import common as rules

    identities = [*rules.mul_by_1_rule.commute(), *rules.add_0_rule.commute()]  # x*1, 1*x, x+0, 0+x
    try:
        return identities + [copy.deepcopy(getattr(rules, name)) for name in DEFAULT_RULE_NAMES]
    except RecursionError:
        return None


class SimplifyPatterns(GraphPass):
    """onnxscript's default rewrite rules (no-op removal, slice collapsing...) so the fusions see canonical forms."""

    name = "simplify"

    def apply(self, model: ir.Model) -> int:
        before = count_nodes(model)
        rewrite(model, default_rules())  # None: onnxscript's own
        FoldConstants().apply(model)  # the fusions' matchers read constant values, not Constant nodes
        return before - count_nodes(model)


class RemoveDeadNodes(GraphPass):
    name = "remove-dead-nodes"

    def apply(self, model: ir.Model) -> int:
        before = count_nodes(model)
        common.IdentityEliminationPass()(model)
        common.RemoveUnusedNodesPass()(model)
        common.RemoveUnusedOpsetsPass()(model)
        return before - count_nodes(model)


# Outputs a kernel computes only when the graph asks for them: (domain, op) -> their positions.
OPTIONAL_OUTPUTS = {
    (MS_DOMAIN, "SkipSimplifiedLayerNormalization"): (1, 2, 3),  # mean, inverse std, residual sum
    (MS_DOMAIN, "SkipLayerNormalization"): (1, 2, 3),
    ("", "SimplifiedLayerNormalization"): (1, 2),
    ("", "LayerNormalization"): (1, 2),
}


class DropUnusedOutputs(GraphPass):
    """Leaves unread optional outputs unnamed, so the kernel neither computes nor allocates them (ONNX Runtime's
    SkipSimplifiedLayerNormalization writes its mean and inverse std whenever they have a name)."""

    name = "drop-unused-outputs"

    def apply(self, model: ir.Model) -> int:
        dropped = 0
        for node in model.graph:
            for position in OPTIONAL_OUTPUTS.get((node.domain, node.op_type), ()):
                value = node.outputs[position] if position < len(node.outputs) else None
                if value is not None and value.name and not value.uses() and not value.is_graph_output():
                    value.name = ""
                    dropped += 1
        return dropped


def lazy_transform(sources: list[ir.TensorProtocol], fn, dtype: ir.DataType, shape, name: str) -> ir.LazyTensor:
    """A tensor computed as fn(*sources) only when it is written out."""

    def load() -> ir.Tensor:
        return ir.Tensor(np.ascontiguousarray(fn(*(source.numpy() for source in sources))), name=name)

    return ir.LazyTensor(load, dtype=dtype, shape=ir.Shape(shape), name=name)


class FoldWeightTransposes(GraphPass):
    """Transpose(weight) -> a transposed weight, computed lazily when the package is written, so MatMul reads
    its weight directly instead of transposing it on every run.

    A weight also read untransposed (a tied embedding: row Gather for lookup, transposed for the lm_head) is still
    stored once, transposed for the MatMul; its other readers get a Transpose that ONNX Runtime folds when the
    session loads. Measured faster than a strided Gather(axis=1) or a Gemm(transB) on the untransposed table."""

    name = "fold-weight-transposes"

    def apply(self, model: ir.Model) -> int:
        graph, sites = model.graph, 0
        for node in list(graph):
            if node.op_type != "Transpose" or node.domain != "":
                continue
            weight = node.inputs[0]
            if weight is None or not weight.is_initializer() or weight.const_value is None:
                continue
            if any(user.op_type == "Transpose" and user is not node for user, _ in weight.uses()):
                continue  # two transposes of one weight: leave it alone
            tensor = weight.const_value
            perm = node.attributes.get_ints("perm", list(reversed(range(len(tensor.shape)))))
            shape = [tensor.shape[i] for i in perm]
            others = [(user, index) for user, index in weight.uses() if user is not node]
            if isinstance(tensor, RowStreamedTensor):
                weight.const_value = tensor.transpose()
            else:
                weight.const_value = lazy_transform([tensor], lambda a, p=tuple(perm): a.transpose(p), tensor.dtype,
                                                    shape, weight.name)
            weight.shape = ir.Shape(shape)
            if others:
                inverse = [perm.index(i) for i in range(len(perm))]
                restore = ir.node("Transpose", [weight], attributes={"perm": inverse})
                graph.insert_before(others[0][0], restore)
                restore.outputs[0].shape, restore.outputs[0].type = ir.Shape(tensor.shape), weight.type
                for user, index in others:
                    user.replace_input_with(index, restore.outputs[0])
            node.outputs[0].replace_all_uses_with(weight)
            graph.remove(node, safe=True)
            sites += 1
        return sites


class SetOpset(GraphPass):
    """Declare the default-domain opset a runtime's parser expects (the ops left must exist there unchanged:
    the target's op check runs after this)."""

    name = "set-opset"

    def __init__(self, version: int):
        self.version = version

    def apply(self, model: ir.Model) -> int:
        changed = model.opset_imports.get("") != self.version
        model.opset_imports[""] = self.version
        return int(changed)
