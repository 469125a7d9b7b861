"""TensorRT and Jetson targets, checked without TensorRT: the graphs hold only ops the target's parser takes, they
compute what the fp32 graph computes (exactly where the rewrite is exact, to fp16 accuracy where it is not), INT4
weights are symmetric blocked DequantizeLinear, the build material covers every dynamic input, and the memory
planner refuses and accepts as the device's memory says. Engine tests run only where TensorRT and a GPU are."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from helpers import make_hf_model, run_cli

from llama_export.passes import run_passes
from llama_export.passes.attention import FuseRotary
from llama_export.passes.cleanup import FoldConstants, FoldWeightTransposes, RemoveDeadNodes, SimplifyPatterns
from llama_export.passes.decompose import DecomposeAttention, DecomposeRMSNorm, DecomposeRotary
from llama_export.passes.normalization import FuseRMSNorm
from llama_export.passes.quantize import QuantOptions
from llama_export.targets import get_target
from llama_export.targets.engine import shape_profiles, write_build_material
from llama_export.targets.tensorrt_ops import TENSORRT_10_3, TENSORRT_10_15, parser_problems

LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
             "tie_word_embeddings": False, "rope_theta": 500000.0}
NATIVE_OPS = {"RMSNormalization", "RotaryEmbedding", "Attention"}


def _trace(folder: Path) -> ir.Model:
    from llama_export.exporter.sources import open_checkpoint
    from llama_export.exporter.trace import trace_to_onnx

    return trace_to_onnx(open_checkpoint(folder))


def _save(model: ir.Model, folder: Path) -> Path:
    from llama_export.targets.package import save_model

    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, folder)
    return folder / "model.onnx"


def _run(path: Path, config, past_length: int = 3, new: int = 5, seed: int = 0) -> list[np.ndarray]:
    """The graph on ONNX Runtime (CPU) with a random cache of `past_length` and `new` tokens."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    head = config.hidden_size // config.num_attention_heads
    feed = {}
    for spec in session.get_inputs():
        if spec.name == "input_ids":
            feed[spec.name] = rng.integers(0, config.vocab_size, (1, new))
        elif spec.name == "attention_mask":
            feed[spec.name] = np.ones((1, past_length + new), np.int64)
        elif spec.name == "position_ids":
            feed[spec.name] = np.arange(past_length, past_length + new)[None]
        else:
            cache = rng.standard_normal((1, config.num_key_value_heads, past_length, head)) * 0.5
            feed[spec.name] = cache.astype(np.float16 if "float16" in spec.type else np.float32)
    return [np.asarray(x, dtype=np.float32) for x in session.run(None, feed)]


@pytest.fixture(scope="module")
def reference_outputs(tiny_models, tmp_path_factory):
    """The traced fp32 graph's outputs per variant, the yardstick for every rewrite."""
    from transformers import AutoConfig

    root = tmp_path_factory.mktemp("trt-reference")
    found = {}
    for variant in ("llama2-gqa", "llama1-mha", "llama3.1-rope-scaling", "llama3.2-tied"):
        config = AutoConfig.from_pretrained(tiny_models[variant])
        found[variant] = (config, _run(_save(_trace(tiny_models[variant]), root / variant), config))
    return found


@pytest.mark.parametrize("variant", ["llama2-gqa", "llama1-mha", "llama3.1-rope-scaling", "llama3.2-tied"])
def test_decompositions_are_exact_in_fp32(tiny_models, reference_outputs, tmp_path, variant):
    config, expected = reference_outputs[variant]
    model = _trace(tiny_models[variant])
    layers = config.num_hidden_layers
    reports = run_passes(model, [FoldWeightTransposes(), FoldConstants(), SimplifyPatterns(), FuseRMSNorm(),
                                 FuseRotary(), DecomposeRMSNorm(), DecomposeRotary(), DecomposeAttention(),
                                 RemoveDeadNodes()])
    sites = {r.name: r.sites for r in reports}
    assert sites["decompose-rms-norm"] == 2 * layers + 1
    assert sites["decompose-rotary"] == 2 * layers
    assert sites["decompose-attention"] == layers
    assert not NATIVE_OPS & {n.op_type for n in model.graph}
    got = _run(_save(model, tmp_path), config)
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=0)


