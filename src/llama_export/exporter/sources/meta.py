"""Meta's original checkpoints (`llama model download`, the LLaMA 1 release): params.json, consolidated.NN.pth
model-parallel shards and tokenizer.model. Each tensor is read alone from memory-mapped shards and joined across
them; a shard's pickle is read by PyTorch's weights-only loader, which refuses anything but tensors."""

from __future__ import annotations

import re
from dataclasses import dataclass
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
    unpermute_rows,
)

# Meta's names -> transformers' (LLaMA 1, 2 and 3 share them), and the dimension model parallelism splits:
# 0 for column-parallel matrices (each shard holds some outputs), 1 for row-parallel ones (some inputs), None for
# tensors every shard holds whole. The embedding's is read from its shape (LLaMA 1/2 split the model dimension,
# LLaMA 3 the vocabulary).
_LAYER_NAMES = {
    "attention.wq": ("self_attn.q_proj", 0),
    "attention.wk": ("self_attn.k_proj", 0),
    "attention.wv": ("self_attn.v_proj", 0),
    "attention.wo": ("self_attn.o_proj", 1),
    "feed_forward.w1": ("mlp.gate_proj", 0),
    "feed_forward.w2": ("mlp.down_proj", 1),
    "feed_forward.w3": ("mlp.up_proj", 0),
    "attention_norm": ("input_layernorm", None),
    "ffn_norm": ("post_attention_layernorm", None),
}
_MODEL_NAMES = {"tok_embeddings": ("model.embed_tokens", "embedding"), "norm": ("model.norm", None),
                "output": ("lm_head", 0)}
_LAYER = re.compile(r"layers\.(\d+)\.(.+)\.weight")
_IGNORED = {"rope.freqs"}  # LLaMA 1/2 store their RoPE frequencies; they follow from params.json
_FLOAT_DTYPES = ("torch.float32", "torch.bfloat16", "torch.float16")


def is_meta_folder(folder: Path) -> bool:
    return (folder / "params.json").is_file() and not (folder / "config.json").is_file()


def _shard_files(folder: Path) -> list[Path]:
    from llama_export.exporter.sources.hf import _inside

    shards = sorted(folder.glob("consolidated.*.pth"))
    for path in shards:
        _inside(folder, path.name)
        if not path.is_file():
            raise UserError(f"{path}: not a regular file")
    if not shards:
        raise UserError(f"{folder}: params.json but no consolidated.NN.pth shards (Meta's checkpoint layout)")
    numbers = [path.name.split(".")[1] for path in shards]
    if numbers != [f"{i:02d}" for i in range(len(shards))]:
        raise UserError(f"{folder}: shards {', '.join(p.name for p in shards)} are not consolidated.00.pth to "
                        f"consolidated.{len(shards) - 1:02d}.pth; a shard is missing or misnamed")
    return shards


def load_pth(path: Path) -> dict:
    """A .pth's tensors memory-mapped (nothing read yet), through PyTorch's weights-only unpickler: a pickle that
    would import or call anything but tensor rebuilding is refused before it runs."""
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"calls {found.group(1)}" if found else "holds objects other than tensors"
        raise UserError(f"{path}: refused: its pickle {what}; a checkpoint may hold only tensors (llama-export "
                        "never runs code from a model file)") from None
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
        if "_use_new_zipfile_serialization" in detail:
            detail = "saved in PyTorch's legacy format; re-save it with torch.save in a PyTorch 1.6+ session"
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({detail[:200]})") from None
    except Exception as exc:  # a corrupt pickle inside a valid zip raises many types (KeyError, IndexError, ...)
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: "
                        f"{str(exc).strip()[:200]})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # some training frameworks nest the weights
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise UserError(f"{path}: not a state dict (a mapping of tensor names to tensors)")
    for name, tensor in state.items():
        if str(tensor.dtype) not in _FLOAT_DTYPES:
            raise UserError(f"{path}: tensor '{name}' is {tensor.dtype}; llama-export reads float32, bfloat16 "
                            "and float16 checkpoints")
        # shape and strides come from the pickle: they must describe the bytes the file holds, one element each
        needed = (tensor.storage_offset() + tensor.numel()) * tensor.element_size()
        if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() < needed:
            raise UserError(f"{path}: tensor '{name}' claims shape {list(tensor.shape)} over "
                            f"{tensor.untyped_storage().nbytes()} bytes of data (or overlapping strides); the file "
                            "is corrupt")
    return state


