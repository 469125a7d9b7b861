"""The phone targets: the cpu target's fused graph as an ORT-format model for ONNX Runtime Mobile.

ONNX Runtime Mobile loads the ORT flatbuffer format: one file, no external data, at most 2 GiB (flatbuffers
address with 32-bit offsets). The LLM kernels (MatMulNBits, GroupQueryAttention, SkipSimplifiedLayerNormalization)
run on its CPU provider, so the graph is the cpu target's. The package also carries the operator list a minimal
ONNX Runtime build needs (`--include_ops_by_config`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from llama_export.targets.base import Finished, Finishing, Target, TargetError
from llama_export.targets.cpu import cpu_pipeline
from llama_export.targets.package import DATA_FILE, MODEL_FILE
from llama_export.targets.plan import ModelShape
from llama_export.targets.presets import PHONE, QuantPreset

ORT_MODEL_FILE = "model.ort"
OPERATORS_FILE = "required_operators.config"
ORT_FORMAT_LIMIT = 2 << 30  # flatbuffers' 32-bit offsets
# An ORT-format package's ONNX files, kept in the staging folder until verify has read its weights back from them.
ONNX_GRAPH_FOR_VERIFY = "onnx-graph"


@dataclass(frozen=True)
class PhoneTarget(Target):
    def preflight(self, shape, precision, block_size, context, preset, float_embedding, log) -> None:
        check_size(self, shape, precision, block_size, preset, float_embedding)

    def weights_summary(self, model) -> dict:
        return size_breakdown(model)

    def finish(self, work: Finishing) -> Finished:
        work.log("      converting to the ORT format (ONNX Runtime Mobile)")
        graph = work.folder / ONNX_GRAPH_FOR_VERIFY if work.keep_graph else None
        ort_format = convert_to_ort(work.folder, work.weight_bytes, log=work.log, keep_graph_in=graph)
        return Finished(manifest={"ort_format": ort_format}, graph=graph)


def _mobile_target(name: str, description: str, device: str) -> Target:
    return PhoneTarget(
        name=name,
        description=description,
        device=device,
        runtime="ONNX Runtime Mobile (CPU provider; full or minimal build), onnxruntime-genai",
        precisions=("int4", "fp32"),
        default_precision="int4",
        pipeline=cpu_pipeline,
        int4=PHONE,
        model_file=ORT_MODEL_FILE,
    )


ANDROID = _mobile_target("android-arm64", "ORT-format package for Android phones (arm64-v8a)",
                         "Android arm64 phone")
IOS = _mobile_target("ios-arm64", "ORT-format package for iPhones and iPads (arm64)", "iOS arm64 device")
MOBILE_TARGETS = (ANDROID, IOS)


def estimated_model_bytes(shape: ModelShape, precision: str, block: int, preset: QuantPreset = PHONE,
                          float_embedding: bool = False) -> float:
    """What the model file will hold, from the config alone: fp32, or INT4 laid out as the (settled) preset says,
    the lookup table fp32 with `float_embedding`."""
    norms = (2 * shape.layers + 1) * shape.hidden * 4
    if precision == "fp32":
        return shape.parameters * 4 + norms
    return (preset.layer_bytes(shape.layer_weights, shape.layers, block)
            + preset.table_bytes(shape.vocab, shape.hidden, shape.tied, block, float_embedding) + norms)


def check_size(target: Target, shape: ModelShape, precision: str, block: int, preset: QuantPreset = PHONE,
               float_embedding: bool = False) -> float:
    """Refuse, before tracing, a model whose ORT file would pass the format's limit; says what would fit."""
    size = estimated_model_bytes(shape, precision, block, preset, float_embedding)
    if size <= ORT_FORMAT_LIMIT:
        return size
    text = (f"{shape.name} in {precision} needs about {size / 2**30:.1f} GiB as an ORT-format model; the format holds "
            f"at most 2 GiB (one flatbuffer, no external data)")
    int4 = estimated_model_bytes(shape, "int4", block, preset, float_embedding)
    if precision != "int4" and int4 <= ORT_FORMAT_LIMIT:
        raise TargetError(f"{text}; --precision int4 would fit ({int4 / 2**30:.1f} GiB)")
    per_param = int4 / shape.parameters
    largest = ORT_FORMAT_LIMIT / per_param / 1e9
    raise TargetError(f"{text}; INT4 needs {int4 / 2**30:.1f} GiB, so only models up to about {largest:.1f}B "
                      f"parameters fit {target.name} (the cpu target has no such limit)")


