"""A TensorRT package's engine opened for generation: the same interface as OnnxPackage (`forward`,
`empty_cache`), so the generation loop and `llama-export run` work over either.

The KV cache stays on the GPU between steps (PyTorch CUDA tensors hold every device buffer); only the logits come
back to the host. A step picks the engine's optimization profile whose ranges hold its shapes (decode or
prefill); a prompt longer than the prefill profile is fed in chunks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from llama_export.runtimes.onnx_package import PackageError, PackageLayout

ENGINE_FILE = "model.engine"


def tensorrt_unavailable() -> str | None:
    """None when an engine can run here, else why not."""
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package is not installed"
    import torch

    return None if torch.cuda.is_available() else "no CUDA GPU"


def has_engine(folder: str | Path) -> bool:
    return (Path(folder) / ENGINE_FILE).is_file()


class TensorRTPackage(PackageLayout):
    def __init__(self, folder: str | Path):
        super().__init__(folder)
        missing = tensorrt_unavailable()
        if missing:
            raise PackageError(f"cannot run {self.folder / ENGINE_FILE}: {missing}")
        import tensorrt as trt
        import torch

        self.torch, self.trt = torch, trt
        path = self.folder / ENGINE_FILE
        if not path.is_file():
            raise PackageError(f"{self.folder}: no {ENGINE_FILE} (build it with build_engine.py on this device)")
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise PackageError(f"{path}: does not load with TensorRT {trt.__version__} on this GPU (rebuild it here)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.profiles = json.loads((self.folder / "profiles.json").read_text())["profiles"]
        self.prefill_chunk = max(p["shapes"]["input_ids"][2][1] for p in self.profiles)
        self.input_names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)
                            if self.engine.get_tensor_mode(self.engine.get_tensor_name(i)) == trt.TensorIOMode.INPUT}
        self.kv_dtype = self._torch_dtype(self.past_names[0][0])
        self.active_profile = None

    def _torch_dtype(self, name: str):
        numpy_type = self.trt.nptype(self.engine.get_tensor_dtype(name))
        return self.torch.from_numpy(np.zeros(0, dtype=numpy_type)).dtype

    def empty_cache(self, batch: int = 1) -> list:
        shape = (batch, self.kv_heads, 0, self.head_size)
        return [self.torch.empty(shape, dtype=self.kv_dtype, device="cuda") for _ in range(2 * self.num_layers)]

    def _select_profile(self, shapes: dict) -> None:
        for index, profile in enumerate(self.profiles):
            ranges = profile["shapes"]
            if all(all(lo <= d <= hi for lo, d, hi in zip(ranges[n][0], shape, ranges[n][2]))
                   for n, shape in shapes.items() if n in ranges):
                if index != self.active_profile:
                    self.context.set_optimization_profile_async(index, self.stream.cuda_stream)
                    self.active_profile = index
                return
        raise PackageError(f"no optimization profile of the engine covers {shapes} (context too long?)")

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                past: list) -> tuple[np.ndarray, list]:
        if input_ids.shape[1] > self.prefill_chunk:  # longer than a profile holds: feed it in chunks
            logits = []
            start = attention_mask.shape[1] - input_ids.shape[1]
            for begin in range(0, input_ids.shape[1], self.prefill_chunk):
                end = min(begin + self.prefill_chunk, input_ids.shape[1])
                chunk_logits, past = self.forward(input_ids[:, begin:end], attention_mask[:, :start + end],
                                                  position_ids[:, begin:end], past)
                logits.append(chunk_logits)
            return np.concatenate(logits, axis=1), past
        torch = self.torch
        feed = {"input_ids": torch.from_numpy(input_ids).cuda(),
                "attention_mask": torch.from_numpy(attention_mask).cuda()}
        if "position_ids" in self.input_names:
            feed["position_ids"] = torch.from_numpy(position_ids).cuda()
        for (key_name, value_name), i in zip(self.past_names, range(0, len(past), 2)):
            feed[key_name], feed[value_name] = past[i].contiguous(), past[i + 1].contiguous()
        self._select_profile({name: list(t.shape) for name, t in feed.items()})
        for name, tensor in feed.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in ["logits"] + [n for pair in self.present_names for n in pair]:
            outputs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._torch_dtype(name),
                                        device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise PackageError("TensorRT failed to run a step")
        self.stream.synchronize()
        present = [outputs[n] for pair in self.present_names for n in pair]
        return outputs["logits"].float().cpu().numpy(), present
