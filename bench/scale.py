"""Export cost at real LLaMA sizes: random-weight checkpoints of real shapes (bf16 safetensors, one shard a layer)
exported by llama-export and by onnxruntime-genai's model builder, in one run. Reports wall time and peak resident
memory of each export (and of each llama-export stage, from its progress lines), and of `llama-export verify`.

    python bench/scale.py --work DIR [--shapes 1b,8b] [--runs cpu-int4,cpu-int4-rtn,builder-int4]

Shapes: 1b (Llama-3.2-1B), 3b (Llama-3.2-3B), 8b (Llama-3-8B), 8b-2 (its width with 2 layers), 70b-2 and 70b-4
(Llama-3-70B width with 2 and 4 layers). Runs: cpu-int4 (default method, default verify), cpu-int4-rtn
(--quant rtn --no-verify), cpu-int4-b128 (--block-size 128 --no-verify: the 8-bit choice's gradient pass, then
calibration), jetson-int4 (--target jetson-orin, default verify), android-int4 (--target android-arm64),
verify and verify-rtn (llama-export verify of the cpu-int4 or cpu-int4-rtn package), builder-int4
(onnxruntime-genai's builder, -p int4 -e cpu).
Checkpoints are written once into DIR and reused. Not a test: the figures depend on the machine."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import UNCACHED, add_chart_option, report_table  # noqa: E402

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, max_position_embeddings=131072,
               rope_scaling=LLAMA3_ROPE),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, max_position_embeddings=131072,
               rope_scaling=LLAMA3_ROPE),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, max_position_embeddings=8192),
    "8b-2": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, max_position_embeddings=8192),
    "70b-2": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=2, num_attention_heads=64,
                  num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, max_position_embeddings=8192),
    "70b-4": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=4, num_attention_heads=64,
                  num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, max_position_embeddings=8192),
}
VOCAB = 128256
OUTPUT_SCALE = 0.05


def layer_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, i, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    return {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, q), "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h),
            "mlp.down_proj.weight": (h, i)}


def write_checkpoint(folder: Path, shape: str, tokenizer_from: Path) -> Path:
    """A Hugging Face folder of the shape's sizes with random bf16 weights, written one tensor at a time. Matrices
    are drawn with std 1/sqrt(fan-in) so activations keep their scale through the layers, as a trained model's do.
    Two choices give the model a decisive next token, so INT4 verify's top-1 gate measures something (on plain
    random weights every logit is noise and no INT4 package agrees with fp32): the lm_head holds the embedding's
    values (an untied model still stores both) with unit entries, and the layers' output projections (o_proj,
    down_proj) are scaled by OUTPUT_SCALE, so the residual stream keeps the token and the logits rank it first."""
    import torch
    from safetensors.torch import save_file

    if (folder / "config.json").is_file():
        return folder
    c = SHAPES[shape]
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)

    def random(name, shape_):
        if len(shape_) == 1:
            return torch.ones(shape_, dtype=torch.bfloat16)
        scale = OUTPUT_SCALE if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
        if name == "model.embed_tokens.weight":  # unit entries: the token outweighs what the layers add
            scale = shape_[1] ** 0.5
        out = torch.empty(shape_, dtype=torch.bfloat16)
        for start in range(0, shape_[0], 4096):  # in row blocks: no fp32 copy of a whole embedding
            rows = min(4096, shape_[0] - start)
            out[start:start + rows] = torch.randn((rows, shape_[1]), generator=generator) * (scale / shape_[1] ** 0.5)
        return out

    weight_map = {}

    def shard(name: str, tensors: dict[str, torch.Tensor]):
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({n: name for n in tensors})

    layers = c["num_hidden_layers"]
    total = layers + 1
    table = random("model.embed_tokens.weight", (VOCAB, c["hidden_size"]))
    edges = {"model.norm.weight": random("model.norm.weight", (c["hidden_size"],))}
    if not c["tie_word_embeddings"]:
        edges["lm_head.weight"] = table
    shard(f"model-00001-of-{total:05d}.safetensors", edges)
    shard("embedding.safetensors", {"model.embed_tokens.weight": table})
    del table, edges
    for index in range(layers):
        shard(f"model-{index + 2:05d}-of-{total:05d}.safetensors",
              {f"model.layers.{index}.{n}": random(n, s) for n, s in layer_shapes(c).items()})
        print(f"  {folder.name}: layer {index + 1}/{layers} written", file=sys.stderr, flush=True)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu", "bos_token_id": 128000,
              "eos_token_id": 128001, "torch_dtype": "bfloat16", "attention_bias": False, "mlp_bias": False, **c}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the default model's (its ids fit this vocabulary)
        if (tokenizer_from / name).is_file():
            (folder / name).write_bytes((tokenizer_from / name).read_bytes())
    return folder


STAGE = re.compile(r"^\[(\d+)/\d+\] (.*)$")


def run_measured(command: list[str]) -> dict:
    """Wall time, peak RSS and, from llama-export's progress lines, each stage's seconds, the process tree's peak
    total during the stage and what the tree still held when it ended (an export may build in a child while it
    waits, so the tree is sampled, every 0.05 s). The overall peak is the largest of that sampled total and the
    kernel's per-process maximum (the process's own, or its largest child's), which no sampling can miss."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, **UNCACHED})
    tree = TreeSampler(process.pid)
    tree.start()
    stages, current, tail = [], None, []
    for line in process.stdout:
        now = time.perf_counter() - start
        tail = (tail + [line.rstrip()])[-30:]
        match = STAGE.match(line.strip())
        if match or line.startswith("Package written"):
            if current is not None:
                current["seconds"] = now - current["start"]
                current["peak_rss_mb"], current["rss_mb"] = tree.stage_peak_mb(), tree.total_mb()
                stages.append(current)
            current = {"stage": match.group(2), "start": now} if match else None
    _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage
    tree.stop()
    seconds = time.perf_counter() - start
    if current is not None:
        current["seconds"] = seconds - current["start"]
        current["peak_rss_mb"] = tree.stage_peak_mb()
        stages.append(current)
    return {"seconds": seconds, "peak_rss_mb": max(usage.ru_maxrss / 1024, tree.peak_mb), "stages": stages,
            "peak_tree_mb": tree.peak_mb, "returncode": os.waitstatus_to_exitcode(status), "tail": tail}


