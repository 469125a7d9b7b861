"""LoRA adapters merged at export: packages against PEFT's own merge_and_unload, several weighted adapters
(rank-stabilized scaling, a per-module alpha, an embedding adapter), the default model on cpu and jetson-orin, and
adapters that do not fit refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import genai_greedy, make_hf_model, run_cli, transformers_greedy

from llama_export.exporter.cli import main
from llama_export.runtimes import OnnxPackage

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapter(base, folder, seed: int, **lora) -> None:
    """A PEFT LoRA adapter on `base` with random A and B (PEFT starts B at zero, which would change nothing)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **lora))
    model.save_pretrained(folder)
    model.unload()  # hands the base back without the adapter layers


def peft_merged(base_folder, adapters, load=None):
    """transformers' model with PEFT merging each (adapter, weight) in turn (merge_and_unload)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import LlamaForCausalLM

    model = load() if load else LlamaForCausalLM.from_pretrained(base_folder)
    for folder, weight in adapters:
        peft = PeftModel.from_pretrained(model, folder)
        for module in peft.modules():
            if isinstance(module, LoraLayer):
                module.scale_layer(weight)
        model = peft.merge_and_unload()
    return model.eval()


def package_logits(package, ids: list[int]) -> np.ndarray:
    onnx_package = OnnxPackage(package)
    array = np.array([ids], dtype=np.int64)
    logits, _ = onnx_package.forward(array, np.ones_like(array), np.arange(len(ids))[None],
                                     onnx_package.empty_cache(1))
    return logits[0]


def test_two_weighted_adapters_match_peft_merge(tmp_path):
    """Adapter A (every linear layer, weight 0.5) then B (rank-stabilized, a per-module alpha, the embedding and the
    output layer): the fp32 package's logits are within 1e-4 of PEFT's merged model and its greedy tokens equal."""
    from transformers import LlamaForCausalLM

    hf = make_hf_model(tmp_path / "hf", "llama2-gqa")
    write_adapter(LlamaForCausalLM.from_pretrained(hf), tmp_path / "a", 1, r=4, lora_alpha=8,
                  target_modules=ALL_LINEAR)
    write_adapter(LlamaForCausalLM.from_pretrained(hf), tmp_path / "b", 2, r=2, lora_alpha=4, use_rslora=True,
                  target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"], alpha_pattern={"v_proj": 16})
    package = tmp_path / "package"
    assert main(["--model", str(hf), "--lora", f"{tmp_path / 'a'}:0.5", "--lora", str(tmp_path / "b"),
                 "--precision", "fp32", "--output", str(package), "--quiet"]) == 0
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["parity"]["passed"]
    assert [entry["weight"] for entry in manifest["source"]["lora"]] == [0.5, 1.0]

    reference = peft_merged(hf, [(tmp_path / "a", 0.5), (tmp_path / "b", 1.0)])
    prompt = [1, 17, 42, 99, 5, 250, 31, 8]
    with torch.no_grad():
        expected = reference(torch.tensor([prompt])).logits[0].numpy()
        base = LlamaForCausalLM.from_pretrained(hf).eval()(torch.tensor([prompt])).logits[0].numpy()
    logits = package_logits(package, prompt)
    assert np.max(np.abs(logits - expected)) <= 1e-4
    assert np.max(np.abs(base - expected)) > 0.1  # the adapters change the model: the check above can fail
    assert genai_greedy(package, prompt, 16) == transformers_greedy(reference, prompt, 16)
    # `verify` merges the adapters the manifest records into its reference
    result = run_cli("verify", str(package), "--tokens", "8")
    assert result.returncode == 0, result.stdout + result.stderr


def test_lora_on_default_model_cpu_and_jetson_orin(tmp_path, default_gguf):
    """An adapter on the default model: the cpu package's greedy tokens equal PEFT's merged model's (and differ from
    the base model's); the jetson-orin package (its default INT4) is written and verifies."""
    from transformers import LlamaForCausalLM

    def load():
        return LlamaForCausalLM.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)

    adapter = tmp_path / "adapter"
    write_adapter(load(), adapter, 3, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj",
                                                                           "down_proj"])
    cpu = tmp_path / "cpu"
    assert main(["--model", str(default_gguf), "--lora", str(adapter), "--precision", "fp32", "--output", str(cpu),
                 "--verify-tokens", "8", "--quiet"]) == 0
    prompt = [1, 504, 3458, 282, 4649, 314, 253, 1345]
    merged = transformers_greedy(peft_merged(None, [(adapter, 1.0)], load), prompt, 24)
    assert genai_greedy(cpu, prompt, 24) == merged
    assert merged != transformers_greedy(load().eval(), prompt, 24)

    orin = tmp_path / "orin"
    # RTN keeps the suite short; the default GPTQ export of this package was checked by hand (README)
    assert main(["--target", "jetson-orin", "--model", str(default_gguf), "--lora", str(adapter), "--output",
                 str(orin), "--quant", "rtn", "--verify-tokens", "8", "--quiet"]) == 0
    manifest = json.loads((orin / "manifest.json").read_text())
    assert manifest["precision"] == "int4" and manifest["parity"]["passed"]
    assert manifest["source"]["lora"] == [{"path": str(adapter.resolve()), "weight": 1.0}]


