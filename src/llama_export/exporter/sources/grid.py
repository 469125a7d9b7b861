"""Float weights that already lie on a 4-bit block grid: a Hugging Face folder written from a GGUF's Q4_1 blocks (the
default model's own folder, or any quantized model dequantized into float weights) holds in every 32-value block at
most 16 evenly spaced values, the block's minimum and maximum among them (w = scale * q + minimum, q in 0..15).
Quantizing such weights again rounds them twice; recognized, their grid is carried as it is, as a GGUF's blocks are.

A matrix counts as on the grid when every block of a sample of its rows is reproduced bit for bit by a scale and a
minimum that are float16 values (as a GGUF stores them); its other rows are recovered the same way when the package is
written, and a block that turns out not to be on the grid after all gets the nearest block of that form."""

from __future__ import annotations

import numpy as np

from llama_export.passes.block_quantized import BlockQuantized

GRID_BITS = 4
GRID_BLOCK = 32
SAMPLE_ROWS = 16


HALF_MAX = float(np.finfo(np.float16).max)


def recover_grid(w: np.ndarray, strict: bool = True) -> BlockQuantized | None:
    """w [N, K] as GGUF's Q4_1 has it: 4-bit 32-blocks, w = scale * q + minimum with float16 scale and minimum,
    whose dequantization equals w bit for bit; None when some block is not so (`strict`), else such blocks get the
    nearest block of that form (scale and minimum from the block's range, rounded to float16)."""
    n, k = w.shape
    if k % GRID_BLOCK:
        return None
    blocks = np.asarray(w, np.float32).reshape(n, k // GRID_BLOCK, GRID_BLOCK)
    low = blocks.min(-1)
    spread = (blocks.max(-1) - low) / np.float32((1 << GRID_BITS) - 1)
    minimums = np.clip(low, -HALF_MAX, HALF_MAX).astype(np.float16).astype(np.float32)
    scales = np.clip(spread, 0, HALF_MAX).astype(np.float16).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
    codes = np.clip(np.rint((blocks - minimums[..., None]) / safe[..., None]), 0, (1 << GRID_BITS) - 1)
    codes = codes.astype(np.uint8)
    if strict and not (codes.astype(np.float32) * scales[..., None] + minimums[..., None] == blocks).all():
        return None
    return BlockQuantized(codes.reshape(n, k), scales, None, GRID_BITS, GRID_BLOCK, k, minimums, half_params=True)


def sample_rows(rows: int) -> list[int]:
    return sorted(set(np.linspace(0, rows - 1, min(rows, SAMPLE_ROWS)).astype(int).tolist()))


def on_grid(read_rows, shape: tuple[int, ...]) -> bool:
    """Whether a sample of the matrix's rows (read one at a time by read_rows(start, stop)) lies on the grid, with
    more than two values in some block (a matrix of zeros or of two values says nothing)."""
    if len(shape) != 2 or shape[1] % GRID_BLOCK or shape[0] < 1:
        return False
    varied = False
    for row in sample_rows(shape[0]):
        values = np.asarray(read_rows(row, row + 1), np.float32)
        if recover_grid(values) is None:
            return False
        blocks = np.sort(values.reshape(-1, GRID_BLOCK), axis=-1)
        varied = varied or bool(((np.diff(blocks, axis=-1) != 0).sum(-1) >= 2).any())
    return varied


def grid_loader(load_rows, shape: tuple[int, ...], chunk_rows: int = 8192):
    """load_quantized for a matrix on the grid: its blocks recovered chunk by chunk of rows."""
    def load() -> BlockQuantized:
        parts = [recover_grid(load_rows(start, min(start + chunk_rows, shape[0])), strict=False)
                 for start in range(0, shape[0], chunk_rows)]
        return BlockQuantized(np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts]),
                              None, GRID_BITS, GRID_BLOCK, shape[1], np.concatenate([p.minimums for p in parts]),
                              half_params=True)

    return load


def mark_grid_weights(checkpoint) -> tuple[int, int]:
    """Give every matrix of the checkpoint that lies on the grid its blocks (as a GGUF's are given), so the quantizer
    carries them over where the asked block size is the grid's. Returns (matrices on the grid, matrices)."""
    from dataclasses import replace

    found = total = 0
    for name, info in list(checkpoint.weights.items()):
        if len(info.shape) != 2 or info.quantized_bits is not None:
            continue
        total += 1
        if on_grid(info.rows, info.shape):
            found += 1
            checkpoint.weights[name] = replace(info, load_quantized=grid_loader(info.rows, info.shape),
                                               quantized_bits=GRID_BITS, quantized_block_size=GRID_BLOCK,
                                               quantized_minimums=True, quantized_half_params=True)
    return found, total
