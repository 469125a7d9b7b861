"""llama-export: compile LLaMA-family checkpoints into verified ONNX Runtime and TensorRT edge packages.

exporter: sources, tracing, calibration, verification, the pipeline and the CLI; passes: graph-to-graph
transformations; targets: one recipe per target and the package writers; runtimes: running packages, and the C and
C# programs that embed them.

The Python API (exporter/api.py): `export(model, target, ...)`, `verify(package, ...)`, `load(package)` with
`generate` and `chat`; their errors derive from `LlamaExportError`."""

from llama_export.errors import LlamaExportError

_API = ("export", "verify", "load")


def __getattr__(name: str):
    """The API's functions, imported on first use: `import llama_export` stays light."""
    if name in _API:
        from llama_export.exporter import api

        return getattr(api, name)
    raise AttributeError(f"module 'llama_export' has no attribute {name!r}")


__all__ = ["LlamaExportError", *_API]
