"""Export cost of the default model, llama-export against onnxruntime-genai's model builder, in one run.

    python bench/export_memory.py [--work DIR]

Both export the same fp32 weights (the default GGUF dequantized into a Hugging Face folder) for CPU. Reports wall
time, peak resident memory and package size. Not a test: the numbers depend on the machine."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import default_model_as_hf_folder, run_measured  # noqa: E402


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="llama-export-bench-"))
    hf = default_model_as_hf_folder(work / "hf")
    rows = {}
    for name, command in {
        "llama-export (GGUF source)": [sys.executable, "-m", "llama_export", "--no-verify", "-q", "--force",
                                        "-o", str(work / "ours-gguf")],
        "llama-export (HF folder)": [sys.executable, "-m", "llama_export", "--model", str(hf), "--no-verify", "-q",
                                      "--force", "-o", str(work / "ours-hf")],
        "onnxruntime-genai builder": [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf),
                                      "-o", str(work / "genai"), "-p", "fp32", "-e", "cpu",
                                      "-c", str(work / "genai-cache")],
    }.items():
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows[name] = run_measured(command)
    rows["llama-export (GGUF source)"]["mb"] = folder_mb(work / "ours-gguf")
    rows["llama-export (HF folder)"]["mb"] = folder_mb(work / "ours-hf")
    rows["onnxruntime-genai builder"]["mb"] = folder_mb(work / "genai")
    print(f"{'exporter':<28} {'seconds':>8} {'peak RSS MB':>12} {'package MB':>11}")
    for name, row in rows.items():
        print(f"{name:<28} {row['seconds']:>8.1f} {row['peak_rss_mb']:>12.0f} {row['mb']:>11.0f}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
