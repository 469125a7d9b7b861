"""INT4: packing layouts against ONNX Runtime's kernels, the quantizers' quality order, GGUF transcoding, the
MatMulNBits and DequantizeLinear forms, INT4 packages of the tiny models, and the eval command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from helpers import VARIANTS, write_tiny_gguf
from onnx import TensorProto, helper

from llama_export.exporter.cli import main
from llama_export.exporter.package_weights import checkpoint_names, matmulnbits_weights, same_bits
from llama_export.passes.block_quantized import (
    BlockQuantized,
    pack_codes,
    quantize_clip,
    quantize_gptq,
    quantize_rtn,
    unpack_codes,
)

rng = np.random.default_rng(0)


def _session(nodes, initializers, input_shape, optimize=True):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, input_shape)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    if not optimize:  # ONNX Runtime would fuse DequantizeLinear+MatMul into MatMulNBits with int8 activations
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _matmulnbits(q: BlockQuantized, accuracy_level: int = 0):
    n, k = q.shape
    names = ["A", "B", "S"] + (["Z"] if q.zero_points is not None else [])
    inits = [onnx.numpy_helper.from_array(q.matmulnbits_b(), "B"), onnx.numpy_helper.from_array(q.scales, "S")]
    if q.zero_points is not None:
        inits.append(onnx.numpy_helper.from_array(q.ort_zero_points(), "Z"))
    node = helper.make_node("MatMulNBits", names, ["Y"], domain="com.microsoft", K=k, N=n, bits=q.bits,
                            block_size=q.block_size, accuracy_level=accuracy_level)
    return _session([node], inits, [None, k])


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_round_trip(bits):
    codes = rng.integers(0, 1 << bits, (7, 64)).astype(np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (7, 64 * bits // 8)
    assert np.array_equal(unpack_codes(packed, bits), codes)
    if bits == 4:  # low nibble first
        assert packed[0, 0] == codes[0, 0] | (codes[0, 1] << 4)


@pytest.mark.parametrize("symmetric,bits,k", [(True, 4, 128), (False, 4, 96), (False, 4, 80), (True, 8, 64)])
def test_matmulnbits_layout_dequantizes_like_the_numpy_form(symmetric, bits, k):
    """ONNX Runtime's kernel on an identity input returns the weights: they equal BlockQuantized.dequantize()."""
    w = rng.standard_normal((24, k)).astype(np.float32)
    q = quantize_rtn(w, bits, 32, symmetric)
    out = _matmulnbits(q).run(None, {"A": np.eye(k, dtype=np.float32)})[0]
    np.testing.assert_allclose(out.T, q.dequantize(), rtol=0, atol=1e-6)
    step = q.scales.max()
    assert np.abs(q.dequantize() - w).max() <= step * (0.5 + 1e-3)  # round to nearest: at most half a step


