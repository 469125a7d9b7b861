"""Calibration for the accuracy-aware quantizers: X^T X of every linear layer's input over a small text, computed
in PyTorch one decoder layer at a time as the quantizer reaches it (only that layer's weights and statistics are
held), and what the source already holds in quantized form (GGUF blocks)."""

from __future__ import annotations

import copy
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from llama_export.exporter.errors import UserError
from llama_export.exporter.progress import counter_for
from llama_export.exporter.sources import Checkpoint

WINDOW = 256
WINDOWS_AT_ONCE = 4  # calibration windows run through a layer together
# At most this many tokens of the calibration text are used, in whole windows: the whole built-in set for the
# default model's tokenizer (README, INT4: more text lowered the held-out KL divergence)
CALIBRATION_TOKENS = 8192


def default_calibration_text() -> str:
    """Original English prose written for this project (narrative, dialogue, how-to, science), public domain."""
    return resources.files("llama_export.exporter").joinpath("data/calibration.txt").read_text(encoding="utf-8")


def calibration_text(checkpoint: Checkpoint) -> str:
    """The built-in calibration set: the English prose above and the calibration texts of every kind
    (exporter/texts.py), dialogue in the source's own chat format."""
    from llama_export.exporter import texts

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.write_tokenizer(Path(tmp))
        render = texts.chat_renderer(Path(tmp))
        parts = [default_calibration_text()] + [texts.read("calibration", kind, render) for kind in texts.KINDS]
    return "\n\n".join(parts)


def read_calibration_text(path: Path) -> str:
    """A user's calibration text (--calibration-text), refused in one line when it cannot serve."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--calibration-text {path}: cannot be read as UTF-8 text ({exc})") from None
    if len(text.split()) < 64:
        raise UserError(f"--calibration-text {path}: too little text to calibrate on (at least a few hundred words, "
                        "ideally thousands)")
    return text


def tokenize(checkpoint: Checkpoint, text: str) -> list[int]:
    """The text in the source's own tokenizer (the one its packages carry), without special tokens."""
    from tokenizers import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        if "tokenizer.json" not in checkpoint.write_tokenizer(Path(tmp)):
            raise UserError(f"{checkpoint.path}: the source has no tokenizer to read the text with")
        tokenizer = Tokenizer.from_file(str(Path(tmp) / "tokenizer.json"))
    return tokenizer.encode(text, add_special_tokens=False).ids


