"""Check a TensorRT engine built on the device against reference outputs computed when the package was made.

Copied into TensorRT packages as check_engine.py; imports nothing from llama-export. reference.npz holds two
steps on fixed token ids, computed by ONNX Runtime (CPU) on the package's ONNX graph: a prefill, then one decode
step fed the prefill's KV cache. The engine runs the same inputs; logits must agree (top-1 and magnitude).

    python3 check_engine.py [PACKAGE_DIR] [--engine FILE]

Needs tensorrt, numpy and PyTorch with CUDA (for device buffers)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

MIN_TOP1 = 0.9  # fp16 kernels may flip near-ties; a wrong graph or profile agrees on almost nothing
MAX_DIFF_FRACTION = 0.05  # of the reference logits' range


def profile_for(profiles: list[dict], shapes: dict) -> int:
    """Index of the first optimization profile whose ranges hold every input shape."""
    for index, profile in enumerate(profiles):
        if all(all(lo <= d <= hi for lo, d, hi in zip(profile["shapes"][name][0], shape, profile["shapes"][name][2]))
               for name, shape in shapes.items() if name in profile["shapes"]):
            return index
    raise ValueError(f"no optimization profile covers the shapes {shapes}")


def run_engine(engine, profiles: list[dict], inputs: dict, output_names: list[str]) -> dict:
    import tensorrt as trt
    import torch

    context = engine.create_execution_context()
    stream = torch.cuda.Stream()
    profile = profile_for(profiles, {name: list(array.shape) for name, array in inputs.items()})
    context.set_optimization_profile_async(profile, stream.cuda_stream)
    keep = {}
    for name, array in inputs.items():
        tensor = torch.from_numpy(np.ascontiguousarray(array)).cuda()
        keep[name] = tensor
        context.set_input_shape(name, tuple(array.shape))
        context.set_tensor_address(name, tensor.data_ptr())
    outputs = {}
    for name in output_names:
        shape = tuple(context.get_tensor_shape(name))
        dtype = torch.from_numpy(np.zeros(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype
        outputs[name] = torch.empty(shape, dtype=dtype, device="cuda")
        context.set_tensor_address(name, outputs[name].data_ptr())
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError("TensorRT refused to run the engine on the reference inputs")
    stream.synchronize()
    return {name: tensor.cpu().numpy() for name, tensor in outputs.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Compare the built engine with the package's reference outputs.")
    parser.add_argument("package", nargs="?", default=str(Path(__file__).resolve().parent))
    parser.add_argument("--engine", help="engine file (default: PACKAGE/model.engine)")
    args = parser.parse_args(argv)
    folder = Path(args.package)
    engine_path = Path(args.engine) if args.engine else folder / "model.engine"
    if not engine_path.is_file():
        print(f"error: no engine at {engine_path}: run build_engine.py (or build_engine.sh) first", file=sys.stderr)
        return 2
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        print(f"error: {engine_path} does not load with TensorRT {trt.__version__} on this GPU", file=sys.stderr)
        return 1
    reference = np.load(folder / "reference.npz")
    spec = json.loads((folder / "reference.json").read_text())
    profiles = json.loads((folder / "profiles.json").read_text())["profiles"]
    passed = True
    for step in spec["steps"]:
        inputs = {name: reference[f"{step}/in/{name}"] for name in spec["inputs"]}
        got = run_engine(engine, profiles, inputs, ["logits"])["logits"].astype(np.float32)
        want = reference[f"{step}/out/logits"]
        top1 = float(np.mean(got.argmax(-1) == want.argmax(-1)))
        diff = float(np.max(np.abs(got - want)))
        limit = MAX_DIFF_FRACTION * float(want.max() - want.min())
        ok = top1 >= MIN_TOP1 and diff <= limit
        passed &= ok
        print(f"{step}: top-1 agreement {top1:.3f}, max |logit diff| {diff:.3f} (limit {limit:.3f}): "
              f"{'ok' if ok else 'MISMATCH'}")
    print("PASSED" if passed else "FAILED")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
