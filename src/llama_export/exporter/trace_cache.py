"""Traced graphs kept on disk, so that exporting the same architecture again (to another target or precision, or a
fine-tune of the same shape) skips tracing. A graph holds no weights (they are bound to the checkpoint afterwards),
so it is keyed by what the trace depends on: the model's config, its parameter names, the versions of the libraries
that trace, and the source of transformers' LLaMA model and of exporter/trace.py. Each entry (`<key>.trace`)
starts with the SHA-256 of its bytes; an entry that does not match (a torn write, a full disk) is traced anew.
The cache is only an optimization: it never stops an export, and it removes no file but its own entries.

It lies in the folder `traces` of the exporter's cache (default_model.cache_dir: ~/.cache/llama-export);
LLAMA_EXPORT_TRACE_CACHE=DIR puts it elsewhere, LLAMA_EXPORT_TRACE_CACHE=off turns it off."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path

from llama_export.exporter.default_model import cache_dir

CACHE_ENV = "LLAMA_EXPORT_TRACE_CACHE"
KEEP = 32  # entries; the least recently used go first
_OFF = {"", "0", "off", "no", "false"}
_DIGEST = 32
_SUFFIX = ".trace"
_ENTRY = re.compile(r"[0-9a-f]{64}\.trace")  # only these are ever pruned: the folder may be one the user chose
_PARTIAL_AGE = 3600  # seconds after which a partial write (its writer killed) is removed


def cache_folder() -> Path | None:
    setting = os.environ.get(CACHE_ENV)
    try:
        if setting is not None:
            return None if setting.strip().lower() in _OFF else Path(setting).expanduser()
        return cache_dir() / "traces"
    except RuntimeError:  # no home folder to expand or default to
        return None


def trace_key_or_none(config, parameter_names: list[str]) -> str | None:
    """The key, or None when the cache is off or the key cannot be made (the cache never stops an export)."""
    if cache_folder() is None:
        return None
    try:
        return trace_key(config, parameter_names)
    except Exception:  # noqa: BLE001 - an unreadable source file, an unexpected config value: trace as usual
        return None


def trace_key(config, parameter_names: list[str]) -> str:
    import onnx
    import onnx_ir
    import onnxscript
    import torch
    import transformers

    from llama_export.families import family_of

    settings = json.loads(config.to_json_string(use_diff=False))
    for where_from in ("_name_or_path", "transformers_version"):
        settings.pop(where_from, None)
    versions = [torch.__version__, transformers.__version__, onnxscript.__version__, onnx_ir.__version__,
                onnx.__version__]
    digest = hashlib.sha256(json.dumps([settings, sorted(parameter_names), versions], sort_keys=True).encode())
    from llama_export import families

    modeling = family_of(config).module()
    traced_forms = sorted(Path(families.__file__).parent.glob("*.py"))  # the families' replacement forms
    for source in (Path(modeling.__file__), Path(__file__).parent / "trace.py", *traced_forms):  # a dev's edits
        digest.update(source.read_bytes())
    return digest.hexdigest()


def load(key: str) -> bytes | None:
    folder = cache_folder()
    if folder is None:
        return None
    path = folder / f"{key}{_SUFFIX}"
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
            os.replace(temporary, folder / f"{key}{_SUFFIX}")
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        _prune(folder)


def _prune(folder: Path) -> None:
    entries = sorted((p for p in folder.iterdir() if _ENTRY.fullmatch(p.name)), key=lambda p: p.stat().st_mtime,
                     reverse=True)
    stale = [p for p in folder.glob(".partial-*") if time.time() - p.stat().st_mtime > _PARTIAL_AGE]
    for old in entries[KEEP:] + stale:
        with contextlib.suppress(OSError):
            old.unlink()