def calibration_windows(checkpoint: Checkpoint, text: str, tokens: int) -> np.ndarray:
    """[windows, WINDOW] token ids: at most `tokens` of the text in whole windows, evenly spaced over it so that
    every kind of text is represented."""
    ids = tokenize(checkpoint, text)
    usable = len(ids) // WINDOW * WINDOW or len(ids)
    if usable < 16:
        raise UserError("the calibration text is too short (fewer than 16 tokens)")
    windows = np.array(ids[:usable]).reshape(-1, min(WINDOW, usable))
    keep = max(1, tokens // windows.shape[1])
    if len(windows) > keep:
        windows = windows[np.linspace(0, len(windows) - 1, keep).round().astype(int)]
    return windows


class SourceHints:
    """passes.quantize.WeightHints over a checkpoint and its calibration statistics (a dict, or a
    CalibrationStream that computes them one decoder layer at a time as they are asked for)."""

    def __init__(self, checkpoint: Checkpoint, hessians=None):
        self.checkpoint, self.hessians = checkpoint, hessians if hessians is not None else {}

    def prequantized(self, name: str):
        info = self.checkpoint.weights.get(name)
        return info.load_quantized() if info is not None and info.load_quantized is not None else None

    def prequantized_layout(self, name: str):
        from llama_export.passes.block_quantized import layout_template

        info = self.checkpoint.weights.get(name)
        if info is None or info.quantized_bits is None or len(info.shape) != 2:
            return None
        rows, columns = info.shape
        return layout_template(rows, columns, info.quantized_bits, info.quantized_block_size,
                               minimums=info.quantized_minimums, half_params=info.quantized_half_params)

    def hessian(self, name: str):
        return self.hessians.get(name)

    def has_hessian(self, name: str) -> bool:
        """Whether calibration covers this weight, known without computing anything."""
        return name in self.hessians


def fully_prequantized(checkpoint: Checkpoint, block_size: int | None, bits: tuple[int, ...] = (4, 8),
                       layers_only: bool = False) -> bool:
    """Every matrix (with `layers_only`, every decoder-layer matrix: the embedding and lm_head stay float) already
    in blocks of this size (None: of any size) and one of these bit widths (a GGUF of Q4_0/Q4_1/Q8_0, or K-quants):
    the quantizer carries them over and has nothing to calibrate."""
    matrices = [i for n, i in checkpoint.weights.items()
                if len(i.shape) == 2 and (not layers_only or n.startswith("model.layers."))]
    return bool(matrices) and all(carried_over(i, block_size, bits) for i in matrices)


def carried_over(info, block_size: int | None, bits: tuple[int, ...] = (4, 8)) -> bool:
    """A weight (WeightInfo) whose own blocks are carried over: in blocks of this size (None: any) and one of these
    bit widths."""
    return info.quantized_bits in bits and block_size in (None, info.quantized_block_size)


def float_tensor(values: np.ndarray) -> torch.Tensor:
    """A loaded weight as a float32 tensor (copied where the source hands out a read-only view of its file, as a
    GGUF's float32 tensors are: torch warns on those)."""
    values = np.asarray(values, np.float32)
    return torch.from_numpy(values if values.flags.writeable else values.copy())


def load_layer(checkpoint: Checkpoint, index: int, config=None):
    """transformers' decoder layer `index` with the checkpoint's weights in float32 (only this layer's are read)."""
    config = config or checkpoint.config
    decoder_layer = checkpoint.family.decoder_layer_class()
    with torch.device("meta"):
        layer = decoder_layer(config, index)
    layer = layer.to_empty(device="cpu")
    prefix = f"model.layers.{index}."
    with torch.no_grad():
        for name, parameter in layer.named_parameters():
            parameter.copy_(float_tensor(checkpoint.weight(prefix + name).load()))
    return layer.eval()


def layer_output(out) -> torch.Tensor:
    """A decoder layer's hidden states (transformers' layers return them alone or first in a tuple)."""
    return out[0] if isinstance(out, tuple) else out


def final_norm(checkpoint: Checkpoint, config=None):
    """transformers' final norm with the checkpoint's weight in float32."""
    config = config or checkpoint.config
    norm = checkpoint.family.norm_class()(config.hidden_size, eps=config.rms_norm_eps)
    with torch.no_grad():
        norm.weight.copy_(float_tensor(checkpoint.weight("model.norm.weight").load()))
    return norm


def embed(checkpoint: Checkpoint, ids: np.ndarray) -> torch.Tensor:
    """The embedding rows of `ids` (any shape) as float32, reading the table in row chunks."""
    info = checkpoint.weight("model.embed_tokens.weight")
    flat = ids.reshape(-1)
    out = np.empty((flat.size, info.shape[1]), np.float32)
    for start, rows in info.row_chunks():
        hit = (flat >= start) & (flat < start + len(rows))
        out[hit] = rows[flat[hit] - start]
    return torch.from_numpy(out.reshape(*ids.shape, -1))


def _linear_names(config) -> list[str]:
    """The decoder layer's linear weights, by parameter name (nothing allocated: built on the meta device)."""
    from llama_export.families import family_of

    decoder_layer = family_of(config).decoder_layer_class()
    with torch.device("meta"):
        layer = decoder_layer(config, 0)
    return [n + ".weight" for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]


def order_by_layer(model, config) -> None:
    """Reorder the graph's initializers (the order the package writer reads them in) by the decoder layer their
    values come from, keeping the order within a layer: streamed calibration then computes each layer once.
    A norm's weight goes with the layer it feeds (its input scale needs that layer's statistics); the final
    norm, the lm_head and a table tied to it come last (they need every layer's output)."""
    import re

    layers = config.num_hidden_layers
    last = ("lm_head", "model.norm") + (("model.embed_tokens",) if config.tie_word_embeddings else ())

    def stage(name: str) -> int:
        match = re.match(r"model\.layers\.(\d+)\.", name)
        if match:
            return int(match.group(1))
        return layers if name.startswith(last) or ".input_scale_inverse" in name else -1

    initializers = model.graph.initializers
    values = sorted(initializers.values(), key=lambda v: stage(v.name or ""))
    for value in values:
        initializers.pop(value.name)
    for value in values:
        model.graph.register_initializer(value)


class CalibrationStream:
    """X^T X / tokens of every linear weight's input over the calibration text, computed one decoder layer at a
    time when a weight of that layer is first asked for: only one layer's weights and statistics and the text's
    hidden states are held, whatever the depth. The quantizer asks in layer order as it writes the package, so
    each layer is computed once; a request for an earlier layer starts over from the embedding. Each layer sees
    the float model's output of the one before."""

    def __init__(self, checkpoint: Checkpoint, text: str, log=None, tokens: int | None = None):
        self.checkpoint, self.text, self.log = checkpoint, text, log
        self.tokens = tokens or CALIBRATION_TOKENS
        config = self.config = copy.deepcopy(checkpoint.config)
        config._attn_implementation = "sdpa"  # causal without an explicit mask
        self.num_layers = config.num_hidden_layers
        self.covered = {f"model.layers.{i}.{n}" for i in range(self.num_layers) for n in _linear_names(config)}
        self.covered.add("lm_head.weight")
        if config.tie_word_embeddings:
            self.covered.add("model.embed_tokens.weight")
        self.layer, self.current, self.hidden, self.started = None, {}, None, None

    def __contains__(self, name: str) -> bool:
        return name in self.covered

    def get(self, name: str, default=None):
        if name not in self.covered:
            return default
        stage = int(name.split(".")[2]) if name.startswith("model.layers.") else self.num_layers
        if self.layer is None or stage < self.layer:
            self._start()
        while self.layer < stage:
            self._advance()
        return self.current.get(name, default)

    def _start(self) -> None:
        config = self.config
        rotary = self.checkpoint.family.rotary_class()
        if self.layer is not None and self.log:
            self.log(f"      calibration starts over from the first layer (layer {self.layer} was passed)")
        windows = calibration_windows(self.checkpoint, self.text, self.tokens)
        self.hidden = embed(self.checkpoint, windows)
        self.positions = torch.arange(windows.shape[1]).unsqueeze(0)
        self.position_embeddings = rotary(config)(self.hidden, self.positions)
        self.layer, self.current = -1, {}
        self.count = counter_for(self.log, "calibrated layer", "layer")

    def _advance(self) -> None:
        self.current = {}
        index = self.layer + 1
        with torch.no_grad():
            if index < self.num_layers:
                self.hidden, self.current = self._run_layer(index)
            else:
                config = self.config
                norm = final_norm(self.checkpoint, config)
                total = sum(_moment_sum(norm(self.hidden[start:start + WINDOWS_AT_ONCE]))
                            for start in range(0, len(self.hidden), WINDOWS_AT_ONCE))
                head = (total / (self.hidden.shape[0] * self.hidden.shape[1])).numpy()
                self.current = {"lm_head.weight": head}
                if config.tie_word_embeddings:
                    self.current["model.embed_tokens.weight"] = head
        self.layer = index
        if index < self.num_layers:  # layers before this one were calibrated and quantized: their pace is the rate
            self.count(index + 1, self.num_layers)

    def _run_layer(self, index: int):
        """The layer's output over every window and X^T X / tokens of each linear input, run WINDOWS_AT_ONCE
        windows at a time so the activations held do not grow with the text."""
        layer = load_layer(self.checkpoint, index, self.config)
        prefix = f"model.layers.{index}."
        owner: dict[str, str] = {}  # weight -> the first weight reading the same input (q/k/v, gate/up share one)
        sums: dict[str, torch.Tensor] = {}
        seen: dict[int, tuple] = {}

        def hook(module, inputs, output, name):
            key = id(inputs[0])
            if key not in seen:  # holding the tensor keeps its id unique while the batch runs
                seen[key] = (inputs[0], name)
                product = _moment_sum(inputs[0])
                sums[name] = sums[name] + product if name in sums else product
            owner[prefix + name + ".weight"] = prefix + seen[key][1] + ".weight"

        for n, m in layer.named_modules():
            if isinstance(m, torch.nn.Linear):
                m.register_forward_hook(lambda mod, i, o, n=n: hook(mod, i, o, n))
        outputs = []
        mask = self.checkpoint.family.layer_mask(self.config, index, self.hidden.shape[1])  # None: causal
        for start in range(0, len(self.hidden), WINDOWS_AT_ONCE):
            seen.clear()
            out = layer(self.hidden[start:start + WINDOWS_AT_ONCE], attention_mask=mask,
                        position_ids=self.positions, position_embeddings=self.position_embeddings)
            outputs.append(layer_output(out))
        seen.clear()
        tokens = self.hidden.shape[0] * self.hidden.shape[1]
        means = {prefix + name + ".weight": (total / tokens).numpy() for name, total in sums.items()}
        return torch.cat(outputs), {name: means[first] for name, first in owner.items()}


def _moment_sum(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1]).float()
    return flat.T @ flat


