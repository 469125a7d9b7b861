"""Hugging Face model folders: config.json plus one or more safetensors files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from llama_export.exporter.errors import UserError
from llama_export.exporter.sources.base import (
    Checkpoint,
    WeightInfo,
    check_llama_config,
    check_weights_match_config,
    read_json_object,
    require_finite,
    require_supported,
)

# Files a runtime tokenizer needs; tokenizer.model is left out on purpose: onnxruntime-genai prefers it over
# tokenizer.json when present, and tokenizer.json is what every runtime here reads.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _load_config(folder: Path):
    from transformers import AutoConfig

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder}: no config.json (not a Hugging Face model folder)")
    raw = read_json_object(config_path, "a config (a JSON object with model_type, hidden_size, ...)")
    from llama_export.families import family_for_multimodal

    multimodal = family_for_multimodal(raw.get("model_type"))
    if multimodal is None:
        require_supported(raw.get("model_type"), folder)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # transformers raises many types for a bad config
        raise UserError(f"{config_path}: cannot read config ({_first_line(exc)})") from None
    if multimodal is None:
        return config, None
    text = config.get_text_config()
    require_supported(getattr(text, "model_type", None), folder)
    return text, multimodal


def _add_end_tokens(folder: Path, config) -> None:
    """generation_config.json's end tokens join config.json's: an instruction model may end its turns with a token
    only that file lists (LLaMA 3 Instruct's <|eot_id|>), and chat, run and Optimum stop on the package's."""
    if not (folder / "generation_config.json").is_file():
        return
    raw = read_json_object(_inside(folder, "generation_config.json"), "a generation config (a JSON object)")
    extra = raw.get("eos_token_id")
    extra = extra if isinstance(extra, list) else [extra]
    current = config.eos_token_id if isinstance(config.eos_token_id, list) else [
        t for t in [config.eos_token_id] if t is not None]
    added = [t for t in extra if type(t) is int and 0 <= t < config.vocab_size and t not in current]
    if added:
        merged = current + added
        config.eos_token_id = merged[0] if len(merged) == 1 else merged


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
            if not all(isinstance(name, str) and name and not Path(name).is_absolute() for name in names):
                raise ValueError("weight_map must map tensor names to shard file names in the folder")
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise UserError(f"{index}: not a valid safetensors index ({exc})") from None
    else:
        names = sorted(path.name for path in folder.glob("*.safetensors"))
    if not names:
        raise UserError(f"{folder}: no .safetensors weights (pytorch_model.bin is not supported; convert it first)")
    for name in names:
        if not (folder / name).is_file():
            raise UserError(f"{folder}: shard {name} is missing or not a regular file")
        _inside(folder, name)
    return [folder / name for name in names]


_MAX_HEADER = 100_000_000  # the safetensors library's limit
# safetensors dtypes a floating-point checkpoint holds, with their sizes in bytes.
_FLOAT_DTYPES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}


def _read_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of one safetensors file, each entry checked against its dtype and the file's length: data
    ranges in bounds, of the size their shape needs, not overlapping."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header length is past the end of the file")
            if header_len > _MAX_HEADER:
                raise ValueError(f"a {header_len}-byte header; the safetensors library reads at most {_MAX_HEADER}")
            header = json.loads(f.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError, RecursionError) as exc:
        raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
    shapes, ranges = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shape, begin, end = _check_entry(path, name, info)
        if 8 + header_len + end > size:
            raise UserError(f"{path}: truncated safetensors file ({size} bytes; tensor '{name}' ends at byte "
                            f"{8 + header_len + end})")
        shapes[name] = shape
        ranges.append((begin, end, name))
    ranges.sort()
    for (_, end, name), (begin, _, other) in zip(ranges, ranges[1:]):
        if begin < end:
            raise UserError(f"{path}: tensors '{name}' and '{other}' overlap in the file (corrupt safetensors)")
        if begin > end:
            raise UserError(f"{path}: a gap of {begin - end} bytes between tensors '{name}' and '{other}' (the "
                            "safetensors library refuses it)")
    data_end = ranges[-1][1] if ranges else 0
    if (ranges and ranges[0][0] != 0) or 8 + header_len + data_end != size:
        raise UserError(f"{path}: the tensors do not fill the file's data exactly ({size - 8 - header_len} bytes "
                        f"of data, the header describes bytes {ranges[0][0] if ranges else 0} to {data_end}); the "
                        "file is corrupt")
    return shapes


def _is_size(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entry(path: Path, name: str, info) -> tuple[tuple[int, ...], int, int]:
    def bad(what: str):
        return UserError(f"{path}: tensor '{name}' {what}")

    if not isinstance(info, dict):
        raise bad("has no dtype, shape and data_offsets")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _FLOAT_DTYPES:
        raise bad(f"has dtype {dtype!r}; llama-export reads {', '.join(_FLOAT_DTYPES)} checkpoints (convert "
                  "quantized or integer weights to one of them first)")
    if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
        raise bad(f"has shape {shape!r}; expected a list of sizes")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_size(o) for o in offsets) \
            or offsets[0] > offsets[1]:
        raise bad(f"has data_offsets {offsets!r}; expected [begin, end] with begin <= end")
    elements = 1
    for d in shape:
        elements *= d
    if offsets[1] - offsets[0] != elements * _FLOAT_DTYPES[dtype]:
        raise bad(f"spans {offsets[1] - offsets[0]} bytes, its shape {shape} in {dtype} needs "
                  f"{elements * _FLOAT_DTYPES[dtype]}")
    return tuple(shape), offsets[0], offsets[1]


def _tensor_loader(path: Path, name: str):
    def load() -> np.ndarray:
        import torch
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return require_finite(f.get_tensor(name).to(torch.float32).numpy(), name, path)

    return load


def _rows_loader(path: Path, name: str):
    def load_rows(start: int, stop: int) -> np.ndarray:
        import torch
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return require_finite(f.get_slice(name)[start:stop].to(torch.float32).numpy(), name, path)

    return load_rows


def _inside(folder: Path, name: str) -> Path:
    """A file of the model, refused when a name or a link leads out of the model folder (except into a Hugging
    Face cache's blobs, where snapshots and folders downloaded with links point)."""
    path = folder / name
    root = folder.resolve()
    if root.parent.name == "snapshots":
        root = root.parent.parent
    target = path.resolve()
    cache_blob = target.parent.name == "blobs" and target.parent.parent.name.startswith("models--")
    if root != target and root not in target.parents and not cache_blob:
        raise UserError(f"{path} links to {target}, outside the model folder; copy the file into the folder "
                        "instead of linking it")
    return target


def open_hf_folder(folder: Path) -> Checkpoint:
    config, multimodal = _load_config(folder)
    check_llama_config(config, folder)
    _add_end_tokens(folder, config)
    files = _safetensors_files(folder)
    weights: dict[str, WeightInfo] = {}
    for path in files:
        for name, shape in _read_header(path).items():
            # a multimodal checkpoint: its text model's tensors by their parameter names, the rest left unread
            parameter = name if multimodal is None else multimodal.text_weight_name(name)
            if parameter is not None:
                weights[parameter] = WeightInfo(shape=shape, load=_tensor_loader(path, name),
                                                load_rows=_rows_loader(path, name))

    for name in TOKENIZER_FILES:  # refused now, not after the long steps
        if (folder / name).is_file():
            _inside(folder, name)

    def write_tokenizer(dest: Path) -> list[str]:
        written = []
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copyfile(_inside(folder, name), dest / name)
                written.append(name)
        return written

    checkpoint = Checkpoint(name=folder.name, kind="hf", path=folder, config=config, weights=weights,
                            files=[folder / "config.json", *files], write_tokenizer=write_tokenizer)
    check_weights_match_config(checkpoint)
    return checkpoint
