"""LoRA adapters (PEFT's adapter_config.json + adapter_model.safetensors or .bin) merged into a checkpoint's
weights as each tensor is read: W + weight * scale * B @ A, scale = alpha / r (alpha / sqrt(r) for rank-stabilized
LoRA). Only the adapter's small matrices are read when the adapter is opened."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from llama_export.exporter.errors import UserError
from llama_export.exporter.sources.base import Checkpoint, WeightInfo, read_json_object, require_finite

_PREFIX = "base_model.model."
# PEFT saves a targeted embedding's or output layer's own weight beside its LoRA pair (as "base_layer")
_PARTS = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A", ".lora_embedding_B": "B",
          ".base_layer.weight": "base"}


def parse_adapter(text: str) -> tuple[Path, float]:
    """`DIR` or `DIR:WEIGHT` (the weight a number; a colon in the folder's own name stays part of it)."""
    folder, _, weight = text.rpartition(":")
    if folder:
        try:
            value = float(weight)
        except ValueError:
            return Path(text).expanduser(), 1.0
        if not math.isfinite(value):
            raise UserError(f"--lora {text}: the weight must be a finite number")
        return Path(folder).expanduser(), value
    return Path(text).expanduser(), 1.0


@dataclass
class LowRankDelta:
    """One adapter's change to one tensor, read when the tensor is."""
    load_a: object  # () -> [r, in] (an embedding's: [r, vocab])
    load_b: object  # () -> [out, r] (an embedding's: [dim, r])
    scale: float  # the adapter's scaling times its weight on the command line
    embedding: bool
    base_rows: object = None  # (start, stop) -> rows of the layer weight the adapter saved, replacing the model's

    def rows(self, start: int, stop: int) -> np.ndarray:
        a, b = self.load_a(), self.load_b()
        if self.embedding:  # PEFT's embedding delta is (B @ A) transposed
            return self.scale * (a[:, start:stop].T @ b.T)
        return self.scale * (b[start:stop] @ a)


def _read_config(folder: Path) -> dict:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise UserError(f"--lora {folder}: no adapter_config.json (expected a PEFT LoRA adapter folder)")
    config = read_json_object(path, "a PEFT adapter config (a JSON object with r, lora_alpha, ...)")
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{path}: a {config['peft_type']} adapter; llama-export merges LoRA adapters only")
    refused = {"use_dora": "DoRA adapters", "fan_in_fan_out": "fan_in_fan_out (GPT-2 style) layers",
               "modules_to_save": "modules_to_save (whole replaced layers)"}
    for key, what in refused.items():
        if config.get(key):
            raise UserError(f"{path}: {what} are not supported ({key} is set); merge the adapter with PEFT's "
                            "merge_and_unload and export the merged folder")
    if config.get("bias", "none") != "none":
        raise UserError(f"{path}: bias '{config['bias']}' trains biases LLaMA does not have; expected 'none'")
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise UserError(f"{path}: 'alpha_pattern' must map module names to numbers")
    for key, value in [("r", config.get("r")), ("lora_alpha", config.get("lora_alpha")),
                       *((f"alpha_pattern '{k}'", v) for k, v in patterns.items())]:
        if not _positive(value):
            raise UserError(f"{path}: {key} is {str(value)[:40]}; expected a positive number")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UserError(f"{path}: alpha_pattern key '{pattern[:60]}' is not a regular expression ({exc})") from None
    return config


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _tensor_files(folder: Path) -> tuple[Path, dict[str, tuple[int, ...]], object]:
    """The adapter's weight file, its tensors' shapes, and a reader of one tensor by name (rows [start, stop) of it
    when given)."""
    safetensors, pickled = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    if safetensors.is_file():
        from llama_export.exporter.sources.hf import _read_header

        shapes = _read_header(safetensors)

        def read(name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
            import torch
            from safetensors import safe_open

            with safe_open(str(safetensors), framework="pt") as f:
                tensor = f.get_tensor(name) if rows is None else f.get_slice(name)[rows[0]:rows[1]]
                return tensor.to(torch.float32).numpy()

        return safetensors, shapes, read
    if pickled.is_file():
        from llama_export.exporter.sources.meta import load_pth

        shapes = {name: tuple(t.shape) for name, t in load_pth(pickled).items()}
        def read_pickled(name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
            tensor = load_pth(pickled)[name]
            return (tensor if rows is None else tensor[rows[0]:rows[1]]).float().numpy()

        return pickled, shapes, read_pickled
    raise UserError(f"--lora {folder}: no adapter_model.safetensors or adapter_model.bin")


def _alpha(config: dict, module: str) -> float:
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", module):  # PEFT's rule: the pattern ends the module's name
            return float(alpha)
    return float(config["lora_alpha"])


def adapter_deltas(folder: Path, weight: float, checkpoint: Checkpoint) -> tuple[Path, dict[str, LowRankDelta]]:
    """The adapter's weight file, and each tensor it changes -> its delta, every shape checked against the
    checkpoint's."""
    if not folder.is_dir():
        raise UserError(f"--lora {folder}: not found (expected a PEFT adapter folder)")
    config = _read_config(folder)
    path, shapes, read = _tensor_files(folder)
    pairs: dict[str, dict[str, str]] = {}
    for name in shapes:
        suffix = next((s for s in _PARTS if name.endswith(s)), None)
        if suffix is None or not name.startswith(_PREFIX):
            raise UserError(f"{path}: tensor '{name}' is not a LoRA A or B matrix of a PEFT model (a "
                            "DoRA or prompt-tuning adapter?)")
        pairs.setdefault(name[len(_PREFIX):-len(suffix)], {})[_PARTS[suffix]] = name
    deltas = {}
    for module, names in sorted(pairs.items()):
        if not {"A", "B"} <= set(names):
            raise UserError(f"{path}: '{module}' has {', '.join(sorted(names))} but not both LoRA matrices")
        parameter = module + ".weight"
        if parameter not in checkpoint.weights:
            tied = parameter == "lm_head.weight" and checkpoint.config.tie_word_embeddings
            raise UserError(f"{path}: the adapter changes '{parameter}', "
                            + ("which this model ties to its embedding (merge with PEFT and export the merged folder)"
                               if tied else "which the model does not have (an adapter for another model?)"))
        a_shape, b_shape = shapes[names["A"]], shapes[names["B"]]
        embedding = names["A"].endswith("lora_embedding_A")
        base = tuple(checkpoint.weights[parameter].shape)
        if len(base) != 2:
            raise UserError(f"{path}: the adapter changes '{parameter}', which is not a matrix")
        rank = a_shape[0] if a_shape else 0
        wanted = ((rank, base[0]), (base[1], rank)) if embedding else ((rank, base[1]), (base[0], rank))
        if rank < 1 or (tuple(a_shape), tuple(b_shape)) != wanted:
            raise UserError(f"{path}: the adapter's '{module}' has A {list(a_shape)} and B {list(b_shape)}, which "
                            f"do not fit the model's tensor '{parameter}' {list(base)}; the adapter was trained "
                            "for another model")
        scale = _alpha(config, module) / (math.sqrt(rank) if config.get("use_rslora") else rank)

        def loader(name: str):
            return lambda: require_finite(read(name), name, path)

        def rows_loader(name: str):
            return lambda start, stop: require_finite(read(name, (start, stop)), name, path)

        if "base" in names and tuple(shapes[names["base"]]) != base:
            raise UserError(f"{path}: the adapter's own '{parameter}' is {list(shapes[names['base']])}, the model's "
                            f"{list(base)} (a resized vocabulary is not supported)")
        deltas[parameter] = LowRankDelta(loader(names["A"]), loader(names["B"]), weight * scale, embedding,
                                         rows_loader(names["base"]) if "base" in names else None)
    if not deltas:
        raise UserError(f"{path}: the adapter holds no LoRA matrices")
    return path, deltas


def _merged(info: WeightInfo, deltas: list[LowRankDelta]) -> WeightInfo:
    """The tensor with its deltas added when read; the source's own quantized blocks no longer describe it."""
    replaced = [delta.base_rows for delta in deltas if delta.base_rows is not None]

    def rows(start: int, stop: int) -> np.ndarray:
        values = replaced[-1](start, stop) if replaced else info.rows(start, stop)
        values = values if values.flags.writeable else values.copy()
        for delta in deltas:
            values += delta.rows(start, stop)
        return values

    return replace(info, load=lambda: rows(0, info.shape[0]), load_rows=rows, load_quantized=None,
                   quantized_bits=None)


def apply_adapters(checkpoint: Checkpoint, adapters) -> None:
    """Merge `adapters` ((folder, weight) pairs, applied in order) into the checkpoint's weights as they load."""
    per_tensor: dict[str, list[LowRankDelta]] = {}
    for folder, weight in adapters:
        path, deltas = adapter_deltas(Path(folder), weight, checkpoint)
        for parameter, delta in deltas.items():
            per_tensor.setdefault(parameter, []).append(delta)
        checkpoint.files += [Path(folder) / "adapter_config.json", path]
    for parameter, deltas in per_tensor.items():
        checkpoint.weights[parameter] = _merged(checkpoint.weights[parameter], deltas)
    checkpoint.adapters = [{"path": str(Path(folder).resolve()), "weight": weight} for folder, weight in adapters]
