"""Decode and prefill speed of the default model's fp32 cpu package, llama-export against onnxruntime-genai's model
builder, both run by onnxruntime-genai, each measurement in a fresh process, alternating.

    python bench/decode_speed.py [--work DIR] [--runs 5] [--new-tokens 128] [--prefill 512] [--precision fp32]

Builds both packages first (the builder from the default GGUF dequantized into a Hugging Face folder). A third row
runs the builder's graph with llama-export's genai session options (its thread setting), which tells how much of
a difference comes from the graph and how much from the settings."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import add_chart_option, default_model_as_hf_folder, report_table, with_session_options  # noqa: E402,E501
from bench.measure_package import alternating, measure, paired_ratio  # noqa: E402


def build(work: Path, precision: str, extra_ours: list[str], extra_genai: list[str]) -> dict[str, Path]:
    hf = default_model_as_hf_folder(work / "hf")
    ours, genai = work / f"ours-{precision}", work / f"genai-{precision}"
    if not (ours / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "llama_export", "--model", str(hf), "--precision", precision, "-q",
                        "--force", "-o", str(ours), *extra_ours], check=True)
    if not (genai / "genai_config.json").is_file():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(genai),
                        "-p", precision, "-e", "cpu", "-c", str(work / "genai-cache"), *extra_genai], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    same_options = with_session_options(genai, ours, work / f"genai-{precision}-our-options")
    return {"llama-export": ours, "onnxruntime-genai builder": genai, "builder, our session options": same_options}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="working folder, reused between runs (default: a temporary one)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--precision", default="fp32")
    add_chart_option(parser, "decode_speed")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="llama-export-bench-"))
    packages = build(work, args.precision, [], [])
    names = list(packages)
    decode, prefill = {n: [] for n in names}, {n: [] for n in names}
    for run in range(args.runs):
        for name in alternating(names, run):
            result = measure(packages[name], args.new_tokens, prefill=args.prefill)
            decode[name] += result["decode"]
            prefill[name] += result["prefill"]
        print(f"run {run + 1}/{args.runs}: " + ", ".join(f"{n} {decode[n][-1]:.1f} tok/s" for n in names),
              file=sys.stderr)
    sizes = {n: sum(p.stat().st_size for p in path.rglob('*') if p.is_file()) / 1e6 for n, path in packages.items()}
    report_table(f"{args.precision} cpu package, onnxruntime-genai runtime, batch 1, {args.new_tokens} new tokens, "
                 f"median of {args.runs}", ["package", "decode tok/s", f"prefill {args.prefill} ms", "size MB"],
                 [[name, f"{statistics.median(decode[name]):.1f}", f"{statistics.median(prefill[name]) * 1e3:.0f}",
                   f"{sizes[name]:.0f}"] for name in names], args.chart)
    ours, theirs, same = names
    for label, other in (("builder", theirs), ("builder with the same session options", same)):
        speed = statistics.median(decode[ours]) / statistics.median(decode[other])
        prefill_time = statistics.median(prefill[ours]) / statistics.median(prefill[other])
        print(f"llama-export / {label}: decode {speed:.2f}x (median of the rounds' ratios "
              f"{paired_ratio(decode[ours], decode[other]):.2f}x), prefill time {prefill_time:.2f}x")


if __name__ == "__main__":
    main()
