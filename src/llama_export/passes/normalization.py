"""RMSNorm arithmetic -> ONNX RMSNormalization, then RMSNormalization -> ONNX Runtime's SimplifiedLayerNormalization,
or SkipSimplifiedLayerNormalization where a residual Add feeds the norm (the kernel adds, normalizes, and hands the
sum on to the next residual). Each is an onnxscript rewrite rule: a pattern, a check, a rewrite."""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase
from onnxscript.rewriter.pattern import OrValue

from llama_export.names import MS_DOMAIN
from llama_export.passes.base import RulesPass, constant_scalar

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)
# ONNX Runtime's SimplifiedLayerNormalization computes in float or double only.
STASH_TYPES = (ir.DataType.FLOAT, ir.DataType.DOUBLE)


class RMSNormArithmetic(RewriteRuleClassBase):
    """scale * (x / sqrt(mean(x^2) + eps)) as transformers' LlamaRMSNorm traces it (x * Reciprocal(Sqrt(...))),
    with the optional casts to the compute type and back. (Both orders of the last Mul are stated as two rules:
    onnxscript cannot commute a pattern holding alternatives.)"""

    def __init__(self, scale_first: bool):
        super().__init__(f"rms-norm-scale-{'first' if scale_first else 'last'}")
        self.scale_first = scale_first

    def pattern(self, op, x, scale, epsilon, compute_type, output_type):
        x = OrValue([op.Cast(x, to=compute_type), x])
        mean_square = op.ReduceMean(op.Pow(x, 2.0), [-1], keepdims=1, noop_with_empty_axes=0)
        normalized = op.Mul(x, op.Reciprocal(op.Sqrt(op.Add(mean_square, epsilon))))
        normalized = OrValue([op.Cast(normalized, to=output_type), normalized])
        return op.Mul(scale, normalized) if self.scale_first else op.Mul(normalized, scale)

    def check(self, op, x, scale, epsilon, compute_type, **_) -> MatchResult:
        result = MatchResult()
        if not isinstance(constant_scalar(epsilon), float):
            return result.fail("epsilon is not a float constant", epsilon)
        if x.dtype not in FLOAT_TYPES or scale.dtype not in FLOAT_TYPES:
            return result.fail("input or scale is not a float type", x)
        if _stash_type(x, compute_type) not in STASH_TYPES:
            return result.fail("the normalization is computed in neither float nor double")
        return result

    def rewrite(self, op, x, scale, epsilon, compute_type, **_):
        return op.RMSNormalization(x, scale, axis=-1, epsilon=constant_scalar(epsilon),
                                   stash_type=_stash_type(x, compute_type))


def _stash_type(x: ir.Value, compute_type: ir.Attr | None) -> int:
    return compute_type.as_int() if compute_type is not None else x.dtype


class FuseRMSNorm(RulesPass):
    name = "fuse-rms-norm"
    keep_names = True

    def rules(self, model: ir.Model) -> list:
        return [RMSNormArithmetic.rule(scale_first=True), RMSNormArithmetic.rule(scale_first=False)]


def _last_axis_norm(normalized: ir.Value, x: ir.Value, scale: ir.Value) -> MatchResult:
    """The norm is over the last axis with a 1-D scale, as ONNX Runtime's kernels assume."""
    result = MatchResult()
    axis = normalized.producer().attributes.get_int("axis", -1)
    if x.shape is None or axis not in (-1, len(x.shape) - 1):
        return result.fail("the norm is not over the last axis", x)
    if scale.shape is None or len(scale.shape) != 1:
        return result.fail("the scale is not 1-D", scale)
    return result


def _epsilon(normalized: ir.Value) -> float:
    return normalized.producer().attributes.get_float("epsilon", 1e-5)


class SkipRMSNorm(RewriteRuleClassBase):
    """RMSNormalization(a + b) where the sum also feeds the next residual: one kernel gives both."""

    def pattern(self, op, a, b, scale):
        total = op.Add(a, b)
        return op.RMSNormalization(total, scale, _allow_other_attributes=True, _outputs=["normalized"]), total

    def check(self, op, a, b, scale, normalized, **_) -> MatchResult:
        if not _same_3d_shape(a, b):
            return MatchResult().fail("the residual Add broadcasts", a)
        return _last_axis_norm(normalized, normalized.producer().inputs[0], scale)

    def rewrite(self, op, a, b, scale, normalized, **_):
        fused = op.SkipSimplifiedLayerNormalization(a, b, scale, epsilon=_epsilon(normalized), _domain=MS_DOMAIN,
                                                    _outputs=4)
        return fused[0], fused[3]


class PlainRMSNorm(RewriteRuleClassBase):
    """RMSNormalization -> SimplifiedLayerNormalization (ONNX Runtime's kernel, computing in float)."""

    def pattern(self, op, x, scale):
        return op.RMSNormalization(x, scale, _allow_other_attributes=True, _outputs=["normalized"])

    def check(self, op, x, scale, normalized, **_) -> MatchResult:
        return _last_axis_norm(normalized, x, scale)

    def rewrite(self, op, x, scale, normalized, **_):
        return op.SimplifiedLayerNormalization(x, scale, axis=-1, epsilon=_epsilon(normalized), stash_type=1)


def _same_3d_shape(a: ir.Value, b: ir.Value) -> bool:
    return a.shape is not None and b.shape is not None and len(a.shape) == 3 and list(a.shape) == list(b.shape)


class FuseSkipRMSNorm(RulesPass):
    name = "fuse-skip-rms-norm"

    def rules(self, model: ir.Model) -> list:
        return [SkipRMSNorm.rule(), PlainRMSNorm.rule()]
