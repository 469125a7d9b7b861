"""Block-wise weight quantization numerics (numpy): the packed form ONNX Runtime's MatMulNBits and
GatherBlockQuantized read, and three ways to choose the quantized values.

A weight is W [N, K] (output rows, input columns, as in a Linear layer); blocks run along K. A block's values are
w = scale * (q - zero_point) with q in [0, 2^bits). Symmetric blocks use the midpoint 2^(bits-1) as zero point;
asymmetric blocks carry their own zero point, a float when it need not be an integer (GGUF Q4_1, clipped ranges).

- `quantize_rtn`: round to nearest over each block's full range.
- `quantize_clip`: per block, the range shrink that minimises the output error weighted by the input's
  per-channel energy (diag of X^T X); it trades clipping a few outliers for finer steps everywhere else.
- `quantize_gptq`: error compensation (Frantar et al., GPTQ): columns are quantized in order and each one's
  rounding error is pushed onto the columns not yet quantized through the inverse Hessian of X^T X, with the
  clip search choosing each block's range when the block is reached.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLIP_RATIOS = np.linspace(1.0, 0.6, 17)


@dataclass
class BlockQuantized:
    """Quantized weight W [N, K]: codes uint8 [N, K] (unpacked), scales float32 [N, K/block],
    zero_points [N, K/block] as uint8 (integers) or float32, or None for the symmetric midpoint."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block_size: int
    columns: int = 0  # K; codes are padded to whole blocks past it (0: no padding)
    minimums: np.ndarray | None = None  # GGUF Q4_1: w = scale * q + minimum (zero_points then unused)
    half_params: bool = False  # minimums exact in float16 (a GGUF's Q4_1/Q5_1, a recovered grid): stored so

    def __post_init__(self):
        self.columns = self.columns or self.codes.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.columns

    def effective_zero_points(self) -> np.ndarray:
        if self.minimums is not None:
            return np.zeros(self.scales.shape, np.float32)
        if self.zero_points is None:
            return np.full(self.scales.shape, 1 << (self.bits - 1), dtype=np.float32)
        return self.zero_points.astype(np.float32)

    def dequantize(self) -> np.ndarray:
        """W [N, K] float32, computed as ONNX Runtime's kernels do: scale * (q - zero_point)."""
        n, k = self.codes.shape
        blocks = self.codes.reshape(n, -1, self.block_size).astype(np.float32)
        if self.minimums is not None:
            return (blocks * self.scales[..., None] + self.minimums[..., None]).reshape(n, k)[:, :self.columns]
        zp = self.effective_zero_points()[..., None]
        return ((blocks - zp) * self.scales[..., None]).astype(np.float32).reshape(n, k)[:, :self.columns]

    # -- ONNX Runtime layouts --------------------------------------------------------------------------------
    def matmulnbits_b(self) -> np.ndarray:
        """MatMulNBits' B: uint8 [N, K/block, block*bits/8], packed along K, low nibble first."""
        n, k = self.codes.shape
        return pack_codes(self.codes, self.bits).reshape(n, k // self.block_size, self.block_size * self.bits // 8)

    def gather_data(self) -> np.ndarray:
        """GatherBlockQuantized's data: uint8 [N, K*bits/8]."""
        return pack_codes(self.codes, self.bits)

    def ort_zero_points(self) -> np.ndarray | None:
        """uint8 zero points packed like the codes (two per byte at 4 bits), or float ones as they are; with
        minimums, zeros (the minimum is added by a separate term)."""
        if self.minimums is not None:
            zp = np.zeros(self.scales.shape, np.uint8)
        elif self.zero_points is None or self.zero_points.dtype != np.uint8:
            return self.zero_points
        else:
            zp = self.zero_points
        if self.bits == 4 and zp.shape[1] % 2:
            zp = np.concatenate([zp, np.zeros((zp.shape[0], 1), np.uint8)], axis=1)
        return pack_codes(zp, self.bits)

    def signed_codes(self) -> np.ndarray:
        """Symmetric codes as signed integers (q - midpoint), the INT4 DequantizeLinear form."""
        if self.zero_points is not None:
            raise ValueError("signed codes exist only for symmetric quantization")
        return self.codes.astype(np.int8) - np.int8(1 << (self.bits - 1))


def layout_template(n: int, columns: int, bits: int, block: int, zero_dtype=None,
                    minimums: bool = False, half_params: bool = False) -> BlockQuantized:
    """Shapes and zero-point kind of a quantized weight [n, columns], without its data (the zero arrays are
    never touched, so they take no memory)."""
    blocks = -(-columns // block)
    return BlockQuantized(np.zeros((n, 0), np.uint8), np.zeros((n, blocks), np.float32),
                          None if zero_dtype is None else np.zeros((n, blocks), zero_dtype), bits, block, columns,
                          np.zeros((n, blocks), np.float32) if minimums else None, half_params)


def concatenate_rows(parts: list[BlockQuantized]) -> BlockQuantized:
    """Weights stacked along N (packed q/k/v or gate/up) keep each part's blocks."""
    first = parts[0]
    if any(p.bits != first.bits or p.block_size != first.block_size for p in parts):
        raise ValueError("parts quantized differently")
    half = all(p.half_params for p in parts)
    if any(p.minimums is not None for p in parts):
        if not all(p.minimums is not None for p in parts):
            raise ValueError("cannot stack blocks with and without minimums")
        return BlockQuantized(np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts]),
                              None, first.bits, first.block_size, first.columns,
                              np.concatenate([p.minimums for p in parts]), half)
    kinds = {None if p.zero_points is None else p.zero_points.dtype for p in parts}
    if len(kinds) == 1:
        zero_points = None if first.zero_points is None else np.concatenate([p.zero_points for p in parts])
    else:  # mixed: spell every zero point out as a float
        zero_points = np.concatenate([p.effective_zero_points() for p in parts])
    return BlockQuantized(np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts]),
                          zero_points, first.bits, first.block_size, first.columns, half_params=half)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return codes.astype(np.uint8)
    if bits != 4:
        raise ValueError(f"{bits}-bit packing is not supported")
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed.astype(np.uint8)
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2], out[..., 1::2] = packed & 0x0F, packed >> 4
    return out


