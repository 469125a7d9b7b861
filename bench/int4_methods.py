"""INT4 methods compared on text calibration never saw: the default model's Hugging Face folder exported with each
variant (quantization method, block size, calibration text, lm_head width), each package scored on the held-out
texts of every kind and on exporter/data/heldout.txt against the fp32 PyTorch source (perplexity change, mean KL
divergence). Quality only; bench/int4.py measures speed.

    python bench/int4_methods.py --work DIR [--variants NAME ...] [--list]

Packages are kept in DIR and reused; --fresh rebuilds them."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import add_chart_option, default_model_as_hf_folder  # noqa: E402
from bench.heldout_quality import HeldoutQuality, report_quality  # noqa: E402

OLD_CALIBRATION = Path(__file__).resolve().parent.parent / "src/llama_export/exporter/data/calibration.txt"

ALL_4_BIT = ["--eight-bit-share", "0"]  # no layer matrix kept at 8 bits (block 128's default keeps 35%)

# name -> llama-export options (the model, --precision int4 and the output are added). The default model's folder
# holds a Q4_1 file's weights, on a 4-bit 32-block grid that block 32 carries by default: --requantize measures the
# methods themselves.
VARIANTS = {
    "b32, grid carried": ["--block-size", "32"],
    "b32 gptq": ["--block-size", "32", "--requantize"],
    "b32 gptq, English only": ["--block-size", "32", "--requantize", "--calibration-text", str(OLD_CALIBRATION)],
    "b32 gptq, 2048 tokens": ["--block-size", "32", "--requantize", "--calibration-tokens", "2048"],
    "b32 clip": ["--block-size", "32", "--requantize", "--quant", "clip"],
    "b32 rtn": ["--block-size", "32", "--requantize", "--quant", "rtn"],
    "b128 gptq, 35% 8-bit (default)": ["--block-size", "128"],
    "b128 gptq, 30% 8-bit": ["--block-size", "128", "--eight-bit-share", "0.3"],
    "b128 gptq, 20% 8-bit": ["--block-size", "128", "--eight-bit-share", "0.2"],
    # the rest all 4-bit: the methods and layouts themselves
    "b128 gptq": ["--block-size", "128", *ALL_4_BIT],
    "b128 gptq, English only": ["--block-size", "128", *ALL_4_BIT, "--calibration-text", str(OLD_CALIBRATION)],
    "b128 gptq, 2048 tokens": ["--block-size", "128", *ALL_4_BIT, "--calibration-tokens", "2048"],
    "b128 gptq, 4-bit lm_head": ["--block-size", "128", *ALL_4_BIT, "--lm-head-bits", "4"],
    "b128 clip": ["--block-size", "128", *ALL_4_BIT, "--quant", "clip"],
    "b128 rtn": ["--block-size", "128", *ALL_4_BIT, "--quant", "rtn"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="working folder, reused between runs")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), metavar="NAME")
    parser.add_argument("--fresh", action="store_true", help="rebuild packages already in --work")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the scores as JSON")
    add_chart_option(parser, "int4_methods")
    args = parser.parse_args()
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    hf = default_model_as_hf_folder(args.work / "hf")
    packages = {}
    for name in args.variants:
        out = args.work / ("pkg-" + "".join(c if c.isalnum() else "-" for c in name))
        if args.fresh or not (out / "manifest.json").is_file():
            subprocess.run([sys.executable, "-m", "llama_export", "--model", str(hf), "--precision", "int4",
                            *VARIANTS[name], "-q", "--force", "--no-verify", "-o", str(out)], check=True)
        packages[name] = out
    quality = HeldoutQuality(hf)
    results = {}
    for name, package in packages.items():
        results[name] = quality.of(package)
        print(f"scored {name}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    report_quality(results, args.chart)


if __name__ == "__main__":
    main()