def test_matmulnbits_and_dequantizelinear_forms_agree():
    """The ONNX Runtime form and the TensorRT form (INT4 DequantizeLinear with block_size) of the same weights."""
    k, n, block = 128, 40, 32
    q = quantize_rtn(rng.standard_normal((n, k)).astype(np.float32), 4, block, symmetric=True)
    a = rng.standard_normal((3, k)).astype(np.float32)
    nbits = _matmulnbits(q).run(None, {"A": a})[0]
    codes = ir.Tensor(q.signed_codes().T.copy(), dtype=ir.DataType.INT4, name="Q")
    dq = helper.make_node("DequantizeLinear", ["Q", "S"], ["W"], axis=0, block_size=block)
    mm = helper.make_node("MatMul", ["A", "W"], ["Y"])
    initializers = [ir.serde.serialize_tensor(codes), onnx.numpy_helper.from_array(q.scales.T.copy(), "S")]
    session = _session([dq, mm], initializers, [None, k], optimize=False)
    qdq = session.run(None, {"A": a})[0]
    np.testing.assert_allclose(qdq, nbits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(qdq, a @ q.dequantize().T, rtol=1e-5, atol=1e-5)


def test_accuracy_aware_methods_beat_round_to_nearest():
    """On inputs with uneven channel energy and correlations, the output error X(W - Q) shrinks from rtn to clip
    (energy-weighted range search) to gptq (error compensation)."""
    k, n = 256, 64
    x = rng.standard_normal((2048, k)) * np.exp(rng.standard_normal(k))  # uneven channels
    x[:, 1::2] += 0.8 * x[:, 0::2]  # correlated neighbours
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    h = x.T @ x / len(x)

    def output_error(q):
        diff = q.dequantize() - w
        return float(np.einsum("nk,kl,nl->", diff, h, diff))

    rtn = output_error(quantize_rtn(w, 4, 128))
    clip = output_error(quantize_clip(w, np.diag(h), 4, 128))
    gptq = output_error(quantize_gptq(w, h, 4, 128))
    gptq_act_order = output_error(quantize_gptq(w, h, 4, 128, act_order=True))
    assert clip < rtn
    assert gptq < 0.8 * clip and gptq_act_order < 0.8 * clip


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_gguf_block_layouts_are_known_without_reading_the_blocks(tmp_path, monkeypatch, kind):
    """The quantizer plans from the source's layouts and reads each tensor's blocks once, when writing: the
    layout a GGUF's metadata gives must be the one its blocks have (Q8_0 embedding, Q4_0/Q4_1 matrices)."""
    from llama_export.exporter.calibrate import SourceHints
    from llama_export.exporter.sources import gguf_file, open_checkpoint

    path = tmp_path / f"tiny-{kind}.gguf"
    write_tiny_gguf(path, "llama2-gqa", matrix_type=kind)
    checkpoint = open_checkpoint(path)
    hints = SourceHints(checkpoint)
    checked = set()
    for name in checkpoint.weights:
        layout, blocks = hints.prequantized_layout(name), hints.prequantized(name)
        assert (layout is None) == (blocks is None), name
        if blocks is None:
            continue
        assert (layout.bits, layout.block_size, layout.shape, layout.scales.shape) == \
            (blocks.bits, blocks.block_size, blocks.shape, blocks.scales.shape), name
        assert layout.zero_points is None and blocks.zero_points is None
        assert (layout.minimums is None) == (blocks.minimums is None) == (kind == "Q4_0" or blocks.bits == 8), name
        checked.add(blocks.bits)
    assert checked == {4, 8}

    reads = {}
    loader = gguf_file._quantized_loader

    def counting_loader(tensor, *args):
        load = loader(tensor, *args)
        if load is None:
            return None

        def counted():
            reads[tensor.name] = reads.get(tensor.name, 0) + 1
            return load()
        return counted

    monkeypatch.setattr(gguf_file, "_quantized_loader", counting_loader)
    assert main(["--model", str(path), "--precision", "int4", "-o", str(tmp_path / "pkg"), "-q", "--no-verify"]) == 0
    assert reads and set(reads.values()) == {1}, reads  # every carried tensor read once, when written


def test_gguf_stacked_parts_of_two_formats_are_carried_each_in_its_own(tmp_path):
    """q and v in Q4_0 but k in Q4_1 cannot share one packed MatMulNBits's blocks: that layer's qkv becomes one
    MatMulNBits per part (each the file's blocks) joined by a Concat; every weight is the file's."""
    path = tmp_path / "mixed.gguf"
    write_tiny_gguf(path, "llama2-gqa", matrix_type="Q4_0", types={"blk.0.attn_k.weight": "Q4_1"})
    out = tmp_path / "pkg"
    assert main(["--model", str(path), "--precision", "int4", "-o", str(out), "-q", "--no-verify"]) == 0
    model = ir.load(out / "model.onnx")
    names = [n.inputs[1].name for n in model.graph if n.op_type == "MatMulNBits"]
    assert [n for n in names if "layers.0.self_attn" in n and "o_proj" not in n] == [
        f"model.layers.0.self_attn.qkv_proj.weight.part{i}.qweight" for i in range(3)]
    concat = next(n for n in model.graph if n.op_type == "Concat" and n.inputs[0].producer().op_type == "MatMulNBits")
    assert len(concat.inputs) == 3
    _assert_carried_exactly(model, _gguf_values(path), 4 * 2 + 1 + 2)  # the lm_head too
    ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_gguf_blocks_are_carried_over_exactly(tmp_path, kind):
    """A GGUF of Q4_0/Q4_1 matrices (Q8_0 embedding) at block 32: the package holds the file's codes, scales
    and Q4_1 minimums, and its weights dequantize to the GGUF's values bit for bit."""
    path = tmp_path / f"tiny-{kind}.gguf"
    write_tiny_gguf(path, "llama2-gqa", matrix_type=kind)
    out = tmp_path / "pkg"
    assert main(["--model", str(path), "--precision", "int4", "-o", str(out), "-q", "--no-verify"]) == 0
    model = ir.load(out / "model.onnx")
    manifest = json.loads((out / "manifest.json").read_text())
    quantize = next(p for p in manifest["passes"] if p["name"] == "quantize-weights")
    assert quantize["sites"] > 0

    expected = _gguf_values(path)
    matmuls = [n for n in model.graph if n.op_type == "MatMulNBits"]
    plain = [n for n in model.graph if n.op_type == "MatMul"]
    assert matmuls and len(plain) == (4 * 2 + 1 if kind == "Q4_1" else 0)  # Q4_1: a minimum term per matrix
    _assert_carried_exactly(model, expected, len(matmuls))
    gathers = [n for n in model.graph if n.op_type == "GatherBlockQuantized"]
    assert len(gathers) == 1 and gathers[0].attributes.get_int("bits") == 8
    # Q4_1's float16 minimums are stored as they are and cast to float32; the scales stay float32 initializers
    # (MatMulNBits prepacks them), so the graph computes the same with ONNX Runtime's optimizations on or off
    half = {n for n, v in model.graph.initializers.items() if v.dtype == ir.DataType.FLOAT16}
    assert half == ({f"{n.inputs[1].name.removesuffix('.qweight')}.minimums_fp16" for n in matmuls}
                    if kind == "Q4_1" else set())
    assert all(model.graph.initializers[n.inputs[2].name].dtype == ir.DataType.FLOAT for n in matmuls)
    logits = {level: _last_logits(out / "model.onnx", level) for level in
              (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)}
    assert np.abs(logits[ort.GraphOptimizationLevel.ORT_ENABLE_ALL]).max() > 0
    np.testing.assert_allclose(*logits.values(), rtol=0, atol=1e-4)


def _last_logits(path: Path, level) -> np.ndarray:
    """The logits of a 4-token prompt, the package run with ONNX Runtime at this graph optimization level."""
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {}
    for value in session.get_inputs():
        if value.name == "input_ids":
            feeds[value.name] = np.array([[1, 5, 9, 2]], np.int64)
        elif value.name == "attention_mask":
            feeds[value.name] = np.ones((1, 4), np.int64)
        elif value.name == "position_ids":
            feeds[value.name] = np.arange(4, dtype=np.int64)[None]
        else:  # an empty KV cache
            feeds[value.name] = np.zeros([1, value.shape[1], 0, value.shape[3]], np.float32)
    return session.run(["logits"], feeds)[0]


# Mixes as llama.cpp's Q4_K_M writes them (value and down projections in Q6_K; Q5_0 where a row is not whole
# 256-blocks), with Q5_K and Q5_1 added: every format that decodes into MatMulNBits blocks, per layer.
K_QUANT_MIXES = ({"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q5_K", "ffn_gate": "Q4_K",
                  "ffn_up": "Q5_1", "ffn_down": "Q6_K"},
                 {"attn_q": "Q5_0", "attn_k": "Q5_0", "attn_v": "Q8_0", "attn_output": "Q5_1", "ffn_gate": "Q4_K",
                  "ffn_up": "Q4_K", "ffn_down": "Q4_K"})


def test_k_quant_blocks_are_carried_over_exactly(tmp_path):
    """K-quants (Q4_K as 4-bit 32-blocks with minimums, Q5_K as 8-bit 32-blocks with minimums, Q6_K as 8-bit
    16-blocks) and Q5_0/Q5_1 are carried by default; a packed projection whose parts differ in format (Q4_K query
    and key, Q6_K value) becomes one MatMulNBits per part; a Q4_K embedding table is looked up with its minimums.
    Every weight dequantizes to gguf's values bit for bit, and the package passes the default verify."""
    path = tmp_path / "tiny-k.gguf"
    types = {f"blk.{i}.{part}.weight": kind for i, mix in enumerate(K_QUANT_MIXES) for part, kind in mix.items()}
    write_tiny_gguf(path, "llama2-gqa", types={**types, "output.weight": "Q6_K", "token_embd.weight": "Q4_K"},
                    hidden_size=256, intermediate_size=512)
    out = tmp_path / "pkg"
    assert main(["--model", str(path), "--precision", "int4", "-o", str(out), "-q"]) == 0
    model = ir.load(out / "model.onnx")
    matmuls = [n for n in model.graph if n.op_type == "MatMulNBits"]
    # layer 0: query, key, value, output, gate, up, down (both packed projections split); layer 1: qkv, output,
    # gate/up, down; the lm_head
    assert len(matmuls) == 7 + 4 + 1
    assert {(n.attributes.get_int("bits"), n.attributes.get_int("block_size")) for n in matmuls} == {
        (4, 32), (8, 32), (8, 16)}
    expected = _gguf_values(path)
    _assert_carried_exactly(model, expected, len(matmuls))
    gather = next(n for n in model.graph if n.op_type == "GatherBlockQuantized")
    assert gather.attributes.get_int("bits") == 4
    ids = np.array([[0, 5, 319], [7, 7, 1]], np.int64)
    table = _run_lookup(out / "model.onnx", ids, tmp_path)
    assert same_bits(table, expected["model.embed_tokens.weight"][ids])
    parity = json.loads((out / "manifest.json").read_text())["parity"]
    assert parity["passed"], parity


def _run_lookup(path, ids: np.ndarray, tmp_path) -> np.ndarray:
    """The package's embedding rows for `ids`, as ONNX Runtime computes them: the graph from the ids to the end of
    the lookup's minimum term (the Reshape that reads `*.gather.minimums.row_shape`)."""
    model = ir.load(path)
    lookup = next(n for n in model.graph if n.op_type == "GatherBlockQuantized")
    last = next(n for n in model.graph if any(i is not None and i.name.endswith(".gather.minimums.row_shape")
                                             for i in n.inputs))
    needed, todo = set(), [last]
    while todo:
        node = todo.pop()
        if node not in needed:
            needed.add(node)
            todo.extend(i.producer() for i in node.inputs if i is not None and i.producer() is not None)
    model.graph.outputs.clear()
    model.graph.outputs.append(last.outputs[0])
    model.graph.remove([n for n in model.graph if n not in needed])
    ids_input = lookup.inputs[1]
    model.graph.inputs.clear()
    model.graph.inputs.append(ids_input)
    ir.save(model, tmp_path / "lookup.onnx", external_data="lookup.onnx.data")
    session = ort.InferenceSession(str(tmp_path / "lookup.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {ids_input.name: ids})[0]


def _assert_carried_exactly(model: ir.Model, expected: dict[str, np.ndarray], count: int) -> None:
    """Every MatMulNBits weight of the package (with its minimum term, where it has one) dequantizes to the GGUF's
    values bit for bit."""
    checked = 0
    for name, blocks in matmulnbits_weights(model):
        reference = np.concatenate([expected[p] for p in checkpoint_names(name)])
        assert same_bits(blocks.dequantize(), reference), name
        checked += 1
    assert checked == count


def _gguf_values(path) -> dict[str, np.ndarray]:
    """Every quantized tensor of a tiny GGUF as gguf's own dequantizer gives it, in Hugging Face naming and row
    order."""
    import gguf

    from llama_export.exporter.sources.base import unpermute_rows
    from llama_export.families.llama import LLAMA

    heads = {"q_proj": 4, "k_proj": 2}
    expected = {}
    for tensor in gguf.GGUFReader(path).tensors:
        if tensor.tensor_type.name in ("F32", "F16"):
            continue
        name = LLAMA.hf_name(tensor.name)
        values = gguf.dequantize(tensor.data, tensor.tensor_type).reshape(
            tuple(reversed([int(d) for d in tensor.shape])))
        for part, n_heads in heads.items():
            if part in name:
                values = unpermute_rows(values, n_heads)
        expected[name] = values.astype(np.float32)
    return expected


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_gguf_blocks_are_carried_into_tensorrt_dequantize_linear(tmp_path, kind):
    """TensorRT targets: Q4_0/Q4_1 blocks become INT4 DequantizeLinear (block 32, no zero point) with the
    GGUF's own codes and scales; Q4_1's per-block offset (m + 8d, stored fp16) is added after the MatMul."""
    path = tmp_path / f"tiny-{kind}.gguf"
    write_tiny_gguf(path, "llama2-gqa", matrix_type=kind)
    out = tmp_path / "pkg"
    assert main(["--target", "jetson-orin", "--model", str(path), "-o", str(out), "-q", "--no-verify"]) == 0
    model = ir.load(out / "model.onnx")
    expected = _gguf_values(path)
    dequantize = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert len(dequantize) == 4 * 2
    for node in dequantize:
        assert node.attributes.get_int("block_size") == 32 and len(node.inputs) == 2
        codes = node.inputs[0].const_value.numpy().astype(np.float32).T  # [N, K]
        scales = np.repeat(node.inputs[1].const_value.numpy().astype(np.float32).T, 32, axis=1)
        name = node.inputs[0].name.removesuffix(".qweight")
        reference = np.concatenate([expected[p] for p in checkpoint_names(name)])
        offsets = model.graph.initializers.get(name + ".minimums")
        if kind == "Q4_0":
            assert offsets is None
            assert np.array_equal(codes * scales, reference), name  # bit for bit
        else:
            block_offsets = np.repeat(offsets.const_value.numpy().astype(np.float32).T, 32, axis=1)
            exact = reference - codes * scales  # d*q + m - d*(q - 8): constant per block
            assert np.allclose(block_offsets, exact, rtol=2.0 ** -10, atol=0), name  # fp16 storage of m + 8d


def test_tensorrt_requantizes_blocks_it_cannot_carry_and_reports_the_error(tmp_path):
    """Q8_0 matrices on a TensorRT target (symmetric INT4 only): quantized again, each matrix's relative RMS error
    against the file's values in the manifest, and that error is what the package's blocks hold."""
    path = tmp_path / "tiny-q8.gguf"
    write_tiny_gguf(path, "llama2-gqa", matrix_type="Q8_0")
    out = tmp_path / "pkg"
    assert main(["--target", "jetson-orin", "--model", str(path), "--quant", "rtn", "-o", str(out), "-q",
                 "--no-verify"]) == 0
    errors = json.loads((out / "manifest.json").read_text())["requantized_source_blocks"]["relative_rms_error"]
    assert len(errors) == 2 * 4  # packed q/k/v, o, packed gate/up, down per layer
    assert all(0.01 < e < 0.3 for e in errors.values()), errors
    model = ir.load(out / "model.onnx")
    expected = _gguf_values(path)
    node = next(n for n in model.graph if n.op_type == "DequantizeLinear"
                and n.inputs[0].name.startswith("model.layers.1.mlp.down_proj"))
    codes = node.inputs[0].const_value.numpy().astype(np.float32).T
    scales = np.repeat(node.inputs[1].const_value.numpy().astype(np.float32).T, node.attributes.get_int("block_size"),
                       axis=1)
    reference = expected["model.layers.1.mlp.down_proj.weight"]
    measured = np.sqrt(np.square(codes * scales - reference).sum() / np.square(reference).sum())
    assert measured == pytest.approx(errors["model.layers.1.mlp.down_proj.weight"], rel=1e-3)


# A random-weight tiny model has nearly flat logits: its top-2 margins are often smaller than INT4 rounding moves
# them, so its top-1 agreement with fp32 sits far below a trained model's. Measured here: 0.56-0.78 across the
# variants. A wrong layout (nibble order, scale or zero-point placement, transposed blocks) scores near chance
# (1/320 per position, a few percent with repeats), which is what this floor is for.
TINY_TOP1_FLOOR = 0.5


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_int4_tiny_packages_compute_their_own_weights_exactly(tiny_models, tmp_path, variant):
    """The default verify's exactness: with float32 activations the package equals transformers running the
    package's own weights within fp32's tolerance, every greedy token the same, every weight a quantization of
    the source's; quality against fp32 is recorded (KL divergence, perplexity) without gating."""
    out = tmp_path / "pkg"
    assert main(["--model", str(tiny_models[variant]), "--precision", "int4", "-o", str(out), "-q"]) == 0
    model = onnx.load(out / "model.onnx", load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    layers = 2
    assert ops.count("MatMulNBits") == 4 * layers + 1  # qkv, o, gate/up, down per layer, and the lm_head
    assert ops.count("MatMul") == 0 and ops.count("GatherBlockQuantized") == 1
    parity = json.loads((out / "manifest.json").read_text())["parity"]
    exactness, quality = parity["exactness"], parity["quality"]
    assert parity["passed"] and exactness["passed"] and exactness["checked"]
    assert exactness["max_abs_logit_diff"] <= 1e-3 and exactness["top1_agreement"] == 1.0
    assert exactness["greedy_tokens_matched"] == exactness["greedy_tokens_compared"] == 3 * 32
    weights = exactness["weights"]
    assert weights["matrices_compared"] == 7 * layers + 2 and 0 < weights["largest_row_distance"] <= 0.75
    assert quality["top1_agreement"] >= TINY_TOP1_FLOOR, quality["top1_agreement"]
    assert quality["mean_kl"] > 0 and quality["max_kl"] >= quality["mean_kl"]
    assert quality["perplexity"]["tokens"] > 100 and quality["perplexity"]["package"] > 1
    assert parity["arithmetic"]["positions_compared"] == quality["positions_compared"] > parity["positions_compared"]


def _scales_of(package: Path, tensor: str) -> tuple[int, int, tuple[int, ...]]:
    """(offset, length, shape) of an initializer in the package's weight file."""
    model = onnx.load(package / "model.onnx", load_external_data=False)
    init = next(i for i in model.graph.initializer if i.name == tensor)
    where = {entry.key: entry.value for entry in init.external_data}
    return int(where["offset"]), int(where["length"]), tuple(init.dims)


def test_verify_refuses_a_package_with_a_corrupted_weight(tiny_models, tmp_path, capsys):
    """One row of one matrix with its scales negated: the package still runs and computes what its (corrupted)
    weights say, but that row is no quantization of the source's, so exactness fails naming the tensor."""
    out = tmp_path / "pkg"
    assert main(["--model", str(tiny_models["llama3.2-tied"]), "--precision", "int4", "-o", str(out), "-q",
                 "--no-verify"]) == 0
    offset, length, shape = _scales_of(out, "model.layers.1.mlp.down_proj.weight.scales")
    with open(out / "model.onnx.data", "r+b") as f:
        f.seek(offset)
        scales = np.frombuffer(f.read(length), np.float32).reshape(shape).copy()
        scales[3] *= -1
        f.seek(offset)
        f.write(scales.tobytes())
    capsys.readouterr()
    assert main(["verify", str(out), "--json", str(tmp_path / "verify.json")]) == 1
    printed = capsys.readouterr().out
    assert "FAILED" in printed and "'model.layers.1.mlp.down_proj.weight'" in printed and "row 3" in printed
    exactness = json.loads((tmp_path / "verify.json").read_text())["exactness"]
    assert not exactness["passed"] and exactness["weights"]["largest_row_distance"] > 1.5


def test_quality_gates_are_opt_in(tiny_models, tmp_path, capsys):
    """A tiny random model's INT4 package is exact but far from fp32: it passes by default and fails when a
    top-1 agreement it cannot reach is asked for, saying which gate."""
    out = tmp_path / "pkg"
    assert main(["--model", str(tiny_models["llama2-gqa"]), "--precision", "int4", "-o", str(out), "-q",
                 "--no-verify"]) == 0
    assert main(["verify", str(out)]) == 0
    capsys.readouterr()
    assert main(["verify", str(out), "--min-top1", "0.99", "--max-kl", "0"]) == 1
    printed = capsys.readouterr().out
    assert "--min-top1 0.99" in printed and "--max-kl 0.0" in printed


def test_tied_embedding_shares_the_lm_head_data(tiny_models, tmp_path):
    out = tmp_path / "pkg"
    assert main(["--model", str(tiny_models["llama3.2-tied"]), "--precision", "int4", "-o", str(out), "-q",
                 "--no-verify"]) == 0
    model = ir.load(out / "model.onnx")
    gather = next(n for n in model.graph if n.op_type == "GatherBlockQuantized")
    reshape = gather.inputs[0].producer()
    assert reshape is not None and reshape.op_type == "Reshape"
    lm_head = next(n for n in model.graph if n.op_type == "MatMulNBits" and n.outputs[0].is_graph_output())
    assert reshape.inputs[0] is lm_head.inputs[1]  # one table in the file


def test_block_128_and_symmetric_options(tiny_models, tmp_path):
    out = tmp_path / "pkg"
    assert main(["--model", str(tiny_models["llama2-gqa"]), "--precision", "int4", "--block-size", "64",
                 "--symmetric", "--quant", "rtn", "-o", str(out), "-q", "--no-verify"]) == 0
    model = onnx.load(out / "model.onnx", load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    blocks = [helper.get_attribute_value(next(a for a in n.attribute if a.name == "block_size")) for n in nbits]
    lm_head = [i for i, n in enumerate(nbits) if n.output[0] == "logits"]
    assert len(lm_head) == 1 and blocks[lm_head[0]] == 32  # the lm_head keeps 32-blocks by default
    assert all(b == 64 for i, b in enumerate(blocks) if i != lm_head[0])
    assert all(len(n.input) == 3 for n in nbits)  # symmetric: no zero points


def test_bad_block_size_is_one_line_error(tiny_models, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tiny_models["llama2-gqa"]), "--precision", "int4", "--block-size", "48",
              "-o", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "block-size" in capsys.readouterr().err


def test_eval_package_matches_source_perplexity(tiny_models, tmp_path):
    """fp32 package and PyTorch source give the same perplexity on the same text; the JSON has the fields."""
    from helpers import CORPUS

    text = tmp_path / "text.txt"
    text.write_text(CORPUS)
    out = tmp_path / "pkg"
    source = tiny_models["llama2-gqa"]
    assert main(["--model", str(source), "-o", str(out), "-q", "--no-verify"]) == 0
    assert main(["eval", str(out), "--text", str(text), "--window", "64", "--json", str(tmp_path / "p.json")]) == 0
    assert main(["eval", str(source), "--text", str(text), "--window", "64", "--json", str(tmp_path / "s.json")]) == 0
    ours, theirs = (json.loads((tmp_path / f).read_text()) for f in ("p.json", "s.json"))
    assert ours["tokens"] == theirs["tokens"] > 100
    assert ours["perplexity"] == pytest.approx(theirs["perplexity"], rel=1e-4)
    assert ours["perplexity"] > 1 and ours["windows"] == theirs["windows"] >= 2


def test_eval_rejects_missing_text(tiny_models, tmp_path, capsys):
    assert main(["eval", str(tiny_models["llama2-gqa"]), "--text", str(tmp_path / "none.txt")]) == 1
    assert "text file not found" in capsys.readouterr().err


def test_int4_options_need_int4_precision(tiny_models, tmp_path, capsys):
    assert main(["--model", str(tiny_models["llama2-gqa"]), "--block-size", "64", "-o", str(tmp_path / "x")]) == 1
    assert "--block-size applies to --precision int4 only" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("hidden", [64, 96, 100])  # 96: padded 128-blocks for the 4-bit part; 100: both padded
def test_split_lm_head_and_its_tied_lookup_compute_the_quantized_table(hidden):
    """A tied table [V, H] read by Gather (embedding) and by the lm_head MatMul: with frequent rows, the first rows
    become 8-bit and the rest 4-bit, and both the lookup and the logits equal those of the two parts dequantized."""
    from llama_export.passes.quantize import QuantizeWeights, QuantOptions
    from llama_export.passes.quantized_graph import dividing_block

    vocab, frequent = 320, 100
    table = rng.standard_normal((vocab, hidden)).astype(np.float32)
    weight = helper.make_tensor("W", TensorProto.FLOAT, [hidden, vocab], table.T.copy().ravel())
    nodes = [helper.make_node("Transpose", ["W"], ["T"], perm=[1, 0]),
             helper.make_node("Gather", ["T", "ids"], ["embedded"], axis=0),
             helper.make_node("MatMul", ["embedded", "W"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, None])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("embedded", TensorProto.FLOAT, None)], [weight])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    options = QuantOptions(method="rtn", accuracy_level=0, lm_head_frequent_rows=frequent)
    assert QuantizeWeights(options).apply(model) == 2
    ops = [n.op_type for n in model.graph]
    assert ops.count("MatMulNBits") == 2 and ops.count("GatherBlockQuantized") == 2 and "Gather" not in ops
    bits = sorted(n.attributes.get_int("bits") for n in model.graph if n.op_type == "MatMulNBits")
    assert bits == [4, 8]
    model.opset_imports["com.microsoft"] = 1
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[0, 5, frequent - 1, frequent, frequent + 7, vocab - 1]], dtype=np.int64)
    logits, embedded = session.run(["logits", "embedded"], {"ids": ids})
    frequent_part = quantize_rtn(table[:frequent], 8, dividing_block(64, hidden), symmetric=True)
    expected_table = np.concatenate([frequent_part.dequantize(), quantize_rtn(table[frequent:], 4, 128).dequantize()])
    np.testing.assert_array_equal(embedded[0], expected_table[ids[0]])
    np.testing.assert_allclose(logits[0], expected_table[ids[0]] @ expected_table.T, rtol=1e-4, atol=1e-3)


def test_the_cpu_lm_head_splits_unless_a_width_is_asked_for_and_only_a_large_vocabulary():
    from llama_export.targets import get_target
    from llama_export.targets.presets import FREQUENT_LM_HEAD_ROWS

    def splits(lm_head_bits, vocab):
        return get_target("cpu").int4_preset(32).for_export(32, lm_head_bits, vocab).frequent_head_rows > 0

    large = FREQUENT_LM_HEAD_ROWS * 3
    assert splits(None, large)
    assert not splits(None, FREQUENT_LM_HEAD_ROWS)  # nothing left to put at 4 bits
    assert not splits(4, large)  # every row at the width asked for
    assert not splits(8, large)
    assert get_target("cpu").int4_preset(32).for_export(32, None, FREQUENT_LM_HEAD_ROWS).lm_head_bits == 4
    fast = get_target("cpu").int4_preset(128)  # the builder's layout: 8-bit head in 64-blocks, no edge layers
    assert fast.for_export(128, None, large).lm_head_bits == 8 and fast.for_export(128, 4, large).lm_head_bits == 4
    assert fast.edge_layer_block is None and fast.for_export(128, None, large).frequent_head_rows == 0


def test_edge_layers_are_named_only_in_deep_models():
    from llama_export.exporter.sources.base import WeightInfo
    from llama_export.targets.presets import edge_layer_weights

    def weights(layers):
        names = [f"model.layers.{i}.{m}.weight" for i in range(layers)
                 for m in ("self_attn.q_proj", "mlp.down_proj", "input_layernorm")]
        return {n: WeightInfo((4,) if "norm" in n else (4, 4), lambda: None) for n in names}

    assert edge_layer_weights(weights(12), 12) == {
        "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
        "model.layers.11.self_attn.q_proj.weight", "model.layers.11.mlp.down_proj.weight"}  # matrices, not norms
    assert edge_layer_weights(weights(4), 4) == frozenset()  # there they would be half the model


def test_sensitive_weights_take_finer_blocks_packed_parts_only_when_all_are_named():
    """Three MatMuls: one named weight, one packed from a named and an unnamed tensor, one unnamed."""
    from llama_export.names import SOURCE_NAMES
    from llama_export.passes.quantize import QuantizeWeights, QuantOptions

    rng = np.random.default_rng(3)
    k, n = 256, 48
    weights = [onnx.numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), f"w{i}") for i in range(3)]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(3)]
    nodes.append(helper.make_node("Sum", ["y0", "y1", "y2"], ["out"]))  # a graph output would be the lm_head
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], weights)
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    for name, sources in (("w0", ["a"]), ("w1", ["a", "b"]), ("w2", ["c"])):
        model.graph.initializers[name].meta[SOURCE_NAMES] = sources
    options = QuantOptions(block_size=128, method="rtn", sensitive_weights=frozenset({"a"}), sensitive_block_size=32)
    assert QuantizeWeights(options).apply(model) == 3
    blocks = {n.inputs[1].name.split(".")[0]: n.attributes.get_int("block_size")
              for n in model.graph if n.op_type == "MatMulNBits"}
    assert blocks == {"w0": 32, "w1": 128, "w2": 128}


