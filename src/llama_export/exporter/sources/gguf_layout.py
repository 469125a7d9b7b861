"""A GGUF file's layout checked against its length before any reader allocates from it.

gguf-py's reader trusts the counts in the header: an array claiming 2^62 entries grows memory without bound, and
tensors whose data ranges overlap or run past the end read other tensors' bytes. This walks the header with
every count and length compared to the bytes that remain, then checks each tensor's data range."""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from llama_export.exporter.errors import UserError

# GGUF value types: fixed-size scalars by struct format, 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 4


class _Cursor:
    def __init__(self, data, path: Path):
        self.data, self.path, self.at = data, path, 0

    def fail(self, what: str):
        raise UserError(f"{self.path}: not a valid GGUF file: {what} (byte {self.at} of {len(self.data)}); "
                        "the file is truncated or corrupt")

    def take(self, size: int, what: str) -> int:
        if size < 0 or size > len(self.data) - self.at:
            self.fail(f"{what} needs {size} bytes, {len(self.data) - self.at} remain")
        start, self.at = self.at, self.at + size
        return start

    def unpack(self, fmt: str, what: str):
        return struct.unpack_from("<" + fmt, self.data, self.take(struct.calcsize("<" + fmt), what))[0]

    def string(self, what: str) -> str:
        length = self.unpack("Q", f"{what}'s length")
        start = self.take(length, what)
        try:
            return bytes(self.data[start:start + length]).decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not valid UTF-8")

    def skip_value(self, kind: int, what: str, depth: int = 0) -> object:
        """Skip one value, returning it when it is a small scalar or string (alignment, names)."""
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind], what)
        if kind == _STRING:
            return self.string(what)
        if kind != _ARRAY or depth >= _MAX_NESTING:
            self.fail(f"{what} has an unknown value type {kind}")
        element = self.unpack("I", f"{what}'s element type")
        count = self.unpack("Q", f"{what}'s length")
        if element in _SCALARS:
            self.take(count * struct.calcsize(_SCALARS[element]), f"{what} ({count} entries)")
            return None
        if element not in (_STRING, _ARRAY):
            self.fail(f"{what} has an unknown element type {element}")
        if count * 8 > len(self.data) - self.at:  # every string or array takes at least 8 bytes
            self.fail(f"{what} claims {count} entries")
        for index in range(count):
            self.skip_value(element, f"{what}[{index}]", depth + 1)
        return None


def check_gguf_layout(path: Path) -> None:
    """Refuse, naming the field or tensor, a GGUF file whose header does not fit its length or whose tensors'
    data ranges overlap, run past the end or disagree with their type's block size."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
        if path.stat().st_size < 24:
            raise UserError(f"{path}: not a GGUF file (only {path.stat().st_size} bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            cursor = _Cursor(data, path)
            if cursor.take(4, "magic") != 0 or bytes(data[:4]) != b"GGUF":
                raise UserError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
            version = cursor.unpack("I", "version")
            if version not in (2, 3) and int.from_bytes(version.to_bytes(4, "little"), "big") in (2, 3):
                raise UserError(f"{path}: a big-endian GGUF file; llama-export reads little-endian GGUF (convert it "
                                "with llama.cpp's gguf tools)")
            if version not in (2, 3):
                raise UserError(f"{path}: GGUF version {version} is not supported (versions 2 and 3 are)")
            tensor_count = cursor.unpack("Q", "tensor count")
            kv_count = cursor.unpack("Q", "metadata count")
            if kv_count * 12 + tensor_count * 24 > len(data) - cursor.at:
                cursor.fail(f"the header claims {kv_count} metadata entries and {tensor_count} tensors")
            alignment = 32
            for _ in range(kv_count):
                key = cursor.string("a metadata key")
                value = cursor.skip_value(cursor.unpack("I", f"{key}'s type"), f"metadata '{key}'")
                if key == "general.alignment":
                    alignment = value if isinstance(value, int) and not isinstance(value, bool) else 0
            if alignment <= 0 or alignment & (alignment - 1):
                cursor.fail("general.alignment must be a whole power of two")
            tensors = []
            for _ in range(tensor_count):
                name = cursor.string("a tensor name")
                n_dims = cursor.unpack("I", f"tensor {name}'s dimension count")
                if not 1 <= n_dims <= _MAX_DIMS:
                    cursor.fail(f"tensor {name} has {n_dims} dimensions (1 to {_MAX_DIMS} allowed)")
                dims = [cursor.unpack("Q", f"tensor {name}'s dimensions") for _ in range(n_dims)]
                kind = cursor.unpack("I", f"tensor {name}'s type")
                offset = cursor.unpack("Q", f"tensor {name}'s offset")
                tensors.append((name, dims, kind, offset))
            data_start = -(-cursor.at // alignment) * alignment
            _check_tensor_ranges(path, tensors, data_start, len(data), alignment, GGML_QUANT_SIZES,
                                 GGMLQuantizationType)


def _check_tensor_ranges(path, tensors, data_start, size, alignment, quant_sizes, quant_type) -> None:
    ranges = []
    for name, dims, kind, offset in tensors:
        try:
            block, block_bytes = quant_sizes[quant_type(kind)]
        except (ValueError, KeyError):
            raise UserError(f"{path}: tensor {name} has an unknown GGML type {kind}") from None
        if min(dims) < 1 or dims[0] % block:
            raise UserError(f"{path}: tensor {name} has dimensions {dims}, which type {quant_type(kind).name} "
                            f"(blocks of {block}) cannot hold")
        elements = 1
        for d in dims:
            elements *= d
        start, end = data_start + offset, data_start + offset + elements // block * block_bytes
        if offset % alignment:
            raise UserError(f"{path}: tensor {name}'s data offset {offset} is not a multiple of the alignment "
                            f"{alignment}")
        if end > size:
            raise UserError(f"{path}: truncated GGUF file (tensor {name} ends at byte {end}, the file has {size})")
        ranges.append((start, end, name))
    ranges.sort()
    for (_, end, name), (start, _, other) in zip(ranges, ranges[1:]):
        if start < end:
            raise UserError(f"{path}: tensors {name} and {other} overlap in the file (corrupt GGUF)")