class TreeSampler(threading.Thread):
    """The largest total VmRSS of a process and its descendants, sampled every 0.05 s: overall and since the last
    stage_peak_mb() call."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_mb, self.since_mark_mb, self.done = pid, 0.0, 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            total = self.total_mb()
            self.peak_mb = max(self.peak_mb, total)
            self.since_mark_mb = max(self.since_mark_mb, total)

    def total_mb(self) -> float:
        return sum(_status_mb(p, "VmRSS") or 0.0 for p in self._tree())

    def stage_peak_mb(self) -> float:
        peak, self.since_mark_mb = max(self.since_mark_mb, self.total_mb()), 0.0
        return peak

    def stop(self) -> None:
        self.done.set()
        self.join()

    def _tree(self) -> list[int]:
        parents = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
        tree, grew = {self.pid}, True
        while grew:
            grew = False
            for pid, parent in parents.items():
                if parent in tree and pid not in tree:
                    tree.add(pid)
                    grew = True
        return sorted(tree)


def _status_mb(pid: int, key: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def commands(run: str, source: Path, work: Path, shape: str) -> list[str]:
    out = work / f"{shape}-{run}"
    cli = [sys.executable, "-m", "llama_export"]
    return {
        "cpu-int4": cli + ["--model", str(source), "--precision", "int4", "--force", "-o", str(out)],
        "cpu-int4-rtn": cli + ["--model", str(source), "--precision", "int4", "--quant", "rtn", "--no-verify",
                               "--force", "-o", str(out)],
        "cpu-int4-b128": cli + ["--model", str(source), "--precision", "int4", "--block-size", "128", "--no-verify",
                                "--force", "-o", str(out)],
        "jetson-int4": cli + ["--model", str(source), "--target", "jetson-orin", "--precision", "int4", "--force",
                              "-o", str(out)],
        "android-int4": cli + ["--model", str(source), "--target", "android-arm64", "--precision", "int4",
                               "--no-verify", "--force", "-o", str(out)],
        "verify": cli + ["verify", str(work / f"{shape}-cpu-int4"), "--reference", str(source)],
        "verify-rtn": cli + ["verify", str(work / f"{shape}-cpu-int4-rtn"), "--reference", str(source)],
        "builder-int4": [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(out),
                         "-p", "int4", "-e", "cpu", "-c", str(work / f"{shape}-builder-cache")],
    }[run]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for checkpoints and packages (reused)")
    parser.add_argument("--shapes", default="1b,8b", help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--runs", default="cpu-int4,cpu-int4-rtn,builder-int4,verify",
                        help="comma-separated: cpu-int4, cpu-int4-rtn, cpu-int4-b128, jetson-int4, android-int4, "
                             "verify, verify-rtn, builder-int4")
    parser.add_argument("--keep", action="store_true",
                        help="keep the packages (default: each is removed once measured)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    add_chart_option(parser, "scale")
    args = parser.parse_args()
    from bench._common import default_model_as_hf_folder

    tokenizer_from = default_model_as_hf_folder(args.work / "default-hf")
    results = []
    for shape in args.shapes.split(","):
        source = write_checkpoint(args.work / f"ckpt-{shape}", shape, tokenizer_from)
        for run in args.runs.split(","):
            print(f"== {shape} {run}", file=sys.stderr, flush=True)
            row = {"shape": shape, "run": run, **run_measured(commands(run, source, args.work, shape))}
            results.append(row)
            status = "ok" if row["returncode"] == 0 else f"FAILED ({row['tail'][-1] if row['tail'] else ''})"
            print(f"{shape:<6} {run:<13} {row['seconds']:>8.1f} s {row['peak_rss_mb']:>8.0f} MB  {status}", flush=True)
            for stage in row["stages"]:
                peak = f"{stage['peak_rss_mb']:.0f} MB" if stage.get("peak_rss_mb") else "-"
                held = f"{stage['rss_mb']:.0f} MB" if stage.get("rss_mb") else "-"
                print(f"         {stage['seconds']:>8.1f} s  peak {peak:>9}  held at the end {held:>9}  "
                      f"{stage['stage']}", flush=True)
            if args.json:
                args.json.write_text(json.dumps(results, indent=2))
        if not args.keep:
            import shutil

            for run in args.runs.split(","):
                if not run.startswith("verify"):
                    shutil.rmtree(args.work / f"{shape}-{run}", ignore_errors=True)
    report_table("random-weight checkpoints of real shapes: seconds and peak memory per run",
                 ["run", "seconds", "peak RSS MB"],
                 [[f"{row['shape']} {row['run']}" + ("" if row["returncode"] == 0 else " (failed)"),
                   f"{row['seconds']:.1f}", f"{row['peak_rss_mb']:.0f}"] for row in results], args.chart)


if __name__ == "__main__":
    main()
