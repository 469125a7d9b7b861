"""Fusion passes on traced tiny models: sites rewritten per layer, outputs equal to the unfused graph, graphs the
passes do not recognise left alone, and no weight read while the passes run."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from helpers import make_hf_model, unsorted_nodes

from llama_export.exporter.sources import open_checkpoint
from llama_export.exporter.trace import trace_to_onnx
from llama_export.passes import run_passes
from llama_export.passes.attention import FuseGroupQueryAttention
from llama_export.passes.cleanup import SMALL_VALUE_LIMIT, FoldConstants, FoldWeightTransposes, RemoveDeadNodes
from llama_export.targets.cpu import cpu_pipeline

LAYERS = 2
CLEANUP = [FoldWeightTransposes(), FoldConstants(), RemoveDeadNodes()]


def _counting(checkpoint, reads: list[str]):
    """Wrap every weight loader so reads of weight-sized tensors are recorded."""
    for name, info in checkpoint.weights.items():
        original, size = info.load, int(np.prod(info.shape))

        def load(original=original, name=name, size=size):
            if size > SMALL_VALUE_LIMIT:
                reads.append(name)
            return original()

        info.load = load
    return checkpoint


def _session(model: ir.Model, folder, name: str) -> ort.InferenceSession:
    ir.save(model, folder / f"{name}.onnx", external_data=f"{name}.onnx.data")
    return ort.InferenceSession(str(folder / f"{name}.onnx"), providers=["CPUExecutionProvider"])


def _run(session, feeds: dict) -> dict:
    names = {i.name for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    return dict(zip(outputs, session.run(None, {k: v for k, v in feeds.items() if k in names})))


@pytest.fixture(scope="module", params=["llama1-mha", "llama2-gqa", "llama3.1-rope-scaling", "llama3.2-tied"])
def traced(request, tmp_path_factory):
    # Wider than TINY so that every matrix exceeds the folding size limit: a read of any of them is visible.
    folder = make_hf_model(tmp_path_factory.mktemp("fusion") / request.param, request.param, seed=7,
                           hidden_size=128, intermediate_size=256)
    reads: list[str] = []
    checkpoint = _counting(open_checkpoint(folder), reads)
    unfused = trace_to_onnx(checkpoint)
    run_passes(unfused, CLEANUP)
    fused = trace_to_onnx(checkpoint)
    reports = {r.name: r.sites for r in run_passes(fused, cpu_pipeline("fp32", checkpoint.config))}
    reads_during_passes = list(reads)
    work = tmp_path_factory.mktemp("sessions")
    return {"config": checkpoint.config, "reports": reports, "reads": reads_during_passes,
            "unfused": _session(unfused, work, "unfused"), "fused": _session(fused, work, "fused"), "model": fused}


def test_each_fusion_rewrites_every_layer(traced):
    r = traced["reports"]
    assert r["fuse-rms-norm"] == 2 * LAYERS + 1
    assert r["fuse-rotary"] == 2 * LAYERS  # q and k of each layer
    assert r["fuse-gqa"] == LAYERS
    assert r["fuse-skip-rms-norm"] == 2 * LAYERS + 1
    assert r["pack-qkv"] == LAYERS
    assert r["pack-gate-up"] == LAYERS
    assert r["fuse-silu"] == LAYERS
    assert r["remove-unused-inputs"] == 1  # position_ids
    assert r["drop-unused-outputs"] == 2 * 2 * LAYERS + 1  # mean and inverse std of each skip norm, the last sum


def test_fused_graph_has_the_onnxruntime_kernels(traced):
    ops = [n.op_type for n in traced["model"].graph]
    assert ops.count("GroupQueryAttention") == LAYERS
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * LAYERS
    assert ops.count("SimplifiedLayerNormalization") == 1
    assert ops.count("QuickGelu") == LAYERS
    for gone in ("Attention", "RotaryEmbedding", "RMSNormalization", "Softmax", "Sigmoid"):
        assert gone not in ops
    assert ops.count("MatMul") <= 4 * LAYERS + 1
    assert unsorted_nodes(traced["model"].graph) == []
    for node in traced["model"].graph:
        if node.op_type == "SkipSimplifiedLayerNormalization":  # unnamed: ONNX Runtime neither computes nor keeps them
            assert node.outputs[1].name == node.outputs[2].name == ""


def test_no_weight_is_read_by_the_passes(traced):
    assert traced["reads"] == []


def test_fused_outputs_equal_unfused(traced):
    config = traced["config"]
    head_dim = config.hidden_size // config.num_attention_heads
    rng = np.random.default_rng(0)
    past = {f"past_key_values.{i}.{kind}": np.zeros((1, config.num_key_value_heads, 0, head_dim), np.float32)
            for i in range(LAYERS) for kind in ("key", "value")}
    ids = rng.integers(3, config.vocab_size, size=(1, 6))
    feeds = {"input_ids": ids, "attention_mask": np.ones((1, 6), np.int64),
             "position_ids": np.arange(6)[None], **past}
    first = {name: _run(traced[name], feeds) for name in ("unfused", "fused")}
    for key in first["unfused"]:
        np.testing.assert_allclose(first["fused"][key], first["unfused"][key], atol=1e-4, rtol=0)
    # One decode step on the cache each graph produced.
    step = {"input_ids": ids[:, -1:], "attention_mask": np.ones((1, 7), np.int64), "position_ids": np.array([[6]])}
    for name in ("unfused", "fused"):
        step_feeds = {**step, **{k.replace("present", "past_key_values"): v for k, v in first[name].items()
                                 if k.startswith("present")}}
        first[name] = _run(traced[name], step_feeds)
    for key in first["unfused"]:
        np.testing.assert_allclose(first["fused"][key], first["unfused"][key], atol=1e-4, rtol=0)


def test_gqa_leaves_a_non_causal_attention_alone(tmp_path):
    """A bidirectional mask is not what GroupQueryAttention computes: the site must be left unchanged."""
    folder = make_hf_model(tmp_path / "m", "llama2-gqa", seed=1)
    checkpoint = open_checkpoint(folder)
    model = trace_to_onnx(checkpoint)
    pipeline = cpu_pipeline("fp32", checkpoint.config)
    upto_gqa = pipeline[: [type(p) for p in pipeline].index(FuseGroupQueryAttention)]
    run_passes(model, upto_gqa)
    attention = next(n for n in model.graph if n.op_type == "Attention")
    mask = attention.inputs[3]
    everything = ir.node("Or", [mask, ir.node("Not", [mask]).outputs[0]])  # always true: no causality
    model.graph.insert_after(mask.producer(), [everything.inputs[1].producer(), everything])
    attention.replace_input_with(3, everything.outputs[0])
    before = [n.op_type for n in model.graph]
    assert FuseGroupQueryAttention(checkpoint.config.max_position_embeddings).apply(model) == LAYERS - 1
    after = [n.op_type for n in model.graph]
    assert after.count("Attention") == 1 and before.count("Attention") == LAYERS


def test_fusions_leave_an_unrelated_graph_unchanged():
    x = ir.Value(name="x", shape=ir.Shape([2, 3, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(name="w", const_value=ir.tensor(np.ones((8, 4), np.float32)))
    w.shape, w.type = ir.Shape([8, 4]), ir.TensorType(ir.DataType.FLOAT)
    mm = ir.node("MatMul", [x, w])
    relu = ir.node("Relu", [mm.outputs[0]])
    relu.outputs[0].name = "y"
    graph = ir.Graph([x], relu.outputs, nodes=[mm, relu], initializers=[w], opset_imports={"": 23})
    model = ir.Model(graph, ir_version=10)

    class Config:
        max_position_embeddings = 64

    reports = run_passes(model, cpu_pipeline("fp32", Config()))
    assert all(r.sites == 0 for r in reports), [(r.name, r.sites) for r in reports]
    assert [n.op_type for n in model.graph] == ["MatMul", "Relu"]


def test_tracing_leaves_no_graph_behind_in_the_exporting_process(tmp_path):
    """torch.export's graphs stay reachable from module globals (and their memory with the process, where it adds
    to verify's peak): the tracing runs in a child, which prints nothing of its own and does not run the caller's
    script again (a script without a __main__ guard, as a user's may be)."""
    import subprocess
    import sys

    folder = make_hf_model(tmp_path / "model", "llama2-gqa")
    script = tmp_path / "user_script.py"
    script.write_text("import gc, sys, torch.fx\n"
                      "from llama_export.exporter.sources import open_checkpoint\n"
                      "from llama_export.exporter.trace import trace_to_onnx\n"
                      "print('script ran')\n"
                      "model = trace_to_onnx(open_checkpoint(sys.argv[1]))\n"
                      "gc.collect()\n"
                      "print(sum(type(o) is torch.fx.Node for o in gc.get_objects()),"
                      " sum(node.op_type == 'MatMul' for node in model.graph))\n")
    done = subprocess.run([sys.executable, str(script), str(folder)], capture_output=True, text=True, timeout=300,
                          cwd=str(Path(__file__).resolve().parents[1]),
                          env={**os.environ, "LLAMA_EXPORT_TRACE_CACHE": "off"})  # so that it traces
    assert done.returncode == 0, done.stderr
    ran, counts = done.stdout.splitlines()
    assert ran == "script ran"
    fx_nodes, matmuls = map(int, counts.split())
    assert fx_nodes == 0
    assert matmuls >= 7 * 2  # the graph came back whole: seven projections a layer, two layers at least
    assert done.stderr == ""


def test_a_failure_in_the_tracing_process_comes_back_as_one_line(tmp_path):
    """The child never prints a traceback: its error's type and message lead the text the parent raises."""
    import pickle
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "from llama_export.exporter.child_process import serve; "
                           "from llama_export.exporter.trace import trace_child; serve(trace_child, 'tracing')"],
                          input=b"not a pickle", capture_output=True, timeout=120,
                          cwd=str(Path(__file__).resolve().parents[1]))
    assert done.returncode == 0 and done.stderr == b""
    kind, text = pickle.loads(done.stdout)
    assert kind == "internal-error"
    assert text.splitlines()[0] == "tracing failed in its process: _pickle.UnpicklingError: invalid load key, 'n'."