def size_breakdown(model: ir.Model) -> dict[str, int]:
    """Bytes of the graph's weights by what they serve (before the conversion; the file adds the graph)."""
    groups = {"decoder layer matrices": 0, "norms": 0, "embedding": 0, "lm_head": 0, "rotary cos/sin caches": 0,
              "other constants": 0}
    for value in model.graph.initializers.values():
        if value.const_value is None:
            continue
        name = value.name
        if "norm" in name:
            group = "norms"
        elif name.startswith("model.layers."):
            group = "decoder layer matrices"
        elif "embed_tokens" in name:
            group = "embedding"
        elif name.startswith("lm_head"):
            group = "lm_head"
        elif name in ("cos_cache", "sin_cache"):
            group = "rotary cos/sin caches"
        else:
            group = "other constants"
        groups[group] += value.const_value.nbytes
    return {group: size for group, size in groups.items() if size}  # a tied lm_head has no bytes of its own


def convert_to_ort(folder: Path, weight_bytes: dict[str, int], log=None, keep_graph_in: Path | None = None) -> dict:
    """model.onnx (+ data) in `folder` becomes model.ort and its operator list (the export writes genai_config.json
    naming model.ort from the start); the ONNX files are moved to `keep_graph_in` (verify reads the weights back
    from them) or removed.

    ONNX Runtime's own graph optimizers are left off: the passes already wrote the fused graph the CPU kernels
    want, and constant folding would copy the tied table out of its shared Reshape (measured: +28 MB on the
    default model). A minimal ONNX Runtime build, which applies no optimizers, then runs exactly this graph."""
    import onnxruntime as ort
    from onnxruntime.tools.ort_format_model import create_config_from_models

    source, target = folder / MODEL_FILE, folder / ORT_MODEL_FILE
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.optimized_model_filepath = str(target)
    options.add_session_config_entry("session.save_model_format", "ORT")
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise TargetError(f"ONNX Runtime could not write the ORT-format model ({str(exc).splitlines()[0]})") from None
    size = target.stat().st_size
    if size > ORT_FORMAT_LIMIT:
        raise TargetError(f"the ORT-format model came to {size / 2**30:.2f} GiB, over the format's 2 GiB limit; "
                          "--precision int4 makes it smaller")
    operators = folder / OPERATORS_FILE
    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)  # it logs where it wrote, at INFO
    create_config_from_models([target], operators, enable_type_reduction=False)
    # The tool names the files it read (here the staging folder's paths); the package names its own file.
    lines = operators.read_text().splitlines()
    body = [line for line in lines if not line.startswith("#")]
    operators.write_text("\n".join([f"# Operators {ORT_MODEL_FILE} needs: build a minimal ONNX Runtime with "
                                    f"--minimal_build --include_ops_by_config {OPERATORS_FILE}", *body]) + "\n")
    if keep_graph_in is not None:
        keep_graph_in.mkdir()
    for name in (MODEL_FILE, DATA_FILE):
        if keep_graph_in is not None and (folder / name).exists():
            (folder / name).rename(keep_graph_in / name)
        (folder / name).unlink(missing_ok=True)
    weights = sum(weight_bytes.values())
    if log:
        log(f"      {ORT_MODEL_FILE}: {size / 1e6:.1f} MB; {len(body)} operator domains/opsets in {OPERATORS_FILE}")
    return {
        "model": ORT_MODEL_FILE,
        "model_bytes": size,
        "limit_bytes": ORT_FORMAT_LIMIT,
        "required_operators": OPERATORS_FILE,
        "graph_optimization": "none at conversion (the graph is already fused)",
        "size_breakdown": {**weight_bytes, "graph and format": max(size - weights, 0)},
    }