def test_cpu_block_128_is_the_fast_layout_and_finer_parts_stay_below_it(tmp_path):
    """At block 128 the cpu target drops the edge layers' 32-blocks (the builder's layout, for its speed) and keeps
    the lm_head at 8 bits in 64-blocks; at 64 the edge layers are there and the lm_head is 4-bit in 32-blocks."""
    from helpers import make_hf_model

    model = make_hf_model(tmp_path / "deep", "llama2-gqa", num_hidden_layers=8)
    found, heads = {}, {}
    for block in (64, 128):
        out = tmp_path / f"b{block}"
        assert main(["--model", str(model), "--precision", "int4", "--block-size", str(block), "-o", str(out), "-q",
                     "--no-verify"]) == 0
        graph = onnx.load(out / "model.onnx", load_external_data=False).graph
        nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
        found[block] = [(n.output[0] == "logits", helper.get_attribute_value(
            next(a for a in n.attribute if a.name == "block_size"))) for n in nbits]
        heads[block] = [helper.get_attribute_value(next(a for a in n.attribute if a.name == "bits"))
                        for n in nbits if n.output[0] == "logits"]
    assert sorted(b for head, b in found[64] if not head) == [32] * 8 + [64] * 24  # layers 0 and 7 in 32-blocks
    assert [b for head, b in found[64] if head] == [32]
    assert 32 not in [b for _, b in found[128]]
    assert [b for head, b in found[128] if not head] == [128] * 32  # padded past hidden size 64
    assert [b for head, b in found[128] if head] == [64] and heads == {64: [4], 128: [8]}