# -- choosing the codes ------------------------------------------------------------------------------------------
def _block_params(w: np.ndarray, bits: int, symmetric: bool, ratio, integer_zero: bool = True):
    """scale and zero point for blocks w [..., block] over their range shrunk by `ratio`. Integer zero points
    (a range that contains 0) pack into 4 bits; float ones cost as much as the scales but fit any range."""
    levels = (1 << bits) - 1
    if symmetric:
        # q - 8 spans [-8, 7]: the scale must cover the negative side in 8 steps and the positive one in 7.
        half = 1 << (bits - 1)
        scale = np.maximum(-w.min(-1) / half, w.max(-1) / (half - 1)) * ratio
        zero = np.full(scale.shape, float(1 << (bits - 1)))
    else:
        # Float zero points: the range need not contain 0, so a block on a 4-bit grid (GGUF Q4_1) maps onto
        # exactly that grid again. Shrinking keeps the block's midpoint.
        lo, hi = w.min(-1), w.max(-1)
        if integer_zero:
            lo, hi = np.minimum(lo, 0) * ratio, np.maximum(hi, 0) * ratio
        else:
            middle, half = (lo + hi) / 2, (hi - lo) / 2 * ratio
            lo, hi = middle - half, middle + half
        scale = (hi - lo) / levels
        zero = np.where(scale > 0, -lo / np.where(scale > 0, scale, 1), 0.0)
        if integer_zero:
            zero = np.clip(np.rint(zero), 0, levels)
    scale = np.where(scale == 0, 1.0, scale)
    return scale.astype(np.float32), zero.astype(np.float32)


