"""The build half of an export: open the source, check that it fits, trace, run the target's passes and write the
package's graph, weights and tokenizer into the staging folder (pipeline.export does the rest). For large sources
it runs in a process of its own (exporter/build_process.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llama_export.exporter import export_memory
from llama_export.exporter.build_process import Built
from llama_export.exporter.calibrate import order_by_layer
from llama_export.exporter.errors import UserError
from llama_export.exporter.pipeline import (
    ExportOptions,
    build_manifest,
    check_export_memory,
    default_block_size,
    quantization_plan,
)
from llama_export.exporter.progress import Progress
from llama_export.exporter.sources import open_checkpoint
from llama_export.exporter.sources.grid import GRID_BLOCK, mark_grid_weights
from llama_export.passes import format_report, run_passes
from llama_export.passes.quantize import QuantizeWeights
from llama_export.targets import get_target
from llama_export.targets import package as pkg
from llama_export.targets.plan import ModelShape


def build(options: ExportOptions, source: Path, staging: Path, progress: Progress) -> Built:
    target = get_target(options.target)
    precision = options.precision or target.default_precision

    progress.begin("Opening the model")
    checkpoint = open_checkpoint(source, options.lora)
    config = checkpoint.config
    progress.end(f"{checkpoint.name} ({checkpoint.kind}), {config.num_hidden_layers} layers, "
                 f"{config.num_attention_heads}/{config.num_key_value_heads} q/kv heads, vocab {config.vocab_size}")
    if options.requantize:
        checkpoint.forget_source_blocks()
    elif precision == "int4" and checkpoint.kind == "hf" and options.block_size in (None, GRID_BLOCK):
        found, total = mark_grid_weights(checkpoint)
        if found:
            progress.log(f"      {found} of {total} matrices already lie on a 4-bit {GRID_BLOCK}-block grid (a "
                         "quantized model's float copy): carried as they are")
    block_size = options.block_size or default_block_size(target, checkpoint)
    context = options.context or min(config.max_position_embeddings, pkg.DEFAULT_MAX_LENGTH)
    if context > config.max_position_embeddings:
        raise UserError(f"--context {context} is longer than the model's {config.max_position_embeddings} positions")
    shape = ModelShape.from_config(config, checkpoint.name)
    try:
        preset = target.int4_preset(block_size).for_export(block_size, options.lm_head_bits, config.vocab_size,
                                                           options.eight_bit_share)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if shape.experts:
        preset = _experts_preset(shape, target, precision, block_size, preset, options.eight_bit_share)
    target.preflight(shape, precision, block_size, context, preset, float_embedding=not options.quantize_embedding,
                     log=progress.log)

    check_export_memory(options, config, precision, checkpoint, block_size, preset, progress.log)

    from llama_export.exporter.trace import trace_to_onnx
    from llama_export.names import FROM_CACHE

    progress.begin("Tracing with torch.onnx (dynamo, opset 23), weights not loaded")
    with progress.ticking("tracing"):
        model = trace_to_onnx(checkpoint)
    progress.end(f"{sum(1 for _ in model.graph)} nodes" + (", traced earlier (from the cache)"
                                                            if model.meta.get(FROM_CACHE) else ""))

    progress.begin(f"Running the '{target.name}' passes ({precision})")
    quant, hints = None, None
    if precision == "int4":  # with --eight-bit-share, its gradient pass runs here
        quant, hints = quantization_plan(options, block_size, checkpoint, preset, progress.log)
    passes = target.pipeline(precision, config, quant, hints)
    if options.layout == "optimum":  # plain attention over the traced mask: padded batches, position_ids an input
        from llama_export.passes.attention import FuseGroupQueryAttention

        passes = [p for p in passes if not isinstance(p, FuseGroupQueryAttention)]
    lora_inputs = None
    if options.runtime_lora:
        from llama_export.exporter.runtime_adapters import lora_inputs_pass

        lora_inputs = lora_inputs_pass(checkpoint, options.runtime_lora)
        passes.append(lora_inputs)
    reports = run_passes(model, passes, log=progress.log)
    target.check_graph(model)
    progress.end()

    if hints is not None and hints.hessians:
        order_by_layer(model, config)
    progress.begin("Writing the package (weights streamed one tensor at a time)")
    pkg.save_model(model, staging, progress=progress.counter("weights written", "tensor"))
    io = pkg.io_dims(model)
    pkg.write_json(staging / "genai_config.json",
                   pkg.genai_config(model, config, context, target.model_file, threads=target.genai_threads))
    pkg.write_json(staging / "config.json", pkg.hf_config(config, checkpoint.family.causal_lm))
    pkg.write_json(staging / "generation_config.json", pkg.generation_config(config, context))
    weight_bytes = target.weights_summary(model)
    quantization = requantization_errors(passes, progress.log)
    if quant is not None and quant.eight_bit_weights:
        quantization["eight_bit_matrices"] = sorted(quant.eight_bit_weights)
    del passes
    del model
    runtime_adapters = {}
    if lora_inputs is not None:
        from llama_export.exporter.runtime_adapters import write_adapter_files

        runtime_adapters["runtime_lora"] = write_adapter_files(checkpoint, options.runtime_lora, lora_inputs.adapted,
                                                               staging)
    if not checkpoint.write_tokenizer(staging):
        progress.log("      note: the source has no tokenizer; `run` will need token ids")
    progress.end(f"{sum(p.stat().st_size for p in staging.iterdir() if p.is_file()) / 1e6:.0f} MB")

    quant = hints = None  # the calibration stream and its last layer's state
    export_memory.hand_back_freed_memory()
    return Built(steps=progress.step, stages=progress.stages, io=io, context=context, vocab_size=config.vocab_size,
                 block_size=block_size,
                 weight_bytes=weight_bytes, report=format_report(reports) if options.report else None,
                 manifest={**build_manifest(checkpoint, target.name, precision, io, reports), "layout": options.layout,
                           **quantization,
                           **runtime_adapters})


def requantization_errors(passes, log) -> dict:
    """The source's own blocks that were quantized again (a GGUF's Q5_K, Q6_K or Q8_0 blocks on a TensorRT target,
    which takes symmetric INT4 only; any source's blocks where --block-size asks for another size): logged, and for
    the manifest."""
    errors = {}
    for graph_pass in passes:
        if isinstance(graph_pass, QuantizeWeights):
            errors.update(graph_pass.requantized.relative_rms())
    if not errors:
        return {}
    worst = max(errors, key=errors.get)
    log(f"      {len(errors)} matrices of the source's own blocks quantized again (their format or block size is "
        f"not this package's): relative RMS error {np.median(list(errors.values())):.2%} median, "
        f"{errors[worst]:.2%} at most ({worst})")
    return {"requantized_source_blocks": {"relative_rms_error": errors}}


def _experts_preset(shape, target, precision: str, block_size: int, preset, eight_bit_share):
    """A mixture of experts' limits: ONNX Runtime's QMoE blocks must tile the experts' matrices; the 8-bit choice
    does not score experts (exporter/sensitivity.py), so its default share is dropped and an asked one refused."""
    from dataclasses import replace

    if precision == "int4" and target.tensorrt is None and (shape.hidden % block_size
                                                            or shape.intermediate % block_size):
        raise UserError(f"--block-size {block_size}: the experts' matrices (hidden {shape.hidden}, width "
                        f"{shape.intermediate}) must be whole blocks for ONNX Runtime's QMoE; choose a block size "
                        "dividing both")
    if eight_bit_share:
        raise UserError("--eight-bit-share: the 8-bit choice does not score a mixture of experts' layers yet; "
                        "leave the option out")
    return replace(preset, eight_bit_share=0.0)
