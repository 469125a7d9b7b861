"""INT4 presets: how a target lays INT4 weights out, one frozen object per layout. The quantizer's options and the
size estimates (the phone format's 2 GiB check, the device memory plan) both derive from a preset, so they cannot
disagree. A target picks its preset per block size (Target.int4_preset); the user's options (method, block size,
--lm-head-bits, --keep-embedding, --symmetric) and the source's own blocks complete it at export time."""

from __future__ import annotations

from dataclasses import dataclass, replace

from llama_export.passes.quantize import QuantOptions
from llama_export.passes.quantized_graph import dividing_block

# A BPE vocabulary numbers tokens in merge order, so its first rows are the frequent tokens: the lm_head's first
# FREQUENT_LM_HEAD_ROWS stay 8-bit where the rest are 4-bit (README, INT4: layout measurements).
FREQUENT_LM_HEAD_ROWS = 16384
# From this block size up, an lm_head of one width is 8-bit unless a width is asked for (a 4-bit one loses most
# there: README, INT4: layout measurements).
WIDE_LM_HEAD_FROM_BLOCK = 128
# Decoder layers whose matrices take finer blocks than --block-size asks (see edge_layers).
EDGE_LAYER_BLOCK = 32


def edge_layers(num_layers: int) -> tuple[int, ...]:
    """The first and last decoder layers: the two whose error costs most for the bits (README, INT4: first and
    last decoder layers). Only where the two are at most a quarter of the layers, so --block-size still sets the
    bulk."""
    return (0, num_layers - 1) if num_layers >= 8 else ()


def edge_layer_weights(weights: dict, num_layers: int) -> frozenset[str]:
    """The edge layers' matrices among checkpoint weights ({name: info with .shape})."""
    prefixes = tuple(f"model.layers.{i}." for i in edge_layers(num_layers))
    return frozenset(name for name, info in weights.items() if len(info.shape) == 2 and name.startswith(prefixes))


