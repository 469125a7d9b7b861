"""llama.cpp's block formats decoded into the codes, scales and minimums ONNX Runtime's block-quantized operators
read, so a GGUF tensor is carried over without requantizing: the decoded blocks dequantize (scale * (code -
midpoint), or scale * code + minimum) to the very floats llama.cpp's own dequantization gives, bit for bit.

Layouts as llama.cpp defines them (ggml-common.h, and gguf-py's quants.py), per block:
- Q4_0 (18 B / 32): d f16, 16 B of 4-bit q; w = d (q - 8). Element j is byte j's low nibble, j + 16 its high one.
- Q4_1 (20 B / 32): d, m f16, 16 B of q; w = d q + m.
- Q5_0 (22 B / 32): d, 4 B of fifth bits (bit j of the little-endian uint32 for element j), 16 B of low nibbles
  as Q4_0; w = d (q - 16).
- Q5_1 (24 B / 32): d, m, fifth bits, low nibbles; w = d q + m.
- Q8_0 (34 B / 32): d, 32 int8 q; w = d q.
- Q4_K (144 B / 256): d, dmin f16, 12 B of eight 6-bit scales and minimums, 128 B of q: sub-block s (32 weights)
  has w = d sc_s q - dmin m_s; 32-byte group g holds sub-block 2g in its low nibbles, 2g + 1 in its high ones.
- Q5_K (176 B / 256): as Q4_K with 32 B of fifth bits after the scales (bit s of byte l: sub-block s, element l).
- Q6_K (210 B / 256): 128 B of low nibbles, 64 B of high bit pairs, 16 int8 scales, d: sixteen sub-blocks of 16
  with w = d sc_s (q - 32), q in [0, 64).

Codes are uint8; the 4-bit formats stay 4-bit, the 5-, 6- and 8-bit ones become 8-bit codes (MatMulNBits and
GatherBlockQuantized take 2, 4 or 8 bits). Symmetric formats are shifted onto the midpoint 2^(bits-1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

Decoded = tuple[np.ndarray, np.ndarray, np.ndarray | None]  # codes [n, weights], scales, minimums [n, sub-blocks]


@dataclass(frozen=True)
class BlockFormat:
    block_bytes: int
    weights: int  # per block
    bits: int  # of the codes handed to ONNX Runtime
    sub_block: int  # weights per scale
    minimums: bool  # w = scale * q + minimum
    decode: Callable[[np.ndarray], Decoded]  # raw blocks uint8 [n, block_bytes]
    half_params: bool = False  # the scales (and minimums) are the file's float16 values as they are


def _f16(raw: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte `start` of each block, as float32 [n, 1]."""
    return raw[:, start:start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """[n, 16] bytes -> [n, 32] codes: the low nibbles, then the high ones."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def _fifth_bits(raw: np.ndarray, start: int) -> np.ndarray:
    """Q5_0/Q5_1: bit j of the little-endian uint32 at `start` is element j's fifth bit, as [n, 32] values 0 or 16."""
    bits = np.unpackbits(raw[:, start:start + 4], axis=-1, bitorder="little")
    return bits << 4


def _q4_0(raw):
    return _nibbles(raw[:, 2:]), _f16(raw, 0), None


def _q4_1(raw):
    return _nibbles(raw[:, 4:]), _f16(raw, 0), _f16(raw, 2)


def _q5_0(raw):  # w = d (q - 16): 8-bit codes q + 112 around the midpoint 128
    return (_nibbles(raw[:, 6:]) | _fifth_bits(raw, 2)) + np.uint8(112), _f16(raw, 0), None


def _q5_1(raw):
    return _nibbles(raw[:, 8:]) | _fifth_bits(raw, 4), _f16(raw, 0), _f16(raw, 2)


def _q8_0(raw):
    return (raw[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8), _f16(raw, 0), None


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit minimums. Bytes 0-3 hold scales 0-3 in their low
    six bits, bytes 4-7 minimums 0-3; scales and minimums 4-7 have their low four bits in bytes 8-11 (low and high
    nibble) and their top two in the top bits of bytes 0-3 and 4-7."""
    low, high, rest = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([low & 0x3F, (rest & 0x0F) | ((low >> 2) & 0x30)], axis=-1)
    minimums = np.concatenate([high & 0x3F, (rest >> 4) | ((high >> 2) & 0x30)], axis=-1)
    return scales, minimums


def _k_low_nibbles(packed: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: 128 bytes -> [n, 256]: each 32-byte group's low nibbles, then its high ones."""
    groups = packed.reshape(len(packed), 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (groups & 0x0F).reshape(len(packed), 256)


def _k_scale_minimum(raw):
    sc, m = _k_scales(raw[:, 4:16])
    return _f16(raw, 0) * sc.astype(np.float32), -(_f16(raw, 2) * m.astype(np.float32))


def _q4_k(raw):
    scales, minimums = _k_scale_minimum(raw)
    return _k_low_nibbles(raw[:, 16:144]), scales, minimums


def _q5_k(raw):
    scales, minimums = _k_scale_minimum(raw)
    high = raw[:, 16:48].reshape(len(raw), 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    codes = _k_low_nibbles(raw[:, 48:176]) | ((high & 1) << 4).reshape(len(raw), 256)
    return codes, scales, minimums


def _q6_k(raw):  # w = d sc (q - 32): 8-bit codes q + 96 around the midpoint 128
    n = len(raw)
    low = raw[:, 0:128].reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    high = raw[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    codes = (low & 0x0F).reshape(n, 256) | ((high & 0x03) << 4).reshape(n, 256)
    scales = _f16(raw, 208) * raw[:, 192:208].view(np.int8).astype(np.float32)
    return codes + np.uint8(96), scales, None


FORMATS = {
    "Q4_0": BlockFormat(18, 32, 4, 32, False, _q4_0, half_params=True),
    "Q4_1": BlockFormat(20, 32, 4, 32, True, _q4_1, half_params=True),
    "Q5_0": BlockFormat(22, 32, 8, 32, False, _q5_0, half_params=True),
    "Q5_1": BlockFormat(24, 32, 8, 32, True, _q5_1, half_params=True),
    "Q8_0": BlockFormat(34, 32, 8, 32, False, _q8_0, half_params=True),
    "Q4_K": BlockFormat(144, 256, 4, 32, True, _q4_k),
    "Q5_K": BlockFormat(176, 256, 8, 32, True, _q5_k),
    "Q6_K": BlockFormat(210, 256, 8, 16, False, _q6_k),
}


def decode_rows(data: np.ndarray, rows: int, kind: str) -> Decoded:
    """A tensor's raw bytes (`rows` rows of whole blocks) -> codes [rows, K], scales and minimums
    [rows, K / sub_block]."""
    fmt = FORMATS[kind]
    raw = np.asarray(data).view(np.uint8).reshape(-1, fmt.block_bytes)
    codes, scales, minimums = fmt.decode(raw)
    per_row = lambda a: a.reshape(rows, -1)  # noqa: E731
    return per_row(codes), per_row(scales), None if minimums is None else per_row(minimums)
