"""What every source produces: a model config plus weights that load one tensor at a time."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from llama_export.exporter.errors import UserError


@dataclass
class WeightInfo:
    """One tensor in Hugging Face naming and layout; `load` reads it from disk when called."""

    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]
    load_quantized: Callable[[], object] | None = None  # the source's own blocks (block_quantized.BlockQuantized)
    quantized_bits: int | None = None  # their bits, known without reading them
    quantized_block_size: int = 32
    quantized_minimums: bool = False  # d*q + m blocks (GGUF Q4_1)
    quantized_half_params: bool = False  # their scales and minimums are float16 values
    load_rows: Callable[[int, int], np.ndarray] | None = None  # rows [start, stop) alone, where the file allows

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32, read alone where the format allows (else cut from the whole tensor)."""
        return self.load_rows(start, stop) if self.load_rows is not None else self.load()[start:stop]

    def row_chunks(self, rows: int = 8192):
        """(start, rows) over the tensor in chunks: a large table never sits in memory whole."""
        for start in range(0, self.shape[0], rows):
            yield start, self.rows(start, min(start + rows, self.shape[0]))


def require_finite(values: np.ndarray, tensor: str, path: Path) -> np.ndarray:
    """A NaN or Inf in a source tensor named, rather than carried into the package (where NaN logits would
    compare as equal). One float32 sum finds them; a sum that overflows is checked element by element."""
    if values.size and not np.isfinite(np.add.reduce(values, axis=None)):
        bad = ~np.isfinite(values)
        if bad.any():
            raise UserError(f"{path}: tensor '{tensor}' holds {int(bad.sum())} NaN or Inf values (first at index "
                            f"{tuple(int(i) for i in np.argwhere(bad)[0])}); the checkpoint is corrupt")
    return values


def read_json_object(path: Path, expected: str) -> dict:
    """A JSON file holding an object; anything else refused in one line (`expected` says what it should hold)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: not {expected}")
    return value


def unpermute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Q/K rows from the interleaved order (each head's rotary pairs adjacent: Meta's layout, and llama.cpp's) to
    transformers' (each head's two rotary halves apart)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@dataclass
class Checkpoint:
    name: str
    kind: str  # "hf" or "gguf"
    path: Path
    config: object  # the family's transformers config (LlamaConfig)
    weights: dict[str, WeightInfo]
    files: list[Path]  # the files whose bytes define the model, for the content hash
    write_tokenizer: Callable[[Path], list[str]] = field(repr=False, default=lambda dest: [])
    adapters: list[dict] = field(default_factory=list)  # LoRA adapters merged in (sources/lora.py): path, weight

    @property
    def family(self):
        """The model family (llama_export.families) of the config."""
        from llama_export.families import family_of

        return family_of(self.config)

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

    def forget_source_blocks(self) -> None:
        """Every tensor read as floats only: the quantizer then quantizes them all itself."""
        for name, info in self.weights.items():
            if info.quantized_bits is not None:
                self.weights[name] = replace(info, load_quantized=None, quantized_bits=None)

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
    """A config's model_type (or a GGUF's architecture) some registered family handles."""
    from llama_export.families import UnsupportedFamily, family_for

    try:
        family_for(model_type)
    except UnsupportedFamily as exc:
        raise UserError(f"{where}: {exc}") from None


def check_sizes(config, where: Path) -> None:
    """Every size positive and whole, the heads divisible (a config object or a dict of its fields)."""
    from llama_export.targets import TargetError
    from llama_export.targets.plan import ModelShape

    try:
        ModelShape.from_config(config, str(where))
    except TargetError as exc:
        raise UserError(str(exc)) from None


def check_llama_config(config, where: Path) -> None:
    """Sizes positive and consistent, a rope type transformers knows: checked before anything is built from them."""
    require_supported(getattr(config, "model_type", None), where)
    check_sizes(config, where)
    from llama_export.families import FamilyConfigError, family_of

    try:
        family_of(config).check_config(config)
    except FamilyConfigError as exc:
        raise UserError(f"{where}: {exc}") from None
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if rope_type != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise UserError(f"{where}: unknown rope type '{rope_type}' in the config (transformers knows default, "
                            f"{', '.join(ROPE_INIT_FUNCTIONS)})")


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every parameter the config's family's model holds, with its shape, from the config alone."""
    from llama_export.families import family_of

    return family_of(config).parameter_shapes(config)


def check_weights_match_config(checkpoint: Checkpoint) -> None:
    """The layer count first (a config claiming 100000 layers is refused before anything is sized by it), then
    every tensor's shape, from the headers alone."""
    layers = checkpoint.config.num_hidden_layers
    present = {int(name.split(".")[2]) for name in checkpoint.weights if name.startswith("model.layers.")
               and name.split(".")[2].isdigit()}
    if layers != (max(present) + 1 if present else 0):
        raise UserError(f"{checkpoint.path}: the config gives {layers} decoder layers, the weights hold "
                        f"{len(present)} (layer indices {min(present, default=0)}..{max(present, default=-1)}); "
                        "fix num_hidden_layers or the missing weight files")
    checkpoint.check_complete(expected_shapes(checkpoint.config))