@dataclass(frozen=True)
class QuantPreset:
    name: str
    form: str = "matmulnbits"  # or "dequantizelinear" (TensorRT's symmetric blocked form)
    symmetric_only: bool = False  # the form has no zero points
    lm_head_bits: int | None = 4  # None: the lm_head (and a tied table) stays float
    lm_head_block: int | None = 32  # None: the layers' blocks; an 8-bit head takes QuantOptions' 8-bit blocks
    frequent_head_rows: int = 0  # > 0: the lm_head's first rows 8-bit, the rest 4-bit (where the vocabulary is larger)
    edge_layer_block: int | None = EDGE_LAYER_BLOCK  # None: no finer blocks for the edge layers
    quantize_embedding: bool = True  # False: the lookup table stays float whatever is asked
    half_minimums: bool = True  # float16 minimums stored half and cast back in the graph
    scale_bytes: int = 4  # per block, as stored
    # A source's own blocks carried over: their widths, and whether only the decoder layers' (the tables stay float)
    carried_bits: tuple[int, ...] = (4, 8)
    carried_layers_only: bool = False
    eight_bit_share: float = 0.0  # at most this share of the layer weights at 8 bits (--eight-bit-share)

    def for_export(self, block_size: int, lm_head_bits: int | None, vocab_size: int,
                   eight_bit_share: float | None = None) -> QuantPreset:
        """This preset with the lm_head width settled: the one asked for (every row), else the preset's, split only
        where the vocabulary has rows past the frequent ones, 8-bit from WIDE_LM_HEAD_FROM_BLOCK up; and the share
        of layer weights kept at 8 bits: the one asked for (MatMulNBits form only), else the preset's."""
        if eight_bit_share is not None:
            if eight_bit_share and self.form != "matmulnbits":
                raise ValueError(f"--eight-bit-share: the {self.name} INT4 form has no 8-bit matrices (4-bit "
                                 "DequantizeLinear only); leave it out for this target")
            return replace(self, eight_bit_share=eight_bit_share).for_export(block_size, lm_head_bits, vocab_size)
        if self.lm_head_bits is None:
            return self
        if lm_head_bits is not None:
            return replace(self, lm_head_bits=lm_head_bits, frequent_head_rows=0)
        if self.frequent_head_rows and vocab_size > self.frequent_head_rows:
            return self
        bits = 8 if block_size >= WIDE_LM_HEAD_FROM_BLOCK else self.lm_head_bits
        return replace(self, lm_head_bits=bits, frequent_head_rows=0)

    def quant_options(self, block_size: int, method: str, symmetric: bool, quantize_embedding: bool,
                      edge_weights: frozenset[str], carry_any_source_blocks: bool) -> QuantOptions:
        """The quantizer's options (a settled preset: see for_export), but for the 8-bit matrices, which the
        exporter chooses within the preset's eight_bit_share."""
        return QuantOptions(block_size=block_size, symmetric=symmetric or self.symmetric_only, method=method,
                            form=self.form, lm_head_bits=self.lm_head_bits, lm_head_block_size=self.lm_head_block,
                            lm_head_frequent_rows=self.frequent_head_rows,
                            quantize_embedding=quantize_embedding and self.quantize_embedding,
                            half_minimums=self.half_minimums,
                            sensitive_weights=edge_weights if self.edge_layer_block else frozenset(),
                            sensitive_block_size=self.edge_layer_block or EDGE_LAYER_BLOCK,
                            carry_any_source_blocks=carry_any_source_blocks)

    def head_block(self, block_size: int, hidden: int) -> int:
        """The lm_head's block size along the hidden dimension."""
        own = QuantOptions().lm_head_8bit_block_size if self.lm_head_bits == 8 else self.lm_head_block
        return dividing_block(min(block_size, own) if own else block_size, hidden)

    def bytes_per_weight(self, bits: int, block: int, symmetric: bool | None = None) -> float:
        """Codes, the block's scale and (asymmetric 4-bit) its zero point."""
        symmetric = self.symmetric_only if symmetric is None else symmetric
        return bits / 8 + (self.scale_bytes + (0 if symmetric or bits == 8 else 0.5)) / block

    def layer_bytes(self, layer_weights: int, num_layers: int, block_size: int) -> float:
        """The decoder layers' matrices, the edge layers in their finer blocks, the 8-bit share (symmetric) at most
        as large as it may be."""
        fine = layer_weights * len(edge_layers(num_layers)) / num_layers if self.edge_layer_block else 0
        fine_block = min(block_size, self.edge_layer_block or block_size)
        eight = layer_weights * self.eight_bit_share
        return ((layer_weights - fine - eight) * self.bytes_per_weight(4, block_size)
                + fine * self.bytes_per_weight(4, fine_block)
                + eight * self.bytes_per_weight(8, block_size, symmetric=True))

    def table_bytes(self, vocab: int, hidden: int, tied: bool, block_size: int, float_embedding: bool,
                    float_bytes: int = 4) -> float:
        """The lm_head and the embedding table (stored once when tied and both quantized); an 8-bit head is
        symmetric. For a settled preset whose head has one width (the phone and TensorRT presets)."""
        if self.frequent_head_rows and vocab > self.frequent_head_rows:
            raise ValueError(f"preset '{self.name}': the size of a split lm_head is not estimated")
        table = vocab * hidden
        if self.lm_head_bits is None:
            return table * float_bytes * (1 if tied else 2)
        head_block = self.head_block(block_size, hidden)
        per_weight = self.bytes_per_weight(self.lm_head_bits, head_block, symmetric=self.lm_head_bits == 8 or None)
        head = table * per_weight
        if float_embedding or not self.quantize_embedding:
            return head + table * float_bytes
        return head + (0 if tied else head)


# The cpu target below block 128: the lm_head split (frequent rows at 8 bits), the edge layers in 32-blocks.
CPU_FINE = QuantPreset("cpu", frequent_head_rows=FREQUENT_LM_HEAD_ROWS)
# The cpu target from block 128 up, laid out for speed as onnxruntime-genai's builder does: every layer matrix in
# the layers' blocks, no edge layers; the lm_head and its tied table 8-bit in 64-blocks, which on text the
# calibration never saw lost least of every layout measured (README, INT4 methods table); and the most sensitive
# matrices, up to this share of the layer weights, at 8 bits: the least that kept every held-out kind within +12%
# of fp32 (README, INT4: mixed 4/8 bits).
CPU_FAST_EIGHT_BIT_SHARE = 0.35
CPU_FAST = QuantPreset("cpu, block 128 and up", lm_head_bits=8, lm_head_block=None, edge_layer_block=None,
                       eight_bit_share=CPU_FAST_EIGHT_BIT_SHARE)
CPU_FAST_FROM_BLOCK = 128
# Phones: the cpu graph without the split head, and every block parameter a float32 initializer (a minimal build
# runs the graph unoptimized, so a Cast of float16 minimums would run on every call instead of being folded once).
PHONE = QuantPreset("phone", half_minimums=False)
# TensorRT: symmetric blocked DequantizeLinear feeding MatMul, float16 scales once converted; the embedding lookup
# and the lm_head stay float16 (the parser's INT4 path is for weights feeding MatMul; TensorRT-LLM's INT4 recipes
# leave the lm_head so too); only a source's 4-bit layer blocks can be carried.
TENSORRT_INT4 = QuantPreset("tensorrt", form="dequantizelinear", symmetric_only=True, lm_head_bits=None,
                            edge_layer_block=None, quantize_embedding=False, scale_bytes=2, carried_bits=(4,),
                            carried_layers_only=True)
