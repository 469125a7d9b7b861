"""Keeping the most sensitive matrices at 8 bits: how much of a block-128 INT4 model must be 8-bit for every
held-out kind to come within a perplexity target. The default model's Hugging Face folder, each layer matrix
quantized as the cpu target does (calibration statistics of the float model, input scaling of norm-fed matrices,
GPTQ at the default damping; the lm_head 8-bit in 64-blocks), dequantized into transformers' model (PyTorch, not
packages: the whole model is held, which this 135M model allows). The units are each layer's packed q/k/v, o,
packed gate/up and down. A unit's sensitivity is the drop of mean KL divergence from fp32 on calibration windows
when it alone is 8-bit; units are taken greedily by that drop per weight until a fraction of the layer weights is
8-bit, and each mix is scored on the held-out kinds. llama.cpp's Q4_K_M choice (down and v in its "more bits"
layers, 8-bit here) is scored beside them, and so is the exporter's own choice (--eight-bit-share: a Fisher-weighted
4-bit error from one streamed gradient pass, exporter/sensitivity.py), which is what a package gets.

    python bench/int4_mixed_precision.py --work DIR [--block-size 128] [--fractions 0.1 0.2 0.3] [--json FILE]"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import default_model_as_hf_folder  # noqa: E402
from bench.heldout_quality import HeldoutQuality  # noqa: E402

UNITS = {"qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "o": ["self_attn.o_proj"],
         "gate_up": ["mlp.gate_proj", "mlp.up_proj"], "down": ["mlp.down_proj"]}
NORM_FED = {"qkv", "gate_up"}  # input-scaled, as passes/scaling.py does on the ONNX Runtime targets
WINDOW = 256
SENSITIVITY_WINDOWS = 8
BATCH = 4


def quantized(w: np.ndarray, hessian: np.ndarray, bits: int, block: int, scaled: bool, head=False) -> np.ndarray:
    """w [N, K] quantized as the package would hold it, dequantized back to the float model's input space (the
    lm_head symmetric, as the cpu target's 8-bit head is)."""
    from llama_export.passes.block_quantized import prepare_gptq, quantize_gptq
    from llama_export.passes.quantize import QuantOptions
    from llama_export.passes.scaling import choose_input_scale

    s = choose_input_scale(w, hessian, block) if scaled else None
    if s is not None:
        w, hessian = w * s, hessian / s[:, None] / s[None, :]
    options = QuantOptions()
    prepared = prepare_gptq(hessian.astype(np.float32), block, options.lm_head_damp if head else options.damp,
                            act_order=True)
    q = quantize_gptq(w, prepared, bits, block, symmetric=head).dequantize()
    return (q / s if s is not None else q).astype(np.float32)


class Mixes:
    """The float model, every unit's 4- and 8-bit weights, and the windows it is scored on (the held-out ones and
    their fp32 logits from bench/heldout_quality.py; a spread of calibration windows for the sensitivities)."""

    def __init__(self, folder: Path, block: int):
        from transformers import AutoModelForCausalLM

        from llama_export.exporter.calibrate import CalibrationStream, calibration_text, tokenize
        from llama_export.exporter.evaluate import windows_of
        from llama_export.exporter.sources import open_checkpoint

        checkpoint = self.checkpoint = open_checkpoint(folder)
        self.layers = checkpoint.config.num_hidden_layers
        text = self.text = calibration_text(checkpoint)
        stream = CalibrationStream(checkpoint, text)
        self.weights = {}
        for i in range(self.layers):
            for unit, parts in UNITS.items():
                names = [f"model.layers.{i}.{p}.weight" for p in parts]
                hessian = stream.get(names[0])
                w = np.concatenate([checkpoint.weights[n].load() for n in names]).astype(np.float32)
                for bits in (4, 8):
                    self.weights[i, unit, bits] = quantized(w, hessian, bits, block, unit in NORM_FED)
            print(f"layer {i + 1}/{self.layers} quantized", flush=True)
        head = "lm_head.weight" if "lm_head.weight" in checkpoint.weights else "model.embed_tokens.weight"
        self.head = quantized(checkpoint.weights[head].load().astype(np.float32), stream.get("lm_head.weight"), 8,
                              64, True, head=True)

        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.params = dict(self.model.named_parameters())
        self.rows = {u: [self.params[f"model.layers.0.{p}.weight"].shape[0] for p in parts]
                     for u, parts in UNITS.items()}
        self.sizes = {u: sum(self.rows[u]) * self.params[f"model.layers.0.{UNITS[u][0]}.weight"].shape[1]
                      for u in UNITS}
        self.heldout = HeldoutQuality(folder)
        whole = [w for w in windows_of(tokenize(checkpoint, text), WINDOW) if len(w) == WINDOW]
        spread = np.linspace(0, len(whole) - 1, SENSITIVITY_WINDOWS).round().astype(int)
        self.calibration = [whole[i] for i in spread]
        self.calibration_reference = self.logits(self.calibration)  # the float model's, before any use()

    def use(self, eight: set, v_only: set = frozenset()) -> None:
        """Every unit 4-bit but those in `eight` (and the value rows of the q/k/v units of layers in `v_only`)."""
        with torch.no_grad():
            for i in range(self.layers):
                for unit, parts in UNITS.items():
                    w = self.weights[i, unit, 8 if (i, unit) in eight else 4]
                    if unit == "qkv" and i in v_only:
                        w = w.copy()
                        w[-self.rows[unit][-1]:] = self.weights[i, unit, 8][-self.rows[unit][-1]:]
                    bounds = np.cumsum([0] + self.rows[unit])
                    for part, start, stop in zip(parts, bounds, bounds[1:]):
                        self.params[f"model.layers.{i}.{part}.weight"].copy_(torch.from_numpy(w[start:stop]))
            self.model.model.embed_tokens.weight.copy_(torch.from_numpy(self.head))
            self.model.lm_head.weight.copy_(torch.from_numpy(self.head))

    def logits(self, windows: list[list[int]]) -> list[np.ndarray]:
        with torch.no_grad():
            return [self.model(torch.tensor([w])).logits[0].float().numpy() for w in windows]

    def heldout_scores(self) -> dict[str, tuple[float, float]]:
        """Per held-out text: perplexity change over fp32 (%), mean KL(fp32 || quantized) per position."""
        from llama_export.exporter.evaluate import scores

        result = {}
        for name, windows in self.heldout.windows.items():
            s = scores(windows, self.logits(windows), self.heldout.reference[name])
            result[name] = ((s["perplexity"] / s["reference_perplexity"] - 1) * 100, s["mean_kl"])
        return result

    def sensitivities(self) -> dict[tuple, float]:
        from llama_export.exporter.evaluate import scores

        def calibration_kl() -> float:
            return scores(self.calibration, self.logits(self.calibration), self.calibration_reference)["mean_kl"]

        self.use(set())
        base = calibration_kl()
        drops = {}
        for i in range(self.layers):
            for unit in UNITS:
                self.use({(i, unit)})
                drops[i, unit] = base - calibration_kl()
            print(f"layer {i + 1}/{self.layers} sensitivities measured", flush=True)
        return drops


