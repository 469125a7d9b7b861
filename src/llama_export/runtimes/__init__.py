"""Running packages: ONNX Runtime sessions, generation loops, and the C/C# programs."""

from llama_export.runtimes.generate import Decoder, generate
from llama_export.runtimes.onnx_package import OnnxPackage, PackageError
from llama_export.runtimes.sampling import Sampler

__all__ = ["Decoder", "OnnxPackage", "PackageError", "Sampler", "generate"]
