"""TensorRT targets: discrete NVIDIA GPUs (TensorRT >= 10.15, native LLM ops) and Jetson modules.

Orin on JetPack 6 runs TensorRT 10.3, whose parser has no RMSNormalization, RotaryEmbedding or Attention: those
are decomposed into primitive ops. Thor (JetPack 7) and discrete GPUs with TensorRT >= 10.15 parse them natively.
Every flavour keeps the KV-cache Concat outside attention, computes in fp16 with norm statistics, rotary arithmetic
and softmax in fp32, and takes INT4 weights as symmetric blocked DequantizeLinear feeding MatMul."""

from dataclasses import dataclass, replace

from llama_export.passes.attention import FuseRotary
from llama_export.passes.cleanup import FoldConstants, FoldWeightTransposes, RemoveDeadNodes, SetOpset, SimplifyPatterns
from llama_export.passes.decompose import DecomposeAttention, DecomposeRMSNorm, DecomposeRotary, PrepareNativeAttention
from llama_export.passes.experts import LowerRoutedExperts
from llama_export.passes.normalization import FuseRMSNorm
from llama_export.passes.packing import PackSiblingMatMuls
from llama_export.passes.precision import ConvertToFloat16
from llama_export.passes.quantize import QuantizeWeights, QuantOptions
from llama_export.targets.base import Finished, Finishing, Target, TargetError
from llama_export.targets.presets import TENSORRT_INT4
from llama_export.targets.tensorrt_ops import TENSORRT_10_3, TENSORRT_10_15, ParserSupport, parser_problems


def tensorrt_quant_options(quant: QuantOptions | None) -> QuantOptions:
    """TENSORRT_INT4's form forced onto the quantizer's options, wherever they were made (the export makes them from
    the preset; tests call the pipeline with plain QuantOptions)."""
    preset = TENSORRT_INT4
    return replace(quant or QuantOptions(block_size=128), form=preset.form, symmetric=preset.symmetric_only,
                   lm_head_bits=preset.lm_head_bits, quantize_embedding=preset.quantize_embedding)


@dataclass(frozen=True)
class TensorRTPasses:
    """The passes for a TensorRT version's parser: native LLM ops where it has them, primitives otherwise (a
    class rather than a closure, so that a target pickles into the build's process)."""

    support: ParserSupport

    def __call__(self, precision: str, config, quant: QuantOptions | None = None, hints=None):
        quantize = [QuantizeWeights(tensorrt_quant_options(quant), hints)] if precision == "int4" else []
        native = "RMSNormalization" in self.support.ops
        ops = [PrepareNativeAttention()] if native else [DecomposeRMSNorm(), DecomposeRotary(), DecomposeAttention()]
        return [
            FoldWeightTransposes(),
            FoldConstants(),
            SimplifyPatterns(),
            FuseRMSNorm(),
            FuseRotary(),
            LowerRoutedExperts("sorted"),  # the parser has no MoE op: tokens grouped by expert, one MatMul each
            PackSiblingMatMuls(),
            *quantize,
            ConvertToFloat16(),
            *ops,
            RemoveDeadNodes(),
            SetOpset(self.support.opset),
        ]


@dataclass(frozen=True)
class TensorRTTarget(Target):
    def check_graph(self, model) -> None:
        problems = parser_problems(model, self.tensorrt)
        if problems:
            raise TargetError(f"the graph holds ops TensorRT {self.tensorrt.version}'s ONNX parser cannot take: "
                              f"{', '.join(problems)}; nothing was written")

    def finish(self, work: Finishing) -> Finished:
        """Profiles, build and check scripts, reference outputs; the engine too where TensorRT and a GPU are here."""
        from llama_export.targets import engine

        work.log("      writing engine build material (profiles, build_engine.py/.sh, reference outputs)")
        spec = engine.write_build_material(work.folder, work.io, work.context, self.platform)
        arrays, inputs, runtime = work.run_reference_steps(work.folder / "model.onnx", work.io,
                                                           engine.reference_ids(work.vocab_size))
        engine.write_reference(work.folder, arrays, inputs, runtime)
        info = {"parser": self.tensorrt.version, "requires": self.platform, "opset": self.tensorrt.opset,
                "context": work.context, "profiles": [p["name"] for p in spec["profiles"]], "engine": None}
        missing = engine.tensorrt_available()
        if missing is None:
            work.log("      building the TensorRT engine on this GPU")
            info["engine"] = engine.build_engine_here(work.folder, log=work.log)
        else:
            info["engine_not_built"] = f"{missing}: build it on the device with build_engine.sh or build_engine.py"
            work.log(f"      engine not built here ({missing}); the package carries the build scripts")
        return Finished(manifest={"tensorrt": info}, graph=work.folder)


def _jetson(name: str, module: str, memory_gb: float, support: ParserSupport, platform: str) -> Target:
    return TensorRTTarget(
        name=name,
        description=f"TensorRT package for {module}",
        device=module,
        runtime=f"TensorRT {support.version} (engine built on the device)",
        precisions=("int4", "fp16"),
        default_precision="int4",
        pipeline=TensorRTPasses(support),
        default_block_size=128,
        int4=TENSORRT_INT4,
        memory_gb=memory_gb,
        # Memory is shared with the CPU: ~1.5 GB for the OS and ~1 GB for CUDA and TensorRT.
        reserved_gb=2.5,
        tensorrt=support,
        platform=platform,
    )


JETPACK_6 = "JetPack 6.1/6.2 (TensorRT 10.3, CUDA 12.6)"
JETPACK_7 = "JetPack 7 with TensorRT >= 10.15"

TENSORRT = TensorRTTarget(
    name="tensorrt",
    description="TensorRT package for discrete NVIDIA GPUs",
    device="NVIDIA GPU, 24 GB",
    runtime="TensorRT >= 10.15",
    precisions=("fp16", "int4"),
    default_precision="fp16",
    pipeline=TensorRTPasses(TENSORRT_10_15),
    default_block_size=128,
    int4=TENSORRT_INT4,
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
