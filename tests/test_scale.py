"""Real-size exports in bounded memory, checked on small models: calibration streamed one decoder layer at a time
equals a straightforward computation of the same statistics, verify's layer-by-layer reference equals the full
transformers model, weights read in row chunks write the same bytes as whole ones, GPTQ in column groups equals
GPTQ of each group on its own, and an export that would not fit in memory is refused before it starts."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import REPO, VARIANTS, make_hf_model

from llama_export.exporter.cli import main


def _data_hash(folder) -> str:
    return hashlib.sha256((folder / "model.onnx.data").read_bytes()).hexdigest()


def full_model_hessians(folder, text: str) -> dict[str, np.ndarray]:
    """X^T X / tokens of every linear layer's input, from transformers' whole model with forward hooks, over the
    windows calibration uses (at most CALIBRATION_TOKENS, spread evenly), summed WINDOWS_AT_ONCE windows at a
    time as the stream sums them (so the float sums round alike)."""
    from transformers import LlamaForCausalLM

    from llama_export.exporter.calibrate import CALIBRATION_TOKENS, WINDOW, WINDOWS_AT_ONCE, tokenize
    from llama_export.exporter.sources import open_checkpoint

    ids = tokenize(open_checkpoint(folder), text)
    usable = len(ids) // WINDOW * WINDOW or len(ids)
    windows = torch.tensor(ids[:usable]).reshape(-1, min(WINDOW, usable))
    keep = CALIBRATION_TOKENS // windows.shape[1]
    if len(windows) > keep:
        windows = windows[np.linspace(0, len(windows) - 1, keep).round().astype(int)]
    model = LlamaForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    sums = {}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x
        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(hook(name + ".weight"))
    with torch.no_grad():
        for start in range(0, len(windows), WINDOWS_AT_ONCE):
            model(windows[start:start + WINDOWS_AT_ONCE])
    hessians = {name: (total / windows.numel()).numpy() for name, total in sums.items()}
    if model.config.tie_word_embeddings:
        hessians["model.embed_tokens.weight"] = hessians["lm_head.weight"]
    return hessians


@pytest.fixture(scope="module")
def deep_tied(tmp_path_factory):
    """Eight layers (so the edge layers and layer order matter), norm weights large enough to be written as
    external data (as at real sizes: they are then written before the matrices unless reordered), and a tied
    embedding (the lm_head's statistics reach the lookup)."""
    return make_hf_model(tmp_path_factory.mktemp("deep") / "tied8", "llama3.2-tied", num_hidden_layers=8,
                         hidden_size=128, intermediate_size=256)


def test_streamed_calibration_equals_the_whole_model_and_writes_the_same_package(deep_tied, tmp_path, monkeypatch):
    from llama_export.exporter import calibrate
    from llama_export.exporter.sources import open_checkpoint

    text = calibrate.default_calibration_text()
    reference = full_model_hessians(deep_tied, text)
    asked = []
    stream = calibrate.CalibrationStream(open_checkpoint(deep_tied), text, log=asked.append)
    assert set(reference) == stream.covered
    for name, expected in reference.items():  # in layer order, as the writer asks
        np.testing.assert_allclose(stream.get(name), expected, rtol=1e-5, atol=1e-6)
    assert not any("starts over" in line for line in asked)

    streamed = tmp_path / "streamed"
    assert main(["--model", str(deep_tied), "--precision", "int4", "--no-verify", "-q", "-o", str(streamed)]) == 0
    layers_seen = []

    class Recording(calibrate.CalibrationStream):  # the same statistics, handed over whole: the reference path
        def __init__(self, checkpoint, text, log=None, tokens=None):
            super().__init__(checkpoint, text, log, tokens)
            self.whole = full_model_hessians(deep_tied, text)

        def get(self, name, default=None):
            layers_seen.append(name)
            return self.whole.get(name, default)

    monkeypatch.setattr(calibrate, "CalibrationStream", Recording)
    whole = tmp_path / "whole"
    assert main(["--model", str(deep_tied), "--precision", "int4", "--no-verify", "-q", "-o", str(whole)]) == 0
    assert layers_seen
    assert _data_hash(streamed) == _data_hash(whole)


def test_the_writer_asks_for_layers_in_order_so_each_is_calibrated_once(deep_tied, tmp_path):
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert main(["--model", str(deep_tied), "--precision", "int4", "--no-verify", "-o", str(tmp_path / "p")]) == 0
    lines = stderr.getvalue().splitlines()
    calibrated = [line for line in lines if "calibrated" in line]
    assert len(calibrated) == 8 and "layer 8/8" in calibrated[-1] and "left" in calibrated[1]
    assert not any("starts over" in line for line in lines)


def test_nothing_of_the_export_stays_reachable_when_verify_starts(deep_tied, tmp_path, monkeypatch):
    """By verify, the graph and the calibration statistics are garbage: a rewrite rule's matcher keeps the last
    graph it matched (and through its lazy weights the calibration stream), so no rule object may outlive a run."""
    import gc

    import onnx_ir as ir

    from llama_export.exporter import calibrate, verify

    def graphs() -> int:
        gc.collect()
        return sum(type(o) is ir.Graph for o in gc.get_objects())

    before, alive = graphs(), {}

    def count_then_run(*args, **kwargs):
        alive["graphs"] = graphs() - before
        alive["streams"] = sum(type(o) is calibrate.CalibrationStream for o in gc.get_objects())
        return real_runs(*args, **kwargs)

    real_runs = verify.package_runs
    monkeypatch.setattr(verify, "package_runs", count_then_run)
    # a random tiny model's INT4 may miss verify's agreement gate (exit 1): what is asserted is what was alive
    assert main(["--model", str(deep_tied), "--precision", "int4", "-q", "-o", str(tmp_path / "p")]) in (0, 1)
    assert alive == {"graphs": 0, "streams": 0}


# A source over pipeline.SEPARATE_BUILD_BYTES is built in a process of its own; the threshold is lowered so a tiny
# model takes that path. Run as its own program: the test process has PyTorch loaded already.
SEPARATE_BUILD = """
import json, sys
import llama_export.exporter.pipeline as pipeline
from llama_export.exporter import verify
from llama_export.exporter.cli import main
pipeline.SEPARATE_BUILD_BYTES = 0
seen = {}
real_runs = verify.package_runs
def runs_noting_modules(*args, **kwargs):
    seen["pytorch loaded when the package ran"] = "torch" in sys.modules
    return real_runs(*args, **kwargs)
verify.package_runs = runs_noting_modules
code = main(sys.argv[1:])
print(json.dumps({"code": code, **seen}))
"""


def separate_build(*args: str) -> tuple[dict, str]:
    result = subprocess.run([sys.executable, "-c", SEPARATE_BUILD, *args], capture_output=True, text=True, cwd=REPO,
                            timeout=600)
    return json.loads(result.stdout.splitlines()[-1]), result.stderr


def test_a_separately_built_package_is_the_same_and_runs_in_verify_before_pytorch_is_loaded(deep_tied, tmp_path):
    assert main(["--model", str(deep_tied), "-q", "--no-verify", "-o", str(tmp_path / "here")]) == 0
    seen, stderr = separate_build("--model", str(deep_tied), "-o", str(tmp_path / "apart"))
    assert seen == {"code": 0, "pytorch loaded when the package ran": False}, stderr
    assert _data_hash(tmp_path / "here") == _data_hash(tmp_path / "apart")
    assert json.loads((tmp_path / "apart" / "manifest.json").read_text())["parity"]["passed"]
    assert "[1/5] Opening the model" in stderr and "[5/5] Verifying" in stderr


def test_a_separate_builds_error_comes_back_as_one_line_and_leaves_nothing(deep_tied, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(deep_tied, source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 9}))
    out = tmp_path / "out"
    out.mkdir()
    seen, stderr = separate_build("--model", str(source), "-o", str(out / "pkg"))
    assert seen == {"code": 1}
    errors = [line for line in stderr.splitlines() if line.startswith("llama-export: error:")]
    assert len(errors) == 1 and "9 decoder layers" in errors[0] and "Traceback" not in stderr, stderr
    assert list(out.iterdir()) == []