@pytest.fixture(scope="module")
def base_and_other(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-bad")
    from transformers import LlamaForCausalLM

    make_hf_model(root / "base", "llama2-gqa")
    other = make_hf_model(root / "other", "llama2-gqa", hidden_size=32, intermediate_size=64)
    write_adapter(LlamaForCausalLM.from_pretrained(other), root / "other-adapter", 4, r=2, lora_alpha=4,
                  target_modules=["q_proj", "down_proj"])
    tied = make_hf_model(root / "tied", "llama3.2-tied")
    write_adapter(LlamaForCausalLM.from_pretrained(tied), root / "lm-head-adapter", 5, r=2, lora_alpha=4,
                  target_modules=["lm_head"])
    return root


@pytest.mark.parametrize("model, adapter, message", [
    ("base", "other-adapter", "the adapter's 'model.layers.0.mlp.down_proj' has A [2, 64] and B [32, 2], which do "
                              "not fit the model's tensor 'model.layers.0.mlp.down_proj.weight' [64, 128]"),
    ("tied", "lm-head-adapter", "which this model ties to its embedding"),
    ("base", "missing", "not found (expected a PEFT adapter folder)"),
    ("base", "base", "no adapter_config.json"),
])
def test_adapters_that_do_not_fit_are_refused(base_and_other, model, adapter, message):
    result = run_cli("--model", str(base_and_other / model), "--lora", str(base_and_other / adapter), "--output",
                     str(base_and_other / "out"), "--quiet")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert not (base_and_other / "out").exists()


def test_runtime_adapters_switch_to_each_merge(tmp_path):
    """A cpu package that keeps the base weights and takes two adapters at run time (onnxruntime-genai's
    og.Adapters): with each active its greedy tokens equal PEFT's merge of that adapter, with none the base model's;
    the q/k/v adapter lands in the packed attention projection, the gate/down one in the packed MLP."""
    import onnxruntime_genai as og
    from transformers import LlamaForCausalLM

    hf = make_hf_model(tmp_path / "hf", "llama2-gqa")
    write_adapter(LlamaForCausalLM.from_pretrained(hf), tmp_path / "style", 6, r=4, lora_alpha=8,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    write_adapter(LlamaForCausalLM.from_pretrained(hf), tmp_path / "domain", 7, r=2, lora_alpha=8, use_rslora=True,
                  target_modules=["gate_proj", "down_proj"])
    package = tmp_path / "package"
    assert main(["--model", str(hf), "--runtime-lora", str(tmp_path / "style"), "--runtime-lora",
                 str(tmp_path / "domain"), "--output", str(package), "--quiet"]) == 0
    manifest = json.loads((package / "manifest.json").read_text())
    assert [entry["file"] for entry in manifest["runtime_lora"]] == ["adapters/style.onnx_adapter",
                                                                     "adapters/domain.onnx_adapter"]
    assert manifest["parity"]["passed"]  # no adapter bound: the base model, verified

    model = og.Model(str(package))
    adapters = og.Adapters(model)
    for entry in manifest["runtime_lora"]:
        adapters.load(str(package / entry["file"]), entry["name"])
    prompt = [1, 17, 42, 99, 5, 250]

    def greedy(name):
        return genai_greedy(package, prompt, 16, model=model, adapter=(adapters, name) if name else None)

    expected = {name: transformers_greedy(peft_merged(hf, [(tmp_path / name, 1.0)]), prompt, 16)
                for name in ("style", "domain")}
    assert expected["style"] != expected["domain"]
    for name in ("style", "domain"):
        assert greedy(name) == expected[name], name
    assert greedy(None) == transformers_greedy(hf, prompt, 16)


def test_runtime_adapters_need_cpu_fp32(tmp_path):
    result = run_cli("--target", "jetson-orin", "--runtime-lora", str(tmp_path), "--output", str(tmp_path / "out"))
    assert result.returncode == 1 and "--runtime-lora needs --target cpu --precision fp32" in result.stderr
