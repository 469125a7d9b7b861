"""Reading a Meta checkpoint of LLaMA 1's real shapes: peak memory of llama-export's Meta source against the largest
tensor it must hold.

    python bench/meta_shards.py [--model 13b|65b|7b] [--layers N] [--work DIR]

Writes random bf16 weights of the model's real shapes in its model-parallel shards (13B: 2, 65B: 8; --layers
fewer than the model's keeps the disk use down, every tensor keeps its real shape), then, in a fresh process,
opens the folder and reads every tensor one at a time as the export does (shards joined, Q/K rows reordered,
float32). Reports the peak resident memory above the opened source's against the largest float32 tensor.
Not a test: the numbers depend on the machine."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# LLaMA 1's params.json (dim, n_layers, n_heads, shards); vocab 32000, multiple_of 256
MODELS = {"7b": (4096, 32, 32, 1), "13b": (5120, 40, 40, 2), "65b": (8192, 80, 64, 8)}
VOCAB = 32000

READER = r"""
import resource, sys, time
from llama_export.exporter.sources import open_checkpoint
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
checkpoint = open_checkpoint(sys.argv[1])
opened, start, largest = rss(), time.perf_counter(), 0
for name in sorted(checkpoint.weights):
    values = checkpoint.weights[name].load()
    largest = max(largest, values.nbytes)
    del values
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(f"{len(checkpoint.weights)} {opened} {peak} {largest} {time.perf_counter() - start:.1f}")
"""


def write_checkpoint(folder: Path, dim: int, layers: int, heads: int, shards: int) -> None:
    import torch

    from llama_export.exporter.sources.meta import feed_forward_size

    ffn = feed_forward_size(dim, 256, None)
    full = {"tok_embeddings.weight": ((VOCAB, dim), 1), "norm.weight": ((dim,), None),
            "output.weight": ((VOCAB, dim), 0)}
    for i in range(layers):
        full.update({f"layers.{i}.attention.{w}.weight": ((dim, dim), 0 if w != "wo" else 1)
                     for w in ("wq", "wk", "wv", "wo")})
        full.update({f"layers.{i}.feed_forward.w1.weight": ((ffn, dim), 0),
                     f"layers.{i}.feed_forward.w2.weight": ((dim, ffn), 1),
                     f"layers.{i}.feed_forward.w3.weight": ((ffn, dim), 0),
                     f"layers.{i}.attention_norm.weight": ((dim,), None),
                     f"layers.{i}.ffn_norm.weight": ((dim,), None)})
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for index in range(shards):
        shard = {}
        for name, (shape, dim_split) in full.items():
            shape = list(shape)
            if dim_split is not None:
                shape[dim_split] //= shards
            shard[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        torch.save(shard, folder / f"consolidated.{index:02d}.pth")
        del shard
    (folder / "params.json").write_text(json.dumps({"dim": dim, "multiple_of": 256, "n_heads": heads,
                                                    "n_layers": layers, "norm_eps": 1e-6, "vocab_size": -1}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="13b")
    parser.add_argument("--layers", type=int, default=None, help="default: the model's")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one; kept)")
    args = parser.parse_args()
    dim, layers, heads, shards = MODELS[args.model]
    layers = args.layers or layers
    folder = (args.work or Path(tempfile.mkdtemp(prefix="llama-export-meta-"))) / f"llama1-{args.model}-{layers}l"
    if not (folder / "params.json").is_file():
        print(f"writing {folder} ({shards} shards, {layers} layers) ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        write_checkpoint(folder, dim, layers, heads, shards)
        print(f"  written in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    on_disk = sum(p.stat().st_size for p in folder.glob("*.pth"))
    out = subprocess.run([sys.executable, "-c", READER, str(folder)], capture_output=True, text=True, check=True)
    tensors, opened, peak, largest, seconds = out.stdout.split()
    gb = 1e9
    print(f"LLaMA-1 {args.model} shapes, {layers} layers, {shards} shards, {on_disk / gb:.1f} GB of bf16 on disk")
    print(f"read {tensors} tensors one at a time in {seconds} s")
    print(f"resident after opening: {int(opened) / gb:.2f} GB; peak: {int(peak) / gb:.2f} GB; "
          f"peak above opened: {(int(peak) - int(opened)) / gb:.2f} GB; largest float32 tensor: "
          f"{int(largest) / gb:.2f} GB")


if __name__ == "__main__":
    main()
