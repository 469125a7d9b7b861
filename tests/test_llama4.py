"""LLaMA 4 text models on tiny random Llama4ForCausalLM folders of both published shapes: every layer a mixture of
experts (Scout) and alternating dense/MoE layers (Maverick), chunked attention with a chunk of 8 tokens so prompts
and decoding cross it, NoPE layers with temperature tuning that changes the scores at these positions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import genai_greedy, gguf_writer, run_cli, write_tiny_tokenizer

from llama_export.exporter.pipeline import ExportOptions, export

CHUNK = 8
LONG_PROMPT = [5, 17, 42, 99, 3, 8, 9, 10, 11, 12, 13, 14, 15, 16, 40, 41, 77, 300, 301, 2]  # 2.5 chunks


def _config(moe_step: int):
    from transformers import Llama4TextConfig

    return Llama4TextConfig(
        vocab_size=512, hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
        interleave_moe_layer_step=moe_step, attention_chunk_size=CHUNK, floor_scale=4, attn_scale=0.5,
        max_position_embeddings=256, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def _make(folder: Path, moe_step: int) -> Path:
    from transformers import Llama4ForCausalLM

    torch.manual_seed(0)
    model = Llama4ForCausalLM(_config(moe_step)).eval()
    with torch.no_grad():  # routers and experts of the size that makes routing matter
        for name, parameter in model.named_parameters():
            if "experts" in name or "router" in name:
                parameter.normal_(0, 0.2)
    model.save_pretrained(folder)
    write_tiny_tokenizer(folder, 512)
    return folder


@pytest.fixture(scope="module")
def llama4_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama4")
    return {"scout": _make(root / "scout", 1), "maverick": _make(root / "maverick", 2)}


def _hf(folder: Path):
    from transformers import Llama4ForCausalLM

    return Llama4ForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def _ops(package: Path) -> list[str]:
    return [n.op_type for n in onnx.load(package / "model.onnx", load_external_data=False).graph.node]


def test_the_traced_experts_compute_transformers_moe():
    """The routed form (top-1 sigmoid score on the input, only the chosen expert) equals transformers' dense
    Llama4TextMoe, which runs every expert."""
    from transformers.models.llama4 import modeling_llama4

    from llama_export.families.llama4 import LLAMA4

    torch.manual_seed(1)
    moe = modeling_llama4.Llama4TextMoe(_config(1)).eval()
    with torch.no_grad():
        for parameter in moe.parameters():
            parameter.normal_(0, 0.2)
        x = torch.randn(2, 7, 64)
        expected = moe(x)[0]
        with LLAMA4.traced_forms():
            routed = modeling_llama4.Llama4TextMoe.forward(moe, x)[0]
    assert torch.allclose(routed, expected, atol=1e-5)


@pytest.mark.parametrize("shape", ["scout", "maverick"])
def test_fp32_package_matches_transformers_across_chunks(llama4_models, shape, tmp_path):
    folder = llama4_models[shape]
    out = export(ExportOptions(model=str(folder), output=tmp_path / "pkg", quiet=True))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["architecture"] == "llama4"
    parity = manifest["parity"]
    assert parity["passed"] and parity["max_abs_logit_diff"] <= 1e-3
    assert "Llama4ForCausalLM" in parity["reference"]
    ops = _ops(out)
    moe_layers = 4 if shape == "scout" else 2
    assert ops.count("MoE") == moe_layers and "RoutedExperts" not in ops

    model = _hf(folder)
    # the whole long prompt in one step: chunked masks over 2.5 chunks, NoPE temperature at positions past 4
    from llama_export.runtimes import Decoder, OnnxPackage

    decoder = Decoder(OnnxPackage(out))
    logits = decoder.prefill(LONG_PROMPT)
    with torch.no_grad():
        expected = model(torch.tensor([LONG_PROMPT])).logits[0].numpy()
    assert np.abs(logits - expected).max() <= 1e-3
    # decoding across chunk boundaries, by onnxruntime-genai against transformers' own generate()
    with torch.no_grad():
        tokens = model.generate(torch.tensor([LONG_PROMPT[:11]]), max_new_tokens=20, min_new_tokens=20,
                                do_sample=False, attention_mask=torch.ones((1, 11), dtype=torch.long))[0, 11:]
    assert genai_greedy(out, LONG_PROMPT[:11], 20) == tokens.tolist()


def test_int4_cpu_package_quantizes_the_experts_per_expert(llama4_models, tmp_path):
    out = export(ExportOptions(model=str(llama4_models["scout"]), output=tmp_path / "pkg", precision="int4",
                               quiet=True))
    manifest = json.loads((out / "manifest.json").read_text())
    exactness = manifest["parity"]["exactness"]
    assert exactness["passed"] and exactness["max_abs_logit_diff"] <= 1e-3  # against its own 4-bit experts
    ops = _ops(out)
    assert ops.count("QMoE") == 4 and "MoE" not in ops
    model = onnx.load(out / "model.onnx", load_external_data=False)
    qmoe = next(n for n in model.graph.node if n.op_type == "QMoE")
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in qmoe.attribute}
    assert attributes["expert_weight_bits"] == 4 and attributes["k"] == 1
    assert genai_greedy(out, LONG_PROMPT[:11], 8)  # onnxruntime-genai runs it


def test_jetson_thor_package_groups_tokens_by_expert(llama4_models, tmp_path):
    out = export(ExportOptions(model=str(llama4_models["maverick"]), output=tmp_path / "pkg",
                               target="jetson-thor", quiet=True))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["exactness"]["passed"]
    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    assert not [n for n in graph.node if n.domain not in ("", "ai.onnx")]  # TensorRT's parser takes plain ONNX
    quantized = {n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    experts = {name for name in quantized if ".experts." in name}
    assert len(experts) == 2 * 4 * 2  # gate_up and down of 4 experts in each of the 2 MoE layers, all INT4


def test_plan_counts_total_and_active_parameters_of_scout(tmp_path):
    text = {"model_type": "llama4_text", "hidden_size": 5120, "intermediate_size": 8192,
            "intermediate_size_mlp": 16384, "num_hidden_layers": 48, "num_attention_heads": 40,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 202048, "num_local_experts": 16,
            "num_experts_per_tok": 1, "interleave_moe_layer_step": 1, "max_position_embeddings": 10485760,
            "attention_chunk_size": 8192, "tie_word_embeddings": False}
    config = tmp_path / "scout" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"model_type": "llama4", "text_config": text}))  # as Meta's folder has it
    result = run_cli("plan", "--target", "jetson-thor", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "107.8B in total, 17.2B active per token" in result.stdout  # Meta: 109B with the vision encoder, 17B
    assert "fits" in result.stdout


def test_more_than_one_expert_per_token_is_refused_in_one_line(llama4_models, tmp_path):
    folder = tmp_path / "two-experts"
    folder.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).symlink_to(llama4_models["scout"] / name)
    config = json.loads((llama4_models["scout"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": 2}))
    result = run_cli("--model", str(folder), "--output", str(tmp_path / "out"))
    assert result.returncode != 0 and not (tmp_path / "out").exists()
    errors = [line for line in result.stderr.splitlines() if line.startswith("llama-export: error:")]
    assert len(errors) == 1 and "num_experts_per_tok is 2" in errors[0] and "Traceback" not in result.stderr


def _multimodal_copy(text_folder: Path, folder: Path, prefix: str, model_prefix: str) -> Path:
    """The text model as a multimodal checkpoint holds it: a llama4 config with the text config inside, the text
    weights renamed, vision tensors beside them."""
    from safetensors.torch import load_file, save_file

    folder.mkdir()
    state = {}
    for name, tensor in load_file(text_folder / "model.safetensors").items():
        renamed = name if name == "lm_head.weight" and not prefix else prefix + name
        state[renamed.replace("model.", model_prefix, 1) if model_prefix else renamed] = tensor
    state["vision_model.patch_embedding.linear.weight"] = torch.zeros(8, 8)
    state["multi_modal_projector.linear_1.weight"] = torch.zeros(8, 8)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    text = json.loads((text_folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({"model_type": "llama4", "text_config": text,
                                                    "architectures": ["Llama4ForConditionalGeneration"]}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((text_folder / name).read_bytes())
    return folder


def test_a_multimodal_folder_exports_its_text_model(llama4_models, tmp_path):
    from llama_export.exporter.sources import open_checkpoint

    text = llama4_models["scout"]
    meta = _multimodal_copy(text, tmp_path / "meta", "language_model.", "")  # Meta's hub folders
    saved = _multimodal_copy(text, tmp_path / "saved", "", "model.language_model.")  # transformers 5's save
    expected = set(open_checkpoint(text).weights)
    assert set(open_checkpoint(meta).weights) == expected == set(open_checkpoint(saved).weights)
    out = export(ExportOptions(model=str(meta), output=tmp_path / "pkg", quiet=True))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["architecture"] == "llama4" and manifest["parity"]["passed"]
    model = _hf(text)
    with torch.no_grad():
        tokens = model.generate(torch.tensor([LONG_PROMPT[:11]]), max_new_tokens=12, min_new_tokens=12,
                                do_sample=False, attention_mask=torch.ones((1, 11), dtype=torch.long))[0, 11:]
    assert genai_greedy(out, LONG_PROMPT[:11], 12) == tokens.tolist()


def _write_llama4_gguf(model, path: Path, matrix_type: str) -> None:
    """The model as llama.cpp's converter writes a llama4 file (conversion/llama.py, Llama4Model): gate_up_proj
    split into gate and up expert stacks of [experts, out, in], down_proj as [experts, out, in], Q/K rows as they
    are, the dense MLP width as feed_forward_length and the experts' as expert_feed_forward_length."""
    import gguf

    config = model.config
    writer = gguf_writer(path, "llama4", config, config.intermediate_size_mlp)
    writer.add_expert_feed_forward_length(config.intermediate_size)
    writer.add_expert_count(config.num_local_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_interleave_moe_layer_step(config.interleave_moe_layer_step)
    names = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "feed_forward.router": "ffn_gate_inp", "feed_forward.shared_expert.gate_proj": "ffn_gate_shexp",
             "feed_forward.shared_expert.up_proj": "ffn_up_shexp",
             "feed_forward.shared_expert.down_proj": "ffn_down_shexp", "feed_forward.gate_proj": "ffn_gate",
             "feed_forward.up_proj": "ffn_up", "feed_forward.down_proj": "ffn_down"}

    def add(name: str, tensor: np.ndarray) -> None:
        if tensor.ndim == 1:
            writer.add_tensor(name, tensor.astype(np.float32))
            return
        kind = gguf.GGMLQuantizationType[matrix_type]
        data = gguf.quants.quantize(np.ascontiguousarray(tensor, np.float32), kind)
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=kind)

    for name, tensor in model.state_dict().items():
        tensor = tensor.numpy()
        if name in names:
            add(f"{names[name]}.weight", tensor)
            continue
        layer, rest = name.split(".")[2], ".".join(name.split(".")[3:])
        if rest == "feed_forward.experts.gate_up_proj":
            gate, up = np.split(tensor.transpose(0, 2, 1), 2, axis=1)
            add(f"blk.{layer}.ffn_gate_exps.weight", gate)
            add(f"blk.{layer}.ffn_up_exps.weight", up)
        elif rest == "feed_forward.experts.down_proj":
            add(f"blk.{layer}.ffn_down_exps.weight", tensor.transpose(0, 2, 1))
        else:
            add(f"blk.{layer}.{parts[rest.removesuffix('.weight')]}.weight", tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("matrix_type", ["F32", "Q8_0"])
def test_a_llama_cpp_llama4_gguf_exports_and_matches_its_weights(tmp_path, matrix_type):
    """A llama4 GGUF (llama.cpp's fixed chunk of 8192 and temperature settings, which the model here has too)
    reads back as the transformers model it was written from, experts joined, and exports a verified package."""
    from transformers import Llama4ForCausalLM

    from llama_export.exporter.sources import open_checkpoint

    config = _config(2)
    config.attention_chunk_size, config.floor_scale, config.attn_scale = 8192, 8192, 0.1
    torch.manual_seed(0)
    model = Llama4ForCausalLM(config).eval()
    path = tmp_path / "tiny-llama4.gguf"
    _write_llama4_gguf(model, path, matrix_type)
    checkpoint = open_checkpoint(path)
    assert checkpoint.config.num_local_experts == 4 and checkpoint.config.intermediate_size_mlp == 96
    assert checkpoint.config.moe_layers == [1, 3] and checkpoint.config.attention_chunk_size == 8192
    state = model.state_dict()
    tolerance = 0 if matrix_type == "F32" else 0.02
    for name in ("model.layers.1.feed_forward.experts.gate_up_proj", "model.layers.1.feed_forward.experts.down_proj",
                 "model.layers.0.feed_forward.gate_proj.weight", "model.layers.1.feed_forward.router.weight"):
        ours = checkpoint.weight(name)
        assert ours.shape == tuple(state[name].shape)
        assert np.abs(ours.load() - state[name].numpy()).max() <= tolerance * np.abs(state[name].numpy()).max()
    assert np.array_equal(checkpoint.weight(name := "model.layers.1.feed_forward.experts.down_proj").rows(2, 3),
                          checkpoint.weight(name).load()[2:3])
    out = export(ExportOptions(model=str(path), output=tmp_path / "pkg", quiet=True))
    parity = json.loads((out / "manifest.json").read_text())["parity"]
    assert parity["passed"] and parity["max_abs_logit_diff"] <= 1e-3


def test_int4_options_the_experts_cannot_take_are_refused_in_one_line(llama4_models, tmp_path):
    for option, needle in ((["--block-size", "128"], "--block-size 128"), (["--eight-bit-share", "0.2"],
                                                                             "--eight-bit-share")):
        result = run_cli("--model", str(llama4_models["scout"]), "--precision", "int4", *option,
                         "--output", str(tmp_path / "out"))
        errors = [line for line in result.stderr.splitlines() if line.startswith("llama-export: error:")]
        assert result.returncode != 0 and not (tmp_path / "out").exists() and "Traceback" not in result.stderr
        assert len(errors) == 1 and needle in errors[0]
