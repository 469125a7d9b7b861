"""The weights a package's MatMulNBits nodes hold, dequantized from their own blocks and named by the checkpoint
tensors they came from: what a check that the package carries a source's values exactly compares."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx_ir as ir

from passes.quantization import BlockQuantized, unpack_codes

# A packed projection's initializer name (passes/packing.py) -> the checkpoint tensors stacked in it, in order.
_STACKED = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
            "self_attn.packed_proj": ("q_proj", "k_proj", "v_proj"),
            "mlp.gate_up_proj": ("gate_proj", "up_proj"),
            "mlp.packed_proj": ("gate_proj", "up_proj")}


def checkpoint_names(weight: str) -> list[str]:
    """The checkpoint tensors stacked along N in a package weight; a weight split by parts (NAME.partI, see
    passes/quantize.py) names its I-th."""
    whole, _, part = weight.rpartition(".part")
    if whole and part.isdigit():
        return [checkpoint_names(whole)[int(part)]]
    for packed, parts in _STACKED.items():
        if weight.endswith(f"{packed}.weight"):
            prefix = weight.removesuffix(f"{packed}.weight") + packed.split(".")[0]
            return [f"{prefix}.{p}.weight" for p in parts]
    return [weight]


def matmulnbits_weights(model: ir.Model) -> Iterator[tuple[str, BlockQuantized]]:
    """(weight name, its blocks) for every MatMulNBits; a minimum term added after the node (w = d*q + m) is
    folded back into the blocks, so `.dequantize()` gives the weight [N, K] as the package computes it."""
    for node in model.graph:
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
            continue
        b, scales = node.inputs[1].const_value.numpy(), node.inputs[2].const_value.numpy()
        has_zero_points = len(node.inputs) > 3 and node.inputs[3] is not None
        zero_points = node.inputs[3].const_value.numpy() if has_zero_points else None
        bits, block = node.attributes.get_int("bits"), node.attributes.get_int("block_size")
        codes = unpack_codes(b.reshape(b.shape[0], -1), bits)
        name = node.inputs[1].name.removesuffix(".qweight")
        minimums = model.graph.initializers.get(name + ".minimums")
        if minimums is not None:
            if zero_points is not None and zero_points.any():
                raise ValueError(f"{name}: a minimum term beside nonzero zero points")
            yield name, BlockQuantized(codes, scales, None, bits, block, minimums=minimums.const_value.numpy().T)
        else:
            unpacked = None if zero_points is None else unpack_codes(zero_points, bits)[:, :scales.shape[1]]
            yield name, BlockQuantized(codes, scales, unpacked, bits, block)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal as float32 bit patterns (so -0.0 differs from 0.0, and NaNs compare)."""
    a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))