def test_a_graph_traced_earlier_is_reused_and_writes_the_same_package(tmp_path, monkeypatch):
    """Exporting the same architecture again takes the graph from the trace cache (no tracing process), writes the
    same bytes; a damaged entry is traced anew; a config that changes the graph has a key of its own."""
    from llama_export.exporter import child_process, trace_cache
    from llama_export.exporter.cli import main

    monkeypatch.setenv(trace_cache.CACHE_ENV, str(tmp_path / "traces"))
    folder = make_hf_model(tmp_path / "model", "llama3-gqa", num_hidden_layers=3)

    def export(name: str) -> bytes:
        assert main(["--model", str(folder), "-q", "--no-verify", "-o", str(tmp_path / name)]) == 0
        return (tmp_path / name / "model.onnx").read_bytes() + (tmp_path / name / "model.onnx.data").read_bytes()

    traced = export("traced")
    [entry] = (tmp_path / "traces").iterdir()
    real_call = child_process.call_in_child

    def no_tracing(*args):
        raise AssertionError("traced again")

    monkeypatch.setattr(child_process, "call_in_child", no_tracing)
    assert export("cached") == traced
    damaged = bytearray(entry.read_bytes())
    damaged[len(damaged) // 2] ^= 1
    entry.write_bytes(bytes(damaged))
    monkeypatch.setattr(child_process, "call_in_child", real_call)
    assert export("retraced") == traced
    assert trace_cache.load(entry.stem) is not None  # stored again whole
    users_file = tmp_path / "traces" / "model.onnx"  # LLAMA_EXPORT_TRACE_CACHE may name a folder of the user's
    users_file.write_bytes(b"not an entry")
    monkeypatch.setattr(trace_cache, "KEEP", 0)
    trace_cache.store("0" * 64, b"graph")
    assert [p.name for p in (tmp_path / "traces").iterdir()] == ["model.onnx"]  # only entries are pruned

    config = open_checkpoint(folder).config
    names = ["model.embed_tokens.weight"]
    key = trace_cache.trace_key(config, names)
    config.rope_parameters = {**config.rope_parameters, "rope_theta": 10000.0}
    assert trace_cache.trace_key(config, names) != key
    monkeypatch.setenv(trace_cache.CACHE_ENV, "off")
    assert trace_cache.cache_folder() is None and trace_cache.load(entry.stem) is None