@pytest.mark.parametrize("target_name", ["jetson-orin", "tensorrt"])
@pytest.mark.parametrize("variant", ["llama2-gqa", "llama1-mha", "llama3.1-rope-scaling", "llama3.2-tied"])
def test_fp16_graphs_parse_and_match(tiny_models, reference_outputs, tmp_path, target_name, variant):
    config, expected = reference_outputs[variant]
    target = get_target(target_name)
    model = _trace(tiny_models[variant])
    run_passes(model, target.pipeline("fp16", config))
    assert parser_problems(model, target.tensorrt) == []
    ops = Counter(n.op_type for n in model.graph)
    assert {n.domain for n in model.graph} == {""}
    if target_name == "jetson-orin":
        assert not NATIVE_OPS & set(ops) and model.opset_imports[""] == 21
    else:
        assert ops["Attention"] == ops["RotaryEmbedding"] // 2 == config.num_hidden_layers
        assert all(n.attributes.get_int("softmax_precision") == 1 for n in model.graph if n.op_type == "Attention")
    # fp16 storage for weights and cache, fp32 where it matters.
    inputs = {v.name: v.dtype for v in model.graph.inputs}
    assert inputs["past_key_values.0.key"] == ir.DataType.FLOAT16
    assert {v.name: v.dtype for v in model.graph.outputs}["logits"] == ir.DataType.FLOAT
    for node in model.graph:
        if node.op_type in ("Softmax", "Cos", "Sin", "RotaryEmbedding", "ReduceMean"):
            assert node.inputs[0].dtype == ir.DataType.FLOAT, node.op_type
        if node.op_type == "MatMul" and node.inputs[1].is_initializer():
            assert node.inputs[1].dtype == ir.DataType.FLOAT16
    got = _run(_save(model, tmp_path), config)
    scale = np.abs(expected[0]).max()
    assert np.abs(got[0] - expected[0]).max() <= 0.01 * scale  # fp16 rounding, not a wrong graph
    assert (got[0].argmax(-1) == expected[0].argmax(-1)).mean() == 1.0
    np.testing.assert_allclose(got[1], expected[1], atol=0.02 * np.abs(expected[1]).max())


def test_int4_weights_are_symmetric_blocked_dequantize(tiny_models, reference_outputs, tmp_path):
    config, expected = reference_outputs["llama2-gqa"]
    target = get_target("jetson-orin")
    model = _trace(tiny_models["llama2-gqa"])
    run_passes(model, target.pipeline("int4", config, QuantOptions(block_size=32, method="rtn")))
    assert parser_problems(model, TENSORRT_10_3) == []
    dequantize = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    # packed q/k/v, o, packed gate/up, down per layer; the lm_head stays fp16 (see tensorrt_quant_options)
    assert len(dequantize) == 4 * config.num_hidden_layers
    lm_head = model.graph.outputs[0].producer().inputs[0].producer()
    assert lm_head.op_type == "MatMul" and lm_head.inputs[1].dtype == ir.DataType.FLOAT16
    for node in dequantize:
        assert node.inputs[0].dtype == ir.DataType.INT4
        assert len(node.inputs) == 2  # no zero point: symmetric
        assert node.attributes.get_int("block_size") == 32
        assert node.inputs[1].dtype == ir.DataType.FLOAT16
        assert all(user.op_type == "MatMul" for user, _ in node.outputs[0].uses())
    got = _run(_save(model, tmp_path), config)
    # Random tiny models have flat logits (see test_int4.py): a broken layout scores near chance, 1/320.
    assert (got[0].argmax(-1) == expected[0].argmax(-1)).mean() >= 0.4


