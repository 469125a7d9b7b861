"""Helpers shared by the benchmarks: the default model as a Hugging Face folder, a package run with another's session
options, and child-process peak RSS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def default_model_as_hf_folder(folder: Path) -> Path:
    """Write the default GGUF's (dequantized) weights as an fp32 safetensors folder the reference tools read."""
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from safetensors.torch import save_file

    from llama_export.exporter.default_model import default_model_path
    from llama_export.exporter.sources import open_checkpoint

    checkpoint = open_checkpoint(default_model_path())
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: torch.from_numpy(info.load().copy()) for name, info in checkpoint.weights.items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = checkpoint.config.to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    config["torch_dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    checkpoint.write_tokenizer(folder)
    return folder


def with_session_options(package: Path, options_from: Path, folder: Path) -> Path:
    """`package`'s files (linked, not copied) with the genai session options of `options_from`: one tool's graph
    under the other's settings, so a comparison can tell the graph from the settings."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in package.iterdir():
        if path.name != "genai_config.json" and not (folder / path.name).exists():
            (folder / path.name).symlink_to(path.resolve())
    config = json.loads((package / "genai_config.json").read_text())
    source = json.loads((options_from / "genai_config.json").read_text())
    config["model"]["decoder"]["session_options"] = source["model"]["decoder"]["session_options"]
    (folder / "genai_config.json").write_text(json.dumps(config, indent=4))
    return folder


# Every measured export traces, as a first export does, rather than take a graph traced by an earlier run.
UNCACHED = {"LLAMA_EXPORT_TRACE_CACHE": "off"}


def run_measured(command: list[str], env: dict | None = None) -> dict:
    """Wall time and peak resident memory of a child process (run alone, so RUSAGE_CHILDREN is its own)."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c",
         "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
         "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
         "sys.exit(r.returncode)", *command],
        capture_output=True, text=True, env={**os.environ, **UNCACHED, **(env or {})},
    )
    seconds = time.perf_counter() - start
    peak = next((int(line.split()[1]) for line in result.stderr.splitlines() if line.startswith("PEAK_RSS_KB")), 0)
    if result.returncode != 0:
        raise SystemExit(f"{command[0]} failed:\n{result.stderr[-2000:]}")
    return {"seconds": seconds, "peak_rss_mb": peak / 1024}


def add_chart_option(parser, name: str) -> None:
    parser.add_argument("--chart", type=Path, default=Path(f"{name}.png"), metavar="FILE.png",
                        help=f"where the comparison table is drawn as a bar chart (default: ./{name}.png)")


def report_table(title: str, header: list[str], rows: list[list], chart: Path | None) -> None:
    """The comparison table as aligned text on stdout (first column left, the rest right), and as a PNG chart with
    one panel of bars per numeric column at `chart`."""
    from llama_export.exporter.plots import plot_table

    cells = [[str(c) for c in row] for row in rows]
    if not cells:
        print(f"\n{title}: nothing measured")
        return
    widths = [max(len(str(h)), *(len(row[i]) for row in cells)) for i, h in enumerate(header)]

    def line(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    print(f"\n{title}")
    print(line([str(h) for h in header]))
    for row in cells:
        print(line(row))
    if chart is not None:
        plot_table(title, header, cells, chart)
        print(f"chart: {chart}", file=sys.stderr)
