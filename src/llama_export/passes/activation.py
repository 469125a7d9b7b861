"""SiLU, x * Sigmoid(x), -> ONNX Runtime's QuickGelu with alpha 1 (x * sigmoid(1 * x)): one kernel, same numbers."""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import RewriteRuleClassBase

from llama_export.names import MS_DOMAIN
from llama_export.passes.base import RulesPass


class SiLUAsQuickGelu(RewriteRuleClassBase):
    def pattern(self, op, x):
        return op.Mul(x, op.Sigmoid(x))

    def rewrite(self, op, x):
        return op.QuickGelu(x, alpha=1.0, _domain=MS_DOMAIN)


class FuseSiLU(RulesPass):
    name = "fuse-silu"
    commute = True  # Sigmoid(x) * x as well

    def rules(self, model: ir.Model) -> list:
        return [SiLUAsQuickGelu.rule()]