def test_parser_check_names_what_it_cannot_take():
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 4]))
    scale = ir.Value(name="scale", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([4]),
                     const_value=ir.tensor(np.ones(4, np.float32)))
    codes = ir.Value(name="codes", const_value=ir.tensor(np.zeros((4, 4), np.int8)))
    zero = ir.Value(name="zero", const_value=ir.tensor(np.ones((4, 4), np.int8)))
    nodes = [ir.node("RMSNormalization", [x, scale]), ir.node("SkipSimplifiedLayerNormalization", [x, x, scale],
                                                              domain="com.microsoft"),
             ir.node("DequantizeLinear", [codes, scale, zero])]
    graph = ir.Graph([x], [n.outputs[0] for n in nodes], nodes=nodes, initializers=[scale, codes, zero],
                     opset_imports={"": 23})
    model = ir.Model(graph, ir_version=10)
    problems = parser_problems(model, TENSORRT_10_3)
    assert "RMSNormalization (1x)" in problems
    assert "com.microsoft::SkipSimplifiedLayerNormalization (custom domain) (1x)" in problems
    assert "DequantizeLinear with a non-zero zero point (1x)" in problems
    assert "opset 23" in problems
    assert "RMSNormalization (1x)" not in parser_problems(model, TENSORRT_10_15)


def test_profiles_cover_every_dynamic_input(tmp_path):
    io = {"inputs": {
        "input_ids": {"shape": ["batch", "sequence"]}, "attention_mask": {"shape": ["batch", "total_sequence"]},
        "position_ids": {"shape": ["batch", "sequence"]},
        "past_key_values.0.key": {"shape": ["batch", 2, "past_sequence", 16]},
        "past_key_values.0.value": {"shape": ["batch", 2, "past_sequence", 16]}}}
    profiles = shape_profiles(io, context=1024, batch=2, prefill=256)
    assert [p["name"] for p in profiles] == ["decode", "prefill"]
    for profile in profiles:
        assert set(profile["shapes"]) == set(io["inputs"])
        for low, best, high in profile["shapes"].values():
            assert all(a <= b <= c for a, b, c in zip(low, best, high))
    decode, prefill = (p["shapes"] for p in profiles)
    assert decode["input_ids"] == [[1, 1], [1, 1], [2, 1]]
    assert prefill["input_ids"] == [[1, 1], [1, 256], [2, 256]]
    assert decode["past_key_values.0.key"][0] == [1, 2, 0, 16]
    assert decode["past_key_values.0.key"][2] == [2, 2, 1023, 16]
    assert decode["attention_mask"][2] == [2, 1024]
    spec = write_build_material(tmp_path, io, 1024, "TensorRT 10.3", batch=2, prefill=256)
    script = (tmp_path / "build_engine.sh").read_text()
    for flag in ("--minShapes=", "--optShapes=", "--maxShapes=", "--stronglyTyped", "--memPoolSize=workspace:"):
        assert flag in script
    assert "'--maxShapes=input_ids:2x256,attention_mask:2x1024,position_ids:2x256," in script
    assert "past_key_values.0.value:2x2x1023x16'" in script
    assert json.loads((tmp_path / "profiles.json").read_text()) == spec
    for name in ("build_engine.py", "check_engine.py"):  # self-contained: runnable on the device without us
        text = (tmp_path / name).read_text()
        assert "llama_export" not in text and "from exporter" not in text and "from targets" not in text
        result = subprocess.run([sys.executable, str(tmp_path / name), "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "usage" in result.stdout


def test_plan_refuses_and_accepts_llama3_8b(tmp_path):
    config = tmp_path / "Meta-Llama-3-8B" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(LLAMA3_8B))
    refused = run_cli("plan", "--target", "jetson-orin-nano", "--config", str(config), "--precision", "fp16")
    assert refused.returncode == 1
    assert "does NOT fit" in refused.stdout
    message = refused.stderr.strip().splitlines()
    assert len(message) == 1 and "Meta-Llama-3-8B in fp16 at context 4096 needs" in message[0]
    assert "jetson-orin" in message[0]  # says where it would fit
    accepted = run_cli("plan", "--target", "jetson-orin", "--config", str(config), "--precision", "int4",
                       "--context", "4096")
    assert accepted.returncode == 0, accepted.stderr
    assert "fits" in accepted.stdout and "KV cache (fp16, 4096 tokens" in accepted.stdout
    # KV cache arithmetic: 2 (K, V) * 32 layers * 8 heads * 128 * 2 bytes * 4096 tokens, past and present
    assert "1.00 GiB" in next(line for line in accepted.stdout.splitlines() if "KV cache" in line)
    nx = run_cli("plan", "--target", "jetson-orin-nx", "--config", str(config), "--precision", "fp16")
    assert nx.returncode == 1 and "--precision int4" in nx.stderr
    missing = run_cli("plan", "--target", "jetson-orin", "--config", str(tmp_path / "nope.json"))
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1


def test_export_refuses_a_model_that_does_not_fit(tmp_path):
    folder = make_hf_model(tmp_path / "wide", "llama2-gqa", max_position_embeddings=1 << 20)
    out = tmp_path / "out"
    result = run_cli("--target", "jetson-orin-nano", "--model", str(folder), "--output", str(out), "--precision",
                     "fp16", "--context", str(1 << 20))
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("llama-export: error:") and "needs" in last and "it would fit with" in last
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_jetson_export_end_to_end(tiny_models, tmp_path):
    """The CLI as a user runs it: package with build material and reference outputs, verified on CPU."""
    out = tmp_path / "orin"
    # fp16: a random tiny model's flat logits cannot hold INT4 to verify's 0.85 (the default model does, in
    # test_default_model.py)
    result = run_cli("--target", "jetson-orin", "--model", str(tiny_models["llama2-gqa"]), "--output", str(out),
                     "--precision", "fp16", "--quiet")
    assert result.returncode == 0, result.stderr
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model.onnx.data", "profiles.json", "build_engine.py", "build_engine.sh",
            "check_engine.py", "reference.npz", "reference.json", "manifest.json", "genai_config.json"} <= names
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "fp16" and manifest["tensorrt"]["parser"] == "10.3"
    assert "JetPack 6" in manifest["tensorrt"]["requires"] and manifest["parity"]["passed"]
    assert manifest["tensorrt"]["engine"] is None and "build_engine" in manifest["tensorrt"]["engine_not_built"]
    # The reference's decode step is what the package's own ONNX Runtime run gives.
    from llama_export.runtimes import Decoder, OnnxPackage

    reference = np.load(out / "reference.npz")
    decoder = Decoder(OnnxPackage(out))
    prefill = decoder.prefill(reference["prefill/in/input_ids"][0].tolist())
    np.testing.assert_allclose(prefill, reference["prefill/out/logits"][0], atol=1e-4)
    step = decoder.decode(int(reference["decode/in/input_ids"][0, 0]))
    np.testing.assert_allclose(step, reference["decode/out/logits"][0, -1], atol=1e-4)
    verify = run_cli("verify", str(out))
    assert verify.returncode == 0 and "PASSED" in verify.stdout
    _check_streamed_head(out, prefill, reference)


