"""A target defined in this file alone (its recipe, INT4 preset and finishing step), registered, exports through the
same export() as the shipped targets: nothing in the exporter names targets."""

from __future__ import annotations

import json
from dataclasses import dataclass

import onnx

from llama_export.exporter.pipeline import ExportOptions, export
from llama_export.targets import TARGETS, Finished, Finishing, Target, register
from llama_export.targets.cpu import cpu_pipeline
from llama_export.targets.presets import QuantPreset

# Every layer matrix in the layers' blocks and an 8-bit lm_head, unlike the cpu target's default at block 32.
NOTES_INT4 = QuantPreset("notes", lm_head_bits=8, lm_head_block=None, edge_layer_block=None)


@dataclass(frozen=True)
class NotesTarget(Target):
    """The cpu graph, plus a file of notes the finishing step writes."""

    def preflight(self, shape, precision, block_size, context, preset, float_embedding, log) -> None:
        log(f"      notes target: {shape.layers} layers, block {block_size}")

    def finish(self, work: Finishing) -> Finished:
        (work.folder / "NOTES.txt").write_text(f"context {work.context}, vocabulary {work.vocab_size}\n")
        return Finished(manifest={"notes": {"context": work.context}}, graph=work.folder)


def test_a_target_from_one_file_exports_and_verifies(tmp_path, tiny_models):
    target = NotesTarget(name="notes", description="test target", device="any CPU", runtime="onnxruntime",
                         precisions=("int4", "fp32"), default_precision="int4", pipeline=cpu_pipeline,
                         int4=NOTES_INT4)
    register(target)
    try:
        out = export(ExportOptions(model=str(tiny_models["llama2-gqa"]), target="notes", output=tmp_path / "pkg",
                                   quant_method="rtn", quiet=True))
    finally:
        TARGETS.pop("notes")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "notes" and manifest["precision"] == "int4"
    assert manifest["parity"]["passed"] and manifest["parity"]["exactness"]["passed"]
    assert manifest["notes"] == {"context": 512}
    assert (out / "NOTES.txt").read_text() == "context 512, vocabulary 320\n"
    assert "NOTES.txt" in manifest["files"]
    graph = onnx.load(out / "model.onnx", load_external_data=False)
    bits = {n.input[1].split("/")[0]: next(a.i for a in n.attribute if a.name == "bits")
            for n in graph.graph.node if n.op_type == "MatMulNBits"}
    head = [b for name, b in bits.items() if name.startswith("lm_head")]
    assert head == [8] and set(b for name, b in bits.items() if not name.startswith("lm_head")) == {4}
    assert "notes" not in TARGETS
