"""The `cpu` target: an ONNX Runtime package for x86-64 and Arm CPUs, loadable by onnxruntime-genai as is."""

from dataclasses import dataclass, replace

from llama_export.names import SOURCE_NAMES
from llama_export.passes.activation import FuseSiLU
from llama_export.passes.attention import FuseGroupQueryAttention, FuseRotary
from llama_export.passes.cleanup import (
    DropUnusedOutputs,
    FoldConstants,
    FoldWeightTransposes,
    RemoveDeadNodes,
    SimplifyPatterns,
)
from llama_export.passes.experts import LowerRoutedExperts
from llama_export.passes.normalization import FuseRMSNorm, FuseSkipRMSNorm
from llama_export.passes.packing import PackGateUp, PackQKV, RemoveUnusedInputs
from llama_export.passes.quantize import QuantizeWeights, QuantOptions
from llama_export.passes.scaling import ScaleNormedInputs
from llama_export.targets.base import Target
from llama_export.targets.presets import CPU_FAST, CPU_FAST_FROM_BLOCK, CPU_FINE, QuantPreset


def cpu_pipeline(precision: str, config, quant: QuantOptions | None = None, hints=None):
    quantize, experts = [], LowerRoutedExperts("moe")
    if precision == "int4":
        # MatMulNBits with int8 activations (accuracy_level 4): the fastest CPU kernels, measured quality loss
        # well under the weights' own.
        options = replace(quant or QuantOptions(), form="matmulnbits", accuracy_level=4)
        experts = LowerRoutedExperts("qmoe", options.block_size)
        quantize = [ScaleNormedInputs(hints, options.block_size, SOURCE_NAMES), QuantizeWeights(options, hints)]
    return [
        FoldWeightTransposes(),
        FoldConstants(),
        SimplifyPatterns(),
        FuseRMSNorm(),
        FuseRotary(),
        FuseGroupQueryAttention(max_positions=config.max_position_embeddings),
        FuseSkipRMSNorm(),
        PackQKV(),
        PackGateUp(),
        FuseSiLU(),
        experts,
        *quantize,
        RemoveDeadNodes(),
        RemoveUnusedInputs(),
        DropUnusedOutputs(),
    ]


@dataclass(frozen=True)
class CpuTarget(Target):
    def int4_preset(self, block_size: int) -> QuantPreset:
        """Below block 128 the split lm_head and finer edge layers; from 128 up the builder's fast layout."""
        return CPU_FAST if block_size >= CPU_FAST_FROM_BLOCK else CPU_FINE


CPU = CpuTarget(
    name="cpu",
    description="ONNX Runtime package for CPUs (x86-64, Arm64)",
    device="any CPU",
    runtime="onnxruntime (CPUExecutionProvider), onnxruntime-genai",
    precisions=("fp32", "int4"),
    default_precision="fp32",
    pipeline=cpu_pipeline,
    int4=CPU_FINE,
    # On CPUs without SMT (most Arm boards, many VMs) genai's default leaves half the cores idle: measured 1.9x
    # decode on a 2-core VM with one thread per physical core instead (bench/decode_speed.py).
    genai_threads=0,
)
