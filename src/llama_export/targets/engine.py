"""What a TensorRT package carries besides its ONNX graph: optimization profiles, the engine build scripts,
reference outputs and the script that checks a device-built engine against them. Where TensorRT and a CUDA GPU
are present, the engine itself is built here."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np

from llama_export.targets.plan import DEFAULT_PREFILL, WORKSPACE_BYTES

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT, SHELL_SCRIPT, CHECK_SCRIPT = "build_engine.py", "build_engine.sh", "check_engine.py"
PROFILES, REFERENCE, REFERENCE_SPEC = "profiles.json", "reference.npz", "reference.json"
REFERENCE_IDS = (1, 7, 3, 12, 5, 30, 9, 4)  # fixed prompt ids for the reference outputs (any vocabulary of 31+)


def _dim_ranges(context: int, batch: int, prefill: int) -> dict[str, list[tuple[int, int, int]]]:
    """min/opt/max of each symbolic dim, for the decode and the prefill profile."""
    return {
        "decode": {"batch": (1, 1, batch), "sequence": (1, 1, 1), "past_sequence": (0, context // 2, context - 1),
                   "total_sequence": (1, context // 2 + 1, context)},
        "prefill": {"batch": (1, 1, batch), "sequence": (1, prefill, prefill),
                    "past_sequence": (0, 0, context - 1), "total_sequence": (1, prefill, context)},
    }


def shape_profiles(io: dict, context: int, batch: int = 1, prefill: int = DEFAULT_PREFILL) -> list[dict]:
    """One optimization profile for decode (one new token, long past) and one for prefill (a prompt chunk), with
    min/opt/max shapes for every dynamic input of the graph."""
    prefill = min(prefill, context)
    profiles = []
    for name, ranges in _dim_ranges(context, batch, prefill).items():
        shapes = {}
        for input_name, spec in io["inputs"].items():
            dims = spec["shape"]
            if all(isinstance(d, int) for d in dims):
                continue
            unknown = [d for d in dims if not isinstance(d, int) and d not in ranges]
            if unknown:
                raise ValueError(f"input {input_name} has a dimension no profile covers: {unknown}")
            shapes[input_name] = [[d if isinstance(d, int) else ranges[d][i] for d in dims] for i in range(3)]
        profiles.append({"name": name, "shapes": shapes})
    return profiles


def _trtexec_shapes(profiles: list[dict], which: int) -> str:
    """trtexec's name:AxBxC list. One profile for trtexec: decode's min and opt, the larger max of the two."""
    names = profiles[0]["shapes"].keys()
    parts = []
    for name in names:
        if which < 2:
            dims = profiles[0]["shapes"][name][which]
        else:
            dims = [max(a, b) for a, b in zip(profiles[0]["shapes"][name][2], profiles[1]["shapes"][name][2])]
        parts.append(f"{name}:{'x'.join(str(d) for d in dims)}")
    return ",".join(parts)


def _shell_script(profiles: list[dict], workspace_mb: int, requirement: str) -> str:
    return "\n".join([
        "#!/bin/sh",
        f"# Build model.engine with trtexec on the device this package is for ({requirement}).",
        "# One optimization profile here (decode's min/opt, prefill's max); build_engine.py builds two.",
        "set -e",
        'cd "$(dirname "$0")"',
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"',
        '"$TRTEXEC" --onnx=model.onnx --saveEngine=model.engine --stronglyTyped \\',
        f"  --memPoolSize=workspace:{workspace_mb} \\",
        f"  '--minShapes={_trtexec_shapes(profiles, 0)}' \\",
        f"  '--optShapes={_trtexec_shapes(profiles, 1)}' \\",
        f"  '--maxShapes={_trtexec_shapes(profiles, 2)}' \\",
        '  "$@"',
        "",
    ])


def write_build_material(folder: Path, io: dict, context: int, requirement: str, batch: int = 1,
                         prefill: int = DEFAULT_PREFILL) -> dict:
    """profiles.json, build_engine.py/.sh and check_engine.py; returns the profile spec."""
    workspace_mb = WORKSPACE_BYTES >> 20
    profiles = shape_profiles(io, context, batch, prefill)
    spec = {"onnx": "model.onnx", "workspace_mb": workspace_mb, "context": context, "max_batch": batch,
            "prefill_chunk": min(prefill, context), "requires": requirement, "profiles": profiles}
    (folder / PROFILES).write_text(json.dumps(spec, indent=2) + "\n")
    shutil.copyfile(HERE / "engine_build.py", folder / BUILD_SCRIPT)
    shutil.copyfile(HERE / "engine_check.py", folder / CHECK_SCRIPT)
    script = folder / SHELL_SCRIPT
    script.write_text(_shell_script(profiles, workspace_mb, requirement))
    script.chmod(0o755)
    return spec


def reference_ids(vocab_size: int) -> list[int]:
    return [i % vocab_size for i in REFERENCE_IDS]


def write_reference(folder: Path, arrays: dict[str, np.ndarray], inputs: list[str], runtime: str) -> dict:
    """Saves the reference steps (runtimes/reference_steps.py) for check_engine.py; returns a summary for the
    manifest."""
    np.savez_compressed(folder / REFERENCE, **arrays)
    steps = list(dict.fromkeys(key.split("/")[0] for key in arrays))
    summary = {"steps": steps, "inputs": inputs, "runtime": runtime}
    (folder / REFERENCE_SPEC).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def tensorrt_available() -> str | None:
    """None when TensorRT and a CUDA GPU are both here, else why not."""
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package is not installed"
    import torch

    return None if torch.cuda.is_available() else "no CUDA GPU"


def build_engine_here(folder: Path, log) -> dict:
    from llama_export.targets.engine_build import build_engine

    return build_engine(folder, log=log)