def _q4_1_copy(values: np.ndarray) -> np.ndarray:
    """values quantized to GGUF Q4_1 by gguf's own quantizer and dequantized again: a float copy on a 4-bit grid."""
    from gguf.quants import GGMLQuantizationType, dequantize, quantize

    kind = GGMLQuantizationType.Q4_1
    return dequantize(quantize(np.asarray(values, np.float32), kind), kind).astype(np.float32)


def test_a_grid_is_recognized_bit_for_bit_and_nothing_else_is():
    from llama_export.exporter.sources.grid import on_grid, recover_grid

    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 96)).astype(np.float32)
    grid = _q4_1_copy(w)
    blocks = recover_grid(grid)
    assert blocks is not None and blocks.minimums is not None and same_bits(blocks.dequantize(), grid)
    assert recover_grid(w) is None
    assert on_grid(lambda a, b: grid[a:b], grid.shape) and not on_grid(lambda a, b: w[a:b], w.shape)
    assert not on_grid(lambda a, b: np.zeros((b - a, 96), np.float32), (48, 96))  # says nothing
    assert not on_grid(lambda a, b: grid[a:b, :80], (48, 80))  # not whole 32-blocks
    off = grid.copy()
    off[3, 5] += 1e-3  # row 3 is not among the sampled ones
    assert recover_grid(off) is None
    nearest = recover_grid(off, strict=False)
    assert same_bits(np.delete(nearest.dequantize(), 3, 0), np.delete(grid, 3, 0))
    assert np.abs(nearest.dequantize()[3] - off[3]).max() <= nearest.scales[3].max() / 2 + 1e-7


