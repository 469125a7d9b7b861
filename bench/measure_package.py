"""Decode and prefill speed of one package, run by onnxruntime-genai in a process that holds only it.

    python -m bench.measure_package PACKAGE [--new-tokens 128] [--repeats 1] [--prefill 0]

Prints one JSON line: {"decode": [tokens/s, ...], "prefill": [seconds, ...]}. The benchmarks start one such process
per measurement: in a process holding several models, the first one loaded decoded 5-9% slower than one loaded
after it (the same package loaded twice, onnxruntime-genai 0.18, 2-core machine), which biased side-by-side runs
by load order. A process of its own is also how an application runs a model."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def decode_rate(og, model, tokenizer, new_tokens: int) -> float:
    """Tokens per second over `new_tokens` greedy steps after the prompt's prefill."""
    prompt = tokenizer.encode(PROMPT)
    params = og.GeneratorParams(model)
    total = len(prompt) + new_tokens
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    generator.generate_next_token()  # the first token comes from the prefill
    start = time.perf_counter()
    steps = 0
    while not generator.is_done():
        generator.generate_next_token()
        steps += 1
    return steps / (time.perf_counter() - start)


def prefill_seconds(og, model, length: int) -> float:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=length + 8, do_sample=False)
    generator = og.Generator(model, params)
    ids = [(i * 7919) % 40000 + 100 for i in range(length)]  # fixed, valid token ids
    start = time.perf_counter()
    generator.append_tokens(ids)
    return time.perf_counter() - start


def measure(package: Path, new_tokens: int, repeats: int = 1, prefill: int = 0) -> dict[str, list[float]]:
    """Run this module on `package` in a child process and return its measurements."""
    command = [sys.executable, "-m", "bench.measure_package", str(package), "--new-tokens", str(new_tokens),
               "--repeats", str(repeats), "--prefill", str(prefill)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if result.returncode != 0:
        raise SystemExit(f"measuring {package} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def alternating(names: list[str], run: int) -> list[str]:
    """The order of one round: forwards on even rounds, backwards on odd ones, so drift hits all alike."""
    return names if run % 2 == 0 else names[::-1]


def paired_ratio(ours: list[float], theirs: list[float]) -> float:
    """Median over rounds of one package's rate over another's: each round's two ran back to back, so the slow
    drift of a shared machine cancels out of each ratio."""
    return statistics.median(a / b for a, b in zip(ours, theirs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="decode measurements in this process")
    parser.add_argument("--prefill", type=int, default=0, help="prompt length for one prefill timing (0: none)")
    args = parser.parse_args()
    import onnxruntime_genai as og

    model = og.Model(str(args.package))
    tokenizer = og.Tokenizer(model)
    decode_rate(og, model, tokenizer, 8)  # warm-up
    decode = [decode_rate(og, model, tokenizer, args.new_tokens) for _ in range(args.repeats)]
    prefill = [prefill_seconds(og, model, args.prefill)] if args.prefill else []
    print(json.dumps({"decode": decode, "prefill": prefill}))


if __name__ == "__main__":
    main()
