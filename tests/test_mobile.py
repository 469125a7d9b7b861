"""Phone targets: ORT-format packages, their operator lists, the format's size limit, and parity with the cpu
target's graph they are converted from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import genai_greedy, make_hf_model, run_cli, transformers_greedy

from llama_export.runtimes import OnnxPackage
from llama_export.targets import get_target
from llama_export.targets.base import TargetError
from llama_export.targets.mobile import ORT_FORMAT_LIMIT, check_size, estimated_model_bytes
from llama_export.targets.plan import ModelShape

LLAMA_32_1B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
               "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
               "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
               "tie_word_embeddings": True, "rope_theta": 500000.0, "bos_token_id": 128000,
               "eos_token_id": 128001, "torch_dtype": "bfloat16"}
LLAMA_3_8B = {**LLAMA_32_1B, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "tie_word_embeddings": False}


def _config_only_folder(folder: Path, config: dict) -> Path:
    """A Hugging Face folder with the config of a large model and every tensor's header, its data a sparse file
    of zeros (nothing on disk): enough to be opened, and the size check must refuse it before any weight is read."""
    from transformers import LlamaConfig

    from llama_export.exporter.sources.base import expected_shapes

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    header, offset = {}, 0
    for name, shape in expected_shapes(LlamaConfig(**config)).items():
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded)
        f.truncate(8 + len(encoded) + offset)
    return folder


def test_size_estimate_matches_a_written_package(tmp_path, tiny_models):
    out = tmp_path / "ios"
    result = run_cli("--target", "ios-arm64", "--precision", "fp32", "--model", str(tiny_models["llama2-gqa"]),
                     "--output", str(out), "--quiet", "--no-verify")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    shape = ModelShape.from_json(tiny_models["llama2-gqa"] / "config.json")
    weights = sum(v for k, v in manifest["ort_format"]["size_breakdown"].items()
                  if k not in ("graph and format", "rotary cos/sin caches"))
    assert estimated_model_bytes(shape, "fp32", 32) == pytest.approx(weights, rel=0.01)
    assert sum(manifest["ort_format"]["size_breakdown"].values()) == (out / "model.ort").stat().st_size


@pytest.mark.parametrize("options, lm_head_bits, float_embedding, layers", [
    (("--block-size", "32"), 4, False, 2),
    (("--block-size", "64", "--lm-head-bits", "8"), 8, False, 2),  # the 8-bit lm_head and table in 64-blocks
    (("--block-size", "64", "--keep-embedding"), 4, True, 2),  # the lookup table stays fp32
    (("--block-size", "64"), 4, False, 8),  # deep enough for the first and last layers' 32-blocks
])
def test_int4_size_estimate_follows_the_lm_head_options_and_edge_layers(tmp_path, tiny_models, options,
                                                                        lm_head_bits, float_embedding, layers):
    from dataclasses import replace

    from llama_export.targets.presets import edge_layers

    model = tiny_models["llama2-gqa"] if layers == 2 else make_hf_model(tmp_path / "deep", "llama2-gqa",
                                                                        num_hidden_layers=layers)
    out = tmp_path / "android"
    result = run_cli("--target", "android-arm64", "--precision", "int4", "--model", str(model),
                     "--output", str(out), "--quiet", "--no-verify", *options)
    assert result.returncode == 0, result.stderr
    breakdown = json.loads((out / "manifest.json").read_text())["ort_format"]["size_breakdown"]
    weights = sum(v for k, v in breakdown.items() if k not in ("graph and format", "rotary cos/sin caches"))
    shape = ModelShape.from_json(model / "config.json")
    fine_layers = len(edge_layers(layers))
    assert fine_layers == (2 if layers >= 8 else 0)
    preset = get_target("android-arm64").int4_preset(64).for_export(64, lm_head_bits, shape.vocab)
    assert preset.lm_head_bits == lm_head_bits and preset.half_minimums is False
    estimate = estimated_model_bytes(shape, "int4", int(options[1]), preset, float_embedding)
    assert estimate == pytest.approx(weights, rel=0.01)
    if fine_layers:  # the edge layers' finer blocks are large enough to matter at this tolerance
        no_edge_layers = replace(preset, edge_layer_block=None)
        assert estimated_model_bytes(shape, "int4", 64, no_edge_layers, float_embedding) != pytest.approx(weights,
                                                                                                          rel=0.01)


def test_size_limit_refusals_say_what_would_fit():
    one_b = ModelShape.from_config(LLAMA_32_1B, "Llama-3.2-1B")
    eight_b = ModelShape.from_config(LLAMA_3_8B, "Llama-3-8B")
    android = get_target("android-arm64")
    assert check_size(android, one_b, "int4", 32) < ORT_FORMAT_LIMIT
    with pytest.raises(TargetError, match=r"Llama-3.2-1B in fp32 needs about 4\.\d GiB.*--precision int4 would fit"):
        check_size(android, one_b, "fp32", 32)
    with pytest.raises(TargetError, match=r"Llama-3-8B in int4 needs about 4\.\d GiB.*up to about 3\.\dB parameters"):
        check_size(android, eight_b, "int4", 32)


def test_export_refuses_a_model_over_the_format_limit(tmp_path):
    folder = _config_only_folder(tmp_path / "Llama-3.2-1B", LLAMA_32_1B)
    out = tmp_path / "out"
    result = run_cli("--target", "android-arm64", "--precision", "fp32", "--model", str(folder), "--output", str(out))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("llama-export")]
    assert len(errors) == 1 and "2 GiB" in errors[0] and "--precision int4 would fit" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and "Tracing" not in result.stderr  # refused before tracing
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["Llama-3.2-1B"]


@pytest.fixture(scope="module")
def tiny_int4_pair(tmp_path_factory, tiny_models):
    """The same tiny model as a cpu int4 package and an android-arm64 one (no verify: random tiny models are not
    held to INT4's agreement floor, see test_int4). Round-to-nearest, so the two exports hold the same weights:
    calibration's float32 PyTorch forward differs in the last bits in ~1 process of 10 (MKL's kernels; stable with
    MKL_CBWR=COMPATIBLE), which moved one logit 1.04e-5 between two calibrated exports."""
    root = tmp_path_factory.mktemp("mobile")
    packages = {}
    for target in ("cpu", "android-arm64"):
        packages[target] = root / target
        result = run_cli("--target", target, "--precision", "int4", "--quant", "rtn", "--model",
                         str(tiny_models["llama2-gqa"]), "--output", str(packages[target]), "--quiet", "--no-verify")
        assert result.returncode == 0, result.stderr
    return packages


def test_ort_package_layout(tiny_int4_pair):
    folder = tiny_int4_pair["android-arm64"]
    files = {p.name for p in folder.iterdir()}
    assert {"model.ort", "required_operators.config", "genai_config.json", "tokenizer.json",
            "manifest.json"} <= files
    assert not files & {"model.onnx", "model.onnx.data"}  # the ORT format holds everything in one file
    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    assert decoder["filename"] == "model.ort"
    assert "intra_op_num_threads" not in decoder["session_options"]  # phones keep genai's default (big cores)
    operators = (folder / "required_operators.config").read_text()
    microsoft = next(line for line in operators.splitlines() if line.startswith("com.microsoft;"))
    assert {"GroupQueryAttention", "MatMulNBits", "SkipSimplifiedLayerNormalization",
            "GatherBlockQuantized"} <= set(microsoft.split(";")[2].split(","))
    assert str(folder.parent) not in operators and ".partial-" not in operators
    manifest = json.loads((folder / "manifest.json").read_text())
    breakdown = manifest["ort_format"]["size_breakdown"]
    assert breakdown["decoder layer matrices"] > 0 and breakdown["embedding"] > 0
    assert manifest["ort_format"]["model_bytes"] == (folder / "model.ort").stat().st_size
    assert manifest["target"] == "android-arm64" and manifest["precision"] == "int4"


def test_ort_package_computes_what_the_cpu_package_computes(tiny_int4_pair):
    """The conversion changes the container, not the graph: logits equal the cpu package's, prefill and decode."""
    from llama_export.runtimes import Decoder

    prompt = [1, 17, 4, 99, 23, 5]
    results = {}
    for target, folder in tiny_int4_pair.items():
        package = OnnxPackage(folder)
        decoder = Decoder(package)
        steps = [decoder.prefill(prompt)[-1]]
        for _ in range(4):
            steps.append(decoder.decode(int(np.argmax(steps[-1]))))
        results[target] = np.stack(steps)
    np.testing.assert_allclose(results["android-arm64"], results["cpu"], rtol=0, atol=1e-5)


def test_fp32_ort_package_verifies_and_runs_in_genai(tmp_path, tiny_models):
    out = tmp_path / "android"
    result = run_cli("--target", "android-arm64", "--precision", "fp32", "--model", str(tiny_models["llama3-gqa"]),
                  "--output", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    parity = json.loads((out / "manifest.json").read_text())["parity"]
    assert parity["passed"] and parity["max_abs_logit_diff"] <= 1e-3
    prompt = [1, 5, 9, 2, 44]
    assert genai_greedy(out, prompt, 12) == transformers_greedy(tiny_models["llama3-gqa"], prompt, 12)