def _check_streamed_head(out: Path, whole_prefill: np.ndarray, reference) -> None:
    """The fp16 lm_head computed outside ONNX Runtime (what an 8B package gets) gives the whole graph's logits to
    within the graph's own fp16 rounding of the hidden state and of the product, which ONNX Runtime's CPU run skips."""
    import llama_export.runtimes.streamed_head as streamed
    from llama_export.runtimes import Decoder, OnnxPackage

    assert not isinstance(OnnxPackage(out).session, streamed.StreamedHeadSession)  # small: the plain session
    threshold, block = streamed.STREAMED_BYTES, streamed.BLOCK_BYTES
    vocab = json.loads((out / "genai_config.json").read_text())["model"]["vocab_size"]
    streamed.STREAMED_BYTES, streamed.BLOCK_BYTES = 1, 2 * vocab * 7  # 7 rows a block: the last block is short
    try:
        package = OnnxPackage(out)
        assert isinstance(package.session, streamed.StreamedHeadSession)
        assert package.session.head.rows % 7 != 0
        decoder = Decoder(package)
        prefill = decoder.prefill(reference["prefill/in/input_ids"][0].tolist())
        step = decoder.decode(int(reference["decode/in/input_ids"][0, 0]))
    finally:
        streamed.STREAMED_BYTES, streamed.BLOCK_BYTES = threshold, block
    assert prefill.shape == whole_prefill.shape and prefill.dtype == np.float32
    assert np.abs(prefill - whole_prefill).max() <= np.abs(whole_prefill).max() * 2 ** -9
    assert np.array_equal(prefill.argmax(-1), whole_prefill.argmax(-1))
    whole_step = reference["decode/out/logits"][0, -1]
    assert np.abs(step - whole_step).max() <= np.abs(whole_step).max() * 2 ** -9


