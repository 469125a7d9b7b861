"""GGUF K-quant files of the default model made by llama.cpp's own tools, exported by llama-export with
`--precision int4` and otherwise its defaults: is every weight the file's (each MatMulNBits and GatherBlockQuantized
tensor dequantized from the package and compared bit for bit with gguf's dequantization of the file), what do the
package and the file weigh, and how does the package's perplexity compare with transformers' (fp32, the file's
dequantized weights) and with llama.cpp's own on the same text.

    python bench/kquant.py --llama-cpp DIR [--work DIR] [--types Q4_K_M,Q5_K_M,Q6_K]

DIR is a llama.cpp source tree (llama-cpp-python's sdist holds one in vendor/llama.cpp) with llama-quantize and
llama-perplexity built under build/bin (cmake -B build && cmake --build build --target llama-quantize
llama-perplexity). The default model's weights (its GGUF dequantized into a Hugging Face folder) are converted to
an f32 GGUF with the tree's convert_hf_to_gguf.py, then quantized to each type."""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import UNCACHED, add_chart_option, default_model_as_hf_folder, report_table  # noqa: E402

HELDOUT = Path(__file__).resolve().parent.parent / "src" / "llama_export" / "exporter" / "data" / "heldout.txt"


def make_files(llama_cpp: Path, work: Path, types: list[str]) -> dict[str, Path]:
    hf = default_model_as_hf_folder(work / "hf")
    f32 = work / "default-f32.gguf"
    if not f32.is_file():
        env = {**os.environ, "PYTHONPATH": str(llama_cpp / "gguf-py")}
        subprocess.run([sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(hf), "--outtype", "f32",
                        "--outfile", str(f32)], check=True, env=env, capture_output=True)
    files = {}
    for kind in types:
        path = work / f"default-{kind}.gguf"
        if not path.is_file():
            subprocess.run([str(llama_cpp / "build" / "bin" / "llama-quantize"), str(f32), str(path), kind],
                           check=True, capture_output=True)
        files[kind] = path
    return files


def file_values(path: Path) -> tuple[dict[str, np.ndarray], collections.Counter]:
    """Each tensor as gguf's dequantizer gives it (Hugging Face names and row order), and the formats' counts."""
    import gguf

    from llama_export.exporter.sources import open_checkpoint
    from llama_export.exporter.sources.base import unpermute_rows
    from llama_export.families.llama import LLAMA

    config = open_checkpoint(path).config
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    values, formats = {}, collections.Counter()
    for tensor in gguf.GGUFReader(path).tensors:
        name = LLAMA.hf_name(tensor.name)
        formats[tensor.tensor_type.name] += 1
        if name is None or len(tensor.shape) != 2:
            continue
        array = gguf.dequantize(tensor.data, tensor.tensor_type).reshape(
            tuple(reversed([int(d) for d in tensor.shape]))).astype(np.float32)
        for part, n_heads in heads.items():
            if part in name:
                array = unpermute_rows(array, n_heads)
        values[name] = array
    if "lm_head.weight" not in values:  # tied: the lm_head is the embedding table
        values["lm_head.weight"] = values["model.embed_tokens.weight"]
    return values, formats


def package_check(package: Path, expected: dict[str, np.ndarray]) -> dict:
    """How many of the package's block-quantized weights equal the file's bit for bit, and which do not."""
    import onnx_ir as ir

    from llama_export.exporter.package_weights import (
        checkpoint_names,
        matmulnbits_weights,
        same_bits,
        stored,
        stored_by_name,
    )
    from llama_export.passes.block_quantized import BlockQuantized, unpack_codes

    model = ir.load(package / "model.onnx")
    equal, differ = [], []
    for name, blocks in matmulnbits_weights(model):
        reference = np.concatenate([expected[p] for p in checkpoint_names(name)])
        (equal if same_bits(blocks.dequantize(), reference) else differ).append(name)
    for node in (n for n in model.graph if n.op_type == "GatherBlockQuantized"):
        data, scales = node.inputs[0], stored(node.inputs[2]).astype(np.float32)
        if data.const_value is None:  # the lm_head's blocks through a Reshape: checked as the lm_head
            continue
        bits, block = node.attributes.get_int("bits"), node.attributes.get_int("block_size")
        codes = unpack_codes(data.const_value.numpy(), bits)
        minimums = stored_by_name(model, data.name.removesuffix(".qdata") + ".minimums")
        zero_points = node.inputs[3].const_value.numpy() if len(node.inputs) > 3 and node.inputs[3] else None
        if minimums is not None:  # zero points 0, the minimum looked up and added after
            table = BlockQuantized(codes, scales, None, bits, block, minimums=minimums.astype(np.float32))
        else:
            table = BlockQuantized(codes, scales, None if zero_points is None else
                                   unpack_codes(zero_points, bits)[:, :scales.shape[1]], bits, block)
        (equal if same_bits(table.dequantize(), expected["model.embed_tokens.weight"]) else differ).append(
            data.name)
    return {"equal": len(equal), "differ": differ}


