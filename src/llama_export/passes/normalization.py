"""RMSNorm arithmetic -> ONNX RMSNormalization (onnxscript's fusion), then RMSNormalization -> ONNX Runtime's
SimplifiedLayerNormalization, and SkipSimplifiedLayerNormalization where a residual Add feeds the norm (the kernel
adds, normalizes, and hands the sum on to the next residual)."""

from __future__ import annotations

import onnx_ir as ir

from llama_export.names import MS_DOMAIN
from llama_export.passes.base import GraphPass, replace_value


class FuseRMSNorm(GraphPass):
    """RMSNorm arithmetic -> ONNX RMSNormalization (onnxscript's opset-23 fusion)."""

    name = "fuse-rms-norm"

    def apply(self, model: ir.Model) -> int:
        from onnxscript.rewriter.rules.fusion import _rms_normalization

        return _rms_normalization.fuse_rms_normalization(model)


def _same_shape(a: ir.Value, b: ir.Value) -> bool:
    return a.shape is not None and b.shape is not None and len(a.shape) == 3 and list(a.shape) == list(b.shape)


class FuseSkipRMSNorm(GraphPass):
    name = "fuse-skip-rms-norm"

    def apply(self, model: ir.Model) -> int:
        graph, sites = model.graph, 0
        for norm in list(graph):
            if norm.op_type != "RMSNormalization" or norm.domain != "" or len(norm.inputs) != 2:
                continue
            axis = norm.attributes.get_int("axis", -1)
            x, scale = norm.inputs
            if x.shape is None or axis not in (-1, len(x.shape) - 1) or scale.shape is None or len(scale.shape) != 1:
                continue
            epsilon = norm.attributes.get_float("epsilon", 1e-5)
            add = x.producer()
            if add is not None and add.op_type == "Add" and add.domain == "" and _same_shape(*add.inputs):
                fused = ir.node("SkipSimplifiedLayerNormalization", [add.inputs[0], add.inputs[1], scale],
                                attributes={"epsilon": epsilon}, domain=MS_DOMAIN, num_outputs=4)
                graph.insert_before(norm, fused)
                replace_value(x, fused.outputs[3])
            else:
                fused = ir.node("SimplifiedLayerNormalization", [x, scale],
                                attributes={"axis": -1, "epsilon": epsilon, "stash_type": 1})
                graph.insert_before(norm, fused)
            replace_value(norm.outputs[0], fused.outputs[0])
            graph.remove(norm, safe=True)
            if add is not None and not any(len(o.uses()) for o in add.outputs) and not add.outputs[0].is_graph_output():
                graph.remove(add, safe=True)
            sites += 1
        if sites:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return sites
