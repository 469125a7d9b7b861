"""Which decoder-layer matrices lose the most to 4-bit blocks: the choice behind --eight-bit-share, which keeps
them at 8 bits.

A group of matrices that read the same input (q/k/v, gate/up; o and down alone: the units the targets pack into
one MatMul) scores sum over windows w of sum_ij (dL_w/dW_ij * E_ij)^2, where E is the matrix's 4-bit
round-to-nearest error (at the layers' block size, without GPTQ or input scaling: a ranking, not the package's
error) and L_w the negative log-likelihood of tokens sampled from the float model itself on calibration window w: E
weighted by the diagonal of the Fisher information, a second-order estimate of the KL divergence the
error adds at the model's output, which a layer-local measure (how far a layer's own output moves) cannot see: later
layers amplify some errors more than others (README, INT4: mixed 4/8 bits).

It streams as calibration does: a forward pass writes every layer's input hidden states to a temporary file, the
gradient at the output comes from the lm_head read in row chunks, and a backward pass loads one layer at a time."""

from __future__ import annotations

import copy
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llama_export.exporter.calibrate import (
    WINDOW,
    WINDOWS_AT_ONCE,
    calibration_windows,
    embed,
    final_norm,
    float_tensor,
    layer_output,
    load_layer,
)
from llama_export.exporter.errors import UserError
from llama_export.exporter.progress import counter_for
from llama_export.exporter.sources import Checkpoint

# Calibration windows the scores are summed over: 8 ranked the default model's matrices as well as 16 did
SENSITIVITY_WINDOWS = 8
HEAD_ROWS = 8192  # lm_head rows read at once


@dataclass(frozen=True)
class MatrixGroup:
    names: tuple[str, ...]  # checkpoint tensors reading one input
    weights: int
    score: float


def eight_bit_weights(groups: list[MatrixGroup], share: float, exclude=frozenset()) -> frozenset[str]:
    """The matrices to keep at 8 bits: groups with no matrix in `exclude`, taken by score per weight while they
    fit in `share` of all the groups' weights."""
    budget = share * sum(g.weights for g in groups)
    chosen, used = [], 0
    candidates = [g for g in groups if not exclude.intersection(g.names)]
    for group in sorted(candidates, key=lambda g: -g.score / g.weights):
        if used + group.weights <= budget:
            chosen.append(group)
            used += group.weights
    return frozenset(name for group in chosen for name in group.names)


def sensitivities(checkpoint: Checkpoint, text: str, block_size: int, symmetric: bool = False, log=None,
                  windows: int = SENSITIVITY_WINDOWS) -> list[MatrixGroup]:
    config = copy.deepcopy(checkpoint.config)
    config._attn_implementation = "sdpa"  # causal without an explicit mask
    ids = calibration_windows(checkpoint, text, windows * WINDOW)
    steps = _Steps(config.num_hidden_layers, log)
    try:
        folder = tempfile.TemporaryDirectory(prefix="llama-export-sensitivity-")
    except OSError as exc:
        raise _no_room(exc) from None
    with folder as tmp:
        return _streamed(checkpoint, config, ids, Path(tmp), block_size, symmetric, steps)


def _no_room(exc: OSError) -> UserError:
    return UserError(f"--eight-bit-share: the hidden states could not be kept in {tempfile.gettempdir()} "
                     f"({exc.strerror or exc}); point TMPDIR at a disk with room")


def _streamed(checkpoint, config, ids, tmp: Path, block_size, symmetric, steps) -> list[MatrixGroup]:
    """The forward pass writing each layer's input to `tmp`, the output's gradient, the backward pass."""
    layers = config.num_hidden_layers
    path = tmp / "hidden.f32"
    need, free = (layers + 1) * ids.size * config.hidden_size * 4, shutil.disk_usage(tmp).free
    if free < need:
        raise UserError(f"--eight-bit-share: the hidden states need {need / 2**30:.1f} GiB in {tmp.parent} and "
                        f"{free / 2**30:.1f} GiB are free; point TMPDIR at a larger disk")
    hidden = embed(checkpoint, ids)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    position_embeddings = checkpoint.family.rotary_class()(config)(hidden, positions)
    run = dict(attention_mask=None, position_ids=positions, position_embeddings=position_embeddings)
    with open(path, "wb") as states_file:  # written, not mapped: a full disk is an error here, not a crash

        def keep(states: torch.Tensor) -> None:
            try:
                states_file.write(states.numpy().tobytes())
            except OSError as exc:
                raise _no_room(exc) from None

        keep(hidden)
        for index in range(layers):
            layer = load_layer(checkpoint, index, config)
            with torch.no_grad():
                hidden = torch.cat([layer_output(layer(hidden[s:s + WINDOWS_AT_ONCE], **run))
                                    for s in range(0, len(hidden), WINDOWS_AT_ONCE)])
            keep(hidden)
            steps.done("forward")
    del hidden
    states = np.memmap(path, np.float32, "r", shape=(layers + 1, *ids.shape, config.hidden_size))
    gradient = _output_gradient(checkpoint, config, torch.from_numpy(np.array(states[layers])))
    groups = []
    for index in reversed(range(layers)):
        layer_groups, gradient = _layer_scores(checkpoint, config, index, states, gradient, run, block_size,
                                               symmetric)
        groups += layer_groups
        steps.done("backward")
    del states
    return groups