@dataclass
class _Split:
    """One transformers parameter: the Meta tensor it comes from in every shard, and the dimension joining them."""
    meta_name: str
    shapes: list[tuple[int, ...]]
    dim: int | None  # None: every shard holds it whole

    @property
    def shape(self) -> tuple[int, ...]:
        if self.dim is None:
            return self.shapes[0]
        full = list(self.shapes[0])
        full[self.dim] = sum(shape[self.dim] for shape in self.shapes)
        return tuple(full)


def _splits(shards: list[Path], folder: Path, dim: int) -> dict[str, _Split]:
    shapes: dict[str, list[tuple[int, ...]]] = {}
    for index, path in enumerate(shards):
        state = load_pth(path)
        if index and set(state) != set(shapes):
            odd = sorted(set(state) ^ set(shapes))[0]
            raise UserError(f"{path}: its tensors differ from {shards[0].name}'s (e.g. '{odd}'); the shards are "
                            "not of one checkpoint")
        for name, tensor in state.items():
            shapes.setdefault(name, []).append(tuple(tensor.shape))
        del state
    splits = {}
    for name, found in shapes.items():
        parameter, split = _parameter(name)
        if parameter is None:
            continue
        ndim = 1 if parameter.endswith("norm.weight") else 2
        if any(len(shape) != ndim for shape in found):
            raise UserError(f"{folder}: tensor '{name}' has shape {list(found[0])}; expected {ndim} dimensions")
        if split == "embedding":  # split on the vocabulary when each shard holds whole rows of the model dimension
            split = 0 if found[0][-1] == dim or len(shards) == 1 else 1
        if split is None or len(shards) == 1:
            if len(set(found)) != 1:
                raise UserError(f"{folder}: tensor '{name}' has shapes {found} across the shards; it should be "
                                "whole in each")
            split = None
        elif len({s[:split] + s[split + 1:] for s in found}) != 1:
            raise UserError(f"{folder}: the shards' pieces of '{name}' ({found}) do not join on dimension {split}")
        splits[parameter] = _Split(name, found, split)
    return splits


def _parameter(meta_name: str) -> tuple[str | None, int | str | None]:
    if meta_name in _IGNORED:
        return None, None
    base = meta_name.removesuffix(".weight")
    if base in _MODEL_NAMES:
        parameter, split = _MODEL_NAMES[base]
        return parameter + ".weight", split
    match = _LAYER.fullmatch(meta_name)
    if match and match.group(2) in _LAYER_NAMES:
        parameter, split = _LAYER_NAMES[match.group(2)]
        return f"model.layers.{match.group(1)}.{parameter}.weight", split
    return None, None  # not a LLaMA tensor: left unread, as in a Hugging Face folder


def _read(shards: list[Path], split: _Split, parameter: str, rows: tuple[int, int] | None = None) -> np.ndarray:
    """The tensor joined from its shards in float32, or rows [start, stop) of it: each shard's piece converted
    straight into its place in the result, each shard mapped for this read alone (its pages released with it)."""
    import torch

    start, stop = rows if rows is not None else (0, split.shape[0])
    result = torch.empty((stop - start, *split.shape[1:]), dtype=torch.float32)
    offset = 0  # where the next shard's piece starts along the split dimension
    for path, shape in zip(shards if split.dim is not None else shards[:1], split.shapes):
        piece = load_pth(path)[split.meta_name]
        if split.dim == 0:  # the shard holds rows [offset, offset + its rows)
            first, last = max(start, offset), min(stop, offset + shape[0])
            if first < last:
                result[first - start:last - start].copy_(piece[first - offset:last - offset])
        elif split.dim == 1:
            result[:, offset:offset + shape[1]].copy_(piece[start:stop])
        else:
            result.copy_(piece[start:stop])
        offset += shape[split.dim] if split.dim is not None else 0
        del piece
    return require_finite(result.numpy(), parameter, shards[0].parent)


def _loader(shards, split: _Split, parameter: str, heads: int | None):
    def load() -> np.ndarray:
        values = _read(shards, split, parameter)
        return unpermute_rows(values, heads) if heads else values

    return load


def _rows_loader(shards, split: _Split, parameter: str):
    return lambda start, stop: _read(shards, split, parameter, (start, stop))


def _read_params(folder: Path) -> dict:
    path = folder / "params.json"
    params = read_json_object(path, "Meta's model parameters (a JSON object with dim, n_layers, n_heads, ...)")
    for key, what in (("quantization_args", "a quantized release"), ("lora_args", "a QLoRA release")):
        if params.get(key):
            raise UserError(f"{path}: {what} ({key}); llama-export reads Meta's bf16 checkpoints")
    if "moe_args" in params or "vision_args" in params or "n_experts" in params:
        raise UserError(f"{path}: a LLaMA 4 (mixture of experts) checkpoint in Meta's layout is not supported; "
                        "export its Hugging Face folder")
    return params


