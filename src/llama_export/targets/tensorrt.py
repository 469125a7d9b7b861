"""TensorRT targets: discrete NVIDIA GPUs (TensorRT >= 10.15, native LLM ops) and Jetson modules.

Orin on JetPack 6 runs TensorRT 10.3, whose parser has no RMSNormalization, RotaryEmbedding or Attention: those
are decomposed into primitive ops. Thor (JetPack 7) and discrete GPUs with TensorRT >= 10.15 parse them natively.
Every flavour keeps the KV-cache Concat outside attention, computes in fp16 with norm statistics, rotary arithmetic
and softmax in fp32, and takes INT4 weights as symmetric blocked DequantizeLinear feeding MatMul."""

from dataclasses import replace

from llama_export.passes.attention import FuseRotary
from llama_export.passes.cleanup import FoldConstants, FoldWeightTransposes, RemoveDeadNodes, SetOpset, SimplifyPatterns
from llama_export.passes.decompose import DecomposeAttention, DecomposeRMSNorm, DecomposeRotary, PrepareNativeAttention
from llama_export.passes.normalization import FuseRMSNorm
from llama_export.passes.packing import PackSiblingMatMuls
from llama_export.passes.precision import ConvertToFloat16
from llama_export.passes.quantize import QuantizeWeights, QuantOptions
from llama_export.targets.base import Target
from llama_export.targets.tensorrt_ops import TENSORRT_10_3, TENSORRT_10_15, ParserSupport


def tensorrt_quant_options(quant: QuantOptions | None) -> QuantOptions:
    """TensorRT takes weight-only INT4 as symmetric blocked DequantizeLinear (zero zero-point). The embedding
    lookup stays fp16 (the parser's INT4 path is for weights feeding MatMul), and so does the lm_head, as
    TensorRT-LLM's INT4 recipes leave it."""
    return replace(quant or QuantOptions(block_size=128), form="dequantizelinear", symmetric=True, lm_head_bits=None,
                   quantize_embedding=False)


def tensorrt_pipeline(support: ParserSupport):
    native = "RMSNormalization" in support.ops

    def pipeline(precision: str, config, quant: QuantOptions | None = None, hints=None):
        quantize = [QuantizeWeights(tensorrt_quant_options(quant), hints)] if precision == "int4" else []
        ops = [PrepareNativeAttention()] if native else [DecomposeRMSNorm(), DecomposeRotary(), DecomposeAttention()]
        return [
            FoldWeightTransposes(),
            FoldConstants(),
            SimplifyPatterns(),
            FuseRMSNorm(),
            FuseRotary(),
            PackSiblingMatMuls(),
            *quantize,
            ConvertToFloat16(),
            *ops,
            RemoveDeadNodes(),
            SetOpset(support.opset),
        ]

    return pipeline


def _jetson(name: str, module: str, memory_gb: float, support: ParserSupport, platform: str) -> Target:
    return Target(
        name=name,
        description=f"TensorRT package for {module}",
        device=module,
        runtime=f"TensorRT {support.version} (engine built on the device)",
        precisions=("int4", "fp16"),
        default_precision="int4",
        pipeline=tensorrt_pipeline(support),
        default_block_size=128,
        memory_gb=memory_gb,
        # Memory is shared with the CPU: ~1.5 GB for the OS and ~1 GB for CUDA and TensorRT.
        reserved_gb=2.5,
        tensorrt=support,
        platform=platform,
    )


JETPACK_6 = "JetPack 6.1/6.2 (TensorRT 10.3, CUDA 12.6)"
JETPACK_7 = "JetPack 7 with TensorRT >= 10.15"

TENSORRT = Target(
    name="tensorrt",
    description="TensorRT package for discrete NVIDIA GPUs",
    device="NVIDIA GPU, 24 GB",
    runtime="TensorRT >= 10.15",
    precisions=("fp16", "int4"),
    default_precision="fp16",
    pipeline=tensorrt_pipeline(TENSORRT_10_15),
    default_block_size=128,
    memory_gb=24.0,  # a desktop card; `plan --memory` for others
    reserved_gb=1.0,
    tensorrt=TENSORRT_10_15,
    platform="TensorRT >= 10.15, CUDA 12 or 13",
)
JETSON_TARGETS = (
    _jetson("jetson-orin", "Jetson AGX Orin 32 GB (64 GB too)", 32.0, TENSORRT_10_3, JETPACK_6),
    _jetson("jetson-orin-nx", "Jetson Orin NX 16 GB", 16.0, TENSORRT_10_3, JETPACK_6),
    _jetson("jetson-orin-nano", "Jetson Orin Nano 8 GB", 8.0, TENSORRT_10_3, JETPACK_6),
    _jetson("jetson-thor", "Jetson AGX Thor 128 GB", 128.0, TENSORRT_10_15, JETPACK_7),
)
