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
from bench._common import add_chart_option, default_model_as_hf_folder, report_table, run_measured  # noqa: E402


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    add_chart_option(parser, "export_memory")
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
    report_table("export of the default model, fp32 cpu", ["exporter", "seconds", "peak RSS MB", "package MB"],
                 [[name, f"{row['seconds']:.1f}", f"{row['peak_rss_mb']:.0f}", f"{row['mb']:.0f}"]
                  for name, row in rows.items()], args.chart)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
