"""GGUF sources: metadata to config, dequantization, llama.cpp's Q/K row order undone, export and verify."""

from __future__ import annotations

import json

import gguf
import numpy as np
from helpers import make_hf_model, tiny_config, write_tiny_gguf

from llama_export.exporter.pipeline import ExportOptions, export
from llama_export.exporter.sources import open_checkpoint


def test_tiny_gguf_weights_are_the_dequantized_originals(tmp_path):
    path = tmp_path / "tiny.gguf"
    original = write_tiny_gguf(path)
    checkpoint = open_checkpoint(path)
    config, expected_config = checkpoint.config, tiny_config("llama2-gqa")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings"):
        assert getattr(config, key) == getattr(expected_config, key), key
    assert config.rope_parameters["rope_theta"] == expected_config.rope_parameters["rope_theta"]
    assert config.tie_word_embeddings is False
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, tensor in original.items():
        loaded = checkpoint.weight(name).load()
        expected = tensor if tensor.ndim == 1 else gguf.quants.dequantize(gguf.quants.quantize(tensor, q8), q8)
        assert loaded.shape == tensor.shape, name
        assert np.array_equal(loaded, expected), name


def test_tiny_gguf_exports_and_verifies(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, seed=5)
    output = export(ExportOptions(model=str(path), output=tmp_path / "pkg", quiet=True))
    parity = json.loads((output / "manifest.json").read_text())["parity"]
    assert parity["passed"] and parity["greedy_tokens_matched"] == parity["greedy_tokens_compared"] == 96
    assert not (output / "tokenizer.json").exists()  # the GGUF carries no tokenizer


def test_every_carried_block_format_decodes_to_ggufs_dequantized_values():
    """Random blocks of each format llama-export carries (every bit pattern of codes, scales and minimums; finite
    float16 fields) decode into codes, scales and minimums that dequantize to gguf's own values bit for bit."""
    from llama_export.exporter.sources.gguf_blocks import FORMATS, decode_rows
    from llama_export.passes.block_quantized import BlockQuantized

    rng = np.random.default_rng(0)
    float16_fields = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2],
                      "Q5_K": [0, 2], "Q6_K": [208]}
    assert set(float16_fields) == set(FORMATS)
    for kind, fmt in FORMATS.items():
        rows, blocks = 3, 8
        raw = rng.integers(0, 256, (rows * blocks, fmt.block_bytes), dtype=np.uint8)
        for offset in float16_fields[kind]:
            raw[:, offset:offset + 2] = rng.normal(0, 0.01, (len(raw), 1)).astype(np.float16).view(np.uint8)
        data = raw.reshape(rows, -1)
        expected = gguf.dequantize(data, gguf.GGMLQuantizationType[kind]).reshape(rows, -1).astype(np.float32)
        codes, scales, minimums = decode_rows(data, rows, kind)
        assert codes.dtype == np.uint8 and codes.max() < (1 << fmt.bits), kind
        assert scales.shape == (rows, blocks * fmt.weights // fmt.sub_block), kind
        got = BlockQuantized(codes, scales, None, fmt.bits, fmt.sub_block, minimums=minimums).dequantize()
        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32)), kind


def test_export_memory_counts_a_gguf_by_its_own_blocks(tmp_path):
    """The memory estimate takes the package's weights at the size the file's blocks keep in it: Q8_0 as 8-bit
    codes and a float32 scale per 32, Q4_1 as 4-bit codes with a scale and a minimum per 32."""
    from llama_export.exporter.export_memory import carried_bytes_per_weight

    for kind, expected in (("Q8_0", 1 + 4 / 32), ("Q4_1", 0.5 + 8 / 32)):
        path = tmp_path / f"{kind}.gguf"
        write_tiny_gguf(path, matrix_type=kind, embedding_type=kind)
        assert carried_bytes_per_weight(open_checkpoint(path)) == expected, kind
    folder = make_hf_model(tmp_path / "hf", "llama2-gqa")  # float weights: nothing carried
    assert carried_bytes_per_weight(open_checkpoint(folder)) is None
