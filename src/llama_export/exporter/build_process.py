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
    stages: list  # each step's title, seconds and peak memory (Progress.stages)
    io: dict
    context: int
    vocab_size: int
    block_size: int
    weight_bytes: dict | None  # ORT-format targets: bytes per kind of weight, for the conversion
    report: str | None  # --report's table
    manifest: dict  # all but the files, the parity and the target's own material


def build_elsewhere(options, source: Path, staging: Path, progress: Progress) -> Built:
    from llama_export import families, targets

    # A family or target registered at run time (by a user's script) travels with the request: a fresh
    # interpreter knows only the built-in ones.
    registered = ([f for name, f in families.FAMILIES.items() if name not in families.BUILT_IN],
                  [t for name, t in targets.TARGETS.items() if name not in targets.BUILT_IN])
    built = call_in_child(__name__, "build_child", (options, source, staging, progress.total, progress.quiet,
                                                    registered), "the export's build")
    progress.step, progress.stages = built.steps, [{**stage, "process": "build"} for stage in built.stages]
    return built


def build_child(options, source: Path, staging: Path, total_steps: int, quiet: bool, registered) -> Built:
    from llama_export import families, targets
    from llama_export.exporter.build import build

    families.FAMILIES.update({family.name: family for family in registered[0]})
    targets.TARGETS.update({target.name: target for target in registered[1]})
    return build(options, source, staging, Progress(total_steps, quiet=quiet))