def test_sigterm_during_a_separate_build_ends_the_build_process_and_leaves_nothing(deep_tied, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    process = subprocess.Popen([sys.executable, "-c", SEPARATE_BUILD, "--model", str(deep_tied), "-o",
                                str(out / "pkg")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                               env={**os.environ, "LLAMA_EXPORT_TRACE_CACHE": "off"})  # it must trace
    for line in process.stderr:
        if line.startswith("[2/5] Tracing"):
            break
    deadline = time.monotonic() + 60
    while len(builders := _descendants(process.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(builders) == 2, "no build process with its tracing process"
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert json.loads(stdout.splitlines()[-1]) == {"code": 143}, stderr
    assert "terminated (SIGTERM)" in stderr.strip().splitlines()[-1] and "Traceback" not in stderr
    assert list(out.iterdir()) == []
    time.sleep(0.2)  # the kernel's SIGKILL to the tracing process once its parent is gone
    alive = [pid for pid in builders if os.path.exists(f"/proc/{pid}") and _state(pid) != "Z"]
    assert not alive, "the build or its tracing process outlived the export"


def _descendants(pid: int) -> list[int]:
    parents = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError):
            parents[int(stat.split("/")[2])] = int(open(stat).read().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _state(pid: int) -> str:
    with contextlib.suppress(OSError):
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    return ""


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_streamed_reference_equals_the_full_model(tiny_models, variant):
    from llama_export.exporter.sources import open_checkpoint
    from llama_export.exporter.verify import StreamedReference, reference_model

    checkpoint = open_checkpoint(tiny_models[variant])
    sequences = [[1, 5, 9, 33, 7], list(range(3, 60))]
    streamed = StreamedReference(checkpoint)(sequences)
    model = reference_model(checkpoint)
    for ids, ours in zip(sequences, streamed):
        with torch.no_grad():
            theirs = model(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_weights_read_in_row_chunks_write_the_same_bytes(tiny_models, tmp_path, monkeypatch):
    """A vocabulary of 320 in chunks of 64 rows: the embedding and lm_head are read and quantized in five parts."""
    import llama_export.passes.quantize as quantize
    import llama_export.passes.quantized_graph as quantized_graph
    import llama_export.passes.quantized_lookup as quantized_lookup

    whole = tmp_path / "whole"
    assert main(["--model", str(tiny_models["llama2-gqa"]), "--precision", "int4", "--no-verify", "-q",
                 "-o", str(whole)]) == 0
    reads = []
    monkeypatch.setattr(quantized_graph, "CHUNK_ROWS", 64)
    original = quantized_graph.quantize_by_row_chunks

    def recording(weight, rows, quantize_rows, transposed=True):
        reads.append(weight.name)
        return original(weight, rows, quantize_rows, transposed)

    for module in (quantize, quantized_lookup):  # the lm_head's reads, the embedding table's
        monkeypatch.setattr(module, "quantize_by_row_chunks", recording)
    chunked = tmp_path / "chunked"
    assert main(["--model", str(tiny_models["llama2-gqa"]), "--precision", "int4", "--no-verify", "-q",
                 "-o", str(chunked)]) == 0
    assert "lm_head.weight" in reads and "model.embed_tokens.weight" in reads
    assert _data_hash(whole) == _data_hash(chunked)


@pytest.mark.parametrize("variant, target, precision", [("llama2-gqa", "jetson-orin", "fp16"),
                                                      ("llama3.2-tied", "jetson-orin", "int4"),
                                                      ("llama2-gqa", "jetson-orin", "int4"),
                                                      ("llama2-gqa", "cpu", "fp32")])
def test_float_weights_written_in_row_chunks_write_the_same_bytes(tiny_models, tmp_path, monkeypatch, variant, target,
                                                                   precision):
    """Weights that stay float (fp16 tables on TensorRT targets, fp32 packed matrices) are written a few rows at a
    time, stored transposed by strided writes, and never built whole on the way."""
    from llama_export.passes import streamed

    args = ["--model", str(tiny_models[variant]), "--target", target, "--precision", precision, "--no-verify", "-q"]
    monkeypatch.setattr(streamed, "CHUNK_BYTES", 1 << 40)
    assert main([*args, "-o", str(tmp_path / "whole")]) == 0
    built_whole, written, whole, tofile = [], [], streamed.RowStreamedTensor._whole, streamed.RowStreamedTensor.tofile

    def recording_whole(self):
        built_whole.append(self.name)
        return whole(self)

    def recording_tofile(self, file):
        written.append((self.name, self.transposed))
        return tofile(self, file)

    monkeypatch.setattr(streamed.RowStreamedTensor, "_whole", recording_whole)
    monkeypatch.setattr(streamed.RowStreamedTensor, "tofile", recording_tofile)
    monkeypatch.setattr(streamed, "CHUNK_BYTES", 4 * 3 * 64)  # three rows of the 64-wide tables a read
    assert main([*args, "-o", str(tmp_path / "chunked")]) == 0
    assert _data_hash(tmp_path / "whole") == _data_hash(tmp_path / "chunked")
    assert not {"model.embed_tokens.weight", "lm_head.weight"} & set(built_whole)
    tables = {name: transposed for name, transposed in written
              if name in ("model.embed_tokens.weight", "lm_head.weight")}
    # A tied table is stored once, transposed for the lm_head; an untied embedding as it is, its lm_head transposed.
    assert tables == ({"model.embed_tokens.weight": True} if "tied" in variant
                      else {"model.embed_tokens.weight": False, "lm_head.weight": True})
    if precision == "fp32":
        assert not built_whole and len(written) > 2  # the packed projections too


def test_row_reads_equal_the_whole_tensor(tiny_models, tmp_path):
    from llama_export.exporter.sources import open_checkpoint

    info = open_checkpoint(tiny_models["llama2-gqa"]).weights["model.embed_tokens.weight"]
    whole = info.load()
    chunks = list(info.row_chunks(rows=100))
    assert [start for start, _ in chunks] == [0, 100, 200, 300]
    np.testing.assert_array_equal(np.concatenate([rows for _, rows in chunks]), whole)


def test_gptq_in_column_groups_compensates_within_each_group(monkeypatch):
    """Past GPTQ_GROUP_COLUMNS the Hessian is taken block-diagonal: a group's codes do not depend on another
    group's weights, and the result still beats round-to-nearest (whole-matrix GPTQ does better still)."""
    from llama_export.passes import block_quantized

    rng = np.random.default_rng(0)
    k, n = 256, 24
    x = rng.standard_normal((1024, k)) * np.exp(rng.standard_normal(k))
    x[:, 1::2] += 0.8 * x[:, 0::2]
    w = rng.standard_normal((n, k)).astype(np.float32)
    h = (x.T @ x / len(x)).astype(np.float32)
    whole = block_quantized.quantize_gptq(w, h, 4, 32, damp=1.0, act_order=True)
    monkeypatch.setattr(block_quantized, "GPTQ_GROUP_COLUMNS", 128)
    grouped = block_quantized.quantize_gptq(w, h, 4, 32, damp=1.0, act_order=True)
    changed = w.copy()
    changed[:, 128:] = rng.standard_normal((n, 128))
    regrouped = block_quantized.quantize_gptq(changed, h, 4, 32, damp=1.0, act_order=True)
    np.testing.assert_array_equal(regrouped.codes[:, :128], grouped.codes[:, :128])
    assert not np.array_equal(regrouped.codes[:, 128:], grouped.codes[:, 128:])

    def error(q):
        diff = q.dequantize() - w
        return float(np.einsum("nk,kl,nl->", diff, h, diff))

    assert error(whole) < error(grouped) < error(block_quantized.quantize_rtn(w, 4, 32))


def test_an_export_that_does_not_fit_in_memory_is_refused_before_it_starts(tiny_models, tmp_path, monkeypatch,
                                                                          capsys):
    from llama_export.exporter import export_memory

    monkeypatch.setattr(export_memory, "available_bytes", lambda: 64 << 20)
    output = tmp_path / "out"
    assert main(["--model", str(tiny_models["llama2-gqa"]), "--precision", "int4", "-o", str(output)]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "GiB of memory" in error and "--quant rtn" in error and "free" in error
    assert not output.exists() and not list(tmp_path.glob(".out*"))


def _resident_kb(folder) -> int:
    """This process's resident pages of files inside `folder` (kB, from /proc/self/smaps)."""
    import os

    prefix, inside, total = os.path.realpath(folder) + os.sep, False, 0
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if fields and "-" in fields[0] and not fields[0].endswith(":"):
                inside = len(fields) >= 6 and fields[5].startswith(prefix)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


def _matmulnbits_model(folder, n=2048, k=4096, block=32):
    """One int8-activation MatMulNBits with external data (ONNX Runtime maps it when offsets are aligned)."""
    import onnx_ir as ir

    rng = np.random.default_rng(0)
    b = rng.integers(0, 256, (n, k // block, block // 2), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.02, (n, k // block)).astype(np.float32)
    a = ir.Value(name="a", shape=ir.Shape([1, k]), type=ir.TensorType(ir.DataType.FLOAT))
    inputs = [a]
    for name, array in (("b", b), ("scales", scales)):
        inputs.append(ir.Value(name=name, const_value=ir.tensor(array, name=name), shape=ir.Shape(array.shape),
                               type=ir.TensorType(ir.DataType.from_numpy(array.dtype))))
    node = ir.node("MatMulNBits", inputs, domain="com.microsoft", attributes={
        "K": k, "N": n, "bits": 4, "block_size": block, "accuracy_level": 4}, num_outputs=1)
    node.outputs[0].name, node.outputs[0].type = "y", ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([a], node.outputs, nodes=[node], initializers=inputs[1:], opset_imports={"": 23,
                                                                                              "com.microsoft": 1})
    ir.save(ir.Model(graph, ir_version=10), folder / "model.onnx", external_data="model.onnx.data")
    return folder / "model.onnx"


def test_weight_file_pages_are_handed_back_after_the_session_is_created(tmp_path):
    """ONNX Runtime keeps the mapped scales resident after packing them; paging them out changes no output."""
    import gc

    import onnxruntime as ort

    from llama_export.runtimes.mapped_pages import paged_out_while_loading

    path = _matmulnbits_model(tmp_path)
    a = np.random.default_rng(1).standard_normal((1, 4096)).astype(np.float32)
    kept = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    resident_kept, expected = _resident_kb(tmp_path), kept.run(None, {"a": a})[0]
    del kept  # a page mapped twice is never paged out: one session at a time
    gc.collect()
    assert _resident_kb(tmp_path) == 0, "the first session's mapping is still there"
    with paged_out_while_loading(tmp_path):
        released = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert resident_kept >= 1024 * 0.9  # the 1 MB of scales stayed resident
    assert _resident_kb(tmp_path) < 64
    np.testing.assert_array_equal(released.run(None, {"a": a})[0], expected)


@pytest.mark.parametrize("op, weight_type, paged", [("MatMul", "float32", False), ("MatMul", "float16", True),
                                                     ("Gather", "float32", True)])
def test_weights_are_paged_out_while_loading_only_where_packing_reads_each_page_once(tmp_path, monkeypatch, op,
                                                                                    weight_type, paged):
    """ONNX Runtime packs a float32 MatMul weight in column panels, reading each page once per panel: paged out
    between panels, it was read from disk again and again."""
    import onnx
    from onnx import helper, numpy_helper

    from llama_export.runtimes import onnx_package

    weight = numpy_helper.from_array(np.ones((64, 64), weight_type), "w")
    node = helper.make_node(op, ["w", "ids"] if op == "Gather" else ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [weight])
    onnx.save(helper.make_model(graph), tmp_path / "model.onnx", save_as_external_data=True, size_threshold=0,
              location="model.onnx.data")
    model = onnx_package._graph(tmp_path / "model.onnx")
    monkeypatch.setattr(onnx_package, "PAGE_OUT_FROM_BYTES", 64 * 64 * 2)
    assert onnx_package._pages_out(model) is paged
    monkeypatch.setattr(onnx_package, "PAGE_OUT_FROM_BYTES", 64 * 64 * 4 + 1)  # smaller packages never
    assert onnx_package._pages_out(model) is False


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two CPUs to fault pages in on one and page them out from the other")
def test_pages_read_on_another_cpu_are_paged_out(tmp_path):
    """Pages a thread on another CPU faulted in wait in that CPU's batch, where MADV_PAGEOUT alone skips them
    (ONNX Runtime's threads read most of the weights)."""
    import mmap
    import threading

    from llama_export.runtimes.mapped_pages import page_out

    first, second, *_ = sorted(os.sched_getaffinity(0))
    path = tmp_path / "weights.bin"
    path.write_bytes(np.random.default_rng(0).bytes(1 << 20))
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # fresh pages, read in by the other CPU's faults
    os.close(fd)
    kept = os.sched_getaffinity(0)
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        def read_on_second_cpu():
            os.sched_setaffinity(0, {second})
            sum(mapped[i] for i in range(0, len(mapped), 4096))

        try:
            os.sched_setaffinity(0, {first})
            reader = threading.Thread(target=read_on_second_cpu)
            reader.start()
            reader.join()
            assert _resident_kb(tmp_path) == 1024
            assert page_out(tmp_path) == 1
            assert _resident_kb(tmp_path) == 0
        finally:
            os.sched_setaffinity(0, kept)


def test_gptq_factors_are_computed_once_and_exact():
    """The inverse Hessian's upper factor (triangular inverse by halves) satisfies U^T U = H^-1; a prepared
    Hessian used chunk by chunk gives the codes of the whole matrix quantized at once."""
    from llama_export.passes import block_quantized

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 600)).astype(np.float32) * rng.uniform(0.5, 3, 600).astype(np.float32)
    h = x.T @ x / 2000
    upper = block_quantized._inverse_upper_cholesky(torch.from_numpy(h).double())
    assert torch.allclose(torch.triu(upper), upper)
    np.testing.assert_allclose((upper.T @ upper).numpy(), np.linalg.inv(h.astype(np.float64)), rtol=1e-8, atol=1e-10)
    w = rng.standard_normal((96, 600)).astype(np.float32)
    whole = block_quantized.quantize_gptq(w, h, 4, 32, act_order=True)
    prepared = block_quantized.prepare_gptq(h, 32, act_order=True)
    parts = [block_quantized.quantize_gptq(w[i:i + 32], prepared, 4) for i in range(0, 96, 32)]
    np.testing.assert_array_equal(np.concatenate([p.codes for p in parts]), whole.codes)
    np.testing.assert_array_equal(np.concatenate([p.scales for p in parts]), whole.scales)
