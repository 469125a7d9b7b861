"""The routed-experts operator as PyTorch and the ONNX exporter see it (names.ROUTED_EXPERTS gives its meaning).

A family's traced form calls `torch.ops.llama_export.routed_experts` where transformers would run every expert;
the exporter translates it into one node of llama-export's own domain, which passes/experts.py lowers for each
target. Its PyTorch body (top-1 gather, per token) is there for checking the traced form against transformers."""

from __future__ import annotations

import torch

from llama_export.names import EXPORT_DOMAIN, ROUTED_EXPERTS


@torch.library.custom_op(f"{EXPORT_DOMAIN}::routed_experts", mutates_args=())
def routed_experts(x: torch.Tensor, router_logits: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor) -> torch.Tensor:
    chosen = router_logits.argmax(dim=-1)
    gate, up = torch.bmm(x[:, None, :], gate_up[chosen]).chunk(2, dim=-1)
    return torch.bmm(torch.nn.functional.silu(gate) * up, down[chosen])[:, 0, :]


@routed_experts.register_fake
def _(x, router_logits, gate_up, down):
    return torch.empty_like(x)


def _schema():
    """The operator's ONNX schema (registered once per process: onnxscript builds nodes from schemas)."""
    import onnx

    if onnx.defs.has(ROUTED_EXPERTS, EXPORT_DOMAIN):
        return onnx.defs.get_schema(ROUTED_EXPERTS, 1, EXPORT_DOMAIN)
    parameter = onnx.defs.OpSchema.FormalParameter
    schema = onnx.defs.OpSchema(
        ROUTED_EXPERTS, EXPORT_DOMAIN, 1, doc="llama_export.names.ROUTED_EXPERTS",
        inputs=[parameter(name, "T") for name in ("x", "router_logits", "gate_up", "down")],
        outputs=[parameter("y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float types")])
    onnx.defs.register_schema(schema)
    return schema


def onnx_translations() -> dict:
    """The exporter's translation of the operator: one RoutedExperts node."""
    from onnxscript import values

    operator = values.Op(values.Opset(EXPORT_DOMAIN, 1), ROUTED_EXPERTS, _schema())

    def translate(x, router_logits, gate_up, down):
        return operator(x, router_logits, gate_up, down)

    return {torch.ops.llama_export.routed_experts.default: translate}
