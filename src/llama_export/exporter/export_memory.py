"""How much memory an export needs on this machine, from the config and the method alone, and how much is free.

Weights stream one tensor at a time and calibration one decoder layer at a time, so the peak is the largest of:
- a layer being calibrated and quantized: its float32 weights, its input statistics (X^T X, one K x K matrix per
  distinct input), the calibration text's hidden states (going in, coming out in pieces, and the pieces joined),
  and GPTQ's working copies of its largest matrix;
- a float table (embedding or lm_head) read whole and converted, where it stays float (fp32, fp16, TensorRT
  targets) and the source cannot read its rows alone; otherwise tables are read and written in row chunks;
- verify: ONNX Runtime holding the whole package as the copies it packs (the mapped file's pages are handed back:
  runtimes/mapped_pages.py); the reference after it needs one layer;
plus the interpreter and libraries."""

from __future__ import annotations

import contextlib
import ctypes
import gc
from dataclasses import dataclass
from pathlib import Path

GIB = 1 << 30
BASE_BYTES = int(1.2 * GIB)  # Python, PyTorch, ONNX Runtime and the traced graph
GPTQ_COPIES = 4  # the float32 matrix, its transposed working copy, the codes, their unpermuted copy
TABLE_COPIES = 3  # a table read as bf16, converted to float32, and transformed once
ORT_PACKAGE_FACTOR = 1.1  # ONNX Runtime's packed copies over the package size (mapped pages handed back)


@dataclass(frozen=True)
class ExportMemory:
    layer: int  # calibrating and quantizing one decoder layer
    table: int  # the largest single tensor
    verify: int  # the package loaded in ONNX Runtime

    @property
    def peak(self) -> int:
        return BASE_BYTES + max(self.layer, self.table, self.verify)


INT4_BYTES = 0.6  # a weight quantized here: 4-bit codes, a scale and zero point per block, packed by the session


def carried_bytes_per_weight(checkpoint) -> float | None:
    """The mean bytes a weight of a source's own blocks takes in the package (a GGUF's Q5_0/Q6_K/Q8_0 codes are
    8-bit, and each block has a float32 scale, and a minimum where it has one), or None where none are carried."""
    weights = total = 0.0
    for info in checkpoint.weights.values():
        if info.quantized_bits is None or len(info.shape) != 2:
            continue
        count = info.shape[0] * info.shape[1]
        per_block = 4 * (2 if info.quantized_minimums else 1)
        weights += count
        total += count * (info.quantized_bits / 8 + per_block / info.quantized_block_size)
    return total / weights if weights else None


def estimate(config, precision: str, calibrated: bool, verify: bool, float_tables: bool,
             int4_bytes: float = INT4_BYTES, calibration_tokens: int | None = None,
             eight_bit_choice: bool = False) -> ExportMemory:
    """calibration_tokens: None for the default (exporter.calibrate.CALIBRATION_TOKENS); eight_bit_choice: the
    sensitivity pass of --eight-bit-share runs first (exporter/sensitivity.py)."""
    from llama_export.families import FAMILIES
    from llama_export.targets.plan import ModelShape

    hidden, inter = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    shape = ModelShape.from_config(config)
    family = FAMILIES[shape.family]
    layer_weights = family.largest_layer_weights(shape)  # one layer is held at a time
    largest_matrix = family.largest_matrix(shape)
    layer = 4 * GPTQ_COPIES * largest_matrix
    if calibrated:
        statistics = 4 * (2 * hidden * hidden + (heads * head_dim) ** 2 + inter * inter)
        if calibration_tokens is None:
            from llama_export.exporter import calibrate

            calibration_tokens = calibrate.CALIBRATION_TOKENS
        hidden_states = 3 * 4 * calibration_tokens * hidden
        layer += 4 * layer_weights + statistics + hidden_states
    if eight_bit_choice:
        from llama_export.exporter.calibrate import WINDOW
        from llama_export.exporter.sensitivity import HEAD_ROWS, SENSITIVITY_WINDOWS

        tokens = SENSITIVITY_WINDOWS * WINDOW
        # a layer's weights, their gradients and rounding errors; the hidden states' gradient and a window's
        # activations; the lm_head's row chunk with its logits, noise and probabilities
        sensitivity = 3 * 4 * layer_weights + 3 * 4 * tokens * hidden + 4 * HEAD_ROWS * (hidden + 5 * tokens)
        layer = max(layer, sensitivity)
    table = TABLE_COPIES * 4 * config.vocab_size * hidden if float_tables else 0
    weight_bytes = {"fp32": 4, "fp16": 2, "int4": int4_bytes}.get(precision, 4)
    package = weight_bytes * shape.parameters
    return ExportMemory(layer=int(layer), table=int(table), verify=int(ORT_PACKAGE_FACTOR * package) if verify else 0)


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none: the check is then skipped)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def hand_back_freed_memory() -> None:
    """Returns the heap's free pages to the system before the next large step: glibc keeps most of what
    calibration and an ONNX Runtime session freed, and a second session would be counted on top of it."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)
