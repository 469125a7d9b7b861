"""Traced graphs kept on disk, so that exporting the same architecture again (to another target or precision, or a
fine-tune of the same shape) skips tracing. A graph holds no weights (they are bound to the checkpoint afterwards),
so it is keyed by what the trace depends on: the model's config, its parameter names, the versions of the libraries
that trace and the source of exporter/trace.py. Each entry starts with the SHA-256 of its bytes; an entry that does
not match (a torn write, a full disk) is traced anew. The cache is only an optimization: it never stops an export.

It lies in the folder `traces` of the exporter's cache (default_model.cache_dir: ~/.cache/llama-export);
LLAMA_EXPORT_TRACE_CACHE=DIR puts it elsewhere, LLAMA_EXPORT_TRACE_CACHE=off turns it off."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

from exporter.default_model import cache_dir

CACHE_ENV = "LLAMA_EXPORT_TRACE_CACHE"
KEEP = 32  # entries; the least recently used go first
_OFF = {"", "0", "off", "no", "false"}
_DIGEST = 32


def cache_folder() -> Path | None:
    setting = os.environ.get(CACHE_ENV)
    if setting is not None:
        return None if setting.strip().lower() in _OFF else Path(setting).expanduser()
    return cache_dir() / "traces"


def trace_key(config, parameter_names: list[str]) -> str:
    import onnx
    import onnx_ir
    import onnxscript
    import torch
    import transformers

    settings = json.loads(config.to_json_string(use_diff=False))
    for where_from in ("_name_or_path", "transformers_version"):
        settings.pop(where_from, None)
    versions = [torch.__version__, transformers.__version__, onnxscript.__version__, onnx_ir.__version__,
                onnx.__version__]
    digest = hashlib.sha256(json.dumps([settings, sorted(parameter_names), versions], sort_keys=True).encode())
    digest.update((Path(__file__).parent / "trace.py").read_bytes())
    return digest.hexdigest()


def load(key: str) -> bytes | None:
    folder = cache_folder()
    if folder is None:
        return None
    path = folder / f"{key}.onnx"
    try:
        stored = path.read_bytes()
    except OSError:
        return None
    graph = stored[_DIGEST:]
    if hashlib.sha256(graph).digest() != stored[:_DIGEST]:
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used
    return graph


def store(key: str, graph: bytes) -> None:
    folder = cache_folder()
    if folder is None:
        return
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".partial-")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(hashlib.sha256(graph).digest())
                file.write(graph)
            os.replace(temporary, folder / f"{key}.onnx")
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        _prune(folder)


def _prune(folder: Path) -> None:
    entries = sorted(folder.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[KEEP:]:
        with contextlib.suppress(OSError):
            old.unlink()
