"""SiLU, x * Sigmoid(x), -> ONNX Runtime's QuickGelu with alpha 1 (x * sigmoid(1 * x)): one kernel, same numbers."""

from __future__ import annotations

import onnx_ir as ir

from llama_export.names import MS_DOMAIN
from llama_export.passes.base import GraphPass, replace_value


class FuseSiLU(GraphPass):
    name = "fuse-silu"

    def apply(self, model: ir.Model) -> int:
        graph, sites = model.graph, 0
        for mul in list(graph):
            if mul.op_type != "Mul" or mul.domain != "" or len(mul.inputs) != 2:
                continue
            for x, gate in (mul.inputs, tuple(reversed(mul.inputs))):
                sigmoid = gate.producer() if gate is not None else None
                if sigmoid is None or sigmoid.op_type != "Sigmoid" or sigmoid.domain != "":
                    continue
                if sigmoid.inputs[0] is not x or len(gate.uses()) != 1 or gate.is_graph_output():
                    continue
                silu = ir.node("QuickGelu", [x], attributes={"alpha": 1.0}, domain=MS_DOMAIN)
                graph.insert_before(mul, silu)
                replace_value(mul.outputs[0], silu.outputs[0])
                graph.remove([mul, sigmoid], safe=True)
                sites += 1
                break
        if sites:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return sites