def test_a_float_copy_of_a_4_bit_model_keeps_its_grid(tmp_path):
    """A Hugging Face folder whose matrices were dequantized from Q4_1 (as the default model's folder is): an INT4
    export at block 32 carries their grid (the package's weights equal the folder's bit for bit, with minimum terms),
    and passes verify; at block 128 the matrices are quantized again, in 128-blocks."""
    from helpers import make_hf_model
    from safetensors.numpy import load_file, save_file

    folder = make_hf_model(tmp_path / "grid", "llama2-gqa")
    weights = load_file(str(folder / "model.safetensors"))
    on_grid = {n: _q4_1_copy(v) for n, v in weights.items() if n.startswith("model.layers.") and v.ndim == 2}
    save_file({**weights, **on_grid}, str(folder / "model.safetensors"), metadata={"format": "pt"})

    out = tmp_path / "pkg"
    assert main(["--model", str(folder), "--precision", "int4", "-o", str(out), "-q"]) == 0
    model = ir.load(out / "model.onnx")
    carried = dict(matmulnbits_weights(model))
    layers = {name: blocks for name, blocks in carried.items() if "layers" in name}
    assert len(layers) == 2 * 4  # q/k/v, o, gate/up, down per layer
    for name, blocks in layers.items():
        assert blocks.minimums is not None and blocks.block_size == 32, name
        assert same_bits(blocks.dequantize(), np.concatenate([on_grid[p] for p in checkpoint_names(name)])), name
    assert json.loads((out / "manifest.json").read_text())["parity"]["passed"]

    out128 = tmp_path / "pkg128"
    assert main(["--model", str(folder), "--precision", "int4", "--block-size", "128", "-o", str(out128), "-q",
                 "--no-verify"]) == 0
    requantized = dict(matmulnbits_weights(ir.load(out128 / "model.onnx")))
    assert all(b.minimums is None and b.block_size == 128 for n, b in requantized.items() if "layers" in n)
    out32 = tmp_path / "pkg32"
    assert main(["--model", str(folder), "--precision", "int4", "--requantize", "-o", str(out32), "-q",
                 "--no-verify"]) == 0
    requantized = dict(matmulnbits_weights(ir.load(out32 / "model.onnx")))
    assert all(b.minimums is None and b.block_size == 32 for n, b in requantized.items() if "layers" in n)
