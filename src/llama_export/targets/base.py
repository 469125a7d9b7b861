"""What a target recipe holds: its passes, its INT4 preset, its checks before anything is traced, its check of the
compiled graph, and what it does to a written package (ORT conversion, engine material). The exporter calls these
in one order for every target (exporter/build.py, exporter/pipeline.py), so adding a target is one new file that
defines a Target (or a subclass overriding these methods) and registers it (targets/__init__.py: register)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from llama_export.errors import LlamaExportError
from llama_export.passes import GraphPass
from llama_export.targets.presets import QuantPreset
from llama_export.targets.tensorrt_ops import ParserSupport

# A plain MatMulNBits layout for targets that name no preset of their own: the lm_head 4-bit in 32-blocks (8-bit
# from block 128 up), the edge layers in 32-blocks.
GENERIC_INT4 = QuantPreset("generic")


class TargetError(LlamaExportError):
    """A target cannot take this model or output; reported as one line."""


@dataclass
class Finishing:
    """What a target's finishing step is handed: the staging folder with the written package, and what the build
    knows of it."""

    folder: Path
    io: dict  # the graph's inputs and outputs (targets.package.io_dims)
    context: int
    vocab_size: int
    weight_bytes: dict | None  # Target.weights_summary's, from the build
    keep_graph: bool  # verify will read the ONNX graph's weights back
    log: Callable[[str], None]
    # (model path, io, token ids) -> the package's outputs, from the exporter's runtime (targets do not run packages)
    run_reference_steps: Callable


@dataclass
class Finished:
    manifest: dict  # entries the target adds to manifest.json
    graph: Path | None  # the folder holding the ONNX graph verify reads (None: none kept)


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    device: str
    runtime: str  # what runs the package
    precisions: tuple[str, ...]
    default_precision: str
    pipeline: Callable[..., list[GraphPass]]  # (precision, config, quant options, weight hints) -> passes, in order
    default_block_size: int = 32  # INT4 weights per scale
    int4: QuantPreset = GENERIC_INT4
    memory_gb: float | None = None  # device memory the package must fit (None: not planned)
    reserved_gb: float = 0.0  # of it, what the OS, CUDA and TensorRT keep
    tensorrt: ParserSupport | None = None  # the TensorRT whose ONNX parser must take the graph
    platform: str | None = None  # the software the device runs (JetPack, TensorRT), for the manifest
    model_file: str = "model.onnx"  # the model file genai_config.json names
    # onnxruntime-genai's intra-op threads, written into genai_config.json. None keeps genai's own default (half
    # the logical cores, which assumes two hardware threads per core); 0 lets ONNX Runtime use one per physical core.
    genai_threads: int | None = None

    def check_precision(self, precision: str) -> None:
        if precision not in self.precisions:
            raise TargetError(
                f"target '{self.name}' does not support precision '{precision}' "
                f"(supported: {', '.join(self.precisions)})"
            )

    def check_request(self, precision: str, lm_head_bits: int | None) -> None:
        """Refuse options this target cannot honour, before anything is read."""
        self.check_precision(precision)
        if lm_head_bits is not None and self.int4.lm_head_bits is None:
            raise TargetError(f"target '{self.name}' keeps the lm_head in fp16 (--lm-head-bits is for the cpu target)")

    def int4_preset(self, block_size: int) -> QuantPreset:
        """The INT4 layout at this block size (before the lm_head width is settled: QuantPreset.for_export)."""
        return self.int4

    def preflight(self, shape, precision: str, block_size: int, context: int, preset: QuantPreset,
                  float_embedding: bool, log) -> None:
        """Checks from the config alone, before tracing: on a device with a memory size, the memory plan."""
        if self.memory_gb is None:
            return
        from llama_export.targets.plan import GIB, plan_memory, refusal

        plan = plan_memory(self, shape, precision, context, block_size=block_size)
        if not plan.fits:
            raise TargetError(refusal(plan))
        log(f"      memory plan: {plan.total / GIB:.2f} of {self.memory_gb:g} GiB on {self.device} "
            f"(context {context}; `llama-export plan` for the budget)")

    def check_graph(self, model) -> None:
        """Refuse a compiled graph the target's runtime cannot load (raises TargetError)."""

    def weights_summary(self, model) -> dict | None:
        """Anything about the compiled graph's weights that finish() needs (read before the graph is dropped)."""
        return None

    def finish(self, work: Finishing) -> Finished:
        """Turn the written package into the target's (conversion, extra material); what the manifest gains."""
        return Finished(manifest={}, graph=work.folder)