def _round(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """Codes of blocks w [..., block] as uint8 (PyTorch: all cores)."""
    import torch

    q = torch.div(torch.from_numpy(np.asarray(w, np.float32)), torch.from_numpy(scale)[..., None])
    q.add_(torch.from_numpy(zero)[..., None]).round_().clamp_(0, (1 << bits) - 1)
    return q.to(torch.uint8).numpy()


def _finish(codes, scales, zeros, bits, block_size, symmetric, columns, integer_zero) -> BlockQuantized:
    n = codes.shape[0]
    zero_points = None if symmetric else zeros.astype(np.uint8 if integer_zero else np.float32)
    return BlockQuantized(codes.reshape(n, -1).astype(np.uint8), scales.astype(np.float32), zero_points, bits,
                          block_size, columns)


def _pad(w: np.ndarray, block_size: int) -> np.ndarray:
    """w [N, K] padded to whole blocks by repeating the last column (so a block's range does not grow); the
    kernels never read past K."""
    missing = -w.shape[1] % block_size
    return np.pad(w, ((0, 0), (0, missing)), mode="edge") if missing else w


def _importance(importance: np.ndarray | None, k: int, block_size: int) -> np.ndarray:
    imp = np.ones(k, np.float32) if importance is None else importance.astype(np.float32)
    return np.pad(imp, (0, -k % block_size)).reshape(-1, block_size)  # padding weighs nothing


def _blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    w = np.ascontiguousarray(_pad(w, block_size), np.float32)  # no copy when it already is
    return w.reshape(w.shape[0], -1, block_size)


def quantize_rtn(w: np.ndarray, bits: int = 4, block_size: int = 32, symmetric: bool = False,
                 integer_zero: bool = True) -> BlockQuantized:
    blocks = _blocks(w, block_size)
    scale, zero = _block_params(blocks, bits, symmetric, 1.0, integer_zero)
    return _finish(_round(blocks, scale, zero, bits), scale, zero, bits, block_size, symmetric, w.shape[1],
                   integer_zero)


CLIP_CHUNK = 256  # rows per step of the clip search: its temporaries stay in cache


def _clip_search(blocks: np.ndarray, importance: np.ndarray, bits: int, symmetric: bool, integer_zero: bool):
    """Per block, the range ratio in CLIP_RATIOS minimising sum(importance * error^2); blocks [N, nb, bs],
    importance [nb, bs]. Coarse to fine: every fourth ratio first, then the ratios within two steps of each
    block's best (9 trials, not 17). The arithmetic of _block_params and _round, in PyTorch (all cores), in row
    chunks small enough to stay in cache."""
    import torch

    coarse = torch.tensor(CLIP_RATIOS[::4], dtype=torch.float32)
    step = float(CLIP_RATIOS[0] - CLIP_RATIOS[1])
    low_ratio, high_ratio = float(CLIP_RATIOS[-1]), float(CLIP_RATIOS[0])
    weight = torch.from_numpy(np.asarray(importance, np.float32))
    best_scale = np.ones(blocks.shape[:2], np.float32)
    best_zero = np.zeros(blocks.shape[:2], np.float32)
    for start in range(0, blocks.shape[0], CLIP_CHUNK):
        w = torch.from_numpy(np.ascontiguousarray(blocks[start:start + CLIP_CHUNK], np.float32))
        trial = _ClipTrial(w, weight, bits, symmetric, integer_zero)
        for ratio in coarse:
            trial.run(torch.full(w.shape[:2], float(ratio)))
        middle = trial.ratio
        for offset in (-2, -1, 1, 2):
            ratio = torch.clamp(middle + offset * step, low_ratio, high_ratio)
            trial.run(ratio)
        best_scale[start:start + CLIP_CHUNK], best_zero[start:start + CLIP_CHUNK] = trial.scale, trial.zero
    return best_scale, best_zero


class _ClipTrial:
    """The best range ratio found so far for each block of w [n, nb, bs], with its scale and zero point."""

    def __init__(self, w, weight, bits, symmetric, integer_zero):
        import torch

        self.w, self.weight, self.symmetric, self.integer_zero = w, weight, symmetric, integer_zero
        self.levels, self.half = float((1 << bits) - 1), float(1 << (bits - 1))
        self.lo, self.hi = w.amin(-1), w.amax(-1)
        self.error = torch.full(w.shape[:2], float("inf"))
        self.ratio = torch.ones(w.shape[:2])
        self.scale, self.zero = torch.ones(w.shape[:2]), torch.zeros(w.shape[:2])
        self.q = w.new_empty(w.shape)

    def run(self, ratio) -> None:
        import torch

        lo, hi, levels, half = self.lo, self.hi, self.levels, self.half
        if self.symmetric:
            scale = torch.maximum(-lo / half, hi / (half - 1)) * ratio
            zero = torch.full_like(scale, half)
        elif self.integer_zero:
            low, high = torch.clamp(lo, max=0) * ratio, torch.clamp(hi, min=0) * ratio
            scale = (high - low) / levels
            zero = torch.where(scale > 0, -low / torch.where(scale > 0, scale, 1.0), 0.0)
            zero = torch.clamp(torch.round(zero), 0, levels)
        else:
            middle, spread = (lo + hi) / 2, (hi - lo) / 2 * ratio
            scale = 2 * spread / levels
            zero = torch.where(scale > 0, -(middle - spread) / torch.where(scale > 0, scale, 1.0), 0.0)
        scale = torch.where(scale == 0, 1.0, scale)
        s, z, q = scale[..., None], zero[..., None], self.q
        torch.div(self.w, s, out=q)
        q.add_(z).round_().clamp_(0, levels).sub_(z).mul_(s).sub_(self.w).square_().mul_(self.weight)
        error = q.sum(-1)
        better = error < self.error
        self.error = torch.where(better, error, self.error)
        self.ratio = torch.where(better, ratio, self.ratio)
        self.scale = torch.where(better, scale, self.scale)
        self.zero = torch.where(better, zero, self.zero)


def quantize_clip(w: np.ndarray, importance: np.ndarray | None, bits: int = 4, block_size: int = 32,
                  symmetric: bool = False, integer_zero: bool = True) -> BlockQuantized:
    """importance [K]: mean squared input activation per column (ones when unknown)."""
    blocks = _blocks(w, block_size)
    scale, zero = _clip_search(blocks, _importance(importance, w.shape[1], block_size), bits, symmetric,
                               integer_zero)
    return _finish(_round(blocks, scale, zero, bits), scale, zero, bits, block_size, symmetric, w.shape[1],
                   integer_zero)


GPTQ_BATCH = 128  # columns whose updates are applied to the rest of the matrix as one product (lazy batch)
GPTQ_ROWS = 16384  # rows are independent in GPTQ: larger matrices (embeddings, lm_heads) go in row chunks
# Wider inputs are compensated in column groups of at most this many (the Hessian taken block-diagonal): the
# inverse's Cholesky factor costs K^3, which for a 14336-wide down projection outweighs the rest of the layer.
GPTQ_GROUP_COLUMNS = 4096


@dataclass
class GptqHessian:
    """What GPTQ derives from X^T X, computed once and used for every row chunk of the matrix (or matrices) that
    read the same input: per column group, the quantization order, the inverse's upper Cholesky factor and the
    dead columns; and each block's input energy (its diagonal)."""

    columns: int
    block_size: int
    act_order: bool
    groups: list  # (slice of padded columns, order, upper, dead) per group
    importance: np.ndarray


def prepare_gptq(hessian: np.ndarray, block_size: int = 32, damp: float = 0.1, act_order: bool = False) -> GptqHessian:
    """hessian [K, K]: X^T X over calibration activations (any positive scale)."""
    import torch

    columns = hessian.shape[0]
    k = columns + (-columns % block_size)
    h = torch.zeros((k, k), dtype=torch.float32)
    h[:columns, :columns] = torch.from_numpy(np.asarray(hessian, np.float32))
    dead = torch.diagonal(h) <= 0  # padding columns come out dead too: no input reaches them
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * float(torch.diagonal(h).mean()))
    count = -(-k // GPTQ_GROUP_COLUMNS)
    width = -(-k // count // block_size) * block_size  # equal groups of whole blocks
    groups = []
    for first in range(0, k, width):
        span = slice(first, min(first + width, k))
        sub = h[span, span]
        order = torch.argsort(-torch.diagonal(sub), stable=True) if act_order else torch.arange(sub.shape[0])
        groups.append((span, order, _inverse_upper_cholesky(sub[order][:, order]), dead[span]))
    return GptqHessian(columns, block_size, act_order, groups, _importance(np.diag(hessian), columns, block_size))


def quantize_gptq(w: np.ndarray, hessian: np.ndarray | GptqHessian, bits: int = 4, block_size: int = 32,
                  symmetric: bool = False, integer_zero: bool = True, damp: float = 0.1,
                  act_order: bool = False) -> BlockQuantized:
    """hessian: X^T X [K, K], or what prepare_gptq made of it (then block_size, damp and act_order are its own).
    With act_order, every block's range is fixed up front on the original weights and columns are quantized from
    the highest input energy down, so the most important columns are rounded while the most freedom is left to
    compensate.

    float32 in PyTorch on all cores: the inverse Hessian's Cholesky factor is computed once per column group
    (see GPTQ_GROUP_COLUMNS), each batch of GPTQ_BATCH columns is compensated within itself, and its errors reach
    the later columns in one matrix product; rows go in chunks of GPTQ_ROWS (each row's result depends only on
    that row)."""
    if not isinstance(hessian, GptqHessian):
        hessian = prepare_gptq(hessian, block_size, damp, act_order)
    if w.shape[1] != hessian.columns:
        raise ValueError(f"a weight of {w.shape[1]} input columns with a Hessian of {hessian.columns}")
    block_size = hessian.block_size
    w = _pad(np.asarray(w, np.float32), block_size)
    parts = []
    for span, order, upper, dead in hessian.groups:
        importance = hessian.importance[span.start // block_size:span.stop // block_size]
        chunks = [_gptq_rows(w[start:start + GPTQ_ROWS, span], upper, order, dead, importance, bits, block_size,
                             symmetric, integer_zero, hessian.act_order) for start in range(0, w.shape[0], GPTQ_ROWS)]
        parts.append([np.concatenate(p) for p in zip(*chunks)])
    codes, scales, zeros = (np.concatenate(p, axis=1) for p in zip(*parts))
    return _finish(codes, scales, zeros, bits, block_size, symmetric, hessian.columns, integer_zero)


def _inverse_upper_cholesky(h):
    """U, upper triangular, with H^-1 = U^T U (row i: how column i's error spreads onto the later columns). With J
    the reversal, J H J = L L^T gives H = (J L J)(J L J)^T, so U = (J L J)^-1 = J L^-1 J: one factorization and
    one triangular inverse, where inverting H and factoring the inverse takes three factorizations."""
    import torch

    lower = torch.linalg.cholesky(torch.flip(h, (0, 1)))
    return torch.flip(_inverse_lower(lower), (0, 1))


def _inverse_lower(lower):
    """L^-1 of a lower triangular L by halves: [[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]. A third
    of the work of solving against the identity, all of it in matrix products."""
    import torch

    n = lower.shape[0]
    if n <= 256:
        return torch.linalg.solve_triangular(lower, torch.eye(n, dtype=lower.dtype), upper=False)
    half = n // 2
    a, c = _inverse_lower(lower[:half, :half]), _inverse_lower(lower[half:, half:])
    out = torch.zeros_like(lower)
    out[:half, :half], out[half:, half:] = a, c
    out[half:, :half] = -(c @ lower[half:, :half] @ a)
    return out


def _gptq_rows(w, upper, order, dead, importance, bits, block_size, symmetric, integer_zero, act_order):
    """GPTQ of rows w [n, K] given the permuted inverse Hessian's upper Cholesky factor: codes, scales, zeros.
    Works on W^T, so each column of W is one contiguous row."""
    import torch

    w = torch.from_numpy(np.array(w, np.float32))  # a copy: compensation works in place
    n, k = w.shape
    w[:, dead] = 0.0
    nb = k // block_size
    scales, zeros = torch.empty((nb, n)), torch.empty((nb, n))
    if act_order:
        s, z = _clip_search(w.reshape(n, nb, block_size).numpy(), importance, bits, symmetric, integer_zero)
        scales[:], zeros[:] = torch.from_numpy(s.T), torch.from_numpy(z.T)
    wt = w.T[order].contiguous()  # [K, n], columns in quantization order
    del w
    groups = order // block_size
    top = float((1 << bits) - 1)
    codes = torch.empty((k, n))
    step = block_size * max(1, GPTQ_BATCH // block_size)  # whole blocks per batch
    for start in range(0, k, step):
        stop = min(start + step, k)
        batch = wt[start:stop]  # a view: compensated in place
        errors = torch.empty_like(batch)
        block = upper[start:stop, start:stop]
        for j in range(stop - start):
            if not act_order and j % block_size == 0:  # the block's range, on the weights as compensated so far
                b = (start + j) // block_size
                s, z = _clip_search(batch[j:j + block_size].T.contiguous()[:, None, :].numpy(), importance[b:b + 1],
                                    bits, symmetric, integer_zero)
                scales[b], zeros[b] = torch.from_numpy(s[:, 0]), torch.from_numpy(z[:, 0])
            group = int(groups[start + j])
            scale, zero = scales[group], zeros[group]
            column = batch[j]
            q = codes[start + j]
            torch.div(column, scale, out=q)
            q.add_(zero).round_().clamp_(0, top)
            error = errors[j]
            torch.sub(q, zero, out=error)
            error.mul_(scale).sub_(column).div_(-block[j, j])  # (column - dequantized) / d
            inner = j - j % block_size + block_size  # rank-1 updates within the block, products past it
            if j + 1 < min(inner, stop - start):
                batch[j + 1:inner].addr_(block[j, j + 1:inner], error, alpha=-1.0)
            if j + 1 == inner and inner < stop - start:
                first = inner - block_size
                batch[inner:].addmm_(block[first:inner, inner:].T, errors[first:inner], alpha=-1.0)
        if stop < k:
            wt[stop:].addmm_(upper[start:stop, stop:].T, errors, alpha=-1.0)
    unpermuted = torch.empty_like(codes)
    unpermuted[order] = codes
    return unpermuted.T.numpy(), scales.T.numpy(), zeros.T.numpy()
