"""Build a TensorRT engine from a llama-export package, with TensorRT's Python API.

Copied into TensorRT packages as build_engine.py, so it imports nothing from llama-export: run it on the device
(Jetson engines are tied to the TensorRT version and GPU they are built with):

    python3 build_engine.py [PACKAGE_DIR] [--workspace-mb N] [--output FILE]

It reads profiles.json (the ONNX file, the optimization profiles for decode and prefill, the workspace cap),
builds a strongly typed network (the types in the ONNX file are what runs), and writes model.engine plus
engine.json (TensorRT version, GPU, compute capability)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path


def gpu_description() -> dict:
    """Name and compute capability of GPU 0, from PyTorch or nvidia-smi; empty if neither can tell."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    except ImportError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.splitlines()[0]
        name, capability = (part.strip() for part in out.rsplit(",", 1))
        return {"gpu": name, "compute_capability": capability}
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return {}


def build_engine(folder, output=None, workspace_mb: int | None = None, log=print) -> dict:
    import tensorrt as trt

    folder = Path(folder)
    spec = json.loads((folder / "profiles.json").read_text())
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    log(f"parsing {spec['onnx']}")
    if not parser.parse_from_file(str(folder / spec["onnx"])):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT {trt.__version__} cannot parse {spec['onnx']}: {errors}")
    config = builder.create_builder_config()
    workspace = workspace_mb or spec["workspace_mb"]
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace << 20)
    for profile_spec in spec["profiles"]:
        profile = builder.create_optimization_profile()
        for name, (low, best, high) in profile_spec["shapes"].items():
            profile.set_shape(name, low, best, high)
        config.add_optimization_profile(profile)
    log(f"building ({len(spec['profiles'])} optimization profiles, workspace {workspace} MiB); this takes minutes")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT could not build the engine (see its log above)")
    path = Path(output) if output else folder / "model.engine"
    path.write_bytes(serialized)
    info = {"file": path.name, "tensorrt_version": trt.__version__, "profiles": [p["name"] for p in spec["profiles"]],
            "workspace_mb": workspace, **gpu_description()}
    (path.parent / "engine.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB)")
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Build model.engine for this package on this GPU.")
    parser.add_argument("package", nargs="?", default=str(Path(__file__).resolve().parent),
                        help="package folder (default: the folder this script is in)")
    parser.add_argument("--output", help="engine file to write (default: PACKAGE/model.engine)")
    parser.add_argument("--workspace-mb", type=int, help="builder workspace cap in MiB (default: profiles.json's)")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("tensorrt") is None:
        print("error: the tensorrt Python package is not installed (JetPack ships it as python3-libnvinfer)",
              file=sys.stderr)
        return 2
    try:
        build_engine(args.package, args.output, args.workspace_mb)
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
