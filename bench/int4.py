"""INT4 packages of the default model, llama-export against onnxruntime-genai's model builder, block 32 and 128:
decode speed (run by onnxruntime-genai, each measurement in a fresh process, alternating, median), package
size, and perplexity on the project's held-out text (exporter/data/heldout.txt, never used for calibration) next
to the fp32 PyTorch one; then perplexity and KL divergence on the held-out text of every kind
(exporter/data/texts/heldout; bench/heldout_quality.py).

    python bench/int4.py [--work DIR] [--runs 5] [--new-tokens 128]

llama-export builds from the same Hugging Face folder as the builder and, at block 32, also from the GGUF itself
(its Q4_1/Q8_0 blocks carried over), and at block 128 also with every layer matrix at 4 bits (--eight-bit-share 0;
the default keeps the most sensitive 35% of the layer weights at 8 bits). The folder holds the GGUF's Q4_1 values,
whose grid llama-export carries at block 32; "HF, GPTQ" quantizes it again (--requantize), so its quantizer does
the work. The builder's packages are also run with llama-export's genai session options (its thread setting), to
tell what the graphs do from what the settings do."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import add_chart_option, default_model_as_hf_folder, report_table, with_session_options  # noqa: E402,E501
from bench.heldout_quality import HeldoutQuality, report_quality  # noqa: E402
from bench.measure_package import alternating, measure, paired_ratio  # noqa: E402

HELDOUT = Path(__file__).resolve().parent.parent / "src" / "llama_export" / "exporter" / "data" / "heldout.txt"


def build(work: Path) -> dict[str, Path]:
    from llama_export.exporter.default_model import default_model_path

    hf = default_model_as_hf_folder(work / "hf")
    packages = {}
    for block in (32, 128):
        ours = work / f"ours-int4-hf-b{block}"
        if not (ours / "manifest.json").is_file():
            subprocess.run([sys.executable, "-m", "llama_export", "--model", str(hf), "--precision", "int4",
                            "--block-size", str(block), "-q", "--force", "--no-verify", "-o", str(ours)], check=True)
        genai = work / f"genai-int4-b{block}"
        if not (genai / "genai_config.json").is_file():
            subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(genai),
                            "-p", "int4", "-e", "cpu", "-c", str(work / "genai-cache"), "--extra_options",
                            f"block_size={block}"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        packages[f"llama-export b{block} (HF)"] = ours
        if block == 32:  # the folder's Q4_1 grid is carried at block 32: GPTQ itself, for comparison
            requantized = work / "ours-int4-hf-b32-requantized"
            if not (requantized / "manifest.json").is_file():
                subprocess.run([sys.executable, "-m", "llama_export", "--model", str(hf), "--precision", "int4",
                                "--block-size", "32", "--requantize", "-q", "--force", "--no-verify", "-o",
                                str(requantized)], check=True)
            packages["llama-export b32 (HF, GPTQ)"] = requantized
        packages[f"builder b{block}"] = genai
        packages[f"builder b{block}, our options"] = with_session_options(genai, ours, work / f"genai-b{block}-ours")
    all_4_bit = work / "ours-int4-hf-b128-all-4-bit"
    if not (all_4_bit / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "llama_export", "--model", str(hf), "--precision", "int4",
                        "--block-size", "128", "--eight-bit-share", "0", "-q", "--force", "--no-verify", "-o",
                        str(all_4_bit)], check=True)
    packages["llama-export b128 (HF), all 4-bit"] = all_4_bit
    gguf = work / "ours-int4-gguf-b32"
    if not (gguf / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "llama_export", "--model", str(default_model_path()), "--precision",
                        "int4", "-q", "--force", "--no-verify", "-o", str(gguf)], check=True)
    packages["llama-export b32 (GGUF)"] = gguf
    return packages


def size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="working folder, reused between runs (default: a temporary one)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    add_chart_option(parser, "int4")
    args = parser.parse_args()
    from llama_export.exporter.evaluate import package_perplexity, source_perplexity

    work = args.work or Path(tempfile.mkdtemp(prefix="llama-export-bench-"))
    packages = build(work)
    text = HELDOUT.read_text()
    reference = source_perplexity(str(work / "hf"), text)["perplexity"]
    perplexity = {name: package_perplexity(path, text)["perplexity"] for name, path in packages.items()
                  if not name.endswith("our options")}
    for block in (32, 128):  # the same graph as the builder's own package
        perplexity[f"builder b{block}, our options"] = perplexity[f"builder b{block}"]

    names = list(packages)
    rates = {name: [] for name in names}
    for run in range(args.runs):
        for name in alternating(names, run):
            rates[name] += measure(packages[name], args.new_tokens)["decode"]
        print(f"run {run + 1}/{args.runs}: " + ", ".join(f"{n} {rates[n][-1]:.0f}" for n in names), file=sys.stderr)

    report_table(f"INT4 cpu packages, onnxruntime-genai runtime, batch 1, {args.new_tokens} new tokens, median of "
                 f"{args.runs}; perplexity on {HELDOUT.name} (fp32 PyTorch: {reference:.3f})",
                 ["package", "decode tok/s", "size MB", "perplexity", "vs fp32"],
                 [[name, f"{statistics.median(rates[name]):.1f}", f"{size_mb(packages[name]):.1f}",
                   f"{perplexity[name]:.3f}", f"{(perplexity[name] / reference - 1) * 100:+.1f}%"] for name in names],
                 args.chart)
    for block in (32, 128):
        ours, theirs = f"llama-export b{block} (HF)", f"builder b{block}"
        decode = statistics.median(rates[ours]) / statistics.median(rates[theirs])
        print(f"block {block}: decode {decode:.2f}x (median of the rounds' ratios "
              f"{paired_ratio(rates[ours], rates[theirs]):.2f}x), "
              f"size {size_mb(packages[ours]) / size_mb(packages[theirs]):.2f}x the builder's")
        same = f"builder b{block}, our options"
        print(f"  the graphs alone (the builder's run with llama-export's session options): decode "
              f"{statistics.median(rates[ours]) / statistics.median(rates[same]):.2f}x "
              f"(median of the rounds' ratios {paired_ratio(rates[ours], rates[same]):.2f}x)")

    mixed, pure = "llama-export b128 (HF)", "llama-export b128 (HF), all 4-bit"
    size = size_mb(packages[mixed]) / size_mb(packages[pure])
    print(f"block 128 with its default 8-bit share: decode {paired_ratio(rates[mixed], rates[pure]):.2f}x the all "
          f"4-bit package's (median of the rounds' ratios), size {size:.2f}x")
    gguf, theirs = "llama-export b32 (GGUF)", "builder b32"
    print(f"GGUF block 32: size {size_mb(packages[gguf]) / size_mb(packages[theirs]):.2f}x the builder's block 32")

    quality = HeldoutQuality(work / "hf")
    scored = {name: quality.of(path) for name, path in packages.items() if not name.endswith("our options")}
    print("\nOn the held-out texts of every kind (256-token windows):")
    report_quality(scored, args.chart.with_name(args.chart.stem + '-heldout.png'))


if __name__ == "__main__":
    main()
