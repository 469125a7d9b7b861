"""What a target recipe holds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from llama_export.passes import GraphPass
from llama_export.targets.tensorrt_ops import ParserSupport


class TargetError(Exception):
    """A target cannot take this model or output; reported as one line."""


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
    memory_gb: float | None = None  # device memory the package must fit (None: not planned)
    reserved_gb: float = 0.0  # of it, what the OS, CUDA and TensorRT keep
    tensorrt: ParserSupport | None = None  # the TensorRT whose ONNX parser must take the graph
    platform: str | None = None  # the software the device runs (JetPack, TensorRT), for the manifest
    package_format: str = "onnx"  # "ort": one ORT-format flatbuffer for ONNX Runtime Mobile
    # onnxruntime-genai's intra-op threads, written into genai_config.json. None keeps genai's own default (half
    # the logical cores, which assumes two hardware threads per core); 0 lets ONNX Runtime use one per physical core.
    genai_threads: int | None = None

    @property
    def uses_tensorrt(self) -> bool:
        return self.tensorrt is not None

    def check_precision(self, precision: str) -> None:
        if precision not in self.precisions:
            raise TargetError(
                f"target '{self.name}' does not support precision '{precision}' "
                f"(supported: {', '.join(self.precisions)})"
            )