def _engine_here() -> str | None:
    from llama_export.targets.engine import tensorrt_available

    return tensorrt_available()


@pytest.mark.skipif(_engine_here() is not None, reason=f"needs TensorRT and a CUDA GPU ({_engine_here()})")
def test_engine_builds_runs_and_matches_reference(tiny_models, tmp_path):
    out = tmp_path / "trt"
    result = run_cli("--target", "tensorrt", "--model", str(tiny_models["llama2-gqa"]), "--output", str(out),
                     "--quiet")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tensorrt"]["engine"]["compute_capability"]
    check = subprocess.run([sys.executable, str(out / "check_engine.py")], capture_output=True, text=True)
    assert check.returncode == 0 and "PASSED" in check.stdout
    run = run_cli("run", str(out), "--prompt", "The quick", "--max-new-tokens", "8")
    assert run.returncode == 0 and "note:" not in run.stderr


def test_streamed_head_reads_only_a_weight_inside_the_package(tmp_path):
    """The lm_head taken out of the graph is read by us, not ONNX Runtime: its file must lie inside the package and
    hold the bytes the graph says, or the graph goes to ONNX Runtime whole (which refuses it in its own words)."""
    from onnx import TensorProto, helper

    from llama_export.runtimes.streamed_head import split_head

    def graph(location: str, offset: int = 0):
        weight = TensorProto(name="lm_head.weight", data_type=TensorProto.FLOAT16, dims=[4, 6])
        weight.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(offset)), ("length", "48")):
            weight.external_data.add(key=key, value=value)
        nodes = [helper.make_node("MatMul", ["hidden", "lm_head.weight"], ["logits.fp16"]),
                 helper.make_node("Cast", ["logits.fp16"], ["logits"], to=TensorProto.FLOAT)]
        return helper.make_model(helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("hidden", TensorProto.FLOAT16, [1, 4])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 6])], [weight]))

    package = tmp_path / "package"
    package.mkdir()
    (package / "model.onnx.data").write_bytes(bytes(64))
    (tmp_path / "outside.bin").write_bytes(bytes(64))
    head = split_head(model := graph("model.onnx.data", offset=16), package, threshold=1)
    assert head is not None and (head.offset, head.rows, head.columns, head.cast_to_float32) == (16, 4, 6, True)
    assert [o.name for o in model.graph.output] == ["hidden"] and not model.graph.node
    assert not model.graph.initializer
    for location, offset in (("../outside.bin", 0), ("model.onnx.data", 24), ("missing.data", 0)):
        untouched = graph(location, offset)
        assert split_head(untouched, package, threshold=1) is None
        assert len(untouched.graph.node) == 2 and untouched.graph.output[0].name == "logits"
    assert split_head(graph("model.onnx.data"), package) is None  # under the size threshold: ONNX Runtime runs it
    as_input = graph("model.onnx.data")  # a weight also declared as a graph input can be fed: left to ONNX Runtime
    as_input.graph.input.append(helper.make_tensor_value_info("lm_head.weight", TensorProto.FLOAT16, [4, 6]))
    read_elsewhere = graph("model.onnx.data")  # the logits are consumed inside the graph too
    read_elsewhere.graph.node.append(helper.make_node("ArgMax", ["logits"], ["next"]))
    to_double = graph("model.onnx.data")
    to_double.graph.node[1].attribute[0].i = TensorProto.DOUBLE
    for untouched in (as_input, read_elsewhere, to_double):
        assert split_head(untouched, package, threshold=1) is None and untouched.graph.output[0].name == "logits"
