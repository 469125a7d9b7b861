"""Export, run and compare against transformers: tiny random models of each LLaMA generation's shape."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers import VARIANTS, genai_greedy, make_hf_model, transformers_greedy

from llama_export.exporter.pipeline import ExportOptions, export
from llama_export.runtimes import OnnxPackage, generate


@pytest.fixture(scope="module")
def packages(tiny_models, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("packages")
    return {name: export(ExportOptions(model=str(path), output=root / name, quiet=True))
            for name, path in tiny_models.items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_verifies_against_transformers(variant, packages):
    manifest = json.loads((packages[variant] / "manifest.json").read_text())
    parity = manifest["parity"]
    assert parity["passed"], parity
    assert parity["max_abs_logit_diff"] <= 1e-3
    assert parity["greedy_tokens_compared"] == 3 * 32
    assert parity["greedy_tokens_matched"] == parity["greedy_tokens_compared"]
    assert parity["top1_agreement"] == 1.0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_generation_equals_transformers_generate(variant, packages, tiny_models):
    prompt = [1, 17, 42, 99, 5, 250]
    ours = list(generate(OnnxPackage(packages[variant]), prompt, 24, stop_ids=set()))
    assert ours == transformers_greedy(tiny_models[variant], prompt, 24)


@pytest.mark.parametrize("variant", ["llama2-gqa", "llama3.1-rope-scaling"])
def test_batched_padded_prefill_matches_transformers(variant, packages, tiny_models):
    """Dynamic batch with padding: the real tokens of each row equal transformers on the same batch. Rows are padded
    on the right, GroupQueryAttention's convention (it takes each row's length from the mask's sum)."""
    import torch
    from transformers import LlamaForCausalLM

    ids = np.array([[7, 8, 9, 0, 0], [3, 4, 5, 6, 7]], dtype=np.int64)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=np.int64)
    positions = np.tile(np.arange(5, dtype=np.int64), (2, 1))
    package = OnnxPackage(packages[variant])
    logits, present = package.forward(ids, mask, positions, package.empty_cache(2))
    reference = LlamaForCausalLM.from_pretrained(tiny_models[variant], attn_implementation="eager").eval()
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                             position_ids=torch.tensor(positions)).logits.numpy()
    real = mask.astype(bool)
    assert np.max(np.abs(logits[real] - expected[real])) <= 1e-4
    assert present[0].shape == (2, package.kv_heads, 5, package.head_size)


def test_package_layout_and_io(packages):
    folder = packages["llama2-gqa"]
    names = {p.name for p in folder.iterdir()}
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "tokenizer_config.json",
            "manifest.json"} <= names
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    assert model.opset_import[0].version == 23 or any(o.version == 23 for o in model.opset_import if o.domain == "")
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    # position_ids is dropped: rotary runs inside GroupQueryAttention, from the cache length.
    assert inputs == ["input_ids", "attention_mask", "past_key_values.0.key",
                      "past_key_values.0.value", "past_key_values.1.key", "past_key_values.1.value"]
    assert outputs == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    past = model.graph.input[2].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in past] == ["batch", 2, "past_sequence", 16]
    # Every weight lives in the external-data file, none inline.
    big_inline = [t.name for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL
                  and np.prod(t.dims) > 1024]
    assert big_inline == []
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["tool"] == "llama-export" and manifest["target"] == "cpu" and manifest["precision"] == "fp32"
    assert manifest["source"]["content_hash"].startswith("sha256:")
    assert manifest["io"]["inputs"]["input_ids"]["shape"] == ["batch", "sequence"]
    genai = json.loads((folder / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["num_key_value_heads"] == 2
    assert genai["search"]["past_present_share_buffer"] is True
    assert "position_ids" not in genai["model"]["decoder"]["inputs"]
    # One intra-op thread per physical core, not onnxruntime-genai's half of the logical cores.
    assert genai["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 0


def test_sharded_checkpoint(tmp_path):
    folder = make_hf_model(tmp_path / "sharded", "llama2-gqa", seed=3, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file()
    output = export(ExportOptions(model=str(folder), output=tmp_path / "pkg", quiet=True))
    assert json.loads((output / "manifest.json").read_text())["parity"]["passed"]


def test_onnxruntime_genai_generates_the_same_tokens(packages):
    pytest.importorskip("onnxruntime_genai")
    folder = packages["llama3-gqa"]
    prompt = [1, 17, 42, 99, 5]
    theirs = genai_greedy(folder, prompt, 20)
    assert len(theirs) >= 4
    assert theirs == list(generate(OnnxPackage(folder), prompt, len(theirs), stop_ids=set()))


def test_tied_embedding_is_stored_once(packages):
    model = onnx.load(str(packages["llama3.2-tied"] / "model.onnx"), load_external_data=False)
    vocab_sized = [t.name for t in model.graph.initializer if 320 in t.dims]  # TINY vocab_size
    assert len(vocab_sized) == 1, vocab_sized
    untied = onnx.load(str(packages["llama2-gqa"] / "model.onnx"), load_external_data=False)
    assert len([t.name for t in untied.graph.initializer if 320 in t.dims]) == 2
