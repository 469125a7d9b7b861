"""--eight-bit-share: the streamed sensitivity pass (exporter/sensitivity.py) against whole-model autograd, the
choice within the share, and the packages it makes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from helpers import CORPUS, write_tiny_gguf
from onnx import helper
from safetensors.numpy import load_file

from llama_export.exporter.cli import main
from llama_export.exporter.sensitivity import MatrixGroup, eight_bit_weights, sampled_tokens, sensitivities


def test_the_costliest_groups_per_weight_are_kept_within_the_share():
    groups = [MatrixGroup(("a",), 100, 10.0), MatrixGroup(("b", "c"), 300, 60.0), MatrixGroup(("d",), 100, 15.0),
              MatrixGroup(("e",), 500, 20.0)]
    # per weight: b/c 0.2, d 0.15, a 0.1, e 0.04; a 40% share (400 weights) takes b/c then d
    assert eight_bit_weights(groups, 0.4) == {"b", "c", "d"}
    # b/c does not fit in 25% (250): the next ones that fit are taken
    assert eight_bit_weights(groups, 0.25) == {"d", "a"}
    assert eight_bit_weights(groups, 0.0) == frozenset()
    # matrices carried over in their own blocks are never chosen; the budget is still a share of all the weights
    assert eight_bit_weights(groups, 0.4, exclude={"c"}) == {"d", "a"}


def test_sampled_tokens_follow_the_head_distribution_over_row_chunks():
    """Gumbel-max over 100-row chunks of a 320-row head: the normalizer is the whole head's logsumexp and each
    token is drawn with its softmax probability (20000 draws, within 5 standard errors)."""
    from llama_export.exporter.sources.base import WeightInfo

    rng = np.random.default_rng(0)
    head = rng.standard_normal((320, 8)).astype(np.float32)
    info = WeightInfo(head.shape, lambda: head)
    flat = torch.from_numpy(np.repeat(rng.standard_normal((1, 8)).astype(np.float32), 20000, axis=0))
    labels, normalizer = sampled_tokens(flat, info, rows=100)
    logits = flat[0] @ torch.from_numpy(head).T
    assert torch.allclose(normalizer, torch.logsumexp(logits, -1).expand(20000), atol=1e-5)
    probabilities = torch.softmax(logits, -1).numpy()
    counts = np.bincount(labels.numpy(), minlength=320) / 20000
    assert labels.max() >= 200  # tokens of the last chunk are drawn too
    assert np.all(np.abs(counts - probabilities) <= 5 * np.sqrt(probabilities * (1 - probabilities) / 20000) + 1e-4)


@pytest.mark.parametrize("variant", ["llama2-gqa", "llama3.2-tied"])
def test_streamed_scores_equal_whole_model_autograd(tiny_models, monkeypatch, variant):
    """Layer by layer from hidden states on disk and the lm_head in row chunks, the scores are what autograd
    through transformers' whole model gives for the same sampled tokens: sum over windows of
    sum((dL/dW * E)^2), E each matrix's 4-bit round-to-nearest error. The head is read 100 rows at a time (four
    chunks) and the five windows run through a layer in two batches."""
    from transformers import LlamaForCausalLM

    from llama_export.exporter import sensitivity
    from llama_export.exporter.calibrate import calibration_windows
    from llama_export.exporter.sources import open_checkpoint
    from llama_export.passes.block_quantized import quantize_rtn

    monkeypatch.setattr(sensitivity, "HEAD_ROWS", 100)
    folder = tiny_models[variant]
    checkpoint = open_checkpoint(folder)
    text = CORPUS * 4
    groups = sensitivities(checkpoint, text, 32, windows=5)
    assert len(groups) == 4 * 2  # q/k/v, o, gate/up, down in each of the two layers
    packed = {g.names for g in groups}
    assert ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.self_attn.v_proj.weight") in packed
    assert ("model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight") in packed

    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = torch.from_numpy(calibration_windows(checkpoint, text, 5 * 256))
    assert ids.shape == (5, 256)
    with torch.no_grad():
        normed = model.model(ids).last_hidden_state
    labels, _ = sampled_tokens(normed.reshape(-1, normed.shape[-1]), checkpoint.weight("lm_head.weight"), rows=100)
    labels = labels.reshape(ids.shape)
    params = dict(model.named_parameters())
    rounding = {name: torch.from_numpy(quantize_rtn(p.detach().numpy(), 4, 32).dequantize()) - p.detach()
                for name, p in params.items() if name.startswith("model.layers.") and p.dim() == 2}
    expected = dict.fromkeys(rounding, 0.0)
    for window in range(len(ids)):
        model.zero_grad()
        log_probs = torch.log_softmax(model(ids[window:window + 1]).logits[0], -1)
        (-log_probs.gather(-1, labels[window][:, None]).sum()).backward()
        for name in rounding:
            expected[name] += float((params[name].grad * rounding[name]).square().sum())
    for group in groups:
        want = sum(expected[n] for n in group.names)
        assert group.score == pytest.approx(want, rel=1e-3), group.names
        assert group.weights == sum(params[n].numel() for n in group.names)
    assert len({round(g.score, 6) for g in groups}) == len(groups)  # the scores tell the groups apart


def test_an_eight_bit_share_keeps_the_chosen_matrices_at_8_bits_exactly(tiny_models, tmp_path):
    out = tmp_path / "pkg"
    assert main(["--model", str(tiny_models["llama3.2-tied"]), "--precision", "int4", "--block-size", "32",
                 "--eight-bit-share", "0.5", "-o", str(out), "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    chosen = manifest["eight_bit_matrices"]
    assert chosen and all(name.startswith("model.layers.") for name in chosen)
    graph = onnx.load(out / "model.onnx", load_external_data=False).graph

    def attribute(node, name):
        return helper.get_attribute_value(next(a for a in node.attribute if a.name == name))

    parts = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    layers = {}  # each layer MatMulNBits by the checkpoint tensors packed into it
    for node in graph.node:
        if node.op_type == "MatMulNBits" and node.output[0] != "logits":
            prefix, kind = node.input[1].removesuffix(".weight.qweight").rsplit(".", 1)
            layers[tuple(f"{prefix}.{p}.weight" for p in parts.get(kind, (kind,)))] = node
    assert len(layers) == 4 * 2
    eight = [names for names, node in layers.items() if attribute(node, "bits") == 8]
    assert 0 < len(eight) < len(layers)
    assert sorted(n for names in eight for n in names) == sorted(chosen)  # whole packed groups, nothing else
    assert all(attribute(node, "bits") == 4 for names, node in layers.items() if names not in eight)
    assert all(len(layers[names].input) == 3 for names in eight)  # 8-bit ones are symmetric: no zero points
    parity = manifest["parity"]
    assert parity["passed"] and parity["exactness"]["max_abs_logit_diff"] <= 1e-3
    assert parity["exactness"]["weights"]["matrices_compared"] == 7 * 2 + 2  # and the lm_head, the table


def test_eight_bit_share_bad_input_is_one_line(tiny_models, tmp_path, capsys):
    model = str(tiny_models["llama2-gqa"])
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", model, "--precision", "int4", "--eight-bit-share", "2", "-o", str(tmp_path / "a")])
    assert exit_info.value.code == 2 and "--eight-bit-share" in capsys.readouterr().err
    assert main(["--model", model, "--precision", "fp32", "--eight-bit-share", "0.2", "-o", str(tmp_path / "b")]) == 1
    assert "--eight-bit-share applies to --precision int4 only" in capsys.readouterr().err
    assert main(["--model", model, "--target", "tensorrt", "--precision", "int4", "--eight-bit-share", "0.2",
                 "-o", str(tmp_path / "c")]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("llama-export: error")]
    assert len(errors) == 1 and "--eight-bit-share" in errors[0] and "no 8-bit matrices" in errors[0]
    gguf = tmp_path / "q8.gguf"
    write_tiny_gguf(gguf, matrix_type="Q8_0")
    assert main(["--model", str(gguf), "--precision", "int4", "--eight-bit-share", "0.2",
                 "-o", str(tmp_path / "d")]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("llama-export: error")]
    assert len(errors) == 1 and "--requantize" in errors[0] and str(gguf) in errors[0]
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_the_cpu_target_keeps_its_share_at_8_bits_from_block_128_by_default(tiny_models, tmp_path):
    from llama_export.targets.presets import CPU_FAST_EIGHT_BIT_SHARE

    model = tiny_models["llama2-gqa"]
    shares = {}
    for name, extra in (("default", []), ("none", ["--eight-bit-share", "0"]), ("block 64", ["--block-size", "64"])):
        out = tmp_path / name.replace(" ", "")
        block = [] if extra[:1] == ["--block-size"] else ["--block-size", "128"]
        assert main(["--model", str(model), "--precision", "int4", *block, *extra, "-o", str(out), "-q",
                     "--no-verify"]) == 0
        chosen = json.loads((out / "manifest.json").read_text()).get("eight_bit_matrices", [])
        weights = load_file(str(model / "model.safetensors"))
        layers = {n: v.size for n, v in weights.items() if n.startswith("model.layers.") and v.ndim == 2}
        shares[name] = sum(layers[n] for n in chosen) / sum(layers.values())
    assert 0 < shares["default"] <= CPU_FAST_EIGHT_BIT_SHARE
    assert shares["none"] == shares["block 64"] == 0
