"""Running packages: ONNX Runtime sessions, generation loops, and the C/C# programs."""

from runtimes.onnx_package import OnnxPackage, PackageError
from runtimes.generate import Decoder, generate
from runtimes.sampling import Sampler

__all__ = ["Decoder", "OnnxPackage", "PackageError", "Sampler", "generate"]
