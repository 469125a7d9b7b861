"""Does a mixture-of-experts package decode at the speed of its active weights? A tiny-but-wide LLaMA 4 model with
16 experts in every layer against a dense LLaMA 4 model with the same active parameters (its dense MLP as wide as
the shared expert and one routed expert together), same attention, both exported for the cpu target in fp32 and
decoded by onnxruntime-genai side by side in alternating rounds.

    python bench/moe_decode.py --work /tmp/moe [--hidden 1024] [--expert-width 1024] [--experts 16] [--rounds 5]

The MoE package stores `experts` times the routed weights of the dense one; if decode read them all it would run
several times slower. Prints each package's size, tokens/s per round, and the paired ratio."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from helpers import write_tiny_tokenizer  # noqa: E402  (the tests' small BPE tokenizer)

from bench._common import add_chart_option, report_table  # noqa: E402
from bench.measure_package import alternating, measure, paired_ratio  # noqa: E402


def make_model(folder: Path, args, moe: bool) -> Path:
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    width = args.expert_width
    config = Llama4TextConfig(
        vocab_size=4096, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=16,
        num_key_value_heads=4, head_dim=args.hidden // 16, intermediate_size=width,
        intermediate_size_mlp=2 * width,  # the dense model: shared expert + one routed expert
        num_local_experts=args.experts, num_experts_per_tok=1, moe_layers=list(range(args.layers)) if moe else [],
        attention_chunk_size=8192, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = Llama4ForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "router" in name:
                parameter.normal_(0, 0.5)  # routing spread over the experts
    model.save_pretrained(folder)
    write_tiny_tokenizer(folder, config.vocab_size)
    return folder


def export(model: Path, package: Path) -> Path:
    if not (package / "model.onnx").is_file():
        command = [sys.executable, "-m", "llama_export", "--model", str(model), "--output", str(package),
                   "--no-verify", "--quiet"]
        subprocess.run(command, check=True)
    return package


def size_mb(package: Path) -> float:
    return sum(p.stat().st_size for p in package.iterdir() if p.is_file()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    add_chart_option(parser, "moe_decode")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--expert-width", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    packages = {}
    for name, moe in (("moe", True), ("dense", False)):
        model = make_model(args.work / f"{name}-model", args, moe)
        packages[name] = export(model, args.work / f"{name}-cpu-fp32")
    rates = {name: [] for name in packages}
    for run in range(args.rounds):
        for name in alternating(list(packages), run):
            rates[name].append(statistics.median(measure(packages[name], args.new_tokens)["decode"]))
        print(f"round {run + 1}: " + ", ".join(f"{n} {r[-1]:.1f} tok/s" for n, r in rates.items()), flush=True)
    active = 6 * args.hidden * args.expert_width
    report_table(f"hidden {args.hidden}, {args.layers} layers, {args.experts} experts of width {args.expert_width} "
                 f"(active MLP weights per layer {active / 1e6:.1f}M in both)", ["package", "size MB", "decode tok/s"],
                 [[name, f"{size_mb(package):.1f}", f"{statistics.median(rates[name]):.1f}"]
                  for name, package in packages.items()], args.chart)
    ratio = paired_ratio(rates["dense"], rates["moe"])
    print(f"  dense / MoE decode time ratio (paired median): MoE takes {ratio:.2f}x the dense package's time per "
          f"token ({'within' if ratio <= 1.3 else 'NOT within'} 1.3x)")


if __name__ == "__main__":
    main()
