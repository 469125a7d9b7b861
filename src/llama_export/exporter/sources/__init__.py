"""Checkpoint sources: each turns a path into a Checkpoint (config + lazily loaded weights)."""

from pathlib import Path

from llama_export.exporter.errors import UserError
from llama_export.exporter.sources.base import Checkpoint, check_llama_config


def open_checkpoint(path: str | Path, lora=()) -> Checkpoint:
    """Open a Hugging Face model folder, a Meta checkpoint folder or a llama.cpp GGUF file, reading headers only;
    `lora`: (adapter folder, weight) pairs merged into the weights as they load."""
    path = Path(path).expanduser()
    check_source_path(path)
    try:
        checkpoint = _open(path)
        if lora:
            from llama_export.exporter.sources.lora import apply_adapters

            apply_adapters(checkpoint, lora)
        return checkpoint
    except OSError as exc:  # unreadable files, special files, I/O errors
        raise UserError(f"{exc.filename or path}: cannot read it ({exc.strerror or exc})") from None


def check_source_path(path: Path) -> None:
    """What can be told of a source without reading it."""
    if not path.exists():
        raise UserError(f"model path not found: {path}")
    if not path.is_dir() and path.suffix.lower() != ".gguf":
        raise UserError(f"not a model: {path} (expected a Hugging Face folder with config.json, a Meta folder with "
                        "params.json, or a .gguf file)")


def _open(path: Path) -> Checkpoint:
    if path.is_dir():
        from llama_export.exporter.sources.hf import open_hf_folder
        from llama_export.exporter.sources.meta import is_meta_folder, open_meta_folder

        if is_meta_folder(path):
            return open_meta_folder(path)

        return open_hf_folder(path)
    from llama_export.exporter.sources.gguf_file import open_gguf

    return open_gguf(path)


__all__ = ["Checkpoint", "check_llama_config", "check_source_path", "open_checkpoint"]
