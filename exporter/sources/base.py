"""What every source produces: a model config plus weights that load one tensor at a time."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from exporter.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama",)


@dataclass
class WeightInfo:
    """One tensor in Hugging Face naming and layout; `load` reads it from disk when called."""

    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]
    load_quantized: Callable[[], object] | None = None  # the source's own blocks (passes.quantization.BlockQuantized)
    quantized_bits: int | None = None  # their bits, known without reading them
    quantized_block_size: int = 32
    quantized_minimums: bool = False  # d*q + m blocks (GGUF Q4_1)
    load_rows: Callable[[int, int], np.ndarray] | None = None  # rows [start, stop) alone, where the file allows

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32, read alone where the format allows (else cut from the whole tensor)."""
        return self.load_rows(start, stop) if self.load_rows is not None else self.load()[start:stop]

    def row_chunks(self, rows: int = 8192):
        """(start, rows) over the tensor in chunks: a large table never sits in memory whole."""
        for start in range(0, self.shape[0], rows):
            yield start, self.rows(start, min(start + rows, self.shape[0]))


@dataclass
class Checkpoint:
    name: str
    kind: str  # "hf" or "gguf"
    path: Path
    config: object  # transformers.LlamaConfig
    weights: dict[str, WeightInfo]
    files: list[Path]  # the files whose bytes define the model, for the content hash
    write_tokenizer: Callable[[Path], list[str]] = field(repr=False, default=lambda dest: [])

    def tensor_name(self, name: str) -> str:
        """The checkpoint tensor holding a model parameter; a tied lm_head is the embedding."""
        if name not in self.weights and name == "lm_head.weight" and self.config.tie_word_embeddings:
            return "model.embed_tokens.weight"
        return name

    def weight(self, name: str) -> WeightInfo:
        """The tensor for a model parameter name; a tied lm_head reads the embedding."""
        tensor = self.tensor_name(name)
        if tensor in self.weights:
            return self.weights[tensor]
        raise UserError(f"{self.path}: checkpoint has no tensor '{name}'")

    def content_hash(self) -> str:
        digest = hashlib.sha256()
        for path in sorted(self.files):
            digest.update(path.name.encode())
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    digest.update(chunk)
        return "sha256:" + digest.hexdigest()

    def check_complete(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Fail early, before tracing, if a parameter is missing or has the wrong shape."""
        for name, shape in expected.items():
            found = self.weight(name).shape
            if tuple(found) != tuple(shape):
                raise UserError(
                    f"{self.path}: tensor '{name}' has shape {list(found)}, the config implies {list(shape)}"
                )


def require_supported(model_type, where: Path) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"{where}: unsupported architecture '{model_type}'; llama-export handles LLaMA-family models "
            f"(model_type {', '.join(SUPPORTED_MODEL_TYPES)})"
        )


def check_llama_config(config, where: Path) -> None:
    require_supported(getattr(config, "model_type", None), where)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % kv_heads:
        raise UserError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
