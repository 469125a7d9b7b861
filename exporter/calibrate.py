"""Calibration for the accuracy-aware quantizers: X^T X of every linear layer's input over a small text, computed
in PyTorch one decoder layer at a time (only that layer's weights are loaded), and what the source already
holds in quantized form (GGUF blocks)."""

from __future__ import annotations

import tempfile
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from exporter.errors import UserError
from exporter.sources import Checkpoint

WINDOW = 256


def default_calibration_text() -> str:
    """Original English prose written for this project (narrative, dialogue, how-to, science), public domain."""
    return resources.files("exporter").joinpath("data/calibration.txt").read_text(encoding="utf-8")


def tokenize(checkpoint: Checkpoint, text: str) -> list[int]:
    """The text in the source's own tokenizer (the one its packages carry), without special tokens."""
    from tokenizers import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        if "tokenizer.json" not in checkpoint.write_tokenizer(Path(tmp)):
            raise UserError(f"{checkpoint.path}: the source has no tokenizer to read the text with")
        tokenizer = Tokenizer.from_file(str(Path(tmp) / "tokenizer.json"))
    return tokenizer.encode(text, add_special_tokens=False).ids


class SourceHints:
    """passes.quantize.WeightHints over a checkpoint and its calibration statistics."""

    def __init__(self, checkpoint: Checkpoint, hessians: dict[str, np.ndarray] | None = None):
        self.checkpoint, self.hessians = checkpoint, hessians or {}

    def prequantized(self, name: str):
        info = self.checkpoint.weights.get(name)
        return info.load_quantized() if info is not None and info.load_quantized is not None else None

    def prequantized_layout(self, name: str):
        from passes.quantization import layout_template

        info = self.checkpoint.weights.get(name)
        if info is None or info.quantized_bits is None or len(info.shape) != 2:
            return None
        rows, columns = info.shape
        return layout_template(rows, columns, info.quantized_bits, info.quantized_block_size,
                               minimums=info.quantized_minimums)

    def hessian(self, name: str):
        return self.hessians.get(name)


def fully_prequantized(checkpoint: Checkpoint, block_size: int, bits: tuple[int, ...] = (4, 8),
                       layers_only: bool = False) -> bool:
    """Every matrix (with `layers_only`, every decoder-layer matrix: the embedding and lm_head stay float) already
    in blocks of this size and one of these bit widths (a GGUF of Q4_0/Q4_1/Q8_0): the quantizer carries them
    over and has nothing to calibrate."""
    matrices = [i for n, i in checkpoint.weights.items()
                if len(i.shape) == 2 and (not layers_only or n.startswith("model.layers."))]
    return bool(matrices) and all(i.quantized_bits in bits for i in matrices) and block_size == 32


def _load_layer(checkpoint: Checkpoint, index: int):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config = checkpoint.config
    with torch.device("meta"):
        layer = LlamaDecoderLayer(config, index)
    layer = layer.to_empty(device="cpu")
    prefix = f"model.layers.{index}."
    with torch.no_grad():
        for name, parameter in layer.named_parameters():
            parameter.copy_(torch.from_numpy(np.asarray(checkpoint.weight(prefix + name).load(), np.float32)))
    return layer.eval()


def collect_hessians(checkpoint: Checkpoint, text: str, log=print) -> dict[str, np.ndarray]:
    """{checkpoint tensor name: X^T X / tokens} for every linear weight (q/k/v share one matrix, gate/up another)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

    config = checkpoint.config
    config._attn_implementation = "sdpa"  # causal without an explicit mask
    ids = tokenize(checkpoint, text)
    usable = len(ids) // WINDOW * WINDOW or len(ids)
    if usable < 16:
        raise UserError("the calibration text is too short (fewer than 16 tokens)")
    windows = torch.tensor(ids[:usable]).reshape(-1, min(WINDOW, usable))
    embedding = checkpoint.weight("model.embed_tokens.weight").load()
    hidden = torch.from_numpy(np.asarray(embedding[windows.numpy()], np.float32))
    del embedding
    positions = torch.arange(windows.shape[1]).unsqueeze(0)
    rotary = LlamaRotaryEmbedding(config)
    position_embeddings = rotary(hidden, positions)
    hessians: dict[str, np.ndarray] = {}

    def second_moment(x: torch.Tensor) -> np.ndarray:
        flat = x.reshape(-1, x.shape[-1]).double()
        return (flat.T @ flat / flat.shape[0]).float().numpy()

    with torch.no_grad():
        for index in range(config.num_hidden_layers):
            layer = _load_layer(checkpoint, index)
            seen: dict[int, tuple] = {}
            prefix = f"model.layers.{index}."

            def hook(module, inputs, output, name):
                key = id(inputs[0])
                if key not in seen:  # q/k/v (and gate/up) read one tensor: one matrix for all three
                    seen[key] = (inputs[0], second_moment(inputs[0]))  # holding the tensor keeps its id unique
                hessians[prefix + name + ".weight"] = seen[key][1]

            handles = [m.register_forward_hook(lambda mod, i, o, n=n: hook(mod, i, o, n))
                       for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
            out = layer(hidden, attention_mask=None, position_ids=positions,
                        position_embeddings=position_embeddings)
            hidden = out[0] if isinstance(out, tuple) else out
            for handle in handles:
                handle.remove()
            del layer
            log(f"      calibration: layer {index + 1}/{config.num_hidden_layers}")
        norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        norm.weight.copy_(torch.from_numpy(np.asarray(checkpoint.weight("model.norm.weight").load(), np.float32)))
        head = second_moment(norm(hidden))
    hessians["lm_head.weight"] = head
    if config.tie_word_embeddings:
        hessians["model.embed_tokens.weight"] = head
    return hessians