class _Steps:
    """Progress lines with the time left, one a layer and pass; a layer's backward step counts as three forward
    ones (a forward and its backward through the layer)."""

    def __init__(self, layers: int, log):
        self.layers, self.units = layers, 0
        self.count = counter_for(log, "8-bit choice (a layer's backward counts 3)", "step")

    def done(self, what: str) -> None:
        self.units += 1 if what == "forward" else 3
        self.count(self.units, 4 * self.layers)


def _output_gradient(checkpoint: Checkpoint, config, last: torch.Tensor) -> torch.Tensor:
    """d(sum of -log p(y))/d(last hidden state), y sampled from the float model's own distribution."""
    norm = final_norm(checkpoint, config)
    last = last.clone().requires_grad_(True)
    normed = norm(last)
    flat = normed.detach().reshape(-1, config.hidden_size)
    head = checkpoint.weight("lm_head.weight")
    labels, normalizer = sampled_tokens(flat, head, HEAD_ROWS)
    with torch.no_grad():
        gradient = torch.zeros_like(flat)
        for start, rows in head.row_chunks(HEAD_ROWS):
            weights = float_tensor(rows)
            probabilities = torch.exp(flat @ weights.T - normalizer[:, None])
            hit = ((labels >= start) & (labels < start + len(weights))).nonzero()[:, 0]
            probabilities[hit, labels[hit] - start] -= 1
            gradient += probabilities @ weights
    normed.backward(gradient.reshape(normed.shape))
    return last.grad


def sampled_tokens(flat: torch.Tensor, head, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A token sampled at each position of `flat` (final normed hidden states) from the distribution the lm_head
    (a WeightInfo) gives, and the log of its normalizer: Gumbel-max over the head's chunks of `rows` rows (default
    HEAD_ROWS), so the head is never whole in memory; the same every run."""
    generator = torch.Generator().manual_seed(0)
    normalizer = torch.full((len(flat),), -torch.inf)
    best = torch.full((len(flat),), -torch.inf)
    labels = torch.zeros(len(flat), dtype=torch.long)
    with torch.no_grad():
        for start, chunk in head.row_chunks(rows or HEAD_ROWS):
            logits = flat @ float_tensor(chunk).T
            normalizer = torch.logaddexp(normalizer, torch.logsumexp(logits, -1))
            uniform = torch.rand(logits.shape, generator=generator).clamp_(min=1e-20)
            value, index = (logits - torch.log(-torch.log(uniform))).max(-1)
            better = value > best
            best, labels = torch.where(better, value, best), torch.where(better, index + start, labels)
    return labels, normalizer


def _layer_scores(checkpoint, config, index, states, gradient, run, block_size, symmetric):
    """The layer's groups with their scores, and the gradient at the layer's input (one window at a time: a
    window's own gradient is what the Fisher estimate squares)."""
    from llama_export.passes.block_quantized import quantize_rtn

    layer = load_layer(checkpoint, index, config)
    linears = {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    errors = {}
    for name, module in linears.items():
        weight = module.weight.detach()
        errors[name] = torch.from_numpy(quantize_rtn(weight.numpy(), 4, block_size, symmetric).dequantize()) - weight
    for parameter in layer.parameters():
        parameter.requires_grad_(False)
    for module in linears.values():
        module.weight.requires_grad_(True)
    readers: dict[int, list[str]] = {}  # an input tensor's id -> the matrices reading it
    keep = []  # holds the inputs so their ids stay unique

    def hook(name):
        def record(module, inputs):
            keep.append(inputs[0])
            readers.setdefault(id(inputs[0]), []).append(name)
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    scores = dict.fromkeys(linears, 0.0)
    input_gradient = torch.empty_like(gradient)
    for window in range(len(gradient)):
        x = torch.from_numpy(np.array(states[index][window:window + 1])).requires_grad_(True)
        out = layer_output(layer(x, **run))
        if window == 0:
            for handle in handles:
                handle.remove()
            keep.clear()
        layer.zero_grad(set_to_none=True)
        out.backward(gradient[window:window + 1])
        for name, module in linears.items():
            scores[name] += float((module.weight.grad * errors[name]).square().sum())
        input_gradient[window] = x.grad[0]
    prefix = f"model.layers.{index}."
    groups = [MatrixGroup(tuple(prefix + n + ".weight" for n in names),
                          sum(linears[n].weight.numel() for n in names), sum(scores[n] for n in names))
              for names in readers.values()]
    return groups, input_gradient
