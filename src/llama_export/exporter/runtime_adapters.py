"""LoRA adapters chosen at run time (`--runtime-lora`): the package keeps the base weights, the layers the adapters
adapt take two extra inputs each (passes/lora_inputs.py), and each adapter is written as an `.onnx_adapter` file
(ONNX Runtime's adapter format) holding those inputs' values, which onnxruntime-genai's og.Adapters binds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llama_export.exporter.errors import UserError
from llama_export.exporter.sources.base import Checkpoint
from llama_export.exporter.sources.lora import adapter_deltas
from llama_export.passes.lora_inputs import AdaptedWeight, AddLoraInputs

FOLDER = "adapters"


def adapter_names(folders) -> dict[str, Path]:
    """Each adapter's name in the package (its folder's name), refused when two share one."""
    names: dict[str, Path] = {}
    for folder in folders:
        folder = Path(folder)
        if folder.name in names:
            raise UserError(f"--runtime-lora {folder}: another adapter is also named '{folder.name}'; rename a folder")
        names[folder.name] = folder
    return names


def lora_inputs_pass(checkpoint: Checkpoint, folders) -> AddLoraInputs:
    """The pass that gives every layer some adapter adapts its inputs (each adapter's shapes checked here)."""
    adapted: set[str] = set()
    for folder in adapter_names(folders).values():
        _, deltas = adapter_deltas(folder, 1.0, checkpoint)
        for parameter, delta in deltas.items():
            if delta.embedding or delta.base_rows is not None:
                raise UserError(f"--runtime-lora {folder}: it adapts '{parameter}' (an embedding, or a layer PEFT "
                                "saved whole), which only a merge can take: pass it with --lora instead")
        adapted |= set(deltas)
    return AddLoraInputs(lambda sources: any(source in adapted for source in sources))


def write_adapter_files(checkpoint: Checkpoint, folders, weights: list[AdaptedWeight], dest: Path) -> list[dict]:
    """One `.onnx_adapter` per adapter in dest/adapters/: for each adapted weight, A [in, rank] holding the A of
    every checkpoint tensor it stacks side by side, and B [rank, out] block-diagonal (each tensor's B, scaled,
    under its own columns); a tensor the adapter leaves alone takes rank 0."""
    import onnxruntime as ort

    (dest / FOLDER).mkdir()
    written = []
    for name, folder in adapter_names(folders).items():
        _, deltas = adapter_deltas(folder, 1.0, checkpoint)
        parameters = {}
        for weight in weights:
            a_parts, b_parts, column = [], [], 0
            for source in weight.sources:
                width = checkpoint.weight(source).shape[0]
                delta = deltas.get(source)
                if delta is not None:
                    a, b = delta.load_a(), delta.load_b() * delta.scale
                    block = np.zeros((a.shape[0], weight.columns), dtype=np.float32)
                    block[:, column:column + width] = b.T
                    a_parts.append(a.T)
                    b_parts.append(block)
                column += width
            if column != weight.columns:
                raise RuntimeError(f"{weight.weight}: its sources' rows add up to {column}, not {weight.columns}")
            a = np.concatenate(a_parts, axis=1) if a_parts else np.zeros((weight.rows, 0), np.float32)
            b = np.concatenate(b_parts, axis=0) if b_parts else np.zeros((0, weight.columns), np.float32)
            parameters[weight.a_input] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a, np.float32))
            parameters[weight.b_input] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(b, np.float32))
        adapter = ort.AdapterFormat()
        adapter.set_parameters(parameters)
        path = dest / FOLDER / f"{name}.onnx_adapter"
        adapter.export_adapter(str(path))
        written.append({"name": name, "file": f"{FOLDER}/{path.name}", "path": str(folder.resolve())})
    return written
