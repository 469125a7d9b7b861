"""A model family defined in this file alone (Mistral, whose transformers classes differ from LLaMA's by name
only when sliding_window is off), registered, exports and verifies through the same code as LLaMA: nothing in
the exporter or the targets names LLaMA's classes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
import torch
from helpers import TINY, VARIANTS, genai_greedy, write_tiny_tokenizer

from llama_export.exporter.pipeline import ExportOptions, export
from llama_export.families import FAMILIES, register
from llama_export.families.llama import LLAMA

MISTRAL = replace(LLAMA, name="mistral", model_types=("mistral",), genai_type="mistral",
                  modeling="transformers.models.mistral.modeling_mistral", causal_lm="MistralForCausalLM",
                  config_class="MistralConfig", decoder_layer="MistralDecoderLayer", norm="MistralRMSNorm",
                  rotary="MistralRotaryEmbedding", gguf_architecture=None)


@pytest.fixture
def mistral(tmp_path) -> Path:
    from transformers import MistralConfig, MistralForCausalLM

    register(MISTRAL)
    torch.manual_seed(0)
    config = MistralConfig(**{**TINY, **VARIANTS["llama2-gqa"]}, sliding_window=None, tie_word_embeddings=False)
    folder = tmp_path / "mistral"
    MistralForCausalLM(config).eval().save_pretrained(folder)
    write_tiny_tokenizer(folder, TINY["vocab_size"])
    yield folder
    FAMILIES.pop("mistral")


def test_a_family_from_one_file_exports_verifies_and_runs_in_genai(mistral, tmp_path):
    from transformers import MistralForCausalLM

    out = export(ExportOptions(model=str(mistral), output=tmp_path / "pkg", quiet=True))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["architecture"] == "mistral"
    assert manifest["parity"]["passed"] and manifest["parity"]["max_abs_logit_diff"] <= 1e-3
    assert "MistralForCausalLM" in manifest["parity"]["reference"]
    assert json.loads((out / "genai_config.json").read_text())["model"]["type"] == "mistral"
    ops = [n.op_type for n in onnx.load(out / "model.onnx", load_external_data=False).graph.node]
    layers = TINY["num_hidden_layers"]
    assert ops.count("GroupQueryAttention") == layers and ops.count("SkipSimplifiedLayerNormalization") == 2 * layers
    prompt = [5, 17, 42, 99, 3]
    model = MistralForCausalLM.from_pretrained(mistral, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                  attention_mask=torch.ones((1, len(prompt)), dtype=torch.long))[0, len(prompt):]
    assert genai_greedy(out, prompt, 12) == expected.tolist()


def test_an_unregistered_family_is_refused_in_one_line(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(**{**TINY, **VARIANTS["llama2-gqa"]}, sliding_window=None)
    MistralForCausalLM(config).save_pretrained(tmp_path / "mistral")
    with pytest.raises(Exception, match="unsupported architecture 'mistral'; llama-export handles LLaMA-family"):
        export(ExportOptions(model=str(tmp_path / "mistral"), output=tmp_path / "pkg", quiet=True))
    assert not (tmp_path / "pkg").exists()
