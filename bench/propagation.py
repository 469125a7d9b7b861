"""Which hidden states should layer i's calibration statistics come from: the float model's (what
exporter/calibrate.py does) or those of layers 0..i-1 already quantized (GPTQ's sequential mode)? Both are run on
the default model in PyTorch with the exporter's own GPTQ (act_order, asymmetric, integer zero points) on every
decoder-layer matrix, and the perplexity of each quantized model is measured on a held-out text.

    python bench/propagation.py --work DIR [--blocks 32,128] [--text exporter/data/heldout.txt]

The lm_head and embedding stay float and no input scaling is applied, so the two arms differ only in the
statistics. Not a test: the figures depend on the texts."""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def layer_statistics(layer, hidden, positions, position_embeddings) -> tuple[torch.Tensor, dict]:
    """The layer's output on `hidden` and X^T X / tokens of each linear's input."""
    statistics, hooks = {}, []
    for name in LINEARS:
        def hook(module, inputs, output, name=name):
            flat = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            statistics[name] = (flat.T @ flat / flat.shape[0]).numpy()
        hooks.append(layer.get_submodule(name).register_forward_hook(hook))
    out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=position_embeddings)
    for h in hooks:
        h.remove()
    return (out[0] if isinstance(out, tuple) else out), statistics


def quantize_layer(layer, statistics: dict, block: int) -> None:
    """Replaces the layer's linear weights by their GPTQ-quantized values (dequantized), in place."""
    from llama_export.passes.block_quantized import quantize_gptq

    for name in LINEARS:
        linear = layer.get_submodule(name)
        q = quantize_gptq(linear.weight.detach().numpy(), statistics[name], 4, block, False, True, 0.1,
                          act_order=True)
        linear.weight.data.copy_(torch.from_numpy(q.dequantize()))


def quantized_model(model, windows: torch.Tensor, block: int, propagate_quantized: bool):
    """A copy of the model with every decoder layer quantized, layer by layer, from statistics of the float
    model's hidden states or of the quantized layers' own."""
    quantized = copy.deepcopy(model)
    with torch.no_grad():
        hidden = model.model.embed_tokens(windows)
        positions = torch.arange(windows.shape[1]).unsqueeze(0)
        position_embeddings = model.model.rotary_emb(hidden, positions)
        for layer in quantized.model.layers:
            float_out, statistics = layer_statistics(layer, hidden, positions, position_embeddings)
            quantize_layer(layer, statistics, block)
            if propagate_quantized:
                out = layer(hidden, attention_mask=None, position_ids=positions,
                            position_embeddings=position_embeddings)
                hidden = out[0] if isinstance(out, tuple) else out
            else:
                hidden = float_out
    return quantized


def perplexity(model, ids: list[int], window: int) -> float:
    from llama_export.exporter.evaluate import _perplexity

    with torch.no_grad():
        return _perplexity(ids, window, lambda chunk: model(torch.tensor([chunk])).logits[0].float().numpy(),
                           "model")["perplexity"]


def main() -> None:
    from bench._common import default_model_as_hf_folder
    from llama_export.exporter.calibrate import WINDOW, default_calibration_text, tokenize
    from llama_export.exporter.sources import open_checkpoint
    from llama_export.exporter.verify import reference_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the default model as a HF folder")
    parser.add_argument("--blocks", default="32,128")
    parser.add_argument("--text", type=Path, default=Path("src/llama_export/exporter/data/heldout.txt"))
    parser.add_argument("--window", type=int, default=256)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    checkpoint = open_checkpoint(default_model_as_hf_folder(args.work / "default-hf"))
    model = reference_model(checkpoint)
    model.config._attn_implementation = "sdpa"  # causal when a layer is called without a mask
    calibration = tokenize(checkpoint, default_calibration_text())
    usable = len(calibration) // WINDOW * WINDOW
    windows = torch.tensor(calibration[:usable]).reshape(-1, WINDOW)
    ids = tokenize(checkpoint, args.text.read_text(encoding="utf-8"))
    print(f"float model: perplexity {perplexity(model, ids, args.window):.3f} on {args.text} ({len(ids)} tokens)")
    for block in (int(b) for b in args.blocks.split(",")):
        for propagate_quantized in (False, True):
            start = time.perf_counter()
            quantized = quantized_model(model, windows, block, propagate_quantized)
            value = perplexity(quantized, ids, args.window)
            source = "quantized" if propagate_quantized else "float"
            print(f"block {block:>3}, statistics from the {source:<9} layers' outputs: perplexity {value:.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
            del quantized


if __name__ == "__main__":
    main()