def streamed_scores(mixes: Mixes, block: int) -> dict[tuple, float]:
    """The exporter's own sensitivities (--eight-bit-share: exporter/sensitivity.py), by (layer, unit)."""
    from llama_export.exporter.sensitivity import sensitivities

    unit_of = {parts[0]: unit for unit, parts in UNITS.items()}
    scores = {}
    for group in sensitivities(mixes.checkpoint, mixes.text, block):
        _, _, layer, module, name, _ = group.names[0].split(".")
        scores[int(layer), unit_of[f"{module}.{name}"]] = group.score
    return scores


def greedy(scores: dict[tuple, float], sizes: dict[str, int], share: float) -> set:
    """Units taken as the exporter takes them (by score per weight while they fit in `share` of all)."""
    from llama_export.exporter.sensitivity import MatrixGroup, eight_bit_weights

    chosen = eight_bit_weights([MatrixGroup((unit,), sizes[unit[1]], score) for unit, score in scores.items()], share)
    return set(chosen)


def llama_cpp_more_bits(layers: int) -> list[int]:
    """The layers llama.cpp's Q4_K_M gives more bits (use_more_bits in its quantizer)."""
    return [i for i in range(layers) if i < layers // 8 or i >= 7 * layers // 8 or (i - layers // 8) % 3 == 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="working folder, reused between runs")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.05, 0.1, 0.2, 0.3])
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the scores as JSON")
    args = parser.parse_args()
    torch.manual_seed(0)
    mixes = Mixes(default_model_as_hf_folder(args.work / "hf"), args.block_size)
    total = mixes.layers * sum(mixes.sizes.values())
    results = {}

    def score(label: str, eight: set, v_only: set = frozenset()) -> None:
        mixes.use(eight, v_only)
        weights = sum(mixes.sizes[u] for _, u in eight) + len(v_only) * mixes.sizes["qkv"] * \
            mixes.rows["qkv"][-1] // sum(mixes.rows["qkv"])
        results[label] = {"eight_bit_fraction": weights / total, "scores": mixes.heldout_scores()}
        cells = "  ".join(f"{n} {p:+.1f}% {k:.3f}" for n, (p, k) in results[label]["scores"].items())
        print(f"{label:<40} {weights / total:5.1%} 8-bit  {cells}", flush=True)

    score("all 4-bit", set())
    drops = mixes.sensitivities()
    for fraction in args.fractions:
        score(f"most sensitive, up to {fraction:.0%}", greedy(drops, mixes.sizes, fraction))
    streamed = streamed_scores(mixes, args.block_size)
    ranks = [np.argsort(np.argsort([scores[u] for u in drops])) for scores in (drops, streamed)]
    print(f"rank correlation (Spearman) of the exporter's scores with the measured drops: "
          f"{np.corrcoef(*ranks)[0, 1]:.2f}", flush=True)
    for fraction in args.fractions:
        score(f"exporter's choice, up to {fraction:.0%}", greedy(streamed, mixes.sizes, fraction))
    more = llama_cpp_more_bits(mixes.layers)
    score("llama.cpp Q4_K_M layers: down and v", {(i, "down") for i in more}, set(more))
    if args.json:
        args.json.write_text(json.dumps({"block_size": args.block_size, "results": results,
                                         "sensitivity": {f"{i}.{u}": d for (i, u), d in drops.items()},
                                         "streamed": {f"{i}.{u}": d for (i, u), d in streamed.items()}}, indent=1))


if __name__ == "__main__":
    main()
