"""Weights written to the package in row chunks: a large table (an embedding, an lm_head kept in float) or a packed
matrix is read from its source a block of rows at a time, transformed and written, so no whole copy of it sits in
memory while the package is written."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

CHUNK_BYTES = 1 << 28  # float32 bytes of source rows read at once


class RowStreamedTensor(ir.LazyTensor):
    """A 2-D weight defined by `read_rows(start, stop)`: its rows [start, stop) in [out, in] layout as float32,
    read alone. `convert` (elementwise, e.g. a cast) is applied to each block of rows. Stored as [out, in], or as
    the transpose [in, out] (a MatMul's B) when `transposed`. numpy() still builds the whole tensor, for the
    passes that need it; writing the package calls tofile(), which never does."""

    __slots__ = ("convert", "read_rows", "rows", "columns", "transposed")

    def __init__(self, read_rows, rows: int, columns: int, name: str, transposed: bool = False, convert=None,
                 dtype: ir.DataType = ir.DataType.FLOAT):
        shape = [columns, rows] if transposed else [rows, columns]
        super().__init__(self._whole, dtype=dtype, shape=ir.Shape(shape), name=name)
        self.read_rows, self.rows, self.columns = read_rows, rows, columns
        self.transposed, self.convert = transposed, convert

    def transpose(self) -> RowStreamedTensor:
        return RowStreamedTensor(self.read_rows, self.rows, self.columns, self.name, not self.transposed,
                                 self.convert, self.dtype)

    def converted(self, fn, dtype: ir.DataType) -> RowStreamedTensor:
        """The same rows passed through the elementwise `fn` after any conversion already set."""
        first = self.convert
        convert = fn if first is None else (lambda block: fn(first(block)))
        return RowStreamedTensor(self.read_rows, self.rows, self.columns, self.name, self.transposed, convert, dtype)

    def _blocks(self):
        """(first row, converted rows) over the source, CHUNK_BYTES of float32 rows at a time."""
        step = max(1, CHUNK_BYTES // (4 * self.columns))
        for start in range(0, self.rows, step):
            block = self.read_rows(start, min(start + step, self.rows))
            if block.shape != (min(step, self.rows - start), self.columns):
                raise ValueError(f"{self.name}: rows [{start}, ...) read as {block.shape}, not "
                                 f"{self.columns} columns wide")
            yield start, block if self.convert is None else self.convert(block)

    def _whole(self) -> ir.Tensor:
        blocks = [block for _, block in self._blocks()]
        whole = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
        return ir.Tensor(np.ascontiguousarray(whole.T if self.transposed else whole), name=self.name)

    def tofile(self, file) -> None:
        origin = file.tell()
        itemsize = int(self.dtype.itemsize)
        for start, block in self._blocks():
            if not self.transposed:
                file.write(np.ascontiguousarray(block).view(np.uint8).data)
                continue
            # Rows [start, stop) of the source are columns of the stored [in, out] tensor: one strided run a row.
            columns = np.ascontiguousarray(block.T)
            for row in range(columns.shape[0]):
                file.seek(origin + (row * self.rows + start) * itemsize)
                file.write(columns[row].view(np.uint8).data)
        file.seek(origin + self.rows * self.columns * itemsize)