_LARGEST = 1 << 31  # beyond any model's size: refuses numbers that would overflow what is computed from them


def _whole(params: dict, key: str, path: Path, default=None) -> int:
    value = params.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < _LARGEST:
        raise UserError(f"{path}: '{key}' is {str(value)[:40]}; expected a positive whole number")
    return value


def _number(params: dict, key: str, path: Path, default: float) -> float:
    value = params.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < _LARGEST:
        raise UserError(f"{path}: '{key}' is {str(value)[:40]}; expected a positive number")
    return float(value)


def feed_forward_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's MLP width: two thirds of 4 * dim, times the multiplier, rounded up to a multiple of multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _config(params: dict, folder: Path, vocab_rows: int, tied: bool, special_ids: dict):
    from transformers import LlamaConfig

    path = folder / "params.json"
    dim, layers, heads = (_whole(params, key, path) for key in ("dim", "n_layers", "n_heads"))
    if dim % heads or (dim // heads) % 2:
        raise UserError(f"{path}: dim {dim} over {heads} heads is not an even head size (RoPE rotates pairs)")
    kv_heads = _whole(params, "n_kv_heads", path, heads)
    multiplier = params.get("ffn_dim_multiplier")
    if multiplier is not None:
        multiplier = _number(params, "ffn_dim_multiplier", path, 1.0)
    intermediate = feed_forward_size(dim, _whole(params, "multiple_of", path, 256), multiplier)
    vocab = params.get("vocab_size", -1)
    if vocab != -1 and vocab != vocab_rows:  # -1: LLaMA 1/2 take it from the tokenizer
        raise UserError(f"{path}: vocab_size {vocab!r}, but the embedding has {vocab_rows} rows")
    theta = _number(params, "rope_theta", path, 10000.0)
    rope = {"rope_type": "default", "rope_theta": theta}
    if params.get("use_scaled_rope"):  # LLaMA 3.1 and later: llama-models' frequency scaling
        rope.update(rope_type="llama3", factor=_number(params, "rope_scaling_factor", path, 8.0),
                    low_freq_factor=1.0, high_freq_factor=_number(params, "high_freq_factor", path, 4.0),
                    original_max_position_embeddings=8192)
    # params.json does not say how long a context the model was trained for; the generation's known lengths
    positions = params.get("max_seq_len") or (131072 if params.get("use_scaled_rope") else 16384 if theta == 1e6
                                              else 8192 if theta >= 500000 else 4096)
    positions = _whole({"max_seq_len": positions}, "max_seq_len", path)
    try:
        return LlamaConfig(vocab_size=vocab_rows, hidden_size=dim, intermediate_size=intermediate,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                           head_dim=dim // heads, max_position_embeddings=int(positions),
                           rms_norm_eps=_number(params, "norm_eps", path, 1e-5), rope_parameters=rope,
                           tie_word_embeddings=tied, **special_ids)
    except Exception as exc:  # transformers' config validation (several error types) on the file's values
        raise UserError(f"{path}: does not make a LLaMA config ({exc.__cause__ or exc})") from None


def open_meta_folder(folder: Path) -> Checkpoint:
    from llama_export.exporter.sources.meta_tokenizer import MetaTokenizer
    from llama_export.families import LLAMA

    params = _read_params(folder)
    shards = _shard_files(folder)
    dim = _whole(params, "dim", folder / "params.json")
    splits = _splits(shards, folder, dim)
    embedding = splits.get("model.embed_tokens.weight")
    if embedding is None:
        raise UserError(f"{shards[0]}: no 'tok_embeddings.weight'; not a LLaMA checkpoint in Meta's layout")
    tokenizer = MetaTokenizer.open(folder, embedding.shape[0], bool(params.get("use_scaled_rope")))
    config = _config(params, folder, embedding.shape[0], "lm_head.weight" not in splits, tokenizer.special_ids())
    check_llama_config(config, folder)
    weights = {}
    for parameter, split in splits.items():
        heads = LLAMA.permuted_heads(parameter, config)  # Meta's Q/K rows interleave each head's rotary pairs
        weights[parameter] = WeightInfo(shape=split.shape, load=_loader(shards, split, parameter, heads),
                                        load_rows=None if heads else _rows_loader(shards, split, parameter))
    checkpoint = Checkpoint(name=folder.name, kind="meta", path=folder, config=config, weights=weights,
                            files=[folder / "params.json", *shards, *tokenizer.files],
                            write_tokenizer=lambda dest: tokenizer.write(dest, config.max_position_embeddings))
    check_weights_match_config(checkpoint)
    return checkpoint
