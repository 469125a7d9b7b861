"""The default model's cpu fp32 package in both layouts: decode speed under onnxruntime-genai, and (with
--optimum-python) under Optimum's ORTModelForCausalLM, batch 1.

    python bench/layouts.py --work DIR [--runs 3] [--new-tokens 128] [--optimum-python ENV/bin/python]

`--layout genai` fuses attention into GroupQueryAttention; `--layout optimum` keeps plain attention over the mask
so Optimum can run left-padded batches. Each measurement runs in a process of its own, the order alternating."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]
from bench._common import add_chart_option, report_table  # noqa: E402
from bench.measure_package import PROMPT, alternating, measure  # noqa: E402

OPTIMUM_RATE = """
import sys, time, torch
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer
model = ORTModelForCausalLM.from_pretrained(sys.argv[1])
ids = AutoTokenizer.from_pretrained(sys.argv[1])(sys.argv[3], return_tensors="pt")
new = int(sys.argv[2])
model.generate(**ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
start = time.perf_counter()
model.generate(**ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
prefill = time.perf_counter() - start
start = time.perf_counter()
model.generate(**ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
print((new - 1) / (time.perf_counter() - start - prefill))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the packages (reused)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--optimum-python", type=Path, help="a Python with optimum-onnx installed")
    add_chart_option(parser, "layouts")
    args = parser.parse_args()
    packages = {}
    for layout in ("genai", "optimum"):
        out = args.work / f"default-cpu-fp32-{layout}"
        if not (out / "manifest.json").is_file():
            subprocess.run([sys.executable, "-m", "llama_export", "--layout", layout, "--no-verify", "-q", "--force",
                            "-o", str(out)], check=True, cwd=ROOT)
        packages[layout] = out
    genai = {name: [] for name in packages}
    optimum = {name: [] for name in packages}
    for run in range(args.runs):
        for name in alternating(list(packages), run):
            genai[name].append(statistics.median(measure(packages[name], args.new_tokens)["decode"]))
            if args.optimum_python:
                result = subprocess.run([str(args.optimum_python), "-c", OPTIMUM_RATE, str(packages[name]),
                                         str(args.new_tokens), PROMPT], capture_output=True, text=True, check=True)
                optimum[name].append(float(result.stdout.split()[-1]))
        print(f"run {run + 1}/{args.runs}: " + json.dumps({"genai": genai, "optimum": optimum}), file=sys.stderr)
    header = ["layout", "genai decode tok/s"] + (["Optimum decode tok/s"] if args.optimum_python else [])
    rows = [[name, f"{statistics.median(genai[name]):.1f}"] +
            ([f"{statistics.median(optimum[name]):.1f}"] if args.optimum_python else []) for name in packages]
    report_table(f"default model, cpu fp32, batch 1, {args.new_tokens} new tokens, median of {args.runs}", header,
                 rows, args.chart)


if __name__ == "__main__":
    main()