def perplexity(target: Path) -> float:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, "-m", "llama_export", "eval", str(target), "--text", str(HELDOUT),
                        "--json", out.name], check=True, capture_output=True)
        return json.loads(Path(out.name).read_text())["perplexity"]


def llama_cpp_perplexity(llama_cpp: Path, path: Path) -> float | None:
    """llama.cpp's own figure on the same text (its tokenization and 512-token windows, so it is only indicative)."""
    result = subprocess.run([str(llama_cpp / "build" / "bin" / "llama-perplexity"), "-m", str(path), "-f",
                             str(HELDOUT), "-c", "256", "-b", "256", "-t", str(os.cpu_count())],
                            capture_output=True, text=True)
    match = re.search(r"Final estimate: PPL = ([0-9.]+)", result.stdout + result.stderr)
    return float(match.group(1)) if match else None


def size_mb(path: Path) -> float:
    files = path.rglob("*") if path.is_dir() else [path]
    return sum(f.stat().st_size for f in files if f.is_file()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source tree with build/bin tools")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "llama-export-kquant")
    parser.add_argument("--types", default="Q4_K_M,Q5_K_M,Q6_K", help="llama-quantize types, comma-separated")
    add_chart_option(parser, "kquant")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    files = make_files(args.llama_cpp, args.work, args.types.split(","))
    rows = []
    for kind, path in files.items():
        package = args.work / f"pkg-{kind}"
        started = time.perf_counter()
        export = subprocess.run([sys.executable, "-m", "llama_export", "--model", str(path), "--precision", "int4",
                                 "-o", str(package), "--force", "-q"], capture_output=True, text=True,
                                env={**os.environ, **UNCACHED})
        seconds = time.perf_counter() - started
        if export.returncode:
            print(f"{kind}: export failed: {export.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        expected, formats = file_values(path)
        check = package_check(package, expected)
        parity = json.loads((package / "manifest.json").read_text())["parity"]
        row = {"type": kind, "formats": dict(formats), "export_seconds": round(seconds, 1),
               "file_mb": round(size_mb(path), 1), "package_mb": round(size_mb(package), 1),
               "weights_equal": check["equal"], "weights_differ": check["differ"],
               "verify_top1": parity.get("top1_agreement"), "package_ppl": perplexity(package),
               "transformers_ppl": perplexity(path), "llama_cpp_ppl": llama_cpp_perplexity(args.llama_cpp, path)}
        row["ppl_vs_transformers"] = row["package_ppl"] / row["transformers_ppl"] - 1
        rows.append(row)
        print(json.dumps(row), flush=True)
    (args.work / "kquant.json").write_text(json.dumps(rows, indent=2))
    report_table("GGUF K-quant files carried into cpu packages", ["type", "file MB", "package MB", "weights equal",
                                                                    "package ppl", "transformers", "diff", "llama.cpp"],
                 [[r["type"], f"{r['file_mb']:.1f}", f"{r['package_mb']:.1f}",
                   f"{r['weights_equal']}/{r['weights_equal'] + len(r['weights_differ'])}", f"{r['package_ppl']:.3f}",
                   f"{r['transformers_ppl']:.3f}", f"{r['ppl_vs_transformers']:+.2%}",
                   f"{r['llama_cpp_ppl']:.3f}" if r["llama_cpp_ppl"] else "-"] for r in rows], args.chart)


if __name__ == "__main__":
    main()
