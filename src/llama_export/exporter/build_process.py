"""The build (exporter/build.py) in a process of its own, used for large sources: when that process ends,
everything the build allocated (PyTorch and transformers themselves, the traced graph, calibration) is the
operating system's again, so the package then runs (engine references, verify) in a process that holds little
besides ONNX Runtime. Nothing here loads PyTorch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llama_export.exporter.child_process import call_in_child
from llama_export.exporter.progress import Progress


@dataclass
class Built:
    """What the rest of the export needs from the build (plain values: it may cross a process boundary)."""
    steps: int  # progress steps taken
    io: dict
    context: int
    vocab_size: int
    block_size: int
    weight_bytes: dict | None  # ORT-format targets: bytes per kind of weight, for the conversion
    report: str | None  # --report's table
    manifest: dict  # all but the files, the parity and the target's own material


def build_elsewhere(options, source: Path, staging: Path, progress: Progress) -> Built:
    built = call_in_child(__name__, "build_child", (options, source, staging, progress.total, progress.quiet),
                          "the export's build")
    progress.step = built.steps
    return built


def build_child(options, source: Path, staging: Path, total_steps: int, quiet: bool) -> Built:
    from llama_export.exporter.build import build

    return build(options, source, staging, Progress(total_steps, quiet=quiet))
